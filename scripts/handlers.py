"""
Ignite handlers of the bundle: loss level-weight logging, the evaluation summary, atomic checkpoints, resuming and
stopping on a non-finite loss.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from typing import Any, Mapping, Sequence

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.utils import CommonKeys

from scripts.atomic_file import atomic_write

__all__ = [
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "FileNamingCheckpointLoader",
    "LevelWeightsHandler",
    "MetricsSummaryWriter",
    "StopOnNonFiniteLoss",
    "resume_checkpoint",
]


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


class AtomicDiskSaver(BaseSaveHandler):
    """
    Ignite save handler that writes each checkpoint to a temporary file in the same folder, flushes it to disk and
    renames it over the destination, so the destination always holds either the previous or the new complete file.

    Ignite's ``Checkpoint`` removes a file it replaces before saving the new one; under a fixed ``filename`` that
    removal is skipped, because the rename replaces the old file itself, and deleting it first would leave no
    checkpoint at all if the process dies during the save.

    Args:
        dirname: folder of the checkpoints; created when missing.
        filename: a fixed file name for every save; None keeps the name ``Checkpoint`` gives each save.
        save_on_rank: the rank that writes in distributed runs; the other ranks write nothing.
    """

    def __init__(self, dirname: str, filename: str | None = None, save_on_rank: int = 0) -> None:
        self.dirname = dirname
        self.filename = filename
        self.save_on_rank = save_on_rank

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        """Write ``checkpoint`` (a dict of state dicts) as ``filename``, or as the fixed file name."""
        if idist.get_rank() != self.save_on_rank:
            return
        with atomic_write(os.path.join(self.dirname, self.filename or filename)) as stream:
            torch.save(checkpoint, stream)

    def remove(self, filename: str) -> None:
        """Delete ``filename``; nothing to do under a fixed file name, which the next save replaces."""
        if self.filename is None and idist.get_rank() == self.save_on_rank:
            os.remove(os.path.join(self.dirname, filename))


class AtomicCheckpointSaver(CheckpointSaver):
    """
    MONAI's ``CheckpointSaver`` writing every file through :class:`AtomicDiskSaver`, with a fixed name for the
    interval checkpoints, and with ``state_dict`` for its key-metric record.

    The record (the best key metric saved so far) can then be stored in a full-state checkpoint and restored by
    ``CheckpointLoader``, so a resumed run does not replace the best model with a worse one.

    Args:
        save_dir: the folder of the checkpoints.
        save_dict: the objects to save, e.g. ``{"network": net, "optimizer": opt}``.
        interval_filename: a fixed name for the checkpoints saved every ``save_interval`` epochs or iterations,
            each replacing the previous one; None names them ``{file_prefix}_checkpoint_epoch=N.pt`` as MONAI does.
        kwargs: the other arguments of ``monai.handlers.CheckpointSaver``.
    """

    def __init__(self, save_dir: str, save_dict: dict, interval_filename: str | None = None, **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        fixed_names = (
            (self._final_checkpoint, kwargs.get("final_filename")),
            (self._key_metric_checkpoint, kwargs.get("key_metric_filename")),
            (self._interval_checkpoint, interval_filename),
        )
        for checkpoint, filename in fixed_names:
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, filename)

    def state_dict(self) -> dict:
        """The key-metric record (ignite ``Checkpoint.state_dict()``: the saved ``(metric, filename)`` pairs)."""
        if self._key_metric_checkpoint is None:
            raise ValueError("this CheckpointSaver keeps no key-metric record; construct it with save_key_metric=True.")
        return self._key_metric_checkpoint.state_dict()


class FileNamingCheckpointLoader(CheckpointLoader):
    """
    MONAI's ``CheckpointLoader`` (which reads with ``torch.load(weights_only=True)``, so a file holding anything but
    tensors and plain containers is refused without running its code), whose errors name the checkpoint file.

    It takes the arguments of ``monai.handlers.CheckpointLoader``: ``load_path`` (the file), ``load_dict`` (the objects
    to restore, e.g. ``{"model": net}``), ``map_location``, ``strict``...
    """

    def __call__(self, engine: Engine) -> None:
        """Restore ``load_dict`` from the file; an unreadable or unfitting file raises ``ValueError`` naming it."""
        try:
            super().__call__(engine)
        except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, ValueError) as error:
            raise ValueError(f"checkpoint {self.load_path} cannot be restored: {error}") from error


def resume_checkpoint(resume: bool | str, checkpoint_path: str) -> str | None:
    """
    The checkpoint a resumed training run loads, or None when the run starts from epoch 1.

    Args:
        resume: whether to resume; the strings ``"true"`` and ``"false"`` (any case) are accepted, because the
            command line passes ``--resume true`` as a string.
        checkpoint_path: the full-state checkpoint that training saves.

    Returns:
        ``checkpoint_path`` when resuming and the file exists; None when not resuming, or when resuming but there is
        no checkpoint yet (logged), so the same command starts a run and resumes it after an interruption.

    Raises:
        ValueError: when ``resume`` is neither a bool nor ``"true"``/``"false"``.
    """
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"
    if not isinstance(resume, bool):
        raise ValueError(f"config key 'resume' must be true or false, got {resume!r}.")
    if not resume:
        return None
    if not os.path.isfile(checkpoint_path):
        logging.getLogger(__name__).warning(f"resume: no checkpoint at {checkpoint_path}; training starts at epoch 1.")
        return None
    return checkpoint_path


class StopOnNonFiniteLoss:
    """
    Stop training at a NaN or infinite loss, before its backward pass and optimizer step, with an error that names
    the batch's source files and the loss value; and at the end of each epoch, before validation and checkpointing,
    stop if a parameter of ``modules`` is not finite (a step with a finite loss but non-finite gradients).

    The error propagates through ignite, so the handlers of the epoch's end never run: no checkpoint of the bad state
    is written and the last one on disk stays as it was.

    Args:
        modules: modules whose parameters are checked at each epoch's end, e.g. the network and the loss.
        image_key: the batch key whose MetaTensor's ``filename_or_obj`` names the source files.
    """

    def __init__(self, modules: Sequence[torch.nn.Module] = (), image_key: str = CommonKeys.IMAGE) -> None:
        self.modules = modules
        self.image_key = image_key

    def attach(self, engine: Engine) -> None:
        """Register the checks on a MONAI trainer's LOSS_COMPLETED and EPOCH_COMPLETED events."""
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.check_loss)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.check_parameters)

    def check_loss(self, engine: Engine) -> None:
        """Raise ``FloatingPointError`` when the iteration's loss is not finite."""
        loss = engine.state.output[CommonKeys.LOSS]
        if bool(torch.isfinite(loss).all()):
            return
        raise FloatingPointError(
            f"non-finite training loss {loss.detach().cpu().tolist()} at epoch {engine.state.epoch}, iteration "
            f"{engine.state.iteration}, on the batch of {self._source_files(engine.state.batch)}; training stopped "
            "before this step changed the weights, and the checkpoints on disk were saved before it."
        )

    def check_parameters(self, engine: Engine) -> None:
        """Raise ``FloatingPointError`` when a parameter of ``modules`` is not finite."""
        for module in self.modules:
            bad = [name for name, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
            if bad:
                raise FloatingPointError(
                    f"parameters {bad[:5]}{' ...' if len(bad) > 5 else ''} of {type(module).__name__} are not finite "
                    f"at the end of epoch {engine.state.epoch}, though every loss was; training stopped before this "
                    "epoch's validation and checkpoints."
                )

    def _source_files(self, batch: Any) -> list[str] | str:
        """The batch's ``filename_or_obj`` list, or a note saying why it is unknown."""
        image = batch.get(self.image_key) if isinstance(batch, Mapping) else None
        files = getattr(image, "meta", {}).get("filename_or_obj")
        if files is None:
            return f"unknown files (its '{self.image_key}' carries no filename_or_obj)"
        return [str(f) for f in files] if isinstance(files, (list, tuple)) else [str(files)]
