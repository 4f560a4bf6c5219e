"""Log injection: text from a request cannot start a line of its own in the servers' logs."""

from __future__ import annotations

import logging
import subprocess
import sys

from wanserve.logsetup import OneLineFormatter, one_line


def test_control_characters_of_a_message_are_escaped_and_a_traceback_keeps_its_lines() -> None:
    formatter = OneLineFormatter("%(levelname)s %(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys as _sys

        record = logging.LogRecord(
            "x",
            logging.WARNING,
            __file__,
            1,
            "fetch of %s failed",
            ("http://a/\r\n2030 FORGED\x1b[2J\x85",),
            _sys.exc_info(),
        )
    lines = formatter.format(record).splitlines()
    assert lines[0] == "WARNING fetch of http://a/\\r\\n2030 FORGED\\x1b[2J\\x85 failed"
    assert lines[1] == "Traceback (most recent call last):" and lines[-1] == "ValueError: boom"
    assert one_line("un café, 狐 and a tab\t") == "un café, 狐 and a tab\\t"


def test_every_wanserve_command_logs_one_line_per_record() -> None:
    script = (
        "import logging, sys\n"
        "from wanserve.cli import main\n"
        "main(['--verbose', 'status', '--url', 'http://127.0.0.1:9', 'no-such-request'])\n"
        "logging.getLogger('wanserve.x').warning('to %s', 'http://a/\\n2030 FORGED')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "to http://a/\\n2030 FORGED" in done.stderr, done.stderr
    assert not any(line.startswith("2030 FORGED") for line in done.stderr.splitlines())
