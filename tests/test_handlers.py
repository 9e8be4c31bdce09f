"""Bundle handlers: per-epoch loss level weights, evaluation summary JSON."""

import json
import logging

import torch
from ignite.engine import Engine, Events

from scripts.handlers import LevelWeightsHandler, MetricsSummaryWriter


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
