"""Multi-view mesh fitting to silhouettes (and colours), SoftRas style.

A template mesh (an icosphere by default) is deformed to match target silhouettes seen by known cameras
(Liu et al. 2019, "Soft Rasterizer", section 5.1 / ``examples/demo_deform.py``):

* the template is placed and sized from the targets (:func:`estimate_bounding_sphere`): the object's centre
  is the least-squares intersection of the rays through the silhouettes' centroids, its radius the
  silhouettes' extent back-projected at that depth;
* :class:`MeshDeformer` parameterises the vertices in a box around that sphere as
  ``tanh(atanh(v0) + displacement)`` (or SoftRas's sigmoid form) plus a global ``tanh`` centre shift, so
  they stay in the box and a zero displacement is the template;
* :class:`MeshFitMethod`, a method of the training engine (:mod:`taichi_dr.pipelines.engine`), minimises
  ``neg IoU + w_lap * laplacian + w_flat * flatten (+ w_rgb * L1 colour)`` over random batches of views with
  Adam, the soft rasterizer's sigma shrinking during the run, and evaluates hard and soft IoU;
  :func:`fit_mesh` runs it in one call (checkpoints, Ctrl-C, metrics log from the engine).

Sigma annealing (``FitSettings.sigma_final``): at SoftRas's sigma = 1e-4 (0.1 px² at 64²) a pixel whose
centre lies within ~0.3 px of a face already reads as covered, so the soft IoU is satisfied by wings and
legs thinner than their silhouettes, and by cracks between faces; at 64² that is most of a thin part.
Measured on the procedural airplane of :mod:`taichi_dr.data.shapes` (120 views, 600 steps), the fit's soft
silhouettes reached IoU 0.93 while its true (point-in-triangle) silhouettes reached 0.74, 99.7% precise but
missing a quarter of the target's pixels. Shrinking sigma to 1e-5 over the run makes the two agree and lifts
the true IoU to 0.91; the regulariser weights, the displacement map and the template placement moved it by
under 0.02 (docs/benchmarks.md, "Thin structures").

Regularisers, computed in the box's unit coordinates (so the object's scale drops out):

* ``laplacian``: :func:`taichi_dr.losses.mesh.scale_free_laplacian_loss`, ``sum_i |L v_i|^2 / l_i^2`` with the
  template's edge lengths ``l_i``, a dimensionless bending energy that changes little with the template's
  resolution (SoftRas sums ``|L v_i|^2``, which grows with the number of vertices; a mean of it falls ~10x
  per subdivision level). SoftRas's 0.03 on its summed loss of a 642-vertex sphere is about 1.8e-4 here.
* ``flatten``: :func:`taichi_dr.losses.mesh.flatten_loss`, the mean over edges of SoftRas's ``(1 + cos)^2``
  (SoftRas's 0.0003 on the sum over a 642-vertex sphere's 1920 edges is 0.58 here). Off by default: Adam
  moves every vertex by about the same distance per step whatever the template's resolution, and the
  dihedral angles of those wiggles grow as the edges shrink, so at 0.5 it held a 2562-vertex template back
  (a chair: hard IoU 0.79, 0.93 without it) while not helping a 642-vertex one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from taichi_dr.core.camera import Cameras
from taichi_dr.core.mesh import Mesh
from taichi_dr.losses import MeshTopology, flatten_loss, neg_iou_loss, scale_free_laplacian_loss, silhouette_iou
from taichi_dr.pipelines.callbacks import Callback
from taichi_dr.pipelines.config import OptimizerConfig, TrainConfig
from taichi_dr.pipelines.engine import Method, Trainer, TrainingViews, TrainResult
from taichi_dr.raster import RasterSettings

__all__ = ["FitResult", "FitSettings", "MeshDeformer", "MeshFitMethod", "ResumeMismatch", "estimate_bounding_sphere",
           "fit_mesh", "mesh_render_images", "tensor_digest"]

# The template's bounding sphere fills half of the deformation box (SoftRas scales its unit sphere by 0.5
# inside a [-1, 1] box), so vertices can move out to twice the estimated radius along each axis.
TEMPLATE_IN_BOX = 0.5


@dataclass(frozen=True)
class FitSettings:
    """Optimisation settings.

    iters: total number of Adam steps (the engine's ``TrainConfig.iterations``).
    lr, betas: Adam for the geometry (SoftRas: 0.01, (0.5, 0.99)); see :meth:`optimizer_config`.
    color_lr: Adam learning rate of the per-vertex colour logits (when colours are learned).
    sigma, gamma: soft rasterizer sharpness and depth temperature during fitting.
    sigma_final: when set, sigma shrinks geometrically from ``sigma`` at the first step to ``sigma_final``
        at the last (see :meth:`sigma_at`); None keeps ``sigma`` throughout.
    laplacian_weight, flatten_weight: regulariser weights (see the module docstring).
    parameterization: the displacement map of :class:`MeshDeformer`, "tanh" or "sigmoid" (SoftRas's).
    rgb_weight: weight of the L1 colour loss when colours are learned.
    views_per_step: views rendered per step (a random subset), 0 or None = all.
    grad_clip: clip the global gradient norm to this (None: no clipping, SoftRas's choice).
    """

    iters: int = 600
    lr: float = 0.01
    betas: tuple[float, float] = (0.5, 0.99)
    color_lr: float = 0.05
    sigma: float = 1e-4
    gamma: float = 1e-4
    sigma_final: float | None = 1e-5
    laplacian_weight: float = 2e-4
    flatten_weight: float = 0.0
    rgb_weight: float = 1.0
    views_per_step: int | None = 40
    parameterization: str = "tanh"
    grad_clip: float | None = None

    def __post_init__(self):
        if not (isinstance(self.iters, int) and self.iters >= 0):
            raise ValueError(f"FitSettings: iters must be an int >= 0, got {self.iters!r}")
        for name in ("lr", "color_lr", "sigma", "gamma"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"FitSettings: {name} must be finite and > 0, got {v!r}")
        for name in ("laplacian_weight", "flatten_weight", "rgb_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"FitSettings: {name} must be finite and >= 0, got {v!r}")
        if self.views_per_step is not None and self.views_per_step < 0:
            raise ValueError(f"FitSettings: views_per_step must be >= 0, got {self.views_per_step}")
        if self.sigma_final is not None and not (math.isfinite(self.sigma_final) and self.sigma_final > 0):
            raise ValueError(f"FitSettings: sigma_final must be finite and > 0 (or None), got "
                             f"{self.sigma_final!r}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"FitSettings: grad_clip must be finite and > 0 (or None), got {self.grad_clip!r}")
        if self.parameterization not in MeshDeformer.PARAMETERIZATIONS:
            raise ValueError(f"FitSettings: parameterization must be one of {MeshDeformer.PARAMETERIZATIONS}, "
                             f"got {self.parameterization!r}")

    def sigma_at(self, iteration: int) -> float:
        """Sigma for the step that starts at ``iteration`` (0-based): ``sigma * (sigma_final / sigma) **
        (iteration / (iters - 1))``, clamped to the run, or ``sigma`` when ``sigma_final`` is None."""
        if self.sigma_final is None or self.iters <= 1:
            return self.sigma
        frac = min(max(iteration / (self.iters - 1), 0.0), 1.0)
        return self.sigma * (self.sigma_final / self.sigma) ** frac

    def optimizer_config(self) -> OptimizerConfig:
        """The engine's optimiser for this fit: Adam with ``lr`` (the geometry's; the colours' group carries
        ``color_lr``) and ``betas``, constant learning rate, clipping at ``grad_clip``."""
        return OptimizerConfig(name="adam", lr=self.lr, betas=self.betas, grad_clip=self.grad_clip)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


# ----------------------------------------------------------------------------------------------------------
# Placement from silhouettes
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def estimate_bounding_sphere(silhouettes: Tensor, cameras: Cameras, threshold: float = 0.5
                             ) -> tuple[Tensor, float]:
    """Estimate the centre ``(3,)`` and radius of the object seen in ``silhouettes (N, H, W)``.

    Centre: the point closest, in the least-squares sense, to the N rays through the silhouettes' centroids
    (``sum_i (I - d_i d_i^T) (x - o_i) = 0``). Radius: per view, the radius of the disc with the same second
    moment about the projected centre, ``r_px = sqrt(2 * mean |p - c|^2)`` over silhouette pixels (exact for
    a sphere, whose silhouette is a disc, and not thrown by thin parts such as legs), back-projected at the
    centre's depth (``r_px * z / f``); the median over views.

    Views with an empty silhouette are ignored; all of them empty, or all rays parallel, raise ValueError.
    """
    if silhouettes.dim() != 3 or silhouettes.shape[0] != len(cameras):
        raise ValueError(f"estimate_bounding_sphere: expected silhouettes (N={len(cameras)}, H, W), got "
                         f"{tuple(silhouettes.shape)}")
    cams = cameras.detach().to(device="cpu", dtype=torch.float64)
    n, h, w = silhouettes.shape
    mask = silhouettes.detach().cpu().double() > threshold
    area = mask.flatten(1).sum(1)
    valid = area > 0
    if not bool(valid.any()):
        raise ValueError("targets: every silhouette is empty (no pixel above 0.5); nothing to fit")
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5,
                          torch.arange(w, dtype=torch.float64) + 0.5, indexing="ij")
    m = mask.double()
    centroid = torch.stack([(m * u).flatten(1).sum(1), (m * v).flatten(1).sum(1)], -1) \
        / area.clamp_min(1)[:, None]
    idx = torch.nonzero(valid).flatten()
    cams_v = cams[idx]
    origins, dirs = cams_v.pixel_rays(centroid[idx][:, None, :])
    o, d = origins[:, 0], dirs[:, 0]  # (Nv, 3)
    proj = torch.eye(3, dtype=torch.float64) - d[:, :, None] * d[:, None, :]  # (Nv, 3, 3)
    A = proj.sum(0)
    b = (proj @ o[:, :, None]).sum(0)[:, 0]
    if len(idx) < 2 or torch.linalg.matrix_rank(A, rtol=1e-6) < 3:
        # One view or parallel rays: no depth information; take the ray point nearest the origin (cameras
        # usually look at it).
        t = -(o * d).sum(-1)
        centre = (o + t[:, None] * d).mean(0)
    else:
        centre = torch.linalg.solve(A, b)

    uvz = cams_v.project(centre[None, :])[:, 0]  # (Nv, 3)
    focal = torch.sqrt((cams_v.K[:, 0, 0] * cams_v.K[:, 1, 1]).abs())  # fx < 0 on mirrored (SoftRas) cameras
    radii = []
    for k, i in enumerate(idx.tolist()):
        ys, xs = torch.nonzero(mask[i], as_tuple=True)
        r_px = torch.sqrt(2.0 * ((xs + 0.5 - uvz[k, 0]) ** 2 + (ys + 0.5 - uvz[k, 1]) ** 2).mean())
        z = uvz[k, 2]
        if z > 0:
            radii.append(float(r_px * z / focal[k]))
    if not radii:
        raise ValueError("targets/cameras: the estimated object centre is behind every camera; check that "
                         "the cameras match the targets (OpenCV axes, world -> camera)")
    radius = float(torch.tensor(radii).median())
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"targets/cameras: could not estimate the object's size (got radius {radius})")
    return centre.to(torch.float32), radius


# ----------------------------------------------------------------------------------------------------------
# Deformation model
# ----------------------------------------------------------------------------------------------------------


class MeshDeformer(torch.nn.Module):
    """Template deformed by per-vertex displacements and a global shift (SoftRas's deformation model).

    The template is normalised (bounding sphere radius 1 at the origin) and scaled by ``TEMPLATE_IN_BOX``
    into unit box coordinates ``v0 in (-1, 1)``. Then, per vertex and axis, with ``parameterization``

        "tanh":    v = tanh(atanh(v0) + displacement)                      (default)
        "sigmoid": v = sigmoid(log(|v0| / (1 - |v0|)) + displacement) * sign(v0)    (SoftRas's demo)

    both in (-1, 1) and equal to the template at zero displacement, then

        c = tanh(shift)                                     (3,) global centre shift in (-1, 1)
        v = relu(v) * (1 - c) - relu(-v) * (1 + c) + c      (SoftRas: shifts the centre, keeps the box)
        verts = centre + half_size * v                      (world)

    with ``half_size = radius / TEMPLATE_IN_BOX``, so the template's bounding sphere maps to the sphere
    (``centre``, ``radius``). The two maps differ in how far a step of the displacement moves a vertex:
    ``dv/dd = 1 - v^2`` for tanh, ``|v| (1 - |v|)`` for sigmoid (3x smaller at the template's ``|v| = 0.5``,
    vanishing near the centre), and sigmoid keeps each coordinate on its side of the centre (coordinates
    that start at exactly 0, as many icosphere vertices do, are moved to +-1e-3 first, else they would be
    pinned there). ``learn_colors`` adds per-vertex colours ``sigmoid(color_logits)``.
    """

    PARAMETERIZATIONS = ("tanh", "sigmoid")

    def __init__(self, template: Mesh, centre: Tensor, radius: float, learn_colors: bool = False,
                 parameterization: str = "tanh"):
        super().__init__()
        if not isinstance(template, Mesh):
            raise TypeError(f"MeshDeformer: template must be a Mesh, got {type(template).__name__}")
        if not (math.isfinite(radius) and radius > 0):
            raise ValueError(f"MeshDeformer: radius must be finite and > 0, got {radius}")
        if parameterization not in self.PARAMETERIZATIONS:
            raise ValueError(f"MeshDeformer: parameterization must be one of {self.PARAMETERIZATIONS}, got "
                             f"{parameterization!r}")
        template.validate()
        normalised, _, _ = _detached(template).normalized()
        v0 = (normalised.verts.float() * TEMPLATE_IN_BOX).clamp(-0.999, 0.999)
        self.parameterization = parameterization
        if parameterization == "tanh":
            self.register_buffer("base", torch.atanh(v0))
            sign = torch.ones_like(v0)
        else:
            sign = torch.where(v0 < 0, -1.0, 1.0)
            magnitude = v0.abs().clamp_min(1e-3)
            self.register_buffer("base", torch.log(magnitude / (1 - magnitude)))
        # Derived, not saved (checkpoints keep their keys): the side of each coordinate for "sigmoid", and
        # the template in box coordinates, the rest shape of the scale-free Laplacian.
        self.register_buffer("sign", sign, persistent=False)
        self.register_buffer("template_unit", v0, persistent=False)
        self.register_buffer("faces", template.faces.clone())
        self.register_buffer("centre", torch.as_tensor(centre, dtype=torch.float32).reshape(3).clone())
        self.register_buffer("half_size", torch.tensor(float(radius) / TEMPLATE_IN_BOX))
        self.displacement = torch.nn.Parameter(torch.zeros_like(v0))
        self.shift = torch.nn.Parameter(torch.zeros(3))
        if learn_colors:
            self.color_logits = torch.nn.Parameter(torch.zeros_like(v0))  # grey 0.5 to start
        else:
            self.register_parameter("color_logits", None)
        self.topology = MeshTopology.from_faces(self.faces, num_verts=v0.shape[0])
        self.name = template.name

    def _apply(self, fn, *args, **kwargs):  # keep the topology tables on the module's device
        out = super()._apply(fn, *args, **kwargs)
        self.topology = self.topology.to(self.faces.device)
        return out

    def unit_verts(self) -> Tensor:
        """(V, 3) vertices in box coordinates (-1, 1)."""
        if self.parameterization == "tanh":
            v = torch.tanh(self.base + self.displacement)
        else:
            v = torch.sigmoid(self.base + self.displacement) * self.sign
        c = torch.tanh(self.shift)
        return torch.relu(v) * (1 - c) - torch.relu(-v) * (1 + c) + c

    def to_world(self, unit_verts: Tensor) -> Tensor:
        return self.centre + self.half_size * unit_verts

    def forward(self) -> tuple[Mesh, Tensor]:
        """The deformed mesh (world coordinates, vertex colours if learned) and its (V, 3) unit vertices."""
        unit = self.unit_verts()
        colors = torch.sigmoid(self.color_logits) if self.color_logits is not None else None
        mesh = Mesh(verts=self.to_world(unit), faces=self.faces, vert_colors=colors, name=self.name)
        return mesh, unit


def _detached(mesh: Mesh) -> Mesh:
    return mesh.with_verts(mesh.verts.detach().float())


# ----------------------------------------------------------------------------------------------------------
# The method the training engine runs
# ----------------------------------------------------------------------------------------------------------


def mesh_render_images(out) -> dict[str, Tensor]:
    """The images of a :func:`~taichi_dr.raster.renderer.render_mesh` call made with ``outputs=("rgb", "depth",
    "normals")`` as a method's ``render`` returns them (see :meth:`taichi_dr.pipelines.Method.render`):

    ``"rgb" (B, H, W, 3)`` and ``"alpha" (B, H, W)`` clamped to [0, 1]; ``"depth" (B, H, W)`` the
    rasterizer's camera-space z (the OpenCV camera's forward axis, not the distance along the ray),
    softmax-aggregated over the faces at the pixel: the nearest surface's z where alpha is 1, blended towards
    0 (the background) across soft edges, 0 where nothing is; ``"normals" (B, H, W, 3)`` world-space normals
    (the aggregated, interpolated vertex normals) rescaled to unit length, 0 where nothing is.
    """
    normals = out.normals
    length = normals.norm(dim=-1, keepdim=True)
    # The background's normal is 0 and soft edges blend towards it: rescale what has a direction, keep 0 as 0.
    unit = torch.where(length > 1e-6, normals / length.clamp_min(1e-6), torch.zeros_like(normals))
    return {"rgb": out.rgb.clamp(0.0, 1.0), "alpha": out.alpha.clamp(0.0, 1.0), "depth": out.depth,
            "normals": unit}


def tensor_digest(*tensors: Tensor) -> str:
    """A short hash of the tensors' float32 contents: how a resumed run recognises its inputs."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# What a resumed run must share with its checkpoint: the problem (targets, cameras) and what the parameters
# mean (template, its placement, whether colours are learned, the displacement map). FitSettings (lr,
# weights, iters, views per step) may change between runs.
IDENTITY_KEYS = ("targets", "cameras", "template", "placement", "rgb", "parameterization")


class ResumeMismatch(ValueError):
    """A checkpoint made for another problem or parameterisation. ``differences``: ``[(identity key, what
    changed)]`` with keys from ``IDENTITY_KEYS``, so a command can name its own options."""

    def __init__(self, differences: list[tuple[str, str]]):
        self.differences = differences
        listed = ", ".join(f"{key} ({what})" for key, what in differences)
        super().__init__(f"resume: the checkpoint was made with different {listed}; continue with the original "
                         "inputs, or start a new run")


class MeshFitMethod(Method):
    """Fits a :class:`MeshDeformer` to target silhouettes (and colours) seen by ``cameras``; the training
    engine (:class:`taichi_dr.pipelines.Trainer`) runs it (see :func:`fit_mesh`).

    silhouettes: (N, H, W) in [0, 1]; rgb: (N, H, W, 3) or None (colours are learned iff the model has them,
    and then rgb is required); cameras: N cameras with ``image_size == (H, W)``.
    sources: optional labels of the inputs (e.g. file paths) for ``"targets"``, ``"cameras"``, ``"template"``,
    kept in the configuration so a refused resume can say which file changed.

    One step renders a random subset of ``views_per_step`` views (drawn from the engine's generator) with the
    soft rasterizer at the annealed sigma and returns ``neg IoU + w_lap * laplacian + w_flat * flatten
    (+ w_rgb * L1 colour)``; the engine's Adam (:meth:`FitSettings.optimizer_config`) takes the step.
    """

    name = "mesh-fit"
    version = 1

    def __init__(self, model: MeshDeformer, silhouettes: Tensor, cameras: Cameras, rgb: Tensor | None = None,
                 settings: FitSettings = FitSettings(), sources: dict[str, str] | None = None):
        from taichi_dr.core import runtime

        if silhouettes.dim() != 3 or silhouettes.shape[0] != len(cameras):
            raise ValueError(f"MeshFitMethod: silhouettes must be (N={len(cameras)}, H, W) for {len(cameras)} "
                             f"cameras, got {tuple(silhouettes.shape)}")
        if tuple(silhouettes.shape[1:]) != tuple(cameras.image_size):
            raise ValueError(f"MeshFitMethod: silhouettes are {tuple(silhouettes.shape[1:])} (H, W) but the "
                             f"cameras' image_size is {tuple(cameras.image_size)}")
        if model.parameterization != settings.parameterization:
            raise ValueError(f"MeshFitMethod: the model's parameterization is {model.parameterization!r} but "
                             f"the settings say {settings.parameterization!r}; build both with the same one")
        learn_colors = model.color_logits is not None
        if learn_colors and rgb is None:
            raise ValueError("MeshFitMethod: the model learns colours but no target rgb was given")
        if rgb is not None and tuple(rgb.shape) != tuple(silhouettes.shape) + (3,):
            raise ValueError(f"MeshFitMethod: rgb must be (N, H, W, 3) = {tuple(silhouettes.shape) + (3,)}, "
                             f"got {tuple(rgb.shape)}")
        self.device = runtime.device()
        self.model = model.to(self.device)
        self.silhouettes = silhouettes.detach().float().to(self.device)
        # Compare colours composited over black, which is what the renderer's background 0 gives.
        self.rgb = (rgb.detach().float().to(self.device) * self.silhouettes[..., None]
                    if learn_colors else None)
        self.cameras = cameras.detach().to(device=self.device, dtype=torch.float32)
        self.settings = settings
        self.sigma = settings.sigma_at(0)  # set by on_iteration_start; the soft renders' sharpness
        self.initial_metrics: dict[str, float] | None = None  # evaluate() of the template, kept in checkpoints
        self.identity = self._identity(sources or {})

    @classmethod
    def build(cls, silhouettes: Tensor, cameras: Cameras, template: Mesh | None = None,
              settings: FitSettings = FitSettings(), *, rgb: Tensor | None = None, learn_colors: bool = False,
              template_scale: float = 1.0, sources: dict[str, str] | None = None) -> MeshFitMethod:
        """Place ``template`` (default ``icosphere(level=3)``, 642 vertices like SoftRas's sphere) on the
        sphere estimated from the silhouettes (:func:`estimate_bounding_sphere`, radius times
        ``template_scale``) and build the method; colours are learned iff ``learn_colors`` (needs ``rgb``)."""
        from taichi_dr.core.mesh import icosphere

        if template is None:
            template = icosphere(level=3)
        if not (isinstance(template_scale, (int, float)) and math.isfinite(template_scale) and template_scale > 0):
            raise ValueError(f"template_scale: expected a number > 0, got {template_scale!r}")
        centre, radius = estimate_bounding_sphere(silhouettes, cameras)
        model = MeshDeformer(template, centre, radius * template_scale, learn_colors=learn_colors,
                             parameterization=settings.parameterization)
        return cls(model, silhouettes, cameras, rgb=rgb if learn_colors else None, settings=settings,
                   sources=sources)

    # -- what the engine calls

    def param_groups(self) -> list[dict]:
        groups = [{"params": [self.model.displacement, self.model.shift], "name": "geometry",
                   "lr": self.settings.lr}]
        if self.model.color_logits is not None:
            groups.append({"params": [self.model.color_logits], "name": "colour", "lr": self.settings.color_lr})
        return groups

    def on_iteration_start(self, iteration: int) -> None:
        self.sigma = self.settings.sigma_at(iteration)

    def sample(self, iteration: int, generator: torch.Generator) -> Tensor:
        """The views of this step: (K,) sorted indices, a random subset of ``views_per_step`` (all views when
        it is 0/None or at least the number of views)."""
        k, n = self.settings.views_per_step, self.num_views
        if not k or k >= n:
            return torch.arange(n)
        return torch.randperm(n, generator=generator)[:k].sort().values

    def step(self, views: Tensor, iteration: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss on ``views`` (with autograd) and its terms (0-dim tensors): neg_iou, laplacian, flatten, rgb
        (when colours are learned) and iou (soft, on this batch)."""
        s = self.settings
        views = views.to(self.device)
        mesh, unit = self.model()
        learn_rgb = self.rgb is not None
        out = self._render(mesh, self.cameras[views], self.raster, learn_rgb)
        neg_iou = neg_iou_loss(out.alpha, self.silhouettes[views])
        topo = self.model.topology
        laplacian = scale_free_laplacian_loss(unit, self.model.faces, self.model.template_unit, topology=topo)
        flatten = flatten_loss(unit, self.model.faces, topology=topo)
        total = neg_iou + s.laplacian_weight * laplacian + s.flatten_weight * flatten
        stats = {"neg_iou": neg_iou.detach(), "laplacian": laplacian.detach(), "flatten": flatten.detach()}
        if learn_rgb:
            rgb_loss = (out.rgb - self.rgb[views]).abs().mean()
            total = total + s.rgb_weight * rgb_loss
            stats["rgb"] = rgb_loss.detach()
        stats["iou"] = 1.0 - stats["neg_iou"]
        return total, stats

    @torch.no_grad()
    def render(self, cameras: Cameras, *, hard: bool = False, sigma: float | None = None) -> dict[str, Tensor]:
        """The current mesh seen by ``cameras`` (B views of any size), over black (see
        :func:`mesh_render_images`): ``"rgb" (B, H, W, 3)`` the learned colours, or without them a white
        surface Lambert-shaded under ``Lights.default`` so the shape shows; ``"alpha" (B, H, W)`` the
        silhouette; ``"depth" (B, H, W)`` camera-space z (not the distance along the ray); ``"normals" (B, H,
        W, 3)`` world unit normals. Soft at ``sigma`` (default: the current step's), or ``hard``."""
        from taichi_dr.raster.renderer import render_mesh
        from taichi_dr.raster.shading import Lights

        mesh = self.current_mesh()
        cams = cameras.detach().to(device=self.device, dtype=torch.float32)
        lights = None if mesh.vert_colors is not None else Lights.default(device=self.device)
        out = render_mesh(mesh, cams, lights, self._raster_settings(hard, sigma), outputs=("rgb", "depth", "normals"))
        return mesh_render_images(out)

    def training_views(self) -> TrainingViews:
        """The N training cameras with their target silhouettes as ``alpha`` and, when colours are learned,
        the target colours composited over black (what the renders are compared with) as ``rgb``: the
        method's own tensors, on its device."""
        return TrainingViews(cameras=self.cameras, rgb=self.rgb, alpha=self.silhouettes)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "initial_metrics": dict(self.initial_metrics or {})}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.initial_metrics = dict(state.get("initial_metrics") or {}) or None

    def config(self) -> dict:
        return {"settings": self.settings.to_dict(), "identity": self.identity}

    def check_resume(self, saved_config: dict) -> None:
        """Refuse (:class:`ResumeMismatch`) a checkpoint made for other targets, cameras, template, placement
        (the template's scale), colour learning or displacement map; settings may differ."""
        saved = saved_config.get("identity") or {}
        differences = []
        for key in IDENTITY_KEYS:
            was, now = saved.get(key), self.identity.get(key)
            if key == "placement" and differences:
                continue  # other targets or cameras move the estimated sphere too: not worth a second mention
            if isinstance(was, dict) and isinstance(now, dict) and "digest" in now:
                if was.get("digest") != now["digest"]:
                    before, after = was.get("source"), now.get("source")
                    differences.append((key, "content" if before == after else f"{before} -> {after}"))
            elif key == "placement" and isinstance(was, dict) and was != now:
                differences.append((key, f"radius {was.get('radius', float('nan')):.6g} -> {now['radius']:.6g}"))
            elif was != now:
                differences.append((key, f"{was} -> {now}"))
        if differences:
            raise ResumeMismatch(differences)

    # -- helpers

    def _identity(self, sources: dict[str, str]) -> dict:
        m = self.model

        def entry(key: str, *tensors: Tensor) -> dict:
            return {"digest": tensor_digest(*tensors), **({"source": str(sources[key])} if key in sources else {})}

        return {
            "targets": entry("targets", self.silhouettes),
            "cameras": entry("cameras", self.cameras.K, self.cameras.R, self.cameras.t),
            "template": entry("template", m.template_unit, m.faces.float()),
            "placement": {"centre": [float(c) for c in m.centre.cpu()],
                          "radius": float(m.half_size) * TEMPLATE_IN_BOX},
            "rgb": m.color_logits is not None,
            "parameterization": m.parameterization,
        }

    @property
    def num_views(self) -> int:
        return len(self.cameras)

    @property
    def raster(self) -> RasterSettings:
        """The soft rasterizer's settings for the current step (sigma follows ``FitSettings.sigma_at``)."""
        return self._raster_settings(False, None)

    def _raster_settings(self, hard: bool, sigma: float | None) -> RasterSettings:
        if hard:
            return RasterSettings(mode="hard", far=1000.0)
        return RasterSettings(sigma=self.sigma if sigma is None else sigma, gamma=self.settings.gamma, far=1000.0)

    def _render(self, mesh: Mesh, cameras: Cameras, settings: RasterSettings, rgb: bool):
        from taichi_dr.raster.renderer import render_mesh

        return render_mesh(mesh, cameras, None, settings, outputs=("rgb",) if rgb else ())

    @torch.no_grad()
    def current_mesh(self) -> Mesh:
        """The deformed mesh now (world coordinates, learned colours if any), detached."""
        mesh, _ = self.model()
        return Mesh(verts=mesh.verts.detach(), faces=mesh.faces,
                    vert_colors=None if mesh.vert_colors is None else mesh.vert_colors.detach(),
                    name=mesh.name)

    @torch.no_grad()
    def evaluate(self, batch: int = 16) -> dict[str, float]:
        """Mean silhouette IoU over all views: ``iou_hard`` (hard-rasterised render vs target > 0.5) and
        ``iou_soft`` (soft render at the current sigma vs target, SoftRas's IoU)."""
        from taichi_dr.core.metrics import hard_iou

        mesh = self.current_mesh()
        hard, soft = [], []
        for start in range(0, self.num_views, batch):
            views = torch.arange(start, min(start + batch, self.num_views), device=self.device)
            cams, target = self.cameras[views], self.silhouettes[views]
            hard.append(hard_iou(self._render(mesh, cams, self._raster_settings(True, None), False).alpha, target))
            soft.append(silhouette_iou(self._render(mesh, cams, self.raster, False).alpha, target))
        return {"iou_hard": float(torch.cat(hard).mean()), "iou_soft": float(torch.cat(soft).mean())}


# ----------------------------------------------------------------------------------------------------------
# The library entry point
# ----------------------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """What :func:`fit_mesh` returns: the fitted and initial meshes (world coordinates), the mean silhouette
    IoUs before and after (:meth:`MeshFitMethod.evaluate`), the iterations done, the method (its model holds
    the parameters) and the engine's result (None when no iteration ran)."""

    mesh: Mesh
    initial_mesh: Mesh
    initial: dict
    final: dict
    iterations: int
    method: MeshFitMethod = field(repr=False)
    train: TrainResult | None = field(default=None, repr=False)


def fit_mesh(silhouettes: Tensor, cameras: Cameras, template: Mesh | None = None,
             settings: FitSettings = FitSettings(), *, rgb: Tensor | None = None, learn_colors: bool = False,
             template_scale: float = 1.0, seed: int = 0, out_dir=None, resume: bool = False,
             checkpoint_every: int = 100, max_nonfinite: int = 20, progress: str = "auto",
             callbacks: Sequence[Callback] = (), sources: dict[str, str] | None = None,
             run: Callable[[Trainer], TrainResult] | None = None) -> FitResult:
    """Fit ``template`` (default: a 642-vertex icosphere) to ``silhouettes (N, H, W)`` seen by ``cameras``.

    rgb: (N, H, W, 3) target colours, learned as per-vertex colours when ``learn_colors``.
    out_dir: where the engine writes ``checkpoint.pt`` (every ``checkpoint_every`` iterations, at the end and
        on SIGINT/SIGTERM), ``metrics.jsonl`` and ``config.json``; the fitted ``mesh.obj`` is written there at
        the end. None: nothing is written.
    resume: continue from ``out_dir/checkpoint.pt`` (bitwise as if never stopped, on CPU); refused with
        :class:`ResumeMismatch` for other inputs, CheckpointError for another method's file.
    progress: the engine's display ("auto": a bar on a terminal, plain lines otherwise; "none").
    callbacks: extra engine callbacks (they see the live method: ``state.method.render(cameras)``).
    run: how to call ``trainer.fit()`` (apps pass ``apps.common.run_training``, which turns an interrupt into
        an exit code); default ``Trainer.fit``, which raises :class:`~taichi_dr.pipelines.Interrupted` after
        saving on SIGINT/SIGTERM and NonFiniteError after ``max_nonfinite`` skipped steps in a row.

    Seeds torch's global RNG with ``seed`` (as the engine expects); the same seed gives the same result.
    """
    from taichi_dr.core.mesh import save_mesh

    torch.manual_seed(seed)
    method = MeshFitMethod.build(silhouettes, cameras, template, settings, rgb=rgb, learn_colors=learn_colors,
                                 template_scale=template_scale, sources=sources)
    initial_mesh = method.current_mesh()
    trainer = None
    if settings.iters > 0:
        config = TrainConfig(iterations=settings.iters, seed=seed, optimizer=settings.optimizer_config(),
                             checkpoint_every=checkpoint_every, max_nonfinite=max_nonfinite, progress=progress)
        trainer = Trainer(method, config, out_dir=out_dir, callbacks=callbacks, resume=resume)
    elif resume:
        raise ValueError("resume: iters must be >= 1 to continue a run")
    if method.initial_metrics is None:  # (a resumed run keeps the first run's)
        method.initial_metrics = method.evaluate()
    train = (run or Trainer.fit)(trainer) if trainer is not None else None
    iterations = trainer.state.iteration if trainer is not None else 0
    method.sigma = settings.sigma_at(iterations)
    final = method.evaluate()
    mesh = method.current_mesh()
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_mesh(mesh, Path(out_dir) / "mesh.obj")
    return FitResult(mesh=mesh, initial_mesh=initial_mesh, initial=dict(method.initial_metrics), final=final,
                     iterations=iterations, method=method, train=train)
