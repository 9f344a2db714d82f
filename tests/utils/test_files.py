"""Atomic writes (detkit/utils/files.py): the target is the old file or the new one, never a mix,
and no temporary file outlives the write."""

from __future__ import annotations

import os

import pytest

from detkit.utils.files import TEMP_PREFIX, AtomicOutput, atomic_output, atomic_write, write_text_atomic


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_replaces_the_target_through_a_temp_file_in_its_folder(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    seen = {}

    def write(f):
        f.write("new ")
        f.flush()
        seen["temp"] = f.name
        seen["target_during_write"] = target.read_text()  # the old file until the rename
        f.write("content")

    assert atomic_write(target, write, mode="w") == target
    assert target.read_text() == "new content"
    assert seen["target_during_write"] == "old"
    temp = os.path.basename(seen["temp"])
    assert os.path.dirname(seen["temp"]) == str(tmp_path)  # same folder: the rename is atomic
    assert temp.startswith(TEMP_PREFIX + "out.json.") and temp.endswith(".json")
    assert names(tmp_path) == ["out.json"]  # no temp file left


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_target_untouched_and_no_temp_file(tmp_path, error):
    target = tmp_path / "model.pth"
    target.write_bytes(b"previous")

    def write(f):
        f.write(b"half a file")
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, write)
    assert target.read_bytes() == b"previous"
    assert names(tmp_path) == ["model.pth"]


@pytest.mark.parametrize("error", [ValueError("bad figure"), KeyboardInterrupt()])
def test_a_failed_write_of_a_new_file_leaves_nothing(tmp_path, error):
    with pytest.raises(type(error)), atomic_output(tmp_path / "sub" / "plot.png") as tmp:
        tmp.write_bytes(b"\x89PNG half")
        raise error
    assert names(tmp_path / "sub") == []


def test_atomic_output_gives_a_name_next_to_the_target_with_its_suffix(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old model")
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(TEMP_PREFIX + "model.onnx.") and tmp.suffix == ".onnx"
        assert tmp.exists() and tmp.stat().st_size == 0  # reserved: no other writer gets this name
        tmp.write_bytes(b"new model")  # a writer that takes a file name (onnx.save, savefig, cv2)
        assert target.read_bytes() == b"old model"
    assert target.read_bytes() == b"new model"
    assert names(tmp_path) == ["model.onnx"]


def test_two_writers_of_one_target_get_two_temp_files(tmp_path):
    first, second = AtomicOutput(tmp_path / "a.txt"), AtomicOutput(tmp_path / "a.txt")
    assert first.temp_path != second.temp_path
    first.temp_path.write_text("first")
    second.temp_path.write_text("second")
    first.commit()
    second.discard()
    assert (tmp_path / "a.txt").read_text() == "first" and names(tmp_path) == ["a.txt"]


def test_a_new_file_gets_the_permissions_of_any_new_file(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "report.html", "<html></html>")
        (tmp_path / "plain.html").write_text("<html></html>")
    finally:
        os.umask(umask)
    # Not 0o600 as a tempfile.mkstemp file would be: a report must stay readable to others.
    assert (
        (tmp_path / "report.html").stat().st_mode & 0o777 == (tmp_path / "plain.html").stat().st_mode & 0o777 == 0o644
    )


def test_a_fixed_temp_name_for_a_file_written_over_time(tmp_path):
    output = AtomicOutput(tmp_path / "clip.mp4", temp_name=".clip.partial.mp4")
    assert output.temp_path == tmp_path / ".clip.partial.mp4" and not output.temp_path.exists()
    with open(output.temp_path, "wb") as f:
        f.write(b"frames")
    assert names(tmp_path) == [".clip.partial.mp4"]
    output.commit()
    assert (tmp_path / "clip.mp4").read_bytes() == b"frames" and names(tmp_path) == ["clip.mp4"]
    with pytest.raises(RuntimeError, match="already committed"):
        output.commit()

    stale = AtomicOutput(tmp_path / "other.mp4", temp_name=".other.partial.mp4")
    stale.temp_path.write_bytes(b"x")
    stale.discard()
    assert names(tmp_path) == ["clip.mp4"]
