"""The documentation that is generated stays current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_readme_configuration_table_matches_the_settings_object() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_table.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    readme = (ROOT / "README.md").read_text()
    for name in ("lora_roots", "allow_private_urls", "job_lease_s", "hf_offline"):
        assert f"`WANSERVE_{name.upper()}`" in readme
