"""Writing a file so that it never holds a partial content: checkpoints, release files."""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from typing import IO, Iterator

__all__ = ["atomic_write"]


@contextmanager
def atomic_write(path: str) -> Iterator[IO[bytes]]:
    """
    A binary stream whose content replaces ``path`` only when the block ends without an error.

    The content goes to a hidden temporary file beside ``path`` (``.<name>.<random>.tmp``), is flushed to disk and
    moved onto ``path`` with ``os.replace``. ``path`` therefore holds either its old content or the complete new one,
    also when the process is killed midway; a kill can only leave the temporary file behind. On an error the
    temporary file is removed and the error raised.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    # created as any new file is (0o666 less the umask), not private as tempfile.mkstemp would make it
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
