"""taichi-dr: differentiable rendering for 3D vision, with Taichi kernels and PyTorch.

Nothing here initialises Taichi: the first kernel launch does, on the arch chosen by
``taichi_dr.init(arch=...)`` or the ``TAICHI_DR_ARCH`` environment variable ("auto" by default:
cuda, then a hardware vulkan device, then cpu).

Submodules are imported lazily so ``import taichi_dr`` stays cheap.
"""

from __future__ import annotations

import importlib
import os
import sys

# Taichi's CPU kernels use every core. OpenMP workers that spin-wait after each torch op steal those cores
# (measured: the whole render step 2.3x slower on 2 cores). OpenMP reads this when torch loads it, so it only
# takes effect if taichi_dr is imported before torch; otherwise init() falls back to one torch thread.
_OMP_PASSIVE = "torch" not in sys.modules or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .runtime import arch, device, ensure_init, init  # noqa: E402

__version__ = "0.1.0"

_EXPORTS = {
    # cameras
    "Cameras": "camera", "CameraParameters": "camera", "load_cameras": "camera",
    "save_cameras_json": "camera", "intrinsics_from_fov": "camera",
    "axis_angle_to_matrix": "camera", "matrix_to_axis_angle": "camera", "rotation_6d_to_matrix": "camera",
    "matrix_to_rotation_6d": "camera", "quaternion_to_matrix": "camera", "matrix_to_quaternion": "camera",
    # meshes
    "Mesh": "mesh", "load_mesh": "mesh", "save_mesh": "mesh", "icosphere": "mesh", "asset_path": "mesh",
    "face_normals": "mesh", "vertex_normals": "mesh",
    # rasterizer and renderer
    "RasterSettings": "raster", "soft_rasterize": "raster", "Lights": "shading",
    "render_mesh": "renderer", "MeshRenderer": "renderer", "RenderOutput": "renderer",
    # pose refinement
    "Pose": "pose", "PoseSettings": "pose", "PoseTarget": "pose", "Stage": "pose", "refine_pose": "pose",
    "load_pose": "pose", "save_pose": "pose", "DisplacementField": "pose", "PixelGradientField": "pose",
    # bridge
    "KernelOp": "bridge",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'taichi_dr' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = ["init", "ensure_init", "arch", "device", "__version__", *_EXPORTS]
