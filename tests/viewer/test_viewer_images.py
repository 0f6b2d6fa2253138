"""Viewer images against hand-computed pixels: outputs, error maps, layout, masks, lines, projected
wireframes and frustums, curves; degenerate inputs stay finite."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from taichi_dr.core.camera import Cameras
from taichi_dr.core.mesh import Mesh, icosphere
from taichi_dr.viewer.images import (
    CURVE_BACKGROUND,
    DEPTH_FAR_LEVEL,
    GAP_LEVEL,
    OUTPUTS,
    curve_image,
    display_image,
    draw_segments,
    error_image,
    frustum_segments,
    overlay_mask,
    resize_nearest,
    side_by_side,
    wireframe_segments,
)
from taichi_dr.viewer.orbit import OrbitCamera

F64 = torch.float64
RED = (1.0, 0.0, 0.0)


def grey(values):
    v = np.asarray(values, np.float32)
    return np.repeat(v[..., None], 3, -1)


# -- display_image -----------------------------------------------------------------------------------------

def test_colour_is_clipped_rgb_and_finite():
    rgb = torch.tensor([[[[0.2, 0.5, 1.4], [-0.1, float("nan"), 0.7]]]])  # (1, 1, 2, 3), a batch of one
    for output in ("colour", "wireframe", "silhouette"):
        out = display_image({"rgb": rgb}, output)
        assert out.dtype == np.float32 and out.shape == (1, 2, 3)
        np.testing.assert_allclose(out, [[[0.2, 0.5, 1.0], [0.0, 0.0, 0.7]]], atol=1e-7)


def test_depth_near_light_far_dark_background_black():
    depth = torch.tensor([[[1.0, 2.0], [3.0, 9.0]]])          # (1, 2, 2); 9 is not covered
    alpha = torch.tensor([[[1.0, 0.9], [0.6, 0.4]]])
    out = display_image({"depth": depth, "alpha": alpha}, "depth")
    np.testing.assert_allclose(out, grey([[1.0, 0.6], [0.2, 0.0]]), atol=1e-6)
    assert DEPTH_FAR_LEVEL == 0.2
    # Without alpha, depth > 0 is the coverage.
    out = display_image({"depth": np.array([[2.0, 0.0], [4.0, 3.0]])}, "depth")
    np.testing.assert_allclose(out, grey([[1.0, 0.0], [0.2, 0.6]]), atol=1e-6)
    # One depth everywhere: all near-light; nothing covered: all black.
    np.testing.assert_allclose(display_image({"depth": np.full((2, 3), 5.0)}, "depth"), grey(np.ones((2, 3))))
    np.testing.assert_array_equal(display_image({"depth": np.zeros((2, 3))}, "depth"), grey(np.zeros((2, 3))))


def test_normals_shifted_where_covered_white_elsewhere():
    normals = np.array([[[0.0, 0.0, 1.0], [0.6, -0.8, 0.0]], [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    alpha = np.array([[1.0, 1.0], [0.2, 0.0]])
    out = display_image({"normals": normals, "alpha": alpha}, "normals")
    np.testing.assert_allclose(out, [[[0.5, 0.5, 1.0], [0.8, 0.1, 0.5]], [[1, 1, 1], [1, 1, 1]]], atol=1e-6)
    # Without alpha: normals of zero length are "nothing".
    out = display_image({"normals": normals}, "normals")
    np.testing.assert_allclose(out[1], [[0.5, 1.0, 0.5], [1.0, 1.0, 1.0]], atol=1e-6)


def test_opacity_is_grey_alpha():
    out = display_image({"alpha": torch.tensor([[0.0, 0.25], [1.0, 1.5]])}, "opacity")
    np.testing.assert_allclose(out, grey([[0.0, 0.25], [1.0, 1.0]]))


def test_missing_key_and_unknown_output_are_named():
    with pytest.raises(ValueError, match=r"'depth'.*\['alpha', 'rgb'\]"):
        display_image({"rgb": np.zeros((2, 2, 3)), "alpha": np.zeros((2, 2)), "normals": None}, "depth")
    with pytest.raises(ValueError, match=r"'normals'"):
        display_image({"rgb": np.zeros((2, 2, 3))}, "normals")
    with pytest.raises(ValueError, match=r"'opacity' needs the render's 'alpha'"):
        display_image({}, "opacity")
    with pytest.raises(ValueError, match="must be one of"):
        display_image({"rgb": np.zeros((2, 2, 3))}, "color")
    with pytest.raises(ValueError, match=r"render\['rgb'\]: expected shape"):
        display_image({"rgb": np.zeros((2, 2))}, "colour")
    assert OUTPUTS == ("colour", "depth", "normals", "opacity", "wireframe", "silhouette")


# -- error_image, side_by_side, resize_nearest, overlay_mask -------------------------------------------------

def test_error_image_heat_map():
    rgb = np.zeros((1, 5, 3))
    target = np.repeat(np.array([0.0, 1 / 6, 1 / 3, 2 / 3, 1.0])[None, :, None], 3, -1)
    target[0, 1] = [0.5, 0.0, 0.0]  # mean over channels: 1/6
    out = error_image(rgb, torch.from_numpy(target))
    np.testing.assert_allclose(out[0], [[0, 0, 0], [0.5, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]], atol=1e-6)
    # A smaller target is resized to the render's size; grey silhouettes are accepted.
    out = error_image(np.ones((4, 4)), np.zeros((2, 2)))
    np.testing.assert_allclose(out, np.ones((4, 4, 3)))


def test_resize_nearest_by_hand():
    img = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(resize_nearest(img, (4, 4)), np.kron(img, np.ones((2, 2))))
    big = np.arange(16.0).reshape(4, 4)
    np.testing.assert_array_equal(resize_nearest(big, (2, 2)), [[5.0, 7.0], [13.0, 15.0]])
    assert resize_nearest(np.zeros((3, 5, 3)), (7, 2)).shape == (7, 2, 3)
    with pytest.raises(ValueError, match="size"):
        resize_nearest(img, (0, 3))


def test_side_by_side_layout():
    a = np.full((4, 3, 3), 0.1)
    b = np.array([[0.2, 0.3], [0.4, 0.5]])  # grey, half the height: doubled
    out = side_by_side([a, b], gap=2)
    assert out.shape == (4, 3 + 2 + 4, 3)
    np.testing.assert_allclose(out[:, :3], a)
    np.testing.assert_allclose(out[:, 3:5], GAP_LEVEL)
    np.testing.assert_allclose(out[:, 5:, 0], np.kron(b, np.ones((2, 2))))
    assert side_by_side([a], gap=5).shape == (4, 3, 3)
    with pytest.raises(ValueError, match="at least one"):
        side_by_side([])


def test_overlay_mask_outline_and_fill():
    img = np.zeros((5, 5, 3))
    mask = np.zeros((5, 5))
    mask[1:4, 1:4] = 1
    out = overlay_mask(img, mask, colour=RED)
    ring = np.zeros((5, 5), bool)
    ring[1:4, 1:4] = True
    ring[2, 2] = False
    np.testing.assert_array_equal(out[ring], np.tile(RED, (8, 1)))
    np.testing.assert_array_equal(out[~ring], 0.0)
    # A mask touching the image border: the border is not an edge of it.
    full = overlay_mask(img, np.ones((5, 5)), colour=RED)
    np.testing.assert_array_equal(full, 0.0)
    filled = overlay_mask(np.full((5, 5, 3), 0.5), mask, colour=RED, outline_only=False)
    np.testing.assert_allclose(filled[2, 2], [0.75, 0.25, 0.25])
    np.testing.assert_allclose(filled[0, 0], [0.5, 0.5, 0.5])
    assert img.max() == 0  # the input is not modified


# -- draw_segments ------------------------------------------------------------------------------------------

def lit(img):
    """The set of (row, col) pixels that are red."""
    return {(int(i), int(j)) for i, j in zip(*np.nonzero((img == RED).all(-1)), strict=True)}


def canvas(h=6, w=8):
    return np.zeros((h, w, 3), np.float32)


def test_draw_horizontal_vertical_diagonal_by_hand():
    out = draw_segments(canvas(), [[1.5, 2.5]], [[5.5, 2.5]], RED)
    assert lit(out) == {(2, j) for j in range(1, 6)}
    out = draw_segments(canvas(), [[6.2, 0.5]], [[6.2, 4.9]], RED)
    assert lit(out) == {(i, 6) for i in range(0, 5)}
    out = draw_segments(canvas(), [[4.5, 4.5], [7.5, 0.5]], [[0.5, 0.5], [5.5, 2.5]], RED)
    assert lit(out) == {(i, i) for i in range(5)} | {(0, 7), (1, 6), (2, 5)}
    # Both ends of a one-pixel segment, and a point.
    assert lit(draw_segments(canvas(), [[3.5, 3.5]], [[3.5, 3.5]], RED)) == {(3, 3)}
    # Width 3: a 3-pixel band.
    out = draw_segments(canvas(), [[1.5, 2.5]], [[5.5, 2.5]], RED, width=3)
    assert lit(out) == {(i, j) for i in (1, 2, 3) for j in range(0, 7)}


def test_draw_clips_and_skips_non_finite_ends():
    out = draw_segments(canvas(), [[-1e9, 2.5]], [[1e9, 2.5]], RED)  # huge: clipped, not sampled a billion times
    assert lit(out) == {(2, j) for j in range(8)}
    out = draw_segments(canvas(), [[-3.0, -1.0]], [[-1.0, 9.0]], RED)  # wholly outside
    assert lit(out) == set()
    out = draw_segments(canvas(), [[2.5, -10.0]], [[2.5, 10.0]], RED)  # crosses the image vertically
    assert lit(out) == {(i, 2) for i in range(6)}
    p0 = np.array([[float("nan"), 1.0], [1.5, 1.5], [0.5, float("inf")]])
    p1 = np.array([[3.0, 3.0], [3.5, 1.5], [4.0, 4.0]])
    assert lit(draw_segments(canvas(), p0, p1, RED)) == {(1, 1), (1, 2), (1, 3)}
    assert lit(draw_segments(canvas(), np.zeros((0, 2)), np.zeros((0, 2)), RED)) == set()
    base = canvas()
    draw_segments(base, [[0.5, 0.5]], [[5.5, 0.5]], RED)
    assert base.max() == 0  # a new image; the input is left alone


# -- wireframe_segments -------------------------------------------------------------------------------------

def facing_triangle():
    """A triangle in the z = 0 plane, seen from (0, 0, -3) (camera z = 3 on it), facing that camera."""
    verts = torch.tensor([[-1.0, -0.5, 0.0], [0.0, 1.0, 0.0], [1.0, -0.5, 0.0]])
    cam = Cameras.look_at(torch.tensor([0.0, 0.0, -3.0]), image_size=(40, 40), fov=60.0)
    return Mesh(verts, torch.tensor([[0, 1, 2]])), cam


def as_segment_set(p0, p1, decimals=4):
    return {tuple(sorted((tuple(np.round(a, decimals)), tuple(np.round(b, decimals)))))
            for a, b in zip(p0, p1, strict=True)}


def test_wireframe_of_a_triangle_is_its_three_projected_edges():
    mesh, cam = facing_triangle()
    p0, p1 = wireframe_segments(mesh, cam)
    assert p0.shape == (3, 2) and p1.dtype == np.float32
    uv = cam.project(mesh.verts)[0, :, :2].numpy()
    expected = as_segment_set(uv[[0, 1, 2]], uv[[1, 2, 0]])
    assert as_segment_set(p0, p1) == expected
    # Shared edges of two triangles appear once.
    quad = Mesh(torch.cat([mesh.verts, torch.tensor([[0.0, -2.0, 0.0]])]), torch.tensor([[0, 1, 2], [0, 2, 3]]))
    assert len(wireframe_segments(quad, cam)[0]) == 5


def test_wireframe_drops_hidden_edges_given_depth():
    mesh, cam = facing_triangle()
    uv = cam.project(mesh.verts)[0, :, :2].numpy()
    # Something at z = 2 covers the midpoint of edge (0, 2) only (the triangle is at z = 3); elsewhere the
    # triangle itself (z = 3) or nothing (0).
    depth = np.zeros((40, 40))
    depth[10:30, 10:30] = 3.0
    mid = (uv[0] + uv[2]) / 2
    depth[int(mid[1]) - 1:int(mid[1]) + 2, int(mid[0]) - 1:int(mid[0]) + 2] = 2.0
    p0, p1 = wireframe_segments(mesh, cam, depth=torch.from_numpy(depth))
    assert as_segment_set(p0, p1) == as_segment_set(uv[[0, 1]], uv[[1, 2]])
    # A depth map at another resolution is looked up at the same place in the view.
    coarse = depth[::2, ::2]
    assert len(wireframe_segments(mesh, cam, depth=coarse)[0]) == 2
    assert len(wireframe_segments(mesh, cam, depth=np.full((40, 40), 3.0))[0]) == 3
    assert len(wireframe_segments(mesh, cam, depth=np.full((40, 40), 2.5))[0]) == 0


def test_wireframe_skips_edges_behind_the_camera_and_empty_meshes():
    mesh, cam = facing_triangle()
    behind = Mesh(mesh.verts + torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -4.0], [0.0, 0.0, 0.0]]), mesh.faces)
    p0, p1 = wireframe_segments(behind, cam)
    assert len(p0) == 1 and np.isfinite(p0).all() and np.isfinite(p1).all()  # only edge (0, 2) is in front
    empty = Mesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64))
    p0, p1 = wireframe_segments(empty, cam)
    assert p0.shape == (0, 2) and p1.shape == (0, 2)
    sphere = icosphere(1)
    p0, p1 = wireframe_segments(sphere, cam.to(dtype=F64))
    assert len(p0) == 30 * 4 and np.isfinite(p0).all()  # level-1 icosphere: 120 edges
    with pytest.raises(ValueError, match="1 camera"):
        wireframe_segments(sphere, Cameras.look_at(torch.ones(2, 3)))


# -- frustum_segments ---------------------------------------------------------------------------------------

def test_frustum_segments_project_centres_and_corners():
    training = Cameras.from_spherical(torch.full((4,), 2.5, dtype=F64), torch.tensor([10.0, 20.0, 30.0, 40.0]).double(),
                                      torch.tensor([0.0, 90.0, 180.0, 270.0]).double(), 30.0, (24, 32))
    view = OrbitCamera(distance=8.0, elevation=35.0, azimuth=20.0).cameras((60, 80), dtype=F64)
    size = 0.4
    p0, p1 = frustum_segments(view, training, size)
    assert p0.shape == (32, 2) and p1.shape == (32, 2)
    centres = view.project(training.camera_centers())[0, :, :2].numpy()
    for i in range(4):
        np.testing.assert_allclose(p0[8 * i:8 * i + 4], np.repeat(centres[i:i + 1], 4, 0), atol=1e-3)
    # The far corners: along the rays through the image corners, at camera depth `size`.
    h, w = training.image_size
    corner_px = torch.tensor([[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]], dtype=F64)
    origins, dirs = training.pixel_rays(corner_px)                                  # (4, 4, 3)
    forward = training.R[:, 2][:, None]
    corners = origins + dirs * (size / (dirs * forward).sum(-1, keepdim=True))
    want = view.project(corners.reshape(-1, 3))[0, :, :2].numpy().reshape(4, 4, 2)
    for i in range(4):
        np.testing.assert_allclose(p1[8 * i:8 * i + 4], want[i], atol=1e-3)
        np.testing.assert_allclose(p0[8 * i + 4:8 * i + 8], want[i], atol=1e-3)
        np.testing.assert_allclose(p1[8 * i + 4:8 * i + 8], np.roll(want[i], -1, 0), atol=1e-3)


def test_frustum_segments_behind_the_view_are_clipped_or_dropped():
    view = Cameras.look_at(torch.tensor([0.0, 0.0, -3.0], dtype=F64), image_size=(20, 20))
    # A camera behind the viewer: its frustum lies wholly behind the view -> nothing.
    behind = Cameras.look_at(torch.tensor([0.0, 0.0, -6.0], dtype=F64), torch.tensor([0.0, 0.0, -9.0], dtype=F64),
                             image_size=(20, 20))
    p0, p1 = frustum_segments(view, behind, 0.5)
    assert len(p0) == 0
    # A camera beside the viewer looking back at it: the segments crossing the near plane are cut, finite.
    across = Cameras.look_at(torch.tensor([0.5, 0.0, -2.5], dtype=F64), torch.tensor([0.5, 0.0, -6.0], dtype=F64),
                             image_size=(20, 20))
    p0, p1 = frustum_segments(view, across, 1.0)
    assert 0 < len(p0) <= 8 and np.isfinite(p0).all() and np.isfinite(p1).all()
    with pytest.raises(ValueError, match="size"):
        frustum_segments(view, across, 0.0)
    assert frustum_segments(view, across[0:0], 1.0)[0].shape == (0, 2)


# -- curve_image --------------------------------------------------------------------------------------------

def test_curve_of_empty_and_non_finite_values_is_the_background():
    background = np.empty((20, 30, 3), np.float32)
    background[:] = CURVE_BACKGROUND
    for values in ([], [float("nan")] * 5, [float("inf"), -float("inf")], torch.tensor([float("nan")]),
                   np.array([-1.0, 0.0])):
        out = curve_image(values, (20, 30))
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(out, background)
    assert not np.array_equal(curve_image(np.array([-1.0, 0.0]), (20, 30), log=False), background)


def test_curve_runs_from_the_first_value_to_the_last():
    values = [10.0, float("nan"), 1.0, 0.1, float("inf"), 0.01]
    out = curve_image(values, (20, 30))
    drawn = np.nonzero((out != np.asarray(CURVE_BACKGROUND, np.float32)).any(-1))
    rows, cols = drawn
    # Largest value top-left, smallest bottom-right, within the 2-pixel margin; log scale: evenly stepped.
    assert cols.min() == 2 and cols.max() == 27 and rows.min() == 2 and rows.max() == 17
    assert rows[cols == cols.min()].min() == 2 and rows[cols == cols.max()].max() == 17
    mid_col = int(2 + 3 / 5 * 25)  # index 3 (0.1): two thirds of the way down in log10
    assert (abs(rows[cols == mid_col] - (2 + 2 / 3 * 15)) <= 1.5).any()
    # A constant sits in the middle; a single value is a dot.
    flat = curve_image([0.5] * 10, (21, 30))
    assert set(np.nonzero((flat != np.asarray(CURVE_BACKGROUND, np.float32)).any(-1))[0]) == {10}
    dot = curve_image([3.0], (10, 10))
    assert (dot != np.asarray(CURVE_BACKGROUND, np.float32)).any(-1).sum() == 1
    long = curve_image(np.exp(-np.linspace(0, 5, 100_000)), (40, 64))
    assert np.isfinite(long).all() and math.isclose(float(long.max()), 1.0)
