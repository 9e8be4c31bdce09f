"""
Input files that cannot be used: errors that name the file and the problem, and inference that goes on past them.

:class:`CheckedDataset` and :class:`CheckedCacheDataset` are MONAI's ``Dataset`` and ``CacheDataset`` whose items,
when a file is missing, empty, unreadable, undecodable or rejected by a transform, fail with an :class:`InputError`
naming the file. For inference over a folder, ``CheckedDataset(skip_bad=True)`` returns a :class:`FailedInput` in
place of such an item; :func:`collate_inputs` sets those apart from the good items of a batch, and
:class:`SkipFailedInputs` hands the engine only the good batches, logs each failure as it comes, and fails the run
at its end with the list of failures. The checks live in the dataset rather than in the transforms, so that MONAI
Deploy, which runs the transforms in memory without any file, is unaffected.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Sequence

from ignite.engine import Engine, Events
from monai.data import CacheDataset, Dataset, list_data_collate

__all__ = [
    "CheckedCacheDataset",
    "CheckedDataset",
    "FailedInput",
    "InputError",
    "SkipFailedInputs",
    "check_files",
    "collate_inputs",
    "describe_failure",
]

FILE_KEYS = ("image", "label")
# the start of MONAI LoadImage's message when no reader could decode a file; the rest lists install instructions
_NO_READER = "cannot find a suitable reader"
# the message of the RuntimeError in which MONAI's apply_transform wraps the error of a transform
_WRAPPER = "applying transform"
# the last line of a formatted traceback: "SomeError: message"
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): .*$", re.MULTILINE)


class InputError(ValueError):
    """An input file that cannot be used; the message is ``<file(s)>: <problem>``."""


@dataclass(frozen=True)
class FailedInput:
    """An item that could not be loaded: ``source`` names its file(s), ``reason`` says why."""

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


def _files(item: Mapping[Hashable, Any], keys: Sequence[str]) -> list[tuple[str, str]]:
    """The ``(key, path)`` pairs of the file paths that ``item`` holds under ``keys``."""
    return [(key, item[key]) for key in keys if isinstance(item.get(key), (str, os.PathLike))]


def _source(item: Mapping[Hashable, Any], keys: Sequence[str]) -> str:
    """The item's files for a message: the path alone for one file, ``key path`` pairs for several."""
    files = _files(item, keys)
    if len(files) == 1:
        return str(files[0][1])
    return ", ".join(f"{key} {path}" for key, path in files) or repr(dict(item))


def check_files(item: Mapping[Hashable, Any], keys: Sequence[str] = FILE_KEYS) -> None:
    """
    Check, before anything decodes them, that the files of ``item`` under ``keys`` can be read.

    Raises:
        InputError: naming the first file that does not exist, is not a regular file, is empty (0 bytes) or cannot
            be opened for reading (e.g. no read permission).
    """
    for _, path in _files(item, keys):
        if not os.path.exists(path):
            raise InputError(f"{path}: the file does not exist.")
        if not os.path.isfile(path):
            raise InputError(f"{path}: not a regular file.")
        if os.path.getsize(path) == 0:
            raise InputError(f"{path}: empty file (0 bytes).")
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as error:
            raise InputError(f"{path}: cannot be read ({error.strerror or error}).") from error


def _innermost(error: BaseException) -> BaseException:
    """The original error under MONAI's ``applying transform ...`` wrappers, which chain it with ``from``."""
    while isinstance(error, RuntimeError) and str(error).startswith(_WRAPPER) and error.__cause__ is not None:
        error = error.__cause__
    return error


def describe_failure(
    item: Mapping[Hashable, Any], error: BaseException, keys: Sequence[str] = FILE_KEYS
) -> FailedInput:
    """
    The :class:`FailedInput` of an item whose loading or transforms raised ``error``.

    The reason is the first line of the innermost error, without a leading file name (the bundle's transforms and
    :func:`check_files` start their messages with it); MONAI's "cannot find a suitable reader" becomes a short
    sentence.
    """
    root = _innermost(error)
    message = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
    if _NO_READER in message:
        # MONAI appends each reader's traceback; the first is that of the reader configured last (PIL for pictures)
        first = _EXCEPTION_LINE.search(str(root))
        detail = f" ({first.group(0)})" if first else ""
        return FailedInput(
            _source(item, keys),
            f"no configured reader can decode it: not an image, or a damaged or unsupported file{detail}.",
        )
    for _, path in _files(item, keys):
        prefix = f"{path}: "
        if message.startswith(prefix):
            return FailedInput(str(path), message[len(prefix) :])
    if not isinstance(root, ValueError):
        message = f"{type(root).__name__}: {message}"
    return FailedInput(_source(item, keys), message)


class CheckedDataset(Dataset):
    """
    MONAI's ``Dataset`` whose failing items name their files: :func:`check_files` runs before the transforms, and
    any error of the transforms is re-raised as an :class:`InputError` ``"<file>: <problem>"``.

    Args:
        data: the datalist, e.g. ``[{"image": path}, ...]``.
        transform: the transforms that load and preprocess an item.
        keys: the item keys that hold file paths; keys an item lacks are ignored.
        skip_bad: return a :class:`FailedInput` in place of a failing item instead of raising; for
            :func:`collate_inputs` and :class:`SkipFailedInputs`.
    """

    def __init__(
        self, data: Sequence, transform: Callable | None = None, keys: Sequence[str] = FILE_KEYS, skip_bad: bool = False
    ) -> None:
        super().__init__(data, transform)
        self.keys = tuple(keys)
        self.skip_bad = skip_bad

    def _transform(self, index: int) -> Any:
        item = self.data[index]
        try:
            check_files(item, self.keys)
            return super()._transform(index)
        except Exception as error:  # any failure of any reader or transform is reported with the item's file
            failure = describe_failure(item, error, self.keys)
            if self.skip_bad:
                return failure
            raise InputError(str(failure)) from error


@dataclass(frozen=True)
class _CachingFailure:
    """An item that failed while the cache was filled, kept until every caching thread has finished."""

    failure: FailedInput
    error: Exception


class CheckedCacheDataset(CacheDataset):
    """
    MONAI's ``CacheDataset`` whose failing items name their files, while caching and afterwards, as
    :class:`CheckedDataset` does; for training and evaluation, which stop at bad items: filling the cache raises one
    :class:`InputError` listing every item that failed, after all of them were tried.

    Args:
        data: the datalist.
        transform: the transforms; the deterministic ones up to the first random one are cached.
        keys: the item keys that hold file paths.
        kwargs: MONAI ``CacheDataset``'s other arguments (``cache_rate``, ``num_workers``, ...).
    """

    def __init__(
        self, data: Sequence, transform: Callable | None = None, keys: Sequence[str] = FILE_KEYS, **kwargs: Any
    ) -> None:
        self.keys = tuple(keys)  # set first: CacheDataset's constructor fills the cache
        super().__init__(data, transform, **kwargs)

    def _load_cache_item(self, idx: int) -> Any:
        item = self.data[idx]
        try:
            check_files(item, self.keys)
            return super()._load_cache_item(idx)
        except Exception as error:  # named, and raised by _fill_cache: a training set with a bad file must be fixed
            return _CachingFailure(describe_failure(item, error, self.keys), error)

    def _fill_cache(self, indices: Sequence[int] | None = None) -> list:
        # The items' errors are returned by the caching threads and raised here, once all of them have finished: an
        # exception leaving a thread of CacheDataset's pool closed the pool while other threads were still inside
        # torch, and the interpreter then often aborted at exit ("terminate called without an active exception").
        cache = super()._fill_cache(indices)
        failures = [entry for entry in cache if isinstance(entry, _CachingFailure)]
        if failures:
            listed = "; ".join(str(failure.failure) for failure in failures)
            raise InputError(listed) from failures[0].error
        return cache

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as error:
            raise InputError(str(describe_failure(self.data[index], error, self.keys))) from error


def collate_inputs(items: Sequence[Any]) -> tuple[Any, list[FailedInput]]:
    """
    Collate the good items of a batch with MONAI's ``list_data_collate`` and set the :class:`FailedInput` apart.

    Returns:
        the collated batch (``None`` when every item failed) and the failures.
    """
    failures = [item for item in items if isinstance(item, FailedInput)]
    good = [item for item in items if not isinstance(item, FailedInput)]
    return (list_data_collate(good) if good else None), failures


class SkipFailedInputs:
    """
    The good batches of a loader whose batches come from :func:`collate_inputs`, and an ignite handler that fails
    the run at its end when any input failed.

    Give it to the engine both as its data (``val_data_loader``) and as a handler. Each failure is logged with its
    file and reason when the loader reaches it; the others are processed as usual, so the outputs of every good
    input are written. At ``COMPLETED`` it raises an :class:`InputError` listing every failure, which makes the
    bundle's process exit with a non-zero status. It has no length: the engine counts the batches as they come.

    Args:
        loader: e.g. a ``DataLoader`` over ``CheckedDataset(skip_bad=True)`` with ``collate_fn=collate_inputs``.
        name: name of the logger.
    """

    def __init__(self, loader: Iterable[tuple[Any, list[FailedInput]]], name: str = "SkipFailedInputs") -> None:
        self.loader = loader
        self.logger = logging.getLogger(name)
        self.failures: list[FailedInput] = []
        self.num_good = 0

    def __iter__(self) -> Iterator[Any]:
        self.failures, self.num_good = [], 0
        for batch, failures in self.loader:
            for failure in failures:
                self.logger.error(f"skipped {failure}")
                self.failures.append(failure)
            if batch is not None:
                self.num_good += 1
                yield batch

    def attach(self, engine: Engine) -> None:
        """Raise at the end of ``engine``'s run when inputs failed."""
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def completed(self, engine: Engine) -> None:
        """
        Raises:
            InputError: listing every input that failed, when any did.
        """
        if self.failures:
            lines = "\n".join(f"  {failure}" for failure in self.failures)
            raise InputError(
                f"{len(self.failures)} input(s) could not be processed ({self.num_good} batch(es) of good inputs "
                f"were, and their outputs written):\n{lines}"
            )
