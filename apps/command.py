"""What every ``tdr`` command shares: ``--config FILE.toml`` (options from a TOML file), ``--json``, ``--quiet``
and ``--verbose``, and the running command's report (metrics, paths written, the summary table or JSON).

:func:`tdr_command` decorates a command; the command reports through :func:`current_run`.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import typer

from apps.common import EXIT_ERROR, CLIError, debug_enabled, error, handle_errors, stderr_console

# What every command shares: --config FILE.toml, --json, --quiet, --verbose, and the run's report

# Options that say how to run a command, not what it computes: a config file may set them, but the
# config.toml a run saves leaves them out, so `--config RUN/config.toml --out OTHER` starts a fresh run in
# OTHER (not a resume of RUN, not an overwrite, not a second window) that computes the same thing.
INVOCATION_OPTIONS = frozenset({"config", "resume", "overwrite", "json_output", "quiet", "verbose", "viewer",
                                "viewer_frames"})
CONFIG_NAME = "config.toml"


@dataclass
class RunReport:
    """What a running command reports: its metrics and the paths it wrote, for ``--json`` and the summary
    table; and how chatty it may be (``--quiet``, ``--json``, ``--verbose``).

    Commands reach the running one through :func:`current_run` (library callers that run a command's helpers
    outside a command get a default, chatty one).
    """

    command: str = ""
    json: bool = False
    quiet: bool = False
    verbose: bool = False
    summary_table: bool = False          # a long command: end with a Rich table of metrics, time and outputs
    options: dict | None = None          # the resolved options, saved as config.toml by prepare_out_dir
    metrics: dict = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @property
    def chatty(self) -> bool:
        """Whether progress, info lines and the summary table show (not with --quiet or --json)."""
        return not (self.quiet or self.json)

    @property
    def progress_mode(self) -> str:
        """The training engine's progress display (TrainConfig.progress): none with --quiet."""
        return "none" if self.quiet else "auto"

    def info(self, message: str, *, err: bool = False) -> None:
        """An information line (``Wrote ...``): on stdout (stderr with ``err`` or --json), none with --quiet."""
        if not self.quiet:
            typer.echo(message, err=err or self.json)

    def progress(self, line: str) -> None:
        """A progress line on stderr (meshing, rendering), none with --quiet."""
        if not self.quiet:
            typer.echo(line, err=True)

    def wrote(self, *paths) -> None:
        """Record written files or folders (those that exist) for --json's "outputs" and the summary table."""
        for p in paths:
            if p is not None and Path(p).exists() and str(p) not in self.outputs:
                self.outputs.append(str(p))

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def summary(self) -> dict:
        return {"command": self.command, "metrics": self.metrics, "outputs": list(self.outputs),
                "seconds": round(self.seconds, 3)}

    def save_config(self, folder: Path) -> Path | None:
        """Write the resolved options as ``folder/config.toml`` (atomically); None when there are none."""
        if self.options is None:
            return None
        from taichi_dr.pipelines.checkpoint import write_atomic

        text = f"# tdr {self.command}: every option of this run (tdr {self.command} --config {CONFIG_NAME})\n"
        text += toml_text(saved_options(self.options))
        path = write_atomic(Path(folder) / CONFIG_NAME, lambda f: f.write(text.encode("utf-8")))
        self.wrote(path)
        return path

    def finish(self, stdout) -> None:
        """The end of a successful run: the JSON summary on ``stdout`` (--json), else the summary table."""
        if self.json:
            stdout.write(json.dumps(self.summary(), default=_json_default, allow_nan=False) + "\n")
            stdout.flush()
        elif self.chatty and self.summary_table:
            stderr_console().print(summary_table(self))


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor | np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _finite(value):
    """NaN and Inf become None (strict JSON has neither), in nested dicts and lists too."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _flat_metrics(metrics: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flat_metrics(value, name + ".")
        elif isinstance(value, float):
            rows.append((name, f"{value:.6g}"))
        elif isinstance(value, bool | int | str) or value is None:
            rows.append((name, str(value)))
        elif isinstance(value, list) and len(value) <= 4 and all(isinstance(v, int | float) for v in value):
            rows.append((name, ", ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in value)))
    return rows


def summary_table(report: RunReport):
    """A Rich table: the metrics (nested ones as ``a.b``), the time, the paths written."""
    from rich.table import Table

    table = Table(title=f"tdr {report.command}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name, value in _flat_metrics(report.metrics):
        table.add_row(name, value)
    table.add_row("time", f"{report.seconds:.1f} s")
    for i, path in enumerate(report.outputs):
        table.add_row("wrote" if i == 0 else "", path)
    return table


_CURRENT: list[RunReport] = []


def current_run() -> RunReport:
    """The report of the command running now (a chatty default outside a command)."""
    return _CURRENT[-1] if _CURRENT else RunReport()


# --- TOML ---------------------------------------------------------------------------------------------------


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)        # shortest round-trip form ("0.0001" or "1e-05"), both TOML floats
    if isinstance(value, str):
        # JSON's escapes (\" \\ \n \t \uXXXX ...) are TOML basic-string escapes.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def toml_text(values: dict, tables: dict[str, dict] | None = None) -> str:
    """``values`` ({key: str | int | float | bool | list of them}) as TOML ``key = value`` lines, then each of
    ``tables`` as a ``[name]`` table of such values. None is left out (TOML has no null)."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    for name, table in (tables or {}).items():
        lines += ["", f"[{_toml_key(name)}]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def read_toml(path: Path) -> dict:
    """Parse a TOML file; OSError or ValueError (tomllib's TOMLDecodeError) on failure."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    with open(path, "rb") as f:
        return tomllib.load(f)


def saved_options(options: dict) -> dict:
    """The options a run's config.toml keeps: keyed by their long option name (``views-per-step``), paths as
    absolute strings (the file reproduces the run from any folder), None and :data:`INVOCATION_OPTIONS` left
    out."""
    saved = {}
    for name, value in options.items():
        if name in INVOCATION_OPTIONS or value is None:
            continue
        if isinstance(value, Path):
            value = str(value.resolve())
        elif isinstance(value, tuple):
            value = list(value)
        saved[name.replace("_", "-")] = value
    return saved


def _param_names(param) -> list[str]:
    """The keys a config file may use for a click parameter: its name and its long options' names, each with
    '-' or '_'."""
    names = {param.name}
    for opt in getattr(param, "opts", ()):
        if opt.startswith("--"):
            names.add(opt[2:])
    return sorted({n.replace("-", "_") for n in names})


def _config_value(param, key: str, value, ctx):
    """``value`` from a config file for ``param`` (a typer parameter), checked against the command function's
    annotation (bool, int, float, str, Path) and then by typer's own conversion (choices, ranges); CLIError
    saying what was expected."""
    from typer._click.exceptions import BadParameter

    if isinstance(value, dict):
        raise CLIError(f"{key}: expected a value, got a table")
    descriptor = getattr(param, "type_descriptor", None)
    kind = getattr(descriptor, "annotation", str)
    if kind is bool or getattr(param, "is_flag", False):
        if not isinstance(value, bool):
            raise CLIError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CLIError(f"{key}: expected an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CLIError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif kind is str and isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)      # e.g. render's --distance: 'auto' or a number
    elif not isinstance(value, str):
        expected = "a path (a string)" if kind is Path else "a string"
        raise CLIError(f"{key}: expected {expected}, got {value!r}")
    try:
        param.get_runtime_param().coerce(value, param=param, ctx=ctx)
    except BadParameter as e:
        raise CLIError(f"{key}: {e.message}") from None
    return value


def config_defaults(path: Path, command, ctx=None) -> dict:
    """The options a config file sets for a click ``command`` (of context ``ctx``): {parameter name: value}.
    CLIError (without the ``--config FILE:`` prefix) for a missing or unreadable file, bad TOML, an unknown
    key or a wrong type."""
    import difflib

    path = Path(path)
    if not path.is_file():
        raise CLIError("no such file" if not path.exists() else "not a file")
    try:
        data = read_toml(path)
    except OSError as e:
        raise CLIError(f"cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise CLIError(f"not valid TOML ({e})") from None
    params = {}
    for param in command.params:
        if param.name != "config" and param.expose_value:
            for name in _param_names(param):
                params[name] = param
    values: dict = {}
    for key, value in data.items():
        param = params.get(str(key).replace("-", "_"))
        if param is None:
            close = difflib.get_close_matches(str(key).replace("-", "_"), params, n=1)
            hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
            raise CLIError(f"unknown key {key!r}: not an option of this command{hint}")
        if param.name in values:
            raise CLIError(f"{key}: set twice (under two of its names)")
        values[param.name] = _config_value(param, key, value, ctx)
    return values


def _config_callback(ctx, param, value):
    """Eager ``--config`` callback: the file's values become the command's defaults (ctx.default_map), so an
    option on the command line still wins."""
    if value is None:
        return value
    try:
        values = config_defaults(Path(value), ctx.command, ctx)
    except CLIError as e:
        if debug_enabled():
            raise
        error(f"--config {value}: {e}")
        raise typer.Exit(EXIT_ERROR) from None
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


# The parameters every command gets from :func:`tdr_command`, appended to its signature.
def _shared_parameters(runs: bool) -> list[tuple[str, type, object]]:
    params = [("config", Path, typer.Option(None, "--config", is_eager=True, callback=_config_callback,
                                            help="Read options from this TOML file (keys: the option names, "
                                                 "with - or _); options on the command line win.",
                                            rich_help_panel="Common options"))]
    if runs:
        params += [
            ("json_output", bool, typer.Option(False, "--json", help="Print one JSON summary on stdout at the end "
                                                "({command, metrics, outputs, seconds}) and nothing else there.",
                                                rich_help_panel="Common options")),
            ("quiet", bool, typer.Option(False, "--quiet", "-q", help="Print only errors: no progress, no summary.",
                                         rich_help_panel="Common options")),
        ]
    params.append(("verbose", bool, typer.Option(False, "--verbose", help="Show Taichi's version banner and "
                                                 "startup line.", rich_help_panel="Common options")))
    return params


def tdr_command(name: str, *, summary_table: bool = False, runs: bool = True) -> Callable:
    """Decorate a ``tdr`` command: the shared options (``--config``; with ``runs``, ``--json`` and ``--quiet``;
    ``--verbose``) are added to its signature, its errors are reported as one line (:func:`handle_errors`),
    and it runs with a :class:`RunReport` (:func:`current_run`) that ends with the JSON summary (--json) or,
    for a long command (``summary_table``), the summary table.

    The command function itself never sees the shared options; it reports through ``current_run()``.
    """
    import inspect

    def decorate(fn: Callable) -> Callable:
        checked = handle_errors(fn)
        signature = inspect.signature(fn)
        own = list(signature.parameters)
        shared = _shared_parameters(runs)

        @functools.wraps(fn)
        def wrapper(*args, config=None, json_output=False, quiet=False, verbose=False, **kwargs):
            import contextlib

            options = dict(zip(own, args, strict=False), **kwargs)
            report = RunReport(command=name, json=json_output, quiet=quiet, verbose=verbose,
                               summary_table=summary_table, options=options)
            stdout = sys.stdout
            if json_output and not verbose:
                # Imported under the redirect below, Taichi would log that it found a "graphical shell".
                import taichi  # noqa: F401
            _CURRENT.append(report)
            try:
                # --json: stdout holds the summary alone; whatever else would print there goes to stderr.
                with contextlib.redirect_stdout(sys.stderr) if json_output else contextlib.nullcontext():
                    result = checked(*args, **kwargs)
                report.metrics = _finite(report.metrics)
                report.finish(stdout)
                return result
            finally:
                _CURRENT.remove(report)

        parameters = list(signature.parameters.values())
        annotations = dict(getattr(fn, "__annotations__", {}))
        for pname, annotation, default in shared:
            parameters.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                annotation=annotation))
            annotations[pname] = annotation
        wrapper.__signature__ = signature.replace(parameters=parameters)
        wrapper.__annotations__ = annotations
        return wrapper

    return decorate
