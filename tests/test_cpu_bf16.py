"""bfloat16 autograd on the CPU. oneDNN's bf16 weight-gradient kernel for strided 1x1
convolutions crashes the process (SIGSEGV) on AVX-512-BF16 CPUs without AMX (AMD Zen 4) for
some narrow channel counts, e.g. 8 -> 16 channels-last: the projection shortcut of the narrow
test ResNets. ``StridedConv1x1`` avoids that kernel. Each check runs in a subprocess, so that
a native crash is one failed test with its output, not a dead suite. The run with
``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` makes oneDNN pick the Zen 4 kernels on a CPU with AMX
too (on a CPU without AVX-512 BF16 the cap changes nothing)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from detres.models.resnet import StridedConv1x1

SCRIPT = textwrap.dedent("""
    import torch
    from detres.models.resnet import StridedConv1x1
    from detres.structures import ImageBatch, Targets
    from tests_bf16_model import narrow_detector

    # The smallest pattern that crashed: 8 -> 16 channels, stride 2, channels-last, bf16 backward.
    torch.manual_seed(0)
    conv = StridedConv1x1(8, 16, 2).to(memory_format=torch.channels_last)
    x = torch.randn(1, 8, 16, 24).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    y.float().square().sum().backward()
    expected = torch.nn.functional.conv2d(x, conv.weight.detach().clone().requires_grad_(),
                                          stride=2)
    ref = conv.weight.detach().clone().requires_grad_()
    torch.nn.functional.conv2d(x, ref, stride=2).square().sum().backward()
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(conv.weight.grad, ref.grad, rtol=3e-2, atol=5e-1)

    # A training step and inference of the narrow detector under CPU bf16 autocast.
    model = narrow_detector().train()
    images = ImageBatch.from_tensors([torch.rand(3, 64, 96) * 255])
    targets = [Targets(torch.tensor([[20.0, 20.0, 50.0, 60.0]]), torch.tensor([1]), image_id=1)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values())
    sum(out.losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        detections = model(images).detections
    assert all(d.boxes.dtype == torch.float32 for d in detections)

    # The training loop with train.amp=bf16: autocast where this CPU (or the capped ISA)
    # computes bf16, float32 elsewhere; either way finite losses and updates.
    import math
    from detres.engine import Trainer, WarmupMultiStepSchedule
    model = narrow_detector().train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainer = Trainer(model, torch.optim.SGD(params, lr=1e-3), WarmupMultiStepSchedule(),
                      [(images, targets)] * 3, max_iter=3, task="detection", amp="bf16",
                      progress=False)
    assert all(math.isfinite(v) for v in trainer.run().losses)
    print("bf16 ok")
""")


@pytest.mark.parametrize("isa", [None, "AVX512_CORE_BF16"])
def test_bf16_cpu_training_step_runs_in_a_subprocess(isa, tmp_path):
    (tmp_path / "tests_bf16_model.py").write_text(textwrap.dedent("""
        from helpers import narrow_detector as build

        def narrow_detector():
            return build("rpn.proposals_train=32", "roi_head.batch_size_per_image=16")
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ONEDNN_", "DNNL_"))}
    tests = os.path.dirname(os.path.abspath(__file__))   # helpers.narrow_detector
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), tests, env.get("PYTHONPATH", "")])
    if isa is not None:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "bf16 ok" in proc.stdout, (
        f"CPU bf16 step failed with exit code {proc.returncode} "
        f"(ONEDNN_MAX_CPU_ISA={isa}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


@pytest.mark.parametrize("channels_last", [False, True])
def test_strided_conv1x1_subsampled_form_equals_the_direct_convolution(channels_last):
    """The bf16-CPU path (subsample, then a stride-1 1x1) is the same function as the strided
    convolution: checked in float64, where no kernel choice can blur a difference."""
    torch.manual_seed(0)
    conv = StridedConv1x1(6, 10, 2).double()
    x = torch.randn(2, 6, 15, 22, dtype=torch.float64)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    direct = torch.nn.functional.conv2d(x, conv.weight, stride=2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert torch.equal(conv(x), direct)
    subsampled = torch.nn.functional.conv2d(x[:, :, ::2, ::2], conv.weight)
    torch.testing.assert_close(subsampled, direct, rtol=0, atol=1e-12)
    bf16 = StridedConv1x1(6, 10, 2).bfloat16()
    with torch.no_grad():
        bf16.weight.copy_(conv.weight)
    xb = x.bfloat16().requires_grad_()
    out = bf16(xb)                     # the subsampled path: bf16 input with autograd
    assert out.shape == direct.shape
    torch.testing.assert_close(out.double(), direct, rtol=2e-2, atol=5e-2)
