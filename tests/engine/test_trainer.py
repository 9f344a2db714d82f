"""The training loop itself, on a tiny stand-in model: lr per iteration, logging, checkpoints,
gradient clipping, AMP choices and the non-finite-loss stop. (Resume equality and DDP run the real
detector: tests/test_tools_train.py and tests/engine/test_ddp.py.)"""

import json
import math
import re

import pytest
import torch
from torch import nn

from detkit.config import load_config
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.trainer import Trainer
from detkit.errors import ConfigError, NonFiniteLossError
from detkit.structures.image_batch import ImageBatch
from detkit.utils.env import select_amp


class TinyDetector(nn.Module):
    """Stand-in with the detector's training interface: (ImageBatch, targets) -> dict of losses."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 1)

    def forward(self, images, targets):
        x = images.tensor.float() / 255.0
        pred = self.fc(self.bn(self.conv(x)).mean(dim=(2, 3))).squeeze(1)  # (N,)
        goal = torch.stack([t["boxes"].sum() / 100.0 for t in targets])  # (N,)
        return {"loss_a": ((pred - goal) ** 2).mean(), "loss_b": 0.1 * pred.abs().mean()}


def tiny_loader(nan_at_iteration=None, images_per_batch=2):
    """train_loader_fn: batch i (0-based) is a deterministic function of i; NaN boxes at one iteration."""

    def make(start_iter):
        i = start_iter
        while True:
            g = torch.Generator().manual_seed(i)
            imgs = [torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g) for _ in range(images_per_batch)]
            boxes = torch.rand(images_per_batch, 1, 4, generator=g) * 16
            if nan_at_iteration is not None and i + 1 == nan_at_iteration:
                boxes[0, 0, 0] = float("nan")
            targets = [{"boxes": b, "labels": torch.zeros(1, dtype=torch.int64)} for b in boxes]
            yield ImageBatch.from_tensors(imgs, 1), targets, [{"image_id": i}] * images_per_batch
            i += 1

    return make


def tiny_cfg(tmp_path, *overrides):
    return load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "device=cpu",
            "solver.ims_per_batch=2",
            "solver.base_lr=0.1",
            "solver.max_iter=6",
            "solver.steps=[4]",
            "solver.warmup_iters=2",
            "solver.warmup_factor=0.5",
            "solver.log_period=1",
            "solver.checkpoint_period=3",
            *overrides,
        ],
    )


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_loop_logs_scheduled_lr_losses_and_timings_every_iteration(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path), model=TinyDetector(), train_loader_fn=tiny_loader())
    summary = trainer.train()
    logged = rows(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in logged] == [1, 2, 3, 4, 5, 6]
    # warmup over 2 iterations from 0.5x, x0.1 after 4 completed iterations
    assert [r["lr"] for r in logged] == pytest.approx([0.05, 0.075, 0.1, 0.1, 0.01, 0.01])
    for r in logged:
        assert r["total_loss"] == pytest.approx(r["loss_a"] + r["loss_b"], rel=1e-5)
        assert r["time"] > 0 and r["data_time"] >= 0 and r["max_mem_mb"] > 0
    assert logged[-1]["eta_seconds"] == 0
    # checkpoint at 3, final at 6, pointer on the final one, resolved config and summary written
    assert load_checkpoint(tmp_path / "model_0000003.pth")["iteration"] == 3
    final = load_checkpoint(tmp_path / "model_final.pth")
    assert final["iteration"] == 6 and final["config"]["solver"]["max_iter"] == 6
    assert set(final) >= {"model", "optimizer", "scheduler", "rng", "data", "class_names", "category_ids"}
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert (tmp_path / "config.yaml").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["iterations"] == 6 == summary["iterations"]


def test_log_period_rows_average_the_window(tmp_path):
    per_iter = tmp_path / "a"
    Trainer(tiny_cfg(per_iter), model=_seeded(TinyDetector), train_loader_fn=tiny_loader()).train()
    windowed = tmp_path / "b"
    Trainer(
        tiny_cfg(windowed, "solver.log_period=4"), model=_seeded(TinyDetector), train_loader_fn=tiny_loader()
    ).train()
    every = rows(per_iter / "metrics.jsonl")
    w = rows(windowed / "metrics.jsonl")
    assert [r["iteration"] for r in w] == [4, 6]  # every 4 and the last
    assert w[0]["total_loss"] == pytest.approx(sum(r["total_loss"] for r in every[:4]) / 4, rel=1e-6)
    assert w[1]["total_loss"] == pytest.approx(sum(r["total_loss"] for r in every[4:]) / 2, rel=1e-6)


def _seeded(cls):
    torch.manual_seed(0)
    return cls()


def test_non_finite_loss_stops_with_iteration_and_terms_after_saving_last_good_state(tmp_path):
    trainer = Trainer(
        tiny_cfg(tmp_path, "solver.checkpoint_period=100"),
        model=TinyDetector(),
        train_loader_fn=tiny_loader(nan_at_iteration=4),
    )
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train()
    message = str(err.value)
    assert "non-finite loss at iteration 4" in message
    assert "loss_a=nan" in message and "loss_b=" in message and "total_loss=nan" in message
    assert "model_0000003.pth" in message
    saved = load_checkpoint(tmp_path / "model_0000003.pth")
    assert saved["iteration"] == 3 and (tmp_path / "last_checkpoint").read_text().strip() == "model_0000003.pth"
    # The saved weights are the good ones: finite, and equal to the model's (no step was taken on nan).
    for name, value in trainer.model.state_dict().items():
        assert torch.isfinite(saved["model"][name].float()).all()
        assert torch.equal(saved["model"][name], value)
    assert [r["iteration"] for r in rows(tmp_path / "metrics.jsonl")] == [1, 2, 3]


class NanGradientAt(TinyDetector):
    """Finite losses throughout, but at call `bad_call` (1-based) a masked term whose backward is 0 * inf."""

    def __init__(self, bad_call):
        super().__init__()
        self.bad_call, self.calls = bad_call, 0

    def forward(self, images, targets):
        self.calls += 1
        losses = super().forward(images, targets)
        if self.calls == self.bad_call:
            inf = torch.tensor(float("inf"))
            # The value is 0 (the where picks the zero), the gradient of fc.weight is NaN.
            losses["loss_b"] = losses["loss_b"] + torch.where(
                torch.tensor(False), self.fc.weight.sum() * inf, torch.zeros(())
            )
        return losses


def test_non_finite_gradient_with_finite_loss_stops_before_the_step(tmp_path):
    trainer = Trainer(
        tiny_cfg(tmp_path, "solver.checkpoint_period=100"), model=NanGradientAt(4), train_loader_fn=tiny_loader()
    )
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train()
    message = str(err.value)
    assert "non-finite gradient norm (nan) at iteration 4 with finite losses" in message
    assert "model_0000003.pth" in message
    saved = load_checkpoint(tmp_path / "model_0000003.pth")
    for name, value in trainer.model.state_dict().items():
        assert torch.isfinite(value.float()).all(), name  # no step was taken on the NaN gradients
        assert torch.equal(saved["model"][name], value)


def test_weights_already_non_finite_are_not_saved_as_the_last_good_state(tmp_path):
    def poison_after_second_iteration(trainer):
        if trainer.iteration == 2:
            with torch.no_grad():
                trainer.model.fc.weight.fill_(float("nan"))

    trainer = Trainer(
        tiny_cfg(tmp_path, "solver.checkpoint_period=2"),
        model=TinyDetector(),
        train_loader_fn=tiny_loader(),
        hooks=[poison_after_second_iteration],
    )
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train()
    message = str(err.value)
    assert "non-finite loss at iteration 3" in message
    assert "not saved" in message and "model_0000002.pth" in message
    assert not (tmp_path / "model_0000003.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000002.pth"
    assert all(
        torch.isfinite(v.float()).all() for v in load_checkpoint(tmp_path / "model_0000002.pth")["model"].values()
    )


def test_inference_precision_is_its_own_key_and_defaults_to_fp32():
    cfg = load_config(None)
    assert cfg.test.amp == "off" and cfg.solver.amp == "auto"
    assert cfg.cudnn_benchmark is False and cfg.allow_tf32 is False
    gpu = torch.device("cuda")
    assert select_amp(cfg.test.amp, gpu, bf16_supported=True).dtype is None
    assert select_amp("bf16", gpu, bf16_supported=True, key="test.amp").dtype == torch.bfloat16
    with pytest.raises(ConfigError, match=re.escape("test.amp=fp16 needs a CUDA device")):
        select_amp("fp16", torch.device("cpu"), key="test.amp")


def test_gradient_clipping_bounds_the_first_update(tmp_path):
    class Big(TinyDetector):
        def forward(self, images, targets):
            return {"loss_a": 1e4 * super().forward(images, targets)["loss_a"]}

    cfg = tiny_cfg(
        tmp_path,
        "solver.max_iter=1",
        "solver.warmup_iters=0",
        "solver.momentum=0.0",
        "solver.weight_decay=0.0",
        "solver.clip_grad_norm=0.5",
    )
    model = Big()
    before = [p.detach().clone() for p in model.parameters()]
    Trainer(cfg, model=model, train_loader_fn=tiny_loader()).train()
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    # plain SGD: update = lr * clipped grad, so its norm is lr * 0.5 (the raw grad is far larger)
    assert step.norm().item() == pytest.approx(0.1 * 0.5, rel=1e-4)


def test_amp_choices():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert select_amp("auto", cpu) == select_amp("off", cpu)
    assert select_amp("auto", cpu).dtype is None and not select_amp("auto", cpu).use_scaler
    auto_new = select_amp("auto", gpu, bf16_supported=True)
    assert auto_new.dtype is torch.bfloat16 and not auto_new.use_scaler
    auto_old = select_amp("auto", gpu, bf16_supported=False)
    assert auto_old.dtype is torch.float16 and auto_old.use_scaler
    assert select_amp("fp16", gpu, bf16_supported=True).use_scaler
    assert select_amp("off", gpu, bf16_supported=True).dtype is None
    assert select_amp("bf16", cpu).dtype is torch.bfloat16  # CPU autocast, allowed when asked for
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        select_amp("fp16", cpu)
    with pytest.raises(ConfigError, match="no bf16 support"):
        select_amp("bf16", gpu, bf16_supported=False)


def test_bf16_autocast_on_cpu_trains(tmp_path):
    Trainer(
        tiny_cfg(tmp_path, "solver.amp=bf16", "solver.max_iter=2"), model=TinyDetector(), train_loader_fn=tiny_loader()
    ).train()
    assert all(math.isfinite(r["total_loss"]) for r in rows(tmp_path / "metrics.jsonl"))


def test_batch_must_split_evenly_over_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="ims_per_batch=3 is not divisible by the 2 processes"):
        Trainer(tiny_cfg(tmp_path, "solver.ims_per_batch=3"), model=TinyDetector(), train_loader_fn=tiny_loader())


def test_tensorboard_events_are_written_when_tensorboard_is_importable(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    class FakeSummaryWriter:
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def add_scalar(self, key, value, step):
            calls.append((key, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    Trainer(tiny_cfg(tmp_path, "solver.max_iter=2"), model=TinyDetector(), train_loader_fn=tiny_loader()).train()
    assert calls[0] == ("init", str(tmp_path)) and calls[-1] == ("close",)
    logged = rows(tmp_path / "metrics.jsonl")
    assert ("total_loss", logged[1]["total_loss"], 2) in calls and ("lr", logged[0]["lr"], 1) in calls


# ---------------------------------------------------------------------------------------------
# --resume: the config comparison, and a metrics.jsonl cut short
# ---------------------------------------------------------------------------------------------


def _finished_tiny_run(tmp_path):
    Trainer(tiny_cfg(tmp_path), model=_seeded(TinyDetector), train_loader_fn=tiny_loader()).train()
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"


def test_resume_refuses_keys_that_change_the_run_naming_both_values(tmp_path, caplog):
    _finished_tiny_run(tmp_path)
    changed = Trainer(
        tiny_cfg(tmp_path, "seed=4", "solver.base_lr=0.2", "solver.log_period=2"),
        model=TinyDetector(),
        train_loader_fn=tiny_loader(),
    )
    with pytest.raises(ConfigError) as err:
        changed.resume_or_load(resume=True)
    message = str(err.value)
    assert "model_final.pth was trained with other settings" in message
    assert "seed 0 -> 4" in message and "solver.base_lr 0.1 -> 0.2" in message and "--accept-config-changes" in message
    assert "log_period" not in message  # harmless: logged, not refused
    assert changed.iteration == 0  # nothing was restored

    caplog.set_level("INFO", logger="detkit")
    accepted = Trainer(
        tiny_cfg(tmp_path, "seed=4", "solver.base_lr=0.2", "solver.log_period=2"),
        model=TinyDetector(),
        train_loader_fn=tiny_loader(),
    )
    assert accepted.resume_or_load(resume=True, accept_config_changes=True) == 6
    assert "--accept-config-changes: continuing with seed 0 -> 4, solver.base_lr 0.1 -> 0.2" in caplog.text
    assert "do not alter the training: solver.log_period 1 -> 2" in caplog.text


def test_resume_with_only_harmless_changes_continues(tmp_path, caplog):
    _finished_tiny_run(tmp_path)
    caplog.set_level("INFO", logger="detkit")
    cfg = tiny_cfg(tmp_path, "solver.checkpoint_period=2", "test.eval_period=7", "data.num_workers=0")
    trainer = Trainer(cfg, model=TinyDetector(), train_loader_fn=tiny_loader())
    assert trainer.resume_or_load(resume=True) == 6
    assert "solver.checkpoint_period 3 -> 2" in caplog.text and "test.eval_period 0 -> 7" in caplog.text


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_and_the_run_resumes(tmp_path, caplog):
    """A run killed while appending the row of iteration 5 (after its checkpoint at 3): the file ends
    in half a JSON object. --resume drops it, redoes 4..6 and every line reads back."""
    reference = tmp_path / "reference"
    Trainer(tiny_cfg(reference), model=_seeded(TinyDetector), train_loader_fn=tiny_loader()).train()
    run = tmp_path / "run"
    Trainer(tiny_cfg(run, "solver.max_iter=4"), model=_seeded(TinyDetector), train_loader_fn=tiny_loader()).train()
    (run / "model_final.pth").unlink()
    (run / "last_checkpoint").write_text("model_0000003.pth\n")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 5, "total_loss": 0.12')  # no closing brace, no newline
    caplog.set_level("INFO", logger="detkit")
    # (max_iter 4 -> 6 continues the schedule: accepted on purpose here.)
    trainer = Trainer(tiny_cfg(run), model=_seeded(TinyDetector), train_loader_fn=tiny_loader())
    assert trainer.resume_or_load(resume=True, accept_config_changes=True) == 3
    assert "dropping line 5, which is not complete JSON" in caplog.text
    trainer.train()
    resumed, uninterrupted = rows(run / "metrics.jsonl"), rows(reference / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["total_loss"] for r in resumed] == [r["total_loss"] for r in uninterrupted]
