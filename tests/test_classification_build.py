"""Config -> objects for classification: every shipped config loads, optimizer groups, the
classifier's outputs."""
from pathlib import Path

import pytest
import torch

from detres import config
from detres.config import ConfigError, replace
from detres.tasks.classification import build
from detres.tasks.classification.config import ClassificationConfig
from detres.tasks.common import build_optimizer, scale_schedule


def load_config(path, overrides=()):
    return config.load_config(path, overrides, schema=ClassificationConfig)
from detres.models.classifier import Classifier

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("cls_*.yaml")), ids=lambda p: p.name)
def test_every_classification_config_loads(path):
    cfg = load_config(path)
    assert cfg.solver.ims_per_batch > 0 and cfg.train.max_iter > 0


def test_cifar_configs_follow_the_paper():
    r110 = load_config(CONFIGS / "cls_resnet110_cifar10.yaml")
    assert r110.model.backbone.depth == 110 and r110.model.backbone.shortcut == "A"
    assert r110.solver.steps == (32000, 48000) and r110.train.max_iter == 64000
    assert r110.solver.ims_per_batch == 128 and r110.solver.weight_decay == 1e-4
    assert r110.solver.base_lr * r110.solver.warmup_factor == pytest.approx(0.01)
    assert (r110.solver.warmup_iters, r110.solver.warmup_method) == (400, "constant")
    plain = load_config(CONFIGS / "cls_plain56_cifar10.yaml")
    assert not plain.model.backbone.residual and plain.solver.warmup_iters == 0
    r101 = load_config(CONFIGS / "cls_r101_imagenet.yaml")
    assert (r101.model.backbone.depth, r101.solver.ims_per_batch, r101.solver.base_lr) == \
        (101, 256, 0.1)


def test_optimizer_groups_lr_scaling_and_adamw():
    cfg = load_config(None, ["model.backbone.stem=cifar", "model.backbone.depth=8",
                             "model.backbone.width=4", "solver.ims_per_batch=512",
                             "solver.reference_batch=256"])
    model = build.build_classifier(cfg, 3)
    cfg, _ = scale_schedule(cfg)
    sgd = build_optimizer(cfg.solver, model)
    assert len(sgd.param_groups) == 1 and sgd.param_groups[0]["lr"] == pytest.approx(0.2)
    assert sgd.param_groups[0]["momentum"] == 0.9
    cfg = replace(cfg, ["solver.optimizer=adamw", "solver.no_decay_norm_bias=true",
                        "solver.reference_batch=null"])
    adamw = build_optimizer(cfg.solver, model)
    assert isinstance(adamw, torch.optim.AdamW)
    decay, no_decay = adamw.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 1e-4
    assert all(p.dim() == 1 for p in no_decay["params"])            # norm weights and biases
    assert all(p.dim() > 1 for p in decay["params"])                # conv and fc weights
    n = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in adamw.param_groups for p in g["params"]) == n


def test_per_pixel_mean_needs_cifar():
    cfg = load_config(None, ["data.per_pixel_mean=true"])
    with pytest.raises(ConfigError, match="per_pixel_mean"):
        build.build_cls_datasets(cfg.data)


def test_classifier_outputs_loss_and_training_error():
    from detres.models.resnet import ResNet
    model = Classifier(ResNet(8, stem="cifar", num_classes=3, width=4), torch.zeros(3, 8, 8))
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    out = model(images, torch.tensor([0, 1, 2, 0]))
    assert out.logits.shape == (4, 3) and set(out.losses) == {"loss_cls"}
    assert 0.0 <= out.stats["top1_err"].item() <= 100.0
    assert model(images).losses == {}
    out.losses["loss_cls"].backward()
    assert all(p.grad is not None for p in model.parameters())      # every parameter learns
