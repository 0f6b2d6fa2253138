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


def interrupt_fit_after(monkeypatch, iteration: int):
    """Make MeshFitter send itself SIGINT (what Ctrl-C delivers) after step ``iteration``; returns the real
    ``step`` so a test can put it back."""
    from taichi_dr.pipelines.mesh_fit import MeshFitter

    step = MeshFitter.step

    def step_then_interrupt(self):
        terms = step(self)
        if self.iteration == iteration:
            os.kill(os.getpid(), signal.SIGINT)
        return terms

    monkeypatch.setattr(MeshFitter, "step", step_then_interrupt)
    return step
