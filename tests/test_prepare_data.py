"""
Preparation of downloaded data sets (scripts/prepare_data.py) and their integrity checks (scripts/integrity.py).

Each source is exercised on a tiny fixture built here in its official layout (names with spaces and brackets,
several masks per image, 1-bit, grey, RGB and RGBA masks, TIFF, JPEG-compressed masks, GlaS instance maps). When
the real data sets lie beside the repository (``../shared/data``) they are prepared too: BUSI's 59-image sample in
full, CVC-ClinicDB and Kvasir-SEG counted in full but written for a deterministic subsample, since writing all of
them takes about 12 s and 50 s on two cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigParser, ConfigWorkflow
from PIL import Image

from scripts.integrity import IntegrityError, check_dataset
from scripts.prepare_data import find_cvc, find_kvasir, natural_key, prepare, safe_name, train_test_split_indices

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASET_CONFIGS = {"busi": 256, "cvc": 256, "kvasir": 256, "glas": 512}


def _blob(height: int, width: int, top: int = 4, left: int = 5, size: int = 8) -> np.ndarray:
    """A boolean mask with one square of foreground."""
    mask = np.zeros((height, width), dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def _image(path: Path, height: int = 20, width: int = 24, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels, mode="RGB").save(path)


def _mask(path: Path, mask: np.ndarray, mode: str = "L", **save) -> None:
    """Save a boolean mask as 1-bit (``1``), 0/255 grey (``L``), RGB or RGBA (opaque)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = mask.astype(np.uint8) * 255
    if mode == "1":
        picture = Image.fromarray(mask)
    elif mode == "RGB":
        picture = Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), mode="RGB")
    elif mode == "RGBA":
        picture = Image.fromarray(np.dstack([grey, grey, grey, np.full_like(grey, 255)]), mode="RGBA")
    else:
        picture = Image.fromarray(grey, mode="L")
    picture.save(path, **save)


def _written_mask(dataset: Path, item: dict) -> np.ndarray:
    picture = Image.open(dataset / item["label"])
    assert picture.mode == "L"
    values = np.asarray(picture)
    assert set(np.unique(values).tolist()) <= {0, 255}, item["label"]
    return values > 0


def _all_items(datalist: dict) -> list[dict]:
    return [item for split in ("training", "validation", "test") for item in datalist.get(split, [])]


def _load(datalist_file: str) -> dict:
    with open(datalist_file) as f:
        return json.load(f)


@pytest.fixture
def busi_download(tmp_path: Path) -> Path:
    """BUSI in the official layout: 3 benign, 1 malignant, 1 normal; masks of every kind seen in the release."""
    root = tmp_path / "download" / "Dataset_BUSI_with_GT"
    for number, mode in ((1, "1"), (2, "L"), (10, "1")):
        _image(root / "benign" / f"benign ({number}).png", seed=number)
        _mask(root / "benign" / f"benign ({number})_mask.png", _blob(20, 24), mode)
    # a second lesion in an RGBA mask: the label is the union
    _mask(root / "benign" / "benign (10)_mask_1.png", _blob(20, 24, top=12, left=14, size=5), "RGBA")
    _image(root / "malignant" / "malignant (1).png", height=18, width=30)
    _mask(root / "malignant" / "malignant (1)_mask.png", _blob(18, 30), "RGB")
    _image(root / "normal" / "normal (1).png")
    _mask(root / "normal" / "normal (1)_mask.png", np.zeros((20, 24), dtype=bool), "RGB")
    return root


def test_natural_order_and_safe_names():
    names = ["benign (10).png", "benign (2).png", "Benign (1).png", "malignant (1).png"]
    assert sorted(names, key=natural_key) == [
        "Benign (1).png",
        "benign (2).png",
        "benign (10).png",
        "malignant (1).png",
    ]
    assert safe_name("benign (195)") == "benign_195"
    assert safe_name("a b(c)") == "a_b_c"


def test_split_reproduces_scikit_learn():
    # obtained from scikit-learn 1.9.1: train_test_split(list(range(10)), test_size=0.2, random_state=2981)
    assert train_test_split_indices(10, 0.2, 2981) == ([7, 2, 5, 9, 4, 1, 8, 3], [6, 0])
    # and train_test_split(list(range(13)), test_size=0.2, random_state=1187)
    assert train_test_split_indices(13, 0.2, 1187) == ([1, 3, 6, 11, 4, 12, 2, 8, 0, 7], [9, 5, 10])
    with pytest.raises(ValueError, match="empty"):
        train_test_split_indices(1, 0.2, 2981)
    try:
        from sklearn.model_selection import train_test_split
    except ImportError:
        return  # the hard-coded expectations above still hold the reference
    for num_items in (2, 7, 59, 647):
        for seed in (2981, 6142, 1187):
            for test_size in (0.2, 0.1):
                train, test = train_test_split(list(range(num_items)), test_size=test_size, random_state=seed)
                assert train_test_split_indices(num_items, test_size, seed) == (train, test)


def test_busi(busi_download: Path, tmp_path: Path):
    datalist = _load(prepare("busi", str(busi_download.parent), str(tmp_path / "busi")))
    items = _all_items(datalist)
    assert sorted(item["image"] for item in items) == [
        "images/benign_1.png",
        "images/benign_10.png",
        "images/benign_2.png",
        "images/malignant_1.png",
    ]
    assert datalist["class_counts"] == {"benign": 3, "malignant": 1}
    assert datalist["counts"] == {"training": 3, "validation": 1}
    assert datalist["skipped"] == []
    # natural order, then scikit-learn's split of 4 items with seed 2981
    order = ["benign_1", "benign_2", "benign_10", "malignant_1"]
    train, validation = train_test_split_indices(4, 0.2, 2981)
    assert [Path(item["image"]).stem for item in datalist["validation"]] == [order[i] for i in validation]
    assert [Path(item["image"]).stem for item in datalist["training"]] == [order[i] for i in train]
    by_name = {Path(item["image"]).stem: item for item in items}
    assert by_name["benign_10"]["source_masks"] == "benign/benign (10)_mask.png|benign/benign (10)_mask_1.png"
    assert by_name["benign_10"]["source_image"] == "benign/benign (10).png"
    union = _blob(20, 24) | _blob(20, 24, top=12, left=14, size=5)
    dataset = tmp_path / "busi"
    np.testing.assert_array_equal(_written_mask(dataset, by_name["benign_10"]), union)
    for name in ("benign_1", "benign_2"):  # 1-bit and 8-bit masks
        np.testing.assert_array_equal(_written_mask(dataset, by_name[name]), _blob(20, 24))
    np.testing.assert_array_equal(_written_mask(dataset, by_name["malignant_1"]), _blob(18, 30))
    image = Image.open(dataset / by_name["malignant_1"]["image"])
    assert image.mode == "RGB" and image.size == (30, 18)
    source = busi_download / "malignant" / "malignant (1).png"
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(source)))  # lossless

    with_normal = _load(prepare("busi", str(busi_download), str(tmp_path / "all"), keep_normal=True, seed=6142))
    assert with_normal["class_counts"] == {"benign": 3, "malignant": 1, "normal": 1}
    assert sum(with_normal["counts"].values()) == 5
    assert check_dataset(str(tmp_path / "all"))[0].message == "empty mask (no foreground)"


def test_cvc_tiff_and_png(tmp_path: Path):
    # near-black noise in the masks (values up to 20) must stay background
    noisy = _blob(16, 20).astype(np.uint8) * 255
    noisy[0, :3] = (5, 12, 20)
    for folder, image_dir, mask_dir, ext in (
        ("tif", "Original", "Ground Truth", "tif"),
        ("png", "images", "masks", "png"),
    ):
        for number in (1, 2, 11):
            _image(tmp_path / folder / image_dir / f"{number}.{ext}", height=16, width=20, seed=number)
            (tmp_path / folder / mask_dir).mkdir(exist_ok=True)
            Image.fromarray(np.repeat(noisy[..., None], 3, axis=-1), mode="RGB").save(
                tmp_path / folder / mask_dir / f"{number}.{ext}"
            )
        datalist = _load(prepare("cvc", str(tmp_path / folder), str(tmp_path / f"out-{folder}"), seed=1187))
        items = _all_items(datalist)
        assert sorted(item["image"] for item in items) == ["images/1.png", "images/11.png", "images/2.png"]
        for item in items:
            np.testing.assert_array_equal(_written_mask(tmp_path / f"out-{folder}", item), _blob(16, 20))
        assert items[0]["source_masks"].startswith(f"{mask_dir}/")


def test_kvasir_jpeg_masks_and_test_fraction(tmp_path: Path):
    download = tmp_path / "Kvasir-SEG"
    names = [f"cju{index}x" for index in range(10)]
    for index, name in enumerate(names):
        _image(download / "images" / f"{name}.jpg", height=48, width=64, seed=index)
        _mask(download / "masks" / f"{name}.jpg", _blob(48, 64, top=8, left=16, size=24), "RGB", quality=90)
    datalist = _load(prepare("kvasir", str(tmp_path), str(tmp_path / "out"), test_fraction=0.2))
    assert datalist["counts"] == {"training": 6, "validation": 2, "test": 2}
    rest, test = train_test_split_indices(10, 0.2, 2981)
    assert [item["source_image"] for item in datalist["test"]] == [f"images/{names[i]}.jpg" for i in test]
    for item in _all_items(datalist):
        written = _written_mask(tmp_path / "out", item)
        # JPEG artefacts at the edges may flip a pixel or two
        assert np.count_nonzero(written != _blob(48, 64, top=8, left=16, size=24)) <= 8


def test_folder_with_suffix(tmp_path: Path):
    download = tmp_path / "download"
    for stem in ("case (1)", "case (2)", "case_1"):
        _image(download / "pics" / f"{stem}.png", seed=len(stem))
        _mask(download / "pics" / f"{stem}_mask.png", _blob(20, 24), "L")
    datalist = _load(
        prepare(
            "folder",
            str(download),
            str(tmp_path / "out"),
            images="pics/*.png",
            masks="pics/*_mask.png",
            mask_suffix="_mask",
        )
    )
    items = _all_items(datalist)
    # "case (1)" and "case_1" both become case_1: the one later in natural order gets a number
    assert sorted(Path(item["image"]).stem for item in items) == ["case_1", "case_1_2", "case_2"]
    assert {item["source_image"] for item in items} == {"pics/case (1).png", "pics/case (2).png", "pics/case_1.png"}


def test_glas_official_and_random(tmp_path: Path):
    download = tmp_path / "Warwick QU Dataset (Released 2016_07_08)"
    instances = np.zeros((20, 24), dtype=np.uint8)
    instances[2:6, 2:6], instances[10:15, 12:20] = 1, 37  # instance ids: the label is anno > 0
    for subset, count in (("train", 5), ("testA", 2), ("testB", 1)):
        for number in range(1, count + 1):
            _image(download / f"{subset}_{number}.bmp", seed=number)
            Image.fromarray(instances, mode="L").save(download / f"{subset}_{number}_anno.bmp")
    (download / "Grade.csv").write_text("name, patient ID, GlaS, grade (Sirinukunwattana et al. 2015)\n")
    official = _load(prepare("glas", str(download), str(tmp_path / "official")))
    assert official["counts"] == {"training": 4, "validation": 1, "test": 3}
    assert official["subset_counts"] == {"testA": 2, "testB": 1, "train": 5}
    assert [item["source_image"] for item in official["test"]] == ["testA_1.bmp", "testA_2.bmp", "testB_1.bmp"]
    assert {item["subset"] for item in official["training"] + official["validation"]} == {"train"}
    for item in _all_items(official):
        np.testing.assert_array_equal(_written_mask(tmp_path / "official", item), instances > 0)
    pooled = _load(prepare("glas", str(download), str(tmp_path / "random"), split="random"))
    assert pooled["counts"] == {"training": 6, "validation": 2}
    with pytest.raises(ValueError, match="official split"):
        prepare("glas", str(download), str(tmp_path / "bad"), test_fraction=0.1)


@pytest.fixture
def broken_download(tmp_path: Path) -> Path:
    """A folder of pairs with one good pair and one of each problem the checks must report."""
    root = tmp_path / "broken"
    for stem in ("good", "missing mask", "size", "empty image", "unreadable", "grey", "dup"):
        _image(root / "images" / f"{stem}.png", seed=len(stem))
    (root / "images" / "empty image.png").write_bytes(b"")
    _image(root / "images" / "dup.jpg")  # a second image with stem "dup"
    for stem in ("good", "unreadable", "dup"):
        _mask(root / "masks" / f"{stem}.png", _blob(20, 24))
    _mask(root / "masks" / "empty image.png", _blob(20, 24))
    _mask(root / "masks" / "size.png", _blob(10, 12))
    _mask(root / "masks" / "orphan.png", _blob(20, 24))
    (root / "masks" / "unreadable.png").write_bytes(b"not a png")
    ramp = np.tile(np.linspace(0, 255, 24, dtype=np.uint8), (20, 1))  # an image, not a mask
    Image.fromarray(ramp, mode="L").save(root / "masks" / "grey.png")
    return root


EXPECTED_PROBLEMS = {
    "missing mask.png": "no mask",
    "size.png": "differs from the image",
    "empty image.png": "empty file",
    "unreadable.png": "unreadable",
    "grey.png": "not a binary mask",
    "dup.png": "duplicate image stem",
    "dup.jpg": "duplicate image stem",
    "orphan.png": "mask without image",
}


def test_integrity_errors_list_every_problem(broken_download: Path, tmp_path: Path):
    output = tmp_path / "out"
    with pytest.raises(IntegrityError) as raised:
        prepare("folder", str(broken_download), str(output), images="images/*", masks="masks/*")
    message = str(raised.value)
    for name, problem in EXPECTED_PROBLEMS.items():
        assert any(name in line and problem in line for line in message.splitlines()), (name, message)
    assert len(raised.value.issues) == len(EXPECTED_PROBLEMS)
    assert not output.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_skip_bad(broken_download: Path, tmp_path: Path):
    output = tmp_path / "out"
    # one good pair cannot be split 80/20: copy it twice more under other names
    for stem in ("good 2", "good 3"):
        _image(broken_download / "images" / f"{stem}.png")
        _mask(broken_download / "masks" / f"{stem}.png", _blob(20, 24))
    datalist = _load(
        prepare("folder", str(broken_download), str(output), images="images/*", masks="masks/*", skip_bad=True)
    )
    assert sorted(item["source_image"] for item in _all_items(datalist)) == [
        "images/good 2.png",
        "images/good 3.png",
        "images/good.png",
    ]
    skipped = {Path(entry["file"]).name: entry["problem"] for entry in datalist["skipped"]}
    assert set(skipped) == set(EXPECTED_PROBLEMS)
    assert sorted(p.name for p in (output / "images").iterdir()) == ["good.png", "good_2.png", "good_3.png"]
    assert check_dataset(str(output)) == []


def test_wrong_source_folder_errors_say_what_is_wrong(busi_download: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        prepare("busi", str(tmp_path / "missing"), str(tmp_path / "out"))
    kvasir_like = tmp_path / "kvasir"
    for folder in ("images", "masks"):
        (kvasir_like / folder).mkdir(parents=True)
        Image.fromarray(_blob(16, 16)).save(kvasir_like / folder / "a.jpg")
    with pytest.raises(ValueError, match=r"found no image/mask pairs in .*kvasir in the 'cvc' layout"):
        prepare("cvc", str(kvasir_like), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="overwrite='false'"):
        prepare("busi", str(busi_download), str(tmp_path / "out"), overwrite="false")
    assert not (tmp_path / "out").exists()


def test_overwrite_and_atomic_write(busi_download: Path, tmp_path: Path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty; pass --overwrite True"):
        prepare("busi", str(busi_download), str(output))
    assert sorted(p.name for p in output.iterdir()) == ["keep.txt"]
    prepare("busi", str(busi_download), str(output), overwrite=True)
    assert sorted(p.name for p in output.iterdir()) == ["datalist.json", "images", "masks"]
    # a failing run leaves the previous data set as it was and no temporary folder behind
    (busi_download / "benign" / "benign (2)_mask.png").unlink()
    with pytest.raises(IntegrityError, match=r"benign \(2\)\.png: no mask"):
        prepare("busi", str(busi_download), str(output), overwrite=True)
    assert len(_all_items(_load(str(output / "datalist.json")))) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["download", "out"]
    with pytest.raises(ValueError, match="holds the source"):
        prepare("busi", str(busi_download), str(tmp_path), overwrite=True)


def test_check_reports_damaged_dataset(busi_download: Path, tmp_path: Path):
    output = tmp_path / "out"
    datalist = _load(prepare("busi", str(busi_download), str(output)))
    first, second = datalist["training"][:2]
    Image.fromarray(np.full((20, 24), 1, dtype=np.uint8), mode="L").save(output / first["label"])
    (output / second["image"]).unlink()
    messages = [str(issue) for issue in check_dataset(str(output))]
    assert any(first["label"] in m and "0/255" in m for m in messages), messages
    assert any(second["image"] in m and "does not exist" in m for m in messages), messages


def test_command_line_and_bundle_config(busi_download: Path, tmp_path: Path):
    command = [sys.executable, "-m", "scripts.prepare_data", "busi", str(busi_download), str(tmp_path / "cli")]
    result = subprocess.run(command + ["--seed", "6142"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert _load(str(tmp_path / "cli" / "datalist.json"))["seed"] == 6142
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "error:" in again.stderr and "not empty" in again.stderr
    checked = subprocess.run(
        [sys.executable, "-m", "scripts.prepare_data", "check", str(tmp_path / "cli")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0 and "no problem found" in checked.stdout, checked.stderr

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "prepare.json"))
    parser.update(
        {
            "src_dir": str(busi_download),
            "dataset_dir": str(tmp_path / "config"),
            "source_options": {"keep_normal": True},
        }
    )
    parser.get_parsed_content("preparing")
    assert _load(str(tmp_path / "config" / "datalist.json"))["class_counts"]["normal"] == 1


def _training_files(name: str) -> list:
    return [
        str(CONFIGS / "train.json"),
        str(CONFIGS / "ukan_protocol.json"),
        str(CONFIGS / "datasets" / f"{name}.json"),
    ]


@pytest.mark.parametrize("name", sorted(DATASET_CONFIGS))
def test_dataset_configs_layer_on_train(name: str):
    parser = ConfigParser()
    parser.read_config(_training_files(name))
    size = DATASET_CONFIGS[name]
    assert parser.get_parsed_content("image_size") == [size, size]
    assert parser["optimizer"]["_target_"] == "torch.optim.Adam"
    assert (
        parser["optimizer"]["params"]
        == ConfigParser.load_config_file(str(CONFIGS / "train.json"))["optimizer"]["params"]
    )
    assert (parser["num_epochs"], parser["batch_size"], parser["learning_rate"]) == (400, 8, 1e-4)
    assert (parser["weight_decay"], parser["min_learning_rate"]) == (1e-4, 1e-5)
    targets = [transform["_target_"] for transform in parser["train"]["random_transforms"]]
    assert targets == ["RandRotate90d", "RandFlipd", "RandFlipd"]
    assert parser.get_parsed_content("dataset_dir").endswith(f"/data/{name}")


@pytest.mark.parametrize("name", sorted(DATASET_CONFIGS))
def test_dataset_configs_give_inference_and_export_the_training_image_size(name: str):
    """The data set files layer on inference.json, so inference and ckpt_export resize as training did."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), str(CONFIGS / "datasets" / f"{name}.json")])
    parser.update({"bundle_root": str(REPO)})
    size = DATASET_CONFIGS[name]
    resize = next(t for t in parser.get_parsed_content("preprocessing").transforms if type(t).__name__ == "Resized")
    assert tuple(resize.resizer.spatial_size) == (size, size)


def test_busi_config_trains_on_prepared_data(busi_download: Path, tmp_path: Path):
    prepare("busi", str(busi_download), str(tmp_path / "busi"))
    workflow = ConfigWorkflow(
        config_file=_training_files("busi"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(REPO),
        dataset_dir=str(tmp_path / "busi"),
        ckpt_dir=str(tmp_path / "models"),
        log_dir=str(tmp_path / "runs"),
        network_dims=[8, 16, 32, 64],
        network_depths=[1, 1, 1, 1],
        network_depths_decoder=[1, 1, 1, 1],
        d_state=4,
    )
    workflow.initialize()
    assert workflow.check_properties() in (None, [])
    for split, count in (("train", 3), ("validate", 1)):
        # one batch of all items: the datalist's extra keys (one mask or two) must collate
        batch = next(iter(workflow.parser.get_parsed_content(f"{split}#dataloader")))
        assert tuple(batch["image"].shape) == (count, 3, 256, 256)
        assert tuple(batch["label"].shape) == (count, 1, 256, 256)
        assert set(np.unique(np.asarray(batch["label"])).tolist()) <= {0.0, 1.0}


def _needs_real(name: str) -> Path:
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"real data not available: {folder}")
    return folder


def _subsample(folder: Path, target: Path, image_dir: str, mask_dir: str, step: int) -> int:
    """Link every ``step``-th pair of a real data set into ``target`` (same layout); return the number linked."""
    names = sorted(os.listdir(folder / image_dir), key=natural_key)[::step]
    for sub in (image_dir, mask_dir):
        (target / sub).mkdir(parents=True)
        for name in names:
            (target / sub / name).symlink_to(folder / sub / name)
    return len(names)


def test_real_busi_sample(tmp_path: Path):
    folder = _needs_real("busi-sample")
    datalist = _load(prepare("busi", str(folder), str(tmp_path / "busi")))
    assert sum(datalist["class_counts"].values()) == 47 and "normal" not in datalist["class_counts"]
    assert datalist["counts"] == {"training": 37, "validation": 10}
    every = _load(prepare("busi", str(folder / "Dataset_BUSI_with_GT"), str(tmp_path / "all"), keep_normal=True))
    assert sum(every["counts"].values()) == 59 and every["class_counts"]["normal"] == 12
    for item in _all_items(every):
        mask = _written_mask(tmp_path / "all", item)
        assert mask.any() == (item["class"] != "normal"), item["source_image"]


@pytest.mark.parametrize(
    "name, find, total, step", [("cvc-clinicdb", find_cvc, 612, 12), ("kvasir-seg", find_kvasir, 1000, 25)]
)
def test_real_polyp_sets(name: str, find, total: int, step: int, tmp_path: Path):
    folder = _needs_real(name)
    found = find(str(folder))
    assert len(found.pairs) == total and found.issues == []
    count = _subsample(folder, tmp_path / "sample", "images", "masks", step)
    datalist = _load(prepare(name.split("-")[0], str(tmp_path / "sample"), str(tmp_path / "out")))
    items = _all_items(datalist)
    assert len(items) == count and datalist["skipped"] == []
    for item in items:
        mask = _written_mask(tmp_path / "out", item)
        assert mask.shape == Image.open(tmp_path / "out" / item["image"]).size[::-1]
