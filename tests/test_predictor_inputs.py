"""The Predictor takes what users hand it (paths, RGB/BGR/grayscale/RGBA arrays, PIL images,
CHW tensors) and answers with a ``Prediction`` that draws and converts itself."""
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import narrow_detector

from detres.data.image_files import load_image
from detres.data.images import read_image
from detres.evaluation.coco_eval import detections_to_coco_results
from detres.structures import Detections
from detres.tasks.detection.prediction import Prediction
from detres.tasks.detection.predictor import Predictor

NAMES, CATEGORY_IDS = ["a", "b", "c"], [5, 6, 9]


@pytest.fixture(scope="module")
def predictor():
    model = narrow_detector("roi_head.score_threshold=0.0").eval()   # never vacuous
    return Predictor(model, NAMES, min_size=96, max_size=128, category_ids=CATEGORY_IDS,
                     cpu_amp="none")


@pytest.fixture(scope="module")
def rgb():
    return np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def assert_same(got: Detections, ref: Detections) -> None:
    assert len(ref) > 0          # batched and single forward passes round alike to ~1e-6
    torch.testing.assert_close(got.boxes, ref.boxes, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.scores, ref.scores, rtol=0, atol=1e-5)
    assert torch.equal(got.labels, ref.labels)


def test_pil_tensor_and_bgr_inputs_detect_as_the_rgb_array(predictor, rgb):
    ref = predictor(rgb)
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    given = [Image.fromarray(rgb), chw, chw.float() / 255, bgr]
    for got in predictor(given[:3]) + [predictor(bgr, channels="bgr")]:
        assert_same(got, ref)
    bgr_predictor = Predictor(predictor.model, NAMES, 96, 128, fast_path=False, cpu_amp="none",
                              channels="bgr")
    assert_same(bgr_predictor(bgr), ref)
    assert_same(bgr_predictor(bgr[:, :, ::-1], channels="rgb"), ref)   # the call overrides


def test_grayscale_is_expanded_and_alpha_composited_as_a_file_is(tmp_path, predictor, rgb):
    gray = rgb[:, :, 0]
    ref = predictor(np.repeat(gray[:, :, None], 3, axis=2))
    assert_same(predictor(gray), ref)
    assert_same(predictor(gray[:, :, None]), ref)
    assert_same(predictor(torch.from_numpy(gray)[None]), ref)
    rgba = np.concatenate([rgb, rgb[:, :, 1:2]], axis=2)   # alpha varies over the image
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(rgba), read_image(tmp_path / "rgba.png"))
    bgra = np.ascontiguousarray(rgba[:, :, [2, 1, 0, 3]])
    np.testing.assert_array_equal(load_image(bgra, "bgr"), read_image(tmp_path / "rgba.png"))


@pytest.mark.parametrize("bad, said", [
    (np.zeros((8, 8, 3), np.float32), r"numpy\.ndarray of shape \(8, 8, 3\) and dtype float32"),
    (np.zeros((8, 8, 5), np.uint8), r"numpy\.ndarray of shape \(8, 8, 5\) and dtype uint8"),
    (torch.full((3, 8, 8), 255.0), r"torch\.Tensor of shape \(3, 8, 8\) and dtype torch\.float32"
                                   r": float tensors must hold 0\.\.1"),
    (torch.zeros((8, 8, 3), dtype=torch.uint8), r"torch\.Tensor of shape \(8, 8, 3\)"),
    (torch.full((3, 8, 8), float("nan")), r"torch\.Tensor of shape \(3, 8, 8\)"),
    ([np.zeros((8, 8, 3), np.uint8)], r"builtins\.list"),
])
def test_a_refused_input_is_named_by_index_type_shape_and_dtype(predictor, rgb, bad, said):
    with pytest.raises(ValueError, match=r"^input 1: " + said + r".*accepted: .*\(H, W, 3\) "
                                         r"uint8 numpy array.*\(3, H, W\)"):
        predictor([rgb, bad])
    with pytest.raises(ValueError, match="channels must be one of"):
        predictor(rgb, channels="BGR")


def test_results_carry_detections_names_and_coco_results(predictor, rgb):
    found = predictor(rgb)
    assert isinstance(found, Prediction) and isinstance(found, Detections)
    assert found.class_names == tuple(NAMES)
    assert found.names == [NAMES[k] for k in found.labels.tolist()]
    assert found.boxes.shape == (len(found), 4) and found.scores.shape == (len(found),)
    coco = found.to_coco(image_id=7)
    assert coco == detections_to_coco_results(
        [Detections(found.boxes, found.scores, found.labels)], [(7, 1.0)], CATEGORY_IDS)
    assert coco == predictor.to_coco_results(found, 7) and len(coco) == len(found)


def _one_box(image: np.ndarray, score: float = 0.9) -> Prediction:
    return Prediction(torch.tensor([[20.0, 30.0, 50.0, 60.0]]), torch.tensor([score]),
                      torch.tensor([1]), image, "rgb", tuple(NAMES), tuple(CATEGORY_IDS))


def test_plot_draws_the_box_edges_and_nothing_far_from_them():
    image = np.full((80, 100, 3), 128, np.uint8)
    drawn = _one_box(image).plot()
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    changed = (drawn != image).any(axis=2)                   # (H, W)
    assert changed[60, 25:46].all() and changed[35:56, 20].all() and changed[35:56, 50].all()
    assert not changed[32:59, 22:49].any()                   # inside the box
    assert not changed[62:].any() and not changed[:, 52:].any() and not changed[:, :19].any()
    assert not changed[:18].any()                            # above the name tag
    assert (image == 128).all()                              # the image itself is untouched
    assert not (_one_box(image, score=0.3).plot(min_score=0.5) != image).any()


def test_save_writes_the_plot_at_the_original_size(tmp_path, predictor, rgb):
    found = predictor(Image.fromarray(rgb))
    png = found.save(tmp_path / "out" / "drawn.png", min_score=0.0)
    np.testing.assert_array_equal(read_image(png), found.plot())
    with Image.open(found.save(tmp_path / "drawn.jpg")) as jpg:
        assert jpg.format == "JPEG" and jpg.size == (64, 48)
    with pytest.raises(ValueError, match=r"drawn\.gif: a drawing is written as \.png"):
        found.save(tmp_path / "drawn.gif")
