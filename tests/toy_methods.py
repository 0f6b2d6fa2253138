"""Toy training methods whose costs are a matter of arithmetic (the viewer's budget tests)."""

import time

import torch

from taichi_dr.pipelines import Method


class SlowToy(Method):
    """A method whose step takes 10 ms and whose render takes 20 ms: the budget is a matter of arithmetic."""

    name = "slow-toy"

    def __init__(self):
        self.weight = torch.zeros(3, requires_grad=True)

    def param_groups(self):
        return [{"params": [self.weight]}]

    def step(self, batch, iteration):
        time.sleep(0.01)
        loss = ((self.weight - 1.0) ** 2).sum()
        return loss, {}

    def render(self, cameras, **options):
        time.sleep(0.02)
        h, w = cameras.image_size
        return {"rgb": torch.full((1, h, w, 3), 0.5), "alpha": torch.ones(1, h, w)}

    def state_dict(self):
        return {"weight": self.weight.detach().clone()}

    def load_state_dict(self, state):
        self.weight.data.copy_(state["weight"])
