"""Ignite handlers of the bundle: loss level-weight logging and the evaluation summary."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Sequence

import torch
from ignite.engine import Engine, Events

__all__ = ["LevelWeightsHandler", "MetricsSummaryWriter"]


class LevelWeightsHandler:
    """
    Log the deep-supervision loss's per-level weights (``loss.level_weights``) at the end of every epoch.

    The weights are those of the epoch's last iteration. Nothing is logged while the loss has none (mode ``none``).

    Args:
        loss: the loss module, or a ``DistributedDataParallel`` wrapping it.
        summary_writer: a TensorBoard ``SummaryWriter``; when given, each weight is also written as the scalar
            ``<tag_name>/side<k>`` (k = 1 is the finest side level).
        tag_name: tag of the log line and of the TensorBoard scalars.
        name: name of the logger.
    """

    def __init__(
        self,
        loss: torch.nn.Module,
        summary_writer: Any | None = None,
        tag_name: str = "loss_level_weights",
        name: str = "LevelWeightsHandler",
    ) -> None:
        self.loss = getattr(loss, "module", loss)
        self.summary_writer = summary_writer
        self.tag_name = tag_name
        self.logger = logging.getLogger(name)

    def attach(self, engine: Engine) -> None:
        """Register the handler on ``engine``'s EPOCH_COMPLETED event."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Log the current weights."""
        weights = getattr(self.loss, "level_weights", None)
        if weights is None:
            return
        values = [float(w) for w in weights.flatten()]
        epoch = engine.state.epoch
        text = " ".join(f"side{k}: {v:.4f}" for k, v in enumerate(values, start=1))
        self.logger.info(f"Epoch[{epoch}] {self.tag_name} -- {text}")
        if self.summary_writer is not None:
            for k, value in enumerate(values, start=1):
                self.summary_writer.add_scalar(f"{self.tag_name}/side{k}", value, epoch)
            self.summary_writer.flush()


class MetricsSummaryWriter:
    """
    Write the engine's final metrics to a JSON file when the run completes (e.g. after an evaluation).

    The file holds ``{"num_images": N, "metrics": {name: value}}``; values that are not finite (e.g. a Hausdorff
    distance of an empty prediction) are written as ``null``, so the file is strict JSON.

    Args:
        output_dir: folder of the file; created when missing.
        filename: name of the file.
        metric_names: the metrics to write; None writes every metric of ``engine.state.metrics``.
        save_rank: the rank that writes in distributed runs.
    """

    def __init__(
        self,
        output_dir: str,
        filename: str = "metrics_summary.json",
        metric_names: Sequence[str] | None = None,
        save_rank: int = 0,
    ) -> None:
        self.output_dir = output_dir
        self.filename = filename
        self.metric_names = metric_names
        self.save_rank = save_rank
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        """Register the handler on ``engine``'s COMPLETED event."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Write the summary file."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_rank() != self.save_rank:
                return
        names = list(engine.state.metrics) if self.metric_names is None else list(self.metric_names)
        missing = [n for n in names if n not in engine.state.metrics]
        if missing:
            raise KeyError(f"metrics {missing} are not computed by the engine; it has {list(engine.state.metrics)}.")
        metrics = {n: self._to_json(engine.state.metrics[n]) for n in names}
        summary = {"num_images": self._num_images(engine), "metrics": metrics}
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, self.filename)
        with open(path, "w") as f:
            json.dump(summary, f, indent=4)
        self.logger.info(f"wrote the metrics summary to {path}: {metrics}")

    @staticmethod
    def _to_json(value: Any) -> float | None:
        """A metric as a JSON number, or None when it is not finite."""
        value = float(value.item() if isinstance(value, torch.Tensor) else value)
        return value if math.isfinite(value) else None

    @staticmethod
    def _num_images(engine: Engine) -> int | None:
        """Number of evaluated images, when the data loader's dataset has a length."""
        dataset = getattr(getattr(engine, "data_loader", None), "dataset", None)
        return len(dataset) if hasattr(dataset, "__len__") else None
