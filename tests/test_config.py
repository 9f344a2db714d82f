"""detkit.config: inheritance, overrides, validation, dump/load."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from detkit.config import Config, config_from_dict, config_to_dict, dump_config, load_config, replace
from detkit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _all_keys(cls, prefix=""):
    keys = []
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        keys.append(full)
        if dataclasses.is_dataclass(f.type if not isinstance(f.type, str) else None):
            keys += _all_keys(f.type, full + ".")
    return keys


def test_base_yaml_equals_dataclass_defaults():
    assert load_config(CONFIGS / "base.yaml") == Config()


def test_base_yaml_lists_every_key_with_a_comment():
    text = (CONFIGS / "base.yaml").read_text()
    raw = yaml.safe_load(text)

    def walk(cfg_obj, node, prefix):
        for f in dataclasses.fields(cfg_obj):
            assert f.name in node, f"configs/base.yaml lacks {prefix}{f.name}"
            value = getattr(cfg_obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, node[f.name], f"{prefix}{f.name}.")

    walk(Config(), raw, "")
    for line in text.splitlines():
        if re.match(r"^\s*[a-z_0-9]+:\s*\S", line):  # a key with a value on its line
            assert "#" in line, f"base.yaml key without a comment: {line.strip()}"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, Config)


def test_inheritance_chain_and_override(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "_base_: " + str(CONFIGS / "base.yaml") + "\nmodel: {depth: 50}\nsolver: {base_lr: 0.01}\n"
    )
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\nmodel:\n  rpn: {nms_thresh: 0.6}\n")
    cfg = load_config(tmp_path / "b.yaml", overrides=["solver.max_iter=7", "model.rpn.anchor_sizes=[16, 32]"])
    assert cfg.model.depth == 50  # from a.yaml
    assert cfg.model.rpn.nms_thresh == 0.6  # from b.yaml
    assert cfg.model.rpn.pre_nms_topk_train == 12000  # untouched default, merged not replaced
    assert cfg.solver.base_lr == 0.01 and cfg.solver.max_iter == 7
    assert cfg.model.rpn.anchor_sizes == (16.0, 32.0)


def test_unknown_key_names_file_and_suggests(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_clases: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "model.num_clases" in msg and "model.num_classes" in msg and str(path) in msg


def test_unknown_override_key_is_reported_as_override():
    with pytest.raises(ConfigError, match=r"override 'solver.base_rl=0.1'.*solver.base_lr"):
        load_config(None, overrides=["solver.base_rl=0.1"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.depth=fifty", "model.depth must be int"),
        ("model.depth=42", "must be one of 18, 34, 50, 101, 152"),
        ("model.backbone.norm=LayerNorm", "model.backbone.norm must be"),
        ("solver.steps=[5, 3]", "must be increasing"),
        ("model.rpn.iou_thresholds=[0.3]", "list of 2 values"),
        ("solver.amp=yes", "solver.amp must be"),
        ("seed", "not key=value"),
    ],
)
def test_bad_values_are_config_errors(override, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(None, overrides=[override])


def test_int_accepted_for_float_but_not_bool_for_int():
    assert load_config(None, ["solver.base_lr=1"]).solver.base_lr == 1.0
    with pytest.raises(ConfigError):
        load_config(None, ["model.depth=true"])


def test_dump_and_load_back_equal(tmp_path):
    cfg = load_config(CONFIGS / "base.yaml", ["model.num_classes=3", "solver.steps=[10, 20]"])
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_inheritance_loop_and_missing_base(tmp_path):
    (tmp_path / "x.yaml").write_text("_base_: y.yaml\n")
    (tmp_path / "y.yaml").write_text("_base_: x.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "x.yaml")
    (tmp_path / "z.yaml").write_text("_base_: nope.yaml\n")
    with pytest.raises(ConfigError, match=re.escape("nope.yaml")):
        load_config(tmp_path / "z.yaml")


def test_replace_with_dotted_keys():
    cfg = replace(Config(), **{"solver.max_iter": 5, "model.rpn.nms_thresh": 0.5, "seed": 3})
    assert (cfg.solver.max_iter, cfg.model.rpn.nms_thresh, cfg.seed) == (5, 0.5, 3)
    assert cfg.model.depth == 101


def test_a_bare_off_in_yaml_or_an_override_is_the_string_off():
    """YAML 1.1 reads `off` as false; `solver.amp=off` (documented) must still mean "off"."""
    cfg = load_config(None, ["solver.amp=off", "test.amp=off"])
    assert cfg.solver.amp == "off" and cfg.test.amp == "off"
    with pytest.raises(ConfigError, match=re.escape("solver.amp must be")):
        load_config(None, ["solver.amp=true"])  # "on" is not a value of solver.amp
