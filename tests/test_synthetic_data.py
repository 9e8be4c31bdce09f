"""The synthetic default data set: deterministic content, MONAI datalist, reuse, atomic and concurrent generation."""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from PIL import Image

from scripts.integrity import DATALIST_NAME
from scripts.synthetic_data import ensure_synthetic_dataset, make_example

SMALL = {"num_images": (3, 2, 2), "sizes": ((40, 56), (48, 48))}


def test_example_is_deterministic_and_plausible():
    image, mask = make_example(5, (64, 80), seed=3)
    again, mask_again = make_example(5, (64, 80), seed=3)
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(mask, mask_again)
    assert image.shape == mask.shape == (64, 80)
    assert image.dtype == mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255}
    assert image[mask > 0].mean() > image[mask == 0].mean() + 40, "lesions must be brighter than the background"
    other, _ = make_example(6, (64, 80), seed=3)
    assert not np.array_equal(image, other)


def test_dataset_layout_and_datalist(tmp_path):
    root = tmp_path / "synthetic"
    datalist_file = ensure_synthetic_dataset(str(root), **SMALL)
    assert datalist_file == str(root / DATALIST_NAME)
    for key, count in zip(("training", "validation", "test"), SMALL["num_images"]):
        items = load_decathlon_datalist(datalist_file, True, key, str(root))
        assert len(items) == count
        for item in items:
            assert os.path.isfile(item["image"]) and os.path.isfile(item["label"])
    raw = json.loads((root / DATALIST_NAME).read_text())
    assert not os.path.isabs(raw["training"][0]["image"]), "datalist paths must be relative to the data set folder"

    sizes = set()
    for item in load_decathlon_datalist(datalist_file, True, "training", str(root)):
        picture, mask = Image.open(item["image"]), Image.open(item["label"])
        assert picture.mode == "RGB" and mask.mode == "L"
        assert picture.size == mask.size
        channels = np.asarray(picture)
        np.testing.assert_array_equal(channels[..., 0], channels[..., 2])  # grey content
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
        sizes.add(picture.size)
    assert (56, 40) in sizes, "a non-square size must be among the images"


def test_generation_is_reproducible_across_folders(tmp_path):
    first = ensure_synthetic_dataset(str(tmp_path / "a"), **SMALL)
    second = ensure_synthetic_dataset(str(tmp_path / "b"), **SMALL)
    for name in sorted(os.listdir(tmp_path / "a" / "images")):
        for sub in ("images", "masks"):
            a = np.asarray(Image.open(tmp_path / "a" / sub / name))
            b = np.asarray(Image.open(tmp_path / "b" / sub / name))
            np.testing.assert_array_equal(a, b)
    assert json.loads(open(first).read())["training"] == json.loads(open(second).read())["training"]


def test_existing_set_is_reused_and_other_settings_replace_it(tmp_path):
    root = tmp_path / "synthetic"
    ensure_synthetic_dataset(str(root), **SMALL)
    stamp = os.stat(root / DATALIST_NAME).st_mtime_ns
    ensure_synthetic_dataset(str(root), **SMALL)
    assert os.stat(root / DATALIST_NAME).st_mtime_ns == stamp, "a complete set with the same settings is reused"

    datalist_file = ensure_synthetic_dataset(str(root), num_images=(2, 1, 1), sizes=SMALL["sizes"])
    assert len(load_decathlon_datalist(datalist_file, True, "training", str(root))) == 2
    assert len(os.listdir(root / "images")) == 4
    assert sorted(os.listdir(tmp_path)) == ["synthetic"], "no staging or stale folder may be left behind"


def test_concurrent_callers_get_one_complete_set(tmp_path):
    root = str(tmp_path / "synthetic")
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: ensure_synthetic_dataset(root, **SMALL), range(4)))
    assert len(set(results)) == 1
    assert len(os.listdir(os.path.join(root, "images"))) == sum(SMALL["num_images"])
    assert sorted(os.listdir(tmp_path)) == ["synthetic"]


def test_refuses_a_foreign_folder_and_bad_settings(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing"):
        ensure_synthetic_dataset(str(foreign), **SMALL)
    assert (foreign / "precious.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="num_images"):
        ensure_synthetic_dataset(str(tmp_path / "x"), num_images=(0, 1, 1))
    with pytest.raises(ValueError, match="sizes"):
        ensure_synthetic_dataset(str(tmp_path / "x"), sizes=((4, 4),))
