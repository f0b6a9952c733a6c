"""COCO box evaluation: detections -> COCO results (original pixels, category ids) -> mAP.

Two engines compute the same twelve COCO statistics (Lin et al. 2014, cocodataset.org
"detection-eval"): ``"faster"`` is faster-coco-eval (``COCOeval_faster``, a maintained
descendant of detectron2's C++ ``COCOeval_opt``; 7-14x faster, benchmarks/eval_speed.py),
``"pycocotools"`` is the reference. tests/test_coco_eval.py proves that they agree on all
twelve, crowd regions included.

Numbers are percent (0-100) as detectron2 reports them; a statistic that has no ground truth to
measure (e.g. APs when there is no small object, or a class without boxes) is ``nan``, as in
detectron2 (pycocotools' -1).

Guards around pycocotools' known traps, applied whichever engine runs:
- an empty results list (pycocotools crashes): a warning, and every statistic that has ground
  truth is 0;
- ground-truth annotation id 0 (pycocotools stores matched ids in a zero-initialised array, so a
  match with id 0 reads as "unmatched"): our own copy of the ground truth is renumbered 1..M;
- results naming an unknown image or category id (pycocotools asserts or silently drops them),
  malformed entries, non-finite numbers and negative box sizes: ``ValueError`` naming the entry,
  the id and the results file;
- ``loadRes`` adding keys to the caller's dicts: the engines only ever see our own copies;
- images duplicated by a padded distributed sampler: ``merge_results`` keeps the first block.
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from detres.structures import Detections, Targets

ENGINES = ("faster", "pycocotools")
# The twelve statistics of COCOeval.summarize(), in its order (maxDets 100 unless named).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

GroundTruth = str | os.PathLike | Mapping[str, Any] | Any  # path, COCO-format dict or COCO object
Results = Sequence[Mapping[str, Any]] | str | os.PathLike
_NO_IMAGE = object()


def detections_to_coco_results(
    detections_per_image: Sequence[Detections],
    image_info: Sequence[Targets] | Sequence[tuple[int, float]],
    label_to_category_id: Sequence[int] | Mapping[int, int],
) -> list[dict]:
    """Per-image detections -> COCO results, in original pixels (docs/architecture.md, Carriers).

    Args:
        detections_per_image: N ``Detections``, boxes (D, 4) xyxy in pixels of the resized image.
        image_info: N ``Targets`` or ``(image_id, scale)`` pairs, aligned with the detections;
            ``scale`` is resized / original, so boxes are divided by it.
        label_to_category_id: contiguous label k in [0, K) -> dataset category id.

    Returns:
        One dict per detection: ``image_id``, ``category_id``, ``bbox`` = [x, y, w, h] in original
        pixels, ``score``; images keep their order, detections their order within an image.
    """
    if len(detections_per_image) != len(image_info):
        raise ValueError(f"{len(detections_per_image)} Detections but {len(image_info)} "
                         "image infos")
    known_labels = (label_to_category_id.keys() if isinstance(label_to_category_id, Mapping)
                    else range(len(label_to_category_id)))  # a list must not wrap -1 around
    results: list[dict] = []
    for dets, info in zip(detections_per_image, image_info):
        image_id, scale = (info.image_id, info.scale) if isinstance(info, Targets) else info
        boxes = dets.boxes.detach().cpu().double().numpy() / float(scale)  # (D, 4) original pixels
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        labels = dets.labels.detach().cpu().tolist()
        bad = [k for k in labels if k not in known_labels]
        if bad:
            raise ValueError(f"image {image_id}: label {bad[0]} has no category id "
                             f"(label_to_category_id has {len(label_to_category_id)} entries)")
        category_ids = [int(label_to_category_id[k]) for k in labels]
        scores = dets.scores.detach().cpu().tolist()
        results.extend({"image_id": int(image_id), "category_id": c, "bbox": b, "score": s}
                       for c, b, s in zip(category_ids, xywh.tolist(), scores))
    return results


def merge_results(results_per_rank: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict]:
    """Concatenates results gathered from ranks, dropping images repeated by sampler padding.

    A padded distributed sampler repeats a few images so that every rank gets as many; those
    images come back twice. Each image's detections form one contiguous block in a rank's list
    (``detections_to_coco_results`` writes them so); the first block of every image id is kept
    and any later block of the same id, on the same or a later rank, is dropped.
    """
    merged: list[dict] = []
    seen: set[int] = set()
    for rank_results in results_per_rank:
        current, keep = _NO_IMAGE, True  # blocks never span two ranks
        for r in rank_results:
            if r["image_id"] != current:
                current = r["image_id"]
                keep = current not in seen
                seen.add(current)
            if keep:
                merged.append(r)
    return merged


def load_ground_truth(gt: GroundTruth) -> dict:
    """Our own copy of a COCO-format ground truth, with annotation ids renumbered 1..M.

    ``gt`` is a path, a dict, or a COCO object (pycocotools or faster-coco-eval; its ``dataset``
    is read). The caller's objects are never modified. A missing ``area`` (used for the
    small/medium/large split) is set to the box area and a missing ``iscrowd`` to 0; COCO's own
    files always carry both.
    """
    source = os.fspath(gt) if isinstance(gt, (str, os.PathLike)) else "<ground truth>"
    if isinstance(gt, (str, os.PathLike)):
        dataset = _read_json(gt)
    else:
        dataset = gt if isinstance(gt, Mapping) else getattr(gt, "dataset", None)
        if not isinstance(dataset, Mapping):
            raise TypeError("ground truth must be a path, a dict or a COCO object, "
                            f"got {type(gt).__name__}")
    if not isinstance(dataset, Mapping):
        raise ValueError(f"{source}: a COCO ground truth is a JSON object, got "
                         f"{type(dataset).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise ValueError(f"{source}: ground truth lacks '{key}': not a COCO-format "
                             "detection file")
    # the results are checked against these ids as int64 arrays
    for key, field in (("images", "id"), ("categories", "id"), ("annotations", "image_id"),
                       ("annotations", "category_id")):
        for i, entry in enumerate(dataset[key]):
            v = entry.get(field) if isinstance(entry, Mapping) else None
            if not _is_int64(v):
                raise ValueError(f"{source}: {key}[{i}] has {field} {v!r:.60}; ids are integers "
                                 "(int64)")
    annotations = []
    for new_id, ann in enumerate(dataset["annotations"], start=1):  # id 0 would never match
        own = {**ann, "id": new_id, "bbox": [float(v) for v in ann["bbox"]]}
        own.setdefault("area", own["bbox"][2] * own["bbox"][3])
        own.setdefault("iscrowd", 0)  # pycocotools' computeIoU reads it unconditionally
        annotations.append(own)
    return {"info": dict(dataset.get("info", {})),
            "images": [dict(img) for img in dataset["images"]],
            "annotations": annotations,
            "categories": [dict(cat) for cat in dataset["categories"]]}


def load_results(results: Results, gt_dataset: Mapping[str, Any]) -> list[dict]:
    """Validated fresh copies of COCO results (``image_id``, ``category_id``, ``bbox``, ``score``).

    Raises:
        ValueError: naming the entry, its image id and the results source, for a malformed entry,
            an image or category id absent from ``gt_dataset``, a non-finite number or a box with
            negative width or height.
    """
    image_ids, category_ids, boxes, scores = _results_to_arrays(results, gt_dataset)
    return [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in
            zip(image_ids.tolist(), category_ids.tolist(), boxes.tolist(), scores.tolist())]


def _results_to_arrays(results: Results, gt_dataset: Mapping[str, Any]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validated (D,) image ids, (D,) category ids, (D, 4) xywh boxes, (D,) scores."""
    source = os.fspath(results) if isinstance(results, (str, os.PathLike)) else "<results list>"
    if isinstance(results, (str, os.PathLike)):
        results = _read_json(results)
    if not isinstance(results, Sequence) or isinstance(results, (str, bytes)):
        raise ValueError(f"{source}: COCO results must be a list of dicts")
    try:
        image_ids = np.array([r["image_id"] for r in results])
        category_ids = np.array([r["category_id"] for r in results])
        boxes = np.array([r["bbox"] for r in results], dtype=np.float64).reshape(len(results), 4)
        scores = np.array([r["score"] for r in results], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        _raise_malformed(results, source)
    image_ids = _int64_ids(results, "image_id", image_ids, source)
    category_ids = _int64_ids(results, "category_id", category_ids, source)
    known_images = {img["id"] for img in gt_dataset["images"]}
    known_categories = {c["id"] for c in gt_dataset["categories"]}
    _check_known(image_ids, known_images, "image", image_ids, source)
    _check_known(category_ids, known_categories, "category", image_ids, source)
    bad = ~(np.isfinite(boxes).all(axis=1) & np.isfinite(scores))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{source}: result {i} (image_id {image_ids[i]}) has a non-finite number: "
                         f"bbox {results[i]['bbox']}, score {results[i]['score']}")
    bad = (boxes[:, 2] < 0) | (boxes[:, 3] < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{source}: result {i} (image_id {image_ids[i]}) has a negative width or "
                         f"height: bbox {results[i]['bbox']} is [x, y, w, h]")
    return image_ids.astype(np.int64), category_ids.astype(np.int64), boxes, scores


def _int64_ids(results: Sequence[Any], name: str, ids: np.ndarray, source: str) -> np.ndarray:
    """``ids`` as int64; an id that is not an integer int64 holds (a float, true, 2**64 - 1 or
    2**70, which numpy keeps as uint64 or object) is a ``ValueError`` naming the result."""
    if len(ids) == 0 or ids.dtype.kind == "i":
        return ids.astype(np.int64)
    for i, r in enumerate(results):
        v = r[name]
        if not _is_int64(v):
            raise ValueError(f"{source}: result {i} has {name} {v!r:.60}; ids are integers "
                             "(int64)")
    return np.array([int(r[name]) for r in results], np.int64)


def _read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; what is not JSON (or nests too deep to parse) is a ``ValueError``
    naming the file."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise ValueError(f"{os.fspath(path)}: not valid JSON: {e}"[:300]) from None


def _is_int64(v: Any) -> bool:
    return (isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
            and -2**63 <= int(v) < 2**63)


def _raise_malformed(results: Sequence[Any], source: str) -> None:
    for i, r in enumerate(results):
        try:
            ok = (all(k in r for k in ("image_id", "category_id", "score")) and len(r["bbox"]) == 4
                  and all(isinstance(v, (int, float)) for v in (*r["bbox"], r["score"])))
        except (TypeError, KeyError):
            ok = False
        if not ok:
            raise ValueError(f"{source}: result {i} is not a COCO box detection (needs image_id, "
                             f"category_id, bbox [x, y, w, h] and score): {r!r:.200}")
    raise ValueError(f"{source}: results are not COCO box detections")


def _check_known(ids: np.ndarray, known: set[int], what: str, image_ids: np.ndarray,
                 source: str) -> None:
    unknown = ~np.isin(ids, np.array(sorted(known), dtype=np.int64))
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise ValueError(f"{source}: result {i} (image_id {image_ids[i]}) names {what} id "
                         f"{ids[i]}, which the ground truth does not have "
                         f"({int(unknown.sum())} such results)")


def evaluate_coco(
    gt: GroundTruth,
    results: Results,
    class_names: Sequence[str] | None = None,
    engine: str = "faster",
    image_ids: Sequence[int] | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """COCO box AP/AR of ``results`` against ``gt``.

    Args:
        gt: ground truth: a COCO-format JSON path, dict, or COCO object (never modified).
        results: COCO results: a list of dicts or a JSON path (never modified).
        class_names: K names for the per-class table, in the order of the sorted ground-truth
            category ids (the loader's label order); default: the categories' own names.
        engine: ``"faster"`` (faster-coco-eval) or ``"pycocotools"`` (the reference).
        image_ids: evaluate only these images (default: all images of ``gt``).
        verbose: let the engine print its own progress and summary.

    Returns:
        ``AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl`` in percent and
        ``per_class``: {name: AP}; ``nan`` where there is no ground truth to measure.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    gt_dataset = load_ground_truth(gt)
    dt = _results_to_arrays(results, gt_dataset)
    category_ids = sorted(c["id"] for c in gt_dataset["categories"])
    if class_names is None:
        names_by_id = {c["id"]: c.get("name", str(c["id"])) for c in gt_dataset["categories"]}
        class_names = [names_by_id[c] for c in category_ids]
    elif len(class_names) != len(category_ids):
        raise ValueError(f"{len(class_names)} class names for {len(category_ids)} categories")
    if image_ids is not None:
        unknown = set(image_ids) - {img["id"] for img in gt_dataset["images"]}
        if unknown:
            raise ValueError(f"image_ids not in the ground truth: {sorted(unknown)[:10]}")
    if len(dt[0]) == 0:
        warnings.warn("COCO evaluation got no detections: AP and AR are 0", stacklevel=2)
        engine = "faster"  # pycocotools' loadRes crashes on an empty list
    run = _run_faster if engine == "faster" else _run_pycocotools
    with _gc_paused():
        stats, precision = run(gt_dataset, dt, image_ids, verbose)
    metrics: dict[str, Any] = {name: _percent(s) for name, s in zip(STAT_NAMES, stats)}
    # precision: (T IoUs, R recalls, K classes, A areas, M maxDets); area "all", maxDets 100,
    # averaged over IoUs and recalls as detectron2 does.
    metrics["per_class"] = {}
    for k, name in enumerate(class_names):
        p = precision[:, :, k, 0, -1]
        metrics["per_class"][name] = float(p[p > -1].mean() * 100) if (p > -1).any() else math.nan
    return metrics


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The engines build several Python objects per detection and none of them cyclic; pausing
    the cyclic collector spares its repeated full scans (~15% of the time at COCO scale)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _percent(stat: float) -> float:
    return float(stat) * 100 if stat >= 0 else math.nan


def _run_faster(gt_dataset: dict, dt: tuple[np.ndarray, ...], image_ids: Sequence[int] | None,
                verbose: bool) -> tuple[np.ndarray, np.ndarray]:
    from faster_coco_eval import COCO, COCOeval_faster

    quiet = print if verbose else (lambda *args, **kwargs: None)
    coco_gt = COCO(gt_dataset, print_function=quiet)  # gt_dataset is our own copy
    # What COCO.loadRes builds for boxes (area w*h, ids 1..D, not crowd), in one pass.
    image_id, category_id, boxes, score = dt
    columns = zip(image_id.tolist(), category_id.tolist(), boxes.tolist(), score.tolist(),
                  (boxes[:, 2] * boxes[:, 3]).tolist())
    anns = [{"image_id": i, "category_id": c, "bbox": b, "score": s, "area": a, "id": n,
             "iscrowd": 0} for n, (i, c, b, s, a) in enumerate(columns, start=1)]
    coco_dt = COCO(print_function=quiet)
    coco_dt.dataset = {"images": gt_dataset["images"], "categories": gt_dataset["categories"],
                       "annotations": anns}
    coco_dt.createIndex()
    return _summarize(COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=quiet),
                      image_ids)


def _run_pycocotools(gt_dataset: dict, dt: tuple[np.ndarray, ...], image_ids: Sequence[int] | None,
                     verbose: bool) -> tuple[np.ndarray, np.ndarray]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    image_id, category_id, boxes, score = dt
    results = [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in
               zip(image_id.tolist(), category_id.tolist(), boxes.tolist(), score.tolist())]
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)  # the reference path: pycocotools' own loadRes
        return _summarize(COCOeval(coco_gt, coco_dt, "bbox"), image_ids)


def _summarize(evaluator: Any, image_ids: Sequence[int] | None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Runs either engine's COCOeval (same interface) on ``image_ids`` (None: all images);
    returns the 12 statistics and the precision array."""
    if image_ids is not None:
        evaluator.params.imgIds = sorted(image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return np.asarray(evaluator.stats[:12]), evaluator.eval["precision"]


def format_metrics_table(metrics: Mapping[str, Any], columns: int = 3) -> str:
    """A readable console table: the summary numbers in one block, then per-class AP.

    Works for ``evaluate_coco`` and ``evaluate_voc`` output alike (any float entries, plus an
    optional ``per_class`` mapping).
    """
    summary = [(k, v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    lines = []
    for start in range(0, len(summary), 6):
        row = summary[start:start + 6]
        lines.append(" | ".join(f"{k:>6}" for k, _ in row))
        lines.append(" | ".join(f"{v:6.2f}" for _, v in row))
    per_class = metrics.get("per_class") or {}
    if per_class:
        width = max(len(name) for name in per_class)
        cells = [f"{name:<{width}} {ap:6.2f}" for name, ap in per_class.items()]
        lines.append("per-class AP:")
        for start in range(0, len(cells), columns):
            lines.append("  " + " | ".join(cells[start:start + columns]))
    return "\n".join(lines)
