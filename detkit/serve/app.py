"""The FastAPI application of `detkit serve`: API, dynamic batching, backpressure, metrics.

    POST /v1/detect   an image (raw body, or multipart/form-data field "image"), ?score_thresh=0.5
                      -> {"model", "width", "height", "boxes" [[x1, y1, x2, y2], ...] in the image's
                          pixels, "scores", "labels", "class_names", "score_thresh", "batch_size",
                          "time_ms": {"total", "queue", "inference"}}
    GET  /healthz     200 while the process serves HTTP (alive)
    GET  /readyz      200 once every model worker has loaded and warmed up; 503 before, when loading
                      failed and while draining
    GET  /metrics     Prometheus text: requests by status, latency histogram, batch sizes, queue depth
    GET  /docs        the OpenAPI page (/openapi.json the schema)

Errors answer {"error": "<one line>"} with 400 (bad image or parameter), 413 (too large), 415 (not
an image type), 503 + Retry-After (queue full, not ready, draining) or 500 (the model failed).

The event loop only reads bodies, checks headers and awaits futures: decoding and resizing run in
a small thread pool (so at most that many full-size images are decoded at once) and the model in
the batcher's worker threads (detkit.serve.batcher).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from detkit import __version__
from detkit.errors import RequestError
from detkit.serve.batcher import Batcher, BatchResult
from detkit.serve.images import ACCEPTED_FORMATS, check_content_type, decode_upload
from detkit.serve.options import ServeOptions

logger = logging.getLogger(__name__)

DECODE_THREADS = 2  # images decoded and resized at once: bounds the full-size images held in memory
# A multipart body carries the image plus boundaries and part headers: a few hundred bytes.
MULTIPART_OVERHEAD_BYTES = 16 * 1024

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)


@dataclass
class ServiceState:
    """What the probes report: `draining` is set by the command when SIGTERM arrives."""

    draining: bool = False


class Metrics:
    """The Prometheus metrics of one service, in their own registry (several apps in one process,
    as in tests, do not collide)."""

    def __init__(self, max_batch: int, waiting):
        # No <name>_created series: Prometheus computes rates without them; they double the text.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "detkit_requests", "POST /v1/detect requests answered, by HTTP status", ["status"], registry=self.registry
        )
        self.latency = Histogram(
            "detkit_request_latency_seconds",
            "Seconds from receiving a POST /v1/detect to answering it, for answers with status 200",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "detkit_batch_size",
            "Images per forward pass",
            buckets=[b for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if b < max_batch] + [max_batch],
            registry=self.registry,
        )
        self.inference = Histogram(
            "detkit_inference_seconds", "Seconds of one forward pass", buckets=LATENCY_BUCKETS_S, registry=self.registry
        )
        queue_depth = Gauge(
            "detkit_queue_depth", "Images admitted and waiting for a forward pass", registry=self.registry
        )
        queue_depth.set_function(waiting)

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)


def load_predictor(options: ServeOptions, threads: int):
    """A Predictor (backend pytorch) or ExportedPredictor running at the model's own score floor."""
    if options.backend == "pytorch":
        from detkit.engine.predictor import Predictor

        assert options.weights is not None  # options.check()
        return Predictor(
            options.weights,
            config=options.config,
            overrides=options.overrides,
            device=options.device,
            batch_size=options.max_batch,
        )
    from detkit.export.runtime import ExportedPredictor

    assert options.model is not None
    return ExportedPredictor(options.model, backend=options.backend, batch_size=options.max_batch, num_threads=threads)


def _error(status: int, reason: str, retry_after_s: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


def _parse_score_thresh(text: str | None, default: float, floor: float) -> float:
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise RequestError(400, f"score_thresh={text!r} is not a number: use a value in [{floor:g}, 1]") from None
    if not 0.0 <= value <= 1.0:
        raise RequestError(400, f"score_thresh={text} is outside [0, 1]")
    if value < floor:
        raise RequestError(
            400,
            f"score_thresh={text} is below the model's own threshold {floor:g} (model.roi_heads.score_thresh): "
            f"use a value in [{floor:g}, 1]",
        )
    return value


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, 413 as soon as it passes `limit` bytes (also for chunked uploads)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the body is {declared} bytes, over this server's limit of {limit} (--max-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is over this server's limit of {limit} bytes (--max-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _image_from_multipart(request: Request, body: bytes) -> tuple[bytes, str | None]:
    """(the image bytes, the score_thresh field or None) of a multipart/form-data body."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=4).parse()
    except MultiPartException as exc:
        raise RequestError(400, f"the multipart/form-data body cannot be parsed ({exc.message})") from None
    upload = form.get("image")
    if upload is None:
        files = [value for value in form.values() if isinstance(value, UploadFile)]
        upload = files[0] if files else None
    if not isinstance(upload, UploadFile):
        raise RequestError(400, "the multipart/form-data body has no file: send the image in a field named 'image'")
    check_content_type(upload.content_type)
    data = await upload.read()
    thresh = form.get("score_thresh")
    return data, thresh if isinstance(thresh, str) else None


def create_app(options: ServeOptions, state: ServiceState | None = None):
    """The FastAPI application serving `options` (see the module docstring).

    The model workers start with the application's lifespan and stop after the server stopped
    taking requests (uvicorn answers the ones in flight first).
    """
    options.check()
    state = state or ServiceState()
    threads = options.threads_per_worker
    batcher_holder: dict[str, Batcher] = {}

    def waiting() -> float:
        batcher = batcher_holder.get("batcher")
        return float(batcher.waiting) if batcher is not None else 0.0

    metrics = Metrics(options.max_batch, waiting)
    batcher = Batcher(
        lambda index: load_predictor(options, threads),
        max_batch=options.max_batch,
        max_wait_s=options.max_wait_ms / 1000.0,
        max_queue=options.max_queue,
        workers=options.workers,
        threads=threads,
        warmup_hw=(480, 640),
        on_batch=metrics.on_batch,
        split_by_padded_size=options.split_by_padded_size,
    )
    batcher_holder["batcher"] = batcher
    decode_limiter = anyio.CapacityLimiter(DECODE_THREADS)

    @asynccontextmanager
    async def lifespan(app):
        logger.info(
            "serving %s: max batch %d, max wait %g ms, max queue %d, %d model worker(s) x %d threads",
            options.model_name,
            options.max_batch,
            options.max_wait_ms,
            options.max_queue,
            options.workers,
            threads,
        )
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(
        title="detkit detection service",
        version=__version__,
        summary=f"Faster R-CNN detections of {options.model_name}",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.service = state
    app.state.metrics = metrics

    image_schema = {"type": "string", "format": "binary"}
    detect_body = {
        "required": True,
        "content": {
            **{media: {"schema": image_schema} for media in ACCEPTED_FORMATS.values()},
            "application/octet-stream": {"schema": image_schema},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": image_schema, "score_thresh": {"type": "number"}},
                }
            },
        },
    }
    score_param = {
        "name": "score_thresh",
        "in": "query",
        "required": False,
        "schema": {"type": "number", "minimum": 0, "maximum": 1, "default": options.score_thresh},
        "description": "keep detections scoring at least this (at least the model's own threshold)",
    }
    detect_example = {
        "model": options.model_name,
        "width": 640,
        "height": 480,
        "boxes": [[12.5, 40.0, 200.25, 310.0]],
        "scores": [0.97],
        "labels": [0],
        "class_names": ["circle"],
        "score_thresh": options.score_thresh,
        "batch_size": 3,
        "time_ms": {"total": 48.1, "queue": 9.7, "inference": 35.2},
    }

    async def _detect(request: Request):
        if state.draining:
            return _error(503, "the server is shutting down", retry_after_s=1)
        if not batcher.ready:
            reason = f"the model failed to load: {batcher.error}" if batcher.error else "the model is still loading"
            return _error(503, reason, retry_after_s=None if batcher.error else 1)
        if not batcher.try_reserve():
            return _error(
                503,
                f"busy: {batcher.waiting} images are waiting (--max-queue {options.max_queue}); retry later",
                retry_after_s=batcher.retry_after_s(),
            )
        submitted = False
        try:
            start = time.perf_counter()
            content_type = request.headers.get("content-type", "")
            multipart = content_type.lower().startswith("multipart/form-data")
            body = await _read_body(request, options.max_bytes + (MULTIPART_OVERHEAD_BYTES if multipart else 0))
            thresh_text = request.query_params.get("score_thresh")
            if multipart:
                data, form_thresh = await _image_from_multipart(request, body)
                thresh_text = thresh_text if thresh_text is not None else form_thresh
                if len(data) > options.max_bytes:
                    raise RequestError(
                        413,
                        f"the image is {len(data)} bytes, over this server's limit of {options.max_bytes} (--max-bytes)",
                    )
            else:
                check_content_type(content_type)
                data = body
            predictor = batcher.predictor
            floor = float(predictor.score_thresh)  # type: ignore[attr-defined]
            score_thresh = _parse_score_thresh(thresh_text, max(options.score_thresh, floor), floor)

            def decode():
                image = decode_upload(data, options.max_pixels)
                return predictor.preprocess(image), image.shape[:2]  # type: ignore[attr-defined]

            tensor, size_hw = await anyio.to_thread.run_sync(decode, limiter=decode_limiter)
            future = batcher.submit(tensor, size_hw)
            submitted = True
            result: BatchResult = await asyncio.wrap_future(future)
        except RequestError as exc:
            return _error(exc.status, exc.reason)
        finally:
            if not submitted:
                batcher.release()
        dets = result.detections
        keep = int((dets.scores >= score_thresh).sum())  # type: ignore[attr-defined]  # best first
        total_s = time.perf_counter() - start
        metrics.latency.observe(total_s)
        return JSONResponse(
            {
                "model": options.model_name,
                "width": int(size_hw[1]),
                "height": int(size_hw[0]),
                "boxes": dets.boxes[:keep].tolist(),  # type: ignore[attr-defined]
                "scores": dets.scores[:keep].tolist(),  # type: ignore[attr-defined]
                "labels": dets.labels[:keep].tolist(),  # type: ignore[attr-defined]
                "class_names": dets.class_names[:keep],  # type: ignore[attr-defined]
                "score_thresh": score_thresh,
                "batch_size": result.batch_size,
                "time_ms": {
                    "total": round(1000 * total_s, 3),
                    "queue": round(1000 * result.queue_s, 3),
                    "inference": round(1000 * result.inference_s, 3),
                },
            }
        )

    @app.post(
        "/v1/detect",
        summary="Detect objects in one image",
        description="The image as the raw body (JPEG, PNG or WebP) or as the multipart/form-data field 'image'. "
        "Boxes are [x1, y1, x2, y2] in the image's own pixels, best score first.",
        openapi_extra={"requestBody": detect_body, "parameters": [score_param]},
        responses={
            200: {"content": {"application/json": {"example": detect_example}}},
            400: {"description": "not a readable image, a truncated one, an empty body, a bad score_thresh"},
            413: {"description": "over --max-bytes or --max-pixels"},
            415: {"description": "a Content-Type or image format other than JPEG, PNG, WebP"},
            503: {"description": "queue full, model loading or server draining; see Retry-After"},
        },
    )
    async def detect(request: Request):
        try:
            response = await _detect(request)
        except Exception:
            metrics.requests.labels(status="500").inc()
            logger.exception("POST /v1/detect failed")
            return _error(500, "the model failed on this request; see the server log")
        metrics.requests.labels(status=str(response.status_code)).inc()
        return response

    @app.get("/healthz", summary="Liveness: the process answers HTTP")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz", summary="Readiness: every model worker loaded and warmed up, not draining")
    async def readyz():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if batcher.error is not None:
            return JSONResponse({"status": "failed", "error": str(batcher.error)}, status_code=503)
        if not batcher.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        predictor = batcher.predictor
        return {
            "status": "ready",
            "model": options.model_name,
            "backend": options.backend,
            "classes": list(predictor.class_names),  # type: ignore[attr-defined]
            "model_score_thresh": float(predictor.score_thresh),  # type: ignore[attr-defined]
            "score_thresh": options.score_thresh,
            "max_batch": options.max_batch,
            "max_wait_ms": options.max_wait_ms,
            "max_queue": options.max_queue,
            "workers": options.workers,
            "threads_per_worker": threads,
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus_metrics():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
