import io

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from bundle_test_utils import randomise_parameters

from scripts.networks.kan import KANConv2d, KANLinear, b_spline_bases, make_uniform_grid


def _cox_de_boor(x: float, knots: list, i: int, order: int) -> float:
    # Textbook scalar recursion, independent of the vectorised implementation under test.
    if order == 0:
        return 1.0 if knots[i] <= x < knots[i + 1] else 0.0
    left = (x - knots[i]) / (knots[i + order] - knots[i]) * _cox_de_boor(x, knots, i, order - 1)
    right = (knots[i + order + 1] - x) / (knots[i + order + 1] - knots[i + 1])
    return left + right * _cox_de_boor(x, knots, i + 1, order - 1)


def test_uniform_grid():
    grid = make_uniform_grid(5, 3, (-1.0, 1.0))
    assert grid.shape == (12,)
    torch.testing.assert_close(grid, torch.linspace(-2.2, 2.2, 12, dtype=torch.float64))
    with pytest.raises(ValueError):
        make_uniform_grid(5, 3, (1.0, -1.0))


@pytest.mark.parametrize(
    "grid_size, spline_order, grid_range", [(5, 3, (-1.0, 1.0)), (7, 2, (-2.0, 3.0)), (3, 1, (0.0, 1.0))]
)
def test_partition_of_unity(grid_size, spline_order, grid_range):
    grid = make_uniform_grid(grid_size, spline_order, grid_range)
    x = torch.linspace(grid_range[0], grid_range[1], 201, dtype=torch.float64)
    bases = b_spline_bases(x, grid, spline_order)
    assert bases.shape == (201, grid_size + spline_order)
    assert (bases >= 0).all()
    torch.testing.assert_close(bases.sum(-1), torch.ones_like(x))
    # Beyond the extended knots every basis vanishes.
    outside = torch.tensor([grid[0].item() - 0.1, grid[-1].item() + 0.1], dtype=torch.float64)
    assert (b_spline_bases(outside, grid, spline_order) == 0).all()


def test_bases_match_scalar_recursion():
    grid = make_uniform_grid(5, 3)
    x = torch.linspace(-2.5, 2.5, 37, dtype=torch.float64)
    bases = b_spline_bases(x.view(37, 1), grid, 3)
    assert bases.shape == (37, 1, 8)
    knots = grid.tolist()
    expected = torch.tensor([[_cox_de_boor(v, knots, i, 3) for i in range(8)] for v in x.tolist()]).double()
    torch.testing.assert_close(bases[:, 0], expected)


@pytest.mark.parametrize(
    "grid_size, spline_order, grid_range", [(5, 0, (-1.0, 1.0)), (4, 1, (0.0, 2.0)), (6, 2, (-3.0, 1.0))]
)
def test_bases_of_every_order_match_scalar_recursion_at_and_between_knots(grid_size, spline_order, grid_range):
    grid = make_uniform_grid(grid_size, spline_order, grid_range)
    knots = grid.tolist()
    # every knot, the midpoints between them, and points beyond both ends of the extended grid
    points = sorted(knots + [(a + b) / 2 for a, b in zip(knots, knots[1:])] + [knots[0] - 0.3, knots[-1] + 0.3])
    bases = b_spline_bases(torch.tensor(points, dtype=torch.float64), grid, spline_order)
    num_bases = grid_size + spline_order
    expected = torch.tensor([[_cox_de_boor(v, knots, i, spline_order) for i in range(num_bases)] for v in points])
    torch.testing.assert_close(bases, expected.double())


def test_bases_gradient():
    grid = make_uniform_grid(5, 3)
    x = (torch.rand(40, dtype=torch.float64) * 4.0 - 2.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: b_spline_bases(t, grid, 3), (x,))


def test_bases_refuse_unequal_knots():
    with pytest.raises(ValueError, match="equally spaced knots"):
        b_spline_bases(torch.zeros(3), torch.tensor([0.0, 1.0, 3.0, 4.0, 5.0]), 1)


def _kan_edge(x: torch.Tensor, grid: torch.Tensor, base: torch.Tensor, spline: torch.Tensor, scaler: torch.Tensor):
    # One KAN edge function phi(x) = base * SiLU(x) + scaler * sum_j spline[j] B_j(x), elementwise over x.
    return base * F.silu(x) + scaler * (b_spline_bases(x, grid, 3) * spline).sum(-1)


@pytest.mark.parametrize("leading", [(), (5,), (2, 3)])
def test_kan_linear_shapes_and_reference(leading):
    layer = KANLinear(4, 3).double()
    randomise_parameters(layer)
    x = 1.5 * torch.randn(*leading, 4, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (*leading, 3)
    w_base, w_spline, w_scaler = layer.base_weight, layer.spline_weight, layer.spline_scaler
    expected = torch.stack(
        [
            sum(_kan_edge(x[..., i], layer.grid, w_base[o, i], w_spline[o, i], w_scaler[o, i]) for i in range(4))
            for o in range(3)
        ],
        dim=-1,
    )
    torch.testing.assert_close(y, expected)


def test_kan_linear_parameters_and_gradients():
    layer = KANLinear(4, 3, grid_size=5, spline_order=3)
    assert sum(p.numel() for p in layer.parameters()) == 3 * 4 * (5 + 3 + 2)
    assert "grid" in dict(layer.named_buffers()) and "grid" not in dict(layer.named_parameters())
    x = (torch.rand(6, 4) * 1.8 - 0.9).requires_grad_()
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _unfold_reference(conv: KANConv2d, x: torch.Tensor) -> torch.Tensor:
    # Unfold with zero padding, then apply the (output, input) pair's edge function to each patch element.
    b, _, h, w = x.shape
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    h_out, w_out = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    patches = F.unfold(x, k, padding=p, stride=s).view(b, conv.in_channels, k * k, h_out * w_out)
    out = torch.zeros(b, conv.out_channels, h_out * w_out, dtype=x.dtype)
    for o in range(conv.out_channels):
        for i in range(conv.in_channels):
            base = conv.base_weight[o, i].reshape(k * k, 1)
            spline = conv.spline_weight[o, i].reshape(-1, k * k).T.reshape(k * k, 1, -1)
            scaler = conv.spline_scaler[o, i].reshape(k * k, 1)
            out[:, o] += _kan_edge(patches[:, i], conv.grid, base, spline, scaler).sum(1)
    return out.view(b, conv.out_channels, h_out, w_out)


@pytest.mark.parametrize(
    "size, kernel_size, stride, padding",
    [((7, 9), 3, 1, None), ((5, 5), 3, 1, None), ((8, 7), 3, 2, None), ((9, 8), 5, 2, 1)],
)
def test_kan_conv_matches_unfold_reference(size, kernel_size, stride, padding):
    conv = KANConv2d(2, 3, kernel_size=kernel_size, stride=stride, padding=padding).double()
    randomise_parameters(conv)
    x = 1.5 * torch.randn(2, 2, *size, dtype=torch.float64)
    y = conv(x)
    expected = _unfold_reference(conv, x)
    assert y.shape == expected.shape
    if stride == 1 and padding is None:
        assert y.shape[-2:] == size
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)


def test_kan_conv_1x1_equals_kan_linear_per_pixel():
    conv = KANConv2d(3, 2, kernel_size=1)
    randomise_parameters(conv)
    linear = KANLinear(3, 2)
    with torch.no_grad():
        linear.base_weight.copy_(conv.base_weight[:, :, 0, 0])
        linear.spline_weight.copy_(conv.spline_weight[:, :, :, 0, 0])
        linear.spline_scaler.copy_(conv.spline_scaler[:, :, 0, 0])
    x = torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(conv(x), linear(x.movedim(1, -1)).movedim(-1, 1))


def test_kan_conv_parameters_and_gradients():
    conv = KANConv2d(2, 3, kernel_size=3)
    assert sum(p.numel() for p in conv.parameters()) == 3 * 2 * 3 * 3 * (5 + 3 + 2)
    assert not any("grid" in name for name in conv.state_dict())
    x = torch.randn(2, 2, 6, 5)
    conv(x).square().sum().backward()
    for name, p in conv.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# torch.jit.script is deprecated upstream but is what MONAI's ckpt_export uses.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("module, shape", [(KANLinear(4, 3), (2, 5, 4)), (KANConv2d(2, 3), (2, 2, 7, 9))])
def test_torchscript_matches_eager(module, shape):
    randomise_parameters(module)
    scripted = torch.jit.script(module)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = 1.5 * torch.randn(*shape)
    expected = module(x)
    torch.testing.assert_close(scripted(x), expected)
    torch.testing.assert_close(loaded(x), expected)


@pytest.mark.parametrize("dim", [0, 2, -2])
def test_bases_axis_can_be_placed_anywhere(dim):
    x = torch.rand(2, 3, 5, 4, dtype=torch.float64) * 2.4 - 1.2
    grid = make_uniform_grid(5, 3)
    last = b_spline_bases(x, grid, 3)
    placed = b_spline_bases(x, grid, 3, dim=dim)
    assert placed.shape[dim] == 8
    torch.testing.assert_close(placed, last.movedim(-1, dim), rtol=0, atol=0)
