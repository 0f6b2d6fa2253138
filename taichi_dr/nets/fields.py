"""Fields: networks of 3-D position (IDR, Yariv et al. 2020), plain torch modules.

* :class:`GeometryNetwork`: ``f(x; θ) -> (sdf, feature z)``, an MLP (default 8 x 256, skip connection into
  layer 4, Softplus with β = 100) on an encoding of ``x`` (a component, :mod:`taichi_dr.nets.encodings`), with
  IDR's geometric initialisation, so that at the start ``f`` is close to the signed distance of a sphere of
  radius ``init_radius``.

The encodings live in :mod:`taichi_dr.nets.encodings` and the rendering network in
:mod:`taichi_dr.nets.rendering`; ``PositionalEncoding`` and ``RenderingNetwork`` are re-exported here for code
written before the split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from taichi_dr.nets.encodings import FrequencyEncoding, PositionalEncoding, check_encoding
from taichi_dr.nets.rendering import RenderingNetwork

__all__ = ["GeometryNetwork", "OccupancyNetwork", "PositionalEncoding", "RenderingNetwork"]


class GeometryNetwork(nn.Module):
    """Signed distance + feature MLP.

    ``forward(x (M, 3)) -> (M, 1 + feature_dim)``: column 0 is the SDF, the rest the feature vector z.

    depth: hidden layers (IDR: 8); width: their size (IDR: 256); skip_in: layers whose input is concatenated
    with the encoded input (scaled by 1/sqrt(2)); encoding: the encoding of ``x`` (a component; default
    ``FrequencyEncoding(3, n_frequencies)``, n_frequencies 6 as IDR; give one or the other);
    init_radius: radius of the sphere the geometric initialisation approximates (IDR: ``bias`` 0.6);
    beta: Softplus sharpness (IDR: 100); use_weight_norm: as IDR.
    finite_difference_step: the step of the central differences :meth:`gradient` takes when a trained
        gradient cannot go through the encoding by autograd (``supports_double_backward`` False: the hash
        grid); default the encoding's ``finite_difference_step`` (the hash grid's finest cell), else 1e-3.
    """

    def __init__(self, feature_dim: int = 256, depth: int = 8, width: int = 256,
                 skip_in: Sequence[int] = (4,), n_frequencies: int | None = None, init_radius: float = 0.6,
                 beta: float = 100.0,
                 geometric_init: bool = True, use_weight_norm: bool = True, *, encoding: nn.Module | None = None,
                 finite_difference_step: float | None = None):
        super().__init__()
        if depth < 1 or width < 1 or feature_dim < 0:
            raise ValueError(f"GeometryNetwork: need depth >= 1, width >= 1 and feature_dim >= 0, got "
                             f"depth={depth}, width={width}, feature_dim={feature_dim}")
        if any(not 0 < s < depth for s in skip_in):
            raise ValueError(f"GeometryNetwork: skip_in layers must lie in 1..{depth - 1}, "
                             f"got {tuple(skip_in)}")
        if encoding is not None and n_frequencies is not None:
            raise ValueError("GeometryNetwork: give n_frequencies or encoding, not both")
        if encoding is None:
            encoding = FrequencyEncoding(3, 6 if n_frequencies is None else n_frequencies)
        self.encoding = check_encoding(encoding, 3, "GeometryNetwork")
        step = finite_difference_step if finite_difference_step is not None else \
            getattr(self.encoding, "finite_difference_step", 1e-3)
        if not (math.isfinite(step) and step > 0):
            raise ValueError(f"GeometryNetwork: finite_difference_step must be > 0, got {step}")
        self.finite_difference_step = float(step)
        d_in = self.encoding.out_dim
        encoded = d_in > 3
        if geometric_init and encoded and not getattr(self.encoding, "includes_input", False):
            raise ValueError("GeometryNetwork: geometric_init needs an encoding whose output starts with the raw "
                             "coordinates (includes_input), or geometric_init=False")
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
                self._geometric_init(lin, layer, n_lin, dims[layer], out_dim, d_in, encoded)
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

    def _last_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the output layer, ``(M, width)``."""
        inp = self.encoding(x)
        h = inp
        for i, lin in enumerate(self.layers[:-1]):
            if i in self.skip_in:
                h = torch.cat([h, inp], dim=-1) / math.sqrt(2)
            h = self.activation(lin(h))
        return h                                    # skip_in never names the output layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[-1](self._last_hidden(x))

    def sdf(self, x: torch.Tensor) -> torch.Tensor:
        """``(M, 3) -> (M,)``: column 0 of :meth:`forward`, computed without the feature vector. Tracing,
        meshing and finite-difference normals need the SDF only, and the output layer's feature rows (256 of
        IDR's 257) would otherwise be most of a small network's work."""
        out = self.layers[-1]
        return F.linear(self._last_hidden(x), out.weight[:1], out.bias[:1])[:, 0]

    def gradient(self, x: torch.Tensor, create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Network output ``(M, 1 + feature_dim)`` and the SDF's spatial gradient ``(M, 3)`` by autograd.

        With ``create_graph`` (training) the gradient is itself differentiable (eikonal loss, normals). Where
        the encoding has no double backward (the hash grid), that gradient is the central difference
        ``(f(x + h e_i) - f(x - h e_i)) / 2h`` instead (as NeuS2 and Neuralangelo do): six more evaluations,
        trained by ordinary first-order backward; without ``create_graph`` it is autograd's, as for any encoding.
        """
        if create_graph and not getattr(self.encoding, "supports_double_backward", True):
            return self.forward(x), self.finite_difference_gradient(x)
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            out = self.forward(x)
            (g,) = torch.autograd.grad(out[:, 0], x, torch.ones_like(out[:, 0]), create_graph=create_graph)
        return out, g

    def finite_difference_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """The SDF's central-difference gradient ``(M, 3)`` at ``x (M, 3)`` with step
        ``finite_difference_step``; differentiable in the network (and in ``x``) by first-order autograd."""
        h = self.finite_difference_step
        offsets = torch.eye(3, dtype=x.dtype, device=x.device) * h                     # (3, 3)
        probes = torch.cat([x[:, None, :] + offsets, x[:, None, :] - offsets], dim=1)   # (M, 6, 3)
        f = self.sdf(probes.reshape(-1, 3)).reshape(-1, 2, 3)
        return (f[:, 0] - f[:, 1]) / (2.0 * h)


class OccupancyNetwork(nn.Module):
    """UNISURF's occupancy field (Oechsle et al. 2021): ``o(x) = sigmoid(-s f(x))`` on a geometry network ``f``.

    ``f`` is a :class:`GeometryNetwork` (an SDF-like output and a feature vector z); with its geometric
    initialisation ``f(x) ~ |x| - init_radius``, so the field starts as a soft ball that is occupied (o > 0.5)
    inside. ``sharpness`` is UNISURF's ``s`` (its code: 10). Inside is where ``o`` is high, so meshes are taken
    at ``o = 0.5`` with ``inside="above"``.
    """

    def __init__(self, geometry: GeometryNetwork, sharpness: float = 10.0):
        super().__init__()
        if not (math.isfinite(sharpness) and sharpness > 0):
            raise ValueError(f"OccupancyNetwork: sharpness must be > 0, got {sharpness}")
        self.geometry = geometry
        self.sharpness = float(sharpness)

    @property
    def feature_dim(self) -> int:
        return self.geometry.feature_dim

    def occupancy(self, x: torch.Tensor) -> torch.Tensor:
        """``(M, 3) -> (M,)`` in (0, 1)."""
        return torch.sigmoid(-self.sharpness * self.geometry.sdf(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(M, 3) -> (M, 1 + feature_dim)``: column 0 the occupancy, the rest the feature vector z."""
        out = self.geometry(x)
        return torch.cat([torch.sigmoid(-self.sharpness * out[:, :1]), out[:, 1:]], dim=-1)

    def with_normals(self, x: torch.Tensor, create_graph: bool = True):
        """Occupancy ``(M,)``, features ``(M, feature_dim)`` and unit outward normals ``(M, 3)`` (the direction
        of ``-∇o``, i.e. of ``∇f``) at ``x (M, 3)``; with ``create_graph`` the normals train the network."""
        out, g = self.geometry.gradient(x, create_graph=create_graph)
        normals = g / g.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        return torch.sigmoid(-self.sharpness * out[:, 0]), out[:, 1:], normals
