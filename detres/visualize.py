"""Pictures for people to look at: detections and ground truth drawn onto images (PIL), and
the plots of the error analysis (matplotlib): precision-recall curves, a confusion matrix and
the COCO error breakdown (``detres.evaluation.analysis``)."""
from __future__ import annotations

import colorsys
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def class_colour(label: int) -> tuple[int, int, int]:
    """A bright colour per class; neighbouring labels get distant hues (golden-ratio steps)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    class_names: list[str] | None = None, min_score: float = 0.0) -> Image.Image:
    """Returns a copy of ``image`` (H, W, 3 uint8 RGB) with boxes, names and scores drawn.

    Args:
        boxes: (D, 4) xyxy in the image's pixels.
        scores: (D,); detections below ``min_score`` are not drawn.
        labels: (D,) contiguous class indices, named through ``class_names``.
    """
    canvas = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    pen = _Pen(canvas)
    order = np.argsort(scores)  # draw the most confident last, on top
    for i in order:
        if scores[i] >= min_score:
            pen.box(boxes[i], int(labels[i]), class_names, f" {scores[i]:.2f}")
    return canvas


def draw_ground_truth(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                      ignored: np.ndarray | None = None, class_names: list[str] | None = None,
                      ignored_name: str = "ignored") -> Image.Image:
    """Returns a copy of ``image`` (H, W, 3 uint8 RGB) with ground-truth boxes and class names.

    Args:
        boxes: (M, 4) xyxy in the image's pixels; labels: (M,) contiguous class indices.
        ignored: (M,) bool, boxes that are not training targets (COCO crowd regions, VOC
            difficult objects): drawn dashed, their name followed by ``ignored_name``.
    """
    canvas = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    ignored = np.zeros(len(boxes), bool) if ignored is None else np.asarray(ignored, bool)
    pen = _Pen(canvas)
    for i in np.argsort(ignored, kind="stable")[::-1]:  # ignored first, targets on top
        pen.box(boxes[i], int(labels[i]), class_names,
                f" ({ignored_name})" if ignored[i] else "", dashed=bool(ignored[i]))
    return canvas


def ground_truth_view(dataset: Any, i: int, transformed: bool = True, seed: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Image ``i`` of a detection dataset with all its boxes, crowd / difficult ones included.

    With ``transformed`` the image and boxes go through ``dataset.transform`` (its
    augmentation driven by ``seed``, as a training sampler's seed drives it), else they are
    the original pixels. Returns the (H, W, 3) uint8 image, (M, 4) xyxy boxes, (M,) labels and
    (M,) ignored flags.
    """
    image = dataset.read_image(i)
    ann = dataset.get_annotations(i)
    boxes, labels, ignored = ann["boxes"], ann["labels"], ann["ignore"]
    if transformed and dataset.transform is not None:
        # the box indices ride through the transform as labels, so the flags of the boxes
        # that survive it (a crop may drop some) stay aligned with them
        index = np.arange(len(boxes))
        image, boxes, kept, _ = (dataset.transform(image, boxes, index) if seed is None else
                                 dataset.transform(image, boxes, index, seed=seed))
        labels, ignored = labels[kept], ignored[kept]
    return image, np.asarray(boxes, np.float32).reshape(-1, 4), labels, ignored


class _Pen:
    """Draws boxes onto one canvas: a box in its class colour with a filled tag
    "name<suffix>" above it (inside the box when it touches the top)."""

    def __init__(self, canvas: Image.Image) -> None:
        self.draw, self.font = ImageDraw.Draw(canvas), ImageFont.load_default()
        self.line = max(1, round(min(canvas.size) / 200))

    def box(self, box: Sequence[float], label: int, class_names: list[str] | None,
            suffix: str, dashed: bool = False) -> None:
        draw, line = self.draw, self.line
        x1, y1, x2, y2 = (float(v) for v in box)
        colour = class_colour(label)
        if dashed:
            _dashed_rectangle(draw, (x1, y1, x2, y2), colour, line, dash=max(3, 3 * line))
        else:
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        known = class_names and 0 <= label < len(class_names)
        text = f"{class_names[label] if known else label}{suffix}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=self.font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 2 if y1 - th - 2 >= 0 else y1
        draw.rectangle((x1, ty, x1 + tw + 2, ty + th + 2), fill=colour)
        draw.text((x1 + 1, ty), text, fill=(0, 0, 0), font=self.font)


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float],
                      colour: tuple[int, int, int], width: int, dash: int) -> None:
    x1, y1, x2, y2 = box
    for (ax, ay), (bx, by) in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)),
                               ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        length = math.hypot(bx - ax, by - ay)
        for start in np.arange(0.0, length, 2 * dash):
            t0, t1 = start / max(length, 1e-9), min(start + dash, length) / max(length, 1e-9)
            draw.line((ax + (bx - ax) * t0, ay + (by - ay) * t0,
                       ax + (bx - ax) * t1, ay + (by - ay) * t1), fill=colour, width=width)


def save_detections(path: str | Path, image: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                    labels: np.ndarray, class_names: list[str] | None = None,
                    min_score: float = 0.0) -> Path:
    """Draws and writes a PNG (a JPEG where ``path`` ends in .jpg or .jpeg); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    draw_detections(image, boxes, scores, labels, class_names, min_score).save(
        path, format="JPEG" if jpeg else "PNG", **({"quality": 95} if jpeg else {}))
    return path


# ----------------------------------------------------------------------------- analysis plots
def _pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _grid(plt: Any, n: int, cell: tuple[float, float] = (3.2, 2.8), columns: int = 4
          ) -> tuple[Any, list[Any]]:
    cols = max(1, min(n, columns))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows),
                             squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def plot_pr_curves(curves: Mapping[str, Any], path: str | Path) -> Path:
    """One panel per class: precision against recall at IoU 0.50 and 0.75 (COCO's
    interpolated precision), AP in the legend. ``curves`` is
    ``Analysis.per_class_curves()``; a class without ground truth says so."""
    plt = _pyplot()
    recall, classes = np.asarray(curves["recall"]), curves["classes"]
    fig, axes = _grid(plt, len(classes))
    for ax, (name, c) in zip(axes, classes.items()):
        if c["AP"] is None:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center")
        else:
            ax.plot(recall, c["precision50"], color="C0", label=f"IoU .50: AP {c['AP50']:.1f}")
            ax.plot(recall, c["precision75"], color="C1", label=f"IoU .75: AP {c['AP75']:.1f}")
            ax.legend(loc="lower left", fontsize=8)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
               title=name if c["AP"] is None else f"{name} (AP {c['AP']:.1f})")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_confusion_matrix(confusion: Mapping[str, Any], path: str | Path) -> Path:
    """Counts of ``Analysis.confusion_matrix()``, coloured by the share of their row (how the
    objects of a true class were predicted); rows: ground truth, columns: prediction."""
    plt = _pyplot()
    names, counts = confusion["classes"], np.asarray(confusion["matrix"], dtype=np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    # Cells of 0.45 in (36 px at the 80 dpi of _save) until the matrix would pass 20 in; then
    # the cells shrink to keep it at 20 in, so the PNG stays under 2000 px a side (81 rows:
    # 20 px cells). Text is 8 pt or 0.4 of a cell, so three digits fit in one (7 pt at 81
    # rows); counts are left out below 6 pt (over 95 rows), where they would not be legible.
    cell = min(0.45, 20 / len(names))
    font = min(8.0, 0.4 * 72 * cell)
    size = 2.5 + cell * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    if font >= 6:
        for (i, j), n in np.ndenumerate(counts):
            if n:
                ax.text(j, i, f"{int(n)}", ha="center", va="center", fontsize=font,
                        color="white" if shares[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=font)
    ax.set_yticks(range(len(names)), names, fontsize=font)
    ax.set(xlabel="predicted", ylabel="ground truth",
           title=f"IoU >= {confusion['iou_threshold']}, score >= "
                 f"{confusion['score_threshold']}")
    return _save(fig, path)


BREAKDOWN_COLOURS = {"C75": "#d9d9d9", "C50": "#4e81bd", "Loc": "#c0504d", "Sim": "#9bbb59",
                     "Oth": "#8064a2", "BG": "#f79646", "FN": "#4bacc6"}
BREAKDOWN_LABELS = {"C75": "C75: IoU .75", "C50": "C50: IoU .50", "Loc": "Loc: IoU .10",
                    "Sim": "Sim: + similar class", "Oth": "Oth: + other class",
                    "BG": "BG: + background", "FN": "FN: + missed"}


def _breakdown_panel(ax: Any, recall: np.ndarray, entry: Mapping[str, Any], title: str) -> None:
    """Each curve's area filled down to the previous one (Hoiem et al. 2012); the legend
    gives each curve's AP (percent), as the COCO API's analyze() draws it."""
    below = np.zeros_like(recall)
    for key in ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN"):
        curve = np.maximum(np.asarray(entry["curves"][key]), below)   # bands never overlap
        ax.fill_between(recall, below, curve, color=BREAKDOWN_COLOURS[key], linewidth=0,
                        label=f"[{entry['AP'][key]:.1f}] {BREAKDOWN_LABELS[key]}")
        below = curve
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="recall", ylabel="precision", title=title)
    # beside the plot, top to bottom as the bands lie from top (FN) to bottom (C75)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], loc="center left", bbox_to_anchor=(1.02, 0.5),
              fontsize=8, frameon=False)


def plot_error_breakdown(breakdown: Mapping[str, Any], path: str | Path,
                         per_class: bool = False) -> Path:
    """The COCO error breakdown of ``Analysis.error_breakdown()``: the mean over classes, or
    with ``per_class`` one panel per class."""
    plt = _pyplot()
    recall = np.asarray(breakdown["recall"])
    if not per_class:
        fig, ax = plt.subplots(figsize=(6.6, 4.0))
        if breakdown["overall"] is None:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center")
        else:
            _breakdown_panel(ax, recall, breakdown["overall"], "all classes")
        return _save(fig, path)
    classes = breakdown["classes"]
    fig, axes = _grid(plt, len(classes), cell=(5.2, 3.0), columns=3)
    for ax, (name, entry) in zip(axes, classes.items()):
        if entry is None:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center")
            ax.set_title(name)
        else:
            _breakdown_panel(ax, recall, entry, name)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
