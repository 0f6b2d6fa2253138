"""Helpers shared by the command-line tests (tests/apps) and the method tests (tests/pipelines)."""

from __future__ import annotations

import os
import signal


def assert_clean_error(result, *needles: str, absent: tuple[str, ...] = (), exit_code: int | None = None):
    """Non-zero exit (``exit_code`` if given), exactly one ``Error: ...`` line on stderr containing every
    needle (case-insensitive) and none of ``absent``, no traceback. Returns that line."""
    assert result.exit_code != 0 if exit_code is None else result.exit_code == exit_code, result.output
    assert result.exit_code != 130
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle.lower() in errors[0].lower(), (needle, errors[0])
    for word in absent:
        assert word not in errors[0], (word, errors[0])
    return errors[0]


def interrupt_fit_after(monkeypatch, iteration: int, signum: int = signal.SIGINT):
    """Make MeshFitMethod send itself ``signum`` (SIGINT: what Ctrl-C delivers) during step ``iteration``
    (1-based, as the engine counts completed iterations): the engine finishes that step, saves and stops.
    Returns the real ``step`` so a test can put it back."""
    from taichi_dr.pipelines.mesh_fit import MeshFitMethod

    step = MeshFitMethod.step

    def step_then_interrupt(self, batch, index):
        result = step(self, batch, index)
        if index + 1 == iteration:
            os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(MeshFitMethod, "step", step_then_interrupt)
    return step


def signal_at(iteration: int, signum: int = signal.SIGINT):
    """A training-engine callback that sends this process ``signum`` once ``iteration`` steps are done (what
    Ctrl-C or `kill` delivers)."""
    from taichi_dr.pipelines import Callback

    class SignalAt(Callback):
        def on_step(self, state):
            if state.iteration == iteration:
                os.kill(os.getpid(), signum)

    return SignalAt()


def ball_dataset(root, views: int, size: int):
    """A tiny IDR dataset made by ``tdr make-dataset``: a ball of radius 2 at (5, 5, 5), away from the origin so
    the dataset's scale_mat matters. Returns ``root / "data"`` (the mesh is ``root / "ball.ply"``)."""
    from typer.testing import CliRunner

    from apps.main import app
    from taichi_dr.core.mesh import icosphere, save_mesh

    ball = icosphere(2, 2.0)
    ball.verts += 5.0
    save_mesh(ball, root / "ball.ply")
    r = CliRunner().invoke(app, ["make-dataset", str(root / "ball.ply"), "--views", str(views), "--size", str(size),
                                 "--out", str(root / "data")])
    assert r.exit_code == 0, r.output
    return root / "data"


def invoke_tdr(*args):
    """Run ``tdr ARGS`` in-process (arguments turned into strings) without TDR_DEBUG, so errors print as the
    user sees them."""
    import os

    from typer.testing import CliRunner

    from apps.main import app

    env = {k: v for k, v in os.environ.items() if k != "TDR_DEBUG"}
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def ball_files(root):
    """A unit ball (``root/ball.ply``), 4 rendered views of it at 32 px with cameras (``root/views``), and a tiny
    IDR dataset of it (``root/data``: 8 views, 24 px). Returns ``root``."""
    from taichi_dr.core.mesh import icosphere, save_mesh

    save_mesh(icosphere(2, 1.0), root / "ball.ply")
    res = invoke_tdr("render", root / "ball.ply", "--views", 4, "--size", 32, "--out", root / "views", "--quiet")
    assert res.exit_code == 0, res.output
    res = invoke_tdr("make-dataset", root / "ball.ply", "--views", 8, "--size", 24, "--out", root / "data", "--quiet")
    assert res.exit_code == 0, res.output
    return root
