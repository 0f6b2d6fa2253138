"""The occupancy grid (empty-space skipping) against plain-PyTorch references: nerfacc's update rule, an
analytic ball, brute-force marching and dense-sample ray intervals; CPU against Vulkan."""

import math

import numpy as np
import pytest
import torch
from vulkan_subprocess import run_on_vulkan

from taichi_dr.implicit.occupancy_grid import OccupancyGrid, density_value_fn, occupancy_value_fn, sdf_value_fn

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _field(x):
    """A non-negative test field, zero on about half of space."""
    return (torch.sin(3 * x[:, 0]) + torch.cos(2 * x[:, 1]) * x[:, 2] - 0.3).clamp_min(0)


# ---------------------------------------------------------------------------------------------------------
# References


def _cell_bounds(lo, hi, res):
    """(Rx, Ry, Rz, 3) lower and upper corners of every cell, float64."""
    axes = [torch.arange(n, dtype=F64) for n in res]
    ijk = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    lo_t, hi_t, n = torch.tensor(lo, dtype=F64), torch.tensor(hi, dtype=F64), torch.tensor(res, dtype=F64)
    size = (hi_t - lo_t) / n
    return lo_t + ijk * size, lo_t + (ijk + 1) * size


def _reference_update(values, occupied, iteration, fn, res, lo, hi, *, thr=0.01, decay=0.95, every=16,
                      warmup=256, generator=None):
    """nerfacc's _update, written out: the same random draws in the same order; duplicates by a Python loop."""
    values, occupied = values.clone().reshape(-1), occupied.clone().reshape(-1)
    if iteration % every:
        return values.reshape(res), occupied.reshape(res), 0
    n = math.prod(res)
    if iteration < warmup:
        idx = torch.arange(n)
    else:
        q = n // 4
        uniform = torch.randint(n, (q,), generator=generator)
        occ = torch.nonzero(occupied)[:, 0]
        if q < len(occ):
            occ = occ[torch.randint(len(occ), (q,), generator=generator)]
        idx = torch.cat([uniform, occ])
    u = torch.rand(len(idx), 3, generator=generator)
    ijk = torch.stack([idx // (res[1] * res[2]), (idx // res[2]) % res[1], idx % res[2]], dim=1).float()
    size = torch.tensor([(h - l) / r for l, h, r in zip(lo, hi, res, strict=True)])
    new = fn(torch.tensor(lo) + (ijk + u) * size)
    best = {}
    for c, v in zip(idx.tolist(), new.tolist(), strict=True):
        best[c] = max(best.get(c, -1.0), v)
    for c, v in best.items():
        values[c] = max(float(values[c]) * decay, v)
    positive = values[values > 0]
    thre = min(float(positive.mean()), thr) if len(positive) else thr
    return values.reshape(res), (values > thre).reshape(res), len(idx)


def _box(grid, dtype):
    """lo and resolution / (hi - lo), as the march's brute-force filter computes cells."""
    lo = torch.tensor(grid.lo, dtype=F64)
    scale = torch.tensor(grid.resolution, dtype=F64) / (torch.tensor(grid.hi, dtype=F64) - lo)
    return lo.to(dtype), scale.to(dtype)


def _occupied_at(grid, p, dtype):
    """Whether points p (..., 3) lie in occupied cells (outside the box: no)."""
    lo, scale = _box(grid, dtype)
    u = (p - lo) * scale
    res = torch.tensor(grid.resolution)
    inside = ((u >= 0) & (u < res.to(dtype))).all(-1)
    c = torch.minimum(u.floor().clamp_min(0).long(), res - 1)
    return grid.occupied[c[..., 0], c[..., 1], c[..., 2]] & inside


def _reference_march(grid, o, d, tn, tf, step, jitter, cap=None):
    """All t_near + (k + jitter) step < t_far, kept where the point's cell is occupied: a list per ray."""
    dtype = o.dtype
    step_t = torch.tensor(step, dtype=dtype)
    out = []
    for r in range(o.shape[0]):
        if not tf[r] > tn[r]:
            out.append(torch.zeros(0, dtype=dtype))
            continue
        n = int(math.ceil(float((tf[r] - tn[r]) / step))) + 2
        t = tn[r] + (torch.arange(n, dtype=dtype) + jitter[r]) * step_t
        t = t[t < tf[r]]
        keep = _occupied_at(grid, o[r] + t[:, None] * d[r], dtype)
        out.append(t[keep][:cap])
    return out


def _rays(n, seed, dtype=F64):
    """Random rays through [-1, 1]^3 and around it: starting inside and outside, axis-aligned ones, rays that
    miss the box, zero-length and reversed segments."""
    g = _gen(seed)
    o = torch.rand(n, 3, generator=g, dtype=F64) * 4 - 2
    o[: n // 4] *= 0.45                                        # start inside the box
    d = torch.randn(n, 3, generator=g, dtype=F64)
    d[n // 4: n // 4 + 10, :2] = 0                              # along z
    d[n // 4 + 10: n // 4 + 20, 1] = 0                          # in an xz-plane
    d = d / d.norm(dim=1, keepdim=True)
    miss = slice(n // 2, n // 2 + 10)                           # outside, pointing away
    o[miss] = torch.tensor([3.0, 3.0, 3.0], dtype=F64)
    d[miss] = torch.tensor([1.0, 1.0, 1.0], dtype=F64) / math.sqrt(3)
    tn = torch.rand(n, generator=g, dtype=F64) * 0.5
    tf = tn + torch.rand(n, generator=g, dtype=F64) * 4.5
    tf[-10:-5] = tn[-10:-5]                                     # zero-length
    tf[-5:] = tn[-5:] - 0.3                                     # reversed
    return o.to(dtype), d.to(dtype), tn.to(dtype), tf.to(dtype)


def _random_grid(res=12, p=0.3, seed=0):
    grid = OccupancyGrid(-1.0, 1.0, res)
    grid.occupied.copy_(torch.rand(grid.resolution, generator=_gen(seed)) < p)
    return grid


def _per_ray(s, x):
    off = s.offsets.tolist()
    return [x[off[r]:off[r + 1]] for r in range(s.n_rays)]


# ---------------------------------------------------------------------------------------------------------
# update


def test_update_matches_reference_rule():
    res, lo, hi = (6, 5, 4), (-1.0, -0.5, -2.0), (1.0, 1.5, 0.0)
    grid = OccupancyGrid(lo, hi, res)
    ref_v, ref_o = torch.zeros(res), torch.zeros(res, dtype=torch.bool)
    g_a, g_b = _gen(7), _gen(7)
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        return _field(x)

    for it in [0, 16, 20, 32, 48, 64, 80]:              # warm-up at 0, 16; then a quarter plus occupied cells
        calls.clear()
        did = grid.update(it, fn, warmup_steps=32, generator=g_a, chunk=37)
        ref_v, ref_o, m = _reference_update(ref_v, ref_o, it, _field, res, lo, hi, warmup=32, generator=g_b)
        assert did == (it % 16 == 0)
        assert sum(calls) == m and all(c <= 37 for c in calls)
        assert torch.allclose(grid.values, ref_v, rtol=0, atol=1e-6), it
        assert torch.equal(grid.occupied, ref_o), it
    assert 0.2 < grid.occupancy_fraction < 0.8


def test_update_decay_threshold_and_cell_counts():
    grid = OccupancyGrid(-1.0, 1.0, 8)
    n = 512
    grid.update(0, _field, generator=_gen(1))
    before = grid.values.clone()
    n_occ = int(grid.occupied.sum())
    # after warm-up: n // 4 uniform cells plus min(occupied, n // 4) occupied ones; a zero field only decays
    seen = []
    assert grid.update(256, lambda x: seen.append(x.shape[0]) or torch.zeros(x.shape[0]), generator=_gen(2))
    assert sum(seen) == n // 4 + min(n_occ, n // 4)
    changed = grid.values != before
    assert torch.allclose(grid.values[changed], before[changed] * 0.95, rtol=1e-6, atol=0)
    assert 0 < int(changed.sum()) <= sum(seen)                   # cells not drawn keep their values
    assert int((changed & (before == 0)).sum()) == 0
    # the threshold is min(mean of the positive values, occupancy_threshold)
    pos = grid.values[grid.values > 0]
    assert torch.equal(grid.occupied, grid.values > min(float(pos.mean()), 0.01))
    faint = OccupancyGrid(-1.0, 1.0, 8)
    faint.update(0, lambda x: 1e-3 * torch.rand(x.shape[0], generator=_gen(3)), generator=_gen(4))
    mean = float(faint.values.mean())
    assert mean < 0.01 and torch.equal(faint.occupied, faint.values > mean)
    assert 0.3 < faint.occupancy_fraction < 0.7
    # nothing positive: nothing occupied
    empty = OccupancyGrid(-1.0, 1.0, 4)
    empty.update(0, lambda x: torch.zeros(x.shape[0]))
    assert empty.occupancy_fraction == 0.0
    assert not empty.update(3, _field) and empty.occupancy_fraction == 0.0     # 3 % 16: no update
    empty.mark_all_occupied()
    assert empty.occupancy_fraction == 1.0


def test_same_seed_same_grid():
    grids = []
    for seed in (5, 5, 6):
        grid = OccupancyGrid(-1.0, 1.0, 10)
        g = _gen(seed)
        for it in range(0, 80, 16):
            grid.update(it, _field, warmup_steps=32, generator=g)
        grids.append(grid)
    assert torch.equal(grids[0].values, grids[1].values) and torch.equal(grids[0].occupied, grids[1].occupied)
    assert not torch.equal(grids[0].values, grids[2].values)


def test_state_dict_round_trip():
    grid = OccupancyGrid(-1.0, 1.0, 6)
    grid.update(0, _field, generator=_gen(0))
    other = OccupancyGrid(-1.0, 1.0, 6)
    other.load_state_dict(grid.state_dict())
    assert torch.equal(other.values, grid.values) and torch.equal(other.occupied, grid.occupied)
    with pytest.raises(RuntimeError, match="aabb"):
        OccupancyGrid(-2.0, 2.0, 6).load_state_dict(grid.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        OccupancyGrid(-1.0, 1.0, 7).load_state_dict(grid.state_dict())


# ---------------------------------------------------------------------------------------------------------
# Analytic ball: radius 0.5 at the origin, in [-1, 1]^3 at resolution 32


def _ball_cells(res=32):
    a, b = _cell_bounds((-1.0,) * 3, (1.0,) * 3, (res,) * 3)
    near = torch.clamp(torch.zeros(3, dtype=F64), a, b).norm(dim=-1)        # closest point to the centre
    far = torch.maximum(a.abs(), b.abs()).norm(dim=-1)                       # farthest corner
    inside = far <= 0.5                                                      # the cell lies in the ball
    intersects = near < 0.5
    cut = (near <= 0.5) & (far >= 0.5)                                       # the sphere passes through
    surface_distance = torch.where(cut, 0.0, torch.where(inside, 0.5 - far, near - 0.5))
    return inside, intersects, cut, surface_distance


def test_ball_density_occupies_inside_never_outside():
    """Density 10 in the ball: every cell inside it is occupied, no cell outside it is; a cell the sphere
    cuts only where a jittered sample fell in the ball (most of them after two updates)."""
    grid = OccupancyGrid(-1.0, 1.0, 32)
    step = 2 * math.sqrt(3) / 1024
    fn = density_value_fn(lambda x: 10.0 * (x.norm(dim=1) < 0.5).float(), step)
    g = _gen(0)
    grid.update(0, fn, generator=g)
    grid.update(16, fn, generator=g)
    inside, intersects, cut, _ = _ball_cells()
    occ = grid.occupied
    assert bool(occ[inside].all())
    assert not bool(occ[~intersects].any())
    assert float(occ[cut & ~inside].float().mean()) > 0.5
    assert int(inside.sum()) > 1000


def test_ball_sdf_occupies_every_surface_cell():
    """sdf_value_fn: every cell the sphere passes through is occupied whatever the jitter; cells more than
    1.5 cell diagonals from the sphere are not."""
    grid = OccupancyGrid(-1.0, 1.0, 32)
    grid.update(0, sdf_value_fn(lambda x: x.norm(dim=1) - 0.5, grid), generator=_gen(1))
    _, _, cut, distance = _ball_cells()
    assert bool(grid.occupied[cut].all())
    assert not bool(grid.occupied[distance >= 1.5 * grid.cell_diagonal].any())
    assert 0.05 < grid.occupancy_fraction < 0.3


def test_occupancy_value_fn_clamps():
    fn = occupancy_value_fn(lambda x: x[:, 0] * 2 - 0.5)
    assert fn(torch.tensor([[0.0, 0, 0], [0.5, 0, 0], [1.0, 0, 0]])).tolist() == [0.0, 0.5, 1.0]


# ---------------------------------------------------------------------------------------------------------
# march


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("jittered", [False, True])
def test_march_matches_brute_force(dtype, jittered):
    grid = _random_grid()
    o, d, tn, tf = _rays(300, seed=2, dtype=dtype)
    step = 0.0173
    s = grid.march(o, d, tn, tf, step, generator=_gen(9) if jittered else None)
    jitter = torch.rand(300, generator=_gen(9), dtype=dtype) if jittered else torch.zeros(300, dtype=dtype)
    ref = _reference_march(grid, o, d, tn, tf, step, jitter)
    assert s.counts.tolist() == [len(t) for t in ref]
    assert torch.equal(s.t, torch.cat(ref))                     # exactly: the same float operations
    assert s.n_samples > 1000 and s.t.dtype == dtype
    assert torch.equal(s.ray_index.long(), torch.repeat_interleave(torch.arange(300), s.counts.long()))
    assert torch.equal(s.delta, torch.full_like(s.t, step))
    for t in _per_ray(s, s.t):
        assert bool((t[1:] > t[:-1]).all())
    assert s.counts[-10:].tolist() == [0] * 10                   # zero-length and reversed segments
    assert s.counts[150:160].tolist() == [0] * 10                # rays missing the box
    # a cap keeps each ray's first samples
    capped = grid.march(o, d, tn, tf, step, generator=_gen(9) if jittered else None, max_samples_per_ray=5)
    assert torch.equal(capped.t, torch.cat([t[:5] for t in ref]))


def test_march_ball_grid_and_all_occupied():
    grid = OccupancyGrid(-1.0, 1.0, 32)
    grid.update(0, sdf_value_fn(lambda x: x.norm(dim=1) - 0.5, grid), generator=_gen(1))
    o, d, tn, tf = _rays(200, seed=3)
    for g in (grid, OccupancyGrid(-1.0, 1.0, (8, 16, 4))):
        if g is not grid:
            g.mark_all_occupied()
        s = g.march(o, d, tn, tf, 0.011, generator=_gen(4))
        ref = _reference_march(g, o, d, tn, tf, 0.011, torch.rand(200, generator=_gen(4), dtype=F64))
        assert s.counts.tolist() == [len(t) for t in ref] and torch.equal(s.t, torch.cat(ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_march_rays_along_cell_faces(dtype):
    """Rays in cell faces and along cell edges, and through the box's faces and corners."""
    grid = _random_grid(res=16, p=0.2, seed=4)
    o = torch.tensor([[-1.5, 0.0, 0.25], [0.125, -1.5, -0.5], [0.5, 0.25, 1.5], [-1.5, -1.5, -1.5],
                      [-1.0, -1.0, -1.5], [1.0, 0.3, -1.5], [-1.5, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=dtype)
    d = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, -1.0], [1.0, 1.0, 1.0], [0, 0, 1.0], [0, 0, 1.0],
                      [1.0, 0, 0], [-1.0, 1.0, 0]], dtype=dtype)
    d = d / d.norm(dim=1, keepdim=True)
    tn, tf = torch.zeros(8, dtype=dtype), torch.full((8,), 5.0, dtype=dtype)
    for step in (0.0625, 0.01):
        s = grid.march(o, d, tn, tf, step)
        ref = _reference_march(grid, o, d, tn, tf, step, torch.zeros(8, dtype=dtype))
        assert s.counts.tolist() == [len(t) for t in ref] and torch.equal(s.t, torch.cat(ref))
        assert s.n_samples > 30
        t0, t1, hit = grid.ray_intervals(o, d, tn, tf)
        idx = s.ray_index.long()
        assert bool(hit[idx].all()) and bool((s.t >= t0[idx]).all()) and bool((s.t <= t1[idx]).all())


def test_march_odd_resolution_and_mask_changes():
    """A box and resolution not multiples of the skipped blocks; marching follows in-place changes of
    ``occupied`` and loaded states."""
    grid = OccupancyGrid((-1.0, -0.9, -1.1), (1.2, 1.0, 0.9), (13, 9, 20))
    o, d, tn, tf = _rays(200, seed=7)
    centres = grid.cell_centers().double()
    masks = [centres.norm(dim=-1) < 0.55, torch.rand(grid.resolution, generator=_gen(8)) < 0.04]
    for mask in masks:
        grid.occupied.copy_(mask)
        s = grid.march(o, d, tn, tf, 0.0093)
        ref = _reference_march(grid, o, d, tn, tf, 0.0093, torch.zeros(200, dtype=F64))
        assert s.counts.tolist() == [len(t) for t in ref] and torch.equal(s.t, torch.cat(ref))
        assert s.n_samples > 200
    other = OccupancyGrid((-1.0, -0.9, -1.1), (1.2, 1.0, 0.9), (13, 9, 20))
    other.march(o, d, tn, tf, 0.0093)
    other.load_state_dict(grid.state_dict())
    assert torch.equal(other.march(o, d, tn, tf, 0.0093).t, s.t)


def test_march_empty_grid_and_no_rays():
    grid = OccupancyGrid(-1.0, 1.0, 16)
    o, d, tn, tf = _rays(50, seed=4, dtype=torch.float32)
    s = grid.march(o, d, tn, tf, 0.01, generator=_gen(0))
    assert s.n_samples == 0 and s.offsets.tolist() == [0] * 51 and s.ray_index.dtype == torch.int32
    z = torch.zeros(0, 3)
    s = grid.march(z, z, torch.zeros(0), torch.zeros(0), 0.01)
    assert s.n_rays == 0 and s.n_samples == 0
    t0, t1, hit = grid.ray_intervals(o, d, tn, tf)
    assert not bool(hit.any()) and torch.equal(t0, tf) and torch.equal(t1, tf)


# ---------------------------------------------------------------------------------------------------------
# ray_intervals


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ray_intervals_match_dense_samples(dtype):
    grid = _random_grid(res=10, p=0.08, seed=3)
    n = 300
    o, d, tn, tf = _rays(n, seed=5, dtype=dtype)
    t0, t1, hit = grid.ray_intervals(o, d, tn, tf)
    h = 1e-3
    tol = 1e-9 if dtype == F64 else 2e-6
    dense_hit = 0
    for r in range(n):
        if not tf[r] > tn[r]:
            assert not hit[r] and t0[r] == tf[r] and t1[r] == tf[r]
            continue
        t = torch.arange(float(tn[r]), float(tf[r]), h, dtype=F64)
        occ = _occupied_at(grid, o[r].to(F64) + t[:, None] * d[r].to(F64), F64)
        if not hit[r]:
            assert not bool(occ.any()) and t0[r] == tf[r] and t1[r] == tf[r], r
            continue
        assert tn[r] <= t0[r] <= t1[r] <= tf[r], r
        if bool(occ.any()):
            dense_hit += 1
            first, last = float(t[occ][0]), float(t[occ][-1])
            # the interval holds every occupied dense sample and is tight to within one spacing
            assert float(t0[r]) - tol <= first and last <= float(t1[r]) + tol, r
            assert first - h - tol <= float(t0[r]) and float(t1[r]) <= last + h + tol, r
        else:
            assert float(t1[r] - t0[r]) <= 2 * h, r             # clipped a corner between two dense samples
    assert dense_hit > 30
    # every sample march keeps lies in its ray's interval
    s = grid.march(o, d, tn, tf, 0.0071, generator=_gen(2))
    idx = s.ray_index.long()
    assert s.n_samples > 500
    assert bool(hit[idx].all()) and bool((s.t >= t0[idx]).all()) and bool((s.t <= t1[idx]).all())


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_one_line_errors():
    grid = OccupancyGrid(-1.0, 1.0, 4)
    o, d, tn, tf = _rays(20, seed=0, dtype=torch.float32)
    cases = [
        (lambda: grid.march(o, d, tn, tf, -0.1), ValueError, "step_size"),
        (lambda: grid.march(o, d, tn, tf, 0.0), ValueError, "step_size"),
        (lambda: grid.march(o[:, :2], d, tn, tf, 0.1), ValueError, "origins"),
        (lambda: grid.march(o, d[:5], tn, tf, 0.1), ValueError, "dirs"),
        (lambda: grid.march(o, d, tn[:3], tf, 0.1), ValueError, "t_near"),
        (lambda: grid.march(o, d.double(), tn, tf, 0.1), TypeError, "dirs"),
        (lambda: grid.march(o, torch.zeros_like(d), tn, tf, 0.1), ValueError, "dirs"),
        (lambda: grid.march(o, d, tn, tf + math.nan, 0.1), ValueError, "t_far"),
        (lambda: grid.march(o, d, tn, tf, 0.1, generator=3), TypeError, "generator"),
        (lambda: grid.march(o, d, tn, tf, 0.1, max_samples_per_ray=-1), ValueError, "max_samples_per_ray"),
        (lambda: grid.ray_intervals(o, d, tn, tf[:4]), ValueError, "t_far"),
        (lambda: OccupancyGrid(-1.0, 1.0, 0), ValueError, "resolution"),
        (lambda: OccupancyGrid(-1.0, 1.0, (4, 4)), ValueError, "resolution"),
        (lambda: OccupancyGrid(-1.0, 1.0, 2.5), TypeError, "resolution"),
        (lambda: OccupancyGrid(1.0, 1.0, 4), ValueError, "hi"),
        (lambda: OccupancyGrid((-1, -1, 1), (1, 1, 0), 4), ValueError, "hi"),
        (lambda: OccupancyGrid((-1, -1), 1.0, 4), ValueError, "lo"),
        (lambda: grid.update(0, _field, decay=1.5), ValueError, "decay"),
        (lambda: grid.update(0, _field, update_every=0), ValueError, "update_every"),
        (lambda: grid.update(-1, _field), ValueError, "iteration"),
        (lambda: grid.update(0, lambda x: -torch.ones(x.shape[0])), ValueError, "value_fn"),
        (lambda: grid.update(0, lambda x: torch.ones(x.shape[0], 3, 3)), ValueError, "value_fn"),
        (lambda: grid.update(0, lambda x: torch.full((x.shape[0],), math.inf)), ValueError, "value_fn"),
        (lambda: grid.update(0, "f"), TypeError, "value_fn"),
        (lambda: sdf_value_fn(_field, grid, margin=0), ValueError, "margin"),
    ]
    for fn, exc, name in cases:
        with pytest.raises(exc) as info:
            fn()
        msg = str(info.value)
        assert msg.startswith(name) and "\n" not in msg, msg


# ---------------------------------------------------------------------------------------------------------
# Vulkan


def vulkan_grid_results() -> dict:
    """march (jittered and not) and ray_intervals on float32 rays through a ball-and-random grid."""
    grid = OccupancyGrid(-1.0, 1.0, 16)
    centres = grid.cell_centers()
    grid.occupied.copy_((centres.norm(dim=-1) < 0.6) | (torch.rand(grid.resolution, generator=_gen(1)) < 0.05))
    o, d, tn, tf = _rays(200, seed=6, dtype=torch.float32)
    out = {}
    for name, gen in (("jittered", _gen(3)), ("fixed", None)):
        s = grid.march(o, d, tn, tf, 0.013, generator=gen)
        out[name] = dict(t=s.t.tolist(), offsets=s.offsets.tolist(), ray_index=s.ray_index.tolist())
    t0, t1, hit = grid.ray_intervals(o, d, tn, tf)
    out["intervals"] = dict(t0=t0.tolist(), t1=t1.tolist(), hit=hit.tolist())
    return out


VULKAN_SCRIPT = r"""
from test_occupancy_grid import vulkan_grid_results
from taichi_dr.implicit.occupancy_grid import OccupancyGrid
out = {"results": vulkan_grid_results()}
try:
    z = torch.zeros(2, 3, dtype=torch.float64)
    OccupancyGrid(-1.0, 1.0, 4).march(z, z + 1, z[:, 0], z[:, 0] + 1, 0.1)
    out["float64"] = "accepted"
except TypeError as e:
    out["float64"] = str(e)
"""


@pytest.mark.vulkan
def test_vulkan_matches_cpu(tmp_path):
    vk = run_on_vulkan(tmp_path, VULKAN_SCRIPT)
    assert vk["float64"].startswith("origins: float64") and "vulkan" in vk["float64"]
    cpu = vulkan_grid_results()
    for name in ("jittered", "fixed"):
        a, b = cpu[name], vk["results"][name]
        assert len(a["t"]) > 500, name
        assert a["offsets"] == b["offsets"] and a["ray_index"] == b["ray_index"], name
        assert np.allclose(a["t"], b["t"], rtol=0, atol=2e-6), name
    a, b = cpu["intervals"], vk["results"]["intervals"]
    assert a["hit"] == b["hit"] and sum(a["hit"]) > 30
    assert np.allclose(a["t0"], b["t0"], rtol=0, atol=2e-6) and np.allclose(a["t1"], b["t1"], rtol=0, atol=2e-6)
