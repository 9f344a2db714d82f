"""YAML configs -> frozen, typed dataclasses.

    cfg = load_config("configs/frcnn_r101.yaml", overrides=["solver.base_lr=0.01"])
    cfg.model.rpn.nms_thresh            # 0.7
    dump_config(cfg, "out/config.yaml") # loads back to an equal object

A config file may name a parent with `_base_: base.yaml` (a path relative to the file; chains are
allowed); the child overrides only what differs: mappings merge key by key, lists and scalars are
replaced whole. Overrides are dotted `key=value` strings whose value is parsed as YAML. Every key is
checked against the dataclasses below: an unknown key or a wrong type raises `ConfigError` naming the
key, where it came from and the closest valid names.

The field names are the keyword arguments of the classes they feed (`model.rpn.nms_thresh` ->
`RPN(nms_thresh=...)`), and `configs/base.yaml` lists every one of them with a comment.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from detkit.errors import ConfigError

# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneConfig:
    weights: str = ""  # ImageNet ResNet checkpoint: "imagenet", a local file, or a torchvision weights enum name
    weights_format: Literal["auto", "torchvision", "msra", "detectron2", "detkit"] = "auto"
    norm: Literal["FrozenBN", "BN", "SyncBN", "GN"] = "FrozenBN"
    freeze_at: int = 2
    stride_in_1x1: bool = False
    shortcut: Literal["A", "B", "C"] = "B"


@dataclass(frozen=True)
class RPNConfig:
    anchor_sizes: tuple[float, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_stride: int = 16
    iou_thresholds: tuple[float, float] = (0.3, 0.7)
    allow_low_quality_matches: bool = True
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    bbox_reg_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    smooth_l1_beta: float = 0.0
    loss_weight: float = 1.0
    pre_nms_topk_train: int = 12000
    pre_nms_topk_test: int = 6000
    post_nms_topk_train: int = 2000
    post_nms_topk_test: int = 1000
    nms_thresh: float = 0.7
    min_box_size: float = 0.0


@dataclass(frozen=True)
class ROIHeadsConfig:
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    iou_threshold: float = 0.5
    pooler_resolution: int = 14
    sampling_ratio: int = 0
    aligned: bool = True
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    smooth_l1_beta: float = 0.0
    cls_agnostic_bbox_reg: bool = False
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_image: int = 100


@dataclass(frozen=True)
class ModelConfig:
    depth: int = 101
    num_classes: int = 80
    weights: str = ""  # a full detector checkpoint (detkit .pth, Detectron2 .pkl/.pth)
    weights_format: Literal["auto", "detkit", "detectron2", "msra", "torchvision"] = "auto"
    input_format: Literal["RGB", "BGR"] = "RGB"
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    channels_last: bool = False
    compile: bool = False
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: ROIHeadsConfig = field(default_factory=ROIHeadsConfig)


@dataclass(frozen=True)
class DatasetConfig:
    type: Literal["coco", "shapes", "voc", "yolo", "labelme", "cvat"] = "coco"
    name: str = ""
    # type coco
    ann_file: str = ""
    image_root: str = ""  # also voc / labelme / cvat: where the images are, when not the format's default
    # types voc, yolo, labelme, cvat (detkit.data.formats): what the labelling tool wrote; `split` picks
    # VOC's ImageSets/Main/<split>.txt ("" = every XML) or the data.yaml key of YOLO
    path: str = ""
    subset: str = ""  # cvat: only the images of this subset
    # every type but shapes: the class table (renamed, then selected, then empty classes dropped)
    classes: tuple[str, ...] = ()  # keep these classes, in this order (ids 1..K)
    rename: dict = field(default_factory=dict)  # {old: new}; one new name for several old ones merges them
    drop_empty_classes: bool = False  # remove classes without a single box (always reported)
    skip_bad: bool = False  # skip unparseable annotations (listed and counted) instead of stopping
    # type shapes: generated on first use under `root`, cached by these parameters
    root: str = "datasets/shapes"
    split: str = "train"
    num_images: int = 200
    image_size: tuple[int, int] = (256, 256)  # (height, width)
    num_classes: int = 6
    max_objects: int = 6
    min_object_size: int = 12  # longer box side of the smallest shapes, pixels
    max_object_size: int = 0  # ... of the largest; 0 = half the image's short side
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    train: tuple[DatasetConfig, ...] = ()
    test: tuple[DatasetConfig, ...] = ()
    min_size_train: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    flip_prob: float = 0.5
    augment: tuple[dict, ...] = ()
    size_divisibility: int = 32
    resize_method: Literal["cv2", "pil"] = "cv2"
    filter_empty: bool = True
    max_bad_image_fraction: float = 0.01
    aspect_ratio_grouping: bool = True
    num_workers: int = 4
    pin_memory: bool = True
    persistent_workers: bool = True


@dataclass(frozen=True)
class SolverConfig:
    ims_per_batch: int = 16
    optimizer: Literal["sgd", "adamw"] = "sgd"
    base_lr: float = 0.02
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    weight_decay_bias: float | None = None  # None: same as weight_decay
    bias_lr_factor: float = 1.0
    lr_scheduler: Literal["multistep", "cosine"] = "multistep"
    max_iter: int = 270000
    steps: tuple[int, ...] = (210000, 250000)
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    warmup_method: Literal["linear", "constant"] = "linear"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    clip_grad_norm: float = 0.0
    checkpoint_period: int = 5000
    max_to_keep: int = 3
    log_period: int = 20
    # Signals that make training save a checkpoint of the current iteration and exit (status 75);
    # SIGUSR1 is SLURM's usual warning signal (sbatch --signal=USR1@90). [] turns this off.
    preempt_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")


@dataclass(frozen=True)
class TestConfig:
    __test__ = False  # not a pytest class
    eval_period: int = 0
    # coco: COCOeval's 12 numbers; voc07 / voc12: Pascal VOC AP (11-point / area under the curve),
    # Detectron2's PascalVOCDetectionEvaluator arithmetic (detkit.engine.voc_evaluator).
    metric: Literal["coco", "voc07", "voc12"] = "coco"
    eval_backend: Literal["auto", "pycocotools", "faster_coco_eval"] = "auto"  # for metric: coco
    ims_per_batch: int = 8
    amp: Literal["off", "bf16", "fp16", "auto"] = "off"  # inference precision (Detectron2: fp32)
    # With eval_period > 0: model_best.pth holds the weights of the evaluation with the best value
    # of this metric (any key the evaluation writes to metrics.jsonl; "" = no model_best.pth).
    best_metric: str = "bbox/AP"
    best_mode: Literal["max", "min"] = "max"
    # Stop training after this many evaluations in a row without an improvement larger than
    # early_stop_min_delta over the best value (0 = never stop early).
    early_stop_patience: int = 0
    early_stop_min_delta: float = 0.0
    # Each image of a test batch gets its detections alone (docs/numerics.md); false: Detectron2's
    # padded-batch arithmetic, where the other images' padding changes an image's detections.
    batch_invariant: bool = True


TRACKERS = ("tensorboard", "mlflow", "wandb")


@dataclass(frozen=True)
class LoggingConfig:
    # Where metrics go besides metrics.jsonl (rank 0 only): tensorboard (when the package is
    # installed), mlflow (the `mlflow` extra), wandb (the `wandb` extra).
    trackers: tuple[str, ...] = ("tensorboard",)
    experiment: str = "detkit"  # MLflow experiment name / W&B project
    run_name: str = ""  # "" = the output_dir folder's name
    mlflow_tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else the file store ./mlruns
    wandb_mode: Literal["", "online", "offline", "disabled"] = ""  # "" = $WANDB_MODE, else online
    wandb_entity: str = ""  # W&B team or user ("" = the account's default)


@dataclass(frozen=True)
class Config:
    output_dir: str = "output"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    cudnn_benchmark: bool = False
    allow_tf32: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    test: TestConfig = field(default_factory=TestConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

BASE_KEY = "_base_"


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Read one YAML file and everything it inherits, merged (child wins)."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in chain + (path,))
        raise ConfigError(f"config inheritance loops: {cycle}")
    if not path.is_file():
        where = f" (named by {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    _tag_source(data, str(path))
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else base
    merged: dict = {}
    for one in bases:
        merged = _merge(merged, _read_yaml(path.parent / one, chain + (path,)))
    return _merge(merged, data)


# The file a key came from, kept beside the raw dicts so errors can name it.
_SOURCES: dict[int, str] = {}


def _tag_source(data: dict, source: str) -> None:
    _SOURCES[id(data)] = source
    for value in data.values():
        if isinstance(value, dict):
            _tag_source(value, source)


def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            merged = _merge(out[key], value)
            _SOURCES[id(merged)] = _SOURCES.get(id(value), "")
            out[key] = merged
        else:
            out[key] = value
    _SOURCES[id(out)] = _SOURCES.get(id(child), "")
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'model.rpn.nms_thresh=0.6' -> (['model', 'rpn', 'nms_thresh'], 0.6)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (example: solver.base_lr=0.01)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {exc}") from None
    return key.split("."), value


def _apply_override(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML config (with inheritance) and dotted overrides into a validated `Config`.

    path None gives the defaults of the dataclasses (which equal configs/base.yaml).
    """
    data = _read_yaml(Path(path)) if path is not None else {}
    for text in overrides:
        parts, value = parse_override(text)
        # Validate the key against the schema before merging so the error says "override".
        _check_key_path(parts, source=f"command-line override {text!r}")
        _apply_override(data, parts, value)
    return from_dict(Config, data, key_prefix="", source=str(path) if path else "<defaults>")


def config_from_dict(data: dict) -> Config:
    """Build a `Config` from a plain (possibly partial) dict, e.g. one stored in a checkpoint."""
    return from_dict(Config, data, key_prefix="", source="<dict>")


def _check_key_path(parts: list[str], source: str) -> None:
    cls: Any = Config
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            prefix = ".".join(parts[:i])
            raise ConfigError(f"{source}: {prefix} is a value, not a section; it has no key {part!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            prefix = ".".join(parts[:i])
            raise ConfigError(_unknown_key_message(part, prefix, names, source))
        hint = typing.get_type_hints(cls)[part]
        cls = hint if dataclasses.is_dataclass(hint) else None


def _unknown_key_message(key: str, prefix: str, valid: list[str], source: str) -> str:
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = ""
    if close:
        hint = " Did you mean " + " or ".join(f"{prefix + '.' if prefix else ''}{c}" for c in close) + "?"
    listing = ", ".join(valid)
    return f"{source}: unknown config key {full!r}.{hint} Valid keys here: {listing}."


def from_dict(cls: type, data: Any, key_prefix: str, source: str) -> Any:
    """Recursively convert a raw mapping into dataclass `cls`, checking keys and types."""
    where = _SOURCES.get(id(data), source) if isinstance(data, dict) else source
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {key_prefix or 'the config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(_unknown_key_message(str(key), key_prefix, names, where))
        full = f"{key_prefix}.{key}" if key_prefix else key
        kwargs[key] = _convert(hints[key], value, full, where)
    obj = cls(**kwargs)
    _validate(obj, key_prefix, where)
    return obj


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str, where: str) -> Any:
    def fail() -> ConfigError:
        return ConfigError(f"{where}: {key} must be {_type_name(tp)}, got {value!r}")

    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key, where)
    origin = typing.get_origin(tp)
    if origin is Literal:
        # YAML 1.1 reads a bare `off` / `on` as a boolean: `solver.amp=off` means the string.
        if isinstance(value, bool) and ("on" if value else "off") in typing.get_args(tp):
            value = "on" if value else "off"
        if value not in typing.get_args(tp):
            raise fail()
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key, where)
            except ConfigError:
                pass
        raise fail()
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail()
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]", where) for i, v in enumerate(value))
        if len(value) != len(args):
            raise fail()
        return tuple(_convert(a, v, f"{key}[{i}]", where) for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail()
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise fail()
        return dict(value)
    raise ConfigError(f"{where}: {key}: unsupported type {tp}")  # a schema bug, not a user one


def _validate(obj: Any, prefix: str, where: str) -> None:
    """Value checks that the types alone cannot express."""

    def bad(key: str, msg: str) -> ConfigError:
        full = f"{prefix}.{key}" if prefix else key
        return ConfigError(f"{where}: {full}={getattr(obj, key)!r}: {msg}")

    if isinstance(obj, ModelConfig):
        if obj.depth not in (18, 34, 50, 101, 152):
            raise bad("depth", "must be one of 18, 34, 50, 101, 152")
        if obj.num_classes < 1:
            raise bad("num_classes", "must be at least 1 (background is added by the model)")
    elif isinstance(obj, BackboneConfig):
        if not 0 <= obj.freeze_at <= 5:
            raise bad("freeze_at", "must be 0 (train all) .. 5 (freeze stem and res2..res5)")
    elif isinstance(obj, RPNConfig):
        lo, hi = obj.iou_thresholds
        if not 0.0 <= lo <= hi <= 1.0:
            raise bad("iou_thresholds", "must be [low, high] with 0 <= low <= high <= 1")
        if not 0.0 < obj.positive_fraction <= 1.0:
            raise bad("positive_fraction", "must be in (0, 1]")
        if not obj.anchor_sizes or not obj.aspect_ratios:
            raise bad("anchor_sizes", "anchor_sizes and aspect_ratios must not be empty")
    elif isinstance(obj, ROIHeadsConfig):
        if not 0.0 < obj.positive_fraction <= 1.0:
            raise bad("positive_fraction", "must be in (0, 1]")
    elif isinstance(obj, SolverConfig):
        if obj.ims_per_batch < 1:
            raise bad("ims_per_batch", "must be >= 1")
        if list(obj.steps) != sorted(obj.steps):
            raise bad("steps", "must be increasing")
        if obj.max_iter < 1:
            raise bad("max_iter", "must be >= 1")
    elif isinstance(obj, TestConfig):
        if obj.early_stop_patience < 0:
            raise bad("early_stop_patience", "must be >= 0 (0 = no early stopping)")
        if obj.early_stop_min_delta < 0:
            raise bad("early_stop_min_delta", "must be >= 0 (an improvement must exceed it)")
        if obj.early_stop_patience > 0 and not obj.best_metric:
            raise bad("early_stop_patience", "needs test.best_metric (the metric whose improvement it waits for)")
        if obj.early_stop_patience > 0 and obj.eval_period <= 0:
            raise bad("early_stop_patience", "needs test.eval_period > 0 (it counts the periodic evaluations)")
    elif isinstance(obj, LoggingConfig):
        unknown = [t for t in obj.trackers if t not in TRACKERS]
        if unknown:
            raise bad("trackers", f"unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)}")
        if len(set(obj.trackers)) != len(obj.trackers):
            raise bad("trackers", "lists a tracker twice")
    elif isinstance(obj, DataConfig):
        if not obj.min_size_train:
            raise bad("min_size_train", "needs at least one size")
        if not 0.0 <= obj.flip_prob <= 1.0:
            raise bad("flip_prob", "must be in [0, 1]")
    elif isinstance(obj, DatasetConfig) and obj.type == "coco" and (not obj.ann_file or not obj.image_root):
        raise ConfigError(
            f"{where}: {prefix}: a dataset of type coco needs ann_file and image_root "
            f"(got ann_file={obj.ann_file!r}, image_root={obj.image_root!r})"
        )


# --------------------------------------------------------------------------------------------
# Dumping
# --------------------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict:
    """Plain dict (lists, not tuples) of a config, ready for YAML or a checkpoint."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def dump_config(cfg: Config, path: str | Path | None = None) -> str:
    """YAML text of the resolved config; also written to `path` when given."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def replace(cfg: Any, **changes: Any) -> Any:
    """`dataclasses.replace` with dotted keys: replace(cfg, **{"solver.max_iter": 10})."""
    nested: dict[str, dict] = {}
    direct = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in nested.items():
        direct[head] = replace(getattr(cfg, head), **sub)
    return dataclasses.replace(cfg, **direct)
