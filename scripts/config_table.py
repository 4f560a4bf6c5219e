"""The README's configuration table, generated from the settings object (wanserve.config.Settings).

.venv/bin/python scripts/config_table.py          # rewrite the table in README.md
.venv/bin/python scripts/config_table.py --check  # exit 1 if README.md is out of date (a test runs this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from wanserve.config import Settings

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"


def _default(value: Any) -> str:
    if value is None or value == []:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Path):
        home = str(Path.home())
        text = str(value)
        return "~" + text[len(home) :] if text.startswith(home) else text
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if isinstance(value, int) and not isinstance(value, bool) and value >= size and value % size == 0:
            return f"{value // size} {unit}"
    if isinstance(value, float) and value >= 86400 and value % 86400 == 0:
        return f"{value:.0f} ({value / 86400:g} days)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def table() -> str:
    rows = ["| setting | environment variable | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {name} | `WANSERVE_{name.upper()}` | `{_default(default)}` | {description} |")
    return "\n".join(rows)


def render(readme: str) -> str:
    head, start, rest = readme.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise SystemExit(f"README.md has no {START} ... {END} block")
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    current = README.read_text()
    wanted = render(current)
    if args.check:
        if current != wanted:
            print("README.md's configuration table is out of date: run scripts/config_table.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
