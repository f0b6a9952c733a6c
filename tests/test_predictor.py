import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from helpers import ROOT

from detres.config import load_config, to_dict
from detres.data.transforms import resize
from detres.engine.checkpoint import atomic_save
from detres.models.inference_form import prepare_for_inference
from detres.tasks.detection.predictor import Predictor
from detres.tasks.detection.build import build_detector
from detres.tasks.detection.config import DetectionConfig
from detres.structures import Detections, DetectorOutput, ImageBatch


CONFIGS = ROOT / "configs"


class WholeImageDetector(nn.Module):
    """Detects one box per image: the image's own extent before padding, in batch pixels."""

    def forward(self, images: ImageBatch) -> DetectorOutput:
        assert not self.training
        dets = [Detections(torch.tensor([[0.0, 0.0, w, h]]), torch.tensor([0.9]),
                           torch.tensor([1])) for h, w in images.sizes]
        return DetectorOutput(detections=dets)


def test_boxes_come_back_in_original_pixels(tmp_path):
    predictor = Predictor(WholeImageDetector(), ["a", "b"], min_size=100, max_size=150,
                          category_ids=[3, 7])
    small = np.zeros((50, 80, 3), np.uint8)      # scale 2, then capped: 160 > 150 -> 1.875
    tall = np.zeros((300, 120, 3), np.uint8)     # scale 100/120, long side 250 > 150 -> 0.5
    path = tmp_path / "tall.png"
    Image.fromarray(tall).save(path)
    out = predictor([small, str(path)])
    torch.testing.assert_close(out[0].boxes, torch.tensor([[0.0, 0.0, 80.0, 50.0]]),
                               atol=0.6, rtol=0)
    torch.testing.assert_close(out[1].boxes, torch.tensor([[0.0, 0.0, 120.0, 300.0]]),
                               atol=0.6, rtol=0)
    single = predictor(small)
    assert isinstance(single, Detections) and single.labels.tolist() == [1]
    assert predictor.to_coco_results(single, image_id=5)[0]["category_id"] == 7


def test_rejects_arrays_that_are_not_rgb_uint8():
    predictor = Predictor(WholeImageDetector(), ["a"], min_size=32, max_size=64)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        predictor(np.zeros((10, 10), np.float32))


def _write_checkpoint(path, *overrides):
    """A narrow detector of 3 classes saved as tools/train_det.py saves one (config inside)."""
    cfg = load_config(CONFIGS / "frcnn_r18_shapes.yaml",
                      ["model.backbone.width=8", "data.min_size_test=96",
                       "data.max_size_test=128", "model.roi_head.score_threshold=0.0",
                       "test.scales=[]", *overrides], schema=DetectionConfig)
    torch.manual_seed(0)
    model = build_detector(cfg.model, num_classes=3).eval()
    atomic_save({"model": model.state_dict(), "task": "detection", "iteration": 0,
                 "config": to_dict(cfg), "class_names": ["a", "b", "c"],
                 "category_ids": [5, 6, 9]}, path)
    return model


@pytest.mark.parametrize("shape, scale", [((48, 64), 2.0),      # shorter side 48 -> 96
                                          ((80, 40), 1.6)])     # 96/40 = 2.4 capped: 128/80
def test_from_checkpoint_answers_in_original_pixels(tmp_path, shape, scale):
    model = _write_checkpoint(tmp_path / "model_final.pth")
    predictor = Predictor.from_checkpoint(tmp_path / "model_final.pth", device="cpu",
                                          overrides=["test.cpu_amp=none"])   # fp32 oracle
    assert predictor.class_names == ["a", "b", "c"] and predictor.category_ids == [5, 6, 9]
    folded = prepare_for_inference(model).state_dict()    # the checkpoint's weights, BN folded
    assert predictor.model.state_dict().keys() == folded.keys()
    for name, value in folded.items():
        torch.testing.assert_close(predictor.model.state_dict()[name], value, rtol=0, atol=0)
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    got = predictor(image)
    # oracle: the model on the image resized by the hand-computed scale, boxes divided by it
    resized, _ = resize(image, np.zeros((0, 4), np.float32), scale)
    assert resized.shape[:2] == (round(shape[0] * scale), round(shape[1] * scale))
    with torch.no_grad():
        ref = model(ImageBatch.from_tensors([torch.from_numpy(resized).permute(2, 0, 1)]))
    ref = ref.detections[0]
    assert len(ref.boxes) > 0                     # score threshold 0: never vacuous
    torch.testing.assert_close(got.boxes, ref.boxes / scale, rtol=0, atol=1e-3)
    torch.testing.assert_close(got.scores, ref.scores)
    assert torch.equal(got.labels, ref.labels)
    assert got.boxes[:, 2].max() <= shape[1] and got.boxes[:, 3].max() <= shape[0]
    results = predictor.to_coco_results(got, image_id=3)
    assert {r["category_id"] for r in results} <= {5, 6, 9}


def test_from_checkpoint_applies_overrides(tmp_path):
    _write_checkpoint(tmp_path / "m.pth")
    predictor = Predictor.from_checkpoint(tmp_path / "m.pth", device="cpu",
                                          overrides=["model.roi_head.detections_per_image=3"])
    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    assert len(predictor(image).boxes) == 3
