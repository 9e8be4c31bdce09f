"""
Datalists for the bundle's workflows: a data set's lists, kept inside its folder; the images of an inference
folder; the split to evaluate.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Sequence

from monai.bundle import ConfigParser
from monai.data import load_decathlon_datalist

from scripts.integrity import is_outside
from scripts.transforms import NIFTI_EXTENSIONS

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "PATH_KEYS", "evaluation_split", "list_images", "load_datalist"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz")
# the item keys whose paths MONAI's load_decathlon_datalist joins to the base folder
PATH_KEYS = ("image", "label")


def load_datalist(
    datalist_file: str, data_list_key: str = "training", base_dir: str | None = None, allow_outside: bool = False
) -> list[dict]:
    """
    MONAI's ``load_decathlon_datalist(datalist_file, True, data_list_key, base_dir)``, which refuses entries that
    leave the data set folder.

    A relative ``image`` or ``label`` entry must stay inside ``base_dir`` once joined to it (``images/a.png``, not
    ``../../etc/a.png``), so that a datalist received with a data set cannot make a workflow read files elsewhere.
    Absolute entries are accepted: writing one is a deliberate choice. ``allow_outside`` lifts the rule.

    Args:
        datalist_file: the datalist JSON file (MONAI decathlon format).
        data_list_key: the list to load, e.g. ``training``, ``validation``, ``test``.
        base_dir: the folder that relative entries are relative to; default: the datalist's folder.
        allow_outside: accept relative entries that leave ``base_dir``.

    Raises:
        ValueError: naming the datalist file, the list, the item and the entry that leaves ``base_dir``; and as
            MONAI's loader raises, when the file lacks ``data_list_key``.
    """
    base_dir = os.path.dirname(datalist_file) if base_dir is None else base_dir
    if not allow_outside:
        datalist = ConfigParser.load_config_file(datalist_file)
        for index, item in enumerate(datalist.get(data_list_key) or []):
            for key in PATH_KEYS:
                entries = item.get(key) if isinstance(item, dict) else None
                for entry in [entries] if isinstance(entries, str) else entries or []:
                    if isinstance(entry, str) and is_outside(entry, base_dir):
                        raise ValueError(
                            f"{datalist_file}: item {index} of '{data_list_key}' has the {key} '{entry}', which is "
                            f"outside the data set folder {base_dir}. Write it relative to that folder, give an "
                            "absolute path, or set allow_outside to accept it."
                        )
    return load_decathlon_datalist(datalist_file, True, data_list_key, base_dir)


def list_images(
    folder: str, extensions: Sequence[str] = IMAGE_EXTENSIONS, output_dir: str | None = None
) -> list[dict[str, str]]:
    """
    The images directly inside ``folder``, sorted by name, as a datalist ``[{"image": path}, ...]``.

    Args:
        folder: the folder to list (not recursive).
        extensions: accepted file name endings, compared case-insensitively.
        output_dir: where the masks (``<stem>_mask.png``, NIfTI for NIfTI inputs) and overlays
            (``<stem>_overlay.png``) will be written; checked when it is ``folder`` itself.

    Raises:
        FileNotFoundError: when ``folder`` is not a folder.
        ValueError: when ``folder`` holds no image with one of ``extensions``, when two images would write the
            same mask file (``a.png`` and ``a.jpg`` both give ``a_mask.png``), so that no mask overwrites another,
            or when ``output_dir`` is ``folder`` and an output would replace a file there (a ground-truth mask
            ``a_mask.png`` beside ``a.png``).
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the input folder {folder} does not exist or is not a folder.")
    endings = tuple(e.lower() for e in extensions)
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(endings) and not n.startswith("."))
    images = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    if not images:
        raise ValueError(f"the input folder {folder} holds no image with an extension among {list(endings)}.")
    _check_unique_outputs(images)
    if output_dir is not None and os.path.realpath(output_dir) == os.path.realpath(folder):
        _check_outputs_keep_the_folder(folder, images)
    return [{"image": path} for path in images]


def _stem_and_mask_ext(name: str) -> tuple[str, str]:
    """An image's name without its extension, and the extension of its mask: the input's for NIfTI, else .png."""
    nifti_ext = next((e for e in NIFTI_EXTENSIONS[::-1] if name.lower().endswith(e)), None)
    return (name[: -len(nifti_ext)], nifti_ext) if nifti_ext else (os.path.splitext(name)[0], ".png")


def _check_outputs_keep_the_folder(folder: str, images: Sequence[str]) -> None:
    """Raise when writing the outputs of ``images`` into their own ``folder`` would replace files there."""
    existing = set(os.listdir(folder))
    replaced = []
    for path in images:
        stem, mask_ext = _stem_and_mask_ext(os.path.basename(path))
        replaced += [name for name in (f"{stem}_mask{mask_ext}", f"{stem}_overlay.png") if name in existing]
    if replaced:
        shown = ", ".join(replaced[:5]) + (f" and {len(replaced) - 5} more" if len(replaced) > 5 else "")
        raise ValueError(
            f"writing the masks into the input folder {folder} would replace files there: {shown}. Give another "
            "--output_dir."
        )


def _check_unique_outputs(images: Sequence[str]) -> None:
    """Raise when two images share the name their masks are written under: the stem and the output format."""
    by_output = defaultdict(list)
    for path in images:
        name = os.path.basename(path)
        by_output[_stem_and_mask_ext(name)].append(name)
    clashes = [names for names in by_output.values() if len(names) > 1]
    if clashes:
        listed = "; ".join(" and ".join(names) for names in clashes)
        raise ValueError(
            f"these images in {os.path.dirname(images[0])} would write the same mask file: {listed}. "
            "Rename one of each group."
        )


def evaluation_split(datalist_file: str, preferred: Sequence[str] = ("test", "validation")) -> str:
    """
    The first of ``preferred`` that the datalist has with at least one item.

    Raises:
        ValueError: when the datalist has none of them.
    """
    datalist = ConfigParser.load_config_file(datalist_file)
    for key in preferred:
        if datalist.get(key):
            logger.info("Evaluating the '%s' split of %s (%d items).", key, datalist_file, len(datalist[key]))
            return key
    raise ValueError(f"the datalist {datalist_file} has no non-empty list among {list(preferred)}.")
