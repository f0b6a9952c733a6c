"""Appendix B's test-time improvements (models/test_time.py) and global context: each against
an independent reference or a hand case."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import NARROW_DETECTOR, narrow_detector
from torchvision.ops import batched_nms, nms

from detres import boxes as box_ops
from detres.config import to_dict
from detres.engine.checkpoint import CheckpointError
from detres.models.test_time import TestTimeDetector, _Views, flip_batch, select_scale_pairs
from detres.structures import ImageBatch, Targets
from detres.tasks.detection.build import build_test_detector
from detres.tasks.detection.config import DetectionConfig, DetTestConfig
from detres.tasks.detection.load import load_detector


def _images(seed: int = 0, sizes=((96, 128), (128, 96))) -> ImageBatch:
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for h, w in sizes:  # smooth blobs so that features vary across the image
        x = torch.rand(3, h // 16, w // 16, generator=g) * 255
        tensors.append(torch.nn.functional.interpolate(x[None], size=(h, w), mode="bilinear")[0])
    return ImageBatch.from_tensors(tensors)


def _reference_vote(kept, kept_labels, pool, pool_scores, pool_labels, threshold):
    """Box voting written out box by box (Gidaris & Komodakis 2015)."""
    out = []
    for box, label in zip(kept.tolist(), kept_labels.tolist()):
        num, den = [0.0] * 4, 0.0
        for other, score, other_label in zip(pool.tolist(), pool_scores.tolist(),
                                             pool_labels.tolist()):
            ix = max(0.0, min(box[2], other[2]) - max(box[0], other[0]))
            iy = max(0.0, min(box[3], other[3]) - max(box[1], other[1]))
            inter = ix * iy
            union = ((box[2] - box[0]) * (box[3] - box[1])
                     + (other[2] - other[0]) * (other[3] - other[1]) - inter)
            if other_label == label and inter / union >= threshold:
                num = [n + score * c for n, c in zip(num, other)]
                den += score
        out.append([n / den for n in num] if den > 0 else box)
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)


def test_box_voting_matches_a_box_by_box_reference():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(60, 2, generator=g) * 80
    pool = torch.cat((xy, xy + 10 + torch.rand(60, 2, generator=g) * 30), 1)
    scores = torch.rand(60, generator=g)
    labels = torch.randint(0, 3, (60,), generator=g)
    keep = batched_nms(pool, scores, labels, 0.3)
    for threshold in (0.5, 0.7):
        voted = box_ops.vote(pool[keep], labels[keep], pool, scores, labels, threshold)
        expected = _reference_vote(pool[keep], labels[keep], pool, scores, labels, threshold)
        torch.testing.assert_close(voted, expected, rtol=1e-5, atol=1e-4)
        assert not torch.equal(voted, pool[keep])        # the neighbours moved some boxes
    # a box whose class has no pool member keeps its place
    lone = torch.tensor([[0.0, 0.0, 5.0, 5.0]])
    assert torch.equal(box_ops.vote(lone, torch.tensor([7]), pool, scores, labels), lone)


@pytest.fixture(scope="module")
def model():
    return narrow_detector(num_classes=3).eval()


def test_without_switches_it_is_the_detector(model):
    images = _images()
    with torch.no_grad():
        expected = model(images).detections
        # one level at the base size: the batch (shorter sides 96) is the base level
        for tta in (TestTimeDetector([model]),
                    TestTimeDetector([model], scales=(96,), base_size=96)):
            got = tta(images).detections
            for d, e in zip(got, expected):
                assert len(e) > 0
                torch.testing.assert_close(d.boxes, e.boxes)
                torch.testing.assert_close(d.scores, e.scores)
                assert torch.equal(d.labels, e.labels)
    cfg = DetectionConfig()
    assert build_test_detector(cfg, [model]) is model
    assert isinstance(build_test_detector(dataclasses.replace(
        cfg, test=DetTestConfig(flip=True)), [model]), TestTimeDetector)


def test_scale_pairs_bracket_224():
    factors = [s / 600 for s in (200, 400, 600, 800, 1000)]
    rois = torch.tensor([[0, 0, 0, 112, 112],     # 37..187 px: all below 224 -> (800, 1000)
                         [0, 0, 0, 448, 448],     # 149, 299, ...: -> (200, 400)
                         [0, 0, 0, 300, 300],     # 200 <= 224 <= 300 -> (400, 600)
                         [0, 0, 0, 1200, 1200],   # all above -> (200, 400)
                         [0, 10, 10, 234, 234]],  # 224 at 600 exactly -> (600, 800)
                        dtype=torch.float32)
    assert select_scale_pairs(rois, factors).tolist() == [3, 0, 1, 0, 2]
    assert select_scale_pairs(rois, [1.0]).tolist() == [0] * 5


def test_maxout_takes_the_elementwise_max_of_the_pair(model, monkeypatch):
    # the batch is the pyramid's top level (shorter side 128): levels 0.25, 0.5, 1 of it
    tta = TestTimeDetector([model], scales=(32, 64, 128), base_size=64)
    images = _images(sizes=((128, 128),))
    rois = torch.tensor([[0, 0, 0, 600, 600],     # sides 150, 300, 600: -> (0.25, 0.5)
                         [0, 0, 0, 150, 150]],    # 37.5, 75, 150: -> (0.5, 1)
                        dtype=torch.float32)
    head = model.roi_head
    seen = {}

    def fake_features(features, rois, sizes):   # a feature that depends on the scale
        scale = sizes[0][0] / 128
        seen[scale] = len(rois)
        d = head.cls_score.in_features
        return torch.linspace(-1, 1, d).expand(len(rois), d) * (scale - 1)

    captured = {}
    original = head.box_predictor

    def capture(x):
        captured["x"] = x
        return original(x)

    monkeypatch.setattr(head, "box_features", fake_features)
    monkeypatch.setattr(head, "box_predictor", capture)
    tta.score([tta_views(tta, images)], images, rois)
    d = head.cls_score.in_features
    ramp = torch.linspace(-1, 1, d)
    expected0 = torch.maximum(ramp * -0.75, ramp * -0.5)   # scales 0.25 and 0.5
    expected1 = torch.maximum(ramp * -0.5, ramp * 0.0)     # scales 0.5 and 1
    torch.testing.assert_close(captured["x"], torch.stack((expected0, expected1)))
    assert seen == {0.25: 1, 0.5: 2, 1.0: 1}               # each RoI pooled at its two scales


def tta_views(tta, images):
    return _Views(tta.models[0], images)


def test_flip_scores_are_mirror_equivariant(model):
    # flip testing averages a view and its mirror: scoring the mirrored batch at mirrored RoIs
    # must give the same scores and mirrored boxes, also for images narrower than the batch
    tta = TestTimeDetector([model], flip=True)
    images = _images(sizes=((96, 128), (96, 64)))
    mirrored = flip_batch(images)
    rois = torch.tensor([[0, 5, 10, 60, 70], [1, 3, 4, 50, 90], [1, 20, 0, 64, 40]],
                        dtype=torch.float32)
    widths = torch.tensor([128.0, 64.0])[rois[:, 0].long()]
    mirrored_rois = torch.stack((rois[:, 0], widths - rois[:, 3], rois[:, 2],
                                 widths - rois[:, 1], rois[:, 4]), 1)
    with torch.no_grad():
        scores, boxes = tta.score([tta_views(tta, images)], images, rois)
        m_scores, m_boxes = tta.score([tta_views(tta, mirrored)], mirrored, mirrored_rois)
    torch.testing.assert_close(scores, m_scores, rtol=1e-4, atol=1e-5)
    w = widths[:, None]
    unmirrored = torch.stack((w - m_boxes[..., 2], m_boxes[..., 1], w - m_boxes[..., 0],
                              m_boxes[..., 3]), -1)
    torch.testing.assert_close(boxes, unmirrored, rtol=1e-4, atol=1e-3)
    plain, _ = TestTimeDetector([model]).score([tta_views(tta, images)], images, rois)
    assert not torch.allclose(scores, plain)              # the mirror view did contribute


def test_refinement_is_the_union_of_old_and_new_predictions_then_nms_and_voting(model):
    images = _images(sizes=((128, 128),))
    tta = TestTimeDetector([model], box_refinement=True, voting_iou=0.5)
    head = model.roi_head
    with torch.no_grad():
        got = tta(images).detections[0]
        # the reference, composed from the detector's own parts
        features = model.trunk(model.normalize(images))
        proposals = model.rpn(features, images.sizes)[0]
        rois = box_ops.boxes_to_rois(proposals)
        logits, deltas = head.predict(features, rois, images.sizes)
        s1 = torch.softmax(logits, -1)[:, :-1]
        b1 = box_ops.decode(deltas, rois[:, 1:], head.box_weights).view(-1, 3, 4)
        best = b1[torch.arange(len(rois)), s1.argmax(1)]
        rois2 = torch.cat((rois[:, :1], box_ops.clip(best, images.sizes[0])), 1)
        logits2, deltas2 = head.predict(features, rois2, images.sizes)
        s2 = torch.softmax(logits2, -1)[:, :-1]
        b2 = box_ops.decode(deltas2, rois2[:, 1:], head.box_weights).view(-1, 3, 4)
    scores = torch.cat((s1, s2)).reshape(-1)
    boxes = box_ops.clip(torch.cat((b1, b2)), images.sizes[0]).reshape(-1, 4)
    labels = torch.arange(3).repeat(2 * len(rois))
    ok = (scores > head.score_threshold) & box_ops.nonempty(boxes)
    scores, boxes, labels = scores[ok], boxes[ok], labels[ok]
    keep = batched_nms(boxes, scores, labels, head.nms_threshold)[: head.detections_per_image]
    voted = _reference_vote(boxes[keep], labels[keep], boxes, scores, labels, 0.5)
    assert len(keep) > 0 and len(rois2) == len(rois)
    torch.testing.assert_close(got.scores, scores[keep])
    assert torch.equal(got.labels, labels[keep])
    torch.testing.assert_close(got.boxes, voted, rtol=1e-4, atol=1e-3)


def test_ensemble_proposals_are_the_nms_of_the_union_and_scores_the_mean():
    a, b = narrow_detector(seed=0).eval(), narrow_detector(seed=1).eval()
    images = _images()
    tta = TestTimeDetector([a, b])
    with torch.no_grad():
        views = [tta_views(TestTimeDetector([m]), images) for m in (a, b)]
        got = tta.propose(views, images)
        rois = box_ops.boxes_to_rois(got)
        scores, boxes = tta.score(views, images, rois)
        singles = [TestTimeDetector([m]).score([v], images, rois) for m, v in zip((a, b), views)]
        per_model = [m.rpn.propose(m.trunk(m.normalize(images)), images.sizes) for m in (a, b)]
        for i in range(len(images)):
            union = torch.cat([props[i] for props, _ in per_model])
            objectness = torch.cat([logits[i].sigmoid() for _, logits in per_model])
            keep = nms(union, objectness, a.rpn.nms_threshold)[: a.rpn.post_nms_topk_test]
            torch.testing.assert_close(got[i], union[keep])
            from_a = (got[i][:, None, :] == per_model[0][0][i][None]).all(-1).any(1)
            assert from_a.any() and (~from_a).any()          # both networks contributed
    torch.testing.assert_close(scores, (singles[0][0] + singles[1][0]) / 2)
    torch.testing.assert_close(boxes, (singles[0][1] + singles[1][1]) / 2)
    with pytest.raises(ValueError, match="class counts"):
        TestTimeDetector([a, narrow_detector(num_classes=4)])


# ----------------------------------------------------------------------------- context
def test_global_context_widens_the_head_and_sees_the_whole_image():
    plain = narrow_detector()
    context = narrow_detector("roi_head.global_context=true")
    d = plain.roi_head.cls_score.in_features
    assert context.roi_head.cls_score.in_features == 2 * d
    assert context.roi_head.bbox_pred.in_features == 2 * d
    # d(logits)/d(features) outside every RoI: zero without context, not with it
    for model, expect_outside in ((plain, False), (context, True)):
        features = torch.randn(1, model.trunk.out_channels, 8, 8, requires_grad=True)
        rois = torch.tensor([[0, 0.0, 0.0, 40.0, 40.0]])   # the top-left 3x3 cells
        logits, deltas = model.roi_head.predict(features, rois, [(128, 128)])
        (logits.sum() + deltas.sum()).backward()
        outside = features.grad[..., 4:, 4:].abs().sum()
        assert (outside > 0) == expect_outside


def test_global_context_trains_end_to_end():
    model = narrow_detector("roi_head.global_context=true", "rpn.proposals_train=20",
                            "roi_head.batch_size_per_image=16").train()
    images = _images(sizes=((64, 64),))
    target = Targets(torch.tensor([[10.0, 15.0, 45.0, 50.0]]), torch.tensor([1]), image_id=0)
    losses = model(images, [target]).losses
    sum(losses.values()).backward()
    head = model.roi_head
    d = head.cls_score.in_features // 2
    # the sibling layers' context half gets gradient, and so does conv5_x through it
    assert head.cls_score.weight.grad[:, d:].abs().sum() > 0
    assert head.bbox_pred.weight.grad[:, d:].abs().sum() > 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    first = None
    for _ in range(10):
        opt.zero_grad()
        loss = sum(model(images, [target]).losses.values())
        first = first if first is not None else float(loss.detach())
        loss.backward()
        opt.step()
    assert float(loss) < 0.7 * first


@pytest.mark.parametrize("trained_with", [True, False])
def test_context_and_plain_checkpoints_refuse_each_other(tmp_path, trained_with):
    flag = str(trained_with).lower()
    model = narrow_detector(f"roi_head.global_context={flag}")
    cfg = DetectionConfig(model=dataclasses.replace(NARROW_DETECTOR, roi_head=dataclasses.replace(
        NARROW_DETECTOR.roi_head, global_context=trained_with)))
    path = tmp_path / "model_final.pth"
    torch.save({"task": "detection", "model": model.state_dict(), "config": to_dict(cfg),
                "class_names": ["a", "b", "c"]}, path)
    (loaded,) = load_detector(path, cfg).detectors                # its own config loads
    assert loaded.roi_head.global_context is trained_with
    other = dataclasses.replace(cfg.model, roi_head=dataclasses.replace(
        cfg.model.roi_head, global_context=not trained_with))
    with pytest.raises(CheckpointError, match=f"model.roi_head.global_context={trained_with}"):
        load_detector(path, dataclasses.replace(cfg, model=other))


def test_predictor_takes_the_switches_and_ensembles(tmp_path):
    from detres import Predictor
    cfg = DetectionConfig(model=NARROW_DETECTOR)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, min_size_test=96,
                                                            max_size_test=128))
    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"m{seed}.pth")
        torch.save({"task": "detection", "model": narrow_detector(seed=seed).state_dict(),
                    "config": to_dict(cfg), "class_names": ["a", "b", "c"]}, paths[-1])
    image = (_images(sizes=((48, 64),)).tensor[0, :, :48, :64].permute(1, 2, 0)
             .round().to(torch.uint8).numpy())
    plain = Predictor.from_checkpoint(paths[0], device="cpu")
    assert not isinstance(plain.model, TestTimeDetector)
    refined = Predictor.from_checkpoint(paths[0], device="cpu",
                                        overrides=["test.box_refinement=true"])
    ensemble = Predictor.from_checkpoint(paths, device="cpu", overrides=["test.flip=true"])
    assert refined.model.box_refinement and len(ensemble.model.models) == 2
    for predictor in (plain, refined, ensemble):
        d = predictor(image)
        assert len(d) > 0
        assert (d.boxes[:, 2] <= 64).all() and (d.boxes[:, 3] <= 48).all()   # original pixels
    assert not torch.equal(plain(image).boxes, refined(image).boxes)
