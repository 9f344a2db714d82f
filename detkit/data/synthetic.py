"""The synthetic shapes dataset: a COCO-format detection set generated from a seed.

    ann_file, image_root = ensure_shapes_dataset(ShapesParams(split="train", num_images=500), root="datasets/shapes")
    params_from_config(dataset_cfg)   # the same parameters from a `{type: shapes, ...}` config entry

Up to 8 classes (the first `num_classes` of SHAPE_NAMES): circle, square, triangle, star, hexagon,
cross, ring, arrow. Each image has 1..max_objects filled shapes of random colour, rotation, mild
stretch and size (the longer box side is drawn log-uniformly from [min_object_size, max_object_size],
by default 12 px to half the image's short side) on a background of a colour gradient with one of
smooth blotches, stripes, clutter lines or plain noise, plus pixel noise over everything. Later
shapes may overlap earlier ones (partial occlusion) but never hide more than half of an earlier box.
Boxes are the exact extent of each drawn polygon; `area` is the shape's filled pixel area.

Everything is a pure function of the parameters: image i of a split is drawn from
np.random.default_rng((seed, crc32(split), i)), so the set is the same however many processes
generate it. The files go to `<root>/<split>_<hash of the parameters>/` ({annotations.json, images/}),
written into a temporary folder and renamed into place, so a half-written set is never reused and
concurrent ranks do not clash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from detkit.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Bump when the drawing changes: it is part of the cache key, so old sets are not reused.
GENERATOR_VERSION = 1

SHAPE_NAMES = ("circle", "square", "triangle", "star", "hexagon", "cross", "ring", "arrow")

ANN_FILE_NAME = "annotations.json"
IMAGE_DIR_NAME = "images"

# Above this many images the set is drawn by a process pool.
_PARALLEL_MIN_IMAGES = 400


@dataclass(frozen=True)
class ShapesParams:
    """Everything that determines the generated files (and so their cache folder)."""

    split: str = "train"
    num_images: int = 200
    image_size: tuple[int, int] = (256, 256)  # (height, width)
    num_classes: int = 6
    max_objects: int = 6
    min_object_size: int = 12
    max_object_size: int = 0  # 0: half the image's short side
    seed: int = 0

    def validated(self) -> ShapesParams:
        h, w = self.image_size
        problems = []
        if not 1 <= self.num_classes <= len(SHAPE_NAMES):
            problems.append(f"num_classes={self.num_classes} must be 1..{len(SHAPE_NAMES)} ({', '.join(SHAPE_NAMES)})")
        if self.num_images < 1:
            problems.append(f"num_images={self.num_images} must be >= 1")
        if h < 32 or w < 32:
            problems.append(f"image_size={list(self.image_size)} must be at least 32 x 32")
        if self.max_objects < 1:
            problems.append(f"max_objects={self.max_objects} must be >= 1")
        if not 4 <= self.min_object_size <= self.max_size():
            problems.append(
                f"min_object_size={self.min_object_size} must be >= 4 and <= max_object_size ({self.max_size()}, "
                f"which must fit in the image: <= {min(h, w) - 2})"
            )
        if problems:
            raise ConfigError("shapes dataset: " + "; ".join(problems))
        return self

    def max_size(self) -> int:
        h, w = self.image_size
        return min(self.max_object_size or min(h, w) // 2, min(h, w) - 2)

    def cache_key(self) -> str:
        payload = {
            "version": GENERATOR_VERSION,
            "split": self.split,
            "num_images": self.num_images,
            "image_size": list(self.image_size),
            "num_classes": self.num_classes,
            "max_objects": self.max_objects,
            "min_object_size": self.min_object_size,
            "max_object_size": self.max_size(),
            "seed": self.seed,
        }
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def params_from_config(ds) -> ShapesParams:
    """ShapesParams from a `DatasetConfig` of type shapes."""
    return ShapesParams(
        split=ds.split,
        num_images=ds.num_images,
        image_size=tuple(ds.image_size),
        num_classes=ds.num_classes,
        max_objects=ds.max_objects,
        min_object_size=ds.min_object_size,
        max_object_size=ds.max_object_size,
        seed=ds.seed,
    ).validated()


# --------------------------------------------------------------------------------------------
# Shapes: polygons of circumradius 1 around the origin, (P, 2) xy; a ring also has a hole
# --------------------------------------------------------------------------------------------


def _regular(n: int, phase_deg: float = 90.0, radius: float = 1.0) -> np.ndarray:
    angles = np.deg2rad(phase_deg) + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), -np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    outer = _regular(2 * points)
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return outer * radii[:, None]


def _cross(arm: float = 0.34) -> np.ndarray:
    a, b = arm, 1.0 / math.sqrt(1 + arm * arm)  # arm tips on the unit circle
    a *= b
    return np.array(
        [[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]]
    )


def _arrow() -> np.ndarray:
    # pointing right: shaft from x=-1 to 0.15, head from 0.15 to 1
    return np.array([[-1.0, -0.2], [0.15, -0.2], [0.15, -0.6], [1.0, 0.0], [0.15, 0.6], [0.15, 0.2], [-1.0, 0.2]])


_POLYGONS: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
    "circle": (_regular(64), None),
    "square": (_regular(4, phase_deg=45), None),
    "triangle": (_regular(3), None),
    "star": (_star(), None),
    "hexagon": (_regular(6, phase_deg=0), None),
    "cross": (_cross(), None),
    "ring": (_regular(64), _regular(64, radius=0.55)),
    "arrow": (_arrow(), None),
}


# --------------------------------------------------------------------------------------------
# Drawing one image
# --------------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float32 0..255: a two-colour gradient with a random texture."""
    c0, c1 = rng.uniform(20, 235, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    xx = np.arange(w, dtype=np.float32)[None, :]
    yy = np.arange(h, dtype=np.float32)[:, None]
    t = xx * np.float32(np.cos(angle)) + yy * np.float32(np.sin(angle))  # (h, w)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    image = c0 + (c1 - c0) * t[..., None]
    kind = rng.integers(0, 4)
    if kind == 0:  # smooth blotches: low-resolution noise blown up
        small = rng.normal(0, 28, size=(rng.integers(3, 9), rng.integers(3, 9), 3)).astype(np.float32)
        image += cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    elif kind == 1:  # stripes
        period = rng.uniform(6, 24)
        phase = rng.uniform(0, 2 * np.pi)
        theta = rng.uniform(0, np.pi)
        wave = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period + phase)
        image += (np.float32(rng.uniform(8, 22)) * wave)[..., None]
    elif kind == 2:  # clutter: thin random lines and arcs, not any class
        clutter = np.zeros((h, w, 3), np.float32)
        for _ in range(rng.integers(3, 10)):
            p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            color = tuple(float(v) for v in rng.uniform(-60, 60, 3))
            cv2.line(clutter, p0, p1, color, int(rng.integers(1, 3)), cv2.LINE_AA)
        image += clutter
    # kind 3: gradient only; pixel noise is added for every image after the shapes
    return image


def _draw_image(params: ShapesParams, index: int) -> tuple[bytes, list[dict]]:
    """JPEG bytes of image `index` and its objects [{category, bbox_xyxy, area}]."""
    split_code = zlib.crc32(params.split.encode())
    rng = np.random.default_rng((params.seed & 0xFFFFFFFF, split_code, index))
    h, w = params.image_size
    image = _background(rng, h, w)
    lo, hi = params.min_object_size, params.max_size()
    objects: list[dict] = []
    num_objects = int(rng.integers(1, params.max_objects + 1))
    for _ in range(num_objects):
        for _attempt in range(30):
            category = int(rng.integers(0, params.num_classes))
            outer, inner = _POLYGONS[SHAPE_NAMES[category]]
            size = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            stretch = rng.uniform(0.8, 1.25)
            angle = rng.uniform(0, 2 * np.pi)
            scale = np.array([stretch, 1.0 / stretch])
            rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            shape = (outer * scale) @ rot.T  # (P, 2)
            extent = (shape.max(axis=0) - shape.min(axis=0)).max()
            shape *= size / extent
            lo_xy, hi_xy = shape.min(axis=0), shape.max(axis=0)
            cx = rng.uniform(-lo_xy[0], w - hi_xy[0])
            cy = rng.uniform(-lo_xy[1], h - hi_xy[1])
            box = np.array([cx + lo_xy[0], cy + lo_xy[1], cx + hi_xy[0], cy + hi_xy[1]])
            if not any(_hides_too_much(box, o["bbox_xyxy"]) for o in objects):
                break
        else:
            continue  # no free place for this object: the image gets fewer
        # draw in the patch around the box only; fillPoly takes fixed-point coordinates (shift 4 = 1/16 px)
        x0, y0 = max(int(box[0]) - 1, 0), max(int(box[1]) - 1, 0)
        x1, y1 = min(math.ceil(box[2]) + 1, w), min(math.ceil(box[3]) + 1, h)
        offset = np.array([cx - x0, cy - y0]) - 0.5  # pixel centres sit at integer + 0.5
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(mask, [np.round((shape + offset) * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
        if inner is not None:
            hole = (inner * scale) @ rot.T * (size / extent)
            cv2.fillPoly(mask, [np.round((hole + offset) * 16).astype(np.int32)], 0, cv2.LINE_AA, shift=4)
        alpha = mask.astype(np.float32)[..., None] / 255.0
        patch = image[y0:y1, x0:x1]
        region = alpha[..., 0] > 0.5
        local_mean = patch[region].mean(axis=0) if region.any() else patch.reshape(-1, 3).mean(axis=0)
        color = _contrasting_color(rng, local_mean)
        image[y0:y1, x0:x1] = patch * (1 - alpha) + color.astype(np.float32) * alpha
        objects.append({"category": category, "bbox_xyxy": box, "area": float(alpha.sum())})
    image += np.float32(rng.uniform(2, 10)) * rng.standard_normal(size=image.shape, dtype=np.float32)
    image_u8 = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", image_u8, [cv2.IMWRITE_JPEG_QUALITY, 92])
    if not ok:
        raise DataError(f"OpenCV could not encode shapes image {index} as JPEG")
    return jpeg.tobytes(), objects


def _hides_too_much(new_box: np.ndarray, old_box: np.ndarray, max_hidden: float = 0.5) -> bool:
    """True when new_box covers more than max_hidden of old_box's area (it is drawn on top)."""
    ix = max(0.0, min(new_box[2], old_box[2]) - max(new_box[0], old_box[0]))
    iy = max(0.0, min(new_box[3], old_box[3]) - max(new_box[1], old_box[1]))
    old_area = (old_box[2] - old_box[0]) * (old_box[3] - old_box[1])
    new_area = (new_box[2] - new_box[0]) * (new_box[3] - new_box[1])
    # the second test keeps a small old shape from hiding inside a big new one's box
    return bool(ix * iy > max_hidden * old_area or ix * iy > max_hidden * new_area)


def _contrasting_color(rng: np.random.Generator, background: np.ndarray, min_distance: float = 90.0) -> np.ndarray:
    """A random (3,) colour at least min_distance (L1 over channels) from the background mean."""
    best, best_d = background, -1.0  # replaced by the first draw: every distance is >= 0
    for _ in range(20):
        color = rng.uniform(0, 255, 3)
        d = float(np.abs(color - background).sum())
        if d >= min_distance:
            return color
        if d > best_d:
            best, best_d = color, d
    return best


# --------------------------------------------------------------------------------------------
# Writing a split
# --------------------------------------------------------------------------------------------


def _write_images(params: ShapesParams, indices: list[int], image_dir: str) -> list[tuple[int, list[dict]]]:
    out = []
    for i in indices:
        jpeg, objects = _draw_image(params, i)
        with open(os.path.join(image_dir, _file_name(i)), "wb") as f:
            f.write(jpeg)
        out.append((i, objects))
    return out


def _file_name(index: int) -> str:
    return f"{index + 1:06d}.jpg"


def generate_shapes(params: ShapesParams, out_dir: str | os.PathLike, workers: int | None = None) -> Path:
    """Write the split described by `params` into out_dir/{annotations.json, images/}.

    workers: processes drawing images (None: up to 8 when num_images >= 400, else 1). The files
    do not depend on it. Returns the path of the annotation json.
    """
    params = params.validated()
    out = Path(out_dir)
    image_dir = out / IMAGE_DIR_NAME
    image_dir.mkdir(parents=True, exist_ok=True)
    n = params.num_images
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if n >= _PARALLEL_MIN_IMAGES else 1
    chunks = [list(range(s, min(n, s + 64))) for s in range(0, n, 64)]
    results = None
    if workers > 1 and len(chunks) > 1:
        try:
            # spawn, not fork: the caller may hold torch/OpenMP/OpenCV threads whose locks a forked
            # child would inherit held
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                parts = pool.map(_write_images, [params] * len(chunks), chunks, [str(image_dir)] * len(chunks))
                results = [r for part in parts for r in part]
        except (OSError, RuntimeError, BrokenProcessPool) as exc:  # no /dev/shm, no spawn from this __main__, ...
            logger.warning("shapes generation: the process pool failed (%s); drawing in this process instead", exc)
    if results is None:
        results = [r for chunk in chunks for r in _write_images(params, chunk, str(image_dir))]

    h, w = params.image_size
    images: list[dict] = []
    annotations: list[dict] = []
    for i, objects in sorted(results, key=lambda r: r[0]):
        images.append({"id": i + 1, "file_name": _file_name(i), "height": h, "width": w})
        for obj in objects:
            x0, y0, x1, y1 = (round(float(v), 2) for v in obj["bbox_xyxy"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": obj["category"] + 1,
                    "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                    "area": round(obj["area"], 1),
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {
            "description": "detkit synthetic shapes",
            "version": GENERATOR_VERSION,
            "params": _params_dict(params),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": SHAPE_NAMES[k], "supercategory": "shape"} for k in range(params.num_classes)
        ],
    }
    ann_file = out / ANN_FILE_NAME
    ann_file.write_text(json.dumps(coco))
    return ann_file


def _params_dict(params: ShapesParams) -> dict:
    return {
        "split": params.split,
        "num_images": params.num_images,
        "image_size": list(params.image_size),
        "num_classes": params.num_classes,
        "max_objects": params.max_objects,
        "min_object_size": params.min_object_size,
        "max_object_size": params.max_size(),
        "seed": params.seed,
    }


def shapes_dir(params: ShapesParams, root: str | os.PathLike) -> Path:
    """The cache folder of a split: <root>/<split>_<12 hex digits of the parameters' hash>."""
    return Path(root) / f"{params.split}_{params.cache_key()}"


def ensure_shapes_dataset(
    params: ShapesParams, root: str | os.PathLike = "datasets/shapes", workers: int | None = None
) -> tuple[str, str]:
    """Generate the split on first use, reuse it afterwards. Returns (ann_file, image_root)."""
    params = params.validated()
    final = shapes_dir(params, root)
    ann_file, image_root = final / ANN_FILE_NAME, final / IMAGE_DIR_NAME
    if ann_file.is_file():
        return str(ann_file), str(image_root)
    final.parent.mkdir(parents=True, exist_ok=True)
    logger.info(
        "generating %d shapes images (%s split, %dx%d) into %s",
        params.num_images,
        params.split,
        *params.image_size,
        final,
    )
    # A folder, not a file, so not detkit.utils.files.atomic_output: os.rename cannot replace a
    # non-empty folder, and a failed rename onto a folder that another process completed first
    # is success here, not an error.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        generate_shapes(params, tmp, workers=workers)
        try:
            os.rename(tmp, final)
        except OSError:
            if not ann_file.is_file():  # not another process that finished first: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(ann_file), str(image_root)
