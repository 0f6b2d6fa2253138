"""The viewer's free camera: an orbit around a target point, and how to place one from training cameras.

Angles (degrees) are measured in a frame built from ``up`` (:func:`orbit_basis`): for ``up = +y`` the eye is
``target + distance * (cos e sin a, sin e, -cos e cos a)``, the same spherical convention as
:meth:`Cameras.from_spherical`, so azimuth 0, elevation 0 looks along +z. The cameras it makes are ordinary
OpenCV cameras (x right, y down, z forward, ``fx > 0``) with ``up`` pointing up in the image.

Everything here is plain float64 numpy/torch arithmetic: no window, no Taichi.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from taichi_dr.core.camera import Cameras, intrinsics_from_fov

__all__ = ["OrbitCamera", "orbit_basis"]

MAX_ELEVATION = 89.0          # degrees; at +-90 the view direction would be parallel to up
ZOOM_RANGE = (1e-3, 1e6)      # distance limits, relative to the distance the camera was made with
FOV_RANGE = (1.0, 179.0)      # degrees, what framing()/matching() accept from a camera's focal length
# Axes closer to parallel than this (smallest eigenvalue of sum(I - d d^T), per camera, ~ sin^2 of the angle
# between them) have no meaningful common point: framing() then looks ahead of the cameras instead.
PARALLEL_AXES = 1e-4
# Below this (relative to the scene's size + 1) an eye is taken to coincide with its target.
COINCIDENT = 1e-9


def _unit(v: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """``v / |v|``, or ``fallback`` when v is (nearly) zero or not finite."""
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-12 and math.isfinite(n) else np.asarray(fallback, dtype=np.float64)


def orbit_basis(up) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The frame the angles are measured in: ``(side, up, back)``, each (3,) float64, orthonormal.

    ``back`` is where the eye is at azimuth 0, elevation 0 (world -z for ``up = +y``; world -y when ``up`` is
    close to the z axis), ``side`` where it is at azimuth 90 (``back x up``; world +x for ``up = +y``)."""
    u = _unit(np.asarray(up, dtype=np.float64), np.array([0.0, 1.0, 0.0]))
    ref = np.array([0.0, 0.0, -1.0]) if abs(u[2]) < 0.9 else np.array([0.0, -1.0, 0.0])
    back = _unit(ref - ref.dot(u) * u, np.array([0.0, 0.0, -1.0]))
    side = np.cross(back, u)
    return side, u, back


def _angles(direction: np.ndarray, up) -> tuple[float, float]:
    """(azimuth, elevation) in degrees of a unit ``direction`` (target -> eye) in the frame of ``up``."""
    side, u, back = orbit_basis(up)
    elevation = math.degrees(math.asin(float(np.clip(direction.dot(u), -1.0, 1.0))))
    azimuth = math.degrees(math.atan2(float(direction.dot(side)), float(direction.dot(back))))
    return azimuth, elevation


def _fov_of(camera: Cameras, index: int = 0) -> float:
    """Horizontal field of view (degrees) of camera ``index`` from its |fx| and width."""
    fx = abs(float(camera.K[index, 0, 0]))
    width = camera.image_size[1]
    return float(np.clip(math.degrees(2.0 * math.atan2(width / 2.0, fx)), *FOV_RANGE))


def _wrap_degrees(a: float) -> float:
    """An angle in degrees mapped to [-180, 180)."""
    return (a + 180.0) % 360.0 - 180.0


def _check_camera_batch(cameras, what: str, single: bool) -> Cameras:
    if not isinstance(cameras, Cameras):
        raise TypeError(f"{what}: expected Cameras, got {type(cameras).__name__}")
    if len(cameras) == 0 or (single and len(cameras) != 1):
        want = "1 camera" if single else "at least 1 camera"
        raise ValueError(f"{what}: expected {want}, got {len(cameras)}")
    return cameras.detach().to(device="cpu", dtype=torch.float64)


@dataclass
class OrbitCamera:
    """A camera orbiting ``target`` at ``distance``, at ``azimuth`` about ``up`` and ``elevation`` above the
    plane orthogonal to it (degrees, elevation kept in [-89, 89]); ``fov`` is the full horizontal angle.

    Methods change it in place; :meth:`cameras` makes the 1-view :class:`Cameras` to render with.
    """

    target: tuple[float, float, float] = (0.0, 0.0, 0.0)
    distance: float = 3.0
    azimuth: float = 0.0
    elevation: float = 20.0
    fov: float = 40.0
    up: tuple[float, float, float] = (0.0, 1.0, 0.0)
    # The distance it was made with (1 if that was 0): zoom() limits are relative to it.
    _scale: float = field(default=1.0, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.target = self._vector(self.target, "target")
        self.up = self._vector(self.up, "up")
        if float(np.linalg.norm(self.up)) <= 1e-12:
            raise ValueError(f"OrbitCamera: up must be a non-zero vector, got {self.up}")
        for name in ("distance", "azimuth", "elevation", "fov"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
                raise ValueError(f"OrbitCamera: {name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        if self.distance < 0:
            raise ValueError(f"OrbitCamera: distance must be >= 0, got {self.distance}")
        if not 0 < self.fov < 180:
            raise ValueError(f"OrbitCamera: fov must be in (0, 180) degrees, got {self.fov}")
        self.elevation = float(np.clip(self.elevation, -MAX_ELEVATION, MAX_ELEVATION))
        self._scale = self.distance if self.distance > 0 else 1.0

    @staticmethod
    def _vector(v, name: str) -> tuple[float, float, float]:
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().double().numpy()
        try:
            arr = np.asarray(v, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            arr = np.zeros(0)
        if arr.shape != (3,) or not np.isfinite(arr).all():
            raise ValueError(f"OrbitCamera: {name} must be 3 finite numbers, got {v!r}")
        return (float(arr[0]), float(arr[1]), float(arr[2]))

    # -- geometry ---------------------------------------------------------------------------------------

    def _direction_and_tangent(self) -> tuple[np.ndarray, np.ndarray]:
        """Unit target -> eye direction and the unit image-up direction (its derivative in elevation)."""
        side, u, back = orbit_basis(self.up)
        a = math.radians(self.azimuth)
        e = math.radians(float(np.clip(self.elevation, -MAX_ELEVATION, MAX_ELEVATION)))
        horizontal = math.sin(a) * side + math.cos(a) * back
        direction = math.cos(e) * horizontal + math.sin(e) * u
        tangent = -math.sin(e) * horizontal + math.cos(e) * u
        return direction, tangent

    def _rotation(self) -> np.ndarray:
        """World -> camera rotation (3, 3), rows = camera x (right), y (down), z (forward) in world coords."""
        direction, tangent = self._direction_and_tangent()
        z, y = -direction, -tangent
        return np.stack([np.cross(y, z), y, z])

    def eye(self) -> torch.Tensor:
        """The camera centre, (3,) float64."""
        direction, _ = self._direction_and_tangent()
        return torch.from_numpy(np.asarray(self.target) + max(self.distance, 0.0) * direction)

    def cameras(self, image_size: tuple[int, int], device=None, dtype=torch.float32) -> Cameras:
        """One un-mirrored camera of ``image_size`` (H, W) at :meth:`eye` looking at ``target`` with ``up``
        upward in the image; K from ``fov`` (square pixels, principal point at the image centre). Built from
        the angles, so it is defined (and finite) at distance 0 too."""
        R = self._rotation()
        t = -R @ self.eye().numpy()
        K = intrinsics_from_fov(self.fov, image_size, torch.float64)
        cams = Cameras(K, torch.from_numpy(R), torch.from_numpy(t), image_size)
        return cams.to(device=device, dtype=dtype)

    # -- motion -----------------------------------------------------------------------------------------

    def orbit(self, d_azimuth: float, d_elevation: float) -> None:
        """Turn about the target by ``d_azimuth`` (about up) and ``d_elevation`` degrees; elevation is clamped
        to [-89, 89], azimuth wrapped to [-180, 180)."""
        d_azimuth, d_elevation = float(d_azimuth), float(d_elevation)
        if not (math.isfinite(d_azimuth) and math.isfinite(d_elevation)):
            raise ValueError(f"orbit: angles must be finite, got {d_azimuth}, {d_elevation}")
        self.azimuth = _wrap_degrees(self.azimuth + d_azimuth)
        self.elevation = float(np.clip(self.elevation + d_elevation, -MAX_ELEVATION, MAX_ELEVATION))

    def pan(self, dx: float, dy: float, aspect: float = 1.0) -> None:
        """Slide target and eye in the view plane so that the scene moves by ``dx`` view widths to the right
        and ``dy`` view heights down on screen: the old target then projects at
        ``(W (1/2 + dx), H (1/2 + dy))``. ``aspect`` is the view's H / W (the view's height in world units at
        the target is ``aspect`` times its width)."""
        dx, dy, aspect = float(dx), float(dy), float(aspect)
        if not all(math.isfinite(v) for v in (dx, dy, aspect)) or aspect <= 0:
            raise ValueError(f"pan: expected finite dx, dy and aspect > 0, got {dx}, {dy}, {aspect}")
        R = self._rotation()
        width = 2.0 * self.distance * math.tan(math.radians(self.fov) / 2.0)  # view width at the target
        shift = -dx * width * R[0] - dy * width * aspect * R[1]
        self.target = tuple(float(v) for v in np.asarray(self.target) + shift)

    def zoom(self, factor: float) -> None:
        """``distance *= factor`` (< 1 moves in), kept within [1e-3, 1e6] times the distance it was made with."""
        factor = float(factor)
        if not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"zoom: factor must be finite and > 0, got {factor}")
        lo, hi = (r * self._scale for r in ZOOM_RANGE)
        self.distance = float(np.clip(self.distance * factor, lo, hi))

    def copy(self) -> OrbitCamera:
        """An independent copy (keeping the zoom limits of this one)."""
        other = OrbitCamera(self.target, self.distance, self.azimuth, self.elevation, self.fov, self.up)
        other._scale = self._scale
        return other

    def set_from(self, other: OrbitCamera) -> None:
        """Take all of ``other``'s values (in place, so holders of this object see them)."""
        for name in ("target", "distance", "azimuth", "elevation", "fov", "up", "_scale"):
            setattr(self, name, getattr(other, name))

    # -- placing ----------------------------------------------------------------------------------------

    @classmethod
    def framing(cls, cameras: Cameras, fov: float | None = None) -> OrbitCamera:
        """A view of the scene ``cameras`` (N >= 1) look at.

        target: the least-squares point nearest all optical axes. When the axes are (nearly) parallel, or
        that point lies behind the cameras on average, it is instead a point ahead of the centres' centroid
        along the mean axis, as far as the centres are spread (1 when they coincide). distance: the median
        centre-target distance. up: the mean of the cameras' image-up directions (``-R[1, :]``). Azimuth and
        elevation: those of the first camera's centre seen from the target. fov: given, else the first
        camera's horizontal one. An eye coinciding with the target (all cameras at one point) puts the target
        1 unit ahead of the first camera.
        """
        cams = _check_camera_batch(cameras, "OrbitCamera.framing", single=False)
        centres = cams.camera_centers().numpy()                      # (N, 3)
        axes = cams.R[:, 2, :].numpy()                               # (N, 3) unit viewing directions
        n = len(centres)
        # sum_i (I - d_i d_i^T) p = sum_i (I - d_i d_i^T) c_i: the point nearest all lines.
        projectors = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]
        A = projectors.sum(0)
        b = (projectors @ centres[:, :, None]).sum(0)[:, 0]
        centroid = centres.mean(0)
        spread = float(np.median(np.linalg.norm(centres - centroid, axis=-1)))
        target = None
        if float(np.linalg.eigvalsh(A)[0]) / n > PARALLEL_AXES:
            target = np.linalg.solve(A, b)
            if float(np.mean(np.einsum("ij,ij->i", target - centres, axes))) <= 0:
                target = None  # the axes meet behind the cameras: they look away from each other
        if target is None:
            mean_axis = _unit(axes.mean(0), axes[0])
            target = centroid + mean_axis * (spread if spread > COINCIDENT * (1 + np.abs(centroid).max()) else 1.0)
        distance = float(np.median(np.linalg.norm(centres - target, axis=-1)))
        if distance <= COINCIDENT * (1 + float(np.abs(target).max())):
            target, distance = centres[0] + axes[0], 1.0
        up = _unit((-cams.R[:, 1, :]).numpy().mean(0), -cams.R[0, 1, :].numpy())
        direction = _unit(centres[0] - target, -axes[0])
        azimuth, elevation = _angles(direction, up)
        return cls(tuple(target), distance, azimuth, elevation, _fov_of(cams) if fov is None else fov, tuple(up))

    @classmethod
    def matching(cls, camera: Cameras, target) -> OrbitCamera:
        """The orbit camera with ``camera``'s (1 view) eye, viewing direction and image up, orbiting the point
        of its optical axis nearest ``target`` (3,): ``target`` itself, within float error, when the camera
        looks at it; the point at ``|target - eye|`` ahead when ``target`` is behind the camera. fov from the
        camera's |fx| (a mirrored camera gives the un-mirrored view; an off-centre principal point is not
        kept). Used to keep orbiting after snapping to a training view."""
        cams = _check_camera_batch(camera, "OrbitCamera.matching", single=True)
        target = np.asarray(cls._vector(target, "target"))
        eye = cams.camera_centers()[0].numpy()
        forward, image_up = cams.R[0, 2, :].numpy(), -cams.R[0, 1, :].numpy()
        along = float((target - eye).dot(forward))
        if along <= COINCIDENT * (1 + float(np.abs(eye).max())):
            along = float(np.linalg.norm(target - eye)) or 1.0
        azimuth, elevation = _angles(-forward, image_up)
        return cls(tuple(eye + along * forward), along, azimuth, elevation, _fov_of(cams), tuple(image_up))
