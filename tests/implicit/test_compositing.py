"""Volume compositing (taichi_dr.implicit.compositing) against an independent padded PyTorch reference (cumprod),
closed forms, gradcheck in float64, extreme inputs, the Vulkan backend and bad input."""

import math

import pytest
import torch
from vulkan_subprocess import run_on_vulkan

from taichi_dr.implicit.compositing import Composite, composite, composite_background
from taichi_dr.implicit.samples import RaySamples, offsets_from_counts

OUTPUTS = ("colour", "opacity", "depth", "weights")


def make_samples(counts, dtype=torch.float64, seed=0, t_near=2.0):
    """Packed samples for per-ray ``counts``: increasing t from ``t_near``, delta to the next sample and, for a
    ray's last one, to t_far = its last t plus a random gap."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.as_tensor(counts, dtype=torch.int32)
    offsets = offsets_from_counts(counts)
    ray_index = torch.repeat_interleave(torch.arange(counts.shape[0], dtype=torch.int32), counts.long())
    t, delta = [], []
    for n in counts.tolist():
        gaps = 0.01 + 0.2 * torch.rand(n + 1, generator=g, dtype=torch.float64)   # gaps[n]: last sample to t_far
        ts = t_near + torch.cumsum(gaps[:n], 0)
        t.append(ts)
        delta.append(gaps[1:])
    t = torch.cat(t).to(dtype) if t else torch.zeros(0, dtype=dtype)
    delta = torch.cat(delta).to(dtype) if delta else torch.zeros(0, dtype=dtype)
    return RaySamples(t=t, delta=delta, ray_index=ray_index, offsets=offsets)


def random_counts(n_rays, max_count, seed):
    """Counts in [0, max_count] with a ray of 0 and a ray of 1 sample among them."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_count + 1, (n_rays,), generator=g)
    counts[0], counts[n_rays // 2] = 0, 1
    return counts


def random_inputs(samples, n_channels, *, low, high, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = samples.n_samples
    values = (low + (high - low) * torch.rand(s, generator=g, dtype=torch.float64)).to(dtype)
    colours = torch.rand(s, n_channels, generator=g, dtype=torch.float64).to(dtype)
    return values, colours


def composite_reference(values, colours, samples, mode):
    """The usual dense formulation: scatter the packed samples into padded (R, N) tensors (padding alpha 0),
    exclusive transmittance by torch.cumprod, weighted sums along N. Differentiable by autograd."""
    counts = samples.counts.long()
    n_rays = counts.shape[0]
    n_max = max(int(counts.max()) if n_rays else 0, 1)
    ray = samples.ray_index.long()
    pos = torch.arange(samples.n_samples) - samples.offsets[:-1].long()[ray]

    def pad(x):
        return x.new_zeros((n_rays, n_max) + tuple(x.shape[1:])).index_put((ray, pos), x)

    if mode == "alpha":
        alpha = values.clamp(0.0, 1.0)
    else:
        alpha = -torch.expm1(-values.clamp(min=0.0) * samples.delta.to(values.dtype).clamp(min=0.0))
    a = pad(alpha)
    trans = torch.cumprod(torch.cat([torch.ones_like(a[:, :1]), 1.0 - a[:, :-1]], 1), 1)
    w = a * trans
    colour = (w[..., None] * pad(colours)).sum(1)
    return Composite(colour=colour, opacity=w.sum(1), depth=(w * pad(samples.t.to(values.dtype))).sum(1),
                     weights=w[ray, pos])


def loss_of(result, upstream):
    """A scalar using all four outputs, weighted by ``upstream`` (random tensors shaped like them)."""
    return sum((getattr(result, name) * upstream[name]).sum() for name in OUTPUTS)


def random_upstream(n_rays, n_samples, n_channels, dtype=torch.float64, seed=5):
    g = torch.Generator().manual_seed(seed)
    shapes = {"colour": (n_rays, n_channels), "opacity": (n_rays,), "depth": (n_rays,), "weights": (n_samples,)}
    return {k: torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for k, shape in shapes.items()}


RANGES = {"alpha": (-0.3, 1.3), "density": (-1.0, 8.0)}   # both include the clamped regions


@pytest.mark.parametrize("mode", ["alpha", "density"])
@pytest.mark.parametrize("n_channels", [3, 11])   # 11: the run-time channel loop
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_matches_reference(mode, n_channels, dtype):
    samples = make_samples(random_counts(40, 17, seed=2), dtype)
    values, colours = random_inputs(samples, n_channels, low=RANGES[mode][0], high=RANGES[mode][1],
                                    dtype=dtype)
    ours = composite(values, colours, samples, mode=mode)
    ref = composite_reference(values.double(), colours.double(), make_samples(samples.counts, torch.float64),
                              mode)
    counts = samples.counts
    assert ours.colour.shape == (40, n_channels) and ours.weights.shape == (samples.n_samples,)
    assert all(getattr(ours, name).dtype == dtype for name in OUTPUTS)
    assert ref.opacity.max() > 0.9 and ref.opacity[counts > 0].min() < 0.5   # the scene is not trivial
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    for name in OUTPUTS:
        torch.testing.assert_close(getattr(ours, name).double(), getattr(ref, name), **tol, msg=name)
    assert torch.all(ours.opacity[counts == 0] == 0) and torch.all(ours.colour[counts == 0] == 0)
    one = torch.nonzero(counts == 1).flatten()
    first = samples.offsets[one].long()
    a = values[first].clamp(0, 1) if mode == "alpha" else -torch.expm1(-values[first].clamp(min=0)
                                                                           * samples.delta[first])
    torch.testing.assert_close(ours.weights[first], a, **tol)
    again = composite(values, colours, samples, mode=mode)   # same input, same bits
    assert all(torch.equal(getattr(ours, name), getattr(again, name)) for name in OUTPUTS)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_closed_forms(dtype):
    """Constant alpha a over n samples: opacity 1 - (1 - a)^n, w_i = a (1 - a)^i; constant density over a
    segment of length L: opacity 1 - exp(-sigma L) however it is cut, depth of a step of constant colour."""
    n, a = 7, 0.3
    samples = make_samples([n], dtype)
    out = composite(torch.full((n,), a, dtype=dtype), torch.ones(n, 2, dtype=dtype), samples)
    tol = dict(atol=1e-12, rtol=0) if dtype == torch.float64 else dict(atol=1e-6, rtol=0)
    torch.testing.assert_close(out.opacity, torch.tensor([1 - (1 - a) ** n], dtype=dtype), **tol)
    torch.testing.assert_close(out.weights, a * (1 - a) ** torch.arange(n, dtype=dtype), **tol)
    torch.testing.assert_close(out.colour, out.opacity[:, None].expand(1, 2), **tol)
    sigma, length = 1.7, 1.3
    for cuts in (1, 5, 64):
        delta = torch.full((cuts,), length / cuts, dtype=dtype)
        t = torch.arange(cuts, dtype=dtype) * (length / cuts)
        s = RaySamples(t, delta, torch.zeros(cuts, dtype=torch.int32), torch.tensor([0, cuts], dtype=torch.int32))
        out = composite(torch.full((cuts,), sigma, dtype=dtype), torch.ones(cuts, 1, dtype=dtype), s,
                        mode="density")
        torch.testing.assert_close(out.opacity, torch.tensor([1 - math.exp(-sigma * length)], dtype=dtype), **tol)


def test_density_alpha_keeps_precision_for_thin_samples():
    """float32 alpha of sigma * delta down to 1e-9 within a few ulps of -expm1 (1 - exp(-x) would lose it all),
    and its derivative exp(-x) to relative precision where 1 - alpha has none left (x = 20)."""
    x = torch.tensor([1e-9, 1e-7, 3e-6, 1e-4, 2e-3, 0.05, 0.24, 0.26, 0.7, 1.0, 1.5, 20.0], dtype=torch.float32)
    n = x.shape[0]
    offsets = torch.arange(n + 1, dtype=torch.int32)   # one sample per ray: weight = alpha
    samples = RaySamples(torch.zeros(n), torch.ones(n), offsets[:-1], offsets)
    sigma = x.clone().requires_grad_()
    out = composite(sigma, torch.ones(n, 1), samples, mode="density")
    ref = -torch.expm1(-x.double())
    assert ((out.weights.double() - ref) / ref).abs().max() < 4e-7
    out.weights.sum().backward()
    assert ((sigma.grad.double() - torch.exp(-x.double())) / torch.exp(-x.double())).abs().max() < 4e-7


@pytest.mark.parametrize("mode", ["alpha", "density"])
def test_gradcheck_float64(mode):
    """Central differences, all four outputs, values away from the clamps' kinks."""
    samples = make_samples([0, 1, 3, 5, 2], torch.float64, seed=3)
    low, high = (0.05, 0.95) if mode == "alpha" else (0.2, 3.0)
    values, colours = random_inputs(samples, 2, low=low, high=high, seed=4)

    def fn(v, c):
        out = composite(v, c, samples, mode=mode)
        return out.colour, out.opacity, out.depth, out.weights

    assert torch.autograd.gradcheck(fn, (values.requires_grad_(), colours.requires_grad_()), eps=1e-6, atol=1e-8,
                                    rtol=1e-6)


@pytest.mark.parametrize("mode", ["alpha", "density"])
@pytest.mark.parametrize("n_channels", [4, 11])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_matches_reference_autograd(mode, n_channels, dtype):
    samples = make_samples(random_counts(64, 40, seed=6), dtype, seed=7)
    values, colours = random_inputs(samples, n_channels, low=RANGES[mode][0], high=RANGES[mode][1],
                                    dtype=dtype, seed=8)
    upstream = random_upstream(64, samples.n_samples, n_channels, dtype)
    v, c = values.clone().requires_grad_(), colours.clone().requires_grad_()
    loss_of(composite(v, c, samples, mode=mode), upstream).backward()
    rv, rc = values.double().requires_grad_(), colours.double().requires_grad_()
    up64 = {k: u.double() for k, u in upstream.items()}
    loss_of(composite_reference(rv, rc, make_samples(samples.counts, torch.float64, seed=7), mode), up64).backward()
    clamped = (values < 0) | (values > 1) if mode == "alpha" else values < 0
    assert clamped.any() and torch.all(v.grad[clamped] == 0)
    assert rv.grad.abs().max() > 0.1 and rc.grad.abs().max() > 0.1
    tol = dict(atol=1e-11, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(v.grad.double(), rv.grad, **tol, msg="values")
    torch.testing.assert_close(c.grad.double(), rc.grad, **tol, msg="colours")


def _finite(*tensors):
    return all(bool(torch.isfinite(x).all()) for x in tensors)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_alpha_exactly_zero_and_one(dtype):
    """An alpha of 1 stops the ray (later weights exactly 0, opacity 1); gradients stay finite and match the
    reference's (no division by 1 - a anywhere)."""
    values = torch.tensor([0.0, 0.5, 1.0, 0.3,  1.0,  0.0, 0.0,  1.0, 1.0, 1.0,  0.2, 0.0, 0.7], dtype=dtype)
    samples = make_samples([4, 1, 2, 3, 3], dtype)
    colours = torch.rand(13, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    upstream = random_upstream(5, 13, 3, dtype)
    v, c = values.clone().requires_grad_(), colours.clone().requires_grad_()
    out = composite(v, c, samples)
    loss_of(out, upstream).backward()
    assert _finite(*(getattr(out, n) for n in OUTPUTS), v.grad, c.grad)
    torch.testing.assert_close(out.opacity, torch.tensor([1.0, 1.0, 0.0, 1.0, 0.76], dtype=dtype))
    assert out.weights[3] == 0 and torch.all(out.weights[8:10] == 0)
    rv, rc = values.double().requires_grad_(), colours.double().requires_grad_()
    loss_of(composite_reference(rv, rc, make_samples([4, 1, 2, 3, 3]), "alpha"),
            {k: u.double() for k, u in upstream.items()}).backward()
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v.grad.double(), rv.grad, **tol)
    torch.testing.assert_close(c.grad.double(), rc.grad, **tol)
    assert v.grad[3] == 0   # behind an opaque sample nothing matters


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_densities_and_lengths(dtype):
    """sigma 0 and 1e30, delta up to 1e10 (sigma * delta overflows float32): finite outputs and gradients."""
    sigma = torch.tensor([0.0, 1e30, 3.0,  0.0, 0.5,  1e30,  2.0, 0.0, 1e30], dtype=dtype)
    samples = make_samples([3, 2, 1, 3], dtype)
    samples.delta = torch.tensor([1e10, 1e10, 0.1,  1e10, 1e10,  1e-3,  1e10, 0.2, 1e10], dtype=dtype)
    colours = torch.rand(9, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    upstream = random_upstream(4, 9, 3, dtype)
    v, c = sigma.clone().requires_grad_(), colours.clone().requires_grad_()
    out = composite(v, c, samples, mode="density")
    loss_of(out, upstream).backward()
    assert _finite(*(getattr(out, n) for n in OUTPUTS), v.grad, c.grad)
    torch.testing.assert_close(out.opacity, torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=dtype))
    assert out.weights[1] == 1 and out.weights[2] == 0 and out.weights[6] == 1
    rv = sigma.double().requires_grad_()
    ref_samples = make_samples([3, 2, 1, 3])
    ref_samples.delta = samples.delta.double()
    loss_of(composite_reference(rv, colours.double(), ref_samples, "density"),
            {k: u.double() for k, u in upstream.items()}).backward()
    assert rv.grad.abs().max() > 1e9   # d alpha / d sigma = delta at sigma = 0: huge, and finite
    torch.testing.assert_close(v.grad.double(), rv.grad, atol=1e-12, rtol=1e-5)


@pytest.mark.parametrize("mode", ["alpha", "density"])
@pytest.mark.parametrize("counts", [[], [0, 0, 0]], ids=["no_rays", "no_samples"])
def test_empty_batches(mode, counts):
    samples = make_samples(counts)
    v = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    c = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    out = composite(v, c, samples, mode=mode)
    r = len(counts)
    assert out.colour.shape == (r, 3) and out.opacity.shape == (r,) and out.depth.shape == (r,)
    assert out.weights.shape == (0,)
    assert torch.all(out.colour == 0) and torch.all(out.opacity == 0) and torch.all(out.depth == 0)
    (out.colour.sum() + out.opacity.sum() + out.depth.sum() + out.weights.sum()).backward()
    assert v.grad.shape == (0,) and c.grad.shape == (0, 3)
    assert torch.equal(composite_background(out, 0.5), torch.full((r, 3), 0.5, dtype=torch.float64))


def test_samples_carry_no_gradient():
    samples = make_samples([3, 2])
    samples.t.requires_grad_()
    samples.delta.requires_grad_()
    v = torch.full((5,), 0.4, dtype=torch.float64, requires_grad=True)
    out = composite(v, torch.ones(5, 1, dtype=torch.float64), samples, mode="density")
    out.depth.sum().backward()
    assert samples.t.grad is None and samples.delta.grad is None and v.grad.abs().max() > 0


def test_composite_background():
    samples = make_samples([2, 0, 3])
    values, colours = random_inputs(samples, 3, low=0.1, high=0.9)
    out = composite(values, colours, samples)
    keep = (1 - out.opacity)[:, None]
    torch.testing.assert_close(composite_background(out, 1.0), out.colour + keep)
    bg = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64)
    torch.testing.assert_close(composite_background(out, bg), out.colour + keep * bg)
    torch.testing.assert_close(composite_background(out, [0.2, 0.4, 0.6]), out.colour + keep * bg)
    per_ray = torch.rand(3, 3, dtype=torch.float64, requires_grad=True)
    mixed = composite_background(out, per_ray)
    assert torch.equal(mixed[1], per_ray[1].detach())   # the empty ray shows the background
    mixed.sum().backward()
    torch.testing.assert_close(per_ray.grad, keep.expand(3, 3))


def _one_line_error(exc_info, *fragments):
    message = str(exc_info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_bad_input():
    samples = make_samples([2, 3])
    v = torch.full((5,), 0.5, dtype=torch.float64)
    c = torch.ones(5, 3, dtype=torch.float64)
    cases = [
        (dict(mode="occupancy"), ValueError, ("mode", "'occupancy'")),
        (dict(values=v[:4]), ValueError, ("values", "(5,)", "(4,)")),
        (dict(values=v[:, None]), ValueError, ("values", "(5, 1)")),
        (dict(values=v.float()), TypeError, ("colours", "float32")),
        (dict(values=v.long()), TypeError, ("values", "int64")),
        (dict(colours=c[:4]), ValueError, ("colours", "(4, 3)")),
        (dict(colours=c[:, 0]), ValueError, ("colours", "(5,)")),
        (dict(colours=c[:, :0]), ValueError, ("colours", "C >= 1")),
        (dict(values=torch.tensor([0.5, float("nan"), 0.5, 0.5, 0.5], dtype=torch.float64)), ValueError,
         ("values", "NaN")),
        (dict(colours=torch.full((5, 3), float("inf"), dtype=torch.float64)), ValueError, ("colours", "NaN")),
        (dict(values=torch.tensor([0.5, 0.5, 0.5, 0.5, -float("inf")]), colours=c.float()), ValueError,
         ("values", "NaN")),
        (dict(colours=torch.ones(5, 11, dtype=torch.float64).index_fill(1, torch.tensor([7]), float("nan"))),
         ValueError, ("colours", "NaN")),
        (dict(samples="rays"), TypeError, ("samples", "RaySamples", "str")),
        (dict(samples=RaySamples(samples.t, samples.delta, samples.ray_index, samples.offsets.long())), TypeError,
         ("samples.offsets", "int32")),
        (dict(samples=RaySamples(samples.t, samples.delta, samples.ray_index,
                                 torch.tensor([0, 2, 4], dtype=torch.int32))), ValueError,
         ("samples.offsets", "offsets[-1]", "5")),
        (dict(samples=RaySamples(samples.t, samples.delta[:3], samples.ray_index, samples.offsets)), ValueError,
         ("samples.delta", "(3,)")),
    ]
    for change, exc, fragments in cases:
        args = dict(values=v, colours=c, samples=samples, mode="alpha") | change
        with pytest.raises(exc) as info:
            composite(args["values"], args["colours"], args["samples"], mode=args["mode"])
        _one_line_error(info, *fragments)
    # Offsets that are not monotone are the sampler's bug and not scanned for, but never read out of bounds.
    garbled = RaySamples(samples.t, samples.delta, samples.ray_index, torch.tensor([0, 9, 5], dtype=torch.int32))
    composite(v.requires_grad_(), c, garbled).opacity.sum().backward()
    out = composite(v, c, samples)
    with pytest.raises(ValueError) as info:
        composite_background(out, torch.ones(4))
    _one_line_error(info, "background", "(3,)", "(4,)")
    with pytest.raises(TypeError) as info:
        composite_background(out, "white")
    _one_line_error(info, "background")


VULKAN_SCRIPT = r"""
from taichi_dr.implicit.compositing import composite
from taichi_dr.implicit.samples import RaySamples
data = torch.load(sys.argv[2] + ".inputs.pt")
samples = RaySamples(**data["samples"])
out = {}
for mode in ("alpha", "density"):
    v = data[mode]["values"].clone().requires_grad_()
    c = data[mode]["colours"].clone().requires_grad_()
    res = composite(v, c, samples, mode=mode)
    loss = sum((getattr(res, k) * data["upstream"][k]).sum() for k in ("colour", "opacity", "depth", "weights"))
    loss.backward()
    out[mode] = {k: getattr(res, k).tolist() for k in ("colour", "opacity", "depth", "weights")}
    out[mode]["g_values"] = v.grad.tolist()
    out[mode]["g_colours"] = c.grad.tolist()
try:
    composite(v.detach().double(), c.detach().double(), RaySamples(samples.t.double(), samples.delta.double(),
              samples.ray_index, samples.offsets))
    out["float64"] = "accepted"
except TypeError as e:
    out["float64"] = str(e)
"""


@pytest.mark.vulkan
def test_vulkan_matches_cpu(tmp_path):
    """Forward and backward in float32 on Vulkan (lavapipe) against the cpu backend."""
    samples = make_samples(random_counts(48, 30, seed=9), torch.float32, seed=9)
    data = {"samples": dict(t=samples.t, delta=samples.delta, ray_index=samples.ray_index, offsets=samples.offsets),
            "upstream": random_upstream(48, samples.n_samples, 3, torch.float32)}
    for mode in ("alpha", "density"):
        values, colours = random_inputs(samples, 3, low=RANGES[mode][0], high=RANGES[mode][1],
                                        dtype=torch.float32, seed=10)
        data[mode] = {"values": values, "colours": colours}
    torch.save(data, str(tmp_path / "vk.json") + ".inputs.pt")
    vk = run_on_vulkan(tmp_path, VULKAN_SCRIPT)
    assert "float64" in vk["float64"] and "vulkan" in vk["float64"] and "\n" not in vk["float64"]
    for mode in ("alpha", "density"):
        v = data[mode]["values"].clone().requires_grad_()
        c = data[mode]["colours"].clone().requires_grad_()
        res = composite(v, c, samples, mode=mode)
        loss_of(res, data["upstream"]).backward()
        ours = {k: getattr(res, k).detach() for k in OUTPUTS} | {"g_values": v.grad, "g_colours": c.grad}
        for name, cpu in ours.items():
            other = torch.tensor(vk[mode][name], dtype=torch.float32)
            assert cpu.abs().max() > 0, (mode, name)
            torch.testing.assert_close(other, cpu, rtol=1e-5, atol=1e-5 * float(cpu.abs().max()),
                                       msg=f"{mode} {name}")
