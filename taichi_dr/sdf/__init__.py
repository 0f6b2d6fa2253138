"""Neural implicit surfaces by sphere tracing (IDR): tracer, losses, training loop, analytic SDFs.

Importing this package does not initialise Taichi (kernels are compiled on first use).
"""

from .analytic import box_sdf, sphere_sdf, torus_sdf
from .losses import alpha_schedule, eikonal_loss, mask_loss, rgb_loss
from .tracer import (
    TraceResult,
    TracerSettings,
    differentiable_intersection,
    intersect_sphere,
    sdf_gradient,
    sphere_trace,
)

__all__ = [
    "TraceResult", "TracerSettings", "alpha_schedule", "box_sdf", "differentiable_intersection",
    "eikonal_loss", "intersect_sphere", "mask_loss", "rgb_loss", "sdf_gradient", "sphere_sdf",
    "sphere_trace", "torus_sdf",
]
