"""A worker acts on SIGINT/SIGTERM at once, even while its main thread is inside one long C call (a GPU step's
CUDA synchronisation), where Python's own signal handling waits for the call to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

# The main thread spends seconds in one torch call that runs no Python, as it would waiting for the GPU.
CHILD = """
import signal, sys, time, torch
from wanserve.worker.signals import handle_signals_at_once
handled = []
handler = lambda: handled.append(time.monotonic())
if sys.argv[1] == "at-once":
    handle_signals_at_once({signal.SIGTERM: handler})
else:
    signal.signal(signal.SIGTERM, lambda *_: handler())
torch.set_num_threads(1)
a = torch.randn(2200, 2200)
start = time.monotonic()
print("ready", flush=True)
torch.linalg.svd(a)
end = time.monotonic()
time.sleep(0.5)  # Python code again: a handler held up by the C call has run by now
print(handled[0] - start, end - start, flush=True)
"""


@pytest.mark.parametrize("how", ["at-once", "python"])
def test_a_stop_signal_is_handled_while_the_main_thread_is_in_a_long_c_call(how: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, how], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    os.kill(child.pid, signal.SIGTERM)
    handled_s, call_s = map(float, child.stdout.readline().split())
    assert child.wait(30) == 0
    assert call_s > 1.0  # long enough to tell the two apart
    if how == "at-once":
        assert handled_s < call_s / 2  # during the call (sent 0.2 s into it)
    else:  # the control: Python's own handler waits for the call to end
        assert handled_s >= call_s - 0.05
