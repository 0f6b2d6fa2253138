"""Multiresolution hash-grid encoding (instant-ngp, Müller et al. 2022) as Taichi kernels with a hand-written
backward, exposed as a torch module (:class:`HashGridEncoding`).

Geometry. Points ``x`` in the cube ``[-bound, bound]^3`` map to ``u = (x + bound) / (2 bound)`` in ``[0, 1]^3``;
points outside the cube are first clamped to it (a point outside gets the features of the nearest point of
the cube, and no gradient with respect to the clamped coordinates, as ``torch.clamp``). Level ``l`` of ``L``
is a grid of resolution ``N_l = floor(base * b^l)``, ``b = exp((ln finest - ln base) / (L - 1))``
(instant-ngp's per-level scale; the last level is exactly ``finest``), with vertices ``0..N_l`` per axis; a
point's features at level ``l`` are the trilinear interpolation of the ``F`` features of the 8 vertices of
its cell ``floor(u N_l)`` (``u = 1`` lies in the last cell).

Indexing. Each level has a table of ``T = 2^log2_table_size`` entries (``table[l]``, shape ``(T, F)``). A level
whose ``(N_l + 1)^3`` vertices fit in ``T`` is indexed densely, one vertex per entry (``i + j (N_l+1) + k
(N_l+1)^2``; entries past ``(N_l + 1)^3`` stay unused), as instant-ngp does; finer levels use instant-ngp's
spatial hash ``(i * 1) xor (j * 2654435761) xor (k * 805459861) mod T``, in uint32 arithmetic (the products
wrap modulo 2^32; ``T`` is a power of two, so ``mod T`` keeps the low bits). The kernels compute it in u32,
which is exact on every backend.

Kernels. Forward: one thread per (level, point), level-major so that consecutive threads share a level's
table, ``F`` features each (the raw ``x`` is written into the first three columns when ``include_input``).
Backward: the table's gradient is a scatter-add (points share vertices). On GPUs one thread per point adds
with atomics; on the CPU (with at least as many levels as threads), where a float atomic add is a
compare-and-swap loop (3x slower here), one task per level scatters all points into that level's rows with
plain adds (a task owns its level's rows). The gradient with respect to ``x``, computed only when ``x``
requires grad, sums over the levels the derivatives of the trilinear weights (times ``N_l / (2 bound)``; on
the CPU the level tasks write per-level partials that a per-point loop adds), zero for clamped coordinates.
It is first order only: normals and ``torch.autograd.grad(sdf, x)`` work, while a ``create_graph=True``
backward through the encoding raises the bridge's error (networks take trained spatial gradients by finite
differences, see :class:`taichi_dr.nets.fields.GeometryNetwork`).

The kernels compile per dtype (float32 or float64; float32 only on Vulkan) and run on cpu, cuda and vulkan;
launches are split into chunks of points so that no linear index into an array exceeds int32 (the table
itself is limited to 2^31 entries). Non-finite inputs: ``±inf`` is clamped like any other point; NaN is not
checked for (that would cost a pass over ``x`` and, on a GPU, a host synchronisation per call): what a NaN
coordinate gives depends on the backend's min/max (on the CPU, the features of ``-bound``), but its lookups
stay inside the table.
"""

import math
import numbers

import taichi as ti
import torch
from torch import nn

from taichi_dr.core import bridge, runtime
from taichi_dr.core.bridge import KernelOp, check_tensor

__all__ = ["HashGridEncoding", "level_resolutions"]

# instant-ngp's hash primes (tiny-cuda-nn's coherent prime hash; the first axis uses 1).
PRIME_Y = 2654435761
PRIME_Z = 805459861
# Taichi indexes arrays with int32: a launch's largest linear index (points x columns) must stay below this.
_INDEX_LIMIT = 2 ** 31 - 1
# 2^26 entries per level (as EncodingSettings): larger tables would not fit a GPU next to anything else.
_MAX_LOG2_TABLE = 26


def level_resolutions(n_levels: int, base_resolution: int, finest_resolution: int) -> list[int]:
    """The grid resolution ``N_l = floor(base * b^l)`` of each level, ``b = exp((ln finest - ln base) / (L-1))``.

    A relative 1e-9 guards the floor against rounding (``base * b^(L-1)`` may come out as ``finest - 1e-13``).
    """
    if n_levels == 1:
        return [base_resolution]
    log_b = (math.log(finest_resolution) - math.log(base_resolution)) / (n_levels - 1)
    return [min(int(math.floor(base_resolution * math.exp(l * log_b) * (1 + 1e-9))), finest_resolution)
            for l in range(n_levels)]


# ---------------------------------------------------------------------------------------------------------
# Kernels. `levels[l] = (N_l, dense_l)` (int32), `consts = (bound, 1 / (2 bound))` in the points' dtype (a
# scalar argument would be f32 in an f64 kernel). The @ti.func bodies take their arrays as templates, so the
# test suite runs Taichi's own autodiff on the same code over fields.


@ti.func
def _cell(xd, consts: ti.template(), res):
    """One axis: the clamped coordinate's cell ``i0`` in ``0..res-1`` and fraction ``t`` in it."""
    xc = ti.min(ti.max(xd, -consts[0]), consts[0])
    pos = (xc + consts[0]) * consts[1] * res
    # Clamp the integer too: the float clamp cannot be trusted with NaN, and u = 1 lies in the last cell.
    i0 = ti.min(ti.max(ti.cast(ti.floor(pos), ti.i32), 0), res - 1)
    return i0, pos - i0


@ti.func
def _vertex_index(i, j, k, res, dense, mask):
    """Table row of vertex (i, j, k): dense ``i + j (N+1) + k (N+1)^2`` or the hash; u32 wraps mod 2^32."""
    ui = ti.cast(i, ti.u32)
    uj = ti.cast(j, ti.u32)
    uk = ti.cast(k, ti.u32)
    h = ti.u32(0)
    if dense != 0:
        s = ti.cast(res + 1, ti.u32)
        h = ui + uj * s + uk * (s * s)
    else:
        h = ui ^ (uj * ti.u32(PRIME_Y)) ^ (uk * ti.u32(PRIME_Z))
    return ti.cast(h & mask, ti.i32)


@ti.func
def _corners(x: ti.template(), levels: ti.template(), consts: ti.template(), mask, i, l):
    """Point i at level l: cell origin, fractions, and the 8 vertices' rows (corner c = (c&1, c>>1&1, c>>2))."""
    res = levels[l, 0]
    dense = levels[l, 1]
    cx, tx = _cell(x[i, 0], consts, res)
    cy, ty = _cell(x[i, 1], consts, res)
    cz, tz = _cell(x[i, 2], consts, res)
    rows = ti.Vector([_vertex_index(cx + (c & 1), cy + ((c >> 1) & 1), cz + (c >> 2), res, dense, mask)
                      for c in ti.static(range(8))])
    return tx, ty, tz, rows


@ti.func
def _encode(x: ti.template(), table: ti.template(), out: ti.template(), levels: ti.template(),
            consts: ti.template(), i, l, col0, F: ti.template()):
    """Write point i's F features of level l to ``out[i, col0 + l F : col0 + (l + 1) F]``."""
    mask = ti.cast(table.shape[1] - 1, ti.u32)
    tx, ty, tz, rows = _corners(x, levels, consts, mask, i, l)
    wx = ti.Vector([1.0 - tx, tx])
    wy = ti.Vector([1.0 - ty, ty])
    wz = ti.Vector([1.0 - tz, tz])
    w = ti.Vector([wx[c & 1] * wy[(c >> 1) & 1] * wz[c >> 2] for c in ti.static(range(8))])
    for f in ti.static(range(F)):
        acc = w[0] * table[l, rows[0], f]
        for c in ti.static(range(1, 8)):
            acc += w[c] * table[l, rows[c], f]
        out[i, col0 + l * F + f] = acc


@ti.kernel
def _forward_kernel(x: ti.types.ndarray(), table: ti.types.ndarray(), levels: ti.types.ndarray(),
                    consts: ti.types.ndarray(), out: ti.types.ndarray(), col0: ti.i32, F: ti.template(),
                    serial: ti.template()):
    """x (M, 3), table (L, T, F), levels (L, 2) i32, consts (2,) -> out (M, col0 + L F).

    Level-major: consecutive threads read the same level's table, a working set that fits a CPU's caches
    (2.5x faster than point-major at instant-ngp's sizes). ``serial``: one thread, for a few points (a sphere
    tracer's last steps), where waking the thread pool costs more than the lookups."""
    if ti.static(serial):
        ti.loop_config(serialize=True)
    else:
        ti.loop_config(block_dim=256)
    for l, i in ti.ndrange(levels.shape[0], x.shape[0]):
        if l == 0:
            for d in ti.static(range(3)):
                if d < col0:
                    out[i, d] = x[i, d]
        _encode(x, table, out, levels, consts, i, l, col0, F)


@ti.func
def _backward_level(x: ti.template(), table: ti.template(), levels: ti.template(), consts: ti.template(),
                    grad_out: ti.template(), grad_table: ti.template(), mask, i, l, col0, F: ti.template(),
                    want_table: ti.template(), want_x: ti.template(), atomic: ti.template()):
    """Point i, level l: add ``grad_out`` times each corner's weight to the table's gradient (want_table), and
    return d loss / d u (u in [0, 1]^3: the derivatives of the trilinear weights times N_l; zero unless
    want_x)."""
    tx, ty, tz, rows = _corners(x, levels, consts, mask, i, l)
    wx = ti.Vector([1.0 - tx, tx])
    wy = ti.Vector([1.0 - ty, ty])
    wz = ti.Vector([1.0 - tz, tz])
    base = col0 + l * F
    g = ti.Vector([tx * 0.0, tx * 0.0, tx * 0.0])
    for c in ti.static(range(8)):
        jx, jy, jz = ti.static(c & 1, (c >> 1) & 1, c >> 2)
        if ti.static(want_table):
            wc = wx[jx] * wy[jy] * wz[jz]
            for f in ti.static(range(F)):
                if ti.static(atomic):
                    ti.atomic_add(grad_table[l, rows[c], f], wc * grad_out[i, base + f])
                else:
                    # a plain read-modify-write: the calling task owns level l's rows
                    grad_table[l, rows[c], f] = grad_table[l, rows[c], f] + wc * grad_out[i, base + f]
        if ti.static(want_x):
            # s_c = <grad_out, row of corner c>; d w_c / d t_x = (+1 if jx else -1) wy wz, etc.
            s = grad_out[i, base] * table[l, rows[c], 0]
            for f in ti.static(range(1, F)):
                s += grad_out[i, base + f] * table[l, rows[c], f]
            sign = ti.Vector([1.0 if ti.static(jx) else -1.0, 1.0 if ti.static(jy) else -1.0,
                              1.0 if ti.static(jz) else -1.0])
            g += sign * ti.Vector([wy[jy] * wz[jz], wx[jx] * wz[jz], wx[jx] * wy[jy]]) * s
    return g * levels[l, 0]


@ti.func
def _write_grad_x(x: ti.template(), consts: ti.template(), grad_out: ti.template(), grad_x: ti.template(), i,
                  g, col0):
    """grad_x[i] from d loss / d u (``g``) and, with include_input, the gradient of the raw-x columns."""
    for d in ti.static(range(3)):
        # torch.clamp's rule: the gradient passes on the closed cube, zero outside it
        inside = x[i, d] >= -consts[0] and x[i, d] <= consts[0]
        gd = g[d] * consts[1] if inside else g[d] * 0.0
        if d < col0:
            gd += grad_out[i, d]
        grad_x[i, d] = gd


@ti.kernel
def _backward_atomic_kernel(x: ti.types.ndarray(), table: ti.types.ndarray(), levels: ti.types.ndarray(),
                            consts: ti.types.ndarray(), grad_out: ti.types.ndarray(),
                            grad_table: ti.types.ndarray(), grad_x: ti.types.ndarray(), col0: ti.i32,
                            F: ti.template(), want_table: ti.template(), want_x: ti.template()):
    """GPUs: one thread per point, over the levels; grad_table (L, T, F) += by atomic adds, grad_x (M, 3) =."""
    mask = ti.cast(table.shape[1] - 1, ti.u32)
    for i in range(x.shape[0]):
        g = ti.Vector([x[i, 0] * 0.0, x[i, 0] * 0.0, x[i, 0] * 0.0])
        for l in range(levels.shape[0]):
            g += _backward_level(x, table, levels, consts, grad_out, grad_table, mask, i, l, col0, F, want_table,
                                 want_x, True)
        if ti.static(want_x):
            _write_grad_x(x, consts, grad_out, grad_x, i, g, col0)


@ti.kernel
def _backward_per_level_kernel(x: ti.types.ndarray(), table: ti.types.ndarray(), levels: ti.types.ndarray(),
                               consts: ti.types.ndarray(), grad_out: ti.types.ndarray(),
                               grad_table: ti.types.ndarray(), partial: ti.types.ndarray(),
                               grad_x: ti.types.ndarray(), col0: ti.i32, clear: ti.i32, F: ti.template(),
                               want_table: ti.template(), want_x: ti.template()):
    """The CPU: one task per level runs over all points, adding to that level's rows of grad_table with plain
    adds (no other task touches them; x86 has no float atomic add, and compare-and-swap loops made the
    scatter 3x slower) and writing d loss / d u to ``partial`` (L, M, 3); then one thread per point sums ``partial``
    over the levels into grad_x (M, 3). ``clear``: each task first zeroes its level's rows (grad_table comes
    uninitialised; in parallel, and the rows are then in cache: 10-15% faster than torch.zeros_like first)."""
    mask = ti.cast(table.shape[1] - 1, ti.u32)
    ti.loop_config(block_dim=1)
    for l in range(levels.shape[0]):
        if ti.static(want_table):
            if clear != 0:
                for r in range(grad_table.shape[1]):
                    for f in ti.static(range(F)):
                        grad_table[l, r, f] = 0.0
        for i in range(x.shape[0]):
            g = _backward_level(x, table, levels, consts, grad_out, grad_table, mask, i, l, col0, F, want_table,
                                want_x, False)
            if ti.static(want_x):
                for d in ti.static(range(3)):
                    partial[l, i, d] = g[d]
    if ti.static(want_x):
        for i in range(x.shape[0]):
            g = ti.Vector([partial[0, i, 0], partial[0, i, 1], partial[0, i, 2]])
            for l in range(1, levels.shape[0]):
                g += ti.Vector([partial[l, i, 0], partial[l, i, 1], partial[l, i, 2]])
            _write_grad_x(x, consts, grad_out, grad_x, i, g, col0)


def _cpu_threads() -> int:
    return ti.lang.impl.current_cfg().cpu_max_num_threads


def _chunks(m: int, width: int):
    """Row ranges of at most ``_INDEX_LIMIT // width`` rows, so a launch's linear indices fit int32."""
    step = max(1, _INDEX_LIMIT // max(width, 1))
    for start in range(0, m, step):
        yield start, min(start + step, m)


class HashGridOp(KernelOp):
    """inputs (x (M, 3), table (L, T, F), levels (L, 2) i32, consts (2,)) -> (features (M, col0 + L F),)."""

    def __init__(self, col0: int, want_x: bool, want_table: bool, per_level: bool):
        self.col0 = col0
        self.per_level = per_level
        self.want_x = want_x
        self.want_table = want_table

    def forward(self, x, table, levels, consts):
        n_levels, _, f = table.shape
        width = self.col0 + n_levels * f
        out = torch.empty((x.shape[0], width), dtype=x.dtype, device=x.device)
        for a, b in _chunks(x.shape[0], max(width, n_levels)):
            _forward_kernel(x[a:b], table, levels, consts, out[a:b], self.col0, f,
                            runtime.serial_launch(b - a))
        return (out,), (x, table, levels, consts)

    def backward(self, saved, grad_out):
        x, table, levels, consts = saved
        n_levels, _, f = table.shape
        want_x, want_table = self.want_x, self.want_table
        # the per-level kernel zeroes the table's gradient itself (in parallel)
        empty = torch.empty_like if self.per_level and x.shape[0] > 0 else torch.zeros_like
        grad_table = empty(table) if want_table else table.new_zeros((1, 1, 1))
        grad_x = torch.empty_like(x) if want_x else x.new_zeros((1, 3))
        if want_x or want_table:
            # widest index: a row of grad_out, or of partial (L, M, 3)
            for a, b in _chunks(x.shape[0], max(grad_out.shape[1], 3 * n_levels)):
                gx = grad_x[a:b] if want_x else grad_x
                if self.per_level:
                    partial = x.new_empty((n_levels, b - a, 3) if want_x else (1, 1, 3))
                    _backward_per_level_kernel(x[a:b], table, levels, consts, grad_out[a:b], grad_table, partial,
                                               gx, self.col0, int(a == 0), f, want_table, want_x)
                else:
                    _backward_atomic_kernel(x[a:b], table, levels, consts, grad_out[a:b], grad_table, gx,
                                            self.col0, f, want_table, want_x)
        return (grad_x if want_x else None, grad_table if want_table else None, None, None)


class HashGridEncoding(nn.Module):
    """instant-ngp's multiresolution hash encoding of 3-D points (see the module docstring).

    ``forward(x (M, 3)) -> (M, out_dim)``: ``[x, features]`` with ``include_input``, else the features;
    features are level-major (``L`` groups of ``F``). ``x`` has the table's dtype (float32 or float64, as
    ``nn.Linear`` wants its weight's) and lives on the kernel device.

    Arguments (instant-ngp's defaults): n_levels ``L``; features_per_level ``F``; log2_table_size (``T =
    2^log2_table_size`` entries per level, at most 2^26); base_resolution and finest_resolution (the coarsest
    and finest grid resolutions over the cube); bound (the cube ``[-bound, bound]^3`` the grids cover; points
    outside are clamped to it); include_input (output starts with the raw ``x``: IDR's geometric
    initialisation needs it); init_scale (table entries start uniform in ``[-init_scale, init_scale]``, drawn
    from ``generator``, or torch's global RNG so that ``torch.manual_seed`` fixes them).

    Attributes: ``table`` (nn.Parameter ``(L, T, F)``), ``resolutions`` (list of ``N_l``), ``dense_levels``
    (per level: indexed densely), ``in_dim`` (3), ``out_dim``, ``includes_input``,
    ``supports_double_backward`` (False: the backward is hand-written kernels), ``finite_difference_step`` (the
    finest cell's width, the step networks on it take central differences with).
    """

    supports_double_backward = False

    def __init__(self, n_levels: int = 16, features_per_level: int = 2, log2_table_size: int = 19,
                 base_resolution: int = 16, finest_resolution: int = 2048, bound: float = 1.0,
                 include_input: bool = True, init_scale: float = 1e-4, generator: torch.Generator | None = None):
        super().__init__()
        for name, value in (("n_levels", n_levels), ("features_per_level", features_per_level),
                            ("log2_table_size", log2_table_size), ("base_resolution", base_resolution),
                            ("finest_resolution", finest_resolution)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HashGridEncoding: {name} must be an int >= 1, got {value!r}")
        if log2_table_size > _MAX_LOG2_TABLE:
            raise ValueError(f"HashGridEncoding: log2_table_size must be at most {_MAX_LOG2_TABLE}, "
                             f"got {log2_table_size}")
        if finest_resolution < base_resolution:
            raise ValueError(f"HashGridEncoding: finest_resolution must be >= base_resolution "
                             f"({base_resolution}), got {finest_resolution}")
        table_size = 2 ** log2_table_size
        if n_levels * table_size * features_per_level > _INDEX_LIMIT:
            raise ValueError(f"HashGridEncoding: the table (n_levels x 2^log2_table_size x features_per_level = "
                             f"{n_levels * table_size * features_per_level} entries) must stay below 2^31")
        if isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"HashGridEncoding: bound must be a finite number > 0, got {bound!r}")
        if (isinstance(init_scale, bool) or not isinstance(init_scale, numbers.Real)
                or not (math.isfinite(init_scale) and init_scale >= 0)):
            raise ValueError(f"HashGridEncoding: init_scale must be a finite number >= 0, got {init_scale!r}")
        if not isinstance(include_input, bool):
            raise TypeError(f"HashGridEncoding: include_input must be a bool, got {type(include_input).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"HashGridEncoding: generator must be a torch.Generator or None, "
                            f"got {type(generator).__name__}")
        self.n_levels = n_levels
        self.features_per_level = features_per_level
        self.log2_table_size = log2_table_size
        self.table_size = table_size
        self.base_resolution = base_resolution
        self.finest_resolution = finest_resolution
        self.bound = float(bound)
        self.includes_input = include_input
        self.in_dim = 3
        self.out_dim = 3 * include_input + n_levels * features_per_level
        self.resolutions = level_resolutions(n_levels, base_resolution, finest_resolution)
        self.dense_levels = [(n + 1) ** 3 <= table_size for n in self.resolutions]
        self.finite_difference_step = 2.0 * self.bound / self.resolutions[-1]
        table = torch.empty(n_levels, table_size, features_per_level)
        table.uniform_(-init_scale, init_scale, generator=generator)
        self.table = nn.Parameter(table)
        levels = torch.tensor([[n, int(d)] for n, d in zip(self.resolutions, self.dense_levels, strict=True)],
                              dtype=torch.int32)
        self.register_buffer("levels", levels, persistent=False)
        self._consts: dict = {}     # (dtype, device) -> (bound, 1 / (2 bound)) in that dtype

    def extra_repr(self) -> str:
        return (f"n_levels={self.n_levels}, features_per_level={self.features_per_level}, "
                f"log2_table_size={self.log2_table_size}, resolutions={self.base_resolution}..{self.finest_resolution}"
                f", dense_levels={sum(self.dense_levels)}, bound={self.bound}, include_input={self.includes_input}")

    def _constants(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (dtype, device)
        consts = self._consts.get(key)
        if consts is None:
            # computed in float64, then rounded once to the points' dtype
            consts = torch.tensor([self.bound, 0.5 / self.bound], dtype=torch.float64).to(dtype=dtype, device=device)
            self._consts[key] = consts
        return consts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (M, 3) -> (M, out_dim)``; see the class docstring."""
        table = self.table
        if table.dtype not in bridge.FLOAT_DTYPES:
            raise TypeError(f"HashGridEncoding: the table must be float32 or float64, got {table.dtype}")
        check_tensor("x", x, ("M", 3), dtype=table.dtype)
        if x.device != table.device:
            raise ValueError(f"x: expected a tensor on the table's device {table.device}, got {x.device}")
        if x.dtype == torch.float64 and runtime.ensure_init() == "vulkan":
            raise TypeError("x: float64 is not supported on the vulkan backend (SPIR-V devices such as Mesa's "
                            "lavapipe have no 64-bit floats); use float32, or the cpu/cuda backend for float64")
        device = runtime.device()
        if x.device.type != device.type:
            raise ValueError(f"x: tensor is on {x.device} but taichi_dr runs on {runtime.arch()!r}, which reads "
                             f"tensors on {device}; move the encoding and x with .to('{device}')")
        grad = torch.is_grad_enabled()
        # The CPU scatters the table's gradient level by level (see _backward_kernel) when there are enough
        # levels to keep its threads busy.
        per_level = runtime.arch() == "cpu" and self.n_levels >= _cpu_threads()
        op = HashGridOp(3 if self.includes_input else 0, grad and x.requires_grad, grad and table.requires_grad,
                        per_level)
        levels = self.levels if self.levels.device == x.device else self.levels.to(x.device)
        (out,) = bridge.apply(op, x, table, levels, self._constants(x.dtype, x.device))
        return out
