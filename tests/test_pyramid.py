"""Multi-scale testing's pyramid (Appendix B), computed on the image: the test transform hands
over the decoded image (shrunk to the top level when larger), every level is resized from it
with per-image factors, and detections come back in the frame evaluation and the Predictor
divide by; and the scale pair's target."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import narrow_detector

from detres.config import ConfigError, from_dict
from detres.data.transforms import eval_transform, inference_transform
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
    out = inference_transform(min_size, max_size, scales)(
        image, np.zeros((0, 4), np.float32), np.zeros((0,), np.int64))
    return ImageBatch.from_tensors([torch.from_numpy(out.image).permute(2, 0, 1).float()],
                                   scales=[out.scale])


def test_a_capped_image_keeps_the_shorter_sides_of_its_levels():
    # 640x360 (16:9) is capped at 1000 in single-scale testing: shorter side 562.5 -> 563.
    # Levels resized from that image had shorter sides 188/375/563/750/938; on the image, one
    # cap for the whole pyramid (1000 * 1000 / 600 = 1666.7) binds at the top level only.
    top = _top_batch(np.zeros((360, 640, 3), np.uint8), 600, 1000, PAPER_SCALES)
    assert top.sizes == [(360, 640)] and top.scales == [1.0]   # the decoded image itself
    tta = TestTimeDetector([narrow_detector()], scales=PAPER_SCALES, base_size=600,
                           max_size=1000)
    base, levels = tta.pyramid(top.sizes)
    assert resize_batch(top, base).sizes == [(563, 1000)]   # the single-scale image
    sizes = [resize_batch(top, [f[k] for f in levels]).sizes[0] for k in range(5)]
    # 640 * s / 360 for the longer sides; the top level capped at 1666.7: 360 * 1666.7 / 640
    assert sizes == [(200, 356), (400, 711), (600, 1067), (800, 1422), (938, 1667)]
    # an image larger than the top level is shrunk to it first: the same level sizes
    big = _top_batch(np.zeros((1440, 2560, 3), np.uint8), 600, 1000, PAPER_SCALES)
    assert big.sizes == [(938, 1667)]
    assert big.scales[0] == pytest.approx(1666.667 / 2560, rel=1e-6)
    _, big_levels = tta.pyramid(big.sizes)
    assert [resize_batch(big, [f[k] for f in big_levels]).sizes[0] for k in range(5)] == [
        (200, 355), (400, 711), (600, 1066), (800, 1422), (938, 1667)]   # 1667 * s / 938
    # the single-scale path is untouched
    out = eval_transform(600, 1000)(np.zeros((360, 640, 3), np.uint8),
                                    np.zeros((0, 4), np.float32), np.zeros((0,), np.int64))
    assert out.image.shape[:2] == (563, 1000)
    assert inference_transform(600, 1000, ()).max_size == 1000


@pytest.mark.parametrize("hw", [(360, 640), (640, 360), (500, 500), (40, 2000), (30, 50),
                                (2000, 3000)])
def test_the_batch_image_is_never_upsampled(hw):
    h, w = hw
    image = np.zeros((h, w, 3), np.uint8)
    for scales in (PAPER_SCALES, (300, 400)):              # top above / below the base size
        out = inference_transform(600, 1000, scales)(image, np.zeros((0, 4), np.float32),
                                                     np.zeros((0,), np.int64))
        assert out.scale <= 1.0
        top = max(max(scales), 600)
        cap = 1000 * top / 600
        if min(h, w) <= top and max(h, w) <= cap:
            assert out.image.shape[:2] == (h, w)         # small enough: as decoded
        tta = TestTimeDetector([narrow_detector()], scales=scales, base_size=600,
                               max_size=1000)
        _, levels = tta.pyramid([out.image.shape[:2]])
        assert levels[0] == sorted(levels[0])               # ascending


@torch.no_grad()
def test_each_level_is_resized_from_the_decoded_image():
    # the trunk's inputs, against an independent resize of the decoded image to each level
    image = _image(40, 56, seed=5)
    scales = (24, 40, 64, 80)
    model = narrow_detector(num_classes=3).eval()
    seen: list[torch.Tensor] = []
    normalize = model.normalize
    model.normalize = lambda batch: (seen.append(batch), normalize(batch))[1]
    tta = TestTimeDetector([model], scales=scales, base_size=40, max_size=1000)
    tta(_top_batch(image, 40, 1000, scales))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    got = {b.sizes[0]: b.tensor[..., :b.sizes[0][0], :b.sizes[0][1]] for b in seen}
    levels = {(s, int(56 * s / 40 + 0.5)): s for s in scales}
    assert (40, 56) in got and len(got) >= 3 and set(got) <= set(levels)  # the used levels
    for size, level in got.items():
        want = x if size == (40, 56) else torch.nn.functional.interpolate(
            x, size=size, mode="bilinear", align_corners=False, antialias=levels[size] < 40)
        torch.testing.assert_close(level, want, rtol=0, atol=1e-3)


@torch.no_grad()
def test_detections_come_back_in_the_top_images_frame():
    # one level at the base size, fed a batch twice as large: everything runs on the image
    # shrunk by 2, and the detections are that run's, times 2 (the frame ``scale`` records)
    model = narrow_detector(num_classes=3).eval()
    top = _top_batch(_image(192, 252), 64, 1000, (64, 128))
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
    # 48x64 at base 64: the old pyramid was the 64x85 image resized by s / 64; the new one
    # resizes the 48x64 image itself. Same level sizes, pixels within resampling tolerance,
    # and the same detections in original pixels within 2 pixels.
    image = _image(48, 64, seed=3)
    scales = (32, 64, 96)
    model = narrow_detector(num_classes=3).eval()
    tta = TestTimeDetector([model], scales=scales, base_size=64, max_size=1000)
    old = _top_batch(image, 64, 1000, ())                   # the single-scale image
    new = _top_batch(image, 64, 1000, scales)
    assert old.sizes == [(64, 85)] and new.sizes == [(48, 64)]
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
