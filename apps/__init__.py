"""Command-line applications of taichi-dr (the ``tdr`` console script; see :mod:`apps.main`).

Ctrl-C while the command line starts up (importing torch, Taichi, ...; a few seconds) would print a long
traceback from inside some import. When this package is imported as the ``tdr`` program (the console
script, or ``python -m apps``), SIGINT therefore ends the process at once with ``Interrupted.`` and exit
status 130 until a command starts; :func:`apps.common.handle_errors` then restores the usual
KeyboardInterrupt for the command's run (so ``fit-mesh`` can save its checkpoint) and re-arms this on the
way out. Imported as a library (tests, notebooks), nothing is installed.
"""

import os
import signal
import sys

# Before anything imports torch: OpenMP workers that spin after each torch op steal the cores Taichi's kernels
# run on, so taichi_dr asks for passive waiting; set here, since the commands import torch before taichi_dr
# (otherwise taichi_dr.init falls back to one torch thread, halving the networks' speed; see taichi_dr/__init__).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Taichi prints "[Taichi] version ..." on stdout when it is imported, unless this is set first: the command
# line shows it only with --verbose (and a user's own ENABLE_TAICHI_HEADER_PRINT wins).
if "--verbose" not in sys.argv[1:]:
    os.environ.setdefault("ENABLE_TAICHI_HEADER_PRINT", "0")

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


def exit_interrupted(signum=None, frame=None) -> None:
    """SIGINT handler outside a command: nothing to clean up yet, so say so and exit 130 right away."""
    try:
        sys.stderr.write("Interrupted.\n")
        sys.stderr.flush()
    finally:
        os._exit(EXIT_INTERRUPTED)


def _started_as_program() -> bool:
    # The console script's argv[0] is .../tdr; ``python -m apps`` sets argv[0] to "-m" while it imports us.
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name == "-m" or name.split(".")[0] in ("tdr", "tdr-script")


STARTUP_HANDLER_INSTALLED = False
# Only where Python's own handler is in place: a process started with SIGINT ignored (a background job of a
# script, nohup) keeps ignoring it, as Python itself does.
if _started_as_program() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    try:
        signal.signal(signal.SIGINT, exit_interrupted)
        STARTUP_HANDLER_INSTALLED = True
    except ValueError:  # not the main thread
        pass
