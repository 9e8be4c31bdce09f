"""The U-KAN benchmark's IoU and F1, so that evaluation results can be set beside the published tables."""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric

__all__ = ["BatchPooledIoUMetric"]

SUPPORTED_OUTPUTS = ("iou", "f1")


class BatchPooledIoUMetric(CumulativeIterationMetric):
    """
    IoU (or F1) pooled over consecutive groups of images, as the U-KAN benchmark reports it.

    U-KAN (Li et al. 2024) thresholds the sigmoid output at 0.5, counts the intersection and the union over a whole
    validation batch (not per image), computes ``iou = (intersection + smooth) / (union + smooth)`` and
    ``f1 = 2 * iou / (iou + 1)`` per batch, and reports their average weighted by batch size. The result therefore
    depends on the batch size and the image order, and it is computed at the network's input size. This metric
    reproduces that: it records each image's intersection and union, then groups the images in the order they were
    seen into batches of ``batch_size``.

    Binary outputs (``num_classes`` 1): ``y_pred`` holds foreground probabilities, ``y`` the label; both are
    thresholded at 0.5. Multi-class outputs: ``y_pred`` holds class probabilities (argmax is taken) and ``y`` class
    indices; each foreground class gets its own pooled score and the classes are averaged.

    Args:
        num_classes: the network's output channels (1 for binary segmentation).
        batch_size: images per pooling group, U-KAN's validation batch size (8 in its configurations).
        output: ``"iou"`` or ``"f1"``.
        smooth: the constant U-KAN adds to the numerator and the denominator.
        threshold: probability threshold of binary predictions and labels.

    Input shapes: ``y_pred`` (B, C, H, W), ``y`` (B, 1, H, W), or lists of channel-first tensors.
    """

    def __init__(
        self,
        num_classes: int = 1,
        batch_size: int = 8,
        output: str = "iou",
        smooth: float = 1e-5,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if output not in SUPPORTED_OUTPUTS:
            raise ValueError(f"output must be one of {SUPPORTED_OUTPUTS}, got {output!r}.")
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.output = output
        self.smooth = smooth
        self.threshold = threshold

    def _foreground_masks(self, y_pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean (B, K, H, W) masks of the K foreground classes of prediction and label."""
        if y_pred.shape[1] != self.num_classes:
            raise ValueError(f"y_pred has {y_pred.shape[1]} channels, expected num_classes={self.num_classes}.")
        if y.shape[1] != 1 or y.shape[2:] != y_pred.shape[2:]:
            raise ValueError(
                f"y must have one channel and y_pred's spatial size {tuple(y_pred.shape[2:])}, got {tuple(y.shape)}."
            )
        if self.num_classes == 1:
            return y_pred > self.threshold, y > self.threshold
        classes = torch.arange(1, self.num_classes, device=y.device).view(1, -1, 1, 1)
        predicted = y_pred.argmax(dim=1, keepdim=True)
        return predicted == classes, y.round().long() == classes

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Per image and foreground class, the intersection and union pixel counts: (B, K, 2)."""
        predicted, target = self._foreground_masks(y_pred, y)
        intersection = (predicted & target).flatten(2).sum(-1)
        union = (predicted | target).flatten(2).sum(-1)
        return torch.stack([intersection, union], dim=-1).double()

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        """The batch-size-weighted mean of the per-group scores, averaged over foreground classes."""
        counts = self.get_buffer()
        if not isinstance(counts, torch.Tensor) or counts.numel() == 0:
            raise ValueError("no images were recorded, so there is nothing to aggregate.")
        group_scores, group_sizes = [], []
        for group in counts.split(self.batch_size, dim=0):
            pooled = group.sum(dim=0)
            iou = (pooled[:, 0] + self.smooth) / (pooled[:, 1] + self.smooth)
            group_scores.append(iou if self.output == "iou" else 2 * iou / (iou + 1))
            group_sizes.append(group.shape[0])
        sizes = torch.tensor(group_sizes, dtype=counts.dtype, device=counts.device)
        per_class = (torch.stack(group_scores) * sizes[:, None]).sum(dim=0) / sizes.sum()
        return per_class.mean()
