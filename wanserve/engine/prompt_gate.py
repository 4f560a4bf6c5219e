"""A request's prompt on its way to the model: the safety checker, then the prompt expansion (itself checked).

One piece for the worker (each job's log gets the lines) and for `wanserve generate` (the terminal gets them)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from wanserve.config import Settings
from wanserve.engine.prompt_expansion import (
    ExpansionFailed,
    PromptExpander,
    expand_with_deadline,
    expander_from_settings,
)
from wanserve.engine.safety import NOTHING_CONFIGURED, SafetyChecker
from wanserve.errors import ContentPolicyViolation
from wanserve.jobs.model import LogLevel
from wanserve.schema import WanT2VRequest

log = logging.getLogger(__name__)

Request = TypeVar("Request", bound=WanT2VRequest)
Report = Callable[[str, LogLevel], None]  # a line for whoever follows the request


class PromptGate:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.safety = SafetyChecker(settings)
        self.expander: PromptExpander | None = None
        self.expander_error: str | None = None
        try:
            self.expander = expander_from_settings(settings)
        except Exception as exc:  # a broken expansion model must not keep the videos from being made
            self.expander_error = f"{type(exc).__name__}: {exc}"
            log.error("prompt expansion is unavailable: %s", self.expander_error)
        if self.safety.describe() == NOTHING_CONFIGURED:
            # enable_safety_checker is on by default: an operator must know that it checks nothing yet.
            log.warning(
                "the safety checker has nothing to check with (set WANSERVE_SAFETY_TERMS_FILE, "
                "WANSERVE_SAFETY_TEXT_MODEL or WANSERVE_SAFETY_IMAGE_MODEL): requests pass unchecked"
            )

    def describe(self) -> dict[str, str]:
        """What the checks do here, for the worker's advertised detail (/ready)."""
        expansion = self.expander.description if self.expander is not None else self.expander_error or "not configured"
        return {"safety_checker": self.safety.describe(), "prompt_expansion": expansion}

    def checks(self, request: WanT2VRequest) -> bool:
        """Whether the safety checker looks at this request (the operator may force it on)."""
        return request.enable_safety_checker or self.settings.safety_force

    def prepare(self, request: Request, report: Report) -> Request:
        """The request with the prompt to generate from. Raises ContentPolicyViolation for a flagged prompt; an
        expansion that fails or is flagged is dropped (with a line saying why), never the request."""
        checked = self.checks(request)
        if checked:
            report(f"Safety checker: checking the prompt ({self.safety.describe()})", LogLevel.INFO)
            self.safety.check_prompt(request.prompt)
        else:
            report("Safety checker: off for this request (enable_safety_checker: false)", LogLevel.INFO)
        if not request.enable_prompt_expansion:
            return request
        expanded = self._expand(request.prompt, report)
        if expanded == request.prompt:
            return request
        try:
            if checked:
                self.safety.check_prompt(expanded)
        except ContentPolicyViolation as exc:  # the caller's prompt passed: its expansion is dropped, unshown
            report(f"The expanded prompt was flagged ({exc.reason}); using the prompt as given", LogLevel.WARN)
            return request
        report(f"Expanded prompt: {expanded}", LogLevel.INFO)
        return request.model_copy(update={"prompt": expanded})

    def _expand(self, prompt: str, report: Report) -> str:
        if self.expander is None:
            why = self.expander_error or "no expansion model or API is configured on this server"
            report(f"Prompt expansion skipped: {why}; using the prompt as given", LogLevel.WARN)
            return prompt
        report(f"Expanding the prompt with {self.expander.description}", LogLevel.INFO)
        started = time.perf_counter()
        try:
            expanded = expand_with_deadline(self.expander, prompt, self.settings.prompt_expansion_timeout_s)
        except ExpansionFailed as exc:
            report(f"Prompt expansion failed ({exc}); using the prompt as given", LogLevel.WARN)
            return prompt
        # The text itself is reported once the safety checker has seen it (`prepare`).
        report(f"Prompt expanded in {time.perf_counter() - started:.1f}s", LogLevel.INFO)
        return expanded
