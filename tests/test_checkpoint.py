"""Checkpoints: atomic writes, weights-only loading, RNG round trip, clear mismatch errors,
and the classifier -> backbone transfer the detector starts from."""
import random

import numpy as np
import pytest
import torch

from detres.engine.checkpoint import (CheckpointError, Checkpointer, atomic_save, check_task,
                                      extract_backbone, get_rng_state, load_checkpoint_weights,
                                      read_checkpoint, set_rng_state)
from detres.models.classifier import Classifier
from detres.models.resnet import ResNet
from detres.weights_io import load_backbone_weights


def classifier(depth=8, width=4, classes=3) -> Classifier:
    return Classifier(ResNet(depth, stem="cifar", num_classes=classes, width=width),
                      (0.0, 0.0, 0.0))


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "model.pth"
    atomic_save({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]   # no temporary left


def test_checkpointer_points_last_checkpoint_at_newest(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save({"iteration": 1}, "model_0000000")
    ckpt.save({"iteration": 2}, "model_0000001")
    assert ckpt.last_checkpoint() == tmp_path / "model_0000001.pth"
    assert Checkpointer(tmp_path, enabled=False).save({}, "model_x") == tmp_path / "model_x.pth"
    assert not (tmp_path / "model_x.pth").exists()        # only rank 0 writes


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    atomic_save({"rng": get_rng_state()}, tmp_path / "rng.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_corrupt_or_foreign_files_give_one_line_errors(tmp_path):
    bad = tmp_path / "truncated.pth"
    atomic_save({"model": classifier().state_dict()}, bad)
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated.pth: cannot read"):
        read_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pth")


def test_checkpoint_of_another_task_is_named():
    ckpt = {"model": {}, "task": "detection", "arch": "FasterRCNN(R-101-C4)"}
    with pytest.raises(CheckpointError, match="'detection' checkpoint .*FasterRCNN"):
        check_task(ckpt, "det.pth", "classification")
    with pytest.raises(CheckpointError, match="not a detres checkpoint"):
        check_task({"state_dict": {}}, "x.pth", "classification")


def test_checkpoint_of_another_model_is_summarised_not_dumped():
    big = classifier(depth=20, width=8, classes=10)
    ckpt = {"model": big.state_dict(), "task": "classification", "arch": "ResNet-20 w8"}
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_weights(classifier(), "r20.pth", "classification", ckpt=ckpt)
    msg = str(e.value)
    assert "r20.pth was written for another model" in msg and "ResNet-20 w8" in msg
    assert "wrongly shaped" in msg and "unexpected" in msg
    assert len(msg) < 2000 and msg.count("\n") < 8                  # a summary, not a key dump


def test_backbone_file_loads_into_a_resnet_without_fc(tmp_path):
    model = classifier()
    atomic_save(extract_backbone(model.state_dict(), "net."), tmp_path / "backbone.pth")
    backbone = ResNet(8, stem="cifar", num_classes=None, width=4)
    load_backbone_weights(backbone, str(tmp_path / "backbone.pth"))           # strict except nothing
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, model.net.state_dict()[k])


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    # a record is readable as any file the user creates (umask applied), not mkstemp's 0600
    import os

    from detres.atomic import atomic_write_bytes
    mask = os.umask(0)
    os.umask(mask)
    atomic_write_bytes(tmp_path / "a.json", lambda f: f.write(b"{}"))
    (tmp_path / "b.json").write_bytes(b"{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "a.json").stat().st_mode == (tmp_path / "b.json").stat().st_mode
