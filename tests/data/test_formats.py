"""Readers of VOC, YOLO, LabelMe and CVAT (detkit.data.formats), `detkit convert-data`, class options,
and training + evaluation straight from a config entry of each format.

The samples are written once per module by tests/data/format_samples.py, as each tool writes them,
with the boxes each must read as.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from format_samples import CLASS_NAMES, SIZE_HW, WRITERS, dataset_entry, read_options, write_yolo

from detkit.cli.common import run_cli
from detkit.cli.convert_data import main as convert_main
from detkit.data.coco import load_coco_json
from detkit.data.formats import apply_class_options, read_dataset
from detkit.data.formats.voc import VOC_CLASS_NAMES
from detkit.errors import DataError

FORMATS = list(WRITERS)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """{format: (root folder, truth)} of the four samples."""
    tmp = tmp_path_factory.mktemp("formats")
    return {fmt: (tmp / fmt, writer(tmp / fmt)) for fmt, writer in WRITERS.items()}


def boxes_by_stem(data: dict) -> dict[str, list[tuple[str, list[float]]]]:
    names = {c["id"]: c["name"] for c in data["categories"]}
    out: dict[str, list] = {Path(img["file_name"]).stem: [] for img in data["images"]}
    stem_of = {img["id"]: Path(img["file_name"]).stem for img in data["images"]}
    for ann in data["annotations"]:
        out[stem_of[ann["image_id"]]].append((names[ann["category_id"]], ann["bbox"]))
    return out


def assert_same_boxes(got: dict, truth: dict, tol: float = 1e-4) -> None:
    assert set(got) == set(truth)
    for stem, expected in truth.items():
        assert [g[0] for g in got[stem]] == [e[0] for e in expected], stem
        for (_, box), (_, want, *_) in zip(got[stem], expected):
            np.testing.assert_allclose(box, want, atol=tol, rtol=0, err_msg=stem)


# ---------------------------------------------------------------------------------------------
# Each format reads as written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_reader_gives_the_boxes_the_tool_wrote(samples, fmt, split):
    root, truth = samples[fmt]
    path, options = read_options(fmt, root, split)
    data = read_dataset(fmt, path, **options)
    assert_same_boxes(boxes_by_stem(data), truth[split])
    h, w = SIZE_HW
    assert all((img["width"], img["height"]) == (w, h) for img in data["images"])
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    assert data["problems"] == []
    image_root = Path(data["image_root"])
    assert all((image_root / img["file_name"]).is_file() for img in data["images"])


def test_voc_converts_1_based_inclusive_pixels_as_detectron2_and_keeps_difficult(samples):
    root, truth = samples["voc"]
    data = read_dataset("voc", root, split="val")
    # one object of val_000 written by hand: 1-based inclusive (xmin, ymin, xmax, ymax) -> (x-1, y-1, x2, y2)
    xml = (root / "Annotations" / "val_000.xml").read_text()
    xmin = int(xml.split("<xmin>")[1].split("<")[0])
    xmax = int(xml.split("<xmax>")[1].split("<")[0])
    first = data["annotations"][0]
    assert first["bbox"][0] == xmin - 1.0 and first["bbox"][0] + first["bbox"][2] == float(xmax)
    expected_difficult = [d for stem in truth["val"] for (_, _, d) in truth["val"][stem]]
    assert [a["difficult"] for a in data["annotations"]] == expected_difficult
    assert sum(expected_difficult) == 3
    assert first["source"] == f"{root / 'Annotations' / 'val_000.xml'}:18"  # the <object> line
    # the split's list decides the images; without a split every XML is read
    assert len(read_dataset("voc", root, split="")["images"]) == 9
    with pytest.raises(DataError, match=r"split 'trainval' is not one of .*\(train, val\)"):
        read_dataset("voc", root, split="trainval")


def test_voc_class_order_is_vocs_for_voc_names_else_sorted(tmp_path):
    def xml(names):
        objs = "".join(
            f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
            f"<xmax>10</xmax><ymax>10</ymax></bndbox></object>"
            for n in names
        )
        return f"<annotation><filename>a.jpg</filename><size><width>20</width><height>20</height></size>{objs}</annotation>"

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.xml").write_text(xml(["tvmonitor", "dog", "aeroplane"]))
    data = read_dataset("voc", plain)
    assert [c["name"] for c in data["categories"]] == list(VOC_CLASS_NAMES)
    assert [a["category_id"] for a in data["annotations"]] == [20, 12, 1]
    assert data["class_report"]["empty"] == [n for n in VOC_CLASS_NAMES if n not in ("tvmonitor", "dog", "aeroplane")]
    assert data["image_root"] == str(plain) and data["images"][0]["file_name"] == "a.jpg"
    (plain / "a.xml").write_text(xml(["zebra", "dog"]))
    assert [c["name"] for c in read_dataset("voc", plain)["categories"]] == ["dog", "zebra"]
    # dropping the empty VOC classes leaves the two used ones, renumbered 1..2 in VOC order
    (plain / "a.xml").write_text(xml(["tvmonitor", "dog"]))
    kept = read_dataset("voc", plain, drop_empty_classes=True)
    assert kept["categories"] == [{"id": 1, "name": "dog"}, {"id": 2, "name": "tvmonitor"}]
    assert [a["category_id"] for a in kept["annotations"]] == [2, 1]


def test_voc_without_a_size_reads_it_from_the_image_header(tmp_path):
    import cv2

    folder = tmp_path / "xml"
    folder.mkdir()
    cv2.imwrite(str(folder / "b.png"), np.zeros((30, 50, 3), np.uint8))
    (folder / "b.xml").write_text(
        "<annotation><filename>b.png</filename><size><width>0</width><height>0</height></size>"
        "<object><name>cat</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>20</xmax><ymax>25</ymax></bndbox>"
        "</object></annotation>"
    )
    data = read_dataset("voc", folder)
    assert (data["images"][0]["width"], data["images"][0]["height"]) == (50, 30)
    assert data["annotations"][0]["bbox"] == [1.0, 2.0, 19.0, 23.0]
    assert data["annotations"][0]["difficult"] == 0


def test_yolo_names_dict_missing_and_empty_label_files_and_segments(tmp_path):
    truth = write_yolo(tmp_path / "y", names_as_dict=True)
    data = read_dataset("yolo", tmp_path / "y", split="val")  # the folder holding data.yaml
    assert [c["name"] for c in data["categories"]] == CLASS_NAMES
    assert_same_boxes(boxes_by_stem(data), truth["val"])
    stems = boxes_by_stem(data)
    assert stems["val_000"] == [] and stems["val_001"] == []  # no label file, an empty one
    with pytest.raises(DataError, match=r"no 'test' entry; set split: to one of train, val"):
        read_dataset("yolo", tmp_path / "y", split="test")


def test_yolo_image_lists_in_a_txt_file(samples, tmp_path):
    root, truth = samples["yolo"]
    listing = root / "val_list.txt"
    listing.write_text("".join(f"./images/val/{s}.jpg\n" for s in truth["val"]))
    yaml_file = tmp_path / "list.yaml"
    yaml_file.write_text(f"path: {root}\ntrain: val_list.txt\nnames: {json.dumps(CLASS_NAMES)}\n")
    assert_same_boxes(boxes_by_stem(read_dataset("yolo", yaml_file)), truth["val"])


def test_labelme_classes_are_sorted_and_cvat_classes_follow_meta(samples):
    root, truth = samples["labelme"]
    data = read_dataset("labelme", root / "val")
    found = {name for objects in truth["val"].values() for name, _ in objects}
    assert [c["name"] for c in data["categories"]] == sorted(found) and len(found) == 2
    assert data["annotations"][0]["source"] == f"{root / 'val' / 'val_000.json'}#shape0"
    root, truth = samples["cvat"]
    data = read_dataset("cvat", root, subset="Validation")  # the export folder holding annotations.xml
    assert [c["name"] for c in data["categories"]] == CLASS_NAMES  # meta order, even for a label without boxes
    occluded = [a["occluded"] for a in data["annotations"]]
    assert occluded == [int(k == 0) for stem in truth["val"] for k in range(len(truth["val"][stem]))]
    assert len(read_dataset("cvat", root)["images"]) == 9  # no subset: every image


def test_labelme_points_and_lines_are_reported_not_boxes(tmp_path, caplog):
    doc = {
        "version": "5.4.1",
        "flags": {},
        "imagePath": "..\\images\\c.jpg",  # a Windows export
        "imageData": None,
        "imageHeight": 40,
        "imageWidth": 60,
        "shapes": [
            {"label": "a", "points": [[1, 2], [11, 22]], "shape_type": "rectangle"},
            {"label": "a", "points": [[5, 5]], "shape_type": "point"},
            {"label": "b", "points": [[10, 10], [13, 14]], "shape_type": "circle"},
            {"label": "b", "points": [[1, 1], [5, 1], [3, 8]], "shape_type": None},
        ],
    }
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "c.json").write_text(json.dumps(doc))
    data = read_dataset("labelme", tmp_path / "ann", image_root=str(tmp_path))
    assert [a["bbox"] for a in data["annotations"]] == [[1, 2, 10, 20], [5, 5, 10, 10], [1, 1, 4, 7]]
    assert data["images"][0]["file_name"] == "images/c.jpg"
    assert data["ignored"] == [
        {"source": f"{tmp_path / 'ann' / 'c.json'}#shape1", "message": "point shapes are not boxes"}
    ]
    assert "1 annotations that are not boxes or regions left out" in caplog.text


# ---------------------------------------------------------------------------------------------
# Conversion: one command, a COCO json that reads back to the same boxes
# ---------------------------------------------------------------------------------------------


def convert_args(fmt: str, root: Path, split: str) -> list[str]:
    path, options = read_options(fmt, root, split)
    args = ["--format", fmt, str(path)]
    for key, value in options.items():
        args += [f"--{key}", value]
    return args


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_data_round_trips_the_boxes(samples, fmt, tmp_path, capsys):
    root, truth = samples[fmt]
    out = tmp_path / "sub" / "train.json"
    assert run_cli(convert_main, [*convert_args(fmt, root, "train"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{out}: 6 images" in printed and "circle" in printed
    data = json.loads(out.read_text())
    assert_same_boxes(boxes_by_stem(data), truth["train"])
    assert not list(out.parent.glob(".*"))  # no temporary left beside it
    # the json is a COCO file the loaders read (image_root written into it)
    dataset = load_coco_json(out, data["image_root"])
    assert len(dataset.records) == 6 and dataset.class_names == tuple(CLASS_NAMES)
    assert len(dataset.records.boxes) == sum(len(v) for v in truth["train"].values())


def test_convert_data_class_options(samples, tmp_path, capsys):
    root, truth = samples["yolo"]
    out = tmp_path / "c.json"
    args = [*convert_args("yolo", root, "train"), "--output", str(out)]
    assert (
        run_cli(convert_main, [*args, "--rename", "square=box", "--rename", "triangle=box", "--classes", "box,circle"])
        == 0
    )
    data = json.loads(out.read_text())
    assert data["categories"] == [{"id": 1, "name": "box"}, {"id": 2, "name": "circle"}]
    n_circle = sum(n == "circle" for v in truth["train"].values() for n, _ in v)
    assert sum(a["category_id"] == 2 for a in data["annotations"]) == n_circle
    assert len(data["annotations"]) == sum(len(v) for v in truth["train"].values())  # merged, none lost
    assert run_cli(convert_main, [*args, "--rename", "Square=box"]) == 2
    assert "rename: 'Square' not among the classes (circle, square, triangle)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Class options and the empty-class ("umbrella") case
# ---------------------------------------------------------------------------------------------


def test_rename_merges_classes_selects_and_drops_empty_ones():
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
        "annotations": [
            {"id": k + 1, "image_id": 1, "category_id": c, "bbox": [0, 0, 1, 1]} for k, c in enumerate([3, 1, 2, 3])
        ],
        "categories": [
            {"id": 1, "name": "Car"},
            {"id": 2, "name": "car"},
            {"id": 3, "name": "bus"},
            {"id": 4, "name": "bike"},
        ],
    }
    merged = apply_class_options(data, rename={"Car": "car"})
    assert merged["categories"] == [{"id": 1, "name": "car"}, {"id": 2, "name": "bus"}, {"id": 3, "name": "bike"}]
    assert [a["category_id"] for a in merged["annotations"]] == [2, 1, 1, 2]
    assert merged["class_report"]["empty"] == ["bike"]
    picked = apply_class_options(data, rename={"Car": "car"}, classes=["bus"])
    assert picked["categories"] == [{"id": 1, "name": "bus"}] and len(picked["annotations"]) == 2
    assert picked["class_report"]["left_out"] == {"car": 2}
    dropped = apply_class_options(data, drop_empty_classes=True)
    assert [c["name"] for c in dropped["categories"]] == ["Car", "car", "bus"]
    assert dropped["class_report"]["dropped"] == ["bike"]
    with pytest.raises(DataError, match=r"classes: 'truck' not among the classes \(Car, car, bus, bike"):
        apply_class_options(data, classes=["truck"])
    untouched = apply_class_options(data)
    assert untouched["categories"] == data["categories"]  # no option: ids kept as they are


@pytest.fixture
def umbrella_coco(tmp_path):
    """A labelling-tool COCO export: category 0 'umbrella' without boxes, then the two real classes."""
    from data_helpers import images_table, write_coco

    images = images_table([(40, 60), (40, 60)])
    annotations = [
        {"image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 10]},
        {"image_id": 2, "category_id": 2, "bbox": [10, 10, 30, 20]},
    ]
    categories = [{"id": 0, "name": "umbrella"}, {"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    return write_coco(tmp_path, images, annotations, categories)


def test_umbrella_category_is_named_in_the_num_classes_error_and_droppable(umbrella_coco, tmp_path, monkeypatch):
    from data_helpers import coco_config

    from detkit.config import DatasetConfig, replace
    from detkit.data.datasets import get_dataset_info

    monkeypatch.setenv("DETKIT_CACHE_DIR", str(tmp_path / "cache"))
    ann_file, image_root = umbrella_coco
    cfg = coco_config(ann_file, image_root, num_classes=2)
    with pytest.raises(DataError) as err:
        get_dataset_info(cfg, "train")
    assert "model.num_classes is 2 but the train data ('tiny') has 3 categories" in str(err.value)
    assert "1 of them have no box (umbrella): drop_empty_classes: true" in str(err.value)
    entry = DatasetConfig(type="coco", name="tiny", ann_file=ann_file, image_root=image_root, drop_empty_classes=True)
    info = get_dataset_info(replace(cfg, **{"data.train": (entry,), "data.test": (entry,)}), "train")
    assert info.class_names == ["cat", "dog"] and info.category_ids == [1, 2]
    converted = json.loads(Path(info.ann_file).read_text())
    assert Path(info.ann_file).parent == tmp_path / "cache" / "datasets"
    assert [a["category_id"] for a in converted["annotations"]] == [1, 2]


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file and line/shape, exit 2; or skipped and counted with --skip-bad
# ---------------------------------------------------------------------------------------------


def _bad_voc(tmp: Path) -> tuple[list[str], str]:
    (tmp / "x").mkdir()
    (tmp / "x" / "a.xml").write_text("<annotation>\n<object><name>cat</name>\n<bndbox></object>\n</annotation>\n")
    return ["--format", "voc", str(tmp / "x")], f"{tmp / 'x' / 'a.xml'}:3: malformed XML (mismatched tag"


def _bad_yolo(line: str):
    def make(tmp: Path) -> tuple[list[str], str]:
        (tmp / "images" / "train").mkdir(parents=True)
        (tmp / "labels" / "train").mkdir(parents=True)
        import cv2

        cv2.imwrite(str(tmp / "images" / "train" / "a.jpg"), np.zeros((20, 20, 3), np.uint8))
        (tmp / "labels" / "train" / "a.txt").write_text(f"0 0.5 0.5 0.2 0.2\n{line}\n")
        (tmp / "data.yaml").write_text("train: images/train\nnames: [a, b]\n")
        return ["--format", "yolo", str(tmp / "data.yaml")], f"{tmp / 'labels' / 'train' / 'a.txt'}:2:"

    return make


def _bad_labelme(tmp: Path) -> tuple[list[str], str]:
    shapes = [
        {"label": "a", "points": [[1, 1], [5, 5]], "shape_type": "rectangle"},
        {"label": "a", "points": [[3, 3]], "shape_type": "polygon"},
    ]
    doc = {"shapes": shapes, "imagePath": "a.jpg", "imageHeight": 20, "imageWidth": 20, "imageData": None}
    (tmp / "a.json").write_text(json.dumps(doc))
    return [
        "--format",
        "labelme",
        str(tmp),
    ], f"{tmp / 'a.json'}#shape1: a polygon needs at least 3 points, this one has 1"


def _bad_cvat(tmp: Path) -> tuple[list[str], str]:
    (tmp / "annotations.xml").write_text(
        "<annotations>\n<version>1.1</version>\n<meta><task><labels><label><name>car</name></label></labels></task></meta>\n"
        '<image id="0" name="a.jpg" width="20" height="20">\n'
        '<box label="car" occluded="0" xtl="1" ytl="1" xbr="5" ybr="5"/>\n'
        '<box label="truck" occluded="0" xtl="1" ytl="1" xbr="5" ybr="5"/>\n'
        "</image>\n</annotations>\n"
    )
    return ["--format", "cvat", str(tmp / "annotations.xml")], (
        f"{tmp / 'annotations.xml'}:6: label 'truck' is not in <meta> (labels: car)"
    )


BAD_INPUTS = {
    "voc_malformed_xml": (_bad_voc, 0),
    "yolo_4_numbers": (_bad_yolo("1 0.5 0.5 0.2"), 1),
    "yolo_6_numbers": (_bad_yolo("1 0.5 0.5 0.2 0.2 0.9"), 1),
    "yolo_outside_0_1": (_bad_yolo("1 0.5 1.2 0.2 0.2"), 1),
    "yolo_unknown_class": (_bad_yolo("2 0.5 0.5 0.2 0.2"), 1),
    "labelme_one_point": (_bad_labelme, 1),
    "cvat_label_not_in_meta": (_bad_cvat, 1),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_place_or_skipped_and_counted(case, tmp_path, capsys):
    make, boxes_kept = BAD_INPUTS[case]
    args, where = make(tmp_path)
    out = tmp_path / "out.json"
    assert run_cli(convert_main, [*args, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {where}"), err
    assert "--skip-bad" in err and not out.exists()
    assert run_cli(convert_main, [*args, "--output", str(out), "--skip-bad"]) == 0
    assert "1 bad annotations skipped" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert len(data["problems"]) == 1 and data["problems"][0]["source"] in where
    assert len(data["annotations"]) == boxes_kept


def test_xml_with_entities_is_refused_without_expanding_them(tmp_path):
    (tmp_path / "a.xml").write_text(
        '<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>\n'
        "<annotation><filename>&lol2;</filename></annotation>\n"
    )
    with pytest.raises(DataError, match=r"a\.xml:2: the XML declares a DOCTYPE or entities"):
        read_dataset("voc", tmp_path)


def test_a_config_entry_without_its_path_is_a_clear_error(tmp_path):
    from data_helpers import coco_config

    from detkit.config import DatasetConfig
    from detkit.data.datasets import load_dataset

    with pytest.raises(DataError, match=r"dataset 'mine' \(type yolo\) has no path: set path: to the folder"):
        load_dataset(DatasetConfig(type="yolo", name="mine"))
    assert coco_config  # the helper module imports (used above)


# ---------------------------------------------------------------------------------------------
# Train and evaluate straight from each format's config entry
# ---------------------------------------------------------------------------------------------

TRAIN_YAML = """\
_base_: {base}
output_dir: {out}
device: cpu
model:
  depth: 18
  num_classes: 3
  backbone: {{freeze_at: 4, weights: {weights}}}
  rpn: {{anchor_sizes: [16, 32, 64], pre_nms_topk_train: 100, post_nms_topk_train: 16, pre_nms_topk_test: 50,
        post_nms_topk_test: 8, batch_size_per_image: 32}}
  roi_heads: {{batch_size_per_image: 8, pooler_resolution: 2}}
data:
  train: [{train}]
  test: [{test}]
  min_size_train: [64]
  max_size_train: 96
  min_size_test: 64
  max_size_test: 96
  num_workers: 0
  pin_memory: false
solver: {{ims_per_batch: 2, base_lr: 0.01, max_iter: 2, steps: [], warmup_iters: 0, checkpoint_period: 100,
         log_period: 1}}
test: {{ims_per_batch: 3}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_trains_and_evaluates_from_its_config_entry(
    samples, fmt, tmp_path, monkeypatch, standin_imagenet_r18
):
    from detkit.config import load_config
    from detkit.engine.checkpoint import load_checkpoint
    from detkit.engine.trainer import Trainer

    monkeypatch.setenv("DETKIT_CACHE_DIR", str(tmp_path / "cache"))
    root, _ = samples[fmt]
    # `classes` fixes the table of formats without a class list (a val split may lack a class)
    train, test = ({**dataset_entry(fmt, root, s), "classes": CLASS_NAMES} for s in ("train", "val"))
    config = tmp_path / "run.yaml"
    base = Path(__file__).resolve().parents[2] / "configs" / "base.yaml"
    config.write_text(
        TRAIN_YAML.format(
            base=base,
            out=tmp_path / "out",
            weights=standin_imagenet_r18,
            train=json.dumps(train),
            test=json.dumps(test),
        )
    )
    summary = Trainer(load_config(config)).train()
    assert summary["iterations"] == 2 and math.isfinite(summary["final_losses"]["total_loss"])
    assert 0.0 <= summary["eval"]["bbox/AP50"] <= 100.0
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert classes == [{"label": i, "category_id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)]
    assert load_checkpoint(tmp_path / "out" / "model_final.pth")["class_names"] == CLASS_NAMES


def test_the_tool_script_exits_2_with_one_line(tmp_path):
    import os
    import subprocess
    import sys

    args, where = _bad_yolo("1 0.5 0.5 0.2")(tmp_path)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(root / "tools" / "convert_data.py"), *args, "--output", str(tmp_path / "o.json")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: {where} 4 values; a YOLO line is `class cx cy w h` (5) or `class x1 y1 x2 y2 x3 y3 ...` "
        "(a segment of 3 or more points) (or pass skip_bad / --skip-bad to skip it and list it)"
    ]


def test_classes_may_name_a_class_a_split_lacks_only_where_the_format_has_no_class_list(samples):
    root, truth = samples["labelme"]
    data = read_dataset("labelme", root / "val", classes=["triangle", "circle", "square", "star"])
    assert [c["name"] for c in data["categories"]] == ["triangle", "circle", "square", "star"]
    assert data["class_report"]["empty"] == ["triangle", "star"]
    assert len(data["annotations"]) == sum(len(v) for v in truth["val"].values())
    yolo_root, _ = samples["yolo"]
    with pytest.raises(DataError, match=r"classes: 'star' not among the classes \(circle, square, triangle"):
        read_dataset("yolo", yolo_root, split="val", classes=["circle", "star"])


def test_image_size_is_the_exif_rotated_one(tmp_path):
    from PIL import Image

    from detkit.data.formats._common import image_size

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    Image.new("RGB", (40, 20)).save(tmp_path / "r.jpg", exif=exif)
    Image.new("RGB", (40, 20)).save(tmp_path / "p.jpg")
    assert image_size(tmp_path / "r.jpg") == (20, 40) and image_size(tmp_path / "p.jpg") == (40, 20)


def test_cvat_rotated_box_and_ellipse_give_the_box_around_them(tmp_path):
    (tmp_path / "annotations.xml").write_text(
        "<annotations><version>1.1</version><meta><project><labels><label><name>a</name></label></labels>"
        '</project></meta><image id="0" name="a.jpg" width="100" height="100">'
        '<box label="a" occluded="0" xtl="10" ytl="20" xbr="50" ybr="40" rotation="90.0"/>'
        '<box label="a" occluded="0" xtl="0" ytl="0" xbr="2" ybr="2" rotation="45"/>'
        '<ellipse label="a" occluded="1" cx="50" cy="60" rx="10" ry="5"/>'
        '<polyline label="a" occluded="0" points="1,1;5,5"/>'
        "</image></annotations>"
    )
    data = read_dataset("cvat", tmp_path / "annotations.xml")
    half = math.sqrt(2.0)
    expected = [[20.0, 10.0, 20.0, 40.0], [1 - half, 1 - half, 2 * half, 2 * half], [40.0, 55.0, 20.0, 10.0]]
    for ann, want in zip(data["annotations"], expected, strict=True):
        np.testing.assert_allclose(ann["bbox"], want, atol=1e-9)
    assert [a["occluded"] for a in data["annotations"]] == [0, 0, 1]
    assert data["ignored"][0]["message"] == "<polyline> is not a box"


def test_yolo_roboflow_layout_with_dotdot_split_paths(samples, tmp_path):
    import shutil

    root, truth = samples["yolo"]
    export = tmp_path / "roboflow"
    shutil.copytree(root / "images" / "val", export / "valid" / "images")
    shutil.copytree(root / "labels" / "val", export / "valid" / "labels")
    (export / "data.yaml").write_text(f"train: ../train/images\nval: ../valid/images\nnc: 3\nnames: {CLASS_NAMES}\n")
    assert_same_boxes(boxes_by_stem(read_dataset("yolo", export, split="val")), truth["val"])
