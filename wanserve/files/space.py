"""Free disk space. Uploads stop short of a reserve, so that a client sending large or many files cannot take the
room the worker's results and the job database need; a write that meets a full disk is a clear 507, never a 500.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import TypeGuard

from wanserve.errors import StorageFull

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> TypeGuard[OSError]:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def check_room(directory: Path, incoming: int, reserve: int) -> None:
    """Refuse (StorageFull) writing `incoming` more bytes under `directory` if that would leave less than `reserve`
    bytes free on its filesystem."""
    if reserve <= 0 and incoming <= 0:
        return
    free = shutil.disk_usage(directory).free
    if free - incoming < reserve:
        raise StorageFull(
            "not enough free disk space on the server for this upload (it keeps "
            f"{reserve / 2**30:.1f} GiB free for results): try again later, or ask the operator to free space"
        )


def upload_disk_full(exc: OSError) -> StorageFull:
    """What an upload that met a full disk answers (the caller has removed what it wrote)."""
    return StorageFull(f"the server's disk is full ({exc.strerror}): the upload was not stored")
