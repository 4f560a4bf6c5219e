"""Imported once by the forkserver that starts a CPU worker group's ranks (group.rank_process_context), before it
forks any: what the ranks run is then imported already, and the forkserver ignores the stop signals a service
manager sends to every process of the unit (`systemctl stop`). The ranks are the forkserver's children, so it must
outlive the launcher's drain; it exits on its own when the launcher does."""

from __future__ import annotations

import signal

import wanserve.worker.group  # noqa: F401  (the ranks' code, imported once rather than in every rank)

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
