"""Selective scan (the S6 recurrence of Mamba) with a mamba-ssm CUDA backend, a fused CPU kernel and a pure-PyTorch
backend.

The recurrence, per batch element ``b``, channel ``d`` and state ``n``::

    dt_t = softplus(delta_t + delta_bias)            (or without softplus / without bias)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,    h_0 = 0
    y_t  = sum_n C_t[n] * h_t[n] + D * u_t

The pure-PyTorch backend runs the recurrence as a time-major loop with one fused multiply-add per step; the decays
and inputs of a chunk of 8 to 64 steps (sized so that the chunk's buffers stay in cache) are computed in one
vectorised pass beforehand and the chunk's outputs in one batched matmul afterwards. Autograd through such a loop is
quadratic in L (indexing one step out of a saved tensor makes a full-size zero gradient every step), and log-space
formulations (cumulative sums of log decays) overflow at realistic ``dt * A``, so the backward pass is hand-written:
the states are recomputed chunk by chunk from checkpoints saved at every chunk and the adjoint recurrence is run
backwards in the same fused way. Memory stays O(L) in the inputs instead of O(L * N) in the states, and time stays
linear in L.

On the CPU both passes are normally the fused kernel of :mod:`scripts.networks.selective_scan_cpu`: the same
checkpointed algorithm, with each step's work in registers instead of in passes over (chunk, batch, dim, N) buffers.
"""

import functools
import logging
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from scripts.networks.parallel_scan import parallel_selective_scan
from scripts.networks.selective_scan_cpu import load_cpu_scan_kernel

__all__ = ["selective_scan", "scan_backends", "cpu_kernel_applies", "mamba_ssm_unavailable_reason"]

# The CPU kernel keeps a work item's states in registers and L1: kMaxState in csrc/selective_scan_cpu.cpp.
MAX_KERNEL_STATES = 64

logger = logging.getLogger(__name__)


def scan_backends() -> List[str]:
    """The values of :func:`selective_scan`'s ``backend`` (a function because TorchScript reads no module tuples)."""
    return ["auto", "torch", "cpu_kernel", "mamba_ssm"]


def _chunk_size(step_elements: int) -> int:
    """Steps per chunk for states of ``step_elements = batch * dim * N`` elements per step.

    Also the spacing of the state checkpoints kept for the backward pass. Each of the chunk's ops is a pass over
    (chunk, batch, dim, N) buffers, so the scan runs at cache speed while a buffer holds about 2^20 elements (4 MB in
    float32) and slows by up to 4x at several times that (measured on CPU at VMAML-UNet's four stages, 1 thread); at
    least 8 steps amortise the per-chunk ops, at most 64 bound the checkpoint spacing. A function rather than a module
    constant because TorchScript cannot read module-level ints.
    """
    return max(8, min(64, 1048576 // max(step_elements, 1)))


def _validate(
    u: Tensor,
    delta: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d: Optional[Tensor],
    delta_bias: Optional[Tensor],
    backend: str,
) -> None:
    backends = scan_backends()
    if backend not in backends:
        raise ValueError("backend must be one of '" + "', '".join(backends) + f"', got '{backend}'.")
    if u.dim() != 3:
        raise ValueError(f"u must have shape (batch, dim, L), got {list(u.shape)}.")
    batch, dim, length = u.shape[0], u.shape[1], u.shape[2]
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {list(u.shape)}, got {list(delta.shape)}.")
    if a.dim() != 2 or a.shape[0] != dim:
        raise ValueError(f"A must have shape (dim={dim}, N), got {list(a.shape)}.")
    d_state = a.shape[1]
    if b.dim() != 4 or b.shape[0] != batch or b.shape[2] != d_state or b.shape[3] != length:
        raise ValueError(f"B must have shape (batch={batch}, groups, N={d_state}, L={length}), got {list(b.shape)}.")
    groups = b.shape[1]
    if groups == 0 or dim % groups != 0:
        raise ValueError(f"the number of groups of B and C ({groups}) must divide dim={dim}.")
    if c.shape != b.shape:
        raise ValueError(f"C must have the shape of B {list(b.shape)}, got {list(c.shape)}.")
    if d is not None and (d.dim() != 1 or d.shape[0] != dim):
        raise ValueError(f"D must have shape (dim={dim},), got {list(d.shape)}.")
    if delta_bias is not None and (delta_bias.dim() != 1 or delta_bias.shape[0] != dim):
        raise ValueError(f"delta_bias must have shape (dim={dim},), got {list(delta_bias.shape)}.")
    if not (
        u.is_floating_point()
        and delta.is_floating_point()
        and a.is_floating_point()
        and b.is_floating_point()
        and c.is_floating_point()
        and (d is None or d.is_floating_point())
        and (delta_bias is None or delta_bias.is_floating_point())
    ):
        raise ValueError("all inputs of selective_scan must be real floating-point tensors (complex A is unsupported).")


def _compute_dtype(
    u: Tensor, delta: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Optional[Tensor], delta_bias: Optional[Tensor]
) -> torch.dtype:
    # float32 accumulation like mamba-ssm for 16-bit and 32-bit inputs; float64 as soon as any input is float64 so
    # that gradcheck and float64 references see float64 arithmetic throughout.
    tensors: List[Tensor] = [u, delta, a, b, c]
    if d is not None:
        tensors.append(d)
    if delta_bias is not None:
        tensors.append(delta_bias)
    for t in tensors:
        if t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _log2_e() -> float:
    # exp(x) = exp2(x * log2(e)): torch's vectorised exp2 is several times faster than its exp on CPU, and the decays
    # are the scan's only transcendental. A function for TorchScript, as _chunk_size.
    return 1.4426950408889634


def _decays(dt_g: Tensor, a_r2: Tensor, out: Tensor) -> Tensor:
    """``exp(dt * A)`` into ``out``, with ``a_r2 = A * log2(e)`` in the states' layout and ``dt_g`` broadcast to it."""
    return torch.exp2(torch.mul(dt_g, a_r2, out=out), out=out)


def _is_time_major(t: Tensor) -> bool:
    """Whether ``t`` (..., L) is laid out with time outermost in memory, i.e. ``t.movedim(-1, 0)`` is contiguous."""
    return t.movedim(-1, 0).is_contiguous()


def _empty_like_layout(t: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialised tensor of the shape of ``t`` (..., L): time-major like ``t`` if ``t`` is, else contiguous."""
    if _is_time_major(t):
        shape = [t.shape[-1]] + list(t.shape[:-1])
        return torch.empty(shape, dtype=dtype, device=t.device).movedim(0, -1)
    return torch.empty(t.shape, dtype=dtype, device=t.device)


def _gather_chunk(src: Tensor, start: int, steps: int, staging: Tensor, buf: Tensor) -> Tensor:
    """``src[..., start:start + steps]`` with time as the leading dimension, contiguous and of the dtype of ``buf``.

    A time-major ``src`` of that dtype is read in place (a view: callers must not write to the chunk). Otherwise the
    chunk is copied into ``buf[:steps]`` through a contiguous staging slice: two cache-friendly copies are several
    times faster than one strided transposing copy from the long time axis.
    """
    chunk = src.narrow(-1, start, steps).movedim(-1, 0)
    if src.dtype == buf.dtype and chunk.is_contiguous():
        return chunk
    shape = list(src.shape[:-1]) + [steps]
    stage = staging[: src.numel() // src.shape[-1] * steps].view(shape)
    stage.copy_(src.narrow(-1, start, steps))
    chunk = buf[:steps]
    chunk.copy_(stage.movedim(-1, 0))
    return chunk


def _step_sizes(delta_c: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool) -> Tuple[Tensor, Tensor]:
    """Return ``(x, dt)`` for a gathered chunk of delta: ``x = delta + delta_bias`` and ``dt = softplus(x)``."""
    x = delta_c + delta_bias if delta_bias is not None else delta_c
    return x, F.softplus(x) if delta_softplus else x


def _scan_forward(
    u: Tensor,
    delta: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    dtype: torch.dtype,
    out_dtype: torch.dtype,
    save_checkpoints: bool,
) -> Tuple[Tensor, Tensor]:
    """Chunked forward scan. Inputs as in :func:`selective_scan`, arithmetic in ``dtype``.

    Returns the output ``(batch, dim, L)`` in ``out_dtype``, time-major in memory if ``u`` is and contiguous
    otherwise, and the states entering each chunk,
    ``(num_chunks, batch, groups, N, dim // groups)``, or an empty tensor when ``save_checkpoints`` is False.
    Updates buffers in place, so it is not differentiable by autograd.
    """
    batch, dim, length = u.shape[0], u.shape[1], u.shape[2]
    groups, d_state = b.shape[1], b.shape[2]
    per_group = dim // groups
    chunk_size = _chunk_size(batch * dim * d_state)
    chunk = min(length, chunk_size)
    num_chunks = (length + chunk_size - 1) // chunk_size
    rows = batch * groups

    # States are kept as (batch, groups, N, dim // groups): the contraction with C over N is then a row-vector times
    # matrix product, which batched matmul does at memory speed (the (.., dim, N) layout is several times slower).
    a_r2 = a.to(dtype).view(groups, per_group, d_state).transpose(1, 2).contiguous() * _log2_e()
    bias = delta_bias.to(dtype) if delta_bias is not None else None
    d_c = d.to(dtype) if d is not None else None

    out = _empty_like_layout(u, out_dtype)
    checkpoints = u.new_empty((num_chunks if save_checkpoints else 0, batch, groups, d_state, per_group), dtype=dtype)
    h = u.new_zeros((batch, groups, d_state, per_group), dtype=dtype)
    # One staging area serves every gathered chunk: (batch, dim) slices of u, delta, dy and (batch, groups, N) of B, C.
    staging = u.new_empty((batch * chunk * max(dim, groups * d_state),), dtype=dtype)
    u_buf = u.new_empty((chunk, batch, dim), dtype=dtype)
    dt_buf = torch.empty_like(u_buf)
    y_buf = torch.empty_like(u_buf)
    b_buf = u.new_empty((chunk, batch, groups, d_state), dtype=dtype)
    c_buf = torch.empty_like(b_buf)
    decay_buf = u.new_empty((chunk, batch, groups, d_state, per_group), dtype=dtype)
    state_buf = torch.empty_like(decay_buf)

    for k in range(num_chunks):
        start = k * chunk_size
        steps = min(chunk_size, length - start)
        n = steps * rows
        if save_checkpoints:
            checkpoints[k].copy_(h)
        u_c = _gather_chunk(u, start, steps, staging, u_buf)
        _, dt_c = _step_sizes(_gather_chunk(delta, start, steps, staging, dt_buf), bias, delta_softplus)
        b_c = _gather_chunk(b, start, steps, staging, b_buf)
        c_c = _gather_chunk(c, start, steps, staging, c_buf)

        dt_g = dt_c.view(steps, batch, groups, 1, per_group)
        decay = _decays(dt_g, a_r2, decay_buf[:steps])
        # The input term dt * u * B goes straight into the state buffer, which the loop then turns into states.
        states = torch.mul(
            (dt_c * u_c).view(steps, batch, groups, 1, per_group),
            b_c.view(steps, batch, groups, d_state, 1),
            out=state_buf[:steps],
        )
        decay_steps = decay.unbind(0)
        state_steps = states.unbind(0)
        state_steps[0].addcmul_(decay_steps[0], h)
        for i in range(1, steps):
            state_steps[i].addcmul_(decay_steps[i], state_steps[i - 1])
        h.copy_(state_steps[steps - 1])

        # A time-major output of the compute dtype takes the chunk's result in place.
        out_c = out.narrow(-1, start, steps).movedim(-1, 0)
        direct = out_dtype == dtype and out_c.is_contiguous()
        y_c = out_c if direct else y_buf[:steps]
        torch.bmm(c_c.view(n, 1, d_state), states.view(n, d_state, per_group), out=y_c.view(n, 1, per_group))
        if d_c is not None:
            y_c.addcmul_(u_c, d_c)
        if not direct:
            out_c.copy_(y_c)
    return out, checkpoints


def _scan_backward(
    grad_y: Tensor,
    u: Tensor,
    delta: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    checkpoints: Tensor,
    needs_grad: List[bool],
) -> List[Optional[Tensor]]:
    """Gradients of :func:`_scan_forward` for ``u, delta, A, B, C, D, delta_bias`` (None where not needed).

    With the adjoint state ``g_t = dLoss/dh_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}``, the decay gradient is
    ``P_t = g_t * h_{t-1} * exp(dt_t A)``, giving ``dA = sum P_t dt_t`` and ``d dt_t = sum_n P_t A + u_t <g_t, B_t>``;
    the input term gives ``du_t = dt_t <g_t, B_t>`` and ``dB_t = sum_d g_t dt_t u_t``, and ``dC_t = sum_d dy_t h_t``.
    Per chunk, the states are recomputed from the checkpoint and the adjoint recurrence is run backwards; everything
    else is vectorised over the chunk. Gradients are written in the layout and dtype of the inputs.
    """
    need_u, need_delta, need_a, need_b, need_c, need_d, need_bias = needs_grad
    need_dt = need_delta or need_bias
    dtype = checkpoints.dtype
    batch, dim, length = u.shape[0], u.shape[1], u.shape[2]
    groups, d_state = b.shape[1], b.shape[2]
    per_group = dim // groups
    chunk_size = _chunk_size(batch * dim * d_state)
    chunk = min(length, chunk_size)
    rows = batch * groups

    a_r = a.to(dtype).view(groups, per_group, d_state).transpose(1, 2).contiguous()
    a_r2 = a_r * _log2_e()
    bias = delta_bias.to(dtype) if delta_bias is not None else None
    d_c = d.to(dtype) if d is not None else None

    grad_u = _empty_like_layout(u, u.dtype) if need_u else None
    grad_delta = _empty_like_layout(delta, delta.dtype) if need_delta else None
    grad_b = _empty_like_layout(b, b.dtype) if need_b else None
    grad_c = _empty_like_layout(c, c.dtype) if need_c else None
    grad_a_r = torch.zeros_like(a_r) if need_a else None
    grad_d = u.new_zeros((dim,), dtype=dtype) if need_d else None
    grad_bias = u.new_zeros((dim,), dtype=dtype) if need_bias else None

    # One staging area serves every gathered chunk: (batch, dim) slices of u, delta, dy and (batch, groups, N) of B, C.
    staging = u.new_empty((batch * chunk * max(dim, groups * d_state),), dtype=dtype)
    u_buf = u.new_empty((chunk, batch, dim), dtype=dtype)
    dt_buf = torch.empty_like(u_buf)
    gy_buf = torch.empty_like(u_buf)
    b_buf = u.new_empty((chunk, batch, groups, d_state), dtype=dtype)
    c_buf = torch.empty_like(b_buf)
    # One extra leading slot holds the checkpoint, so states_buf[:steps] and states_buf[1:] are h_{t-1} and h_t.
    states_buf = u.new_empty((chunk + 1, batch, groups, d_state, per_group), dtype=dtype)
    decay_buf = u.new_empty((chunk, batch, groups, d_state, per_group), dtype=dtype)
    adjoint_buf = torch.empty_like(decay_buf)
    scratch_buf = torch.empty_like(decay_buf)
    # dLoss/dh of the last state of the previous chunk: exp(dt_t A) g_t at this chunk's first step.
    carry = u.new_zeros((batch, groups, d_state, per_group), dtype=dtype)

    for k in range(checkpoints.shape[0] - 1, -1, -1):
        start = k * chunk_size
        steps = min(chunk_size, length - start)
        n = steps * rows
        u_c = _gather_chunk(u, start, steps, staging, u_buf)
        x_c, dt_c = _step_sizes(_gather_chunk(delta, start, steps, staging, dt_buf), bias, delta_softplus)
        b_c = _gather_chunk(b, start, steps, staging, b_buf)
        c_c = _gather_chunk(c, start, steps, staging, c_buf)
        gy_c = _gather_chunk(grad_y, start, steps, staging, gy_buf)
        dt_g = dt_c.view(steps, batch, groups, 1, per_group)
        dtu_g = (dt_c * u_c).view(steps, batch, groups, 1, per_group)
        gy_g = gy_c.view(steps, batch, groups, 1, per_group)

        # Recompute the chunk's states from its checkpoint.
        states_all = states_buf[: steps + 1]
        states_all[0].copy_(checkpoints[k])
        states = states_all[1:]
        decay = _decays(dt_g, a_r2, decay_buf[:steps])
        torch.mul(dtu_g, b_c.view(steps, batch, groups, d_state, 1), out=states)
        decay_steps = decay.unbind(0)
        state_steps = states_all.unbind(0)
        for i in range(steps):
            state_steps[i + 1].addcmul_(decay_steps[i], state_steps[i])

        # Adjoint recurrence, backwards through the chunk.
        adjoint = torch.mul(gy_g, c_c.view(steps, batch, groups, d_state, 1), out=adjoint_buf[:steps])
        adjoint_steps = adjoint.unbind(0)
        adjoint_steps[steps - 1].add_(carry)
        for i in range(steps - 2, -1, -1):
            adjoint_steps[i].addcmul_(decay_steps[i + 1], adjoint_steps[i + 1])
        torch.mul(decay_steps[0], adjoint_steps[0], out=carry)

        scratch = scratch_buf[:steps]
        if grad_c is not None:
            grad_c_c = torch.mul(states, gy_g, out=scratch).sum(-1)
            grad_c.narrow(-1, start, steps).copy_(grad_c_c.movedim(0, -1))
        if grad_b is not None:
            grad_b_c = torch.mul(adjoint, dtu_g, out=scratch).sum(-1)
            grad_b.narrow(-1, start, steps).copy_(grad_b_c.movedim(0, -1))
        if grad_d is not None:
            grad_d.add_((gy_c * u_c).view(steps * batch, dim).sum(0))
        grad_dt_c: Optional[Tensor] = None
        if grad_u is not None or need_dt:
            # <g_t, B_t> over N: the gradient of the input term with respect to its factor dt_t * u_t.
            g_dot_b = torch.bmm(b_c.view(n, 1, d_state), adjoint.view(n, d_state, per_group)).view(steps, batch, dim)
            if grad_u is not None:
                grad_u_c = g_dot_b * dt_c
                if d_c is not None:
                    grad_u_c.addcmul_(gy_c, d_c)
                grad_u.narrow(-1, start, steps).copy_(grad_u_c.movedim(0, -1))
            if need_dt:
                grad_dt_c = g_dot_b.mul_(u_c)
        if need_dt or grad_a_r is not None:
            decay_grad = decay.mul_(states_all[:steps]).mul_(adjoint)
            if grad_dt_c is not None:
                grad_dt_c.add_(torch.mul(decay_grad, a_r, out=scratch).sum(-2).view(steps, batch, dim))
                if delta_softplus:
                    # The derivative of F.softplus as computed: sigmoid, but exactly 1 above its threshold of 20 where
                    # the forward returns x itself, as in torch's own softplus backward.
                    grad_dt_c.mul_(torch.sigmoid(x_c).masked_fill_(x_c > 20.0, 1.0))
                if grad_delta is not None:
                    grad_delta.narrow(-1, start, steps).copy_(grad_dt_c.movedim(0, -1))
                if grad_bias is not None:
                    grad_bias.add_(grad_dt_c.view(steps * batch, dim).sum(0))
            if grad_a_r is not None:
                grad_a_r.add_(decay_grad.mul_(dt_g).view(steps * batch, groups, d_state, per_group).sum(0))

    grad_a = grad_a_r.transpose(1, 2).reshape(dim, d_state).to(a.dtype) if grad_a_r is not None else None
    return [
        grad_u,
        grad_delta,
        grad_a,
        grad_b,
        grad_c,
        grad_d.to(d.dtype) if grad_d is not None and d is not None else None,
        grad_bias.to(delta_bias.dtype) if grad_bias is not None and delta_bias is not None else None,
    ]


def _output_dtype(u: Tensor, dtype: torch.dtype) -> torch.dtype:
    # As mamba-ssm: the dtype of the input sequences, except that any float64 input makes the whole scan float64.
    return dtype if dtype == torch.float64 else u.dtype


def _kernel_forward(
    u: Tensor,
    delta: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    save_checkpoints: bool,
) -> Tuple[Tensor, Tensor]:
    """:func:`_scan_forward` in float32 by the fused CPU kernel, with the same chunks and checkpoints."""
    ops, _ = load_cpu_scan_kernel()
    chunk = _chunk_size(u.shape[0] * u.shape[1] * b.shape[2])
    inputs = _as_float32([u, delta, a, b, c, d, delta_bias])
    out, checkpoints = ops.selective_scan_forward(*inputs, delta_softplus, chunk, save_checkpoints)
    return out.to(u.dtype), checkpoints


def _as_float32(tensors: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
    # The kernel reads float32 only; 16-bit inputs are widened as the PyTorch backend widens them chunk by chunk.
    return [t.float() if t is not None else None for t in tensors]


def _kernel_backward(
    grad_y: Tensor,
    u: Tensor,
    delta: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    checkpoints: Tensor,
    needs_grad: List[bool],
) -> List[Optional[Tensor]]:
    """:func:`_scan_backward` by the fused CPU kernel, from the checkpoints of :func:`_kernel_forward`."""
    ops, _ = load_cpu_scan_kernel()
    chunk = _chunk_size(u.shape[0] * u.shape[1] * b.shape[2])
    inputs = [u, delta, a, b, c, d, delta_bias]
    grads = ops.selective_scan_backward(*_as_float32(inputs), delta_softplus, chunk, checkpoints, grad_y.float())
    return [
        grad.to(t.dtype) if needed and t is not None else None for grad, t, needed in zip(grads, inputs, needs_grad)
    ]


def cpu_kernel_applies(backend: str, dtype: torch.dtype, device: torch.device, d_state: int) -> bool:
    """
    Whether ``backend`` runs the fused CPU kernel for inputs of ``dtype`` on ``device`` with ``d_state`` states.

    ``"cpu_kernel"`` and ``"auto"`` use it for CPU tensors that are not float64 (float64 keeps the PyTorch backend, the
    precision of gradcheck and of references) with at most ``MAX_KERNEL_STATES`` states; ``"auto"`` falls back to the
    PyTorch backend otherwise and when the kernel cannot be built here, ``"cpu_kernel"`` raises instead.

    Raises:
        ValueError: ``backend="cpu_kernel"`` with tensors that are not on the CPU, float64 tensors or too many states.
        RuntimeError: ``backend="cpu_kernel"`` when the kernel cannot be built or loaded.
    """
    if backend == "cpu_kernel":
        if device.type != "cpu" or dtype == torch.float64 or d_state > MAX_KERNEL_STATES:
            raise ValueError(
                f"backend='cpu_kernel' needs float32 or 16-bit CPU tensors with N <= {MAX_KERNEL_STATES} states, got "
                f"{dtype} on '{device}' with N = {d_state}; use 'auto'."
            )
        ops, err = load_cpu_scan_kernel()
        if ops is None:
            raise RuntimeError(f"backend='cpu_kernel' was requested but the kernel is unavailable: {err}") from err
        return True
    return (
        backend == "auto"
        and device.type == "cpu"
        and dtype != torch.float64
        and d_state <= MAX_KERNEL_STATES
        and load_cpu_scan_kernel()[0] is not None
    )


class _SelectiveScanFunction(torch.autograd.Function):
    """Autograd wrapper of the fused CPU kernel or the pure-PyTorch scan, with the checkpointed backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        u: Tensor,
        delta: Tensor,
        a: Tensor,
        b: Tensor,
        c: Tensor,
        d: Optional[Tensor],
        delta_bias: Optional[Tensor],
        delta_softplus: bool,
        use_kernel: bool,
    ) -> Tensor:
        dtype = _compute_dtype(u, delta, a, b, c, d, delta_bias)
        out_dtype = _output_dtype(u, dtype)
        save_checkpoints = any(ctx.needs_input_grad)
        # Autocast would run the batched matmuls in 16 bits; the scan accumulates in `dtype` by design.
        with torch.autocast(device_type=u.device.type, enabled=False):
            if use_kernel:
                out, checkpoints = _kernel_forward(u, delta, a, b, c, d, delta_bias, delta_softplus, save_checkpoints)
            else:
                out, checkpoints = _scan_forward(
                    u, delta, a, b, c, d, delta_bias, delta_softplus, dtype, out_dtype, save_checkpoints
                )
        ctx.delta_softplus = delta_softplus
        ctx.use_kernel = use_kernel
        ctx.save_for_backward(u, delta, a, b, c, d, delta_bias, checkpoints)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor) -> Tuple[Optional[Tensor], ...]:  # type: ignore[override]
        u, delta, a, b, c, d, delta_bias, checkpoints = ctx.saved_tensors
        needs_grad = list(ctx.needs_input_grad[:7])
        backward = _kernel_backward if ctx.use_kernel else _scan_backward
        with torch.autocast(device_type=u.device.type, enabled=False):
            grads = backward(grad_y, u, delta, a, b, c, d, delta_bias, ctx.delta_softplus, checkpoints, needs_grad)
        return (*grads, None, None)


@functools.lru_cache(maxsize=None)
def _load_mamba_selective_scan() -> Tuple[Optional[Callable[..., Tensor]], Optional[BaseException]]:
    # Imported lazily and once: importing mamba_ssm fails (with ImportError, OSError or RuntimeError depending on
    # what is missing) wherever its CUDA extension is not built, which must not break the pure-PyTorch backend.
    # Since state-spaces/mamba#977 a default install builds no selective_scan_cuda extension, yet selective_scan_fn
    # still imports and fails only when called: the extension is imported here too, so that "auto" falls back
    # instead of raising at the first CUDA forward.
    try:
        import selective_scan_cuda  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError, RuntimeError) as err:
        hint = " (build mamba-ssm with MAMBA_KEEP_CUDA_BUILD=TRUE, see docs/gpu.md)" if _is_missing(err) else ""
        logger.warning(
            "mamba_ssm is unavailable (%s: %s)%s; selective_scan uses its PyTorch backend.",
            type(err).__name__,
            err,
            hint,
        )
        return None, err
    return selective_scan_fn, None


def mamba_ssm_unavailable_reason() -> Optional[str]:
    """Why mamba-ssm's CUDA kernel cannot be used in this environment, or None when it can (imports it once)."""
    _, err = _load_mamba_selective_scan()
    return None if err is None else f"{type(err).__name__}: {err}"


def _is_missing(err: BaseException) -> bool:
    return isinstance(err, ModuleNotFoundError) and err.name == "selective_scan_cuda"


def _mamba_ssm_scan(
    selective_scan_fn: Callable[..., Tensor],
    u: Tensor,
    delta: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
) -> Tensor:
    # mamba-ssm's kernel takes u, delta, B and C in one dtype and A, D and delta_bias in float32, where the PyTorch
    # backend takes any mix: under autocast SS2D's projections are float16 while WTConv's output (scaled by a float32
    # parameter) is float32. The mix is resolved here, to the widest of the four, and the result has u's dtype.
    dtype = functools.reduce(torch.promote_types, (delta.dtype, b.dtype, c.dtype), u.dtype)
    y = selective_scan_fn(
        u.to(dtype),
        delta.to(dtype),
        a.float(),
        b.to(dtype),
        c.to(dtype),
        None if d is None else d.float(),
        z=None,
        delta_bias=None if delta_bias is None else delta_bias.float(),
        delta_softplus=delta_softplus,
    )
    return y.to(u.dtype)


# Eager-only (autograd Function, lazy import): selective_scan does not reach it under TorchScript, and `unused` keeps
# the compiler from ever trying to compile it.
@torch.jit.unused
def _selective_scan_eager(
    u: Tensor,
    delta: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    backend: str,
) -> Tensor:
    if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
        # Neither backend exports: the TorchScript-based ONNX exporter records the chunked in-place scan as a
        # constant, torch.export takes minutes over it, and mamba-ssm's kernel is opaque to both.
        return parallel_selective_scan(u, delta, a, b, c, d, delta_bias, delta_softplus)
    on_cuda = u.device.type == "cuda"
    dtype = _compute_dtype(u, delta, a, b, c, d, delta_bias)
    if backend == "mamba_ssm":
        if dtype == torch.float64:
            raise ValueError("backend='mamba_ssm' has no float64 kernel; use 'auto' or 'torch' for float64 inputs.")
        if not on_cuda:
            raise ValueError(
                f"backend='mamba_ssm' needs CUDA tensors, got tensors on '{u.device}'; use 'auto' or 'torch'."
            )
        selective_scan_fn, err = _load_mamba_selective_scan()
        if selective_scan_fn is None:
            raise ImportError(f"backend='mamba_ssm' was requested but mamba_ssm cannot be used: {err}") from err
        return _mamba_ssm_scan(selective_scan_fn, u, delta, a, b, c, d, delta_bias, delta_softplus)
    # mamba-ssm's kernel has no float64 path, so float64 (e.g. gradcheck on a GPU) always takes the PyTorch backend.
    if backend == "auto" and on_cuda and dtype != torch.float64:
        selective_scan_fn, _ = _load_mamba_selective_scan()
        if selective_scan_fn is not None:
            return _mamba_ssm_scan(selective_scan_fn, u, delta, a, b, c, d, delta_bias, delta_softplus)
    use_kernel = cpu_kernel_applies(backend, dtype, u.device, b.shape[2])
    return _SelectiveScanFunction.apply(u, delta, a, b, c, d, delta_bias, delta_softplus, use_kernel)


# A, B, C, D keep mamba-ssm's argument names, which its users know.
def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,  # noqa: N803
    B: Tensor,  # noqa: N803
    C: Tensor,  # noqa: N803
    D: Optional[Tensor] = None,  # noqa: N803
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Selective scan in the convention of mamba-ssm's ``selective_scan_fn`` (without ``z``), with grouped B and C.

    Computes ``dt = softplus(delta + delta_bias)``, ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t`` from ``h_0 = 0`` and
    ``y_t = <C_t, h_t> + D u_t``. Channel ``d`` uses group ``d // (dim // groups)`` of B and C. The arithmetic is
    float32 for 16- and 32-bit inputs and float64 when any input is float64; the result has the dtype of ``u``
    (float64 in the float64 case), as with mamba-ssm.

    Args:
        u: input sequences, ``(batch, dim, L)``.
        delta: step sizes before bias and softplus, ``(batch, dim, L)``.
        A: state matrix (diagonal per channel, negative in practice), ``(dim, N)``.
        B: input projections, ``(batch, groups, N, L)``; ``groups`` must divide ``dim``.
        C: output projections, ``(batch, groups, N, L)``.
        D: skip connection per channel, ``(dim,)``, or None.
        delta_bias: bias added to ``delta`` per channel, ``(dim,)``, or None.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        backend: ``"auto"`` uses mamba-ssm's CUDA kernel for CUDA tensors when ``mamba_ssm`` imports, the fused
            CPU kernel (:mod:`scripts.networks.selective_scan_cpu`, forward and backward) for CPU tensors when it can
            be built, and the PyTorch backend otherwise; ``"torch"`` always uses the PyTorch backend;
            ``"cpu_kernel"`` and ``"mamba_ssm"`` require their kernel and raise if it cannot be used. Under
            ``"auto"`` float64 inputs take the PyTorch backend (``"cpu_kernel"`` and ``"mamba_ssm"`` refuse them).
            Under TorchScript only the PyTorch backend exists and it is forward-only (for inference and export):
            ``"mamba_ssm"`` raises there and ``"cpu_kernel"`` runs the PyTorch backend.

    Inputs may have any strides. Time-major inputs (``L`` outermost in memory, e.g. ``x.permute(1, 2, 0)`` of a
    contiguous ``(L, batch, dim)`` tensor, as :class:`SS2D` makes them) are read in place; others are copied chunk by
    chunk.

    Returns:
        ``(batch, dim, L)``: time-major in memory from the CPU kernel, and from the PyTorch backend when ``u`` is
        time-major; contiguous otherwise.

    Raises:
        ValueError: for an unknown ``backend``, mis-shaped or non-floating-point inputs, or ``backend="mamba_ssm"``
            or ``"cpu_kernel"`` with tensors that are float64 or not on its device.
        ImportError: for ``backend="mamba_ssm"`` when ``mamba_ssm`` or its CUDA extension cannot be imported.
        RuntimeError: for ``backend="cpu_kernel"`` when the kernel cannot be built or loaded.
    """
    _validate(u, delta, A, B, C, D, delta_bias, backend)
    if torch.jit.is_scripting():
        if backend == "mamba_ssm":
            raise RuntimeError("backend='mamba_ssm' is not available under TorchScript; use 'auto' or 'torch'.")
        dtype = _compute_dtype(u, delta, A, B, C, D, delta_bias)
        out, _ = _scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, dtype, _output_dtype(u, dtype), False)
        return out
    return _selective_scan_eager(u, delta, A, B, C, D, delta_bias, delta_softplus, backend)
