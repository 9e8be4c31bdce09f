"""Selective scan as a log-depth parallel prefix scan of plain, out-of-place tensor ops, for model export.

The recurrence ``h_t = a_t h_{t-1} + x_t`` (``a_t = exp(dt_t A)``, ``x_t = dt_t B_t u_t``) is an associative scan:
a span of steps ``(a, x)`` following a span ``(a', x')`` composes with it to ``(a a', x + a x')``. Combining every
step with the one ``2^k`` steps earlier, for k = 0, 1, ... (Hillis and Steele), leaves ``h_t`` at every step after
``ceil(log2(L))`` rounds. Only products of decays are formed (in (0, 1] for the negative ``A`` of practice), so
nothing overflows, unlike log-space scans. The exporters (``torch.onnx.export``, ``torch.export``) record this as a
few dozen nodes per chunk of steps, where the eager scan's in-place chunk loop either traces into a constant (the
TorchScript-based ONNX exporter) or into a graph whose export takes minutes (``torch.export``). The price is
``O(L log L)`` work instead of ``O(L)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

__all__ = ["parallel_selective_scan"]


def _shift(x: torch.Tensor, steps: int, fill: float) -> torch.Tensor:
    """``x`` delayed by ``steps`` along the last (time) axis, the first ``steps`` entries set to ``fill``."""
    return F.pad(x[..., :-steps], [steps, 0], value=fill)


def _prefix_scan(decay: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of ``h_t = decay_t h_{t-1} + states_t`` from ``h_0 = 0`` along the last axis.

    Returns the products of the decays up to each step and the states ``h_t``, both of the inputs' shape.
    """
    shift = 1
    while shift < states.shape[-1]:
        states = states + decay * _shift(states, shift, 0.0)
        decay = decay * _shift(decay, shift, 1.0)
        shift *= 2
    return decay, states


def parallel_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,  # noqa: N803 (mamba-ssm's names, as in selective_scan)
    B: torch.Tensor,  # noqa: N803
    C: torch.Tensor,  # noqa: N803
    D: torch.Tensor | None = None,  # noqa: N803
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """The selective scan of :func:`scripts.networks.selective_scan.selective_scan`, in export-friendly form.

    Computes ``dt = softplus(delta + delta_bias)``, ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t`` from ``h_0 = 0``
    and ``y_t = <C_t, h_t> + D u_t``, with channel ``d`` using group ``d // (dim // groups)`` of B and C. The
    arithmetic is float32, or float64 when any input is float64; the result has the dtype of ``u`` (float64 in the
    float64 case). Inputs are not validated: ``selective_scan`` does that before dispatching here.

    Args:
        u: input sequences, ``(batch, dim, L)``.
        delta: step sizes before bias and softplus, ``(batch, dim, L)``.
        A: state matrix, ``(dim, N)``.
        B: input projections, ``(batch, groups, N, L)``; ``groups`` divides ``dim``.
        C: output projections, ``(batch, groups, N, L)``.
        D: skip connection per channel, ``(dim,)``, or None.
        delta_bias: bias added to ``delta`` per channel, ``(dim,)``, or None.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        chunk_size: steps scanned at once; the state of the last step carries over to the next chunk. It bounds
            the memory to a few ``(batch, dim, N, chunk_size)`` tensors, where one scan over a 512 x 512 image's
            first stage would need several GB.

    Returns:
        ``(batch, dim, L)``.
    """
    inputs = [u, delta, A, B, C] + [t for t in (D, delta_bias) if t is not None]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in inputs) else torch.float32
    out_dtype = dtype if dtype == torch.float64 else u.dtype
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], B.shape[2]
    per_group = dim // groups

    u = u.to(dtype)
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    # States as (batch, groups, N, dim // groups, time): the time axis last, where the scan shifts.
    a_grouped = A.to(dtype).view(groups, per_group, d_state).transpose(1, 2)[..., None]
    b_steps = B.to(dtype)[:, :, :, None]
    c_steps = C.to(dtype)[:, :, :, None]
    outputs = []
    h = u.new_zeros((batch, groups, d_state, per_group, 1))
    for start in range(0, length, chunk_size):
        steps = min(chunk_size, length - start)
        dt_c = dt[..., start : start + steps]
        decay = torch.exp(dt_c.view(batch, groups, 1, per_group, steps) * a_grouped)
        inputs_c = (dt_c * u[..., start : start + steps]).view(batch, groups, 1, per_group, steps)
        decay, states = _prefix_scan(decay, inputs_c * b_steps[..., start : start + steps])
        states = states + decay * h
        h = states[..., -1:]
        outputs.append((c_steps[..., start : start + steps] * states).sum(2))

    y = torch.cat(outputs, dim=-1).reshape(batch, dim, length)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u
    return y.to(out_dtype)
