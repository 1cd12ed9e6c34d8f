"""Atomic file writes: the one helper every writer of the kit uses.

    with atomic_write(path) as f:          # binary; atomic_write(path, "w") for text
        f.write(data)
    write_text(path, "...")                # the same for a whole string / bytes

The data goes to a temporary file in the destination folder, is flushed to disk
and renamed over ``path`` only when the block ends without an error, so a
crash or an interrupt never leaves a half-written file (an older file of that
name stays intact). The temporary name starts with ``.`` and ends with
``.tmp``; a failed write removes it. The file gets the usual permissions
(``0o666`` less the umask).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", *, encoding: str | None = None,
                 durable: bool = True) -> Iterator[IO]:  # fmt: skip
    """Open ``path`` for writing under a temporary name; rename it into place on success.

    Args:
      path: the destination; its folder must exist.
      mode: ``"wb"`` (default) or ``"w"`` (text, ``encoding`` default utf-8).
      durable: flush the file and its folder to disk before returning (default). False
        skips those waits, for files whose reader detects a cut or lost write itself
        (the weights cache checks sizes and CRC-32s): a crash of the machine may then lose
        or damage the file; an interrupted process still leaves none under ``path``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode={mode!r}; use 'wb' or 'w'")
    path = Path(path)
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give the usual mode
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def write_text(path, text: str) -> Path:
    """Write ``text`` (utf-8) to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (where the platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
