"""Test fixtures: known shapes rendered into multi-view datasets by sphere tracing.

Rendering belongs to the renderers, not to the data layer (``taichi_dr.data`` imports no renderer), so the
tests that need a dataset of known geometry without a mesh renderer build it here.
"""

from __future__ import annotations

import torch

from taichi_dr.core.camera import Cameras
from taichi_dr.data.datasets import MultiViewDataset
from taichi_dr.implicit.sphere_tracing import TracerSettings, sdf_gradient, sphere_trace


def dataset_from_sdf(sdf_fn, cameras: Cameras, color_fn=None, scale_mat=None, name: str = "sdf",
                     masks: bool = True) -> MultiViewDataset:
    """Render an SDF (e.g. :func:`taichi_dr.implicit.analytic.sphere_sdf`) into a dataset by sphere tracing.

    The mask is where rays hit (``masks=False``: a dataset without masks), the colour
    ``color_fn(points (M, 3), normals (M, 3)) -> (M, 3)`` (default: the normal mapped to [0, 1]), black
    elsewhere. Cameras of the normalised scene; ``scale_mat`` (4, 4) normalised -> world (default identity).
    """
    h, w = cameras.image_size
    o, d = cameras.detach().image_rays()
    o, d = o.reshape(-1, 3).contiguous(), d.reshape(-1, 3).contiguous()
    tr = sphere_trace(sdf_fn, o, d, TracerSettings(threshold=1e-5, max_steps=128), miss_min_sdf=False)
    rgb = torch.zeros_like(o)
    if bool(tr.hit.any()):
        _, g = sdf_gradient(sdf_fn, tr.points[tr.hit])
        n = g / g.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        rgb[tr.hit] = (color_fn(tr.points[tr.hit], n) if color_fn is not None else 0.5 + 0.5 * n).detach()
    b = len(cameras)
    names = tuple(f"{name}_{i:03d}" for i in range(b))
    s = torch.eye(4) if scale_mat is None else torch.as_tensor(scale_mat)
    s = s.to(torch.float64)
    return MultiViewDataset(images=rgb.reshape(b, h, w, 3).float().clamp(0, 1),
                            masks=tr.hit.reshape(b, h, w) if masks else None,
                            cameras=cameras.detach().to(dtype=torch.float32), scale_mat=s, names=names)


def ring_cameras(n: int = 8, size: int = 24) -> Cameras:
    """``n`` cameras at distance 3 around the origin, azimuths evenly spaced, elevations alternating 30 and
    -20 degrees, 40-degree field of view, square images of ``size`` pixels (the test scenes' views)."""
    az = torch.linspace(0, 360, n + 1)[:-1]
    el = torch.tensor([30.0, -20.0] * n)[:n]
    return Cameras.from_spherical(torch.full((n,), 3.0), el, az, fov=40, image_size=(size, size))
