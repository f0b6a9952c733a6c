"""tools/plot_curves.py: metrics.jsonl -> PNG with train (dashed) and test (bold) error."""
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from helpers import load_tool

ROOT = Path(__file__).resolve().parent.parent
plot_curves = load_tool("plot_curves")




def write_run(folder: Path, final_err: float, with_eval: bool = True) -> Path:
    folder.mkdir(parents=True)
    lines = [{"phase": "train", "iteration": i, "loss": 1.0,
              "top1_err": 90 - i * (90 - final_err) / 100} for i in range(10, 101, 10)]
    if with_eval:
        lines += [{"phase": "eval", "iteration": i, "top1_err": 95 - i * (95 - final_err) / 100,
                   "top5_err": 0.0} for i in (50, 100)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_two_panels_render_a_png(tmp_path):
    runs = {n: write_run(tmp_path / n, e) for n, e in
            (("plain20", 10), ("plain56", 20), ("resnet20", 8), ("resnet56", 5))}
    out = plot_curves.main(["--panel", f"plain-20={runs['plain20']}", str(runs["plain56"]),
                            "--panel", str(runs["resnet20"]),
                            str(runs["resnet56"] / "metrics.jsonl"),
                            "--out", str(tmp_path / "fig6.png"), "--smooth", "2",
                            "--title", "plain vs residual"])
    image = matplotlib.image.imread(out)
    assert image.shape[1] > image.shape[0] > 100 and np.ptp(image) > 0   # two panels side by side


def test_curves_split_train_and_test_records(tmp_path):
    (tx, ty), (sx, sy) = plot_curves.curves(
        [{"phase": "train", "iteration": 1, "top1_err": 50.0},
         {"phase": "train", "iteration": 2, "top1_err": 30.0},
         {"phase": "eval", "iteration": 2, "top1_err": 40.0}], "top1_err", smooth=2)
    assert tx.tolist() == [2.0] and ty.tolist() == [40.0]
    assert sx.tolist() == [2.0] and sy.tolist() == [40.0]


def test_runs_without_values_or_files_fail_clearly(tmp_path):
    run = write_run(tmp_path / "r", 5, with_eval=False)
    assert plot_curves.main([str(run), "--out", str(tmp_path / "a.png")]).is_file()
    with pytest.raises(ValueError, match="no 'top5_err' values"):
        plot_curves.main([str(run), "--metric", "top5_err", "--out", str(tmp_path / "b.png")])
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plot_curves.main([str(tmp_path / "missing"), "--out", str(tmp_path / "c.png")])
