"""10-crop and fully-convolutional multi-scale classifier testing (Sec. 3.4) against a direct
computation: crops cut and images resized here by hand, each view run on its own."""
import cv2
import numpy as np
import pytest
import torch

from helpers import load_tool, tiny_cls_args, tiny_model

from detres.config import ConfigError, load_config
from detres.data.classification import ImageFolder, build_cls_transform, collate
from detres.data.loc_transforms import classifier_views
from detres.engine.checkpoint import load_checkpoint_weights
from detres.models.classifier import mean_softmax
from detres.tasks.classification.build import TASK, build_classifier
from detres.tasks.classification.config import ClassificationConfig
from detres.tasks.classification.run import evaluate_classifier

pretrain_cls = load_tool("pretrain_cls")
pytestmark = pytest.mark.usefixtures("one_thread")


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def probs(model, view: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(view)).permute(2, 0, 1)[None]
    return model(x).logits.softmax(1)[0]


@torch.no_grad()
def test_ten_crop_is_the_mean_of_ten_hand_cut_crops():
    model = tiny_model().eval()
    im = image(30, 45)
    # shorter side 20: 30x45 -> 20x30, exactly as cv2 does it here
    small = cv2.resize(im, (30, 20), interpolation=cv2.INTER_LINEAR)
    corners = [(0, 0), (0, 14), (4, 0), (4, 14), (2, 7)]          # (top, left) of 16x16 crops
    crops = [small[t:t + 16, l:l + 16] for t, l in corners]
    crops += [c[:, ::-1] for c in crops]
    expected = torch.stack([probs(model, c) for c in crops]).mean(0)

    views = build_cls_transform("imagenet", False, 16, test_size=20, ten_crop=True)(im)
    assert views.shape == (10, 3, 16, 16)
    got = mean_softmax(model, [list(views)])
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-6)
    # the localizer's classification step cuts the same ten crops
    loc_views = classifier_views(im, "ten_crop", 20, 16)
    torch.testing.assert_close(mean_softmax(model, [loc_views])[0], expected, rtol=1e-5,
                               atol=1e-6)


@torch.no_grad()
def test_multiscale_is_the_mean_over_whole_resized_images():
    model = tiny_model().eval()
    im = image(40, 60, seed=1)
    sizes = {20: (30, 20), 40: (60, 40), 80: (120, 80)}           # shorter side -> (w, h)
    expected = torch.stack([probs(model, cv2.resize(im, wh, interpolation=cv2.INTER_LINEAR))
                            for wh in sizes.values()]).mean(0)
    views = build_cls_transform("cifar", False, 32, test_scales=(20, 40, 80))(im)
    assert [tuple(v.shape[1:]) for v in views] == [(20, 30), (40, 60), (80, 120)]
    torch.testing.assert_close(mean_softmax(model, [views])[0], expected, rtol=1e-5, atol=1e-6)
    loc_views = classifier_views(im, "multiscale", 0, None, (20, 40, 80))
    torch.testing.assert_close(mean_softmax(model, [loc_views])[0], expected, rtol=1e-5,
                               atol=1e-6)


@torch.no_grad()
def test_views_of_several_images_are_batched_without_mixing_images():
    model = tiny_model().eval()
    a, b = image(24, 24, 2), image(24, 36, 3)
    views = [[torch.from_numpy(a).permute(2, 0, 1)],
             [torch.from_numpy(b).permute(2, 0, 1), torch.from_numpy(a).permute(2, 0, 1)]]
    got = mean_softmax(model, views)
    torch.testing.assert_close(got[0], probs(model, a))
    torch.testing.assert_close(got[1], (probs(model, b) + probs(model, a)) / 2)
    # a batch of (N, 10, 3, H, W) crops and of view lists is scored the same way
    scores = []
    evaluate_classifier(_Recorder(model, scores), [collate([(views[1], 0), (views[0], 1)])])
    assert len(scores) == 2      # b's two sizes ran apart: no padding entered an average


class _Recorder(torch.nn.Module):
    """The model, noting each batch it is given."""

    def __init__(self, model, seen):
        super().__init__()
        self.model, self.seen = model, seen

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return self.model(x)


def test_eval_only_multiscale_errors_equal_a_direct_computation(tiny_cls_set, tmp_path):
    out = tmp_path / "run"
    pretrain_cls.main(tiny_cls_args(tiny_cls_set, out, "train.max_iter=3"))
    scales = (24, 32, 48)
    result = pretrain_cls.main(tiny_cls_args(tiny_cls_set, tmp_path / "e", f"data.test_scales="
                                             f"[{','.join(map(str, scales))}]")
                               + ["--eval-only", "--weights", str(out / "model_final.pth")])
    cfg = load_config(out / "config.yaml", schema=ClassificationConfig)
    val = ImageFolder(tiny_cls_set / "val")
    model = build_classifier(cfg, val.num_classes).eval()
    load_checkpoint_weights(model, out / "model_final.pth", TASK)
    wrong1 = wrong5 = 0
    with torch.no_grad():
        for i in range(len(val)):
            im, label = val.read(i)
            h, w = im.shape[:2]
            p = torch.stack([probs(model, cv2.resize(
                im, (round(w * s / min(h, w)), round(h * s / min(h, w))),
                interpolation=cv2.INTER_LINEAR)) for s in scales]).mean(0)
            top = p.topk(3).indices.tolist()
            wrong1 += top[0] != label
            wrong5 += label not in top[:5]
    assert result["num_images"] == len(val)
    assert result["top1_err"] == pytest.approx(100.0 * wrong1 / len(val))
    assert result["top5_err"] == pytest.approx(100.0 * wrong5 / len(val))


def test_ten_crop_and_scales_together_is_a_config_error(tiny_cls_set, tmp_path):
    with pytest.raises(ConfigError, match="ten_crop.*test_scales"):
        pretrain_cls.main(tiny_cls_args(tiny_cls_set, tmp_path / "r", "data.ten_crop=true",
                                        "data.test_scales=[32]", "train.max_iter=1"))
