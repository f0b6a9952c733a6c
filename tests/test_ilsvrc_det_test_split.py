"""ImageNet DET's test split (no public boxes) and the ILSVRC devkit's detection submission
format, written by format-only evaluation so that Table 12's test-set number can be obtained
from the evaluation server."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import NARROW_DETECTOR, load_tool, narrow_detector
from PIL import Image

from detres.config import ConfigError, dump, to_dict
from detres.data.images import DatasetError
from detres.evaluation.detection import ImageResult, ilsvrc_det_result_lines
from detres.structures import Detections
from detres.tasks.detection.build import build_det_dataset
from detres.tasks.detection.config import (DetDataConfig, DetDatasetConfig, DetectionConfig,
                                           DetTestConfig)

# the devkit numbers the synsets by name, not by WordNet id
MAP_DET = "n02672831 1 accordion\nn02691156 2 airplane\nn02219486 3 ant\n"
CLASSES = ["n02219486", "n02672831", "n02691156"]          # sorted WordNet ids
SIZES = {"ILSVRC2015_test_00000001": (80, 60), "ILSVRC2015_test_00000002": (50, 90)}


@pytest.fixture
def ilsvrc(tmp_path):
    root = tmp_path / "ILSVRC"
    images = root / "Data" / "DET" / "test"
    images.mkdir(parents=True)
    for name, (w, h) in SIZES.items():
        Image.new("RGB", (w, h), (120, 60, 30)).save(images / f"{name}.JPEG", format="JPEG")
    sets = root / "ImageSets" / "DET"
    sets.mkdir(parents=True)
    (sets / "test.txt").write_text("ILSVRC2015_test_00000001 1\nILSVRC2015_test_00000002 2\n")
    (root / "devkit" / "data").mkdir(parents=True)
    (root / "devkit" / "data" / "map_det.txt").write_text(MAP_DET)
    return root


def _data(root: Path, *splits: str) -> DetDataConfig:
    return DetDataConfig(val=DetDatasetConfig(type="imagenet_det", splits=splits or ("test",),
                                              root=str(root)),
                         min_size_test=64, max_size_test=96)


def test_the_test_split_reads_without_annotations(ilsvrc):
    data = _data(ilsvrc)
    test = build_det_dataset(data.val, data, train=False, key="data.val")
    assert not test.has_annotations
    assert test.class_names == CLASSES                     # the devkit's synsets, sorted
    assert test.label_to_category_id == [3, 1, 2]          # their DET ids
    assert test.image_ids.tolist() == [1, 2]               # the split file's indices
    assert test.image_sizes.tolist() == [[60, 80], [90, 50]]   # (h, w) from the headers
    image, _ = test[1]
    assert tuple(image.shape[1:]) == (96, 53)              # decoded: 90x50 -> 96 / 90
    bad = ilsvrc / "Data" / "DET" / "test" / "ILSVRC2015_test_00000002.JPEG"
    original = bad.read_bytes()
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="ILSVRC2015_test_00000002.JPEG: not a readable "
                                           "image.*data.skip_bad_images=true"):
        build_det_dataset(data.val, data, train=False, key="data.val")
    bad.write_bytes(original)
    (ilsvrc / "ImageSets" / "DET" / "test.txt").write_text("ILSVRC2015_test_00000001\n")
    with pytest.raises(DatasetError, match="test.txt: ILSVRC2015_test_00000001 has no image "
                                           "index"):
        build_det_dataset(data.val, data, train=False, key="data.val")
    (ilsvrc / "ImageSets" / "DET" / "test.txt").write_text("../../../etc/passwd 1\n")
    with pytest.raises(DatasetError, match="line 1: '../../../etc/passwd' is not a name"):
        build_det_dataset(data.val, data, train=False, key="data.val")
    (ilsvrc / "ImageSets" / "DET" / "val2.txt").write_text("x 1\n")
    with pytest.raises(DatasetError, match="cannot be read with annotated splits"):
        build_det_dataset(_data(ilsvrc, "val2", "test").val, data, train=False, key="data.val")
    (ilsvrc / "devkit" / "data" / "map_det.txt").unlink()
    (ilsvrc / "ImageSets" / "DET" / "test.txt").write_text("ILSVRC2015_test_00000001 1\n")
    with pytest.raises(DatasetError, match="map_det.txt: not found"):
        build_det_dataset(data.val, data, train=False, key="data.val")


def test_result_lines_invert_the_ilsvrc_coordinates():
    # XML xmin=1..xmax=10 is 0-based [0, 10) in detres; the image was resized by 2
    det = Detections(torch.tensor([[0.0, 2.0, 20.0, 30.0], [4.0, 4.0, 8.0, 8.0]]),
                     torch.tensor([0.5, 0.25]), torch.tensor([1, 0]))
    later = Detections(torch.tensor([[2.0, 2.0, 4.0, 6.0]]), torch.tensor([0.75]),
                       torch.tensor([2]))
    results = [ImageResult(image_id=7, scale=2.0, skipped=False, detections=det),
               ImageResult(image_id=3, scale=1.0, skipped=False, detections=later)]
    assert ilsvrc_det_result_lines(results, [3, 1, 2]) == [
        "3 2 0.750000 3.0 3.0 4.0 6.0",
        "7 1 0.500000 1.0 2.0 10.0 15.0",
        "7 3 0.250000 3.0 3.0 4.0 4.0"]


def test_format_only_writes_the_server_file(tmp_path, ilsvrc):
    torch.manual_seed(0)
    model = narrow_detector(num_classes=3)
    cfg = DetectionConfig(model=NARROW_DETECTOR, data=_data(ilsvrc),
                          test=DetTestConfig(metric="imagenet_det"))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, output_dir=str(tmp_path / "run"), num_workers=0, device="cpu"))
    # a model with every box score kept, so that the file has lines to check
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, roi_head=dataclasses.replace(cfg.model.roi_head, score_threshold=0.0)))
    (tmp_path / "config.yaml").write_text(dump(cfg))
    torch.save({"task": "detection", "model": model.state_dict(), "config": to_dict(cfg),
                "class_names": CLASSES, "category_ids": [3, 1, 2]}, tmp_path / "model.pth")
    eval_det = load_tool("eval_det")
    argv = [str(tmp_path / "config.yaml"), "--weights", str(tmp_path / "model.pth")]
    with pytest.raises(ConfigError, match="no ground truth.*test.format_only=true"):
        eval_det.main(argv)
    out = eval_det.main(argv + ["--format-only"])
    path = Path(out["format_only"])
    assert path.name == "ilsvrc_det_results.txt"
    lines = path.read_text().splitlines()
    assert out["num_images"] == 2 and out["num_detections"] == len(lines) > 0
    seen = set()
    for line in lines:
        index, det_id, score, x1, y1, x2, y2 = line.split()
        w, h = list(SIZES.values())[int(index) - 1]
        assert det_id in {"1", "2", "3"} and 0 <= float(score) <= 1
        assert 1 <= float(x1) <= float(x2) <= w + 1e-3 and 1 <= float(y1) <= float(y2) <= h
        seen.add(int(index))
    assert seen <= {1, 2}
    assert [int(x.split()[0]) for x in lines] == sorted(int(x.split()[0]) for x in lines)
    # without the devkit's DET ids no server file can be written: one line, before inference
    (ilsvrc / "devkit" / "data" / "map_det.txt").write_text("n02672831 1 accordion\n")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val=dataclasses.replace(
        cfg.data.val, class_names=tuple(CLASSES))))
    (tmp_path / "config.yaml").write_text(dump(cfg))
    with pytest.raises(ConfigError, match="map_det.txt"):
        eval_det.main(argv + ["--format-only"])


@pytest.mark.parametrize("path", ["ImageSets/DET/test.txt", "devkit/data/map_det.txt"])
def test_a_list_file_that_is_not_utf8_is_named(ilsvrc, path):
    (ilsvrc / path).write_bytes((ilsvrc / path).read_bytes() + b"\xe9t\xe9\n")
    with pytest.raises(DatasetError, match=rf"{path}: not a UTF-8 text file"):
        build_det_dataset(_data(ilsvrc).val, _data(ilsvrc), train=False, key="data.val")
