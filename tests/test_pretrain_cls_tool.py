"""tools/pretrain_cls.py end to end on a tiny built-in-style set: outputs, --resume,
--eval-only, and the errors a user meets first."""
import json
from pathlib import Path

import pytest
import torch

from helpers import load_tool, tiny_cls_args

from detres.config import ConfigError, load_config
from detres.tasks.classification.config import ClassificationConfig
from detres.data.builtin_cls import CLASS_NAMES
from detres.data.classification import DatasetNotFoundError
from detres.engine.checkpoint import CheckpointError, atomic_save
from detres.engine.logging import read_metrics
from detres.models.resnet import ResNet
from detres.weights_io import load_backbone_weights

ROOT = Path(__file__).resolve().parent.parent
pretrain_cls = load_tool("pretrain_cls")




pytestmark = pytest.mark.usefixtures("one_thread")


def args(tiny_cls_set, out, *extra):
    return tiny_cls_args(tiny_cls_set, out, *extra)


def losses(out):
    return [r["loss"] for r in read_metrics(out) if r["phase"] == "train"]


def test_run_writes_the_output_directory(tiny_cls_set, tmp_path):
    out = tmp_path / "run"
    results = pretrain_cls.main(args(tiny_cls_set, out, "train.max_iter=4",
                                     "precise_bn.num_batches=2"))
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "env.json", "log.txt", "metrics.jsonl", "model_0000001.pth",
            "model_final.pth", "last_checkpoint", "backbone.pth", "eval"} <= names
    resolved = load_config(out / "config.yaml", schema=ClassificationConfig)   # reloadable
    assert resolved.train.max_iter == 4
    assert json.loads((out / "env.json").read_text())["git_revision"]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"top1_err", "top5_err"} and metrics["top1_err"] == results["top1_err"]
    ckpt = torch.load(out / "model_final.pth", weights_only=True)
    assert ckpt["task"] == "classification" and ckpt["class_names"] == sorted(CLASS_NAMES[:3])
    assert ckpt["config"]["model"]["backbone"]["depth"] == 8
    backbone = ResNet(8, stem="cifar", num_classes=None, width=4, shortcut="A")
    load_backbone_weights(backbone, str(out / "backbone.pth"))                    # the detector's path
    assert len(losses(out)) == 4


def test_resume_continues_with_identical_losses(tiny_cls_set, tmp_path):
    pretrain_cls.main(args(tiny_cls_set, tmp_path / "full", "train.max_iter=6"))
    pretrain_cls.main(args(tiny_cls_set, tmp_path / "cut", "train.max_iter=3"))
    pretrain_cls.main(args(tiny_cls_set, tmp_path / "cut", "train.max_iter=6") + ["--resume"])
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert len(losses(tmp_path / "full")) == 6


def test_eval_only_and_foreign_checkpoints(tiny_cls_set, tmp_path):
    out = tmp_path / "run"
    trained = pretrain_cls.main(args(tiny_cls_set, out, "train.max_iter=2"))
    again = pretrain_cls.main(args(tiny_cls_set, tmp_path / "eval") +
                              ["--eval-only", "--weights", str(out / "model_final.pth")])
    assert again["top1_err"] == trained["top1_err"]
    (folder,) = (tmp_path / "eval" / "eval_only").iterdir()
    assert json.loads((folder / "eval" / "metrics.json").read_text())["top1_err"] == pytest.approx(
        trained["top1_err"])
    with pytest.raises(CheckpointError, match="another model") as e:
        pretrain_cls.main(args(tiny_cls_set, tmp_path / "x", "model.backbone.depth=14") +
                          ["--eval-only", "--weights", str(out / "model_final.pth")])
    assert len(str(e.value)) < 2000
    det = tmp_path / "det.pth"
    atomic_save({"model": {}, "task": "detection", "arch": "FasterRCNN"}, det)
    with pytest.raises(CheckpointError, match="'detection' checkpoint"):
        pretrain_cls.main(args(tiny_cls_set, tmp_path / "y")
                          + ["--eval-only", "--weights", str(det)])


def test_unknown_key_and_missing_dataset_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="solver.base_lrr"):
        pretrain_cls.main(["solver.base_lrr=0.1"])
    monkeypatch.setenv("DETRES_DATASETS", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="cls_builtin.yaml"):
        pretrain_cls.main([str(ROOT / "configs" / "cls_resnet20_cifar10.yaml"),
                           f"train.output_dir={tmp_path / 'c'}"])


def test_cifar_config_runs_on_local_batches(tmp_path, monkeypatch):
    from test_classification_data import write_cifar
    write_cifar(tmp_path / "cifar-10-batches-py", n=8)
    monkeypatch.setenv("DETRES_DATASETS", str(tmp_path))
    out = tmp_path / "r"
    results = pretrain_cls.main([str(ROOT / "configs" / "cls_resnet20_cifar10.yaml"),
                                 "model.backbone.depth=8", "model.backbone.width=4",
                                 "solver.ims_per_batch=8", "train.max_iter=2",
                                 "train.num_workers=0", "train.device=cpu",
                                 f"train.output_dir={out}"])
    assert results["num_images"] == 8
    mean = torch.load(out / "model_final.pth", weights_only=True)["model"]["pixel_mean"]
    assert mean.shape == (3, 32, 32)                      # the per-pixel mean of Sec 4.2
