"""tools/analyze.py end to end on a three-image dataset: the files it writes and the numbers in them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from detkit.cli.analyze import main
from detkit.cli.common import run_cli
from detkit.engine.evaluator import evaluate_files

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = [{"id": 1, "name": "cat", "supercategory": "animal"}, {"id": 2, "name": "dog", "supercategory": "animal"}]


@pytest.fixture
def tiny(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in (1, 2, 3):
        cv2.imwrite(str(images / f"{i}.jpg"), np.full((64, 96, 3), 40 * i, np.uint8))
    objects = [(1, 1, [4, 4, 20, 20]), (1, 2, [40, 10, 36, 36]), (2, 1, [10, 30, 24, 24]), (3, 2, [60, 20, 16, 40])]
    gt = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": 64, "width": 96} for i in (1, 2, 3)],
        "categories": CATEGORIES,
        "annotations": [
            {"id": n + 1, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for n, (im, c, b) in enumerate(objects)
        ],
    }
    predictions = [
        {"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "score": 0.9},  # TP
        {"image_id": 1, "category_id": 1, "bbox": [40, 10, 36, 36], "score": 0.8},  # cat on the dog: Cls
        {"image_id": 2, "category_id": 1, "bbox": [22, 30, 24, 24], "score": 0.7},  # half off the cat: Loc
        {"image_id": 2, "category_id": 2, "bbox": [70, 2, 10, 10], "score": 0.6},  # on nothing: Bkg
    ]  # the dog of image 3: Miss
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "predictions.json").write_text(json.dumps(predictions))
    return tmp_path


def test_analyze_writes_the_report_with_the_numbers_of_its_parts(tiny):
    out = tiny / "report"
    code = main(
        [
            "--gt",
            str(tiny / "gt.json"),
            "--predictions",
            str(tiny / "predictions.json"),
            "--out",
            str(out),
            "--images",
            str(tiny / "images"),
        ]
    )
    assert code == 0
    for name in (
        "report.html",
        "analysis.json",
        "summary.png",
        "tide.png",
        "pr_overall.png",
        "pr_cat.png",
        "pr_dog.png",
        "confusion.png",
        "per_class_ap.png",
        "false_positives.png",
        "missed.png",
        "dataset.png",
        "anchor_coverage.png",
    ):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    for png in out.glob("*.png"):
        assert png.name in html
    numbers = json.loads((out / "analysis.json").read_text())
    reference = evaluate_files(tiny / "gt.json", tiny / "predictions.json", backend="pycocotools")
    assert numbers["coco"]["AP"] == pytest.approx(reference["AP"])
    assert numbers["tide"]["counts"] == {"Cls": 1, "Loc": 1, "Both": 0, "Dupe": 0, "Bkg": 1, "Miss": 1}
    # Rows cat, dog, background; columns the same. Score >= 0.3 keeps all four boxes.
    assert numbers["confusion"]["counts"] == [[1, 0, 1], [1, 0, 1], [1, 1, 0]]
    assert [r["name"] for r in numbers["per_class"]] == ["dog", "cat"]
    assert numbers["dataset"]["boxes"] == 4 and numbers["dataset"]["class_counts"] == {"cat": 2, "dog": 2}
    assert numbers["anchor_coverage"]["table"][0]["boxes"] == 4
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_dataset_report_with_gt_alone(tiny):
    out = tiny / "data_report"
    assert main(["--gt", str(tiny / "gt.json"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "analysis.json",
        "anchor_coverage.png",
        "dataset.png",
        "report.html",
    ]
    numbers = json.loads((out / "analysis.json").read_text())
    assert numbers["dataset"]["size_counts"] == {"small": 3, "medium": 1, "large": 0}


def test_run_folder_mode_reads_config_and_predictions(tiny):
    run = tiny / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        f"data:\n  test:\n    - {{type: coco, name: tiny, ann_file: {tiny / 'gt.json'}, image_root: {tiny / 'images'}}}\n"
    )
    assert run_cli(main, [str(run)]) == 2  # no predictions.json yet
    (run / "predictions.json").write_text((tiny / "predictions.json").read_text())
    assert main([str(run)]) == 0
    numbers = json.loads((run / "analysis" / "analysis.json").read_text())
    assert numbers["tide"]["counts"]["Miss"] == 1
    assert (run / "analysis" / "missed.png").is_file()  # images from the config's image_root


def test_user_errors_are_one_line_with_exit_status_2(tiny, capsys):
    assert run_cli(main, ["--gt", str(tiny / "gt.json"), "--predictions", str(tiny / "predictions.json")]) == 2
    assert "--out" in capsys.readouterr().err
    bad = tiny / "bad.json"
    bad.write_text(json.dumps([{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]))
    assert run_cli(main, ["--gt", str(tiny / "gt.json"), "--predictions", str(bad), "--out", str(tiny / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not in the ground truth" in err


@pytest.mark.slow
def test_tools_analyze_script_runs(tiny):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "analyze.py"),
            "--gt",
            str(tiny / "gt.json"),
            "--out",
            str(tiny / "script"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tiny / "script" / "report.html").is_file()
