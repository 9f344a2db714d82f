"""Batched loading: samplers, the dataset, the collate function and the two loaders.

    for images, targets, metas in build_train_loader(cfg, rank, world_size, start_iter):  # infinite
        losses = model(images, targets)
    for images, targets, metas in build_test_loader(cfg):                              # each image once
        detections = model(images)

Shapes: B images in a batch (cfg.solver.ims_per_batch // world_size in training), G_i boxes of
image i, Hp x Wp the padded batch size (a multiple of data.size_divisibility).

A batch is (images: ImageBatch, targets: list of B {"boxes": (G_i, 4) float32 xyxy in the resized
frame, "labels": (G_i,) int64}, metas: list of B {"image_id", "file_name", "height", "width" (the
original size), "image_size" (h, w after resize), "index" (position in the split's records)}).

Determinism. The training batch sampler runs in the main process and decides everything random:
which images (an epoch-wise permutation drawn from (seed, epoch)), the batching (aspect-ratio
groups from the annotation sizes) and a per-sample augmentation seed derived from (seed, the
sample's position in the global stream). Workers only execute. So batches do not depend on
num_workers, and `start_iter=k` replays the sampler for k batches (integers only, no image
is read) and yields exactly what a fresh run yields from batch k on.

Distributed. All ranks draw the same global stream; rank r takes the positions p with
p % world_size == r, so shards are disjoint and together cover every epoch. The inference sampler
splits the images into world_size contiguous shards whose sizes differ by at most one.

Unreadable images. In training the dataset returns a `BadImage` marker instead of raising; the
collate drops it, so such a batch is smaller (it is not refilled, which would shift every later
batch); a batch whose images are all bad is skipped entirely (the loader moves on to the next one;
this is the one case where a resumed run can differ from an uninterrupted one, by that skipped
batch). The loader counts images read and bad ones and raises DataError when the bad fraction
exceeds data.max_bad_image_fraction (judged after min(1 / fraction, dataset size) images, or at
once when none of the first 8 images could be read). At test time an unreadable image is an
ImageReadError naming the file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal, NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from detkit.config import Config, DatasetConfig
from detkit.data.coco import DetectionRecords
from detkit.data.datasets import load_split
from detkit.data.image_io import read_image
from detkit.data.transforms import DetectionTransform, build_test_transform, build_train_transform
from detkit.errors import ConfigError, DataError, ImageReadError
from detkit.structures.image_batch import ImageBatch

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1

# With every one of the first this many images unreadable, training stops at once.
ALL_BAD_LIMIT = 8


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


class SampleKey(NamedTuple):
    """What the training sampler hands the dataset for one sample."""

    index: int  # type: ignore[assignment]  # into the split's records (typeshed: the name of tuple.index)
    position: int  # in the global sample stream shared by all ranks (0, 1, 2, ...)
    aug_seed: int  # seeds this sample's augmentation draws


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def augmentation_seed(seed: int, position: int) -> int:
    """A 32-bit seed for the sample at `position` of the stream of a run seeded with `seed`."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ position) & 0xFFFFFFFF


def aspect_ratio_groups(records: DetectionRecords) -> np.ndarray:
    """(N,) int64 group of each image: 0 landscape or square (w >= h), 1 portrait (w < h)."""
    return (records.widths < records.heights).astype(np.int64)


class TrainingBatchSampler:
    """Infinite, seeded batches of SampleKeys for one rank; see the module docstring.

    num_images: N images of the split; batch_size: images per batch on this rank; group_ids: (N,)
    aspect-ratio group per image (None: no grouping; batches take consecutive samples).
    """

    def __init__(
        self,
        *,
        num_images: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_iter: int = 0,
        group_ids: np.ndarray | None = None,
    ):
        if num_images < 1:
            raise ValueError("TrainingBatchSampler needs at least one image")
        if batch_size < 1 or not 0 <= rank < world_size or start_iter < 0:
            raise ValueError(
                f"bad sampler arguments: batch_size={batch_size}, rank={rank}, world_size={world_size}, start_iter={start_iter}"
            )
        if group_ids is not None and len(group_ids) != num_images:
            raise ValueError(f"group_ids has {len(group_ids)} entries for {num_images} images")
        self.num_images = num_images
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.start_iter = start_iter
        self.group_ids = None if group_ids is None else np.asarray(group_ids, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        """(N,) image order of an epoch, the same on every rank."""
        return np.random.default_rng((self.seed & _MASK64, epoch)).permutation(self.num_images)

    def rank_stream(self) -> Iterator[tuple[int, int]]:
        """(position, image index) of this rank's samples, in order, forever."""
        n, w, r = self.num_images, self.world_size, self.rank
        epoch = 0
        while True:
            perm = self.permutation(epoch).tolist()
            base = epoch * n
            for j in range((r - base) % w, n, w):
                yield base + j, perm[j]
            epoch += 1

    def _batches(self) -> Iterator[list[SampleKey]]:
        def key(position: int, index: int) -> SampleKey:
            return SampleKey(index, position, augmentation_seed(self.seed, position))

        if self.group_ids is None:
            batch: list[SampleKey] = []
            for position, index in self.rank_stream():
                batch.append(key(position, index))
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            return  # not reached: the stream is infinite
        # Each sample waits in its group's bucket until the bucket holds a full batch (Detectron2's
        # AspectRatioGroupedDataset, moved into the sampler so that it is deterministic).
        buckets: dict[int, list[SampleKey]] = {}
        for position, index in self.rank_stream():
            bucket = buckets.setdefault(int(self.group_ids[index]), [])
            bucket.append(key(position, index))
            if len(bucket) == self.batch_size:
                yield list(bucket)
                bucket.clear()

    def __iter__(self) -> Iterator[list[SampleKey]]:
        batches = self._batches()
        for _ in range(self.start_iter):  # integers only: cheap even for 100k iterations
            next(batches)
        yield from batches


class InferenceBatchSampler:
    """Each image of rank's contiguous shard once, in batches of at most batch_size.

    With group_ids the shard's landscape images are batched first, then its portrait ones, so a
    batch is never padded to a square of its longest sides.
    """

    def __init__(
        self,
        *,
        num_images: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        group_ids: np.ndarray | None = None,
    ):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler arguments: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        per_rank, extra = divmod(num_images, world_size)
        begin = rank * per_rank + min(rank, extra)
        end = begin + per_rank + (1 if rank < extra else 0)
        self.indices = np.arange(begin, end)
        if group_ids is not None and len(self.indices):
            self.indices = self.indices[np.argsort(np.asarray(group_ids)[self.indices], kind="stable")]
            groups = np.asarray(group_ids)[self.indices]
        else:
            groups = np.zeros(len(self.indices), np.int64)
        self.batches: list[list[int]] = []
        for g in np.unique(groups):
            members = self.indices[groups == g].tolist()
            self.batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# --------------------------------------------------------------------------------------------
# Dataset and collate
# --------------------------------------------------------------------------------------------


class BadImage(NamedTuple):
    """Stands in for a sample whose image could not be read."""

    file_name: str
    reason: str
    index: int  # type: ignore[assignment]  # typeshed: the name of tuple.index


class DetectionDataset(Dataset):
    """Records + a transform -> samples.

    Indexed by a plain int (no random draws: the transform must be deterministic) or a SampleKey
    (training: the augmentation is seeded with key.aug_seed). A sample is a dict {"image": (3, H, W)
    uint8 tensor after the transform, "boxes": (G, 4) float32, "labels": (G,) int64, "meta": {...}};
    an unreadable image gives a BadImage instead.
    """

    def __init__(
        self, records: DetectionRecords, transform: DetectionTransform, *, input_format: Literal["RGB", "BGR"] = "RGB"
    ):
        self.records = records
        self.transform = transform
        self.input_format = input_format

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | SampleKey) -> dict | BadImage:
        index, seed = (key.index, key.aug_seed) if isinstance(key, SampleKey) else (int(key), None)
        record = self.records[index]
        try:
            image = read_image(record.file_name, self.input_format)
        except ImageReadError as exc:
            return BadImage(record.file_name, exc.reason, index)
        if image.shape[:2] != (record.height, record.width):
            reason = (
                f"it decodes to {image.shape[0]}x{image.shape[1]} (h x w, after EXIF orientation) but the annotation file "
                f"says {record.height}x{record.width}; the boxes would be in the wrong frame"
            )
            return BadImage(record.file_name, reason, index)
        out = self.transform(image, record.boxes, record.labels, seed=seed)
        return {
            "image": torch.from_numpy(np.stack(cv2.split(out.image))),  # (H, W, 3) -> (3, H, W); faster than transpose
            "boxes": torch.from_numpy(out.boxes),
            "labels": torch.from_numpy(out.labels),
            "meta": {
                "image_id": record.image_id,
                "file_name": record.file_name,
                "height": record.height,
                "width": record.width,
                "image_size": (int(out.image.shape[0]), int(out.image.shape[1])),
                "index": index,
            },
        }


def pad_images(
    images: Sequence[torch.Tensor], original_sizes: Sequence[tuple[int, int]], size_divisibility: int
) -> ImageBatch:
    """(3, H_i, W_i) uint8 CPU tensors -> ImageBatch (N, 3, Hp, Wp) zero padded at the bottom/right.

    The same result as ImageBatch.from_tensors, padded with numpy: torch's copy kernels start
    intra-op threads for every image, which costs ~10x more than the copy on a busy CPU.
    """
    heights = [int(img.shape[1]) for img in images]
    widths = [int(img.shape[2]) for img in images]
    max_h, max_w = max(heights), max(widths)
    if size_divisibility > 1:
        max_h = -(-max_h // size_divisibility) * size_divisibility
        max_w = -(-max_w // size_divisibility) * size_divisibility
    shape = (len(images), 3, max_h, max_w)
    if torch.utils.data.get_worker_info() is not None:
        # In a worker, allocate in shared memory as torch's default_collate does, so that sending
        # the batch to the main process does not copy it once more.
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        tensor = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
        batch = tensor.numpy()
        batch.fill(0)
    else:
        batch = np.zeros(shape, dtype=np.uint8)  # calloc: untouched padding costs nothing
        tensor = torch.from_numpy(batch)
    for i, img in enumerate(images):
        batch[i, :, : heights[i], : widths[i]] = img.numpy()
    return ImageBatch(
        tensor,
        torch.tensor(list(zip(heights, widths)), dtype=torch.int64).reshape(-1, 2),
        torch.tensor(original_sizes, dtype=torch.int64).reshape(-1, 2),
    )


class BatchCollator:
    """samples -> (ImageBatch or None when all were bad, targets, metas, bad: list[BadImage])."""

    def __init__(self, size_divisibility: int = 32):
        self.size_divisibility = size_divisibility

    def __call__(
        self, samples: Sequence[dict | BadImage]
    ) -> tuple[ImageBatch | None, list[dict], list[dict], list[BadImage]]:
        bad = [s for s in samples if isinstance(s, BadImage)]
        good = [s for s in samples if not isinstance(s, BadImage)]
        if not good:
            return None, [], [], bad
        images = pad_images(
            [s["image"] for s in good],
            [(s["meta"]["height"], s["meta"]["width"]) for s in good],
            self.size_divisibility,
        )
        targets = [{"boxes": s["boxes"], "labels": s["labels"]} for s in good]
        return images, targets, [s["meta"] for s in good], bad


def _make_dataloader(dataset: Dataset, batch_sampler: Any, cfg: Config) -> DataLoader:
    workers = cfg.data.num_workers
    if workers > 0:
        # OpenCV's thread pool does not survive fork(): a worker forked while the pool exists can
        # hang forever in its first cv2 call (seen here with cv2.setNumThreads in worker_init).
        # Sequential OpenCV in this process and so in the workers; the workers are the parallelism.
        cv2.setNumThreads(0)
    pin = cfg.data.pin_memory and cfg.device != "cpu" and torch.cuda.is_available()
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=BatchCollator(cfg.data.size_divisibility),
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=cfg.data.persistent_workers and workers > 0,
    )


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


class TrainLoader:
    """Infinite iterable of training batches (images, targets, metas); counts unreadable images.

    Every `iter()` starts again at `start_iter`. num_seen / num_bad: images read so far / unreadable.
    """

    def __init__(self, dataset: DetectionDataset, batch_sampler: TrainingBatchSampler, cfg: Config):
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.max_bad_fraction = cfg.data.max_bad_image_fraction
        self.dataloader = _make_dataloader(dataset, batch_sampler, cfg)
        self.num_seen = 0
        self.num_bad = 0

    @property
    def batch_size(self) -> int:
        return self.batch_sampler.batch_size

    def __iter__(self) -> Iterator[tuple[ImageBatch, list[dict], list[dict]]]:
        for images, targets, metas, bad in self.dataloader:
            self._count(len(metas), bad)
            if images is None:
                continue
            yield images, targets, metas

    def _count(self, num_good: int, bad: Sequence[BadImage]) -> None:
        self.num_seen += num_good + len(bad)
        if not bad:
            return
        self.num_bad += len(bad)
        for item in bad:
            logger.warning(
                "skipping unreadable training image %s: %s (%d of %d images read so far were bad)",
                item.file_name,
                item.reason,
                self.num_bad,
                self.num_seen,
            )
        n = len(self.dataset)
        fraction = self.num_bad / self.num_seen
        min_seen = min(n, math.ceil(1.0 / self.max_bad_fraction)) if self.max_bad_fraction > 0 else 1
        too_many = self.num_seen >= min_seen and fraction > self.max_bad_fraction
        all_bad = self.num_bad == self.num_seen >= min(n, ALL_BAD_LIMIT)
        if too_many or all_bad:
            last = bad[-1]
            raise DataError(
                f"{self.num_bad} of the {self.num_seen} training images read so far could not be read ({fraction:.1%}, more than "
                f"data.max_bad_image_fraction={self.max_bad_fraction:g}); the latest: {last.file_name}: {last.reason}. "
                f"Fix or remove the bad files (or raise data.max_bad_image_fraction)."
            )


class TestLoader:
    """Finite iterable of (images, targets, metas) over this rank's shard of a test dataset."""

    __test__ = False  # not a pytest class

    def __init__(self, dataset: DetectionDataset, batch_sampler: InferenceBatchSampler, cfg: Config):
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.dataloader = _make_dataloader(dataset, batch_sampler, cfg)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[ImageBatch, list[dict], list[dict]]]:
        for images, targets, metas, bad in self.dataloader:
            if bad:
                # raised here rather than in the worker: a worker's exception reaches the main
                # process re-created from its message, which ImageReadError's signature does not allow
                raise ImageReadError(bad[0].file_name, bad[0].reason)
            yield images, targets, metas


def build_train_loader(cfg: Config, rank: int = 0, world_size: int = 1, start_iter: int = 0) -> TrainLoader:
    """The infinite, deterministic training loader of this rank; see the module docstring."""
    if cfg.solver.ims_per_batch % world_size:
        raise ConfigError(
            f"solver.ims_per_batch={cfg.solver.ims_per_batch} must be divisible by the number of processes ({world_size})"
        )
    _, records = load_split(cfg, "train")
    if cfg.data.filter_empty:
        has_boxes = records.box_counts > 0
        if not has_boxes.any():
            raise DataError(
                "no training image has a usable box (all are empty, crowd-only or degenerate); nothing to train on"
            )
        if not has_boxes.all():
            logger.info(
                "training on %d images; %d without usable boxes left out (data.filter_empty)",
                int(has_boxes.sum()),
                int((~has_boxes).sum()),
            )
            records = records.subset(np.flatnonzero(has_boxes))
    dataset = DetectionDataset(records, build_train_transform(cfg), input_format=cfg.model.input_format)
    sampler = TrainingBatchSampler(
        num_images=len(records),
        batch_size=cfg.solver.ims_per_batch // world_size,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        start_iter=start_iter,
        group_ids=aspect_ratio_groups(records) if cfg.data.aspect_ratio_grouping else None,
    )
    return TrainLoader(dataset, sampler, cfg)


def build_test_loader(
    cfg: Config, dataset: DatasetConfig | None = None, rank: int = 0, world_size: int = 1
) -> TestLoader:
    """Every image of the (first) test dataset, or of `dataset`, exactly once across ranks."""
    _, records = load_split(cfg, "test", dataset)
    data = DetectionDataset(records, build_test_transform(cfg), input_format=cfg.model.input_format)
    sampler = InferenceBatchSampler(
        num_images=len(records),
        batch_size=cfg.test.ims_per_batch,
        rank=rank,
        world_size=world_size,
        group_ids=aspect_ratio_groups(records),
    )
    return TestLoader(data, sampler, cfg)
