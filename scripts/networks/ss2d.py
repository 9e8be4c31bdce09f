"""SS2D: the 2D selective-scan module of VM-UNet, with an optional wavelet convolution (VMAML-UNet's SS2D_wt)."""

import copy
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F  # noqa: N812

from scripts.networks.selective_scan import cpu_kernel_applies, selective_scan
from scripts.networks.selective_scan_cpu import load_cpu_scan_kernel
from scripts.networks.wavelet_conv import WTConv2d

__all__ = ["SS2D", "WAVELET_FUSION_MODES", "cross_scan", "cross_merge", "with_scan_backend"]

WAVELET_FUSION_MODES = ("replace", "parallel", "none")
NUM_SCAN_DIRECTIONS = 4
# Steps that every work item of a thread of the fused CPU kernel advances before the next chunk: the chunk's pixels
# stay in cache while the thread's channel blocks pass over them.
FUSED_SCAN_CHUNK = 64


class SS2D(nn.Module):
    """
    Four-direction 2D selective scan (VM-UNet's SS2D) on channels-last feature maps.

    The input is projected to ``x`` and a gate ``z``; ``x`` goes through a local convolution and SiLU, is flattened
    into four sequences (row-major, column-major and the reverse of each), scanned by one selective-scan call with
    the directions as groups, merged back in row-major order, normalised, gated by ``SiLU(z)`` and projected out.
    Without gradients on the CPU (the ``"auto"`` and ``"cpu_kernel"`` backends), the four scans and the merge are one
    call of the fused CPU kernel, which reads the map in each direction's order in place.

    Args:
        dim: channels ``C`` of the input and output.
        d_state: SSM state size ``N``.
        expand: ``d_inner = expand * dim``.
        dt_rank: rank of the step-size projection; ``None`` gives ``ceil(dim / 16)``.
        wavelet_fusion: local convolution before the scan. ``"replace"``: a wavelet convolution (WTConv) instead of
            VM-UNet's 3x3 depthwise conv; ``"parallel"``: the depthwise conv plus a WTConv branch; ``"none"``: the
            depthwise conv alone (plain VM-UNet).
        wavelet_levels: wavelet decomposition levels of the WTConv (capped at run time by the map size).
        wavelet_kernel_size: kernel size of the WTConv's convolutions.
        scan_backend: ``"auto"``, ``"cpu_kernel"``, ``"torch"`` or ``"mamba_ssm"``, see :func:`selective_scan`.
        dt_min: lower end of the initial step sizes ``softplus(dt_bias)``.
        dt_max: upper end of the initial step sizes.

    Shapes:
        input ``(B, H, W, C)``, output ``(B, H, W, C)``.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        expand: int = 2,
        dt_rank: Optional[int] = None,
        wavelet_fusion: str = "replace",
        wavelet_levels: int = 1,
        wavelet_kernel_size: int = 3,
        scan_backend: str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
    ) -> None:
        super().__init__()
        if wavelet_fusion not in WAVELET_FUSION_MODES:
            raise ValueError(f"wavelet_fusion must be one of {WAVELET_FUSION_MODES}, got {wavelet_fusion!r}.")
        d_inner = expand * dim
        self.d_inner = d_inner
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16) if dt_rank is None else dt_rank
        self.scan_backend = scan_backend
        self.num_directions = NUM_SCAN_DIRECTIONS
        k = NUM_SCAN_DIRECTIONS

        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.local_conv: nn.Module
        self.wavelet_branch: Optional[nn.Module] = None
        if wavelet_fusion == "replace":
            self.local_conv = WTConv2d(d_inner, kernel_size=wavelet_kernel_size, levels=wavelet_levels)
        else:
            self.local_conv = nn.Conv2d(d_inner, d_inner, kernel_size=3, padding=1, groups=d_inner, bias=True)
            if wavelet_fusion == "parallel":
                self.wavelet_branch = WTConv2d(d_inner, kernel_size=wavelet_kernel_size, levels=wavelet_levels)

        # One projection per scan direction, stored stacked so all directions are computed by one einsum.
        self.x_proj_weight = nn.Parameter(torch.empty(k, self.dt_rank + 2 * d_state, d_inner))
        self.dt_proj_weight = nn.Parameter(torch.empty(k, d_inner, self.dt_rank))
        self.dt_proj_bias = nn.Parameter(torch.empty(k, d_inner))
        self.A_log = nn.Parameter(torch.empty(k * d_inner, d_state))
        self.D = nn.Parameter(torch.empty(k * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self._init_ssm_parameters(dt_min, dt_max)

    @torch.no_grad()
    def _init_ssm_parameters(self, dt_min: float, dt_max: float) -> None:
        # The Mamba initialisation: step sizes log-uniform in [dt_min, dt_max] through the inverse softplus of the
        # bias, S4D-real A = -(1..N), and a unit skip D.
        bound = self.d_inner**-0.5
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        nn.init.uniform_(self.dt_proj_weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        dt = torch.exp(torch.rand_like(self.dt_proj_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_proj_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_log.copy_(torch.log(a).expand_as(self.A_log))
        self.D.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        k = self.num_directions

        u, z = self.in_proj(x).chunk(2, dim=-1)
        # Depthwise convolutions run several times faster on channels-last memory than on channels-first (measured
        # on CPU). The half of in_proj's output that u is has to be made dense once; the convolutions keep the
        # format, so their output seen as (B, H, W, C) is contiguous without another copy.
        u = u.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        local = self.local_conv(u)
        if self.wavelet_branch is not None:
            local = local + self.wavelet_branch(u)
        u = F.silu(local).permute(0, 2, 3, 1).contiguous()

        # x_proj is a per-position linear map, so it is applied once per pixel before the scans reorder pixels.
        projected = F.linear(u, self.x_proj_weight.reshape(-1, self.d_inner)).view(batch, height, width, k, -1)
        if not torch.jit.is_scripting() and self._fused_cross_scan_applies(u, projected):
            y = self._fused_cross_scan(u, projected)
        else:
            y = self._cross_scan(u, projected)
        y = self.out_norm(y.to(z.dtype)) * F.silu(z)
        return self.out_proj(y)

    def _dt_projection(self) -> torch.Tensor:
        """The K step-size projections as one block-diagonal ``(K * d_inner, K * dt_rank)`` matrix: one matmul."""
        k = self.num_directions
        eye = torch.eye(k, dtype=self.dt_proj_weight.dtype, device=self.dt_proj_weight.device)
        return (self.dt_proj_weight.unsqueeze(2) * eye[:, None, :, None]).reshape(k * self.d_inner, -1)

    def _cross_scan(self, u: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """The four scans through :func:`cross_scan`, :func:`selective_scan` and :func:`cross_merge` (any backend)."""
        batch, height, width, k, _ = projected.shape
        length = height * width
        seqs = cross_scan(u.unsqueeze(3).expand(batch, height, width, k, self.d_inner))
        dts, b, c = torch.split(cross_scan(projected), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dts.reshape(length, batch, -1), self._dt_projection())

        # (L, B, ...) memory seen as (B, ..., L): the time-major layout the PyTorch scan reads without copies.
        y = selective_scan(
            seqs.view(length, batch, -1).permute(1, 2, 0),
            delta.permute(1, 2, 0),
            -torch.exp(self.A_log.float()),
            b.contiguous().permute(1, 2, 3, 0),
            c.contiguous().permute(1, 2, 3, 0),
            self.D.float(),
            self.dt_proj_bias.reshape(-1).float(),
            True,
            self.scan_backend,
        )
        return cross_merge(y.permute(2, 0, 1).reshape(length, batch, k, self.d_inner), height, width)

    # Eager-only, as the kernel is: `unused` keeps TorchScript from compiling these two. TorchScript still reads their
    # signatures, and cannot resolve postponed (string) annotations there: this module does not postpone them.
    @torch.jit.unused
    def _fused_cross_scan_applies(self, u: torch.Tensor, projected: torch.Tensor) -> bool:
        # The four-direction kernel keeps no states for a backward pass: whenever a gradient may be asked for, the
        # scans run through selective_scan, which has one. Exporters cannot see into the kernel either.
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (u, projected, self.A_log, self.D, self.dt_proj_weight, self.dt_proj_bias)
        )
        exporting = torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
        return (
            not needs_grad and not exporting and cpu_kernel_applies(self.scan_backend, u.dtype, u.device, self.d_state)
        )

    @torch.jit.unused
    def _fused_cross_scan(self, u: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """The four scans by the fused CPU kernel, reading pixels in place (no cross-scan copies, no cross-merge)."""
        batch, height, width, k, _ = projected.shape
        dts, b, c = torch.split(projected.float(), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # .float() again after the linear: under autocast it returns 16-bit values, which the kernel refuses.
        delta = F.linear(dts.reshape(batch * height * width, -1), self._dt_projection().float()).float()
        ops, _ = load_cpu_scan_kernel()
        return ops.cross_selective_scan_forward(
            u.float(),
            delta.view(batch, height, width, k, self.d_inner),
            -torch.exp(self.A_log.float()),
            b,
            c,
            self.D.float(),
            self.dt_proj_bias.reshape(-1).float(),
            True,
            FUSED_SCAN_CHUNK,
        )


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """
    Order the pixels of direction ``k`` of ``x`` as scan ``k`` reads them: row-major, column-major, and the reverse
    of each (a reversed raster order is the raster order of the map flipped along H and W).

    Args:
        x: ``(B, H, W, 4, F)``, one feature vector per pixel and direction (an expanded view for shared features).

    Returns:
        ``(H * W, B, 4, F)``, time-major and contiguous.
    """
    batch, height, width, k, features = x.shape
    out = x.new_empty((height * width, batch, k, features))
    rows = out.view(height, width, batch, k, features)
    cols = out.view(width, height, batch, k, features)
    flipped = x[:, :, :, 2:].flip(1, 2)
    rows[:, :, :, 0].copy_(x[:, :, :, 0].permute(1, 2, 0, 3))
    cols[:, :, :, 1].copy_(x[:, :, :, 1].permute(2, 1, 0, 3))
    rows[:, :, :, 2].copy_(flipped[:, :, :, 0].permute(1, 2, 0, 3))
    cols[:, :, :, 3].copy_(flipped[:, :, :, 1].permute(2, 1, 0, 3))
    return out


def cross_merge(y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """
    Inverse of :func:`cross_scan` summed over the directions: undo each reordering and add the four maps.

    Args:
        y: ``(H * W, B, 4, F)`` scan outputs in scan order.
        height: ``H``.
        width: ``W``.

    Returns:
        ``(B, H, W, F)`` (time-major strides; contiguous for ``B = 1``).
    """
    length, batch, _, features = y.shape
    forward = y[:, :, :2] + y[:, :, 2:].flip(0)
    rows = forward[:, :, 0].view(height, width, batch, features)
    cols = forward[:, :, 1].view(width, height, batch, features).transpose(0, 1)
    return (rows + cols).permute(2, 0, 1, 3)


def with_scan_backend(network: nn.Module, backend: str) -> nn.Module:
    """
    A copy of ``network`` whose :class:`SS2D` modules all use the selective-scan ``backend``: e.g. ``"torch"``, the
    scan TorchScript runs, to compare a scripted network with its eager original without the CPU kernel's rounding.
    """
    copied = copy.deepcopy(network)
    for module in copied.modules():
        if isinstance(module, SS2D):
            module.scan_backend = backend
    return copied
