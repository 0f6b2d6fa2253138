"""Differentiable losses, by what they compare: meshes (regularisers), silhouettes, implicit fields.

Every loss returns a scalar tensor and is safe on degenerate input (finite values and gradients).
"""

from taichi_dr.losses.implicit import (
    alpha_schedule,
    eikonal_loss,
    mask_bce_loss,
    mask_loss,
    rgb_loss,
    smoothness_loss,
)
from taichi_dr.losses.mesh import (
    MeshTopology,
    edge_length_loss,
    flatten_loss,
    laplacian_loss,
    mesh_laplacian,
    normal_consistency_loss,
    scale_free_laplacian_loss,
    vertex_edge_length2,
)
from taichi_dr.losses.silhouette import neg_iou_loss, silhouette_iou

__all__ = [
    "MeshTopology", "alpha_schedule", "edge_length_loss", "eikonal_loss", "flatten_loss", "laplacian_loss",
    "mask_bce_loss", "mask_loss", "mesh_laplacian", "neg_iou_loss", "normal_consistency_loss", "rgb_loss",
    "scale_free_laplacian_loss", "silhouette_iou", "smoothness_loss", "vertex_edge_length2",
]
