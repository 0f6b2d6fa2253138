"""IDR networks and losses: encoding, geometric initialisation, gradients, loss formulas."""

import math

import pytest
import torch

from taichi_dr.implicit.sphere_tracing import sphere_trace
from taichi_dr.losses.implicit import alpha_schedule, eikonal_loss, mask_loss, rgb_loss
from taichi_dr.nets import encodings, rendering
from taichi_dr.nets.encodings import FrequencyEncoding
from taichi_dr.nets.fields import GeometryNetwork, PositionalEncoding, RenderingNetwork


def test_positional_encoding():
    enc = PositionalEncoding(3, 2)
    x = torch.tensor([[0.1, -0.2, 0.3]])
    y = enc(x)
    assert y.shape == (1, 15) and enc.out_dim == 15
    want = torch.cat([x, torch.sin(x), torch.cos(x), torch.sin(2 * x), torch.cos(2 * x)], dim=-1)
    assert torch.allclose(y, want)
    assert torch.equal(PositionalEncoding(3, 0)(x), x)


# Outputs of the networks before encodings became components (the committed nets/fields.py of the layout
# move, commit ad58294), for torch.manual_seed(0) and the inputs of _fixed_inputs(): float64, CPU.
OLD_GEOMETRY = [
    [0.6086518971890003, 0.6086578122760233, 0.6086051507987076, 0.6085250556894648, 0.6087223759659475],
    [-0.1283988517332043, -0.12839103373087274, -0.12840356295930194, -0.1284364766792433, -0.12835557208413395],
    [-0.1098933011585963, -0.10988064789255092, -0.10987774021633007, -0.10984503477879481, -0.10979950167224517],
    [0.933994486993426, 0.9340703808706134, 0.9340581275591013, 0.9341146558893159, 0.9342643433753759]]
OLD_RENDERING = [[0.5232275586608218, 0.5350921235496277, 0.4680739649585931],
                 [0.5152552874606066, 0.5419177052459863, 0.44444116244918963],
                 [0.49686883638406454, 0.5458621722985325, 0.4644509638386334],
                 [0.4909991342595057, 0.5597392880092127, 0.47176983572898906]]


def _fixed_inputs():
    x = torch.linspace(-0.9, 0.8, 12, dtype=torch.float64).reshape(4, 3)
    n = torch.nn.functional.normalize(x.flip(0), dim=-1)
    v = torch.nn.functional.normalize(x + 0.3, dim=-1)
    return x, n, v


@pytest.mark.parametrize("explicit", [False, True])
def test_same_numbers_as_before_the_split(explicit):
    """Same seed, same networks: the default encodings (or the same ones given as components) reproduce the
    values of the networks before the split, and the state_dict keys (checkpoints) are unchanged."""
    torch.manual_seed(0)
    if explicit:
        geo = GeometryNetwork(feature_dim=4, depth=4, width=32, skip_in=(2,), encoding=FrequencyEncoding(3, 3))
        ren = RenderingNetwork(feature_dim=4, depth=2, width=16, view_encoding=FrequencyEncoding(3, 4))
    else:
        geo = GeometryNetwork(feature_dim=4, depth=4, width=32, skip_in=(2,), n_frequencies=3)
        ren = RenderingNetwork(feature_dim=4, depth=2, width=16, n_frequencies=4)
    geo, ren = geo.double(), ren.double()
    x, n, v = _fixed_inputs()
    out = geo(x)
    # Equal to a few float64 ulps: BLAS picks its summation order by CPU (on the AVX-512 machine of a later
    # session the geometry differed from the recorded values by 1 ulp, 2.2e-16). Any change to the networks'
    # seeding, initialisation or layer order moves them by 1e-6 or more.
    ulps = dict(rtol=0.0, atol=1e-15)
    torch.testing.assert_close(out, torch.tensor(OLD_GEOMETRY, dtype=torch.float64), **ulps)
    torch.testing.assert_close(ren(x, n, v, out[:, 1:]), torch.tensor(OLD_RENDERING, dtype=torch.float64), **ulps)
    assert len(geo.state_dict()) == 15 and len(ren.state_dict()) == 9
    assert not any("encoding" in k for k in [*geo.state_dict(), *ren.state_dict()])


def test_encodings_are_components():
    assert PositionalEncoding is FrequencyEncoding and rendering.RenderingNetwork is RenderingNetwork
    assert GeometryNetwork().encoding.n_frequencies == 6 and RenderingNetwork().view_encoding.n_frequencies == 4

    class Doubling(torch.nn.Module):
        """[x, 2x]: an encoding that starts with the raw input."""
        in_dim, out_dim, includes_input = 3, 6, True

        def forward(self, x):
            return torch.cat([x, 2 * x], -1)

    torch.manual_seed(0)
    net = GeometryNetwork(feature_dim=2, depth=2, width=16, skip_in=(1,), encoding=Doubling())
    assert net.layers[0].weight.shape[1] == 6 and net(torch.zeros(5, 3)).shape == (5, 3)
    w0 = net.layers[0].weight
    assert w0.shape == (16 - 6, 6) and not w0[:, 3:].any() and w0[:, :3].all()  # geometric init: raw x only
    ren = RenderingNetwork(feature_dim=2, depth=1, width=8, view_encoding=Doubling())
    assert ren.layers[0].weight.shape[1] == 3 + 3 + 6 + 2
    with pytest.raises(ValueError, match="give n_frequencies or encoding, not both"):
        GeometryNetwork(n_frequencies=2, encoding=Doubling())
    with pytest.raises(ValueError, match="give n_frequencies or view_encoding, not both"):
        RenderingNetwork(n_frequencies=2, view_encoding=Doubling())
    with pytest.raises(ValueError, match="encoding takes 2-d inputs, expected 3-d"):
        GeometryNetwork(encoding=FrequencyEncoding(2, 1))
    with pytest.raises(TypeError, match="encoding must be an nn.Module"):
        RenderingNetwork(view_encoding=lambda v: v)

    class NoRaw(Doubling):
        includes_input = False

    with pytest.raises(ValueError, match="geometric_init needs an encoding"):
        GeometryNetwork(encoding=NoRaw())
    assert GeometryNetwork(depth=2, width=16, skip_in=(), encoding=NoRaw(), geometric_init=False)
    with pytest.raises(ValueError, match="n_frequencies must be >= 0"):
        encodings.FrequencyEncoding(3, -1)


@pytest.mark.parametrize("frequencies", [0, 6])
def test_geometric_init_is_roughly_a_sphere(frequencies):
    """IDR's initialisation: f(x) ~ |x| - r up to the random fluctuations of a finite-width network."""
    torch.manual_seed(0)
    net = GeometryNetwork(feature_dim=16, n_frequencies=frequencies, init_radius=0.6)   # IDR's 8 x 256
    u = torch.randn(400, 3)
    u = u / u.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        res = sphere_trace(net.sdf, 3 * u, -u)                    # radial rays from outside
    radius = res.points.norm(dim=-1)
    assert res.hit.all() and 0.5 < radius.mean() < 0.75 and radius.min() > 0.4
    out, g = net.gradient(u * 0.6, create_graph=False)
    assert out.shape == (400, 17)
    assert (out[:, 0] - 0.0).abs().mean() < 0.12
    assert (g.norm(dim=-1) - 1).abs().mean() < 0.3
    assert net.sdf(torch.zeros(1, 3)).item() < -0.3              # inside at the centre


@pytest.mark.parametrize("skip_in", [(), (2,)])
def test_sdf_is_forward_column_zero_in_value_and_gradient(skip_in):
    """``sdf`` computes only the SDF row of the output layer; it must be ``forward(x)[:, 0]`` exactly (float64)
    and train the same parameters the same way."""
    torch.manual_seed(3)
    net = GeometryNetwork(feature_dim=7, depth=3, width=16, skip_in=skip_in, n_frequencies=2).double()
    x = torch.randn(20, 3, dtype=torch.float64) * 0.6
    full = net(x)[:, 0]
    head = net.sdf(x)
    assert head.shape == (20,)
    assert torch.allclose(head, full, rtol=1e-12, atol=1e-12)
    params = list(net.parameters())
    g_full = torch.autograd.grad(full.sin().sum(), params, allow_unused=True)
    g_head = torch.autograd.grad(head.sin().sum(), params, allow_unused=True)
    for a, b in zip(g_full, g_head, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_gradient_matches_finite_differences():
    torch.manual_seed(1)
    net = GeometryNetwork(feature_dim=4, depth=4, width=32, skip_in=(2,), n_frequencies=3).double()
    x = torch.randn(5, 3, dtype=torch.float64) * 0.5
    _, g = net.gradient(x)
    eps = 1e-6
    for k in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[k] = eps
        fd = (net.sdf(x + e) - net.sdf(x - e)) / (2 * eps)
        assert torch.allclose(g[:, k], fd, atol=1e-6)
    # create_graph: the gradient is differentiable in the weights (needed by the eikonal loss)
    _, g = net.gradient(x, create_graph=True)
    (w_grad,) = torch.autograd.grad(eikonal_loss(g), [net.layers[0].parametrizations.weight.original1])
    assert torch.isfinite(w_grad).all() and w_grad.abs().sum() > 0


def test_skip_connection_and_errors():
    net = GeometryNetwork(feature_dim=2, depth=4, width=40, skip_in=(2,), n_frequencies=1)
    assert net.layers[1].weight.shape[0] == 40 - 9       # layer before the skip leaves room for the input
    assert net.layers[2].weight.shape[1] == 40
    with pytest.raises(ValueError, match="skip_in"):
        GeometryNetwork(depth=3, skip_in=(4,))
    with pytest.raises(ValueError, match="too small"):
        GeometryNetwork(depth=4, width=8, skip_in=(2,), n_frequencies=6)


def test_rendering_network():
    net = RenderingNetwork(feature_dim=8, depth=2, width=16, n_frequencies=4)
    m = 7
    rgb = net(torch.randn(m, 3), torch.randn(m, 3), torch.randn(m, 3), torch.randn(m, 8))
    assert rgb.shape == (m, 3) and ((rgb > 0) & (rgb < 1)).all()
    # the view direction matters (view-dependent colour)
    p, n, z = torch.randn(1, 3), torch.randn(1, 3), torch.randn(1, 8)
    a = net(p, n, torch.tensor([[0.0, 0, 1]]), z)
    b = net(p, n, torch.tensor([[1.0, 0, 0]]), z)
    assert not torch.allclose(a, b)


def test_eikonal_loss():
    g = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 0.5]])
    assert eikonal_loss(g).item() == pytest.approx((0 + 1 + 0.25) / 3)
    assert eikonal_loss(torch.zeros(0, 3)).item() == 0


def test_mask_loss_formula_and_gradient():
    sdf = torch.tensor([0.1, -0.05, 0.0, 0.3], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([False, True, True, True])
    alpha = 50.0
    loss = mask_loss(sdf, target, alpha, n_rays=10)
    p = torch.sigmoid(-alpha * sdf)
    bce = -(target * torch.log(p) + (~target) * torch.log(1 - p))
    assert loss.item() == pytest.approx(bce.sum().item() / (alpha * 10))
    (g,) = torch.autograd.grad(loss, sdf)
    # descent pulls an object ray's SDF down (negative = inside) and pushes a background ray's up:
    # d loss / d f = (target - sigmoid(-alpha f)) / n_rays
    assert g[1] > 0 and g[3] > 0 and g[0] < 0
    assert torch.allclose(g, (target.double() - p.detach()) / 10, rtol=1e-9)
    # huge alpha and SDF: still finite
    big = mask_loss(torch.tensor([1e3, -1e3]), torch.tensor([True, False]), 1e4)
    assert math.isfinite(big.item())
    with pytest.raises(ValueError, match="alpha"):
        mask_loss(sdf, target, 0.0)


def test_rgb_loss_and_alpha_schedule():
    pred = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.0, 0.0]])
    target = torch.tensor([[0.5, 0.25, 0.5], [0.0, 0.0, 0.0]])
    assert rgb_loss(pred, target, n_rays=4).item() == pytest.approx(1.25 / 4)
    assert alpha_schedule(0, 2000) == 50
    assert alpha_schedule(250, 2000) == 100          # IDR: doubled every 250 of 2000 epochs
    assert alpha_schedule(1249, 2000) == 50 * 2 ** 4
    assert alpha_schedule(1999, 2000) == 50 * 2 ** 5


def test_finite_difference_gradient_matches_autograd_and_trains_by_first_order_backward():
    """GeometryNetwork.gradient falls back to central differences for an encoding without double backward
    (the hash grid); the differences equal autograd's gradient to O(h^2), and their eikonal loss trains the
    network by ordinary backward (the gradient of the loss matches finite differences of the loss itself)."""

    torch.manual_seed(0)
    net = GeometryNetwork(feature_dim=4, depth=2, width=32, skip_in=(), beta=10.0, use_weight_norm=False,
                          encoding=FrequencyEncoding(3, 2), finite_difference_step=1e-4).double()
    x = torch.rand(64, 3, dtype=torch.float64) - 0.5
    _, g_autograd = net.gradient(x, create_graph=False)
    g_fd = net.finite_difference_gradient(x)
    assert torch.allclose(g_fd, g_autograd, atol=1e-6)

    class NoDoubleBackward(FrequencyEncoding):
        supports_double_backward = False

    net.encoding = NoDoubleBackward(3, 2)
    out, g = net.gradient(x, create_graph=True)
    assert torch.equal(g, net.finite_difference_gradient(x))
    assert torch.equal(out, net(x))
    loss = ((g.norm(dim=-1) - 1) ** 2).mean()
    (grad_w,) = torch.autograd.grad(loss, net.layers[0].weight)
    # One weight's derivative of the same loss by central differences of the loss.
    w = net.layers[0].weight
    eps = 1e-6
    with torch.no_grad():
        w[0, 0] += eps
        up = ((net.finite_difference_gradient(x).norm(dim=-1) - 1) ** 2).mean()
        w[0, 0] -= 2 * eps
        down = ((net.finite_difference_gradient(x).norm(dim=-1) - 1) ** 2).mean()
        w[0, 0] += eps
    assert float(grad_w[0, 0]) == pytest.approx(float((up - down) / (2 * eps)), rel=1e-4, abs=1e-8)


def test_geometry_network_refuses_a_non_positive_finite_difference_step():
    with pytest.raises(ValueError, match="finite_difference_step"):
        GeometryNetwork(depth=2, width=16, skip_in=(), finite_difference_step=0.0)
