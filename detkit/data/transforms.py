"""albumentations pipelines that keep boxes right: resize, flip and any transform named in YAML.

Training pipeline (in this order):
    1. the `data.augment` entries, e.g. [{name: ColorJitter, p: 0.5}, {name: RandomBrightnessContrast}],
       on the original image (cheaper than on the enlarged one, and a crop here does not change the
       final size);
    2. ResizeShortestEdge: short side drawn per image from `data.min_size_train`, long side capped at
       `data.max_size_train` (Detectron2's semantics, one interpolation);
    3. HorizontalFlip with probability `data.flip_prob`.
Test pipeline: ResizeShortestEdge to `data.min_size_test` / `data.max_size_test` only.

Boxes travel through albumentations as "pascal_voc" (xyxy pixels); they are clipped to the image
and a box that a crop or an affine transform squeezes to zero width or height is dropped with its
label. Each call can be seeded, so a sample's augmentation depends only on its seed (see loader.py).
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network call on import
import albumentations as A

from detkit.errors import ConfigError


def resized_hw(height: int, width: int, short_size: int, max_size: int) -> tuple[int, int]:
    """Detectron2's ResizeShortestEdge output size for an input of (height, width).

    With Detectron2's arithmetic, in its order (so that the rounding at .5 agrees): the short side
    becomes exactly short_size and the long side scale * long with scale = short_size / short; if
    the long side then exceeds max_size (max_size <= 0: no cap), both are multiplied by
    max_size / long; each is rounded as int(x + 0.5). short_size <= 0: unchanged.
    """
    if short_size <= 0:
        return height, width
    size = float(short_size)
    scale = size / min(height, width)
    new_h, new_w = (size, scale * width) if height < width else (scale * height, size)
    if max_size > 0 and max(new_h, new_w) > max_size:
        cap = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    return int(new_h + 0.5), int(new_w + 0.5)


RESIZE_METHODS = ("cv2", "pil")


def resize_image(image: np.ndarray, height: int, width: int, method: str = "cv2") -> np.ndarray:
    """Bilinear resize of an (H, W, C) uint8 image to (height, width).

    method "cv2": OpenCV's INTER_LINEAR (fast; no antialiasing when shrinking).
    method "pil": Pillow's BILINEAR filter, which Detectron2's ResizeShortestEdge applies to uint8
    images: a triangle filter widened by the shrink factor (antialiased). The two differ by ~1.2
    grey levels on average, up to ~9, when shrinking by 2x; "pil" gives Detectron2's inputs exactly.
    """
    if method == "cv2":
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    if method == "pil":
        from PIL import Image

        if image.ndim == 3 and image.shape[2] == 1:
            return np.asarray(
                Image.fromarray(image[:, :, 0], mode="L").resize((width, height), Image.Resampling.BILINEAR)
            )[:, :, None]
        return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
    raise ConfigError(f"data.resize_method={method!r}: use one of {', '.join(RESIZE_METHODS)}")


class ResizeShortestEdge(A.DualTransform):
    """Resize so the short side is one of `short_sizes` (drawn per call) and the long side <= max_size.

    The image is interpolated once, bilinearly, by `method` ("cv2" or "pil", see `resize_image`);
    boxes scale with it (albumentations keeps them normalized to the image size internally, so they
    need no work here).
    """

    def __init__(self, short_sizes: Sequence[int], max_size: int, method: str = "cv2", p: float = 1.0):
        super().__init__(p=p)
        self.short_sizes = tuple(int(s) for s in short_sizes)
        if not self.short_sizes:
            raise ValueError("ResizeShortestEdge needs at least one short side size")
        if method not in RESIZE_METHODS:
            raise ConfigError(f"data.resize_method={method!r}: use one of {', '.join(RESIZE_METHODS)}")
        self.max_size = int(max_size)
        self.method = method

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        short = self.short_sizes[0] if len(self.short_sizes) == 1 else self.py_random.choice(self.short_sizes)
        return {"target_hw": resized_hw(height, width, short, self.max_size)}

    def apply(self, img: np.ndarray, target_hw: tuple[int, int] = (0, 0), **params: Any) -> np.ndarray:
        if img.shape[:2] == tuple(target_hw):
            return img
        return resize_image(img, target_hw[0], target_hw[1], self.method)

    def apply_to_mask(self, mask: np.ndarray, target_hw: tuple[int, int] = (0, 0), **params: Any) -> np.ndarray:
        if mask.shape[:2] == tuple(target_hw):
            return mask
        return cv2.resize(mask, (target_hw[1], target_hw[0]), interpolation=cv2.INTER_NEAREST)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes  # normalized coordinates do not change under a resize

    def apply_to_keypoints(
        self, keypoints: np.ndarray, target_hw: tuple[int, int] = (0, 0), **params: Any
    ) -> np.ndarray:
        height, width = params["shape"][:2]
        out = keypoints.copy()
        out[:, 0] *= target_hw[1] / width
        out[:, 1] *= target_hw[0] / height
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("short_sizes", "max_size", "method")


def build_augmentation(spec: dict, where: str = "data.augment") -> A.BasicTransform:
    """One albumentations transform from a YAML entry {name: ColorJitter, p: 0.5, brightness: 0.2}.

    A `transforms` list inside an entry (for OneOf, SomeOf, Sequential) is built recursively.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ConfigError(
            f"{where} = {spec!r}: each entry must be a mapping with a 'name', e.g. {{name: ColorJitter, p: 0.5}}"
        )
    kwargs = dict(spec)
    name = kwargs.pop("name")
    cls: type[Any] | None = getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, (A.BasicTransform, A.BaseCompose))):
        known = [
            n
            for n in dir(A)
            if isinstance(getattr(A, n), type) and issubclass(getattr(A, n), (A.BasicTransform, A.BaseCompose))
        ]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(
            f"{where}: {name!r} is not an albumentations transform (albumentations {A.__version__}).{hint}"
        )
    if "transforms" in kwargs:
        children = kwargs["transforms"]
        if not isinstance(children, (list, tuple)):
            raise ConfigError(f"{where} ({name}): 'transforms' must be a list of entries")
        kwargs["transforms"] = [build_augmentation(c, f"{where}.transforms[{i}]") for i, c in enumerate(children)]
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            valid = ", ".join(k for k in params if k != "self")
            raise ConfigError(
                f"{where}: {name} has no argument(s) {', '.join(map(repr, unknown))}; its arguments are: {valid}"
            )
    try:
        return cls(**kwargs)
    except Exception as exc:  # noqa: BLE001 - pydantic ValidationError, TypeError for unknown arguments, ...
        message = " ".join(str(exc).split())
        raise ConfigError(
            f"{where}: cannot build {name}({', '.join(f'{k}={v!r}' for k, v in spec.items() if k != 'name')}): {message}"
        ) from None


@dataclass
class TransformOutput:
    """image (H, W, 3) uint8, boxes (G, 4) float32 xyxy in its frame, labels (G,) int64."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray


class DetectionTransform:
    """A seeded albumentations pipeline over an image and its xyxy boxes.

    tf = build_test_transform(cfg)
    out = tf(image)                    # out.image resized; out.boxes empty
    out = tf(image, boxes, labels, seed=1234)
    """

    def __init__(self, transforms: Sequence[A.BasicTransform]):
        self.transforms = list(transforms)
        self.compose = A.Compose(
            self.transforms,
            bbox_params=A.BboxParams(
                format="pascal_voc", label_fields=["labels"], clip=True, filter_invalid_bboxes=True
            ),
            seed=0,
        )

    def __call__(
        self,
        image: np.ndarray,
        boxes: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        seed: int | None = None,
    ) -> TransformOutput:
        """image (H, W, 3) uint8; boxes (G, 4) xyxy pixels; labels (G,). seed: draws of this call."""
        boxes = np.zeros((0, 4), np.float32) if boxes is None else np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.zeros((len(boxes),), np.int64) if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
        if seed is not None:
            self.compose.set_random_seed(int(seed) % (2**32))
        out = self.compose(image=image, bboxes=boxes, labels=labels)
        out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        out_labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        # albumentations keeps boxes of positive area; a sliver below 1e-3 px is no use as a target
        keep = (out_boxes[:, 2] - out_boxes[:, 0] > 1e-3) & (out_boxes[:, 3] - out_boxes[:, 1] > 1e-3)
        return TransformOutput(np.ascontiguousarray(out["image"]), out_boxes[keep], out_labels[keep])

    def __repr__(self) -> str:
        return f"DetectionTransform({self.transforms})"


def build_train_transform(cfg) -> DetectionTransform:
    """cfg: the full Config (or anything with a `.data` DataConfig)."""
    data = cfg.data if hasattr(cfg, "data") else cfg
    transforms = [build_augmentation(spec, f"data.augment[{i}]") for i, spec in enumerate(data.augment)]
    transforms.append(ResizeShortestEdge(data.min_size_train, data.max_size_train, method=data.resize_method))
    if data.flip_prob > 0:
        transforms.append(A.HorizontalFlip(p=data.flip_prob))
    return DetectionTransform(transforms)


def build_test_transform(cfg) -> DetectionTransform:
    """The test-time resize (short side data.min_size_test, long side <= data.max_size_test)."""
    data = cfg.data if hasattr(cfg, "data") else cfg
    return DetectionTransform([ResizeShortestEdge([data.min_size_test], data.max_size_test, method=data.resize_method)])
