"""The bridge between Taichi kernels and torch autograd (taichi_dr.core.bridge): gradients of a small op
against finite differences, in-place changes of saved tensors caught, double backward refused."""

import pytest
import taichi as ti
import torch

from taichi_dr.core import bridge, runtime


@runtime.locked
@ti.kernel
def _cube_kernel(x: ti.types.ndarray(), scale: ti.types.ndarray(), y: ti.types.ndarray()):
    for i in range(x.shape[0]):
        y[i] = scale[0] * x[i] * x[i] * x[i]


@runtime.locked
@ti.kernel
def _cube_grad_kernel(x: ti.types.ndarray(), scale: ti.types.ndarray(), g: ti.types.ndarray(),
                      gx: ti.types.ndarray(), gs: ti.types.ndarray()):
    for i in range(x.shape[0]):
        gx[i] = 3.0 * scale[0] * x[i] * x[i] * g[i]
        gs[i] = x[i] * x[i] * x[i] * g[i]


class CubeOp(bridge.KernelOp):
    """y = scale * x^3 elementwise: x (N,), scale (1,). The backward reads both inputs from ``saved``."""

    def forward(self, x, scale):
        y = torch.empty_like(x)
        _cube_kernel(x, scale, y)
        return (y,), {"inputs": (x, scale)}

    def backward(self, saved, g):
        x, scale = saved["inputs"]
        gx, gs = torch.empty_like(x), torch.empty_like(x)
        _cube_grad_kernel(x, scale, g, gx, gs)
        return gx, gs.sum().reshape(1)


def cube(x, scale):
    return bridge.apply(CubeOp(), x, scale)[0]


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_(True)
    scale = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    return x, scale


def test_gradcheck_small_op():
    x, scale = _inputs()
    assert torch.allclose(cube(x, scale), 0.7 * x.detach() ** 3, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(cube, (x, scale), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_create_graph_raises_naming_the_op():
    x, scale = _inputs()
    y = cube(x, scale).sum()
    with pytest.raises(RuntimeError, match=r"CubeOp: double backward \(create_graph=True\) is not supported"):
        torch.autograd.grad(y, x, create_graph=True)
    # without create_graph the same graph still differentiates
    (gx,) = torch.autograd.grad(cube(x, scale).sum(), x)
    assert torch.allclose(gx, 3 * 0.7 * x.detach() ** 2, rtol=1e-12, atol=0)


def test_create_graph_allowed_when_the_op_declares_it():
    class TorchBackwardCube(CubeOp):
        supports_double_backward = True

        def backward(self, saved, g):  # differentiable: plain torch on the saved inputs
            x, scale = saved["inputs"]
            return 3 * scale * x * x * g, (x ** 3 * g).sum().reshape(1)

    x, scale = _inputs()
    y = bridge.apply(TorchBackwardCube(), x, scale)[0].sum()
    (gx,) = torch.autograd.grad(y, x, create_graph=True)
    assert gx.grad_fn is not None
    assert torch.allclose(gx, 3 * 0.7 * x.detach() ** 2, rtol=1e-12, atol=0)


def test_inplace_change_of_saved_input_raises():
    x, scale = _inputs()
    h = x * 1.0                      # a non-leaf input the caller can change in place
    y = cube(h, scale).sum()
    with torch.no_grad():
        h.add_(1.0)                  # the backward would read the changed values
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_unchanged_saved_input_backward_twice_with_retain_graph():
    x, scale = _inputs()
    y = cube(x, scale).sum()
    y.backward(retain_graph=True)
    first = x.grad.clone()
    y.backward()
    assert torch.equal(x.grad, 2 * first)
