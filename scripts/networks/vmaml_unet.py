"""VMAML-UNet: a vision-Mamba U-Net with wavelet convolutions, WCAA skips and KAN deep-supervision heads."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F  # noqa: N812

from scripts.networks.blocks import PatchExpanding, PatchMerging, WCVMBlock
from scripts.networks.kan import KANConv2d
from scripts.networks.wcaa import WCAA
from scripts.switches import require_bools

__all__ = ["VMAMLUNet"]


class VMAMLUNet(nn.Module):
    """
    VMAML-UNet for 2D segmentation (Journal of Image and Graphics 31(1), 2026), built on VM-UNet (Ruan et al. 2024).

    A 4x4 patch stem, an encoder of WCVM blocks with patch merging, a decoder of WCVM blocks with patch expanding
    that adds the (WCAA-aggregated) encoder skips, a final 4x expanding and a 1x1 convolution to logits. In training
    mode, KAN convolution heads on the outputs of the last three decoder stages give deep-supervision logits.

    With ``wavelet_fusion="none"``, ``use_wcaa=False`` and ``kan_side_heads=False`` the network is VM-UNet
    (27,427,561 parameters at the defaults with ``in_channels=3, out_channels=1``).

    Args:
        in_channels: input channels (1 for grey, 3 for colour).
        out_channels: output channels: 1 for binary (sigmoid) segmentation, the number of classes for softmax.
        dims: channels of the encoder stages; each stage doubles the previous one.
        depths: WCVM blocks per encoder stage.
        depths_decoder: WCVM blocks per decoder stage, from the deepest to the shallowest.
        d_state: SSM state size.
        drop_path_rate: stochastic depth, rising linearly over the encoder blocks and falling over the decoder ones.
        wavelet_fusion: ``"replace"``, ``"parallel"`` or ``"none"``: how the wavelet convolution enters SS2D.
        wavelet_levels: wavelet decomposition levels per stage, shallowest first (also used by WCAA on the skips).
        wavelet_kernel_size: kernel size ``k`` of every wavelet convolution's convolutions (SS2D's and WCAA's).
        use_wcaa: aggregate the skips with WCAA; ``False`` adds them as VM-UNet does.
        kan_side_heads: add KAN convolution deep-supervision heads (training mode only).
        scan_backend: selective-scan backend: ``"auto"``, ``"cpu_kernel"``, ``"torch"`` or ``"mamba_ssm"``.

    Shapes:
        input ``(B, in_channels, H, W)`` of any size: it is padded to a multiple of ``4 * 2**(len(dims) - 1)`` (32 by
        default) and the output cropped back.
        eval mode, or training without side heads: logits ``(B, out_channels, H, W)``.
        training with side heads: ``(B, len(dims), out_channels, H, W)``: the main logits, then the side logits from
        the finest to the coarsest level, upsampled bilinearly to ``H x W`` (MONAI DynUNet's convention).

    Each training-mode forward with side heads also records pooled statistics of the encoder outputs that the side
    levels' decoder stages take as skips, for the KAN-regulated loss: see :meth:`last_encoder_statistics`.
    """

    # Set in eager training only (by _record_encoder_statistics); a scripted network has no use for it.
    __jit_ignored_attributes__ = ["_encoder_statistics"]
    _encoder_statistics: Optional[torch.Tensor]

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 2, 2),
        depths_decoder: Sequence[int] = (2, 2, 2, 1),
        d_state: int = 16,
        drop_path_rate: float = 0.2,
        wavelet_fusion: str = "replace",
        wavelet_levels: Sequence[int] = (3, 3, 2, 1),
        wavelet_kernel_size: int = 3,
        use_wcaa: bool = True,
        kan_side_heads: bool = True,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        require_bools({"use_wcaa": use_wcaa, "kan_side_heads": kan_side_heads})
        dims, depths, depths_decoder = list(dims), list(depths), list(depths_decoder)
        wavelet_levels = list(wavelet_levels)
        num_stages = len(dims)
        if num_stages < 2:
            raise ValueError(f"dims needs at least two stages, got {dims}.")
        if not len(depths) == len(depths_decoder) == len(wavelet_levels) == num_stages:
            raise ValueError(
                f"dims, depths, depths_decoder and wavelet_levels must have one entry per stage, got {dims}, "
                f"{depths}, {depths_decoder}, {wavelet_levels}."
            )
        if any(dims[i + 1] != 2 * dims[i] for i in range(num_stages - 1)):
            raise ValueError(f"each stage must double the channels of the previous one (patch merging), got {dims}.")
        if dims[0] % 4 != 0:
            raise ValueError(f"dims[0] must be divisible by 4 for the final 4x expanding, got {dims[0]}.")
        self.size_multiple = 4 * 2 ** (num_stages - 1)

        self.stem = nn.Conv2d(in_channels, dims[0], kernel_size=4, stride=4)
        self.stem_norm = nn.LayerNorm(dims[0])

        encoder_rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        decoder_rates = torch.linspace(0, drop_path_rate, sum(depths_decoder)).tolist()[::-1]

        def blocks(dim: int, depth: int, rates: List[float], levels: int) -> List[nn.Module]:
            return [
                WCVMBlock(dim, d_state, rates[i], wavelet_fusion, levels, wavelet_kernel_size, scan_backend)
                for i in range(depth)
            ]

        self.encoder = nn.ModuleList()
        for i in range(num_stages):
            stage = blocks(dims[i], depths[i], encoder_rates[sum(depths[:i]) :], wavelet_levels[i])
            if i < num_stages - 1:
                stage.append(PatchMerging(dims[i]))
            self.encoder.append(nn.Sequential(*stage))

        skip_dims = dims[1:]
        self.wcaa = WCAA(skip_dims, wavelet_levels[1:], wavelet_kernel_size) if use_wcaa else None

        self.decoder = nn.ModuleList()
        for j in range(num_stages):
            level = num_stages - 1 - j
            stage = [PatchExpanding(dims[level + 1])] if j > 0 else []
            stage += blocks(
                dims[level], depths_decoder[j], decoder_rates[sum(depths_decoder[:j]) :], wavelet_levels[level]
            )
            self.decoder.append(nn.Sequential(*stage))

        self.final_expand = PatchExpanding(dims[0], scale=4)
        self.head = nn.Conv2d(dims[0] // 4, out_channels, kernel_size=1)

        # Side heads read the last num_stages - 1 decoder outputs; listed finest first, like the training output.
        self.side_heads = (
            nn.ModuleList([KANConv2d(dims[level], out_channels, kernel_size=3) for level in range(num_stages - 1)])
            if kan_side_heads
            else None
        )
        self._encoder_statistics = None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def last_encoder_statistics(self) -> Optional[torch.Tensor]:
        """
        Pooled statistics of the encoder outputs matching the side levels, from the last training-mode forward.

        Side level ``k`` (finest first) reads a decoder stage whose input had encoder skip ``k`` added to it (the
        input of encoder stage ``k + 2``, counting from 1, before WCAA); its statistics are that skip's mean and
        standard deviation over positions and channels, per image, detached and in float32. ``None`` until the
        network has run in training mode with side heads.

        Returns:
            ``(B, len(dims) - 1, 2)``: ``[mean, std]`` per image and side level, or ``None``.
        """
        return self._encoder_statistics

    @torch.jit.unused
    def _record_encoder_statistics(self, skips: List[torch.Tensor]) -> None:
        # Kept out of the output so that training mode still returns one tensor (MONAI's engines, DynUNet's
        # convention); TorchScript never compiles this, as scripted models are exported for inference.
        pooled = []
        for skip in skips:
            values = skip.detach().float().flatten(1)
            pooled.append(torch.stack([values.mean(dim=1), values.std(dim=1)], dim=-1))
        self._encoder_statistics = torch.stack(pooled, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        pad_h = (self.size_multiple - height % self.size_multiple) % self.size_multiple
        pad_w = (self.size_multiple - width % self.size_multiple) % self.size_multiple
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [0, pad_w, 0, pad_h])

        x = self.stem_norm(self.stem(x).permute(0, 2, 3, 1))
        skips: List[torch.Tensor] = []
        for i, stage in enumerate(self.encoder):
            if i > 0:
                skips.append(x)
            x = stage(x)
        if self.training and self.side_heads is not None and not torch.jit.is_scripting():
            self._record_encoder_statistics(skips)
        if self.wcaa is not None:
            skips = self.wcaa(skips)

        decoder_outputs: List[torch.Tensor] = []
        for j, stage in enumerate(self.decoder):
            if j > 0:
                x = x + skips[len(skips) - j]
            x = stage(x)
            decoder_outputs.append(x)

        logits = self.head(self.final_expand(x).permute(0, 3, 1, 2))
        if self.training and self.side_heads is not None:
            outputs = [logits]
            padded_size = [logits.shape[-2], logits.shape[-1]]
            for level, side_head in enumerate(self.side_heads):
                features = decoder_outputs[len(decoder_outputs) - 1 - level].permute(0, 3, 1, 2)
                side = F.interpolate(side_head(features), size=padded_size, mode="bilinear", align_corners=False)
                outputs.append(side)
            return torch.stack(outputs, dim=1)[..., :height, :width]
        return logits[..., :height, :width]
