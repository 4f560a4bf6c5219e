"""The official JS client (npm @fal-ai/client, pinned in tests/js/package.json) through the proxy route."""

from __future__ import annotations

import re

from js_client import run_js_suite
from server import Server


def test_official_js_client(server: Server) -> None:
    output = run_js_suite(server.url)
    assert re.search(r"(# |ℹ )skipped 0\b", output), output  # nothing silently skipped
