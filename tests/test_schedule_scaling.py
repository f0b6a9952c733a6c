"""solver.reference_batch: one rule for every task, said in one log line, what the user typed
runs as typed, and a run's config.yaml reproduces the run without scaling again."""
import pytest
import torch
import yaml

from helpers import ROOT, load_tool

from detres.config import load_config
from detres.tasks.classification.config import ClassificationConfig
from detres.tasks.common import build_optimizer, scale_schedule
from detres.tasks.detection.config import DetectionConfig
from detres.tasks.localization.config import LocalizationConfig

train_det = load_tool("train_det")
CONFIGS = ROOT / "configs"


def test_a_smaller_batch_scales_lr_and_iterations_by_the_same_factor():
    cfg = load_config(CONFIGS / "frcnn_r101_coco.yaml", ["solver.ims_per_batch=16"],
                      schema=DetectionConfig)           # reference_batch 8: k = 2
    scaled, notes = scale_schedule(cfg)
    assert scaled.train.max_iter == 160000 and scaled.solver.steps == (120000,)
    assert scaled.train.checkpoint_period == cfg.train.checkpoint_period // 2
    assert scaled.solver.base_lr == pytest.approx(0.002)
    assert build_optimizer(scaled.solver, torch.nn.Linear(2, 2)).param_groups[0]["lr"] == \
        pytest.approx(0.002)
    assert len(notes) == 1 and "train.max_iter 320000 -> 160000" in notes[0]
    assert "solver.base_lr 0.001 -> 0.002" in notes[0]
    # resolved: scaling it again changes nothing
    assert scaled.solver.reference_batch == 16 and scale_schedule(scaled) == (scaled, [])
    same = load_config(CONFIGS / "frcnn_r101_coco.yaml", schema=DetectionConfig)
    assert scale_schedule(same) == (same, [])


def test_what_the_user_typed_runs_as_typed():
    cfg = load_config(CONFIGS / "frcnn_r101_coco.yaml",
                      ["solver.ims_per_batch=2", "train.max_iter=2"], schema=DetectionConfig)
    scaled, notes = scale_schedule(cfg, typed={"solver.ims_per_batch", "train.max_iter"})
    assert scaled.train.max_iter == 2                      # not 8
    assert scaled.solver.base_lr == pytest.approx(0.00025)  # the LR still follows the batch
    assert "train.max_iter 2 (as typed)" in notes[0]


@pytest.mark.parametrize("schema, config, overrides, stages", [
    (ClassificationConfig, "cls_builtin.yaml", ["solver.ims_per_batch=64",
     "solver.reference_batch=256", "train.max_iter=400", "solver.steps=[200]"], None),
    (LocalizationConfig, "loc_r18_builtin.yaml", ["rpn.solver.ims_per_batch=8",
     "rpn.solver.reference_batch=16", "rpn.max_iter=100", "rpn.solver.base_lr=0.02"],
     [("classifier.solver", "classifier"), ("rpn.solver", "rpn"), ("rcnn.solver", "rcnn")]),
])
def test_one_rule_for_every_task(schema, config, overrides, stages):
    cfg = load_config(CONFIGS / config, overrides, schema=schema)
    scaled, notes = scale_schedule(cfg, **({"stages": stages} if stages else {}))
    section = scaled.train if schema is ClassificationConfig else scaled.rpn
    solver = scaled.solver if schema is ClassificationConfig else scaled.rpn.solver
    before = cfg.solver if schema is ClassificationConfig else cfg.rpn.solver
    k = before.ims_per_batch / before.reference_batch
    assert section.max_iter == round((400 if schema is ClassificationConfig else 100) / k)
    assert solver.base_lr == pytest.approx(before.base_lr * k) and len(notes) == 1


TINY = ["data.builtin.num_train=8", "data.builtin.num_val=4", "data.builtin.image_size=64",
        "data.min_size_train=[64]", "data.max_size_train=64", "data.min_size_test=64",
        "data.max_size_test=64", "model.backbone.width=8", "solver.steps=[]",
        "solver.warmup_iters=0", "train.device=cpu", "train.num_workers=0",
        "train.num_threads=1", "test.ims_per_batch=4"]


@pytest.mark.slow
def test_train_det_logs_the_scaling_and_its_config_yaml_does_not_scale_again(
        tmp_path, monkeypatch):
    monkeypatch.setenv("DETRES_CACHE", str(tmp_path / "cache"))
    train_det.main([*TINY, "solver.reference_batch=4", "solver.ims_per_batch=2",
                    "train.max_iter=2", "solver.base_lr=0.01",
                    f"train.output_dir={tmp_path / 'a'}"])
    notes = [line for line in (tmp_path / "a" / "log.txt").read_text().splitlines()
             if "schedule is scaled" in line]
    assert len(notes) == 1 and "train.max_iter 2 (as typed)" in notes[0]
    assert "solver.base_lr 0.01 (as typed)" in notes[0]
    ckpt = torch.load(tmp_path / "a" / "model_final.pth", weights_only=True)
    assert ckpt["iteration"] == 2                                     # typed, so run
    recorded = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert recorded["solver"]["base_lr"] == 0.01 and recorded["train"]["max_iter"] == 2
    # running from the recorded config reproduces the run: nothing is scaled again
    train_det.main([str(tmp_path / "a" / "config.yaml"), f"train.output_dir={tmp_path / 'b'}"])
    assert "schedule is scaled" not in (tmp_path / "b" / "log.txt").read_text()
    assert torch.load(tmp_path / "b" / "model_final.pth",
                      weights_only=True)["iteration"] == 2
