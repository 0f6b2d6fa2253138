"""Rendering of implicit fields (no training loop here): sphere tracing of SDFs with secant refinement,
marching cubes of a field (meshing), analytic SDFs for tests, and (later) occupancy root finding, ray
sampling and volume compositing.

Importing this package does not initialise Taichi (kernels are compiled on first use).
"""

from taichi_dr.implicit.analytic import box_sdf, sphere_sdf, torus_sdf
from taichi_dr.implicit.meshing import extract_mesh
from taichi_dr.implicit.sphere_tracing import (
    TraceResult,
    TracerSettings,
    differentiable_intersection,
    intersect_sphere,
    sdf_gradient,
    sphere_trace,
)

__all__ = [
    "TraceResult", "TracerSettings", "box_sdf", "differentiable_intersection", "extract_mesh", "intersect_sphere",
    "sdf_gradient", "sphere_sdf", "sphere_trace", "torus_sdf",
]
