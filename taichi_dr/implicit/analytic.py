"""Analytic signed distance functions (torch, differentiable in the points and the shape parameters).

For tests, benchmarks and synthetic data: each takes points ``(M, 3)`` and returns ``(M,)``, negative
inside. Parameters may be tensors that require grad.
"""

from __future__ import annotations

import torch


def _as(x, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def sphere_sdf(points: torch.Tensor, radius=0.5, center=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """``|x - center| - radius``; an exact distance."""
    return (points - _as(center, points)).norm(dim=-1) - _as(radius, points)


def box_sdf(points: torch.Tensor, half_size=(0.4, 0.3, 0.2), center=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """Axis-aligned box with half extents ``half_size``; an exact distance."""
    q = (points - _as(center, points)).abs() - _as(half_size, points)
    outside = q.clamp(min=0.0)
    # norm of a zero vector has a NaN-free gradient through this form (sqrt guarded)
    out_len = torch.sqrt((outside * outside).sum(-1).clamp(min=1e-24))
    out_len = torch.where((outside > 0).any(-1), out_len, torch.zeros_like(out_len))
    inside = q.max(dim=-1).values.clamp(max=0.0)
    return out_len + inside


def torus_sdf(points: torch.Tensor, major=0.5, minor=0.2, center=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """Torus around the y axis (ring in the xz plane) with radii ``major`` and ``minor``; exact."""
    p = points - _as(center, points)
    ring = torch.sqrt((p[:, 0] ** 2 + p[:, 2] ** 2).clamp(min=1e-24)) - _as(major, points)
    return torch.sqrt((ring ** 2 + p[:, 1] ** 2).clamp(min=1e-24)) - _as(minor, points)
