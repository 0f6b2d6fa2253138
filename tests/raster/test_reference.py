"""The dense PyTorch soft rasterizer against hand-computed values, analytic geometry and finite differences.

Every expected value here is computed independently of taichi_dr/reference.py (from the formulas of
docs/design.md written out for one pixel, or from ray-plane geometry), so these tests can catch a wrong
reference before the reference is used to check the Taichi kernels.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from taichi_dr.raster.reference import soft_rasterize_reference
from taichi_dr.raster.settings import RasterSettings

DT = torch.float64


def settings(**kw):
    return dataclasses.replace(RasterSettings(), **kw)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def faces(*tris, z=None):
    """(1, F, 3, 3) from triangles given as three (u, v) or (u, v, z) corners."""
    out = []
    for tri in tris:
        out.append([list(c) if len(c) == 3 else [c[0], c[1], z] for c in tri])
    return torch.tensor([out], dtype=DT)


# A large front-facing triangle (signed pixel area < 0) with a vertical edge at u = 2.25 and a horizontal
# edge at v = 2.25; pixel (6, 1) (centre (1.5, 6.5)) is exactly 0.75 px outside the vertical edge, pixel
# (6, 2) (centre (2.5, 6.5)) 0.25 px inside it, and both are much farther from the other edges.
BIG = ((2.25, 2.25), (2.25, 30.0), (30.0, 2.25))


def test_single_triangle_coverage_matches_hand_computed_sigmoid():
    s = settings(sigma=1e-3)  # 16x16 image: sigma_px = 1e-3 * 8^2 = 0.064 px^2
    alpha, image, p2f = soft_rasterize_reference(faces(BIG, z=5.0), (16, 16), settings=s)
    sigma_px = 0.064
    assert image.shape == (1, 16, 16, 0)
    assert alpha[0, 6, 1].item() == pytest.approx(sigmoid(-0.75**2 / sigma_px), rel=1e-9)
    assert alpha[0, 6, 2].item() == pytest.approx(sigmoid(0.25**2 / sigma_px), rel=1e-9)
    # 1.75 px outside: d^2 = 3.06 > cut-off 0.064 * ln(1/1e-4 - 1) = 0.59, so exactly 0.
    assert alpha[0, 6, 0].item() == 0.0
    assert alpha[0, 0, 0].item() == 0.0 and alpha[0, 15, 0].item() == 0.0
    assert alpha[0, 8, 8].item() == pytest.approx(1.0, abs=1e-12)
    assert p2f[0, 6, 2].item() == 0 and p2f[0, 8, 8].item() == 0
    assert p2f[0, 6, 1].item() == -1 and p2f[0, 0, 0].item() == -1
    assert p2f.dtype == torch.int32


def test_two_faces_alpha_is_one_minus_product_of_complements():
    # Two vertical edges: face 0's at u = 2.25 and face 1's at u = 0.9 (a mirror-image triangle).
    left = ((0.9, 2.25), (-30.0, 2.25), (0.9, 30.0))
    s = settings(sigma=1e-3)
    alpha, _, _ = soft_rasterize_reference(faces(BIG, left, z=5.0), (16, 16), settings=s)
    d0 = sigmoid(-(0.75**2) / 0.064)  # pixel centre u = 1.5: 0.75 outside face 0 ...
    d1 = sigmoid(-(0.6**2) / 0.064)  # ... and 0.6 outside face 1
    assert alpha[0, 6, 1].item() == pytest.approx(1 - (1 - d0) * (1 - d1), rel=1e-9)


@pytest.mark.parametrize("depth", [20.0, 99.99])  # zn > eps, and zn < eps (m = eps)
def test_single_face_aggregation_matches_formula(depth):
    near, far, gamma, eps = 1.0, 100.0, 0.1 if depth < 50 else 1e-3, 1e-3
    s = settings(sigma=1e-3, gamma=gamma, eps=eps, near=near, far=far, background=(0.25, -1.0))
    attrs = torch.tensor([0.9, 3.0], dtype=DT).expand(1, 1, 3, 2)
    alpha, image, _ = soft_rasterize_reference(faces(BIG, z=depth), (16, 16), attrs, s)
    zn = (far - depth) / (far - near)
    m = max(eps, zn)
    for (i, j), d2 in {(6, 1): -(0.75**2), (6, 2): 0.25**2, (8, 8): None}.items():
        coverage = 1.0 if d2 is None else sigmoid(d2 / 0.064)
        e, eb = coverage * math.exp((zn - m) / gamma), math.exp((eps - m) / gamma)
        for k, (a, bg) in enumerate(zip((0.9, 3.0), (0.25, -1.0), strict=True)):
            expected = (e * a + eb * bg) / (e + eb)
            assert image[0, i, j, k].item() == pytest.approx(expected, rel=1e-6, abs=1e-9)
    # No face at all: pure background.
    assert image[0, 15, 0].tolist() == [0.25, -1.0]


def test_perspective_correct_interpolation_matches_ray_plane_intersection():
    f, cx, cy = 20.0, 8.0, 8.0
    corners = torch.tensor([[-1.2, -1.0, 3.0], [1.5, -0.8, 9.0], [-0.5, 1.4, 5.0]], dtype=DT)
    uvz = torch.stack([f * corners[:, 0] / corners[:, 2] + cx, f * corners[:, 1] / corners[:, 2] + cy,
                       corners[:, 2]], dim=-1)
    attrs = corners[None, None]  # attribute = camera-space position (X, Y, Z)
    s = settings(mode="hard")
    _, image, p2f = soft_rasterize_reference(uvz[None, None], (16, 16), attrs, s)
    normal = torch.linalg.cross(corners[1] - corners[0], corners[2] - corners[0])
    checked = 0
    for i in range(16):
        for j in range(16):
            if p2f[0, i, j] != 0:
                continue
            ray = torch.tensor([(j + 0.5 - cx) / f, (i + 0.5 - cy) / f, 1.0], dtype=DT)
            hit = ray * (normal @ corners[0]) / (normal @ ray)
            torch.testing.assert_close(image[0, i, j], hit, rtol=1e-10, atol=1e-10)
            checked += 1
    assert checked > 20
    # A pixel of a tilted face: the screen-linear (affine) interpolation would be off by a lot.
    assert image[0, p2f[0] == 0][:, 2].std() > 0.3


def test_outside_pixels_use_clipped_perspective_barycentrics():
    # Pixels in the soft band outside a face take the value at SoftRas's clipped barycentrics: negative
    # weights set to 0, the rest renormalised, then perspective-corrected. Barycentrics are solved here
    # as a linear system (independent of the reference's edge functions).
    corners = [(2.25, 2.25, 2.0), (2.25, 30.0, 6.0), (30.0, 2.25, 3.0)]
    attr = [1.0, 10.0, 100.0]
    fv = faces(corners)
    attrs = torch.tensor([[a, z] for a, (_, _, z) in zip(attr, corners, strict=True)], dtype=DT)[None, None]
    # sigma_px = 0.128, cut-off d^2 = 1.18; gamma = 1e-4 makes the background weight exp(-9000) = 0 in
    # float64, so the image equals the face value exactly.
    _, image, p2f = soft_rasterize_reference(fv, (16, 16), attrs, settings(sigma=2e-3))
    a, b, c = (torch.tensor(p[:2], dtype=DT) for p in corners)
    basis = torch.stack([b - a, c - a], dim=1)
    for i, j in ((6, 1), (1, 6), (1, 1), (5, 5)):  # outside ab, outside ac, near corner a, inside
        s, t = torch.linalg.solve(basis, torch.tensor([j + 0.5, i + 0.5], dtype=DT) - a).tolist()
        w = [1 - s - t, s, t]
        wc = [min(max(x, 0.0), 1.0) for x in w]
        wc = [x / sum(wc) for x in wc]
        zp = 1.0 / sum(x / z for x, (_, _, z) in zip(wc, corners, strict=True))
        value = zp * sum(x * a_ / z for x, a_, (_, _, z) in zip(wc, attr, corners, strict=True))
        torch.testing.assert_close(image[0, i, j], torch.tensor([value, zp], dtype=DT), rtol=1e-10, atol=0)
        assert (p2f[0, i, j] == 0) == (min(w) >= 0)
    # Near corner a two weights are negative: the value is corner a's attribute.
    assert p2f[0, 1, 1] == -1 and image[0, 1, 1, 0].item() == pytest.approx(1.0, rel=1e-12)


def test_nearer_face_wins_and_hard_mode_is_exact():
    far_tri = ((1.0, 1.0), (1.0, 12.0), (12.0, 1.0))  # face 0, depth 10, green
    near_tri = ((4.0, 4.0), (4.0, 15.0), (15.0, 4.0))  # face 1, depth 5, red
    fv = torch.cat([faces(far_tri, z=10.0), faces(near_tri, z=5.0)], dim=1)
    attrs = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=DT)[None, :, None].expand(1, 2, 3, 3)
    red, green, bg = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]
    both, only_far, none = (6, 6), (2, 2), (15, 0)

    _, image, p2f = soft_rasterize_reference(fv, (16, 16), attrs, settings(background=(0.0, 0.0, 0.5)))
    torch.testing.assert_close(image[0, both[0], both[1]], torch.tensor(red, dtype=DT), atol=1e-6, rtol=0)
    torch.testing.assert_close(image[0, only_far[0], only_far[1]], torch.tensor(green, dtype=DT),
                               atol=1e-6, rtol=0)
    assert p2f[0, both[0], both[1]] == 1 and p2f[0, only_far[0], only_far[1]] == 0
    assert p2f[0, none[0], none[1]] == -1

    alpha, image, p2f_hard = soft_rasterize_reference(
        fv, (16, 16), attrs, settings(mode="hard", background=(0.0, 0.0, 0.5)))
    assert image[0, both[0], both[1]].tolist() == red
    assert image[0, only_far[0], only_far[1]].tolist() == green
    assert image[0, none[0], none[1]].tolist() == bg
    assert torch.equal(p2f_hard, p2f)
    assert torch.equal(alpha, (p2f >= 0).to(DT))


def test_no_faces_gives_background():
    fv, attrs = torch.zeros(2, 0, 3, 3, dtype=DT), torch.zeros(2, 0, 3, 2, dtype=DT)
    for mode in ("soft", "hard"):
        s = settings(mode=mode, background=(1, 2))
        alpha, image, p2f = soft_rasterize_reference(fv, (4, 5), attrs, s)
        assert alpha.shape == (2, 4, 5) and (alpha == 0).all() and (p2f == -1).all()
        assert image.shape == (2, 4, 5, 2) and (image == torch.tensor([1.0, 2.0], dtype=DT)).all()


def test_backface_culling_only_when_asked():
    back = faces(((2.0, 2.0), (14.0, 2.0), (2.0, 14.0)), z=5.0)  # signed pixel area > 0
    front = back[:, :, [0, 2, 1]]
    for fv, culled in ((back, True), (front, False)):
        alpha, _, p2f = soft_rasterize_reference(fv, (16, 16))
        assert alpha[0, 5, 5] > 0.99 and p2f[0, 5, 5] == 0
        alpha, _, p2f = soft_rasterize_reference(fv, (16, 16), settings=settings(cull_backfaces=True))
        if culled:
            assert alpha.abs().max() == 0 and (p2f == -1).all()
        else:
            assert alpha[0, 5, 5] > 0.99 and p2f[0, 5, 5] == 0


def test_faces_behind_near_or_beyond_far_are_skipped():
    s = settings(near=1.0, far=50.0)
    for depth in (0.5, 60.0):
        alpha, _, p2f = soft_rasterize_reference(faces(BIG, z=depth), (16, 16), settings=s)
        assert alpha.abs().max() == 0 and (p2f == -1).all()
    # One corner in front of the near plane: the whole face is skipped.
    fv = faces(BIG, z=5.0)
    fv[0, 0, 1, 2] = 0.9
    alpha, _, _ = soft_rasterize_reference(fv, (16, 16), settings=s)
    assert alpha.abs().max() == 0


def _uv_for_texel(x, y, ht=2, wt=2):
    """UV that lands on texel coordinates (x, y) under x = u*Wt - 0.5, y = (1 - v)*Ht - 0.5."""
    return ((x + 0.5) / wt, 1.0 - (y + 0.5) / ht)


def test_texture_texel_centres_and_bilinear_midpoints():
    # Screen-affine UVs (constant depth, so perspective-correct = affine): pixel centre (j+0.5, i+0.5)
    # maps to texel coordinates (j/2, i/2): texel centres at even (i, j), midpoints in between.
    tri_px = [(-1.0, -1.0), (-1.0, 11.0), (11.0, -1.0)]  # front facing, covers the 3x3 image
    uvs = torch.tensor([[_uv_for_texel((u - 0.5) / 2, (v - 0.5) / 2) for u, v in tri_px]], dtype=DT)[None]
    texture = torch.tensor([[[1.0, 10.0], [2.0, 20.0]], [[3.0, 30.0], [4.0, 40.0]]], dtype=DT)[None]
    _, image, _ = soft_rasterize_reference(faces(tri_px, z=3.0), (3, 3), settings=settings(mode="hard"),
                                           texture=texture, face_uvs=uvs)
    t = texture[0]
    expected = torch.stack([
        torch.stack([t[0, 0], (t[0, 0] + t[0, 1]) / 2, t[0, 1]]),
        torch.stack([(t[0, 0] + t[1, 0]) / 2, t.mean(dim=(0, 1)), (t[0, 1] + t[1, 1]) / 2]),
        torch.stack([t[1, 0], (t[1, 0] + t[1, 1]) / 2, t[1, 1]]),
    ])
    torch.testing.assert_close(image[0], expected, rtol=1e-12, atol=1e-12)

    # Shading multiplies the texture; a batch-1 texture and UVs broadcast over a batch of 2.
    fv = faces(tri_px, z=3.0).expand(2, -1, -1, -1)
    shading = torch.tensor([0.5, 2.0], dtype=DT)[:, None, None, None].expand(2, 1, 3, 2)
    _, image2, _ = soft_rasterize_reference(fv, (3, 3), settings=settings(mode="hard"), texture=texture,
                                            face_uvs=uvs, face_shading=shading)
    torch.testing.assert_close(image2, torch.stack([0.5 * expected, 2.0 * expected]), rtol=1e-12, atol=1e-12)


def test_texture_clamps_to_edge():
    # UVs far outside [0, 1] read the corner texels (clamp to edge), not wrap around.
    tri_px = [(-1.0, -1.0), (-1.0, 11.0), (11.0, -1.0)]
    texture = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]], dtype=DT)[None]
    for uv, value in (((-5.0, 7.0), 1.0), ((9.0, -3.0), 4.0), ((9.0, 7.0), 2.0)):
        uvs = torch.tensor(uv, dtype=DT).expand(1, 1, 3, 2)
        _, image, _ = soft_rasterize_reference(faces(tri_px, z=3.0), (3, 3), settings=settings(mode="hard"),
                                               texture=texture, face_uvs=uvs)
        assert (image == value).all()


# ----------------------------------------------------------------------------------------------------------
# gradients

# Two overlapping faces at different depths with non-round corners (no pixel centre within 1e-6 of an edge
# line, where the clipped barycentrics have a kink). A tiny dist_eps makes the cut-off jump (D = dist_eps
# -> 0) far below finite-difference resolution.
GRAD_FACES = torch.tensor([[[[0.7, 0.9, 3.0], [1.3, 5.6, 3.4], [5.2, 1.1, 2.7]],
                            [[2.1, 1.7, 4.1], [5.3, 5.45, 3.6], [1.35, 4.8, 4.4]]]], dtype=DT)
GRAD_SETTINGS = dict(sigma=2e-2, gamma=0.05, eps=1e-3, dist_eps=1e-12, near=0.5, far=10.0,
                     background=(0.2, 0.7))


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_gradcheck_verts_and_attrs(mode):
    s = settings(mode=mode, **GRAD_SETTINGS)
    attrs = torch.linspace(-1.0, 1.5, 12, dtype=DT).reshape(1, 2, 3, 2)
    fv = GRAD_FACES.clone().requires_grad_()
    attrs.requires_grad_()

    def fn(fv, attrs):
        alpha, image, _ = soft_rasterize_reference(fv, (6, 6), attrs, s)
        return alpha, image

    alpha, _ = fn(fv, attrs)
    if mode == "soft":  # the test is only meaningful if many pixels sit in the soft band
        assert ((alpha > 1e-3) & (alpha < 0.999)).sum() >= 10
    assert torch.autograd.gradcheck(fn, (fv, attrs), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_texture_uvs_shading():
    s = settings(**{**GRAD_SETTINGS, "background": 0.3})
    texture = torch.linspace(0.0, 1.0, 18, dtype=DT).reshape(1, 3, 3, 2).sin().requires_grad_()
    uvs = torch.tensor([[[0.13, 0.21], [0.42, 0.87], [0.91, 0.34]],
                        [[0.55, 0.62], [0.08, 0.71], [0.77, 0.05]]], dtype=DT)[None].requires_grad_()
    shading = torch.linspace(0.5, 1.5, 12, dtype=DT).reshape(1, 2, 3, 2).requires_grad_()
    fv = GRAD_FACES.clone().requires_grad_()

    def fn(fv, texture, uvs, shading):
        alpha, image, _ = soft_rasterize_reference(fv, (6, 6), None, s, texture, uvs, shading)
        return alpha, image

    assert torch.autograd.gradcheck(fn, (fv, texture, uvs, shading), eps=1e-6, atol=1e-6, rtol=1e-4)


def _bad_faces(dtype):
    good = [[1.2, 1.1, 2.0], [1.4, 6.3, 2.5], [6.1, 1.3, 3.0]]
    return torch.tensor([[
        good,
        [[1.0, 1.0, 2.0], [3.0, 3.0, 2.0], [5.0, 5.0, 2.0]],  # collinear: zero area
        [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0], [2.0, 2.0, 2.0]],  # a point: zero area, zero-length edges
        [[1.2, 1.1, 0.0], [1.4, 6.3, 2.5], [6.1, 1.3, 3.0]],  # a corner at depth 0
        [[1.2, 1.1, -2.0], [1.4, 6.3, -2.5], [6.1, 1.3, -3.0]],  # behind the camera
        [[1.2, 1.1, 2.0], [1.2, 1.1 + 1e-9, 2.0], [6.1, 1.3, 3.0]],  # |area2| ~ 5e-9 < 1e-8
    ]], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_no_nan_gradients_with_degenerate_and_skipped_faces(dtype, mode):
    fv = _bad_faces(dtype).requires_grad_()
    n = fv.shape[1]
    attrs = torch.rand(1, n, 3, 2, dtype=dtype, generator=torch.Generator().manual_seed(0)).requires_grad_()
    texture = torch.rand(1, 4, 4, 1, dtype=dtype, generator=torch.Generator().manual_seed(1)).requires_grad_()
    uvs = torch.rand(1, n, 3, 2, dtype=dtype, generator=torch.Generator().manual_seed(2)).requires_grad_()
    for s in (settings(mode=mode), settings(mode=mode, sigma=2e-2, gamma=0.05)):  # crisp and blurry
        alpha, image, p2f = soft_rasterize_reference(fv, (8, 8), attrs, s, texture, uvs)
        (alpha.sum() + image.sum()).backward()
        for x in (fv, attrs, texture, uvs):
            assert torch.isfinite(x.grad).all()
        # Skipped faces get exactly zero gradient and never appear in pix_to_face.
        assert fv.grad[0, 1:].abs().max() == 0 and attrs.grad[0, 1:].abs().max() == 0
        assert fv.grad[0, 0].abs().max() > 0
        assert set(p2f.unique().tolist()) <= {-1, 0}
        for x in (fv, attrs, texture, uvs):
            x.grad = None


def test_no_nan_gradients_at_default_sharpness_float32():
    # gamma = 1e-4: exp((zn - m) / gamma) would overflow without the shift by m.
    gen = torch.Generator().manual_seed(3)
    uv = torch.rand(2, 30, 3, 2, generator=gen) * 40 - 4
    z = torch.rand(2, 30, 3, 1, generator=gen) * 20 - 2  # some faces cross the near plane
    fv = torch.cat([uv, z], dim=-1).requires_grad_()
    attrs = torch.rand(2, 30, 3, 3, generator=gen).requires_grad_()
    alpha, image, _ = soft_rasterize_reference(fv, (32, 32), attrs)
    (alpha.sum() + image.sum()).backward()
    assert torch.isfinite(fv.grad).all() and torch.isfinite(attrs.grad).all()
    assert torch.isfinite(alpha).all() and torch.isfinite(image).all()
    assert alpha.min() >= 0 and alpha.max() <= 1


def test_pixel_chunks_do_not_change_values_or_gradients():
    # Small chunks go through torch.utils.checkpoint; one chunk does not.
    s = settings(**GRAD_SETTINGS)
    attrs = torch.linspace(-1.0, 1.5, 12, dtype=DT).reshape(1, 2, 3, 2)
    results = []
    for chunk in (4096, 7):
        fv, at = GRAD_FACES.clone().requires_grad_(), attrs.clone().requires_grad_()
        alpha, image, p2f = soft_rasterize_reference(fv, (6, 6), at, s, pixel_chunk=chunk)
        (alpha.square().sum() + image.sin().sum()).backward()
        results.append((alpha, image, p2f, fv.grad, at.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_accepts_raster_settings():
    from taichi_dr.raster.settings import RasterSettings

    attrs = torch.ones(1, 2, 3, 2, dtype=DT)
    a = soft_rasterize_reference(GRAD_FACES, (6, 6), attrs, RasterSettings(**GRAD_SETTINGS))
    b = soft_rasterize_reference(GRAD_FACES, (6, 6), attrs, settings(**GRAD_SETTINGS))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_bad_inputs_raise_clear_errors():
    fv = faces(BIG, z=5.0)
    with pytest.raises(ValueError, match="face_verts"):
        soft_rasterize_reference(fv[..., :2], (8, 8))
    with pytest.raises(TypeError, match="face_verts"):
        soft_rasterize_reference(fv.int(), (8, 8))
    with pytest.raises(ValueError, match="image_size"):
        soft_rasterize_reference(fv, (8, 0))
    with pytest.raises(ValueError, match="face_attrs"):
        soft_rasterize_reference(fv, (8, 8), torch.zeros(1, 2, 3, 3, dtype=DT))
    with pytest.raises(TypeError, match="face_attrs"):
        soft_rasterize_reference(fv, (8, 8), torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match="face_uvs"):
        soft_rasterize_reference(fv, (8, 8), texture=torch.zeros(1, 2, 2, 3, dtype=DT))
    with pytest.raises(ValueError, match="texture"):
        soft_rasterize_reference(fv, (8, 8), face_uvs=torch.zeros(1, 1, 3, 2, dtype=DT))
    with pytest.raises(ValueError, match="background"):
        soft_rasterize_reference(fv, (8, 8), torch.zeros(1, 1, 3, 3, dtype=DT),
                                 settings(background=(0.0, 1.0)))
    with pytest.raises(ValueError, match="mode"):
        soft_rasterize_reference(fv, (8, 8), settings=settings(mode="nearest"))
    with pytest.raises(ValueError, match="pixel_chunk"):
        soft_rasterize_reference(fv, (8, 8), pixel_chunk=0)
