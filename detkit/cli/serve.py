"""`detkit serve` (also tools/serve.py): an HTTP detection service with dynamic batching.

    detkit serve --weights output/shapes_r18/model_final.pth --port 8000
    detkit serve --backend onnxruntime --model model.onnx --max-batch 8 --max-wait-ms 10
    curl -s --data-binary @photo.jpg -H 'Content-Type: image/jpeg' 'localhost:8000/v1/detect?score_thresh=0.5'

API (docs/serving.md): POST /v1/detect, GET /healthz, GET /readyz, GET /metrics, GET /docs.
Once listening it prints one line "listening on http://HOST:PORT" to stdout (with --port 0, the
port the system chose). SIGTERM (or Ctrl-C) drains: the server stops accepting connections,
answers the requests already received, then exits with status 0 (130 after Ctrl-C). A model that
cannot be loaded ends the command with status 2 and the reason on stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from collections.abc import Sequence

from detkit.cli.common import run_cli, setup_logging
from detkit.errors import ConfigError, DetkitError
from detkit.serve.options import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ServeOptions

logger = logging.getLogger("detkit.cli.serve")

SERVE_PACKAGES = ("fastapi", "uvicorn", "multipart", "prometheus_client", "PIL")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detkit serve",
        description="Serve a detector over HTTP: POST /v1/detect, /healthz, /readyz, /metrics, /docs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="requests (docs/serving.md):\n"
        "  curl -s --data-binary @photo.jpg -H 'Content-Type: image/jpeg' localhost:8000/v1/detect\n"
        "  curl -s -F image=@photo.jpg 'localhost:8000/v1/detect?score_thresh=0.7'\n"
        "  curl -s localhost:8000/readyz; curl -s localhost:8000/metrics\n\n"
        "examples:\n"
        "  detkit serve --weights output/shapes_r18/model_final.pth --port 8000\n"
        "  detkit serve --backend onnxruntime --model model.onnx --max-batch 8 --max-wait-ms 10\n"
        "  detkit serve --weights output/shapes_r18/model_final.pth --host 0.0.0.0 --max-batch 1 --threads 2",
    )
    parser.add_argument("--weights", help="detkit checkpoint (.pth); brings config and class names (--backend pytorch)")
    parser.add_argument(
        "--backend",
        choices=("pytorch", "onnxruntime", "openvino", "pt2", "aoti"),
        default="pytorch",
        help="pytorch: the checkpoint in --weights; onnxruntime / openvino / pt2 / aoti: the file in --model "
        "written by detkit export (openvino runs the .onnx file; pip install 'detkit[openvino]')",
    )
    parser.add_argument(
        "--model", help="exported model (.onnx, .pt2) for --backend onnxruntime / openvino / pt2 / aoti"
    )
    parser.add_argument("--config", help="YAML config replacing the checkpoint's (e.g. another test size)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. data.min_size_test=600")
    parser.add_argument("--name", help="the model's name in the answers (default: the checkpoint's folder or stem)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (8000; 0: any free port, printed)")
    parser.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda when a GPU is visible"
    )
    parser.add_argument(
        "--score-thresh",
        type=float,
        default=0.5,
        help="score threshold of requests that give none (0.5); a request may ask for any value from the "
        "model's own threshold (model.roi_heads.score_thresh) to 1",
    )
    batching = parser.add_argument_group("batching and load")
    batching.add_argument("--max-batch", type=int, default=8, help="images per forward pass (8; 1: no batching)")
    batching.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="how long the first image of a batch waits for more before the pass runs (10)",
    )
    batching.add_argument(
        "--max-queue",
        type=int,
        default=32,
        help="images waiting for a forward pass beyond which requests are answered 503 + Retry-After (32)",
    )
    batching.add_argument(
        "--workers", type=int, default=1, help="model worker threads, each with its own copy of the model (1)"
    )
    batching.add_argument(
        "--threads", type=int, help="intra-op threads per model worker (default: the CPU count / --workers)"
    )
    batching.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for requests in flight (30)"
    )
    limits = parser.add_argument_group("input limits")
    limits.add_argument(
        "--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help=f"largest image body in bytes ({DEFAULT_MAX_BYTES})"
    )
    limits.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"largest width x height, read from the header before decoding ({DEFAULT_MAX_PIXELS})",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    return parser


def require_serve_packages() -> None:
    """ConfigError naming the install command when the serve extra is missing."""
    import importlib.util

    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"detkit serve needs {', '.join(missing)}: install the serve extra with pip install 'detkit[serve]'"
        )


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    return ServeOptions(
        weights=args.weights,
        config=args.config,
        overrides=list(args.overrides),
        model=args.model,
        backend=args.backend,
        device=args.device,
        score_thresh=args.score_thresh,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        workers=args.workers,
        threads=args.threads,
        max_bytes=args.max_bytes,
        max_pixels=args.max_pixels,
        name=args.name,
    ).check()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # Listening before the "listening on" line: a client that reads it may connect at once
        # (the connection waits in the backlog until uvicorn accepts it).
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    return sock


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_intermixed_args(list(argv))
    setup_logging()
    options = options_from_args(args)
    if args.drain_timeout < 0:
        raise ConfigError(f"--drain-timeout {args.drain_timeout}: must be >= 0 seconds")
    for flag, path in (("--weights", options.weights), ("--model", options.model), ("--config", options.config)):
        if path is not None:
            from pathlib import Path

            if not Path(path).is_file():
                raise ConfigError(f"{flag} {path}: no such file")
    require_serve_packages()
    import torch
    import uvicorn

    from detkit.serve.app import ServiceState, create_app

    torch.set_num_threads(options.threads_per_worker)
    state = ServiceState()
    app = create_app(options, state)
    batcher = app.state.batcher

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not state.draining:
                logger.info("signal %d: draining (no new connections; answering the requests in flight)", sig)
            state.draining = True
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            # A model that cannot be loaded ends the server (the command then exits with status 2).
            if batcher.error is not None:
                self.should_exit = True
            return await super().on_tick(counter)

    # Bounds the connections uvicorn itself holds (beyond them it answers 503): what the queue
    # admits, what the workers hold, and room for the probes and the rejections.
    limit = options.max_queue + options.workers * options.max_batch + 64
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=args.access_log,
        limit_concurrency=limit,
        timeout_graceful_shutdown=args.drain_timeout,
        lifespan="on",
    )
    server = DrainingServer(config)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"listening on http://{shown}:{port}  (docs: http://{shown}:{port}/docs)", flush=True)
    # uvicorn re-raises the signal that stopped it once it has drained; as SIGTERM's handler here
    # does nothing, the command then returns 0 (the default handler would end it with -15).
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if isinstance(batcher.error, DetkitError):  # a bad checkpoint or model file: one line, status 2
        raise batcher.error
    if batcher.error is not None:
        raise ConfigError(f"cannot serve: the model failed to load ({batcher.error})")
    logger.info("stopped")
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
