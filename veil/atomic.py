"""One atomic file write for every file veil must never leave half-written (DESIGN.md, "Quality bars").

The recipe: a temp file in the same directory (so the rename stays on one filesystem), write, flush, fsync the
file, ``os.replace`` over the target, fsync the directory (so the rename itself survives a power cut). A crash
at any point leaves either the old file or the new one; on an exception the temp file is removed. A writer
killed outright (SIGKILL, power loss) can leave a ``.<name>.<random>.tmp`` beside the target, never the target
half-written; readers ignore such names.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "fsync_dir"]


def atomic_write(path: Path, data: bytes | str | Callable[[BinaryIO], object], *, mode: int = 0o666) -> Path:
    """Replace ``path`` with ``data`` atomically and durably; return ``path``.

    Parameters
    ----------
    path : Path
        The target; its directory must exist.
    data : bytes, str or callable
        The new content: bytes, text (written as UTF-8) or a function that writes to a binary file handle
        (``lambda fh: np.savez(fh, **arrays)``).
    mode : int
        Permission bits of the new file, before the umask (0o600 for a file only its owner may read).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable (best effort: not every platform or filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
