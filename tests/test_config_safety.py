"""Config files and values a tool cannot use stop it with one ``error:`` line naming the file
(or the command line), the dotted key and what is valid, before anything else is printed or
loaded: YAML anchors and aliases (an alias bomb), deep nesting, huge files, values out of the
range the schema declares, and output paths that are files."""
import functools
import json
import math

import pytest
import torch
from helpers import ROOT, load_tool, run_tool_script
from PIL import Image

from detres.cli import run_main
from detres.config import (COMMAND_LINE, MAX_CONFIG_BYTES, ConfigError, dump, from_dict,
                           load_config, to_dict)
from detres.config_checks import Range
from detres.tasks.classification.config import ClassificationConfig
from detres.tasks.detection.config import DetectionConfig
from detres.tasks.localization.build import TASK as LOC_TASK
from detres.tasks.localization.config import LocalizationConfig

CONFIGS = ROOT / "configs"
DET, CLS, LOC = DetectionConfig, ClassificationConfig, LocalizationConfig
DET_CONFIG = CONFIGS / "frcnn_r18_shapes.yaml"
LOC_CONFIG = CONFIGS / "loc_r18_builtin.yaml"


def alias_bomb(levels: int = 7) -> str:
    """Each level a mapping of nine aliases of the one before: 9**levels key paths."""
    lines = ["l0: &l0 {a: 0, b: 0, c: 0, d: 0, e: 0, f: 0, g: 0, h: 0, i: 0}"]
    for n in range(1, levels + 1):
        refs = ", ".join(f"{k}: *l{n - 1}" for k in "abcdefghi")
        lines.append(f"l{n}: &l{n} {{{refs}}}")
    return "\n".join(lines) + "\n"


def only_error_line(text: str) -> str:
    """The one line of ``text``, which must be an ``error:`` line."""
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


# ----------------------------------------------------------------------------- YAML itself
def test_alias_bomb_is_refused_at_once_with_one_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(7))
    assert len(path.read_bytes()) < 700
    res = run_tool_script("train_det", str(path), f"train.output_dir={tmp_path / 'run'}",
                          timeout=120)
    assert res.returncode == 1 and res.stdout == ""
    assert only_error_line(res.stderr) == (
        f"error: {path} line 1: YAML anchors and aliases (&name, *name) are not supported "
        "in configs")
    assert not (tmp_path / "run").exists()


def test_5000_nested_levels_are_refused_with_one_line(tmp_path, capfd):
    path = tmp_path / "deep.yaml"
    path.write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    assert _run(capfd, "train_det", path) == (f"error: {path} line 1: nested more than 64 "
                                              "levels deep")


@pytest.mark.parametrize("text", ["model: &m {backbone: {depth: 50}}\ndata: *m\n",
                                  "solver:\n  base_lr: 0.1\n  steps: &s [1, 2]\n",
                                  "x: [1, 2]\n<<: *x\n"])
def test_any_anchor_or_alias_is_refused_naming_its_line(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    line = 1 + next(i for i, s in enumerate(text.splitlines()) if "&" in s or "*" in s)
    with pytest.raises(ConfigError, match=rf"^{path} line {line}: YAML anchors and aliases"):
        load_config(path, schema=DET)


def test_deep_mapping_and_anchored_override_are_refused(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "{b: " * 5000 + "1" + "}" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested more than 64 levels deep"):
        load_config(path, schema=DET)
    with pytest.raises(ConfigError, match=rf"^{COMMAND_LINE} override 'solver.steps=&s \[1\]' "
                                          "line 1: YAML anchors and aliases"):
        load_config(None, ["solver.steps=&s [1]"], schema=DET)


def test_a_file_over_the_size_bound_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match=rf"^{path}: \d+ bytes; a config file may hold at most"):
        load_config(path, schema=DET)


def test_shipped_configs_pass_every_check_and_an_anchor_in_one_is_refused(tmp_path):
    schemas = {"cls": CLS, "base": CLS, "frcnn": DET, "loc": LOC}
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert len(paths) > 20
    for path in paths:
        load_config(path, schema=schemas[path.name.split("_")[0]])
    anchored = tmp_path / "anchored.yaml"
    anchored.write_text(DET_CONFIG.read_text().replace("model:", "model: &model", 1))
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_config(anchored, schema=DET)


# ----------------------------------------------------------------------------- declared ranges
@pytest.mark.parametrize("schema,item,expected", [
    # values that reached deep code before they were checked here
    (DET, "solver.base_lr=nan", "solver.base_lr = nan: must be a finite number > 0"),
    (DET, "solver.base_lr=-1", "solver.base_lr = -1.0: must be a finite number > 0"),
    (DET, "solver.base_lr=.inf", "solver.base_lr = inf: must be a finite number > 0"),
    (DET, "model.backbone.depth=19", "model.backbone.depth = 19: must be one of 18, 34, 50, 101, "
                                     "152 with stem imagenet"),
    (DET, "data.min_size_train=[]", "data.min_size_train = []: must be a non-empty list of "
                                    "numbers >= 1"),
    (DET, "data.min_size_train=[-5]", "data.min_size_train = [-5]: must be a non-empty list of "
                                      "integers >= 1"),
    (DET, "model.anchors.sizes=[]", "model.anchors.sizes = []: must be a non-empty list"),
    (DET, "model.roi_head.pooled_size=0", "model.roi_head.pooled_size = 0: must be an integer "
                                          ">= 1"),
    (DET, "train.num_workers=-1", "train.num_workers = -1: must be an integer >= 0"),
    (DET, "data.flip_prob=2", "data.flip_prob = 2.0: must be a number in [0, 1]"),
    (DET, "test.ims_per_batch=0", "test.ims_per_batch = 0: must be an integer >= 1"),
    (DET, "train.max_iter=0", "train.max_iter = 0: must be an integer >= 1"),
    (DET, "data.min_size_test=0", "data.min_size_test = 0: must be an integer >= 1"),
    # the same kinds of value elsewhere in the schemas
    (DET, "model.rpn.iou_thresholds=[0.7, 0.3]", "model.rpn.iou_thresholds = [0.7, 0.3]: must "
                                                 "be a list of numbers in [0, 1], in increasing"),
    (DET, "model.roi_head.nms_threshold=nan", "model.roi_head.nms_threshold = nan: must be a "
                                              "number in [0, 1]"),
    (DET, "solver.betas=[0.9, 1.0]", "solver.betas = [0.9, 1.0]: must be a list of numbers in "
                                     "[0, 1)"),
    (DET, "train.seed=-1", "train.seed = -1: must be an integer in [0, 4294967295]"),
    (DET, "model.pixel_std=[1, 0, 1]", "model.pixel_std = [1.0, 0.0, 1.0]: must be a list of "
                                       "numbers > 0"),
    (DET, "model.backbone.freeze_at=6", "model.backbone.freeze_at = 6: must be in 0..5"),
    (DET, "model.backbone={depth: 18, stem: cifar}", "model.backbone.depth = 18: must be 6n+2"),
    (CLS, "model.backbone.depth=21", "model.backbone.depth = 21: must be 6n+2"),
    (CLS, "data.scale_range=[480, 256]", "data.scale_range = [480, 256]: must be a list of "
                                         "integers >= 1, in increasing order"),
    (CLS, "solver.momentum=1.5", "solver.momentum = 1.5: must be a number in [0, 1]"),
    (LOC, "rpn.max_iter=0", "rpn.max_iter = 0: must be an integer >= 1 (this network is "
                            "trained here)"),
    (LOC, "test.scales=[]", "test.scales = []: must be a non-empty list"),
    (LOC, "data.flip_prob=-0.1", "data.flip_prob = -0.1: must be a number in [0, 1]"),
])
def test_out_of_range_override_names_the_command_line_key_and_range(schema, item, expected):
    path = {DET: DET_CONFIG, CLS: CONFIGS / "cls_builtin.yaml", LOC: LOC_CONFIG}[schema]
    with pytest.raises(ConfigError) as e:
        load_config(path, [item], schema=schema)
    assert str(e.value).startswith(f"{COMMAND_LINE}: {expected}"), str(e.value)


def test_out_of_range_value_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"base: {DET_CONFIG}\nsolver:\n  base_lr: .nan\n")
    with pytest.raises(ConfigError, match=rf"^{path}: solver.base_lr = nan: must be a finite "
                                          r"number > 0$"):
        load_config(path, schema=DET)
    path.write_text("model:\n  backbone: {norm: gn, width: 8}\n")
    with pytest.raises(ConfigError, match=r"model.backbone.gn_groups = 32 \(the default\): "
                                          "must be an integer >= 1 that divides"):
        load_config(path, schema=DET)


def test_a_classifier_trained_here_needs_iterations():
    path = CONFIGS / "loc_r101_imagenet.yaml"               # loads its classifier
    with pytest.raises(ConfigError, match=rf"^{path}: classifier.max_iter = 0 \(the default\): "
                                          r"must be an integer >= 1 \(this network is trained"):
        load_config(path, ["classifier.weights=null"], schema=LOC)


def test_defaults_and_dumps_pass_the_checks_and_a_stored_bad_value_does_not(tmp_path):
    for schema in (DET, CLS):
        cfg = load_config(None, schema=schema)
        dump(cfg, tmp_path / "c.yaml")
        assert load_config(tmp_path / "c.yaml", schema=schema) == cfg
    data = to_dict(load_config(DET_CONFIG, schema=DET))
    data["data"]["flip_prob"] = 7.0
    with pytest.raises(ConfigError, match=r"^ckpt \(stored\): data.flip_prob = 7.0: must be"):
        from_dict(data, DET, source="ckpt (stored)")


def test_range_refuses_nan_and_infinities_in_any_range():
    for r in (Range(), Range(0), Range(None, 1), Range(0, 1), Range(0, lo_open=True)):
        assert r(math.nan) and r(math.inf) and r(-math.inf) and r([0.5, math.nan])
        assert r(0.5) is None and r(None) is None


# ----------------------------------------------------------------------------- through the tools
def _run(capfd, tool: str, *argv: str) -> str:
    """``tool``'s main run as its script runs it; returns its only output, an error line."""
    main = functools.partial(load_tool(tool).main, list(map(str, argv)))
    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    assert exit_info.value.code == 1
    out, err = capfd.readouterr()
    assert out == ""
    return only_error_line(err)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (32, 24)).save(path)
    return path


def _stored(tmp_path, config, schema, **extra):
    path = tmp_path / "ckpt.pth"
    torch.save({"config": to_dict(load_config(config, schema=schema)), "model": {}, **extra},
               path)
    return path


@pytest.mark.parametrize("tool,args,key", [
    ("train_det", ("solver.base_lr=nan",), "solver.base_lr"),
    ("train_det", ("train.max_iter=0",), "train.max_iter"),
    ("train_det", ("model.backbone.depth=19",), "model.backbone.depth"),
    ("pretrain_cls", ("data.crop_size=0",), "data.crop_size"),
    ("train_loc", ("rpn.solver.base_lr=-1",), "rpn.solver.base_lr"),
    ("eval_det", (DET_CONFIG, "--weights", "none.pth", "test.ims_per_batch=0"),
     "test.ims_per_batch"),
    ("eval_loc", (LOC_CONFIG, "--weights", "none.pth", "test.ims_per_batch=0"),
     "test.ims_per_batch"),
])
def test_training_and_evaluation_tools_print_only_the_error_line(capfd, tmp_path, tool, args,
                                                                 key):
    line = _run(capfd, tool, *args, f"train.output_dir={tmp_path / 'run'}")
    assert line.startswith(f"error: {COMMAND_LINE}: {key} = ")
    assert not (tmp_path / "run").exists()


def test_infer_and_export_print_only_the_error_line(capfd, tmp_path, image):
    det_ckpt = _stored(tmp_path, DET_CONFIG, DET, task="detection")
    out = tmp_path / "out"
    for argv in [(DET_CONFIG, "--weights", det_ckpt, image, "--out", out,
                  "data.min_size_test=0"),
                 ("--weights", det_ckpt, image, "--out", out, "data.min_size_test=0")]:
        assert "data.min_size_test = 0: must be an integer >= 1" in _run(capfd, "infer", *argv)
    for argv in [("--config", DET_CONFIG, "--weights", det_ckpt, "--format", "torchscript",
                  "--out", out / "m.pt", "data.min_size_test=0"),
                 ("--weights", det_ckpt, "--format", "torchscript", "--out", out / "m.pt",
                  "data.min_size_test=0")]:
        assert "data.min_size_test = 0: must be an integer >= 1" in _run(capfd, "export", *argv)
    assert not out.exists()


def test_eval_loc_checks_overrides_of_a_stored_config(capfd, tmp_path):
    ckpt = _stored(tmp_path, LOC_CONFIG, LOC, task=LOC_TASK, class_names=["a"])
    line = _run(capfd, "eval_loc", "--weights", ckpt, "test.nms_threshold=1.5")
    assert line == (f"error: {COMMAND_LINE}: test.nms_threshold = 1.5: must be a number in "
                    "[0, 1]")


def test_cuda_without_cuda_is_one_line(capfd, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _run(capfd, "train_det", "train.device=cuda", f"train.output_dir={tmp_path / 'run'}")
    assert line.startswith("error: train.device = cuda: CUDA is not available on this machine")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- output paths
@pytest.fixture
def coco_files(tmp_path):
    gt = {"images": [{"id": 1, "width": 32, "height": 32, "file_name": "a.png"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10],
                           "area": 100, "iscrowd": 0}],
          "categories": [{"id": 1, "name": "a", "supercategory": "s"}]}
    dt = [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "score": 0.9}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dt))
    return tmp_path / "gt.json", tmp_path / "dt.json"


def test_out_that_is_or_runs_through_a_file_is_one_line(capfd, tmp_path, image, coco_files):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    det_ckpt = _stored(tmp_path, DET_CONFIG, DET, task="detection")
    gt, dt = coco_files
    for out in (a_file, a_file / "sub"):
        line = _run(capfd, "analyze_det", "--gt", gt, "--dt", dt, "--out", out)
        assert line == f"error: --out {out}: {a_file} is a file, not a folder"
        line = _run(capfd, "infer", "--weights", det_ckpt, image, "--out", out)
        assert line == f"error: --out {out}: {a_file} is a file, not a folder"
    line = _run(capfd, "export", "--weights", det_ckpt, "--format", "onnx",
                "--out", a_file / "m.onnx")
    assert line == f"error: --out {a_file / 'm.onnx'}: {a_file} is a file, not a folder"
    line = _run(capfd, "export", "--weights", det_ckpt, "--format", "onnx", "--out", tmp_path)
    assert line == f"error: --out {tmp_path}: is a folder; give a file name"
    assert a_file.read_text() == "keep"
