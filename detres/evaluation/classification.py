"""Top-1 / top-5 error, in percent, as the paper reports (Tables 3-6).

An image counts as a top-k error when its label is not among the k highest scores. With
10-crop or multi-scale testing (Sec 3.4) the softmax scores of the views are averaged first.
Under torchrun each rank evaluates its shard and the counts are summed over ranks.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from detres.engine.distributed import all_reduce_tensor
from detres.evaluation.inference import run_inference
from detres.models.classifier import mean_softmax


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


class ClassificationEvaluator:
    """Accumulates top-1/top-5 error counts over batches (and ranks)."""

    def __init__(self) -> None:
        self.wrong1 = self.wrong5 = self.total = 0

    def process(self, scores: Tensor, labels: Tensor) -> None:
        counts = count_topk_errors(scores, labels, (1, 5))
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


def evaluate_classifier(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]],
                        device: torch.device | str = "cpu") -> dict[str, float]:
    """Runs ``model`` (returning ``.logits``) over ``loader``'s (images, labels) batches;
    top-1/top-5 error over all ranks (see ``ClassificationEvaluator.evaluate``).

    images (N, 3, H, W); (N, C, 3, H, W) for multi-crop testing (C = 10); or per image a list
    of views of different sizes (multi-scale testing). With several views the softmax scores
    are averaged over them (``models.classifier.mean_softmax``).
    """
    evaluator = ClassificationEvaluator()

    def step(batch: tuple[Tensor | list[list[Tensor]], Tensor]) -> list:
        images, labels = batch[0], batch[1].to(device)
        if isinstance(images, Tensor) and images.dim() == 4:
            scores = model(images.to(device, non_blocking=True)).logits.float()
        else:                                   # (N, C, 3, H, W) crops or lists of views
            scores = mean_softmax(model, [list(v) for v in images], device)
        evaluator.process(scores, labels)
        return []                                              # counted, nothing to keep

    run_inference(model, loader, step, desc="eval")
    return evaluator.evaluate()
