"""Bundle handlers: per-epoch loss level weights, evaluation summary JSON, atomic checkpoints, non-finite losses."""

import json
import logging
import subprocess
import sys
import time

import pytest
import torch
from bundle_test_utils import REPO
from ignite.engine import Engine, Events
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedTrainer

from scripts.handlers import (
    AtomicCheckpointSaver,
    AtomicDiskSaver,
    FileNamingCheckpointLoader,
    LevelWeightsHandler,
    MetricsSummaryWriter,
    StopOnNonFiniteLoss,
)


class _Loss(torch.nn.Module):
    """A stand-in for the multiscale loss: its weights change every iteration."""

    def __init__(self, weights: list[float] | None) -> None:
        super().__init__()
        self.weights = weights
        self.calls = 0

    @property
    def level_weights(self) -> torch.Tensor | None:
        return None if self.weights is None else torch.tensor(self.weights) * self.calls


class _Writer:
    """Records what a TensorBoard SummaryWriter would write."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        """Nothing is buffered."""


def _engine(loss: _Loss) -> Engine:
    def step(engine: Engine, batch: int) -> None:
        loss.calls += 1

    return Engine(step)


def test_level_weights_are_logged_each_epoch(caplog):
    loss, writer = _Loss([0.5, 0.25, 0.125]), _Writer()
    engine = _engine(loss)
    wrapped = torch.nn.Module()
    wrapped.module = loss  # what DistributedDataParallel looks like to the handler
    LevelWeightsHandler(loss=wrapped, summary_writer=writer).attach(engine)
    with caplog.at_level(logging.INFO, logger="LevelWeightsHandler"):
        engine.run([0, 1], max_epochs=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "LevelWeightsHandler"]
    assert lines == [
        "Epoch[1] loss_level_weights -- side1: 1.0000 side2: 0.5000 side3: 0.2500",
        "Epoch[2] loss_level_weights -- side1: 2.0000 side2: 1.0000 side3: 0.5000",
    ]
    assert ("loss_level_weights/side3", 0.5, 2) in writer.scalars and len(writer.scalars) == 6


def test_level_weights_handler_is_silent_without_weights(caplog):
    loss = _Loss(None)
    engine = _engine(loss)
    LevelWeightsHandler(loss=loss).attach(engine)
    with caplog.at_level(logging.INFO, logger="LevelWeightsHandler"):
        engine.run([0], max_epochs=1)
    assert not [r for r in caplog.records if r.name == "LevelWeightsHandler"]


def test_metrics_summary_json(tmp_path):
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _metrics(e: Engine) -> None:
        e.state.metrics.update({"mean_dice": 0.8, "hd95": float("nan"), "recall": torch.tensor(0.5)})

    MetricsSummaryWriter(output_dir=str(tmp_path / "eval")).attach(engine)
    engine.run([0, 1, 2], max_epochs=1)
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert summary["metrics"] == {"mean_dice": 0.8, "hd95": None, "recall": 0.5}


class _Unsaveable:
    """Saving this fails midway through a checkpoint, as a full disk would."""

    def __reduce__(self):
        raise OSError("no space left on device")


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    saver = AtomicDiskSaver(str(tmp_path), filename="checkpoint.pt")
    saver({"step": torch.tensor(1)}, "ignored.pt")
    with pytest.raises(OSError, match="no space left on device"):
        saver({"step": torch.tensor(2), "weights": torch.ones(1000), "unsaveable": _Unsaveable()}, "ignored.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"], "no temporary file is left behind"
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"].item() == 1
    saver.remove("ignored.pt")
    assert (tmp_path / "checkpoint.pt").is_file(), "a fixed-name file is replaced by the next save, never deleted"


# a process that saves checkpoint 1, then hangs in the middle of writing checkpoint 2 until it is killed
_SAVE_AND_HANG = """
import sys, time
import torch
from scripts.handlers import AtomicDiskSaver


class Hang:
    def __reduce__(self):
        open(sys.argv[2], "w").close()
        time.sleep(600)


saver = AtomicDiskSaver(sys.argv[1], filename="checkpoint.pt")
saver({"step": 1, "weights": torch.ones(1000)}, "ignored.pt")
saver({"step": 2, "weights": torch.zeros(1000), "hang": Hang()}, "ignored.pt")
"""


def test_a_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    writing = tmp_path / "writing"
    process = subprocess.Popen([sys.executable, "-c", _SAVE_AND_HANG, str(tmp_path / "models"), str(writing)], cwd=REPO)
    deadline = time.monotonic() + 300
    while not writing.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert writing.exists(), "the process was killed while writing checkpoint 2"
    temporary, name = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert name == "checkpoint.pt" and temporary.startswith(".checkpoint.pt.") and temporary.endswith(".tmp")
    checkpoint = torch.load(tmp_path / "models" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["weights"], torch.ones(1000))


def _metric_engine(values: list[float]) -> Engine:
    """An engine whose epoch k ends with the key metric ``iou`` = ``values[k - 1]``."""
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _metric(e: Engine) -> None:
        e.state.metrics["iou"] = values[e.state.epoch - 1]

    return engine


def _best_model_saver(folder, network: torch.nn.Module) -> AtomicCheckpointSaver:
    return AtomicCheckpointSaver(
        str(folder), {"model": network}, save_key_metric=True, key_metric_name="iou", key_metric_filename="model.pt"
    )


def _assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys() and all(torch.equal(actual[k], expected[k]) for k in expected)


def _run_saver(saver: AtomicCheckpointSaver, values: list[float]) -> None:
    engine = _metric_engine(values)
    saver.attach(engine)
    engine.run([0], max_epochs=len(values))


def test_a_restored_key_metric_record_keeps_the_better_model(tmp_path):
    network = torch.nn.Linear(1, 1)
    first = _best_model_saver(tmp_path, network)
    _run_saver(first, [0.9])
    best = torch.load(tmp_path / "model.pt", weights_only=True)
    _assert_same_state(best, network.state_dict())
    record = tmp_path / "record.pt"
    torch.save({"best_model_saver": first.state_dict()}, record)

    with torch.no_grad():
        network.weight.add_(1.0)
    resumed = _best_model_saver(tmp_path, network)
    resumed.load_state_dict(torch.load(record, weights_only=True)["best_model_saver"])
    _run_saver(resumed, [0.5])
    _assert_same_state(torch.load(tmp_path / "model.pt", weights_only=True), best)
    _run_saver(resumed, [0.95])
    _assert_same_state(torch.load(tmp_path / "model.pt", weights_only=True), network.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "record.pt"]


def test_interval_checkpoints_replace_one_file(tmp_path):
    engine = Engine(lambda e, b: None)
    saver = AtomicCheckpointSaver(
        str(tmp_path / "models"), {"trainer": engine}, save_interval=1, n_saved=1, interval_filename="checkpoint.pt"
    )
    saver.attach(engine)
    engine.run([0, 1], max_epochs=3)
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["checkpoint.pt"]
    # ignite stores a single object's state directly, without its key
    assert torch.load(tmp_path / "models" / "checkpoint.pt", weights_only=True)["iteration"] == 6
    with pytest.raises(ValueError, match="no key-metric record"):
        saver.state_dict()


def test_checkpoint_loader_errors_name_the_file(tmp_path):
    truncated = tmp_path / "truncated.pt"
    torch.save(torch.nn.Linear(8, 8).state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    small = tmp_path / "small.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), small)
    for path in (truncated, small):
        loader = FileNamingCheckpointLoader(load_path=str(path), load_dict={"model": torch.nn.Linear(3, 3)})
        with pytest.raises(ValueError, match=f"checkpoint {path} cannot be restored"):
            loader(Engine(lambda e, b: None))


def _tiny_trainer(loss_scales: list[float]) -> SupervisedTrainer:
    """A 1x1-convolution trainer on 4 named images in batches of 2; iteration k's loss is scaled by loss_scales[k-1]."""
    items = [
        {
            "image": MetaTensor(torch.rand(1, 4, 4), meta={"filename_or_obj": f"case_{i}.png"}),
            "label": torch.rand(1, 4, 4),
        }
        for i in range(4)
    ]
    network = torch.nn.Conv2d(1, 1, 1)
    scales = iter(loss_scales)

    def loss_function(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(pred, label) * next(scales)

    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=DataLoader(items, batch_size=2),
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
        loss_function=loss_function,
    )


def _attach_checks_and_saver(trainer: SupervisedTrainer, folder) -> None:
    """The bundle's order: the non-finite checks first, the full-state checkpoint after everything else."""
    StopOnNonFiniteLoss(modules=[trainer.network]).attach(trainer)
    save_dict = {"network": trainer.network, "trainer": trainer}
    AtomicCheckpointSaver(str(folder), save_dict, save_interval=1, interval_filename="checkpoint.pt").attach(trainer)


def test_a_non_finite_loss_stops_before_the_step(tmp_path):
    trainer = _tiny_trainer([1.0, 1.0, 1.0, float("nan")])
    _attach_checks_and_saver(trainer, tmp_path)
    snapshots = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _snapshot(engine: Engine) -> None:
        snapshots[engine.state.iteration] = {k: v.clone() for k, v in engine.network.state_dict().items()}

    with pytest.raises(FloatingPointError) as error:
        trainer.run()
    assert "non-finite training loss nan at epoch 2, iteration 4, on the batch of ['case_2.png', 'case_3.png']" in str(
        error.value
    )
    _assert_same_state(trainer.network.state_dict(), snapshots[3])
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 2, "the checkpoint of epoch 1 stays"
    _assert_same_state(checkpoint["network"], snapshots[2])


def test_non_finite_parameters_stop_before_the_checkpoint(tmp_path):
    trainer = _tiny_trainer([1.0] * 4)
    _attach_checks_and_saver(trainer, tmp_path)

    @trainer.on(Events.ITERATION_COMPLETED(once=2))
    def _overflow(engine: Engine) -> None:
        with torch.no_grad():
            engine.network.bias.fill_(float("inf"))  # what a step with an infinite gradient leaves

    with pytest.raises(
        FloatingPointError, match=r"parameters \['bias'\] of Conv2d are not finite at the end of epoch 1"
    ):
        trainer.run()
    assert not list(tmp_path.iterdir()), "nothing was saved"
