"""
Bad input at every entry point: inference over a folder, training and evaluation data loading, data preparation.

A corpus of bad files is generated here: truncated PNG, JPEG and NIfTI files, zero-byte files, text under an image
extension, NaN and infinite values in NIfTI images, a 3D NIfTI volume, a huge picture, masks of the wrong size,
without foreground or with many intermediate values, 16-bit, palette, RGBA and grey pictures, names with spaces and
non-ASCII characters, an empty folder and unreadable permissions (not testable as root, where it is skipped).
Inference must write the mask of every good image, log and list the bad ones and fail; training, evaluation and
preparation must stop with an error that names the file and the problem.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle_test_utils import CONFIGS, REPO, THRESHOLD_NETWORK, make_config_workflow, threshold_checkpoint
from monai.bundle import ConfigParser
from PIL import Image

from scripts.bad_inputs import CheckedDataset, FailedInput, InputError, check_files, describe_failure
from scripts.datalist import load_datalist
from scripts.integrity import IntegrityError, check_dataset, errors
from scripts.prepare_data import check, prepare

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# a 1x1 convolution as the network: inference runs in milliseconds and marks pixels brighter than mid-grey
GOOD_IMAGES = ("good image.png", "größe ü.png", "grey.png", "palette.png", "rgba.png", "sixteen bit.png", "slice.nii")
# bad file -> words of the expected reason
BAD_IMAGES = {
    "cut.png": "image file is truncated",
    "cut_jpeg.jpg": "runcated",  # where the cut falls, Pillow says "image file is truncated" or "Truncated File Read"
    "cut_nifti.nii.gz": "EOFError",
    "zero bytes.png": "empty file (0 bytes)",
    "not an image.png": "no configured reader can decode it",
    "nan.nii.gz": "1 NaN and 0 infinite",
    "inf.nii": "0 NaN and 1 infinite",
    "volume.nii.gz": "expected a 2D image",
}


def _picture(height: int = 30, width: int = 40, seed: int = 0) -> np.ndarray:
    """An RGB picture with a bright rectangle on a dark noisy background."""
    pixels = np.random.default_rng(seed).integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    pixels[5:15, 8:25] = 230
    return pixels


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_good(folder: Path) -> None:
    """Every good kind of input: RGB, names with spaces and non-ASCII characters, grey, palette, RGBA, 16-bit, NIfTI."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = _picture()
    Image.fromarray(picture).save(folder / "good image.png")
    Image.fromarray(picture).save(folder / "größe ü.png")
    Image.fromarray(picture[..., 0]).save(folder / "grey.png")
    Image.fromarray(picture).convert("P").save(folder / "palette.png")
    Image.fromarray(np.dstack([picture, np.full(picture.shape[:2], 255, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(picture[..., 0].astype(np.uint16) * 257).save(folder / "sixteen bit.png")
    nib.save(nib.Nifti1Image(picture[..., 0].astype(np.float32), np.eye(4)), folder / "slice.nii")


def _write_bad(folder: Path) -> None:
    """One file of each kind in BAD_IMAGES."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = _picture()
    Image.fromarray(picture).save(folder / "cut.png")
    _truncate(folder / "cut.png")
    Image.fromarray(picture).save(folder / "cut_jpeg.jpg")
    _truncate(folder / "cut_jpeg.jpg")
    values = picture[..., 0].astype(np.float32)
    nib.save(nib.Nifti1Image(values, np.eye(4)), folder / "cut_nifti.nii.gz")
    _truncate(folder / "cut_nifti.nii.gz")
    (folder / "zero bytes.png").write_bytes(b"")
    (folder / "not an image.png").write_text("a text file under an image extension")
    for name, bad_value in (("nan.nii.gz", np.nan), ("inf.nii", np.inf)):
        bad = values.copy()
        bad[3, 4] = bad_value
        nib.save(nib.Nifti1Image(bad, np.eye(4)), folder / name)
    nib.save(nib.Nifti1Image(np.zeros((10, 12, 5), np.float32), np.eye(4)), folder / "volume.nii.gz")


def _inference_settings(tmp_path: Path, inputs: Path, **extra) -> dict:
    return {
        "dataset_dir": str(inputs),
        "output_dir": str(tmp_path / "predictions"),
        "ckpt_path": str(threshold_checkpoint(tmp_path)),
        "network_def": THRESHOLD_NETWORK,
        **extra,
    }


def _reasons(error: BaseException) -> str:
    """The messages of an exception and its causes."""
    return "\n".join(str(e) for e in _causes(error))


def _causes(error: BaseException | None) -> list:
    """An exception and its causes, outermost first."""
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__
    return chain


def _mask_name(image: str) -> str:
    for ext in (".nii.gz", ".nii"):
        if image.endswith(ext):
            return image[: -len(ext)] + "_mask" + ext
    return Path(image).stem + "_mask.png"


def test_inference_command_goes_on_past_bad_images(tmp_path):
    """``python -m monai.bundle run``: every good mask written, each bad file logged, all listed, non-zero exit."""
    inputs = tmp_path / "inputs"
    _write_good(inputs)
    _write_bad(inputs)
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps(_inference_settings(tmp_path, inputs)))
    files = f"['{CONFIGS / 'inference.json'}','{overrides}']"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-4000:]
    outputs = tmp_path / "predictions"
    assert sorted(p.name for p in outputs.iterdir()) == sorted(_mask_name(name) for name in GOOD_IMAGES), log[-4000:]
    summary = log[log.index(f"{len(BAD_IMAGES)} input(s) could not be processed") :]
    for name, reason in BAD_IMAGES.items():
        assert f"skipped {inputs / name}: " in log, name
        assert any(str(inputs / name) in line and reason in line for line in summary.splitlines()), (name, summary)
    mask = np.asarray(Image.open(outputs / "größe ü_mask.png"))
    assert mask.shape == (30, 40) and mask[10, 15] == 255 and mask[25, 35] == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_inference_skips_bad_images_with_workers(tmp_path, num_workers):
    inputs = tmp_path / "inputs"
    _write_bad(inputs)
    Image.fromarray(_picture()).save(inputs / "a good.png")
    workflow = make_config_workflow(["inference.json"], "infer", **_inference_settings(tmp_path, inputs))
    workflow.parser["num_workers"] = num_workers
    with pytest.raises(Exception) as raised:
        workflow.run()
    assert f"{len(BAD_IMAGES)} input(s) could not be processed" in _reasons(raised.value)
    assert [p.name for p in (tmp_path / "predictions").iterdir()] == ["a good_mask.png"]


def test_inference_over_only_bad_images(tmp_path):
    inputs = tmp_path / "inputs"
    _write_bad(inputs)
    workflow = make_config_workflow(["inference.json"], "infer", **_inference_settings(tmp_path, inputs))
    with pytest.raises(Exception) as raised:
        workflow.run()
    message = _reasons(raised.value)
    assert f"{len(BAD_IMAGES)} input(s) could not be processed (0 batch(es)" in message
    assert all(name in message for name in BAD_IMAGES)
    assert not (tmp_path / "predictions").exists()


def test_inference_fail_fast_names_the_file(tmp_path):
    inputs = tmp_path / "inputs"
    _write_bad(inputs)
    Image.fromarray(_picture()).save(inputs / "a good.png")
    (inputs / "inf.nii").rename(inputs / "b inf.nii")  # sorted right after the good image
    settings = _inference_settings(tmp_path, inputs, skip_bad_inputs=False)
    workflow = make_config_workflow(["inference.json"], "infer", **settings)
    with pytest.raises(Exception) as raised:
        workflow.run()
    assert isinstance(raised.value.__cause__, InputError), _reasons(raised.value)
    assert f"{inputs / 'b inf.nii'}: the image holds 0 NaN and 1 infinite" in _reasons(raised.value)
    assert [p.name for p in (tmp_path / "predictions").iterdir()] == ["a good_mask.png"]


def test_inference_empty_folder(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    with pytest.raises(Exception) as raised:
        make_config_workflow(["inference.json"], "infer", **_inference_settings(tmp_path, inputs))
    assert f"the input folder {inputs} holds no image" in _reasons(raised.value)


@pytest.mark.parametrize("in_channels", [3, 1])
def test_preprocessing_takes_every_picture_kind(tmp_path, in_channels):
    """Grey, palette, RGBA, 16-bit and NIfTI inputs reach the network with the configured channels in [0, 1]."""
    _write_good(tmp_path)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update({"bundle_root": str(REPO), "in_channels": in_channels, "image_size": [32, 32]})
    preprocessing = parser.get_parsed_content("preprocessing")
    for name in GOOD_IMAGES:
        image = preprocessing({"image": str(tmp_path / name)})["image"]
        assert image.shape == (in_channels, 32, 32), name
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0, name
        # the bright rectangle (row 10, column 16 of 30x40) stays bright and the background dark: a 16-bit picture
        # is scaled, not clipped; MONAI's PIL reader gives (width, height) arrays, the NIfTI slice is (rows, columns)
        for (row, column), bright in (((10, 16), True), ((25, 35), False)):
            row, column = row * 32 // 30, column * 32 // 40
            value = float((image[:, row, column] if name.endswith(".nii") else image[:, column, row]).mean())
            assert (value > 0.8) if bright else (value < 0.3), (name, row, column, value)


HUGE_SCRIPT = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from bundle_test_utils import make_config_workflow
import json
workflow = make_config_workflow(["inference.json"], "infer", **json.loads(sys.argv[2]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
workflow.run()
print("peak_increase_mib", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_huge_image_is_resized_and_restored_in_bounded_memory(tmp_path):
    """An 8000x8000 grey picture (64 Mpixel, 256 MiB as float32): its mask has its size, in bounded memory."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    picture = np.full((8000, 8000), 40, dtype=np.uint8)
    picture[1000:3000, 2000:6000] = 220
    Image.fromarray(picture).save(inputs / "huge.png", compress_level=1)
    settings = _inference_settings(tmp_path, inputs)
    command = [sys.executable, "-c", HUGE_SCRIPT, str(REPO / "tests"), json.dumps(settings)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    mask = np.asarray(Image.open(tmp_path / "predictions" / "huge_mask.png"))
    assert mask.shape == picture.shape
    assert mask[2000, 4000] == 255 and mask[6000, 1000] == 0
    peak = float(result.stdout.split("peak_increase_mib")[-1])
    # the float32 picture alone is 256 MiB; the grey picture is made RGB after the resize, not before
    assert peak < 1200, f"inference of one 8000x8000 picture raised the peak memory by {peak:.0f} MiB"


@pytest.mark.skipif(AS_ROOT, reason="root reads files whatever their permissions")
def test_unreadable_permissions(tmp_path):
    path = tmp_path / "locked.png"
    Image.fromarray(_picture()).save(path)
    path.chmod(0)
    try:
        failure = CheckedDataset([{"image": str(path)}], transform=None, skip_bad=True)[0]
        assert isinstance(failure, FailedInput) and failure.source == str(path)
        assert "cannot be read" in failure.reason and "ermission" in failure.reason
    finally:
        path.chmod(0o644)


def test_check_files_reports_why_a_file_cannot_be_read(tmp_path, monkeypatch):
    """The permission case as root cannot produce: the reason an open() error gives."""
    path = tmp_path / "locked.png"
    path.write_bytes(b"x")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(InputError, match="locked.png: cannot be read \\(Permission denied\\)"):
        check_files({"image": str(path)})


def test_check_files_and_failure_reasons(tmp_path):
    with pytest.raises(InputError, match="gone.png: the file does not exist"):
        check_files({"image": str(tmp_path / "gone.png")})
    with pytest.raises(InputError, match="not a regular file"):
        check_files({"image": str(tmp_path)})
    item = {"image": "a.png", "label": "b.png"}
    truncated = RuntimeError("applying transform <LoadImaged>")
    truncated.__cause__ = OSError("image file is truncated")
    assert describe_failure(item, truncated) == FailedInput(
        "image a.png, label b.png", "OSError: image file is truncated"
    )
    wrapped = RuntimeError("applying transform <LoadImaged>")
    wrapped.__cause__ = ValueError("b.png: the mask's spatial shape (3, 4) differs")
    assert describe_failure(item, wrapped) == FailedInput("b.png", "the mask's spatial shape (3, 4) differs")


def _dataset(folder: Path, pairs: dict) -> Path:
    """A data set folder whose datalist lists ``pairs`` (image name -> mask name) in every split."""
    items = [{"image": f"images/{image}", "label": f"masks/{mask}"} for image, mask in pairs.items()]
    datalist = {"training": items, "validation": items, "test": items}
    (folder / "datalist.json").write_text(json.dumps(datalist))
    return folder


def _pair_corpus(folder: Path) -> None:
    """Images and masks for the training and evaluation loading checks."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    picture = _picture()
    mask = np.zeros((30, 40), np.uint8)
    mask[5:15, 8:25] = 255
    Image.fromarray(picture).save(folder / "images" / "good.png")
    Image.fromarray(mask).save(folder / "masks" / "good.png")
    Image.fromarray(mask[:20]).save(folder / "masks" / "small.png")
    ramp = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))
    Image.fromarray(ramp).save(folder / "masks" / "ramp.png")
    Image.fromarray(np.zeros_like(mask)).save(folder / "masks" / "empty.png")
    _write_bad(folder / "images")
    (folder / "masks" / "zero bytes.png").write_bytes(b"")


LOADING_CASES = [
    ("cut.png", "good.png", "images/cut.png", "image file is truncated"),
    ("not an image.png", "good.png", "images/not an image.png", "no configured reader"),
    ("zero bytes.png", "good.png", "images/zero bytes.png", "empty file (0 bytes)"),
    ("nan.nii.gz", "good.png", "images/nan.nii.gz", "1 NaN"),
    ("volume.nii.gz", "good.png", "images/volume.nii.gz", "expected a 2D image"),
    ("good.png", "zero bytes.png", "masks/zero bytes.png", "empty file (0 bytes)"),
    ("good.png", "small.png", "masks/small.png", "differs from the image's"),
    ("good.png", "ramp.png", "masks/ramp.png", "not a binary mask"),
    ("good.png", "missing.png", "masks/missing.png", "does not exist"),
]


def _loading_parser(config_files: list, dataset: Path) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in config_files])
    parser.update({"bundle_root": str(REPO), "dataset_dir": str(dataset), "num_workers": 0, "image_size": [32, 32]})
    return parser


@pytest.mark.parametrize("image,mask,culprit,reason", LOADING_CASES)
@pytest.mark.parametrize(
    "config_files,dataset_id",
    [(["train.json"], "train#dataset"), (["train.json", "evaluate.json"], "validate#dataset")],
    ids=["training", "evaluation"],
)
def test_training_and_evaluation_loading_names_the_file(
    tmp_path, config_files, dataset_id, image, mask, culprit, reason
):
    _pair_corpus(tmp_path)
    _dataset(tmp_path, {image: mask})
    parser = _loading_parser(config_files, tmp_path)
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content(dataset_id)[0]
    message = _reasons(raised.value)
    assert any(f"{tmp_path / culprit}" in line and reason in line for line in message.splitlines()), message


@pytest.mark.parametrize("num_workers", [0, 2])
def test_caching_tries_every_item_and_lists_every_bad_one(tmp_path, num_workers):
    """The cache fill raises once its threads have finished: none is left inside torch when the process exits."""
    _pair_corpus(tmp_path)
    _dataset(tmp_path, {"cut.png": "good.png", "good.png": "small.png", "zero bytes.png": "good.png"})
    parser = _loading_parser(["train.json"], tmp_path)
    parser["num_workers"] = num_workers
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content("train#dataset")
    failure = next(e for e in _causes(raised.value) if type(e).__name__ == "InputError")
    for culprit in ("images/cut.png", "masks/small.png", "images/zero bytes.png"):
        assert str(tmp_path / culprit) in str(failure), str(failure)


def test_training_logs_masks_without_foreground(tmp_path, caplog):
    _pair_corpus(tmp_path)
    _dataset(tmp_path, {"good.png": "empty.png"})
    with caplog.at_level("INFO", logger="scripts.transforms"):
        item = _loading_parser(["train.json"], tmp_path).get_parsed_content("train#dataset")[0]
    assert float(item["label"].sum()) == 0.0
    assert f"{tmp_path / 'masks' / 'empty.png'}: the mask has no foreground" in caplog.text


def test_datalist_entries_stay_inside_the_data_set(tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    outside = tmp_path / "elsewhere.png"
    datalist = dataset / "datalist.json"
    items = {
        "training": [{"image": "images/a.png", "label": "masks/./a.png"}, {"image": "../elsewhere.png", "label": "x"}],
        "validation": [{"image": str(outside), "label": "masks/b.png"}],
        "test": [{"image": "images/../../dataset/images/c.png", "label": "masks/c.png"}],
    }
    datalist.write_text(json.dumps(items))
    with pytest.raises(ValueError, match=r"item 1 of 'training' has the image '\.\./elsewhere\.png'.*outside"):
        load_datalist(str(datalist), "training", str(dataset))
    allowed = load_datalist(str(datalist), "training", str(dataset), allow_outside=True)
    assert allowed[1]["image"] == os.path.normpath(str(outside))
    assert load_datalist(str(datalist), "validation", str(dataset))[0]["image"] == str(outside), "absolute: allowed"
    assert load_datalist(str(datalist), "test")[0]["image"] == str(dataset / "images" / "c.png"), "stays inside"


def test_training_config_refuses_a_datalist_entry_outside_the_data_set(tmp_path):
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [{"image": "../../etc/x.png", "label": "m.png"}]}))
    parser = _loading_parser(["train.json"], tmp_path)
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content("train#datalist")
    assert "'../../etc/x.png', which is outside the data set folder" in _reasons(raised.value)
    parser["train#datalist#allow_outside"] = True
    expected = os.path.normpath(os.path.join(tmp_path, "../../etc/x.png"))
    assert parser.get_parsed_content("train#datalist")[0]["image"] == expected


def _download(folder: Path) -> Path:
    """Image/mask pairs for data preparation: good kinds of pictures and one of each bad kind."""
    picture = _picture()
    mask = np.zeros((30, 40), np.uint8)
    mask[5:15, 8:25] = 255
    images, masks = folder / "images", folder / "masks"
    _write_good(images)
    for path in images.glob("*.nii"):
        path.unlink()  # preparation reads pictures only
    for stem in ("cut", "not an image", "zero bytes", "no foreground", "small mask", "ramp mask"):
        Image.fromarray(picture).save(images / f"{stem}.png")
    (images / "zero bytes.png").write_bytes(b"")
    (images / "not an image.png").write_text("text")
    _truncate(images / "cut.png")
    masks.mkdir()
    for path in images.iterdir():
        Image.fromarray(mask).save(masks / f"{path.stem}.png")
    Image.fromarray(np.zeros_like(mask)).save(masks / "no foreground.png")
    Image.fromarray(mask[:20]).save(masks / "small mask.png")
    Image.fromarray(np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))).save(masks / "ramp mask.png")
    return folder


def test_preparation_names_every_bad_file(tmp_path):
    source = _download(tmp_path / "download")
    with pytest.raises(IntegrityError) as raised:
        prepare("folder", str(source), str(tmp_path / "out"), images="images/*", masks="masks/*")
    expected = {
        "images/cut.png": "unreadable image (image file is truncated",
        "images/not an image.png": "unreadable image (cannot identify image file",
        "images/zero bytes.png": "empty file (0 bytes)",
        "masks/small mask.png": "differs from the image's",
        "masks/ramp mask.png": "not a binary mask",
    }
    lines = str(raised.value).splitlines()
    for path, reason in expected.items():
        assert any(str(source / path) in line and reason in line for line in lines), (path, lines)
    assert len(raised.value.issues) == len(expected)

    datalist_file = prepare(
        "folder", str(source), str(tmp_path / "out"), images="images/*", masks="masks/*", skip_bad=True
    )
    datalist = json.loads(Path(datalist_file).read_text())
    assert sorted(entry["file"] for entry in datalist["skipped"]) == sorted(expected)
    prepared = {item["source_image"]: item for split in ("training", "validation") for item in datalist[split]}
    good = [f"images/{name}" for name in GOOD_IMAGES if not name.endswith(".nii")] + ["images/no foreground.png"]
    assert sorted(prepared) == sorted(good)
    sixteen = np.asarray(Image.open(tmp_path / "out" / prepared["images/sixteen bit.png"]["image"]))
    assert sixteen[10, 16, 0] == 255 and sixteen[25, 35, 0] < 80, "16-bit values are scaled, not clipped at 255"
    assert errors(check_dataset(str(tmp_path / "out"))) == []


@pytest.mark.skipif(AS_ROOT, reason="root reads files whatever their permissions")
def test_preparation_reports_unreadable_permissions(tmp_path):
    source = _download(tmp_path / "download")
    locked = source / "images" / "good image.png"
    locked.chmod(0)
    try:
        with pytest.raises(IntegrityError, match="good image.png: cannot be read \\(permission denied\\)"):
            prepare("folder", str(source), str(tmp_path / "out"), images="images/*", masks="masks/*")
    finally:
        locked.chmod(0o644)


def test_preparation_empty_folder_and_check_of_outside_entries(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no file in .*empty matches the image pattern"):
        prepare("folder", str(tmp_path / "empty"), str(tmp_path / "out"), images="*.png", masks="*_mask.png")
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "datalist.json").write_text(json.dumps({"training": [{"image": "../x.png", "label": "masks/x.png"}]}))
    with pytest.raises(IntegrityError, match=r"datalist.json: the 'training' entry \.\./x\.png is outside"):
        check(str(dataset))
