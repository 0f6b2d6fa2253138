"""Networks of neural implicit surfaces (IDR, Yariv et al. 2020), plain torch modules.

* :class:`PositionalEncoding`: ``[x, sin(2^0 x), cos(2^0 x), ..., sin(2^(L-1) x), cos(2^(L-1) x)]``.
* :class:`GeometryNetwork`: ``f(x; θ) -> (sdf, feature z)``, an MLP (default 8 x 256, skip connection into
  layer 4, Softplus with β = 100) with IDR's geometric initialisation, so that at the start ``f`` is close
  to the signed distance of a sphere of radius ``init_radius``.
* :class:`RenderingNetwork`: ``M(x, n, v, z) -> rgb`` in [0, 1], with a positional encoding of the view
  direction ``v``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class PositionalEncoding(nn.Module):
    """``(M, d) -> (M, d * (1 + 2 L))``; the raw input comes first (IDR's geometric init relies on it)."""

    def __init__(self, in_dim: int = 3, n_frequencies: int = 6):
        super().__init__()
        if n_frequencies < 0:
            raise ValueError(f"PositionalEncoding: n_frequencies must be >= 0, got {n_frequencies}")
        self.in_dim = in_dim
        self.n_frequencies = n_frequencies
        freqs = 2.0 ** torch.arange(n_frequencies, dtype=torch.float32)
        self.register_buffer("freqs", freqs, persistent=False)

    @property
    def out_dim(self) -> int:
        return self.in_dim * (1 + 2 * self.n_frequencies)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_frequencies == 0:
            return x
        xf = x[..., None, :] * self.freqs.to(x.dtype)[:, None]           # (M, L, d)
        enc = torch.stack([torch.sin(xf), torch.cos(xf)], dim=-2)         # (M, L, 2, d)
        return torch.cat([x, enc.flatten(-3)], dim=-1)


class GeometryNetwork(nn.Module):
    """Signed distance + feature MLP.

    ``forward(x (M, 3)) -> (M, 1 + feature_dim)``: column 0 is the SDF, the rest the feature vector z.

    depth: hidden layers (IDR: 8); width: their size (IDR: 256); skip_in: layers whose input is concatenated
    with the encoded input (scaled by 1/sqrt(2)); n_frequencies: positional encoding (IDR: 6);
    init_radius: radius of the sphere the geometric initialisation approximates (IDR: ``bias`` 0.6);
    beta: Softplus sharpness (IDR: 100); use_weight_norm: as IDR.
    """

    def __init__(self, feature_dim: int = 256, depth: int = 8, width: int = 256,
                 skip_in: Sequence[int] = (4,), n_frequencies: int = 6, init_radius: float = 0.6,
                 beta: float = 100.0,
                 geometric_init: bool = True, use_weight_norm: bool = True):
        super().__init__()
        if depth < 1 or width < 1 or feature_dim < 0:
            raise ValueError(f"GeometryNetwork: need depth >= 1, width >= 1 and feature_dim >= 0, got "
                             f"depth={depth}, width={width}, feature_dim={feature_dim}")
        if any(not 0 < s < depth for s in skip_in):
            raise ValueError(f"GeometryNetwork: skip_in layers must lie in 1..{depth - 1}, "
                             f"got {tuple(skip_in)}")
        self.encoding = PositionalEncoding(3, n_frequencies)
        d_in = self.encoding.out_dim
        dims = [d_in] + [width] * depth + [1 + feature_dim]
        self.skip_in = tuple(skip_in)
        self.feature_dim = feature_dim
        self.init_radius = init_radius
        layers = []
        n_lin = len(dims) - 1
        for layer in range(n_lin):
            out_dim = dims[layer + 1] - d_in if layer + 1 in self.skip_in else dims[layer + 1]
            if out_dim < 1:
                raise ValueError(f"GeometryNetwork: width {width} is too small for a skip connection that "
                                 f"concatenates {d_in} input features")
            lin = nn.Linear(dims[layer], out_dim)
            if geometric_init:
                self._geometric_init(lin, layer, n_lin, dims[layer], out_dim, d_in, n_frequencies > 0)
            if use_weight_norm:
                lin = weight_norm(lin)
            layers.append(lin)
        self.layers = nn.ModuleList(layers)
        self.activation = nn.Softplus(beta=beta)

    def _geometric_init(self, lin: nn.Linear, layer: int, n_lin: int, in_dim: int, out_dim: int, d_in: int,
                        encoded: bool) -> None:
        """IDR / SAL (Atzmon & Lipman 2020) initialisation: f(x) ~ |x| - init_radius."""
        with torch.no_grad():
            if layer == n_lin - 1:
                nn.init.normal_(lin.weight, mean=math.sqrt(math.pi) / math.sqrt(in_dim), std=1e-4)
                nn.init.constant_(lin.bias, -self.init_radius)
            else:
                nn.init.constant_(lin.bias, 0.0)
                nn.init.normal_(lin.weight, 0.0, math.sqrt(2) / math.sqrt(out_dim))
                if encoded and layer == 0:
                    lin.weight[:, 3:] = 0.0          # start from the raw coordinates only
                elif encoded and layer in self.skip_in:
                    lin.weight[:, -(d_in - 3):] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = self.encoding(x)
        h = inp
        for i, lin in enumerate(self.layers):
            if i in self.skip_in:
                h = torch.cat([h, inp], dim=-1) / math.sqrt(2)
            h = lin(h)
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h

    def sdf(self, x: torch.Tensor) -> torch.Tensor:
        """``(M, 3) -> (M,)``."""
        return self.forward(x)[:, 0]

    def gradient(self, x: torch.Tensor, create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Network output ``(M, 1 + feature_dim)`` and the SDF's spatial gradient ``(M, 3)`` by autograd.

        With ``create_graph`` (training) the gradient is itself differentiable (eikonal loss, normals).
        """
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            out = self.forward(x)
            (g,) = torch.autograd.grad(out[:, 0], x, torch.ones_like(out[:, 0]), create_graph=create_graph)
        return out, g


class RenderingNetwork(nn.Module):
    """``M(x, n, v, z) -> rgb (M, 3)`` in [0, 1] (IDR's "idr" mode: position, normal, view direction and the
    geometry feature), with ``n_frequencies`` encoding frequencies of the view direction (IDR: 4).

    depth: hidden layers (IDR: 4); width: their size (IDR: 512).
    """

    def __init__(self, feature_dim: int = 256, depth: int = 4, width: int = 512, n_frequencies: int = 4,
                 use_weight_norm: bool = True):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"RenderingNetwork: need depth >= 1 and width >= 1, got {depth}, {width}")
        self.view_encoding = PositionalEncoding(3, n_frequencies)
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
