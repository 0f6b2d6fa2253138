"""The one place that initialises Taichi.

Taichi can be initialised once per process; everything in taichi_dr calls :func:`ensure_init` before
launching a kernel, so the first kernel call initialises with the user's choice (``init(arch=...)`` or the
``TAICHI_DR_ARCH`` environment variable) and nothing happens at import time.

Threads. Taichi's kernel launches are not thread-safe, and its LLVM backends (cpu, cuda) compile the
program's struct module only on the thread that initialised them. Yet torch runs ``backward`` on its own
autograd thread on CUDA, and users train in worker threads. So:

* :func:`init` materialises the program (a no-op kernel) on the initialising thread, under the lock, after
  which kernels may be compiled and launched from any thread;
* every kernel launch holds :func:`kernel_lock`, one process-wide re-entrant lock: launch kernels through
  :mod:`taichi_dr.core.bridge` (which takes it around a ``KernelOp``'s forward and backward) or decorate them with
  :func:`locked`. Concurrent callers are serialised, never interleaved inside Taichi.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from pathlib import Path

import taichi as ti
import torch

_ARCH_NAMES = ("auto", "cpu", "cuda", "vulkan")
_state: dict = {"arch": None}
# Re-entrant: a KernelOp's forward holds it while launching kernels that are themselves `locked`.
_kernel_lock = threading.RLock()


def kernel_lock() -> threading.RLock:
    """The process-wide lock every Taichi kernel launch (and initialisation) holds: ``with kernel_lock():``."""
    return _kernel_lock


def locked(fn):
    """Decorate a kernel (or a function that launches kernels) so that every call holds :func:`kernel_lock`.

    Put it above ``@ti.kernel``; the kernel's attributes (e.g. ``.grad``) are kept.
    """

    @functools.wraps(fn)
    def launch(*args, **kwargs):
        with _kernel_lock:
            return fn(*args, **kwargs)

    return launch


@ti.kernel
def _materialize_program():
    """Empty: its first launch builds the program's (empty) struct module on the calling thread."""
    pass


def _cuda_usable() -> bool:
    return torch.cuda.is_available()


_SOFTWARE_ICDS = ("lvp_icd", "swiftshader")
_ICD_DIRS = ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d")


def _hardware_vulkan_likely() -> bool:
    """Whether a Vulkan driver other than a software one (lavapipe, SwiftShader) is installed.

    "auto" should not pick a CPU emulation of a GPU: Taichi's own CPU backend is faster than lavapipe.
    A driver named explicitly (VK_ICD_FILENAMES / VK_DRIVER_FILES) is trusted unless it is a software one.
    """
    named = os.environ.get("VK_DRIVER_FILES") or os.environ.get("VK_ICD_FILENAMES")
    files = named.split(os.pathsep) if named else [str(p) for d in _ICD_DIRS for p in Path(d).glob("*.json")]
    hardware = [f for f in files if not any(sw in Path(f).name for sw in _SOFTWARE_ICDS)]
    if not hardware:
        return False
    # Mesa installs ICD files for every GPU family it supports; only count them if a GPU device node exists.
    return bool(named) or Path("/dev/dri").exists() or Path("/dev/nvidia0").exists()


def _try_init(arch_name: str, **kwargs) -> bool:
    arch = {"cpu": ti.cpu, "cuda": ti.cuda, "vulkan": ti.vulkan}[arch_name]
    if arch_name == "cpu":
        # Taichi's default CPU schedule gives each thread one contiguous block of at least 512 iterations: a
        # loop over a few hundred heavy items (the rasterizer's screen tiles) ran on one core. Small dynamic
        # tasks instead (kernels can ask for smaller ones with ti.loop_config). The changed block size also
        # keys Taichi's offline cache, so kernels cached under the default schedule are not reused.
        kwargs = dict(kwargs, make_cpu_multithreading_loop=False, default_cpu_block_dim=16)
    ti.init(arch=arch, **kwargs)
    # ti.init silently falls back to CPU when the asked-for backend is missing.
    got = ti.lang.impl.current_cfg().arch
    if arch_name != "cpu" and got != arch:
        return False
    return True


def _tame_torch_threads(arch_name: str, torch_threads: int | None) -> None:
    """Keep torch's OpenMP workers from fighting Taichi's CPU threads (see taichi_dr/__init__.py)."""
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
        return
    import taichi_dr

    if arch_name in ("cpu", "vulkan") and not taichi_dr._OMP_PASSIVE:
        torch.set_num_threads(1)


def init(arch: str | None = None, *, debug: bool = False, offline_cache: bool = True,
         torch_threads: int | None = None, announce: bool = True) -> str:
    """Initialise Taichi for taichi_dr and return the arch in use (``"cpu"``, ``"cuda"`` or ``"vulkan"``).

    arch: ``"auto"`` (cuda, then a hardware vulkan device, then cpu; software Vulkan drivers such as Mesa's
    lavapipe only when asked for by name), ``"cpu"``, ``"cuda"`` or ``"vulkan"``. ``None`` reads
    ``TAICHI_DR_ARCH`` and defaults to ``"auto"``. Idempotent: a second call with the same (or no) arch is a
    no-op; asking for a different arch after initialisation raises, since Taichi cannot switch in-process.

    torch_threads: torch's intra-op threads. By default unchanged, except on the cpu/vulkan archs when torch
    was imported before taichi_dr: then 1, because torch's spinning OpenMP workers would steal the cores
    Taichi's kernels run on (import taichi_dr first, or set OMP_WAIT_POLICY=PASSIVE, to keep torch's
    threads).

    announce: let Taichi print its ``[Taichi] Starting on arch=...`` line (on stdout); the command line turns
    it off unless ``--verbose``.
    """
    with _kernel_lock:   # two threads must not both initialise
        if announce:
            return _init_locked(arch, debug, offline_cache, torch_threads)
        import contextlib
        import io

        # ti.init announces the arch with a plain print(): swallow what it prints, nothing else prints here.
        with contextlib.redirect_stdout(io.StringIO()):
            return _init_locked(arch, debug, offline_cache, torch_threads)


def _init_locked(arch: str | None, debug: bool, offline_cache: bool, torch_threads: int | None) -> str:
    requested = (arch or os.environ.get("TAICHI_DR_ARCH") or "auto").strip().lower()
    if requested not in _ARCH_NAMES:
        raise ValueError(f"taichi_dr.init: arch must be one of {_ARCH_NAMES}, got {requested!r} "
                         "(from the argument or TAICHI_DR_ARCH)")
    if _state["arch"] is not None:
        if arch is not None and requested not in ("auto", _state["arch"]):
            raise RuntimeError(f"taichi_dr is already initialised on {_state['arch']!r}; Taichi cannot "
                               f"switch to {requested!r} within one process")
        return _state["arch"]

    kwargs = dict(debug=debug, offline_cache=offline_cache, default_fp=ti.f32, default_ip=ti.i32,
                  log_level=ti.WARN)
    if requested == "auto":
        candidates = ((["cuda"] if _cuda_usable() else []) + (["vulkan"] if _hardware_vulkan_likely() else [])
                      + ["cpu"])
    else:
        candidates = [requested]
    for name in candidates:
        if _try_init(name, **kwargs):
            # Taichi's LLVM backends build the struct module on first use and assert that this happens on
            # the thread that called ti.init: do it now, or a first kernel launched from another thread
            # (torch's autograd thread on CUDA) would fail.
            _materialize_program()
            _state["arch"] = name
            _tame_torch_threads(name, torch_threads)
            return name
        ti.reset()
    raise RuntimeError(f"taichi_dr.init: the {requested!r} backend is not available on this machine "
                       "(for vulkan install a driver, e.g. apt-get install mesa-vulkan-drivers libvulkan1)")


def ensure_init() -> str:
    """Initialise with the default choice if nobody has yet; return the arch."""
    return _state["arch"] or init()


def arch() -> str | None:
    """The arch in use, or None before initialisation."""
    return _state["arch"]


def device() -> torch.device:
    """The torch device whose tensors the kernels read without copies."""
    return torch.device("cuda") if ensure_init() == "cuda" else torch.device("cpu")


# Below this many loop iterations a CPU kernel runs faster on one thread: waking Taichi's thread pool costs about
# 80 us a launch on a 2-core machine (a 30-element copy: 122 us in parallel, 41 us serialised), as much as a
# sphere tracer's step over a few hundred rays. The hash grid's forward pass (16 levels) breaks even at about
# 1000-1500 points (300 points: 344 us in parallel, 244 us serialised; 3000: 1376 and 1595 us).
SERIAL_BELOW = 1024


def serial_launch(n_iterations: int, below: int = SERIAL_BELOW) -> bool:
    """Whether a kernel over ``n_iterations`` should run serialised (``ti.loop_config(serialize=True)``, chosen
    with a ``ti.template()`` flag): on the CPU below ``below`` iterations, never on a GPU."""
    return ensure_init() == "cpu" and n_iterations < below


# Below this many points a torch evaluation on the CPU runs faster on one thread: with two threads, waking OpenMP's
# workers (waiting passively, as under tdr) for each operation costs more than a few hundred points' work (a
# 4 x 128 MLP on 2 cores: 30 points 0.91 ms on two threads, 0.27 ms on one; 300 points 1.9 and 0.83 ms;
# 3000 points 8.8 and 10.3 ms). A sphere tracer's last steps and a secant search are such evaluations.
TORCH_SERIAL_BELOW = 2048


@contextlib.contextmanager
def torch_threads_for(n_points: int, below: int = TORCH_SERIAL_BELOW):
    """Context in which torch runs on one CPU thread if ``n_points < below`` (and on the CPU); else unchanged.
    The choice depends on ``n_points`` only, so a run with the same seed repeats itself exactly."""
    threads = torch.get_num_threads()
    if n_points >= below or threads == 1 or ensure_init() == "cuda":
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sync() -> None:
    """Wait for queued kernels (for timing)."""
    if _state["arch"] is not None:
        with _kernel_lock:
            ti.sync()
