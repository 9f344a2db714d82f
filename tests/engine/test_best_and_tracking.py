"""model_best.pth, early stopping and the MLflow / W&B trackers.

The runs train the real detector (ResNet-18 C4, frozen trunk) on 64 px shapes images in this
process; MLflow writes a real file store in tmp_path and is read back with its own MlflowClient,
W&B runs offline and its run file is read back record by record (see `wandb_records`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import struct
import sys
from pathlib import Path

import pytest
import torch

from detkit.config import load_config
from detkit.engine.best import BEST_NAME, BestModelTracker
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.preemption import TrainingPreempted
from detkit.engine.tracking import flatten_config
from detkit.engine.trainer import Trainer, evaluate_model
from detkit.errors import ConfigError
from detkit.modeling import build_model


def tiny_overrides(tmp: Path, weights: Path, *extra: str) -> list[str]:
    """The tiny detector on 16 training and 4 test shapes images (64 px). Anchors of the objects'
    sizes, 64 proposals and score_thresh 0 give detections that overlap the shapes from the first
    iterations on, so the APs of a few iterations are small but differ from one evaluation to the next."""
    data = tmp.parent / "shapes"  # shared by the runs of this module
    return [
        f"output_dir={tmp}",
        "device=cpu",
        "seed=3",
        "model.depth=18",
        "model.num_classes=3",
        f"model.backbone.weights={weights}",
        "model.backbone.freeze_at=4",
        "model.rpn={pre_nms_topk_train: 200, post_nms_topk_train: 32, pre_nms_topk_test: 100, "
        "post_nms_topk_test: 64, batch_size_per_image: 32, anchor_sizes: [16, 32]}",
        "model.roi_heads={batch_size_per_image: 8, pooler_resolution: 4, score_thresh: 0.0}",
        f"data.train=[{{type: shapes, root: {data}, split: train, num_images: 16, image_size: [64, 64], "
        "num_classes: 3, max_objects: 3}]",
        f"data.test=[{{type: shapes, root: {data}, split: val, num_images: 4, image_size: [64, 64], "
        "num_classes: 3, max_objects: 3}]",
        "data.min_size_train=[56, 64]",
        "data.max_size_train=64",
        "data.min_size_test=64",
        "data.max_size_test=64",
        "data.num_workers=0",
        "solver.ims_per_batch=2",
        "solver.base_lr=0.02",
        "solver.steps=[5]",
        "solver.warmup_iters=2",
        "solver.log_period=1",
        "test.ims_per_batch=4",
        *extra,
    ]


class Messages(logging.Handler):
    """The formatted log messages of the detkit loggers while it is attached."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("detkit").addHandler(self)
        self._level = logging.getLogger("detkit").level
        logging.getLogger("detkit").setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        logging.getLogger("detkit").removeHandler(self)
        logging.getLogger("detkit").setLevel(self._level)


def rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def eval_rows(output: Path) -> list[dict]:
    return [r for r in rows(output) if "bbox/AP" in r]


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (run-<id>.wandb), parsed with W&B's own protobuf classes.

    The file is W&B's LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
    chunks of [crc32 (4 bytes), length (2, little-endian), type (1: full, 2: first, 3: middle,
    4: last)] + payload in 32 KiB blocks (a block's last < 7 bytes are padding). wandb 0.31 has no
    Python reader of its own (its Go binary reads it for `wandb sync`), hence these few lines.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def key_of(item) -> str:
    """A W&B record item's key: `key`, or `nested_key` joined by "/" (how W&B stores "bbox/AP")."""
    return item.key or "/".join(item.nested_key)


# --------------------------------------------------------------------------------------------
# The best value and the early-stopping count (no training)
# --------------------------------------------------------------------------------------------


def test_best_is_the_first_maximum_and_nan_never_counts():
    best = BestModelTracker("bbox/AP", "max")
    improved = [best.update(it, {"bbox/AP": v}).improved for it, v in [(1, 2.0), (2, 3.5), (3, 3.5), (4, 1.0)]]
    assert improved == [True, True, False, False]
    assert best.update(5, {"bbox/AP": math.nan}).improved is False
    assert (best.value, best.iteration) == (3.5, 2)


def test_min_mode_and_early_stopping_after_patience_evaluations_without_min_delta_improvement():
    best = BestModelTracker("bbox/AR100", "min", patience=2, min_delta=0.5)
    updates = [best.update(it, {"bbox/AR100": v}) for it, v in [(10, 5.0), (20, 4.8), (30, 4.7), (40, 4.0)]]
    # 4.8 and 4.7 are better (model_best.pth follows them) but not by more than 0.5: the count runs.
    assert [u.improved for u in updates] == [True, True, True, True]
    assert [u.stop for u in updates] == [False, False, True, False]
    assert (best.value, best.iteration, best.stop_reference) == (4.0, 40, 4.0)
    assert _stopped_tracker(2).stop_reason() == (
        "early stopping at iteration 30: bbox/AR100 has not improved by more than 0.5 on 5 for 2 evaluations "
        "(test.early_stop_patience=2); best 4.7 at iteration 30"
    )
    # The evaluation after the last iteration counts for the best model but stops nothing.
    last = BestModelTracker("bbox/AP", "max", patience=1)
    last.update(1, {"bbox/AP": 2.0})
    assert last.update(2, {"bbox/AP": 1.0}, allow_stop=False).stop is False


def _stopped_tracker(patience: int) -> BestModelTracker:
    best = BestModelTracker("bbox/AR100", "min", patience=patience, min_delta=0.5)
    for it, v in [(10, 5.0), (20, 4.8), (30, 4.7)]:
        best.update(it, {"bbox/AR100": v})
    return best


def test_state_comes_back_from_a_checkpoint_dict_and_another_metric_starts_afresh():
    best = BestModelTracker("bbox/AP", "max", patience=3)
    best.update(2, {"bbox/AP": 4.0})
    best.update(4, {"bbox/AP": 3.0})
    state = json.loads(json.dumps(best.state_dict()))  # plain values only
    again = BestModelTracker("bbox/AP", "max", patience=3)
    again.load_state_dict(state)
    assert (
        again.state_dict()
        == best.state_dict()
        == {
            "metric": "bbox/AP",
            "mode": "max",
            "value": 4.0,
            "iteration": 2,
            "stop_reference": 4.0,
            "evals_without_improvement": 1,
            "stopped_at": None,
        }
    )
    other = BestModelTracker("bbox/AP50", "max")
    other.load_state_dict(state)
    assert (other.value, other.iteration) == (None, None)
    # An early-stopped run resumed with a larger patience goes on.
    stopped = _stopped_tracker(2).state_dict()
    assert stopped["stopped_at"] == 30
    for patience, stopped_at in [(2, 30), (5, None), (0, None)]:
        resumed = BestModelTracker("bbox/AR100", "min", patience, 0.5)
        resumed.load_state_dict(stopped)
        assert resumed.stopped_at == stopped_at, patience


def test_config_checks_trackers_and_early_stopping_keys():
    with pytest.raises(ConfigError, match=r"logging.trackers.*unknown tracker 'neptune'; choose from tensorboard"):
        load_config(None, ["logging.trackers=[mlflow, neptune]"])
    with pytest.raises(ConfigError, match=r"early_stop_patience=-1.*must be >= 0"):
        load_config(None, ["test.early_stop_patience=-1"])
    with pytest.raises(ConfigError, match=r"early_stop_patience=2.*needs test.best_metric"):
        load_config(None, ["test.early_stop_patience=2", "test.best_metric=", "test.eval_period=5"])
    with pytest.raises(ConfigError, match=r"early_stop_patience=2.*needs test.eval_period > 0"):
        load_config(None, ["test.early_stop_patience=2"])


def test_a_metric_the_evaluation_does_not_report_stops_before_the_first_iteration(tmp_path, standin_imagenet_r18):
    cfg = load_config(
        None, tiny_overrides(tmp_path / "run", standin_imagenet_r18, "test.eval_period=2", "test.best_metric=bbox/mAP")
    )
    with pytest.raises(ConfigError) as err:
        Trainer(cfg)
    assert str(err.value).startswith("test.best_metric='bbox/mAP' is not a metric the evaluation reports; use one of: ")
    assert "bbox/AP50" in str(err.value) and "bbox/AP-triangle" in str(err.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import mlflow` now raises ImportError, as uninstalled
    cfg = load_config(None, [f"output_dir={tmp_path}", "device=cpu", f"logging.trackers=[{tracker}]"])
    with pytest.raises(ConfigError) as err:
        Trainer(cfg)  # the error comes before the model is built and long before the first iteration
    assert f"pip install 'detkit[{tracker}]'" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# A run with periodic evaluation, MLflow and W&B
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, standin_imagenet_r18):
    tmp = tmp_path_factory.mktemp("best")
    output = tmp / "run"
    cfg = load_config(
        None,
        tiny_overrides(
            output,
            standin_imagenet_r18,
            "solver.max_iter=6",
            "solver.checkpoint_period=2",
            "solver.max_to_keep=1",
            "test.eval_period=2",
            f"logging={{trackers: [mlflow, wandb], mlflow_tracking_uri: {tmp / 'mlruns'}, experiment: detkit-tests, "
            "wandb_mode: offline}",
        ),
    )
    with pytest.MonkeyPatch.context() as mp, Messages() as log:
        mp.setenv("WANDB_DIR", str(tmp))
        mp.setenv("OMP_NUM_THREADS", "1")
        summary = Trainer(cfg).train()
    return {"cfg": cfg, "output": output, "summary": summary, "log": log.lines, "uri": (tmp / "mlruns").as_uri()}


@pytest.mark.slow
def test_model_best_holds_the_first_best_evaluation_and_survives_pruning(tracked):
    output, cfg = tracked["output"], tracked["cfg"]
    evals = eval_rows(output)
    assert [r["iteration"] for r in evals] == [2, 4, 6]  # periodic, and the final evaluation
    assert len({r["bbox/AP"] for r in evals}) > 1  # (a choice between equal values would prove little)
    top = max(r["bbox/AP"] for r in evals)
    first_best = next(r for r in evals if r["bbox/AP"] == top)
    saved = load_checkpoint(output / BEST_NAME)
    assert saved["iteration"] == first_best["iteration"]
    assert saved["best"] == {"metric": "bbox/AP", "mode": "max", "value": top, "iteration": first_best["iteration"]}
    assert "optimizer" not in saved  # an inference checkpoint
    assert f"saved {output / BEST_NAME}: bbox/AP {top:.4g} at iteration {first_best['iteration']}" in tracked["log"]
    assert tracked["summary"]["best"]["checkpoint"] == str(output / BEST_NAME)
    # Pruning (max_to_keep=1) removed model_0000002.pth, never model_best.pth.
    assert sorted(p.name for p in output.glob("model_*.pth")) == ["model_0000004.pth", BEST_NAME, "model_final.pth"]
    # Its weights give the value it was chosen for.
    model = build_model(cfg, load_weights=False)
    model.load_state_dict(saved["model"])
    again = evaluate_model(cfg, model, torch.device("cpu"))
    assert again["bbox/AP"] == pytest.approx(top, abs=1e-9)


@pytest.mark.slow
def test_each_checkpoint_holds_the_best_value_of_the_evaluations_up_to_it(tracked):
    output = tracked["output"]
    state = load_checkpoint(output / "model_0000004.pth")["best"]
    up_to_4 = [r for r in eval_rows(output) if r["iteration"] <= 4]
    top = max(r["bbox/AP"] for r in up_to_4)
    assert (state["value"], state["iteration"]) == (top, next(r["iteration"] for r in up_to_4 if r["bbox/AP"] == top))
    assert state["evals_without_improvement"] == sum(1 for r in up_to_4 if r["iteration"] > state["iteration"])


@pytest.mark.slow
def test_mlflow_run_reads_back_with_the_config_every_metrics_row_and_the_best_checkpoint(tracked):
    output, cfg = tracked["output"], tracked["cfg"]
    run_id = load_checkpoint(output / "model_final.pth")["tracking"]["mlflow_run_id"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracked["uri"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "detkit-tests"
    assert run.data.params == {k: str(v) for k, v in flatten_config(cfg).items()}
    assert run.data.params["solver.base_lr"] == "0.02" and run.data.params["test.eval_period"] == "2"
    logged = rows(output)
    for key in ("total_loss", "loss_cls", "lr", "bbox/AP", "bbox/AR100"):
        expected = [(r["iteration"], r[key]) for r in logged if r.get(key) is not None]
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert history == expected, key
    assert len(client.get_metric_history(run_id, "total_loss")) == 6
    best = tracked["summary"]["best"]
    assert run.data.tags["best_checkpoint"] == str(output / BEST_NAME)
    assert run.data.tags["final_checkpoint"] == str(output / "model_final.pth")
    assert run.data.metrics["best/bbox/AP"] == best["value"]
    assert run.data.metrics["best_iteration"] == best["iteration"]


@pytest.mark.slow
def test_wandb_offline_run_file_holds_the_config_every_metrics_row_and_the_best_checkpoint(tracked):
    output = tracked["output"]
    run_files = sorted(output.parent.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    records = wandb_records(run_files[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "detkit-tests" and run.display_name == "run"
    config = {key_of(item): json.loads(item.value_json) for item in run.config.update}
    assert config["solver.base_lr"] == 0.02 and config["model.depth"] == 18 and config["test.eval_period"] == 2
    # One history record per logged iteration: the training row and, where there was one, the
    # evaluation row of that iteration, with the values of metrics.jsonl.
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {key_of(item): json.loads(item.value_json) for item in r.history.item}
            history[r.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    expected: dict[int, dict] = {}
    for row in rows(output):
        expected.setdefault(row["iteration"], {}).update(
            {k: v for k, v in row.items() if k != "iteration" and v is not None}
        )
    assert history == expected
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({key_of(item): json.loads(item.value_json) for item in r.summary.update})
    assert summary["best_checkpoint"] == str(output / BEST_NAME)
    assert summary["best/bbox/AP"] == tracked["summary"]["best"]["value"]
    exit_record = records[kinds.index("exit")].exit
    assert exit_record.exit_code == 0


# --------------------------------------------------------------------------------------------
# Early stopping across an interruption and --resume
# --------------------------------------------------------------------------------------------


class SignalAt:
    """A hook that sends this process SIGUSR1 (a preemption signal) after iteration `iteration`: the
    trainer sees it at the next step and stops there after its evaluation and checkpoint."""

    def __init__(self, iteration: int):
        self.iteration = iteration

    def __call__(self, trainer):
        if trainer.iteration == self.iteration:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.fixture(scope="module")
def early(tmp_path_factory, standin_imagenet_r18):
    """Evaluations at every iteration; min_delta 1000 makes every one after the first count as no
    improvement, so patience 2 stops at iteration 3. The run is preempted at iteration 2 (whose
    checkpoint holds 1 evaluation without improvement) and resumes: it must stop at 3, not 4."""
    tmp = tmp_path_factory.mktemp("early")
    output = tmp / "run"
    cfg = load_config(
        None,
        tiny_overrides(
            output,
            standin_imagenet_r18,
            "solver.max_iter=10",
            "solver.checkpoint_period=1",
            "test.eval_period=1",
            "test.early_stop_patience=2",
            "test.early_stop_min_delta=1000",
            f"logging={{trackers: [mlflow], mlflow_tracking_uri: {tmp / 'mlruns'}}}",
        ),
    )
    with pytest.MonkeyPatch.context() as mp, Messages() as log:
        mp.setenv("OMP_NUM_THREADS", "1")
        with pytest.raises(TrainingPreempted) as preempted:
            Trainer(cfg, hooks=[SignalAt(1)]).train()
        first_run_id = load_checkpoint(output / "model_0000002.pth")["tracking"]["mlflow_run_id"]
        from mlflow.tracking import MlflowClient

        status_when_preempted = MlflowClient((tmp / "mlruns").as_uri()).get_run(first_run_id).info.status
        resumed = Trainer(cfg)
        resumed.resume_or_load(resume=True)
        restored = resumed.best.state_dict()
        summary = resumed.train()
        again = Trainer(cfg)
        again.resume_or_load(resume=True)
        again_summary = again.train()
    return {
        "output": output,
        "summary": summary,
        "again": again_summary,
        "restored": restored,
        "log": log.lines,
        "first_run_id": first_run_id,
        "preempted_at": preempted.value.iteration,
        "status_when_preempted": status_when_preempted,
        "uri": (tmp / "mlruns").as_uri(),
    }


@pytest.mark.slow
def test_early_stopping_count_survives_resume_and_stops_with_the_final_checkpoint(early):
    output = early["output"]
    assert early["preempted_at"] == 2
    assert early["restored"]["evals_without_improvement"] == 1 and early["restored"]["iteration"] == 1
    assert [r["iteration"] for r in eval_rows(output)] == [1, 2, 3]
    final = load_checkpoint(output / "model_final.pth")
    assert final["iteration"] == 3 and final["best"]["stopped_at"] == 3
    assert (output / "last_checkpoint").read_text().strip() == "model_final.pth"
    # The best value (iteration 1's) came back with the resumed run: its evaluation at 3, better
    # than 2's but not than 1's, did not replace model_best.pth.
    evals = {r["iteration"]: r["bbox/AP"] for r in eval_rows(output)}
    assert evals[1] > max(evals[2], evals[3])
    assert load_checkpoint(output / BEST_NAME)["best"] == {
        "metric": "bbox/AP",
        "mode": "max",
        "value": evals[1],
        "iteration": 1,
    }
    stops = [line for line in early["log"] if line.startswith("early stopping at iteration 3:")]
    assert len(stops) == 1 and "for 2 evaluations (test.early_stop_patience=2)" in stops[0]
    assert stops[0].endswith(f"final checkpoint {output / 'model_final.pth'}")
    assert early["summary"]["iterations"] == 3 and early["summary"]["early_stopped"] == stops[0].split("; final")[0]
    # A further --resume of the stopped run trains nothing.
    assert early["again"]["iterations"] == 3 and early["again"]["resumed_from"] == 3
    assert "this run stopped early at iteration 3: nothing to continue" in early["log"]


@pytest.mark.slow
def test_mlflow_continues_the_same_run_after_resume(early):
    output = early["output"]
    assert load_checkpoint(output / "model_final.pth")["tracking"]["mlflow_run_id"] == early["first_run_id"]
    from mlflow.tracking import MlflowClient

    assert early["status_when_preempted"] == "KILLED"
    client = MlflowClient(tracking_uri=early["uri"])
    run = client.get_run(early["first_run_id"])
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(early["first_run_id"], "total_loss"))
    assert steps == [1, 2, 3]  # iterations 1-2 before the preemption, 3 after --resume
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_the_metric_names_follow_test_metric():
    from detkit.engine.best import check_metric_name, evaluation_metric_names

    coco = evaluation_metric_names(["cat", "dog"], "coco")
    voc = evaluation_metric_names(["cat", "dog"], "voc07")
    assert {"bbox/AP", "bbox/APs", "bbox/AP-dog"} <= set(coco) and "bbox/AP50-dog" not in coco
    assert voc == ["bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/AP50-cat", "bbox/AP50-dog"]
    check_metric_name("bbox/AP50-dog", voc)
    with pytest.raises(ConfigError, match="bbox/APs"):
        check_metric_name("bbox/APs", voc)  # VOC reports no size buckets
