"""The denoising-step log line: written by the worker, read back by clients (CLI progress bar, playground).

One format in one place: `step 3/30 · high-noise expert · 3.86s/step · ETA 1m44s`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_STEP_LINE = re.compile(r"^step (\d+)/(\d+) · (\w+)-noise expert · ([\d.]+)s/step · ETA (?:(\d+)m)?(\d+)s$")


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass(frozen=True)
class StepLine:
    step: int
    total: int
    expert: str  # "high" or "low"
    seconds_per_step: float
    eta_seconds: int

    def format(self) -> str:
        return (
            f"step {self.step}/{self.total} · {self.expert}-noise expert · {self.seconds_per_step:.2f}s/step"
            f" · ETA {format_duration(self.eta_seconds)}"
        )

    @classmethod
    def parse(cls, message: str) -> StepLine | None:
        match = _STEP_LINE.match(message)
        if match is None:
            return None
        step, total, expert, per_step, minutes, seconds = match.groups()
        eta = int(minutes or 0) * 60 + int(seconds)
        return cls(int(step), int(total), expert, float(per_step), eta)
