"""Soft rasterizer: settings, binning, and the differentiable `soft_rasterize` primitive."""

from taichi_dr.raster.settings import RasterSettings
from taichi_dr.raster.soft import bin_faces, soft_rasterize

__all__ = ["RasterSettings", "bin_faces", "soft_rasterize"]
