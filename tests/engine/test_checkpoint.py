"""Checkpoint files: round trip, atomic writes, pruning, the pointer, RNG states, safe loading."""

import random
import re

import numpy as np
import pytest
import torch
from torch import nn

from detkit.engine import checkpoint as ckpt
from detkit.engine.checkpoint import Checkpointer, capture_rng_state, load_checkpoint, restore_rng_state
from detkit.errors import CheckpointError


def _state(iteration, value=1.0):
    model = nn.Linear(3, 2)
    nn.init.constant_(model.weight, value)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "iteration": iteration,
        "config": {"solver": {"base_lr": 0.1, "steps": [1, 2]}},
        "class_names": ["circle", "square"],
        "category_ids": [1, 2],
        "rng": [capture_rng_state()],
    }


def test_round_trip_with_weights_only(tmp_path):
    state = _state(10)
    path = Checkpointer(tmp_path).save("model_0000010.pth", state)
    loaded = load_checkpoint(path)
    assert loaded["iteration"] == 10 and loaded["class_names"] == ["circle", "square"]
    assert loaded["config"] == state["config"]
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    buf = state["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], buf)
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000010.pth"


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(2))
    torch.save({"rng": saved}, tmp_path / "rng.pth")
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_crash_mid_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save("model_0000010.pth", _state(10, value=1.0))

    def crashing_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the disk, then the process dies
        raise OSError("simulated crash: disk full")

    monkeypatch.setattr(ckpt.torch, "save", crashing_save)
    # A failed write is one CheckpointError naming the file (tools print it as one line).
    with pytest.raises(
        CheckpointError, match=r"cannot write checkpoint .*model_0000020\.pth: OSError: simulated crash"
    ):
        checkpointer.save("model_0000020.pth", _state(20, value=2.0))
    monkeypatch.undo()

    # No half-written file under the final name, no temporary left, the pointer still names iteration 10.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000010.pth"]
    last = checkpointer.last_checkpoint()
    assert last.name == "model_0000010.pth"
    state = load_checkpoint(last)
    assert state["iteration"] == 10 and torch.all(state["model"]["weight"] == 1.0 - 0.1)


def test_overwriting_an_existing_name_is_atomic_too(tmp_path, monkeypatch):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save("model_final.pth", _state(5))
    monkeypatch.setattr(
        ckpt.torch, "save", lambda obj, f: (f.write(b"junk"), (_ for _ in ()).throw(KeyboardInterrupt()))
    )
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_final.pth", _state(6))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "model_final.pth")["iteration"] == 5


def test_stale_temporaries_of_a_killed_save_are_removed(tmp_path):
    (tmp_path / ".tmp-model_0000030.pth.abc").write_bytes(b"partial")
    Checkpointer(tmp_path)
    assert not list(tmp_path.glob(".tmp-*"))


def test_keeps_last_n_periodic_and_always_final(tmp_path):
    checkpointer = Checkpointer(tmp_path, max_to_keep=2)
    for it in (10, 20, 30, 40):
        checkpointer.save(ckpt.checkpoint_name(it), {"iteration": it})
    assert [p.name for p in checkpointer.periodic_checkpoints()] == ["model_0000030.pth", "model_0000040.pth"]
    checkpointer.save("model_final.pth", {"iteration": 50})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last_checkpoint", "model_0000030.pth", "model_0000040.pth", "model_final.pth"]
    assert checkpointer.last_checkpoint().name == "model_final.pth"


def test_disabled_checkpointer_writes_nothing(tmp_path):
    out = tmp_path / "rank1"
    assert Checkpointer(out, enabled=False).save("model_0000010.pth", {"iteration": 10}) is None
    assert not out.exists()


def test_no_pointer_means_no_checkpoint_and_a_dangling_pointer_is_an_error(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    assert checkpointer.last_checkpoint() is None
    (tmp_path / "last_checkpoint").write_text("model_0000099.pth\n")
    with pytest.raises(CheckpointError, match=re.escape("model_0000099.pth")):
        checkpointer.last_checkpoint()


class _Arbitrary:
    """Any class: unpickling it would mean running code named by the file."""


def test_loading_refuses_pickled_code_and_names_truncated_files(tmp_path):
    torch.save({"model": {}, "obj": _Arbitrary()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(tmp_path / "evil.pth")

    Checkpointer(tmp_path).save("model_0000001.pth", _state(1))
    data = (tmp_path / "model_0000001.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape("cut.pth")):
        load_checkpoint(tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")
    # Bytes that are no checkpoint at all: torch's reader fails with UnpicklingError (an HTML page),
    # RuntimeError (zeros), KeyError (lines of text), ...; the user sees one CheckpointError naming the file.
    for name, data in (("page.pth", b"<html><body>404</body></html>\n"), ("notes.pth", b"hello world\n" * 20)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=re.escape(name)):
            load_checkpoint(tmp_path / name)


# A process whose writes fail for real: the kernel refuses to grow any file past 64 KiB
# (RLIMIT_FSIZE; SIGXFSZ ignored so that write() returns EFBIG, as it returns ENOSPC on a full disk).
_FAILING_WRITE = """
import resource, signal, sys
import torch
from detkit.engine.checkpoint import Checkpointer
from detkit.errors import CheckpointError

out = sys.argv[1]
checkpointer = Checkpointer(out)
checkpointer.save("model_0000010.pth", {"model": {"w": torch.full((1000,), 1.0)}, "iteration": 10})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
try:
    checkpointer.save("model_0000020.pth", {"model": {"w": torch.full((100000,), 2.0)}, "iteration": 20})
except CheckpointError as exc:
    print(exc)
"""


def test_a_failing_write_keeps_the_previous_checkpoint_and_names_the_file(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _FAILING_WRITE, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert message.startswith(
        f"cannot write checkpoint {tmp_path / 'model_0000020.pth'}: the file size limit was reached"
    )
    assert f"the previous checkpoint {tmp_path / 'model_0000010.pth'} is intact" in message and "--resume" in message
    # Nothing half-written anywhere, and the pointer still names the complete file.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000010.pth"]
    state = load_checkpoint(Checkpointer(tmp_path).last_checkpoint())
    assert state["iteration"] == 10 and torch.equal(state["model"]["w"], torch.full((1000,), 1.0))


def test_write_errors_say_when_the_disk_is_full():
    import errno
    import os

    def failed(code):
        # torch.save reports a failed write as a RuntimeError raised while handling the OSError.
        try:
            try:
                raise OSError(code, os.strerror(code))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 704 vs 598")  # noqa: B904 - torch.save chains it implicitly, as tested
        except RuntimeError as exc:
            return exc

    assert ckpt.describe_write_error(failed(errno.ENOSPC)) == "the disk is full (No space left on device)"
    assert ckpt.describe_write_error(failed(errno.EDQUOT)).startswith("the disk is full (Disk quota exceeded")
    assert ckpt.describe_write_error(failed(errno.EIO)) == "Input/output error (errno 5)"
    assert ckpt.describe_write_error(RuntimeError("no OSError behind it")) == "RuntimeError: no OSError behind it"
