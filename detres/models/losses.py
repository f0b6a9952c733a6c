"""Box regression loss of the RPN, the RoI head and the localizer's networks.

Each module keeps its own smooth-L1 transition as the default of its ``smooth_l1_beta``
argument (RPN 1/9, py-faster-rcnn sigma 3; RoI head 1, Fast R-CNN eq. 3); "l1" ignores it.
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

BoxLoss = Literal["smooth_l1", "l1"]


def box_regression_loss(pred_deltas: Tensor, gt_deltas: Tensor, kind: BoxLoss,
                        beta: float) -> Tensor:
    """Elementwise smooth-L1 (Fast R-CNN eq. 3, with transition ``beta``) or L1; float32."""
    pred_deltas = pred_deltas.float()
    if kind == "l1" or beta < 1e-5:
        return (pred_deltas - gt_deltas).abs()
    return F.smooth_l1_loss(pred_deltas, gt_deltas, beta=beta, reduction="none")
