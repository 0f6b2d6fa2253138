"""Data: multi-view datasets (IDR and NeRF-synthetic layouts), fitting targets, image files, procedural test
objects.

The data layer knows no renderer: datasets hold images, optional masks and cameras, and draw rays
(tests/data/test_data.py checks that importing it imports neither taichi_dr.raster nor taichi_dr.implicit).
"""

from taichi_dr.data.datasets import (
    MultiViewDataset,
    RayBatch,
    load_dataset,
    load_idr,
    load_nerf_synthetic,
    rays_for_pixels,
    sample_rays,
    split_holdout,
    validate_dataset,
    write_idr,
)
from taichi_dr.data.images import IMAGE_SUFFIXES, read_image
from taichi_dr.data.targets import Targets, load_targets

__all__ = [
    "IMAGE_SUFFIXES", "MultiViewDataset", "RayBatch", "Targets", "load_dataset", "load_idr", "load_nerf_synthetic",
    "load_targets", "rays_for_pixels", "read_image", "sample_rays", "split_holdout", "validate_dataset", "write_idr",
]
