"""
The bundle tested the way the MONAI model zoo's CI tests its bundles (``ci/unit_tests/test_<bundle>.py``).

The bundle is copied to ``models/vmaml_unet`` inside a scratch folder, which is the working directory, as the zoo's
repository root is for its tests; the configs are named by paths relative to it and ``bundle_root`` is the relative
``models/vmaml_unet``. Small pictures and a datalist are written to a temporary folder, and ``ConfigWorkflow`` goes
through ``initialize``, ``check_properties``, ``run`` and ``finalize`` for training, evaluation after training, and
inference.

Each workflow runs in a new Python process without the repository on ``sys.path``, so ``scripts`` can only come from
the copy: in this pytest process it is already imported from the repository, and ``ConfigWorkflow`` itself puts the
bundle root on ``sys.path`` only in ``run()``, after the configs have been parsed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_test_utils import REPO, TINY_NETWORK
from PIL import Image

BUNDLE = Path("models") / "vmaml_unet"
# what a model zoo bundle holds; models/ is created empty, as the zoo's bundles keep no weights in git
BUNDLE_CONTENT = ("configs", "scripts", "docs", "LICENSE", "large_files.yml")
SPLITS = {"training": 4, "validation": 2, "test": 2}
# pictures of a different size than the network input and not square, so that restoring the input size is checked
PICTURE_SIZE = (28, 40)
INFERENCE_PICTURES = {"rgb_case.png": (36, 22, 3), "grey_case.png": (30, 45)}
TRAIN = {**TINY_NETWORK, "image_size": [32, 32], "num_epochs": 1, "batch_size": 2}
# the program each workflow runs: the zoo tests' sequence, then a report of the metrics and of where `scripts` came from
WORKFLOW_PROGRAM = """
import json, sys
from monai.bundle import ConfigWorkflow

arguments, report = json.loads(sys.argv[1]), sys.argv[2]
workflow = ConfigWorkflow(**arguments)
workflow.initialize()
missing = workflow.check_properties()
if missing:
    raise ValueError(f"check_properties of {arguments['config_file']} failed: {missing}")
workflow.run()
workflow.finalize()
engine = workflow.trainer if arguments["workflow_type"] == "train" else workflow.evaluator
metrics = {name: float(value) for name, value in engine.state.metrics.items()}
with open(report, "w") as f:
    json.dump({"scripts": sys.modules["scripts"].__file__, "metrics": metrics}, f)
"""


def _picture(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A noisy picture of ``shape`` with a bright rectangle, and its 0/255 mask."""
    picture = rng.integers(0, 100, size=shape, dtype=np.uint8)
    mask = np.zeros(shape[:2], dtype=np.uint8)
    top, left = rng.integers(0, shape[0] // 2), rng.integers(0, shape[1] // 2)
    mask[top : top + shape[0] // 3, left : left + shape[1] // 3] = 255
    picture[mask > 0] += 150
    return picture, mask


def _write_dataset(folder: Path) -> None:
    """PNG pictures and masks with a ``datalist.json`` holding the training, validation and test splits."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    datalist = {}
    for split, count in SPLITS.items():
        datalist[split] = []
        for i in range(count):
            picture, mask = _picture((*PICTURE_SIZE, 3), rng)
            item = {"image": f"images/{split}_{i}.png", "label": f"labels/{split}_{i}.png"}
            Image.fromarray(picture).save(folder / item["image"])
            Image.fromarray(mask).save(folder / item["label"])
            datalist[split].append(item)
    (folder / "datalist.json").write_text(json.dumps(datalist, indent=4))


def _copy_bundle(destination: Path) -> None:
    """Copy the bundle's own files, without caches or any training output, to ``destination``."""
    destination.mkdir(parents=True)
    for name in BUNDLE_CONTENT:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.is_file():
            shutil.copy2(source, destination / name)
    (destination / "models").mkdir()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A scratch zoo root holding the copied bundle, and a temporary dataset beside it."""
    root = tmp_path_factory.mktemp("zoo")
    _copy_bundle(root / BUNDLE)
    data = tmp_path_factory.mktemp("data")
    _write_dataset(data)
    return {"root": root, "data": data}


def _run_workflow(root: Path, config_files: list[str], workflow_type: str, **overrides) -> dict:
    """Run one bundle workflow, zoo style, in a new process in ``root``; returns its report (metrics, ``scripts``)."""
    configs = BUNDLE / "configs"
    arguments = {
        "config_file": [str(configs / name) for name in config_files],
        "meta_file": str(configs / "metadata.json"),
        "logging_file": str(configs / "logging.conf"),
        "workflow_type": workflow_type,
        "bundle_root": str(BUNDLE),
        **overrides,
    }
    report = root / f"report_{workflow_type}.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [sys.executable, "-c", WORKFLOW_PROGRAM, json.dumps(arguments), str(report)]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"the {workflow_type} workflow of {config_files} failed:\n{output[-6000:]}"
    report_content = json.loads(report.read_text())
    scripts = Path(report_content["scripts"]).resolve()
    assert scripts.is_relative_to((root / BUNDLE).resolve()), f"scripts was imported from {scripts}, not the copy"
    return report_content


@pytest.fixture(scope="module")
def trained(zoo) -> dict:
    """The report of one epoch of training by ``train.json`` on the temporary dataset."""
    return _run_workflow(zoo["root"], ["train.json"], "train", dataset_dir=str(zoo["data"]), **TRAIN)


def test_copy_is_a_bare_bundle(zoo):
    """The copy holds only what a zoo bundle holds: the workflows must not depend on tests or repository files."""
    assert sorted(p.name for p in (zoo["root"] / BUNDLE).iterdir()) == sorted(
        [name for name in BUNDLE_CONTENT if (REPO / name).exists()] + ["models"]
    )


def test_train(zoo, trained):
    bundle = zoo["root"] / BUNDLE
    metrics = trained["metrics"]
    assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    assert 0.0 <= metrics["train_mean_dice"] <= 1.0
    # the outputs land under the relative bundle root, and nothing is generated in place of the given dataset
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert list((bundle / "runs").glob("events.out.tfevents.*"))
    assert not (bundle / "data").exists()


def test_train_then_evaluate(zoo, trained):
    bundle = zoo["root"] / BUNDLE
    report = _run_workflow(zoo["root"], ["train.json", "evaluate.json"], "eval", dataset_dir=str(zoo["data"]), **TRAIN)
    summary = json.loads((bundle / "eval" / "metrics_summary.json").read_text())
    assert summary["num_images"] == SPLITS["test"], "evaluate.json evaluates the test split"
    # the summary file holds every metric the evaluator computed, with the same values
    assert set(summary["metrics"]) == set(report["metrics"]) >= {"mean_iou", "mean_dice", "precision", "recall"}
    for name in ("mean_iou", "mean_dice", "precision", "recall"):
        assert 0.0 <= report["metrics"][name] <= 1.0, name
        assert summary["metrics"][name] == pytest.approx(report["metrics"][name]), name
    rows = (bundle / "eval" / "mean_dice_raw.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + SPLITS["test"] and "test_0.png" in rows[1]


def test_inference(zoo, trained):
    """Inference with the checkpoint that training wrote: one mask per picture, at the picture's size."""
    inputs = zoo["data"] / "inference_inputs"
    inputs.mkdir()
    rng = np.random.default_rng(1)
    for name, shape in INFERENCE_PICTURES.items():
        Image.fromarray(_picture(shape, rng)[0]).save(inputs / name)
    overrides = {k: TRAIN[k] for k in (*TINY_NETWORK, "image_size")}
    _run_workflow(zoo["root"], ["inference.json"], "infer", dataset_dir=str(inputs), **overrides)

    outputs = zoo["root"] / BUNDLE / "eval" / "inference"
    assert sorted(p.name for p in outputs.iterdir()) == sorted(
        f"{Path(name).stem}_mask.png" for name in INFERENCE_PICTURES
    )
    for name, shape in INFERENCE_PICTURES.items():
        mask = Image.open(outputs / f"{Path(name).stem}_mask.png")
        assert mask.mode == "L" and mask.size == (shape[1], shape[0]), name
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}, name
