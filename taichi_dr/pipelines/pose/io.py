"""Poses in files and how far apart two poses are.

A pose file is JSON: ``{"R": 3x3, "t": 3}`` or ``{"matrix": 4x4 | 3x4}``, with an optional ``"convention":
"object_to_camera"`` (default) or ``"camera_to_object"``. :class:`~taichi_dr.core.transforms.Pose` itself
lives in :mod:`taichi_dr.core.transforms`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from taichi_dr.core.transforms import CONVENTIONS, Pose, matrix_to_axis_angle

__all__ = ["Pose", "load_pose", "rotation_error_deg", "save_pose", "translation_error"]


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
