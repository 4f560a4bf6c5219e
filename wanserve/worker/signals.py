"""Stop signals acted on at once, even while the main thread waits inside the GPU.

Python runs a signal handler on the main thread, between two bytecodes. A worker's main thread spends most of a
denoising step inside one C call (a CUDA synchronisation, ~20 s a step at 720p), so a handler set with
`signal.signal` alone runs only when the step ends: after a service manager's or the server's grace has run out and
the worker was killed, its job counted as a failed attempt. The C-level handler Python installs does run at once,
on whatever thread the signal interrupts, and writes the signal number to the wakeup fd: a thread reading that fd
calls the handler instead. Signal masks are left alone, so child processes (compile workers, GPU ranks) get their
signals as usual.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def handle_signals_at_once(handlers: Mapping[signal.Signals, Callable[[], None]]) -> None:
    """Call `handlers[sig]()` on a thread of its own as each signal arrives. Must be called from the main thread
    (as `signal.signal`), once per process: it takes the process's wakeup fd."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the C handler must never block; a full pipe drops a repeat, not a first
    for sig in handlers:
        # Python's C handler (the one that writes the wakeup fd) is installed only for a Python-level handler.
        signal.signal(sig, lambda *_: None)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    by_number = {int(sig): handler for sig, handler in handlers.items()}

    def dispatch() -> None:
        while True:
            for number in os.read(read_fd, 64):
                handler = by_number.get(number)
                if handler is None:  # a signal another part of the process handles with signal.signal
                    continue
                try:
                    handler()
                except Exception:  # a failing handler must not stop the next signal from being acted on
                    log.exception("handling signal %d failed", number)

    threading.Thread(target=dispatch, name="signals", daemon=True).start()
