"""Secrets kept in files that several processes may create at once (API replicas starting together on one keys
folder): exactly one creation wins, and every process uses the bytes on disk, never a value it made and lost."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from wanserve.files.base import write_synced

SETTLE_S = 2.0  # how long a reader waits for a file another process is still writing (no hard links: see below)


def read_or_create(path: Path, make: Callable[[], bytes]) -> bytes:
    """The contents of `path`; if there is none, `make()` written there (mode 0600) by whichever process gets there
    first. A hard link of a fully written temporary file claims the name: it fails if another process got there
    first, and a reader never sees half a file. Where the filesystem has no hard links (vfat, many network and
    object-store mounts), an exclusive create claims it instead, and readers wait for its bytes."""
    try:
        return _settled(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    data = make()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600, a name of its own
    try:
        write_synced(fd, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won: use its secret
        except OSError:  # no hard links here
            _create_exclusive(path, data)
    finally:
        os.unlink(tmp)
    return _settled(path)


def _create_exclusive(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process won
    write_synced(fd, data)


def _settled(path: Path) -> bytes:
    """The file's bytes once it has some (an exclusive create is seen empty until its writer's write lands)."""
    deadline = time.monotonic() + SETTLE_S
    while not (data := path.read_bytes()):
        if time.monotonic() > deadline:  # never an empty secret: its writer died between create and write
            raise RuntimeError(f"{path} is empty (the process creating it stopped): delete it and start again")
        time.sleep(0.01)
    return data
