import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from detres import config
from detres.config import ConfigError, dump, replace
from detres.tasks.classification.config import ClassificationConfig
from detres.tasks.common import BackboneConfig
from detres.tasks.detection.config import DetectionConfig
from detres.tasks.localization.config import LocalizationConfig


def load_config(path, overrides=(), schema=ClassificationConfig):
    return config.load_config(path, overrides, schema=schema)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert isinstance(cfg, ClassificationConfig)
    assert cfg.model.backbone == BackboneConfig()
    assert cfg.solver.momentum == 0.9


def test_values_base_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "model:\n  backbone:\n    depth: 101\n    norm: gn\n"
                                  "solver:\n  base_lr: 0.1\n  steps: [10, 20]\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    path = write(sub / "run.yaml", "base: ../base.yaml\nmodel:\n  backbone:\n    depth: 50\n"
                                   "train:\n  max_iter: 7\n")
    cfg = load_config(path, ["solver.base_lr=1e-3", "train.device=cpu",
                             "model.backbone.weights=null", "solver.steps=[1, 2, 3]",
                             "model.backbone.residual=false", "solver.clip_grad_norm=5"])
    assert cfg.model.backbone.depth == 50          # child wins over base
    assert cfg.model.backbone.norm == "gn"         # inherited from base
    assert cfg.train.max_iter == 7
    assert cfg.solver.base_lr == pytest.approx(1e-3)  # "1e-3" is a float, not a string
    assert cfg.solver.steps == (1, 2, 3)
    assert cfg.model.backbone.residual is False
    assert cfg.solver.clip_grad_norm == 5.0 and isinstance(cfg.solver.clip_grad_norm, float)
    assert cfg.train.device == "cpu"


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["model.backbone.depth=18", "solver.steps=[5]",
                             "data.scale_range=[100, 200]"])
    out = tmp_path / "out" / "config.yaml"
    text = dump(cfg, out)
    assert yaml.safe_load(text)["model"]["backbone"]["depth"] == 18
    assert load_config(out) == cfg


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(AttributeError):
        cfg.train.max_iter = 3


def test_replace_checks_overrides():
    cfg = replace(load_config(None), ["train.seed=3"])
    assert cfg.train.seed == 3
    with pytest.raises(ConfigError, match="train.sed"):
        replace(cfg, ["train.sed=3"])


def test_unknown_key_names_file_key_and_valid_keys(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  backbone:\n    dpth: 50\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "'model.backbone.dpth'" in msg
    assert "depth" in msg and "norm" in msg and "shortcut" in msg


def test_unknown_key_in_base_names_the_base_file(tmp_path):
    base = write(tmp_path / "base.yaml", "solver:\n  lr: 0.1\n")
    path = write(tmp_path / "c.yaml", "base: base.yaml\n")
    with pytest.raises(ConfigError, match=f"{base}: unknown key 'solver.lr'.*base_lr"):
        load_config(path)


def test_unknown_top_level_key_and_override(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'modle'; valid keys at the top level: model"):
        load_config(write(tmp_path / "c.yaml", "modle: {}\n"))
    with pytest.raises(ConfigError, match=r"<command line>: unknown key 'train.maxiter'"):
        load_config(None, ["train.maxiter=3"])


@pytest.mark.parametrize("override, expected", [
    ("model.backbone.depth=abc", "'model.backbone.depth' must be an integer, got 'abc'"),
    ("model.backbone.depth=5.5", "'model.backbone.depth' must be an integer"),
    ("model.backbone.depth=true", "'model.backbone.depth' must be an integer"),
    ("model.backbone.norm=batch", "'model.backbone.norm' must be one of 'bn', 'frozen_bn', 'gn'"),
    ("model.backbone.residual=1", "'model.backbone.residual' must be true or false"),
    ("solver.steps=3", "'solver.steps' must be a list of an integer"),
    ("solver.steps=[1, x]", r"'solver.steps\[1\]' must be an integer"),
    ("solver.betas=[0.9]", "'solver.betas' must be a list of 2 values"),
    ("solver.base_lr=null", "'solver.base_lr' must be a number, got None"),
    ("model=3", "'model' must be a mapping"),
])
def test_wrong_type_is_named(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_wrong_type_in_file_names_file(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  max_iter: many\n")
    with pytest.raises(ConfigError, match=f"^{path}: 'train.max_iter' must be an integer"):
        load_config(path)


def test_missing_required_value(tmp_path):
    @dataclass(frozen=True, kw_only=True)
    class Inner:
        annotations: str                # required: no default
        images: str = "images"

    @dataclass(frozen=True, kw_only=True)
    class Schema:
        data: Inner                     # a required section

    path = write(tmp_path / "c.yaml", "data:\n  images: imgs\n")
    with pytest.raises(ConfigError, match=f"{path}: missing required value 'data.annotations'"):
        load_config(path, schema=Schema)
    cfg = load_config(path, ["data.annotations=a.json"], schema=Schema)
    assert cfg.data == Inner(annotations="a.json", images="imgs")


@pytest.mark.parametrize("text, expected", [
    ("- a\n- b\n", "the top level must be a mapping of keys to values, got list"),
    ("just text\n", "the top level must be a mapping of keys to values, got str"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_yaml_that_is_not_a_mapping(tmp_path, text, expected):
    path = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match=expected) as e:
        load_config(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="config file does not exist"):
        load_config(tmp_path / "nope.yaml")
    path = write(tmp_path / "c.yaml", "base: missing_base.yaml\n")
    with pytest.raises(ConfigError, match=f"{path}: base file 'missing_base.yaml' does not exist"):
        load_config(path)


def test_only_one_base_level(tmp_path):
    write(tmp_path / "a.yaml", "train:\n  seed: 1\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="only one level"):
        load_config(write(tmp_path / "c.yaml", "base: b.yaml\n"))


def test_malformed_override():
    with pytest.raises(ConfigError, match="not of the form key.path=value"):
        load_config(None, ["train.max_iter"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["train..x=3"])


def _expected_backbone(name: str) -> dict:
    """What a classification preset's file name promises: cls_{resnet,plain}N_cifar10 a CIFAR
    net of depth N with (or without) shortcuts (Sec. 4.2), cls_rN_imagenet a Table 1 ResNet-N,
    cls_builtin the demo's narrow CIFAR-style ResNet-20."""
    if name == "cls_builtin":
        return {"stem": "cifar", "depth": 20, "residual": True, "shortcut": "A", "width": 8}
    kind, depth, dataset = re.fullmatch(r"cls_(resnet|plain|r)(\d+)_(cifar10|imagenet)",
                                        name).groups()
    if dataset == "cifar10":
        return {"stem": "cifar", "depth": int(depth), "residual": kind == "resnet",
                "shortcut": "A", "width": None}
    return {"stem": "imagenet", "depth": int(depth), "residual": True, "shortcut": "B",
            "width": None}


def test_shipped_classification_configs_build_what_their_names_say():
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("cls_*.yaml"))
    assert len(configs) == 13
    for path in configs:
        cfg = load_config(path)
        backbone = {k: getattr(cfg.model.backbone, k) for k in _expected_backbone(path.stem)}
        assert backbone == _expected_backbone(path.stem), path.name
        if path.stem.endswith("_cifar10"):   # Sec. 4.2: 64k iterations of 128, LR 0.1
            assert (cfg.solver.ims_per_batch, cfg.train.max_iter) == (128, 64000), path.name
            assert cfg.solver.base_lr == 0.1 and cfg.solver.steps == (32000, 48000), path.name
            assert cfg.data.train.type == "cifar10" and cfg.data.per_pixel_mean, path.name
        # the ResNet-110 warmup (Sec. 4.2) and only there (and on its plain twin)
        assert (cfg.solver.warmup_iters == 400) == ("110" in path.stem), path.name


def test_partial_section_keeps_the_parents_defaults(tmp_path):
    path = write(tmp_path / "d.yaml", "model:\n  backbone:\n    depth: 50\nsolver:\n  base_lr: 0.01\n")
    cfg = load_config(path, ["train.max_iter=5"], schema=DetectionConfig)
    assert cfg.model.backbone.depth == 50
    assert cfg.model.backbone.norm == "frozen_bn" and cfg.model.backbone.freeze_at == 2
    assert cfg.solver.ims_per_batch == 16 and cfg.solver.base_lr == 0.01
    assert cfg.train.max_iter == 5
    assert load_config(dump(cfg, tmp_path / "out.yaml") and tmp_path / "out.yaml",
                       schema=DetectionConfig) == cfg


def test_localization_configs_load_and_state_the_papers_values():
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("loc_*.yaml")):
        load_config(path, schema=LocalizationConfig)
    cfg = load_config(root / "loc_r101_imagenet.yaml", schema=LocalizationConfig)
    # Appendix C: 224x224 crops, 256 images per batch, 8 anchors per image at 1:1; R-CNN on
    # the top 200 proposals per class warped to 224x224, RoI-centric batches of 256
    assert cfg.data.crop_size == 224 and cfg.rpn.solver.ims_per_batch == 256
    assert cfg.rpn.anchors_per_image == 8 and cfg.rpn.positive_fraction == 0.5
    assert cfg.rcnn.proposals_per_class == 200 and cfg.rcnn.input_size == 224
    assert cfg.rcnn.solver.ims_per_batch * cfg.rcnn.rois_per_image == 256
    assert cfg.classifier.weights == "torchvision://resnet101" and cfg.test.topk_classes == 5
