"""YOLO (Ultralytics layout) -> a COCO dict (see `detkit.data.formats`).

    data = read_yolo("mydata/data.yaml", split="val")   # or the folder that holds data.yaml

data.yaml (as Ultralytics reads it):
    path: .                 # dataset root; relative: to data.yaml's folder (else the current directory;
                            # Ultralytics takes it from its datasets_dir setting); absent: data.yaml's folder
    train: images/train     # a folder of images (searched recursively), a .txt list of image paths,
    val: images/val         # or a list of these; relative to `path` (`../x` that is not there: `x`)
    names: [cat, dog]       # or {0: cat, 1: dog}
The label file of `<...>/images/<...>/x.jpg` is `<...>/labels/<...>/x.txt` (the last `images` folder
of the path becomes `labels`), one object per line:
    class cx cy w h         # 5 numbers, the box centre and size normalised to [0, 1] by the image size
    class x1 y1 x2 y2 ...   # a segment (polygon, 3 or more points): its bounding box
A missing or empty label file is an image without objects. A line with 4, 6 or an even number of
values, a value outside [0, 1], or a class id that `names` does not list is bad input (Ultralytics
refuses such labels too). The image size is read from the image header (EXIF orientation applied,
as Ultralytics and detkit's decoder do); boxes are `[(cx - w/2) W, (cy - h/2) H, w W, h H]`.

Categories: `names` in its order (list index or dict key = class id), id = class + 1.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from detkit.data.formats._common import IMAGE_SUFFIXES, CocoBuilder, image_size, relative_file_name
from detkit.errors import DataError

logger = logging.getLogger(__name__)


def find_data_yaml(path: Path) -> Path:
    if path.is_file():
        return path
    for name in ("data.yaml", "data.yml", "dataset.yaml"):
        if (path / name).is_file():
            return path / name
    raise DataError(f"no YOLO data.yaml at {path}: give the data.yaml file (names + train/val paths) or its folder")


def read_data_yaml(yaml_file: Path) -> tuple[dict, Path, list[str]]:
    """(the parsed yaml, the dataset root, class names in id order)."""
    try:
        data = yaml.safe_load(yaml_file.read_text())
    except yaml.YAMLError as exc:
        raise DataError(f"{yaml_file}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or "names" not in data:
        raise DataError(f"{yaml_file}: a YOLO data.yaml needs `names` (a list or a {{id: name}} mapping)")
    root_text = data.get("path")
    if not root_text:
        root = yaml_file.parent
    else:
        root = Path(str(root_text)).expanduser()
        if not root.is_absolute():
            root = yaml_file.parent / root if (yaml_file.parent / root).exists() else Path.cwd() / root
    raw = data["names"]
    if isinstance(raw, list):
        names = [str(n) for n in raw]
    elif isinstance(raw, dict):
        try:
            keys = sorted(int(k) for k in raw)
        except (TypeError, ValueError):
            raise DataError(f"{yaml_file}: the keys of `names` must be class ids 0, 1, ...; got {list(raw)}") from None
        if keys != list(range(len(keys))):
            raise DataError(f"{yaml_file}: the class ids of `names` must be 0..{len(keys) - 1}; got {keys}")
        names = [str(raw[k] if k in raw else raw[str(k)]) for k in keys]
    else:
        raise DataError(f"{yaml_file}: `names` must be a list or an {{id: name}} mapping, got {type(raw).__name__}")
    if len(set(names)) != len(names):
        raise DataError(f"{yaml_file}: `names` lists a class twice: {names}")
    return data, root.absolute(), names


def _split_images(yaml_file: Path, data: dict, root: Path, split: str) -> list[Path]:
    entry = data.get(split)
    if not entry:
        available = [k for k in ("train", "val", "test") if data.get(k)]
        raise DataError(f"{yaml_file}: no {split!r} entry; set split: to one of {', '.join(available) or '(none)'}")
    images: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        p = Path(str(item)).expanduser()
        p = p if p.is_absolute() else root / p
        if not p.exists() and str(item).startswith("../"):
            p = root / str(item)[3:]  # Roboflow's `train: ../train/images` beside data.yaml (Ultralytics does this too)
        if p.is_dir():
            images.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text().splitlines():
                line = line.strip()
                if not line:
                    continue
                # Ultralytics: "./x" lines are relative to the list file's folder; others to the root
                f = p.parent / line[2:] if line.startswith("./") else Path(line)
                images.append(f if f.is_absolute() else root / f)
        else:
            raise DataError(f"{yaml_file}: {split}: {item!r} -> {p} is neither an image folder nor a .txt image list")
    return images


def label_file(image: Path) -> Path:
    """Ultralytics' rule: the last `/images/` of the path becomes `/labels/`, the suffix `.txt`."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    text = str(image)
    if sa in text:
        text = sb.join(text.rsplit(sa, 1))
    return Path(text).with_suffix(".txt")


def read_yolo(path: str | Path, *, split: str = "train", skip_bad: bool = False) -> dict:
    """Read one split of a YOLO dataset (see the module docstring) into a COCO dict."""
    yaml_file = find_data_yaml(Path(path))
    data, root, names = read_data_yaml(yaml_file)
    images = _split_images(yaml_file, data, root, split or "train")
    if not images:
        raise DataError(f"{yaml_file}: the {split!r} entry lists no images")
    builder = CocoBuilder(skip_bad)
    for image in images:
        width, height = image_size(image)
        image_id = builder.add_image(relative_file_name(image, root), width, height, source=str(image))
        labels = label_file(image)
        if not labels.is_file():
            continue  # no label file: an image without objects
        for number, line in enumerate(labels.read_text().splitlines(), start=1):
            values = line.split()
            if not values:
                continue
            where = f"{labels}:{number}"
            n = len(values)
            if n != 5 and (n < 7 or n % 2 == 0):
                builder.bad(
                    where,
                    f"{n} values; a YOLO line is `class cx cy w h` (5) or `class x1 y1 x2 y2 x3 y3 ...` "
                    "(a segment of 3 or more points)",
                )
                continue
            try:
                numbers = [float(v) for v in values]
            except ValueError:
                builder.bad(where, f"not a number in {line.strip()!r}")
                continue
            cls = numbers[0]
            if cls != int(cls) or not 0 <= cls < len(names):
                builder.bad(where, f"class {values[0]} is not a class id of names (0..{len(names) - 1})")
                continue
            coords = numbers[1:]
            if not all(0.0 <= c <= 1.0 for c in coords):
                builder.bad(where, f"coordinates must be normalised to [0, 1]; got {' '.join(values[1:])}")
                continue
            if n == 5:
                cx, cy, w, h = coords
                x0, y0 = cx - w / 2, cy - h / 2
            else:
                xs, ys = coords[0::2], coords[1::2]
                x0, y0 = min(xs), min(ys)
                w, h = max(xs) - x0, max(ys) - y0
            builder.add_box(image_id, names[int(cls)], [x0 * width, y0 * height, w * width, h * height], source=where)
    return builder.build(names, root)
