"""Top-1 / top-5 error, in percent, as the paper reports (Tables 3-6).

An image counts as a top-k error when its label is not among the k highest scores. With
10-crop or multi-scale testing (Sec 3.4) the softmax scores of the views are averaged first,
by the model the task hands in (``tasks/classification/run.py::ClassifierScores``). Under
torchrun each rank evaluates its shard and the counts are summed over ranks.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from detres.engine.distributed import all_reduce_tensor
from detres.evaluation.inference import DatasetEvaluator


def count_topk_errors(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)
                      ) -> dict[int, int]:
    """scores (N, K), labels (N,) -> {k: number of images whose label is not in the top k}.

    k larger than K is clamped to K (then nothing is an error).
    """
    if scores.dim() != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"need scores (N, K) and labels (N,); got {tuple(scores.shape)} "
                         f"and {tuple(labels.shape)}")
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices      # (N, k_max)
    hit = top == labels[:, None]                                          # (N, k_max)
    return {k: int((~hit[:, :k].any(dim=1)).sum()) for k in ks}


class ClassificationEvaluator(DatasetEvaluator):
    """Accumulates top-1/top-5 error counts over batches (and ranks).

    ``process(inputs, outputs)``: ``inputs`` the loader's ``(images, labels)`` batch,
    ``outputs`` the (N, K) class scores the task's model gives for it (with several views
    per image, their mean softmax, Sec. 3.4).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.wrong1 = self.wrong5 = self.total = 0

    def process(self, inputs: Sequence[Any], outputs: Tensor) -> None:
        labels = inputs[1].to(outputs.device)
        counts = count_topk_errors(outputs, labels, (1, 5))
        self.wrong1 += counts[1]
        self.wrong5 += counts[5]
        self.total += len(labels)

    def evaluate(self) -> dict[str, float]:
        """{"top1_err", "top5_err"} in percent, plus "num_images"; summed over ranks."""
        wrong1, wrong5, total = all_reduce_tensor(
            torch.tensor([self.wrong1, self.wrong5, self.total], dtype=torch.float64),
            average=False).tolist()
        if total == 0:
            raise ValueError("no images were evaluated")
        return {"top1_err": 100.0 * wrong1 / total, "top5_err": 100.0 * wrong5 / total,
                "num_images": int(total)}
