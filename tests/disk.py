"""Full disks for tests: a small tmpfs mounted where a test wants one (CI runs as root), and a filler."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, size: str, inodes: int | None = None) -> Iterator[bool]:
    """A tmpfs of `size` (and at most `inodes` files and folders) mounted at `path`; yields False, mounting
    nothing, where that is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes is not None else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    try:
        yield mounted.returncode == 0
    finally:
        if mounted.returncode == 0 and subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Writes a filler file until the filesystem is full (to the last page); returns it."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # unbuffered: nothing left to flush at close
    try:
        for chunk in (b"\0" * (1 << 20), b"\0" * 4096, b"\0"):
            try:
                while os.write(fd, chunk):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def use_up_inodes(folder: Path) -> list[Path]:
    """Creates empty files until the filesystem has no inode left; returns them."""
    made = []
    try:
        while True:
            made.append(folder / f"inode-{len(made)}")
            made[-1].touch()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
        made.pop()
    return made


def not_root_or_fail() -> None:
    """Without root no tmpfs can be mounted: skip. As root (CI) a failed mount is a failure, never a quiet skip."""
    if os.geteuid() == 0:
        pytest.fail("could not mount a tmpfs as root")
    pytest.skip("mounting a tmpfs needs root")
