"""The memory check before a detection run's first step (tasks/detection/memory.py): what
autograd saves, counted against a hand count; an estimate linear in images and RoIs and within
a stated factor of a real step's measured peak; the README's own-data commands on a 24 GiB
CPU: the GPU one refused in one line before the model is built, the CPU one accepted."""
import json
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from helpers import ROOT, load_tool

from detres.config import ConfigError, load_config
from detres.engine.distributed import DistInfo
from detres.tasks.detection import memory, run
from detres.tasks.detection.config import DetectionConfig
from detres.tasks.detection.memory import (GiB, check_iteration_memory,
                                           estimate_iteration_memory, saved_tensor_bytes)

train_det = load_tool("train_det")
CPU = torch.device("cpu")
# the narrow test detector, from scratch, float32 on every CPU
SMALL = ["model.backbone.depth=18", "model.backbone.width=16", "model.backbone.weights=null",
         "model.roi_head.roi_op=align", "model.rpn.proposals_train=300",
         "model.rpn.pre_nms_topk_train=1000", "model.roi_head.batch_size_per_image=128",
         "data.min_size_train=[320]", "data.max_size_train=512", "solver.ims_per_batch=2",
         "train.amp=none"]


def small_cfg(*overrides: str) -> DetectionConfig:
    return load_config(ROOT / "configs" / "frcnn_r18_shapes.yaml", [*SMALL, *overrides],
                       schema=DetectionConfig)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_saved_bytes_equal_a_hand_count_on_a_tiny_conv_net(device):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
                        nn.Conv2d(4, 2, 3, padding=1)).to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    resident = list(net.parameters())
    # conv1 keeps its input (for its weight's gradient): 2*3*8*8 floats; ReLU keeps its output,
    # which conv2 keeps as its input, one storage: 2*4*8*8 floats; the weights are resident
    assert saved_tensor_bytes(lambda: net(x), exclude=resident) == (2 * 3 * 64 + 2 * 4 * 64) * 4
    # a frozen first layer records nothing: only conv2's input stays
    net[0].requires_grad_(False)
    assert saved_tensor_bytes(lambda: net(x), exclude=resident) == 2 * 4 * 64 * 4
    # the weights count when not declared resident: conv2's (2, 4, 3, 3)
    assert saved_tensor_bytes(lambda: net(x)) == 2 * 4 * 64 * 4 + 2 * 4 * 9 * 4


def test_estimate_grows_linearly_with_images_and_rois():
    cfg = small_cfg()
    by_images = [estimate_iteration_memory(cfg, 3, n, CPU).total for n in (1, 2, 4)]
    assert by_images[0] < by_images[1] < by_images[2]
    assert by_images[2] - by_images[1] == pytest.approx(2 * (by_images[1] - by_images[0]),
                                                        rel=1e-6)
    by_rois = [estimate_iteration_memory(small_cfg(f"model.roi_head.batch_size_per_image={r}"),
                                         3, 2, CPU).activations for r in (64, 128, 256)]
    assert by_rois[0] < by_rois[1] < by_rois[2]
    assert by_rois[2] - by_rois[1] == pytest.approx(2 * (by_rois[1] - by_rois[0]), rel=1e-3)


def test_estimate_keeps_the_random_stream():
    state = torch.get_rng_state()
    estimate_iteration_memory(small_cfg(), 3, 2, CPU)
    assert torch.equal(state, torch.get_rng_state())


# One real training step (forward, backward, SGD with momentum) of the small detector in a
# fresh process: the growth of its peak resident set against the estimate, batch excluded
# (it exists before the step). A warm-up step on a 64 px image takes the first-call costs.
STEP = textwrap.dedent("""
    import ctypes, json, sys
    from pathlib import Path
    import torch
    from detres.config import load_config
    from detres.structures import ImageBatch, Targets
    from detres.tasks.common import build_optimizer
    from detres.tasks.detection.build import build_detector
    from detres.tasks.detection.config import DetectionConfig
    from detres.tasks.detection.memory import estimate_iteration_memory

    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def batch(n, h, w):
        g = torch.Generator().manual_seed(0)
        images = ImageBatch.from_tensors([torch.rand(3, h, w, generator=g) * 255
                                          for _ in range(n)])
        xy = torch.rand(n, 4, 2, generator=g) * torch.tensor([w / 2, h / 2])
        boxes = torch.cat((xy, xy + torch.tensor([w / 2, h / 2])), dim=2)
        return images, [Targets(boxes[i], torch.tensor([0, 1, 2, 0]), i) for i in range(n)]

    def step(optimizer, images, targets):
        out = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(out.losses.values()).backward()
        optimizer.step()

    torch.set_num_threads(1)
    cfg = load_config(sys.argv[1], sys.argv[2:], schema=DetectionConfig)
    n, h, w = cfg.solver.ims_per_batch, cfg.data.min_size_train[0], cfg.data.max_size_train
    torch.manual_seed(0)
    model = build_detector(cfg.model, 3).train()
    step(torch.optim.SGD(model.parameters(), lr=0.0), *batch(1, 64, 64))
    images, targets = batch(n, h, w)
    optimizer = build_optimizer(cfg.solver, model)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")        # the peak (VmHWM) := now (VmRSS)
    start = status("VmRSS")
    step(optimizer, images, targets)
    est = estimate_iteration_memory(cfg, 3, n, torch.device("cpu"))
    print(json.dumps({"measured": status("VmHWM") - start, "estimate": est.total - est.batch}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_estimate_is_within_a_stated_factor_of_a_measured_step():
    proc = subprocess.run([sys.executable, "-c", STEP,
                           str(ROOT / "configs" / "frcnn_r18_shapes.yaml"), *SMALL],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["measured"] > 50 * 2**20          # a step that the factor can be read on
    # 1.06x-1.10x in repeated runs on a 2-core AMD EPYC (Zen 4)
    assert 0.6 <= result["estimate"] / result["measured"] <= 1.7, result


def test_available_memory_takes_the_cgroup_limit_when_smaller(monkeypatch):
    files = {"/proc/meminfo": "MemTotal: 33554432 kB\nMemAvailable: 20971520 kB\n",
             "/proc/self/cgroup": "0::/job\n",
             "/sys/fs/cgroup/job/memory.max": "8589934592\n",          # 8 GiB
             "/sys/fs/cgroup/job/memory.current": "3221225472\n",      # 3 GiB, of which
             "/sys/fs/cgroup/job/memory.stat": "anon 1\ninactive_file 1073741824\n",  # 1 cache
             "/sys/fs/cgroup/memory.max": "max\n"}
    monkeypatch.setattr(memory, "_read", lambda path: files.get(str(path), ""))
    assert memory.available_memory(CPU) == 6 * GiB
    files["/sys/fs/cgroup/job/memory.max"] = "max\n"
    assert memory.available_memory(CPU) == 20 * GiB                   # MemAvailable
    files.update({"/proc/self/cgroup": "4:memory:/job\n1:cpu:/\n",    # v1
                  "/sys/fs/cgroup/memory/job/memory.limit_in_bytes": "4294967296\n",
                  "/sys/fs/cgroup/memory/job/memory.usage_in_bytes": "1073741824\n",
                  "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
                  "/sys/fs/cgroup/memory/memory.usage_in_bytes": "1\n"})
    assert memory.available_memory(CPU) == 3 * GiB


class Lines(list):
    """A logger that keeps its lines."""
    info = list.append


def test_each_process_checks_its_share(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: 24 * GiB)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")       # 4 processes on one machine's memory
    cfg, log = small_cfg("solver.ims_per_batch=16"), Lines()
    est = check_iteration_memory(cfg, 3, DistInfo(rank=1, world_size=4), CPU, log)
    assert est.images == 4 and est.total == estimate_iteration_memory(cfg, 3, 4, CPU).total
    assert re.fullmatch(rf"one training iteration needs about {4 * est.total / GiB:.1f} "
                        r"GiB \(4 images of up to 320x512 per process, 128 RoIs each, 4 "
                        r"processes\); 24\.0 GiB available on cpu", log[0]), log


# ----------------------------------------------------------------------------- the README
def own_data_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Train on your own COCO-format data", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def write_coco_set(root: Path) -> None:
    """mydata/ as the README lays it out: two 64x48 images, one box each."""
    (root / "mydata" / "images").mkdir(parents=True)
    (root / "mydata" / "annotations").mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (64, 48), (90, 120, 30)).save(root / "mydata" / "images" / name)
    ann = {"images": [{"id": i, "file_name": n, "width": 64, "height": 48}
                      for i, n in enumerate(("a.jpg", "b.jpg"), 1)],
           "annotations": [{"id": i, "image_id": i, "category_id": 7, "bbox": [8, 6, 30, 20],
                            "iscrowd": 0} for i in (1, 2)],
           "categories": [{"id": 7, "name": "bolt"}]}
    for split in ("train", "val"):
        (root / "mydata" / "annotations" / f"{split}.json").write_text(json.dumps(ann))


class Accepted(Exception):
    """Raised in place of building the model: the check let the run through."""


def accept(*args, **kwargs):
    raise Accepted


def run_readme_command(command: str, root: Path, monkeypatch) -> None:
    argv = shlex.split(command.replace("mydata/", f"{root}/mydata/"))
    tool = argv.index("tools/train_det.py")
    argv = [str(ROOT / a) if a.startswith("configs/") else a for a in argv[tool + 1:]]
    monkeypatch.setattr(memory, "available_memory", lambda device: 24 * GiB)
    monkeypatch.setattr(run, "build_detector", accept)
    train_det.main([*argv, f"train.output_dir={root}/out", "train.device=cpu",
                    "train.num_workers=0"])


def test_readme_gpu_command_is_refused_on_a_24_gib_cpu_before_the_model(tmp_path, monkeypatch):
    commands = own_data_commands()
    gpu = [c for c in commands if "ims_per_batch" not in c and "frcnn_r50_coco" in c]
    assert len(gpu) == 1, commands
    write_coco_set(tmp_path)
    with pytest.raises(ConfigError) as refused:   # before build_detector: nothing downloaded
        run_readme_command(gpu[0], tmp_path, monkeypatch)
    line = str(refused.value)
    assert "\n" not in line
    assert re.fullmatch(
        r"one training iteration needs about (\d+\.\d) GiB \(16 images of up to 800x1344 per "
        r"process, 512 RoIs each\) but 24\.0 GiB is available on cpu, of which the run may use "
        r"90%; lower solver\.ims_per_batch \(at most \d+ fit at these sizes\), "
        r"data\.min_size_train/max_size_train or model\.roi_head\.batch_size_per_image "
        r"\(train\.memory_check=false skips this check\)", line)
    assert float(re.search(r"about (\S+) GiB", line).group(1)) > 24


@pytest.mark.parametrize("amp", ["", " train.amp=none"])   # as on CPUs without bf16
def test_readme_cpu_command_fits_24_gib(tmp_path, monkeypatch, amp):
    cpu = own_data_commands()[0]
    assert "solver.ims_per_batch=2" in cpu
    write_coco_set(tmp_path)
    with pytest.raises(Accepted):
        run_readme_command(cpu + amp, tmp_path, monkeypatch)
    log = (tmp_path / "out" / "log.txt").read_text()
    assert re.search(r"one training iteration needs about \d\.\d GiB \(2 images", log)


def test_builtin_demo_fits_a_laptop(monkeypatch):
    cfg = load_config(ROOT / "configs" / "frcnn_r18_shapes.yaml", [], schema=DetectionConfig)
    monkeypatch.setattr(memory, "available_memory", lambda device: 4 * GiB)
    est = check_iteration_memory(cfg, 5, DistInfo(), CPU, Lines())
    assert est.total < GiB


def test_check_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: 1)
    with pytest.raises(ConfigError, match=r"not one image fits"):
        check_iteration_memory(small_cfg(), 3, DistInfo(), CPU, Lines())
    assert check_iteration_memory(small_cfg("train.memory_check=false"), 3, DistInfo(), CPU,
                                  Lines()) is None
