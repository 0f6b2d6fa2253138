"""What every ``tdr`` command shares (issue 12, command line): ``--config FILE.toml`` and the ``config.toml`` a
run saves (which reproduces it), ``--json``, ``--quiet``, ``--verbose``, the summary table, an example in each
``--help``, shell completion, and the ``--viewer`` options' wiring into the training engine.

Everything runs at tiny sizes through typer's CliRunner, in-process (``--verbose``: in a subprocess, since
Taichi's banner prints at import).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from app_helpers import assert_clean_error, ball_files, invoke_tdr
from typer.testing import CliRunner

from apps.command import INVOCATION_OPTIONS, config_defaults, toml_text
from apps.main import app

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
# reconstruct at a tiny size (test_reconstruct_app's), as config-file keys: '-' and '_' both accepted
TINY_RECONSTRUCT = {"iterations": 4, "rays": 64, "depth": 2, "width": 32, "frequencies": 2, "feature_dim": 4,
                    "render-depth": 1, "render_width": 16, "resolution": 24, "holdout-every": 4,
                    "render_scale": 1.0}


invoke = invoke_tdr


def write_toml(path: Path, values: dict) -> Path:
    path.write_text(toml_text(values))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A unit ball, 4 views of it (32 px) with cameras, and a tiny IDR dataset of it (8 views, 24 px)."""
    return ball_files(tmp_path_factory.mktemp("cli_options"))


# ----------------------------------------------------------------------------------------------------------
# TOML


def test_toml_writer_round_trips():
    values = {"name": 'a "quoted"\\ path\nwith ünïcode\t', "n": 7, "zero": 0, "x": 1e-5, "y": 0.1, "big": 1e300,
              "neg": -2.5, "inf": math.inf, "flag": True, "off": False, "list": [1, 2.5, "s"], "skipped": None,
              "key with space": 1}
    parsed = tomllib.loads(toml_text(values, tables={"table": {"a": 1, "b": "x"}}))
    expected = {k: v for k, v in values.items() if v is not None}
    assert parsed == {**expected, "table": {"a": 1, "b": "x"}}
    assert type(parsed["y"]) is float and type(parsed["n"]) is int
    assert math.isnan(tomllib.loads(toml_text({"v": math.nan}))["v"])
    with pytest.raises(TypeError, match="dict"):
        toml_text({"bad": {"nested": 1}})


# ----------------------------------------------------------------------------------------------------------
# --config: values, precedence, errors


def test_config_file_sets_options_and_the_command_line_wins(files, tmp_path):
    config = write_toml(tmp_path / "run.toml", {"views": 3, "size": 16, "out": str(tmp_path / "r"),
                                                "camera_convention": "opencv", "distance": 4})
    res = invoke("render", files / "ball.ply", "--config", config, "--views", 2)
    assert res.exit_code == 0, res.output
    out = tmp_path / "r"
    assert sorted(p.name for p in out.glob("view_*.png")) == ["view_000.png", "view_001.png"]   # --views 2 won
    info = json.loads((out / "render.json").read_text())
    assert info["image_size"] == [16, 16] and info["camera_convention"] == "opencv" and info["distance"] == 4.0
    # the run's config.toml: every option (defaults included) as resolved, paths absolute, invocation flags out
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved == {"mesh": str((files / "ball.ply").resolve()), "views": 2, "size": 16, "out": str(out.resolve()),
                     "elevation": 30.0, "distance": "4", "fov": 30.0, "sigma": 1e-5, "camera-convention": "opencv"}
    assert not set(saved) & {k.replace("_", "-") for k in INVOCATION_OPTIONS}


@pytest.mark.parametrize("text, needles", [
    ("views = 2\nsize = 'big'\n", ["size", "expected an integer", "'big'"]),
    ("views = 2.5\n", ["views", "expected an integer", "2.5"]),
    ("sigma = true\n", ["sigma", "expected a number", "True"]),
    ("overwrite = 1\n", ["overwrite", "expected true or false", "1"]),
    ("out = 3\n", ["out", "expected a path", "3"]),
    ("veiws = 2\n", ["unknown key 'veiws'", "did you mean 'views'"]),
    ("colour = 'red'\n", ["unknown key 'colour'"]),
    ("[views]\nn = 2\n", ["views", "expected a value, got a table"]),
    ("views = \n", ["not valid TOML"]),
    ("n = 3\n", ["unknown key 'n'"]),                  # short options are not keys
])
def test_config_errors_are_one_line_naming_the_key(files, tmp_path, text, needles):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    line = assert_clean_error(invoke("render", files / "ball.ply", "--out", tmp_path / "r", "--config", config),
                              f"--config {config}:", *needles, exit_code=1)
    assert "Traceback" not in line
    assert not (tmp_path / "r").exists()


def test_config_missing_or_unreadable_file(files, tmp_path):
    assert_clean_error(invoke("render", files / "ball.ply", "--out", tmp_path / "r", "--config",
                              tmp_path / "nope.toml"), "--config", "nope.toml", "no such file", exit_code=1)
    assert_clean_error(invoke("render", files / "ball.ply", "--out", tmp_path / "r", "--config", tmp_path),
                       "--config", "not a file", exit_code=1)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00 = 1")
    assert_clean_error(invoke("render", files / "ball.ply", "--out", tmp_path / "r", "--config", binary),
                       "--config", "not valid TOML", exit_code=1)


def test_config_keys_by_any_name_of_the_option(tmp_path):
    """A key is the parameter's name or one of its long options, with '-' or '_': fit-mesh's --iters alias too."""
    import typer.main

    command = typer.main.get_command(app).commands["fit-mesh"]
    config = write_toml(tmp_path / "a.toml", {"iters": 7, "views-per-step": 3, "rgb": True, "out": "x"})
    assert config_defaults(config, command) == {"iterations": 7, "views_per_step": 3, "rgb": True, "out": "x"}
    both = write_toml(tmp_path / "b.toml", {"iters": 7, "iterations": 8})
    from apps.common import CLIError

    with pytest.raises(CLIError, match="set twice"):
        config_defaults(both, command)


def test_reconstruct_config_reproduces_the_run(files, tmp_path):
    """`tdr reconstruct --config RUN/config.toml --out OTHER` runs the same training: identical losses."""
    first = tmp_path / "first"
    config = write_toml(tmp_path / "rec.toml", {"data": str(files / "data"), "out": str(first), **TINY_RECONSTRUCT})
    res = invoke("reconstruct", "--config", config, "--quiet")     # DATA (an argument) from the file too
    assert res.exit_code == 0, res.output
    saved = tomllib.loads((first / "config.toml").read_text())
    assert saved["iterations"] == 4 and saved["width"] == 32 and saved["method"] == "idr"
    assert saved["data"] == str((files / "data").resolve()) and "resume" not in saved and "overwrite" not in saved
    second = tmp_path / "second"
    res = invoke("reconstruct", "--config", first / "config.toml", "--out", second, "--quiet")
    assert res.exit_code == 0, res.output

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(first)) == 4 and losses(second) == losses(first)
    # the reproduction saved the same options, but for its own --out
    again = tomllib.loads((second / "config.toml").read_text())
    assert again == {**saved, "out": str(second.resolve())}


# ----------------------------------------------------------------------------------------------------------
# --json, --quiet, the summary table


def test_json_prints_one_summary_and_nothing_else_on_stdout(files, tmp_path):
    out = tmp_path / "rec"
    res = invoke("reconstruct", files / "data", "--out", out, *_cli(TINY_RECONSTRUCT), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)     # the whole of stdout is one JSON object
    assert set(summary) == {"command", "metrics", "outputs", "seconds"} and summary["command"] == "reconstruct"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["metrics"]["training"]["loss"] == pytest.approx(rows[-1]["loss"])
    assert summary["metrics"]["training"]["iterations"] == 4
    assert summary["metrics"]["heldout"]["psnr"] == json.loads((out / "metrics.json").read_text())["heldout"]["psnr"]
    assert {str(out / name) for name in ("config.toml", "mesh.ply", "metrics.json", "metrics.jsonl",
                                         "checkpoint.pt")} <= set(summary["outputs"])
    assert all(Path(p).exists() for p in summary["outputs"])
    assert 0 < summary["seconds"] < 600
    # progress still goes to stderr (not --quiet); the "Wrote ..." line too, and no summary table
    assert "iter 4/4" in res.stderr and "Wrote" in res.stderr and "wrote" not in res.stderr


def _cli(options: dict) -> list[str]:
    return [a for k, v in options.items() for a in ("--" + k.replace("_", "-"), str(v))]


def test_quiet_prints_nothing_but_errors(files, tmp_path):
    res = invoke("fit-mesh", "--targets", files / "views", "--cameras", files / "views" / "cameras.json",
                 "--out", tmp_path / "fit", "--iterations", 3, "--log-every", 3, "--quiet")
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    assert not [line for line in res.stderr.splitlines() if not line.startswith("[W ")], res.stderr  # (Taichi's
    assert (tmp_path / "fit" / "mesh.obj").is_file()                                                 # warnings)
    # an error still shows, as one line
    assert_clean_error(invoke("fit-mesh", "--targets", files / "views", "--cameras", files / "views" / "cameras.json",
                              "--out", tmp_path / "fit", "--iterations", 3, "--quiet"), "not empty", exit_code=1)


def test_long_commands_end_with_a_summary_table(files, tmp_path):
    res = invoke("fit-mesh", "--targets", files / "views", "--cameras", files / "views" / "cameras.json",
                 "--out", tmp_path / "fit", "--iters", 3, "--log-every", 3)
    assert res.exit_code == 0, res.output
    assert "Silhouette IoU" in res.stdout and "tdr fit-mesh" not in res.stdout
    table = res.stderr[res.stderr.index("tdr fit-mesh"):]
    for needle in ("iou_final.iou_hard", "training.loss", "time", "wrote", str(tmp_path / "fit" / "mesh.obj")[-20:]):
        assert needle in table, (needle, table)


def test_evaluate_json_flag_and_out_file(files, tmp_path):
    ball = files / "ball.ply"
    res = invoke("evaluate", ball, "--gt", ball, "--points", 1000, "--out", tmp_path / "m.json", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    saved = json.loads((tmp_path / "m.json").read_text())
    assert summary["command"] == "evaluate" and summary["metrics"] == saved
    # (a mesh against itself: only the sampling gap, ~0.5 * sqrt(4 pi / 1000) = 0.056 for 1000 points)
    assert saved["chamfer"] < 0.1 and summary["outputs"] == [str(tmp_path / "m.json")]
    # without --json: the metrics alone, as before; --quiet: nothing
    res = invoke("evaluate", ball, "--gt", ball, "--points", 1000)
    assert res.exit_code == 0 and json.loads(res.stdout)["chamfer"] == pytest.approx(saved["chamfer"])
    res = invoke("evaluate", ball, "--gt", ball, "--points", 1000, "--quiet")
    assert res.exit_code == 0 and res.stdout == ""


# ----------------------------------------------------------------------------------------------------------
# --help, completion, --verbose


def test_every_command_has_an_example_and_the_shared_options():
    import typer.main

    commands = typer.main.get_command(app).commands
    assert {"render", "fit-mesh", "demo", "reconstruct", "evaluate", "make-dataset", "pose", "mesh",
            "view"} <= set(commands)
    for name in commands:
        res = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, (name, res.output)
        assert "Example" in res.stdout, name
        if name != "view":     # (the lead's command)
            assert "--config" in res.stdout and "--verbose" in res.stdout, name
            assert "--json" in res.stdout and "--quiet" in res.stdout, name
    res = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert "--install-completion" in res.stdout


def test_shell_completion_completes_commands_and_options():
    def complete(words: str, index: int) -> list[str]:
        env = {**os.environ, "_TDR_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(index)}
        res = subprocess.run([sys.executable, "-m", "apps"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                             env=env)
        assert res.returncode == 0, res.stderr
        return res.stdout.split()

    assert complete("tdr re", 1) == ["render", "reconstruct"]
    assert complete("tdr fit-mesh --iter", 2) == ["--iterations", "--iters"]


@pytest.mark.parametrize("command", ["fit-mesh", "demo"])
def test_iterations_is_one_spelling_with_iters_kept(command):
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert "--iterations" in res.stdout and "--iters" in res.stdout


def test_taichi_banner_only_with_verbose(files, tmp_path):
    def run(*extra):
        return subprocess.run([sys.executable, "-m", "apps", "render", str(files / "ball.ply"), "--views", "1",
                               "--size", "16", "--out", str(tmp_path / f"r{len(extra)}"), "--arch", "cpu", *extra],
                              capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env={k: v for k, v in os.environ.items() if k != "ENABLE_TAICHI_HEADER_PRINT"})

    quiet, verbose = run(), run("--verbose")
    assert quiet.returncode == 0 and verbose.returncode == 0, (quiet.stderr, verbose.stderr)
    assert "[Taichi]" not in quiet.stdout + quiet.stderr
    assert "[Taichi] version" in verbose.stdout and "[Taichi] Starting on arch=" in verbose.stdout


def test_runtime_init_announce_switch():
    """``runtime.init(announce=False)`` swallows ti.init's "Starting on arch" line (the library's default prints
    it); checked in a subprocess, since Taichi initialises once per process."""
    code = ("import taichi_dr.core.runtime as r; r.init('cpu', announce=False); print('done')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "ENABLE_TAICHI_HEADER_PRINT": "0"})
    assert res.returncode == 0, res.stderr
    assert res.stdout == "done\n"


# ----------------------------------------------------------------------------------------------------------
# --viewer / --viewer-frames reach the training engine


@pytest.fixture()
def recorded_viewer(monkeypatch):
    """apps.viewing.viewer_callbacks replaced by one that records its arguments and returns a callback counting
    the steps it sees."""
    import apps.viewing
    from taichi_dr.pipelines import Callback

    calls = []

    class Count(Callback):
        steps = 0

        def on_step(self, state):
            Count.steps += 1

    def fake(viewer, frames, *, title):
        calls.append((viewer, frames, title))
        return [Count()]

    monkeypatch.setattr(apps.viewing, "viewer_callbacks", fake)
    return calls, Count


def test_viewer_options_reach_the_engine(files, tmp_path, recorded_viewer):
    calls, count = recorded_viewer
    frames = tmp_path / "frames"
    res = invoke("fit-mesh", "--targets", files / "views", "--cameras", files / "views" / "cameras.json",
                 "--out", tmp_path / "fit", "--iterations", 3, "--viewer", "--viewer-frames", frames, "-q")
    assert res.exit_code == 0, res.output
    assert calls == [(True, frames, "tdr fit-mesh")] and count.steps == 3
    res = invoke("reconstruct", files / "data", "--out", tmp_path / "rec", *_cli(TINY_RECONSTRUCT),
                 "--viewer-frames", frames, "-q")
    assert res.exit_code == 0, res.output
    assert calls[-1] == (False, frames, "tdr reconstruct --method idr") and count.steps == 3 + 4
    res = invoke("pose", files / "ball.ply", files / "views" / "view_000.png", "--camera",
                 files / "views" / "cameras.json", "--stages", "16:1e-3:2", "--out", tmp_path / "pose", "--viewer",
                 "-q")
    assert res.exit_code == 0, res.output
    assert calls[-1] == (True, None, "tdr pose") and count.steps == 3 + 4 + 2
