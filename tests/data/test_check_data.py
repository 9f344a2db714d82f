"""detkit check-data: every problem planted in a tiny dataset is reported with its file or annotation
id, the exit status says whether training can proceed, and the trainer stops on the same errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from data_helpers import coco_config, write_image
from PIL import Image

from detkit.cli.check_data import main as check_data_main
from detkit.data.check import AnchorSpec, check_dataset, exif_orientation
from detkit.data.coco import ERROR, WARNING, read_coco_dict
from detkit.data.image_io import read_image
from detkit.errors import DataError

ANCHORS = AnchorSpec(sizes=(32, 64), aspect_ratios=(0.5, 1.0, 2.0), stride=16, min_size=64, max_size=96)
CATEGORIES = [{"id": 0, "name": "umbrella"}, {"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def write_exif_jpeg(path: Path, height: int, width: int, orientation: int) -> None:
    """A JPEG whose stored pixels are (height, width), tagged with an EXIF orientation (as PIL writes it)."""
    pixels = np.random.default_rng(orientation).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)


def ann(aid: int, image_id: int, category_id: int, bbox: list, **extra) -> dict:
    return {"id": aid, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0, **extra}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path]:
    """A 32x48 (h x w) COCO set with one problem of each kind; returns (ann.json, image folder)."""
    root = tmp_path_factory.mktemp("planted")
    images_dir = root / "images"
    for i in (1, 2, 5):
        write_image(images_dir / f"img{i}.jpg", 32, 48, seed=i)
    full = (images_dir / "img2.jpg").read_bytes()
    (images_dir / "img2.jpg").write_bytes(full[: len(full) // 2])  # truncated JPEG
    write_exif_jpeg(images_dir / "img3.jpg", 32, 48, orientation=6)  # annotated with the stored size
    write_exif_jpeg(images_dir / "img4.jpg", 32, 48, orientation=6)  # annotated with the upright size
    images = [
        {"id": 1, "file_name": "img1.jpg", "height": 32, "width": 48},
        {"id": 2, "file_name": "img2.jpg", "height": 32, "width": 48},
        {"id": 3, "file_name": "img3.jpg", "height": 32, "width": 48},
        {"id": 4, "file_name": "img4.jpg", "height": 48, "width": 32},
        {"id": 5, "file_name": "img5.jpg", "height": 32, "width": 48},  # no boxes
        {"id": 6, "file_name": "img1.jpg", "height": 32, "width": 48},  # duplicate file name
        {"id": 7, "file_name": "img7.jpg", "height": 32, "width": 48},  # missing file
    ]
    annotations = [
        ann(1, 1, 1, [2, 2, 20, 20]),
        ann(2, 1, 2, [40, 4, 20, 10]),  # partly outside (x2 = 60 > 48): clipped
        ann(3, 1, 9, [2, 2, 10, 10]),  # unknown category
        ann(4, 2, 1, [3, float("nan"), 10, 10]),  # NaN
        ann(5, 3, 1, [4, 4, 0, 10]),  # zero width
        ann(6, 3, 2, [60, 40, 5, 5]),  # entirely outside
        ann(7, 3, 1, [1, 1, 8, 8]),
        ann(8, 4, 2, [1, 1, 8, 8]),
    ]
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return ann_file, images_dir


def by_kind(problems) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for p in problems:
        out.setdefault(p.kind, []).append((p.severity, p.where))
    return out


def test_every_planted_problem_is_named_with_its_image_or_annotation(planted):
    ann_file, images_dir = planted
    result = check_dataset(read_coco_dict(ann_file), images_dir, name="planted", anchors=ANCHORS)
    assert by_kind(result.problems) == {
        "image_duplicate_name": [(ERROR, "image 6 (img1.jpg)")],
        "annotation_unknown_category": [(ERROR, "annotation 3")],
        "box_degenerate": [(WARNING, "annotation 4"), (WARNING, "annotation 5")],
        "box_outside": [(WARNING, "annotation 6")],
        "box_clipped": [(WARNING, "annotation 2")],
        "category_without_boxes": [(WARNING, "category 0 'umbrella'")],
        "image_unreadable": [(ERROR, "image 2 (img2.jpg)")],
        "image_size_mismatch": [(ERROR, "image 3 (img3.jpg)")],
        "image_exif_orientation": [(WARNING, "image 4 (img4.jpg)")],
        "image_missing": [(ERROR, "image 7 (img7.jpg)")],
    }
    messages = {p.kind: p.message for p in result.problems}
    assert "truncated" in messages["image_unreadable"]
    assert "EXIF orientation 6" in messages["image_size_mismatch"] and "stored 48x32" in messages["image_size_mismatch"]
    assert "nan" in next(p.message for p in result.problems if p.where == "annotation 4")
    assert "clipped to [40.0, 4.0, 48.0, 14.0]" in messages["box_clipped"]
    # counts: 6 valid images (the duplicate is not one); usable boxes 1, 2 (clipped), 7, 8
    assert (result.num_images, result.num_annotations, result.num_boxes) == (6, 8, 4)
    assert result.num_images_without_boxes == 3  # img2 (only a NaN box), img5, img7
    assert result.class_boxes == [(0, "umbrella", 0), (1, "cat", 2), (2, "dog", 2)]
    assert result.size_counts == {"small": 4, "medium": 0, "large": 0}
    assert result.anchor_rows[0]["group"] == "all" and result.anchor_rows[0]["boxes"] == 4
    assert len(result.blocking) == 5  # duplicate name, unknown category, unreadable, size, missing


def test_detkit_reads_images_upright_as_viewers_show_them(planted):
    """The convention the EXIF check is built on: read_image (training, evaluation, inference)
    applies the orientation tag, so the tagged 32x48 image comes out 48x32 (h x w)."""
    _, images_dir = planted
    assert read_image(images_dir / "img4.jpg").shape == (48, 32, 3)
    assert exif_orientation((images_dir / "img4.jpg").read_bytes()) == 6
    assert exif_orientation((images_dir / "img1.jpg").read_bytes()) == 1  # cv2 writes no EXIF
    assert exif_orientation(b"not an image") == 1


def test_cli_exits_2_with_the_problems_and_writes_the_json(planted, tmp_path, capsys):
    ann_file, images_dir = planted
    report_path = tmp_path / "report" / "check.json"
    report_path.parent.mkdir()
    status = check_data_main([str(ann_file), "--images", str(images_dir), "--json", str(report_path)])
    out, err = capsys.readouterr()
    assert status == 2
    assert "training cannot proceed: 5 problem(s)" in err
    for text in ("'img1.jpg' (ids 1 and 6)", "annotation 3", "image 2 (img2.jpg)", "image 3 (img3.jpg)", "img7.jpg"):
        assert text in err, text
    assert "umbrella" in out and "annotation 2" in out  # warnings in the report, not in the blocking list
    report = json.loads(report_path.read_text())
    assert report["ok"] is False and len(report["blocking"]) == 5
    (dataset,) = report["datasets"]
    assert (dataset["images"], dataset["boxes"], dataset["errors"], dataset["warnings"]) == (6, 4, 5, 6)
    assert {p["kind"] for p in dataset["problems"]} >= {"image_unreadable", "image_exif_orientation", "box_outside"}
    assert [c["boxes"] for c in dataset["classes"]] == [0, 2, 2]
    assert not list(report_path.parent.glob("*.tmp*"))  # written atomically: no temporary file left


def test_cli_exits_0_when_only_warnings_and_2_with_strict(tmp_path, capsys):
    images_dir = tmp_path / "images"
    write_image(images_dir / "a.png", 40, 40, seed=1)
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 40}],
        "annotations": [ann(1, 1, 1, [30, 30, 20, 20])],  # partly outside: clipped, a warning
        "categories": [{"id": 1, "name": "cat"}],
    }
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(data))
    assert check_data_main([str(ann_file), "--images", str(images_dir)]) == 0
    assert "training can proceed (see the warnings above)" in capsys.readouterr().out
    assert check_data_main([str(ann_file), "--images", str(images_dir), "--strict"]) == 2
    assert "annotation 1: bbox [30, 30, 20, 20] reaches outside" in capsys.readouterr().err


def test_a_readers_dict_is_reported_with_its_sources(tmp_path):
    """A format reader's dict: each problem names the annotation file and line it came from, and
    annotations the reader skipped are listed, not lost."""
    write_image(tmp_path / "images" / "a.jpg", 32, 32, seed=3)
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "height": 32, "width": 32, "source": "labels/a.txt"},
            {"id": 2, "file_name": "b.jpg", "height": 32, "width": 32, "source": "labels/b.txt"},
        ],
        "annotations": [
            ann(1, 1, 1, [2, 2, 8, 8], source="labels/a.txt:1"),
            ann(2, 1, 1, [-10, 2, 5, 8], source="labels/a.txt:2"),  # entirely left of the image
            ann(3, 1, 4, [2, 2, 8, 8], source="labels/a.txt:3"),
        ],
        "categories": [{"id": 1, "name": "cat"}],
        "image_root": str(tmp_path / "images"),
        "problems": [{"source": "labels/a.txt:4", "message": "4 numbers, expected 5 (class cx cy w h)"}],
    }
    result = check_dataset(data, decode_images=False)
    assert by_kind(result.problems) == {
        "annotation_unknown_category": [(ERROR, "annotation 3 (labels/a.txt:3)")],
        "box_outside": [(WARNING, "annotation 2 (labels/a.txt:2)")],
        "annotation_skipped": [(WARNING, "labels/a.txt:4")],
        "image_missing": [(ERROR, "image 2 (b.jpg) (labels/b.txt)")],
    }
    assert not result.images_decoded
    assert "annotation 3 (labels/a.txt:3) -> category_id 4" in result.blocking[0]


def test_config_mode_checks_every_entry_and_num_classes(tmp_path, capsys):
    images_dir = tmp_path / "images"
    for name in ("a.jpg", "b.jpg"):
        write_image(images_dir / name, 32, 32, seed=len(name))
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    train = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 32, "width": 32}],
        "annotations": [ann(1, 1, 1, [2, 2, 8, 8]), ann(2, 1, 2, [10, 10, 8, 8])],
        "categories": cats,
    }
    test = {**train, "categories": [cats[0], {"id": 2, "name": "bird"}]}
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    config = tmp_path / "data.yaml"
    config.write_text(
        "model: {num_classes: 2}\n"
        f"data:\n  train: [{{name: tr, ann_file: {tmp_path / 'train.json'}, image_root: {images_dir}}}]\n"
        f"  test: [{{name: te, ann_file: {tmp_path / 'test.json'}, image_root: {images_dir}}}]\n"
    )
    assert check_data_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "test 'te': its categories differ (2 vs 2; first differing (id, name): (2, 'bird') vs (2, 'dog')) " in err
    assert "from those of train 'tr'; datasets used together need the same category ids and names" in err
    (tmp_path / "test.json").write_text(json.dumps(train))
    assert check_data_main(["--config", str(config), "--no-decode"]) == 0
    capsys.readouterr()
    assert check_data_main(["--config", str(config), "model.num_classes=3"]) == 2
    assert "model.num_classes: is 3 but train 'tr' has 2 categories" in capsys.readouterr().err


def test_the_trainer_stops_on_the_same_errors_before_its_first_iteration(planted, tmp_path, capsys):
    """The cheap checks (check_coco's rules and the image files' presence) run when the trainer
    loads its data; the image decoding is check-data's alone (the loader skips what it cannot read)."""
    from detkit.engine.trainer import Trainer

    ann_file, images_dir = planted
    check_data_main([str(ann_file), "--images", str(images_dir), "--no-decode"])
    blocking = [line.split(": ", 1)[1] for line in capsys.readouterr().err.splitlines() if line.startswith("  - ")]
    assert len(blocking) == 3  # duplicate name, unknown category, missing file (no decode: no image errors)
    cfg = coco_config(
        str(ann_file), str(images_dir), num_classes=3, **{"model.depth": 18, "output_dir": str(tmp_path / "out")}
    )
    with pytest.raises(DataError) as info:
        Trainer(cfg, load_weights=False)
    message = str(info.value)
    assert "3 problem(s) must be fixed" in message
    for line in blocking[:2]:  # check_coco's errors, word for word
        assert line in message
    assert "1 of 6 image files missing" in message and "img7.jpg" in message


def test_a_good_dataset_passes_and_counts_match_the_loader(tiny_coco, capsys):
    """The conftest's clean set: exit 0, and the counts equal what load_coco_json keeps."""
    from detkit.data.coco import load_coco_json

    ann_file, image_root = tiny_coco
    assert check_data_main([ann_file, "--images", image_root]) == 0
    loaded = load_coco_json(ann_file, image_root)
    result = check_dataset(read_coco_dict(ann_file), image_root)
    assert result.num_boxes == loaded.report.num_boxes == 5
    assert result.num_images_without_boxes == loaded.report.num_images_without_boxes == 1
    assert [n for _, _, n in result.class_boxes] == np.bincount(loaded.records.labels, minlength=2).tolist()
    assert cv2.imread(str(Path(image_root) / "img1.jpg")) is not None
    assert result.problems == []


def test_the_trainer_stops_when_the_test_categories_are_not_the_training_ones(tmp_path):
    """A test set whose ids or names differ would be scored against the wrong classes (AP near 0,
    no error): the trainer stops before its first iteration, in the check's words."""
    from detkit.engine.trainer import Trainer

    write_image(tmp_path / "images" / "a.jpg", 32, 32, seed=1)
    image = [{"id": 1, "file_name": "a.jpg", "height": 32, "width": 32}]
    boxes = [ann(1, 1, 1, [2, 2, 8, 8]), ann(2, 1, 2, [10, 10, 8, 8])]
    files = {}
    for split, names in (("train", ("cat", "dog")), ("test", ("cat", "bird"))):
        categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
        files[split] = tmp_path / f"{split}.json"
        files[split].write_text(json.dumps({"images": image, "annotations": boxes, "categories": categories}))
    cfg = coco_config(
        str(files["train"]),
        str(tmp_path / "images"),
        num_classes=2,
        test=(str(files["test"]), str(tmp_path / "images")),
        **{"model.depth": 18, "output_dir": str(tmp_path / "out")},
    )
    with pytest.raises(DataError) as info:
        Trainer(cfg, load_weights=False)
    assert str(info.value) == (
        f"the test data ({files['test']}): its categories differ (2 vs 2; first differing (id, name): (2, 'bird') vs "
        "(2, 'dog')) from those of the training data; datasets used together need the same category ids and names "
        "(the model predicts the training ones)"
    )


def test_format_mode_names_the_bad_yolo_line_and_skip_bad_counts_it(tmp_path, capsys):
    """--format yolo: a label line with 4 numbers stops the check with its file and line; with
    --skip-bad the line is skipped, listed as a warning, and the rest is checked."""
    from tests.data.format_samples import write_yolo

    write_yolo(tmp_path)
    label = sorted((tmp_path / "labels" / "train").glob("*.txt"))[3]
    good_lines = label.read_text().splitlines()
    label.write_text("\n".join([*good_lines, "0 0.5 0.5 0.2"]) + "\n")
    bad_line = len(good_lines) + 1
    where = f"{label.name}:{bad_line}"

    from detkit.cli.common import run_cli

    # As the command runs it: the reader's DataError is one line on stderr and exit status 2.
    assert run_cli(check_data_main, [str(tmp_path / "data.yaml"), "--format", "yolo", "--split", "train"]) == 2
    _, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1
    assert where in err and "4" in err

    assert check_data_main([str(tmp_path / "data.yaml"), "--format", "yolo", "--split", "train", "--skip-bad"]) == 0
    out, _ = capsys.readouterr()
    assert where in out
