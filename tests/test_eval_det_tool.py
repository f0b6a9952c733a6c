"""tools/eval_det.py from files: same numbers as pycocotools called directly."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from helpers import load_tool, perturbed_results

ROOT = Path(__file__).resolve().parents[1]
eval_det = load_tool("eval_det")


TOOL = ROOT / "tools" / "eval_det.py"
COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128" / "annotations.json"
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")



def write_perturbed_results(gt_path: Path, out: Path, seed: int = 1) -> None:
    out.write_text(json.dumps(perturbed_results(json.loads(gt_path.read_text()), seed)))


@pytest.mark.skipif(not COCO128.is_file(), reason=f"coco128 not found at {COCO128}")
def test_cli_matches_pycocotools_on_coco128(tmp_path):
    dt = tmp_path / "results.json"
    write_perturbed_results(COCO128, dt)
    out = tmp_path / "eval" / "metrics.json"
    proc = subprocess.run([sys.executable, str(TOOL), "--gt", str(COCO128), "--dt", str(dt), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "AP50" in proc.stdout and "per-class AP" in proc.stdout and "loading" not in proc.stdout.lower()
    metrics = json.loads(out.read_text())["bbox"]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(COCO128))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(dt)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    np.testing.assert_allclose([metrics[k] for k in STATS], evaluator.stats[:12] * 100, rtol=0, atol=1e-9)
    assert metrics["per_class"]["toaster"] is None          # no ground truth: nan -> null
    assert 0 < metrics["per_class"]["person"] < 100


def hand_case_files(tmp_path: Path) -> tuple[Path, Path]:
    """tests/test_voc_eval.py's hand case as COCO files (difficult via 'difficult' and 'ignore')."""
    anns = [(1, [0, 0, 10, 10], {}), (1, [20, 20, 10, 10], {}), (1, [40, 40, 10, 10], {"difficult": 1}),
            (2, [0, 0, 10, 10], {}), (2, [60, 60, 5, 5], {"ignore": 1})]
    gt = {"images": [{"id": 1, "width": 120, "height": 120}, {"id": 2, "width": 120, "height": 120}],
          "categories": [{"id": 1, "name": "thing"}],
          "annotations": [{"id": k + 1, "image_id": i, "category_id": 1, "bbox": b, "area": b[2] * b[3],
                           "iscrowd": 0, **flags} for k, (i, b, flags) in enumerate(anns)]}
    dets = [(1, [0, 0, 10, 10], 0.9), (1, [41, 41, 9, 9], 0.8), (1, [0, 0, 10, 9], 0.7),
            (2, [0, 0, 10, 10], 0.6), (1, [100, 100, 10, 10], 0.5), (1, [20, 20, 10, 10], 0.4),
            (2, [60, 60, 5, 5], 0.35)]
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(gt))
    dt_path.write_text(json.dumps([{"image_id": i, "category_id": 1, "bbox": b, "score": s} for i, b, s in dets]))
    return gt_path, dt_path


@pytest.mark.parametrize("metric, expected", [("voc07", 8.4 / 11 * 100), ("voc12", 34 / 45 * 100)])
def test_voc_metrics_from_files(tmp_path, capsys, metric, expected):
    gt_path, dt_path = hand_case_files(tmp_path)
    out = tmp_path / "m.json"
    metrics = eval_det.main(["--gt", str(gt_path), "--dt", str(dt_path), "--metric", metric,
                             "--out", str(out)])
    assert "per_class" in metrics
    metrics = json.loads(out.read_text())["bbox"]
    assert metrics["mAP"] == pytest.approx(expected) and metrics["per_class"]["thing"] == pytest.approx(expected)
    assert "mAP" in capsys.readouterr().out


def test_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        eval_det.main(["--help"])
    assert info.value.code == 0 and "--metric" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="needs both"):
        eval_det.main(["--gt", "a.json"])
    with pytest.raises(SystemExit, match="no such file"):
        eval_det.main(["--gt", str(tmp_path / "a.json"), "--dt", str(tmp_path / "b.json")])
    with pytest.raises(SystemExit, match="model mode needs --weights"):
        eval_det.main(["configs/frcnn_r18_shapes.yaml", "train.device=cpu"])
    gt_path, dt_path = hand_case_files(tmp_path)
    dt_path.write_text(json.dumps([{"image_id": 3, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}]))
    with pytest.raises(SystemExit, match="image id 3"):
        eval_det.main(["--gt", str(gt_path), "--dt", str(dt_path)])
