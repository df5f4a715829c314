"""Atomic file writes: every output is written to a temporary name in the same folder, then renamed.

A crash or kill therefore never leaves a half-written file under the real name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import DiskFull, OutputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFull(f"the disk holding {path.parent} is full (No space left on device)", path.parent) from None
        raise OutputError(f"cannot write to {path.parent}: {exc.strerror or exc}") from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should be as readable as any file
        os.replace(tmp_path, path)
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise DiskFull(f"the disk holding {path.parent} is full (No space left on device) while writing "
                       f"{path.name}; nothing half-written was left", path.parent) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when a library wraps it: safetensors raises SafetensorError('... No space left on
    device (os error 28)'), not OSError."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or f"os error {errno.ENOSPC})" in text or "Disk quota exceeded" in text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))
