"""The one bridge between Taichi kernels and torch autograd.

A renderer defines a :class:`KernelOp`: a ``forward`` that launches its Taichi kernels on torch tensors and
a ``backward`` (hand-written kernels, so gradients are right on every backend) that maps output gradients
to input gradients. :func:`apply` wraps it in a ``torch.autograd.Function``:

* inputs are checked (shape, dtype, device) with messages naming the argument;
* kernels only ever see detached, contiguous tensors (Taichi attaches ``.grad`` to a leaf tensor that
  requires grad, and ndarray arguments must be contiguous), so callers' tensors are never modified;
* missing output gradients arrive as zeros, so backward kernels need no special cases;
* forward and backward hold :func:`taichi_dr.core.runtime.kernel_lock`: on CUDA torch runs ``backward`` on its
  own autograd thread, and users may train in several threads, while Taichi's launches are not thread-safe;
* every tensor a forward keeps for its backward goes through ``ctx.save_for_backward``, so modifying an input
  in place between forward and backward fails with torch's version-counter error instead of silently giving
  gradients of the wrong values;
* a backward with ``create_graph=True`` (double backward, e.g. an eikonal loss) raises a RuntimeError naming
  the op unless the op declares ``supports_double_backward``: hand-written backward kernels return plain
  tensors with no graph behind them, so a second derivative through them would silently be zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from taichi_dr.core import runtime

FLOAT_DTYPES = (torch.float32, torch.float64)


def check_tensor(name: str, x, shape: Sequence[int | str | None] | None = None, *,
                 dtype: torch.dtype | Sequence[torch.dtype] | None = None, finite: bool = False):
    """Validate a tensor argument; raise ValueError/TypeError naming ``name`` and what was expected.

    shape: entries are an int (exact), None (any) or a str (any; a name for the message). Returns ``x``.
    finite: also scan for NaN/Inf. That reads a result back from the device (a host synchronisation on a
    GPU); to check several tensors, pass ``finite=False`` here and call :func:`check_finite` once.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if x.dtype not in allowed:
            raise TypeError(f"{name}: expected dtype {' or '.join(str(d) for d in allowed)}, got {x.dtype}")
    if shape is not None:
        ok = x.dim() == len(shape) and all(s is None or isinstance(s, str) or s == n
                                           for s, n in zip(shape, x.shape, strict=False))
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name}: expected shape {want}, got {tuple(x.shape)}")
    if finite and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or Inf values")
    return x


def check_finite(tensors: dict[str, torch.Tensor | None]) -> None:
    """Raise ValueError naming the first of ``tensors`` (name -> tensor or None) with a NaN or Inf.

    One scan per tensor and a single read on the host for all of them: on a GPU every separate ``bool()``
    would wait for the device, so an API call checks its inputs here, once, at its boundary.
    """
    floats = {name: x for name, x in tensors.items() if x is not None and x.is_floating_point()}
    if not floats:
        return
    device = next(iter(floats.values())).device
    flags = torch.stack([torch.isfinite(x.detach()).all().to(device) for x in floats.values()]).tolist()
    for name, ok in zip(floats, flags, strict=True):
        if not ok:
            raise ValueError(f"{name}: contains NaN or Inf values")


def to_kernel(name: str, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A detached, contiguous view of ``x`` on the kernel device (copies only when it must)."""
    dev = runtime.device()
    if x.device.type != dev.type:
        raise ValueError(f"{name}: tensor is on {x.device} but taichi_dr runs on {runtime.arch()!r}, "
                         f"which reads tensors on {dev}; move it with .to('{dev}')")
    x = x.detach()
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    return x.contiguous()


class KernelOp:
    """A differentiable operation made of Taichi kernels.

    Subclasses implement:

    * ``forward(*inputs) -> (outputs, saved)``: ``inputs`` are detached, contiguous tensors (or None / plain
      Python values passed through); ``outputs`` a tuple of tensors; ``saved`` anything backward needs.
    * ``backward(saved, *grad_outputs) -> grads``: one entry per input (a tensor or None); every
      ``grad_output`` is a contiguous tensor (zeros where the output was unused).

    ``differentiable_outputs`` (indices) marks which outputs carry gradients; the rest are returned as
    non-differentiable (e.g. integer index maps).

    ``saved`` may nest tensors in tuples, lists and dicts; the bridge keeps those tensors with
    ``ctx.save_for_backward`` and hands the same structure back to ``backward``.

    ``supports_double_backward``: set it only on an op whose ``backward`` is itself differentiable (built from
    torch ops or other bridge ops); its ``saved`` inputs then come back as the callers' tensors (with their
    history) and its grad_outputs undetached. Otherwise ``create_graph=True`` through the op raises.
    """

    differentiable_outputs: tuple[int, ...] | None = None  # None: all floating outputs
    supports_double_backward: bool = False

    def forward(self, *inputs):  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, saved, *grad_outputs):  # pragma: no cover - interface
        raise NotImplementedError


def _pack(saved, tensors: list[torch.Tensor]):
    """``saved`` with every tensor (inside tuples, lists, dicts) moved to ``tensors`` and replaced by its
    index there; :func:`_unpack` reverses it."""
    if isinstance(saved, torch.Tensor):
        tensors.append(saved)
        return _Slot(len(tensors) - 1)
    if isinstance(saved, (tuple, list)):
        return type(saved)(_pack(x, tensors) for x in saved)
    if isinstance(saved, dict):
        return {k: _pack(v, tensors) for k, v in saved.items()}
    return saved


def _unpack(packed, tensors: tuple[torch.Tensor, ...]):
    if isinstance(packed, _Slot):
        return tensors[packed.index]
    if isinstance(packed, (tuple, list)):
        return type(packed)(_unpack(x, tensors) for x in packed)
    if isinstance(packed, dict):
        return {k: _unpack(v, tensors) for k, v in packed.items()}
    return packed


class _Slot:
    """Where a saved tensor sat in an op's ``saved`` structure."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _TaichiFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op: KernelOp, *inputs):
        runtime.ensure_init()
        # Detached views share the callers' version counters, so saving them below still catches in-place
        # changes of the callers' tensors.
        plain = [x.detach().contiguous() if isinstance(x, torch.Tensor) else x for x in inputs]
        with runtime.kernel_lock():
            outputs, saved = op.forward(*plain)
        outputs = tuple(outputs)
        ctx.op = op
        tensors: list[torch.Tensor] = []
        ctx.saved_structure = _pack(saved, tensors)
        if op.supports_double_backward:
            # Its backward builds a graph: give it the callers' inputs (with their history), not detached views.
            originals = {id(p): x for p, x in zip(plain, inputs, strict=True) if isinstance(x, torch.Tensor)}
            tensors = [originals.get(id(t), t) for t in tensors]
        ctx.save_for_backward(*tensors)
        ctx.n_inputs = len(inputs)
        diff = op.differentiable_outputs
        non_diff = [o for i, o in enumerate(outputs)
                    if not o.is_floating_point() or (diff is not None and i not in diff)]
        if non_diff:
            ctx.mark_non_differentiable(*non_diff)
        ctx.output_meta = [(o.shape, o.dtype, o.device) for o in outputs]
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        name = type(ctx.op).__name__
        if torch.is_grad_enabled() and not ctx.op.supports_double_backward:
            # Autograd runs a backward in grad mode only for create_graph=True.
            raise RuntimeError(f"{name}: double backward (create_graph=True) is not supported through this "
                               "Taichi op; its hand-written backward gives gradients with no graph behind "
                               "them. Keep the op out of the graph that create_graph differentiates (e.g. "
                               "compute the eikonal term separately), or call backward without create_graph")
        saved = _unpack(ctx.saved_structure, ctx.saved_tensors)  # raises if a saved tensor was modified in place
        grads = []
        for g, (shape, dtype, device) in zip(grad_outputs, ctx.output_meta, strict=True):
            if g is None:
                g = torch.zeros(shape, dtype=dtype if dtype.is_floating_point else torch.float32, device=device)
            grads.append(g.contiguous() if ctx.op.supports_double_backward else g.detach().contiguous())
        with runtime.kernel_lock():   # possibly on torch's autograd thread, concurrently with the main one
            input_grads = ctx.op.backward(saved, *grads)
        input_grads = tuple(input_grads)
        if len(input_grads) != ctx.n_inputs:
            raise RuntimeError(f"{name}.backward returned {len(input_grads)} gradients "
                               f"for {ctx.n_inputs} inputs")
        return (None, *input_grads)


def apply(op: KernelOp, *inputs) -> tuple[torch.Tensor, ...]:
    """Run ``op`` under torch autograd; returns its outputs as a tuple."""
    return _TaichiFunction.apply(op, *inputs)
