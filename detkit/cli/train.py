"""`detkit train` (also tools/train.py, detkit-train): train a detector from a YAML config.

    detkit train configs/shapes_r18.yaml                                # one process (GPU if present)
    detkit train configs/frcnn_r101.yaml solver.ims_per_batch=8 solver.base_lr=0.01
    detkit train configs/frcnn_r101.yaml --resume                       # continue in output_dir
    detkit train configs/frcnn_r101.yaml --overwrite                    # delete output_dir's run, start over
    torchrun --nproc_per_node 8 tools/train.py configs/frcnn_r101.yaml  # 8 GPUs, one node
    detkit train configs/shapes_r18.yaml --eval-only --weights output/model_final.pth

The output dir receives config.yaml (resolved), log.txt, metrics.jsonl, model_*.pth,
model_final.pth, last_checkpoint and summary.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from detkit.cli.common import command_line, run_cli, setup_logging

logger = logging.getLogger("detkit.cli.train")

_EPILOG = """\
config overrides:
  Any key of configs/base.yaml, dotted, value parsed as YAML, e.g.
    output_dir=runs/r101 device=cpu seed=1 solver.max_iter=90000 solver.steps=[60000,80000]
    solver.ims_per_batch=8 solver.base_lr=0.01 solver.amp=off solver.checkpoint_period=1000
    solver.clip_grad_norm=1.0 test.eval_period=5000 model.backbone.norm=SyncBN data.num_workers=2

batch size and learning rate:
  solver.ims_per_batch is the total over all processes (each of N processes takes 1/N). When you
  change it from the config's value B to B', scale solver.base_lr by B'/B and solver.max_iter,
  solver.steps and solver.warmup_iters by B/B'.

multiple GPUs / nodes:
  torchrun --nproc_per_node 8 -m detkit train CONFIG ...      (or: torchrun ... tools/train.py CONFIG ...)
  torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 --nproc_per_node 8 \\
      tools/train.py CONFIG ...          (output_dir must be on a shared filesystem for --resume)

output (in output_dir):
  config.yaml  log.txt  metrics.jsonl  model_0005000.pth ...  model_final.pth  last_checkpoint
  summary.json; `detkit plot OUTPUT_DIR` draws metrics.jsonl as PNG curves.

an output_dir that holds a run (checkpoints or metrics.jsonl):
  a new run there stops unless --resume (continue it) or --overwrite (delete its files first) is
  given; --resume stops when the config changes the run (model, data, solver, seed, process count)
  and names each key with both values; --accept-config-changes continues with the new values.
  docs/training-long-runs.md has the details.

exit status: 0 done, 2 a configuration/data/checkpoint error or a non-finite loss (one line on
stderr; --debug for the traceback), 75 preempted: a signal of solver.preempt_signals (SIGTERM,
SIGUSR1) came, the iteration it came in was saved, --resume continues; 130 interrupted (Ctrl-C).
Under torchrun: one rank's error stops every rank within seconds (the others exit 2, naming it);
a group restarted by --max-restarts continues from the last checkpoint without --resume.

examples:
  detkit train configs/shapes_r18.yaml                                # the CPU demo model, ~7 min on 2 cores
  detkit train configs/frcnn_r101.yaml --resume                       # continue in output_dir
  detkit train configs/shapes_r18.yaml --eval-only --weights output/shapes_r18/model_final.pth
  detkit train configs/frcnn_r101.yaml solver.ims_per_batch=8 solver.base_lr=0.01 output_dir=runs/r101
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detkit train",
        description="Train a Faster R-CNN (ResNet C4) detector, or evaluate a checkpoint with --eval-only.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    parser.add_argument("config", help="YAML config, e.g. configs/frcnn_r101.yaml (inherits configs/base.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (see below)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint named by output_dir/last_checkpoint: model, optimizer, "
        "iteration, RNG and data position (starts from scratch when there is none)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="output_dir holds an earlier run: delete its checkpoints, metrics, logs and summary, then start over",
    )
    parser.add_argument(
        "--accept-config-changes",
        action="store_true",
        help="with --resume: continue although the config changes the run (model, data, solver, seed, processes)",
    )
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="no training: evaluate --weights on the config's test set (writes predictions.json and "
        "metrics.json to output_dir)",
    )
    parser.add_argument("--weights", help="with --eval-only: the checkpoint to evaluate (.pth)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of configuration and data errors")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    from detkit.config import load_config
    from detkit.errors import ConfigError

    if args.eval_only:
        if not args.weights:
            raise ConfigError("--eval-only needs --weights CHECKPOINT (e.g. --weights output/model_final.pth)")
        if args.resume or args.overwrite:
            raise ConfigError("--eval-only does not train: --resume and --overwrite do not go with it")
        from detkit.cli.eval import main as eval_main

        return eval_main([args.config, *args.overrides, "--weights", args.weights])
    if args.weights:
        raise ConfigError(
            "--weights is for --eval-only; to start training from a checkpoint use the override "
            f"model.weights={args.weights}"
        )

    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in output_dir and --overwrite deletes it: give one of them")
    if args.accept_config_changes and not args.resume:
        raise ConfigError("--accept-config-changes applies to --resume only")
    cfg = load_config(args.config, args.overrides)
    return train(cfg, resume=args.resume, overwrite=args.overwrite, accept_config_changes=args.accept_config_changes)


def train(cfg, resume: bool = False, overwrite: bool = False, accept_config_changes: bool = False) -> int:
    """Train `cfg` in this process (one rank of a torchrun group, or alone).

    A fresh run (resume=False) into an output_dir that holds an earlier run's checkpoints or metrics
    raises ConfigError unless overwrite=True, which deletes that run's files first (rank 0).
    """
    from detkit.engine import distributed as dist
    from detkit.engine.checkpoint import existing_run_files, remove_run_files
    from detkit.engine.preemption import PREEMPTED_EXIT_STATUS, TrainingPreempted
    from detkit.engine.trainer import Trainer
    from detkit.errors import ConfigError, PeerFailedError

    info = dist.dist_info_from_env()
    output_dir = Path(cfg.output_dir)
    # torchrun --max-restarts N starts the whole group again after a worker died (SIGKILL, OOM
    # killer, a lost node): the restarted attempt continues the run, with --resume's config check,
    # when this torchrun started it (its first attempt's line in log.txt). A first attempt that
    # stopped on another run's files is not a run to continue: its restarts stop the same way.
    restart, run_id = dist.elastic_restart_count(), os.environ.get("TORCHELASTIC_RUN_ID", "")
    started_line = f"torchrun run {run_id}, attempt 0"
    restarted = restart > 0 and run_id != "" and _log_mentions(output_dir / "log.txt", started_line)
    if restarted:
        resume, overwrite = True, False
    # Every rank decides from the same files before any rank can write one (the first write
    # follows the process group's rendezvous), so all ranks stop or all go on.
    earlier = existing_run_files(output_dir) if not resume else []
    if earlier and not overwrite:
        names = ", ".join(p.name for p in earlier[:4]) + (", ..." if len(earlier) > 4 else "")
        raise ConfigError(
            f"output_dir {output_dir} already holds a run ({names}): add --resume to continue it, --overwrite to "
            "delete it and start over, or set output_dir=... to another folder"
        )
    if earlier and info.is_main:
        removed = remove_run_files(output_dir)
    file_handler = None
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(logging.INFO, log_file=str((output_dir / "log.txt").resolve()))
        file_handler = _handler_for(output_dir / "log.txt")
    else:
        setup_logging(logging.WARNING)
    try:
        if info.is_main:
            logger.info("command: %s", command_line())
            if run_id:
                logger.info("torchrun run %s, attempt %d", run_id, restart)
            if restarted:
                logger.info("torchrun restart %d: continuing from the last checkpoint in %s", restart, output_dir)
            if earlier:
                logger.info("--overwrite: removed %d files of the earlier run in %s", len(removed), output_dir)
        # A resumed run gets every tensor from the checkpoint: skip reading the initial weights files.
        has_checkpoint = resume and (output_dir / "last_checkpoint").is_file()
        trainer = Trainer(cfg, load_weights=not has_checkpoint)
        trainer.resume_or_load(resume=resume, accept_config_changes=accept_config_changes)
        try:
            summary = trainer.train()
        except TrainingPreempted as stop:
            if info.is_main:
                print(f"{stop}; continue with --resume", file=sys.stderr)
            return PREEMPTED_EXIT_STATUS
        if info.is_main:
            eval_part = summary["eval"]
            shown = {k: eval_part[k] for k in ("bbox/AP", "bbox/AP50") if k in eval_part} or {
                k: v for k, v in eval_part.items() if k.startswith("val/")
            }
            metrics = "  ".join(f"{k} {v:.2f}" for k, v in shown.items())
            if summary["s_per_iter"] is None:
                done = f"nothing left to train: {output_dir} already holds iteration {summary['iterations']}"
            else:
                done = (
                    f"trained {summary['iterations'] - summary['resumed_from']} iterations in "
                    f"{summary['wall_time_s']:.0f} s ({summary['s_per_iter']} s/iter)"
                )
            print(done + (f"; {metrics}" if metrics else ""))
            print(f"outputs in {output_dir}/: model_final.pth, metrics.jsonl, log.txt, summary.json")
        return 0
    except Exception as exc:
        # Every rank of a group stops on one rank's exception (detkit.engine.distributed); the one
        # that failed prints its error, the others name it (and rank 0 writes it into log.txt).
        failure = dist.report_failure(exc)
        if isinstance(failure, PeerFailedError):
            dist.log_peer_failure_to_files(failure.rank, failure.kind, failure.message)
        if failure is exc:
            raise
        raise failure from None
    finally:
        dist.destroy()
        if file_handler is not None:
            # Leave no handler behind when main() is called in-process (tests, notebooks).
            logging.getLogger("detkit").removeHandler(file_handler)
            file_handler.close()


def _log_mentions(log_file: Path, text: str) -> bool:
    try:
        return text in log_file.read_text(errors="replace")
    except OSError:  # no log yet
        return False


def _handler_for(log_file: Path):
    target = str(log_file.resolve())
    for handler in logging.getLogger("detkit").handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename == target:
            return handler
    return None


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
