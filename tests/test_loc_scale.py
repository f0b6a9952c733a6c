"""The localizer's pipelines at ImageNet scale (Appendix C): the R-CNN runs on pieces of a
bounded size whatever the images and ensemble members, an ensemble's proposal union is NMS-ed
and capped, the R-CNN's training proposals stay in each rank's share on disk, and the models'
modules depend one way."""
from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import imported_modules

from detres.config import ConfigError, load_config
from detres.config import replace as replace_config
from detres.data import loc_batches
from detres.data.loc_batches import RCNNSamples
from detres.engine.checkpoint import CheckpointError
from detres.models.anchors import AnchorGenerator
from detres.models.classifier import Classifier
from detres.models.loc_inference import (LocalizerEnsemble, LocTestSettings, localize,
                                         union_proposals)
from detres.models.localizer import Localizer, PerClassRPN, PerClassRPNHead, RCNNRefiner
from detres.models.resnet import ResNet
from detres.tasks.localization.build import loc_test_settings
from detres.tasks.localization.config import LocalizationConfig
from detres.tasks.localization.inference import loc_views
from detres.tasks.localization.proposals import (ProposalStore, cached_training_proposals,
                                                 shard_path, slice_bounds, training_proposals)

pytestmark = pytest.mark.usefixtures("one_thread")
MEAN, STD = (120.0, 110.0, 100.0), (60.0, 60.0, 60.0)
CPU = torch.device("cpu")
MODELS = Path(__file__).resolve().parents[1] / "detres" / "models"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_rpn(num_classes: int = 3) -> PerClassRPN:
    trunk, _ = ResNet(18, num_classes=None, width=8).c4_split()
    anchors = AnchorGenerator((16, 32), (0.5, 1.0, 2.0), stride=trunk.stride)
    head = PerClassRPNHead(trunk.out_channels, anchors.num_anchors, num_classes)
    for layer in (head.cls_logits, head.bbox_pred):   # spread scores and boxes
        torch.nn.init.normal_(layer.weight, std=0.5)
        torch.nn.init.normal_(layer.bias, std=0.5)
    return PerClassRPN(trunk, head, anchors, MEAN, STD).eval()


def tiny_localizer(seed: int, num_classes: int = 3) -> Localizer:
    torch.manual_seed(seed)
    classifier = Classifier(ResNet(18, num_classes=num_classes, width=8), MEAN, STD)
    rcnn = RCNNRefiner(ResNet(18, num_classes=None, width=8), num_classes, 32, MEAN, STD)
    return Localizer(classifier, tiny_rpn(num_classes), rcnn).eval()


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (48 + 8 * (i % 2), 64, 3), dtype=np.uint8) for i in range(n)]


SETTINGS = LocTestSettings(scales=(64,), topk_classes=2, proposals_per_class=12,
                           cls_test_size=48, cls_crop=48)


def run(model, ims: list[np.ndarray], settings: LocTestSettings) -> list[dict]:
    views = loc_views(ims, settings, originals=True)
    return localize(model, views, [[2]] * len(ims), settings, CPU)


def rcnn_batches(model) -> list[int]:
    """Records the batch of every forward of each R-CNN network in ``model``."""
    sizes: list[int] = []
    for m in model.modules():
        if isinstance(m, RCNNRefiner):
            m.net.register_forward_pre_hook(lambda _, args: sizes.append(len(args[0])))
    return sizes


def test_models_modules_depend_one_way():
    """No cycle among detres/models/* imports (``TYPE_CHECKING`` imports count too)."""
    graph = {}
    for path in MODELS.glob("*.py"):
        graph[path.stem] = {n.split(".")[2] for n in imported_modules(path)
                            if n.startswith("detres.models.") and n.count(".") >= 2}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n}))
                   for n in graph.get(start, ()))

    cycles = sorted(m for m in graph if reaches(m, m, {m}))
    assert not cycles, f"import cycle through {cycles}"


def test_union_is_unchanged_under_the_cap_without_overlap_and_capped_otherwise():
    a = [[(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0.5]))]]
    b = [[(torch.tensor([[20.0, 20, 30, 30], [40.0, 0, 50, 10]]), torch.tensor([0.7, 0.2]))]]
    plain = union_proposals([a, b])
    (((boxes, scores),),) = union_proposals([a, b], 0.7, 3)
    torch.testing.assert_close(boxes, plain[0][0][0])
    torch.testing.assert_close(scores, torch.tensor([0.7, 0.5, 0.2]))
    # member c repeats a's box (IoU 1 > 0.7: suppressed) and adds two: the top 3 remain
    c = [[(torch.tensor([[0.0, 0, 10, 10], [60.0, 0, 70, 10], [80.0, 0, 90, 10]]),
           torch.tensor([0.4, 0.6, 0.1]))]]
    (((boxes, scores),),) = union_proposals([a, b, c], 0.7, 3)
    torch.testing.assert_close(scores, torch.tensor([0.7, 0.6, 0.5]))
    torch.testing.assert_close(boxes, torch.tensor([[20.0, 20, 30, 30], [60, 0, 70, 10],
                                                    [0, 0, 10, 10]]))


def test_chunked_refinement_equals_one_pass():
    model, ims = tiny_localizer(0), images(3)
    sizes = rcnn_batches(model)
    whole = run(model, ims, SETTINGS)
    (total,) = sizes                                  # one forward held every crop
    assert total > 20
    for chunk in (1, 7):
        sizes.clear()
        chunked = run(model, ims, replace(SETTINGS, rcnn_chunk=chunk))
        assert max(sizes) <= chunk and sum(sizes) == total
        for r1, r2 in zip(whole, chunked):
            for method in ("RPN", "RPN+R-CNN"):
                torch.testing.assert_close(r1[method]["boxes"], r2[method]["boxes"])
                torch.testing.assert_close(r1[method]["box_scores"], r2[method]["box_scores"])


@pytest.mark.parametrize("num_images,num_members", [(1, 1), (4, 3)])
def test_largest_rcnn_batch_is_bounded_whatever_the_images_and_members(num_images,
                                                                      num_members):
    members = [tiny_localizer(seed) for seed in range(num_members)]
    model = members[0] if num_members == 1 else LocalizerEnsemble(members).eval()
    sizes = rcnn_batches(model)
    settings = replace(SETTINGS, rcnn_chunk=16)
    records = run(model, images(num_images), settings)
    assert len(records) == num_images and max(sizes) <= 16
    # each R-CNN refines at most proposals_per_class per class of each image (top-2 guesses
    # and the ground-truth class), not num_members times as many
    assert sum(sizes) <= num_members * num_images * 3 * 12


def test_cpu_runs_in_fp32_and_the_config_sets_chunk_and_cuda_autocast():
    model = tiny_localizer(0)
    dtypes = []
    model.rcnn.net.conv1.register_forward_hook(lambda _, __, out: dtypes.append(out.dtype))
    run(model, images(1), replace(SETTINGS, cuda_amp=torch.bfloat16))
    assert dtypes == [torch.float32]
    cfg = load_config(CONFIGS / "loc_r18_builtin.yaml", ["test.rcnn_chunk=7", "train.amp=fp16"],
                      schema=LocalizationConfig)
    settings = loc_test_settings(cfg)
    assert settings.rcnn_chunk == 7 and settings.cuda_amp == torch.float16
    assert loc_test_settings(replace_config(cfg, ["train.amp=none"])).cuda_amp is None
    with pytest.raises(ConfigError, match="test.rcnn_chunk"):
        replace_config(cfg, ["test.rcnn_chunk=0"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_the_rcnn_under_autocast():
    model = tiny_localizer(0).cuda()
    dtypes = []
    model.rcnn.net.conv1.register_forward_hook(lambda _, __, out: dtypes.append(out.dtype))
    views = loc_views(images(2), SETTINGS, originals=True)
    settings = replace(SETTINGS, cuda_amp=torch.bfloat16)
    records = localize(model, views, [[2], [2]], settings, torch.device("cuda"))
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert records[0]["RPN+R-CNN"]["boxes"].dtype == torch.float32


class BoxImages:
    """Five 48x64 images with one or two classes of boxes each (test-loader samples)."""

    class_names = ["a", "b", "c"]

    def __len__(self) -> int:
        return 5

    def get_annotations(self, i: int) -> dict:
        labels = np.array([i % 3] if i % 2 else [i % 3, (i + 1) % 3])
        return {"labels": labels, "boxes": np.tile([[8.0, 6.0, 40.0, 30.0]], (len(labels), 1))}

    def __getitem__(self, i: int) -> SimpleNamespace:
        rng = np.random.default_rng(i)
        ann = self.get_annotations(i)
        return SimpleNamespace(image=rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
                               index=i, boxes=ann["boxes"], labels=ann["labels"])


PROPOSAL_SETTINGS = LocTestSettings(scales=(48,), proposals_per_class=6)


def reference_proposals() -> dict:
    torch.manual_seed(0)
    data = BoxImages()
    return training_proposals(tiny_rpn(), loc_batches.inference_loader(data, 1, 0, 1, 0), data,
                              PROPOSAL_SETTINGS, CPU)


def test_proposal_store_reads_every_image_and_a_resumed_run_reuses_it(tmp_path):
    data, reference = BoxImages(), reference_proposals()
    torch.manual_seed(0)
    loader = loc_batches.inference_loader(data, 1, 0, 1, 0)
    store = cached_training_proposals(tmp_path / "proposals.pth", False, tiny_rpn(), loader,
                                      data, PROPOSAL_SETTINGS, CPU)
    assert store.maps == {} and len(store) == 5
    for i, (boxes, classes) in reference.items():
        torch.testing.assert_close(store[i][0], boxes)
        assert torch.equal(store[i][1], classes)
    assert all(isinstance(m, np.memmap) for m in store.maps.values())
    again = cached_training_proposals(tmp_path / "proposals.pth", True, None, [object()],
                                      data, PROPOSAL_SETTINGS, CPU)   # no RPN, no loader run
    assert torch.equal(again[3][0], store[3][0])


def test_bad_proposal_files_stop_with_the_file_named(tmp_path):
    index = tmp_path / "proposals.pth"
    torch.save({0: [torch.zeros(1, 4), torch.zeros(1)]}, index)         # an earlier layout
    with pytest.raises(CheckpointError, match="delete it"):
        ProposalStore.load(index, 5, 3)
    counts = torch.tensor([1, 0, 0, 0, 1])
    torch.save({"bounds": [0, 5], "counts": counts}, index)
    np.save(shard_path(index, 0), np.array([[0, 0, 4, 4, 1], [0, 0, 4, 4, 7]], np.float32))
    store = ProposalStore.load(index, 5, 3)
    assert store[0][1].tolist() == [1]
    with pytest.raises(CheckpointError, match=r"proposals\.rank0\.npy.*image 4"):
        store[4]                                                      # class 7 of 3
    np.save(shard_path(index, 0), np.zeros((3, 5), np.float32))
    with pytest.raises(CheckpointError, match="shape"):
        ProposalStore.load(index, 5, 3)
    shard_path(index, 0).unlink()
    with pytest.raises(CheckpointError, match=r"proposals\.rank0\.npy: cannot read"):
        ProposalStore.load(index, 5, 3)


def _proposal_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        data = BoxImages()
        torch.manual_seed(0)
        rpn = tiny_rpn()
        loader = loc_batches.inference_loader(data, 1, rank, world_size, 0)
        mine = training_proposals(rpn, loader, data, PROPOSAL_SETTINGS, CPU)
        store = cached_training_proposals(Path(folder) / "proposals.pth", False, rpn, loader,
                                          data, PROPOSAL_SETTINGS, CPU)
        mapped_before = dict(store.maps)
        samples = RCNNSamples(data, store, rois_per_image=16, flip_prob=0.5)
        drawn = {i: samples[(i, 100 + i)][1:3] for i in range(len(data))}
        torch.save({"mine": sorted(mine), "mapped_before": len(mapped_before),
                    "memmaps": all(isinstance(m, np.memmap) for m in store.maps.values()),
                    "drawn": drawn}, Path(folder) / f"rank{rank}.pth")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_two_ranks_keep_their_share_and_read_the_right_boxes(tmp_path):
    reference, data = reference_proposals(), BoxImages()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_proposal_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    bounds = slice_bounds(5, 2)
    assert bounds == [0, 3, 5]
    expected = RCNNSamples(data, reference, rois_per_image=16, flip_prob=0.5)
    for rank in (0, 1):
        out = torch.load(tmp_path / f"rank{rank}.pth", weights_only=True)
        share = list(range(bounds[rank], bounds[rank + 1]))
        assert out["mine"] == share                     # made and held: this rank's images only
        rows = np.load(shard_path(tmp_path / "proposals.pth", rank), allow_pickle=False)
        assert len(rows) == sum(len(reference[i][0]) for i in share)   # its file: its share
        np.testing.assert_allclose(rows[:, :4], torch.cat([reference[i][0] for i in share]))
        assert out["mapped_before"] == 0 and out["memmaps"]          # read through maps
        for i, (rois, classes) in out["drawn"].items():             # every image, any rank
            want = expected[(i, 100 + i)]
            torch.testing.assert_close(rois, want[1])
            assert torch.equal(classes, want[2])
