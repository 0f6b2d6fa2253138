"""Rigid transforms: rotation maps, the :class:`Pose` ``x' = R x + t``, and the learnable pose/camera update.

Rotation helpers (axis-angle, 6D, quaternions) are batched over leading dims and give finite values and
gradients at 0 and 180 degrees wherever the maths allows. :class:`PoseParameters` is the one learnable
parameterisation of camera extrinsics (and optionally intrinsics) in the engine: pose refinement
optimises one pose with it (whitened, about the object's centre), IDR's ``learn_cameras`` a batch of
cameras (through :class:`CameraParameters`, a constructor over it). It lives here, next to the rotations
it is made of, rather than in a pipeline, because ``core.camera`` re-exports ``CameraParameters``.

:mod:`taichi_dr.core.camera` imports this module; this one imports ``Cameras`` only inside functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CameraParameters",
    "Pose",
    "PoseParameters",
    "axis_angle_to_matrix",
    "matrix_to_axis_angle",
    "matrix_to_quaternion",
    "matrix_to_rotation_6d",
    "quaternion_to_matrix",
    "rotation_6d_to_matrix",
]

# A rotation matrix read from a file or given by a user must be this close to orthonormal with det +1
# (the same tolerance as Cameras: float32 text round-trips pass, reflections and scalings do not).
ROTATION_ATOL = 1e-3
# Below this squared angle the rotation formulas switch to Taylor series (truncation error < 1e-16).
_SMALL_ANGLE2 = 1e-4
CONVENTIONS = ("object_to_camera", "camera_to_object")
ROTATIONS = ("axis_angle", "quaternion", "6d")


# ----------------------------------------------------------------------------------------------------------
# rotations
# ----------------------------------------------------------------------------------------------------------

def _normalize(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """v / |v| over the last dim, finite (zero) value and gradient at v = 0."""
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(eps)


def _skew(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) cross-product matrix: skew(a) @ b == cross(a, b)."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).reshape(v.shape[:-1] + (3, 3))


def _rotation_errors(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per matrix: max |R R^T - I| and |det R - 1| (leading dims kept)."""
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    ortho = (R @ R.transpose(-1, -2) - eye).abs().amax(dim=(-1, -2))
    det = (torch.linalg.det(R) - 1).abs()
    return ortho, det


def axis_angle_to_matrix(v: torch.Tensor) -> torch.Tensor:
    """Rodrigues: axis-angle ``v (..., 3)`` (direction = axis, norm = angle in radians) -> ``(..., 3, 3)``.

    ``R = I + a [v]x + b [v]x^2`` with ``a = sin(th)/th``, ``b = (1 - cos th)/th^2``; both use Taylor series
    near th = 0, so the value is exactly I and the gradient (d R / d v_i = [e_i]x) exact at v = 0.
    """
    th2 = (v * v).sum(-1)
    small = th2 < _SMALL_ANGLE2
    # Double-where: the non-Taylor branch never sees th = 0, so no 0/0 even in its (discarded) gradient.
    th2_safe = torch.where(small, torch.ones_like(th2), th2)
    th = th2_safe.sqrt()
    a = torch.where(small, 1 - th2 / 6 + th2 * th2 / 120, torch.sin(th) / th)
    # (1 - cos th) written as 2 sin^2(th/2): no cancellation for small angles in float32.
    b = torch.where(small, 0.5 - th2 / 24 + th2 * th2 / 720, 2 * torch.sin(th / 2) ** 2 / th2_safe)
    k = _skew(v)
    eye = torch.eye(3, dtype=v.dtype, device=v.device)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Rotation ``(..., 3, 3)`` -> unit quaternion ``(..., 4)`` as (w, x, y, z) with w >= 0.

    Shepperd's method: of the four ways to recover q, take the one dividing by the largest component
    (|q_i| >= 1/2), so the value and gradient are well conditioned at every angle, 180 degrees included.
    """
    m = R
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    four_q2 = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22,
                           1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1)  # 4 q_i^2
    # Row i is 4 q_i * q.
    cand = torch.stack([
        torch.stack([four_q2[..., 0], m21 - m12, m02 - m20, m10 - m01], dim=-1),
        torch.stack([m21 - m12, four_q2[..., 1], m10 + m01, m02 + m20], dim=-1),
        torch.stack([m02 - m20, m10 + m01, four_q2[..., 2], m12 + m21], dim=-1),
        torch.stack([m10 - m01, m02 + m20, m12 + m21, four_q2[..., 3]], dim=-1),
    ], dim=-2)
    # 2 sqrt(4 q_i^2) = 4 |q_i|. The chosen row has 4 q_i^2 >= 1; the clamp only keeps the other rows finite.
    cand = cand / (2 * four_q2.clamp_min(0.1).sqrt())[..., None]
    idx = four_q2.argmax(dim=-1)
    q = torch.take_along_dim(cand, idx[..., None, None].expand(idx.shape + (1, 4)), dim=-2).squeeze(-2)
    q = q * torch.where(q[..., :1] < 0, -1.0, 1.0)
    return _normalize(q)


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Quaternion ``(..., 4)`` (w, x, y, z), any non-zero norm -> rotation ``(..., 3, 3)``."""
    w, x, y, z = q.unbind(-1)
    s = 2 / (q * q).sum(-1).clamp_min(1e-12)
    out = torch.stack([
        1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
        s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
        s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y),
    ], dim=-1)
    return out.reshape(q.shape[:-1] + (3, 3))


def matrix_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """Rotation ``(..., 3, 3)`` -> axis-angle ``(..., 3)`` with angle in [0, pi].

    Goes through the quaternion: angle = 2 atan2(|xyz|, w), v = xyz * angle / |xyz|, with a Taylor series
    of the factor near angle 0. At exactly 180 degrees both v and -v are valid; one is returned.
    """
    q = matrix_to_quaternion(R)
    w, xyz = q[..., 0], q[..., 1:]
    s2 = (xyz * xyz).sum(-1)
    small = s2 < 1e-6  # then w > 0.99999 (q is a unit quaternion with w >= 0)
    s_safe = torch.where(small, torch.ones_like(s2), s2).sqrt()
    w_safe = torch.where(small, w, torch.ones_like(w))
    x2 = s2 / (w_safe * w_safe)
    # 2 atan(s/w)/s = (2/w) * (1 - x^2/3 + x^4/5 - ...), x = s/w.
    factor = torch.where(small, (2 / w_safe) * (1 - x2 / 3 + x2 * x2 / 5),
                         2 * torch.atan2(s_safe, w) / s_safe)
    return xyz * factor[..., None]


def rotation_6d_to_matrix(x: torch.Tensor) -> torch.Tensor:
    """Zhou et al. 2019 continuous 6D representation ``(..., 6)`` -> rotation ``(..., 3, 3)``.

    Gram-Schmidt on the two 3-vectors gives the first two rows; the third is their cross product.
    """
    a1, a2 = x[..., :3], x[..., 3:]
    b1 = _normalize(a1)
    b2 = _normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-2)


def matrix_to_rotation_6d(R: torch.Tensor) -> torch.Tensor:
    """Rotation ``(..., 3, 3)`` -> 6D ``(..., 6)`` (its first two rows); inverse of rotation_6d_to_matrix."""
    return R[..., :2, :].reshape(R.shape[:-2] + (6,))



# ----------------------------------------------------------------------------------------------------------
# Pose
# ----------------------------------------------------------------------------------------------------------

def _as_float_tensor(x, name: str, shape: tuple[int, ...], dtype=None, device=None) -> Tensor:
    if isinstance(x, Tensor):
        if not x.is_floating_point():
            x = x.to(torch.float64)
    else:
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name}: expected an array of numbers with shape {shape}, got {x!r}") from e
        x = torch.from_numpy(arr)
    if tuple(x.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    return x.to(dtype=dtype or x.dtype, device=device)


def _check_rotation(R: Tensor, name: str) -> None:
    with torch.no_grad():
        ortho, det = _rotation_errors(R.double())
    if float(ortho) > ROTATION_ATOL or float(det) > ROTATION_ATOL:
        d = float(torch.linalg.det(R.double()))
        raise ValueError(f"{name} is not a rotation matrix (max |R R^T - I| = {float(ortho):.3g}, "
                         f"det = {d:.4g}); expected an orthonormal 3x3 matrix with determinant +1")


@dataclass(frozen=True, eq=False)
class Pose:
    """Rigid transform ``x' = R x + t``: object coordinates -> the camera's world frame (object -> camera
    for a camera with identity extrinsics).

    R (3, 3) rotation, t (3,). Construction checks that R is a rotation (within ``ROTATION_ATOL``) unless
    ``validate=False``. Both tensors share dtype and device.
    """

    R: Tensor
    t: Tensor

    def __init__(self, R, t, *, validate: bool = True, name: str = "pose"):
        R = _as_float_tensor(R, f"{name}: R", (3, 3))
        t = _as_float_tensor(t, f"{name}: t", (3,), dtype=R.dtype, device=R.device)
        if validate:
            _check_rotation(R, f"{name}: R")
        object.__setattr__(self, "R", R)
        object.__setattr__(self, "t", t)

    # -- constructors ----------------------------------------------------------------------------------

    @staticmethod
    def identity(dtype=torch.float32, device=None) -> Pose:
        return Pose(torch.eye(3, dtype=dtype, device=device), torch.zeros(3, dtype=dtype, device=device))

    @staticmethod
    def from_matrix(M, name: str = "pose") -> Pose:
        """From a ``(4, 4)`` (last row 0 0 0 1) or ``(3, 4)`` matrix ``[R | t]``."""
        M = M if isinstance(M, Tensor) else torch.from_numpy(np.asarray(M, dtype=np.float64))
        if tuple(M.shape) not in ((4, 4), (3, 4)):
            raise ValueError(f"{name}: expected a 4x4 or 3x4 matrix [R | t], got shape {tuple(M.shape)}")
        if M.shape[0] == 4:
            last = M[3].double()
            if not torch.allclose(last, torch.tensor([0.0, 0, 0, 1], dtype=torch.float64), atol=1e-6):
                raise ValueError(f"{name}: the last row of a 4x4 pose must be (0, 0, 0, 1), "
                                 f"got {last.tolist()}")
        return Pose(M[:3, :3], M[:3, 3], name=name)

    @staticmethod
    def from_camera_to_object(R, t, name: str = "pose") -> Pose:
        """From the camera's pose in object coordinates (``x_obj = R x_cam + t``, OpenCV camera axes)."""
        inv = Pose(R, t, name=name)
        return inv.inverse()

    @staticmethod
    def from_cameras(cameras, index: int = 0) -> Pose:
        """The extrinsics of camera ``index`` as a pose (mesh in world coordinates = object coordinates)."""
        from taichi_dr.core.camera import Cameras  # camera.py imports this module

        if not isinstance(cameras, Cameras):
            raise TypeError(f"Pose.from_cameras: expected Cameras, got {type(cameras).__name__}")
        c = cameras.detach()
        return Pose(c.R[index], c.t[index])

    # -- conversions -----------------------------------------------------------------------------------

    def matrix(self) -> Tensor:
        """(4, 4) homogeneous matrix."""
        M = torch.eye(4, dtype=self.R.dtype, device=self.R.device)
        M[:3, :3] = self.R
        M[:3, 3] = self.t
        return M

    def inverse(self) -> Pose:
        Rt = self.R.transpose(0, 1)
        return Pose(Rt, -(Rt @ self.t), validate=False)

    def camera_to_object(self) -> Pose:
        """The inverse transform: for an object-to-camera pose, the camera's pose in object coordinates."""
        return self.inverse()

    def compose(self, other: Pose) -> Pose:
        """``self o other``: apply ``other`` first."""
        other = other.to(self.R.device, self.R.dtype)
        return Pose(self.R @ other.R, self.R @ other.t + self.t, validate=False)

    def apply(self, points: Tensor) -> Tensor:
        """Transform points ``(..., 3)``."""
        return points @ self.R.transpose(0, 1).to(points) + self.t.to(points)

    def to(self, device=None, dtype=None) -> Pose:
        R, t = self.R.to(device=device, dtype=dtype), self.t.to(device=device, dtype=dtype)
        return Pose(R, t, validate=False)

    def detach(self) -> Pose:
        return Pose(self.R.detach(), self.t.detach(), validate=False)

    def to_dict(self) -> dict:
        """JSON-ready: both conventions, float64 text."""
        p = self.detach().to("cpu", torch.float64)
        inv = p.inverse()
        return {"R": p.R.tolist(), "t": p.t.tolist(), "matrix": p.matrix().tolist(),
                "camera_to_object": {"R": inv.R.tolist(), "t": inv.t.tolist()}}

    def __repr__(self) -> str:
        aa = matrix_to_axis_angle(self.R.detach().double())
        deg = math.degrees(float(aa.norm()))
        return f"Pose(rotation={deg:.3f} deg about {aa.tolist()}, t={self.t.detach().tolist()})"


# ----------------------------------------------------------------------------------------------------------
# The learnable pose (one camera or a batch)
# ----------------------------------------------------------------------------------------------------------

def _matvec(M: Tensor, v: Tensor) -> Tensor:
    """``M (..., 3, 3) @ v (..., 3)``; a plain matrix-vector product for unbatched operands (the same
    arithmetic as ``M @ v``, so a single pose gives the same bits as before batching existed)."""
    return M @ v if M.dim() == 2 else (M @ v[..., None])[..., 0]


class PoseParameters(torch.nn.Module):
    """A learnable update of camera extrinsics (and optionally intrinsics) around a base value: one pose
    (``R0 (3, 3)``, pose refinement) or a batch of B cameras (``R0 (B, 3, 3)``, e.g. IDR's camera
    refinement through :class:`CameraParameters`).

    Base: ``R0 (*, 3, 3)``, ``t0 (*, 3)`` (world or object -> camera) and intrinsics ``K0 (*, 3, 3)`` at
    ``image_size``; ``pivot (*, 3)`` or None: the point that stays put when the rotation changes (pose
    refinement: the object's centre; None: the world origin, i.e. ``R = D R0, t = t0 + dt``).

    Learnable coordinates, each with a leading ``*`` (nothing for one pose, B for a batch): ``rot (*, 3)``
    (``(*, 6)`` for ``rotation="6d"``), ``dt (*, 3)``, with ``refine_focal`` ``log_focal_scale`` ((1,)
    shared by all cameras, or (B,) with ``shared_focal=False``), with ``refine_principal_point``
    ``principal_point (*, 2)``. Their concatenation ``c (*, n)`` gives the update ``u = mix @ c`` (``mix``
    a fixed (n, n) matrix, the identity until :meth:`whiten`) holding ``rot, dt, log_focal, pp``:

    * ``parameterization="object_to_camera"``: ``R = D R0``, ``t = t0 + R0 p - D R0 p + dt`` (rotation D
      about the pivot p, in camera axes; translation in camera axes);
    * ``"camera_to_object"``: ``R = D R0``, camera centre ``C = C0 + dt`` (world axes), ``t = -R C``
      (rotation D about the camera centre);
    * D is ``exp(rot)`` (``"axis_angle"``), the quaternion ``(1, rot) / |(1, rot)|`` (``"quaternion"``) or
      Zhou et al.'s 6D vector (``"6d"``, starting at the identity ``(1, 0, 0, 0, 1, 0)``);
    * fx, fy (and the skew) are scaled by ``exp(log_focal)`` (a zoom about the principal point); the
      principal point moves by ``pp * W / 2``.

    With the coordinates at their start, :meth:`cameras` reproduces the base exactly.
    """

    def __init__(self, R0: Tensor, t0: Tensor, K0: Tensor, image_size: tuple[int, int], pivot: Tensor | None = None,
                 rotation: str = "axis_angle", parameterization: str = "object_to_camera",
                 refine_focal: bool = False, refine_principal_point: bool = False, *, shared_focal: bool = True):
        super().__init__()
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation: expected one of {ROTATIONS}, got {rotation!r}")
        if parameterization not in CONVENTIONS:
            raise ValueError(f"parameterization: expected one of {CONVENTIONS}, got {parameterization!r}")
        if R0.dim() not in (2, 3) or tuple(R0.shape[-2:]) != (3, 3):
            raise ValueError(f"R0: expected shape (3, 3) or (B, 3, 3), got {tuple(R0.shape)}")
        lead = tuple(R0.shape[:-2])
        for name, x, inner in (("t0", t0, (3,)), ("K0", K0, (3, 3)), ("pivot", pivot, (3,))):
            if x is not None and tuple(x.shape) != lead + inner:
                raise ValueError(f"{name}: expected shape {lead + inner} (like R0), got {tuple(x.shape)}")
        self.rotation, self.parameterization = rotation, parameterization
        self.image_size = tuple(image_size)
        self.refine_focal, self.refine_principal_point = bool(refine_focal), bool(refine_principal_point)
        self.rot_dim = 6 if rotation == "6d" else 3
        kw = dict(dtype=R0.dtype, device=R0.device)
        self.register_buffer("R0", R0.detach().clone())
        self.register_buffer("t0", t0.detach().clone().to(**kw))
        self.register_buffer("K0", K0.detach().clone().to(**kw))
        self.register_buffer("pivot", None if pivot is None else pivot.detach().clone().to(**kw))
        self.register_buffer("mix", torch.eye(self.num_params, **kw))
        self.rot = torch.nn.Parameter(self._rotation_start(lead, kw))
        self.dt = torch.nn.Parameter(torch.zeros(lead + (3,), **kw))
        focal_shape = (1,) if shared_focal or not lead else lead
        self.log_focal_scale = torch.nn.Parameter(torch.zeros(focal_shape, **kw)) if self.refine_focal else None
        self.principal_point = (torch.nn.Parameter(torch.zeros(lead + (2,), **kw)) if self.refine_principal_point
                                else None)

    def _rotation_start(self, lead: tuple[int, ...], kw: dict) -> Tensor:
        if self.rotation == "6d":
            return torch.tensor([1.0, 0, 0, 0, 1, 0], **kw).repeat(lead + (1,))
        return torch.zeros(lead + (3,), **kw)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # State dicts saved by the old CameraParameters have no whitening matrix: it was the identity.
        if prefix + "mix" not in state_dict and prefix + "rot" in state_dict:
            state_dict[prefix + "mix"] = torch.eye(self.num_params, dtype=self.mix.dtype, device=self.mix.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def batched(self) -> bool:
        return self.R0.dim() == 3

    @property
    def num_params(self) -> int:
        """n: learnable coordinates per camera."""
        return self.rot_dim + 3 + int(self.refine_focal) + 2 * int(self.refine_principal_point)

    def coordinates(self) -> Tensor:
        """``(*, n)``: the learnable coordinates concatenated (differentiable)."""
        parts = [self.rot, self.dt]
        if self.log_focal_scale is not None:
            lead = self.dt.shape[:-1]
            parts.append(self.log_focal_scale.expand(lead if lead else (1,)).reshape(lead + (1,)))
        if self.principal_point is not None:
            parts.append(self.principal_point)
        return torch.cat(parts, -1)

    def update(self) -> Tensor:
        """``u = mix @ coordinates()``, ``(*, n)``."""
        c = self.coordinates()
        return self.mix @ c if c.dim() == 1 else c @ self.mix.transpose(0, 1)

    def _parts(self, u: Tensor) -> dict:
        r = self.rot_dim
        parts = {"rot": u[..., :r], "dt": u[..., r:r + 3]}
        i = r + 3
        if self.refine_focal:
            parts["log_focal"] = u[..., i]
            i += 1
        if self.refine_principal_point:
            parts["pp"] = u[..., i:i + 2]
        return parts

    def _rotation(self, rot: Tensor) -> Tensor:
        if self.rotation == "axis_angle":
            return axis_angle_to_matrix(rot)
        if self.rotation == "6d":
            return rotation_6d_to_matrix(rot)
        return quaternion_to_matrix(torch.cat([torch.ones_like(rot[..., :1]), rot], -1))

    def _transform(self, u: Tensor, image_size=None, base=None) -> tuple[Tensor, Tensor, Tensor]:
        """Update ``u (*, n)`` -> ``(R, t, K at image_size)``; ``base`` replaces (R0, t0, K0, pivot)."""
        R0, t0, K0, pivot = base if base is not None else (self.R0, self.t0, self.K0, self.pivot)
        p = self._parts(u)
        D = self._rotation(p["rot"])
        R = D @ R0
        if self.parameterization == "object_to_camera":
            if pivot is None:
                t = t0 + p["dt"]
            else:
                c = _matvec(R0, pivot)
                t = t0 + c - _matvec(D, c) + p["dt"]
        else:
            centre = -_matvec(R0.transpose(-1, -2), t0) + p["dt"]
            t = -_matvec(R, centre)
        K = K0
        if "log_focal" in p or "pp" in p:
            fx, skew, cx = K[..., 0, 0], K[..., 0, 1], K[..., 0, 2]
            zero, fy, cy = K[..., 1, 0], K[..., 1, 1], K[..., 1, 2]
            if "log_focal" in p:
                f = torch.exp(p["log_focal"])
                fx, skew, fy = fx * f, skew * f, fy * f
            if "pp" in p:
                half_w = self.image_size[1] / 2
                cx, cy = cx + p["pp"][..., 0] * half_w, cy + p["pp"][..., 1] * half_w
            K = torch.stack([torch.stack([fx, skew, cx], -1), torch.stack([zero, fy, cy], -1), K[..., 2, :]], -2)
        if image_size is not None and tuple(image_size) != self.image_size:
            # Rows 0 and 1 scale with the size ratio: exact for area-downsampled targets, since pixel
            # coordinates start at the image corner.
            sy = image_size[0] / self.image_size[0]
            sx = image_size[1] / self.image_size[1]
            K = K * torch.tensor([sx, sy, 1.0], dtype=K.dtype, device=K.device)[:, None]
        return R, t, K

    def object_to_camera(self) -> tuple[Tensor, Tensor]:
        """``(R (*, 3, 3), t (*, 3))``, differentiable in the coordinates."""
        R, t, _ = self._transform(self.update())
        return R, t

    def intrinsics(self, image_size: tuple[int, int] | None = None) -> Tensor:
        """K (*, 3, 3) at ``image_size`` (default the base size), differentiable in the coordinates."""
        return self._transform(self.update(), image_size)[2]

    def cameras(self, image_size: tuple[int, int] | None = None):
        """The cameras (B = 1 for one pose): intrinsics at ``image_size``, extrinsics the current pose."""
        from taichi_dr.core.camera import Cameras

        size = tuple(image_size) if image_size is not None else self.image_size
        R, t, K = self._transform(self.update(), size)
        return Cameras(K, R, t, size, validate=False)

    def forward(self):
        """:meth:`cameras` at the base size (``CameraParameters()(...)`` returns the refined cameras)."""
        return self.cameras()

    def rotation_delta(self) -> Tensor:
        """``D (*, 3, 3)``: the current rotation update."""
        return self._rotation(self._parts(self.update())["rot"])

    @torch.no_grad()
    def reset(self) -> None:
        """Coordinates back to their start (no update)."""
        self.rot.copy_(self._rotation_start(tuple(self.rot.shape[:-1]), dict(dtype=self.rot.dtype,
                                                                             device=self.rot.device)))
        for p in (self.dt, self.log_focal_scale, self.principal_point):
            if p is not None:
                p.zero_()

    @torch.no_grad()
    def bake(self) -> None:
        """Fold the current update into the base (R0, t0, K0) and reset the coordinates, so the next updates
        start small again (the exp map and quaternion stay well conditioned)."""
        R, t, K = self._transform(self.update())
        # Re-orthonormalise: many small float32 updates would otherwise drift off SO(3).
        U, _, Vh = torch.linalg.svd(R)
        self.R0.copy_(U @ Vh)
        self.t0.copy_(t)
        self.K0.copy_(K)
        self.reset()

    @torch.no_grad()
    def whiten(self, points: Tensor, image_size: tuple[int, int] | None = None, floor: float = 1e-4) -> Tensor:
        """Set ``mix`` so that a unit step of the coordinates in any direction moves the projections of
        ``points (N, 3)`` (object coordinates, e.g. the visible surface) by one pixel RMS at ``image_size``,
        and different directions move them in uncorrelated ways: ``mix = M^(-1/2)`` with ``M = J^T J / N``, J
        the Jacobian of the projected points with respect to the update (central differences in float64, at
        the current pose; bakes first). Without it an out-of-plane rotation, which looks much like a
        translation in the image, gets a tiny share of a gradient step. Eigenvalues below ``floor`` times the
        largest (directions the points barely constrain, e.g. focal length against depth) are clamped.
        One pose only (not a batch), with a 3-vector rotation. Returns the eigenvalues of M.
        """
        from taichi_dr.core.camera import Cameras

        if self.batched or self.rotation == "6d":
            raise ValueError("PoseParameters.whiten: needs a single pose (R0 (3, 3)) with an axis_angle or "
                             f"quaternion rotation, got R0 {tuple(self.R0.shape)} and {self.rotation!r}")
        self.bake()
        size = tuple(image_size) if image_size is not None else self.image_size
        n = self.num_params
        pts = points.detach().to(torch.float64)
        base = tuple(None if x is None else x.to(torch.float64) for x in (self.R0, self.t0, self.K0, self.pivot))

        def project(u):
            R, t, K = self._transform(u, size, base)
            return Cameras(K, R, t, size, validate=False).project(pts)[0, :, :2].reshape(-1)

        h = 1e-5
        eye = torch.eye(n, dtype=torch.float64, device=pts.device)
        J = torch.stack([(project(h * eye[i]) - project(-h * eye[i])) / (2 * h) for i in range(n)], 1)
        M = J.T @ J / pts.shape[0]
        evals, evecs = torch.linalg.eigh(M)
        clamped = evals.clamp_min(float(evals.max()) * floor).clamp_min(1e-30)
        mix = evecs @ torch.diag(clamped.rsqrt()) @ evecs.T
        self.mix.copy_(mix.to(self.mix.dtype))
        return evals


class CameraParameters(PoseParameters):
    """Learnable refinement of a Cameras batch: :class:`PoseParameters` about the world origin,
    ``R = R_delta @ R0``, ``t = t0 + dt`` and, with ``learn_focal``, ``f = f0 * exp(log_focal_scale)`` (a zoom
    about the principal point; one scale shared by all views, or one per view).

    ``rotation="axis_angle"``: ``R_delta = exp(rot)``, ``rot (B, 3)`` starting at 0; ``"6d"``: Zhou et al.'s
    6D vector ``rot (B, 6)`` starting at the identity; ``"quaternion"`` also works. Calling the module
    returns the refined cameras (equal to the input at initialisation); the input's tensors are detached
    and stored as buffers. State dict: ``K0, R0, t0, mix`` (identity), ``rot, dt[, log_focal_scale]``.
    """

    def __init__(self, cameras, rotation: str = "axis_angle", learn_focal: bool = False, shared_focal: bool = True):
        from taichi_dr.core.camera import Cameras

        if not isinstance(cameras, Cameras):
            raise TypeError(f"CameraParameters: expected a Cameras batch, got {type(cameras).__name__}")
        if rotation not in ROTATIONS:
            raise ValueError(f"CameraParameters: rotation must be one of {ROTATIONS}, got {rotation!r}")
        super().__init__(cameras.R, cameras.t, cameras.K, cameras.image_size, None, rotation,
                         refine_focal=learn_focal, shared_focal=shared_focal)
