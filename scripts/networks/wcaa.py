"""WCAA: wavelet-convolution attention aggregation of VMAML-UNet's skip connections."""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn

from scripts.networks.wavelet_conv import WTConv2d

__all__ = ["WCAA"]


class WCAA(nn.Module):
    """
    Wavelet-convolution attention aggregation over the skip connections (our reading of the paper, after the
    spatial-channel attention bridge of MALUNet):

    1. every skip level goes through a wavelet convolution (same channels);
    2. channel attention across scales: the globally pooled vectors of all levels are concatenated, mixed by a
       Conv1d (k=3), mapped back to each level's channels by a per-level Linear, and applied as
       ``s + s * sigmoid(a)``;
    3. spatial attention per level: ``[mean, max]`` over channels, a shared 7x7 conv with dilation 3, applied as
       ``s + s * sigmoid(a)``.

    Args:
        channels: channels of each skip level.
        wavelet_levels: wavelet decomposition levels of each level's WTConv.
        kernel_size: kernel size of the WTConvs.

    Shapes:
        input and output: a list of channels-last maps ``(B, H_i, W_i, channels[i])``.
    """

    def __init__(self, channels: Sequence[int], wavelet_levels: Sequence[int], kernel_size: int = 3) -> None:
        super().__init__()
        if len(channels) != len(wavelet_levels):
            raise ValueError(f"channels ({len(channels)}) and wavelet_levels ({len(wavelet_levels)}) differ in length.")
        total = sum(channels)
        self.wavelet_convs = nn.ModuleList(
            [WTConv2d(c, kernel_size=kernel_size, levels=lv) for c, lv in zip(channels, wavelet_levels)]
        )
        self.channel_mix = nn.Conv1d(1, 1, kernel_size=3, padding=1, bias=False)
        self.channel_heads = nn.ModuleList([nn.Linear(total, c) for c in channels])
        self.spatial_conv = nn.Conv2d(2, 1, kernel_size=7, padding=9, dilation=3)

    def forward(self, skips: List[torch.Tensor]) -> List[torch.Tensor]:
        filtered: List[torch.Tensor] = []
        for i, conv in enumerate(self.wavelet_convs):
            filtered.append(conv(skips[i].permute(0, 3, 1, 2)).permute(0, 2, 3, 1))

        pooled = torch.cat([s.mean(dim=(1, 2)) for s in filtered], dim=-1)
        mixed = self.channel_mix(pooled.unsqueeze(1)).squeeze(1)
        attended: List[torch.Tensor] = []
        for i, head in enumerate(self.channel_heads):
            s = filtered[i]
            s = s + s * torch.sigmoid(head(mixed))[:, None, None, :]
            spatial = torch.stack([s.mean(dim=-1), s.amax(dim=-1)], dim=1)
            s = s + s * torch.sigmoid(self.spatial_conv(spatial)).squeeze(1).unsqueeze(-1)
            attended.append(s)
        return attended
