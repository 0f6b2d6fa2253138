"""Gradients given instead of a loss: :class:`PixelGradientField` (``dL/d image``) and
:class:`DisplacementField` (2D displacements, as image gradients or as reprojected correspondences), with
the surface points and reprojection flow they are built from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from taichi_dr.core.camera import Cameras
from taichi_dr.core.mesh import Mesh
from taichi_dr.pipelines.pose.losses import composite
from taichi_dr.pipelines.pose.targets import PoseTarget
from taichi_dr.raster.renderer import RenderOutput

__all__ = ["DisplacementField", "PixelGradientField", "image_gradient", "reprojection_flow", "surface_points"]


@dataclass(frozen=True)
class PixelGradientField:
    """Replace the loss by its gradient with respect to the rendered image.

    fn(rendered, target, camera) returns ``dL/d alpha (1, H, W)``, or a dict with any of ``"alpha"``
    ``(1, H, W)`` and ``"rgb"`` ``(1, H, W, 3)`` (the render composited over ``target.background``, see
    :func:`composite`), at the stage's resolution; it is propagated with ``torch.autograd.backward(maps,
    field)`` through the rasterizer to the pose. ``camera`` is the detached render camera (its R, t the
    current object-to-camera pose, K the stage's intrinsics). ``channels`` lists what ``fn`` may return, so
    that rgb is rendered only when needed.
    """

    fn: Callable
    channels: tuple[str, ...] = ("alpha",)
    name: str = "pixel_gradient"

    def __post_init__(self):
        _check_channels(self.channels, "PixelGradientField")


@dataclass(frozen=True)
class DisplacementField:
    """Replace the loss by a 2D displacement per pixel: where the content at each pixel should move.

    fn(rendered, target, camera) returns ``(1, H, W, 2)`` displacements ``(du, dv)`` in pixels at the
    stage's resolution; NaN where it has no opinion (e.g. off the object): those pixels take the value of
    the nearest pixel with one, so the blurred edge just outside the object, and the background around it,
    move with it. Two ways to turn it into a gradient of the pose:

    * ``conversion="image"``: for each rendered map I in ``channels`` (``"alpha"``, ``"rgb"`` = the
      composite, :func:`composite`), ``dL/dI = grad(I) . d``, the gradient of ``|I - I_target|^2 / 2`` with
      ``I_target = I - grad(I) . d`` (I moved by d, to first order), propagated through the rasterizer's
      backward pass. Only edges and texture carry signal, and the first-order model holds for displacements
      up to about the blur of the edges, so from far-off starts it can go astray.
    * ``conversion="reprojection"`` (Grabner et al.'s geometric correspondence fields): the surface point
      ``x_p`` seen at each covered pixel (:func:`surface_points`, from the rasterizer's ``pix_to_face``)
      should move by ``d_p`` in the image; the pose gradient is that of ``-sum_p d_p . project(T x_p) / N``,
      analytic through the projection. Every covered pixel contributes, as in a PnP problem, so it
      converges from much further (and the default optimizer then takes Gauss-Newton steps); NaN
      pixels are ignored.
    """

    fn: Callable
    channels: tuple[str, ...] = ("alpha",)
    conversion: str = "image"
    name: str = "displacement"

    def __post_init__(self):
        _check_channels(self.channels, "DisplacementField")
        if self.conversion not in ("image", "reprojection"):
            raise ValueError(f"DisplacementField.conversion: expected 'image' or 'reprojection', got "
                             f"{self.conversion!r}")


def _fill_nan_nearest(flow: Tensor) -> Tensor:
    """``flow (H, W, 2)`` with NaN ("no opinion") pixels given the value of the nearest finite pixel: the
    soft silhouette's edge falls off *outside* the object, where a correspondence field has no values, so
    the blur band borrows those of the edge it belongs to. All-NaN becomes zeros."""
    from scipy.ndimage import distance_transform_edt

    known = torch.isfinite(flow).all(-1)
    if bool(known.all()):
        return flow
    if not bool(known.any()):
        return torch.zeros_like(flow)
    k = known.cpu().numpy()
    _, (iy, ix) = distance_transform_edt(~k, return_indices=True)
    idx = torch.from_numpy(iy * k.shape[1] + ix).to(flow.device).reshape(-1)
    return flow.reshape(-1, 2)[idx].reshape(flow.shape)


def _check_channels(channels, owner: str) -> None:
    if isinstance(channels, str) or not channels or set(channels) - {"alpha", "rgb"}:
        raise ValueError(f"{owner}.channels: expected a non-empty tuple drawn from ('alpha', 'rgb'), "
                         f"got {channels!r}")


def image_gradient(image: Tensor) -> tuple[Tensor, Tensor]:
    """Central differences of ``image (B, H, W)`` or ``(B, H, W, C)`` along u (columns) and v (rows);
    one-sided at the borders. Returns ``(dI/du, dI/dv)`` shaped like ``image``."""
    x = image if image.dim() == 4 else image[..., None]
    gu = torch.zeros_like(x)
    gv = torch.zeros_like(x)
    if x.shape[2] > 1:
        gu[:, :, 1:-1] = 0.5 * (x[:, :, 2:] - x[:, :, :-2])
        gu[:, :, 0] = x[:, :, 1] - x[:, :, 0]
        gu[:, :, -1] = x[:, :, -1] - x[:, :, -2]
    if x.shape[1] > 1:
        gv[:, 1:-1] = 0.5 * (x[:, 2:] - x[:, :-2])
        gv[:, 0] = x[:, 1] - x[:, 0]
        gv[:, -1] = x[:, -1] - x[:, -2]
    if image.dim() == 3:
        return gu[..., 0], gv[..., 0]
    return gu, gv


def _pixel_centres(H: int, W: int, like: Tensor) -> Tensor:
    """(H, W, 2) pixel centres (u, v) = (j + 0.5, i + 0.5)."""
    v, u = torch.meshgrid(torch.arange(H, dtype=like.dtype, device=like.device) + 0.5,
                          torch.arange(W, dtype=like.dtype, device=like.device) + 0.5, indexing="ij")
    return torch.stack([u, v], -1)


@torch.no_grad()
def surface_points(mesh: Mesh, camera: Cameras, pix_to_face: Tensor) -> Tensor:
    """The point of ``mesh`` seen at each pixel centre: ``(B, H, W, 3)`` in the mesh's (world) coordinates,
    NaN where ``pix_to_face (B, H, W)`` is -1. Exact: the pixel's ray meets the plane of its face (the
    soft-rendered depth is not, since SoftRas's softmax lets a nearer face's blurred edge win); no
    gradient."""
    B, H, W = pix_to_face.shape
    verts = mesh.verts.detach().to(camera.dtype)
    origins, dirs = camera.pixel_rays(_pixel_centres(H, W, verts).reshape(-1, 2))  # (B, N, 3)
    face = pix_to_face.reshape(B, -1).long()
    tri = verts[mesh.faces[face.clamp_min(0)]]  # (B, N, 3, 3)
    normal = torch.linalg.cross(tri[..., 1, :] - tri[..., 0, :], tri[..., 2, :] - tri[..., 0, :], dim=-1)
    denom = (normal * dirs).sum(-1)
    s = (normal * (tri[..., 0, :] - origins)).sum(-1) / torch.where(denom.abs() > 1e-12, denom,
                                                                     torch.full_like(denom, 1e-12))
    pts = origins + s[..., None] * dirs
    pts = torch.where((face >= 0)[..., None], pts, torch.full_like(pts, float("nan")))
    return pts.reshape(B, H, W, 3)


@torch.no_grad()
def reprojection_flow(points: Tensor, camera: Cameras, other: Cameras) -> Tensor:
    """How far the surface points seen by ``camera`` move in the image when seen by ``other``: ``(B, H, W,
    2)`` pixel displacements ``other.project(x) - camera.project(x)``, NaN where ``points (B, H, W, 3)``
    is NaN ("no opinion", as :class:`DisplacementField` reads it). With ``points`` from
    :func:`surface_points` and ``other`` the camera at the true pose, this is the oracle correspondence
    field of a pose benchmark. No gradient.
    """
    B, H, W, _ = points.shape
    pts = points.reshape(B, -1, 3)
    safe = torch.nan_to_num(pts, nan=0.0)
    flow = other.project(safe)[..., :2] - camera.project(safe)[..., :2]
    ok = torch.isfinite(pts).all(-1, keepdim=True)
    return torch.where(ok, flow, torch.full_like(flow, float("nan"))).reshape(B, H, W, 2)


def _field_gradients(fld, rendered: RenderOutput, target: PoseTarget, camera: Cameras):
    """Evaluate a field -> (rendered maps, their gradients, value for the history: the RMS of a pixel
    gradient, or of a displacement in pixels). The maps are ``alpha`` and, for ``"rgb"``, the render
    composited over the target's background."""
    H, W = camera.image_size
    images = {"alpha": rendered.alpha}

    def image(ch):
        if ch not in images:
            images[ch] = composite(rendered, target.background)
        return images[ch]

    with torch.no_grad():
        out = fld.fn(rendered, target, camera)
    if isinstance(fld, PixelGradientField):
        grads = dict(out) if isinstance(out, Mapping) else {"alpha": out}
        unknown = set(grads) - set(fld.channels)
        if unknown or not grads:
            raise ValueError(f"{fld.name}: the field function must return a tensor (dL/dalpha) or a dict with "
                             f"keys among its channels {fld.channels}, got keys {sorted(map(str, grads))}")
    else:
        if not isinstance(out, Tensor) or tuple(out.shape) != (1, H, W, 2):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{fld.name}: the displacement function must return a (1, {H}, {W}, 2) tensor "
                             f"of pixel displacements, got {got}")
        raw = out.detach().to(rendered.alpha)[0]
        known = torch.isfinite(raw).all(-1)
        value = float(raw[known].square().sum(-1).mean().sqrt()) if bool(known.any()) else 0.0
        flow = _fill_nan_nearest(raw)
        grads = {}
        energy = 0.0
        for ch in fld.channels:
            img = image(ch).detach()[0]
            img = img[..., None] if ch == "alpha" else img
            gu, gv = image_gradient(img[None])
            g = gu[0] * flow[..., :1] + gv[0] * flow[..., 1:]
            grads[ch] = (g[..., 0] if ch == "alpha" else g)[None]
            energy += float((gu.square() + gv.square()).sum())
        # Scale to Gauss-Newton size: with whitened parameters (a unit step moves points one pixel RMS in a
        # random direction) J^T J is about sum |grad I|^2 / 2 times the identity, so this makes a unit SGD
        # step move the content by about the field.
        scale = 2.0 / max(energy, 1e-12)
        grads = {ch: g * scale for ch, g in grads.items()}
    maps, gs = [], []
    sq, n = 0.0, 0
    for ch, g in grads.items():  # (validates what a PixelGradientField returned)
        img = image(ch)
        if not isinstance(g, Tensor) or g.shape != img.shape:
            got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(f"{fld.name}: the gradient for {ch!r} must have shape {tuple(img.shape)}, "
                             f"got {got}")
        g = torch.nan_to_num(g.detach().to(img), nan=0.0, posinf=0.0, neginf=0.0)
        maps.append(img)
        gs.append(g)
        sq += float(g.square().sum())
        n += g.numel()
    if isinstance(fld, PixelGradientField):
        value = math.sqrt(sq / max(n, 1))
    return maps, gs, value


def _reprojection_step(fld: DisplacementField, mesh: Mesh, rendered: RenderOutput, target: PoseTarget,
                       camera: Cameras) -> float:
    """Backpropagate a displacement field as correspondences (see DisplacementField); returns the RMS
    displacement over the pixels used."""
    H, W = camera.image_size
    with torch.no_grad():
        out = fld.fn(rendered, target, camera.detach())
    if not isinstance(out, Tensor) or tuple(out.shape) != (1, H, W, 2):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{fld.name}: the displacement function must return a (1, {H}, {W}, 2) tensor of "
                         f"pixel displacements, got {got}")
    flow = out.detach().to(rendered.alpha)
    use = torch.isfinite(flow).all(-1) & (rendered.pix_to_face >= 0)
    if not bool(use.any()):
        return 0.0
    pts = surface_points(mesh, camera.detach(), rendered.pix_to_face)[use]  # (N, 3) object coordinates
    proj = camera.project(pts[None])[0, :, :2]  # differentiable in the pose and intrinsics
    d = flow[use]
    n = d.shape[0]
    (-(d * proj).sum() / n).backward()
    return float(d.square().sum(-1).mean().sqrt())
