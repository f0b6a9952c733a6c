"""Exported detectors (TorchScript, ONNX) find what the eager detector finds, on the traced image
size and on another one; tools/export.py writes a file that does so, with its class names."""
import json
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT, load_tool, narrow_detector

from detres.config import load_config, to_dict
from detres.engine.checkpoint import CheckpointError, atomic_save
from detres.export import (ExportableDetector, ExportError, compare_exported,
                           export_detector)
from detres.structures import ImageBatch
from detres.tasks.detection.config import DetectionConfig

EXPORT_SIZE, OTHER_SIZE = (64, 96), (100, 72)   # (h, w); 100x72 pads to 128x96, not 64x96


def _confident(model):
    """Random weights with well-separated scores (ties would make the NMS order arbitrary)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.rpn.head.cls_logits.weight.normal_(0, 0.3, generator=g)
        model.roi_head.cls_score.weight.normal_(0, 1.0, generator=g)
        model.roi_head.cls_score.bias.zero_()[-1] = -20.0     # background never wins
        model.roi_head.bbox_pred.weight.normal_(0, 0.3, generator=g)   # boxes that need clipping
    return model.eval()


def _images():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, h, w), generator=g).float()
            for h, w in (EXPORT_SIZE, OTHER_SIZE)]


def _assert_same(model, run, images, scale=1.0):
    for image in images:
        with torch.no_grad():
            ref = model(ImageBatch.from_tensors([image], scales=[scale])).detections[0]
        boxes, scores, labels = run(image, torch.tensor(scale))
        assert len(ref.boxes) >= 10                               # never vacuous
        h, w = image.shape[1:]
        # clipping to this image's own size happened (a traced constant size would not do it)
        assert ((ref.boxes[:, 2] == w) | (ref.boxes[:, 3] == h)).any()
        assert torch.equal(labels, ref.labels)
        torch.testing.assert_close(scores, ref.scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(boxes, ref.boxes, rtol=0, atol=1e-3)


@pytest.mark.parametrize("roi_op", ["pool", "align"])
def test_torchscript_equals_eager_at_two_sizes(tmp_path, roi_op):
    model = _confident(narrow_detector(f"roi_head.roi_op={roi_op}"))
    export_detector(model, tmp_path / "m.pt", "torchscript", EXPORT_SIZE)
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    _assert_same(model, loaded, _images())


@pytest.mark.parametrize("roi_op", ["pool", "align"])
def test_onnx_runtime_equals_eager_at_two_sizes(tmp_path, roi_op):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _confident(narrow_detector(f"roi_head.roi_op={roi_op}"))
    export_detector(model, tmp_path / "m.onnx", "onnx", EXPORT_SIZE)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "scale"]
    _assert_same(model, lambda im, s: [torch.from_numpy(o) for o in session.run(
        None, {"image": im.numpy(), "scale": s.numpy()})], _images())


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_global_context_and_min_proposal_size_in_original_pixels(tmp_path, scale):
    """rpn.min_size is in original pixels: at scale 0.25 a 12 px minimum is 3 resized px."""
    model = _confident(narrow_detector("roi_head.global_context=true", "rpn.min_size=12"))
    export_detector(model, tmp_path / "m.pt", "torchscript", EXPORT_SIZE)
    _assert_same(model, torch.jit.load(str(tmp_path / "m.pt")), _images(), scale)


def test_check_pairs_detections_in_any_order_and_catches_moved_boxes():
    model = _confident(narrow_detector())
    image = _images()[0]

    def eager(shift=0.0, reverse=False):
        def run(im):
            with torch.no_grad():
                d = model(ImageBatch.from_tensors([im])).detections[0]
            order = torch.arange(len(d.boxes)).flip(0) if reverse else slice(None)
            return d.boxes[order] + shift, d.scores[order], d.labels[order]
        return run

    paired, total, worst = compare_exported(model, eager(reverse=True), [image])
    assert paired == total >= 10 and worst == 0
    assert compare_exported(model, eager(shift=0.5), [image])[0] == 0


def test_wrapper_keeps_the_model_untouched():
    model = _confident(narrow_detector())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ExportableDetector(model)
    assert model.channels_last                    # the wrapper converts a copy
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def _checkpoint(path):
    cfg = load_config(ROOT / "configs" / "frcnn_r18_shapes.yaml",
                      ["model.backbone.width=8", "data.min_size_test=64",
                       "data.max_size_test=96"], schema=DetectionConfig)
    model = _confident(narrow_detector(base=cfg.model))
    atomic_save({"model": model.state_dict(), "task": "detection", "iteration": 0,
                 "config": to_dict(cfg), "class_names": ["a", "b", "c"],
                 "category_ids": [5, 6, 9]}, path)
    return model


def test_tool_writes_a_model_and_its_class_names(tmp_path):
    model = _checkpoint(tmp_path / "model_final.pth")
    out = tmp_path / "export" / "detector.pt"
    info = load_tool("export").main(["--weights", str(tmp_path / "model_final.pth"),
                                     "--format", "torchscript", "--out", str(out)])
    meta = json.loads((tmp_path / "export" / "detector.pt.json").read_text())
    assert meta["class_names"] == ["a", "b", "c"] and meta["category_ids"] == [5, 6, 9]
    assert (meta["min_size_test"], meta["max_size_test"]) == (64, 96)
    assert info["max_box_difference"] < 1e-3
    _assert_same(model, torch.jit.load(str(out)), _images())


def test_tool_with_a_config_file_and_overrides(tmp_path):
    _checkpoint(tmp_path / "m.pth")
    out = tmp_path / "m.pt"
    load_tool("export").main(["--weights", str(tmp_path / "m.pth"), "--config",
                              str(ROOT / "configs" / "frcnn_r18_shapes.yaml"), "--format",
                              "torchscript", "--out", str(out), "model.backbone.width=8",
                              "data.min_size_test=48", "data.max_size_test=64", "--no-check"])
    meta = json.loads((tmp_path / "m.pt.json").read_text())
    assert (meta["min_size_test"], meta["max_size_test"]) == (48, 64)
    assert meta["class_names"] == ["a", "b", "c"]             # from the checkpoint
    boxes, scores, labels = torch.jit.load(str(out))(_images()[1], torch.tensor(1.0))
    assert len(boxes) == len(scores) == len(labels) > 0 and int(labels.max()) <= 2


def test_tool_onnx_with_an_override(tmp_path, capsys):
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    _checkpoint(tmp_path / "m.pth")
    out = tmp_path / "m.onnx"
    load_tool("export").main(["--weights", str(tmp_path / "m.pth"), "--format", "onnx",
                              "--out", str(out), "model.roi_head.detections_per_image=5"])
    out_text = capsys.readouterr().out
    assert "checked: 10 of 10 detections on 64x85 and 85x64 images equal the model's" in out_text
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    boxes, scores, labels = session.run(None, {"image": _images()[1].numpy(),
                                               "scale": np.array(1.0, np.float32)})
    assert boxes.shape == (5, 4) and scores.shape == (5,) and labels.dtype == "int64"


def test_onnx_without_the_onnx_package_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)     # as if not installed
    with pytest.raises(ExportError, match=r'needs the onnx package: pip install -e "\.\[export\]"'):
        export_detector(narrow_detector(), tmp_path / "m.onnx", "onnx", EXPORT_SIZE)
    assert not (tmp_path / "m.onnx").exists()


def test_tool_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        load_tool("export").main(["--weights", str(tmp_path / "nope.pth"), "--format",
                                  "torchscript", "--out", str(tmp_path / "m.pt")])
    assert not (tmp_path / "m.pt").exists()
