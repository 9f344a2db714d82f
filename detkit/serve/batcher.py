"""Dynamic batching: images submitted within `max_wait_s` of each other run as one forward pass.

    batcher = Batcher(load_predictor, max_batch=8, max_wait_s=0.01, max_queue=32, workers=1, threads=2)
    batcher.start()                        # each worker thread loads its model and warms it up
    if batcher.try_reserve():              # admission: False when max_queue images already wait
        future = batcher.submit(tensor, (h0, w0))    # (3, h, w) from predictor.preprocess
        result = await asyncio.wrap_future(future)   # BatchResult: detections, timings, batch size
    batcher.stop()                         # after the server stopped taking requests: waits for the
                                           # images already submitted, then ends the threads

A worker takes the first waiting image, then keeps taking images until it holds `max_batch` or
`max_wait_s` has passed since it took the first, and runs them through `predict_preprocessed` in
one call. The model runs only in the worker threads (each with its own model copy and `threads`
intra-op threads), never in the caller's thread, so an asyncio event loop stays free to accept,
reject and answer requests while the model works.

Memory is bounded by admission: `try_reserve` counts the images admitted and not yet taken by a
worker ("waiting"), and refuses beyond `max_queue`, so at most max_queue + workers * max_batch
preprocessed images are held whatever the offered load.

Shapes: N images in a batch, (3, h, w) one preprocessed image, (h0, w0) its original size.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """What a worker gives back for one image: its detections (a `Detections`), the seconds it
    waited for a worker (queue_s) and the seconds of the forward pass it was part of (inference_s),
    and how many images that pass held (batch_size)."""

    detections: object
    queue_s: float
    inference_s: float
    batch_size: int


@dataclass
class _Job:
    tensor: object  # (3, h, w) uint8 torch tensor from the predictor's preprocess
    size_hw: tuple[int, int]
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)


_STOP = object()


class Batcher:
    """Worker threads that run a predictor on dynamic batches (see the module docstring).

    load_predictor(worker_index) -> an object with `preprocess(image)` and
    `predict_preprocessed(tensors, sizes)` (a Predictor or ExportedPredictor), called in the
    worker's own thread. warmup_hw: the (h, w) of the blank image each worker runs once before it
    counts as ready. on_batch(batch_size, seconds): called after each forward pass (metrics).

    split_by_padded_size: run the images of a collected batch in one pass per padded size (their
    resized size rounded up to the model's data.size_divisibility). An image then sees exactly the
    padding it gets alone (`detkit infer --batch-size 1`), so its detections do not depend on which
    other images shared its batch. None (the default): split only for a model that is not
    batch-invariant (a checkpoint served with test.batch_invariant=false); a batch-invariant model
    (the default) and the exported files give each image its own detections in any batch.
    """

    def __init__(
        self,
        load_predictor: Callable[[int], object],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        workers: int = 1,
        threads: int = 1,
        warmup_hw: tuple[int, int] = (480, 640),
        on_batch: Callable[[int, float], None] | None = None,
        split_by_padded_size: bool | None = None,
    ):
        self.load_predictor = load_predictor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.workers = workers
        self.threads = threads
        self.warmup_hw = warmup_hw
        self.on_batch = on_batch
        self.size_divisibility = 1  # the model's data.size_divisibility, read once it is loaded
        self.split_by_padded_size = split_by_padded_size
        self.predictor: object | None = None  # worker 0's, for class names and preprocess
        self.error: BaseException | None = None  # a worker that could not load its model
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._ready_count = 0
        self._ready = threading.Event()
        self._failed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._seconds_per_image = 0.0  # running mean of forward seconds / image, for Retry-After

    # ------------------------------------------------------------------ state

    @property
    def ready(self) -> bool:
        """Every worker has loaded its model and run the warm-up image."""
        return self._ready.is_set()

    @property
    def waiting(self) -> int:
        """Images admitted (try_reserve) and not yet taken into a forward pass."""
        return self._waiting

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until every worker is ready or one failed; True when ready."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not (self._ready.is_set() or self._failed.is_set()):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._ready.wait(0.05 if left is None else min(0.05, left))
        return self._ready.is_set()

    def retry_after_s(self) -> int:
        """Whole seconds after which the images waiting now should have been run (at least 1)."""
        estimate = self._waiting * self._seconds_per_image / self.workers
        return max(1, math.ceil(estimate))

    # ------------------------------------------------------------------ admission and submission

    def try_reserve(self, count: int = 1) -> bool:
        """Admit `count` more waiting images unless that would exceed max_queue."""
        with self._lock:
            if self._waiting + count > self.max_queue:
                return False
            self._waiting += count
            return True

    def release(self, count: int = 1) -> None:
        """Give back reservations that will not be submitted (the upload turned out to be bad)."""
        with self._lock:
            self._waiting -= count

    def submit(self, tensor, size_hw: Sequence[int]) -> Future:
        """Queue one preprocessed image whose place try_reserve granted; the Future gets a BatchResult."""
        job = _Job(tensor, (int(size_hw[0]), int(size_hw[1])))
        self._queue.put(job)
        return job.future

    # ------------------------------------------------------------------ threads

    def start(self) -> None:
        """Start the worker threads; each loads its predictor and warms it up (see `ready`)."""
        for index in range(self.workers):
            thread = threading.Thread(target=self._worker, args=(index,), name=f"detkit-model-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Let the workers finish the images already submitted, then end them."""
        for _ in self._threads:
            self._queue.put(_STOP)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            logger.warning("model workers still running after %.0f s: %s", timeout_s, ", ".join(alive))

    def _worker(self, index: int) -> None:
        import torch

        # Each thread sets its own: with OpenMP the intra-op thread count is per calling thread.
        torch.set_num_threads(self.threads)
        try:
            predictor = self.load_predictor(index)
            tic = time.perf_counter()
            blank = np.full((*self.warmup_hw, 3), 114, np.uint8)
            predictor.predict_preprocessed([predictor.preprocess(blank)], [self.warmup_hw])  # type: ignore[attr-defined]
            logger.info("model worker %d ready (warm-up pass %.0f ms)", index, 1000 * (time.perf_counter() - tic))
        except BaseException as exc:  # noqa: BLE001 - any load failure is reported by /readyz and the command
            self.error = exc
            self._failed.set()
            logger.error("model worker %d could not load the model: %s", index, exc)
            return
        with self._lock:
            self.size_divisibility = max(1, int(predictor.cfg.data.size_divisibility))  # type: ignore[attr-defined]
            if index == 0 or self.predictor is None:
                self.predictor = predictor
            self._ready_count += 1
            if self._ready_count == self.workers:
                self._ready.set()
        while True:
            batch = self._collect()
            if batch is None:
                return
            self._run(predictor, batch)

    def _collect(self) -> list[_Job] | None:
        """The next batch: the first waiting job, then more until max_batch or max_wait_s; None: stop."""
        first = self._queue.get()
        if first is _STOP:
            return None
        batch = [first]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                self._queue.put(_STOP)  # for this worker's next _collect, after this batch has run
                break
            batch.append(job)
        with self._lock:
            self._waiting -= len(batch)
        return batch

    def _run(self, predictor, batch: list[_Job]) -> None:
        """Run `batch` in one forward pass per padded size (see `split_by_padded_size`)."""
        split = self.split_by_padded_size
        if split is None:  # a PyTorch Predictor's model says; the exported files run image by image
            split = not getattr(getattr(predictor, "model", None), "batch_invariant", True)
        groups: dict[tuple[int, int], list[_Job]] = {}
        for job in batch:
            key = self._padded_hw(job.tensor) if split else (0, 0)
            groups.setdefault(key, []).append(job)
        for jobs in groups.values():
            self._run_pass(predictor, jobs)

    def _padded_hw(self, tensor) -> tuple[int, int]:
        """(h, w) of a (3, h, w) tensor rounded up to size_divisibility: its size in a batch of its own."""
        h, w = tensor.shape[-2:]
        d = self.size_divisibility
        return (-(-h // d) * d, -(-w // d) * d) if d > 1 else (h, w)

    def _run_pass(self, predictor, batch: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            results = predictor.predict_preprocessed([job.tensor for job in batch], [job.size_hw for job in batch])
        except Exception as exc:
            logger.exception("forward pass over %d images failed", len(batch))
            for job in batch:
                job.future.set_exception(exc)
            return
        seconds = time.perf_counter() - start
        # Exponential mean over the last ~20 passes: recent enough to follow the load.
        per_image = seconds / len(batch)
        self._seconds_per_image = (
            per_image if not self._seconds_per_image else 0.95 * self._seconds_per_image + 0.05 * per_image
        )
        if self.on_batch is not None:
            self.on_batch(len(batch), seconds)
        for job, dets in zip(batch, results):
            job.future.set_result(BatchResult(dets, start - job.submitted, seconds, len(batch)))
