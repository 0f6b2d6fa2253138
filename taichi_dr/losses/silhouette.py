"""Silhouette losses: SoftRas's soft IoU between rendered and target coverage."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["neg_iou_loss", "silhouette_iou"]


def silhouette_iou(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """Soft IoU per image: pred, target (B, H, W) in [0, 1] -> (B,).

    ``IoU = sum(p t) / (sum(p + t - p t) + eps)`` (SoftRas). Two empty masks give 0, not 1.
    """
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("silhouette_iou: pred and target must be torch tensors")
    if pred.ndim != 3 or pred.shape != target.shape:
        raise ValueError(f"silhouette_iou: pred and target must both be (B, H, W), got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    inter = (pred * target).sum(dim=(1, 2))
    union = (pred + target - pred * target).sum(dim=(1, 2))
    return inter / (union + eps)


def neg_iou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Scalar ``1 - mean soft IoU`` over the batch (SoftRas's silhouette loss); pred, target (B, H, W)."""
    return 1.0 - silhouette_iou(pred, target).mean()
