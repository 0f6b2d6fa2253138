"""The viewer's images: render outputs made displayable, comparisons, overlays and line drawings.

Images are numpy float32 ``(H, W, 3)`` in [0, 1], row 0 at the top; pixel ``(i, j)`` covers
``[j, j + 1) x [i, i + 1)`` in pixel coordinates (x right, y down), as in :class:`Cameras`. Inputs may be
numpy arrays or torch tensors (any device), with or without a leading batch dimension of 1. Nothing here
opens a window or launches a Taichi kernel.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from taichi_dr.core.camera import Cameras, _check_image_size

__all__ = [
    "OUTPUTS",
    "curve_image",
    "display_image",
    "draw_segments",
    "error_image",
    "frustum_segments",
    "overlay_mask",
    "resize_nearest",
    "side_by_side",
    "wireframe_segments",
]

OUTPUTS = ("colour", "depth", "normals", "opacity", "wireframe", "silhouette")
# Which render keys each output needs.
_NEEDS = {"colour": "rgb", "depth": "depth", "normals": "normals", "opacity": "alpha", "wireframe": "rgb",
          "silhouette": "rgb"}
DEPTH_NEAR_LEVEL = 1.0        # grey level of the nearest depth shown
DEPTH_FAR_LEVEL = 0.2         # and of the farthest: dark, but apart from the black background
GAP_LEVEL = 1.0               # the gap between side-by-side images
MASK_FILL_OPACITY = 0.5       # overlay_mask(outline_only=False)
CURVE_BACKGROUND = (0.08, 0.08, 0.1)
CURVE_COLOUR = (0.35, 0.8, 1.0)
CURVE_MARGIN = 2              # pixels kept free around the plotted line
# Points nearer than this to the viewing camera (camera z) are behind its near plane.
NEAR = 1e-4


# ----------------------------------------------------------------------------------------------------------
# conversions
# ----------------------------------------------------------------------------------------------------------

def _array(x, name: str) -> np.ndarray:
    """Tensor or array -> float32 numpy with non-finite values set to 0."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected an array of numbers, got {type(x).__name__}") from e
    return np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)


def _image(x, name: str, channels: int) -> np.ndarray:
    """``(H, W, C)`` / ``(1, H, W, C)`` (C = channels) or, for channels == 1, ``(H, W)`` / ``(1, H, W)`` /
    ``(H, W, 1)`` -> ``(H, W, C)`` (``(H, W)`` for channels == 1) float32."""
    arr = _array(x, name)
    if channels == 1:
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        ok = arr.ndim == 2
    else:
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        ok = arr.ndim == 3 and arr.shape[-1] == channels
    if not ok:
        want = "(H, W) or (1, H, W)" if channels == 1 else f"(H, W, {channels}) or (1, H, W, {channels})"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(arr.shape)}")
    return arr


def _rgb(x, name: str) -> np.ndarray:
    """An ``(H, W, 3)`` image, or a grey ``(H, W)`` one repeated to 3 channels."""
    arr = _array(x, name)
    grey = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[0] == 1 and arr.shape[-1] != 3)
    return np.repeat(_image(arr, name, 1)[..., None], 3, -1) if grey else _image(arr, name, 3)


def _colour(colour, name: str = "colour") -> np.ndarray:
    c = _array(colour, name).reshape(-1)
    if c.shape != (3,):
        raise ValueError(f"{name}: expected 3 numbers (r, g, b) in [0, 1], got {colour!r}")
    return np.clip(c, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# render outputs
# ----------------------------------------------------------------------------------------------------------

def display_image(render: dict, output: str) -> np.ndarray:
    """One output of a render (``render(cameras)``'s dict, first view) as an ``(H, W, 3)`` float32 image.

    colour: ``rgb`` clipped to [0, 1]. depth: grey, the nearest depth on the view 1.0 and the farthest 0.2
    (linear in between; all 1.0 when they are equal), black where ``alpha <= 0.5`` (where ``depth <= 0`` when
    there is no alpha). normals: ``n * 0.5 + 0.5`` where alpha > 0.5 (where |n| > 0.5 without alpha), white
    elsewhere. opacity: ``alpha`` as grey. wireframe, silhouette: the colour image (lines and masks are drawn
    over it by the caller). ValueError naming the output and the keys present when a needed key is missing.
    """
    if output not in OUTPUTS:
        raise ValueError(f"display_image: output must be one of {OUTPUTS}, got {output!r}")
    need = _NEEDS[output]
    if not isinstance(render, dict) or render.get(need) is None:
        keys = sorted(k for k, v in render.items() if v is not None) if isinstance(render, dict) else []
        raise ValueError(f"display_image: output {output!r} needs the render's {need!r}, "
                         f"but it has only {keys}")
    if output in ("colour", "wireframe", "silhouette"):
        return np.clip(_image(render["rgb"], "render['rgb']", 3), 0.0, 1.0)
    if output == "opacity":
        alpha = np.clip(_image(render["alpha"], "render['alpha']", 1), 0.0, 1.0)
        return np.repeat(alpha[..., None], 3, -1)
    if output == "depth":
        depth = _image(render["depth"], "render['depth']", 1)
        covered = _coverage(render, depth.shape, fallback=depth > 0)
        out = np.zeros(depth.shape, np.float32)
        if covered.any():
            near, far = float(depth[covered].min()), float(depth[covered].max())
            span = far - near
            fraction = (depth - near) / span if span > 1e-12 * max(abs(far), 1.0) else np.zeros_like(depth)
            level = DEPTH_NEAR_LEVEL + (DEPTH_FAR_LEVEL - DEPTH_NEAR_LEVEL) * np.clip(fraction, 0.0, 1.0)
            out = np.where(covered, level, 0.0).astype(np.float32)
        return np.repeat(out[..., None], 3, -1)
    normals = _image(render["normals"], "render['normals']", 3)
    covered = _coverage(render, normals.shape[:2], fallback=np.linalg.norm(normals, axis=-1) > 0.5)
    shown = np.clip(normals * 0.5 + 0.5, 0.0, 1.0)
    return np.where(covered[..., None], shown, 1.0).astype(np.float32)


def _coverage(render: dict, shape: tuple[int, ...], fallback: np.ndarray) -> np.ndarray:
    """``alpha > 0.5`` from the render when it has an alpha of ``shape``, else ``fallback`` (H, W) bool."""
    if render.get("alpha") is None:
        return fallback
    alpha = _image(render["alpha"], "render['alpha']", 1)
    if alpha.shape != tuple(shape):
        raise ValueError(f"display_image: render['alpha'] is {alpha.shape[0]}x{alpha.shape[1]} but the other "
                         f"outputs are {shape[0]}x{shape[1]}")
    return alpha > 0.5


def error_image(rgb, target_rgb) -> np.ndarray:
    """Per-pixel mean |rgb - target| over channels as a heat map (H, W, 3): 0 black, 1/3 red, 2/3 yellow,
    1 white (``r = 3e``, ``g = 3e - 1``, ``b = 3e - 2``, clipped). Grey (H, W) inputs (silhouettes) are
    allowed; the target is resized (nearest) to rgb's size."""
    a = np.clip(_rgb(rgb, "rgb"), 0.0, 1.0)
    b = np.clip(_rgb(target_rgb, "target_rgb"), 0.0, 1.0)
    if b.shape != a.shape:
        b = resize_nearest(b, a.shape[:2])
    e = np.abs(a - b).mean(-1)
    heat = np.stack([3 * e, 3 * e - 1, 3 * e - 2], -1)
    return np.clip(heat, 0.0, 1.0).astype(np.float32)


def side_by_side(images: list, gap: int = 2) -> np.ndarray:
    """Images left to right, each resized (nearest) to the first one's height keeping its aspect, with
    ``gap`` columns of GAP_LEVEL between; grey (H, W) images become 3-channel. -> (H0, sum W + gaps, 3)."""
    if not images:
        raise ValueError("side_by_side: expected at least one image")
    if gap < 0:
        raise ValueError(f"side_by_side: gap must be >= 0, got {gap}")
    rgbs = [_rgb(im, f"images[{i}]") for i, im in enumerate(images)]
    height = rgbs[0].shape[0]
    parts = []
    for i, im in enumerate(rgbs):
        if i:
            parts.append(np.full((height, gap, 3), GAP_LEVEL, np.float32))
        width = max(1, round(im.shape[1] * height / im.shape[0]))
        parts.append(im if im.shape[:2] == (height, width) else resize_nearest(im, (height, width)))
    return np.concatenate(parts, axis=1).astype(np.float32)


def resize_nearest(img, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of ``(H, W)`` or ``(H, W, C)`` to ``size`` (H', W'): output pixel centre
    ``(i + 0.5) * H / H'`` picks the input pixel containing it."""
    h2, w2 = _check_image_size(size, "size")
    arr = _array(img, "img")
    if arr.ndim not in (2, 3) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"resize_nearest: expected a non-empty (H, W) or (H, W, C) image, got {arr.shape}")
    h, w = arr.shape[:2]
    rows = np.minimum(((np.arange(h2) + 0.5) * h / h2).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(w2) + 0.5) * w / w2).astype(np.int64), w - 1)
    return arr[rows[:, None], cols[None, :]]


def overlay_mask(img, mask, colour=(1.0, 0.2, 0.2), outline_only: bool = True) -> np.ndarray:
    """``img`` (H, W, 3) with ``mask`` (any size, resized nearest; > 0.5 is inside) marked in ``colour``:
    its outline (inside pixels with a 4-neighbour outside; the image border does not count as outside) set
    to the colour, or with ``outline_only=False`` the whole inside blended 50 % towards it. -> new array."""
    out = np.clip(_rgb(img, "img"), 0.0, 1.0).copy()
    inside = _image(mask, "mask", 1) > 0.5
    if inside.shape != out.shape[:2]:
        inside = resize_nearest(inside.astype(np.float32), out.shape[:2]) > 0.5
    c = _colour(colour)
    if not outline_only:
        out[inside] = (1 - MASK_FILL_OPACITY) * out[inside] + MASK_FILL_OPACITY * c
        return out
    padded = np.pad(inside, 1, mode="edge")
    all_neighbours_inside = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    out[inside & ~all_neighbours_inside] = c
    return out


# ----------------------------------------------------------------------------------------------------------
# lines
# ----------------------------------------------------------------------------------------------------------

def _points2(p, name: str) -> np.ndarray:
    if isinstance(p, torch.Tensor):
        p = p.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim == 1 and arr.shape[0] == 2:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name}: expected pixel coordinates of shape (S, 2), got {tuple(arr.shape)}")
    return arr


def _clip_to_box(p0: np.ndarray, p1: np.ndarray, w: float, h: float):
    """Liang-Barsky: clip segments (S, 2) to [0, w] x [0, h]. -> (p0, p1, keep (S,) bool)."""
    d = p1 - p0
    t0, t1 = np.zeros(len(p0)), np.ones(len(p0))
    keep = np.ones(len(p0), bool)
    for p, q in ((-d[:, 0], p0[:, 0]), (d[:, 0], w - p0[:, 0]), (-d[:, 1], p0[:, 1]), (d[:, 1], h - p0[:, 1])):
        parallel = p == 0
        keep &= ~(parallel & (q < 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(parallel, 0.0, q / np.where(parallel, 1.0, p))
        t0 = np.where(~parallel & (p < 0), np.maximum(t0, r), t0)
        t1 = np.where(~parallel & (p > 0), np.minimum(t1, r), t1)
    keep &= t0 <= t1
    return p0 + t0[:, None] * d, p0 + t1[:, None] * d, keep


def draw_segments(img, p0, p1, colour, width: int = 1) -> np.ndarray:
    """``img`` (H, W, 3) with the segments ``p0[s] -> p1[s]`` (each (S, 2), pixel coordinates x right, y down)
    drawn in ``colour`` (3,). -> new array.

    Each segment is sampled at ``ceil(max(|dx|, |dy|)) + 1`` evenly spaced points (so at most one step per
    pixel row/column, both ends included) and the pixel containing each sample is set; ``width`` > 1 grows
    every such pixel to a width x width square. Segments are clipped to the image first; those with a NaN or
    infinite end are skipped."""
    out = np.clip(_rgb(img, "img"), 0.0, 1.0).copy()
    a, b = _points2(p0, "p0"), _points2(p1, "p1")
    if a.shape != b.shape:
        raise ValueError(f"draw_segments: p0 and p1 must have the same shape, got {a.shape} and {b.shape}")
    if int(width) < 1:
        raise ValueError(f"draw_segments: width must be >= 1, got {width}")
    c = _colour(colour)
    h, w = out.shape[:2]
    finite = np.isfinite(a).all(1) & np.isfinite(b).all(1)
    a, b = a[finite], b[finite]
    a, b, keep = _clip_to_box(a, b, float(w), float(h))
    a, b = a[keep], b[keep]
    if len(a) == 0:
        return out
    counts = np.ceil(np.abs(b - a).max(1)).astype(np.int64) + 1                  # (S,)
    seg = np.repeat(np.arange(len(a)), counts)
    first = np.cumsum(counts) - counts
    step = np.arange(counts.sum()) - np.repeat(first, counts)
    t = step / np.maximum(counts - 1, 1)[seg]
    xy = a[seg] + t[:, None] * (b - a)[seg]                                      # (samples, 2)
    cols, rows = np.floor(xy[:, 0]).astype(np.int64), np.floor(xy[:, 1]).astype(np.int64)
    lo = -((int(width) - 1) // 2)
    for di in range(lo, lo + int(width)):
        for dj in range(lo, lo + int(width)):
            r, q = rows + di, cols + dj
            ok = (r >= 0) & (r < h) & (q >= 0) & (q < w)
            out[r[ok], q[ok]] = c
    return out


def _single_view(camera, what: str) -> Cameras:
    if not isinstance(camera, Cameras):
        raise TypeError(f"{what}: expected Cameras, got {type(camera).__name__}")
    if len(camera) != 1:
        raise ValueError(f"{what}: expected 1 camera, got {len(camera)}")
    return camera.detach().to(device="cpu", dtype=torch.float64)


def _clip_near(a: np.ndarray, b: np.ndarray):
    """Clip camera-space segments (S, 3) to z >= NEAR. -> (a, b, keep (S,) bool)."""
    za, zb = a[:, 2], b[:, 2]
    keep = (za >= NEAR) | (zb >= NEAR)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(za != zb, (NEAR - za) / np.where(za != zb, zb - za, 1.0), 0.0)
    cut = a + t[:, None] * (b - a)
    a = np.where((za < NEAR)[:, None], cut, a)
    b = np.where((zb < NEAR)[:, None], cut, b)
    return a, b, keep


def _to_pixels(cam: Cameras, points_c: np.ndarray) -> np.ndarray:
    """Camera-space points (N, 3) -> pixels (N, 2); meant for z >= NEAR (nearer points are divided by NEAR,
    only so that nothing divides by zero)."""
    K = cam.K[0].numpy()
    z = np.maximum(points_c[:, 2], NEAR)
    x, y = points_c[:, 0] / z, points_c[:, 1] / z
    return np.stack([K[0, 0] * x + K[0, 1] * y + K[0, 2], K[1, 1] * y + K[1, 2]], -1)


def wireframe_segments(mesh, camera: Cameras, depth=None) -> tuple[np.ndarray, np.ndarray]:
    """The mesh's unique edges projected by ``camera`` (1 view): ``(p0, p1)``, each (S, 2) float32 pixels.

    Edges with an end nearer than the near plane (camera z < NEAR) are skipped. With ``depth`` (H', W') of
    the same view (camera z or distance along the ray, 0 where nothing; any resolution), an edge whose
    world midpoint has camera z > depth * 1.01 + 1e-4 at the pixel it projects to (where depth > 0) is
    hidden and dropped; midpoints outside the image are kept."""
    cam = _single_view(camera, "wireframe_segments")
    verts = mesh.verts.detach().to("cpu", torch.float64) if isinstance(mesh.verts, torch.Tensor) else \
        torch.as_tensor(np.asarray(mesh.verts, np.float64))
    faces = np.asarray(mesh.faces.detach().cpu() if isinstance(mesh.faces, torch.Tensor) else mesh.faces)
    empty = (np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32))
    if faces.size == 0 or verts.numel() == 0:
        return empty
    faces = faces.reshape(-1, 3).astype(np.int64)
    verts = verts.reshape(-1, 3)
    if faces.min() < 0 or faces.max() >= len(verts):
        raise ValueError(f"wireframe_segments: {getattr(mesh, 'name', 'mesh')}: face indices must be in "
                         f"[0, {len(verts)}), got [{faces.min()}, {faces.max()}]")
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    base = len(verts)
    keys = np.unique(edges[:, 0] * base + edges[:, 1])  # 1-D keys: np.unique is much faster on them
    edges = np.stack(np.divmod(keys, base), -1)         # (E, 2)
    vc = cam.world_to_camera(verts)[0].numpy()          # (V, 3)
    vc = np.nan_to_num(vc, nan=-1.0, posinf=-1.0, neginf=-1.0)  # non-finite vertices count as behind
    za, zb = vc[edges[:, 0], 2], vc[edges[:, 1], 2]
    edges = edges[(za >= NEAR) & (zb >= NEAR)]
    if len(edges) == 0:
        return empty
    pix = _to_pixels(cam, vc)
    if depth is not None:
        d = _image(depth, "depth", 1)
        h, w = cam.image_size
        mid = 0.5 * (vc[edges[:, 0]] + vc[edges[:, 1]])
        mu, mv = _to_pixels(cam, mid).T
        cols = np.floor(mu * d.shape[1] / w).astype(np.int64)
        rows = np.floor(mv * d.shape[0] / h).astype(np.int64)
        inside = (rows >= 0) & (rows < d.shape[0]) & (cols >= 0) & (cols < d.shape[1])
        surface = np.zeros(len(edges))
        surface[inside] = d[rows[inside], cols[inside]]
        hidden = (surface > 0) & (mid[:, 2] > surface * 1.01 + 1e-4)
        edges = edges[~hidden]
    return pix[edges[:, 0]].astype(np.float32), pix[edges[:, 1]].astype(np.float32)


def frustum_segments(view: Cameras, cameras: Cameras, size: float) -> tuple[np.ndarray, np.ndarray]:
    """The viewing frusta of ``cameras`` (N) drawn in the pixels of ``view`` (1 camera): ``(p0, p1)``, each
    (S, 2) float32, S <= 8 N.

    Per camera, in this order: its centre joined to the 4 image corners (0, 0), (W, 0), (W, H), (0, H)
    placed at camera depth ``size``, then the 4 edges of that far rectangle. Segments are clipped at
    ``view``'s near plane (camera z = NEAR); those wholly behind it are dropped."""
    v = _single_view(view, "frustum_segments: view")
    if not isinstance(cameras, Cameras):
        raise TypeError(f"frustum_segments: cameras must be Cameras, got {type(cameras).__name__}")
    size = float(size)
    if not math.isfinite(size) or size <= 0:
        raise ValueError(f"frustum_segments: size must be finite and > 0, got {size}")
    empty = (np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32))
    if len(cameras) == 0:
        return empty
    cams = cameras.detach().to(device="cpu", dtype=torch.float64)
    h, w = cams.image_size
    corners_px = torch.tensor([[0.0, 0.0, 1.0], [w, 0.0, 1.0], [w, h, 1.0], [0.0, h, 1.0]], dtype=torch.float64)
    corners_c = torch.linalg.solve(cams.K[:, None], corners_px[None, :, :, None])[..., 0] * size   # (N, 4, 3)
    corners_w = ((corners_c - cams.t[:, None]) @ cams.R).numpy()                # R^T (x - t), (N, 4, 3)
    centres = cams.camera_centers().numpy()                                     # (N, 3)
    starts = np.concatenate([np.repeat(centres[:, None], 4, 1), corners_w], 1)  # (N, 8, 3)
    ends = np.concatenate([corners_w, np.roll(corners_w, -1, axis=1)], 1)
    to_view = lambda p: (p.reshape(-1, 3) @ v.R[0].numpy().T) + v.t[0].numpy()  # noqa: E731
    a, b, keep = _clip_near(to_view(starts), to_view(ends))
    a, b = a[keep], b[keep]
    return _to_pixels(v, a).astype(np.float32), _to_pixels(v, b).astype(np.float32)


def curve_image(values, size: tuple[int, int], log: bool = True) -> np.ndarray:
    """A line plot of a 1-D sequence (a loss curve) as an (H, W, 3) image on a dark background.

    x: the index in the sequence (0 at the left, the last finite value's at the right); y: the value (log10
    with ``log``), its finite range spanning the height less CURVE_MARGIN pixels each side (a constant sits in
    the middle). Non-finite values (and, with ``log``, values <= 0) are left out; nothing left gives the blank
    background."""
    h, w = _check_image_size(size, "size")
    out = np.empty((h, w, 3), np.float32)
    out[:] = CURVE_BACKGROUND
    if isinstance(values, torch.Tensor):
        v = values.detach().to("cpu", torch.float64).reshape(-1).numpy()
    else:
        try:
            v = np.asarray(values, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise TypeError(f"curve_image: values must be a 1-D sequence of numbers, got {type(values).__name__}") \
                from e
    index = np.arange(len(v))
    ok = np.isfinite(v) & ((v > 0) if log else True)
    index, v = index[ok], v[ok]
    if len(v) == 0:
        return out
    y = np.log10(v) if log else v
    if len(v) > 4 * w:  # more points than the width can show: keep an evenly spaced subset, ends included
        pick = np.unique(np.linspace(0, len(v) - 1, 4 * w).round().astype(np.int64))
        index, y = index[pick], y[pick]
    span_x = max(int(index[-1]), 1)
    lo, hi = float(y.min()), float(y.max())
    m = CURVE_MARGIN
    px = m + (index / span_x) * max(w - 1 - 2 * m, 0) + 0.5
    if hi - lo > 1e-12 * max(abs(hi), 1.0):
        py = m + (hi - y) / (hi - lo) * max(h - 1 - 2 * m, 0) + 0.5
    else:
        py = np.full(len(y), h / 2.0)
    pts = np.stack([px, py], -1)
    if len(pts) == 1:
        return draw_segments(out, pts, pts, CURVE_COLOUR)
    return draw_segments(out, pts[:-1], pts[1:], CURVE_COLOUR)
