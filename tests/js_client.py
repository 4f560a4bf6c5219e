"""Run the official JS client's compatibility suite (tests/js/fal_compat.test.mjs, npm @fal-ai/client) against a
running server."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

JS_DIR = Path(__file__).parent / "js"


def run_js_suite(url: str, key: str | None = None, only: str | None = None) -> str:
    """Run the suite against `url` (sending `key` as the client's credentials when given); `only` is a Node test
    name pattern. Asserts that it passed with nothing skipped and at least one test run; returns its output."""
    assert shutil.which("node") and shutil.which("npm"), "node and npm are required (installed by .ci/run)"
    if not (JS_DIR / "node_modules" / "@fal-ai" / "client").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("WANSERVE_KEY", "FAL_KEY")}
    env["WANSERVE_URL"] = url
    if key is not None:
        env["WANSERVE_KEY"] = key
    pattern = [f"--test-name-pattern={only}"] if only else []
    result = subprocess.run(
        ["node", "--test", "--test-reporter=spec", *pattern, str(JS_DIR / "fal_compat.test.mjs")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"(# |ℹ )fail 0\b", output), output
    passed = re.search(r"(?:# |ℹ )pass (\d+)", output)
    assert passed and int(passed.group(1)) > 0, output
    return output
