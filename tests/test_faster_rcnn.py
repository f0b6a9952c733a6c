"""FasterRCNN end to end: outputs, losses, gradients, bad targets, weight transfer, and
torchvision's FasterRCNN built from the same parts as an oracle."""
import pytest
import torch
from helpers import narrow_detector, torchvision_twin

from detres.models.faster_rcnn import FasterRCNN, fuse_frozen_bn
from detres.models.resnet import ResNet
from detres.structures import DetectorOutput, ImageBatch, Targets

K = 3
SIZES = [(96, 128), (80, 112)]
LOSSES = {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}


def make_model(*overrides: str) -> FasterRCNN:
    """The narrow detector as the tools build it, with ``model.``-relative overrides."""
    return narrow_detector(*overrides, num_classes=K)


def make_confident(model: FasterRCNN) -> None:
    """Random but confident foreground classes, so that detections pass the 0.05 threshold."""
    torch.nn.init.normal_(model.roi_head.cls_score.weight, std=1.0)
    with torch.no_grad():
        model.roi_head.cls_score.bias.zero_()[-1] = -20.0   # background never wins


def make_batch(sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageBatch.from_tensors([torch.rand(3, h, w, generator=g) * 255 for h, w in sizes])


def make_targets():
    return [Targets(torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 30.0, 120.0, 90.0]]),
                    torch.tensor([0, 2]), image_id=11),
            Targets(torch.tensor([[20.0, 20.0, 50.0, 75.0]]), torch.tensor([1]), image_id=12)]


def test_train_forward_returns_four_losses_and_gradients_reach_trainable_parameters_only():
    model = make_model().train()
    out = model(make_batch(), make_targets())
    assert isinstance(out, DetectorOutput) and out.detections is None
    assert set(out.losses) == LOSSES
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.losses.values())
    assert out.stats["rpn_num_pos_anchors"] > 0 and out.stats["roi_num_fg"] > 0
    sum(out.losses.values()).backward()
    frozen = {"trunk.conv1.weight"} | {n for n, _ in model.named_parameters()
                                       if n.startswith("trunk.layer1.")}
    for name, p in model.named_parameters():
        if name in frozen:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name


def test_eval_forward_returns_detections_in_image_coordinates():
    model = make_model().eval()
    make_confident(model)
    with torch.no_grad():
        out = model(make_batch())
    assert out.losses == {} and len(out.detections) == 2
    for d, (h, w) in zip(out.detections, SIZES):
        assert 0 < len(d) <= 100
        assert d.boxes.shape == (len(d), 4) and d.scores.shape == d.labels.shape == (len(d),)
        assert (d.boxes >= 0).all() and (d.boxes[:, 2] <= w).all() and (d.boxes[:, 3] <= h).all()
        assert ((d.labels >= 0) & (d.labels < K)).all() and (d.scores > 0.05).all()
    with torch.no_grad():  # eval mode with targets: losses and detections
        out = model(make_batch(), make_targets())
    assert set(out.losses) == LOSSES and len(out.detections) == 2


def test_image_without_boxes_gives_zero_box_losses():
    model = make_model().train()
    empty = Targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), image_id=5)
    out = model(make_batch(SIZES[:1]), [empty])
    assert out.losses["loss_rpn_box"].item() == 0.0 and out.losses["loss_box"].item() == 0.0
    assert torch.isfinite(out.losses["loss_rpn_cls"]) and torch.isfinite(out.losses["loss_cls"])
    sum(out.losses.values()).backward()


@pytest.mark.parametrize("boxes,labels,match", [
    ([[10.0, 10.0, 5.0, 40.0]], [0], "x2 > x1"),
    ([[10.0, 10.0, 40.0, 10.0]], [0], "x2 > x1"),
    ([[float("nan"), 10.0, 40.0, 50.0]], [0], "finite"),
    ([[10.0, 10.0, 40.0, 50.0]], [K], "outside 0..2"),
    ([[10.0, 10.0, 40.0, 50.0]], [-1], "outside 0..2"),
])
def test_bad_targets_raise_before_any_computation(boxes, labels, match):
    model = make_model().train()
    model.trunk.forward = None   # any computation would fail with a TypeError
    bad = Targets(torch.tensor(boxes), torch.tensor(labels), image_id=4242)
    with pytest.raises(ValueError, match=match) as info:
        model(make_batch(), [make_targets()[0], bad])
    assert "image_id=4242" in str(info.value)


def test_training_without_targets_raises():
    with pytest.raises(ValueError, match="needs targets"):
        make_model().train()(make_batch())


def test_padding_is_zero_after_normalization():
    model = make_model()
    batch = make_batch()
    x = model.normalize(batch)
    assert (x[1, :, 80:] == 0).all() and (x[1, :, :, 112:] == 0).all()
    torch.testing.assert_close(x[0], (batch.tensor[0] - model.pixel_mean[0]) / model.pixel_std[0])


def test_matches_torchvision_faster_rcnn_with_same_parts():
    model = make_model("roi_head.roi_op=align", "roi_head.aligned=false",
                       "roi_head.sampling_ratio=2").eval()
    model.rpn.min_box_size, model.roi_head.min_box_size = 1e-3, 1e-2   # torchvision's
    for p in model.rpn.head.parameters():   # proposals that differ from the anchors
        torch.nn.init.normal_(p, std=0.1)
    make_confident(model)
    tv = torchvision_twin(model, SIZES[0]).eval()
    batch = make_batch()
    images = [batch.tensor[i, :, :h, :w] for i, (h, w) in enumerate(batch.sizes)]
    with torch.no_grad():
        got = model(batch).detections
        expected = tv(images)
    for d, e in zip(got, expected):
        assert len(d) > 20
        torch.testing.assert_close(d.boxes, e["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(d.scores, e["scores"], rtol=1e-4, atol=1e-5)
        assert torch.equal(d.labels + 1, e["labels"])


def test_weights_transfer_from_a_pretrained_backbone_file(tmp_path):
    torch.manual_seed(1)
    pretrained = ResNet(18, num_classes=10, width=8)
    for m in pretrained.modules():   # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = tmp_path / "backbone.pth"
    torch.save(pretrained.state_dict(), path)
    model = make_model(f"backbone.weights={path}")   # as model.backbone.weights in a config
    state = model.state_dict()
    # the ResNet's own names under the trunk's (conv1..conv4_x) and the RoI head's (conv5_x)
    # prefixes: every backbone entry arrives, fc stays behind
    backbone = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("fc.")}
    for key, value in backbone.items():
        where = "roi_head.res5." if key.startswith("layer4.") else "trunk."
        assert torch.equal(state[where + key], value), key
    assert {k for k in state if k.startswith(("trunk.", "roi_head.res5."))} == {
        ("roi_head.res5." if k.startswith("layer4.") else "trunk.") + k for k in backbone}
    assert model.roi_head.res5.layer4[0].conv1.stride == (2, 2)   # conv5_1 halves 14 -> 7


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_frozen_bn_gives_the_same_detections(channels_last):
    model = make_model(f"channels_last={str(channels_last).lower()}").eval()
    for m in model.modules():
        if hasattr(m, "running_var") and m.running_var is not None:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.uniform_(0.5, 1.5)
    make_confident(model)
    batch = make_batch()
    with torch.no_grad():
        expected = model(batch).detections
        assert fuse_frozen_bn(model) == 2 * 8 + 3 + 1   # two convs per block, shortcuts, stem
        if channels_last:
            model.to(memory_format=torch.channels_last)
        got = model(batch).detections
    for d, e in zip(got, expected):
        torch.testing.assert_close(d.boxes, e.boxes, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(d.scores, e.scores, rtol=1e-4, atol=1e-5)


def test_channels_last_gives_the_same_losses_gradients_and_detections():
    batch, targets = make_batch(), make_targets()
    outputs = []
    for channels_last in (False, True):
        model = make_model(f"channels_last={str(channels_last).lower()}")
        make_confident(model)
        torch.manual_seed(3)   # same RoI samples
        out = model.train()(batch, targets)
        sum(out.losses.values()).backward()
        with torch.no_grad():
            detections = model.eval()(batch).detections
        outputs.append((out.losses, model.roi_head.res5.layer4[0].conv1.weight.grad, detections))
    (losses_a, grad_a, det_a), (losses_b, grad_b, det_b) = outputs
    for key in LOSSES:
        torch.testing.assert_close(losses_a[key], losses_b[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-3, atol=1e-5)
    for a, b in zip(det_a, det_b):
        torch.testing.assert_close(a.boxes, b.boxes, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)
