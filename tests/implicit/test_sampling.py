"""Packed ray samplers (Taichi kernels) against closed forms and NumPy references: stratified and segment
samples, UNISURF's interval schedule and samples, NeRF's inverse-CDF importance sampling and the merge;
CPU against Vulkan."""

import math

import numpy as np
import pytest
import torch
from vulkan_subprocess import run_on_vulkan

from taichi_dr.implicit.samples import RaySamples, offsets_from_counts
from taichi_dr.implicit.sampling import (
    IntervalSettings,
    importance_samples,
    interval_width,
    merge_samples,
    segment_samples,
    stratified_samples,
    unisurf_samples,
)

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _per_ray(s: RaySamples, x):
    off = s.offsets.tolist()
    return [x[off[r]:off[r + 1]] for r in range(s.n_rays)]


def _check_packing(s: RaySamples, t_far, counts=None):
    """Offsets, ray indices and deltas are consistent; t increases per ray; delta = next gap / to t_far."""
    assert s.offsets.dtype == torch.int32 and s.ray_index.dtype == torch.int32
    assert int(s.offsets[0]) == 0 and int(s.offsets[-1]) == s.n_samples
    if counts is not None:
        assert s.counts.tolist() == list(counts)
    expected_index = torch.repeat_interleave(torch.arange(s.n_rays), s.counts.long())
    assert torch.equal(s.ray_index.long(), expected_index)
    for r, (t, delta) in enumerate(zip(_per_ray(s, s.t), _per_ray(s, s.delta), strict=True)):
        if t.numel() == 0:
            continue
        assert (t[1:] >= t[:-1]).all(), r
        gaps = torch.cat([t[1:] - t[:-1], (t_far[r] - t[-1]).reshape(1)])
        assert torch.equal(delta, gaps), r


# ---------------------------------------------------------------------------------------------------------
# stratified samples


def test_stratified_without_generator_is_linspace():
    t_near = torch.tensor([0.0, 1.0, 2.0, 3.0, -0.5, 4.0, 0.25], dtype=F64)
    t_far = torch.tensor([1.0, 3.0, 2.0, 5.0, 0.7, 3.0, 0.75], dtype=F64)
    counts = torch.tensor([4, 1, 3, 7, 0, 5, 2])
    s = stratified_samples(t_near, t_far, counts)
    # t_far <= t_near (rays 2 and 5) or count 0 (ray 4): no samples
    want = [4, 1, 0, 7, 0, 0, 2]
    _check_packing(s, t_far, want)
    for r, t in enumerate(_per_ray(s, s.t)):
        if want[r] == 1:
            ref = ((t_near[r] + t_far[r]) / 2).reshape(1)
        else:
            ref = torch.linspace(float(t_near[r]), float(t_far[r]), want[r], dtype=F64)
        assert torch.allclose(t, ref, rtol=0, atol=1e-15), r
        if want[r] > 1:
            assert t[0] == t_near[r] and t[-1] == t_far[r]       # the ends exactly, never outside
    assert s.delta[s.offsets[1] - 1] == 0.0                          # the last linspace point is t_far


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stratified_jitter_stays_in_strata(dtype):
    g = _gen(3)
    n_rays = 300
    t_near = torch.rand(n_rays, generator=g, dtype=F64) * 3 - 1
    t_far = t_near + torch.rand(n_rays, generator=g, dtype=F64) * 4
    t_far[:20] = t_near[:20] - 0.1                                   # empty segments
    counts = torch.randint(0, 40, (n_rays,), generator=g)
    t_near, t_far = t_near.to(dtype), t_far.to(dtype)
    s = stratified_samples(t_near, t_far, counts, generator=_gen(7))
    want = torch.where(t_far > t_near, counts, 0)
    assert s.t.dtype == dtype and s.n_samples == int(want.sum())
    _check_packing(s, t_far, want.tolist())
    fractions = []
    for r, t in enumerate(_per_ray(s, s.t.double())):
        n = int(want[r])
        if n == 0:
            continue
        a, b = float(t_near[r]), float(t_far[r])
        assert (t >= a).all() and (t <= b).all(), r
        if n == 1:
            lo, hi = torch.tensor([a], dtype=F64), torch.tensor([b], dtype=F64)
        else:
            grid = torch.linspace(a, b, n, dtype=F64)
            mids = (grid[1:] + grid[:-1]) / 2
            lo = torch.cat([torch.tensor([a], dtype=F64), mids])
            hi = torch.cat([mids, torch.tensor([b], dtype=F64)])
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert (t >= lo - tol).all() and (t <= hi + tol).all(), r
        fractions.append((t - lo) / (hi - lo))
    fractions = torch.cat(fractions)
    # uniform within the strata: mean 1/2, variance 1/12
    assert abs(float(fractions.mean()) - 0.5) < 0.02 and abs(float(fractions.var()) - 1 / 12) < 0.01
    assert (s.t[1:] > s.t[:-1])[s.ray_index[1:] == s.ray_index[:-1]].all()      # strictly increasing


def test_same_seed_same_samples_and_different_seed_different():
    t_near = torch.zeros(50, dtype=F64)
    t_far = torch.linspace(0.5, 3.0, 50, dtype=F64)
    counts = torch.full((50,), 16)
    a = stratified_samples(t_near, t_far, counts, generator=_gen(11))
    b = stratified_samples(t_near, t_far, counts, generator=_gen(11))
    c = stratified_samples(t_near, t_far, counts, generator=_gen(12))
    assert torch.equal(a.t, b.t) and torch.equal(a.delta, b.delta)
    assert not torch.equal(a.t, c.t) and torch.equal(a.offsets, c.offsets)


def test_segment_samples_stay_in_their_segments():
    g = _gen(5)
    n_rays, k = 100, 3
    # increasing bounds per ray: [b0, b1], [b2, b3], [b4, b5] with gaps; some segments empty
    bounds = torch.rand(n_rays, 2 * k + 1, generator=g, dtype=F64).cumsum(dim=1)
    t_lo, t_hi, t_far = bounds[:, 0:2 * k:2], bounds[:, 1:2 * k:2], bounds[:, -1]
    t_hi[::7, 1] = t_lo[::7, 1]                                       # an empty middle segment
    counts = torch.randint(0, 9, (n_rays, k), generator=g)
    for generator in (None, _gen(1)):
        s = segment_samples(t_lo.contiguous(), t_hi.contiguous(), counts, t_far, generator=generator)
        per_segment = torch.where(t_hi > t_lo, counts, 0)
        _check_packing(s, t_far, per_segment.sum(dim=1).tolist())
        for r, t in enumerate(_per_ray(s, s.t)):
            start = 0
            for j in range(k):
                n = int(per_segment[r, j])
                part = t[start:start + n]
                assert (part >= t_lo[r, j]).all() and (part <= t_hi[r, j]).all(), (r, j)
                start += n


def test_segment_samples_reject_bad_input():
    t_lo = torch.tensor([[0.0, 0.5]], dtype=F64)
    t_hi = torch.tensor([[1.0, 2.0]], dtype=F64)                      # segment 1 starts inside segment 0
    counts = torch.tensor([[2, 2]])
    with pytest.raises(ValueError, match="^t_lo: segment k"):
        segment_samples(t_lo, t_hi, counts, torch.tensor([2.0], dtype=F64))
    with pytest.raises(ValueError, match="^t_far: expected t_far >= t_hi"):
        segment_samples(torch.tensor([[0.0, 1.0]], dtype=F64), t_hi, counts, torch.tensor([1.5], dtype=F64))
    # an overlap among segments without samples is fine
    s = segment_samples(t_lo, t_hi, torch.tensor([[2, 0]]), torch.tensor([2.0], dtype=F64))
    assert s.n_samples == 2


def test_stratified_rejects_bad_input():
    t = torch.zeros(3, dtype=F64)
    with pytest.raises(ValueError, match="^counts: expected non-negative"):
        stratified_samples(t, t + 1, torch.tensor([1, -2, 3]))
    with pytest.raises(TypeError, match="^counts: expected an integer dtype"):
        stratified_samples(t, t + 1, torch.ones(3))
    with pytest.raises(ValueError, match=r"^t_far: expected shape \(3\)"):
        stratified_samples(t, torch.ones(4, dtype=F64), torch.ones(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="^t_far: expected dtype torch.float64"):
        stratified_samples(t, (t + 1).float(), torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="^t_near: expected shape"):
        stratified_samples(t[:, None], t + 1, torch.ones(3, dtype=torch.int32))
    bad = t.clone()
    bad[1] = float("nan")
    with pytest.raises(ValueError, match="^t_near: contains NaN"):
        stratified_samples(bad, t + 1, torch.ones(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="^generator"):
        stratified_samples(t, t + 1, torch.ones(3, dtype=torch.int32), generator=0)
    empty = stratified_samples(t[:0], t[:0], torch.zeros(0, dtype=torch.int32))
    assert empty.n_rays == 0 and empty.n_samples == 0


# ---------------------------------------------------------------------------------------------------------
# UNISURF


def test_interval_schedule_closed_form():
    s = IntervalSettings()
    assert (s.n_interval, s.n_free, s.free_after, s.start, s.end, s.decay) == (64, 32, 5000, 2.0, 0.1, 1.5e-5)
    assert interval_width(0) == 2.0
    assert interval_width(100_000) == pytest.approx(2.0 * math.exp(-1.5), rel=1e-12)   # 0.4463
    assert interval_width(500_000) == 0.1                        # 2 exp(-7.5) = 0.0011 < 0.1: the floor
    # the floor is reached at k = ln(start / end) / decay
    k_floor = math.log(20.0) / 1.5e-5
    assert interval_width(int(k_floor) - 1000) > 0.1 and interval_width(int(k_floor) + 1) == 0.1
    custom = IntervalSettings(start=1.0, end=0.05, decay=1e-4)
    assert interval_width(10_000, custom) == pytest.approx(math.exp(-1.0), rel=1e-12)


def test_interval_settings_are_validated():
    for kwargs, pattern in [(dict(n_interval=0), "n_interval"), (dict(n_free=-1), "n_free"),
                            (dict(free_after=-5), "free_after"), (dict(end=0.0), "end"),
                            (dict(start=0.05), "start"), (dict(decay=-1.0), "decay"),
                            (dict(start=float("nan")), "start")]:
        with pytest.raises(ValueError, match=f"^IntervalSettings: {pattern}"):
            IntervalSettings(**kwargs)
    with pytest.raises(TypeError, match="^IntervalSettings: n_interval must be an int"):
        IntervalSettings(n_interval=2.5)
    with pytest.raises(ValueError, match="^iteration: expected a non-negative integer"):
        interval_width(-1)


def _unisurf_rays():
    t_near = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 2.0, 0.0], dtype=F64)
    t_far = torch.tensor([2.5, 2.5, 2.5, 2.5, 3.0, 2.0, 4.0], dtype=F64)
    t_s = torch.tensor([1.5, 0.6, 2.45, 0.0, 9.9, 1.0, 3.0], dtype=F64)
    hit = torch.tensor([True, True, True, False, False, True, True])
    return t_near, t_far, t_s, hit


@pytest.mark.parametrize("iteration", [0, 4999, 5000, 100_000])
def test_unisurf_samples_counts_and_segments(iteration):
    settings = IntervalSettings(n_interval=16, n_free=8)
    t_near, t_far, t_s, hit = _unisurf_rays()
    dk = interval_width(iteration, settings)
    free = 8 if iteration >= 5000 else 0
    for generator in (None, _gen(2)):
        s = unisurf_samples(t_near, t_far, t_s, hit, iteration, settings, generator=generator)
        want = []
        for r in range(7):
            if t_far[r] <= t_near[r]:
                want.append(0)
            elif hit[r]:
                want.append(16 + (free if t_s[r] - dk > t_near[r] else 0))
            else:
                want.append(16 + free)
        _check_packing(s, t_far, want)
        for r, t in enumerate(_per_ray(s, s.t)):
            if want[r] == 0:
                continue
            assert (t >= t_near[r]).all() and (t <= t_far[r]).all(), r
            if hit[r]:
                interval = t[want[r] - 16:]
                lo, hi = max(float(t_s[r]) - dk, float(t_near[r])), min(float(t_s[r]) + dk, float(t_far[r]))
                assert (interval >= lo).all() and (interval <= hi).all(), r
                assert float(interval.max() - interval.min()) > 0.8 * (hi - lo), r        # spread over it
                front = t[:want[r] - 16]
                assert (front <= float(t_s[r]) - dk).all(), r
    if iteration >= 100_000:          # Δk = 0.446: ray 0 has room in front, ray 1 (t_s 0.6) not
        assert s.counts[:3].tolist() == [24, 16, 24]


def test_unisurf_samples_without_generator_are_linspace():
    settings = IntervalSettings(n_interval=5, n_free=3, start=0.2, end=0.2)
    t_near, t_far = torch.tensor([0.0, 0.0], dtype=F64), torch.tensor([2.0, 2.0], dtype=F64)
    s = unisurf_samples(t_near, t_far, torch.tensor([1.0, 7.0], dtype=F64), torch.tensor([True, False]), 6000,
                        settings)
    ref0 = torch.cat([torch.linspace(0.0, 0.8, 3, dtype=F64), torch.linspace(0.8, 1.2, 5, dtype=F64)])
    ref1 = torch.linspace(0.0, 2.0, 8, dtype=F64)
    assert torch.allclose(s.t, torch.cat([ref0, ref1]), rtol=0, atol=1e-15)


def test_unisurf_samples_reject_bad_input():
    t_near, t_far, t_s, hit = _unisurf_rays()
    with pytest.raises(TypeError, match="^hit: expected dtype torch.bool"):
        unisurf_samples(t_near, t_far, t_s, hit.int(), 0)
    with pytest.raises(ValueError, match="^iteration"):
        unisurf_samples(t_near, t_far, t_s, hit, -3)
    bad = t_s.clone()
    bad[3] = float("nan")                                             # a miss: its t_surface is ignored
    assert unisurf_samples(t_near, t_far, bad, hit, 0).n_samples > 0
    bad[0] = float("inf")
    with pytest.raises(ValueError, match="^t_surface: contains NaN"):
        unisurf_samples(t_near, t_far, bad, hit, 0)


# ---------------------------------------------------------------------------------------------------------
# NeRF importance sampling and merge


def _coarse(n_rays=6, n=8, seed=0, dtype=F64):
    g = _gen(seed)
    t_near = torch.rand(n_rays, generator=g, dtype=F64)
    t_far = t_near + 1 + torch.rand(n_rays, generator=g, dtype=F64)
    counts = torch.full((n_rays,), n)
    counts[1] = 0                                                        # a ray without coarse samples
    s = stratified_samples(t_near.to(dtype), t_far.to(dtype), counts, generator=g)
    return s, t_far.to(dtype)


def _bin_edges(t, delta):
    """NeRF's bins around the samples: from t_0, through the midpoints, to halfway from the last to t_far."""
    t, delta = np.asarray(t, dtype=np.float64), np.asarray(delta, dtype=np.float64)
    return np.concatenate([t[:1], t + 0.5 * delta])


def _inverse_cdf_reference(t, delta, w, u):
    """NumPy: the piecewise-linear CDF of the padded weights over the bins of _bin_edges, inverted."""
    mass = np.asarray(w, dtype=np.float64) + 1e-5
    edges = np.concatenate([[0.0], np.cumsum(mass)])
    pos = np.asarray(u) * edges[-1]
    b = np.clip(np.searchsorted(edges, pos, side="left") - 1, 0, len(mass) - 1)
    frac = np.clip((pos - edges[b]) / mass[b], 0, 1)
    bins = _bin_edges(t, delta)
    return bins[b] + frac * (bins[b + 1] - bins[b])


def test_importance_samples_match_numpy_inverse_cdf():
    coarse, t_far = _coarse()
    weights = torch.rand(coarse.n_samples, generator=_gen(4), dtype=F64) ** 3
    n = 33
    fine = importance_samples(coarse, weights, n, t_far)
    want = [0 if c == 0 else n for c in coarse.counts.tolist()]
    _check_packing(fine, t_far, want)
    u = (np.arange(n) + 0.5) / n
    for r, (tc, dc, w, tf) in enumerate(zip(_per_ray(coarse, coarse.t), _per_ray(coarse, coarse.delta),
                                            _per_ray(coarse, weights), _per_ray(fine, fine.t), strict=True)):
        if tc.numel() == 0:
            assert tf.numel() == 0
            continue
        ref = _inverse_cdf_reference(tc.numpy(), dc.numpy(), w.numpy(), u)
        assert np.allclose(tf.numpy(), ref, rtol=0, atol=1e-12), r
        assert (tf >= tc[0]).all() and (tf <= t_far[r]).all()


def test_importance_samples_concentrate_in_the_heavy_bin():
    coarse, t_far = _coarse(n=16)
    weights = torch.zeros(coarse.n_samples, dtype=F64)
    heavy = coarse.offsets[:-1].long() + 5
    heavy = heavy[coarse.counts > 0]
    weights[heavy] = 1.0
    fine = importance_samples(coarse, weights, 64, t_far, generator=_gen(9))
    lo = (coarse.t[heavy] - 0.5 * coarse.delta[heavy - 1]).repeat_interleave(64)
    hi = (coarse.t[heavy] + 0.5 * coarse.delta[heavy]).repeat_interleave(64)
    inside = (fine.t >= lo) & (fine.t <= hi)
    # outside mass 15e-5 / (1 + 16e-5) per ray: expect ~0.05 of 320 samples outside
    assert int((~inside).sum()) <= 2
    # no weight at all: every bin gets the same mass (the 1e-5 padding), so the deterministic quantiles put
    # 64 / 16 = 4 samples in each bin, whatever its width
    flat = importance_samples(coarse, torch.zeros_like(weights), 64, t_far)
    for r, (tc, tf) in enumerate(zip(_per_ray(coarse, coarse.t), _per_ray(flat, flat.t), strict=True)):
        if tc.numel():
            edges = torch.from_numpy(_bin_edges(tc.numpy(), _per_ray(coarse, coarse.delta)[r].numpy()))
            bins = torch.bucketize(tf, edges[:-1], right=True) - 1
            assert torch.bincount(bins, minlength=16).tolist() == [4] * 16, r


def test_importance_histogram_follows_the_pdf():
    """Many samples on one ray: the bin counts follow the piecewise-constant pdf (chi-square, 15 dof)."""
    t = torch.tensor([0.0, 0.1, 0.15, 0.4, 0.5, 0.9, 1.0, 1.3, 1.35, 1.6, 1.8, 2.0, 2.1, 2.5, 2.6, 2.9], dtype=F64)
    t_far = torch.tensor([3.0], dtype=F64)
    delta = torch.cat([t[1:] - t[:-1], t_far - t[-1:]])
    weights = torch.tensor([0.0, 0.3, 0.05, 0.0, 0.2, 0.01, 0.1, 0.0, 0.4, 0.02, 0.0, 0.15, 0.3, 0.0, 0.05, 0.1],
                           dtype=F64)
    coarse = RaySamples(t=t, delta=delta, ray_index=torch.zeros(16, dtype=torch.int32),
                        offsets=offsets_from_counts(torch.tensor([16])))
    n = 40_000
    fine = importance_samples(coarse, weights, n, t_far, generator=_gen(21))
    _check_packing(fine, t_far, [n])
    edges = torch.from_numpy(_bin_edges(t.numpy(), delta.numpy()))
    observed = torch.bincount(torch.bucketize(fine.t, edges[:-1], right=True) - 1, minlength=16).double()
    p = (weights + 1e-5) / (weights + 1e-5).sum()
    expected = n * p
    chi2 = float((((observed - expected) ** 2) / expected)[p > 1e-3].sum())
    assert chi2 < 37.7                                # chi-square, 15 dof, p = 0.001
    assert int(observed[p < 1e-3].sum()) <= 10         # the empty bins: 5 x 2.5e-5 x 40000 = 5 expected
    # within a bin the samples are uniform: bin 8 (the heaviest, [1.325, 1.475] between the midpoints)
    in_bin = fine.t[(fine.t >= 1.325) & (fine.t < 1.475)]
    assert abs(float(((in_bin - 1.325) / 0.15).mean()) - 0.5) < 0.02


def test_importance_same_seed_and_bad_input():
    coarse, t_far = _coarse()
    weights = torch.rand(coarse.n_samples, generator=_gen(1), dtype=F64)
    a = importance_samples(coarse, weights, 10, t_far, generator=_gen(3))
    b = importance_samples(coarse, weights, 10, t_far, generator=_gen(3))
    c = importance_samples(coarse, weights, 10, t_far, generator=_gen(4))
    assert torch.equal(a.t, b.t) and not torch.equal(a.t, c.t)
    with pytest.raises(ValueError, match="^weights: expected non-negative"):
        importance_samples(coarse, -weights, 10, t_far)
    with pytest.raises(ValueError, match="^n: expected a non-negative integer"):
        importance_samples(coarse, weights, -1, t_far)
    with pytest.raises(ValueError, match=r"^weights: expected shape"):
        importance_samples(coarse, weights[1:], 10, t_far)
    with pytest.raises(ValueError, match="^t_far: expected t_far >= the last coarse sample"):
        importance_samples(coarse, weights, 10, t_far - 1.5)
    assert importance_samples(coarse, weights, 0, t_far).n_samples == 0


def test_merge_is_the_sorted_union():
    coarse, t_far = _coarse(n_rays=9, n=12, seed=2)
    weights = torch.rand(coarse.n_samples, generator=_gen(8), dtype=F64)
    fine = importance_samples(coarse, weights, 20, t_far, generator=_gen(5))
    # b with other per-ray counts (including rays that have samples only in b)
    extra = stratified_samples(t_far - 0.3, t_far, torch.tensor([0, 3, 1, 0, 2, 5, 0, 1, 4]), generator=_gen(6))
    for a, b in ((coarse, fine), (fine, coarse), (coarse, extra), (extra, fine)):
        m = merge_samples(a, b, t_far)
        _check_packing(m, t_far, (a.counts + b.counts).tolist())
        for r, (t, ta, tb) in enumerate(zip(_per_ray(m, m.t), _per_ray(a, a.t), _per_ray(b, b.t), strict=True)):
            assert torch.equal(t, torch.sort(torch.cat([ta, tb])).values), r
    empty = stratified_samples(t_far, t_far, torch.zeros(9, dtype=torch.int32))
    m = merge_samples(empty, extra, t_far)
    assert torch.equal(m.t, extra.t) and torch.equal(m.delta, extra.delta)
    with pytest.raises(ValueError, match="^b: expected samples of the same 9 rays"):
        merge_samples(coarse, stratified_samples(t_far[:3], t_far[:3] + 1, torch.ones(3, dtype=torch.int32)),
                      t_far)


# ---------------------------------------------------------------------------------------------------------
# Vulkan (float32)


def vulkan_sampling_results() -> dict:
    """Every sampler's kernels on float32 rays (jittered and not): t, delta, offsets."""
    coarse, t_far = _coarse(n_rays=40, n=24, seed=3, dtype=torch.float32)
    weights = torch.rand(coarse.n_samples, generator=_gen(2), dtype=torch.float32)
    fine = importance_samples(coarse, weights, 32, t_far, generator=_gen(4))
    fine_det = importance_samples(coarse, weights, 16, t_far)
    t_near, t_far_u, t_s, hit = (x.float() if x.is_floating_point() else x for x in _unisurf_rays())
    results = {
        "stratified": stratified_samples(t_far - 1.2, t_far, torch.arange(40) % 7, generator=_gen(6)),
        "stratified_det": stratified_samples(t_far - 1.2, t_far, torch.arange(40) % 7),
        "unisurf": unisurf_samples(t_near, t_far_u, t_s, hit, 6000, generator=_gen(1)),
        "fine": fine, "fine_det": fine_det, "merged": merge_samples(coarse, fine, t_far),
    }
    return {k: dict(t=s.t.tolist(), delta=s.delta.tolist(), offsets=s.offsets.tolist(),
                    ray_index=s.ray_index.tolist()) for k, s in results.items()}


VULKAN_SCRIPT = r"""
from test_sampling import vulkan_sampling_results
from taichi_dr.implicit.sampling import stratified_samples
out = {"results": vulkan_sampling_results()}
try:
    stratified_samples(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.ones(3).int())
    out["float64"] = "accepted"
except TypeError as e:
    out["float64"] = str(e)
"""


@pytest.mark.vulkan
def test_vulkan_matches_cpu(tmp_path):
    vk = run_on_vulkan(tmp_path, VULKAN_SCRIPT)
    assert vk["float64"].startswith("t_near: float64") and "vulkan" in vk["float64"] and "float32" in vk["float64"]
    cpu = vulkan_sampling_results()
    for name, a in cpu.items():
        b = vk["results"][name]
        assert a["offsets"] == b["offsets"] and a["ray_index"] == b["ray_index"], name
        assert len(a["t"]) > 50, name
        # Stratified samples agree to an ulp or two. The inverse CDF accumulates ~24 masses in float32, and
        # the two backends round (and fuse multiply-adds) differently: an error of ~24 eps x total mass in the
        # target quantile, divided by the bin's mass (~0.5) and scaled by its width (~0.05), is ~1e-5 in t.
        tol = 2e-5 if name in ("fine", "fine_det", "merged") else 3e-7
        assert np.allclose(a["t"], b["t"], rtol=0, atol=tol), name
        assert np.allclose(a["delta"], b["delta"], rtol=0, atol=2 * tol), name
