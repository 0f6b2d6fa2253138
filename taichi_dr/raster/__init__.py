"""Soft rasterizer: settings, binning, and the differentiable `soft_rasterize` primitive."""

from .settings import RasterSettings
from .soft import bin_faces, soft_rasterize

__all__ = ["RasterSettings", "bin_faces", "soft_rasterize"]
