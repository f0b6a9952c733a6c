import numpy as np
from PIL import Image

from detres.visualize import class_colour, draw_detections, save_detections


def test_draws_box_outline_in_class_colour_and_skips_low_scores(tmp_path):
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    boxes = np.array([[10.0, 20.0, 50.0, 55.0], [0.0, 0.0, 5.0, 5.0]])
    out = np.asarray(draw_detections(image, boxes, np.array([0.9, 0.1]), np.array([2, 1]),
                                     ["a", "b", "c"], min_score=0.5))
    assert out.shape == image.shape
    colour = class_colour(2)
    assert tuple(out[55, 30]) == colour and tuple(out[40, 10]) == colour   # bottom and left edges
    assert tuple(out[40, 30]) == (0, 0, 0)                                  # inside stays untouched
    assert not (out[1:4, 1:4] == class_colour(1)).all(axis=-1).any()       # below min_score
    path = save_detections(tmp_path / "x" / "out.png", image, boxes, np.array([0.9, 0.1]),
                           np.array([2, 1]))
    assert Image.open(path).size == (80, 60)
    assert (image == 0).all(), "the input image must not be modified"
