"""
Integrity checks of image/mask pairs: reading, mask binarisation, and the problems that must stop a preparation.

Every problem is an :class:`Issue` that names the file and says what is wrong. Errors (unreadable or empty files,
missing masks, size mismatches, masks that are not binary, datalist entries outside the data set folder) stop a
preparation; infos (a mask without foreground, normal for BUSI's ``normal`` class) are only logged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "DATALIST_NAME",
    "INTERMEDIATE_LIMIT",
    "Issue",
    "IntegrityError",
    "binarise",
    "check_dataset",
    "errors",
    "foreground_threshold",
    "intermediate_fraction",
    "is_outside",
    "load_pair",
    "mask_values",
    "read_picture",
    "to_rgb",
]

# the datalist of a prepared or generated data set, at the root of its folder
DATALIST_NAME = "datalist.json"

ERROR, INFO = "error", "info"
# a binary mask may have a few intermediate values (JPEG artefacts, anti-aliased edges); more than this fraction
# of pixels strictly between 10% and 90% of the mask's range means it is no binary mask (e.g. an image saved as mask)
INTERMEDIATE_LIMIT = 0.01
# Pillow modes of more than 8 bits per pixel, which its RGB conversion clips at 255 instead of scaling
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclass(frozen=True)
class Issue:
    """A problem found in one file: ``level`` is ``"error"`` (stops a preparation) or ``"info"`` (logged only)."""

    path: str
    message: str
    level: str = ERROR

    def __str__(self) -> str:
        return f"{self.level}: {self.path}: {self.message}"


class IntegrityError(ValueError):
    """Raised with every error found, so that one run lists all the problems of a data set."""

    def __init__(self, issues: Sequence[Issue], context: str = "") -> None:
        self.issues = list(issues)
        lines = "\n".join(f"  {issue}" for issue in self.issues)
        super().__init__(f"{context}{len(self.issues)} problem(s) found:\n{lines}")


def errors(issues: Iterable[Issue]) -> list[Issue]:
    """The issues of level error."""
    return [issue for issue in issues if issue.level == ERROR]


def read_picture(path: str) -> Image.Image:
    """
    Open and decode an image file.

    Raises:
        ValueError: naming ``path`` when the file is empty (0 bytes) or cannot be decoded.
    """
    if os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        picture = Image.open(path)
        picture.load()
    except PermissionError as error:
        raise ValueError("cannot be read (permission denied)") from error
    # Pillow raises the first three for damaged files, the last for a picture too large to be safely decoded
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"unreadable image ({error})") from error
    return picture


def to_rgb(picture: Image.Image) -> Image.Image:
    """
    The picture as 8-bit RGB. Alpha is dropped, palettes are applied, and pictures of more than 8 bits per pixel
    (16-bit PNG, 32-bit TIFF) are scaled from their own minimum and maximum to 0..255, which Pillow would clip.
    """
    if picture.mode in WIDE_MODES:
        values = np.asarray(picture, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        picture = Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    return picture.convert("RGB")


def is_outside(entry: str, folder: str) -> bool:
    """
    Whether a datalist entry leaves ``folder``: a relative path that, joined to ``folder`` and normalised, is not
    inside it (``../other/x.png``). Absolute paths are never outside: writing one is a deliberate choice. Symbolic
    links inside ``folder`` are not followed, so a data set may link to files kept elsewhere.
    """
    if os.path.isabs(entry):
        return False
    base = os.path.normpath(os.path.abspath(folder))
    path = os.path.normpath(os.path.join(base, entry))
    return os.path.commonpath([base, path]) != base


def mask_values(picture: Image.Image, palette_indices: bool = False) -> np.ndarray:
    """
    The values of a mask picture as a 2D array.

    1-bit masks give 0/1; colour masks (RGB, RGBA) give the maximum over the colour channels, alpha being ignored
    because masks saved with a constant alpha channel exist; grey + alpha gives the grey channel.

    Args:
        picture: the decoded mask.
        palette_indices: read palette (``P``) pictures as their indices (instance label maps) rather than colours.
    """
    if picture.mode == "P" and not palette_indices:
        picture = picture.convert("RGB")
    values = np.asarray(picture)
    if values.dtype == bool:
        values = values.astype(np.uint8)
    if values.ndim == 3:
        values = values[..., : 3 if values.shape[-1] >= 3 else 1].max(axis=-1)
    return values


def _scale(values: np.ndarray) -> float:
    """The full value of a mask: 1 for 0/1 masks, else the smallest of 255 and 65535 that holds its maximum."""
    peak = float(values.max()) if values.size else 0.0
    if peak <= 1.0:
        return 1.0
    return next((full for full in (255.0, 65535.0) if peak <= full), peak)


def foreground_threshold(values: np.ndarray) -> float:
    """Half the mask's full value (0.5, 127.5 for 8-bit, 32767.5 for 16-bit): near-black noise stays background.

    The one rule for preparing data sets and for reading masks in training, so that both see the same foreground.
    """
    return _scale(values) / 2.0


def binarise(values: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """
    Foreground of a mask: ``values > threshold``.

    Args:
        values: mask values, e.g. from :func:`mask_values`.
        threshold: ``None`` picks :func:`foreground_threshold` of the values.
    """
    return values > (foreground_threshold(values) if threshold is None else threshold)


def intermediate_fraction(values: np.ndarray) -> float:
    """The fraction of pixels strictly between 10% and 90% of the mask's full value (0 for 0/1 masks)."""
    scale = _scale(values)
    if scale == 1.0 or values.size == 0:
        return 0.0
    return float(np.count_nonzero((values > 0.1 * scale) & (values < 0.9 * scale))) / values.size


def load_pair(
    image: str, masks: Sequence[str], threshold: float | None = None, instance_maps: bool = False
) -> tuple[Image.Image | None, np.ndarray | None, list[Issue]]:
    """
    Read an image and its masks, check them, and return the RGB image and the union of the masks' foregrounds.

    Args:
        image: the image file.
        masks: its mask files (several for BUSI images with several lesions); the label is their union.
        threshold: see :func:`binarise`.
        instance_maps: masks are instance label maps (0 background, 1..K objects): palette pictures are read as
            indices and the binary-mask check is not applied.

    Returns:
        the image converted to RGB, the boolean label and the issues; the image and label are ``None`` when any
        issue is an error.
    """
    issues: list[Issue] = []
    picture = None
    try:
        picture = read_picture(image)
    except ValueError as error:
        issues.append(Issue(image, str(error)))
    if not masks:
        issues.append(Issue(image, "no mask for this image"))
    label = None
    for mask in masks:
        try:
            values = mask_values(read_picture(mask), palette_indices=instance_maps)
        except ValueError as error:
            issues.append(Issue(mask, str(error)))
            continue
        if picture is not None and values.shape != (picture.height, picture.width):
            issues.append(
                Issue(
                    mask,
                    f"mask size {values.shape[1]}x{values.shape[0]} differs from the image's "
                    f"{picture.width}x{picture.height} ({os.path.basename(image)})",
                )
            )
            continue
        fraction = intermediate_fraction(values)
        if not instance_maps and fraction > INTERMEDIATE_LIMIT:
            issues.append(
                Issue(
                    mask,
                    f"not a binary mask: {fraction:.1%} of its pixels are strictly between 10% and 90% of its range "
                    f"(limit {INTERMEDIATE_LIMIT:.0%})",
                )
            )
            continue
        foreground = binarise(values, threshold)
        label = foreground if label is None else label | foreground
    if errors(issues) or picture is None or label is None:
        return None, None, issues
    if not label.any():
        issues.append(Issue(image, "empty mask (no foreground)", INFO))
    return to_rgb(picture), label, issues


def check_dataset(dataset_dir: str) -> list[Issue]:
    """
    Check a prepared data set: its ``datalist.json`` and every pair it lists.

    Each listed image and label must be inside ``dataset_dir`` (see :func:`is_outside`), exist, be readable and of
    equal size, each label must be a single-channel 0/255 mask, and no image may be listed twice (within or across
    the lists).

    Returns:
        all issues found (errors and infos).

    Raises:
        FileNotFoundError: when ``dataset_dir`` has no ``datalist.json``.
    """
    datalist_file = os.path.join(dataset_dir, DATALIST_NAME)
    if not os.path.isfile(datalist_file):
        raise FileNotFoundError(f"{datalist_file} does not exist: {dataset_dir} is no prepared data set.")
    with open(datalist_file) as f:
        datalist = json.load(f)
    issues: list[Issue] = []
    seen: dict[str, str] = {}
    for split in ("training", "validation", "test"):
        for item in datalist.get(split, []):
            if "image" not in item or "label" not in item:
                issues.append(Issue(datalist_file, f"an item of '{split}' lacks 'image' or 'label': {item}"))
                continue
            outside = [item[key] for key in ("image", "label") if is_outside(item[key], dataset_dir)]
            issues.extend(
                Issue(datalist_file, f"the '{split}' entry {entry} is outside {dataset_dir}") for entry in outside
            )
            if outside:
                continue
            image = os.path.join(dataset_dir, item["image"])
            label = os.path.join(dataset_dir, item["label"])
            if item["image"] in seen:
                issues.append(Issue(image, f"listed twice ('{seen[item['image']]}' and '{split}')"))
            seen[item["image"]] = split
            missing = [path for path in (image, label) if not os.path.isfile(path)]
            issues.extend(Issue(path, "file listed in the datalist does not exist") for path in missing)
            if missing:
                continue
            _, _, pair_issues = load_pair(image, [label])
            issues.extend(pair_issues)
            if not errors(pair_issues):
                mask = read_picture(label)
                if mask.mode != "L" or not set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}:
                    issues.append(Issue(label, f"not a single-channel 0/255 mask (mode {mask.mode})"))
    return issues
