"""Run an exported detkit model (ONNX Runtime, OpenVINO, torch.export, AOTInductor) behind the `Predictor` interface.

    predictor = ExportedPredictor("model.onnx")                 # or "model.pt2" (pt2 or aoti)
    predictor = ExportedPredictor("model.onnx", backend="openvino")  # the same ONNX file on OpenVINO
    dets = predictor(read_image("street.jpg"))                   # same Detections as Predictor
    predictor.predict_preprocessed(tensors, original_sizes)      # what tools/infer.py calls
    predictor.as_module()                                        # ImageBatch -> detections, for tools/eval.py

Everything comes from the file's metadata (exporter.export_metadata): the resize (the same
`Preprocessor` as the PyTorch backend, rebuilt from the stored config), the class names and
category ids, the score threshold. A one-image file (the default export) runs a batch image by
image, each padded to `size_divisibility` on its own: what the batch-invariant eager model
(test.batch_invariant, the default) does with each image of a batch. A batched file
(`tools/export.py --batched`, metadata "batched": "true") takes up to `batch_size` images per call,
zero-padded to the largest, and crops each to its own size inside (graph.BatchedDetector). Either
way an image gets the same detections at any batch size.

Shapes: D detections of one image; h x w the resized image; (h0, w0) the original size.
"""

from __future__ import annotations

import ctypes
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from detkit.engine.predictor import Detections, Preprocessor, detections_from_arrays
from detkit.errors import CheckpointError, ConfigError, ExportError
from detkit.export.exporter import (
    BATCHED_INPUT_NAMES,
    BATCHED_OUTPUT_NAMES,
    INPUT_NAMES,
    OUTPUT_NAMES,
    check_metadata,
    one_line,
    require_export_packages,
)
from detkit.structures.image_batch import ImageBatch

logger = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "openvino", "pt2", "aoti")
RETIRED_BACKENDS = {
    "torchscript": "TorchScript was retired (PyTorch deprecates it; torch.jit.load is not supported on "
    "Python 3.14+): export the checkpoint again with tools/export.py --format pt2 and run it with --backend pt2",
}


def backend_for(path: str | Path) -> str:
    """'onnxruntime' for .onnx files; for a .pt2 zip 'aoti' when it holds an AOTInductor package,
    else 'pt2' (torch.export.save); 'torchscript' (retired) for .pt / .ts files."""
    import zipfile

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnxruntime"
    if suffix in (".pt", ".ts"):
        return "torchscript"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            # AOTInductor packages keep their shared library under <name>/data/aotinductor/.
            if any("/data/aotinductor/" in name for name in archive.namelist()):
                return "aoti"
    return "pt2"


class _OnnxRuntimeModel:
    def __init__(self, path: Path, num_threads: int | None):
        require_export_packages(("onnx", "onnxruntime"))
        import onnx
        import onnxruntime

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf decode errors have no common base class
            raise CheckpointError(f"--model {path} is not an ONNX file: {one_line(exc)}") from None
        self.metadata = check_metadata({p.key: p.value for p in proto.metadata_props}, path)
        options = onnxruntime.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.batched = is_batched(self.metadata)

    def __call__(self, image: torch.Tensor, original_size: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.batched:
            return first_image(self.run_batch(*batch_of_one(image, original_size)))
        boxes, scores, labels = self.session.run(None, feeds(INPUT_NAMES, image, original_size))
        return boxes, scores, labels

    def run_batch(self, images: torch.Tensor, image_sizes: torch.Tensor, original_sizes: torch.Tensor) -> BatchOutputs:
        boxes, scores, labels, counts = self.session.run(
            None, feeds(BATCHED_INPUT_NAMES, images, image_sizes, original_sizes)
        )
        return boxes, scores, labels, counts


def feeds(names: Sequence[str], *tensors: torch.Tensor) -> dict[str, np.ndarray]:
    """The ONNX file's inputs by name (exporter.INPUT_NAMES or BATCHED_INPUT_NAMES), as numpy arrays."""
    return {name: tensor.numpy() for name, tensor in zip(names, tensors, strict=True)}


def require_openvino() -> None:
    """ExportError naming the `openvino` extra when openvino (or onnx, which reads the metadata) is missing."""
    import importlib.util

    missing = [name for name in ("openvino", "onnx") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"{', '.join(missing)} not installed: --backend openvino needs the openvino extra, "
            'pip install "detkit[openvino]"'
        )


class _SignalStack(ctypes.Structure):
    """Linux's stack_t (sigaltstack(2))."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextmanager
def keep_signal_stack() -> Iterator[None]:
    """Give the calling thread back its alternate signal stack after the block (Linux; elsewhere a no-op).

    Building an OpenVINO model installs an alternate signal stack on the calling thread, and freeing
    the model puts back the stack that was there before it, but only when the model's own stack is
    still the current one: with two models freed in the order they were built, the thread is left
    with the first model's freed stack. Python runs its signal handlers on that stack (SA_ONSTACK),
    so the next signal the thread takes (Ctrl-C, SIGTERM, a SIGCHLD with a handler) writes into freed
    memory and corrupts the heap; the crash comes later, anywhere. Measured with openvino 2026.4.1: two
    models built and freed, then SIGINT to the process: segfault every time; with this, none. Putting
    the caller's stack back right after building keeps OpenVINO's stack from ever being the current
    one, so freeing a model changes nothing."""
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    before = _SignalStack()
    if libc.sigaltstack(None, ctypes.byref(before)) != 0:
        yield
        return
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(before), None)


class _OpenVinoModel:
    """The exported ONNX file compiled by OpenVINO for the CPU (its ONNX reader; no conversion step).

    Float32 arithmetic is forced (INFERENCE_PRECISION_HINT f32): on CPUs with bf16 units OpenVINO
    would otherwise run in bf16 and the detections would move. An int8 res5 file (QDQ nodes from
    detkit.export.quantize) runs as OpenVINO's own int8 kernels. One stream, `num_threads` threads."""

    def __init__(self, path: Path, num_threads: int | None):
        require_openvino()
        import onnx
        import openvino

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf decode errors have no common base class
            raise CheckpointError(f"--model {path} is not an ONNX file: {one_line(exc)}") from None
        self.metadata = check_metadata({p.key: p.value for p in proto.metadata_props}, path)
        del proto  # OpenVINO reads the file itself; the weights need not stay in memory twice
        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if num_threads:
            config["INFERENCE_NUM_THREADS"] = num_threads
        with keep_signal_stack():  # OpenVINO would leave the thread a stack it frees later
            core = openvino.Core()
            try:
                self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
            except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
                raise CheckpointError(f"--model {path}: OpenVINO cannot compile it: {one_line(exc)}") from None
            self.request = self.compiled.create_infer_request()
        self.batched = is_batched(self.metadata)
        names = BATCHED_OUTPUT_NAMES if self.batched else OUTPUT_NAMES
        self.outputs = [self.compiled.output(name) for name in names]

    def __call__(self, image: torch.Tensor, original_size: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.batched:
            return first_image(self.run_batch(*batch_of_one(image, original_size)))
        out = self.request.infer(feeds(INPUT_NAMES, image, original_size))
        # The result arrays are views of the request's buffers, which the next call overwrites.
        boxes, scores, labels = (np.array(out[port], copy=True) for port in self.outputs)
        return boxes, scores, labels

    def run_batch(self, images: torch.Tensor, image_sizes: torch.Tensor, original_sizes: torch.Tensor) -> BatchOutputs:
        out = self.request.infer(feeds(BATCHED_INPUT_NAMES, images, image_sizes, original_sizes))
        boxes, scores, labels, counts = (np.array(out[port], copy=True) for port in self.outputs)
        return boxes, scores, labels, counts


class _ExportedProgramModel:
    """A torch.export.save file: the ExportedProgram's graph of aten ops, the eager kernels."""

    def __init__(self, path: Path):
        import torchvision  # noqa: F401  registers torchvision::nms and roi_align, which the program calls

        from detkit.export.exporter import METADATA_KEYS

        # torch.export.load fills in the values of the keys it finds in the file.
        files: dict[str, str] = dict.fromkeys(METADATA_KEYS, "")
        try:
            program = torch.export.load(str(path), extra_files=files)
        except Exception as exc:  # noqa: BLE001 - zip / serialization errors have no common base class
            raise CheckpointError(f"--model {path} is not a torch.export (.pt2) file: {one_line(exc)}") from None
        self.metadata = check_metadata({k: v for k, v in files.items() if v}, path)
        self.module = program.module()
        self.batched = is_batched(self.metadata)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, original_size: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.batched:
            return first_image(self.run_batch(*batch_of_one(image, original_size)))
        boxes, scores, labels = self.module(image, original_size)
        return boxes.numpy(), scores.numpy(), labels.numpy()

    @torch.no_grad()
    def run_batch(self, images: torch.Tensor, image_sizes: torch.Tensor, original_sizes: torch.Tensor) -> BatchOutputs:
        boxes, scores, labels, counts = self.module(images, image_sizes, original_sizes)
        return boxes.numpy(), scores.numpy(), labels.numpy(), counts.numpy()


class _AotiModel:
    """An AOTInductor package: the compiled shared library, run through torch's package loader."""

    def __init__(self, path: Path):
        import torchvision  # noqa: F401  the package calls torchvision's nms and roi_align through torch's dispatcher

        try:
            self.module = torch._inductor.aoti_load_package(str(path))
        except Exception as exc:  # noqa: BLE001 - loader errors are plain RuntimeErrors
            raise CheckpointError(
                f"--model {path} is not an AOTInductor package for this machine: {one_line(exc)}; "
                "compile it here with tools/export.py --format aoti, or export --format pt2 to run anywhere"
            ) from None
        self.metadata = check_metadata(self.module.get_metadata(), path)
        self.batched = False  # exporter.BATCHED_FORMATS: AOTInductor packages take one image

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, original_size: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        boxes, scores, labels = self.module(image, original_size)
        return boxes.numpy(), scores.numpy(), labels.numpy()


BatchOutputs = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # boxes, scores, labels, num_detections


def is_batched(metadata: dict[str, str]) -> bool:
    """Whether the file takes N images (exporter.BATCHED_INPUTS); files without the key take one."""
    return metadata.get("batched") == "true"


def pad_batch(
    images: Sequence[torch.Tensor], image_sizes: Sequence[Sequence[int]], original_sizes: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(3, h_i, w_i) uint8 images -> a batched file's inputs: (N, 3, H, W) uint8 zero-padded at the
    bottom and right, image_sizes (N, 2) and original_sizes (N, 2) int64. image_sizes[i] may be
    smaller than images[i] (an image of an already padded batch): the file crops to it."""
    height = max(int(image.shape[1]) for image in images)
    width = max(int(image.shape[2]) for image in images)
    batch = torch.zeros((len(images), 3, height, width), dtype=torch.uint8)
    for i, image in enumerate(images):
        batch[i, :, : image.shape[1], : image.shape[2]] = image
    return (
        batch,
        torch.as_tensor([[int(v) for v in size] for size in image_sizes], dtype=torch.int64).reshape(-1, 2),
        torch.as_tensor([[int(v) for v in size] for size in original_sizes], dtype=torch.int64).reshape(-1, 2),
    )


def batch_of_one(image: torch.Tensor, original_size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return image[None], torch.tensor([list(image.shape[1:])], dtype=torch.int64), original_size.reshape(1, 2)


def split_batch(outputs: BatchOutputs) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A batched file's outputs -> per image (boxes (D_i, 4), scores (D_i,), labels (D_i,))."""
    boxes, scores, labels, counts = outputs
    return [(boxes[i, :n], scores[i, :n], labels[i, :n]) for i, n in enumerate(np.asarray(counts).tolist())]


def first_image(outputs: BatchOutputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return split_batch(outputs)[0]


def load_exported(path: str | Path, backend: str | None = None, num_threads: int | None = None):
    """The runnable model and its metadata: backend 'onnxruntime' (.onnx), 'openvino' (the same .onnx
    file), 'pt2' or 'aoti' (.pt2; None: from the file). num_threads: ONNX Runtime's intra-op threads /
    OpenVINO's inference threads (pt2 and aoti follow torch.set_num_threads)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--model {path}: no such file")
    backend = backend or backend_for(path)
    if backend in RETIRED_BACKENDS:
        raise ConfigError(f"--model {path} (backend {backend}): {RETIRED_BACKENDS[backend]}")
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime":
        return _OnnxRuntimeModel(path, num_threads)
    if backend == "openvino":
        return _OpenVinoModel(path, num_threads)
    if backend == "aoti":
        return _AotiModel(path)
    return _ExportedProgramModel(path)


class ExportedPredictor:
    """An exported model with the interface of `detkit.engine.predictor.Predictor`.

    model: a file written by tools/export.py. backend: "onnxruntime" | "openvino" | "pt2" | "aoti"
    (None: from the file; .onnx files run on ONNX Runtime unless "openvino" is asked for).
    score_thresh: keep detections scoring at least this (None: the exported model's own threshold).
    batch_size: images per `predict` chunk (one call of a batched file; one call per image otherwise). num_threads: ONNX Runtime intra-op
    threads / OpenVINO inference threads (None: their default; pt2 and aoti follow
    torch.set_num_threads).
    """

    def __init__(
        self,
        model: str | Path,
        backend: str | None = None,
        score_thresh: float | None = None,
        batch_size: int = 8,
        num_threads: int | None = None,
    ):
        from detkit.config import config_from_dict

        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be at least 1")
        self.runner = load_exported(model, backend, num_threads)
        self.backend = backend or backend_for(model)
        meta = self.runner.metadata
        self.metadata = meta
        self.cfg = config_from_dict(json.loads(meta["config"]))
        self.class_names: list[str] = json.loads(meta["class_names"])
        self.category_ids: list[int] = json.loads(meta["category_ids"])
        exported_thresh = float(meta["score_thresh"])
        if score_thresh is not None and not exported_thresh <= score_thresh <= 1.0:
            raise ConfigError(
                f"score_thresh={score_thresh}: {model} was exported with score threshold {exported_thresh}; "
                f"use a value in [{exported_thresh}, 1] or export again with model.roi_heads.score_thresh={score_thresh}"
            )
        self.score_thresh = exported_thresh if score_thresh is None else float(score_thresh)
        self.batch_size = batch_size
        self.device = torch.device("cpu")
        self.amp_dtype = None
        self.iteration = int(meta.get("iteration", 0))
        self.batched = self.runner.batched
        self.preprocessor = Preprocessor(self.cfg)
        logger.info(
            "Loaded %s (%s, %d classes), score >= %.2f", model, self.backend, len(self.class_names), self.score_thresh
        )

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """RGB (H, W, 3) uint8 -> (3, h, w) uint8 resized for the model, in its channel order."""
        return self.preprocessor(image)

    def run(self, image: torch.Tensor, original_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The exported graph on one (3, h, w) uint8 tensor: boxes (D, 4), scores (D,), labels (D,)."""
        size = torch.as_tensor([int(original_size[0]), int(original_size[1])], dtype=torch.int64)
        return self.runner(image.to(torch.uint8).contiguous(), size)

    def predict_preprocessed(
        self, tensors: Sequence[torch.Tensor], original_sizes: Sequence[Sequence[int]]
    ) -> list[Detections]:
        """Detections of (3, h_i, w_i) tensors from `preprocess`; original_sizes (N, 2) (h, w)."""
        if self.batched:
            results: list[Detections] = []
            for start in range(0, len(tensors), self.batch_size):
                chunk = [tensor.to(torch.uint8) for tensor in tensors[start : start + self.batch_size]]
                inputs = pad_batch(
                    chunk, [tensor.shape[1:] for tensor in chunk], original_sizes[start : start + len(chunk)]
                )
                results += [
                    detections_from_arrays(*arrays, self.score_thresh, self.class_names)
                    for arrays in split_batch(self.runner.run_batch(*inputs))
                ]
            return results
        return [
            detections_from_arrays(*self.run(tensor, size), self.score_thresh, self.class_names)
            for tensor, size in zip(tensors, original_sizes)
        ]

    def predict(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detections of each RGB (H, W, 3) uint8 image."""
        return self.predict_preprocessed(
            [self.preprocess(image) for image in images], [image.shape[:2] for image in images]
        )

    def __call__(self, image: np.ndarray) -> Detections:
        return self.predict([image])[0]

    def as_module(self) -> nn.Module:
        """An nn.Module with the eager model's test-time call: ImageBatch -> per image
        {"boxes", "scores", "labels"} tensors (what detkit.engine.evaluator.inference_on_dataset runs)."""
        return _ExportedBatchModule(self)


class _ExportedBatchModule(nn.Module):
    def __init__(self, predictor: ExportedPredictor):
        super().__init__()
        self.predictor = predictor

    def forward(self, images: ImageBatch) -> list[dict[str, torch.Tensor]]:
        outputs = []
        sizes, originals = images.image_sizes.tolist(), images.original_sizes.tolist()
        if self.predictor.batched:  # the padded batch as it is: the file crops each image to its size
            per_image = split_batch(
                self.predictor.runner.run_batch(
                    images.tensor.to(torch.uint8).contiguous(),
                    images.image_sizes.to(torch.int64),
                    images.original_sizes.to(torch.int64),
                )
            )
        else:  # crop the batch padding, one call per image
            per_image = [
                self.predictor.run(tensor[:, :h, :w], original)
                for tensor, (h, w), original in zip(images.tensor, sizes, originals)
            ]
        for boxes, scores, labels in per_image:
            outputs.append(
                {
                    "boxes": torch.from_numpy(boxes),
                    "scores": torch.from_numpy(scores),
                    "labels": torch.from_numpy(labels.astype(np.int64)),
                }
            )
        return outputs
