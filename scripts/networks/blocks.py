"""Building blocks of VMAML-UNet's stages: the WCVM block and the patch merging/expanding layers (channels-last)."""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.layers import DropPath

from scripts.networks.ss2d import SS2D

__all__ = ["WCVMBlock", "PatchMerging", "PatchExpanding"]


class WCVMBlock(nn.Module):
    """
    Wavelet-convolution visual Mamba block: ``x + DropPath(SS2D_wt(LayerNorm(x)))``.

    With ``wavelet_fusion="none"`` this is VM-UNet's VSS block.

    Args:
        dim: channels ``C``.
        d_state: SSM state size.
        drop_path: stochastic depth probability of the residual branch.
        wavelet_fusion: ``"replace"``, ``"parallel"`` or ``"none"``, see :class:`SS2D`.
        wavelet_levels: wavelet decomposition levels inside SS2D.
        wavelet_kernel_size: kernel size of the wavelet convolution's convolutions inside SS2D.
        scan_backend: selective-scan backend, see :class:`SS2D`.

    Shapes:
        input ``(B, H, W, C)``, output ``(B, H, W, C)``.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        drop_path: float = 0.0,
        wavelet_fusion: str = "replace",
        wavelet_levels: int = 1,
        wavelet_kernel_size: int = 3,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ss2d = SS2D(
            dim,
            d_state=d_state,
            wavelet_fusion=wavelet_fusion,
            wavelet_levels=wavelet_levels,
            wavelet_kernel_size=wavelet_kernel_size,
            scan_backend=scan_backend,
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.ss2d(self.norm(x)))


class PatchMerging(nn.Module):
    """
    Halve the resolution and double the channels: concatenate each 2x2 neighbourhood, LayerNorm(4C), Linear 4C->2C.

    Args:
        dim: input channels ``C``.

    Shapes:
        input ``(B, H, W, C)`` with even ``H`` and ``W``, output ``(B, H/2, W/2, 2C)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merged = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(merged))


class PatchExpanding(nn.Module):
    """
    Multiply the resolution by ``scale`` and divide the channels by it: Linear C->scale*C (no bias), rearrange each
    pixel's channels into a ``scale x scale`` patch, LayerNorm(C/scale).

    ``scale=2`` is VM-UNet's decoder patch expanding; ``scale=4`` its final expanding before the output convolution.

    Args:
        dim: input channels ``C`` (divisible by ``scale``).
        scale: up-sampling factor.

    Shapes:
        input ``(B, H, W, C)``, output ``(B, scale*H, scale*W, C/scale)``.
    """

    def __init__(self, dim: int, scale: int = 2) -> None:
        super().__init__()
        if dim % scale != 0:
            raise ValueError(f"dim ({dim}) must be divisible by scale ({scale}).")
        self.scale = scale
        self.out_dim = dim // scale
        self.expand = nn.Linear(dim, scale * dim, bias=False)
        self.norm = nn.LayerNorm(self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        s = self.scale
        x = self.expand(x).view(batch, height, width, s, s, self.out_dim)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height * s, width * s, self.out_dim)
        return self.norm(x)
