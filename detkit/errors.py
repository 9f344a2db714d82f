"""detkit's user-facing exceptions.

Every mistake a user can make (a bad config key, a missing file, an unreadable image, a broken
annotation) raises a subclass of `DetkitError` whose message names the offending file/key/value and
says what to do. The tools catch `DetkitError` at their boundary and print the message alone (the
traceback only with `--debug`).
"""


class DetkitError(Exception):
    """Base class of the errors detkit reports to users as one clear message."""


class ConfigError(DetkitError):
    """An unknown key, a wrong type or an invalid value in a YAML config or a CLI override."""


class DataError(DetkitError):
    """A dataset, annotation file or image that cannot be used as given."""


class ImageReadError(DataError):
    """One image file that cannot be decoded (corrupt, truncated, empty, not an image)."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class VideoReadError(DataError):
    """A video file, camera or stream that cannot be opened or read. source: "video clip.mp4",
    "camera 0", "stream rtsp://..."; reason: what failed and what to check."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"cannot read {source}: {reason}")


class CheckpointError(DetkitError):
    """A checkpoint or weights file that is missing, unsafe or does not fit the model."""


class PeerFailedError(DetkitError):
    """Another process of a multi-process run failed, so this one stopped too; that process prints
    the reason (its own error), this one names it."""

    def __init__(self, rank: int, kind: str, message: str):
        self.rank, self.kind, self.message = rank, kind, message
        super().__init__(
            f"rank {rank} failed with {kind}, so this process stopped too; rank {rank}'s error line says why"
        )


class NonFiniteLossError(DetkitError):
    """A training loss became nan or inf; the run stopped after saving the last good state."""


class ExportError(DetkitError):
    """A model that cannot be exported as asked, or an export extra that is not installed."""


class RequestError(DetkitError):
    """A request to the detection service that cannot be answered as sent (detkit serve): `status`
    is the HTTP status to answer with (400, 413, 415), `reason` one line saying what to change."""

    def __init__(self, status: int, reason: str):
        self.status = status
        self.reason = reason
        super().__init__(reason)
