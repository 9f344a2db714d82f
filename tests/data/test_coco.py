"""COCO json loading: category mapping, crowd and degenerate boxes, and each bad-annotation case."""

import contextlib
import io
import logging

import numpy as np
import pytest
from data_helpers import coco_config, images_table, write_coco
from pycocotools.coco import COCO

from detkit.config import DatasetConfig, replace
from detkit.data.coco import DetectionRecords, load_coco_json
from detkit.data.datasets import get_dataset_info, load_split
from detkit.errors import DataError

CATS = [{"id": 12, "name": "twelve"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]


def test_non_contiguous_category_ids_map_to_sorted_contiguous_labels(tmp_path):
    images = images_table([(30, 40), (30, 40)])
    anns = [
        {"image_id": 1, "category_id": 12, "bbox": [1, 2, 10, 5]},
        {"image_id": 1, "category_id": 3, "bbox": [0, 0, 4, 4]},
        {"image_id": 2, "category_id": 7, "bbox": [5, 5, 20, 10]},
        {"image_id": 2, "category_id": 12, "bbox": [10, 0, 5, 30]},
    ]
    ann_file, image_root = write_coco(tmp_path, images, anns, CATS)
    ds = load_coco_json(ann_file, image_root)
    assert ds.category_ids == (3, 7, 12)
    assert ds.class_names == ("three", "seven", "twelve")
    r1, r2 = ds.records[0], ds.records[1]
    np.testing.assert_array_equal(r1.labels, [2, 0])  # ids 12, 3 in file order
    np.testing.assert_array_equal(r2.labels, [1, 2])
    np.testing.assert_allclose(r1.boxes, [[1, 2, 11, 7], [0, 0, 4, 4]])  # xywh -> xyxy

    # the same boxes and original ids as pycocotools' own index of the file
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(ann_file)
    for rec in (r1, r2):
        ref = coco.loadAnns(coco.getAnnIds(imgIds=[rec.image_id], iscrowd=False))
        ref_xyxy = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in ref]
        np.testing.assert_allclose(rec.boxes, ref_xyxy)
        assert [ds.category_ids[label] for label in rec.labels] == [a["category_id"] for a in ref]


def test_crowd_annotations_are_kept_out_of_the_targets(tmp_path):
    images = images_table([(30, 40)])
    anns = [
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, 10, 10], "iscrowd": 1},
        {"image_id": 1, "category_id": 7, "bbox": [2, 2, 5, 5]},
    ]
    ds = load_coco_json(*write_coco(tmp_path, images, anns, CATS))
    rec = ds.records[0]
    np.testing.assert_allclose(rec.boxes, [[2, 2, 7, 7]])
    np.testing.assert_array_equal(rec.labels, [1])
    assert ds.report.num_crowd == 1 and ds.report.num_boxes == 1


def test_degenerate_boxes_are_dropped_and_reported_once(tmp_path, caplog):
    images = images_table([(30, 40)])
    anns = [
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, 0, 10]},  # w = 0
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, 10, -2]},  # h < 0
        {"image_id": 1, "category_id": 3, "bbox": [1, float("nan"), 10, 10]},
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, float("inf"), 10]},
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, 10]},  # not 4 numbers
        {"image_id": 1, "category_id": 7, "bbox": [3, 4, 5, 6]},  # the only good one
    ]
    with caplog.at_level(logging.WARNING, logger="detkit.data.coco"):
        ds = load_coco_json(*write_coco(tmp_path, images, anns, CATS))
    rec = ds.records[0]
    np.testing.assert_allclose(rec.boxes, [[3, 4, 8, 10]])
    assert ds.report.num_degenerate == 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "5 boxes with w or h <= 0 or non-finite values dropped" in warnings[0].getMessage()


def test_boxes_outside_the_image_are_clipped_or_dropped(tmp_path):
    images = images_table([(30, 40)])  # h 30, w 40
    anns = [
        {"image_id": 1, "category_id": 3, "bbox": [-5, 10, 20, 25]},  # -> [0, 10, 15, 30]
        {"image_id": 1, "category_id": 3, "bbox": [35, -3, 10, 10]},  # -> [35, 0, 40, 7]
        {"image_id": 1, "category_id": 7, "bbox": [50, 5, 10, 10]},  # entirely right of the image
        {"image_id": 1, "category_id": 7, "bbox": [0, 0, 40, 30]},  # exactly the image: untouched
    ]
    ds = load_coco_json(*write_coco(tmp_path, images, anns, CATS))
    np.testing.assert_allclose(ds.records[0].boxes, [[0, 10, 15, 30], [35, 0, 40, 7], [0, 0, 40, 30]])
    assert ds.report.num_clipped == 2 and ds.report.num_outside == 1


def test_duplicate_image_ids_are_an_error_listing_them(tmp_path):
    images = images_table([(30, 40)] * 4)
    images[2]["id"] = 1
    images[3]["id"] = 2
    with pytest.raises(DataError) as info:
        load_coco_json(*write_coco(tmp_path, images, [], CATS))
    msg = str(info.value)
    assert "2 duplicate image ids (first: 1, 2)" in msg


def test_unknown_category_ids_are_an_error_listing_them(tmp_path):
    images = images_table([(30, 40)])
    anns = [{"image_id": 1, "category_id": c, "bbox": [1, 1, 5, 5]} for c in (3, 99, 4, 99, 7)]
    with pytest.raises(DataError) as info:
        load_coco_json(*write_coco(tmp_path, images, anns, CATS))
    msg = str(info.value)
    assert "3 annotations with unknown category ids" in msg
    assert "annotation 2 -> category_id 99" in msg and "annotation 3 -> category_id 4" in msg
    assert "3, 7, 12" in msg  # the valid ids


def test_missing_image_files_are_an_error_listing_them(tmp_path):
    images = images_table([(30, 40)] * 8)
    missing = [f"img{i}.jpg" for i in (2, 3, 4, 5, 6, 7, 8)]
    with pytest.raises(DataError) as info:
        load_coco_json(*write_coco(tmp_path, images, [], CATS, skip_files=missing))
    msg = str(info.value)
    assert "7 of 8 image files missing" in msg
    assert "img2.jpg, img3.jpg, img4.jpg, img5.jpg, img6.jpg, ..." in msg  # the first 5, then "..."


def test_all_problems_come_in_one_report(tmp_path):
    images = images_table([(30, 40)] * 3)
    images[1]["id"] = 1
    anns = [
        {"image_id": 1, "category_id": 42, "bbox": [1, 1, 5, 5]},
        {"image_id": 77, "category_id": 3, "bbox": [1, 1, 5, 5]},
    ]
    with pytest.raises(DataError) as info:
        load_coco_json(*write_coco(tmp_path, images, anns, CATS, skip_files=["img3.jpg"]))
    msg = str(info.value)
    assert "4 problem(s)" in msg
    for part in (
        "duplicate image ids",
        "unknown category ids",
        "image ids that are not in 'images'",
        "image files missing",
    ):
        assert part in msg


def test_missing_or_invalid_annotation_file(tmp_path):
    with pytest.raises(DataError, match="annotation file not found"):
        load_coco_json(tmp_path / "none.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_coco_json(bad, tmp_path)


def test_num_classes_mismatch_names_both_numbers(tiny_coco):
    cfg = coco_config(*tiny_coco, num_classes=80)
    with pytest.raises(DataError) as info:
        get_dataset_info(cfg, "train")
    msg = str(info.value)
    assert "model.num_classes is 80" in msg and "has 2 categories" in msg and "model.num_classes: 2" in msg


def test_dataset_info_carries_names_and_original_ids(tiny_coco):
    info = get_dataset_info(coco_config(*tiny_coco, num_classes=2), "test")
    assert info.class_names == ["five", "nine"] and info.category_ids == [5, 9]
    assert info.ann_file == tiny_coco[0] and info.num_images == 6


def test_several_training_datasets_are_concatenated(tmp_path, tiny_coco):
    other_ann, other_root = write_coco(
        tmp_path / "other",
        images_table([(50, 50)], first_id=100),
        [{"image_id": 100, "category_id": 9, "bbox": [0, 0, 10, 10]}],
        [{"id": 5, "name": "five"}, {"id": 9, "name": "nine"}],
    )
    cfg = coco_config(*tiny_coco, num_classes=2)
    second = DatasetConfig(type="coco", name="other", ann_file=other_ann, image_root=other_root)
    cfg = replace(cfg, **{"data.train": cfg.data.train + (second,)})
    _, records = load_split(cfg, "train")
    assert len(records) == 7
    assert records[6].image_id == 100 and records[6].labels.tolist() == [1]


def test_concatenating_datasets_with_different_categories_is_an_error(tmp_path, tiny_coco):
    other = write_coco(
        tmp_path / "other", images_table([(50, 50)]), [], [{"id": 5, "name": "five"}, {"id": 10, "name": "ten"}]
    )
    cfg = coco_config(*tiny_coco, num_classes=2)
    cfg = replace(
        cfg, **{"data.train": cfg.data.train + (DatasetConfig(type="coco", ann_file=other[0], image_root=other[1]),)}
    )
    with pytest.raises(DataError, match="different categories"):
        load_split(cfg, "train")


def test_records_subset_and_concat_keep_boxes_with_their_images():
    recs = DetectionRecords(
        [1, 2, 3], [10, 20, 30], [11, 21, 31], ["a", "bé", "c"], np.arange(12).reshape(3, 4), [0, 1, 2], [2, 0, 1]
    )
    sub = recs.subset([2, 0])
    assert sub.image_ids.tolist() == [3, 1] and sub.file_names == ["c", "a"]
    np.testing.assert_array_equal(sub[0].boxes, [[8, 9, 10, 11]])
    np.testing.assert_array_equal(sub[1].labels, [0, 1])
    both = DetectionRecords.concat([recs, sub])
    assert len(both) == 5 and both.box_counts.tolist() == [2, 0, 1, 1, 2]
    assert both[1].file_name == "bé" and both[1].boxes.shape == (0, 4)
