"""Temporary folders named after the process that made them (`<tmp>/wanserve-<pid>-...`), so that what a killed
process left (a worker ended by its watchdog, an API process killed mid-upload) is found and removed by the next
one to start."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from wanserve.numbers import ascii_int
from wanserve.worker.processes import pid_alive

TEMP_PREFIX = "wanserve-"


_made: dict[tuple[int, str], Path] = {}


def process_temp_dir(purpose: str) -> Path:
    """This process's folder for `purpose`, made on first use by mkdtemp (a new name, mode 0700: never a folder or
    link another user put in a shared temp dir under a name they could guess)."""
    key = (os.getpid(), purpose)  # a forked child makes its own
    folder = _made.get(key)
    if folder is None or not folder.is_dir():
        folder = _made[key] = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-{purpose}-"))
    return folder


def remove_stale_temp_dirs(root: Path | None = None) -> int:
    """Removes the folders of processes that are gone; returns how many. Run when a worker or API process starts."""
    removed = 0
    for folder in Path(root or tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*"):
        pid = ascii_int(folder.name[len(TEMP_PREFIX) :].split("-", 1)[0])
        if folder.is_dir() and pid is not None and not pid_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed
