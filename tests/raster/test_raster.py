"""The Taichi soft rasterizer against the independent dense PyTorch reference, finite differences, analytic
shapes, and the Vulkan backend."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from vulkan_subprocess import run_on_vulkan

from taichi_dr.raster import RasterSettings, bin_faces, soft_rasterize
from taichi_dr.raster.clip import clip_near
from taichi_dr.raster.reference import soft_rasterize_reference

ROOT = Path(__file__).resolve().parents[2]


def random_scene(B=2, F=12, H=20, W=24, C=2, Ct=3, dtype=torch.float64, seed=0):
    """Random triangles of a few pixels to half the image, depths in [2, 6], off the pixel-centre grid."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(B, F, 1, 2, generator=g, dtype=dtype) * torch.tensor([W, H], dtype=dtype)
    offsets = (torch.rand(B, F, 3, 2, generator=g, dtype=dtype) - 0.5) * 14
    uv = centre + offsets + 0.0137
    z = 2 + 4 * torch.rand(B, F, 3, 1, generator=g, dtype=dtype)
    fv = torch.cat([uv, z], -1)
    attrs = torch.rand(B, F, 3, C, generator=g, dtype=dtype)
    tex = torch.rand(1, 5, 7, Ct, generator=g, dtype=dtype)
    uvs = torch.rand(1, F, 3, 2, generator=g, dtype=dtype)
    shading = 0.5 + torch.rand(B, F, 3, Ct, generator=g, dtype=dtype)
    return fv, attrs, tex, uvs, shading, (H, W)


SETTINGS = {
    "soft": RasterSettings(sigma=1e-2, gamma=0.05, near=1.0, far=10.0, background=(0.2, 0.4, 0.1, 0.3, 0.9)),
    "soft_cull": RasterSettings(sigma=2e-3, gamma=1e-2, near=1.0, far=10.0, cull_backfaces=True, tile_size=4),
    "hard": RasterSettings(mode="hard", near=1.0, far=10.0, background=0.5),
}


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_reference(name, dtype):
    fv, attrs, tex, uvs, shading, size = random_scene(dtype=dtype)
    s = SETTINGS[name]
    ours = soft_rasterize(fv, size, attrs, s, tex, uvs, shading)
    ref = soft_rasterize_reference(fv, size, attrs, s, tex, uvs, shading)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert ours[0].abs().max() > 0.5  # the scene covers something
    torch.testing.assert_close(ours[0], ref[0], atol=tol, rtol=0)
    torch.testing.assert_close(ours[1], ref[1], atol=tol, rtol=0)
    assert torch.equal(ours[2], ref[2])


@pytest.mark.parametrize("name", ["soft", "soft_cull"])
def test_gradients_match_reference_autograd(name):
    fv, attrs, tex, uvs, shading, size = random_scene()
    s = SETTINGS[name]
    g = torch.Generator().manual_seed(1)
    w_alpha = torch.randn(2, *size, generator=g, dtype=torch.float64)
    w_image = torch.randn(2, *size, 5, generator=g, dtype=torch.float64)

    def grads(fn):
        leaves = [x.clone().requires_grad_() for x in (fv, attrs, tex, shading)]
        alpha, image, _ = fn(leaves[0], size, leaves[1], s, leaves[2], uvs, leaves[3])
        ((alpha * w_alpha).sum() + (image * w_image).sum()).backward()
        return [x.grad for x in leaves]

    ours, ref = grads(soft_rasterize), grads(soft_rasterize_reference)
    for label, a, b in zip(["face_verts", "face_attrs", "texture", "face_shading"], ours, ref, strict=True):
        assert b.abs().max() > 0, label
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-6, msg=label)


def test_gradcheck_finite_differences():
    """Independent of the reference: central differences in float64 on a tiny scene."""
    fv, attrs, tex, uvs, shading, size = random_scene(B=1, F=3, H=9, W=10, C=1, Ct=2)
    s = RasterSettings(sigma=3e-2, gamma=0.1, near=1.0, far=10.0)

    def fn(fv, attrs, tex, shading):
        return soft_rasterize(fv, size, attrs, s, tex, uvs, shading)[:2]

    inputs = [x.clone().requires_grad_() for x in (fv, attrs, tex, shading)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_hard_mode_gradcheck_attrs():
    fv, attrs, _, _, _, size = random_scene(B=1, F=3, H=9, W=10, C=2)
    s = SETTINGS["hard"]
    attrs = attrs.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: soft_rasterize(fv, size, a, s)[1], [attrs], eps=1e-6, atol=1e-6)


def two_triangles(dtype=torch.float64):
    """A big front triangle (depth 2) fully hiding a smaller one behind it (depth 4)."""
    front = [[1.1, 1.2, 2.0], [18.9, 1.3, 2.0], [10.1, 18.7, 2.0]]
    back = [[7.1, 5.2, 4.0], [12.9, 5.3, 4.0], [10.1, 10.7, 4.0]]
    return torch.tensor([[front, back]], dtype=dtype)


def test_occluded_triangle_receives_gradient():
    fv = two_triangles().requires_grad_()
    colors = torch.tensor([[[[1.0, 0, 0]] * 3, [[0, 0, 1.0]] * 3]], dtype=torch.float64).requires_grad_()
    s = RasterSettings(sigma=1e-3, gamma=0.2, near=1.0, far=10.0)
    alpha, image, p2f = soft_rasterize(fv, (20, 20), colors, s)
    assert (p2f == 1).sum() == 0  # hidden: no pixel's nearest face
    image[..., 2].sum().backward()  # ask for more blue: only the hidden triangle is blue
    assert colors.grad[0, 1].abs().sum() > 1e-3
    assert fv.grad[0, 1, :, 2].abs().sum() > 1e-6  # and its depth: moving it forward would show it
    assert fv.grad[0, 1, :, 2].sum() < 0  # in the right direction (nearer = more weight)


def test_distant_triangle_receives_gradient_toward_target():
    """A silhouette loss pulls a triangle towards a target copy of it 2 px to the right."""
    fv = torch.tensor([[[[2.3, 3.1, 3.0], [9.2, 3.4, 3.0], [5.1, 10.6, 3.0]]]], dtype=torch.float64)
    s = RasterSettings(sigma=3e-2, near=1.0, far=10.0)
    target = soft_rasterize_reference(fv + torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64), (16, 16), None, s)[0]
    fv.requires_grad_()
    alpha, _, _ = soft_rasterize(fv, (16, 16), None, s)
    ((alpha - target) ** 2).sum().backward()
    assert fv.grad[0, 0, :, 0].sum() < 0  # descent moves the triangle in +u, towards the target
    assert fv.grad[0, 0, :, 1].abs().sum() < fv.grad[0, 0, :, 0].abs().sum()


def test_silhouette_of_disc_matches_analytic_area():
    """A finely tessellated disc's hard silhouette covers pi r^2 pixels; soft alpha sums to about that."""
    n, r, c = 96, 9.3, (16.1, 15.9)
    ang = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    rim = torch.stack([c[0] + r * torch.cos(ang), c[1] - r * torch.sin(ang)], -1)  # clockwise: front-facing
    centre = torch.tensor(c, dtype=torch.float64).expand(n, 2)
    tris = torch.stack([centre, rim, rim.roll(-1, 0)], 1)
    fv = torch.cat([tris, torch.full((n, 3, 1), 3.0, dtype=torch.float64)], -1)[None]
    area = 0.5 * n * r * r * math.sin(2 * math.pi / n)
    hard, _, _ = soft_rasterize(fv, (32, 32), None, RasterSettings(mode="hard", near=1.0))
    soft, _, _ = soft_rasterize(fv, (32, 32), None, RasterSettings(sigma=1e-4, near=1.0))
    assert abs(hard.sum().item() - area) < 2 * math.pi * r * 0.35  # boundary pixels only
    # Soft coverage: every pixel inside is inside one face, so alpha >= sigmoid(0) = 0.5 (SoftRas's alpha dips
    # towards 0.75 along shared edges); beyond the cut-off window (< 0.5 px here) it is exactly 0.
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    dist = torch.sqrt((xs - c[0]) ** 2 + (ys - c[1]) ** 2)
    assert (soft[0][dist < r - 1] >= 0.5).all()
    assert (soft[0][dist > r + 1] == 0).all()
    assert soft[0][dist < r - 1].mean() > 0.75


def test_binning_lists_every_touching_face_once_in_order():
    fv, *_ , size = random_scene(F=30)
    s = RasterSettings(sigma=1e-2, tile_size=4, near=1.0)
    offsets, tile_faces, tiles_x, n_tiles, _ = bin_faces(fv, size, s)
    assert offsets.shape[0] == 2 * n_tiles + 1
    for seg in range(2 * n_tiles):
        faces = tile_faces[offsets[seg]:offsets[seg + 1]].tolist()
        assert faces == sorted(set(faces))
    # Every (pixel, face) pair with non-negligible coverage in the reference is in the pixel's tile list.
    ref_alpha = soft_rasterize_reference(fv, size, None, s)[0]
    ours = soft_rasterize(fv, size, None, s)[0]
    torch.testing.assert_close(ours, ref_alpha, atol=1e-9, rtol=0)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_results_do_not_depend_on_tile_size(mode):
    # Every pixel sums its faces in the same (ascending) order whatever the tiling, so the outputs are bitwise
    # equal, for tiles that do not divide the image too. Gradients are summed per tile before they are added
    # to the face's, so they agree to rounding.
    fv, attrs, tex, uvs, shading, size = random_scene(F=30)
    results = []
    for ts in (2, 3, 7, 32, None):
        s = RasterSettings(sigma=1e-2, gamma=0.05, near=1.0, far=10.0, mode=mode, tile_size=ts)
        inputs = [x.clone().requires_grad_() for x in (fv, attrs, tex, shading)]
        alpha, image, p2f = soft_rasterize(inputs[0], size, inputs[1], s, inputs[2], uvs, inputs[3])
        (alpha.sum() + (image * torch.linspace(-1, 2, image.shape[-1])).sum()).backward()
        results.append([alpha, image, p2f] + [x.grad for x in inputs])
    assert results[0][0].max() > 0.5
    for other in results[1:]:
        for a, b in zip(results[0][:3], other[:3], strict=True):
            assert torch.equal(a, b)
        for a, b in zip(results[0][3:], other[3:], strict=True):
            assert a.abs().max() > 0
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_no_nan_for_degenerate_and_extreme_faces():
    fv = torch.tensor([[
        [[3.0, 3.0, 2.0], [3.0, 3.0, 2.0], [3.0, 3.0, 2.0]],  # a point
        [[1.0, 1.0, 2.0], [5.0, 5.0, 2.0], [9.0, 9.0, 2.0]],  # collinear
        [[1.0, 1.0, 2.0], [1e-5, 1.0, 2.0], [1.0, 1.0 + 1e-5, 2.0]],  # nearly zero area
        [[-1e7, -1e7, 2.0], [1e7, -1e7, 2.0], [0.0, 1e7, 2.0]],  # huge
        [[4.1, 4.2, 2.0], [4.1 + 1e-4, 4.2, 2.0], [4.1, 4.2 + 1e-4, 2.0]],  # tiny
        [[2.0, 2.0, 1e-3], [6.0, 2.0, 0.5], [2.0, 6.0, 3.0]],  # partly before the near plane: skipped
    ]], dtype=torch.float32).requires_grad_()
    attrs = torch.rand(1, 6, 3, 3).requires_grad_()
    for mode in ("soft", "hard"):
        alpha, image, _ = soft_rasterize(fv, (12, 12), attrs, RasterSettings(mode=mode, near=0.1))
        (alpha.sum() + image.sum()).backward()
        assert torch.isfinite(alpha).all() and torch.isfinite(image).all()
        assert torch.isfinite(fv.grad).all() and torch.isfinite(attrs.grad).all()
        fv.grad = attrs.grad = None


def test_bad_inputs_are_named():
    fv, attrs, tex, uvs, shading, size = random_scene(dtype=torch.float32)
    with pytest.raises(ValueError, match="face_verts"):
        soft_rasterize(fv[..., :2], size)
    with pytest.raises(TypeError, match="face_attrs"):
        soft_rasterize(fv, size, attrs.double())
    with pytest.raises(ValueError, match="face_attrs"):
        soft_rasterize(fv, size, attrs[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        soft_rasterize(fv * float("nan"), size)
    with pytest.raises(ValueError, match="face_uvs"):
        soft_rasterize(fv, size, None, None, tex)
    with pytest.raises(ValueError, match="image_size"):
        soft_rasterize(fv, (0, 5))
    with pytest.raises(ValueError, match="sigma"):
        RasterSettings(sigma=-1)


def test_clip_near_keeps_the_front_part():
    """Clipped pieces lie in front of the plane and their area equals the analytic front part."""
    tri = torch.tensor([[0.0, 0.0, -1.0], [2.0, 0.0, 3.0], [0.0, 2.0, 3.0]], dtype=torch.float64)
    for corners, front_fraction in [(tri, 1 - (2 / 4) ** 2),  # one corner behind: z = 1 cuts at t = 1/2
                                    (tri[[1, 2, 0]].flip(0), 1 - (2 / 4) ** 2),
                                    (torch.stack([tri[1] * torch.tensor([1, 1, -1.0]) + torch.tensor([0, 0, 2.0]),
                                                  tri[2] * torch.tensor([1, 1, -1.0]) + torch.tensor([0, 0, 2.0]),
                                                  tri[0] * torch.tensor([1, 1, -1.0]) + torch.tensor([0, 0, 2.0])]),
                                     (2 / 4) ** 2)]:
        data = corners[None, None]
        clipped, index = clip_near(data, 1.0)
        kept = clipped[0][clipped[0, :, :, 2].min(-1).values > 0]
        assert (kept[..., 2] >= 1.0 - 1e-12).all()

        def area(t):
            return 0.5 * torch.linalg.cross(t[..., 1, :] - t[..., 0, :], t[..., 2, :] - t[..., 0, :]).norm(dim=-1)

        assert abs(area(kept).sum() / area(corners[None]).sum() - front_fraction) < 1e-9
        normal = torch.linalg.cross(corners[1] - corners[0], corners[2] - corners[0])
        for t in kept:  # winding kept
            assert torch.dot(torch.linalg.cross(t[1] - t[0], t[2] - t[0]), normal) > 0
        assert index is not None and (index == 0).all()


VULKAN_SCRIPT = r"""
from taichi_dr.raster import RasterSettings, soft_rasterize
from test_raster import random_scene
out = {}
for name, s in [("soft", RasterSettings(sigma=1e-2, gamma=0.05, near=1.0, far=10.0)),
                ("hard", RasterSettings(mode="hard", near=1.0, far=10.0))]:
    fv, attrs, tex, uvs, shading, size = random_scene(dtype=torch.float32)
    leaves = [x.clone().requires_grad_() for x in (fv, attrs, tex, shading)]
    alpha, image, p2f = soft_rasterize(leaves[0], size, leaves[1], s, leaves[2], uvs, leaves[3])
    g = torch.Generator().manual_seed(3)
    loss = (alpha * torch.randn(alpha.shape, generator=g)).sum() + (image * torch.randn(image.shape, generator=g)).sum()
    loss.backward()
    out[name] = [alpha.tolist(), image.tolist(), p2f.tolist()] + [x.grad.tolist() for x in leaves]
"""


@pytest.mark.vulkan
def test_vulkan_matches_cpu(tmp_path):
    """Same forward and hand-written backward on Vulkan (Mesa lavapipe in CI) as on the cpu backend."""
    vk = run_on_vulkan(tmp_path, VULKAN_SCRIPT)
    for name, s in [("soft", RasterSettings(sigma=1e-2, gamma=0.05, near=1.0, far=10.0)),
                    ("hard", RasterSettings(mode="hard", near=1.0, far=10.0))]:
        fv, attrs, tex, uvs, shading, size = random_scene(dtype=torch.float32)
        leaves = [x.clone().requires_grad_() for x in (fv, attrs, tex, shading)]
        alpha, image, p2f = soft_rasterize(leaves[0], size, leaves[1], s, leaves[2], uvs, leaves[3])
        g = torch.Generator().manual_seed(3)
        ((alpha * torch.randn(alpha.shape, generator=g)).sum()
         + (image * torch.randn(image.shape, generator=g)).sum()).backward()
        cpu = [alpha, image, p2f] + [x.grad for x in leaves]
        labels = ["alpha", "image", "pix_to_face", "g_verts", "g_attrs", "g_texture", "g_shading"]
        for label, a, b in zip(labels, cpu, vk[name], strict=True):
            b = np.asarray(b)
            a = a.detach().numpy()
            scale = max(1.0, float(np.abs(a).max()))
            assert np.allclose(a, b, atol=2e-4 * scale, rtol=1e-3), f"{name} {label}: max diff {np.abs(a - b).max()}"
