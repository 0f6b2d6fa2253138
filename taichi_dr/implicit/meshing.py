"""Meshing an implicit surface: marching cubes of an SDF's zero level set on a regular grid.

Part of the implicit renderer family (it only evaluates ``sdf_fn``; no training loop, no network type): any
callable ``points (M, 3) -> (M,)`` works, a trained IDR geometry network or an analytic SDF alike.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from taichi_dr.core import runtime

__all__ = ["extract_mesh"]


@torch.no_grad()
def extract_mesh(sdf_fn: Callable[[torch.Tensor], torch.Tensor], resolution: int = 256, bound: float = 1.0,
                 scale_mat: torch.Tensor | None = None, chunk: int = 65536, device=None):
    """Marching cubes of ``sdf_fn``'s zero level set on a ``resolution³`` grid over ``[-bound, bound]³``.

    The SDF is evaluated one x-slab at a time in chunks of ``chunk`` points, so only the float32 grid
    (``4 resolution³`` bytes: 512 MB at 512³) is held. ``scale_mat (4, 4)`` maps the normalised coordinates
    to world coordinates (the dataset's ``scale_mat``). Returns a :class:`taichi_dr.core.mesh.Mesh` with outward
    (counter-clockwise) faces. Raises ValueError if the SDF has no zero crossing in the grid.
    """
    import mcubes

    from taichi_dr.core.mesh import Mesh

    if resolution < 2:
        raise ValueError(f"extract_mesh: resolution must be >= 2, got {resolution}")
    dev = device or runtime.device()
    lin = torch.linspace(-bound, bound, resolution, device=dev)
    vol = np.empty((resolution, resolution, resolution), dtype=np.float32)
    yy, zz = torch.meshgrid(lin, lin, indexing="ij")
    slab = torch.stack([yy, zz], -1).reshape(-1, 2)
    for i in range(resolution):
        pts = torch.cat([lin[i].expand(slab.shape[0], 1), slab], dim=1)
        vals = torch.cat([sdf_fn(pts[s:s + chunk]).reshape(-1) for s in range(0, pts.shape[0], chunk)])
        vol[i] = vals.reshape(resolution, resolution).float().cpu().numpy()
    if not (vol.min() < 0 < vol.max()):
        raise ValueError(f"extract_mesh: the SDF has no zero crossing in [-{bound}, {bound}]^3 "
                         f"(range {vol.min():.3g} .. {vol.max():.3g}); nothing to mesh")
    verts, faces = mcubes.marching_cubes(vol, 0.0)
    verts = verts.astype(np.float64) * (2 * bound / (resolution - 1)) - bound
    # mcubes orients faces for increasing values outward-facing: flip so that normals point to f > 0.
    faces = faces[:, ::-1].astype(np.int64)
    if scale_mat is not None:
        s = torch.as_tensor(scale_mat, dtype=torch.float64).cpu().numpy()
        verts = verts @ s[:3, :3].T + s[:3, 3]
    return Mesh(verts=torch.from_numpy(verts).float(), faces=torch.from_numpy(np.ascontiguousarray(faces)),
                name="marching_cubes").validate()
