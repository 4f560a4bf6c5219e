"""Which processes a server can judge alive: its worker processes are told apart from workers it cannot see."""

from __future__ import annotations

import os
import socket
from functools import cache
from pathlib import Path


@cache
def process_space() -> str:
    """The set of process ids this process sees: the machine's boot and this PID namespace (Linux), else the host
    name. Two containers sharing a host name, or two machines with the same name, differ here; a worker registered
    from another space may be alive although its pid is not found in this one."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether `pid` (in this process space) is a live process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A worker killed with its server is a zombie until its new parent reaps it (seconds, under some inits):
    # dead already, or its job would wait for its lease to run out instead of going back to the queue at once.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc (not Linux): os.kill's answer stands
        return True
