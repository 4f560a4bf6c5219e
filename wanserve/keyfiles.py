"""Secrets kept in files that several processes may create at once (API replicas starting together on one keys
folder): exactly one creation wins, and every process uses the bytes on disk, never a value it made and lost."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def read_or_create(path: Path, make: Callable[[], bytes]) -> bytes:
    """The contents of `path`; if there is none, `make()` written there (mode 0600) by whichever process gets there
    first. A link of a fully written temporary file claims the name: it fails if another process got there first,
    and a reader never sees a half-written file."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600, a name of its own
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(make())
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another process won: use its secret
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return path.read_bytes()
