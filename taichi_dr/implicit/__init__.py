"""Rendering of implicit fields (no training loop here), importable piece by piece for users' own loops:

* sphere tracing of SDFs with secant refinement (:mod:`~taichi_dr.implicit.sphere_tracing`, IDR);
* occupancy surface search (:mod:`~taichi_dr.implicit.occupancy`, UNISURF) on the shared root finding
  (:mod:`~taichi_dr.implicit.root_finding`: first sign change of a scan, secant refinement);
* ray samplers producing packed :class:`~taichi_dr.implicit.samples.RaySamples`
  (:mod:`~taichi_dr.implicit.sampling`: stratified, UNISURF's interval, NeRF's inverse-CDF importance sampling);
* volume compositing of packed samples with occupancy as alpha or NeRF density, forward and backward Taichi
  kernels (:mod:`~taichi_dr.implicit.compositing`);
* marching cubes of a field (:mod:`~taichi_dr.implicit.meshing`) and analytic SDFs for tests.

Importing this package does not initialise Taichi (kernels are compiled on first use).
"""

from taichi_dr.implicit.analytic import box_sdf, sphere_sdf, torus_sdf
from taichi_dr.implicit.compositing import Composite, composite, composite_background
from taichi_dr.implicit.meshing import extract_mesh
from taichi_dr.implicit.occupancy import SurfaceHits, SurfaceSearchSettings, find_surface
from taichi_dr.implicit.occupancy_grid import (
    OccupancyGrid,
    density_value_fn,
    occupancy_value_fn,
    sdf_value_fn,
)
from taichi_dr.implicit.root_finding import first_crossing, secant_refine
from taichi_dr.implicit.samples import RaySamples, offsets_from_counts
from taichi_dr.implicit.sampling import (
    IntervalSettings,
    importance_samples,
    interval_width,
    merge_samples,
    segment_samples,
    stratified_samples,
    unisurf_samples,
)
from taichi_dr.implicit.sphere_tracing import (
    TraceResult,
    TracerSettings,
    differentiable_intersection,
    intersect_sphere,
    sdf_gradient,
    sphere_trace,
)

__all__ = [
    "Composite", "IntervalSettings", "OccupancyGrid", "RaySamples", "SurfaceHits", "SurfaceSearchSettings",
    "TraceResult", "TracerSettings", "box_sdf", "composite", "composite_background", "density_value_fn",
    "differentiable_intersection", "extract_mesh", "find_surface", "first_crossing", "importance_samples",
    "intersect_sphere", "interval_width", "merge_samples", "occupancy_value_fn", "offsets_from_counts",
    "sdf_gradient", "sdf_value_fn", "secant_refine", "segment_samples", "sphere_sdf", "sphere_trace",
    "stratified_samples", "torus_sdf", "unisurf_samples",
]
