"""
Prepare a public 2D segmentation data set, as downloaded from its official source, for the bundle's workflows.

Each source (BUSI, CVC-ClinicDB, Kvasir-SEG, GlaS, or any folder of pairs) is read in its official layout, every
pair is checked (:mod:`scripts.integrity`), and the data set is written as ``images/<name>.png`` (lossless RGB),
``masks/<name>.png`` (0/255 single channel) and ``datalist.json`` (MONAI decathlon format, paths relative to the
data set folder) with the U-KAN random 80/20 split.

Command line (``python -m scripts.prepare_data SOURCE SRC DST [options]``)::

    python -m scripts.prepare_data busi ~/Downloads/Dataset_BUSI_with_GT data/busi
    python -m scripts.prepare_data cvc ~/Downloads/CVC-ClinicDB data/cvc --seed 6142
    python -m scripts.prepare_data kvasir ~/Downloads/Kvasir-SEG data/kvasir --test_fraction 0.1
    python -m scripts.prepare_data glas "~/Downloads/Warwick QU Dataset (Released 2016_07_08)" data/glas
    python -m scripts.prepare_data folder SRC DST --images "img/*.png" --masks "gt/*.png" --mask_suffix _gt
    python -m scripts.prepare_data check data/busi
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from scripts.integrity import DATALIST_NAME, INFO, IntegrityError, Issue, check_dataset, errors, load_pair
from scripts.switches import require_bools

__all__ = [
    "DEFAULT_SEED",
    "MASK_SEPARATOR",
    "SOURCES",
    "UKAN_SEEDS",
    "Pair",
    "busi",
    "check",
    "cvc",
    "find_busi",
    "find_cvc",
    "find_folder",
    "find_glas",
    "find_kvasir",
    "folder",
    "glas",
    "kvasir",
    "natural_key",
    "prepare",
    "safe_name",
    "train_test_split_indices",
]

# U-KAN's three seeds (Li et al. 2024); results are averaged over them
UKAN_SEEDS = (2981, 6142, 1187)
DEFAULT_SEED = UKAN_SEEDS[0]
VALIDATION_FRACTION = 0.2
BUSI_CLASSES = ("benign", "malignant", "normal")
# joins an item's mask files in the datalist; no file name of the supported sources contains it
MASK_SEPARATOR = "|"
# PNG is lossless at every level; level 1 encodes several times faster than Pillow's default 6 for ~10% larger files
PNG_COMPRESS_LEVEL = 1

logger = logging.getLogger(__name__)


@dataclass
class Pair:
    """One image, its mask files (the label is their union) and metadata kept in the datalist item."""

    name: str
    image: str
    masks: list[str]
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class Source:
    """The pairs found in a download, the problems found while matching files, and how to read the masks."""

    root: str
    pairs: list[Pair]
    issues: list[Issue]
    threshold: float | None = None
    instance_maps: bool = False
    # (training+validation, test) pairs fixed by the data set itself; None for a random split
    official_test: list[Pair] | None = None


def natural_key(text: str) -> tuple:
    """Sort key ordering digit runs by value: ``benign (2)`` before ``benign (10)``; case-insensitive."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", text))


def safe_name(text: str) -> str:
    """A readable file name stem without spaces or brackets: ``benign (195)`` -> ``benign_195``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_.") or "item"


def train_test_split_indices(num_items: int, test_size: float, seed: int) -> tuple[list[int], list[int]]:
    """
    The indices that scikit-learn's ``train_test_split(items, test_size=test_size, random_state=seed)`` returns.

    scikit-learn's ``ShuffleSplit`` semantics, without importing it: ``n_test = ceil(test_size * n)``,
    ``perm = np.random.RandomState(seed).permutation(n)``, test ``perm[:n_test]``, train ``perm[n_test:]``.

    Raises:
        ValueError: when either part would be empty.
    """
    num_test = math.ceil(test_size * num_items)
    num_train = num_items - num_test
    if not 0.0 < test_size < 1.0 or num_test < 1 or num_train < 1:
        raise ValueError(f"cannot split {num_items} items with test_size={test_size}: a part would be empty.")
    permutation = np.random.RandomState(seed).permutation(num_items)
    return permutation[num_test:].tolist(), permutation[:num_test].tolist()


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _files(folder: str, extensions: Sequence[str]) -> list[str]:
    """The files directly in ``folder`` with one of ``extensions`` (case-insensitive), hidden ones left out, sorted."""
    names = [
        name for name in os.listdir(folder) if not name.startswith(".") and name.lower().endswith(tuple(extensions))
    ]
    return [os.path.join(folder, name) for name in sorted(names, key=natural_key)]


def _by_stem(paths: Sequence[str], suffix: str, issues: list[Issue], kind: str) -> dict[str, str]:
    """Map ``stem minus suffix`` to path; stems found twice are reported (``kind`` names the files) and left out."""
    found: dict[str, list[str]] = {}
    for path in paths:
        stem = _stem(path)
        if suffix and stem.endswith(suffix):
            stem = stem[: -len(suffix)]
        found.setdefault(stem, []).append(path)
    for stem, same in found.items():
        for path in same if len(same) > 1 else ():
            others = ", ".join(os.path.basename(other) for other in same if other != path)
            issues.append(Issue(path, f"duplicate {kind} stem '{stem}': also {others}"))
    return {stem: same[0] for stem, same in found.items() if len(same) == 1}


def _match(images: Sequence[str], masks: Sequence[str], suffix: str = "") -> tuple[list[Pair], list[Issue]]:
    """Pair images and masks by stem (the mask's stem is the image's plus ``suffix``); report unmatched files."""
    issues: list[Issue] = []
    image_stems = _by_stem(images, "", issues, "image")
    mask_stems = _by_stem(masks, suffix, issues, "mask")
    pairs = []
    for stem, image in image_stems.items():
        if stem in mask_stems:
            pairs.append(Pair(safe_name(stem), image, [mask_stems[stem]]))
        else:
            issues.append(Issue(image, f"no mask for this image (looked for '{stem}{suffix}.*' among the masks)"))
    # a mask whose image stem is duplicated was reported with the images
    all_stems = {_stem(image) for image in images}
    issues.extend(Issue(mask, "mask without image") for stem, mask in mask_stems.items() if stem not in all_stems)
    return pairs, issues


def _subfolder(src_dir: str, required: Sequence[str], wrappers: Sequence[str]) -> str:
    """``src_dir`` or its child named in ``wrappers`` that holds all of ``required``."""
    for candidate in [src_dir] + [os.path.join(src_dir, wrapper) for wrapper in wrappers]:
        if all(os.path.isdir(os.path.join(candidate, name)) for name in required):
            return candidate
    raise FileNotFoundError(
        f"{src_dir} is not in the expected layout: no folders {list(required)} in it"
        + (f" or in its sub-folder {' / '.join(wrappers)}" if wrappers else "")
        + "."
    )


def find_busi(src_dir: str, keep_normal: bool = False) -> Source:
    """
    BUSI (Al-Dhabyani et al. 2020) in its official layout ``Dataset_BUSI_with_GT/{benign,malignant,normal}/``.

    Each image ``<stem>.png`` has ``<stem>_mask.png`` and possibly ``<stem>_mask_1.png``, ``<stem>_mask_2.png``
    (several lesions; the label is their union). Masks are 1-bit, grey, RGB or RGBA.

    Args:
        src_dir: the ``Dataset_BUSI_with_GT`` folder or its parent.
        keep_normal: also take the ``normal`` images (empty masks); U-KAN's benchmark uses benign + malignant only.
    """
    classes = BUSI_CLASSES if keep_normal else BUSI_CLASSES[:2]
    root = _subfolder(src_dir, classes, ["Dataset_BUSI_with_GT"])
    mask_name = re.compile(r"^(?P<stem>.+)_mask(_\d+)?$", re.IGNORECASE)
    pairs, issues = [], []
    for label_class in classes:
        images: dict[str, str] = {}
        masks: dict[str, list[str]] = {}
        for path in _files(os.path.join(root, label_class), (".png",)):
            match = mask_name.match(_stem(path))
            if match:
                masks.setdefault(match["stem"], []).append(path)
            else:
                images[_stem(path)] = path
        for stem, image in images.items():
            # the _mask file first, then _mask_1, _mask_2: the order recorded in the datalist
            found = sorted(masks.get(stem, []), key=natural_key)
            pairs.append(Pair(safe_name(stem), image, found, {"class": label_class}))
        issues.extend(Issue(mask, "mask without image") for stem in masks if stem not in images for mask in masks[stem])
    return Source(root, pairs, issues)


def find_cvc(src_dir: str) -> Source:
    """
    CVC-ClinicDB (Bernal et al. 2015): ``Original/N.tif`` + ``Ground Truth/N.tif`` (official TIFF release) or
    ``images/N.png`` + ``masks/N.png`` (the common PNG conversion). Masks are binarised with > 127, as some carry
    near-black noise.
    """
    try:
        root = _subfolder(src_dir, ["Original", "Ground Truth"], ["CVC-ClinicDB", "PNG", "TIF"])
        image_dir, mask_dir, extensions = "Original", "Ground Truth", (".tif", ".tiff")
    except FileNotFoundError:
        root = _subfolder(src_dir, ["images", "masks"], ["CVC-ClinicDB"])
        image_dir, mask_dir, extensions = "images", "masks", (".png",)
    images = _files(os.path.join(root, image_dir), extensions)
    pairs, issues = _match(images, _files(os.path.join(root, mask_dir), extensions))
    return Source(root, pairs, issues, threshold=127)


def find_kvasir(src_dir: str) -> Source:
    """Kvasir-SEG (Jha et al. 2020): ``images/ID.jpg`` + ``masks/ID.jpg``; JPEG masks are binarised with > 127."""
    root = _subfolder(src_dir, ["images", "masks"], ["Kvasir-SEG", "kvasir-seg"])
    extensions = (".jpg", ".jpeg", ".png")
    images = _files(os.path.join(root, "images"), extensions)
    pairs, issues = _match(images, _files(os.path.join(root, "masks"), extensions))
    return Source(root, pairs, issues, threshold=127)


def find_folder(src_dir: str, images: str, masks: str, mask_suffix: str = "") -> Source:
    """
    Any image/mask pairs: ``images`` and ``masks`` are glob patterns relative to ``src_dir`` (``**`` allowed), and
    a mask belongs to the image whose stem plus ``mask_suffix`` is its stem. Files matched by both patterns are
    taken as masks. Masks are binarised automatically (> half the full value: 0.5 for 0/1 masks, 127.5 for 8-bit).
    """
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(f"the source folder {src_dir} does not exist.")
    mask_files = sorted(glob.glob(os.path.join(src_dir, masks), recursive=True))
    image_files = sorted(set(glob.glob(os.path.join(src_dir, images), recursive=True)) - set(mask_files))
    if not image_files:
        raise FileNotFoundError(f"no file in {src_dir} matches the image pattern '{images}'.")
    pairs, issues = _match(image_files, mask_files, mask_suffix)
    return Source(src_dir, pairs, issues)


def find_glas(src_dir: str, split: str = "official") -> Source:
    """
    GlaS (Warwick-QU, MICCAI 2015 challenge): ``train_N.bmp``/``train_N_anno.bmp`` (85), ``testA_N`` (60),
    ``testB_N`` (20), flat in one folder with ``Grade.csv``. Annotations are instance maps: the label is ``anno > 0``.

    Args:
        src_dir: the folder of the bmp files.
        split: ``official``: ``train`` gives training and validation (80/20 random split), ``testA`` + ``testB``
            the test list; ``random``: all 165 pooled and split 80/20 as U-KAN did.
    """
    if split not in ("official", "random"):
        raise ValueError(f"split must be 'official' or 'random', got '{split}'.")
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(f"the source folder {src_dir} does not exist.")
    name = re.compile(r"^(?P<subset>train|testA|testB)_\d+$", re.IGNORECASE)
    files = [path for path in _files(src_dir, (".bmp",)) if name.match(_stem(path).removesuffix("_anno"))]
    if not files:
        raise FileNotFoundError(f"{src_dir} holds no GlaS file (train_N.bmp, testA_N.bmp, testB_N.bmp).")
    masks = [path for path in files if _stem(path).endswith("_anno")]
    images = [path for path in files if path not in masks]
    pairs, issues = _match(images, masks, "_anno")
    for pair in pairs:
        pair.extra["subset"] = name.match(_stem(pair.image))["subset"]
    official_test = [pair for pair in pairs if pair.extra["subset"] != "train"] if split == "official" else None
    if official_test is not None:
        pairs = [pair for pair in pairs if pair.extra["subset"] == "train"]
    return Source(src_dir, pairs, issues, threshold=0, instance_maps=True, official_test=official_test)


SOURCES: dict[str, Callable[..., Source]] = {
    "busi": find_busi,
    "cvc": find_cvc,
    "kvasir": find_kvasir,
    "folder": find_folder,
    "glas": find_glas,
}


def _unique_names(pairs: Sequence[Pair]) -> None:
    """Make the output names unique in the given order: a name taken already gets ``_2``, ``_3``..."""
    taken: set[str] = set()
    for pair in pairs:
        name, number = pair.name, 1
        while name.lower() in taken:  # lower case: the names must stay distinct on case-insensitive file systems
            number += 1
            name = f"{pair.name}_{number}"
        pair.name = name
        taken.add(name.lower())


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _write_pairs(pairs: Sequence[Pair], source: Source, folder: str) -> tuple[list[Pair], list[Issue]]:
    """Check and write each pair into ``folder``; return the pairs written and all issues found."""
    written, issues = [], []
    for pair in pairs:
        picture, label, pair_issues = load_pair(pair.image, pair.masks, source.threshold, source.instance_maps)
        issues.extend(pair_issues)
        if picture is None or label is None:
            continue
        picture.save(os.path.join(folder, "images", f"{pair.name}.png"), compress_level=PNG_COMPRESS_LEVEL)
        mask = Image.fromarray(label.astype(np.uint8) * 255, mode="L")
        mask.save(os.path.join(folder, "masks", f"{pair.name}.png"), compress_level=PNG_COMPRESS_LEVEL)
        written.append(pair)
    return written, issues


def _item(pair: Pair, root: str) -> dict[str, Any]:
    return {
        "image": f"images/{pair.name}.png",
        "label": f"masks/{pair.name}.png",
        "source_image": _relative(pair.image, root),
        # one string, not a list: MONAI's collation needs equal-length lists across a batch
        "source_masks": MASK_SEPARATOR.join(_relative(mask, root) for mask in pair.masks),
        **pair.extra,
    }


def _split(
    pairs: list[Pair], official_test: list[Pair] | None, seed: int, test_fraction: float
) -> tuple[dict[str, list[Pair]], str]:
    """The training, validation and (optional) test pairs, and a description of the split."""
    test: list[Pair] = []
    description = (
        f"U-KAN protocol: scikit-learn train_test_split(items, test_size={VALIDATION_FRACTION}, random_state={seed}) "
        "reproduced with numpy; items in natural order of their source paths; 'validation' is the 20% part"
    )
    if official_test is not None:
        test = official_test
        description += "; 'test' is the official test set"
    elif test_fraction > 0.0:
        rest, held_out = train_test_split_indices(len(pairs), test_fraction, seed)
        test = [pairs[i] for i in held_out]
        pairs = [pairs[i] for i in rest]
        description = (
            f"'test' first held out with train_test_split(items, test_size={test_fraction}, random_state={seed}), "
            f"then the rest split as in the {description} (so 'validation' differs from U-KAN's)"
        )
    train, validation = train_test_split_indices(len(pairs), VALIDATION_FRACTION, seed)
    splits = {"training": [pairs[i] for i in train], "validation": [pairs[i] for i in validation]}
    if test:
        splits["test"] = test
    return splits, description


def _publish(staging: str, dataset_dir: str) -> None:
    """Move ``staging`` to ``dataset_dir``, replacing what is there (the caller has checked that it may)."""
    if os.path.isfile(dataset_dir) or (os.path.isdir(dataset_dir) and os.listdir(dataset_dir)):
        stale = tempfile.mkdtemp(prefix=f".{os.path.basename(dataset_dir)}-stale-", dir=os.path.dirname(dataset_dir))
        os.replace(dataset_dir, os.path.join(stale, "old"))
        os.rename(staging, dataset_dir)
        shutil.rmtree(stale)
    else:
        os.rename(staging, dataset_dir)  # replaces an empty folder


def prepare(
    source: str,
    src_dir: str,
    dataset_dir: str,
    seed: int = DEFAULT_SEED,
    test_fraction: float = 0.0,
    skip_bad: bool = False,
    overwrite: bool = False,
    **options: Any,
) -> str:
    """
    Prepare a downloaded data set in ``dataset_dir`` and return the path of its ``datalist.json``.

    Source items are sorted in natural order of their paths relative to the data set root (``benign/benign (2).png``
    before ``benign/benign (10).png``; BUSI's classes in the order benign, malignant, normal), then split as U-KAN
    did: ``validation`` is the 20% part of scikit-learn's ``train_test_split(items, test_size=0.2,
    random_state=seed)``. With ``test_fraction`` a test list is held out first with the same seed (the validation
    list then differs from U-KAN's). GlaS's official split keeps its official test set.

    The data set is written into a temporary folder beside ``dataset_dir`` and renamed into place when complete.

    Args:
        source: one of ``busi``, ``cvc``, ``kvasir``, ``glas``, ``folder``.
        src_dir: the download, in the source's official layout.
        dataset_dir: the output folder; must be absent or empty unless ``overwrite``.
        seed: split seed; U-KAN used 2981, 6142 and 1187.
        test_fraction: fraction of the items held out as ``test`` (0: none).
        skip_bad: leave out the pairs with problems (listed in the log and under ``skipped`` in the datalist)
            instead of stopping.
        overwrite: replace a non-empty ``dataset_dir``.
        options: the source's own options (``keep_normal`` for BUSI, ``split`` for GlaS, ``images``, ``masks``,
            ``mask_suffix`` for folder).

    Raises:
        FileExistsError: when ``dataset_dir`` is not empty and ``overwrite`` is false.
        IntegrityError: listing every problem found, unless ``skip_bad``.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source '{source}'; expected one of {sorted(SOURCES)}.")
    if not src_dir or not dataset_dir:
        raise ValueError("both src_dir (the download) and dataset_dir (the output folder) are required.")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
    require_bools({"skip_bad": skip_bad, "overwrite": overwrite})
    src_dir = os.path.abspath(os.path.expanduser(src_dir))
    dataset_dir = os.path.abspath(os.path.expanduser(dataset_dir))
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(f"the source folder {src_dir} does not exist.")
    if os.path.exists(dataset_dir) and (not os.path.isdir(dataset_dir) or os.listdir(dataset_dir)):
        if not overwrite:
            raise FileExistsError(
                f"{dataset_dir} exists and is not empty; pass --overwrite True (overwrite: true in "
                "configs/prepare.json) to replace it."
            )
        if os.path.commonpath([src_dir, dataset_dir]) == dataset_dir:
            raise ValueError(f"refusing to overwrite {dataset_dir}: it holds the source {src_dir}.")
    found = SOURCES[source](src_dir, **options)
    if not found.pairs and not found.issues:
        raise ValueError(
            f"found no image/mask pairs in {src_dir} in the '{source}' layout; is it the right source? "
            f"(the layouts are described in docs/data.md)"
        )
    if found.official_test is not None and test_fraction > 0.0:
        raise ValueError("test_fraction does not apply to GlaS's official split, which has its own test set.")

    # the split depends on the order of the items: natural order of the source paths, not the file system's
    def order(pair: Pair) -> tuple:
        return natural_key(_relative(pair.image, found.root))

    pairs = sorted(found.pairs, key=order)
    official_test = sorted(found.official_test, key=order) if found.official_test is not None else None
    _unique_names(pairs + (official_test or []))

    parent = os.path.dirname(dataset_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(dataset_dir)}-", dir=parent)
    try:
        os.makedirs(os.path.join(staging, "images"))
        os.makedirs(os.path.join(staging, "masks"))
        written, issues = _write_pairs(pairs + (official_test or []), found, staging)
        issues = found.issues + issues
        for issue in issues:
            logger.log(logging.INFO if issue.level == INFO else logging.WARNING, str(issue))
        bad = errors(issues)
        if bad and not skip_bad:
            raise IntegrityError(bad, f"{source} in {found.root}: ")
        kept = {id(pair) for pair in written}
        splits, description = _split(
            [pair for pair in pairs if id(pair) in kept],
            [pair for pair in official_test if id(pair) in kept] if official_test is not None else None,
            seed,
            test_fraction,
        )
        datalist: dict[str, Any] = {
            "name": source,
            "description": f"{source} prepared by scripts/prepare_data.py from {found.root}",
            "source": source,
            "source_dir": found.root,
            "options": options,
            "seed": seed,
            "test_fraction": test_fraction,
            "split": description,
            "counts": {name: len(items) for name, items in splits.items()},
        }
        for key in sorted({key for pair in written for key in pair.extra}):
            datalist[f"{key}_counts"] = dict(sorted(Counter(pair.extra[key] for pair in written).items()))
        datalist["skipped"] = [{"file": _relative(issue.path, found.root), "problem": issue.message} for issue in bad]
        datalist.update({name: [_item(pair, found.root) for pair in items] for name, items in splits.items()})
        # the datalist is the last file written: a folder holding it is complete
        with open(os.path.join(staging, DATALIST_NAME), "w") as f:
            json.dump(datalist, f, indent=4)
        _publish(staging, dataset_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"prepared {len(written)} pairs of {source} in {dataset_dir}: {datalist['counts']}.")
    if bad:
        logger.warning(f"left out {len(bad)} problem file(s), listed under 'skipped' in the datalist.")
    return os.path.join(dataset_dir, DATALIST_NAME)


def busi(src_dir: str, dataset_dir: str, keep_normal: bool = False, **options: Any) -> str:
    """BUSI from ``Dataset_BUSI_with_GT`` (or its parent); see :func:`prepare` for the common options."""
    return prepare("busi", src_dir, dataset_dir, keep_normal=keep_normal, **options)


def cvc(src_dir: str, dataset_dir: str, **options: Any) -> str:
    """CVC-ClinicDB (``Original``/``Ground Truth`` TIFF or ``images``/``masks`` PNG); see :func:`prepare`."""
    return prepare("cvc", src_dir, dataset_dir, **options)


def kvasir(src_dir: str, dataset_dir: str, **options: Any) -> str:
    """Kvasir-SEG (``images``/``masks`` JPEG); see :func:`prepare`."""
    return prepare("kvasir", src_dir, dataset_dir, **options)


def glas(src_dir: str, dataset_dir: str, split: str = "official", **options: Any) -> str:
    """GlaS (``train_N.bmp``, ``testA_N.bmp``, ``testB_N.bmp``, each with ``_anno``); see :func:`find_glas`."""
    return prepare("glas", src_dir, dataset_dir, split=split, **options)


def folder(src_dir: str, dataset_dir: str, images: str, masks: str, mask_suffix: str = "", **options: Any) -> str:
    """Pairs matched by stem from two glob patterns; see :func:`find_folder` and :func:`prepare`."""
    return prepare("folder", src_dir, dataset_dir, images=images, masks=masks, mask_suffix=mask_suffix, **options)


def check(dataset_dir: str) -> str:
    """
    Check a prepared data set (see :func:`scripts.integrity.check_dataset`) and return a summary.

    Raises:
        IntegrityError: listing every error found.
    """
    issues = check_dataset(dataset_dir)
    for issue in issues:
        logger.info(str(issue))
    bad = errors(issues)
    if bad:
        raise IntegrityError(bad, f"{dataset_dir}: ")
    return f"{dataset_dir}: no problem found ({len(issues)} info)."


if __name__ == "__main__":
    import fire

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        fire.Fire({"busi": busi, "cvc": cvc, "kvasir": kvasir, "glas": glas, "folder": folder, "check": check})
    except (IntegrityError, FileExistsError, FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
