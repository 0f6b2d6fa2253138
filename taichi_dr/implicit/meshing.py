"""Meshing an implicit field: multiresolution sparse marching cubes (a level set of any field).

Part of the implicit renderer family (it only evaluates ``field``; no training loop, no network type): any
callable ``points (M, 3) -> (M,)`` works, a trained SDF network, an occupancy or density network or an
analytic field alike.

Why sparse: the surface passes through well under 1% of a fine grid's cells, but a dense grid evaluates the
network at every one of its ``resolution³`` points (16.7 M at 256³: 481 s for IDR's 8 x 256 network on
2 cores). As in Occupancy Networks' MISE (which UNISURF uses), the field is evaluated on a coarse grid
first; only the cells that may hold the surface are subdivided, level by level, down to the finest grid;
marching cubes then runs on the fine grid, where every point the surface can touch was evaluated exactly
and every other point only needs to be on the right side of the level.

Which cells are refined:

* every cell whose corner values straddle the level;
* for SDFs (``inside="below"``), every cell that a field of slope at most ``band`` could cross: the level is
  within ``band |c - p|`` of the value at each corner ``c`` when the surface passes through ``p``. An SDF has
  slope 1, so for it the sparse mesh is the dense one, thin parts included;
* for other fields (occupancy, density: ``inside="above"``) there is no such bound, so the cells next to
  refined ones are refined too (``dilate`` cells). A part thinner than a coarse cell can then still be missed
  if no coarse corner sees it: raise ``coarse`` or pass ``dense=True``.

The points of each level are evaluated in batches of ``chunk`` points (one network call each), so per-call
overhead does not dominate.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from taichi_dr.core import runtime

__all__ = ["extract_mesh"]

INSIDE = ("below", "above")
# Value given to grid points that were not evaluated: far on their side of the level, so marching cubes puts
# no vertex near them (they only ever sit in cells whose corners are all on one side).
FAR = 1e6
OCTANTS = np.array(list(itertools.product((0, 1), repeat=3)), dtype=np.int64)  # (8, 3): children, corners


@torch.no_grad()
def extract_mesh(field: Callable[[torch.Tensor], torch.Tensor], resolution: int = 256, bound: float = 1.0, *,
                 level: float = 0.0, inside: str = "below", coarse: int | None = None, band: float | None = None,
                 dilate: int | None = None, dense: bool = False, scale_mat: torch.Tensor | None = None,
                 chunk: int = 1 << 17, device=None, progress: Callable[[str], None] | None = None,
                 return_stats: bool = False):
    """Marching cubes of the ``level`` set of ``field`` on the ``resolution³`` grid over ``[-bound, bound]³``,
    evaluating the field only near the surface (see the module docstring).

    field: ``points (M, 3) float32 -> values (M,)`` (or ``(M, 1)``), e.g. ``model.sdf``.
    resolution: points per axis of the finest grid (its spacing is ``2 bound / (resolution - 1)``).
    level, inside: the surface is ``field = level``; ``inside="below"`` for SDFs (inside where the field is
        below the level: faces point to increasing values), ``"above"`` for occupancy (level 0.5) and density
        (a threshold).
    coarse: cells per axis of the first grid, rounded so that each level halves the cell size (default 32 for
        ``inside="below"``, where the band makes its size safe; 64 otherwise, so that parts thinner than
        1/32 of the grid are seen).
    band: a bound on the field's slope ``|grad f|`` used to decide which cells the surface may cross
        (default 1.25 for ``inside="below"``: an SDF has slope 1, trained ones about 1; 0 = no bound, for
        occupancy and density, which are refined by straddling corners and ``dilate`` instead).
    dilate: also refine cells within this many cells of a refined one (default 0 for SDFs, 1 otherwise).
    dense: evaluate every grid point (the reference, and the fallback for fields with thin parts that no
        coarse corner sees).
    scale_mat (4, 4): maps the grid's coordinates to world coordinates (a dataset's ``scale_mat``).
    chunk: points per call of ``field``. progress: called with one line per level.
    return_stats: also return ``{"points_evaluated", "dense_points", "levels", "seconds"}``.

    Returns a :class:`taichi_dr.core.mesh.Mesh` whose faces point outwards (counter-clockwise seen from
    outside), closed wherever the surface does not leave the grid. Raises ValueError for bad arguments, a
    field that returns non-finite values or the wrong shape, or no crossing of the level in the grid.
    """
    import mcubes

    from taichi_dr.core.mesh import Mesh

    t0 = time.perf_counter()
    _check_arguments(resolution, bound, level, inside, coarse, band, dilate, chunk)
    band = (1.25 if inside == "below" else 0.0) if band is None else float(band)
    coarse = (32 if inside == "below" else 64) if coarse is None else coarse
    dilate = (0 if inside == "below" else 1) if dilate is None else int(dilate)
    dev = torch.device(device) if device is not None else runtime.device()
    n = int(resolution)
    spacing = 2.0 * bound / (n - 1)

    # Strides: the coarsest spacing is a power of two times the finest, so every level's points lie on the
    # finest grid. The grid is padded up to a multiple of it (points past +bound are evaluated too, then cut).
    stride = 1 if dense else 2 ** max(0, round(math.log2(max((n - 1) / coarse, 1.0))))
    padded = -(-(n - 1) // stride) * stride  # index of the last grid point after padding
    values = np.full((padded + 1,) * 3, np.nan, dtype=np.float32)  # NaN = not evaluated (yet)

    def evaluate(index: np.ndarray) -> None:
        """Evaluate the field at grid points ``index (M, 3)`` and store the values."""
        coords = torch.from_numpy(index.astype(np.float32) * np.float32(spacing) - np.float32(bound)).to(dev)
        out = np.empty(len(index), dtype=np.float32)
        for start in range(0, len(index), chunk):
            v = field(coords[start:start + chunk])
            if not isinstance(v, torch.Tensor) or v.reshape(-1).shape[0] != min(chunk, len(index) - start):
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"extract_mesh: the field must map (M, 3) points to (M,) values, got {got} "
                                 f"for M = {min(chunk, len(index) - start)}")
            out[start:start + len(v.reshape(-1))] = v.reshape(-1).float().cpu().numpy()
        bad = ~np.isfinite(out)
        if bad.any():
            x = index[np.argmax(bad)] * spacing - bound
            raise ValueError(f"extract_mesh: the field returned {int(bad.sum())} non-finite values (e.g. at "
                             f"({x[0]:.4g}, {x[1]:.4g}, {x[2]:.4g})); nothing to mesh")
        values[index[:, 0], index[:, 1], index[:, 2]] = out

    evaluated = [0]

    def evaluate_unknown(index: np.ndarray) -> int:
        """Evaluate those of the grid points ``index (M, 3)`` not known yet; returns how many."""
        flat = np.unique(np.ravel_multi_index(index.T, values.shape))
        flat = flat[np.isnan(values.reshape(-1)[flat])]
        if len(flat):
            evaluate(np.stack(np.unravel_index(flat, values.shape), -1))
        evaluated[0] += len(flat)
        return len(flat)

    # Level 0: the coarse grid, every point.
    axis = np.arange(0, padded + 1, stride)
    evaluate(np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3))
    evaluated[0] = len(axis) ** 3
    levels = int(math.log2(stride)) + 1
    if progress is not None:
        progress(f"meshing level 1/{levels}: {evaluated[0]} points at {len(axis) - 1}^3 cells")

    region = np.ones((padded // stride,) * 3, dtype=bool)  # cells of this level inside refined parents
    uniform_sides = []  # per level: (stride, side (cells,)*3 int8: +1/-1 for cells not refined, else 0)
    level_number = 1
    while stride > 1:
        cells = padded // stride
        corners = values[::stride, ::stride, ::stride]
        lo = np.full((cells,) * 3, np.inf, dtype=np.float32)
        hi = np.full((cells,) * 3, -np.inf, dtype=np.float32)
        for a, b, c in itertools.product((0, 1), repeat=3):
            corner = corners[a:a + cells, b:b + cells, c:c + cells]
            np.fmin(lo, corner, out=lo)   # fmin/fmax skip the NaN of cells outside the region
            np.fmax(hi, corner, out=hi)
        refine = (lo <= level) & (hi >= level)
        if band > 0:
            # A field of slope <= band is within band |c - p| of the level at corner c if the surface passes
            # through p; for opposite corners c, c' of a cube of side l, |c - p| + |c' - p| <= (1 + sqrt 2) l
            # over the cube. So a cell can hold the surface only if every opposite pair passes this test.
            reach = np.float32(band * (1 + math.sqrt(2)) * stride * spacing)
            close = np.ones((cells,) * 3, dtype=bool)
            for a, b, c in itertools.product((0, 1), (0, 1), (0,)):
                one = corners[a:a + cells, b:b + cells, c:c + cells]
                other = corners[1 - a:1 - a + cells, 1 - b:1 - b + cells, 1 - c:1 - c + cells]
                close &= np.abs(one - level) + np.abs(other - level) <= reach
            refine |= close
        refine &= region
        if dilate:
            refine = _dilated(refine, dilate)
        # Cells of the region left alone have all corners on one side; their other points get that side.
        side = np.where(region & ~refine, np.where(lo > level, 1, -1), 0).astype(np.int8)
        uniform_sides.append((stride, side))
        half = stride // 2
        cells_refined = np.argwhere(refine)                                    # (A, 3)
        children = cells_refined[:, None, :] * 2 + OCTANTS[None]             # (A, 8, 3) at the next stride
        new_points = 0
        if band > 0:
            # First the centre of each refined cell: a child's corner that is its parent's and the centre are
            # opposite corners of the child, so the slope bound already rules out children (and their points)
            # that the surface cannot reach. Such a child is on the side of those two corners.
            centres = cells_refined * stride + half
            new_points += evaluate_unknown(centres)
            centre = values[centres[:, 0], centres[:, 1], centres[:, 2]][:, None]   # (A, 1)
            own = cells_refined[:, None, :] * stride + OCTANTS[None] * stride       # (A, 8, 3) parent corners
            corner = values[own[..., 0], own[..., 1], own[..., 2]]                 # (A, 8)
            reach = np.float32(band * (1 + math.sqrt(2)) * half * spacing)
            crosses = (np.minimum(corner, centre) <= level) & (np.maximum(corner, centre) >= level)
            reached = crosses | (np.abs(corner - level) + np.abs(centre - level) <= reach)
            if dilate:
                reached[:] = True  # the grown cells need all their children
            left = children[~reached]
            side = np.zeros((padded // half,) * 3, dtype=np.int8)
            side[left[:, 0], left[:, 1], left[:, 2]] = np.where(centre.repeat(8, 1)[~reached] > level, 1, -1)
            uniform_sides.append((half, side))
            children = children[reached]
        else:
            children = children.reshape(-1, 3)
        # The corners of the children kept, at half the stride, those not yet known.
        corners_of = (children[:, None, :] + OCTANTS[None]).reshape(-1, 3) * half
        new_points += evaluate_unknown(corners_of)
        level_number += 1
        if progress is not None:
            progress(f"meshing level {level_number}/{levels}: {new_points} points in {len(children)} cells "
                     f"({evaluated[0]} of {n ** 3} so far)")
        region = np.zeros((padded // half,) * 3, dtype=bool)
        region[children[:, 0], children[:, 1], children[:, 2]] = True
        stride = half

    # Points not evaluated: far on the side of the cell they lie in (the finest level that decided it wins).
    missing = np.isnan(values)
    if missing.any():
        outside = 1 if inside == "below" else -1
        fill = np.full(values.shape, outside, dtype=np.int8)
        for s, side in uniform_sides:
            block = np.repeat(np.repeat(np.repeat(side, s, 0), s, 1), s, 2)
            block = np.pad(block, ((0, 1),) * 3, mode="edge")
            np.copyto(fill, block, where=block != 0)
        values[missing] = level + FAR * fill[missing]
    volume = values[:n, :n, :n]
    known = volume[~missing[:n, :n, :n]]
    if not (known.min() < level < known.max()):
        hint = "" if dense or not missing.any() else (
            "; parts thinner than a coarse cell can be missed by a field without a slope bound: try a larger "
            "coarse or dense=True")
        raise ValueError(f"extract_mesh: the field does not cross level {level:g} in [-{bound:g}, {bound:g}]^3 "
                         f"(values {known.min():.3g} .. {known.max():.3g} at the points evaluated){hint}")
    verts, faces = mcubes.marching_cubes(volume, float(level))
    verts = verts.astype(np.float64) * spacing - bound
    # mcubes orients faces towards increasing values: flip them for SDFs, whose outside is above the level.
    faces = faces[:, ::-1] if inside == "below" else faces
    faces = np.ascontiguousarray(faces.astype(np.int64))
    if scale_mat is not None:
        s = torch.as_tensor(scale_mat, dtype=torch.float64).cpu().numpy()
        verts = verts @ s[:3, :3].T + s[:3, 3]
    mesh = Mesh(verts=torch.from_numpy(verts).float(), faces=torch.from_numpy(faces), name="marching_cubes")
    mesh = mesh.validate()
    if not return_stats:
        return mesh
    return mesh, {"points_evaluated": int(evaluated[0]), "dense_points": n ** 3, "levels": levels,
                  "seconds": time.perf_counter() - t0}


def _dilated(cells: np.ndarray, steps: int) -> np.ndarray:
    """``cells`` (a boolean volume) grown by ``steps`` cells in every direction (26-neighbourhood)."""
    grown = torch.from_numpy(cells).float()[None, None]
    for _ in range(steps):
        grown = torch.nn.functional.max_pool3d(grown, 3, stride=1, padding=1)
    return grown[0, 0].numpy() > 0


def _check_arguments(resolution, bound, level, inside, coarse, band, dilate, chunk) -> None:
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    checks = [
        (isinstance(resolution, int) and not isinstance(resolution, bool) and resolution >= 2,
         "resolution", "an int >= 2", resolution),
        (number(bound) and bound > 0, "bound", "a number > 0", bound),
        (number(level), "level", "a finite number", level),
        (inside in INSIDE, "inside", f"one of {INSIDE}", inside),
        (coarse is None or (isinstance(coarse, int) and not isinstance(coarse, bool) and coarse >= 1), "coarse",
         "an int >= 1 (or None)", coarse),
        (band is None or (number(band) and band >= 0), "band", "a number >= 0 (or None)", band),
        (dilate is None or (isinstance(dilate, int) and dilate >= 0), "dilate", "an int >= 0 (or None)", dilate),
        (isinstance(chunk, int) and chunk >= 1, "chunk", "an int >= 1", chunk),
    ]
    for ok, name, expected, value in checks:
        if not ok:
            raise ValueError(f"extract_mesh: {name} must be {expected}, got {value!r}")
