"""Rays: the directions of pixel rays, the pixel-centre grid, and where rays cross the bounding sphere.

Plain torch and differentiable, shared by the cameras (:meth:`taichi_dr.core.camera.Cameras.pixel_rays`), the
data layer (dataset checks, training rays) and the implicit renderers (sphere tracing starts where a ray
enters the bounding sphere). Conventions are those of :mod:`taichi_dr.core.camera`: OpenCV camera axes,
pixel ``(u, v)`` with the origin at the top-left corner of the top-left pixel and centres at ``+0.5``.
This module imports no other part of the engine, so every part may use it.
"""

from __future__ import annotations

import torch

__all__ = ["intersect_sphere", "pixel_centres", "pixel_directions", "ray_segments"]


def pixel_centres(image_size: tuple[int, int], dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Every pixel centre ``(u, v) = (j + 0.5, i + 0.5)`` of an ``(H, W)`` image, row by row: ``(H * W, 2)``."""
    h, w = image_size
    v, u = torch.meshgrid(torch.arange(h, dtype=dtype, device=device) + 0.5,
                          torch.arange(w, dtype=dtype, device=device) + 0.5, indexing="ij")
    return torch.stack([u, v], dim=-1).reshape(-1, 2)


def pixel_directions(K: torch.Tensor, R: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Unit world-space directions of the rays through ``pixels``.

    K, R: ``(B, 3, 3)`` intrinsics (upper triangular, ``fx != 0``, ``fy > 0``) and world -> camera rotations;
    pixels: ``(N, 2)`` or ``(B or 1, N, 2)`` positions ``(u, v)``. Returns ``(B or 1, N, 3)``.
    """
    Kb = K[:, None]
    fx, fy, s, cx, cy = Kb[..., 0, 0], Kb[..., 1, 1], Kb[..., 0, 1], Kb[..., 0, 2], Kb[..., 1, 2]
    # K^-1 [u, v, 1] for an upper-triangular K.
    y = (pixels[..., 1] - cy) / fy
    x = (pixels[..., 0] - cx - s * y) / fx
    d_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # norm >= 1: normalising is safe
    d = torch.matmul(d_cam, R)  # row-vector form of R^T d_cam
    return d / torch.linalg.vector_norm(d, dim=-1, keepdim=True).clamp_min(1e-12)


def intersect_sphere(origins: torch.Tensor, dirs: torch.Tensor, radius: float = 1.0):
    """Where rays cross a sphere of ``radius`` centred at the origin (the bounding sphere of a normalised scene).

    origins, dirs: ``(..., 3)``, dirs of unit length. Returns ``t_near``, ``t_far`` and ``hit`` (bool), each
    ``(...)``: ``hit`` when the ray's line crosses the sphere and the exit lies ahead (``t_far > 0``); a camera
    inside the sphere gets ``t_near < 0``. For rays whose line misses, both distances are the closest
    approach ``-o·d``. Differentiable (the square root only ever sees positive values).
    """
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - radius * radius
    disc = b * b - c
    crosses = disc > 0
    root = torch.sqrt(torch.where(crosses, disc, torch.ones_like(disc)))
    t_near = torch.where(crosses, -b - root, -b)
    t_far = torch.where(crosses, -b + root, -b)
    return t_near, t_far, crosses & (t_far > 0)


def ray_segments(origins: torch.Tensor, dirs: torch.Tensor, radius: float = 1.0):
    """The part of each ray inside the sphere of ``radius``, from no nearer than the ray's origin (a camera
    inside the sphere starts at itself): ``t_near``, ``t_far`` and ``crosses`` (bool), each ``(...)``. A ray
    that misses the sphere gets the empty segment ``t_far == t_near`` (its closest approach to the centre,
    clamped to the origin, never behind the camera)."""
    t_enter, t_exit, crosses = intersect_sphere(origins, dirs, radius)
    t_near = t_enter.clamp_min(0.0).contiguous()
    t_far = torch.where(crosses, t_exit, t_near).contiguous()
    return t_near, t_far, crosses
