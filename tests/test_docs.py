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


def test_the_systemd_units_in_the_docs_have_no_comment_after_a_value() -> None:
    """systemd reads `LimitNOFILE=65536   # ...` as a bad value (ignored: the limit is not raised) and takes an
    `EnvironmentFile=` comment as part of the path: a unit copied from the docs must work as written."""
    import re

    text = (ROOT / "docs" / "deploy.md").read_text()
    units = re.findall(r"```ini\n(.*?)```", text, flags=re.S)
    assert len(units) >= 2
    settings = [line for unit in units for line in unit.splitlines() if re.match(r"[A-Za-z]+=", line)]
    assert len(settings) > 10
    assert [line for line in settings if "#" in line] == []
