"""The training engine every method shares: one loop, one checkpoint format, one interrupt and NaN policy.

A method (mesh fitting, IDR, pose refinement, later UNISURF/NeRF) subclasses :class:`Method` and supplies its
parameters, ``sample``, ``step`` and ``render``; :class:`Trainer` owns the rest:

- optimiser and learning-rate schedule from :class:`OptimizerConfig` (the schedule is a pure function of the
  iteration, so a resumed run needs no scheduler state and may be given more iterations);
- gradient clipping and the non-finite policy (a step whose loss or gradients are NaN/Inf is skipped and
  counted; ``max_nonfinite`` in a row stop the run with :class:`NonFiniteError`, keeping the last good
  checkpoint);
- checkpoints (``out_dir/checkpoint.pt``, atomic, versioned, ``weights_only`` loadable) holding the method,
  optimiser, RNG states, counters and configuration; ``resume=True`` continues bitwise identically on CPU;
- SIGINT/SIGTERM: finish the step, save, raise :class:`Interrupted`; a second SIGINT stops at once;
- callbacks that see the live state (the method included, so they can render), the progress display,
  ``metrics.jsonl`` and ``config.json``.

The engine knows no renderer, window or command line: apps turn :class:`Interrupted` into a message and an
exit code, viewers and validation renders are callbacks.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from taichi_dr.pipelines.callbacks import Callback, MetricsLog, ProgressCallback
from taichi_dr.pipelines.checkpoint import (
    CHECKPOINT_NAME,
    FORMAT,
    FORMAT_VERSION,
    load_checkpoint,
    save_checkpoint,
    write_atomic,
)
from taichi_dr.pipelines.config import TrainConfig, lr_factor

if TYPE_CHECKING:  # the engine itself needs neither at run time (it knows no renderer)
    from taichi_dr.core.camera import Cameras
    from taichi_dr.core.mesh import Mesh

__all__ = ["Interrupted", "Method", "NonFiniteError", "TrainResult", "TrainState", "Trainer", "TrainingViews",
           "clip_gradients", "gradient_norm"]

CONFIG_NAME = "config.json"


# ----------------------------------------------------------------------------------------------- errors


class NonFiniteError(FloatingPointError):
    """Training stopped after ``TrainConfig.max_nonfinite`` consecutive steps with a NaN/Inf loss or gradient.

    iterations: the (1-based, as in metrics.jsonl) iterations of the run of skipped steps.
    checkpoint: the last good checkpoint (left untouched), or None when none was written.
    """

    def __init__(self, message: str, iterations: tuple[int, int] = (0, 0), checkpoint: Path | None = None):
        super().__init__(message)
        self.iterations = iterations
        self.checkpoint = checkpoint


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped :meth:`Trainer.fit` after a whole step.

    A KeyboardInterrupt subclass so callers that only know Ctrl-C still stop. signum: the signal;
    iteration: completed iterations (the checkpoint's); checkpoint: where the state was saved (None without
    an ``out_dir``). Apps exit with ``128 + signum`` (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, iteration: int, checkpoint: Path | None):
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        where = f"saved {checkpoint}" if checkpoint is not None else "nothing saved (no out_dir)"
        super().__init__(f"{name} at iteration {iteration}; {where}")
        self.signum = signum
        self.iteration = iteration
        self.checkpoint = checkpoint


# ----------------------------------------------------------------------------------------------- method


@dataclass
class TrainingViews:
    """The views a method trains on (for viewers: frustums, snapping to view i, target | render | error).

    cameras: N cameras, in the frame the method renders in (``method.render(views.cameras[i])`` draws view i).
    rgb: (N, H, W, 3) float in [0, 1], target colours, or None.
    alpha: (N, H, W) float in [0, 1], target silhouettes / masks, or None.
    names: one label per view (file names), or None.

    The tensors are the method's own (views, not copies; on whatever device the method keeps them): read
    them, do not write to them. ``(H, W)`` is ``cameras.image_size``; the shapes are checked at construction.
    """

    cameras: Cameras
    rgb: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    names: list[str] | None = None

    def __post_init__(self):
        n, (h, w) = len(self.cameras), tuple(self.cameras.image_size)
        for name, value, shape in (("rgb", self.rgb, (n, h, w, 3)), ("alpha", self.alpha, (n, h, w))):
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"TrainingViews.{name}: expected shape {shape} for {n} cameras of "
                                 f"{h}x{w} pixels, got {tuple(value.shape)}")
        if self.names is not None:
            self.names = [str(name) for name in self.names]
            if len(self.names) != n:
                raise ValueError(f"TrainingViews.names: expected {n} labels (one per camera), got "
                                 f"{len(self.names)}")

    def __len__(self) -> int:
        return len(self.cameras)


class Method:
    """A training method: its parameters, one step, and renders of its live state.

    Subclasses set ``name`` (stored in checkpoints: a checkpoint of another method is refused) and ``version``
    (the layout of ``state_dict()``; bump it when that changes, so old checkpoints are refused in one line
    instead of failing deep inside ``load_state_dict``).

    manual_optimization: the method updates its parameters itself inside ``step`` (e.g. a hand-written
        second-order or projected update); the engine then builds no optimiser, does not call backward and
        only counts non-finite steps from the loss and ``stats["finite"]``. The method must skip a
        non-finite update itself, since the engine cannot undo it.
    """

    name: ClassVar[str] = "method"
    version: ClassVar[int] = 1
    manual_optimization: ClassVar[bool] = False

    def param_groups(self) -> list[dict]:
        """torch optimiser param groups: ``{"params": [Tensor, ...], "name": str, "lr": float (optional,
        absolute; default OptimizerConfig.lr)}``. Empty for manual_optimization methods."""
        return []

    def sample(self, iteration: int, generator: torch.Generator) -> Any:
        """The batch for ``iteration`` (0-based). Draw ALL randomness from ``generator`` (the engine's CPU
        generator) or torch's global RNG: both are checkpointed, so a resumed run draws the same batches.
        NumPy's and Python's ``random`` are not (their states are not plain tensors)."""
        return None

    def step(self, batch: Any, iteration: int) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """Forward pass: ``(loss, stats)``; loss a 0-dim tensor (or None), stats ``{name: float | 0-dim
        Tensor}``. The engine calls ``loss.backward()`` when the loss requires grad, checks finiteness, clips
        and steps the optimiser. A method whose gradients are not a loss's gradient may fill ``.grad`` itself
        and return the loss detached. Tensor stats are read with the loss in one device->host copy per step.
        With manual_optimization, ``stats["finite"]`` (bool or 0-dim bool tensor) says whether the method
        applied its update."""
        raise NotImplementedError(f"{type(self).__name__}.step")

    def render(self, cameras: Any, **options) -> dict[str, torch.Tensor]:
        """Images of the live state seen by ``cameras`` (B views), without autograd, float:

        ``"rgb" (B, H, W, 3)`` in [0, 1]; ``"alpha" (B, H, W)`` in [0, 1] (opacity, silhouette or surface
        hit); ``"depth" (B, H, W)`` (distance along the ray or camera z, each method says which; 0 where
        nothing); ``"normals" (B, H, W, 3)`` (world unit normals, 0 where nothing). Methods may add more
        keys. Used by validation callbacks and the viewer."""
        raise NotImplementedError(f"{type(self).__name__}.render")

    def training_views(self) -> TrainingViews | None:
        """The cameras and targets the method trains on (views of its own tensors, no copies), or None
        (the default) when it has none to show."""
        return None

    def current_mesh(self) -> Mesh | None:
        """The surface now as a triangle mesh in the frame the method renders in, when the method has one
        cheaply (an explicit mesh); None (the default) otherwise."""
        return None

    def snapshot_mesh(self, resolution: int = 128) -> Mesh | None:
        """The surface now as a triangle mesh to save: field methods run marching cubes at ``resolution``
        (in the dataset's world coordinates, as ``tdr reconstruct``'s mesh.ply); None when there is no
        surface (never an error for that). Default: :meth:`current_mesh`."""
        return self.current_mesh()

    def state_dict(self) -> dict:
        """Everything needed to continue: tensors and plain Python types only (``weights_only`` loadable)."""
        raise NotImplementedError(f"{type(self).__name__}.state_dict")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError(f"{type(self).__name__}.load_state_dict")

    def config(self) -> dict:
        """The method's resolved settings, JSON-able (written to config.json and into checkpoints)."""
        return {}

    def check_resume(self, saved_config: dict) -> None:
        """Raise ValueError (one line naming the setting and both values) when a checkpoint made with
        ``saved_config`` (this method's ``config()`` at save time) cannot be continued. Default: accept."""

    def on_iteration_start(self, iteration: int) -> None:
        """Called before ``sample`` for 0-based ``iteration`` (for schedules such as a blur sigma)."""

    def on_train_end(self) -> None:
        """Called once when ``fit`` ends, however it ends."""


# ----------------------------------------------------------------------------------------------- gradients


def gradient_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params`` (those with a ``.grad``): a 0-dim float64 tensor, left on
    the device (no host sync); 0 when no parameter has a gradient. NaN/Inf iff some gradient is."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    # float64 so the sum of squares of many large float32 gradients does not overflow to Inf by itself.
    norms = [torch.linalg.vector_norm(g.detach(), dtype=torch.float64).to(grads[0].device) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_gradients(params: Sequence[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Scale the gradients of ``params`` in place so their global L2 norm is at most ``max_norm`` (None: leave
    them). Returns the norm before clipping (0-dim float64 tensor on the gradients' device).

    The scale is computed on the device (no host sync): min(1, max_norm / (norm + 1e-6)), the same rule as
    ``torch.nn.utils.clip_grad_norm_``. With a non-finite norm the step is skipped anyway.
    """
    params = list(params)
    total = gradient_norm(params)
    if max_norm is not None:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.detach().mul_(scale.to(p.grad.dtype))
    return total


# ----------------------------------------------------------------------------------------------- state


@dataclass
class TrainState:
    """The live state callbacks receive (mutated in place as training runs).

    iteration: completed iterations; total: TrainConfig.iterations; method: the live method (render it);
    stats: the last step's values as floats (loss, the method's stats, grad_norm (before clipping), lr (of
    the first param group), skipped (1 when the step was skipped as non-finite)); row: the metrics
    row being built for this iteration (callbacks such as Validation add to it; MetricsLog writes it);
    elapsed_s: training seconds including earlier (resumed) runs; rate_it_s: iterations per second in this
    fit(); start_iteration: where this fit() began; checkpoint: the last checkpoint written or loaded.
    """

    iteration: int
    total: int
    method: Method
    config: TrainConfig
    trainer: Trainer
    out_dir: Path | None = None
    stats: dict[str, float] = field(default_factory=dict)
    row: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    rate_it_s: float = 0.0
    skipped_total: int = 0
    consecutive_nonfinite: int = 0
    start_iteration: int = 0
    checkpoint: Path | None = None


@dataclass
class TrainResult:
    """What fit() returns. history: one metrics row per iteration (resumed runs include the earlier rows)."""

    iteration: int
    history: list[dict]
    skipped: int
    interrupted: bool
    checkpoint: Path | None
    seconds: float


def _row_value(value: float) -> float | None:
    # metrics.jsonl is strict JSON (allow_nan=False): a NaN/Inf loss of a skipped step is written as null.
    return value if math.isfinite(value) else None


def _rng_state(generator: torch.Generator) -> dict:
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(), "cuda": cuda}


def _set_rng_state(rng: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["generator"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ----------------------------------------------------------------------------------------------- trainer


# Parameters from which the engine's Adam is torch's fused one (see fused_adam_option).
FUSED_ADAM_MIN_PARAMETERS = 2 ** 20


def fused_adam_option(params) -> dict:
    """``{"fused": True}`` for a large parameter set (at least ``FUSED_ADAM_MIN_PARAMETERS`` values: a hash
    grid's tables) where torch has a fused Adam for every parameter (float tensors on the CPU or CUDA,
    torch >= 2.4), else ``{}`` (torch's default multi-tensor Adam).

    Why: the default makes a dozen passes over the state; on a hash grid's 16 M table entries it took 172 ms a
    step on 2 CPU cores, the fused one 6 ms. Why not always: the fused kernel rounds differently in float32,
    and small runs (mesh fits, poses, frequency-encoded fields) keep the numerics their runs had; there the
    optimiser costs nothing. (A 150-step airplane fit moved from covering its wing tips fully to 70% with the
    fused kernel: such fits amplify the last bit.)"""
    params = list(params)
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 4) or sum(p.numel() for p in params) < FUSED_ADAM_MIN_PARAMETERS:
        return {}
    if all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        return {"fused": True}
    return {}


class Trainer:
    """Runs a :class:`Method` for ``config.iterations`` iterations.

    out_dir: folder for checkpoint.pt, metrics.jsonl, config.json (None: nothing written, no checkpoints).
    callbacks: extra :class:`Callback` s; a ProgressCallback is added from ``config.progress`` unless one is
        given, and a MetricsLog when ``out_dir`` is set (unless one is given).
    resume: continue from ``out_dir/checkpoint.pt`` (CheckpointError if missing or not this method's;
        ValueError from ``method.check_resume`` if its settings are incompatible).

    The method must be built by the caller after ``torch.manual_seed(config.seed)``; the engine seeds its own
    CPU generator (``trainer.generator``) from ``config.seed``.
    """

    def __init__(self, method: Method, config: TrainConfig, out_dir=None, callbacks: Sequence[Callback] = (),
                 resume: bool = False):
        if not isinstance(method, Method):
            raise TypeError(f"method: expected a taichi_dr.pipelines.Method, got {type(method).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        self.method = method
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if resume and self.out_dir is None:
            raise ValueError("resume: needs out_dir (the folder holding checkpoint.pt)")
        self.generator = torch.Generator().manual_seed(config.seed)
        self.optimizer, self._params, self._base_lrs = self._build_optimizer()
        self.callbacks = self._with_builtin_callbacks(list(callbacks))
        self.history: list[dict] = []
        self.state = TrainState(iteration=0, total=config.iterations, method=method, config=config, trainer=self,
                                out_dir=self.out_dir)
        self._pending_rng: dict | None = None
        self._interrupt: int | None = None
        self._checkpoint_iteration: int | None = None
        if resume:
            self._restore(self.out_dir / CHECKPOINT_NAME)

    # -- construction

    def _build_optimizer(self):
        if self.method.manual_optimization:
            return None, [], []
        opt = self.config.optimizer
        groups = []
        for i, group in enumerate(self.method.param_groups()):
            if "params" not in group:
                raise ValueError(f"{type(self.method).__name__}.param_groups()[{i}]: no 'params' entry")
            group = dict(group, params=list(group["params"]))
            group.setdefault("name", f"group{i}")
            group.setdefault("lr", opt.lr)
            groups.append(group)
        params = [p for g in groups for p in g["params"]]
        if not params:
            raise ValueError(f"{type(self.method).__name__}.param_groups(): no parameters to optimise "
                             f"(set manual_optimization = True for a method that updates itself)")
        # The configured lr of each group is its base; the schedule multiplies it every step. Kept here, not
        # read back from the optimiser, so a resumed run follows this config even if the checkpoint's differs.
        base_lrs = [float(g["lr"]) for g in groups]
        if opt.name in ("adam", "adamw"):
            cls = torch.optim.Adam if opt.name == "adam" else torch.optim.AdamW
            optimizer = cls(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay,
                            **fused_adam_option(params))
        else:
            optimizer = torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
        return optimizer, params, base_lrs

    def _with_builtin_callbacks(self, callbacks: list[Callback]) -> list[Callback]:
        # Order matters only for reading: user callbacks (Validation adds metrics to the row) run before the
        # progress line; MetricsLog serialises a row only after the step's callbacks have all run.
        if self.config.progress != "none" and not any(isinstance(c, ProgressCallback) for c in callbacks):
            callbacks.append(ProgressCallback(self.config.progress, every_s=self.config.progress_every_s))
        if self.out_dir is not None and not any(isinstance(c, MetricsLog) for c in callbacks):
            callbacks.append(MetricsLog())
        return callbacks

    def resolved_config(self) -> dict:
        """The configuration as written to config.json and stored in checkpoints."""
        from taichi_dr import __version__

        return {"method": self.method.name, "method_version": self.method.version,
                "train": self.config.to_dict(), "method_config": self.method.config(), "taichi_dr": __version__}

    # -- checkpoints

    def _restore(self, path: Path) -> None:
        payload = load_checkpoint(path, self.method)
        saved = payload.get("config") or {}
        self.method.check_resume(saved.get("method_config") or {})
        iteration = int(payload["iteration"])
        if iteration > self.config.iterations:
            raise ValueError(f"resume: {path} is at iteration {iteration}, past TrainConfig.iterations="
                             f"{self.config.iterations}")
        saved_optimizer = (saved.get("train") or {}).get("optimizer", {}).get("name")
        if self.optimizer is not None and saved_optimizer not in (None, self.config.optimizer.name):
            raise ValueError(f"resume: {path} was trained with optimizer {saved_optimizer!r}, now "
                             f"{self.config.optimizer.name!r}")
        self.method.load_state_dict(payload["method_state"])
        if self.optimizer is not None:
            if payload.get("optimizer") is None:
                raise ValueError(f"resume: {path} holds no optimiser state (saved by a manual_optimization run)")
            try:
                self.optimizer.load_state_dict(payload["optimizer"])
            except (ValueError, KeyError) as error:
                raise ValueError(f"resume: {path}: optimiser state does not fit this method's parameters "
                                 f"({str(error).splitlines()[0]})") from None
            # load_state_dict also restores each group's hyperparameters; this run's configuration decides
            # them (as it decides the lr), the checkpoint only the moments.
            opt = self.config.optimizer
            if opt.name in ("adam", "adamw"):
                settings = dict(betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
            else:
                settings = dict(momentum=opt.momentum, weight_decay=opt.weight_decay)
            for group in self.optimizer.param_groups:
                group.update(settings)
        # Applied at the start of fit(), so nothing the caller does in between shifts the random streams.
        self._pending_rng = payload["rng"]
        self.history = [row for row in payload.get("history", []) if row.get("iteration", 0) <= iteration]
        nonfinite = payload.get("nonfinite", {})
        self.state.iteration = self.state.start_iteration = iteration
        self.state.skipped_total = int(nonfinite.get("total", 0))
        self.state.consecutive_nonfinite = int(nonfinite.get("consecutive", 0))
        self.state.elapsed_s = float(payload.get("elapsed_s", 0.0))
        self.state.checkpoint = path
        self._checkpoint_iteration = iteration

    def save_checkpoint(self) -> Path:
        """Write ``out_dir/checkpoint.pt`` (atomic) with the current state; returns its path."""
        if self.out_dir is None:
            raise ValueError("save_checkpoint: the Trainer has no out_dir")
        payload = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "method": self.method.name, "method_version": self.method.version,
            "iteration": self.state.iteration,
            "method_state": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "rng": _rng_state(self.generator),
            "config": self.resolved_config(),
            "nonfinite": {"consecutive": self.state.consecutive_nonfinite, "total": self.state.skipped_total},
            "elapsed_s": self.state.elapsed_s,
            "history": self.history,
        }
        path = save_checkpoint(self.out_dir / CHECKPOINT_NAME, payload)
        self.state.checkpoint = path
        self._checkpoint_iteration = self.state.iteration
        for callback in self.callbacks:
            callback.on_checkpoint(self.state, path)
        return path

    def _write_config(self) -> None:
        text = json.dumps(self.resolved_config(), indent=1, allow_nan=False) + "\n"
        write_atomic(self.out_dir / CONFIG_NAME, lambda f: f.write(text.encode()))

    # -- signals

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Stop the running :meth:`fit` as Ctrl-C does: after the current step it saves a checkpoint (with an
        out_dir) and raises :class:`Interrupted` ``(signum, iteration, checkpoint)``.

        For callbacks (a viewer's Stop button) and other code on the main thread. A stop already pending (a
        signal, an earlier request) is kept. fit() starts with no stop pending, so a request made while no
        fit() runs changes nothing.
        """
        if not isinstance(signum, int) or isinstance(signum, bool) or signum <= 0:
            raise ValueError(f"request_stop: signum must be a signal number (an int > 0), got {signum!r}")
        if self._interrupt is None:
            self._interrupt = int(signum)

    @property
    def stop_requested(self) -> bool:
        """A stop is pending (Ctrl-C, SIGTERM or :meth:`request_stop`): code that holds the thread between steps
        (a paused viewer) returns, so the engine can save and stop."""
        return self._interrupt is not None

    def _on_signal(self, signum, frame) -> None:
        if self._interrupt is not None and signum == signal.SIGINT:
            # Second Ctrl-C: the user does not want to wait for the step and the save; the last checkpoint stays.
            raise KeyboardInterrupt
        # A repeated SIGTERM changes nothing: the save is under way, and a supervisor escalates with SIGKILL.
        if self._interrupt is None:
            self._interrupt = signum

    def _install_signal_handlers(self) -> dict:
        # Python delivers signals to the main thread only, and signal.signal() raises elsewhere: a fit() in a
        # worker thread (a viewer's) keeps the process's handlers, and the owner of the main thread decides.
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            if handler == signal.SIG_IGN or handler is None:
                # SIG_IGN: e.g. a background job started with SIGINT ignored, respect the parent's choice.
                # None: a handler installed from C, which Python could not put back afterwards.
                continue
            previous[signum] = handler
            signal.signal(signum, self._on_signal)
        return previous

    # -- the loop

    def _read_step(self, loss, stats: dict, grad_norm) -> tuple[float | None, dict[str, float], bool]:
        """Read the loss, the tensor stats and the gradient norm in ONE device->host copy.

        Returns (loss or None, stats as floats without "finite", finite: loss, gradients and the method's own
        "finite" flag all finite/true)."""
        entries = dict(stats)
        if loss is not None:
            entries = {"loss": loss, **entries}
        if grad_norm is not None:
            entries["grad_norm"] = grad_norm
        names, tensors = [], []
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"{type(self.method).__name__}.step: stats[{key!r}] must be a scalar, got "
                                     f"shape {tuple(value.shape)}")
                names.append(key)
                tensors.append(value)
        read = {}
        if tensors:
            device = tensors[0].device
            stacked = torch.stack([t.detach().reshape(()).to(device=device, dtype=torch.float64) for t in tensors])
            read = dict(zip(names, stacked.cpu().tolist(), strict=True))
        # In the order the method gave them (loss first, grad_norm last), as the metrics row shows them.
        values = {key: read[key] if key in read else float(value) for key, value in entries.items()}
        finite = values.pop("finite", 1.0) != 0.0
        loss_value = values.pop("loss", None) if loss is not None else values.get("loss")
        checked = [loss_value] if loss_value is not None else []
        if grad_norm is not None:
            checked.append(values["grad_norm"])
        finite = finite and all(math.isfinite(v) for v in checked)
        return loss_value, values, finite

    def _one_step(self) -> dict:
        """Run iteration ``state.iteration`` (0-based); returns its metrics row."""
        state, method, i = self.state, self.method, self.state.iteration
        method.on_iteration_start(i)
        factor = lr_factor(self.config.optimizer, i, self.config.iterations)
        if self.optimizer is not None:
            for group, base_lr in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
                group["lr"] = base_lr * factor
            self.optimizer.zero_grad(set_to_none=True)
        batch = method.sample(i, self.generator)
        loss, stats = method.step(batch, i)
        if loss is not None and not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss), dtype=torch.float64)
        grad_norm = None
        if self.optimizer is not None:
            if loss is not None and loss.requires_grad:
                loss.backward()
            grad_norm = clip_gradients(self._params, self.config.optimizer.grad_clip)
        loss_value, values, finite = self._read_step(loss, dict(stats or {}), grad_norm)
        if finite:
            if self.optimizer is not None:
                self.optimizer.step()
            state.consecutive_nonfinite = 0
        else:
            state.skipped_total += 1
            state.consecutive_nonfinite += 1
        state.iteration = i + 1
        if loss_value is not None:
            values = {"loss": loss_value, **values}
        if self.optimizer is not None:
            values["lr"] = self._base_lrs[0] * factor
        values["skipped"] = 0 if finite else 1
        state.stats = values
        row = {"iteration": state.iteration, **{k: _row_value(v) for k, v in values.items()}}
        state.row = row
        return row

    def _nonfinite_error(self) -> NonFiniteError:
        state = self.state
        first, last = state.iteration - state.consecutive_nonfinite + 1, state.iteration
        kept = (f"last good checkpoint {state.checkpoint}, iteration {self._checkpoint_iteration}, left untouched"
                if state.checkpoint is not None
                else "no checkpoint written")
        return NonFiniteError(f"{state.consecutive_nonfinite} consecutive steps with a non-finite loss or gradient "
                              f"(iterations {first}-{last}), all skipped; stopped ({kept})",
                              iterations=(first, last), checkpoint=state.checkpoint)

    def _end(self, reason: str) -> None:
        for callback in self.callbacks:
            callback.on_end(self.state, reason)
        self.method.on_train_end()

    def fit(self) -> TrainResult:
        """Train from ``state.iteration`` to ``config.iterations``; returns a :class:`TrainResult`.

        Raises Interrupted (after saving, when out_dir is set) on SIGINT/SIGTERM, KeyboardInterrupt on a
        second SIGINT (nothing saved), NonFiniteError after ``max_nonfinite`` consecutive skipped steps.
        Signal handlers are installed only for the duration of fit() and restored afterwards.
        """
        state, config = self.state, self.config
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng, self.generator)
            self._pending_rng = None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._write_config()
        self._interrupt = None
        previous_handlers = self._install_signal_handlers()
        state.start_iteration = state.iteration
        run_start = time.perf_counter()
        elapsed_before = state.elapsed_s
        reason = "error"
        try:
            for callback in self.callbacks:
                callback.on_start(state)
            while state.iteration < config.iterations:
                row = self._one_step()
                now = time.perf_counter() - run_start
                state.elapsed_s = elapsed_before + now
                state.rate_it_s = (state.iteration - state.start_iteration) / max(now, 1e-9)
                row["time_s"] = round(state.elapsed_s, 6)
                self.history.append(row)
                for callback in self.callbacks:
                    callback.on_step(state)
                if state.consecutive_nonfinite >= config.max_nonfinite:
                    reason = "nonfinite"
                    raise self._nonfinite_error()
                if self._interrupt is not None:
                    reason = "interrupted"
                    path = self.save_checkpoint() if self.out_dir is not None else None
                    raise Interrupted(self._interrupt, state.iteration, path)
                # No periodic checkpoint inside a run of skipped steps: if it ends in NonFiniteError, the
                # checkpoint on disk is the last one written before the trouble began.
                if (self.out_dir is not None and config.checkpoint_every and state.consecutive_nonfinite == 0
                        and state.iteration % config.checkpoint_every == 0):
                    self.save_checkpoint()
            if self.out_dir is not None and self._checkpoint_iteration != state.iteration:
                self.save_checkpoint()
            reason = "done"
        except KeyboardInterrupt:
            if reason == "error":
                reason = "interrupted"
            raise
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            self._end(reason)
        return TrainResult(iteration=state.iteration, history=self.history, skipped=state.skipped_total,
                           interrupted=False, checkpoint=state.checkpoint, seconds=time.perf_counter() - run_start)
