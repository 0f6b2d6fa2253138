"""Pinhole cameras: one implementation for the whole engine.

Conventions (docs/design.md): world -> camera ``x_c = R @ x_w + t`` with OpenCV axes (x right, y down,
z forward, so depth > 0 is in front); ``K`` maps camera coordinates to pixels, whose origin is the top-left
corner of the top-left pixel (pixel centres at ``+0.5``); ``image_size`` is ``(H, W)``; ``fov`` is the
full horizontal angle in degrees.

Mirrored cameras: ``R`` is always a proper rotation (det +1). A camera whose image is the left-right mirror
of what a real camera would see -- SoftRas's (and Kato's neural renderer's) ``look_at`` camera is one -- is
written with a negative ``fx`` in ``K``: the rotation stays a rotation (so rotation parameterisations and
pose refinement work unchanged) and the mirror lives in the image axis. ``Cameras.mirrored`` tells which.

Everything is plain torch and differentiable, so gradients reach the camera from any loss on projected
points or rays. The rotation maps (axis-angle, 6D, quaternions) and :class:`CameraParameters` (learnable
corrections of a Cameras batch) live in :mod:`taichi_dr.core.transforms`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from taichi_dr.core.rays import pixel_centres, pixel_directions
from taichi_dr.core.transforms import _normalize, _rotation_errors

__all__ = [
    "Cameras",
    "project_points",
    "intrinsics_from_fov",
    "is_rotation",
    "load_cameras",
    "SPHERICAL_CONVENTIONS",
    "save_cameras_json",
]

FLOAT_DTYPES = (torch.float32, torch.float64)
# The perspective divide uses |z| >= Z_EPS (sign kept) so points at the camera centre give large but
# finite pixel coordinates and gradients. Points that close are clipped by the renderer anyway.
Z_EPS = 1e-6
# Tolerance of the rotation check in Cameras(): loose enough for float32 matrices that went through a
# text file or an optimiser step, tight enough to catch reflections (det -1) and scaled matrices.
ROTATION_ATOL = 1e-3
# How (distance, elevation, azimuth) rows become cameras (Cameras.from_spherical): "softras" renders what
# SoftRas renders from the row (a mirrored camera), "opencv" what a real camera at that eye sees.
SPHERICAL_CONVENTIONS = ("softras", "opencv")


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------

def _to_tensor(x, name: str, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """Tensor or array-like -> floating tensor. Tensors keep dtype/device unless ``dtype``/``device`` is
    given; a numpy float64 array stays float64; other array-likes become float32."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() and x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a float32 or float64 tensor, got {x.dtype}")
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name}: expected a real floating tensor, got {x.dtype}")
        if not x.is_floating_point():
            x = x.to(dtype or torch.float32)
    else:
        try:
            arr = np.asarray(x)
        except Exception as e:  # ragged lists and the like
            raise TypeError(f"{name}: expected a tensor or an array of numbers, "
                            f"got {type(x).__name__}") from e
        if arr.dtype.kind not in "iuf":
            raise TypeError(f"{name}: expected a tensor or an array of numbers, got {type(x).__name__} "
                            f"with dtype {arr.dtype}")
        # Like torch.as_tensor: Python numbers/lists become float32, a float64 numpy array stays float64.
        keep64 = isinstance(x, np.ndarray) and arr.dtype == np.float64
        arr = arr.astype(np.float64 if keep64 else np.float32)
        x = torch.from_numpy(arr)
    if dtype is not None or device is not None:
        x = x.to(device=device, dtype=dtype)
    return x


def _check_image_size(image_size, name: str = "image_size") -> tuple[int, int]:
    try:
        h, w = image_size
        ok = all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in (h, w))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name}: expected (H, W), two positive ints, got {image_size!r}")
    return int(h), int(w)


def _batch(x: torch.Tensor, name: str, inner: tuple[int, ...]) -> torch.Tensor:
    """Accept ``inner`` or ``(B, *inner)``; return ``(B, *inner)``."""
    if tuple(x.shape) == inner:
        return x[None]
    if x.dim() != len(inner) + 1 or tuple(x.shape[1:]) != inner:
        want = "(" + ", ".join(map(str, inner)) + ")"
        raise ValueError(f"{name}: expected shape {want} or (B, {want[1:]}, got {tuple(x.shape)}")
    return x


def is_rotation(R: torch.Tensor, atol: float = 1e-4) -> bool:
    """True iff every matrix in ``R (..., 3, 3)`` is finite, orthonormal and has det +1 (within atol)."""
    R = _to_tensor(R, "R")
    if R.dim() < 2 or tuple(R.shape[-2:]) != (3, 3):
        raise ValueError(f"is_rotation: expected shape (..., 3, 3), got {tuple(R.shape)}")
    if R.numel() == 0:
        return True
    with torch.no_grad():
        if not bool(torch.isfinite(R).all()):
            return False
        ortho, det = _rotation_errors(R)
        return bool((ortho <= atol).all() and (det <= atol).all())


# ----------------------------------------------------------------------------------------------------------
# rotations (the maps live in core.transforms)
# ----------------------------------------------------------------------------------------------------------

def _look_at_rotation(z: torch.Tensor, up: torch.Tensor, what: str) -> torch.Tensor:
    """Camera rotation (B, 3, 3) whose rows are the camera axes in world coords, given the forward
    direction ``z (B, 3)`` (any length > 0) and world ``up (B, 3)``. Image rows go down, so the camera
    -y axis is ``up`` made orthogonal to ``z``."""
    z = _normalize(z)
    up_perp = up - (up * z).sum(-1, keepdim=True) * z
    with torch.no_grad():
        bad = torch.linalg.vector_norm(up_perp, dim=-1) <= 1e-6 * torch.linalg.vector_norm(up, dim=-1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{what}: 'up' {up[i].tolist()} is zero or parallel to the view direction "
                             f"{z[i].tolist()} (camera {i}); pick another up vector")
    y = -_normalize(up_perp)
    x = torch.linalg.cross(y, z, dim=-1)
    return torch.stack([x, y, z], dim=-2)


def intrinsics_from_fov(fov: float, image_size: tuple[int, int], dtype: torch.dtype = torch.float32
                        ) -> torch.Tensor:
    """Pinhole intrinsics ``(3, 3)`` for a horizontal field of view ``fov`` (degrees, full angle across the
    width): ``f = (W / 2) / tan(fov / 2)`` for both axes (square pixels), principal point ``(W/2, H/2)``."""
    h, w = _check_image_size(image_size)
    fov = float(fov)
    if not 0 < fov < 180:
        raise ValueError(f"fov: expected a horizontal field of view in degrees in (0, 180), got {fov}")
    f = (w / 2) / math.tan(math.radians(fov) / 2)
    return torch.tensor([[f, 0.0, w / 2], [0.0, f, h / 2], [0.0, 0.0, 1.0]], dtype=dtype)


def _rq3(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RQ decomposition of ``M (B, 3, 3) = U @ Q`` (U upper triangular, Q orthogonal) through torch's QR,
    so it is batched and differentiable. With J the row-reversal: (J M)^T = Q' R' gives
    M = (J R'^T J) (J Q'^T)."""
    q, r = torch.linalg.qr(M.flip(-2).transpose(-1, -2))
    return r.transpose(-1, -2).flip(-2).flip(-1), q.transpose(-1, -2).flip(-2)


# ----------------------------------------------------------------------------------------------------------
# Cameras
# ----------------------------------------------------------------------------------------------------------

def project_points(xyz: torch.Tensor, K: torch.Tensor, near: float | None = None) -> torch.Tensor:
    """The one perspective projection: camera-space points ``xyz (B, ..., 3)`` -> ``(u, v, z)`` (pixels and
    camera-space depth), with ``K`` broadcast against the points as ``(B, ..., 3, 3)`` (upper triangular).

    ``near=None``: the divide uses z clamped to ``|z| >= Z_EPS`` with its sign kept, so values and gradients
    are finite everywhere. ``near`` given (the rasterizer's near plane): points nearer than it, which lie only
    on faces the rasterizer skips, are divided by 1 instead, so nothing there divides by (nearly) zero and the
    rest is divided by its own z.
    """
    x, y, z = xyz.unbind(-1)
    if near is None:
        sign = torch.where(z < 0, -1.0, 1.0).to(z.dtype)
        z_safe = torch.where(z.abs() < Z_EPS, sign * Z_EPS, z)
    else:
        z_safe = torch.where(z >= near, z, torch.ones_like(z))
    x, y = x / z_safe, y / z_safe
    return torch.stack([K[..., 0, 0] * x + K[..., 0, 1] * y + K[..., 0, 2], K[..., 1, 1] * y + K[..., 1, 2], z], -1)


class Cameras:
    """Batch of B pinhole cameras.

    K ``(B, 3, 3)``: intrinsics in pixels, upper triangular (skew allowed), ``fy > 0``, ``fx != 0``, last
    row ``(0, 0, 1)``; ``fx < 0`` is a mirrored camera (u decreases as camera x grows, as with SoftRas's
    look_at cameras; see :attr:`mirrored`). R ``(B, 3, 3)``, t ``(B, 3)``: world -> camera
    ``x_c = R x_w + t``, OpenCV axes.
    ``image_size`` is ``(H, W)``. Unbatched ``(3, 3)`` / ``(3,)`` inputs get B = 1, and a batch of 1
    broadcasts against the others (e.g. one K shared by all views). All three share one dtype (float32 or
    float64) and device; array-likes are converted to match the tensors. The attributes K, R, t may carry
    autograd history (that is how gradients reach cameras); treat them as read-only.
    """

    def __init__(self, K, R, t, image_size: tuple[int, int], *, validate: bool = True):
        given = {n: x for n, x in (("K", K), ("R", R), ("t", t)) if isinstance(x, torch.Tensor)}
        dtypes = {x.dtype for x in given.values() if x.is_floating_point()}
        devices = {x.device for x in given.values()}
        if len(dtypes) > 1:
            raise TypeError("Cameras: K, R and t must share one dtype, got "
                            + ", ".join(f"{n} {x.dtype}" for n, x in given.items()))
        if len(devices) > 1:
            raise ValueError("Cameras: K, R and t must be on one device, got "
                             + ", ".join(f"{n} {x.device}" for n, x in given.items()))
        K, R, t = (_to_tensor(x, n) for x, n in ((K, "K"), (R, "R"), (t, "t")))
        if dtypes:
            dtype = dtypes.pop()
        else:
            dtype = torch.promote_types(torch.promote_types(K.dtype, R.dtype), t.dtype)
        device = devices.pop() if devices else torch.device("cpu")
        K, R, t = (x.to(device=device, dtype=dtype) for x in (K, R, t))
        K, R, t = _batch(K, "K", (3, 3)), _batch(R, "R", (3, 3)), _batch(t, "t", (3,))
        sizes = {len(K), len(R), len(t)} - {1}
        if len(sizes) > 1:
            raise ValueError(f"Cameras: batch sizes of K ({len(K)}), R ({len(R)}) and t ({len(t)}) differ "
                             "(each must be B or 1)")
        b = sizes.pop() if sizes else 1
        self.K = K.expand(b, 3, 3)
        self.R = R.expand(b, 3, 3)
        self.t = t.expand(b, 3)
        self.image_size = _check_image_size(image_size)
        if validate:
            self._validate()

    def _validate(self) -> None:
        with torch.no_grad():
            for name, x in (("K", self.K), ("R", self.R), ("t", self.t)):
                bad = ~torch.isfinite(x).reshape(len(x), -1).all(-1)
                if bool(bad.any()):
                    raise ValueError(f"Cameras: {name}[{int(bad.nonzero()[0, 0])}] contains NaN or Inf")
            if len(self) == 0:
                return
            K = self.K
            lower = torch.stack([K[:, 1, 0], K[:, 2, 0], K[:, 2, 1]], -1).abs().amax(-1)
            bad = (lower > 1e-6) | ((K[:, 2, 2] - 1).abs() > 1e-6)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"Cameras: K[{i}] = {K[i].tolist()} must be upper triangular with "
                                 "K[2, 2] == 1 (normalise a projective K by dividing by K[2, 2])")
            # fx < 0 is allowed: a mirrored camera. Both signs flipped would be a proper camera rotated 180
            # degrees about its axis, and fy < 0 alone a mirror too, so requiring fy > 0 keeps one spelling.
            bad = (K[:, 0, 0] == 0) | (K[:, 1, 1] <= 0)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"Cameras: K[{i}] has focal lengths fx={K[i, 0, 0].item()}, "
                                 f"fy={K[i, 1, 1].item()}; expected fy > 0 and fx != 0 (fx > 0 for an OpenCV "
                                 "camera, fx < 0 for a left-right mirrored one such as SoftRas's)")
            ortho, det = _rotation_errors(self.R)
            bad = (ortho > ROTATION_ATOL) | (det > ROTATION_ATOL)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"Cameras: R[{i}] is not a rotation (max |R R^T - I| = {ortho[i].item():.3g}, "
                    f"det = {torch.linalg.det(self.R[i]).item():.4g}); R must be the orthonormal "
                    "world->camera rotation with det +1 (for an OpenGL/Blender pose use "
                    "Cameras.from_opengl_c2w)")

    # -- container protocol ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.K.shape[0]

    def __getitem__(self, idx) -> Cameras:
        """Select cameras by int (keeps the batch dim), slice, list of ints, LongTensor or bool mask."""
        if isinstance(idx, (int, np.integer)) and not isinstance(idx, bool):
            i = int(idx)
            if not -len(self) <= i < len(self):
                raise IndexError(f"Cameras: index {i} out of range for {len(self)} cameras")
            i %= len(self)
            idx = slice(i, i + 1)
        elif isinstance(idx, (list, tuple, np.ndarray)):
            idx = torch.as_tensor(np.asarray(idx))
        if isinstance(idx, torch.Tensor):
            if idx.dtype != torch.bool and idx.is_floating_point():
                raise TypeError(f"Cameras: index tensor must be integer or bool, got {idx.dtype}")
            idx = idx.to(self.device)
        elif not isinstance(idx, slice):
            raise TypeError(f"Cameras: cannot index with {type(idx).__name__}")
        return Cameras(self.K[idx], self.R[idx], self.t[idx], self.image_size, validate=False)

    def to(self, device=None, dtype: torch.dtype | None = None) -> Cameras:
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"Cameras.to: dtype must be float32 or float64, got {dtype}")
        return Cameras(self.K.to(device=device, dtype=dtype), self.R.to(device=device, dtype=dtype),
                       self.t.to(device=device, dtype=dtype), self.image_size, validate=False)

    def detach(self) -> Cameras:
        return Cameras(self.K.detach(), self.R.detach(), self.t.detach(), self.image_size, validate=False)

    @property
    def device(self) -> torch.device:
        return self.K.device

    @property
    def dtype(self) -> torch.dtype:
        return self.K.dtype

    @property
    def mirrored(self) -> torch.Tensor:
        """``(B,)`` bool: True for a left-right mirrored camera (``fx < 0``, e.g. SoftRas's look_at). Its
        projected triangles have the opposite screen-space winding, so front faces there have positive
        signed pixel area."""
        return self.K[:, 0, 0] < 0

    def __repr__(self) -> str:
        return (f"Cameras(B={len(self)}, image_size={self.image_size}, dtype={self.dtype}, "
                f"device={self.device})")

    # -- geometry --------------------------------------------------------------------------------------

    def _points(self, x, name: str, last: int) -> torch.Tensor:
        """Validate ``x (N, last)`` (shared by all cameras) or ``(B, N, last)``; return it as a tensor."""
        if isinstance(x, torch.Tensor):
            if x.dtype != self.dtype:
                raise TypeError(f"{name}: dtype {x.dtype} does not match the cameras' {self.dtype} "
                                "(use cameras.to(dtype=...) or convert the points)")
            if x.device != self.device:
                raise ValueError(f"{name}: device {x.device} does not match the cameras' {self.device}")
        else:
            x = _to_tensor(x, name, dtype=self.dtype, device=self.device)
        ok = x.shape[-1:] == (last,) and (x.dim() == 2 or (x.dim() == 3 and x.shape[0] in (1, len(self))))
        if not ok:
            raise ValueError(f"{name}: expected shape (N, {last}) or (B={len(self)}, N, {last}), "
                             f"got {tuple(x.shape)}")
        return x

    def world_to_camera(self, points) -> torch.Tensor:
        """World points ``(N, 3)`` (shared) or ``(B, N, 3)`` -> camera coordinates ``(B, N, 3)``."""
        p = self._points(points, "points", 3)
        out = torch.matmul(p, self.R.transpose(-1, -2)) + self.t[:, None, :]
        return out.expand(len(self), -1, -1) if out.shape[0] != len(self) else out

    def project(self, points) -> torch.Tensor:
        """World points ``(N, 3)`` or ``(B, N, 3)`` -> ``(B, N, 3)``: pixel coordinates ``(u, v)`` and the
        camera-space depth ``z``.

        The divide uses z clamped to ``|z| >= Z_EPS`` with its sign kept, so values and gradients are always
        finite; points behind or at the camera are the renderer's job (it clips at the near plane).
        See :func:`project_points`, which the renderer uses on camera-space corners.
        """
        return project_points(self.world_to_camera(points), self.K[:, None])

    def camera_centers(self) -> torch.Tensor:
        """Camera centres in world coordinates ``(B, 3)``: ``C = -R^T t``."""
        return -(self.R.transpose(-1, -2) @ self.t[..., None])[..., 0]

    def pixel_rays(self, pixels) -> tuple[torch.Tensor, torch.Tensor]:
        """Rays through pixel positions ``(u, v)``: ``pixels (N, 2)`` (shared) or ``(B, N, 2)`` ->
        ``origins (B, N, 3)`` (the camera centres) and unit ``directions (B, N, 3)``, in world space."""
        px = self._points(pixels, "pixels", 2)
        d = pixel_directions(self.K, self.R, px)  # K (fx != 0, fy > 0) is checked at construction
        d = d.expand(len(self), -1, -1) if d.shape[0] != len(self) else d
        origins = self.camera_centers()[:, None, :].expand_as(d)
        return origins, d

    def image_rays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rays through every pixel centre ``(u, v) = (j + 0.5, i + 0.5)``: origins and unit directions,
        each ``(B, H, W, 3)``, world space."""
        h, w = self.image_size
        o, d = self.pixel_rays(pixel_centres(self.image_size, self.dtype, self.device))
        return o.reshape(len(self), h, w, 3), d.reshape(len(self), h, w, 3)

    # -- constructors ----------------------------------------------------------------------------------

    @staticmethod
    def from_projection(P, image_size: tuple[int, int]) -> Cameras:
        """Decompose projection matrices ``P (3, 4)`` or ``(B, 3, 4)``, ``P ~ K [R | t]`` up to any non-zero
        scale (negative included), into K (positive diagonal, ``K[2, 2] = 1``), R (det +1) and t.

        Differentiable (torch QR). Keeps P's dtype; pass float64 for large-valued matrices such as DTU's.
        """
        P = _batch(_to_tensor(P, "P"), "P", (3, 4))
        if not bool(torch.isfinite(P).all()):
            raise ValueError("from_projection: P contains NaN or Inf")
        M, p4 = P[:, :, :3], P[:, :, 3]
        det = torch.linalg.det(M)
        with torch.no_grad():
            scale = M.abs().flatten(1).amax(-1)
            bad = det.abs() <= torch.finfo(P.dtype).eps * 10 * scale ** 3
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"from_projection: P[{i}] has a singular left 3x3 block "
                                 f"(det {det[i].item():.3g}); it is not a finite pinhole projection")
        # P = s K [R|t] with det K > 0, det R = 1 has sign(det M) = sign(s): make s positive first.
        sgn = torch.where(det < 0, -1.0, 1.0).to(P.dtype)
        M, p4 = M * sgn[:, None, None], p4 * sgn[:, None]
        U, Q = _rq3(M)
        d = torch.where(torch.diagonal(U, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(P.dtype)
        U = U * d[:, None, :]  # U D and D Q with D = D^-1: the product is unchanged
        Q = Q * d[:, :, None]
        t = torch.linalg.solve_triangular(U, p4[..., None], upper=True)[..., 0]
        K = torch.triu(U / U[:, 2:3, 2:3])
        return Cameras(K, Q, t, image_size)

    @staticmethod
    def look_at(eye, at=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0), fov: float = 30.0,
                image_size: tuple[int, int] = (256, 256)) -> Cameras:
        """Cameras at ``eye (B, 3) | (3,)`` looking at ``at`` with world ``up`` appearing upward in the image
        (smaller v). ``at``/``up`` broadcast against ``eye``. Differentiable in tensor inputs."""
        eye = _to_tensor(eye, "eye")
        at = _to_tensor(at, "at", dtype=eye.dtype, device=eye.device)
        up = _to_tensor(up, "up", dtype=eye.dtype, device=eye.device)
        try:
            eye, at, up = torch.broadcast_tensors(*(_batch(x, n, (3,)) for x, n in
                                                     ((eye, "eye"), (at, "at"), (up, "up"))))
        except RuntimeError as e:
            raise ValueError(f"look_at: eye, at and up batch sizes do not broadcast: {e}") from e
        z = at - eye
        with torch.no_grad():
            bad = torch.linalg.vector_norm(z, dim=-1) <= 1e-12
            if bool(bad.any()):
                raise ValueError(f"look_at: eye and at coincide (camera {int(bad.nonzero()[0, 0])}); "
                                 "there is no view direction")
        R = _look_at_rotation(z, up, "look_at")
        t = -(R @ eye[..., None])[..., 0]
        K = intrinsics_from_fov(fov, image_size, eye.dtype).to(eye.device)
        return Cameras(K, R, t, image_size)

    @staticmethod
    def from_spherical(distance, elevation, azimuth, fov: float = 30.0,
                       image_size: tuple[int, int] = (256, 256), convention: str = "softras") -> Cameras:
        """Cameras looking at the origin from SoftRas's ``eye = d (cos e sin a, sin e, -cos e cos a)``
        (``get_points_from_angles``; degrees, world y up). Scalars or ``(B,)`` tensors/arrays, broadcast;
        differentiable in tensors. ``fov`` is the full horizontal angle: SoftRas's ``viewing_angle=15`` is
        ``fov=30``.

        ``convention`` (see :data:`SPHERICAL_CONVENTIONS`):

        * ``"softras"`` (default): the image SoftRas renders from this row, pixel for pixel. SoftRas's
          ``look_at`` (Kato's neural renderer's) has camera axes ``x = up x forward``, ``y = forward x x``,
          and its rasterizer puts NDC x to the right and NDC y up, which is the mirror image of what a
          real camera at that eye sees. Here that is the proper look-at rotation below with ``fx < 0``
          (a mirrored camera, :attr:`Cameras.mirrored`).
        * ``"opencv"``: the un-mirrored camera at the same eye (the same R, ``fx > 0``): what a real camera
          there sees. Its images are SoftRas's flipped left-right.

        The up direction is world y made orthogonal to the view, i.e. ``sign(cos e)`` times the elevation
        tangent; that is SoftRas's look_at wherever it is defined, and stays defined at elevation +-90.
        """
        if convention not in SPHERICAL_CONVENTIONS:
            raise ValueError(f"from_spherical: convention must be one of {SPHERICAL_CONVENTIONS}, "
                             f"got {convention!r}")
        ref = next((x for x in (distance, elevation, azimuth) if isinstance(x, torch.Tensor)
                    and x.is_floating_point()), None)
        dtype, device = (ref.dtype, ref.device) if ref is not None else (torch.float32, None)
        d, e, a = (_spherical_arg(x, n, dtype, device) for x, n in
                   ((distance, "distance"), (elevation, "elevation"), (azimuth, "azimuth")))
        try:
            d, e, a = torch.broadcast_tensors(d, e, a)
        except RuntimeError as err:
            raise ValueError("from_spherical: distance, elevation and azimuth do not broadcast: "
                             f"{err}") from err
        if not bool(torch.isfinite(torch.stack([d, e, a])).all()) or not bool((d > 0).all()):
            raise ValueError(f"from_spherical: distance must be finite and > 0 and angles finite, got "
                             f"distance={d.tolist()}, elevation={e.tolist()}, azimuth={a.tolist()}")
        e, a = torch.deg2rad(e), torch.deg2rad(a)
        ce, se, ca, sa = torch.cos(e), torch.sin(e), torch.cos(a), torch.sin(a)
        direction = torch.stack([ce * sa, se, -ce * ca], dim=-1)
        eye = d[:, None] * direction
        tangent = torch.stack([-se * sa, ce, se * ca], dim=-1)  # d direction / d e, unit, orthogonal to it
        up = tangent * torch.where(ce < 0, -1.0, 1.0).to(dtype)[:, None]
        R = _look_at_rotation(-direction, up, "from_spherical")
        t = -(R @ eye[..., None])[..., 0]
        K = intrinsics_from_fov(fov, image_size, dtype).to(eye.device)
        if convention == "softras":
            # SoftRas's camera axes are (-x, -y, z) of this rotation and its NDC y points up, so
            # u = W/2 + f x_s / z = W/2 - f x / z and v = H/2 - f y_s / z = H/2 + f y / z: only fx changes
            # sign. The principal point stays W/2, so the image is an exact column flip of "opencv"'s.
            # (SoftRas's images are square; other sizes keep the horizontal fov and square pixels.)
            K[0, 0] = -K[0, 0]
        return Cameras(K, R, t, image_size)

    @staticmethod
    def from_opengl_c2w(c2w, image_size: tuple[int, int], fov: float | None = None, K=None) -> Cameras:
        """NeRF/Blender camera-to-world poses ``(B, 4, 4) | (B, 3, 4)`` (or unbatched), OpenGL camera axes
        (x right, y up, z backward), -> OpenCV world->camera cameras. Give exactly one of ``fov`` (degrees;
        NeRF's ``camera_angle_x`` is in radians) or ``K (3, 3) | (B, 3, 3)``."""
        if (fov is None) == (K is None):
            raise ValueError("from_opengl_c2w: give exactly one of fov (degrees) or K")
        c2w = _to_tensor(c2w, "c2w")
        if c2w.dim() == 2:
            c2w = c2w[None]
        if c2w.dim() != 3 or tuple(c2w.shape[1:]) not in ((3, 4), (4, 4)):
            raise ValueError(f"c2w: expected shape (B, 4, 4) or (B, 3, 4), got {tuple(c2w.shape)}")
        # OpenGL -> OpenCV camera axes: flip y and z (the columns of the camera-to-world rotation).
        flip = torch.tensor([1.0, -1.0, -1.0], dtype=c2w.dtype, device=c2w.device)
        R = (c2w[:, :3, :3] * flip).transpose(-1, -2)
        t = -(R @ c2w[:, :3, 3:])[..., 0]
        if K is None:
            K = intrinsics_from_fov(fov, image_size, c2w.dtype).to(c2w.device)
        else:
            K = _to_tensor(K, "K", dtype=c2w.dtype, device=c2w.device)
        return Cameras(K, R, t, image_size)


def _spherical_arg(x, name: str, dtype: torch.dtype, device) -> torch.Tensor:
    x = _to_tensor(x, name, dtype=dtype, device=device)
    if x.dim() > 1:
        raise ValueError(f"from_spherical: {name} must be a scalar or a (B,) array, "
                         f"got shape {tuple(x.shape)}")
    return x.reshape(-1)


# ----------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------

def load_cameras(path, image_size: tuple[int, int] | None = None, fov: float | None = None,
                 dtype: torch.dtype = torch.float32, convention: str = "softras") -> Cameras:
    """Load a camera batch from a file; the format follows the extension.

    * ``.npy`` / ``.csv``: rows ``(distance, elevation_deg, azimuth_deg)`` as SoftRas's ``camera.npy``, made
      into cameras by :meth:`Cameras.from_spherical` with ``convention``: ``"softras"`` (default: the images
      SoftRas renders from these rows, mirrored cameras) or ``"opencv"`` (un-mirrored cameras at the same
      eyes); needs ``fov`` and ``image_size``. A CSV may start with a header line and may use commas or
      whitespace. ``convention`` only matters for these rows; the other formats hold K, R, t themselves.
    * ``.npz``: IDR ``cameras.npz`` with ``world_mat_i`` and optional ``scale_mat_i`` (i = 0..n-1); cameras
      of the normalised projections ``P_i = (world_mat_i @ scale_mat_i)[:3, :4]`` (decomposed in float64);
      needs ``image_size``.
    * ``.json``: a list of ``{"K": 3x3, "R": 3x3, "t": 3}`` or ``{"image_size": [H, W], "cameras": [...]}``
      (as written by :func:`save_cameras_json`); ``image_size`` is needed unless the file has it.

    Errors are ValueError (FileNotFoundError for a missing file) naming the file and what is wrong.
    """
    path = Path(path)
    if convention not in SPHERICAL_CONVENTIONS:
        raise ValueError(f"load_cameras: convention must be one of {SPHERICAL_CONVENTIONS}, got {convention!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: camera file not found")
    ext = path.suffix.lower()
    if image_size is not None:
        image_size = _check_image_size(image_size, f"{path}: image_size")
    try:
        if ext in (".npy", ".csv"):
            rows = _read_spherical_rows(path, ext)
            if fov is None or image_size is None:
                raise ValueError(f"{path}: SoftRas (distance, elevation, azimuth) cameras need both fov and "
                                 "image_size arguments")
            rows = torch.from_numpy(rows).to(torch.float64)
            cams = Cameras.from_spherical(rows[:, 0], rows[:, 1], rows[:, 2], fov, image_size, convention)
        elif ext == ".npz":
            if image_size is None:
                raise ValueError(f"{path}: IDR cameras need the image_size=(H, W) argument")
            cams = Cameras.from_projection(_read_idr_projections(path), image_size)
        elif ext == ".json":
            cams = _read_json(path, image_size)
        else:
            raise ValueError(f"{path}: unknown camera file extension {ext!r} (expected .npy, .csv, .npz "
                             "or .json)")
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from e
    return cams.to(dtype=dtype)


def _read_spherical_rows(path: Path, ext: str) -> np.ndarray:
    if ext == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{path}: not a readable .npy array ({e})") from e
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"{path}: expected a numeric array, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
        if arr.ndim == 1 and arr.shape[0] == 3:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[1] != 3:
            raise ValueError(f"{path}: expected shape (B, 3) rows of (distance, elevation_deg, "
                             f"azimuth_deg), got {arr.shape}")
    else:
        rows = []
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines, start=1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            fields = [f for f in re.split(r"[,\s]+", s) if f]
            try:
                vals = [float(f) for f in fields]
            except ValueError:
                if not rows and all(not r.strip() or r.strip().startswith("#") for r in lines[:n - 1]):
                    continue  # the header line
                raise ValueError(f"{path}: line {n}: not a number in {s!r}") from None
            if len(vals) != 3:
                raise ValueError(f"{path}: line {n}: expected 3 columns (distance, elevation_deg, "
                                 f"azimuth_deg), got {len(vals)}")
            rows.append(vals)
        if not rows:
            raise ValueError(f"{path}: no camera rows")
        arr = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: contains NaN or Inf")
    return arr


def _read_idr_projections(path: Path) -> torch.Tensor:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz archive ({e})") from e
    with data:
        keys = set(data.files)
        ids = sorted(int(m.group(1)) for k in keys if (m := re.fullmatch(r"world_mat_(\d+)", k)))
        if not ids:
            raise ValueError(f"{path}: no 'world_mat_<i>' arrays (keys: {sorted(keys)[:8]})")
        has_scale = any(re.fullmatch(r"scale_mat_\d+", k) for k in keys)
        projections = []
        for i in range(ids[-1] + 1):
            world = _matrix(data, path, f"world_mat_{i}", ((4, 4), (3, 4)))
            world = np.concatenate([world, [[0.0, 0.0, 0.0, 1.0]]]) if world.shape == (3, 4) else world
            if has_scale:
                world = world @ _matrix(data, path, f"scale_mat_{i}", ((4, 4),))
            P = world[:3, :4]
            if abs(np.linalg.det(P[:, :3])) <= 1e-12 * np.abs(P[:, :3]).max() ** 3:
                raise ValueError(f"{path}: world_mat_{i} (times scale_mat_{i}) has a singular 3x3 block; "
                                 "not a pinhole projection")
            projections.append(P)
    return torch.from_numpy(np.stack(projections))


def _matrix(data, path: Path, key: str, shapes) -> np.ndarray:
    if key not in data.files:
        raise ValueError(f"{path}: missing key {key!r}")
    m = np.asarray(data[key])
    if m.dtype.kind not in "iuf" or tuple(m.shape) not in shapes:
        raise ValueError(f"{path}: {key!r} must be a numeric {' or '.join(f'{a}x{b}' for a, b in shapes)} "
                         f"matrix, got dtype {m.dtype} shape {m.shape}")
    m = m.astype(np.float64)
    if not np.isfinite(m).all():
        raise ValueError(f"{path}: {key!r} contains NaN or Inf")
    return m


def _read_json(path: Path, image_size) -> Cameras:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if isinstance(doc, dict):
        if "cameras" not in doc:
            raise ValueError(f"{path}: a JSON object must have a 'cameras' list "
                             "(and optionally 'image_size')")
        if "image_size" in doc:
            file_size = _check_image_size(tuple(doc["image_size"]) if isinstance(doc["image_size"], list)
                                          else doc["image_size"], f"{path}: 'image_size'")
            if image_size is not None and image_size != file_size:
                raise ValueError(f"{path}: image_size argument {image_size} disagrees with the file's "
                                 f"{file_size}")
            image_size = file_size
        doc = doc["cameras"]
    if not isinstance(doc, list) or not doc:
        raise ValueError(f"{path}: expected a non-empty list of cameras {{'K', 'R', 't'}}")
    if image_size is None:
        raise ValueError(f"{path}: the file has no 'image_size'; pass image_size=(H, W)")
    Ks, Rs, ts = [], [], []
    for i, cam in enumerate(doc):
        if not isinstance(cam, dict):
            raise ValueError(f"{path}: camera {i} is a {type(cam).__name__}, expected an object with K, R, t")
        for key, shape, out in (("K", (3, 3), Ks), ("R", (3, 3), Rs), ("t", (3,), ts)):
            if key not in cam:
                raise ValueError(f"{path}: camera {i}: missing key {key!r}")
            try:
                arr = np.asarray(cam[key], dtype=np.float64)
            except (TypeError, ValueError):
                arr = None
            if arr is None or arr.shape != shape:
                raise ValueError(f"{path}: camera {i}: {key!r} must be a {'x'.join(map(str, shape))} "
                                 f"array of numbers, got {cam[key]!r}")
            out.append(arr)
    try:
        return Cameras(np.stack(Ks), np.stack(Rs), np.stack(ts), image_size)
    except ValueError as e:  # name the camera the Cameras check found, in the file's terms
        raise ValueError(f"{path}: {e} (cameras are numbered from 0 in file order)") from e


def save_cameras_json(cameras: Cameras, path) -> None:
    """Write ``cameras`` as ``{"image_size": [H, W], "cameras": [{"K", "R", "t"}, ...]}`` (float64 text,
    so float64 cameras round-trip exactly); :func:`load_cameras` reads it back."""
    if not isinstance(cameras, Cameras):
        raise TypeError(f"save_cameras_json: expected Cameras, got {type(cameras).__name__}")
    c = cameras.detach().to(device="cpu", dtype=torch.float64)
    cams = [{"K": c.K[i].tolist(), "R": c.R[i].tolist(), "t": c.t[i].tolist()} for i in range(len(c))]
    doc = {"image_size": list(c.image_size), "cameras": cams}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")
