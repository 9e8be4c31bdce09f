"""
The bundle's workflows end to end on tiny settings: training, evaluation, inference, multi-process training.

Training and evaluation go through real ``python -m monai.bundle run`` processes, as a user runs them; the inference
checks use ``ConfigWorkflow`` in this process, with ``check_properties`` as MONAI applications call it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_test_utils import (
    CONFIGS,
    REPO,
    SCHEMA,
    THRESHOLD_NETWORK,
    TINY_NETWORK,
    make_config_workflow,
    run_config_workflow,
    threshold_checkpoint,
)
from monai.bundle import ConfigParser
from PIL import Image

from scripts.datalist import evaluation_split, list_images

TINY = {
    **TINY_NETWORK,
    "image_size": [32, 48],
    "num_epochs": 2,
    "batch_size": 4,
    "synthetic_num_images": [8, 4, 4],
    "num_workers": 0,
}
# keys that inference.json repeats from train.json: they must agree, or a trained checkpoint does not load
SHARED_KEYS = (
    "image_size",
    "in_channels",
    "out_channels",
    "network_dims",
    "network_depths",
    "network_depths_decoder",
    "d_state",
    "drop_path_rate",
    "wavelet_fusion",
    "wavelet_levels",
    "wavelet_kernel_size",
    "use_wcaa",
    "kan_side_heads",
    "scan_backend",
    "network_def",
    "image_readers",
)
INFERENCE_KEYS = tuple(k for k in TINY if k.startswith("network") or k in ("d_state", "image_size"))


def _bundle(command: list[str], timeout: int = 300, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle <command>`` (or under ``launcher``) in the bundle root; fail with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if launcher else dict(os.environ)
    args = [sys.executable, *(launcher or []), "-m", "monai.bundle", *command]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{output[-6000:]}"
    return result


def _overrides(folder: Path, **extra) -> str:
    """A config file with the tiny settings and every output under ``folder``."""
    settings = {
        **TINY,
        "synthetic_dir": str(folder / "data"),
        "ckpt_dir": str(folder / "models"),
        "log_dir": str(folder / "runs"),
        "output_dir": str(folder / "eval"),
        **extra,
    }
    path = folder / "overrides.json"
    path.write_text(json.dumps(settings, indent=4))
    return str(path)


def _config_list(*files: str) -> str:
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny model trained by ``python -m monai.bundle run training`` on the generated synthetic data."""
    folder = tmp_path_factory.mktemp("bundle")
    overrides = _overrides(folder)
    files = _config_list(str(CONFIGS / "train.json"), overrides)
    result = _bundle(["run", "training", "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", files])
    return {"folder": folder, "overrides": overrides, "log": result.stdout + result.stderr}


def test_metadata_is_valid():
    if not SCHEMA.is_file():
        pytest.skip(f"the metadata schema is not at {SCHEMA}")
    jsonschema = pytest.importorskip("jsonschema")
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    jsonschema.validate(metadata, json.loads(SCHEMA.read_text()))
    assert set(metadata["network_data_format"]["inputs"]) == {"image"}
    assert set(metadata["network_data_format"]["outputs"]) == {"pred"}


def test_configs_agree():
    train = ConfigParser.load_config_file(CONFIGS / "train.json")
    inference = ConfigParser.load_config_file(CONFIGS / "inference.json")
    for key in SHARED_KEYS:
        assert inference[key] == train[key], f"'{key}' differs between train.json and inference.json"
    image = ConfigParser.load_config_file(CONFIGS / "metadata.json")["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == train["in_channels"]
    # metadata gives the input size as "<multiple>*n": the network's padding multiple (patch embedding of 4, then one
    # halving per further stage), which the configured image size must be a multiple of to run without padding
    size_multiple = 4 * 2 ** (len(train["network_dims"]) - 1)
    assert image["spatial_shape"] == [f"{size_multiple}*n"] * len(train["image_size"])
    assert all(size % size_multiple == 0 for size in train["image_size"])


@pytest.mark.parametrize("encoder_statistics", [True, False])
def test_loss_switches_reach_the_loss(encoder_statistics):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update(
        {
            "bundle_root": str(REPO),
            **TINY,
            "loss_lambda_dice": 0.25,
            "loss_lambda_ce": 2.0,
            "loss_encoder_statistics": encoder_statistics,
        }
    )
    loss = parser.get_parsed_content("loss_def")
    assert (loss.level_loss.lambda_dice, loss.level_loss.lambda_ce) == (0.25, 2.0)
    assert loss.weighting.in_features == (5 if encoder_statistics else 3)
    if encoder_statistics:
        # The statistics come from the very network that the trainer runs.
        assert loss.encoder_statistics.__self__ is parser.get_parsed_content("network_def")
    else:
        assert loss.encoder_statistics is None


@pytest.mark.parametrize(
    "files,workflow_type",
    [(["train.json"], "train"), (["train.json", "evaluate.json"], "eval"), (["inference.json"], "infer")],
)
def test_check_properties(trained, files, workflow_type):
    folder = trained["folder"]
    if workflow_type == "infer":
        overrides = {k: TINY[k] for k in INFERENCE_KEYS}
        overrides["dataset_dir"] = str(folder / "data" / "images")
    else:
        overrides = json.loads(Path(trained["overrides"]).read_text())
    make_config_workflow(files, workflow_type, **overrides)


def test_training(trained):
    folder, log = trained["folder"], trained["log"]
    assert (folder / "models" / "model.pt").is_file()
    assert json.loads((folder / "data" / "datalist.json").read_text())["test"], "the synthetic set has a test split"
    for expected in ("Epoch[2] Metrics", "train_loss", "val_mean_iou", "val_mean_dice", "Epoch [2/2]"):
        assert expected in log, f"'{expected}' missing from the training log"
    assert "Epoch[2] loss_level_weights -- side1:" in log
    assert list((folder / "runs").glob("events.out.tfevents.*"))


def test_evaluation(trained):
    folder = trained["folder"]
    files = _config_list(str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json"), trained["overrides"])
    _bundle(["run", "evaluating", "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", files])
    summary = json.loads((folder / "eval" / "metrics_summary.json").read_text())
    assert summary["num_images"] == TINY["synthetic_num_images"][2], "the test split is evaluated"
    metrics = summary["metrics"]
    assert set(metrics) == {"mean_iou", "mean_dice", "precision", "recall", "hd95", "ukan_iou", "ukan_f1"}
    assert 0.0 <= metrics["mean_dice"] <= 1.0
    assert 0.0 <= metrics["ukan_iou"] <= metrics["ukan_f1"] <= 1.0, "F1 = 2 IoU / (IoU + 1) is never below IoU"
    rows = (folder / "eval" / "mean_dice_raw.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + TINY["synthetic_num_images"][2] and "test_000.png" in rows[1]


def test_evaluation_split_falls_back_to_validation(tmp_path, caplog):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "a"}], "validation": [{"image": "b"}], "test": []}))
    with caplog.at_level("INFO", logger="scripts.datalist"):
        assert evaluation_split(str(datalist)) == "validation"
    assert f"Evaluating the 'validation' split of {datalist} (1 items)." in caplog.text
    datalist.write_text(json.dumps({"training": [{"image": "a"}]}))
    with pytest.raises(ValueError, match="datalist.json"):
        evaluation_split(str(datalist))


def _inference(folder: Path, dataset_dir: Path, **overrides) -> Path:
    """Run inference.json in this process; returns the output folder."""
    output_dir = folder / "predictions"
    run_config_workflow(
        ["inference.json"], "infer", dataset_dir=str(dataset_dir), output_dir=str(output_dir), **overrides
    )
    return output_dir


def test_inference_on_a_mixed_folder(trained, tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, size=(37, 53), dtype=np.uint8)
    colour = rng.integers(0, 255, size=(41, 29, 3), dtype=np.uint8)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(grey).save(inputs / "grey.PNG")
    Image.fromarray(colour).save(inputs / "colour.jpg")
    Image.fromarray(colour).save(inputs / "colour_bmp.bmp")
    Image.fromarray(np.dstack([colour, colour[..., :1]])).save(inputs / "rgba.tiff")
    affine = np.diag([0.8, 0.6, 3.0, 1.0])
    affine[:3, 3] = [-5.0, 7.0, 12.0]
    nib.save(nib.Nifti1Image(grey.astype(np.float32), affine), inputs / "slice.nii.gz")
    nib.save(nib.Nifti1Image(grey[..., None].astype(np.int16), affine), inputs / "one_slice.nii")
    (inputs / "notes.txt").write_text("not an image")

    overrides = {k: TINY[k] for k in INFERENCE_KEYS}
    out = _inference(
        tmp_path, inputs, ckpt_path=str(trained["folder"] / "models" / "model.pt"), save_overlay=True, **overrides
    )
    for name, size in (("grey", (53, 37)), ("colour", (29, 41)), ("colour_bmp", (29, 41)), ("rgba", (29, 41))):
        mask = Image.open(out / f"{name}_mask.png")
        assert mask.size == size and mask.mode == "L", name
        assert set(np.unique(np.asarray(mask))) <= {0, 255}, name
        assert Image.open(out / f"{name}_overlay.png").size == size, name
    for name, shape in (("slice_mask.nii.gz", (37, 53)), ("one_slice_mask.nii", (37, 53, 1))):
        mask = nib.load(out / name)
        assert mask.shape == shape, name
        np.testing.assert_allclose(mask.affine, affine, atol=1e-5)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}, name
    assert sorted(p.name for p in out.iterdir() if "_mask" in p.name) == sorted(
        ["grey_mask.png", "colour_mask.png", "colour_bmp_mask.png", "rgba_mask.png"]
        + ["slice_mask.nii.gz", "one_slice_mask.nii"]
    )


def test_inference_masks_line_up_with_asymmetric_pictures(tmp_path):
    """Through the whole inference config, with a 1x1 convolution that marks bright pixels as the network."""
    picture = np.full((30, 50), 10, dtype=np.uint8)
    picture[3:12, 4:22] = 240
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(np.stack([picture] * 3, axis=-1)).save(inputs / "corner.png")
    ckpt = threshold_checkpoint(tmp_path)
    out = _inference(tmp_path, inputs, ckpt_path=str(ckpt), network_def=THRESHOLD_NETWORK, image_size=[40, 40])
    mask = np.asarray(Image.open(out / "corner_mask.png"))
    assert mask.shape == picture.shape
    expected = np.where(picture > 127, 255, 0)
    assert (mask != expected).mean() < 0.02, "the mask must cover the bright corner square, not its transpose"
    assert mask[7, 12] == 255 and mask[25, 40] == 0


@pytest.mark.parametrize(
    "files,workflow_type,switch",
    [(["train.json"], "train", "loss_encoder_statistics"), (["inference.json"], "infer", "save_overlay")],
)
def test_a_lowercase_false_from_the_command_line_is_refused(tmp_path, files, workflow_type, switch):
    """``--save_overlay false`` arrives as the string 'false', which a config would take as true."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(inputs / "picture.png")
    overrides = {"dataset_dir": str(inputs), "output_dir": str(tmp_path / "out"), "ckpt_dir": str(tmp_path / "m")}
    with pytest.raises(Exception) as error:
        run_config_workflow(files, workflow_type, **overrides, **{switch: "false", "use_wcaa": "False"})
    messages, cause = [], error.value
    while cause is not None:
        messages.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    assert any(f"{switch}='false'" in m and "use_wcaa='False'" in m for m in messages), messages
    assert not (tmp_path / "out").exists() and not (tmp_path / "m").exists()


def test_inference_input_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty holds no image"):
        list_images(str(empty))
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(str(tmp_path / "missing"))

    clash = tmp_path / "clash"
    clash.mkdir()
    for name in ("a.png", "a.JPG", "b.png", "b.nii", "b.nii.gz", "c.nii.gz", "c.NII.GZ"):
        (clash / name).write_bytes(b"")
    with pytest.raises(ValueError, match="write the same mask file") as error:
        list_images(str(clash))
    assert "a.JPG and a.png" in str(error.value) and "c.NII.GZ and c.nii.gz" in str(error.value)
    assert "b.nii" not in str(error.value), "b.png, b.nii and b.nii.gz write three different files"
    (clash / "a.JPG").unlink()
    (clash / "c.NII.GZ").unlink()
    assert [os.path.basename(item["image"]) for item in list_images(str(clash))] == [
        "a.png",
        "b.nii",
        "b.nii.gz",
        "b.png",
        "c.nii.gz",
    ]

    # A BUSI class folder: segmenting it into itself would replace the ground-truth masks.
    busi = tmp_path / "busi"
    busi.mkdir()
    for name in ("benign (1).png", "benign (1)_mask.png", "benign (2).png"):
        (busi / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"would replace files there: benign \(1\)_mask\.png\. Give another"):
        list_images(str(busi), output_dir=str(busi) + "/")
    assert len(list_images(str(busi), output_dir=str(tmp_path / "predictions"))) == 3

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "scan.png").write_text("this is not a PNG")
    network = {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 1, "kernel_size": 1}
    ckpt = tmp_path / "net.pt"
    torch.save(torch.nn.Conv2d(3, 1, 1).state_dict(), ckpt)
    with pytest.raises(Exception) as error:
        _inference(tmp_path, broken, ckpt_path=str(ckpt), network_def=network)
    messages, cause = [], error.value
    while cause is not None:
        messages.append(str(cause))
        cause = cause.__cause__
    assert any("scan.png" in m for m in messages), messages


def test_training_without_side_heads(tmp_path):
    """Plain VM-UNet training: no side heads, loss mode none; the trainer sees plain logits."""
    overrides = json.loads(Path(_overrides(tmp_path, num_epochs=1, kan_side_heads=False, loss_mode="none")).read_text())
    workflow = run_config_workflow(["train.json"], "train", **overrides)
    assert (tmp_path / "models" / "model.pt").is_file()
    assert workflow.trainer.state.metrics["train_loss"] > 0


def test_multi_process_training(tmp_path):
    """``torchrun --nproc_per_node=2`` with gloo on CPU: both ranks train, rank 0 alone writes."""
    overrides = _overrides(tmp_path, synthetic_num_images=[8, 4, 0])
    files = _config_list(str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json"), overrides)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = _bundle(["run", "training", "--config_file", files], launcher=launcher)
    log = result.stdout + result.stderr
    assert "rank 0 of 2 trains on cpu" in log and "rank 1 of 2 trains on cpu" in log
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["checkpoint.pt", "model.pt"]
    assert len(list((tmp_path / "runs").glob("events.out.tfevents.*"))) == 1, "only rank 0 writes TensorBoard logs"
    assert log.count("Epoch[2] Metrics -- train_loss") == 1, "only rank 0 logs the metrics"
