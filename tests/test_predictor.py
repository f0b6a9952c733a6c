import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from detres.predictor import Predictor
from detres.structures import Detections, DetectorOutput, ImageBatch


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
