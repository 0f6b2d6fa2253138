"""What moves in a pose refinement and how one step moves it.

The learnable parameterisation itself is :class:`taichi_dr.core.transforms.PoseParameters` (one pose or a
batch of cameras; IDR's ``CameraParameters`` is the same class), re-exported here. This module adds what
pose refinement does with it: the starts of a multi-start, the surface points whitening measures, and
the whitened steepest-descent / Gauss-Newton step with its trust region.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from taichi_dr.core.camera import Cameras
from taichi_dr.core.mesh import Mesh
from taichi_dr.core.transforms import PoseParameters
from taichi_dr.pipelines.pose.fields import surface_points
from taichi_dr.raster.renderer import render_mesh
from taichi_dr.raster.settings import RasterSettings

__all__ = ["MAX_STEP_PX", "WARMUP_STEPS", "PoseParameters"]

WARMUP_STEPS = 5  # Adam's learning-rate ramp at the start of every stage
MAX_STEP_PX = 2.0  # largest gauss_newton / steepest step, in pixels of RMS point motion at the stage's size


def _start_rotations(n: int, angle_deg: float, dtype, device) -> list[Tensor]:
    """Identity, then rotations by ``angle_deg`` about n - 1 axes spread over the sphere (Fibonacci)."""
    out = [torch.zeros(3, dtype=dtype, device=device)]
    m = n - 1
    golden = math.pi * (3 - math.sqrt(5))
    for i in range(m):
        z = 1 - 2 * (i + 0.5) / m
        r = math.sqrt(max(0.0, 1 - z * z))
        axis = torch.tensor([r * math.cos(golden * i), r * math.sin(golden * i), z], dtype=dtype,
                            device=device)
        out.append(axis * math.radians(angle_deg))
    return out


@torch.no_grad()
def _visible_points(mesh: Mesh, camera: Cameras, max_points: int = 4096) -> Tensor:
    """Up to ``max_points`` surface points (N, 3) seen by ``camera`` (hard render), for whitening: what the
    image can tell about the pose is how these move. All vertices when (almost) nothing is visible."""
    out = render_mesh(mesh, camera.detach(), None, RasterSettings(mode="hard"), outputs=())
    pts = surface_points(mesh, camera.detach(), out.pix_to_face).reshape(-1, 3)
    pts = pts[torch.isfinite(pts).all(-1)]
    if pts.shape[0] < 64:
        return mesh.verts.detach()
    stride = max(1, -(-pts.shape[0] // max_points))
    return pts[::stride]


def _sgd_step_direction(g: Tensor, finite: Tensor, lr: float, steepest: bool) -> Tensor:
    """The gradient ``g (n,)`` an SGD step of ``lr`` takes, without host synchronisation: for ``steepest``
    of unit length (a step of lr pixels); then at most MAX_STEP_PX / lr long (a trust region: Gauss-Newton
    steps along directions the image barely constrains are large and leave the range where the linear model
    holds); zero unless ``finite`` (a 0-dim bool tensor)."""
    if steepest:
        norm = g.norm()
        g = torch.where(norm > 0, g / norm.clamp_min(torch.finfo(g.dtype).tiny), g)
    step = g.norm() * lr
    g = g * torch.where(step > MAX_STEP_PX, MAX_STEP_PX / step.clamp_min(MAX_STEP_PX), torch.ones_like(step))
    return torch.where(finite, g, torch.zeros_like(g))
