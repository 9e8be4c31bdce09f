"""Datalists for the bundle's workflows: the images of an inference folder, the split to evaluate."""

from __future__ import annotations

import os
from typing import Sequence

from monai.bundle import ConfigParser

__all__ = ["IMAGE_EXTENSIONS", "evaluation_split", "list_images"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz")


def list_images(folder: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[dict[str, str]]:
    """
    The images directly inside ``folder``, sorted by name, as a datalist ``[{"image": path}, ...]``.

    Args:
        folder: the folder to list (not recursive).
        extensions: accepted file name endings, compared case-insensitively.

    Raises:
        FileNotFoundError: when ``folder`` is not a folder.
        ValueError: when ``folder`` holds no image with one of ``extensions``.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the input folder {folder} does not exist or is not a folder.")
    endings = tuple(e.lower() for e in extensions)
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(endings) and not n.startswith("."))
    images = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    if not images:
        raise ValueError(f"the input folder {folder} holds no image with an extension among {list(endings)}.")
    return [{"image": path} for path in images]


def evaluation_split(datalist_file: str, preferred: Sequence[str] = ("test", "validation")) -> str:
    """
    The first of ``preferred`` that the datalist has with at least one item.

    Raises:
        ValueError: when the datalist has none of them.
    """
    datalist = ConfigParser.load_config_file(datalist_file)
    for key in preferred:
        if datalist.get(key):
            return key
    raise ValueError(f"the datalist {datalist_file} has no non-empty list among {list(preferred)}.")
