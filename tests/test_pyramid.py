"""Multi-scale testing's pyramid (Appendix B), computed on the image: the test transform reads
the top level, every level is shrunk from it with per-image factors, and detections come back
in the frame evaluation and the Predictor divide by; and the scale pair's target."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import narrow_detector

from detres.config import ConfigError, from_dict
from detres.data.transforms import eval_transform, pyramid_resize
from detres.models.test_time import TestTimeDetector, resize_batch, select_scale_pairs
from detres.structures import ImageBatch
from detres.tasks.detection.build import build_test_detector
from detres.tasks.detection.config import DetectionConfig, DetTestConfig

PAPER_SCALES = (200, 400, 600, 800, 1000)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth (h, w, 3) uint8 image, so that features vary across it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, max(h // 8, 2), max(w // 8, 2), generator=g) * 255
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear")[0]
    return x.permute(1, 2, 0).round().to(torch.uint8).numpy()


def _top_batch(image: np.ndarray, min_size: int, max_size: int, scales) -> ImageBatch:
    out = eval_transform(*pyramid_resize(min_size, max_size, scales))(
        image, np.zeros((0, 4), np.float32), np.zeros((0,), np.int64))
    return ImageBatch.from_tensors([torch.from_numpy(out.image).permute(2, 0, 1).float()],
                                   scales=[out.scale])


def test_a_capped_image_keeps_the_shorter_sides_of_its_levels():
    # 640x360 (16:9) is capped at 1000 in single-scale testing: shorter side 562.5 -> 563.
    # Levels resized from that image had shorter sides 188/375/563/750/938; on the image, one
    # cap for the whole pyramid (1000 * 1000 / 600 = 1666.7) binds at the top level only.
    top = _top_batch(np.zeros((360, 640, 3), np.uint8), 600, 1000, PAPER_SCALES)
    assert top.sizes == [(938, 1667)]                       # 360 * 1666.7 / 640 = 937.5
    assert top.scales[0] == pytest.approx(1666.667 / 640, rel=1e-6)
    tta = TestTimeDetector([narrow_detector()], scales=PAPER_SCALES, base_size=600,
                           max_size=1000)
    base, levels = tta.pyramid(top.sizes)
    assert resize_batch(top, base).sizes == [(563, 1000)]   # the single-scale image
    sizes = [resize_batch(top, [f[k] for f in levels]).sizes[0] for k in range(5)]
    # 1667 * s / 938 for the longer sides; 938 for the capped top
    assert sizes == [(200, 355), (400, 711), (600, 1066), (800, 1422), (938, 1667)]
    # the single-scale path is untouched
    out = eval_transform(600, 1000)(np.zeros((360, 640, 3), np.uint8),
                                    np.zeros((0, 4), np.float32), np.zeros((0,), np.int64))
    assert out.image.shape[:2] == (563, 1000)
    assert pyramid_resize(600, 1000, ()) == (600, 1000)


@pytest.mark.parametrize("hw", [(360, 640), (640, 360), (500, 500), (40, 2000), (30, 50)])
def test_no_level_is_upsampled_beyond_the_top_image(hw):
    h, w = hw
    for scales in (PAPER_SCALES, (300, 400)):              # top above / below the base size
        size, cap = pyramid_resize(600, 1000, scales)
        f = min(size / min(h, w), cap / max(h, w))
        top = [(int(h * f + 0.5), int(w * f + 0.5))]
        tta = TestTimeDetector([narrow_detector()], scales=scales, base_size=600,
                               max_size=1000)
        base, levels = tta.pyramid(top)
        assert max(base) <= 1.0 and max(max(x) for x in levels) <= 1.0 + 1e-9
        assert levels[0] == sorted(levels[0])               # ascending


@torch.no_grad()
def test_detections_come_back_in_the_top_images_frame():
    # one level at the base size, fed a batch twice as large: everything runs on the image
    # shrunk by 2, and the detections are that run's, times 2 (the frame ``scale`` records)
    model = narrow_detector(num_classes=3).eval()
    top = _top_batch(_image(48, 63), 64, 1000, (64, 128))
    assert top.sizes == [(128, 168)]                        # 2 x (64, 84): no rounding
    tta = TestTimeDetector([model], scales=(64,), base_size=64, max_size=1000)
    got = tta(top).detections[0]
    base = resize_batch(top, [0.5])
    expected = model(base).detections[0]
    assert len(expected) > 0
    torch.testing.assert_close(got.boxes, expected.boxes * 2, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got.scores, expected.scores)


@torch.no_grad()
def test_an_uncapped_pyramid_matches_the_one_resized_from_the_base_image():
    # 48x64 at base 64: the old pyramid was the 64x85 image resized by s / 64, its top level
    # upsampled; the new one shrinks the 96x128 image. Same level sizes, pixels within
    # resampling tolerance, and the same detections in original pixels within 2 pixels.
    image = _image(48, 64, seed=3)
    scales = (32, 64, 96)
    model = narrow_detector(num_classes=3).eval()
    tta = TestTimeDetector([model], scales=scales, base_size=64, max_size=1000)
    old = _top_batch(image, 64, 1000, ())                   # the single-scale image
    new = _top_batch(image, 64, 1000, scales)
    assert old.sizes == [(64, 85)] and new.sizes == [(96, 128)]
    for k, s in enumerate(scales):
        a = resize_batch(old, [s / 64])
        b = resize_batch(new, [tta.pyramid(new.sizes)[1][0][k]])
        if a.sizes == b.sizes:
            (h, w), = a.sizes
            diff = (a.tensor[..., :h, :w] - b.tensor[..., :h, :w]).abs().mean()
            assert diff < 1.5, (s, float(diff))             # of 0..255
    d_old, d_new = tta(old).detections[0], tta(new).detections[0]
    boxes_old, boxes_new = d_old.boxes / old.scales[0], d_new.boxes / new.scales[0]
    assert len(boxes_old) > 0 and len(boxes_new) > 0
    # the best detection of the old run has a close match of the same class in the new one
    same = d_new.labels == d_old.labels[0]
    err = (boxes_new[same] - boxes_old[0]).abs().max(dim=1).values.min()
    assert err < 2.0, float(err)


def test_the_scale_target_chooses_the_pair():
    factors = [s / 600 for s in PAPER_SCALES]
    rois = torch.tensor([[0, 0, 0, 300, 300]], dtype=torch.float32)   # 100, 200, 300, ...
    assert select_scale_pairs(rois, factors).tolist() == [1]           # 200 <= 224 <= 300
    assert select_scale_pairs(rois, factors, target=112).tolist() == [0]
    assert select_scale_pairs(rois, factors, target=450).tolist() == [3]
    cfg = DetectionConfig()
    cfg = dataclasses.replace(cfg, test=DetTestConfig(scales=PAPER_SCALES, scale_target=112))
    tta = build_test_detector(cfg, [narrow_detector()])
    assert tta.scale_target == 112 and tta.max_size == 1000
    assert DetTestConfig().scale_target == 224
    with pytest.raises(ConfigError, match="test.scale_target"):
        from_dict({"test": {"scale_target": 0}}, DetectionConfig)
