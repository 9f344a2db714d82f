"""Preemption on the tiny stand-in model, in this process (and in 2 gloo processes): a signal becomes
a checkpoint of the iteration it came in, TrainingPreempted, and a --resume that ends equal to an
uninterrupted run; a signal during an evaluation or a checkpoint write is honoured after it; a second
signal kills. (The real detector through tools/train.py: tests/test_tools_train.py with 1 process,
tests/engine/test_elastic.py with 2 under torchrun.)"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_trainer import TinyDetector, _seeded, rows, tiny_cfg, tiny_loader

from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.preemption import PreemptionWatcher, TrainingPreempted
from detkit.engine.trainer import Trainer
from detkit.errors import ConfigError
from detkit.utils.files import TEMP_PREFIX

ROOT = Path(__file__).resolve().parents[2]


def signal_at(iteration, sig=signal.SIGTERM):
    """A hook that sends `sig` to this process after `iteration` (hooks run after everything else)."""

    def hook(trainer):
        if trainer.iteration == iteration:
            os.kill(os.getpid(), sig)

    return hook


def test_sigterm_saves_the_next_iteration_and_resume_matches_an_uninterrupted_run(tmp_path, caplog):
    caplog.set_level("INFO", logger="detkit")
    full = Trainer(tiny_cfg(tmp_path / "full"), model=_seeded(TinyDetector), train_loader_fn=tiny_loader())
    full.train()

    cut = tmp_path / "cut"
    # checkpoint_period=3: the signal after iteration 4 is seen in step 5's check, which saves 5.
    first = Trainer(tiny_cfg(cut), model=_seeded(TinyDetector), train_loader_fn=tiny_loader(), hooks=[signal_at(4)])
    with pytest.raises(TrainingPreempted) as stop:
        first.train()
    assert (stop.value.iteration, stop.value.signal_name) == (5, "SIGTERM")
    assert stop.value.checkpoint == str(cut / "model_0000005.pth")
    assert (cut / "last_checkpoint").read_text().strip() == "model_0000005.pth"
    assert load_checkpoint(cut / "model_0000005.pth")["iteration"] == 5
    assert f"preempted at iteration 5, checkpoint {cut / 'model_0000005.pth'} (SIGTERM)" in caplog.text
    assert [r["iteration"] for r in rows(cut / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with train()

    second = Trainer(tiny_cfg(cut), model=TinyDetector(), train_loader_fn=tiny_loader())
    assert second.resume_or_load(resume=True) == 5
    second.train()
    a, b = (
        load_checkpoint(tmp_path / "full" / "model_final.pth")["model"],
        load_checkpoint(cut / "model_final.pth")["model"],
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["total_loss"] for r in rows(cut / "metrics.jsonl")] == [
        r["total_loss"] for r in rows(tmp_path / "full" / "metrics.jsonl")
    ]


def test_sigusr1_on_a_checkpoint_iteration_reuses_that_checkpoint(tmp_path):
    # The signal after iteration 2 is seen in step 3, which is a periodic checkpoint: no second file.
    trainer = Trainer(
        tiny_cfg(tmp_path), model=TinyDetector(), train_loader_fn=tiny_loader(), hooks=[signal_at(2, signal.SIGUSR1)]
    )
    with pytest.raises(TrainingPreempted) as stop:
        trainer.train()
    assert (stop.value.iteration, stop.value.signal_name, stop.value.checkpoint) == (
        3,
        "SIGUSR1",
        str(tmp_path / "model_0000003.pth"),
    )
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000003.pth"]


def _two_process_worker(rank: int, out: str, port: int) -> None:
    """One of 2 gloo processes: an uninterrupted run, then a run whose rank 1 alone gets SIGTERM after
    iteration 4, then its --resume; writes what each run reported to out/rank{rank}.json."""
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    from detkit.engine import distributed as dist

    root = Path(out)
    Trainer(tiny_cfg(root / "full"), model=_seeded(TinyDetector), train_loader_fn=tiny_loader()).train()
    hooks = [signal_at(4)] if rank == 1 else []
    first = Trainer(tiny_cfg(root / "cut"), model=_seeded(TinyDetector), train_loader_fn=tiny_loader(), hooks=hooks)
    try:
        first.train()
        stopped = None
    except TrainingPreempted as stop:
        stopped = {"iteration": stop.iteration, "signal": stop.signal_name, "checkpoint": stop.checkpoint}
    second = Trainer(tiny_cfg(root / "cut"), model=TinyDetector(), train_loader_fn=tiny_loader())
    resumed_from = second.resume_or_load(resume=True)
    second.train()
    # Rank 1 alone gets the signal during the evaluation after iteration 2: both stop at 2.
    during_eval = SignalDuring(
        tiny_cfg(root / "eval", "test.eval_period=2"),
        model=TinyDetector(),
        train_loader_fn=tiny_loader(),
        during="eval" if rank == 1 else "",
    )
    try:
        during_eval.train()
        eval_stop = None
    except TrainingPreempted as stop:
        eval_stop = stop.iteration
    (root / f"rank{rank}.json").write_text(
        json.dumps({"stopped": stopped, "resumed_from": resumed_from, "eval_stop": eval_stop})
    )
    dist.destroy()


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_iteration_and_resume_matches(tmp_path):
    """Also: the signal to one process during an evaluation stops both after it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_process_worker, args=(str(tmp_path), port), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    checkpoint = str(tmp_path / "cut" / "model_0000005.pth")
    # Rank 1's signal after iteration 4 rode in step 5's loss all-reduce: both ranks stopped there.
    assert reports[0]["stopped"] == {"iteration": 5, "signal": "another rank's signal", "checkpoint": checkpoint}
    assert reports[1]["stopped"] == {"iteration": 5, "signal": "SIGTERM", "checkpoint": checkpoint}
    assert load_checkpoint(checkpoint)["iteration"] == 5 and len(load_checkpoint(checkpoint)["rng"]) == 2
    assert [r["resumed_from"] for r in reports] == [5, 5]
    assert [r["eval_stop"] for r in reports] == [2, 2]  # not one step later
    assert load_checkpoint(tmp_path / "eval" / "model_0000002.pth")["iteration"] == 2
    a = load_checkpoint(tmp_path / "full" / "model_final.pth")["model"]
    b = load_checkpoint(tmp_path / "cut" / "model_final.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    full, cut = rows(tmp_path / "full" / "metrics.jsonl"), rows(tmp_path / "cut" / "metrics.jsonl")
    assert [r["iteration"] for r in cut] == [1, 2, 3, 4, 5, 6]
    assert [r["total_loss"] for r in cut] == [r["total_loss"] for r in full]
    assert len({r["total_loss"] for r in full}) > 3  # the losses moved


class SignalDuring(Trainer):
    """Sends SIGTERM to itself in the middle of the evaluation / checkpoint write of iteration 2."""

    def __init__(self, *args, during: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.during = during

    def evaluate(self):
        if self.during == "eval" and self.iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            assert self.preemption.requested  # the handler ran; the evaluation goes on
        return super().evaluate()

    def checkpoint_state(self):
        state = super().checkpoint_state()
        if self.during == "checkpoint" and self.iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # before the file is written
        return state


def test_a_signal_during_evaluation_is_honoured_after_it(tmp_path):
    trainer = SignalDuring(
        tiny_cfg(tmp_path, "test.eval_period=2"), model=TinyDetector(), train_loader_fn=tiny_loader(), during="eval"
    )
    with pytest.raises(TrainingPreempted) as stop:
        trainer.train()
    assert stop.value.iteration == 2  # not one step later
    assert load_checkpoint(tmp_path / "model_0000002.pth")["iteration"] == 2


def test_a_signal_during_a_checkpoint_write_is_honoured_after_it(tmp_path):
    trainer = SignalDuring(
        tiny_cfg(tmp_path, "solver.checkpoint_period=2"),
        model=TinyDetector(),
        train_loader_fn=tiny_loader(),
        during="checkpoint",
    )
    with pytest.raises(TrainingPreempted) as stop:
        trainer.train()
    # The write of iteration 2 completed (a whole file, named by last_checkpoint until 3 replaced it),
    # and the next step's check saved iteration 3.
    assert load_checkpoint(tmp_path / "model_0000002.pth")["iteration"] == 2
    assert stop.value.iteration == 3 and (tmp_path / "last_checkpoint").read_text().strip() == "model_0000003.pth"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pth" or p.name.startswith(TEMP_PREFIX)) == [
        "model_0000002.pth",
        "model_0000003.pth",
    ]  # and no temporary file left


def test_no_preempt_signals_means_the_default_action(tmp_path):
    code = (
        "import os, signal, time\n"
        "from detkit.engine.preemption import PreemptionWatcher\n"
        "with PreemptionWatcher([]):\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60)
    assert proc.returncode == -signal.SIGTERM


def test_a_second_signal_exits_at_once():
    code = (
        "import os, signal, time\n"
        "from detkit.engine.preemption import PreemptionWatcher\n"
        "with PreemptionWatcher(['SIGTERM', 'USR1']) as w:\n"
        "    os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.1)\n"
        "    print(w.requested, w.signal_name, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
        "    print('still running', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM and proc.stdout == "True SIGUSR1\n"


def test_unknown_signal_names_are_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"solver\.preempt_signals: 'SIGKILL' is not a signal that can be caught"):
        Trainer(
            tiny_cfg(tmp_path, "solver.preempt_signals=[SIGTERM, SIGKILL]"),
            model=TinyDetector(),
            train_loader_fn=tiny_loader(),
        )
    with pytest.raises(ConfigError, match="'SIGNOPE'"):
        PreemptionWatcher(["SIGNOPE"])
