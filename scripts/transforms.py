"""
Bundle transforms that MONAI lacks: channel-first for in-memory pictures, 2D squeezing, channel-count conversion,
rejection of NaN and infinite values, mask binarisation, mask saving.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirst, MapTransform, SaveImage, Transform
from monai.utils import MetaKeys

from scripts.integrity import INTERMEDIATE_LIMIT, foreground_threshold, intermediate_fraction

__all__ = [
    "CheckFinite",
    "CheckFinited",
    "EnsureChannelFirst2D",
    "EnsureChannelFirst2Dd",
    "EnsureChannels",
    "EnsureChannelsd",
    "EnsureSpatial2D",
    "EnsureSpatial2Dd",
    "MaskToLabel",
    "MaskToLabeld",
    "SaveImageMaskd",
    "is_nifti",
]

NIFTI_EXTENSIONS = (".nii", ".nii.gz")

logger = logging.getLogger(__name__)


def is_nifti(filename: str) -> bool:
    """Whether ``filename`` names a NIfTI file (``.nii`` or ``.nii.gz``, any case)."""
    return str(filename).lower().endswith(NIFTI_EXTENSIONS)


def _source(img: torch.Tensor) -> str:
    """The file an image was loaded from, for error messages."""
    return str(img.meta.get("filename_or_obj", "<array>")) if isinstance(img, MetaTensor) else "<array>"


class EnsureChannelFirst2D(Transform):
    """
    MONAI's ``EnsureChannelFirst``, which also takes 2D pictures that no MONAI reader loaded.

    ``EnsureChannelFirst`` finds the channel from the ``original_channel_dim`` that MONAI's readers record, and
    raises without it. Arrays handed over in memory (MONAI Deploy's bundle operator drops ``LoadImage`` and passes
    the picture array with its own metadata) lack it; for those the picture layout is assumed: ``(H, W)`` has no
    channel, ``(H, W, C)`` with 1 to 4 channels is channel-last.

    Raises:
        ValueError: when an array without ``original_channel_dim`` has neither picture layout.
    """

    PICTURE_CHANNELS = (1, 2, 3, 4)  # grey, grey + alpha, RGB, RGBA

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if isinstance(img, MetaTensor) and img.meta.get(MetaKeys.ORIGINAL_CHANNEL_DIM) is not None:
            return EnsureChannelFirst()(img)
        if img.ndim == 2:
            channel_dim: str | int = "no_channel"
        elif img.ndim == 3 and img.shape[-1] in self.PICTURE_CHANNELS:
            channel_dim = -1
        else:
            raise ValueError(
                f"{_source(img)}: no original_channel_dim in the metadata and shape {tuple(img.shape)} is not a "
                f"(H, W) or (H, W, C) picture with C in {self.PICTURE_CHANNELS}."
            )
        return EnsureChannelFirst(channel_dim=channel_dim)(img)


class EnsureSpatial2D(Transform):
    """
    Drop trailing singleton spatial dimensions of a channel-first image until two spatial dimensions remain.

    A 2D NIfTI image is often stored as a one-slice volume ``(X, Y, 1)``; after ``EnsureChannelFirst`` it is
    ``(C, X, Y, 1)``. The affine is left as it is, so a mask saved from the result keeps the input's affine.

    Raises:
        ValueError: when the image has more than two spatial dimensions larger than one (a real volume).
    """

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        while img.ndim > 3 and img.shape[-1] == 1:
            img = img[..., 0]
        if img.ndim != 3:
            raise ValueError(
                f"{_source(img)}: expected a 2D image, got a channel-first array of shape {tuple(img.shape)}."
            )
        return img


class EnsureChannels(Transform):
    """
    Convert a channel-first 2D image to ``num_channels`` channels.

    The input channels are read as grey (1), grey + alpha (2), RGB (3) or RGBA (4); alpha is dropped, grey is
    repeated to make RGB, and RGB is averaged to make grey. Any other count must already equal ``num_channels``.

    Args:
        num_channels: channels the network takes.
        expand_grey: repeat grey to make RGB. ``False`` leaves a grey image grey, for a pipeline that repeats it
            later, after resizing: repeating commutes with intensity scaling and resizing, and costs three times
            less memory on a small image than on a large one.
    """

    def __init__(self, num_channels: int = 3, expand_grey: bool = True) -> None:
        if num_channels < 1:
            raise ValueError(f"num_channels must be positive, got {num_channels}.")
        self.num_channels = num_channels
        self.expand_grey = expand_grey

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        channels = img.shape[0]
        if channels == self.num_channels:
            return img
        if channels in (2, 4):
            img = img[: channels - 1]
            channels -= 1
        if channels == self.num_channels:
            return img
        if channels == 1 and self.num_channels == 3:
            return img.repeat(3, *([1] * (img.ndim - 1))) if self.expand_grey else img
        if channels == 3 and self.num_channels == 1:
            return img.mean(dim=0, keepdim=True)
        raise ValueError(
            f"{_source(img)}: cannot convert an image with {img.shape[0]} channels to {self.num_channels} channels."
        )


class CheckFinite(Transform):
    """
    Reject an image that holds NaN or infinite values.

    One such value makes ``ScaleIntensity`` turn the whole image into NaN or zeros, and the network then writes an
    empty mask without any error; this check runs right after loading, before a resize could skip the value.

    Raises:
        ValueError: naming the file and the number of NaN and infinite values.
    """

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        # a NaN or infinity makes the sum non-finite; the sum needs no image-sized temporary, unlike isfinite
        if not torch.is_floating_point(img) or bool(torch.isfinite(img.sum())):
            return img
        num_nan = int(torch.isnan(img).sum())
        num_inf = int(torch.isinf(img).sum())
        if num_nan or num_inf:  # otherwise the sum of finite values overflowed
            raise ValueError(
                f"{_source(img)}: the image holds {num_nan} NaN and {num_inf} infinite value(s); "
                "replace them (e.g. by the background value) before using the file."
            )
        return img


class MaskToLabel(Transform):
    """
    Turn a loaded mask into a one-channel label: 0/1 for binary segmentation, class indices otherwise.

    Binary masks may be stored as 0/1 (1-bit PNG, NIfTI) or 0/255 (8-bit PNG, JPEG with compression noise):
    foreground is a value above half of 1 or of 255, whichever range the mask uses, in any colour channel (RGB
    masks; the alpha channel of grey + alpha and RGBA masks is ignored). A binary mask with more intermediate values
    than data preparation allows (:data:`scripts.integrity.INTERMEDIATE_LIMIT`) is rejected, as it is likely an
    image saved as a mask; a mask without foreground is logged. Multi-class masks keep their first channel, rounded
    to the nearest class index.

    Args:
        num_classes: output channels of the network: 1 for binary segmentation, else the number of classes.

    Raises:
        ValueError: naming the file, for a binary mask that is not binary or a multi-class mask with values that
            are not class indices.
    """

    def __init__(self, num_classes: int = 1) -> None:
        self.num_classes = num_classes

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        if self.num_classes > 1:
            label = torch.round(mask[:1])
            if label.numel() and (label.min() < 0 or label.max() >= self.num_classes):
                raise ValueError(
                    f"{_source(mask)}: label values must be class indices in [0, {self.num_classes - 1}], "
                    f"got the range [{label.min().item()}, {label.max().item()}]."
                )
            return label
        colour = mask[: mask.shape[0] - 1] if mask.shape[0] in (2, 4) else mask
        foreground = colour.amax(dim=0, keepdim=True)
        values = foreground.detach().cpu().numpy()
        fraction = intermediate_fraction(values)
        if fraction > INTERMEDIATE_LIMIT:
            raise ValueError(
                f"{_source(mask)}: not a binary mask: {fraction:.1%} of its pixels are strictly between 10% and 90% "
                f"of its range (limit {INTERMEDIATE_LIMIT:.0%})."
            )
        label = (foreground > foreground_threshold(values)).to(torch.float32)
        if not bool(label.any()):
            logger.info(f"{_source(mask)}: the mask has no foreground.")
        return label


class _PerKeyd(MapTransform):
    """Apply ``self.converter``, an array transform set by the subclass, to each key."""

    converter: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


class CheckFinited(_PerKeyd):
    """Dictionary version of :class:`CheckFinite`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = CheckFinite()


class EnsureChannelFirst2Dd(_PerKeyd):
    """Dictionary version of :class:`EnsureChannelFirst2D`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = EnsureChannelFirst2D()


class EnsureSpatial2Dd(_PerKeyd):
    """Dictionary version of :class:`EnsureSpatial2D`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = EnsureSpatial2D()


class EnsureChannelsd(_PerKeyd):
    """Dictionary version of :class:`EnsureChannels`."""

    def __init__(
        self, keys: KeysCollection, num_channels: int = 3, expand_grey: bool = True, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = EnsureChannels(num_channels, expand_grey)


class MaskToLabeld(MapTransform):
    """
    Dictionary version of :class:`MaskToLabel`, which also checks that each mask has its image's size.

    Args:
        keys: the mask key(s).
        num_classes: see :class:`MaskToLabel`.
        image_key: the image the masks belong to; when the data holds it, a mask whose spatial shape differs from
            the image's raises a ``ValueError`` naming both files. ``None`` skips the check.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_classes: int = 1,
        image_key: str | None = "image",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = MaskToLabel(num_classes)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image = d.get(self.image_key) if self.image_key is not None else None
        for key in self.key_iterator(d):
            if image is not None and tuple(d[key].shape[1:]) != tuple(image.shape[1:]):
                raise ValueError(
                    f"{_source(d[key])}: the mask's spatial shape {tuple(d[key].shape[1:])} differs from the "
                    f"image's {tuple(image.shape[1:])} ({_source(image)})."
                )
            d[key] = self.converter(d[key])
        return d


class SaveImageMaskd(MapTransform):
    """
    Save the mask of each input in the input's own kind of file, and optionally an overlay picture.

    MONAI's ``SaveImaged`` writes one format per instance; an inference folder may mix pictures and NIfTI files.
    The class name contains ``SaveImage`` so that MONAI Deploy's ``MonaiBundleInferenceOperator``, which drops every
    transform whose class name contains ``LoadImage`` or ``SaveImage`` and passes results in memory, drops it too.
    Masks of pictures are written as PNG (values 0/255 by default), masks of NIfTI inputs as NIfTI (same extension,
    same shape, including a trailing one-slice dimension) with the mask's values and the input's affine. All go
    through MONAI's writers, which undo the (W, H) order in which MONAI's PIL reader loads pictures, so a mask lines
    up with its picture.

    Args:
        keys: the mask key(s), channel-first ``(1, ...)`` at the input's original size, carrying the input's metadata.
        output_dir: folder for the outputs; file names are ``<input name>_<output_postfix>.<ext>``.
        output_postfix: appended to the input's name.
        png_scale: PNG masks are multiplied by this (255: a 0/1 mask becomes 0/255); None writes the values as they
            are (class indices of a multi-class mask).
        save_overlay: also write ``<input name>_overlay.png``: the image with the mask blended in red.
        image_key: the image (at the mask's size, values in [0, 1], 1 or 3 channels) used for the overlay.
        overlay_alpha: opacity of the mask colour in the overlay.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        output_postfix: str = "mask",
        png_scale: int | None = 255,
        save_overlay: bool = False,
        image_key: str = "image",
        overlay_alpha: float = 0.4,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = output_dir
        self.output_postfix = output_postfix
        self.png_scale = png_scale
        self.save_overlay = save_overlay
        self.image_key = image_key
        self.overlay_alpha = overlay_alpha

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[key]
            if not isinstance(mask, MetaTensor):
                raise TypeError(
                    f"SaveImageMaskd needs '{key}' as a MetaTensor with the input's metadata, got {type(mask)}."
                )
            source = _source(mask).lower()
            if is_nifti(source):
                self._save_nifti(mask, ".nii.gz" if source.endswith(".gz") else ".nii")
            else:
                self._save(mask.as_tensor(), mask.meta, ".png", self.output_postfix, scale=self.png_scale)
            if self.save_overlay:
                self._save(self._overlay(d[self.image_key], mask), mask.meta, ".png", "overlay", scale=None)
        return d

    def _save(
        self,
        array: torch.Tensor,
        meta: Mapping,
        ext: str,
        postfix: str,
        channel_dim: int = 0,
        data_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Write ``array`` with MONAI's writer for ``ext``.

        A new ``SaveImage`` per file: ``SaveImage`` infers from ``meta["spatial_shape"]`` whether the array has a
        channel and keeps that guess for later files, so the shape is set here to the array's own.
        """
        spatial = [s for i, s in enumerate(array.shape) if i != channel_dim % array.ndim]
        image = MetaTensor(array, meta={**meta, "spatial_shape": np.asarray(spatial)})
        saver = SaveImage(
            output_dir=self.output_dir,
            output_postfix=postfix,
            output_ext=ext,
            output_dtype=np.uint8,
            separate_folder=False,
            print_log=False,
            channel_dim=channel_dim,
            **kwargs,
        )
        if data_kwargs:
            saver.set_options(data_kwargs=data_kwargs)
        saver(image)

    def _save_nifti(self, mask: MetaTensor, ext: str) -> None:
        """Write a one-channel mask as NIfTI in the input's shape, trailing one-slice dimensions included."""
        original = [int(s) for s in np.ravel(mask.meta.get("spatial_shape", mask.shape[1:]))]
        if len(original) > mask.ndim - 1 and original[: mask.ndim - 1] == list(mask.shape[1:]):
            # the trailing singleton stands in for the channel, so that the writer neither adds nor drops a dimension
            volume = mask.as_tensor().reshape(original)
            self._save(
                volume,
                mask.meta,
                ext,
                self.output_postfix,
                channel_dim=-1,
                data_kwargs={"spatial_ndim": None},
                squeeze_end_dims=False,
            )
        else:
            self._save(mask.as_tensor(), mask.meta, ext, self.output_postfix)

    def _overlay(self, image: torch.Tensor, mask: MetaTensor) -> torch.Tensor:
        """The image as 8-bit RGB values with the mask blended in red."""
        if image.shape[1:] != mask.shape[1:]:
            raise ValueError(
                f"{_source(mask)}: the overlay image has size {tuple(image.shape[1:])} but the mask "
                f"{tuple(mask.shape[1:])}; invert the image to its original size before saving."
            )
        rgb = image.as_tensor() if isinstance(image, MetaTensor) else image
        rgb = EnsureChannels(3)(rgb.float().clamp(0.0, 1.0))
        red = torch.tensor([1.0, 0.0, 0.0], device=rgb.device).view(3, *([1] * (rgb.ndim - 1)))
        weight = self.overlay_alpha * (mask.as_tensor()[:1] > 0).float()
        return torch.round((rgb * (1.0 - weight) + red * weight) * 255.0)
