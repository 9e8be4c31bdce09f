"""
A sequential reference of the selective scan, one time step per loop iteration like mamba-ssm's
``selective_scan_ref``: what the benchmark times and checks :func:`~scripts.networks.selective_scan.selective_scan`
against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

__all__ = ["selective_scan_reference"]


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,  # noqa: N803 (mamba-ssm's names, as in selective_scan)
    B: Tensor,  # noqa: N803
    C: Tensor,  # noqa: N803
    D: Tensor | None = None,  # noqa: N803
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
) -> Tensor:
    """
    The selective scan written as the plain recurrence, in the convention of
    :func:`~scripts.networks.selective_scan.selective_scan`: ``dt = softplus(delta + delta_bias)``,
    ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t`` from ``h_0 = 0`` and ``y_t = <C_t, h_t> + D u_t``.

    As in mamba-ssm's ``selective_scan_ref``, the decays ``exp(dt A)`` and inputs ``dt B u`` of all steps are
    materialised as ``(batch, dim, L, N)`` tensors and the loop indexes one step out of them at a time, so the
    forward pass is linear in ``L`` but autograd's backward pass is quadratic (each indexed step back-propagates a
    full-size zero gradient). Arithmetic is float64 when any input is float64 and float32 otherwise.

    Args:
        u: input sequences, ``(batch, dim, L)`` with ``L >= 1``.
        delta: step sizes before bias and softplus, ``(batch, dim, L)``.
        A: state matrix, ``(dim, N)``.
        B: input projections, ``(batch, groups, N, L)``; channel ``d`` uses group ``d // (dim // groups)``.
        C: output projections, ``(batch, groups, N, L)``.
        D: skip connection per channel, ``(dim,)``, or None.
        delta_bias: bias added to ``delta`` per channel, ``(dim,)``, or None.
        delta_softplus: apply softplus to ``delta + delta_bias``.

    Returns:
        ``(batch, dim, L)`` in the dtype of ``u``, or float64 when any input is float64.
    """
    inputs = [t for t in (u, delta, A, B, C, D, delta_bias) if t is not None]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in inputs) else torch.float32
    batch, dim, length = u.shape
    per_group = dim // B.shape[1]
    u_c = u.to(dtype)
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    b_per_channel = B.to(dtype).repeat_interleave(per_group, dim=1)
    c_per_channel = C.to(dtype).repeat_interleave(per_group, dim=1)
    decays = torch.exp(torch.einsum("bdl,dn->bdln", dt, A.to(dtype)))
    updates = torch.einsum("bdl,bdnl,bdl->bdln", dt, b_per_channel, u_c)

    h = u_c.new_zeros((batch, dim, A.shape[1]))
    ys = []
    for t in range(length):
        h = decays[:, :, t] * h + updates[:, :, t]
        ys.append(torch.einsum("bdn,bdn->bd", h, c_per_channel[:, :, :, t]))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u_c * D.to(dtype)[:, None]
    return y if dtype == torch.float64 else y.to(u.dtype)
