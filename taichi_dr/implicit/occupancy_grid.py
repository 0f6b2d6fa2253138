"""An occupancy grid for empty-space skipping (instant-ngp's density grid, nerfacc's ``OccGridEstimator``).

:class:`OccupancyGrid` covers an axis-aligned box ``[lo, hi]`` with ``resolution`` cells per axis. Each cell
keeps a value (float32) and an occupied flag (bool); cell ``(i, j, k)`` spans
``lo + (i, j, k) * cell_size`` to ``lo + (i + 1, j + 1, k + 1) * cell_size``. Points outside the box count as
empty. Three renderers use it:

* NeRF volume sampling: :meth:`OccupancyGrid.march` places samples every ``step_size`` along a ray, only in
  occupied cells (nerfacc's ``sampling``);
* UNISURF's surface search and IDR's sphere tracing: :meth:`OccupancyGrid.ray_intervals` tightens each ray's
  ``[t_near, t_far]`` to ``[t_start, t_end]``, from the entry into its first occupied cell to the exit from its
  last one, and the search then runs on that interval only.

Updating (:meth:`OccupancyGrid.update`, nerfacc's ``update_every_n_steps`` / ``_update``): every
``update_every`` iterations, evaluate ``value_fn`` at one uniformly jittered point in each chosen cell (all
cells during warm-up; afterwards ``N // 4`` cells drawn uniformly with replacement, plus the occupied cells, or
``N // 4`` of them drawn with replacement when there are more), set ``values = max(values * decay, new)`` on
the chosen cells only (the others keep their values, as in nerfacc; instant-ngp decays every cell), and
``occupied = values > min(mean of the positive values, occupancy_threshold)`` (nerfacc's rule; with no
positive value nothing is occupied). A cell drawn twice takes the larger of its two new values (nerfacc writes
them in an unspecified order). ``value_fn`` must be non-negative; what it should return per renderer, with the
helpers that build it:

* NeRF: density times the render step, ``sigma(x) * step_size`` (nerfacc's ``occ_eval_fn``; the
  opacity of one step is ``1 - exp(-value)``): :func:`density_value_fn`.
* UNISURF: the occupancy probability ``o(x)`` in [0, 1]: :func:`occupancy_value_fn`. With the default
  threshold 0.01 a cell is occupied where ``o`` exceeds 0.01 at a sampled point: the inside of the object and
  a rim around it as wide as the network's sigmoid is soft.
* SDF (IDR): ``max(0, 1 - |f(x)| / (margin * cell_diagonal))``: :func:`sdf_value_fn`. In a cell that the
  zero level set passes through, every point is within one cell diagonal of the surface, so for an
  ``L``-Lipschitz SDF the jittered sample has ``|f| <= L * diagonal`` and the value is at least
  ``1 - L / margin`` (1/3 for an exact SDF and the default margin 1.5): far above the threshold, so every
  surface cell is occupied after any update that evaluates it, whatever the jitter. Cells whose every point is
  more than ``margin`` diagonals from the surface get exactly 0 (so the mean of the positive values only
  counts cells near the surface). A density-style ``exp(-|f| / cell_size)`` has no such guarantee without a
  threshold tied to the resolution, and is never zero.

Marching and the intervals are Taichi kernels, one thread per ray, forward only (sample placement carries no
gradient), on float32 rays (float64 too on cpu/cuda). :meth:`OccupancyGrid.march` tests each sample's cell,
``floor((o + t d - lo) * resolution / (hi - lo))``, as a brute-force filter of all samples would; from a
sample in an empty cell it jumps to the first sample past that cell's exit, or past the exit of its block of
up to 8^3 cells when the whole block is empty (each exit less a margin of a few ulps, so that no sample that
rounds into another cell is skipped: the result equals the brute-force filter's). The cost is the samples kept
plus about one test per empty cell or block crossed, never the skipped samples. :meth:`OccupancyGrid.ray_intervals`
walks the cells a ray crosses (a 3D DDA, Amanatides & Woo), recomputing each cell's exit from its index so that
no error accumulates. The update runs in torch (random cell choice, scatter-max); its cost is ``value_fn``,
called on at most ``chunk`` points at a time.
"""

import math
import numbers
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from taichi_dr.core import runtime
from taichi_dr.core.bridge import check_finite, check_tensor, to_kernel
from taichi_dr.implicit.occupancy_grid_kernels import _intervals_kernel, _march_count_kernel, _march_fill_kernel
from taichi_dr.implicit.samples import RaySamples, offsets_from_counts

__all__ = ["OccupancyGrid", "OccupancyGridSettings", "density_value_fn", "occupancy_value_fn", "sdf_value_fn"]

ValueFn = Callable[[torch.Tensor], torch.Tensor]

_FLOATS = (torch.float32, torch.float64)
_INT32_MAX = 2 ** 31 - 1
_BLOCK = 8                    # march skips empty blocks of up to 8^3 cells at once
_EXIT_ULPS = 64               # margin of march's jumps past empty cells, in ulps of the coordinates
_PAD_ULPS = 16                # ray_intervals pads its ends by this many ulps of the coordinates' magnitude



@dataclass(frozen=True)
class OccupancyGridSettings:
    """Empty-space skipping in a field method (a nested config, as :class:`TracerSettings`).

    enabled: keep an :class:`OccupancyGrid` of the field during training and search / sample only where it
        says something may be (off: every ray searches its whole segment, as the papers' code does).
    resolution: cells per axis over the method's bounding cube (instant-ngp, nerfacc: 128).
    update_every, decay, threshold, warmup_steps: :meth:`OccupancyGrid.update`'s schedule (nerfacc: 16, 0.95,
        0.01, 256).
    """

    enabled: bool = True
    resolution: int = 128
    update_every: int = 16
    decay: float = 0.95
    threshold: float = 0.01
    warmup_steps: int = 256

    def __post_init__(self):
        checks = [
            (isinstance(self.enabled, bool), "enabled must be true or false"),
            (_is_int(self.resolution) and 1 <= self.resolution <= 1024, "resolution must be an integer in 1..1024"),
            (_is_int(self.update_every) and self.update_every >= 1, "update_every must be an integer >= 1"),
            (_is_real(self.decay) and 0 <= self.decay <= 1, "decay must be in [0, 1]"),
            (_is_real(self.threshold) and 0 <= self.threshold < 1, "threshold must be in [0, 1)"),
            (_is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps must be an integer >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"OccupancyGridSettings: {msg}")

    def make_grid(self, radius: float) -> "OccupancyGrid | None":
        """A new (empty) grid over the cube ``[-radius, radius]^3``, or None when not ``enabled``."""
        return OccupancyGrid(-radius, radius, self.resolution) if self.enabled else None

    def update(self, grid: "OccupancyGrid", iteration: int, value_fn: "ValueFn",
               generator: torch.Generator | None = None) -> bool:
        """``grid.update`` on this schedule (see :meth:`OccupancyGrid.update`)."""
        return grid.update(iteration, value_fn, occupancy_threshold=self.threshold, decay=self.decay,
                           update_every=self.update_every, warmup_steps=self.warmup_steps, generator=generator)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _refuse_float64_on_vulkan(name: str, dtype: torch.dtype) -> None:
    if dtype == torch.float64 and runtime.ensure_init() == "vulkan":
        raise TypeError(f"{name}: float64 is not supported on the vulkan backend (SPIR-V devices such as "
                        "Mesa's lavapipe have no 64-bit floats); use float32, or the cpu/cuda backend for float64")


def _check_rays(origins, dirs, t_near, t_far) -> None:
    check_tensor("origins", origins, ("R", 3), dtype=_FLOATS)
    n = origins.shape[0]
    check_tensor("dirs", dirs, (n, 3), dtype=origins.dtype)
    check_tensor("t_near", t_near, (n,), dtype=origins.dtype)
    check_tensor("t_far", t_far, (n,), dtype=origins.dtype)
    _refuse_float64_on_vulkan("origins", origins.dtype)
    check_finite({"origins": origins, "dirs": dirs, "t_near": t_near, "t_far": t_far})
    if n and bool((dirs.detach() == 0).all(dim=1).any()):
        raise ValueError("dirs: expected non-zero ray directions, got a zero vector")


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")


def _positive_number(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)) or float(x) <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {x!r}")
    return float(x)


def _integer(name: str, x, minimum: int) -> int:
    try:
        if isinstance(x, bool):
            raise TypeError
        value = operator.index(x)
    except TypeError:
        raise TypeError(f"{name}: expected an integer >= {minimum}, got {x!r}") from None
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return value


def _triple(name: str, x) -> tuple[float, float, float]:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().reshape(-1).tolist()
        if len(x) == 1:
            x = x[0]
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        x = (x, x, x)
    if not isinstance(x, Sequence) or len(x) != 3 or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v)) for v in x):
        raise ValueError(f"{name}: expected a finite number or 3 finite numbers, got {x!r}")
    return tuple(float(v) for v in x)


def _first_column(v: torch.Tensor, m: int, name: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] >= 1:
        v = v[:, 0]
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.shape[0] != m:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{name}: expected values shaped (M,) or (M, C) for points (M, 3), got {got} for M={m}")
    return v


# ---------------------------------------------------------------------------------------------------------
# value_fn builders


def density_value_fn(density_fn: ValueFn, step_size: float) -> ValueFn:
    """NeRF: ``value(x) = max(sigma(x), 0) * step_size`` (nerfacc's ``sigma * render_step_size``: the optical
    thickness of one marching step). ``density_fn(points (M, 3)) -> (M,)`` or ``(M, C)`` (first column)."""
    step = _positive_number("step_size", step_size)

    def value(x: torch.Tensor) -> torch.Tensor:
        return _first_column(density_fn(x), x.shape[0], "density_fn").clamp_min(0) * step

    return value


def occupancy_value_fn(occupancy_fn: ValueFn) -> ValueFn:
    """UNISURF: ``value(x) = o(x)`` clamped to [0, 1], the occupancy probability (inside the object ~1).
    ``occupancy_fn(points (M, 3)) -> (M,)`` or ``(M, C)`` (first column)."""

    def value(x: torch.Tensor) -> torch.Tensor:
        return _first_column(occupancy_fn(x), x.shape[0], "occupancy_fn").clamp(0, 1)

    return value


def sdf_value_fn(sdf_fn: ValueFn, grid: "OccupancyGrid", margin: float = 1.5) -> ValueFn:
    """SDF (IDR): ``value(x) = max(0, 1 - |f(x)| / (margin * grid.cell_diagonal))``.

    Every cell the zero level set passes through gets a value >= ``1 - L / margin`` at any point of it (L: the
    SDF's Lipschitz constant; 1/3 for an exact SDF), so it is occupied whatever the jitter as long as that
    exceeds the update's threshold (0.01 by default: L up to ~1.48 with margin 1.5); cells farther than
    ``margin`` diagonals from the surface get 0. Raise ``margin`` for a network SDF whose gradient norm
    exceeds 1. ``sdf_fn(points (M, 3)) -> (M,)`` or ``(M, C)`` (first column, as IDR's SDF-and-features).
    """
    if not isinstance(grid, OccupancyGrid):
        raise TypeError(f"grid: expected an OccupancyGrid, got {type(grid).__name__}")
    width = _positive_number("margin", margin) * grid.cell_diagonal

    def value(x: torch.Tensor) -> torch.Tensor:
        f = _first_column(sdf_fn(x), x.shape[0], "sdf_fn")
        return (1 - f.abs() / width).clamp_min(0)

    return value


# ---------------------------------------------------------------------------------------------------------


class OccupancyGrid(nn.Module):
    """Cells of an axis-aligned box, each with a value and an occupied flag, for empty-space skipping.

    lo, hi: the box's corners (a number for all three axes, or three numbers), ``lo < hi`` per axis; e.g.
        ``-r, r`` for a scene in the bounding sphere of radius ``r`` at the origin.
    resolution: cells per axis (an int, or three ints), each >= 1.

    An ``nn.Module`` holding buffers (so it travels in its owner's ``state_dict``): ``values`` (Rx, Ry, Rz)
    float32, ``occupied`` (Rx, Ry, Rz) bool, and ``aabb`` (2, 3) float64 (the box, checked on load: a state
    saved for another box or resolution is refused). They live on the runtime's device (creating a grid
    initialises Taichi). A new grid is all empty with zero values: call :meth:`update` (or
    :meth:`mark_all_occupied`) before marching.
    """

    def __init__(self, lo: float | Sequence[float], hi: float | Sequence[float], resolution: int | Sequence[int] = 128):
        super().__init__()
        lo3, hi3 = _triple("lo", lo), _triple("hi", hi)
        for a in range(3):
            if not lo3[a] < hi3[a]:
                raise ValueError(f"hi: expected hi > lo on every axis, got lo={lo3}, hi={hi3}")
        if isinstance(resolution, Sequence) and not isinstance(resolution, str):
            if len(resolution) != 3:
                raise ValueError(f"resolution: expected an int or 3 ints, got {resolution!r}")
            res = tuple(_integer("resolution", v, 1) for v in resolution)
        else:
            res = (_integer("resolution", resolution, 1),) * 3
        if math.prod(res) > _INT32_MAX:
            raise ValueError(f"resolution: {res} has more cells than int32 indices reach")
        self.lo, self.hi, self.resolution = lo3, hi3, res
        self.cell_size = tuple((h - l) / n for l, h, n in zip(lo3, hi3, res, strict=True))
        dev = runtime.device()
        self.register_buffer("values", torch.zeros(res, dtype=torch.float32, device=dev))
        self.register_buffer("occupied", torch.zeros(res, dtype=torch.bool, device=dev))
        self.register_buffer("aabb", torch.tensor([lo3, hi3], dtype=torch.float64, device=dev))

    def extra_repr(self) -> str:
        return f"lo={self.lo}, hi={self.hi}, resolution={self.resolution}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "aabb"
        if key in state_dict and not torch.equal(state_dict[key].detach().cpu().to(torch.float64),
                                                 self.aabb.detach().cpu()):
            error_msgs.append(f"{key}: the state is for the box {state_dict[key].tolist()}, this grid covers "
                              f"{self.aabb.tolist()}")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # -----------------------------------------------------------------------------------------------------

    @property
    def n_cells(self) -> int:
        return math.prod(self.resolution)

    @property
    def cell_diagonal(self) -> float:
        return math.sqrt(sum(c * c for c in self.cell_size))

    @property
    def occupancy_fraction(self) -> float:
        """The fraction of cells marked occupied."""
        return float(self.occupied.float().mean())

    def mark_all_occupied(self) -> None:
        """Mark every cell occupied (no skipping; ``values`` are kept, and the next :meth:`update` recomputes
        the flags from them)."""
        self.occupied.fill_(True)

    def cell_centers(self) -> torch.Tensor:
        """(Rx, Ry, Rz, 3) float32 cell centres."""
        return self._points(torch.arange(self.n_cells, device=self.values.device),
                            torch.full((self.n_cells, 3), 0.5, device=self.values.device)).reshape(
                                *self.resolution, 3)

    def _points(self, indices: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """World points ``lo + (ijk + u) * cell_size`` of flat cell ``indices`` (M,) at fractions ``u`` (M, 3)."""
        ry, rz = self.resolution[1], self.resolution[2]
        ijk = torch.stack([indices // (ry * rz), (indices // rz) % ry, indices % rz], dim=1).to(torch.float32)
        lo = torch.tensor(self.lo, dtype=torch.float32, device=indices.device)
        size = torch.tensor(self.cell_size, dtype=torch.float32, device=indices.device)
        return lo + (ijk + u) * size

    # -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, iteration: int, value_fn: ValueFn, *, occupancy_threshold: float = 0.01, decay: float = 0.95,
               update_every: int = 16, warmup_steps: int = 256, generator: torch.Generator | None = None,
               chunk: int = 65536) -> bool:
        """nerfacc's ``update_every_n_steps``: when ``iteration % update_every == 0``, re-evaluate cells and
        re-threshold; returns whether it did.

        value_fn: ``points (M, 3) float32 -> (M,)`` (or ``(M, C)``, first column) non-negative values, called
            without autograd on at most ``chunk`` points at a time; see the module docstring and
            :func:`density_value_fn`, :func:`occupancy_value_fn`, :func:`sdf_value_fn`.
        Cells: all while ``iteration < warmup_steps``; afterwards ``N // 4`` drawn uniformly (with
        replacement) plus the occupied cells (``N // 4`` of them, drawn with replacement, when there are
        more). Each is evaluated at one uniform point inside it; ``values = max(values * decay, new)`` on
        those cells (a cell drawn twice: the larger new value), the others unchanged; then
        ``occupied = values > min(mean of the positive values, occupancy_threshold)``.
        generator: the random cell draws and jitter (drawn on its device); None uses torch's global RNG.
        """
        iteration = _integer("iteration", iteration, 0)
        update_every = _integer("update_every", update_every, 1)
        warmup_steps = _integer("warmup_steps", warmup_steps, 0)
        chunk = _integer("chunk", chunk, 1)
        if isinstance(occupancy_threshold, bool) or not isinstance(occupancy_threshold, numbers.Real) or not (
                math.isfinite(occupancy_threshold) and occupancy_threshold >= 0):
            raise ValueError(f"occupancy_threshold: expected a finite number >= 0, got {occupancy_threshold!r}")
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0 <= decay <= 1:
            raise ValueError(f"decay: expected a number in [0, 1], got {decay!r}")
        if not callable(value_fn):
            raise TypeError(f"value_fn: expected a callable points (M, 3) -> (M,), got {type(value_fn).__name__}")
        _check_generator(generator)
        if iteration % update_every != 0:
            return False
        dev = self.values.device
        gen_dev = generator.device if generator is not None else dev
        n = self.n_cells
        if iteration < warmup_steps:
            indices = torch.arange(n, device=dev)
        else:
            quarter = n // 4
            uniform = torch.randint(n, (quarter,), generator=generator, device=gen_dev).to(dev)
            occupied = torch.nonzero(self.occupied.reshape(-1))[:, 0]
            if quarter < occupied.shape[0]:
                pick = torch.randint(occupied.shape[0], (quarter,), generator=generator, device=gen_dev).to(dev)
                occupied = occupied[pick]
            indices = torch.cat([uniform, occupied])
        m = indices.shape[0]
        if m == 0:
            return True
        u = torch.rand(m, 3, generator=generator, dtype=torch.float32, device=gen_dev).to(dev)
        new = torch.empty(m, dtype=torch.float32, device=dev)
        for start in range(0, m, chunk):
            stop = min(start + chunk, m)
            v = _first_column(value_fn(self._points(indices[start:stop], u[start:stop])), stop - start, "value_fn")
            new[start:stop] = v.detach().to(device=dev, dtype=torch.float32)
        bad_value, negative = torch.stack([~torch.isfinite(new).all(), (new < 0).any()]).tolist()
        if bad_value:
            raise ValueError("value_fn: returned NaN or Inf values")
        if negative:
            raise ValueError(f"value_fn: expected non-negative values, got {float(new.min())}")
        flat = self.values.reshape(-1)
        best = torch.zeros(n, dtype=torch.float32, device=dev).scatter_reduce(0, indices, new, reduce="amax",
                                                                                include_self=False)
        chosen = torch.zeros(n, dtype=torch.bool, device=dev).index_fill_(0, indices, True)
        flat.copy_(torch.where(chosen, torch.maximum(flat * decay, best), flat))
        positive = flat > 0
        mean = flat.sum() / positive.sum().clamp_min(1)       # mean of the positive values (0 if none)
        threshold = torch.clamp(mean, max=float(occupancy_threshold))
        self.occupied.copy_((flat > threshold).reshape(self.resolution))
        return True

    # -----------------------------------------------------------------------------------------------------

    def _box(self, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
        """(6, 3): lo, hi, resolution / (hi - lo), cell size, block size, max(|lo|, |hi|)."""
        scale = [n / (h - l) for l, h, n in zip(self.lo, self.hi, self.resolution, strict=True)]
        block = [c * self._block for c in self.cell_size]
        magnitude = [max(abs(l), abs(h)) for l, h in zip(self.lo, self.hi, strict=True)]
        return torch.tensor([self.lo, self.hi, scale, self.cell_size, block, magnitude], dtype=dtype, device=dev)

    @property
    def _block(self) -> int:
        """Cells per axis of the blocks that marching skips at once when all their cells are empty."""
        return max(1, min(_BLOCK, max(self.resolution) // 4))

    def _masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The occupied flags as uint8 (Rx, Ry, Rz) and per block (any cell occupied), cached until
        ``occupied`` changes (replaced, or modified in place: torch counts its in-place versions)."""
        occ = self.occupied
        key = (occ, occ._version)
        cached = getattr(self, "_mask_cache", None)
        if cached is None or cached[0] is not key[0] or cached[1] != key[1]:
            fine = to_kernel("occupied", occ, torch.uint8)
            b = self._block
            pads = [(-n) % b for n in self.resolution]
            padded = torch.nn.functional.pad(fine, (0, pads[2], 0, pads[1], 0, pads[0]))
            cx, cy, cz = (n // b for n in padded.shape)
            coarse = padded.reshape(cx, b, cy, b, cz, b).amax(dim=(1, 3, 5)).contiguous()
            self._mask_cache = cached = (occ, occ._version, fine, coarse)
        return cached[2], cached[3]

    @torch.no_grad()
    def dilate(self, cells: int = 1) -> None:
        """Mark also every cell within ``cells`` (Chebyshev distance) of an occupied one: a margin for a
        grid whose cells were each judged from one point."""
        cells = _integer("cells", cells, 0)
        if cells == 0:
            return
        k = 2 * cells + 1
        grown = torch.nn.functional.max_pool3d(self.occupied[None, None].float(), k, stride=1, padding=cells)
        self.occupied.copy_(grown[0, 0] > 0)

    @torch.no_grad()
    def fit(self, value_fn: ValueFn, occupancy_threshold: float = 0.01, *, seed: int = 0,
            dilation: int = 1) -> "OccupancyGrid":
        """Rebuild the grid from a trained field in one pass, for rendering a field without its training
        grid (e.g. loaded from a checkpoint): every cell evaluated at one point drawn from a generator seeded
        with ``seed`` (the same grid every time), thresholded as :meth:`update`, then :meth:`dilate`-d by
        ``dilation`` cells. Returns the grid."""
        self.values.zero_()
        generator = torch.Generator(device=self.values.device).manual_seed(int(seed))
        self.update(0, value_fn, occupancy_threshold=occupancy_threshold, decay=0.0, warmup_steps=1,
                    generator=generator)
        self.dilate(dilation)
        return self

    @torch.no_grad()
    def march(self, origins: torch.Tensor, dirs: torch.Tensor, t_near: torch.Tensor, t_far: torch.Tensor,
              step_size: float, *, generator: torch.Generator | None = None,
              max_samples_per_ray: int | None = None) -> RaySamples:
        """Samples every ``step_size`` along each ray, kept only in occupied cells (nerfacc's ``sampling``).

        origins, dirs: (R, 3); t_near, t_far: (R,); float32 (or float64 on cpu/cuda), on the kernel device.
        Directions need not be unit length (t and step are in units of the ray parameter) but must be
        non-zero.
        Ray r's candidate samples are ``t_near + (k + jitter_r) * step_size`` for ``k = 0, 1, ...`` while
        ``< t_far``, with ``jitter_r`` one uniform number per ray from ``generator`` (0 without one); a sample
        is kept when its point ``origins + t * dirs`` lies in an occupied cell (points outside the box are
        empty). ``max_samples_per_ray`` keeps each ray's first samples only. Rays that miss the box or have
        ``t_far <= t_near`` get none.

        Returns :class:`RaySamples`, t increasing per ray, ``delta = step_size`` for every sample (nerfacc's
        convention: each sample stands for one step; not the gap to the next sample, which may be an empty
        stretch the samples skip).
        """
        _check_rays(origins, dirs, t_near, t_far)
        step = _positive_number("step_size", step_size)
        _check_generator(generator)
        max_n = _INT32_MAX if max_samples_per_ray is None else _integer("max_samples_per_ray",
                                                                        max_samples_per_ray, 0)
        o, d = to_kernel("origins", origins), to_kernel("dirs", dirs)
        near, far = to_kernel("t_near", t_near), to_kernel("t_far", t_far)
        dev, dtype = o.device, o.dtype
        n_rays = o.shape[0]
        if generator is not None:
            jitter = torch.rand(n_rays, generator=generator, dtype=dtype, device=generator.device).to(dev)
        else:
            jitter = torch.zeros(n_rays, dtype=dtype, device=dev)
        empty = RaySamples(t=torch.zeros(0, dtype=dtype, device=dev), delta=torch.zeros(0, dtype=dtype, device=dev),
                           ray_index=torch.zeros(0, dtype=torch.int32, device=dev),
                           offsets=torch.zeros(n_rays + 1, dtype=torch.int32, device=dev))
        if n_rays == 0 or max_n == 0:
            return empty
        params = torch.tensor([step, _EXIT_ULPS * torch.finfo(dtype).eps], dtype=dtype, device=dev)
        box = self._box(dtype, dev)
        occ, coarse = self._masks()
        block = self._block
        counts = torch.empty(n_rays, dtype=torch.int32, device=dev)
        _march_count_kernel(o, d, near, far, jitter, params, box, occ, coarse, block, max_n, counts)
        total = int(counts.sum(dtype=torch.int64))
        if total > _INT32_MAX:
            raise ValueError(f"step_size: {total} samples in all exceed the int32 offsets' range; use a larger step "
                             "or max_samples_per_ray")
        if total == 0:
            return empty
        offsets = offsets_from_counts(counts)
        t = torch.empty(total, dtype=dtype, device=dev)
        ray_index = torch.empty(total, dtype=torch.int32, device=dev)
        _march_fill_kernel(o, d, near, far, jitter, params, box, occ, coarse, block, max_n, offsets, t, ray_index)
        return RaySamples(t=t, delta=torch.full_like(t, step), ray_index=ray_index, offsets=offsets)

    @torch.no_grad()
    def ray_intervals(self, origins: torch.Tensor, dirs: torch.Tensor, t_near: torch.Tensor,
                      t_far: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each ray's stretch of ``[t_near, t_far]`` from its entry into its first occupied cell to its exit
        from its last one, for surface searches (sphere tracing, UNISURF's) to run on.

        Same ray arguments as :meth:`march`. Returns ``(t_start, t_end, hit_any)``: (R,) in the rays' dtype and
        (R,) bool. The ends are padded by a few ulps of the coordinates (so every sample :meth:`march` keeps
        lies in ``[t_start, t_end]`` despite rounding) and clipped to ``[t_near, t_far]``. Rays through no
        occupied cell (or missing the box, or with ``t_far <= t_near``): ``hit_any`` False and
        ``t_start = t_end = t_far``. A ray through an edge or corner of an occupied cell counts as touching it.
        """
        _check_rays(origins, dirs, t_near, t_far)
        o, d = to_kernel("origins", origins), to_kernel("dirs", dirs)
        near, far = to_kernel("t_near", t_near), to_kernel("t_far", t_far)
        dev, dtype = o.device, o.dtype
        n_rays = o.shape[0]
        if n_rays == 0:
            z = torch.zeros(0, dtype=dtype, device=dev)
            return z, z.clone(), torch.zeros(0, dtype=torch.bool, device=dev)
        magnitude = sum(max(abs(lo), abs(hi)) for lo, hi in zip(self.lo, self.hi, strict=True))
        params = torch.tensor([_PAD_ULPS * torch.finfo(dtype).eps, magnitude], dtype=dtype, device=dev)
        t_start = torch.empty(n_rays, dtype=dtype, device=dev)
        t_end = torch.empty(n_rays, dtype=dtype, device=dev)
        hit = torch.empty(n_rays, dtype=torch.int32, device=dev)
        _intervals_kernel(o, d, near, far, params, self._box(dtype, dev), self._masks()[0], t_start, t_end, hit)
        return t_start, t_end, hit.bool()
