"""The KAN-regulated multiscale weighted loss of VMAML-UNet."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
from monai.losses import DiceCELoss

from scripts.networks.kan import KANLinear

__all__ = ["KANMultiScaleLoss", "LOSS_MODES"]

LOSS_MODES = ("kan_uncertainty", "fixed", "none")


class KANMultiScaleLoss(nn.Module):
    """
    Deep-supervision loss ``L = L_0 + sum_k w_k L_k`` over the main logits (``L_0``) and the side logits (``L_k``).

    Every level uses Dice + cross-entropy (MONAI's :class:`DiceCELoss`: sigmoid and BCE for one output channel,
    softmax and CE for several) against the full-resolution label; the network upsamples the side logits.

    Modes:
        ``"kan_uncertainty"``: ``L = L_0 + sum_k (exp(-s_k) L_k + s_k)`` with ``s_k`` computed each step by a small
        KAN from the level's features: the detached ``L_k``, the detached ``L_0``, the level's position in
        ``[-1, 1]`` and, with ``encoder_statistics``, the batch mean of the matching encoder output's pooled mean and
        standard deviation. The ``+ s_k`` term (Kendall et al. 2018 uncertainty weighting) keeps the weights from
        collapsing to zero, so the total can be negative. The KAN's parameters must be optimised with the network's.
        ``"fixed"``: constant ``w_k`` from ``fixed_weights``.
        ``"none"``: ``L = L_0``, plain VM-UNet training.

    Args:
        out_channels: output channels of the network (1: binary with sigmoid, more: classes with softmax).
        mode: one of ``LOSS_MODES``.
        num_side_outputs: side levels the network returns in training mode.
        fixed_weights: ``w_k`` for ``mode="fixed"``, finest level first.
        lambda_dice: weight of the Dice term at every level.
        lambda_ce: weight of the (binary) cross-entropy term at every level.
        kan_grid_size: B-spline intervals of the weighting KAN.
        encoder_statistics: for ``mode="kan_uncertainty"``, a callable returning the network's statistics of the
            encoder outputs matching the side levels in its last forward, ``(B, num_side_outputs, F)``, e.g.
            :meth:`VMAMLUNet.last_encoder_statistics` (``F = 2``); ``None`` leaves them out of the KAN's features.
        encoder_statistics_features: ``F``, the statistics per level that ``encoder_statistics`` returns.

    Shapes:
        ``pred``: ``(B, 1 + num_side_outputs, C, H, W)`` (main logits first), or ``(B, C, H, W)`` for ``mode="none"``.
        ``target``: ``(B, 1, H, W)``: 0/1 for binary, class indices otherwise. Returns a scalar.
    """

    def __init__(
        self,
        out_channels: int = 1,
        mode: str = "kan_uncertainty",
        num_side_outputs: int = 3,
        fixed_weights: Sequence[float] = (0.5, 0.25, 0.125),
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        kan_grid_size: int = 5,
        encoder_statistics: Callable[[], torch.Tensor | None] | None = None,
        encoder_statistics_features: int = 2,
    ) -> None:
        super().__init__()
        if mode not in LOSS_MODES:
            raise ValueError(f"mode must be one of {LOSS_MODES}, got {mode!r}.")
        if mode == "fixed" and len(fixed_weights) != num_side_outputs:
            raise ValueError(
                f"fixed_weights needs {num_side_outputs} values (one per side output), got {fixed_weights}."
            )
        self.mode = mode
        self.num_side_outputs = num_side_outputs
        binary = out_channels == 1
        self.level_loss = DiceCELoss(
            sigmoid=binary, softmax=not binary, to_onehot_y=not binary, lambda_dice=lambda_dice, lambda_ce=lambda_ce
        )
        self.register_buffer("fixed_weights", torch.as_tensor(list(fixed_weights), dtype=torch.float32))
        self.register_buffer("level_positions", torch.linspace(-1.0, 1.0, num_side_outputs))
        # A callable rather than the network itself: a module attribute would make the network a submodule of the
        # loss, and its parameters would reach the optimizer twice.
        self.encoder_statistics = encoder_statistics if mode == "kan_uncertainty" else None
        self.encoder_statistics_features = encoder_statistics_features if self.encoder_statistics is not None else 0
        self.weighting = (
            KANLinear(3 + self.encoder_statistics_features, 1, grid_size=kan_grid_size)
            if mode == "kan_uncertainty"
            else None
        )
        self._level_weights: torch.Tensor | None = None

    @property
    def level_weights(self) -> torch.Tensor | None:
        """The side levels' weights ``w_k`` of the last call (finest first), detached; ``None`` in mode ``none``."""
        return self._level_weights

    def _pooled_encoder_statistics(self, statistics: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """The encoder statistics of the batch, averaged over its images: ``(num_side_outputs, F)``."""
        expected = (batch_size, self.num_side_outputs, self.encoder_statistics_features)
        if statistics is None:
            raise ValueError(
                "the KAN weighting reads the encoder statistics of the network's last forward, but there are none: "
                "run the network in training mode with side heads before the loss, or build the loss without "
                "encoder_statistics."
            )
        if tuple(statistics.shape) != expected:
            raise ValueError(
                f"the encoder statistics must have shape {expected} (batch, side levels, features) to match the "
                f"predictions, got {tuple(statistics.shape)}: they do not come from the forward of this batch."
            )
        return statistics.mean(dim=0)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        stacked = pred.ndim == target.ndim + 1
        main = pred[:, 0] if stacked else pred
        main_loss = self.level_loss(main, target)
        if self.mode == "none":
            return main_loss
        if not stacked or pred.shape[1] != 1 + self.num_side_outputs:
            raise ValueError(
                f"loss mode {self.mode!r} needs the main and {self.num_side_outputs} side outputs stacked as "
                f"(B, {1 + self.num_side_outputs}, C, H, W), got {tuple(pred.shape)} for a target of "
                f"{tuple(target.shape)}; use mode 'none' when the network has no side heads."
            )
        side_losses = torch.stack([self.level_loss(pred[:, 1 + k], target) for k in range(self.num_side_outputs)])
        if self.weighting is None:
            weights = self.fixed_weights.to(side_losses)
            total = main_loss + (weights * side_losses).sum()
        else:
            features = torch.stack(
                [side_losses.detach(), main_loss.detach().expand_as(side_losses), self.level_positions.to(side_losses)],
                dim=-1,
            )
            if self.encoder_statistics is not None:
                features = torch.cat(
                    [features, self._pooled_encoder_statistics(self.encoder_statistics(), pred.shape[0]).to(features)],
                    dim=-1,
                )
            log_variance = self.weighting(features).squeeze(-1)
            weights = torch.exp(-log_variance)
            total = main_loss + (weights * side_losses + log_variance).sum()
        self._level_weights = weights.detach()
        return total
