"""Files written whole or not at all, and file hashes: the one place app/ does either."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from poe_core.files import sha256_file as file_sha256

__all__ = ["atomic_write", "file_sha256"]


def atomic_write(path: Path, write: Callable[[BinaryIO], object] | bytes, *, mode: int = 0o600,
                 durable: bool = True, replace: bool = True, tmp_dir: Path | None = None) -> bool:
    """Write `path` through a temporary file renamed (or linked) into place, so a reader
    sees no file or the whole file, never a torn one. `write` is the content or a function
    that writes to the open file. `replace=False` keeps an existing file (the caller lost
    a race to another process writing the same thing) and returns False. `durable` fsyncs
    before the rename. The temporary file lives in `tmp_dir` (same file system), default
    the target's directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=f".{path.name[:24]}.")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, bytes):
                f.write(write)
            else:
                write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
