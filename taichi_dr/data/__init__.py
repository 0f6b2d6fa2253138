"""Data: multi-view datasets (IDR and NeRF-synthetic layouts), fitting targets, procedural test objects.

The data layer knows no renderer: datasets hold images, optional masks and cameras, and draw rays.
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
from taichi_dr.data.targets import Targets, load_targets

__all__ = [
    "MultiViewDataset", "RayBatch", "Targets", "load_dataset", "load_idr", "load_nerf_synthetic", "load_targets",
    "rays_for_pixels", "sample_rays", "split_holdout", "validate_dataset", "write_idr",
]
