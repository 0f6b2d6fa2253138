"""6-DoF pose refinement of a known mesh through the soft rasterizer.

Aligning a known 3D model to an object in an image: render the mesh at the current pose, compare with the
target (silhouette IoU/MSE, RGB, a distance-transform silhouette loss that attracts from far away, or any
differentiable image-space function such as a feature extractor), and follow the gradient to the pose.
Instead of a loss, the caller may supply the gradient itself (:class:`PixelGradientField`: ``dL/d(image)``
per pixel, propagated through the rasterizer's backward pass), or a 2D displacement per pixel
(:class:`DisplacementField`, e.g. a learned correspondence field as in Grabner et al. 2020, "Geometric
Correspondence Fields"), turned into ``dL/d(image) = grad(image) . displacement`` for the rasterizer's
backward pass, or propagated analytically through the projection of the surface points the rasterizer
found at each pixel.

Silhouette losses compare the soft silhouette with the target mask drawn with the render's own edge
profile (:func:`matched_mask`): SoftRas's soft silhouette is inflated by about ``sqrt(sigma)`` beyond the
true edge, which against a hard mask biases the pose by percents of the distance.

Frames. A :class:`Pose` ``(R, t)`` maps object (mesh) coordinates into the world frame of the camera it is
used with: ``x_world = R x_obj + t``. For a camera given only by its intrinsics (identity extrinsics, the
usual case for a photo) that is the object-to-camera transform ``x_cam = R x_obj + t`` (OpenCV axes). The
renderer sees the mesh in object coordinates and a camera whose extrinsics are the full object-to-camera
transform ``E o P`` (E the camera's world->camera extrinsics, P the pose). :meth:`Pose.camera_to_object`
gives the inverse (the camera's pose in object coordinates) and :meth:`Pose.from_camera_to_object` reads one.

What moves during the optimisation (``PoseSettings.parameterization``):

* ``"object_to_camera"``: the object rotates about its bounding-box centre (axes of the camera) and
  translates along the camera axes; rotation and translation are decoupled, which suits an object seen by
  a fixed camera.
* ``"camera_to_object"``: the camera rotates about its own centre and its centre moves in object axes, as in
  refining a camera's extrinsics against a fixed model.

Both reach the same optimum. The rotation update is an axis-angle vector (exp map) or a quaternion; the
update is folded into the base pose at every stage, so it stays small. The intrinsics are fixed unless
``refine_focal`` / ``refine_principal_point`` is set.

Coarse-to-fine (``PoseSettings.stages``): early stages render a downsampled image with a large sigma (blurry
coverage reaching far, cheap because the image is small), later ones sharpen at full resolution.

Optimisation: at every stage the update parameters are whitened (:meth:`PoseParameters.whiten`) so that a
unit step moves the projected mesh by one pixel RMS in uncorrelated ways; losses take steepest-descent steps
of a few pixels, displacement fields Gauss-Newton steps (``PoseSettings.optimizer``). Measured figures and
the reasons for these choices: docs/benchmarks_pose.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from taichi_dr.core.camera import (
    Cameras,
    _rotation_errors,
    axis_angle_to_matrix,
    matrix_to_axis_angle,
    quaternion_to_matrix,
)
from taichi_dr.core.mesh import Mesh
from taichi_dr.losses.silhouette import neg_iou_loss
from taichi_dr.raster.renderer import RenderOutput, render_mesh
from taichi_dr.raster.settings import RasterSettings
from taichi_dr.raster.shading import Lights

__all__ = [
    "DEFAULT_STAGES",
    "LOSSES",
    "OPTIMIZERS",
    "DisplacementField",
    "PixelGradientField",
    "Pose",
    "PoseParameters",
    "PoseResult",
    "PoseSettings",
    "PoseStep",
    "PoseTarget",
    "Stage",
    "composite",
    "distance_transform_loss",
    "draw_overlay",
    "feature_loss",
    "image_gradient",
    "load_pose",
    "matched_mask",
    "refine_pose",
    "reprojection_flow",
    "rgb_loss",
    "rotation_error_deg",
    "save_pose",
    "signed_distance",
    "silhouette_iou_loss",
    "squared_distance_transform",
    "silhouette_mse_loss",
    "surface_points",
    "target_image",
    "translation_error",
]

# A rotation matrix read from a file or given by a user must be this close to orthonormal with det +1
# (the same tolerance as Cameras: float32 text round-trips pass, reflections and scalings do not).
ROTATION_ATOL = 1e-3
CONVENTIONS = ("object_to_camera", "camera_to_object")
WARMUP_STEPS = 5  # Adam's learning-rate ramp at the start of every stage
MAX_STEP_PX = 2.0  # largest gauss_newton / steepest step, in pixels of RMS point motion at the stage's size
ROTATIONS = ("axis_angle", "quaternion")
OPTIMIZERS = ("auto", "adam", "gauss_newton", "steepest")


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
    def from_cameras(cameras: Cameras, index: int = 0) -> Pose:
        """The extrinsics of camera ``index`` as a pose (mesh in world coordinates = object coordinates)."""
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


def rotation_error_deg(R1, R2) -> float:
    """Angle (degrees) of the rotation ``R1 R2^T`` between two rotations ``(3, 3)`` (or Poses), in float64."""
    R1 = (R1.R if isinstance(R1, Pose) else torch.as_tensor(R1)).detach().cpu().double()
    R2 = (R2.R if isinstance(R2, Pose) else torch.as_tensor(R2)).detach().cpu().double()
    # Through the quaternion (atan2), accurate at small angles where acos((tr - 1) / 2) is not.
    return math.degrees(float(matrix_to_axis_angle(R1 @ R2.transpose(0, 1)).norm()))


def translation_error(t1, t2, relative_to: float | None = None) -> float:
    """``|t1 - t2|`` (Poses or (3,) vectors), divided by ``relative_to`` when given (e.g. the distance)."""
    t1 = (t1.t if isinstance(t1, Pose) else torch.as_tensor(t1)).detach().cpu().double()
    t2 = (t2.t if isinstance(t2, Pose) else torch.as_tensor(t2)).detach().cpu().double()
    err = float((t1 - t2).norm())
    return err / relative_to if relative_to else err


def load_pose(path) -> Pose:
    """Read a pose from JSON: ``{"R": 3x3, "t": 3}`` or ``{"matrix": 4x4 | 3x4}``, with an optional
    ``"convention": "object_to_camera" (default) | "camera_to_object"``. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pose file not found")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON pose file ({e})") from e
    if isinstance(doc, list):
        doc = {"matrix": doc}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object with 'R' and 't', or 'matrix'")
    convention = doc.get("convention", "object_to_camera")
    if convention not in CONVENTIONS:
        raise ValueError(f"{path}: 'convention' must be one of {CONVENTIONS}, got {convention!r}")
    name = str(path)
    try:
        if "matrix" in doc:
            pose = Pose.from_matrix(_json_array(doc["matrix"], path, "matrix"), name=name)
        elif "R" in doc and "t" in doc:
            pose = Pose(_json_array(doc["R"], path, "R"), _json_array(doc["t"], path, "t"), name=name)
        else:
            raise ValueError(f"{path}: expected keys 'R' and 't', or 'matrix' (got {sorted(doc)})")
    except TypeError as e:
        raise ValueError(str(e)) from e
    return pose.inverse() if convention == "camera_to_object" else pose


def _json_array(value, path: Path, key: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {key!r} must be an array of numbers, got {value!r}") from None
    return arr


def save_pose(pose: Pose, path, **extra) -> None:
    """Write ``pose`` (object -> camera, plus its inverse) as JSON; ``extra`` keys are added as they are."""
    doc = {"convention": "object_to_camera", **pose.to_dict(), **extra}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class PoseTarget:
    """What the render is compared with.

    mask: (H, W) float in [0, 1] (the object's silhouette), or None.
    rgb:  (H, W, 3) float in [0, 1] (straight, not premultiplied, colours where there is a mask), or None.
    background: the colour the image has where the object is not. The RGB loss and fields compare the
          render composited over it (:func:`composite`) with ``rgb`` as it is when there is no mask, and with
          the target's colours composited over it with the matched mask (:func:`matched_mask`) when there is
          one, so a photo with clutter needs a mask.
    """

    mask: Tensor | None
    rgb: Tensor | None
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self):
        try:
            bg = tuple(float(b) for b in self.background)
        except (TypeError, ValueError):
            bg = ()
        if len(bg) != 3 or not all(math.isfinite(b) for b in bg):
            raise ValueError(f"PoseTarget.background: expected 3 finite numbers, got {self.background!r}")
        object.__setattr__(self, "background", bg)
        if self.mask is None and self.rgb is None:
            raise ValueError("PoseTarget: give a mask, an rgb image, or both")
        for name, x, nd in (("mask", self.mask, 2), ("rgb", self.rgb, 3)):
            if x is None:
                continue
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise TypeError(f"PoseTarget.{name}: expected a float tensor")
            if x.dim() != nd or (nd == 3 and x.shape[-1] != 3):
                want = "(H, W)" if nd == 2 else "(H, W, 3)"
                raise ValueError(f"PoseTarget.{name}: expected shape {want}, got {tuple(x.shape)}")
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"PoseTarget.{name}: contains NaN or Inf")
        if self.mask is not None and self.rgb is not None and self.mask.shape != self.rgb.shape[:2]:
            raise ValueError(f"PoseTarget: mask {tuple(self.mask.shape)} and rgb {tuple(self.rgb.shape)} "
                             "sizes differ")

    @staticmethod
    def from_image(image, name: str = "target") -> PoseTarget:
        """A target from an image: ``(H, W)`` or ``(H, W, 1)`` is a mask, ``(H, W, 3)`` an RGB image without
        mask, ``(H, W, 4)`` RGB + alpha (the silhouette). uint8 is divided by 255; floats must lie in
        [0, 1]. Tensors or arrays; float64 arrays stay float64, anything else becomes float32."""
        if isinstance(image, PoseTarget):
            return image
        if isinstance(image, Tensor):
            x = image.detach()
        else:
            arr = np.asarray(image)
            if arr.dtype.kind not in "uif":
                raise TypeError(f"{name}: expected an image of numbers, got dtype {arr.dtype}")
            x = torch.from_numpy(np.ascontiguousarray(arr))
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        elif not x.is_floating_point():
            raise TypeError(f"{name}: expected uint8 or float pixels, got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: contains NaN or Inf")
        if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
            raise ValueError(f"{name}: float pixels must lie in [0, 1], got [{float(x.min()):.3g}, "
                             f"{float(x.max()):.3g}]")
        if x.dim() == 3 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.dim() == 2:
            return PoseTarget(mask=x, rgb=None)
        if x.dim() == 3 and x.shape[-1] == 3:
            return PoseTarget(mask=None, rgb=x)
        if x.dim() == 3 and x.shape[-1] == 4:
            return PoseTarget(mask=x[..., 3].contiguous(), rgb=x[..., :3].contiguous())
        raise ValueError(f"{name}: expected an image shaped (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got "
                         f"{tuple(x.shape)}")

    @property
    def image_size(self) -> tuple[int, int]:
        x = self.mask if self.mask is not None else self.rgb
        return int(x.shape[0]), int(x.shape[1])

    def to(self, device=None, dtype=None) -> PoseTarget:
        def mv(x):
            return None if x is None else x.to(device=device, dtype=dtype)

        return PoseTarget(mv(self.mask), mv(self.rgb), self.background)

    def resized(self, image_size: tuple[int, int]) -> PoseTarget:
        """Area-averaged to ``(H, W)`` (the same as rendering at that size for an exact factor)."""
        if tuple(image_size) == self.image_size:
            return self

        def down(x, chans_last):
            x = x[None, None] if not chans_last else x.permute(2, 0, 1)[None]
            y = F.interpolate(x, size=tuple(image_size), mode="area")
            return y[0, 0] if not chans_last else y[0].permute(1, 2, 0).contiguous()

        return PoseTarget(None if self.mask is None else down(self.mask, False),
                          None if self.rgb is None else down(self.rgb, True), self.background)

    @cached_property
    def distance_maps(self) -> tuple[Tensor, Tensor]:
        """``(outside, inside)`` (H, W), computed once: the distance from each pixel outside the (binarised)
        mask to the mask, and from each pixel inside to the background; 0 elsewhere. In units of the longer
        image side, so losses do not depend on the resolution."""
        from scipy.ndimage import distance_transform_edt

        m = self._require_mask("the distance-transform loss")
        binary = (m.detach().cpu().numpy() >= 0.5)
        if not binary.any():
            raise ValueError("target mask: empty after thresholding at 0.5; the distance-transform loss "
                             "needs an object in the target")
        scale = 1.0 / max(binary.shape)
        outside = distance_transform_edt(~binary) * scale  # distance to the nearest mask pixel
        inside = distance_transform_edt(binary) * scale  # distance to the nearest background pixel
        return (torch.from_numpy(outside).to(device=m.device, dtype=m.dtype),
                torch.from_numpy(inside).to(device=m.device, dtype=m.dtype))

    @cached_property
    def _edge_bins(self) -> Tensor | None:
        """(H, W) int64 on the mask's device: each pixel's signed distance to the edge of the binarised mask
        as a bin of :func:`_signed_distance_bins` (computed once); None for a mask without an edge."""
        m = self._require_mask("the silhouette losses").detach() >= 0.5
        if not bool(m.any()) or bool(m.all()):
            return None
        return _signed_distance_bins(m)

    @cached_property
    def signed_distance(self) -> np.ndarray:
        """(H, W) float64 numpy: pixel-unit signed distance to the edge of the mask binarised at 0.5
        (> 0 outside, < 0 inside; see :func:`signed_distance`), computed once."""
        m = self._require_mask("the silhouette losses").detach().cpu().numpy() >= 0.5
        return signed_distance(m)

    @cached_property
    def extended_rgb(self) -> Tensor:
        """(H, W, 3): ``rgb`` with every pixel outside the mask given the colour of the nearest pixel inside,
        so the object's colour is defined wherever a soft edge reaches (computed once)."""
        from scipy.ndimage import distance_transform_edt

        m = self._require_mask("extended_rgb").detach().cpu().numpy() >= 0.5
        if self.rgb is None:
            raise ValueError("extended_rgb: the target has no colour")
        if not m.any() or m.all():
            return self.rgb
        _, (iy, ix) = distance_transform_edt(~m, return_indices=True)
        idx = torch.from_numpy(iy * m.shape[1] + ix).to(self.rgb.device).reshape(-1)
        return self.rgb.reshape(-1, 3)[idx].reshape(self.rgb.shape)

    def _require_mask(self, what: str) -> Tensor:
        if self.mask is None:
            raise ValueError(f"{what} needs a target mask (a (H, W) mask or an RGBA image), but the target "
                             "has only RGB")
        return self.mask


# ----------------------------------------------------------------------------------------------------------
# Losses and fields
# ----------------------------------------------------------------------------------------------------------
# A loss is fn(rendered: RenderOutput, target: PoseTarget, camera: Cameras) -> scalar tensor, with rendered
# maps batched (1, H, W, ...) at the stage's resolution and target at the same size.

def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Signed distance (pixels) from each pixel centre to the edge of a binary mask ``(H, W)``: > 0 outside,
    < 0 inside, +-0.5 next to the edge (the edge lies half-way between pixel centres). An empty or full mask
    has no edge: +inf / -inf everywhere."""
    from scipy.ndimage import distance_transform_edt

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.full(mask.shape, np.inf)
    if mask.all():
        return np.full(mask.shape, -np.inf)
    return np.where(mask, 0.5 - distance_transform_edt(mask), distance_transform_edt(~mask) - 0.5)


def squared_distance_transform(mask: Tensor) -> Tensor:
    """Exact squared Euclidean distance transform, on the mask's device: for each True pixel of ``mask (H, W)``
    bool, the squared distance in pixels (integer-valued float64) to the nearest False pixel; 0 at False
    pixels; inf everywhere when there is no False pixel.

    CPU tensors go to SciPy (``distance_transform_edt``, linear time, and the array is shared, not copied);
    tensors on a GPU stay there (:func:`_squared_edt_torch`), so a training step never waits for a copy.
    """
    if mask.device.type != "cpu":
        return _squared_edt_torch(mask)
    from scipy.ndimage import distance_transform_edt

    m = mask.numpy()
    if m.all():
        return torch.full(m.shape, math.inf, dtype=torch.float64)
    return torch.from_numpy(np.square(distance_transform_edt(m)).round())


def _squared_edt_torch(mask: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """:func:`squared_distance_transform` with torch operations of fixed sizes (no host synchronisation).

    Separable and exact: the distance along each row by running maxima/minima of the False pixels' columns,
    then ``D(i, j) = min_k g(k, j)^2 + (i - k)^2`` over the rows, in chunks of columns: ``H^2 W`` work, cheap
    on a GPU at the image sizes of pose refinement but far slower than SciPy's linear-time transform on a
    CPU (hence SciPy there).
    """
    H, W = mask.shape
    opts = dict(dtype=torch.float64, device=mask.device)
    cols = torch.arange(W, **opts)
    free = ~mask
    last = torch.where(free, cols, torch.full_like(cols, -math.inf)).cummax(dim=1).values
    following = torch.where(free, cols, torch.full_like(cols, math.inf)).flip(1).cummin(dim=1).values.flip(1)
    g2 = torch.minimum(cols - last, following - cols).square()  # inf in rows without a False pixel
    rows = torch.arange(H, **opts)
    row_d2 = (rows[:, None] - rows[None, :]).square()  # (H, H)
    out = torch.empty(H, W, **opts)
    step = max(1, chunk_elements // max(H * H, 1))
    for c0 in range(0, W, step):
        out[:, c0:c0 + step] = (g2[None, :, c0:c0 + step] + row_d2[:, :, None]).amin(dim=1)
    return out


def _signed_distance_bins(mask: Tensor) -> Tensor:
    """(H, W) int64: the signed distance of :func:`signed_distance` (``0.5 - sqrt(n)`` inside, ``sqrt(n) - 0.5``
    outside, n >= 1 the squared distance to the nearest pixel of the other side) as a bin index that
    increases with it: ``N - n`` inside, ``N - 1 + n`` outside, ``N = (H - 1)^2 + (W - 1)^2 + 1`` (so
    indices lie in ``[1, 2N - 2]``). A mask without an edge gives clamped, meaningless bins."""
    H, W = mask.shape
    N = (H - 1) ** 2 + (W - 1) ** 2 + 1
    n_in = squared_distance_transform(mask)
    n_out = squared_distance_transform(~mask)
    n = torch.where(mask, n_in, n_out).nan_to_num(posinf=N - 1).clamp(1, N - 1).round().long()
    return torch.where(mask, N - n, N - 1 + n)


def _bin_levels(n_bins: int, N: int, like: Tensor) -> Tensor:
    """The signed distance (float64) each bin of :func:`_signed_distance_bins` stands for."""
    b = torch.arange(n_bins, dtype=torch.float64, device=like.device)
    return torch.where(b < N, 0.5 - (N - b).clamp_min(0).sqrt(), (b - N + 1).clamp_min(0).sqrt() - 0.5)


def matched_mask(rendered: RenderOutput, target: PoseTarget) -> Tensor:
    """The target mask drawn with the render's own edge profile: ``(1, H, W)``, no gradient.

    The soft silhouette is not a blurred version of the hard one: near a silhouette edge several faces
    (the front and back sheets, neighbours along the edge) each add coverage ``sigmoid(-d^2 / sigma)``, so
    ``alpha`` crosses 0.5 about ``sqrt(sigma)`` *outside* the true edge. Against a hard mask every loss then
    prefers a pose that shrinks the object (a few percent of the distance at SoftRas's sigma), and rotates
    it to match the shrunken shape. Instead, the profile ``alpha(s)`` as a function of the signed distance
    ``s`` to the render's hard silhouette (``pix_to_face >= 0``) is measured on the current render (the mean
    alpha at each distance) and applied to the target's signed distance map (linear interpolation between
    the distances the render has, the end values beyond), so at the true pose the two agree whatever sigma,
    mesh density or resolution. Falls back to the raw mask when nothing is rendered (or everything is).

    Runs on the render's device with fixed-size tensor operations (no host synchronisation; on a GPU no
    SciPy either): the signed distances are exact square roots of integers, so they are binned by their
    squared value.
    """
    mask = target._require_mask("the silhouette losses")
    target_bins = target._edge_bins
    if rendered.alpha.shape[0] != 1 or target_bins is None:
        return mask[None]
    with torch.no_grad():
        cov = rendered.pix_to_face[0] >= 0
        H, W = cov.shape
        N = (H - 1) ** 2 + (W - 1) ** 2 + 1
        n_bins = 2 * N
        bins = _signed_distance_bins(cov).reshape(-1)
        alpha = rendered.alpha[0].detach().to(torch.float64).reshape(-1)
        total = torch.zeros(n_bins, dtype=torch.float64, device=alpha.device).index_add_(0, bins, alpha)
        count = torch.zeros_like(total).index_add_(0, bins, torch.ones_like(alpha))
        present = count > 0
        profile = total / count.clamp_min(1)
        levels = _bin_levels(n_bins, N, total)
        # Fill the bins the render does not have: linear between the nearest present ones, constant beyond.
        idx = torch.arange(n_bins, device=total.device)
        below = torch.where(present, idx, torch.full_like(idx, -1)).cummax(0).values
        above = torch.where(present, idx, torch.full_like(idx, n_bins)).flip(0).cummin(0).values.flip(0)
        has_below, has_above = below >= 0, above < n_bins
        lo = torch.where(has_below, below, above).clamp(0, n_bins - 1)
        hi = torch.where(has_above, above, below).clamp(0, n_bins - 1)
        span = levels[hi] - levels[lo]
        w = torch.where(span > 0, (levels - levels[lo]) / span.clamp_min(1e-300), torch.zeros_like(span))
        filled = profile[lo] + w * (profile[hi] - profile[lo])
        soft = filled[target_bins.reshape(-1)].reshape(H, W)
        edged = cov.any() & ~cov.all()
        return torch.where(edged, soft.to(mask.dtype), mask)[None]


def silhouette_iou_loss(rendered: RenderOutput, target: PoseTarget, camera: Cameras | None = None, *,
                        match_edges: bool = True) -> Tensor:
    """``1 - soft IoU`` of the rendered silhouette and the target mask (drawn with the render's edge
    profile, :func:`matched_mask`, unless ``match_edges=False``)."""
    ref = matched_mask(rendered, target) if match_edges else target._require_mask("the IoU loss")[None]
    return neg_iou_loss(rendered.alpha, ref)


def silhouette_mse_loss(rendered: RenderOutput, target: PoseTarget, camera: Cameras | None = None, *,
                        match_edges: bool = True) -> Tensor:
    """Mean squared difference of the rendered silhouette and the target mask (drawn with the render's edge
    profile, :func:`matched_mask`, unless ``match_edges=False``)."""
    ref = matched_mask(rendered, target) if match_edges else target._require_mask("the MSE loss")[None]
    return (rendered.alpha - ref).square().mean()


def composite(rendered: RenderOutput, background=(0.0, 0.0, 0.0)) -> Tensor:
    """The rendered colours over a background: ``alpha * rgb + (1 - alpha) * background``, (B, H, W, 3).

    The aggregated ``rgb`` itself is not an image of the object: with SoftRas's small gamma a face's colour
    wins wherever its coverage is above zero, so ``rgb`` is the object dilated to the blur's cut-off; the
    silhouette ``alpha`` says how much of it is there.
    """
    if rendered.rgb is None:
        raise ValueError("the rendered rgb is needed (render with outputs including 'rgb')")
    bg = torch.as_tensor(background, dtype=rendered.rgb.dtype, device=rendered.rgb.device)
    a = rendered.alpha[..., None]
    return a * rendered.rgb + (1 - a) * bg


def target_image(rendered: RenderOutput, target: PoseTarget, match_edges: bool = True) -> Tensor:
    """``(1, H, W, 3)``: what :func:`composite` should equal at the true pose: ``target.rgb`` when the target
    has no mask, else its colours over its background with the (matched) mask."""
    if target.rgb is None:
        raise ValueError("the RGB loss needs a target with colour (an (H, W, 3) or (H, W, 4) image), but the "
                         "target is a mask")
    if target.mask is None:
        return target.rgb[None]
    m = (matched_mask(rendered, target) if match_edges else target.mask[None])[..., None]
    bg = torch.as_tensor(target.background, dtype=m.dtype, device=m.device)
    return m * target.extended_rgb[None] + (1 - m) * bg


def rgb_loss(rendered: RenderOutput, target: PoseTarget, camera: Cameras | None = None, *,
             match_edges: bool = True) -> Tensor:
    """Mean squared difference of the render composited over ``target.background`` and the target image
    (:func:`target_image`)."""
    ref = target_image(rendered, target, match_edges)
    return (composite(rendered, target.background) - ref).square().mean()


def distance_transform_loss(rendered: RenderOutput, target: PoseTarget,
                            camera: Cameras | None = None) -> Tensor:
    """Silhouette loss that attracts from far away:
    ``mean_p alpha_p D_out(p) + (1 - alpha_p) D_in(p)``.

    ``D_out`` is the distance from a pixel outside the target mask to the mask, ``D_in`` from a pixel inside
    to the background (:attr:`PoseTarget.distance_maps`, computed once per target). Rendered coverage far
    from the target costs in proportion to its distance, so even a render that does not overlap the target
    at all is pulled towards it; uncovered parts of the target cost likewise, so shrinking is no way out.
    Zero only when the binarised silhouettes agree.
    """
    outside, inside = target.distance_maps
    a = rendered.alpha
    return (a * outside[None] + (1 - a) * inside[None]).mean()


LOSSES: dict[str, Callable] = {
    "silhouette_iou": silhouette_iou_loss,
    "silhouette_mse": silhouette_mse_loss,
    "rgb": rgb_loss,
    "distance_transform": distance_transform_loss,
}
_ALIASES = {"iou": "silhouette_iou", "silhouette": "silhouette_iou", "mse": "silhouette_mse",
            "dt": "distance_transform"}


def feature_loss(extractor: Callable[[Tensor], Tensor], channel: str = "rgb") -> Callable:
    """A loss comparing images in a feature space: ``mean |phi(render) - phi(target)|^2``.

    extractor: differentiable ``(1, C, H, W) -> (1, ...)`` (e.g. a frozen CNN). channel: ``"rgb"`` (3
    channels: the render composited over ``target.background``, and the target composited likewise when
    it has a mask) or ``"alpha"`` (1 channel). The target's
    features are computed once per target resolution and cached.
    """
    if channel not in ("rgb", "alpha"):
        raise ValueError(f"feature_loss: channel must be 'rgb' or 'alpha', got {channel!r}")
    cache: dict = {}

    def reference(target: PoseTarget) -> Tensor:
        if channel == "alpha":
            return target._require_mask("feature_loss(channel='alpha')")[None, None]
        if target.rgb is None:
            raise ValueError("feature_loss(channel='rgb') needs a target with colour")
        ref = target.rgb
        if target.mask is not None:
            bg = torch.as_tensor(target.background, dtype=ref.dtype, device=ref.device)
            ref = target.mask[..., None] * ref + (1 - target.mask[..., None]) * bg
        return ref.permute(2, 0, 1)[None]

    def loss(rendered: RenderOutput, target: PoseTarget, camera: Cameras | None = None) -> Tensor:
        key = (id(target), target.image_size)
        if key not in cache:
            with torch.no_grad():
                # Keep the target alive with its features, so its id() is not reused by another object.
                cache[key] = (target, extractor(reference(target)).detach())
        feats_t = cache[key][1]
        if channel == "alpha":
            img = rendered.alpha[:, None]
        else:
            img = composite(rendered, target.background).permute(0, 3, 1, 2)
        feats = extractor(img)
        if feats.shape != feats_t.shape:
            raise ValueError(f"feature_loss: the extractor gave {tuple(feats.shape)} for the render but "
                             f"{tuple(feats_t.shape)} for the target")
        return (feats - feats_t).square().mean()

    loss.channel = channel
    return loss


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


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    """One step of the coarse-to-fine schedule.

    size: longest image side in pixels to render at (None or >= the target's: full resolution).
    sigma: the rasterizer's sigma (SoftRas NDC units: 1e-2 blurry and long-range, 1e-4 crisp).
    iters: optimisation steps.
    lr: multiplier on ``PoseSettings.lr``; within the stage it decays (cosine) to a tenth of that.
    """

    size: int | None
    sigma: float
    iters: int
    lr: float = 1.0

    def __post_init__(self):
        if self.size is not None and not (isinstance(self.size, int) and self.size >= 4):
            raise ValueError(f"Stage.size: expected None or an int >= 4, got {self.size!r}")
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise ValueError(f"Stage.sigma: expected a finite value > 0, got {self.sigma!r}")
        if not (isinstance(self.iters, int) and self.iters >= 0):
            raise ValueError(f"Stage.iters: expected an int >= 0, got {self.iters!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"Stage.lr: expected a finite value > 0, got {self.lr!r}")


DEFAULT_STAGES = (
    Stage(size=64, sigma=3e-3, iters=30, lr=1.0),
    Stage(size=128, sigma=3e-4, iters=20, lr=1.0),
    Stage(size=None, sigma=1e-4, iters=15, lr=0.5),
)


@dataclass(frozen=True)
class PoseSettings:
    """How :func:`refine_pose` optimises.

    stages: the coarse-to-fine schedule (see :class:`Stage`).
    rotation: the rotation update, ``"axis_angle"`` (exp map of a 3-vector) or ``"quaternion"`` (the unit
        quaternion ``(1, x, y, z) / |.|``, a 3-vector too).
    parameterization: ``"object_to_camera"`` (the object moves) or ``"camera_to_object"`` (the camera moves);
        see the module docstring. Whitening makes the two agree to first order; for errors that are
        rotations of the object about its own centre (the usual case) object_to_camera is the more robust
        (measured: from ~10 degrees, Gauss-Newton steps on a correspondence field converge with it and
        wander with camera_to_object, which needs a large camera rotation and translation that cancel).
    refine_focal: also learn a focal-length scale (fx, fy together, about the principal point).
    refine_principal_point: also learn the principal point.
    lr: the step size. The update parameters are whitened (see :class:`PoseParameters`) so that a unit step
        moves the mesh's projected vertices by one pixel RMS at the stage's resolution, and every direction
        (an out-of-plane rotation as much as a translation) moves them independently; for the steepest and
        Adam optimizers ``lr`` is thus a step in pixels (times the stage's ``lr``, with its decay).
    optimizer: how the gradient becomes a step, in the whitened coordinates. ``"steepest"``: a step of
        ``lr`` pixels along the gradient (its direction is kept, its size ignored, so losses and
        pixel-gradient fields of any scale work); ``"gauss_newton"``: the plain gradient times ``lr``,
        which for a displacement field is a Gauss-Newton step when ``lr = 1`` (exactly for
        ``conversion="reprojection"``, about for ``"image"``, whose field is scaled to match); both limited
        to ``MAX_STEP_PX`` pixels per step. ``"adam"``: Adam, whose per-coordinate normalisation moves
        every direction with a consistent gradient sign at the full rate (measured on the benchmark: it
        turns the object away when the translation is what is wrong, 89% success against 100% for
        steepest). ``"auto"`` (default): gauss_newton for a :class:`DisplacementField`, steepest otherwise.
    multi_start: number of starts; the first is the initial pose, the others it rotated by
        ``multi_start_angle`` degrees about the object's centre (axes spread over the sphere). Each start runs
        the first stage; the one with the lowest loss continues.
    gamma: the rasterizer's depth-softmax temperature (RGB aggregation).
    shading: "gouraud" or "flat", when lights are given.
    """

    stages: tuple[Stage, ...] = DEFAULT_STAGES
    rotation: str = "axis_angle"
    parameterization: str = "object_to_camera"
    refine_focal: bool = False
    refine_principal_point: bool = False
    lr: float = 1.0
    optimizer: str = "auto"
    multi_start: int = 1
    multi_start_angle: float = 45.0
    gamma: float = 1e-4
    shading: str = "gouraud"

    def __post_init__(self):
        if self.rotation not in ROTATIONS:
            raise ValueError(f"PoseSettings.rotation: expected one of {ROTATIONS}, got {self.rotation!r}")
        if self.parameterization not in CONVENTIONS:
            raise ValueError(f"PoseSettings.parameterization: expected one of {CONVENTIONS}, got "
                             f"{self.parameterization!r}")
        stages = tuple(self.stages)
        if not stages or not all(isinstance(s, Stage) for s in stages):
            raise ValueError("PoseSettings.stages: expected a non-empty sequence of Stage")
        object.__setattr__(self, "stages", stages)
        for name in ("lr", "gamma", "multi_start_angle"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"PoseSettings.{name}: expected a finite number > 0, got {v!r}")
        if not (isinstance(self.multi_start, int) and self.multi_start >= 1):
            raise ValueError(f"PoseSettings.multi_start: expected an int >= 1, got {self.multi_start!r}")
        if self.shading not in ("gouraud", "flat"):
            raise ValueError(f"PoseSettings.shading: expected 'gouraud' or 'flat', got {self.shading!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"PoseSettings.optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")


# ----------------------------------------------------------------------------------------------------------
# The learnable pose
# ----------------------------------------------------------------------------------------------------------

class PoseParameters(torch.nn.Module):
    """A learnable object-to-camera pose (and optionally intrinsics) around a base value.

    Base: object-to-camera ``(R0 (3, 3), t0 (3,))`` and intrinsics ``K0 (3, 3)`` at ``image_size``;
    ``pivot (3,)``: the object point the object rotates about (its centre). The update
    ``u = mix @ phi`` (``phi`` the learnable vector, ``mix`` a fixed matrix, identity until :meth:`whiten`)
    holds ``rot (3)``, ``dt (3)``, then ``log_focal (1)`` with ``refine_focal`` and ``pp (2)`` with
    ``refine_principal_point``:

    * ``parameterization="object_to_camera"``: ``R = D R0``, ``t = t0 + R0 c - D R0 c + dt`` (rotation D
      about the object's centre c, in camera axes; translation in camera axes);
    * ``"camera_to_object"``: ``R = D R0``, camera centre ``C = C0 + dt`` (object axes), ``t = -R C``
      (rotation D about the camera centre);
    * D is ``exp(rot)`` (``rotation="axis_angle"``) or the quaternion ``(1, rot) / |(1, rot)|``;
    * fx, fy (and the skew) are scaled by ``exp(log_focal)``; the principal point moves by ``pp * W / 2``.

    At ``phi = 0`` :meth:`cameras` reproduces the base pose and K exactly.
    """

    def __init__(self, R0: Tensor, t0: Tensor, K0: Tensor, image_size: tuple[int, int], pivot: Tensor,
                 rotation: str = "axis_angle", parameterization: str = "object_to_camera",
                 refine_focal: bool = False, refine_principal_point: bool = False):
        super().__init__()
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation: expected one of {ROTATIONS}, got {rotation!r}")
        if parameterization not in CONVENTIONS:
            raise ValueError(f"parameterization: expected one of {CONVENTIONS}, got {parameterization!r}")
        self.rotation, self.parameterization = rotation, parameterization
        self.image_size = tuple(image_size)
        self.refine_focal, self.refine_principal_point = bool(refine_focal), bool(refine_principal_point)
        n = 6 + int(self.refine_focal) + 2 * int(self.refine_principal_point)
        kw = dict(dtype=R0.dtype, device=R0.device)
        self.register_buffer("R0", R0.detach().clone())
        self.register_buffer("t0", t0.detach().clone().to(**kw))
        self.register_buffer("K0", K0.detach().clone().to(**kw))
        self.register_buffer("pivot", pivot.detach().clone().to(**kw))
        self.register_buffer("mix", torch.eye(n, **kw))
        self.phi = torch.nn.Parameter(torch.zeros(n, **kw))

    @property
    def num_params(self) -> int:
        return int(self.phi.shape[0])

    def _parts(self, u: Tensor) -> dict:
        parts = {"rot": u[:3], "dt": u[3:6]}
        i = 6
        if self.refine_focal:
            parts["log_focal"] = u[i]
            i += 1
        if self.refine_principal_point:
            parts["pp"] = u[i:i + 2]
        return parts

    def _rotation(self, rot: Tensor) -> Tensor:
        if self.rotation == "axis_angle":
            return axis_angle_to_matrix(rot)
        return quaternion_to_matrix(torch.cat([torch.ones_like(rot[:1]), rot]))

    def _transform(self, u: Tensor, image_size=None, base=None) -> tuple[Tensor, Tensor, Tensor]:
        """Update vector ``u (n,)`` -> ``(R, t, K at image_size)``; ``base`` replaces (R0, t0, K0, pivot)."""
        R0, t0, K0, pivot = base if base is not None else (self.R0, self.t0, self.K0, self.pivot)
        p = self._parts(u)
        D = self._rotation(p["rot"])
        R = D @ R0
        if self.parameterization == "object_to_camera":
            c = R0 @ pivot
            t = t0 + c - D @ c + p["dt"]
        else:
            centre = -(R0.transpose(0, 1) @ t0) + p["dt"]
            t = -(R @ centre)
        K = K0
        if "log_focal" in p or "pp" in p:
            (fx, skew, cx), (zero, fy, cy) = K[0], K[1]
            if "log_focal" in p:
                f = torch.exp(p["log_focal"])
                fx, skew, fy = fx * f, skew * f, fy * f
            if "pp" in p:
                half_w = self.image_size[1] / 2
                cx, cy = cx + p["pp"][0] * half_w, cy + p["pp"][1] * half_w
            K = torch.stack([torch.stack([fx, skew, cx]), torch.stack([zero, fy, cy]), K[2]])
        if image_size is not None and tuple(image_size) != self.image_size:
            # Rows 0 and 1 scale with the size ratio: exact for area-downsampled targets, since pixel
            # coordinates start at the image corner.
            sy = image_size[0] / self.image_size[0]
            sx = image_size[1] / self.image_size[1]
            K = K * torch.tensor([sx, sy, 1.0], dtype=K.dtype, device=K.device)[:, None]
        return R, t, K

    def object_to_camera(self) -> tuple[Tensor, Tensor]:
        """``(R (3, 3), t (3,))``, differentiable in ``phi``."""
        R, t, _ = self._transform(self.mix @ self.phi)
        return R, t

    def intrinsics(self, image_size: tuple[int, int] | None = None) -> Tensor:
        """K (3, 3) at ``image_size`` (default the base size), differentiable in ``phi``."""
        return self._transform(self.mix @ self.phi, image_size)[2]

    def cameras(self, image_size: tuple[int, int] | None = None) -> Cameras:
        """The render camera (B = 1): intrinsics at ``image_size``, extrinsics the object-to-camera pose."""
        size = tuple(image_size) if image_size is not None else self.image_size
        R, t, K = self._transform(self.mix @ self.phi, size)
        return Cameras(K, R, t, size, validate=False)

    @torch.no_grad()
    def bake(self) -> None:
        """Fold the current update into the base (R0, t0, K0) and reset ``phi`` to zero, so the next updates
        start small again (the exp map and quaternion stay well conditioned)."""
        R, t, K = self._transform(self.mix @ self.phi)
        # Re-orthonormalise: many small float32 updates would otherwise drift off SO(3).
        U, _, Vh = torch.linalg.svd(R)
        self.R0.copy_(U @ Vh)
        self.t0.copy_(t)
        self.K0.copy_(K)
        self.phi.zero_()

    @torch.no_grad()
    def whiten(self, points: Tensor, image_size: tuple[int, int] | None = None, floor: float = 1e-4) -> Tensor:
        """Set ``mix`` so that a unit step of ``phi`` in any direction moves the projections of ``points
        (N, 3)`` (object coordinates, e.g. the visible surface) by one pixel RMS at ``image_size``, and
        different directions move them in uncorrelated ways: ``mix = M^(-1/2)`` with ``M = J^T J / N``, J the
        Jacobian of the projected points with respect to the update (central differences in float64, at the
        current pose; call :meth:`bake` first). Without it an out-of-plane rotation, which looks much like a
        translation in the image, gets a tiny share of a gradient step. Eigenvalues below ``floor`` times the
        largest (directions the points barely constrain, e.g. focal length against depth) are clamped.
        Returns the eigenvalues of M.
        """
        self.bake()
        size = tuple(image_size) if image_size is not None else self.image_size
        n = self.num_params
        pts = points.detach().to(torch.float64)
        base = tuple(x.to(torch.float64) for x in (self.R0, self.t0, self.K0, self.pivot))

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
# ----------------------------------------------------------------------------------------------------------
# Refinement
# ----------------------------------------------------------------------------------------------------------

@dataclass
class PoseStep:
    """Passed to ``refine_pose``'s callback after every optimisation step."""

    start: int  # which start (multi-start), 0-based
    stage: int  # which stage, 0-based
    iteration: int  # overall step of this start, 0-based
    total: int  # steps of one start over all stages
    loss: float
    pose: Pose  # current pose (same frame as the initial pose)


@dataclass
class PoseResult:
    """What :func:`refine_pose` returns.

    pose: refined pose, in the frame of ``init_pose`` (object -> the camera's world frame).
    init_pose: the initial pose.
    K: (3, 3) refined intrinsics (the input K when they are fixed).
    camera: the refined camera (B = 1), K and world->camera extrinsics as given.
    history: loss at every step of the winning start (for fields: the RMS of a pixel-gradient field, or of
        a displacement field in pixels).
    history_stage: the stage of each history entry.
    start: index of the winning start; start_losses: final first-stage loss of every start.
    overlay: (H, W, 3) float, the target with the model's outline at the refined pose drawn on it.
    overlay_init: the same at the initial pose.
    silhouette: (H, W) hard silhouette at the refined pose (full resolution).
    seconds: wall-clock time of the whole refinement.
    extra: ``skipped_steps``: steps skipped because a gradient was not finite.
    """

    pose: Pose
    init_pose: Pose
    K: Tensor
    camera: Cameras
    history: list[float]
    history_stage: list[int]
    start: int
    start_losses: list[float]
    overlay: Tensor
    overlay_init: Tensor
    silhouette: Tensor
    seconds: float
    extra: dict = field(default_factory=dict)


def _resolve_loss(loss) -> tuple[str, Callable | PixelGradientField | DisplacementField, bool]:
    """-> (kind, what, needs_rgb). kind: 'loss' or 'field'."""
    if isinstance(loss, (PixelGradientField, DisplacementField)):
        return "field", loss, "rgb" in loss.channels
    if isinstance(loss, str):
        return "loss", _named_loss(loss), loss in ("rgb",)
    if callable(loss):
        return "loss", loss, getattr(loss, "channel", "rgb") == "rgb"
    if isinstance(loss, Mapping):
        if not loss:
            raise ValueError("loss: an empty mapping; give at least one {name or callable: weight}")
        terms = []
        needs_rgb = False
        for key, w in loss.items():
            if isinstance(key, str):
                fn = _named_loss(key)
                needs_rgb |= _ALIASES.get(key, key) == "rgb"
            elif callable(key):
                fn = key
                needs_rgb |= getattr(key, "channel", "rgb") == "rgb"
            else:
                raise TypeError(f"loss: mapping keys must be loss names or callables, got {key!r}")
            try:
                w = float(w)
            except (TypeError, ValueError):
                raise TypeError(f"loss: weight of {key!r} must be a number, got {w!r}") from None
            if not math.isfinite(w):
                raise ValueError(f"loss: weight of {key!r} must be finite, got {w}")
            terms.append((fn, w))

        def combined(rendered, target, camera):
            return sum(w * fn(rendered, target, camera) for fn, w in terms)

        return "loss", combined, needs_rgb
    raise TypeError(f"loss: expected a name ({', '.join(LOSSES)}), a callable, a {{loss: weight}} mapping, a "
                    f"PixelGradientField or a DisplacementField, got {type(loss).__name__}")


def _check_target(loss, target: PoseTarget) -> None:
    """Fail before any rendering when a named loss needs what the target lacks."""
    names = [loss] if isinstance(loss, str) else [k for k in loss if isinstance(k, str)] \
        if isinstance(loss, Mapping) else []
    for name in names:
        key = _ALIASES.get(name, name)
        if key in ("silhouette_iou", "silhouette_mse", "distance_transform") and target.mask is None:
            raise ValueError(f"loss {name!r} needs a target mask (an (H, W) mask or an RGBA image), but the "
                             "target has only RGB")
        if key == "rgb" and target.rgb is None:
            raise ValueError(f"loss {name!r} needs a target with colour (an (H, W, 3) or (H, W, 4) image), "
                             "but the target is a mask")


def _named_loss(name: str) -> Callable:
    key = _ALIASES.get(name, name)
    if key not in LOSSES:
        raise ValueError(f"loss: unknown loss {name!r}; choose from {sorted(LOSSES)} (or pass a callable)")
    return LOSSES[key]


def _stage_size(stage: Stage, image_size: tuple[int, int]) -> tuple[int, int]:
    H, W = image_size
    if stage.size is None or stage.size >= max(H, W):
        return H, W
    s = stage.size / max(H, W)
    return max(1, round(H * s)), max(1, round(W * s))


def _start_rotations(n: int, angle_deg: float, dtype, device) -> list[Tensor]:
    """Identity, then rotations by ``angle_deg`` about n - 1 axes spread over the sphere (Fibonacci)."""
    out = [torch.zeros(3, dtype=dtype, device=device)]
    m = n - 1
    golden = math.pi * (3 - math.sqrt(5))
    for i in range(m):
        z = 1 - 2 * (i + 0.5) / m
        r = math.sqrt(max(0.0, 1 - z * z))
        axis = torch.tensor([r * math.cos(golden * i), r * math.sin(golden * i), z], dtype=dtype,
                            device=device)
        out.append(axis * math.radians(angle_deg))
    return out


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


def _sgd_step_direction(g: Tensor, finite: Tensor, lr: float, steepest: bool) -> Tensor:
    """The gradient ``g (n,)`` an SGD step of ``lr`` takes, without host synchronisation: for ``steepest``
    of unit length (a step of lr pixels); then at most MAX_STEP_PX / lr long (a trust region: Gauss-Newton
    steps along directions the image barely constrains are large and leave the range where the linear model
    holds); zero unless ``finite`` (a 0-dim bool tensor)."""
    if steepest:
        norm = g.norm()
        g = torch.where(norm > 0, g / norm.clamp_min(torch.finfo(g.dtype).tiny), g)
    step = g.norm() * lr
    g = g * torch.where(step > MAX_STEP_PX, MAX_STEP_PX / step.clamp_min(MAX_STEP_PX), torch.ones_like(step))
    return torch.where(finite, g, torch.zeros_like(g))


def _to_floats(values: list) -> list[float]:
    """Python floats of a list of floats and 0-dim tensors, with one device-to-host copy."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    if not tensors:
        return [float(v) for v in values]
    read = iter(torch.stack([v.detach().to(torch.float64).reshape(()) for v in tensors]).cpu().tolist())
    return [next(read) if isinstance(v, Tensor) else float(v) for v in values]


def refine_pose(mesh: Mesh, target, camera: Cameras, init_pose: Pose | None = None, *,
                loss="silhouette_iou", settings: PoseSettings | None = None, lights: Lights | None = None,
                outputs: Sequence[str] | None = None, callback: Callable[[PoseStep], None] | None = None
                ) -> PoseResult:
    """Refine the 6-DoF pose of ``mesh`` so that its render matches ``target``.

    Args:
        mesh: the object, in its own coordinates (its colours/texture are used by the RGB loss).
        target: a :class:`PoseTarget`, or an image ``(H, W)`` mask / ``(H, W, 3)`` RGB / ``(H, W, 4)`` RGBA
            (tensor or array, uint8 or float in [0, 1]); its size must be the camera's image size.
        camera: one camera (``Cameras`` with B = 1): intrinsics, image size and world->camera extrinsics.
        init_pose: object -> world pose (object -> camera for identity extrinsics); a Pose, a (4, 4) matrix,
            or None for the identity (the mesh is already placed in the world).
        loss: ``"silhouette_iou"``, ``"silhouette_mse"``, ``"rgb"``, ``"distance_transform"``, a callable
            ``fn(rendered, target, camera) -> scalar`` (e.g. :func:`feature_loss`), a ``{loss: weight}``
            mapping of those, or a :class:`PixelGradientField` / :class:`DisplacementField`.
        settings: :class:`PoseSettings` (stages, parameterization, what is refined, optimizer).
        lights: shading for the rendered rgb, with directions in *camera* coordinates (OpenCV: x right,
            y down, z forward; e.g. (0, -1, -1) is above and behind the camera), so the lighting stays put
            while the object moves. None: unlit albedo.
        outputs: the render outputs the loss or field reads besides alpha (any of "rgb", "depth",
            "normals"); default: "rgb" for the RGB loss, callables and rgb fields, else none.
        callback: called with a :class:`PoseStep` after every step (progress bars).

    Returns a :class:`PoseResult` with the refined pose, loss history and overlays.
    """
    t_start = time.perf_counter()
    settings = settings or PoseSettings()
    if not isinstance(settings, PoseSettings):
        raise TypeError(f"settings: expected PoseSettings, got {type(settings).__name__}")
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected taichi_dr.Mesh, got {type(mesh).__name__}")
    if not isinstance(camera, Cameras):
        raise TypeError(f"camera: expected taichi_dr.Cameras, got {type(camera).__name__}")
    if len(camera) != 1:
        raise ValueError(f"camera: expected one camera (B = 1), got {len(camera)}; select one with camera[i]")
    dtype, device = mesh.verts.dtype, mesh.verts.device
    target = PoseTarget.from_image(target).to(device=device, dtype=dtype)
    if target.image_size != tuple(camera.image_size):
        raise ValueError(f"target: image size {target.image_size} (H, W) does not match the camera's "
                         f"image_size {tuple(camera.image_size)}")
    kind, objective, needs_rgb = _resolve_loss(loss)
    _check_target(loss, target)
    if outputs is None:
        outputs = ("rgb",) if needs_rgb else ()
    outputs = tuple(outputs)
    if init_pose is None:
        init_pose = Pose.identity(dtype, device)
    elif not isinstance(init_pose, Pose):
        init_pose = Pose.from_matrix(init_pose, name="init_pose")
    init_pose = init_pose.to(device, dtype)
    cam = camera.detach().to(device=device, dtype=dtype)
    extr = Pose(cam.R[0], cam.t[0], validate=False)
    T0 = extr.compose(init_pose)  # object -> camera

    verts = mesh.verts.detach()
    lo, hi = verts.amin(0), verts.amax(0)
    pivot = 0.5 * (lo + hi)
    if not float((verts - pivot).norm(dim=1).max()) > 0:
        raise ValueError(f"mesh {mesh.name!r}: all vertices coincide; its pose is undefined")
    static = mesh.with_verts(verts)

    stage_targets = {}

    def target_at(size):
        if size not in stage_targets:
            stage_targets[size] = target.resized(size)
        return stage_targets[size]

    def make_params(R0, t0) -> PoseParameters:
        return PoseParameters(R0, t0, cam.K[0], cam.image_size, pivot, settings.rotation,
                              settings.parameterization, settings.refine_focal,
                              settings.refine_principal_point)

    total = sum(s.iters for s in settings.stages)
    skipped: list = []   # one entry per skipped step (a bool tensor, or 1)
    correspondences = isinstance(objective, DisplacementField) and objective.conversion == "reprojection"
    optimizer = settings.optimizer
    if optimizer == "auto":
        optimizer = "gauss_newton" if isinstance(objective, DisplacementField) else "steepest"

    def run_stages(params: PoseParameters, stages, start_idx: int, offset: int, history, history_stage):
        """Optimise ``params`` through ``stages``; returns the last loss."""
        last = float("nan")
        it_global = offset
        stage_values: list = []   # this stage's losses (tensors) or field values (floats)
        for si, stage in stages:
            size = _stage_size(stage, cam.image_size)
            tgt = target_at(size)
            raster = RasterSettings(sigma=stage.sigma, gamma=settings.gamma)
            # Whiten with what the objective sees move: the visible surface for correspondences; all
            # vertices for image losses, whose silhouettes depend on the whole shape (measured: better).
            params.whiten(_visible_points(static, params.cameras(size)) if correspondences else verts, size)
            opt_cls = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
            opt = opt_cls(params.parameters(), lr=settings.lr * stage.lr)
            base_lrs = [g["lr"] for g in opt.param_groups]
            for it in range(stage.iters):
                # Cosine decay to 10% over the stage, for fine convergence at the end, after a short warm-up:
                # Adam's first steps have full size in every direction, however small its gradient, which
                # would throw away the previous stage's accuracy.
                decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * it / max(stage.iters - 1, 1)))
                if optimizer == "adam":
                    decay *= min(1.0, (it + 1) / WARMUP_STEPS)
                for g, lr0 in zip(opt.param_groups, base_lrs, strict=True):
                    g["lr"] = lr0 * decay
                opt.zero_grad(set_to_none=True)
                render_cam = params.cameras(size)
                lights_obj = _lights_in_object(lights, render_cam.R[0]) if lights is not None else None
                rendered = render_mesh(static, render_cam, lights_obj, raster, shading=settings.shading,
                                       outputs=outputs)
                # No host synchronisation in a step (for a loss; fields read their own values): the loss
                # stays a tensor until the stage is over, and a non-finite step is skipped on the device.
                if kind == "loss":
                    value = objective(rendered, tgt, render_cam.detach())
                    if not isinstance(value, Tensor) or value.numel() != 1:
                        raise ValueError("loss: the loss function must return a scalar tensor, got "
                                         f"{value if not isinstance(value, Tensor) else tuple(value.shape)}")
                    value = value.reshape(())
                    if value.requires_grad:
                        value.backward()
                    last = value.detach()
                elif isinstance(objective, DisplacementField) and objective.conversion == "reprojection":
                    last = _reprojection_step(objective, static, rendered, tgt, render_cam)
                else:
                    maps, grads, rms = _field_gradients(objective, rendered, tgt, render_cam.detach())
                    if any(m.requires_grad for m in maps):
                        torch.autograd.backward(maps, grads)
                    last = rms
                finite = torch.isfinite(torch.as_tensor(last, device=params.phi.device)).all()
                if params.phi.grad is not None:
                    finite = finite & torch.isfinite(params.phi.grad).all()
                if optimizer == "adam":
                    # Adam's moments would move the pose even on a zeroed gradient: decide on the host.
                    if bool(finite):
                        opt.step()
                    else:  # e.g. a degenerate render; skip the step rather than poison the pose
                        skipped.append(1)
                else:
                    if params.phi.grad is not None:
                        g = params.phi.grad
                        g.copy_(_sgd_step_direction(g, finite, opt.param_groups[0]["lr"], optimizer == "steepest"))
                    opt.step()   # plain SGD: a zero gradient leaves the pose exactly as it was
                    skipped.append(~finite)
                stage_values.append(last)
                history_stage.append(si)
                if callback is not None:   # (a callback reads the loss every step: one sync each)
                    with torch.no_grad():
                        R, t = params.object_to_camera()
                    callback(PoseStep(start_idx, si, it_global, total, float(last),
                                      extr.inverse().compose(Pose(R.detach(), t.detach(), validate=False))))
                it_global += 1
            values = _to_floats(stage_values)
            stage_values.clear()
            bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
            if kind == "loss" and bad is not None:
                raise FloatingPointError(f"loss became {values[bad]} at stage {si}, step {bad}")
            history.extend(values)
            if values:
                last = values[-1]
        params.bake()
        return last

    stages = list(enumerate(settings.stages))
    first, rest = stages[:1], stages[1:]
    starts = _start_rotations(settings.multi_start, settings.multi_start_angle, dtype, device)
    best = None
    start_losses = []
    for k, aa in enumerate(starts):
        # Start k: the initial pose rotated about the object's centre (in camera axes).
        D = axis_angle_to_matrix(aa)
        c = T0.R @ pivot
        params = make_params(D @ T0.R, T0.t + c - D @ c)
        hist, hstage = [], []
        value = run_stages(params, first, k, 0, hist, hstage)
        start_losses.append(value)
        if best is None or value < best[0]:
            best = (value, k, params, hist, hstage)
    _, k_best, params, history, history_stage = best
    run_stages(params, rest, k_best, len(history), history, history_stage)

    with torch.no_grad():
        R, t = params.object_to_camera()
        K = params.intrinsics().detach()
    T = Pose(R.detach(), t.detach(), validate=False)
    pose = extr.inverse().compose(T)
    refined_cam = Cameras(K, cam.R, cam.t, cam.image_size)
    sil = _hard_silhouette(static, K, T, cam.image_size)
    sil0 = _hard_silhouette(static, cam.K[0], T0, cam.image_size)
    background = target.rgb if target.rgb is not None else target.mask
    return PoseResult(pose=pose, init_pose=init_pose, K=K, camera=refined_cam, history=history,
                      history_stage=history_stage, start=k_best, start_losses=start_losses,
                      overlay=draw_overlay(background, sil), overlay_init=draw_overlay(background, sil0),
                      silhouette=sil, seconds=time.perf_counter() - t_start,
                      extra={"skipped_steps": int(sum(_to_floats(skipped)))})


@torch.no_grad()
def _visible_points(mesh: Mesh, camera: Cameras, max_points: int = 4096) -> Tensor:
    """Up to ``max_points`` surface points (N, 3) seen by ``camera`` (hard render), for whitening: what the
    image can tell about the pose is how these move. All vertices when (almost) nothing is visible."""
    out = render_mesh(mesh, camera.detach(), None, RasterSettings(mode="hard"), outputs=())
    pts = surface_points(mesh, camera.detach(), out.pix_to_face).reshape(-1, 3)
    pts = pts[torch.isfinite(pts).all(-1)]
    if pts.shape[0] < 64:
        return mesh.verts.detach()
    stride = max(1, -(-pts.shape[0] // max_points))
    return pts[::stride]


def _lights_in_object(lights: Lights, R: Tensor) -> Lights:
    """Camera-space light directions -> object space (``d_obj = R^T d_cam``), differentiable in R."""
    dirs = lights.directions.to(R) @ R  # row vectors: (R^T d)^T = d^T R
    return dataclasses.replace(lights, directions=dirs)


@torch.no_grad()
def _hard_silhouette(mesh: Mesh, K: Tensor, T: Pose, image_size) -> Tensor:
    cam = Cameras(K, T.R, T.t, image_size, validate=False)
    out = render_mesh(mesh, cam, None, RasterSettings(mode="hard"), outputs=())
    return out.alpha[0]


def draw_overlay(image: Tensor, mask: Tensor, color=(0.0, 1.0, 0.0), width: int = 1) -> Tensor:
    """The outline of ``mask (H, W)`` (thresholded at 0.5) drawn over ``image`` ((H, W) grey or (H, W, 3))
    in ``color``, ``width`` pixels wide: ``(H, W, 3)`` float."""
    from scipy.ndimage import binary_dilation, binary_erosion

    img = image.detach().cpu().float()
    if img.dim() == 2:
        img = img[..., None].expand(-1, -1, 3)
    if img.dim() != 3 or img.shape[-1] != 3:
        raise ValueError(f"draw_overlay: image must be (H, W) or (H, W, 3), got {tuple(image.shape)}")
    if tuple(mask.shape) != tuple(img.shape[:2]):
        raise ValueError(f"draw_overlay: mask {tuple(mask.shape)} and image {tuple(img.shape[:2])} "
                         "sizes differ")
    m = mask.detach().cpu().numpy() >= 0.5
    edge = m & ~binary_erosion(m, border_value=0)
    if width > 1:
        edge = binary_dilation(edge, iterations=width - 1)
    out = img.clone()
    out[torch.from_numpy(edge)] = torch.tensor(color, dtype=out.dtype)
    return out
