"""Long runs under torchrun, 2 CPU processes on gloo, the real detector (ResNet-18 C4, 64 px shapes):
a worker killed with SIGKILL under --max-restarts (the group restarts and continues by itself), a
SIGTERM to torchrun (every rank saves the same iteration, --resume continues), and one rank that
fails (every rank stops within seconds, the failed rank's message is shown once).

One uninterrupted run is the reference of the module; the interrupted ones must end with its
weights and losses, bit for bit.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detkit.engine.checkpoint import checkpoint_name, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# 10 iterations of 2 images (1 per process), a checkpoint every 4, the trunk frozen.
TINY_CONFIG = """\
_base_: {base}
device: cpu
seed: 3
model:
  depth: 18
  num_classes: 3
  backbone: {{freeze_at: 4, weights: {weights}}}
  rpn: {{pre_nms_topk_train: 200, post_nms_topk_train: 32, batch_size_per_image: 32}}
  roi_heads: {{batch_size_per_image: 8, pooler_resolution: 4}}
data:
  train: [{{type: shapes, root: {data}, split: train, num_images: 16, image_size: [64, 64], num_classes: 3, max_objects: 3}}]
  test: []
  min_size_train: [56, 64]
  max_size_train: 64
  num_workers: 0
solver: {{ims_per_batch: 2, base_lr: 0.02, max_iter: 10, steps: [7], warmup_iters: 2, checkpoint_period: 4,
         log_period: 1}}
"""
LOSS_KEYS = ("total_loss", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "lr")
WAIT_S = 300  # the bound of every wait on a run (they take ~20 s on 2 quiet cores)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(cfg: Path, *args: str, restarts: int = 0) -> list[str]:
    """The command line of a 2-process torchrun of tools/train.py on a free local port."""
    return TORCHRUN + [
        "--nnodes=1",
        "--nproc_per_node=2",
        f"--max-restarts={restarts}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
        "--monitor-interval=0.1",
        str(ROOT / "tools" / "train.py"),
        str(cfg),
        *args,
    ]


def env() -> dict:
    # One intra-op thread per process: 2 processes on 2 shared cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def training_rows(run: Path) -> dict[int, dict]:
    """Iteration -> its metrics row; a row being appended right now is not counted."""
    found = {}
    if (run / "metrics.jsonl").is_file():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "total_loss" in row:
                found[row["iteration"]] = row
    return found


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker process of `rank` (a child of the launcher)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            if ppid == launcher.pid and f"RANK={rank}".encode() in environ:
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank} under torchrun pid {launcher.pid}")


def wait_for(condition, launcher: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert launcher.poll() is None, f"torchrun ended before {what}: {launcher.stderr.read()}"
        assert time.monotonic() < deadline, f"no {what} after {WAIT_S} s"
        time.sleep(0.01)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, standin_imagenet_r18) -> Path:
    folder = tmp_path_factory.mktemp("elastic")
    path = folder / "tiny.yaml"
    path.write_text(
        TINY_CONFIG.format(base=ROOT / "configs" / "base.yaml", data=folder / "shapes", weights=standin_imagenet_r18)
    )
    return path


@pytest.fixture(scope="module")
def reference(cfg) -> Path:
    """The uninterrupted 2-process run."""
    out = cfg.parent / "reference"
    result = subprocess.run(
        torchrun(cfg, f"output_dir={out}"), env=env(), capture_output=True, text=True, timeout=WAIT_S
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def interrupted(cfg) -> dict:
    """One run, started without --resume under --max-restarts 1, that goes through:
    1. rank 1's worker SIGKILLed once model_0000004.pth is the last checkpoint: torchrun restarts the
       group, which continues from iteration 4 by itself;
    2. SIGTERM to torchrun once the restarted group has logged iteration 6 (a preemption as SLURM
       sends it): every rank saves the iteration in progress and exits 75;
    3. then `--resume` runs to the end."""
    out = cfg.parent / "interrupted"
    run = subprocess.Popen(
        torchrun(cfg, f"output_dir={out}", restarts=1),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pointer = out / "last_checkpoint"
        wait_for(
            lambda: pointer.is_file() and pointer.read_text().strip() == checkpoint_name(4),
            run,
            "checkpoint of iteration 4",
        )
        killed = time.monotonic()
        os.kill(worker_pid(run, 1), signal.SIGKILL)
        log = out / "log.txt"
        wait_for(lambda: "resumed from" in log.read_text(), run, "resume after the restart")
        restarted_s = time.monotonic() - killed
        wait_for(lambda: 6 in training_rows(out) and len(training_rows(out)) >= 6, run, "iteration 6 after the restart")
        sent = time.monotonic()
        run.send_signal(signal.SIGTERM)
        status = run.wait(timeout=WAIT_S)
        stopped_s = time.monotonic() - sent
        stderr = run.stderr.read()
    finally:
        if run.poll() is None:
            run.kill()
    resumed = subprocess.run(
        torchrun(cfg, f"output_dir={out}", "--resume"), env=env(), capture_output=True, text=True, timeout=WAIT_S
    )
    assert resumed.returncode == 0, resumed.stderr
    return {
        "out": out,
        "status": status,
        "stderr": stderr,
        "restarted_s": restarted_s,
        "stopped_s": stopped_s,
    }


@pytest.mark.slow
def test_a_killed_worker_restarts_the_group_which_continues_from_the_last_checkpoint(reference, interrupted):
    out = interrupted["out"]
    log = (out / "log.txt").read_text()
    # The restarted attempt found the checkpoint by itself (no --resume on the command line).
    assert "torchrun restart 1: continuing from the last checkpoint" in log
    assert f"resumed from {out / checkpoint_name(4)} at iteration 4" in log
    assert interrupted["restarted_s"] < 120
    ref, rows = training_rows(reference), training_rows(out)
    assert sorted(ref) == sorted(rows) == list(range(1, 11))  # rows after 4 were dropped and redone
    for it in range(1, 11):
        assert {k: rows[it][k] for k in LOSS_KEYS} == {k: ref[it][k] for k in LOSS_KEYS}, f"iteration {it}"
    assert len({r["total_loss"] for r in ref.values()}) > 5  # the losses moved
    assert same_weights(reference / "model_final.pth", out / "model_final.pth")


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_one_iteration_on_every_rank_and_resume_matches(reference, interrupted):
    out = interrupted["out"]
    log = (out / "log.txt").read_text()
    lines = [line for line in log.splitlines() if "preempted at iteration" in line]
    assert len(lines) == 1, log
    stopped_at = int(lines[0].split("preempted at iteration ")[1].split(",")[0])
    assert 6 < stopped_at < 10 and f"checkpoint {out / checkpoint_name(stopped_at)} (SIGTERM)" in lines[0]
    assert load_checkpoint(out / checkpoint_name(stopped_at))["iteration"] == stopped_at
    assert len(load_checkpoint(out / checkpoint_name(stopped_at))["rng"]) == 2
    # torchrun passed the signal on to its workers, which saved and exited 75 (rank 0 printed the
    # line once), then torchrun ended with its SignalException: status 1.
    stderr = interrupted["stderr"]
    assert interrupted["status"] == 1 and "SignalException" in stderr, stderr
    assert stderr.count(f"preempted at iteration {stopped_at} (SIGTERM)") == 1, stderr
    assert interrupted["stopped_s"] < 30
    assert f"resumed from {out / checkpoint_name(stopped_at)} at iteration {stopped_at}" in log
    assert same_weights(reference / "model_final.pth", out / "model_final.pth")


# ---------------------------------------------------------------------------------------------
# One rank fails: every rank stops within seconds, with the failed rank's message once
# ---------------------------------------------------------------------------------------------


def corrupt_copy_for_rank_1(shapes_split: Path, folder: Path, iteration: int) -> Path:
    """A copy of a shapes split (COCO layout) whose image read by rank 1 (of 2, 1 image each, seed 3)
    at `iteration` is garbage; rank 0 reads other images in the first epoch. Returns that file."""
    from detkit.data.loader import TrainingBatchSampler

    shutil.copytree(shapes_split, folder)
    images = json.loads((folder / "annotations.json").read_text())["images"]
    sampler = TrainingBatchSampler(num_images=len(images), batch_size=1, seed=3, rank=1, world_size=2)
    batches = iter(sampler)
    for _ in range(iteration):
        index = next(batches)[0].index
    bad = folder / "images" / images[index]["file_name"]
    bad.write_bytes(b"not an image")
    return bad


def watch_failure(command: list[str], out: Path, started) -> tuple[str, str, int, float]:
    """Run `command` (its output into files in out's folder); (stdout, stderr, exit status, seconds
    from the moment `started()` first held to the end of the run)."""
    stdout_path, stderr_path = out.parent / f"{out.name}.stdout", out.parent / f"{out.name}.stderr"
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        run = subprocess.Popen(command, env=env(), stdout=stdout, stderr=stderr, text=True)
        try:
            deadline = time.monotonic() + WAIT_S
            while not started() and run.poll() is None:
                assert time.monotonic() < deadline, f"the run did not get going in {WAIT_S} s"
                time.sleep(0.01)
            start = time.monotonic()
            status = run.wait(timeout=WAIT_S)
        finally:
            if run.poll() is None:
                run.kill()
    return stdout_path.read_text(), stderr_path.read_text(), status, time.monotonic() - start


@pytest.mark.slow
def test_an_unreadable_image_on_rank_1_stops_both_ranks_with_its_message_once(cfg, reference):
    (split,) = (cfg.parent / "shapes").glob("train_*")  # generated by the reference run
    bad = corrupt_copy_for_rank_1(split, cfg.parent / "bad_images", iteration=3)
    out = cfg.parent / "failing"
    data = f"data.train=[{{type: coco, ann_file: {bad.parent.parent / 'annotations.json'}, image_root: {bad.parent}}}]"
    stdout, stderr, status, seconds = watch_failure(
        torchrun(cfg, f"output_dir={out}", data, "data.max_bad_image_fraction=0"),
        out,
        started=lambda: 2 in training_rows(out),  # the iteration before rank 1's bad image
    )
    output = stdout + stderr
    assert status != 0
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len([e for e in errors if str(bad) in e]) == 1, output  # rank 1's DataError, once
    # Rank 0 stopped within seconds, not at the process group's 30-minute timeout: its gradient
    # all-reduce broke when rank 1 exited (then PeerFailedError), or its watcher ended it while it
    # still waited there, or torchrun, seeing rank 1 exit, sent it SIGTERM first.
    assert seconds < 60, output
    named = [
        "error: rank 1 failed with DataError, so this process stopped too",
        "rank 1 failed with DataError and this rank (0) is still waiting for it",
    ]
    assert any(text in output for text in named) or "Signal 15 (SIGTERM) received" in stderr, output
    assert "[rank0]: Traceback" not in stderr and "Connection closed by peer" not in output  # no gloo noise
    if any(text in output for text in named):  # then rank 0's log.txt holds rank 1's message
        log = (out / "log.txt").read_text()
        assert "stopped: rank 1 failed with DataError: " in log and str(bad) in log
    assert sorted(training_rows(out)) == [1, 2]


@pytest.mark.slow
def test_a_rank_0_only_failure_while_resuming_stops_rank_1_too(cfg, reference):

    out = cfg.parent / "bad_pointer"
    shutil.copytree(reference, out)
    (out / "last_checkpoint").write_text("model_0000099.pth\n")  # rank 0 alone reads the pointer
    log = out / "log.txt"
    stdout, stderr, status, seconds = watch_failure(
        torchrun(cfg, f"output_dir={out}", "--resume"),
        out,
        started=lambda: log.read_text().count("process group: backend gloo") == 2,  # the reference's and ours
    )
    output = stdout + stderr
    assert status != 0
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len([e for e in errors if "names 'model_0000099.pth', which does not exist" in e]) == 1, output
    # Rank 1, waiting in the broadcast of the checkpoint's name, ended within seconds: it names rank
    # 0's failure, unless torchrun (seeing rank 0 exit) ended it first with SIGTERM.
    assert "rank 0 failed with CheckpointError" in output or "Signal 15 (SIGTERM) received" in stderr, output
    assert seconds < 60, output


def test_failure_watch_publishes_the_first_failure_and_names_it_on_the_other_ranks():
    """Two ranks' watches on one real TCPStore, in this process (the threads are not started)."""
    from torch.distributed import TCPStore

    from detkit.engine.distributed import FailureWatch
    from detkit.errors import PeerFailedError

    store = TCPStore("127.0.0.1", 0, world_size=1, is_master=True, wait_for_workers=False)
    rank0, rank1 = FailureWatch(store, 0, 2, grace_s=0.5), FailureWatch(store, 1, 2, grace_s=0.5)
    assert rank0.peer_failure() is None and rank1.peer_failure() is None
    assert rank1.report(ValueError("cannot read image x.jpg")) is None  # published; rank 0 acknowledged nothing
    assert rank1.peer_failure() is None  # its own record is not a peer's
    assert rank0.peer_failure() == (1, "ValueError", "cannot read image x.jpg")
    assert store.add(rank0.key + "/seen", 0) == 1
    # Rank 0's own error (its collective breaking) comes second: rank 1's failure is what it raises.
    peer = rank0.report(RuntimeError("Connection closed by peer"))
    assert isinstance(peer, PeerFailedError) and (peer.rank, peer.kind) == (1, "ValueError")
    assert str(peer) == "rank 1 failed with ValueError, so this process stopped too; rank 1's error line says why"
    assert json.loads(store.get(rank0.key)) == [1, "ValueError", "cannot read image x.jpg"]  # the first one kept


def test_a_restart_continues_only_the_run_its_own_torchrun_started(cfg, tmp_path, monkeypatch):
    """TORCHELASTIC_RESTART_COUNT > 0 resumes only when log.txt shows this torchrun's first attempt:
    a first attempt refused for another run's files is refused again, not turned into a resume."""
    from detkit.cli.train import main as train_main
    from detkit.errors import CheckpointError, ConfigError

    out = tmp_path / "out"
    out.mkdir()
    torch.save({"note": "an earlier run's file"}, out / "model_0000050.pth")
    (out / "last_checkpoint").write_text("model_0000050.pth\n")
    (out / "log.txt").write_text("[12/01 10:00:00 detkit.cli.train] torchrun run earlier-job, attempt 0\n")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "this-job")
    with pytest.raises(ConfigError, match="already holds a run"):
        train_main([str(cfg), f"output_dir={out}"])
    # The same files after this torchrun's own first attempt: the restart resumes from them.
    with open(out / "log.txt", "a") as log:
        log.write("[12/07 10:00:00 detkit.cli.train] torchrun run this-job, attempt 0\n")
    with pytest.raises(CheckpointError, match=r"model_0000050\.pth is not a training checkpoint"):
        train_main([str(cfg), f"output_dir={out}"])
    assert "torchrun restart 1: continuing from the last checkpoint" in (out / "log.txt").read_text()
