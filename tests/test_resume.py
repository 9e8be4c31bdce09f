"""
Resuming, determinism, non-finite losses and checkpoint loading, through the bundle's training config.

A real ``python -m monai.bundle run training`` process is killed with SIGKILL once its first full-state checkpoint
exists, and the same command with ``--resume true`` finishes the run; the other runs use ``ConfigWorkflow`` in this
process, so their objects can be compared with the checkpoints.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from bundle_test_utils import CONFIGS, REPO, TINY_NETWORK, run_config_workflow

from scripts.handlers import resume_checkpoint

NUM_EPOCHS = 2
TINY = {
    **TINY_NETWORK,
    "image_size": [32, 32],
    "num_epochs": NUM_EPOCHS,
    "batch_size": 4,
    "synthetic_num_images": [8, 4, 0],
    "num_workers": 0,
}
STATE_KEYS = {"network", "loss", "optimizer", "lr_scheduler", "trainer", "evaluator", "best_model_saver"}
# a slow shared machine may take minutes to start a run; the killed one must reach its first checkpoint
START_TIMEOUT_S = 600


def _settings(folder: Path, data: Path, **extra) -> dict:
    """The tiny settings with the synthetic data in ``data`` and every output under ``folder``."""
    return {
        **TINY,
        "synthetic_dir": str(data),
        "ckpt_dir": str(folder / "models"),
        "log_dir": str(folder / "runs"),
        "output_dir": str(folder / "eval"),
        **extra,
    }


def _command(folder: Path, data: Path, *extra: str, config_files: tuple = ("train.json",)) -> list[str]:
    """``python -m monai.bundle run training`` with the settings written to ``folder/overrides.json``."""
    overrides = folder / "overrides.json"
    overrides.write_text(json.dumps(_settings(folder, data), indent=4))
    files = [str(CONFIGS / f) for f in config_files] + [str(overrides)]
    config = "[" + ",".join(f"'{f}'" for f in files) + "]"
    meta = str(CONFIGS / "metadata.json")
    return ["-m", "monai.bundle", "run", "training", "--meta_file", meta, "--config_file", config, *extra]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _epoch(checkpoint: dict) -> int:
    trainer = checkpoint["trainer"]
    return trainer["iteration"] // trainer["epoch_length"]


def _assert_equal(actual, expected, where: str = "") -> None:
    """Assert two (nested) states are identical, tensors bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), f"{where}: keys {set(actual) ^ set(expected)} differ"
        for key in expected:
            _assert_equal(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_equal(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual} != {expected}"


def _raised(kind: type, run: Callable[[], object]) -> BaseException:
    """The exception of type ``kind`` that ``run`` raised, directly or as the cause of MONAI's config errors."""
    with pytest.raises(Exception) as raised:
        run()
    error: BaseException | None = raised.value
    while error is not None and not isinstance(error, kind):
        error = error.__cause__
    assert error is not None, f"no {kind.__name__} in the chain of {raised.value!r}"
    return error


def _copy_models(killed: dict, folder: Path) -> Path:
    """A copy of the killed run's models folder under ``folder``, for a run that must not change the original."""
    shutil.copytree(killed["models"], folder / "models")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume_data") / "synthetic"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data) -> Path:
    """The final full-state checkpoint of a run that nothing interrupted."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    run_config_workflow(["train.json"], "train", **_settings(folder, data))
    return folder / "models" / "checkpoint.pt"


@pytest.fixture(scope="module")
def killed(tmp_path_factory, data, uninterrupted) -> dict:
    """
    A training process killed with SIGKILL as soon as its first full-state checkpoint exists, then resumed by the
    same command with ``--resume true``. (``uninterrupted`` runs first so that the synthetic data exist.)
    """
    folder = tmp_path_factory.mktemp("killed")
    checkpoint = folder / "models" / "checkpoint.pt"
    with open(folder / "killed.log", "w") as log:
        process = subprocess.Popen([sys.executable, *_command(folder, data)], cwd=REPO, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.kill()
        process.wait()
    assert checkpoint.exists() and process.returncode == -signal.SIGKILL, (
        f"the run had to be killed after its first checkpoint; it ended with {process.returncode}:\n"
        + (folder / "killed.log").read_text()[-4000:]
    )
    snapshot = folder / "killed_models"
    shutil.copytree(folder / "models", snapshot)

    resumed = subprocess.run(
        [sys.executable, *_command(folder, data, "--resume", "true")], cwd=REPO, capture_output=True, text=True
    )
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-6000:]
    return {"folder": folder, "models": snapshot, "at_kill": _load(snapshot / "checkpoint.pt"), "log": log}


def test_a_killed_run_leaves_its_last_complete_checkpoint(killed):
    at_kill = killed["at_kill"]
    assert set(at_kill) == STATE_KEYS
    assert 1 <= _epoch(at_kill) < NUM_EPOCHS, "killed after the first epoch's checkpoint, before the run ended"
    assert not [p.name for p in killed["models"].iterdir() if p.name.endswith(".tmp")], "no save was interrupted"


def test_resume_continues_from_the_checkpoint(killed):
    log, at_kill = killed["log"], killed["at_kill"]
    saved_epoch = _epoch(at_kill)
    assert f"Restored all variables from {killed['folder'] / 'models' / 'checkpoint.pt'}" in log
    for epoch in range(1, NUM_EPOCHS + 1):
        trained = f"Epoch[{epoch}] Metrics -- train_loss" in log
        assert trained == (epoch > saved_epoch), f"epoch {epoch} must run only if it was not saved before the kill"

    final = _load(killed["folder"] / "models" / "checkpoint.pt")
    iterations = NUM_EPOCHS * at_kill["trainer"]["epoch_length"]
    assert final["trainer"]["iteration"] == iterations
    # optimizer steps and scheduler epochs count the whole run only when the resumed run continued the saved ones
    assert final["lr_scheduler"]["last_epoch"] == NUM_EPOCHS
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {iterations}
    assert final["evaluator"]["best_metric_epoch"] >= 1


def test_resume_restores_every_saved_state(killed, tmp_path, data):
    """A resumed run with nothing left to train holds exactly the checkpoint's state after loading it."""
    at_kill = killed["at_kill"]
    folder = _copy_models(killed, tmp_path)
    settings = _settings(folder, data, resume=True, num_epochs=_epoch(at_kill))
    workflow = run_config_workflow(["train.json"], "train", **settings)
    state = workflow.parser.get_parsed_content("train#checkpoint_state")
    assert set(state) == STATE_KEYS
    for key, obj in state.items():
        restored, saved = dict(obj.state_dict()), dict(at_kill[key])
        if key == "trainer":
            # CheckpointLoader keeps the run's own max_epochs, so a resumed run may be given more epochs
            assert restored.pop("max_epochs") == settings["num_epochs"] and saved.pop("max_epochs") == NUM_EPOCHS
        _assert_equal(restored, saved, key)
    _assert_equal(_load(folder / "models" / "checkpoint.pt"), at_kill, "nothing was trained, nothing saved")


def test_resumed_run_matches_an_uninterrupted_one(killed, uninterrupted):
    resumed, whole = _load(killed["folder"] / "models" / "checkpoint.pt"), _load(uninterrupted)
    _assert_equal(resumed["trainer"], whole["trainer"], "trainer")
    _assert_equal(resumed["lr_scheduler"], whole["lr_scheduler"], "lr_scheduler")
    _assert_equal(resumed["optimizer"]["param_groups"], whole["optimizer"]["param_groups"], "param_groups")
    steps = {k: int(s["step"]) for k, s in resumed["optimizer"]["state"].items()}
    assert steps == {k: int(s["step"]) for k, s in whole["optimizer"]["state"].items()}
    assert resumed["evaluator"]["max_epochs"] == whole["evaluator"]["max_epochs"] == NUM_EPOCHS
    for key in ("network", "loss"):
        assert {k: v.shape for k, v in resumed[key].items()} == {k: v.shape for k, v in whole[key].items()}


def test_two_runs_with_the_same_seed_are_identical(uninterrupted, tmp_path, data):
    run_config_workflow(["train.json"], "train", **_settings(tmp_path, data))
    again, first = _load(tmp_path / "models" / "checkpoint.pt"), _load(uninterrupted)
    assert _epoch(first) == NUM_EPOCHS
    _assert_equal(again, first, "checkpoint")
    _assert_equal(
        torch.load(tmp_path / "models" / "model.pt", weights_only=True),
        torch.load(uninterrupted.parent / "model.pt", weights_only=True),
        "model.pt",
    )


def test_resume_switch(tmp_path, caplog):
    checkpoint = tmp_path / "checkpoint.pt"
    assert resume_checkpoint(False, str(checkpoint)) is None
    assert resume_checkpoint("false", str(checkpoint)) is None, "--resume false on the command line is a string"
    with caplog.at_level("WARNING"):
        assert resume_checkpoint(True, str(checkpoint)) is None
    assert f"no checkpoint at {checkpoint}; training starts at epoch 1" in caplog.text
    checkpoint.write_bytes(b"")
    assert resume_checkpoint("True", str(checkpoint)) == str(checkpoint)
    with pytest.raises(ValueError, match="'resume' must be true or false, got 'yes'"):
        resume_checkpoint("yes", str(checkpoint))


def test_resume_without_a_checkpoint_starts_fresh(tmp_path, data):
    workflow = run_config_workflow(["train.json"], "train", **_settings(tmp_path, data, resume=True, num_epochs=1))
    assert workflow.parser.get_parsed_content("train#trainer").state.epoch == 1
    assert _epoch(_load(tmp_path / "models" / "checkpoint.pt")) == 1


def test_non_finite_loss_stops_training_and_keeps_the_checkpoints(killed, tmp_path, data):
    folder = _copy_models(killed, tmp_path)
    before = {p.name: p.read_bytes() for p in (folder / "models").iterdir()}
    settings = _settings(folder, data, resume=True)
    settings["train#trainer#loss_function"] = "$lambda pred, label: @loss(pred, label) * float('nan')"
    error = _raised(FloatingPointError, lambda: run_config_workflow(["train.json"], "train", **settings))
    message = str(error)
    assert message.startswith("non-finite training loss nan")
    assert f"at epoch {_epoch(killed['at_kill']) + 1}, iteration" in message
    named = [name for name in os.listdir(data / "images") if name in message]
    assert len(named) == TINY["batch_size"] and all(name.startswith("training_") for name in named), message
    assert {p.name: p.read_bytes() for p in (folder / "models").iterdir()} == before, "the checkpoints are untouched"


class _Payload:
    """Unpickling this creates ``path``: what a malicious checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


@pytest.mark.parametrize("workflow", ["resume", "evaluate", "inference"])
def test_a_checkpoint_holding_code_is_refused(killed, tmp_path, data, workflow):
    folder = _copy_models(killed, tmp_path)
    marker = tmp_path / "the_payload_ran"
    if workflow == "resume":
        poisoned = folder / "models" / "checkpoint.pt"
        torch.save({**killed["at_kill"], "payload": _Payload(marker)}, poisoned)
        files, workflow_type, settings = ["train.json"], "train", _settings(folder, data, resume=True)
    else:
        poisoned = folder / "models" / "model.pt"
        torch.save({"model": killed["at_kill"]["network"], "payload": _Payload(marker)}, poisoned)
        settings = {**_settings(folder, data), "ckpt_path": str(poisoned)}
        if workflow == "evaluate":
            files, workflow_type = ["train.json", "evaluate.json"], "eval"
        else:
            files, workflow_type = ["inference.json"], "infer"
            settings = {k: settings[k] for k in (*TINY_NETWORK, "image_size", "ckpt_path")}
            settings.update(dataset_dir=str(data / "images"), output_dir=str(tmp_path / "predictions"))
    error = _raised(ValueError, lambda: run_config_workflow(files, workflow_type, **settings))
    assert str(error).startswith(f"checkpoint {poisoned} cannot be restored: Weights only load failed")
    assert not marker.exists()
    torch.load(poisoned, weights_only=False)
    assert marker.exists(), "the payload is live: a loader without weights_only would have run it"


def test_multi_process_training_resumes(killed, tmp_path, data):
    """``torchrun`` with gloo on CPU resumes the single-process checkpoint into the DDP-wrapped network and loss."""
    folder = _copy_models(killed, tmp_path)
    # 2 ranks of batch 2 keep the checkpoint's 2 iterations per epoch (and its global batch of 4)
    command = _command(
        folder, data, "--resume", "true", "--batch_size", "2", config_files=("train.json", "multi_gpu_train.json")
    )
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [sys.executable, *launcher, *command],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    saved_epoch = _epoch(killed["at_kill"])
    assert "Restored all variables from" in log
    assert f"Epoch[{saved_epoch}] Metrics -- train_loss" not in log
    assert log.count(f"Epoch[{NUM_EPOCHS}] Metrics -- train_loss") == 1, "rank 0 alone logs"
    final = _load(folder / "models" / "checkpoint.pt")
    assert final["trainer"]["iteration"] == NUM_EPOCHS * killed["at_kill"]["trainer"]["epoch_length"]
    assert final["lr_scheduler"]["last_epoch"] == NUM_EPOCHS
