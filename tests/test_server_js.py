"""The official JS client (npm @fal-ai/client, pinned in tests/js/package.json) through the proxy route."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from server import Server

JS_DIR = Path(__file__).parent / "js"


def test_official_js_client(server: Server) -> None:
    assert shutil.which("node") and shutil.which("npm"), "node and npm are required (installed by .ci/run)"
    if not (JS_DIR / "node_modules" / "@fal-ai" / "client").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True)
    result = subprocess.run(
        ["node", "--test", "--test-reporter=spec", str(JS_DIR / "fal_compat.test.mjs")],
        env={**os.environ, "WANSERVE_URL": server.url},
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "# fail 0" in output or "ℹ fail 0" in output, output
    assert "skipped 0" in output, output  # nothing silently skipped
