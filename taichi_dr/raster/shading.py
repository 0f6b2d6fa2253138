"""Lights and shading, in torch (so gradients reach lights, normals and cameras through autograd).

Shading is evaluated at vertices (Gouraud) or faces (flat, as SoftRas does) and then interpolated by the
rasterizer; per-pixel (Phong-interpolated) lighting is not offered because soft aggregation blends face
values, which must therefore be computed before rasterization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taichi_dr.core.bridge import check_tensor


@dataclass
class Lights:
    """Ambient + directional lights (Lambert) with an optional Phong specular term.

    ambient (3,): ambient colour x intensity. directions (L, 3): world directions *towards* each light
    (normalised when used). colors (L, 3): diffuse colour x intensity. specular (3,): Phong specular colour
    (zero = off). shininess: Phong exponent. Any tensor may require grad.
    """

    ambient: torch.Tensor
    directions: torch.Tensor
    colors: torch.Tensor
    specular: torch.Tensor
    shininess: float = 32.0

    @staticmethod
    def default(device=None, dtype=torch.float32, specular: float = 0.0) -> Lights:
        """Half ambient, half from one light above and in front of the object (-z is towards SoftRas's
        default cameras), white."""
        opts = dict(device=device, dtype=dtype)
        return Lights(ambient=torch.full((3,), 0.5, **opts),
                      directions=torch.tensor([[0.0, 1.0, -1.0]], **opts),
                      colors=torch.full((1, 3), 0.5, **opts),
                      specular=torch.full((3,), float(specular), **opts))

    def validate(self, finite: bool = True) -> Lights:
        """Check shapes (and, with ``finite``, scan for NaN/Inf: one host read per tensor; the renderer
        passes ``finite=False`` and folds the scan into its single input check)."""
        check_tensor("Lights.ambient", self.ambient, (3,), finite=finite)
        check_tensor("Lights.directions", self.directions, (None, 3), finite=finite)
        check_tensor("Lights.colors", self.colors, (self.directions.shape[0], 3), finite=finite)
        check_tensor("Lights.specular", self.specular, (3,), finite=finite)
        if not self.shininess > 0:
            raise ValueError(f"Lights.shininess: expected > 0, got {self.shininess}")
        return self

    def to(self, device=None, dtype=None) -> Lights:
        return Lights(*(x.to(device=device, dtype=dtype) for x in
                        (self.ambient, self.directions, self.colors, self.specular)), self.shininess)


def _normalize(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    # Safe at zero length: the gradient of sqrt at 0 is avoided by clamping the squared norm.
    return v * torch.rsqrt((v * v).sum(-1, keepdim=True).clamp_min(eps))


def shade(points: torch.Tensor, normals: torch.Tensor, eyes: torch.Tensor, lights: Lights):
    """Lighting at surface points.

    points, normals (B, N, 3) world space (normals need not be unit); eyes (B, 3) camera centres.
    Returns (diffuse (B, N, 3) = ambient + sum_l colour_l * max(0, n.l), specular (B, N, 3)).
    Albedo multiplies the diffuse part only.
    """
    n = _normalize(normals)
    dirs = _normalize(lights.directions.to(points))  # (L, 3)
    cos = torch.einsum("bnc,lc->bnl", n, dirs)
    diffuse = lights.ambient.to(points) + torch.einsum("bnl,lc->bnc", cos.clamp_min(0), lights.colors.to(points))
    specular = torch.zeros_like(diffuse)
    if bool((lights.specular != 0).any()) or lights.specular.requires_grad:
        view = _normalize(eyes[:, None, :] - points)  # towards the eye
        reflect = 2 * cos[..., None] * n[:, :, None, :] - dirs[None, None]  # (B, N, L, 3)
        rv = (reflect * view[:, :, None, :]).sum(-1).clamp_min(1e-8)  # > 0: pow has a finite slope
        lit = (cos > 0).to(rv)  # no highlight on the side facing away from the light
        spec = torch.einsum("bnl,lc->bnc", rv.pow(lights.shininess) * lit, lights.colors.to(points))
        specular = spec * lights.specular.to(points)
    return diffuse, specular
