"""Weight converters (detres/convert, tools/convert_weights.py): files built here with the
sources' own key names and layouts, converted, and compared with a small forward written in the
source's layout (BGR input minus the mean, Caffe-style bottlenecks with the stride in the 1x1,
BatchNorm as scale and shift, detectron2's size-major exact anchors and box decoding)."""
from __future__ import annotations

import json
import pickle
import runpy
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from convert_sources import (Source, d2_anchors, d2_apply_deltas, d2_state, msra_blobs,
                             ref_resnet, ref_stages, write_py2_pickle)
from helpers import ROOT, load_tool
from PIL import Image
from torchvision.ops import roi_align

from detres import boxes as box_ops
from detres.config import load_config
from detres.convert import ConversionError, UnsafePickleError, convert_file, read_arrays
from detres.convert.categories import COCO_CATEGORY_IDS, COCO_CLASS_NAMES, class_list
from detres.convert.detectron2 import adapt_rpn
from detres.convert.msra import MSRA_PIXEL_MEAN_BGR
from detres.models.anchors import AnchorGenerator
from detres.structures import ImageBatch
from detres.models.resnet import ResNet
from detres.models.rpn import RPNHead
from detres.tasks.common import build_backbone
from detres.tasks.detection.config import DetectionConfig
from detres.tasks.detection.load import load_detector
from detres.tasks.detection.predictor import Predictor
from detres.weights_io import load_backbone_weights



@pytest.fixture(autouse=True)
def no_onednn():
    """PyTorch's native convolutions: oneDNN builds a kernel per new shape, seconds of CPU for
    the many small shapes here, and these comparisons do not depend on the kernel."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled


# ----------------------------------------------------------------------------- tests
def test_pickle_naming_a_function_is_refused_and_not_run(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps({"conv1_w": np.zeros((2, 3, 7, 7)), "x": Payload()}))
    with pytest.raises(UnsafePickleError, match=r"R-50.pkl: refused to unpickle posix.system"):
        read_arrays(path)
    monkeypatch.setattr(sys, "argv", ["convert_weights.py", "msra", str(path), "--out",
                                      str(tmp_path / "out.pth")])
    with pytest.raises(SystemExit) as exit_info:   # the tool's own __main__, in this process
        runpy.run_path(str(ROOT / "tools" / "convert_weights.py"), run_name="__main__")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "posix.system" in err[0]
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


def test_python2_pickle_of_arrays_reads(tmp_path):
    arrays = {"res2_0_branch2a_w": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
              "big": np.linspace(0, 1, 300, dtype=np.float32), "lr": np.float32(0.1)}
    path = tmp_path / "old.pkl"
    write_py2_pickle(path, {"blobs": arrays})
    assert b"numpy.core.multiarray" in path.read_bytes()
    read = read_arrays(path)
    assert set(read) == {"res2_0_branch2a_w", "big"}          # a scalar is no named array
    for name in read:
        assert torch.equal(read[name], torch.from_numpy(arrays[name]))
    (tmp_path / "bad.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ConversionError, match="bad.pkl: not a readable pickle"):
        read_arrays(tmp_path / "bad.pkl")


@pytest.mark.parametrize("blocks,bottleneck,depth", [((3, 4, 6, 3), True, 50),
                                                     ((2, 2, 2, 2), False, 18)])
def test_msra_backbone_matches_caffe_forward(tmp_path, blocks, bottleneck, depth):
    g = torch.Generator().manual_seed(depth)
    blobs = msra_blobs(blocks, 8, bottleneck, 10, g)
    src = tmp_path / f"R-{depth}.pkl"
    write_py2_pickle(src, blobs)
    out = tmp_path / f"R-{depth}.pth"
    lines = convert_file("msra", src, out)
    assert lines[-1] == f"wrote {out} (backbone file) and {out.with_suffix('.yaml')}"
    cfg = load_config(out.with_suffix(".yaml"), schema=DetectionConfig)
    assert cfg.model.backbone.depth == depth and cfg.model.backbone.stride_in_1x1
    assert cfg.model.pixel_mean == MSRA_PIXEL_MEAN_BGR[::-1] and cfg.model.pixel_std == (1, 1, 1)
    trunk = build_backbone(cfg.model.backbone).eval()     # as a detector loads it: no fc
    net = ResNet(depth, width=8, num_classes=10, stride_in_1x1=True).eval()
    load_backbone_weights(net, str(out))                             # the ImageNet classifier, fc too
    rgb = torch.rand(2, 3, 64, 96) * 255
    x = rgb - torch.tensor(cfg.model.pixel_mean).view(1, 3, 1, 1)
    bgr = rgb.flip(1) - torch.tensor(MSRA_PIXEL_MEAN_BGR).view(1, 3, 1, 1)
    ref = ref_resnet(Source(blobs, "msra"), bgr, blocks, bottleneck)
    logits = ref.mean((2, 3)) @ torch.from_numpy(blobs["fc1000_w"]).T + torch.from_numpy(
        blobs["fc1000_b"])
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(net(x), logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConversionError, match="already exist; pass --overwrite"):
        convert_file("msra", src, out)


def convert_tiny_detectron2(tmp_path, sizes=(32.0, 64.0, 128.0), ratios=(0.5, 1.0, 2.0)):
    g = torch.Generator().manual_seed(0)
    sd = d2_state(8, 3, len(sizes) * len(ratios), g)
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": sd, "__author__": "Detectron2 Model Zoo"}, f)
    out = tmp_path / "det.pth"
    lines = convert_file("detectron2", path, out, class_names=["a", "b", "c"],
                         anchor_sizes=sizes, aspect_ratios=ratios)
    return sd, out, lines


def test_detectron2_c4_matches_detectron2_forward(tmp_path):
    sizes, ratios = (32.0, 64.0, 128.0), (0.5, 1.0, 2.0)
    sd, out, lines = convert_tiny_detectron2(tmp_path, sizes, ratios)
    assert "ResNet-50 (width 8, stride in the 1x1), 3 classes, 9 anchors per cell" in lines[0]
    cfg = load_config(out.with_suffix(".yaml"), schema=DetectionConfig)
    loaded = load_detector(out, cfg)
    model = loaded.detectors[0]
    assert loaded.class_names == ("a", "b", "c") and loaded.category_ids == (1, 2, 3)
    src = Source(sd, "d2")
    rgb = torch.rand(1, 3, 64, 96) * 255
    with torch.no_grad():
        features = model.trunk(model.normalize(ImageBatch.from_tensors([rgb[0]])))
        logits, deltas = model.rpn.head(features)
        boxes = box_ops.decode(deltas, model.rpn.anchor_generator(features)).double()
        bgr = rgb.flip(1) - torch.tensor([103.530, 116.280, 123.675]).view(1, 3, 1, 1)
        ref_features = ref_resnet(src, bgr, (3, 4, 6, 3), True, stages=(2, 3, 4))
        torch.testing.assert_close(features, ref_features, rtol=1e-4, atol=1e-4)
        w = src.w
        t = F.relu(F.conv2d(ref_features, w["proposal_generator.rpn_head.conv.weight"],
                            w["proposal_generator.rpn_head.conv.bias"], padding=1))
        ref_logits = F.conv2d(t, w["proposal_generator.rpn_head.objectness_logits.weight"],
                              w["proposal_generator.rpn_head.objectness_logits.bias"])
        ref_deltas = F.conv2d(t, w["proposal_generator.rpn_head.anchor_deltas.weight"],
                              w["proposal_generator.rpn_head.anchor_deltas.bias"])
        _, a, h, wd = ref_logits.shape
        ref_boxes = d2_apply_deltas(ref_deltas.view(a, 4, h, wd).permute(2, 3, 0, 1).double(),
                                    d2_anchors(sizes, ratios, h, wd), (1, 1, 1, 1))
        # detres's cell order is ratio-major (models/anchors.py): anchor r * S + s
        order = [s * len(ratios) + r for r in range(len(ratios)) for s in range(len(sizes))]
        torch.testing.assert_close(logits.view(h, wd, a),
                                   ref_logits[0].permute(1, 2, 0)[..., order])
        torch.testing.assert_close(boxes.view(h, wd, a, 4), ref_boxes[:, :, order],
                                   rtol=1e-4, atol=1e-3)
        rois = torch.tensor([[0, 3.0, 5.0, 40.0, 50.0], [0, 20.5, 10.0, 90.0, 60.0],
                             [0, 0.0, 0.0, 96.0, 64.0]])
        cls_logits, box_deltas = model.roi_head.predict(features, rois)
        pooled = roi_align(ref_features, rois, 14, 1 / 16, 0, aligned=True)   # ROIAlignV2
        head = ref_stages(src, pooled, (3, 4, 6, 3), True, stages=(5,)).mean((2, 3))
        p = "roi_heads.box_predictor."
        torch.testing.assert_close(cls_logits, head @ w[p + "cls_score.weight"].T
                                   + w[p + "cls_score.bias"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(box_deltas, head @ w[p + "bbox_pred.weight"].T
                                   + w[p + "bbox_pred.bias"], rtol=1e-4, atol=1e-4)


def test_detectron2_pth_equals_pkl_and_bad_layouts_refused(tmp_path):
    sd, out, _ = convert_tiny_detectron2(tmp_path)
    pth = tmp_path / "model_final.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "iteration": 9}, pth)
    convert_file("detectron2", pth, tmp_path / "from_pth.pth", class_names=["a", "b", "c"],
                 anchor_sizes=(32, 64, 128))
    a = torch.load(out, weights_only=True)["model"]
    b = torch.load(tmp_path / "from_pth.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConversionError, match="9 anchors per cell but 5 sizes x 3"):
        convert_file("detectron2", pth, tmp_path / "x.pth", class_names=["a", "b", "c"])
    with pytest.raises(ConversionError, match="gives 2 classes but the weights detect 3"):
        convert_file("detectron2", pth, tmp_path / "x.pth", class_names=["a", "b"],
                     anchor_sizes=(32, 64, 128))
    fpn = {**{k: torch.from_numpy(v) for k, v in sd.items()},
           "backbone.fpn_lateral2.weight": torch.zeros(1)}
    torch.save(fpn, tmp_path / "fpn.pth")
    with pytest.raises(ConversionError, match="fpn_lateral2.*C4 layout"):
        convert_file("detectron2", tmp_path / "fpn.pth", tmp_path / "x.pth")


def test_convert_tool_detectron2_then_evaluate_and_predict(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = d2_state(8, 80, 15, g)                               # COCO's 80, detectron2's anchors
    with open(tmp_path / "r50_c4.pkl", "wb") as f:
        pickle.dump({"model": sd, "__author__": "Detectron2 Model Zoo"}, f)
    out = tmp_path / "r50_c4.pth"
    lines = load_tool("convert_weights").main(["detectron2", str(tmp_path / "r50_c4.pkl"),
                                               "--out", str(out)])
    assert lines[-1].endswith(f"{out.with_suffix('.yaml')}")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in (1, 2):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(images / f"{i}.png")
    gt = {"images": [{"id": i, "file_name": f"{i}.png", "height": 60, "width": 80} for i in (1, 2)],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 18, "bbox": [10, 10, 30, 20],
                           "area": 600, "iscrowd": 0}],
          "categories": [{"id": i, "name": n} for i, n in zip(COCO_CATEGORY_IDS, COCO_CLASS_NAMES)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    metrics = load_tool("eval_det").main([
        str(out.with_suffix(".yaml")), f"train.output_dir={tmp_path / 'run'}",
        f"data.val.annotations={tmp_path / 'gt.json'}", f"data.val.images={images}",
        "data.min_size_test=64", "data.max_size_test=96", "train.device=cpu",
        "--weights", str(out)])
    assert set(metrics) >= {"AP", "AP50"}
    predictor = Predictor.from_checkpoint(out, "cpu", ["data.min_size_test=64"])
    detections = predictor(str(images / "1.png"))
    assert predictor.class_names[16] == "dog" and predictor.category_ids[16] == 18
    assert detections.boxes.shape[1] == 4 and len(detections.boxes) <= 100


def test_class_list_sources(tmp_path):
    assert class_list(80) == (list(COCO_CLASS_NAMES), list(COCO_CATEGORY_IDS))
    coco128 = ROOT.parent / "shared" / "data" / "coco128" / "annotations.json"
    if coco128.is_file():  # the real file's categories, where the shared data is present
        categories = json.loads(coco128.read_text())["categories"]
        assert [(c["id"], c["name"]) for c in categories] == list(zip(COCO_CATEGORY_IDS,
                                                                     COCO_CLASS_NAMES))
    (tmp_path / "cats.json").write_text(json.dumps({"categories": [{"id": 7, "name": "b"},
                                                                   {"id": 3, "name": "a"}]}))
    assert class_list(2, tmp_path / "cats.json") == (["a", "b"], [3, 7])
    with pytest.raises(ConversionError, match="not COCO's 80: name them"):
        class_list(5)


def test_rpn_reparameterised_for_an_anchor_offset():
    """detectron2's ANCHOR_GENERATOR.OFFSET 0.5 centres anchors mid-cell; detres's sit on the
    cell corner: the delta layer absorbs the 8 px shift as it absorbs the rounding."""
    sizes, ratios, c, h, w = (24.0, 48.0), (0.5, 1.0, 2.0), 16, 5, 7
    g = torch.Generator().manual_seed(3)
    head = RPNHead(c, 6)
    weights = {"rpn.head.cls_logits.weight": torch.randn(6, c, 1, 1, generator=g),
               "rpn.head.cls_logits.bias": torch.randn(6, generator=g),
               "rpn.head.bbox_pred.weight": torch.randn(24, c, 1, 1, generator=g) * 0.05,
               "rpn.head.bbox_pred.bias": torch.randn(24, generator=g) * 0.1}
    converted = dict(weights)
    adapt_rpn(converted, sizes, ratios, offset=0.5)
    head.load_state_dict({"conv.weight": torch.randn(c, c, 3, 3, generator=g) * 0.1,
                          "conv.bias": torch.zeros(c),
                          **{k[len("rpn.head."):]: v for k, v in converted.items()}})
    features = torch.randn(1, c, h, w, generator=g)
    with torch.no_grad():
        _, deltas = head(features)
        boxes = box_ops.decode(deltas, AnchorGenerator(sizes, ratios, 16)(features)).double()
        t = F.relu(head.conv(features))
        ref = F.conv2d(t, weights["rpn.head.bbox_pred.weight"], weights["rpn.head.bbox_pred.bias"])
    ref_boxes = d2_apply_deltas(ref.view(6, 4, h, w).permute(2, 3, 0, 1).double(),
                                d2_anchors(sizes, ratios, h, w, offset=0.5), (1, 1, 1, 1))
    order = [s * len(ratios) + r for r in range(len(ratios)) for s in range(len(sizes))]
    torch.testing.assert_close(boxes.view(h, w, 6, 4), ref_boxes[:, :, order], rtol=1e-5,
                               atol=1e-3)
