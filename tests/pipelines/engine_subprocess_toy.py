"""Toy methods for the engine tests, and a script that trains one in a child process (signal tests).

Run as ``python engine_subprocess_toy.py OUT_DIR ITERATIONS CHECKPOINT_EVERY [--resume]``: prints
``iter N`` after every step (flushed, so the parent knows how far it got), exits 0 when done and
128 + signum when interrupted (the engine saved a checkpoint first), as the apps do.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from taichi_dr.pipelines.callbacks import Callback
from taichi_dr.pipelines.config import TrainConfig
from taichi_dr.pipelines.engine import Interrupted, Method, Trainer


class NoisyLinearRegression(Method):
    """Fit y = x @ W_true.T + b_true + noise with a linear layer.

    Batches come from the engine generator; a small random perturbation of the target comes from torch's
    global RNG, so both checkpointed streams matter for bitwise resume. ``nan_at``: 0-based iterations whose
    loss is made NaN (the non-finite policy's tests).
    """

    name = "toy-regression"
    version = 1

    def __init__(self, d_in: int = 3, d_out: int = 2, batch: int = 16, nan_at=(), lr_head: float | None = None):
        self.linear = torch.nn.Linear(d_in, d_out)
        self.w_true = torch.arange(d_in * d_out, dtype=torch.float32).reshape(d_out, d_in) / 5 - 0.5
        self.b_true = torch.linspace(-1, 1, d_out)
        self.batch = batch
        self.nan_at = set(nan_at)
        self.lr_head = lr_head
        self.iterations_started: list[int] = []
        self.ended = 0

    def param_groups(self):
        groups = [{"params": [self.linear.weight], "name": "weight"}, {"params": [self.linear.bias], "name": "bias"}]
        if self.lr_head is not None:
            groups[1]["lr"] = self.lr_head
        return groups

    def sample(self, iteration, generator):
        x = torch.randn(self.batch, self.w_true.shape[1], generator=generator)
        noise = 0.05 * torch.randn(self.batch, self.w_true.shape[0], generator=generator)
        return x, x @ self.w_true.T + self.b_true + noise

    def step(self, batch, iteration):
        x, y = batch
        y = y + 0.01 * torch.randn(()).item()  # global RNG: checkpointed too
        residual = self.linear(x) - y
        loss = residual.square().mean()
        if iteration in self.nan_at:
            loss = loss * float("nan")
        return loss, {"mae": residual.detach().abs().mean(), "batch": float(self.batch)}

    def render(self, cameras, **options):
        # "Images" of the live state: the weight matrix as a one-channel image per view.
        w = self.linear.weight.detach()
        return {"rgb": w[None, :, :, None].expand(len(cameras), -1, -1, 3).clamp(0, 1)}

    def state_dict(self):
        return {"linear": self.linear.state_dict()}

    def load_state_dict(self, state):
        self.linear.load_state_dict(state["linear"])

    def config(self):
        return {"d_in": self.w_true.shape[1], "d_out": self.w_true.shape[0], "batch": self.batch}

    def check_resume(self, saved_config):
        if saved_config.get("batch") != self.batch:
            raise ValueError(f"batch: checkpoint has {saved_config.get('batch')}, this run {self.batch}")

    def on_iteration_start(self, iteration):
        self.iterations_started.append(iteration)

    def on_train_end(self):
        self.ended += 1


class ManualSGDRegression(Method):
    """The same regression with a hand-written SGD update inside step() (manual_optimization).

    The update is skipped on the device when the loss or gradient is non-finite, and reported as
    stats["finite"] (a 0-dim bool tensor), as the contract asks of such methods."""

    name = "toy-manual"
    version = 1
    manual_optimization = True

    def __init__(self, lr: float = 0.1, nan_at=()):
        self.w = torch.zeros(3, requires_grad=True)
        self.w_true = torch.tensor([0.5, -1.0, 2.0])
        self.lr = lr
        self.nan_at = set(nan_at)

    def sample(self, iteration, generator):
        x = torch.randn(8, 3, generator=generator)
        return x, x @ self.w_true

    def step(self, batch, iteration):
        x, y = batch
        loss = (x @ self.w - y).square().mean()
        if iteration in self.nan_at:
            loss = loss * float("nan")
        (grad,) = torch.autograd.grad(loss, [self.w])
        finite = torch.isfinite(loss) & torch.isfinite(grad).all()
        with torch.no_grad():
            self.w -= self.lr * torch.where(finite, grad, torch.zeros_like(grad))
        return loss.detach(), {"finite": finite}

    def render(self, cameras, **options):
        return {}

    def state_dict(self):
        return {"w": self.w.detach().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.w.copy_(state["w"])


class _Announce(Callback):
    """Print each completed iteration (flushed) and slow the loop a little so the parent can signal it."""

    def __init__(self, sleep_s: float):
        self.sleep_s = sleep_s

    def on_step(self, state):
        print(f"iter {state.iteration}", flush=True)
        time.sleep(self.sleep_s)


def main(argv: list[str]) -> int:
    out_dir, iterations, every = argv[0], int(argv[1]), int(argv[2])
    resume = "--resume" in argv
    torch.manual_seed(0)
    method = NoisyLinearRegression()
    config = TrainConfig(iterations=iterations, seed=0, checkpoint_every=every, progress="none")
    trainer = Trainer(method, config, out_dir=out_dir, callbacks=[_Announce(0.01)], resume=resume)
    print("started", flush=True)
    try:
        trainer.fit()
    except Interrupted as stop:
        print(f"Interrupted at iteration {stop.iteration}/{iterations}; saved {stop.checkpoint}.", flush=True)
        return 128 + stop.signum
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    # The checkpoint is already fsynced; skip the interpreter teardown of torch and Taichi (~0.6 s) to keep
    # the signal tests fast.
    os._exit(code)
