"""The inference form evaluation, the Predictor and tools/infer.py run (models/inference_form.py): frozen
BN folded and channels-last give the unfolded model's fp32 detections within 1e-4, for a
detector and for the members of a TestTimeDetector; the caller's model (and so every
checkpoint) keeps its unfolded state dict; bf16 autocast is on only where the CPU has native
bf16 or the config asks; compilation falls back to eager where it cannot run."""
import dataclasses
import logging

import numpy as np
import pytest
import torch
from torch import nn

from helpers import load_tool, narrow_detector

from detres import cpu
from detres.config import to_dict
from detres.evaluation.inference import DatasetEvaluator, inference_on_dataset
from detres.models import inference_form as fast
from detres.models.norm import FrozenBatchNorm2d
from detres.tasks.detection.predictor import Predictor
from detres.structures import ImageBatch, Targets
from detres.tasks.detection.build import build_test_detector
from detres.tasks.detection.config import DetectionConfig, DetTestConfig
from detres.tasks.detection.inference import ready_detector

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: a second thread only waits
SIZES = [(96, 128), (80, 112)]


def trained_like(seed: int = 0, *overrides: str):
    """The narrow detector with ImageNet-like BN statistics (folding them is not a no-op) and
    confident random classes, so that detections pass the score threshold."""
    # no top-100 cut: a near-tie at the cut would swap which detection makes it
    model = narrow_detector("roi_head.detections_per_image=1000", *overrides, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                for buf, (lo, hi) in ((m.running_mean, (-0.5, 0.5)), (m.running_var, (0.5, 2.0)),
                                      (m.weight, (0.5, 1.5)), (m.bias, (-0.2, 0.2))):
                    buf.copy_(lo + (hi - lo) * torch.rand(buf.shape, generator=g))
        torch.nn.init.normal_(model.roi_head.cls_score.weight, std=0.1)   # no tied 1.0 scores
        model.roi_head.cls_score.weight[-1] = 0.0
        model.roi_head.cls_score.bias.zero_()[-1] = -20.0   # background never wins
    return model


def batch(seed: int = 0) -> ImageBatch:
    g = torch.Generator().manual_seed(seed)
    return ImageBatch.from_tensors([torch.rand(3, h, w, generator=g) * 255 for h, w in SIZES])


def assert_same_detections(got, expected, tol: float = 1e-4):
    """Each image's detections pair up one to one within ``tol`` (relative to the value, at
    least 1 in absolute): same label, score and box; near-tied scores may come in another
    order, so pairs are found per label in both directions."""
    assert sum(len(d.boxes) for d in expected) > 0           # never vacuous
    for d, e in zip(got, expected, strict=True):
        assert sorted(d.labels.tolist()) == sorted(e.labels.tolist())
        for label in e.labels.unique():
            a = torch.cat((d.boxes, d.scores[:, None]), 1)[d.labels == label]
            b = torch.cat((e.boxes, e.scores[:, None]), 1)[e.labels == label]
            scale = torch.maximum(a.abs()[:, None], b.abs()[None]).clamp(min=1)
            close = ((a[:, None] - b[None]).abs() / scale <= tol).all(-1)   # (n, n)
            assert close.any(1).all() and close.any(0).all(), (label, a, b)


def frozen_bns(model: nn.Module) -> int:
    return sum(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in model.modules())


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])   # bn: the built-in demo's, eval mode
def test_folded_channels_last_detections_equal_the_unfolded_model_and_leave_it_untouched(norm):
    model = trained_like(0, "channels_last=false", f"backbone.norm={norm}")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(batch()).detections
        prepared = fast.prepare_for_inference(model)
        got = prepared(batch()).detections
    assert frozen_bns(prepared) == 0 and frozen_bns(model) > 0
    assert prepared.channels_last and prepared.trunk.conv1.weight.is_contiguous(
        memory_format=torch.channels_last)
    assert_same_detections(got, expected)
    after = model.state_dict()                       # the checkpoint form is kept
    assert after.keys() == before.keys() and all(torch.equal(after[k], v)
                                                  for k, v in before.items())
    assert not model.channels_last


def test_members_of_a_test_time_detector_are_prepared_too():
    models = [trained_like(0), trained_like(1)]
    cfg = DetectionConfig(test=DetTestConfig(flip=True))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, min_size_test=96))
    wrapped = build_test_detector(cfg, models)
    with torch.no_grad():
        expected = wrapped(batch()).detections
        prepared = fast.prepare_for_inference(wrapped)
        got = prepared(batch()).detections
    assert len(fast.detectors_in(prepared)) == 2 and frozen_bns(prepared) == 0
    assert all(m.channels_last for m in prepared.models)
    assert frozen_bns(wrapped) > 0
    assert_same_detections(got, expected)


def test_evaluation_runs_the_prepared_model_and_matches_the_plain_one(monkeypatch):
    model = trained_like(2)
    images = batch(3)
    targets = [Targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), image_id=i)
               for i in range(2)]
    seen = []
    monkeypatch.setattr(fast.FasterRCNN, "forward", _recording(fast.FasterRCNN.forward, seen))
    plain = _detect(ready_detector(model, "cpu", fast_path=False), [(images, targets)])
    assert seen == [model]                            # as given
    got = _detect(ready_detector(model, "cpu"), [(images, targets)])
    assert seen[1] is not model and frozen_bns(seen[1]) == 0 and frozen_bns(model) > 0
    assert_same_detections(got, plain)


class _Collect(DatasetEvaluator):
    def reset(self):
        self.detections = []

    def process(self, inputs, outputs):
        self.detections.extend(outputs)

    def evaluate(self):
        return {"detections": self.detections}


def _detect(model, loader):
    """The detections of evaluation's loop, fp32."""
    return inference_on_dataset(model, loader, _Collect(), "cpu", progress=False)["detections"]


def _recording(forward, seen):
    def wrapper(self, *args, **kwargs):
        seen.append(self)
        return forward(self, *args, **kwargs)
    return wrapper


def test_predictor_runs_the_fast_path_by_default_on_a_copy():
    model = trained_like(4)
    image = np.random.default_rng(0).integers(0, 256, (70, 100, 3), dtype=np.uint8)
    fast_p = Predictor(model, ["a", "b", "c"], min_size=96, max_size=128, cpu_amp="none")
    plain_p = Predictor(model, ["a", "b", "c"], min_size=96, max_size=128, cpu_amp="none",
                        fast_path=False)
    assert frozen_bns(fast_p.model) == 0 and frozen_bns(model) > 0
    # one size: a random RPN scores the anchors of batch padding alike, and which of those
    # exact ties survive is up to the kernels, not the function
    images = [image, np.ascontiguousarray(image[::-1])]
    assert_same_detections(fast_p(images), plain_p(images))


def test_predictor_overlaps_loading_and_keeps_the_order_over_several_batches(tmp_path):
    from PIL import Image
    model = trained_like(5)
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (60 + 8 * k, 90, 3), dtype=np.uint8) for k in range(5)]
    paths = []
    for k, a in enumerate(arrays):
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(a).save(paths[-1])
    p = Predictor(model, ["a", "b", "c"], min_size=96, max_size=128, cpu_amp="none",
                  batch_size=2)                      # 3 batches: the pipelined loop
    together = p(paths)
    one_by_one = [p(path) for path in paths]
    for d, e in zip(together, one_by_one, strict=True):
        torch.testing.assert_close(d.boxes, e.boxes, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("flags, setting, expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, "auto", torch.bfloat16),    # Zen 4, Cooper Lake
    ({"avx2", "amx_bf16", "amx_tile"}, "auto", torch.bfloat16),       # Sapphire Rapids
    ({"avx2", "avx512f"}, "auto", None),                              # emulated bf16: slower
    ({"avx2"}, "bf16", torch.bfloat16),
    ({"avx512_bf16"}, "none", None),
])
def test_cpu_autocast_follows_the_cpu_and_the_switch(monkeypatch, flags, setting, expected):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    assert fast.inference_amp_dtype("cpu", setting) is expected
    assert fast.inference_amp_dtype("cuda", setting, torch.float16) is torch.float16


def test_cpu_flags_are_read_from_cpuinfo(tmp_path, monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nflags\t\t: fpu sse avx512_bf16 amx_tile\n\n"
                    "processor\t: 1\nflags\t\t: other\n")
    flags = cpu.cpu_flags(str(path))
    assert flags == {"fpu", "sse", "avx512_bf16", "amx_tile"}
    assert cpu.cpu_has_native_bf16(flags) and not cpu.cpu_has_native_bf16(frozenset({"sse"}))
    assert cpu.cpu_flags(str(tmp_path / "absent")) == frozenset()
    # oneDNN capped below bf16 emulates it, as a CPU without: auto then stays in float32
    for isa, native in (("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True),
                        ("AVX512_CORE_AMX", True), ("", True)):
        assert cpu.cpu_has_native_bf16(flags, max_isa=isa) is native, isa
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    assert fast.inference_amp_dtype("cpu", "auto") is None
    with pytest.raises(ValueError, match="test.cpu_amp"):
        fast.inference_amp_dtype("cpu", "fp8")


def test_predictor_computes_in_bf16_when_asked_and_in_fp32_when_not():
    dtypes = []
    model = trained_like(6)
    image = np.random.default_rng(2).integers(0, 256, (70, 100, 3), dtype=np.uint8)
    for setting in ("bf16", "none"):
        p = Predictor(model, ["a", "b", "c"], min_size=96, max_size=128, cpu_amp=setting)
        hook = p.model.roi_head.res5.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        d = p(image)
        hook.remove()
        assert d.boxes.dtype == torch.float32 and d.scores.dtype == torch.float32
    assert dtypes == [torch.bfloat16, torch.float32]


def test_compilation_falls_back_to_eager_where_it_fails(monkeypatch, caplog):
    def broken_compile(module, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor: no working C++ compiler")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    model = trained_like(7)
    with torch.no_grad():
        expected = fast.prepare_for_inference(model)(batch()).detections
        compiled = fast.prepare_for_inference(model, compile=True)
        with caplog.at_level(logging.WARNING, logger="detres"):
            got = compiled(batch()).detections
            compiled(batch())
    assert isinstance(compiled.trunk, fast.CompiledOrEager) and compiled.trunk.failed
    assert sum("torch.compile failed" in r.getMessage() for r in caplog.records) == 2  # trunk, res5
    assert_same_detections(got, expected)
    monkeypatch.setattr(fast, "compile_available", lambda device="cpu": (False, "no compiler"))
    with caplog.at_level(logging.WARNING, logger="detres"):
        left = fast.prepare_for_inference(model, compile=True)
    assert not isinstance(left.trunk, fast.CompiledOrEager)
    assert any("no compiler" in r.getMessage() for r in caplog.records)


def test_infer_tool_builds_its_predictor_from_the_test_switches(tmp_path, monkeypatch):
    import yaml
    from PIL import Image
    infer = load_tool("infer")
    model = trained_like(8)
    cfg = DetectionConfig(model=dataclasses.replace(model_config(), channels_last=True))
    torch.save({"task": "detection", "model": model.state_dict(), "config": to_dict(cfg),
                "class_names": ["a", "b", "c"]}, tmp_path / "m.pth")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "a.png")
    built, build = [], Predictor.from_checkpoint.__func__
    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(
        lambda cls, *args, **kwargs: built.append(build(cls, *args, **kwargs)) or built[-1]))
    for overrides, folded in (([], True), (["test.fast_path=false"], False)):
        infer.main([str(tmp_path / "c.yaml"), str(tmp_path / "a.png"), "--weights",
                    str(tmp_path / "m.pth"), "--out", str(tmp_path / "out"), "--device", "cpu",
                    *overrides])
        assert (frozen_bns(built[-1].model) == 0) is folded


def model_config():
    from helpers import NARROW_DETECTOR
    return NARROW_DETECTOR
