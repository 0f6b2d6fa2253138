"""Rendering networks: colour from a surface point, its normal, the view direction and a geometry feature."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from taichi_dr.nets.encodings import FrequencyEncoding, check_encoding

__all__ = ["RenderingNetwork"]


class RenderingNetwork(nn.Module):
    """``M(x, n, v, z) -> rgb (M, 3)`` in [0, 1] (IDR's "idr" mode: position, normal, view direction and the
    geometry feature).

    view_encoding: the encoding of the view direction ``v`` (a component, e.g. :class:`FrequencyEncoding`);
    default ``FrequencyEncoding(3, n_frequencies)`` with ``n_frequencies`` 4 (IDR). Give one or the other.
    depth: hidden layers (IDR: 4); width: their size (IDR: 512).
    """

    def __init__(self, feature_dim: int = 256, depth: int = 4, width: int = 512, n_frequencies: int | None = None,
                 use_weight_norm: bool = True, *, view_encoding: nn.Module | None = None):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"RenderingNetwork: need depth >= 1 and width >= 1, got {depth}, {width}")
        if view_encoding is not None and n_frequencies is not None:
            raise ValueError("RenderingNetwork: give n_frequencies or view_encoding, not both")
        if view_encoding is None:
            view_encoding = FrequencyEncoding(3, 4 if n_frequencies is None else n_frequencies)
        self.view_encoding = check_encoding(view_encoding, 3, "RenderingNetwork")
        d_in = 3 + 3 + self.view_encoding.out_dim + feature_dim
        dims = [d_in] + [width] * depth + [3]
        layers = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            lin = nn.Linear(a, b)
            layers.append(weight_norm(lin) if use_weight_norm else lin)
        self.layers = nn.ModuleList(layers)

    def forward(self, points: torch.Tensor, normals: torch.Tensor, view_dirs: torch.Tensor,
                features: torch.Tensor) -> torch.Tensor:
        """points, normals, view_dirs: (M, 3); features: (M, feature_dim) -> rgb (M, 3)."""
        h = torch.cat([points, normals, self.view_encoding(view_dirs), features], dim=-1)
        for i, lin in enumerate(self.layers):
            h = lin(h)
            if i < len(self.layers) - 1:
                h = torch.relu(h)
        return torch.sigmoid(h)
