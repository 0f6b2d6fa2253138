"""Helpers shared by the ``tdr`` commands: error reporting, the output-folder policy, images and GIFs,
progress bars. What every command shares (--config, --json, --quiet, --verbose, the run report) is in
:mod:`apps.command`."""

from __future__ import annotations

import functools
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import typer

# Exit statuses: 1 = bad input or failed run, 130 = interrupted (128 + SIGINT), as shells report Ctrl-C.
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A problem with the user's input, reported as one ``Error: ...`` line without a traceback."""


def debug_enabled() -> bool:
    """``TDR_DEBUG=1`` turns input errors back into tracebacks (for finding real bugs)."""
    return os.environ.get("TDR_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def error(message: str) -> None:
    """Print ``Error: message`` as a single line on stderr (no wrapping, no markup)."""
    one_line = " ".join(str(message).split())
    sys.stderr.write(f"Error: {one_line}\n")
    sys.stderr.flush()


def handle_errors(fn: Callable) -> Callable:
    """Wrap a command: bad input (CLIError, ValueError, TypeError, FileNotFoundError and other OSErrors)
    becomes ``Error: ...`` and exit status 1; KeyboardInterrupt exits 130. With ``TDR_DEBUG=1`` the
    exception propagates so its traceback shows."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        watch = _InterruptWatch()
        try:
            with watch.armed():
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            if debug_enabled():
                watch.stop()
                raise
            _report_interrupted(watch)
        except Exception as e:
            if watch.interrupted and not debug_enabled():
                # The Ctrl-C reached code that turned it into another exception (a C extension interrupted
                # while it initialises raises ImportError): the user interrupted, and that is what to say.
                _report_interrupted(watch)
            if debug_enabled() or not isinstance(e, (CLIError, ValueError, TypeError, OSError)):
                raise
            msg = str(e) or type(e).__name__
            if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
                msg = f"{e.filename}: {msg}"
            error(msg)
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper


def _report_interrupted(watch: _InterruptWatch):
    """End an interrupted command: ``Interrupted.`` on stderr, exit status 130."""
    watch.stop()
    sys.stderr.write("Interrupted.\n")
    sys.stderr.flush()
    if watch.is_program:
        # CPython marks a KeyboardInterrupt that passed through PyRun_String (Taichi's C++ runs Python that way)
        # as unhandled for good, and then ends the process by SIGINT (status -2) even after we caught it;
        # nothing is left to clean up, so end here with the status we promise.
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)
    raise typer.Exit(EXIT_INTERRUPTED) from None


class _InterruptWatch:
    """Ctrl-C during a command of the ``tdr`` program: raise KeyboardInterrupt, and make sure it ends the command.

    Outside a command the program's startup handler (see :mod:`apps`) ends the process at once, so a Ctrl-C
    during imports or after the command never prints a traceback. Inside, Ctrl-C raises KeyboardInterrupt so
    the command may save its state before :func:`handle_errors` reports it. Libraries we call can swallow that
    exception (Taichi wraps each kernel's definition in a bare ``except``, trimesh catches BaseException), and
    the command would carry on as if no Ctrl-C had come. So the interrupt stays pending until handle_errors
    sees it: every RESEND_S seconds SIGINT is sent again, to whichever handler is in place (the training
    engine's, while it runs, stops after the step and saves); a command that still ends normally is reported
    as interrupted. Imported as a library (tests, notebooks) nothing is installed.
    """

    RESEND_S = 0.5

    def __init__(self):
        import apps

        self.is_program = apps.STARTUP_HANDLER_INSTALLED
        self.pending = False
        self.interrupted = False     # a Ctrl-C came during the command (stays set; `pending` is cleared)
        self._stopped = False
        self._timer = None

    @contextmanager
    def armed(self):
        import signal
        import threading

        import apps

        active = (self.is_program and threading.current_thread() is threading.main_thread()
                  and signal.getsignal(signal.SIGINT) is apps.exit_interrupted)
        if not active:
            yield
            return
        signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, apps.exit_interrupted)
            pending = self.pending
            self.stop()
        if pending:  # every KeyboardInterrupt was swallowed and the command ran to its end
            raise KeyboardInterrupt

    def stop(self) -> None:
        self._stopped = True
        self.pending = False
        if self._timer is not None:
            self._timer.cancel()

    def _on_sigint(self, signum, frame):
        import threading

        if not self._stopped:
            self.interrupted = True
            self.pending = True
            if self._timer is None:
                self._timer = threading.Timer(self.RESEND_S, self._resend)
                self._timer.daemon = True
                self._timer.start()
        raise KeyboardInterrupt

    def _resend(self):
        import signal

        # The handler in place gets it: ours raises again and re-arms this; another (the engine's, a trimesh
        # guard that calls ours) gets one more Ctrl-C and takes it from there.
        self._timer = None  # so that our handler, when it runs, arms a new one
        if self.pending and not self._stopped:
            signal.raise_signal(signal.SIGINT)


@contextmanager
def option_errors(option: str):
    """Prefix errors raised while reading an option's input with the option's name (``--targets: ...``)."""
    try:
        yield
    except CLIError:
        raise
    except (ValueError, TypeError, OSError) as e:
        if debug_enabled():
            raise
        msg = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
            msg = f"{e.filename}: {msg}"
        raise CLIError(f"{option}: {msg}") from e


def settings_error(err: Exception, owner: str, options: dict[str, str]) -> CLIError:
    """A library settings error, worded for the command line.

    ``"FitSettings: views_per_step must be >= 0"`` or ``"PoseSettings.rotation: ..."`` (``owner`` is the class
    name) becomes ``"--views-per-step must be >= 0"``: the field name that starts the message is replaced by
    the option that sets it (``options``: field -> option). Only that leading name changes, so quoted values
    and choices in the rest of the message stay as the library spells them.
    """
    msg = str(err)
    for sep in (": ", "."):
        if msg.startswith(owner + sep):
            msg = msg[len(owner) + len(sep):]
            break
    field = re.match(r"[A-Za-z_]\w*", msg)
    if field and field.group(0) in options:
        msg = options[field.group(0)] + msg[field.end():]
    return CLIError(msg)


def command_options(command: Callable) -> dict[str, str]:
    """``{parameter name: its long option}`` of a typer command (``views_per_step`` -> ``--views-per-step``),
    for :func:`settings_error` where a settings field has the name of the option that sets it."""
    import inspect

    options = {}
    for name, param in inspect.signature(command).parameters.items():
        decls = [d for d in (getattr(param.default, "param_decls", None) or ()) if d.startswith("--")]
        options[name] = decls[0].split("/")[0] if decls else "--" + name.replace("_", "-")
    return options


def resume_command(words: Sequence[str], command: Callable, options: dict[str, object]) -> str:
    """The command line that continues a run: ``words`` (program, command, arguments), then each of
    ``options`` ({parameter name: value}) that differs from ``command``'s default, then ``--resume``. The
    options that shape the run must all be there: a resumed run is bitwise the uninterrupted one only with
    the same settings."""
    import inspect
    import shlex

    names = command_options(command)
    defaults = {name: getattr(p.default, "default", None) for name, p in inspect.signature(command).parameters.items()}
    line = [str(w) for w in words]
    for name, value in options.items():
        if value is None or value == defaults.get(name):
            continue
        if isinstance(value, bool):
            line.append(names[name] if value else "--no-" + names[name][2:])
        else:
            line += [names[name], str(value)]
    return shlex.join(line + ["--resume"])


def choice(option: str, value: str, choices: Sequence[str]) -> str:
    """``value`` as one of ``choices``, accepting '-' for '_' and any case (``axis-angle`` is ``axis_angle``);
    returns the library's spelling, or raises CLIError listing the choices."""
    key = str(value).strip().lower().replace("-", "_")
    for c in choices:
        if c.lower().replace("-", "_") == key:
            return c
    raise CLIError(f"{option}: expected one of {', '.join(choices)}, got {value!r}")


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory for tensors on ``device`` (GPU: free device memory; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def init_runtime(arch: str | None) -> str:
    """Initialise Taichi on ``arch`` (None: ``TAICHI_DR_ARCH`` or auto); returns the arch in use. Taichi's
    ``[Taichi] Starting on arch=...`` line shows only with the command's ``--verbose``."""
    from apps.command import current_run
    from taichi_dr.core import runtime

    try:
        return runtime.init(arch, announce=current_run().verbose)
    except RuntimeError as e:  # backend missing, or already initialised differently
        raise CLIError(f"--arch: {e}") from None


# ----------------------------------------------------------------------------------------------------
# Output folders


def prepare_out_dir(out: Path, *, overwrite: bool = False, resume: bool = False,
                    stale: Sequence[str] = ()) -> Path:
    """Create ``out``, or accept an existing one under the policy every command shares.

    A non-empty folder is refused unless ``overwrite`` (files matching the glob patterns in ``stale``,
    outputs of an earlier run that this one might not rewrite, are deleted; nothing else is touched) or
    ``resume`` (the folder is the run being continued). Inside a command, the command's resolved options are
    then saved in it as ``config.toml`` (:meth:`apps.command.RunReport.save_config`).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not (overwrite or resume):
            raise CLIError(f"--out folder {str(out)!r} is not empty; pass --overwrite to write into it "
                           "anyway, or choose another folder")
        if overwrite and not resume:
            for pattern in stale:
                for p in out.glob(pattern):
                    if p.is_file():
                        p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    from apps.command import current_run

    current_run().save_config(out)
    return out


# ----------------------------------------------------------------------------------------------------
# Images


def to_uint8(img) -> np.ndarray:
    """A float image in [0, 1] (tensor or array, (H, W) or (H, W, C)) -> uint8 array."""
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu().float().numpy()
    img = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def to_rgb(img) -> np.ndarray:
    """(H, W) grey or (H, W, 1/3/4) -> (H, W, 3) uint8 (alpha composited over white)."""
    a = to_uint8(img).astype(np.float32) / 255.0
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 4:
        a = a[..., :3] * a[..., 3:] + (1.0 - a[..., 3:])
    return to_uint8(a)


def save_png(path: Path, img) -> None:
    import imageio.v3 as iio

    iio.imwrite(path, to_uint8(img) if not (isinstance(img, np.ndarray) and img.dtype == np.uint8) else img)


def hstack(images: Iterable[np.ndarray], gap: int = 2, fill: int = 255) -> np.ndarray:
    """Side-by-side (H, W, 3) uint8 images of equal height, separated by ``gap`` columns of ``fill``."""
    images = list(images)
    h = images[0].shape[0]
    sep = np.full((h, gap, 3), fill, np.uint8)
    parts = []
    for i, im in enumerate(images):
        if i:
            parts.append(sep)
        parts.append(im)
    return np.concatenate(parts, axis=1)


def vstack(images: Iterable[np.ndarray], gap: int = 2, fill: int = 255) -> np.ndarray:
    images = list(images)
    w = max(im.shape[1] for im in images)
    sep = np.full((gap, w, 3), fill, np.uint8)
    parts = []
    for i, im in enumerate(images):
        if i:
            parts.append(sep)
        if im.shape[1] < w:
            im = np.concatenate([im, np.full((im.shape[0], w - im.shape[1], 3), fill, np.uint8)], axis=1)
        parts.append(im)
    return np.concatenate(parts, axis=0)


def upscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement so small renders stay legible."""
    if factor <= 1:
        return img
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


# A GIF is for looking at: at most this many frames and bytes of pixels (20000 views of 8 px enlarged to
# 256 px would otherwise need 4 GB in memory).
GIF_MAX_FRAMES = 360
GIF_MAX_BYTES = 96 * 2**20


def gif_layout(num_frames: int, frame_size: tuple[int, int], target: int = 256) -> tuple[int, int, int]:
    """How to turn ``num_frames`` images of ``frame_size`` (H, W) into a GIF within the limits above.

    Returns ``(stride, up, down)``: keep every ``stride``-th frame, then enlarge by ``up`` (nearest
    neighbour, towards ``target`` pixels) or shrink by keeping every ``down``-th pixel.
    """
    h, w = frame_size
    stride = max(1, math.ceil(num_frames / GIF_MAX_FRAMES))
    kept = math.ceil(num_frames / stride)
    up = upscale_factor(frame_size, target)
    while up > 1 and kept * h * w * 3 * up * up > GIF_MAX_BYTES:
        up -= 1
    down = 1
    while kept * math.ceil(h / down) * math.ceil(w / down) * 3 > GIF_MAX_BYTES:
        down += 1
    return stride, up, down


def gif_frame(img, up: int, down: int) -> np.ndarray:
    """An (H, W, C) image as a GIF frame laid out by :func:`gif_layout`: (H', W', 3) uint8."""
    rgb = to_rgb(img)
    return upscale(rgb[::down, ::down], up) if down > 1 else upscale(rgb, up)


def write_gif(path: Path, frames: Sequence[np.ndarray], fps: float = 12.0) -> None:
    """Write (H, W, 3) uint8 frames as a looping GIF (evenly thinned to at most ``GIF_MAX_FRAMES``)."""
    import imageio.v3 as iio

    if not frames:
        return
    if len(frames) > GIF_MAX_FRAMES:
        frames = [frames[i] for i in np.linspace(0, len(frames) - 1, GIF_MAX_FRAMES).round().astype(int)]
    # imageio's pillow plugin takes the frame duration in milliseconds.
    iio.imwrite(path, np.stack(frames), extension=".gif", duration=int(round(1000.0 / fps)), loop=0)


def upscale_factor(image_size: tuple[int, int], target: int = 192) -> int:
    """Integer factor that brings a small render to about ``target`` pixels for viewing."""
    return max(1, target // max(image_size))


# ----------------------------------------------------------------------------------------------------
# Progress


def progress_bar(console=None, transient: bool = False,
                 fields: str = "loss {task.fields[loss]:.4f}  IoU {task.fields[iou]:.3f}"):
    """A rich progress bar; ``fields`` formats the task's fields next to the count (loss and IoU by default)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(fields),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


# ----------------------------------------------------------------------------------------------------------
# Running the training engine from a command


def run_training(trainer, *, resume_hint: str | None = None, console=None):
    """``trainer.fit()`` as a command runs it: SIGINT/SIGTERM (the engine saved a checkpoint) print where it
    was saved and ``resume_hint``, then exit 130/143; a run of non-finite steps and a refused checkpoint
    become one ``Error:`` line (exit 1). Returns the engine's TrainResult."""
    from taichi_dr.pipelines import CheckpointError, Interrupted, NonFiniteError

    console = console or stderr_console()
    try:
        result = trainer.fit()
        # For the summary table and --json: the last metrics row (the loss and its terms) and the time.
        state = trainer.state
        last = dict(result.history[-1]) if result.history else {}
        from apps.command import current_run

        current_run().metrics["training"] = {
            "iterations": state.iteration, "seconds": round(state.elapsed_s, 3),
            **{k: v for k, v in last.items() if isinstance(v, int | float) and k not in ("iteration", "time_s")}}
        return result
    except Interrupted as e:
        total = trainer.config.iterations
        where = f"saved {e.checkpoint}" if e.checkpoint is not None else "nothing saved"
        console.print(f"Interrupted at iteration {e.iteration}/{total}; {where}.", highlight=False)
        if resume_hint and e.checkpoint is not None:
            console.print(f"Resume with: {resume_hint}", highlight=False, soft_wrap=True)
        raise typer.Exit(128 + e.signum) from None
    except NonFiniteError as e:
        raise CLIError(f"{e}; lower the learning rate or check the input") from None
    except CheckpointError as e:
        raise CLIError(f"--resume: {e}") from None
