"""Occupancy surface search (UNISURF) and the root-finding kernels, against closed-form ray-surface distances of
analytic occupancy fields (sphere, box, thin shell); CPU against Vulkan."""

import numpy as np
import pytest
import torch
from vulkan_subprocess import run_on_vulkan

from taichi_dr.core.rays import intersect_sphere
from taichi_dr.implicit.analytic import box_sdf, sphere_sdf
from taichi_dr.implicit.occupancy import SurfaceHits, SurfaceSearchSettings, find_surface
from taichi_dr.implicit.root_finding import first_crossing, secant_refine

F64 = torch.float64


def _rays(n, dtype=F64, seed=0, eye=(0.3, 0.4, -2.5), spread=1.6):
    """Rays from one eye through random targets on the z = 0 plane, with their unit-sphere segment."""
    g = torch.Generator().manual_seed(seed)
    o = torch.tensor(eye, dtype=dtype).expand(n, 3).contiguous()
    tgt = (torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * spread
    tgt[:, 2] = 0
    d = tgt - o
    d = (d / d.norm(dim=-1, keepdim=True)).contiguous()
    t_near, t_far, crosses = intersect_sphere(o, d, 1.0)
    t_near = torch.where(crosses, t_near.clamp_min(0), torch.zeros_like(t_near))
    t_far = torch.where(crosses, t_far, torch.zeros_like(t_far))        # misses of the bounding sphere: empty
    return o, d, t_near.contiguous(), t_far.contiguous()


def _sphere_t(o, d, r, c=(0.0, 0.0, 0.0)):
    oc = o - torch.as_tensor(c, dtype=o.dtype)
    b = (oc * d).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - r * r)
    return -b - torch.sqrt(disc.clamp(min=0)), disc > 0


def _box_t(o, d, half):
    half = torch.as_tensor(half, dtype=o.dtype)
    inv = 1.0 / d
    t1, t2 = (-half - o) * inv, (half - o) * inv
    tn = torch.minimum(t1, t2).max(dim=-1).values
    tf = torch.maximum(t1, t2).min(dim=-1).values
    return tn, tn < tf


def _sphere_occupancy(r, c=(0.0, 0.0, 0.0), sharpness=30.0):
    return lambda x: torch.sigmoid(-sharpness * sphere_sdf(x, r, c))


def _robust(o, d, t_ref, hit_ref, sdf, cos_min=0.2, margin=0.03):
    """Rays whose answer is robust: hits not grazing (|n.d| > cos_min), misses that stay > margin away."""
    ok = torch.zeros_like(hit_ref)
    x = (o + t_ref[:, None] * d).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(sdf(x).sum(), x)
    cos = ((g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)) * d).sum(-1).abs()
    ok[hit_ref] = cos[hit_ref] > cos_min
    s = torch.linspace(0, 5, 1000, dtype=o.dtype)
    pts = o[:, None, :] + s[None, :, None] * d[:, None, :]
    far = sdf(pts.reshape(-1, 3)).reshape(-1, 1000).min(dim=1).values > margin
    ok[~hit_ref] = far[~hit_ref]
    return ok


# ---------------------------------------------------------------------------------------------------------
# root finding kernels


def test_first_crossing_matches_a_numpy_scan():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(200, 17, generator=g, dtype=F64) + 0.4
    values[:20] = values[:20].abs() + 0.1                       # no crossing: the minimum is reported
    values[20:30, 0] = -1.0                                       # starts inside
    ts = torch.rand(200, 17, generator=g, dtype=F64).cumsum(dim=1)
    found, t_lo, f_lo, t_hi, f_hi = first_crossing(values, ts)
    v, t = values.numpy(), ts.numpy()
    for k in range(200):
        change = np.nonzero((v[k, :-1] > 0) & (v[k, 1:] <= 0))[0]
        if len(change):
            i = change[0] + 1
            assert found[k] and (t_lo[k], f_lo[k]) == (t[k, i - 1], v[k, i - 1]), k
        else:
            i = int(np.argmin(v[k]))
            assert not found[k], k
            assert (t_lo[k], f_lo[k]) == (t[k, max(i - 1, 0)], v[k, max(i - 1, 0)]), k
        assert (t_hi[k], f_hi[k]) == (t[k, i], v[k, i]), k
    assert found[20:].sum() > 100 and not found[:20].any()
    with pytest.raises(ValueError, match="^values: expected at least one sample"):
        first_crossing(values[:, :0], ts[:, :0])
    with pytest.raises(ValueError, match=r"^ts: expected shape \(200, 17\)"):
        first_crossing(values, ts[:, 1:])


def test_secant_refine_on_a_plane_and_a_sphere():
    o = torch.tensor([[0.0, 0.0, -2.0], [0.1, 0.2, -2.0]], dtype=F64)
    d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=F64)
    lo, hi = torch.tensor([1.0, 1.2], dtype=F64), torch.tensor([3.0, 2.9], dtype=F64)

    def plane(x):                                                 # z = 0.25: exact after one secant step
        return 0.25 - x[:, 2]

    t, evaluations = secant_refine(plane, o, d, lo, plane(o + lo[:, None] * d), hi, plane(o + hi[:, None] * d), 1)
    assert torch.allclose(t, torch.tensor([2.25, 2.25], dtype=F64), rtol=0, atol=1e-14) and evaluations == 2
    sphere = lambda x: sphere_sdf(x, 0.5)                         # noqa: E731
    hi = torch.tensor([2.0, 2.0], dtype=F64)                       # the centre plane: inside the sphere
    f_lo, f_hi = sphere(o + lo[:, None] * d), sphere(o + hi[:, None] * d)
    t, evaluations = secant_refine(sphere, o, d, lo, f_lo, hi, f_hi, 12)
    t_ref, _ = _sphere_t(o, d, 0.5)
    assert torch.allclose(t, t_ref, rtol=0, atol=1e-12) and evaluations == 24
    assert torch.equal(lo, torch.tensor([1.0, 1.2], dtype=F64))    # the caller's brackets are left alone
    assert torch.equal(hi, torch.tensor([2.0, 2.0], dtype=F64))
    t0, evaluations = secant_refine(sphere, o, d, lo, f_lo, hi, f_hi, 0)
    assert torch.equal(t0, hi) and evaluations == 0
    with pytest.raises(ValueError, match="^n_steps"):
        secant_refine(sphere, o, d, lo, f_lo, hi, f_hi, -1)


# ---------------------------------------------------------------------------------------------------------
# find_surface


@pytest.mark.parametrize("shape", ["sphere", "box"])
def test_find_surface_matches_closed_form(shape):
    o, d, t_near, t_far = _rays(500)
    if shape == "sphere":
        centre = (0.1, -0.05, 0.0)

        def sdf(x):
            return sphere_sdf(x, 0.5, centre)
        t_ref, hit_ref = _sphere_t(o, d, 0.5, centre)
    else:
        half = (0.45, 0.3, 0.25)

        def sdf(x):
            return box_sdf(x, half)
        t_ref, hit_ref = _box_t(o, d, half)

    def occupancy(x):
        return torch.sigmoid(-20.0 * sdf(x))

    res = find_surface(occupancy, o, d, t_near, t_far)
    assert isinstance(res, SurfaceHits)
    ok = _robust(o, d, t_ref, hit_ref, sdf)
    assert ok.sum() > 350 and hit_ref[ok].sum() > 100 and (~hit_ref[ok]).sum() > 100
    assert torch.equal(res.hit[ok], hit_ref[ok])
    h = ok & hit_ref
    assert float((res.t[h] - t_ref[h]).abs().max()) < 1e-5
    assert torch.equal(res.t[~res.hit], t_far[~res.hit])                   # misses report t_far
    assert not res.starts_inside.any()
    valid = int((t_far > t_near).sum())
    assert res.evaluations == 256 * valid + 8 * int(res.hit.sum())


def test_secant_steps_refine_the_scan():
    """Fewer steps of the scan, more secant steps: the error falls from the step size to rounding."""
    o, d, t_near, t_far = _rays(300, seed=2)
    t_ref, hit_ref = _sphere_t(o, d, 0.45)
    ok = _robust(o, d, t_ref, hit_ref, lambda x: sphere_sdf(x, 0.45)) & hit_ref
    errors = []
    for n_secant in (0, 2, 8):
        res = find_surface(_sphere_occupancy(0.45), o, d, t_near, t_far,
                           SurfaceSearchSettings(n_steps=64, n_secant=n_secant))
        assert res.hit[ok].all()
        errors.append(float((res.t[ok] - t_ref[ok]).abs().max()))
    step = float((t_far - t_near).max()) / 63
    assert step / 4 < errors[0] <= step                  # no refinement: the first inside sample
    assert errors[1] < errors[0] / 10 and errors[2] < 1e-9


def test_rays_starting_inside_are_excluded():
    o = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -0.3], [0.0, 0.0, -3.0], [0.0, 0.9, -3.0]], dtype=F64)
    d = torch.tensor([[0.0, 0.0, 1.0]] * 4, dtype=F64)
    t_near, t_far, _ = intersect_sphere(o, d, 1.0)
    t_near = t_near.clamp_min(0).contiguous()
    res = find_surface(_sphere_occupancy(0.5), o, d, t_near, t_far)
    # centre and inside the sphere: excluded; from outside: hit at 2.5; the last ray misses (|y| = 0.9)
    assert res.starts_inside.tolist() == [True, True, False, False]
    assert res.hit.tolist() == [False, False, True, False]
    assert res.t[2].item() == pytest.approx(2.5, abs=1e-9)
    assert torch.equal(res.t[[0, 1, 3]], t_far[[0, 1, 3]])
    # a ray starting inside that leaves and re-enters another solid is still excluded (UNISURF)
    two = lambda x: torch.maximum(_sphere_occupancy(0.3)(x), _sphere_occupancy(0.3, (0, 0, 0.7))(x))  # noqa: E731
    res = find_surface(two, o[:1], d[:1], torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64))
    assert res.starts_inside.tolist() == [True] and res.hit.tolist() == [False]


def test_thin_shell_is_found_by_the_scan():
    """A shell 0.02 thick (its level set between radii 0.49 and 0.51) with 256 steps of ~0.008."""
    o, d, t_near, t_far = _rays(300, seed=3, spread=1.0)

    def shell(x):
        return torch.sigmoid(-200.0 * ((x.norm(dim=-1) - 0.5).abs() - 0.01))

    res = find_surface(shell, o, d, t_near, t_far)
    t_ref, hit_ref = _sphere_t(o, d, 0.51)
    cos = (((o + t_ref[:, None] * d) / 0.51) * d).sum(-1).abs()
    h = hit_ref & (cos > 0.3)
    assert h.sum() > 100
    assert res.hit[h].all()
    assert float((res.t[h] - t_ref[h]).abs().max()) < 1e-5
    # with 32 steps (~0.06 apart) the scan steps over the shell on most rays: the scan is what finds it
    coarse = find_surface(shell, o, d, t_near, t_far, SurfaceSearchSettings(n_steps=32))
    assert coarse.hit[h].float().mean() < 0.6


def test_empty_segments_and_generator():
    o, d, t_near, t_far = _rays(200, seed=4)
    t_far = t_far.clone()
    t_far[:50] = t_near[:50]                                  # empty segments: no hit, no evaluation
    calls = []

    def occupancy(x):
        calls.append(x.shape[0])
        return _sphere_occupancy(0.5)(x)

    settings = SurfaceSearchSettings(n_steps=128, n_secant=10, chunk=5000)
    res = find_surface(occupancy, o, d, t_near, t_far, settings)
    valid = t_far > t_near
    assert not res.hit[:50].any() and not res.starts_inside[:50].any()
    assert torch.equal(res.t[:50], t_far[:50])
    assert res.evaluations == sum(calls) == 128 * int(valid.sum()) + 10 * int(res.hit.sum())
    assert max(calls) <= 5000
    g = torch.Generator().manual_seed(5)
    a = find_surface(occupancy, o, d, t_near, t_far, settings, generator=g)
    b = find_surface(occupancy, o, d, t_near, t_far, settings, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.t, b.t) and torch.equal(a.hit, b.hit)
    # the shifted grid finds the same surface
    t_ref, hit_ref = _sphere_t(o, d, 0.5)
    ok = _robust(o, d, t_ref, hit_ref, lambda x: sphere_sdf(x, 0.5)) & valid
    assert torch.equal(a.hit[ok], hit_ref[ok]) and torch.equal(res.hit[ok], hit_ref[ok])
    assert float((a.t[ok & hit_ref] - t_ref[ok & hit_ref]).abs().max()) < 1e-5
    empty = find_surface(occupancy, o[:0], d[:0], t_near[:0], t_far[:0])
    assert empty.hit.shape == (0,) and empty.evaluations == 0


def test_bad_input():
    o, d, t_near, t_far = _rays(4)
    occ = _sphere_occupancy(0.5)
    for kwargs, pattern in [(dict(level=0.0), "level"), (dict(level=1.0), "level"), (dict(level=1.5), "level"),
                            (dict(n_steps=1), "n_steps"), (dict(n_secant=-1), "n_secant"), (dict(chunk=0), "chunk")]:
        with pytest.raises(ValueError, match=f"^SurfaceSearchSettings: {pattern}"):
            SurfaceSearchSettings(**kwargs)
    with pytest.raises(ValueError, match=r"^t_far: expected shape \(4\)"):
        find_surface(occ, o, d, t_near, t_far[:3])
    with pytest.raises(TypeError, match="^t_near: expected dtype torch.float64"):
        find_surface(occ, o, d, t_near.float(), t_far)
    with pytest.raises(ValueError, match="^dirs: ray directions must have unit length"):
        find_surface(occ, o, 2 * d, t_near, t_far)
    with pytest.raises(ValueError, match="^occupancy_fn: expected values shaped"):
        find_surface(lambda x: x.sum(), o, d, t_near, t_far)
    with pytest.raises(ValueError, match="^occupancy_fn: contains NaN"):
        find_surface(lambda x: x[:, 0] * float("nan"), o, d, t_near, t_far)
    bad = t_near.clone()
    bad[1] = float("inf")
    with pytest.raises(ValueError, match="^t_near: contains NaN"):
        find_surface(occ, o, d, bad, t_far)


# ---------------------------------------------------------------------------------------------------------
# Vulkan (float32)


def vulkan_search() -> dict:
    o, d, t_near, t_far = _rays(400, dtype=torch.float32, seed=6)
    out = {}
    for name, occ in (("sphere", _sphere_occupancy(0.5, (0.1, -0.05, 0.0))),
                      ("box", lambda x: torch.sigmoid(-20.0 * box_sdf(x, (0.45, 0.3, 0.25))))):
        res = find_surface(occ, o, d, t_near, t_far, generator=torch.Generator().manual_seed(2))
        out[name] = dict(t=res.t.tolist(), hit=res.hit.tolist(), starts_inside=res.starts_inside.tolist())
    return out


VULKAN_SCRIPT = r"""
from test_occupancy import vulkan_search, _rays, _sphere_occupancy
from taichi_dr.implicit.occupancy import find_surface
out = {"search": vulkan_search()}
try:
    find_surface(_sphere_occupancy(0.5), *_rays(4))
    out["float64"] = "accepted"
except TypeError as e:
    out["float64"] = str(e)
"""


@pytest.mark.vulkan
def test_vulkan_matches_cpu(tmp_path):
    vk = run_on_vulkan(tmp_path, VULKAN_SCRIPT)
    assert vk["float64"].startswith("origins: float64") and "vulkan" in vk["float64"]
    cpu = vulkan_search()
    o, d = (x.double() for x in _rays(400, dtype=torch.float32, seed=6)[:2])
    for name, (t_ref, hit_ref), sdf in (
            ("sphere", _sphere_t(o, d, 0.5, (0.1, -0.05, 0.0)), lambda x: sphere_sdf(x, 0.5, (0.1, -0.05, 0.0))),
            ("box", _box_t(o, d, (0.45, 0.3, 0.25)), lambda x: box_sdf(x, (0.45, 0.3, 0.25)))):
        a, b = cpu[name], vk["search"][name]
        ok = _robust(o, d, t_ref, hit_ref, sdf)
        assert ok.sum() > 250 and hit_ref[ok].sum() > 80, name
        hit_cpu, hit_vk = torch.tensor(a["hit"]), torch.tensor(b["hit"])
        assert torch.equal(hit_cpu[ok], hit_vk[ok]) and torch.equal(hit_cpu[ok], hit_ref[ok]), name
        h = ok & hit_ref
        t_cpu, t_vk = torch.tensor(a["t"], dtype=F64), torch.tensor(b["t"], dtype=F64)
        assert float((t_cpu[h] - t_vk[h]).abs().max()) < 2e-5, name
        assert float((t_vk[h] - t_ref[h]).abs().max()) < 1e-4, name
