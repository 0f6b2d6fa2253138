"""The shared training engine: schedules, clipping, checkpoints, interrupts and resume, the non-finite policy,
progress, metrics log and callbacks, on two toy methods (tests/pipelines/engine_subprocess_toy.py)."""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from taichi_dr.pipelines import checkpoint as checkpoint_module
from taichi_dr.pipelines.callbacks import Callback, MetricsLog, ProgressCallback, Validation, format_duration
from taichi_dr.pipelines.checkpoint import CheckpointError, load_checkpoint
from taichi_dr.pipelines.config import OptimizerConfig, TrainConfig, lr_factor
from taichi_dr.pipelines.engine import Interrupted, NonFiniteError, Trainer, clip_gradients

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine_subprocess_toy import ManualSGDRegression, NoisyLinearRegression  # noqa: E402

REPO = HERE.parent.parent


def toy(seed: int = 0, **kwargs) -> NoisyLinearRegression:
    torch.manual_seed(seed)  # as the contract asks of callers: seed, then build the method
    return NoisyLinearRegression(**kwargs)


def config(iterations: int = 30, **kwargs) -> TrainConfig:
    kwargs.setdefault("progress", "none")
    kwargs.setdefault("optimizer", OptimizerConfig(lr=0.05))
    return TrainConfig(iterations=iterations, **kwargs)


def rows_of(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


def assert_same_training(a: Trainer, b: Trainer) -> None:
    """Bitwise: the parameters, the optimiser state, the engine generator and the history (times aside)."""
    for (name, pa), pb in zip(a.method.linear.named_parameters(), b.method.linear.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for key in sa["state"]:
        for field_name, value in sa["state"][key].items():
            assert torch.equal(value, sb["state"][key][field_name]), (key, field_name)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert without_time(a.history) == without_time(b.history)


class At(Callback):
    """Call ``action(state)`` in on_step when the completed iteration is ``iteration``."""

    def __init__(self, iteration, action):
        self.iteration, self.action = iteration, action

    def on_step(self, state):
        if state.iteration == self.iteration:
            self.action(state)


# --------------------------------------------------------------------------------------------- schedules


def test_lr_schedule_values_against_hand_computed():
    n = 100
    constant = OptimizerConfig(warmup=4)
    assert [lr_factor(constant, i, n) for i in (0, 1, 3, 4, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    multistep = OptimizerConfig(schedule="multistep", milestones=(0.5, 0.75), gamma=0.1)
    got = [lr_factor(multistep, i, n) for i in (0, 49, 50, 74, 75, 99)]
    assert got == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rel=1e-12)
    exponential = OptimizerConfig(schedule="exponential", gamma=0.01)
    got = [lr_factor(exponential, i, n) for i in (0, 50, 100)]
    assert got == pytest.approx([1.0, 0.1, 0.01], rel=1e-12)
    cosine = OptimizerConfig(schedule="cosine", gamma=0.1)
    got = [lr_factor(cosine, i, n) for i in (0, 25, 50, 100)]
    assert got == pytest.approx([1.0, 0.1 + 0.45 * (1 + math.sqrt(0.5)), 0.55, 0.1], rel=1e-12)
    cosine_warm = OptimizerConfig(schedule="cosine", gamma=0.1, warmup=10)
    assert lr_factor(cosine_warm, 4, n) == pytest.approx(0.5 * (0.1 + 0.45 * (1 + math.cos(math.pi * 0.04))))


def test_schedule_applied_per_group_from_its_base_lr():
    """Each group's lr at step i is its own base (OptimizerConfig.lr or the group's "lr") times factor(i)."""
    seen = {}

    class Record(Callback):
        def on_step(self, state):
            seen[state.iteration - 1] = [g["lr"] for g in state.trainer.optimizer.param_groups]

    opt = OptimizerConfig(lr=0.2, schedule="multistep", milestones=(0.5,), gamma=0.5, warmup=2)
    Trainer(toy(lr_head=0.03), config(10, optimizer=opt), callbacks=[Record()]).fit()
    assert seen[0] == pytest.approx([0.1, 0.015])      # warm-up 1/2
    assert seen[1] == pytest.approx([0.2, 0.03])
    assert seen[4] == pytest.approx([0.2, 0.03])
    assert seen[5] == pytest.approx([0.1, 0.015])      # milestone int(0.5 * 10) = 5
    assert seen[9] == pytest.approx([0.1, 0.015])


def test_config_validation_one_line_naming_the_field():
    cases = [(dict(name="lbfgs"), "OptimizerConfig.name"), (dict(lr=-1.0), "OptimizerConfig.lr"),
             (dict(lr=float("nan")), "OptimizerConfig.lr"), (dict(milestones=(0.5, 1.5)), "milestones"),
             (dict(milestones=(0.7, 0.3)), "milestones"), (dict(schedule="poly"), "OptimizerConfig.schedule"),
             (dict(grad_clip=0.0), "OptimizerConfig.grad_clip"), (dict(warmup=-1), "OptimizerConfig.warmup")]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=re.escape(name)) as info:
            OptimizerConfig(**kwargs)
        assert "\n" not in str(info.value)
    for kwargs, name in [(dict(iterations=0), "TrainConfig.iterations"),
                         (dict(iterations=5, progress="tqdm"), "TrainConfig.progress"),
                         (dict(iterations=5, max_nonfinite=0), "TrainConfig.max_nonfinite"),
                         (dict(iterations=5, checkpoint_every=-1), "TrainConfig.checkpoint_every")]:
        with pytest.raises(ValueError, match=re.escape(name)):
            TrainConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown field.*learning_rate"):
        TrainConfig.from_dict({"iterations": 3, "learning_rate": 1})


def test_config_round_trips_through_json():
    cfg = TrainConfig(iterations=7, seed=3, checkpoint_every=2, optimizer=OptimizerConfig(
        name="sgd", momentum=0.9, schedule="multistep", milestones=(0.25, 0.5), grad_clip=1.5))
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# --------------------------------------------------------------------------------------------- clipping


def test_clip_gradients_scales_to_the_max_norm():
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    before = clip_gradients([a, b], 1.0)
    assert float(before) == pytest.approx(5.0)
    assert torch.cat([a.grad, b.grad]).norm().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(torch.cat([a.grad, b.grad]), torch.tensor([0.6, 0.0, 0.8]), atol=1e-6)
    assert float(clip_gradients([a, b], 10.0)) == pytest.approx(1.0, rel=1e-5)  # under the limit: unchanged
    assert torch.allclose(torch.cat([a.grad, b.grad]), torch.tensor([0.6, 0.0, 0.8]), atol=1e-6)


def test_trainer_clips_before_the_optimizer_step():
    norms = []

    class GradNorm(Callback):
        def on_step(self, state):
            grads = [p.grad for p in state.method.linear.parameters()]
            norms.append((state.stats["grad_norm"], torch.cat([g.flatten() for g in grads]).norm().item()))

    opt = OptimizerConfig(lr=1e-3, grad_clip=0.05)
    Trainer(toy(), config(5, optimizer=opt), callbacks=[GradNorm()]).fit()
    for before, after in norms:
        assert before > 0.05                                     # the toy's gradients start large
        assert after == pytest.approx(0.05, rel=1e-4)


# --------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_holds_the_contract_fields_and_loads_weights_only(tmp_path):
    trainer = Trainer(toy(), config(12, checkpoint_every=5), out_dir=tmp_path)
    trainer.fit()
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)   # plain types only
    assert payload["format"] == "taichi-dr-checkpoint" and payload["format_version"] == 1
    assert (payload["method"], payload["method_version"], payload["iteration"]) == ("toy-regression", 1, 12)
    assert set(payload["rng"]) == {"torch", "generator", "cuda"}
    assert payload["config"] == json.loads((tmp_path / "config.json").read_text())
    assert payload["nonfinite"] == {"consecutive": 0, "total": 0}
    assert [row["iteration"] for row in payload["history"]] == list(range(1, 13))
    assert torch.equal(payload["method_state"]["linear"]["weight"], trainer.method.linear.weight)
    assert load_checkpoint(tmp_path / "checkpoint.pt", trainer.method)["iteration"] == 12


@pytest.mark.parametrize("failure", [OSError("No space left on device"), KeyboardInterrupt()])
def test_checkpoint_write_is_atomic(tmp_path, monkeypatch, failure):
    trainer = Trainer(toy(), config(10, checkpoint_every=5), out_dir=tmp_path)
    trainer.fit()
    good = (tmp_path / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])   # half the file, then the failure
        raise failure

    monkeypatch.setattr(checkpoint_module.torch, "save", torn_save)
    with pytest.raises(type(failure)):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    assert load_checkpoint(tmp_path / "checkpoint.pt", trainer.method)["iteration"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]


class Stranger:
    """An arbitrary Python object: weights_only loading must refuse it."""


def test_load_refuses_bad_checkpoints_in_one_line(tmp_path):
    trainer = Trainer(toy(), config(3), out_dir=tmp_path / "run")
    trainer.fit()
    good = tmp_path / "run" / "checkpoint.pt"
    payload = torch.load(good, weights_only=True)

    class Version2(NoisyLinearRegression):
        version = 2

    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.zeros(2)}, foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a zip file at all" * 10)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    python_object = tmp_path / "object.pt"
    torch.save(dict(payload, method_state={"linear": Stranger()}), python_object)
    newer = tmp_path / "newer.pt"
    torch.save(dict(payload, format_version=99), newer)
    cases = [
        (tmp_path / "missing.pt", None, "no checkpoint there"),
        (foreign, None, "not a taichi-dr checkpoint"),
        (garbage, None, "unreadable checkpoint"),
        (truncated, None, "unreadable checkpoint"),
        (python_object, None, "Stranger, that weights_only loading refuses"),
        (newer, None, "format version 99"),
        (good, ManualSGDRegression(), "a checkpoint of method 'toy-regression', not 'toy-manual'"),
        (good, Version2(), "state version 1, this code reads version 2"),
    ]
    for path, method, message in cases:
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path, method)
        text = str(info.value)
        assert "\n" not in text and text.startswith(str(path)) and message in text, text
        assert isinstance(info.value, ValueError)
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        Trainer(toy(), config(3), out_dir=tmp_path / "empty", resume=True)


def test_resume_refusals(tmp_path):
    Trainer(toy(), config(6), out_dir=tmp_path).fit()
    with pytest.raises(ValueError, match="batch: checkpoint has 16, this run 8"):
        Trainer(toy(batch=8), config(6), out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="iteration 6, past TrainConfig.iterations=4"):
        Trainer(toy(), config(4), out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="optimizer 'adam', now 'sgd'"):
        Trainer(toy(), config(8, optimizer=OptimizerConfig(name="sgd")), out_dir=tmp_path, resume=True)


# --------------------------------------------------------------------------------------------- interrupts


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_then_resume_is_bitwise_identical(tmp_path, signum):
    whole = Trainer(toy(), config(30, checkpoint_every=10), out_dir=tmp_path / "whole")
    whole.fit()

    before = signal.getsignal(signum)
    send = At(13, lambda state: os.kill(os.getpid(), signum))
    first = Trainer(toy(), config(30, checkpoint_every=10), out_dir=tmp_path / "cut", callbacks=[send])
    with pytest.raises(Interrupted) as info:
        first.fit()
    assert isinstance(info.value, KeyboardInterrupt)
    assert (info.value.signum, info.value.iteration) == (signum, 13)
    assert info.value.checkpoint == tmp_path / "cut" / "checkpoint.pt"
    assert signal.getsignal(signum) is before                     # fit() put the previous handler back
    assert load_checkpoint(info.value.checkpoint)["iteration"] == 13
    assert [r["iteration"] for r in rows_of(tmp_path / "cut")] == list(range(1, 14))

    # A fresh process would build the method from another RNG state: the checkpoint must restore everything.
    resumed = Trainer(toy(seed=99), config(30, checkpoint_every=10), out_dir=tmp_path / "cut", resume=True)
    assert resumed.state.iteration == 13
    result = resumed.fit()
    assert result.iteration == 30 and not result.interrupted
    assert_same_training(whole, resumed)
    assert without_time(rows_of(tmp_path / "cut")) == without_time(rows_of(tmp_path / "whole"))


def test_resume_with_more_iterations_continues_the_same_run(tmp_path):
    whole = Trainer(toy(), config(24, checkpoint_every=0), out_dir=tmp_path / "whole")
    whole.fit()
    Trainer(toy(), config(10, checkpoint_every=0), out_dir=tmp_path / "ext").fit()
    longer = Trainer(toy(seed=5), config(24, checkpoint_every=0), out_dir=tmp_path / "ext", resume=True)
    longer.fit()
    assert_same_training(whole, longer)


def test_resume_takes_the_optimizer_settings_of_this_run(tmp_path):
    """The checkpoint holds Adam's moments; betas, eps and lr come from the configuration being resumed."""
    Trainer(toy(), config(6, optimizer=OptimizerConfig(lr=0.05, betas=(0.9, 0.999))), out_dir=tmp_path).fit()
    changed = OptimizerConfig(lr=0.01, betas=(0.5, 0.9), eps=1e-6)
    resumed = Trainer(toy(), config(8, optimizer=changed), out_dir=tmp_path, resume=True)
    for group in resumed.optimizer.param_groups:
        assert group["betas"] == (0.5, 0.9) and group["eps"] == 1e-6
    assert resumed.optimizer.state_dict()["state"], "the moments come back from the checkpoint"


def test_second_sigint_stops_at_once_without_saving(tmp_path):
    def twice(state):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    ended = []

    class End(Callback):
        def on_end(self, state, reason):
            ended.append(reason)

    trainer = Trainer(toy(), config(30, checkpoint_every=5), out_dir=tmp_path, callbacks=[At(8, twice), End()])
    with pytest.raises(KeyboardInterrupt) as info:
        trainer.fit()
    assert not isinstance(info.value, Interrupted)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 5    # the last periodic one stays
    assert ended == ["interrupted"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_fit_in_a_worker_thread_leaves_signal_handlers_alone(tmp_path):
    """Only the main thread can install handlers (a viewer may train in a worker): fit() runs without them."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    seen, results = [], []

    class Peek(Callback):
        def on_step(self, state):
            seen.append(signal.getsignal(signal.SIGINT))

    worker = threading.Thread(target=lambda: results.append(
        Trainer(toy(), config(5), out_dir=tmp_path, callbacks=[Peek()]).fit()))
    worker.start()
    worker.join()
    assert results and results[0].iteration == 5
    assert set(seen) == {handlers[signal.SIGINT]}
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers


def _start_child(out_dir: Path, iterations: int, every: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, str(HERE / "engine_subprocess_toy.py"), str(out_dir), str(iterations),
                             str(every)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO)


def _read_until(child: subprocess.Popen, iteration: int) -> int:
    """Read the child's ``iter N`` lines until N >= ``iteration``; returns N."""
    for line in child.stdout:
        if line.startswith("iter ") and int(line.split()[1]) >= iteration:
            return int(line.split()[1])
    raise AssertionError(f"child ended early: {child.stderr.read()[-2000:]}")


def _finish(child: subprocess.Popen, seen: int) -> tuple[int, str, str]:
    """Wait for the child; returns (last iteration it printed, rest of stdout, stderr). Reads through the same
    buffered pipe objects as _read_until, so no line read ahead is lost."""
    out, err = child.stdout.read(), child.stderr.read()
    child.wait(timeout=60)
    return max([seen] + [int(line.split()[1]) for line in out.splitlines() if line.startswith("iter ")]), out, err


def test_signals_from_outside(tmp_path):
    """Two child processes, started together since each pays the import of torch and Taichi: one gets SIGTERM
    and must save and exit 143; the other gets SIGKILL after a few checkpoints and must lose at most one
    checkpoint interval, then resume here to exactly what an uninterrupted run gives."""
    every = 10
    term = _start_child(tmp_path / "term", 100000, 0)
    kill = _start_child(tmp_path / "cut", 100000, every)
    try:
        seen_term = _read_until(term, 3)
        term.send_signal(signal.SIGTERM)
        seen_kill = _read_until(kill, 25)
        kill.send_signal(signal.SIGKILL)
        last, out, err = _finish(term, seen_term)
        assert term.returncode == 128 + signal.SIGTERM, err[-2000:]
        saved = load_checkpoint(tmp_path / "term" / "checkpoint.pt")["iteration"]
        assert saved == last >= 3                 # the step in flight finished, then it saved
        assert f"Interrupted at iteration {last}/100000; saved {tmp_path / 'term' / 'checkpoint.pt'}." in out
        last, _, _ = _finish(kill, seen_kill)
    finally:
        term.kill()
        kill.kill()
    assert kill.returncode == -signal.SIGKILL
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["iteration"]
    assert saved % every == 0 and last - every <= saved <= last

    # The child's settings (engine_subprocess_toy.main): seed 0, default optimiser, constant schedule, so a
    # shorter total than the child's changes nothing up to it.
    total = saved + 12
    resumed = Trainer(toy(seed=7), config(total, checkpoint_every=every, optimizer=OptimizerConfig()),
                      out_dir=tmp_path / "cut", resume=True)
    resumed.fit()
    whole = Trainer(toy(), config(total, checkpoint_every=every, optimizer=OptimizerConfig()),
                    out_dir=tmp_path / "whole")
    whole.fit()
    assert_same_training(whole, resumed)
    assert without_time(rows_of(tmp_path / "cut")) == without_time(rows_of(tmp_path / "whole"))


# --------------------------------------------------------------------------------------------- non-finite


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    weights = {}

    class Keep(Callback):
        def on_step(self, state):
            weights[state.iteration] = state.method.linear.weight.detach().clone()

    trainer = Trainer(toy(nan_at={3, 7}), config(12, max_nonfinite=2), out_dir=tmp_path, callbacks=[Keep()])
    result = trainer.fit()
    assert result.skipped == 2 and trainer.state.skipped_total == 2
    rows = rows_of(tmp_path)
    assert [r["iteration"] for r in rows if r["skipped"]] == [4, 8]   # 0-based steps 3, 7
    assert rows[3]["loss"] is None and rows[3]["grad_norm"] is None        # NaN written as JSON null
    assert torch.equal(weights[4], weights[3]) and torch.equal(weights[8], weights[7])
    assert not torch.equal(weights[5], weights[4])
    assert all(int(s["step"]) == 10 for s in trainer.optimizer.state_dict()["state"].values())   # Adam untouched


def test_nonfinite_streak_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    written = {}

    class Saved(Callback):
        def on_checkpoint(self, state, path):
            written[state.iteration] = path.read_bytes()

    ended = []

    class End(Callback):
        def on_end(self, state, reason):
            ended.append(reason)

    trainer = Trainer(toy(nan_at=set(range(12, 100))), config(40, checkpoint_every=5, max_nonfinite=5),
                      out_dir=tmp_path, callbacks=[Saved(), End()])
    with pytest.raises(NonFiniteError) as info:
        trainer.fit()
    text = str(info.value)
    assert "iterations 13-17" in text and f"{tmp_path / 'checkpoint.pt'}, iteration 10," in text
    assert "\n" not in text
    assert isinstance(info.value, FloatingPointError) and info.value.iterations == (13, 17)
    assert sorted(written) == [5, 10]                 # no checkpoint at 15 (inside the streak) nor at the stop
    assert (tmp_path / "checkpoint.pt").read_bytes() == written[10]
    assert ended == ["nonfinite"]
    assert [r["iteration"] for r in rows_of(tmp_path)][-1] == 17


def test_manual_optimization_method(tmp_path):
    whole = Trainer(ManualSGDRegression(nan_at={2}), config(60, checkpoint_every=5), out_dir=tmp_path / "whole")
    assert whole.optimizer is None
    result = whole.fit()
    assert result.skipped == 1 and rows_of(tmp_path / "whole")[2]["skipped"] == 1
    assert torch.allclose(whole.method.w, whole.method.w_true, atol=1e-4)   # the method's own SGD converged
    assert load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["optimizer"] is None

    cut = Trainer(ManualSGDRegression(nan_at={2}), config(60, checkpoint_every=5), out_dir=tmp_path / "cut",
                  callbacks=[At(7, lambda s: os.kill(os.getpid(), signal.SIGINT))])
    with pytest.raises(Interrupted):
        cut.fit()
    resumed = Trainer(ManualSGDRegression(nan_at={2}), config(60, checkpoint_every=5), out_dir=tmp_path / "cut",
                      resume=True)
    resumed.fit()
    assert torch.equal(resumed.method.w, whole.method.w)
    assert without_time(rows_of(tmp_path / "cut")) == without_time(rows_of(tmp_path / "whole"))


# --------------------------------------------------------------------------------------------- progress


PLAIN_LINE = re.compile(r"^iter (\d+)/30  loss [-+.\de]+  [.\d]+ it/s  ETA (\d+s|\d+m\d\ds|\d+h\d\dm|\?)$")


def test_plain_progress_when_not_a_terminal(capsys):
    Trainer(toy(), config(30, progress="auto", progress_every_s=3600)).fit()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines                                  # first and last, nothing between
    assert [int(PLAIN_LINE.match(line).group(1)) for line in lines] == [1, 30]

    Trainer(toy(), config(30, progress="plain", progress_every_s=0)).fit()
    lines = capsys.readouterr().err.splitlines()
    assert [int(PLAIN_LINE.match(line).group(1)) for line in lines] == list(range(1, 31))

    Trainer(toy(), config(30, progress="none")).fit()
    assert capsys.readouterr().err == ""


def test_progress_line_contents():
    stream = io.StringIO()
    validation = Validation(10, lambda state: {"psnr": 21.3})
    progress = ProgressCallback("plain", every_s=3600, stream=stream)
    Trainer(toy(nan_at={4}), config(30), callbacks=[validation, progress]).fit()
    last = stream.getvalue().splitlines()[-1]
    assert re.match(r"^iter 30/30  loss [-.\de]+  psnr 21\.3  skipped 1  [.\d]+ it/s  ETA 0s$", last), last
    assert [format_duration(s) for s in (45, 141, 3780, float("inf"))] == ["45s", "2m21s", "1h03m", "?"]


def test_rich_progress_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    Trainer(toy(), config(5), callbacks=[ProgressCallback("auto", stream=stream)]).fit()
    assert "5/5" in stream.getvalue() and "iter " not in stream.getvalue()


# --------------------------------------------------------------------------------------------- logs, callbacks


def test_metrics_log_and_config_json(tmp_path):
    trainer = Trainer(toy(), config(8, seed=4, checkpoint_every=3), out_dir=tmp_path)
    trainer.fit()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["method"] == "toy-regression" and saved["method_version"] == 1
    assert TrainConfig.from_dict(saved["train"]) == trainer.config
    assert saved["method_config"] == {"d_in": 3, "d_out": 2, "batch": 16}
    assert isinstance(saved["taichi_dr"], str)
    rows = rows_of(tmp_path)
    assert [r["iteration"] for r in rows] == list(range(1, 9))
    assert list(rows[0]) == ["iteration", "loss", "mae", "batch", "grad_norm", "lr", "skipped", "time_s"]
    assert rows == trainer.history
    assert all(b["time_s"] >= a["time_s"] for a, b in zip(rows, rows[1:], strict=False))
    assert rows[-1]["loss"] == trainer.state.stats["loss"]


def test_metrics_log_flushes_periodically(tmp_path):
    """Rows reach the file during the run (at checkpoints and every flush_every_s), not only at the end."""
    seen = []
    peek = At(9, lambda state: seen.append(len((tmp_path / "metrics.jsonl").read_text().splitlines())))
    Trainer(toy(), config(12, checkpoint_every=4), out_dir=tmp_path, callbacks=[peek]).fit()
    assert seen == [8]                                # fsynced at the checkpoint of iteration 8
    seen.clear()
    log = MetricsLog(flush_every_s=0.0)
    Trainer(toy(), config(12, checkpoint_every=0), out_dir=tmp_path, callbacks=[peek, log]).fit()
    assert seen == [7]                                # rows up to the previous step are on disk


def test_validation_merges_metrics_and_callbacks_see_the_method(tmp_path):
    calls, events = [], []

    def validate(state):
        images = state.method.render(cameras=[0, 1])["rgb"]
        calls.append((state.iteration, torch.is_grad_enabled(), images.mean().item()))
        return {"mean_rgb": images.mean(), "views": images.shape[0]}

    class Events(Callback):
        def on_start(self, state):
            events.append(("start", state.iteration, state.method))

        def on_step(self, state):
            events.append(("step", state.iteration))

        def on_checkpoint(self, state, path):
            events.append(("checkpoint", state.iteration, path.name))

        def on_end(self, state, reason):
            events.append(("end", reason))

    method = toy()
    trainer = Trainer(method, config(10, checkpoint_every=5), out_dir=tmp_path,
                      callbacks=[Validation(4, validate), Events()])
    trainer.fit()
    assert [(i, grad) for i, grad, _ in calls] == [(4, False), (8, False)]   # run without autograd
    rows = rows_of(tmp_path)
    assert [r["iteration"] for r in rows if "mean_rgb" in r] == [4, 8] and rows[3]["views"] == 2.0
    assert [rows[3]["mean_rgb"], rows[7]["mean_rgb"]] == [value for _, _, value in calls]
    assert calls[0][2] != calls[1][2]                 # rendered from the live (changing) parameters
    assert events[0] == ("start", 0, method)
    assert events[1:6] == [("step", i) for i in range(1, 6)] and events[6] == ("checkpoint", 5, "checkpoint.pt")
    assert events[-2:] == [("checkpoint", 10, "checkpoint.pt"), ("end", "done")]
    assert method.iterations_started == list(range(10)) and method.ended == 1


def test_adam_is_fused_where_torch_has_it_and_steps_as_the_plain_one():
    """The engine builds torch's fused Adam for large float CPU/CUDA parameter sets (one pass over the state
    instead of a dozen: it matters for hash tables of millions of entries), the default one for small sets;
    the fused one updates as the default implementation."""
    from taichi_dr.pipelines.engine import FUSED_ADAM_MIN_PARAMETERS, fused_adam_option

    w = torch.nn.Parameter(torch.randn(1000, dtype=torch.float64))
    table = torch.nn.Parameter(torch.zeros(FUSED_ADAM_MIN_PARAMETERS))
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    assert fused_adam_option([w]) == {}
    assert fused_adam_option([w, table]) == ({"fused": True} if version >= (2, 4) else {})
    w_fused = {"fused": True} if version >= (2, 4) else {}
    grads = [torch.randn(1000, dtype=torch.float64) for _ in range(3)]
    results = []
    for option in (w_fused, {"foreach": False}):
        p = torch.nn.Parameter(w.detach().clone())
        opt = torch.optim.Adam([p], lr=1e-2, **option)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results.append(p.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)
