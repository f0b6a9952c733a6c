#!/usr/bin/env python
"""Training and test error curves from metrics.jsonl files, in the style of He et al. 2015
Fig. 1 and Fig. 6: thin dashed lines are training error, bold lines test error, one colour
per run.

    python tools/plot_curves.py RUN [RUN ...] --out curves.png
    python tools/plot_curves.py --panel plain-20=out/p20 plain-56=out/p56 \\
                                --panel ResNet-20=out/r20 ResNet-56=out/r56 --out fig6.png

RUN is a run folder (or its metrics.jsonl), optionally prefixed by LABEL=; the label defaults
to the folder name. Each --panel draws one subplot (Fig. 6: plain nets left, ResNets right).
Training error is the logged top-1 error of the training batches (augmented, train mode), as in
the paper; test error is that of the evaluations.

--metric takes a name as metrics.jsonl holds it (``top1_err``, ``loss``, ``AP``) or as
``eval/metrics.json`` and ``train.best_metric`` name it (``bbox/AP``: detection results stand
under ``bbox`` there, at the top in metrics.jsonl). An unknown name lists the names the runs have.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np

from detres.cli import run_main
from detres.engine.best import flatten_metrics
from detres.engine.logging import read_metrics

matplotlib.use("Agg")   # before pyplot is first imported (in plot): files only, no display


def parse_run(spec: str) -> tuple[str, Path]:
    label, sep, path = spec.partition("=")
    if not sep:
        path = label
        label = Path(path).name if Path(path).is_dir() else Path(path).parent.name
    return label, Path(path)


# eval/metrics.json files detection results under this group (detres/evaluation/detection.py);
# the Trainer writes the same results to metrics.jsonl without it
RESULT_GROUPS = ("bbox",)


def numbers_of(record: dict) -> dict[str, float]:
    """A metrics.jsonl record's numbers by name, ``/`` between levels as in best_metric."""
    return flatten_metrics({k: v for k, v in record.items() if k not in ("iteration", "phase")})


def value_of(record: dict, metric: str) -> float | None:
    """The value of ``metric`` in one metrics.jsonl record, named as there or as in
    eval/metrics.json (``bbox/AP`` for an evaluation's ``AP``); None when it has none."""
    flat = numbers_of(record)
    if metric in flat:
        return flat[metric]
    group, _, rest = metric.partition("/")
    if group in RESULT_GROUPS and record.get("phase") == "eval":
        return flat.get(rest)
    return None


def metric_names(records: list[dict]) -> list[str]:
    """The numeric names the records hold, in order of first appearance."""
    return list(dict.fromkeys(name for r in records for name in numbers_of(r)))


def curves(records: list[dict], metric: str, smooth: int
           ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train iterations, train error), (test iterations, test error))."""
    values = [(r.get("phase", "train"), r["iteration"], value_of(r, metric)) for r in records]
    train = [(i, v) for phase, i, v in values if phase == "train" and v is not None]
    test = [(i, v) for phase, i, v in values if phase == "eval" and v is not None]
    tx, ty = (np.array(v, dtype=float) for v in zip(*train)) if train else (np.zeros(0),) * 2
    if smooth > 1 and len(ty) >= smooth:
        ty = np.convolve(ty, np.ones(smooth) / smooth, mode="valid")
        tx = tx[smooth - 1:]
    sx, sy = (np.array(v, dtype=float) for v in zip(*test)) if test else (np.zeros(0),) * 2
    return (tx, ty), (sx, sy)


def plot(panels: list[list[str]], out: Path, metric: str = "top1_err", smooth: int = 1,
         title: str | None = None, ylim: float | None = None) -> Path:
    """Draws one subplot per panel of run specs; writes a PNG to ``out``."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False,
                             sharey=True)
    for ax, runs in zip(axes[0], panels):
        for i, spec in enumerate(runs):
            label, path = parse_run(spec)
            records = read_metrics(path)
            (tx, ty), (sx, sy) = curves(records, metric, smooth)
            if not len(tx) and not len(sx):
                raise ValueError(f"{path}: no '{metric}' values in its metrics; it has: "
                                 f"{', '.join(metric_names(records)) or 'none'}")
            colour = f"C{i}"
            ax.plot(tx, ty, "--", color=colour, linewidth=0.8, alpha=0.9)
            ax.plot(sx, sy, "-", color=colour, linewidth=2.2, label=label,
                    marker="o" if len(sx) < 8 else None, markersize=3)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(title="dashed: train, bold: test", fontsize=8, title_fontsize=8)
        if ylim is not None:
            ax.set_ylim(0, ylim)
    axes[0][0].set_ylabel("error (%)" if metric.endswith("_err") else metric)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="[LABEL=]RUN_DIR_OR_METRICS_JSONL")
    parser.add_argument("--panel", nargs="+", action="append", default=[], metavar="RUN",
                        help="runs of one subplot (repeat for several subplots)")
    parser.add_argument("--out", required=True, type=Path, help="PNG file to write")
    parser.add_argument("--metric", default="top1_err",
                        help="metric to plot, as metrics.jsonl or train.best_metric names it "
                             "(default top1_err; e.g. loss, bbox/AP)")
    parser.add_argument("--smooth", type=int, default=1,
                        help="moving average over this many training points")
    parser.add_argument("--title", default=None)
    parser.add_argument("--ylim", type=float, default=None, help="upper limit of the y axis")
    args = parser.parse_args(argv)
    panels = ([args.runs] if args.runs else []) + args.panel
    if not panels:
        parser.error("give at least one run (positional or --panel)")
    return plot(panels, args.out, args.metric, args.smooth, args.title, args.ylim)


if __name__ == "__main__":
    run_main(lambda: print(main()), extra_errors=(ValueError,))
