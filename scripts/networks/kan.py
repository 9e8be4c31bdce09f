"""Kolmogorov-Arnold layers with B-spline edge functions (efficient-KAN style, Liu et al. 2024; Blealtan 2024).

Every edge (input i -> output o) carries a learnable function
``phi(x) = w_base * SiLU(x) + w_scale * sum_j w_spline[j] * B_j(x)`` where the B_j are the ``grid_size +
spline_order`` B-splines of order ``spline_order`` on a uniform grid over ``grid_range``. Outside the extended
grid the spline term is zero and only the SiLU branch remains. :class:`KANConv2d` is the convolutional form of
Bodner et al. ("Convolutional Kolmogorov-Arnold Networks", 2024): one such edge per kernel position.
"""

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F  # noqa: N812

__all__ = ["make_uniform_grid", "b_spline_bases", "KANLinear", "KANConv2d"]


def make_uniform_grid(grid_size: int, spline_order: int, grid_range: Sequence[float] = (-1.0, 1.0)) -> torch.Tensor:
    """Knot vector of ``grid_size`` equal intervals over ``grid_range`` = (lo, hi), extended by ``spline_order``
    knots on each side; shape (grid_size + 2 * spline_order + 1,), float64."""
    if grid_size < 1 or spline_order < 0 or not grid_range[0] < grid_range[1]:
        raise ValueError(
            f"need grid_size >= 1, spline_order >= 0, lo < hi; got {grid_size}, {spline_order}, {tuple(grid_range)}."
        )
    step = (grid_range[1] - grid_range[0]) / grid_size
    return torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float64) * step + grid_range[0]


def b_spline_bases(x: torch.Tensor, grid: torch.Tensor, spline_order: int, dim: int = -1) -> torch.Tensor:
    """B-spline bases of order ``spline_order`` on the uniform knot vector ``grid``.

    At a point in knot interval ``i`` only the ``spline_order + 1`` bases ``i - spline_order .. i`` are nonzero. They
    are computed by the Cox-de Boor recursion written for unit knot spacing in the point's position ``f`` within its
    interval, on ``spline_order + 1`` tensors of ``x``'s size, and then placed on the bases axis with one
    ``scatter_add``. The full recursion over all bases builds each of its levels at the bases axis's size: for the
    finest KAN side head this was 2.8x slower, forward and backward.

    Args:
        x: any shape (...).
        grid: equally spaced knots (K,) in increasing order, from :func:`make_uniform_grid`.
        spline_order: polynomial degree of the bases (3 = cubic).
        dim: where the bases axis is inserted, as for ``torch.unsqueeze``: last for a linear layer, before the
            spatial axes for :class:`KANConv2d` (its convolution reads the bases as channels).

    Returns:
        ``x``'s shape with an axis of K - 1 - spline_order bases inserted at ``dim``. On
        [grid[spline_order], grid[-1 - spline_order]] the bases sum to one; beyond the extended grid all are zero.

    Raises:
        ValueError: for a knot vector that is not equally spaced.
    """
    equally_spaced = (
        grid.dim() == 1
        and grid.shape[0] >= 2
        and torch.allclose(grid.diff(), (grid[1] - grid[0]).expand(grid.shape[0] - 1), rtol=1e-6)
    )
    if not equally_spaced:
        raise ValueError(f"b_spline_bases needs equally spaced knots (make_uniform_grid), got {grid.tolist()}.")
    return _uniform_b_spline_bases(x, grid, spline_order, dim)


def _uniform_b_spline_bases(x: torch.Tensor, grid: torch.Tensor, spline_order: int, dim: int) -> torch.Tensor:
    # b_spline_bases without its knot check, for the layers, whose knots come from make_uniform_grid: the check reads
    # the knots back to the host, a device synchronisation at every forward on a GPU.
    num_bases = grid.shape[0] - 1 - spline_order
    axis = dim % (x.dim() + 1)
    grid = grid.to(x.dtype)
    position = (x - grid[0]) / (grid[1] - grid[0])
    interval = torch.floor(position)
    f = position - interval
    # weights[m] is basis interval - k + m of order k, m = 0..k (unit knot spacing)
    weights = [torch.ones_like(f)]
    for k in range(1, spline_order + 1):
        raised = [((1 - f) / k) * weights[0]]
        for m in range(1, k):
            raised.append(((f + (k - m)) / k) * weights[m - 1] + ((m + 1 - f) / k) * weights[m])
        raised.append((f / k) * weights[k - 1])
        weights = raised
    offsets = torch.arange(-spline_order, 1, device=x.device).view([-1] + [1] * (x.dim() - axis))
    index = interval.to(torch.int64).unsqueeze(axis) + offsets
    # Bases past either end of the grid do not exist: their weights are dropped (outside the extended grid, all).
    exists = (index >= 0) & (index < num_bases)
    values = torch.where(exists, torch.stack(weights, dim=axis), 0.0)
    shape = list(x.shape)
    shape.insert(axis, num_bases)
    return x.new_zeros(shape).scatter_add(axis, index.clamp(0, num_bases - 1), values)


def _reset_kan_parameters(
    base_weight: torch.Tensor,
    spline_weight: torch.Tensor,
    spline_scaler: torch.Tensor,
    grid_size: int,
    scale_noise: float,
    scale_base: float,
    scale_spline: float,
) -> None:
    # Base weights and spline scalers: kaiming-uniform over the fan-in (in_features, or in_channels * k * k), as
    # nn.Linear / nn.Conv2d do, so that the SiLU branch starts like an ordinary layer. Spline coefficients: small
    # uniform noise of half-width scale_noise / (2 * grid_size); since the bases are non-negative and sum to one,
    # every spline then starts within that band of zero (efficient-KAN instead least-squares fits a noise curve,
    # which gives coefficients of the same size).
    with torch.no_grad():
        nn.init.kaiming_uniform_(base_weight, a=math.sqrt(5) * scale_base)
        nn.init.kaiming_uniform_(spline_scaler, a=math.sqrt(5) * scale_spline)
        spline_weight.uniform_(-0.5, 0.5).mul_(scale_noise / grid_size)


class KANLinear(nn.Module):
    """Fully connected KAN layer, input (..., in_features), output (..., out_features).

    ``y_o = sum_i base_weight[o, i] * SiLU(x_i) + spline_scaler[o, i] * sum_j spline_weight[o, i, j] * B_j(x_i)``;
    no bias (the splines can represent a constant within ``grid_range``).

    Parameters: ``base_weight`` (out, in), ``spline_weight`` (out, in, grid_size + spline_order), ``spline_scaler``
    (out, in); in total ``out * in * (grid_size + spline_order + 2)``. The knot vector ``grid`` is a buffer.

    Args:
        in_features: number of inputs.
        out_features: number of outputs.
        grid_size: number of grid intervals G over ``grid_range``.
        spline_order: B-spline degree S; there are G + S bases per input.
        grid_range: (lo, hi) interval on which the bases form a partition of unity.
        scale_noise: magnitude of the initial spline coefficients (see ``_reset_kan_parameters``).
        scale_base: multiplies the kaiming ``a`` of the base weights (larger = smaller initial weights).
        scale_spline: multiplies the kaiming ``a`` of the spline scalers.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        grid_size: int = 5,
        spline_order: int = 3,
        grid_range: Sequence[float] = (-1.0, 1.0),
        scale_noise: float = 0.1,
        scale_base: float = 1.0,
        scale_spline: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.grid_size = grid_size
        self.spline_order = spline_order
        # Non-persistent: the knots are a fixed function of the constructor arguments (no grid adaptation here),
        # so the state_dict holds only learned tensors; .to() and torch.jit.script still carry the buffer.
        grid = make_uniform_grid(grid_size, spline_order, grid_range).to(torch.get_default_dtype())
        self.register_buffer("grid", grid, persistent=False)
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, grid_size + spline_order))
        self.spline_scaler = nn.Parameter(torch.empty(out_features, in_features))
        _reset_kan_parameters(
            self.base_weight, self.spline_weight, self.spline_scaler, grid_size, scale_noise, scale_base, scale_spline
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bases = _uniform_b_spline_bases(x, self.grid, self.spline_order, -1).flatten(-2)
        spline_weight = (self.spline_weight * self.spline_scaler.unsqueeze(-1)).flatten(1)
        return F.linear(F.silu(x), self.base_weight) + F.linear(bases, spline_weight)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"grid_size={self.grid_size}, spline_order={self.spline_order}"
        )


class KANConv2d(nn.Module):
    """Convolutional KAN layer, input (B, C_in, H, W), output (B, C_out, H_out, W_out) as for nn.Conv2d.

    Every (output channel, input channel, kernel position) carries its own KAN edge function and each output is
    the sum of the edge functions over the zero-padded k x k patch. It is computed with two ordinary
    convolutions, ``conv2d(SiLU(x_pad), base_weight) + conv2d(B(x_pad), spline_weight * spline_scaler)``, where
    ``B(x_pad)`` stacks the G + S bases of every input channel as (B, C_in * (G + S), H + 2p, W + 2p). Padding
    before the activation makes padded patch elements contribute ``phi(0)``, exactly as an unfold-then-KAN
    reference does. No bias, as in :class:`KANLinear`.

    Parameters: ``base_weight`` (out, in, k, k), ``spline_weight`` (out, in, G + S, k, k), ``spline_scaler``
    (out, in, k, k); in total ``out * in * k * k * (G + S + 2)``. The knot vector ``grid`` is a buffer.

    Args:
        in_channels: number of input channels C_in.
        out_channels: number of output channels C_out.
        kernel_size: square kernel size k.
        stride: convolution stride.
        padding: zero padding p on each side; default ``kernel_size // 2`` ('same' size for odd k at stride 1).
        grid_size: number of grid intervals G over ``grid_range``.
        spline_order: B-spline degree S.
        grid_range: (lo, hi) interval on which the bases form a partition of unity.
        scale_noise, scale_base, scale_spline: initialisation, as in :class:`KANLinear`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: Optional[int] = None,
        grid_size: int = 5,
        spline_order: int = 3,
        grid_range: Sequence[float] = (-1.0, 1.0),
        scale_noise: float = 0.1,
        scale_base: float = 1.0,
        scale_spline: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.grid_size = grid_size
        self.spline_order = spline_order
        # Non-persistent for the same reason as in KANLinear.
        grid = make_uniform_grid(grid_size, spline_order, grid_range).to(torch.get_default_dtype())
        self.register_buffer("grid", grid, persistent=False)
        num_bases = grid_size + spline_order
        self.base_weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        # Bases next to their input channel, so that the weight views as a conv weight (out, in * (G + S), k, k).
        self.spline_weight = nn.Parameter(torch.empty(out_channels, in_channels, num_bases, kernel_size, kernel_size))
        self.spline_scaler = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        _reset_kan_parameters(
            self.base_weight, self.spline_weight, self.spline_scaler, grid_size, scale_noise, scale_base, scale_spline
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        x = F.pad(x, [p, p, p, p])
        # (B, C, G + S, H, W) -> (B, C * (G + S), H, W), channel-major to match the spline weight layout.
        bases = _uniform_b_spline_bases(x, self.grid, self.spline_order, 2).flatten(1, 2)
        spline_weight = (self.spline_weight * self.spline_scaler.unsqueeze(2)).flatten(1, 2)
        base = F.conv2d(F.silu(x), self.base_weight, stride=self.stride)
        return base + F.conv2d(bases, spline_weight, stride=self.stride)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, grid_size={self.grid_size}, spline_order={self.spline_order}"
        )
