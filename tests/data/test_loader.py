"""Samplers (determinism, resume, grouping, distributed shards), collate, bad images, both loaders."""

import logging
from itertools import islice

import numpy as np
import pytest
import torch
from data_helpers import coco_config, images_table, write_coco

from detkit.config import DatasetConfig, replace
from detkit.data.loader import (
    BadImage,
    BatchCollator,
    InferenceBatchSampler,
    TrainingBatchSampler,
    augmentation_seed,
    build_test_loader,
    build_train_loader,
    pad_images,
)
from detkit.errors import DataError, ImageReadError
from detkit.structures.image_batch import ImageBatch

# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


def take(sampler, n):
    return list(islice(iter(sampler), n))


def test_training_sampler_is_deterministic_and_each_epoch_is_a_permutation():
    a = TrainingBatchSampler(num_images=10, batch_size=2, seed=3)
    b = TrainingBatchSampler(num_images=10, batch_size=2, seed=3)
    assert take(a, 20) == take(b, 20)
    indices = [k.index for batch in take(a, 15) for k in batch]  # 30 samples = 3 epochs
    for epoch in range(3):
        assert sorted(indices[10 * epoch : 10 * epoch + 10]) == list(range(10))
    assert indices[:10] != indices[10:20]  # a new order each epoch
    assert take(TrainingBatchSampler(num_images=10, batch_size=2, seed=4), 5) != take(a, 5)


def test_start_iter_skips_exactly_k_batches():
    groups = np.array([0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 0])
    fresh = take(TrainingBatchSampler(num_images=11, batch_size=3, seed=1, group_ids=groups), 30)
    resumed = take(TrainingBatchSampler(num_images=11, batch_size=3, seed=1, group_ids=groups, start_iter=17), 13)
    assert resumed == fresh[17:]


def test_augmentation_seed_depends_on_run_seed_and_position():
    batch = take(TrainingBatchSampler(num_images=10, batch_size=4, seed=5), 1)[0]
    assert [k.aug_seed for k in batch] == [augmentation_seed(5, k.position) for k in batch]
    seeds = {augmentation_seed(5, p) for p in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**32 for s in seeds)
    assert augmentation_seed(6, 0) != augmentation_seed(5, 0)


def test_grouping_never_mixes_orientations():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 2, size=37)
    for world_size in (1, 2):
        for rank in range(world_size):
            sampler = TrainingBatchSampler(
                num_images=37, batch_size=4, seed=0, rank=rank, world_size=world_size, group_ids=groups
            )
            for batch in take(sampler, 60):
                assert len(batch) == 4
                assert len({int(groups[k.index]) for k in batch}) == 1


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_distributed_training_shards_are_disjoint_and_cover_the_data(world_size):
    n = 10  # not a multiple of 3 or 4
    streams = [
        list(
            islice(
                TrainingBatchSampler(num_images=n, batch_size=1, seed=2, rank=r, world_size=world_size).rank_stream(),
                3 * n,
            )
        )
        for r in range(world_size)
    ]
    first_epoch = [[(p, i) for p, i in s if p < n] for s in streams]
    positions = [p for shard in first_epoch for p, _ in shard]
    assert sorted(positions) == list(range(n))  # disjoint and complete
    assert sorted(i for shard in first_epoch for _, i in shard) == list(range(n))  # every image once
    assert [len(shard) for shard in first_epoch] in ([5, 5], [4, 3, 3], [3, 3, 2, 2])
    # with grouping too: no sample position is handed to two ranks
    groups = np.arange(n) % 2
    seen = []
    for r in range(world_size):
        sampler = TrainingBatchSampler(
            num_images=n, batch_size=2, seed=2, rank=r, world_size=world_size, group_ids=groups
        )
        seen += [k.position for batch in take(sampler, 20) for k in batch]
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_inference_sampler_visits_each_image_once_across_ranks(world_size):
    groups = np.array([0, 1, 1, 0, 0, 1, 0, 0, 1, 0])
    visited = []
    for rank in range(world_size):
        sampler = InferenceBatchSampler(num_images=10, batch_size=3, rank=rank, world_size=world_size, group_ids=groups)
        for batch in sampler:
            assert 1 <= len(batch) <= 3 and len({int(groups[i]) for i in batch}) == 1
            visited += batch
    assert sorted(visited) == list(range(10))


# --------------------------------------------------------------------------------------------
# Collate
# --------------------------------------------------------------------------------------------


def sample(h, w, meta_hw, boxes=((0, 0, 1, 1),)):
    return {
        "image": torch.full((3, h, w), 7, dtype=torch.uint8),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.zeros(len(boxes), dtype=torch.int64),
        "meta": {"image_id": h, "file_name": "x", "height": meta_hw[0], "width": meta_hw[1]},
    }


def test_collate_pads_to_size_divisibility_and_keeps_sizes():
    images, targets, metas, bad = BatchCollator(32)([sample(30, 50, (15, 25)), sample(40, 20, (80, 40), boxes=())])
    assert images.tensor.shape == (2, 3, 64, 64) and images.tensor.dtype == torch.uint8
    assert images.image_sizes.tolist() == [[30, 50], [40, 20]]
    assert images.original_sizes.tolist() == [[15, 25], [80, 40]]
    assert images.tensor[0, :, 30:].sum() == 0 and images.tensor[0, :, :30, :50].float().mean() == 7
    assert targets[1]["boxes"].shape == (0, 4) and [m["image_id"] for m in metas] == [30, 40] and bad == []
    no_div, _, _, _ = BatchCollator(0)([sample(30, 50, (30, 50))])
    assert no_div.tensor.shape == (1, 3, 30, 50)


def test_numpy_padding_equals_image_batch_from_tensors():
    gen = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in [(30, 50), (41, 20), (64, 64)]
    ]
    sizes = [(15, 25), (82, 40), (64, 64)]
    for div in (0, 32):
        ours = pad_images(images, sizes, div)
        ref = ImageBatch.from_tensors(images, size_divisibility=div, original_sizes=sizes)
        assert torch.equal(ours.tensor, ref.tensor) and ours.tensor.is_contiguous()
        assert torch.equal(ours.image_sizes, ref.image_sizes) and torch.equal(ours.original_sizes, ref.original_sizes)


def test_collate_drops_bad_images():
    marker = BadImage("/data/broken.jpg", "the file is empty (0 bytes)", 3)
    images, targets, _metas, bad = BatchCollator(32)([marker, sample(30, 50, (30, 50))])
    assert len(images) == 1 and len(targets) == 1 and bad == [marker]
    assert BatchCollator(32)([marker])[0] is None


# --------------------------------------------------------------------------------------------
# Loaders on tiny COCO files
# --------------------------------------------------------------------------------------------


def test_train_loader_batches_are_right(tiny_coco):
    cfg = coco_config(*tiny_coco, num_classes=2, **{"data.flip_prob": 0.0})
    loader = build_train_loader(cfg)
    assert len(loader.dataset) == 5  # image 6 has no boxes: left out of training
    for images, targets, metas in islice(loader, 6):
        assert len(images) == 2 and images.tensor.shape[2] % 32 == 0 and images.tensor.shape[3] % 32 == 0
        orientations = {m["height"] > m["width"] for m in metas}
        assert len(orientations) == 1  # grouped by aspect ratio
        for i, (target, meta) in enumerate(zip(targets, metas)):
            h, w = images.image_sizes[i].tolist()
            assert min(h, w) == 64 and (meta["height"], meta["width"]) == tuple(images.original_sizes[i].tolist())
            assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
            assert (target["boxes"][:, 2:] <= torch.tensor([w, h]) + 1e-3).all()
            if meta["image_id"] == 4:  # bbox [0, 0, 64, 48] covers the whole 48x64 image, resized to 64x85
                assert (h, w) == (64, 85)  # 64 * 64 / 48 = 85.33 -> 85: boxes scale by 85 / 64, not by 64 / 48
                torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0.0, 85.0, 64.0]]), atol=1e-3, rtol=0)
                assert target["labels"].tolist() == [1]  # category id 9 -> label 1


def test_filter_empty_is_configurable_and_test_keeps_empty_images(tiny_coco):
    cfg = coco_config(*tiny_coco, num_classes=2, **{"data.filter_empty": False})
    assert len(build_train_loader(cfg).dataset) == 6
    test_ids = [m["image_id"] for _, _, metas in build_test_loader(cfg) for m in metas]
    assert sorted(test_ids) == [1, 2, 3, 4, 5, 6]


def test_train_batches_do_not_depend_on_num_workers_and_resume_exactly(tiny_coco):
    cfg = coco_config(
        *tiny_coco,
        num_classes=2,
        **{"data.min_size_train": (48, 64, 80), "data.augment": ({"name": "ColorJitter", "p": 0.5},)},
    )

    def batches(c, start_iter=0, n=6):
        return list(islice(build_train_loader(c, start_iter=start_iter), n))

    def same(x, y):
        return torch.equal(x[0].tensor, y[0].tensor) and all(
            torch.equal(a["boxes"], b["boxes"]) for a, b in zip(x[1], y[1])
        )

    base = batches(cfg)
    assert all(same(x, y) for x, y in zip(base, batches(replace(cfg, **{"data.num_workers": 2}))))
    assert all(same(x, y) for x, y in zip(base[4:], batches(cfg, start_iter=4, n=2)))


def test_test_loader_shards_visit_each_image_once(tiny_coco):
    cfg = coco_config(*tiny_coco, num_classes=2)
    ids = []
    for rank in range(2):
        loader = build_test_loader(cfg, rank=rank, world_size=2)
        for images, _, metas in loader:
            assert images.image_sizes.min(dim=1).values.eq(64).all()
            ids += [m["image_id"] for m in metas]
    assert sorted(ids) == [1, 2, 3, 4, 5, 6]


def bad_image_dataset(tmp_path, num_good, num_bad):
    images = images_table([(32, 48)] * (num_good + num_bad))
    anns = [{"image_id": img["id"], "category_id": 1, "bbox": [2, 2, 10, 10]} for img in images]
    ann_file, image_root = write_coco(tmp_path, images, anns, [{"id": 1, "name": "thing"}])
    bad_files = [f"{image_root}/{img['file_name']}" for img in images[num_good:]]
    for path in bad_files:
        open(path, "wb").close()  # zero bytes
    return ann_file, image_root, bad_files


def test_unreadable_training_image_is_skipped_with_a_warning_and_counted(tmp_path, caplog):
    ann_file, image_root, bad_files = bad_image_dataset(tmp_path, num_good=9, num_bad=1)
    cfg = coco_config(ann_file, image_root, num_classes=1, **{"data.max_bad_image_fraction": 0.5})
    loader = build_train_loader(cfg)
    with caplog.at_level(logging.WARNING, logger="detkit.data.loader"):
        batches = list(islice(loader, 10))  # 20 samples: two epochs
    sizes = [len(images) for images, _, _ in batches]
    assert min(sizes) >= 1 and sizes.count(1) == loader.num_bad == 2  # the bad image once per epoch
    assert loader.num_seen == 20
    assert all(m["file_name"] != bad_files[0] for _, _, metas in batches for m in metas)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and bad_files[0] in warnings[0] and "0 bytes" in warnings[0]


def test_too_many_unreadable_training_images_fail_the_run(tmp_path):
    ann_file, image_root, bad_files = bad_image_dataset(tmp_path, num_good=8, num_bad=2)
    cfg = coco_config(ann_file, image_root, num_classes=1)  # default max_bad_image_fraction 0.01
    with pytest.raises(DataError) as info:
        list(islice(build_train_loader(cfg), 20))
    msg = str(info.value)
    assert "max_bad_image_fraction=0.01" in msg and any(f in msg for f in bad_files)
    assert "could not be read (20.0%" in msg  # judged after all 10 images (min(1 / 0.01, 10)) were read


def test_all_unreadable_training_images_fail_at_once(tmp_path):
    ann_file, image_root, _bad_files = bad_image_dataset(tmp_path, num_good=0, num_bad=12)
    cfg = coco_config(ann_file, image_root, num_classes=1, **{"data.max_bad_image_fraction": 1.0})
    with pytest.raises(DataError, match="8 of the 8 training images"):
        next(iter(build_train_loader(cfg)))


def test_unreadable_test_image_raises_image_read_error_naming_it(tmp_path):
    ann_file, image_root, bad_files = bad_image_dataset(tmp_path, num_good=3, num_bad=1)
    cfg = coco_config(ann_file, image_root, num_classes=1)
    with pytest.raises(ImageReadError) as info:
        list(build_test_loader(cfg))
    assert bad_files[0] in str(info.value)


def test_image_whose_size_disagrees_with_the_annotation_is_bad(tmp_path):
    images = images_table([(32, 48), (32, 48)])
    ann_file, image_root = write_coco(tmp_path, images, [], [{"id": 1, "name": "thing"}])
    images[1]["height"], images[1]["width"] = 48, 32  # swapped, as with an un-applied EXIF rotation
    ann_file, image_root = write_coco(tmp_path, images, [], [{"id": 1, "name": "thing"}], write_images=False)
    with pytest.raises(ImageReadError, match=r"decodes to 32x48.*says 48x32"):
        list(build_test_loader(coco_config(ann_file, image_root, num_classes=1)))


def test_shapes_dataset_entry_loads_end_to_end(tmp_path):
    shapes = DatasetConfig(
        type="shapes",
        root=str(tmp_path),
        split="train",
        num_images=6,
        image_size=(64, 80),
        max_objects=3,
        min_object_size=10,
        max_object_size=30,
    )
    cfg = coco_config(
        "unused", "unused", num_classes=6, **{"data.train": (shapes,), "data.test": (replace(shapes, split="val"),)}
    )
    images, targets, _metas = next(iter(build_train_loader(cfg)))
    for target, (h, w) in zip(targets, images.image_sizes.tolist()):
        assert len(target["boxes"]) >= 1 and target["labels"].max() < 6
        assert (target["boxes"][:, [0, 2]] <= w + 1e-3).all() and (target["boxes"][:, [1, 3]] <= h + 1e-3).all()
    assert sum(len(m) for _, _, m in build_test_loader(cfg)) == 6
