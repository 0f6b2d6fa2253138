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

from taichi_dr.core.runtime import arch, device, ensure_init, init  # noqa: E402

__version__ = "0.1.0"

_MODULE_EXPORTS = {
    "core.camera": ("Cameras", "load_cameras", "save_cameras_json", "intrinsics_from_fov"),
    "core.transforms": ("CameraParameters", "PoseParameters", "axis_angle_to_matrix", "matrix_to_axis_angle",
                        "rotation_6d_to_matrix", "matrix_to_rotation_6d", "quaternion_to_matrix",
                        "matrix_to_quaternion"),
    "core.mesh": ("Mesh", "load_mesh", "save_mesh", "icosphere", "asset_path", "face_normals", "vertex_normals"),
    "core.bridge": ("KernelOp",),
    "raster": ("RasterSettings", "soft_rasterize"),
    "raster.shading": ("Lights",),
    "raster.renderer": ("render_mesh", "MeshRenderer", "RenderOutput"),
    "pipelines.pose": ("Pose", "PoseSettings", "PoseTarget", "Stage", "refine_pose", "load_pose", "save_pose",
                       "DisplacementField", "PixelGradientField", "PoseMethod"),
}
_EXPORTS = {name: module for module, names in _MODULE_EXPORTS.items() for name in names}


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
