"""Numerical hardening of the soft rasterizer's kernels: exponents that would overflow (the kernels run under
Taichi's fast math, which assumes no infinities), sliver triangles at 1024², and the gradient of a saturated
float32 silhouette. Forward values and gradients are checked against the dense PyTorch reference in float64."""

import math

import pytest
import torch

from taichi_dr.raster import RasterSettings, soft_rasterize
from taichi_dr.raster.kernels import SLIVER
from taichi_dr.raster.reference import soft_rasterize_reference


def layered_scene(dtype=torch.float64, seed=0):
    """Eight triangles over a 24 x 20 image at depths from just above `near` (1.0) to just below `far` (10.0),
    overlapping, off the pixel-centre grid, with two attribute channels."""
    g = torch.Generator().manual_seed(seed)
    corners = torch.tensor([[2.3, 2.1], [21.7, 3.4], [9.6, 18.2]], dtype=torch.float64)
    shifts = (torch.rand(8, 1, 2, generator=g, dtype=torch.float64) - 0.5) * 6
    z = torch.linspace(1.0 + 1e-3, 10.0 - 1e-3, 8, dtype=torch.float64)[:, None, None].expand(8, 3, 1)
    fv = torch.cat([corners + shifts, z], -1)[None]
    attrs = torch.rand(1, 8, 3, 2, generator=g, dtype=torch.float64)
    return fv.to(dtype), attrs.to(dtype), (20, 24)


EXTREME = {
    # Coverage logits d²/sigma up to ~1e10: exp(+x) overflows float32 (and float64) in the naive sigmoid.
    "tiny sigma": RasterSettings(sigma=1e-9, gamma=0.05, near=1.0, far=10.0),
    # Softmax exponents (zn - m) / gamma down to ~-1e9.
    "tiny gamma": RasterSettings(sigma=1e-2, gamma=1e-9, near=1.0, far=10.0),
    # The background's shift starts at eps: the first face rescales by exp(-1e33 / gamma), -inf in float32.
    "huge negative eps": RasterSettings(sigma=1e-2, gamma=1e-3, eps=-1e30, near=1.0, far=10.0),
    # The background dominates everything: face weights exp((zn - eps) / gamma) ~ exp(-1e3).
    "huge eps": RasterSettings(sigma=1e-2, gamma=1e-3, eps=1.0, near=1.0, far=10.0),
}


@pytest.mark.parametrize("name", list(EXTREME))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_exponents_give_finite_reference_values(name, dtype):
    s = EXTREME[name]
    fv, attrs, size = layered_scene(dtype)
    leaves = [fv.clone().requires_grad_(), attrs.clone().requires_grad_()]
    alpha, image, _ = soft_rasterize(leaves[0], size, leaves[1], s)
    w_alpha = torch.linspace(-1, 1, alpha.numel(), dtype=dtype).view(alpha.shape)
    ((alpha * w_alpha).sum() + (image * torch.tensor([1.0, -0.5], dtype=dtype)).sum()).backward()
    for label, x in [("alpha", alpha), ("image", image), ("g_verts", leaves[0].grad), ("g_attrs", leaves[1].grad)]:
        assert torch.isfinite(x).all(), label

    ref_leaves = [fv.double().requires_grad_(), attrs.double().requires_grad_()]
    ref_alpha, ref_image, _ = soft_rasterize_reference(ref_leaves[0], size, ref_leaves[1], s)
    ((ref_alpha * w_alpha.double()).sum() + (ref_image * torch.tensor([1.0, -0.5], dtype=torch.float64)).sum()
     ).backward()
    assert ref_alpha.max() > 0.99 and ref_alpha.min() < 0.01  # the scene covers and misses pixels
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(alpha.double(), ref_alpha, atol=tol, rtol=0)
    torch.testing.assert_close(image.double(), ref_image, atol=tol, rtol=0)
    # Gradients: to float32 / float64 rounding relative to their largest entry. With gamma = 1e-9 the depth
    # gradient carries 1 / gamma: float32's rounding of the depths (1e-7) is amplified beyond comparison.
    if dtype == torch.float32 and name == "tiny gamma":
        return
    grad_tol = 1e-3 if dtype == torch.float32 else 1e-8
    for label, ours, ref in [("g_verts", leaves[0].grad, ref_leaves[0].grad),
                             ("g_attrs", leaves[1].grad, ref_leaves[1].grad)]:
        scale = float(ref.abs().max())
        assert scale > 0, label
        torch.testing.assert_close(ours.double(), ref, atol=grad_tol * scale, rtol=0, msg=label)


def test_tiny_sigma_and_gamma_are_refused_with_a_message():
    with pytest.raises(ValueError, match="gamma"):
        RasterSettings(gamma=1e-40)
    with pytest.raises(ValueError, match="sigma"):
        RasterSettings(sigma=1e-40)


def sliver(start, direction, length, height, z=3.0):
    """A triangle of the given longest edge (pixels) and height over it: aspect height / length."""
    d = torch.tensor(direction, dtype=torch.float64)
    d = d / d.norm()
    n = torch.stack([-d[1], d[0]])
    a = torch.tensor(start, dtype=torch.float64)
    b = a + length * d
    c = a + 0.37 * length * d + height * n
    return torch.stack([torch.cat([p, torch.tensor([z], dtype=torch.float64)]) for p in (a, b, c)])


def test_slivers_at_1024_are_skipped_in_forward_and_backward():
    """Slivers whose height is below SLIVER x their longest edge take no part at all: the outputs and the other
    faces' gradients are exactly those of the scene without them, and theirs are zero. Before, the 800 px long
    sliver of aspect 1e-6 (height 8e-4 px, |area x 2| 0.64 px², far above the old absolute 1e-8) passed, with
    barycentric scales of 1 / height ~ 1e3 per pixel in its gradients."""
    size = (1024, 1024)
    base = torch.stack([
        torch.tensor([[100.3, 120.7, 4.0], [900.1, 180.2, 4.0], [420.6, 870.9, 4.0]], dtype=torch.float64),
        torch.tensor([[300.3, 300.7, 2.5], [700.1, 320.2, 2.5], [520.6, 760.9, 2.5]], dtype=torch.float64),
    ])
    slivers = torch.stack([sliver([60.2, 70.3], [1.0, 0.31], 800.0, 800.0 * aspect)
                           for aspect in (1e-9, 1e-6, 0.5 * SLIVER)])
    s = RasterSettings(sigma=1e-5, gamma=1e-2, near=1.0, far=10.0)
    colours = torch.linspace(0.1, 0.9, 5 * 3 * 2).view(5, 3, 2)
    results = []
    for fv, attrs in ((base, colours[[0, 4]]), (torch.cat([base[:1], slivers, base[1:]]), colours)):
        fv = fv[None].float().requires_grad_()
        attrs = attrs[None].clone().requires_grad_()
        alpha, image, p2f = soft_rasterize(fv, size, attrs, s)
        ((alpha * 0.7).sum() + image[..., 0].sum() - image[..., 1].sum()).backward()
        results.append((alpha, image, p2f, fv.grad, attrs.grad))
    (a0, i0, p0, gv0, ga0), (a1, i1, p1, gv1, ga1) = results
    assert a0.max() > 0.99
    assert torch.equal(a0, a1) and torch.equal(i0, i1)
    assert torch.equal(torch.where(p1 > 3, p1 - 3, p1), p0)  # face 4 is face 1 of the base scene
    kept = [0, 4]
    assert torch.equal(gv1[:, kept], gv0) and torch.equal(ga1[:, kept], ga0)
    assert (gv1[:, 1:4] == 0).all() and (ga1[:, 1:4] == 0).all()


def test_thin_but_kept_sliver_has_bounded_consistent_gradients_at_1024():
    """A sliver just above the threshold (height 2 x SLIVER x length) takes part: its float32 gradients are
    finite and agree with float64's, so its barycentric scales stay within float32's precision."""
    size = (1024, 1024)
    tri = sliver([60.2, 70.3], [1.0, 0.31], 800.0, 800.0 * 2 * SLIVER)[None, None]
    attrs = torch.tensor([[[[0.2, 1.0], [0.9, -1.0], [0.5, 0.3]]]], dtype=torch.float64)
    s = RasterSettings(sigma=1e-6, gamma=1e-2, near=1.0, far=10.0)
    grads = []
    for dtype in (torch.float32, torch.float64):
        fv = tri.to(dtype).requires_grad_()
        a = attrs.to(dtype).requires_grad_()
        alpha, image, _ = soft_rasterize(fv, size, a, s)
        (alpha.sum() + image[..., 0].sum() + 0.3 * image[..., 1].sum()).backward()
        assert alpha.max() > 0.5  # it is drawn
        assert torch.isfinite(fv.grad).all() and torch.isfinite(a.grad).all()
        grads.append((fv.grad.double(), a.grad.double()))
    for ours, ref in zip(grads[0], grads[1], strict=True):
        assert ref.abs().max() > 0
        torch.testing.assert_close(ours, ref, atol=1e-3 * float(ref.abs().max()), rtol=0)


def test_saturated_float32_silhouette_keeps_its_gradient():
    """Twelve stacked copies of a triangle: pixels a little inside have transmittance T = prod (1 - D) far
    below float32's 3e-8, so alpha = 1 - T rounds to 1. The gradient of alpha there, T * D_j * dx_j, is tiny
    but real (a loss like log(1 - alpha) scales it back up); it must match float64's, not die with 1 - alpha."""
    size = (32, 32)
    tri = torch.tensor([[3.3, 2.9], [29.1, 4.2], [12.7, 28.4]], dtype=torch.float64)
    z = torch.linspace(2.0, 3.1, 12, dtype=torch.float64)[:, None, None].expand(12, 3, 1)
    fv = torch.cat([tri.expand(12, 3, 2), z], -1)[None]
    s = RasterSettings(sigma=1 / 256, near=1.0, far=10.0)  # 1 px² in pixel units at 32²
    ref_fv = fv.clone().requires_grad_()
    ref_alpha = soft_rasterize_reference(ref_fv, size, None, s)[0]
    # Weight only pixels that float32 rounds to alpha = 1 and where T is still within float32's normal range.
    log_t = torch.log1p(-ref_alpha.detach().clamp(max=1 - 1e-300))
    saturated = ref_alpha.detach() > 1 - 2.9e-8  # 1 - T rounds to 1 in float32 below T = 2^-25
    weight = (saturated & (log_t > math.log(1e-30))).double()
    assert weight.sum() > 20
    (ref_alpha * weight).sum().backward()
    fv32 = fv.float().requires_grad_()
    alpha = soft_rasterize(fv32, size, None, s)[0]
    assert (alpha[weight > 0] == 1).all()  # saturated in float32
    (alpha * weight.float()).sum().backward()
    ours, ref = fv32.grad.double(), ref_fv.grad
    assert ref.norm() > 0
    assert (ours - ref).norm() < 1e-3 * ref.norm()


def test_reference_skips_the_same_slivers():
    """The dense reference applies the same relative sliver rule: with slivers of aspect 0.5 and 2 x SLIVER
    among ordinary faces, both give the same image and gradients (float64)."""
    fv, attrs, size = layered_scene()
    thin = torch.stack([sliver([1.7, 3.2], [1.0, 0.8], 20.0, 20.0 * aspect, z=2.0 + aspect * 1e3)
                        for aspect in (0.5 * SLIVER, 2 * SLIVER)])[None]
    fv = torch.cat([fv, thin], 1)
    attrs = torch.cat([attrs, torch.tensor([[[[0.3, 0.9]] * 3, [[0.8, 0.1]] * 3]], dtype=torch.float64)], 1)
    s = RasterSettings(sigma=1e-3, gamma=0.05, near=1.0, far=10.0)
    grads = []
    for fn in (soft_rasterize, soft_rasterize_reference):
        leaves = [fv.clone().requires_grad_(), attrs.clone().requires_grad_()]
        alpha, image, _ = fn(leaves[0], size, leaves[1], s)
        (alpha.sum() + (image * torch.tensor([1.0, -0.5], dtype=torch.float64)).sum()).backward()
        grads.append([alpha, image, leaves[0].grad, leaves[1].grad])
    ours, ref = grads
    assert ref[2][0, -1].abs().max() > 0  # the kept sliver takes part
    assert (ours[2][0, -2] == 0).all() and (ref[2][0, -2] == 0).all()  # the thinner one does not
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-8 * max(1.0, float(b.detach().abs().max())), rtol=1e-6)
