"""The localizer's evaluation over a dataset (Table 13): gathers the pipeline's records of
every rank, scores them with ``evaluation/localization.py`` and writes ``eval/metrics.json``
and ``eval/predictions.json``.

The records come from the model the task hands to
:func:`~detres.evaluation.inference.inference_on_dataset`
(``tasks/localization/inference.py::BatchLocalizer``: the test views and ``Localizer.predict``);
this module reads them, never the networks.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from detres.engine.logging import write_json
from detres.evaluation.inference import DatasetEvaluator, score_on_main
from detres.evaluation.localization import LocalizationResult, format_table, localization_errors

logger = logging.getLogger("detres")
METHODS = ("RPN", "RPN+R-CNN")

Record = tuple[int, dict[str, Any]]     # (dataset index, the pipeline's record of that image)


class LocGroundTruth(Protocol):
    """What the evaluator reads of the test set (``data/localization.py``'s dataset)."""

    class_names: Sequence[str]

    def __len__(self) -> int: ...

    def get_annotations(self, index: int) -> Mapping[str, np.ndarray]: ...

    def path(self, index: int) -> str | os.PathLike: ...


class LocalizationEvaluator(DatasetEvaluator):
    """Top-1/top-5 LOC and CLS error and the error on the ground-truth class, per method.

    ``process(inputs, outputs)``: ``inputs`` the loader's samples (each with its dataset
    ``index``), ``outputs`` one record per sample: ``guesses`` (k,), ``guess_scores`` (k,) and
    per method ``boxes`` (k, 4), ``box_scores`` (k,), ``gt_boxes`` {class: (4,)} (numpy,
    original pixels). ``evaluate`` returns ``{method: {error: percent}}`` on every rank; the
    main rank logs the table (``scales``: the test scales it names) and writes ``eval/`` under
    ``output_dir``.
    """

    def __init__(self, dataset: LocGroundTruth, output_dir: str | Path | None = None,
                 scales: Sequence[int] = ()) -> None:
        self.dataset = dataset
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.scales = list(scales)
        self._records: list[Record] = []

    def reset(self) -> None:
        self._records = []

    def process(self, inputs: Sequence[Any], outputs: Sequence[dict[str, Any]]) -> None:
        self._records.extend(zip((int(s.index) for s in inputs), outputs))

    def evaluate(self) -> dict[str, dict[str, float]]:
        return score_on_main(self._records, self._score_and_write)

    def _score_and_write(self, records: list[Record]) -> dict[str, dict[str, float]]:
        metrics = score(records, self.dataset)
        logger.info(f"localization on {len(self.dataset)} images (scales {self.scales}):\n"
                    + format_table(metrics))
        if self.output_dir is not None:
            write_eval(self.output_dir, metrics, records, self.dataset)
        return metrics


def score(records: Sequence[Record], dataset: LocGroundTruth) -> dict[str, dict[str, float]]:
    """Errors (percent) per method, from records in any order (duplicates dropped)."""
    unique = dict(records)
    order = sorted(unique)
    annotations = [dataset.get_annotations(index) for index in order]
    metrics = {}
    for method in METHODS:
        if method not in unique[order[0]]:
            continue
        results = [LocalizationResult(unique[i]["guesses"], unique[i][method]["boxes"],
                                      unique[i][method]["gt_boxes"]) for i in order]
        metrics[method] = localization_errors(results, [a["labels"] for a in annotations],
                                              [a["boxes"] for a in annotations])
    return metrics


def write_eval(output_dir: Path, metrics: dict, records: Sequence[Record],
               dataset: LocGroundTruth) -> None:
    """``eval/metrics.json`` and ``eval/predictions.json`` (per image: file, guessed classes
    and each method's boxes, original pixels)."""
    names = list(dataset.class_names)
    preds = []
    for index, r in sorted(dict(records).items()):
        item: dict[str, Any] = {"file": str(dataset.path(index)),
                                "guesses": [names[c] for c in r["guesses"].tolist()]}
        for method in METHODS:
            if method in r:
                item[method] = np.round(r[method]["boxes"], 2).tolist()
        preds.append(item)
    write_json(output_dir / "eval" / "metrics.json", metrics, indent=1)
    write_json(output_dir / "eval" / "predictions.json", preds, indent=1)
