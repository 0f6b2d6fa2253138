"""Losses of IDR (Yariv et al. 2020): eikonal, mask (with an annealed sharpness α) and RGB L1.

IDR normalises the mask and RGB losses by the total number of rays in the batch (not by the number of
rays each applies to), so that the two sets of rays weigh by how many of them there are; the functions
take that count as ``n_rays``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def eikonal_loss(gradients: torch.Tensor) -> torch.Tensor:
    """``mean((|∇f| - 1)^2)`` over gradients ``(M, 3)``; 0 for M = 0."""
    if gradients.shape[0] == 0:
        return gradients.sum() * 0.0
    return ((gradients.norm(dim=-1) - 1.0) ** 2).mean()


def mask_loss(sdf: torch.Tensor, target: torch.Tensor, alpha: float,
              n_rays: int | None = None) -> torch.Tensor:
    """``(1/α) Σ BCE(sigmoid(-α f), target) / n_rays``.

    sdf: (M,) SDF at the ray's surface point (for rays the network hits but the mask does not) or at its
    minimum-SDF point (for rays it misses); target: (M,) bool or {0, 1}, the object mask; alpha > 0, the
    sharpness, doubled on a schedule as training goes on (:func:`alpha_schedule`).
    """
    if alpha <= 0:
        raise ValueError(f"mask_loss: alpha must be > 0, got {alpha}")
    n = sdf.shape[0] if n_rays is None else n_rays
    if sdf.shape[0] == 0 or n == 0:
        return sdf.sum() * 0.0
    # BCE with logits is the numerically stable form of BCE(sigmoid(logit), target).
    bce = F.binary_cross_entropy_with_logits(-alpha * sdf, target.to(sdf.dtype), reduction="sum")
    return bce / (alpha * n)


def rgb_loss(pred: torch.Tensor, target: torch.Tensor, n_rays: int | None = None) -> torch.Tensor:
    """``Σ |pred - target| / n_rays`` over (M, 3) colours of rays that hit the surface inside the mask."""
    n = pred.shape[0] if n_rays is None else n_rays
    if pred.shape[0] == 0 or n == 0:
        return pred.sum() * 0.0
    return (pred - target).abs().sum() / n


def alpha_schedule(iteration: int, total: int, alpha_init: float = 50.0, factor: float = 2.0,
                   n_milestones: int = 5) -> float:
    """IDR's schedule: α starts at ``alpha_init`` and is multiplied by ``factor`` at ``n_milestones`` evenly
    spaced points of training (IDR: every 250 of 2000 epochs, i.e. at 1/8, 2/8, ..., 5/8)."""
    if total <= 0:
        return alpha_init
    step = total / (n_milestones + 3)
    k = min(n_milestones, int(iteration // step)) if step > 0 else 0
    return alpha_init * factor ** k


def smoothness_loss(normals: torch.Tensor, neighbour_normals: torch.Tensor) -> torch.Tensor:
    """UNISURF's surface smoothness: ``mean ‖n(x_s) - n(x_s + ε)‖`` over surface points ``x_s`` and their
    jittered neighbours (UNISURF: ε ~ U(±0.005) per coordinate, weight 0.005); normals ``(M, 3)`` each, unit.
    0 for M = 0."""
    if normals.shape != neighbour_normals.shape:
        raise ValueError(f"smoothness_loss: normals {tuple(normals.shape)} and neighbour_normals "
                         f"{tuple(neighbour_normals.shape)} must have the same shape (M, 3)")
    if normals.shape[0] == 0:
        return normals.sum() * 0.0
    return (normals - neighbour_normals).norm(dim=-1).mean()


def mask_bce_loss(opacity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean BCE(opacity, mask)`` (NeuS's mask loss, for volume renderers trained with masks); opacity ``(M,)``
    in [0, 1] (clamped away from 0 and 1 so the log stays finite), target ``(M,)`` bool."""
    if opacity.shape[0] == 0:
        return opacity.sum() * 0.0
    p = opacity.clamp(1e-4, 1 - 1e-4)
    return F.binary_cross_entropy(p, target.to(p.dtype))
