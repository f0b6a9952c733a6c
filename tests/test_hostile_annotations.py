"""Careless and hostile dataset files, as a user meets them: ids that are not int64 numbers,
``iscrowd`` that is not 0/1, a training set without one usable box, results naming images the
ground truth lacks, file names that lead out of the image folder, and EXIF-rotated images
(read as stored, in training and inference alike). Each tool ends with one ``error:`` line that
names the file and the bad value, never a traceback."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT, run_tool_script

from detres.config import load_config
from detres.data.coco import COCODetection
from detres.data.images import DatasetError, read_image
from detres.data.voc import VOCDetection
from detres.evaluation.coco_eval import load_results
from detres.data.image_files import load_image
from detres.tasks.detection.build import build_det_dataset
from detres.tasks.detection.config import DetectionConfig

CONFIG = ROOT / "configs" / "frcnn_r18_shapes.yaml"
HUGE = 2**70


def _coco(tmp_path: Path, annotations=None, images=None, categories=None) -> Path:
    """images/a.png (40x30) and ann.json with one box of category 1 unless told otherwise."""
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("RGB", (40, 30), (90, 30, 10)).save(tmp_path / "images" / "a.png")
    data = {"images": images or [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
            "annotations": ([{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10],
                              "iscrowd": 0}] if annotations is None else annotations),
            "categories": categories or [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path / "ann.json"


def _train_keys(tmp_path: Path) -> list[str]:
    return ["data.train.type=coco", f"data.train.annotations={tmp_path / 'ann.json'}",
            f"data.train.images={tmp_path / 'images'}", "data.min_size_train=[32]",
            "data.max_size_train=64"]


def _one_error_line(res, *words: str) -> str:
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _train_det(tmp_path: Path):
    val = [k.replace("data.train.", "data.val.") for k in _train_keys(tmp_path)[:3]]
    return run_tool_script("train_det", str(CONFIG), *_train_keys(tmp_path), *val,
                           f"train.output_dir={tmp_path / 'run'}", "train.max_iter=1",
                           "train.device=cpu", "train.num_workers=0")


# ------------------------------------------------------------------------------- ids, iscrowd
def test_train_det_refuses_an_annotation_id_beyond_int64(tmp_path):
    _coco(tmp_path, annotations=[{"id": HUGE, "image_id": 1, "category_id": 1,
                                  "bbox": [2, 2, 10, 10]}])
    _one_error_line(_train_det(tmp_path), "ann.json", "annotation #0", str(HUGE))


@pytest.mark.parametrize("where, key, value", [
    ("annotations", "id", "7"), ("annotations", "id", None), ("annotations", "id", True),
    ("annotations", "id", -3), ("annotations", "image_id", HUGE),
    ("annotations", "category_id", HUGE), ("images", "id", HUGE), ("categories", "id", HUGE)])
def test_ids_must_be_int64_numbers(tmp_path, where, key, value):
    path = _coco(tmp_path)
    data = json.loads(path.read_text())
    data[where][0][key] = value
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError) as e:
        COCODetection(path, tmp_path / "images")
    message = str(e.value)
    record = {"images": "image #0", "categories": "category #0",
              "annotations": "annotation #0" if key == "id" else "annotation id 1"}[where]
    assert f"{path}: {record} has '{key}' = {value!r}" in message, message


@pytest.mark.parametrize("value", ["no", 2, None])
def test_iscrowd_must_be_0_or_1(tmp_path, value):
    path = _coco(tmp_path, annotations=[{"id": 4, "image_id": 1, "category_id": 1,
                                         "bbox": [2, 2, 10, 10], "iscrowd": value}])
    with pytest.raises(DatasetError, match=rf"ann\.json: annotation id 4 \(image id 1\) has "
                                           rf"'iscrowd' = {value!r}, not 0 or 1"):
        COCODetection(path, tmp_path / "images")


def test_iscrowd_true_and_false_are_read_as_1_and_0(tmp_path):
    path = _coco(tmp_path, annotations=[
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "iscrowd": False},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "iscrowd": True}])
    assert COCODetection(path, tmp_path / "images").index.ignore.tolist() == [False, True]


# ------------------------------------------------------------------------ empty training set
def test_train_det_names_why_no_training_box_is_left(tmp_path):
    box = {"image_id": 1, "category_id": 1, "iscrowd": 0}
    _coco(tmp_path, annotations=[{**box, "id": 1, "bbox": [2, 2, 10, 10], "iscrowd": 1},
                                 {**box, "id": 2, "bbox": [3, 3, 20, 10], "iscrowd": 1},
                                 {**box, "id": 3, "bbox": [2, 2, 0.5, 10]}])
    line = _one_error_line(_train_det(tmp_path), "ann.json", "1 images", "3 annotations",
                           "2 crowd", "1 under 1 px")
    assert "empty dataset" not in line


def test_a_training_set_without_annotations_is_refused_with_counts(tmp_path):
    path = _coco(tmp_path, annotations=[])
    with pytest.raises(DatasetError, match=r"ann\.json: no training box: 1 images and 0 "
                                           r"annotations read"):
        COCODetection(path, tmp_path / "images", filter_empty=True)
    assert len(COCODetection(path, tmp_path / "images")) == 1   # evaluation keeps it


def test_a_voc_training_set_of_difficult_objects_only_is_refused(tmp_path):
    root = tmp_path / "VOC2024"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(root / "JPEGImages" / "p1.jpg")
    (root / "Annotations" / "p1.xml").write_text(
        "<annotation><size><width>40</width><height>30</height></size><object><name>cat</name>"
        "<difficult>1</difficult><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>20</xmax>"
        "<ymax>20</ymax></bndbox></object></annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("p1\n")
    with pytest.raises(DatasetError, match=r"VOC2024:train: no training box: 1 images and 1 "
                                           r"objects read, none usable \(1 difficult, 0 under "
                                           r"1 px"):
        VOCDetection((root, "train"), filter_empty=True)


# ---------------------------------------------------------------- results naming unknown ids
@pytest.fixture
def results_with_huge_id(tmp_path):
    gt = _coco(tmp_path)
    dt = tmp_path / "dt.json"
    dt.write_text(json.dumps([
        {"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "score": 0.9},
        {"image_id": HUGE, "category_id": 1, "bbox": [2, 2, 10, 10], "score": 0.8}]))
    return gt, dt


def test_eval_det_names_a_results_image_id_beyond_int64(results_with_huge_id):
    gt, dt = results_with_huge_id
    res = run_tool_script("eval_det", "--gt", str(gt), "--dt", str(dt))
    _one_error_line(res, "dt.json", "result 1", str(HUGE))


def test_analyze_det_names_a_results_image_id_beyond_int64(results_with_huge_id, tmp_path):
    gt, dt = results_with_huge_id
    res = run_tool_script("analyze_det", "--gt", str(gt), "--dt", str(dt), "--out",
                          str(tmp_path / "analysis"))
    _one_error_line(res, "dt.json", "result 1", str(HUGE))


@pytest.mark.parametrize("value", [True, 2**64 - 1, -(2**63) - 1])
def test_results_ids_must_be_int64_numbers(tmp_path, value):
    gt = json.loads(_coco(tmp_path).read_text())
    results = [{"image_id": 1, "category_id": value, "bbox": [0, 0, 1, 1], "score": 0.5}]
    with pytest.raises(ValueError, match=rf"result 0 has category_id {value!r}"):
        load_results(results, gt)



@pytest.mark.parametrize("where, key", [("images", "id"), ("categories", "id"),
                                        ("annotations", "image_id"),
                                        ("annotations", "category_id")])
@pytest.mark.parametrize("tool", ["eval_det", "analyze_det"])
def test_ground_truth_ids_beyond_int64_are_named(tmp_path, where, key, tool):
    gt = _coco(tmp_path)
    data = json.loads(gt.read_text())
    data[where][0][key] = HUGE
    gt.write_text(json.dumps(data))
    dt = tmp_path / "dt.json"
    dt.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10],
                               "score": 0.9}]))
    extra = ["--out", str(tmp_path / "analysis")] if tool == "analyze_det" else []
    res = run_tool_script(tool, "--gt", str(gt), "--dt", str(dt), *extra)
    _one_error_line(res, "ann.json", f"{where}[0] has {key} {HUGE}")


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "{\"images\": [", "\xff\xfe"],
                         ids=["nested", "cut", "not-utf8"])
@pytest.mark.parametrize("which", ["gt", "dt"])
def test_eval_det_names_a_file_that_is_not_json(tmp_path, which, text):
    files = {"gt": _coco(tmp_path), "dt": tmp_path / "dt.json"}
    files["dt"].write_text(json.dumps([]))
    files[which].write_bytes(text.encode("latin-1"))
    res = run_tool_script("eval_det", "--gt", str(files["gt"]), "--dt", str(files["dt"]))
    _one_error_line(res, files[which].name, "not valid JSON")


# ------------------------------------------------------------ paths outside the image folder
def test_browse_data_refuses_a_file_name_outside_the_image_folder(tmp_path):
    Image.new("RGB", (40, 30), (200, 0, 0)).save(tmp_path / "private.png")
    _coco(tmp_path, images=[{"id": 5, "file_name": "../private.png", "width": 40,
                             "height": 30}],
          annotations=[{"id": 1, "image_id": 5, "category_id": 1, "bbox": [2, 2, 10, 10]}])
    res = run_tool_script("browse_data", str(CONFIG), *_train_keys(tmp_path), "--out",
                          str(tmp_path / "drawn"))
    _one_error_line(res, "ann.json", "image id 5", "'../private.png'", "allow_outside_paths")
    assert not (tmp_path / "drawn").exists()


def _train_set(tmp_path: Path, *overrides: str):
    cfg = load_config(CONFIG, [*_train_keys(tmp_path), *overrides], schema=DetectionConfig)
    return build_det_dataset(cfg.data.train, cfg.data, True, "data.train")


def test_an_absolute_file_name_is_refused_unless_allowed(tmp_path):
    outside = tmp_path / "elsewhere" / "b.png"
    outside.parent.mkdir()
    Image.new("RGB", (40, 30)).save(outside)
    _coco(tmp_path, images=[{"id": 1, "file_name": str(outside), "width": 40, "height": 30}])
    with pytest.raises(DatasetError, match=r"image id 1 has file_name '.*b\.png', which "
                                           r"leads outside the image folder"):
        _train_set(tmp_path)
    ds = _train_set(tmp_path, "data.train.allow_outside_paths=true")
    assert ds.path(0) == outside and ds[0][0].shape[0] == 3


def test_links_inside_the_image_folder_and_inner_dots_are_followed(tmp_path):
    """The check is on the file name as written (lexical): the folder's own symbolic links are
    the user's (image folders are often linked in), only the annotation file is untrusted."""
    real = tmp_path / "store" / "c.png"
    real.parent.mkdir()
    Image.new("RGB", (40, 30)).save(real)
    _coco(tmp_path, images=[{"id": 1, "file_name": "sub/../linked.png", "width": 40,
                             "height": 30}])
    os.symlink(real, tmp_path / "images" / "linked.png")
    assert _train_set(tmp_path).read_image(0).shape == (30, 40, 3)


def test_a_voc_image_name_outside_its_folders_is_refused(tmp_path):
    root = tmp_path / "VOC2024"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("../../../etc/passwd\n")
    with pytest.raises(DatasetError, match=r"train\.txt: image name '\.\./\.\./\.\./etc/passwd', "
                                           r"which leads outside"):
        VOCDetection((root, "train"))


# ------------------------------------------------------------------------- EXIF orientation
def test_a_square_exif_rotated_image_is_read_as_stored_in_training_and_inference(tmp_path):
    """COCO's rule: boxes are on the pixels as stored; the EXIF orientation is ignored, by the
    dataset and the predictor alike (a square image would pass the size check rotated)."""
    stored = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    (tmp_path / "images").mkdir()
    im.save(tmp_path / "images" / "r.png", exif=exif)
    assert Image.open(tmp_path / "images" / "r.png").getexif()[0x0112] == 6
    path = _coco(tmp_path, images=[{"id": 1, "file_name": "r.png", "width": 16, "height": 16}])
    np.testing.assert_array_equal(read_image(tmp_path / "images" / "r.png"), stored)
    np.testing.assert_array_equal(load_image(tmp_path / "images" / "r.png"), stored)
    image, targets = COCODetection(path, tmp_path / "images")[0]
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), stored)
    assert targets.boxes.tolist() == [[2.0, 2.0, 12.0, 12.0]]
