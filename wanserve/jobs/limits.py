"""Input limits that the wire schema does not state (it stays the fal contract): checked at submit, before
anything is stored, and answered as fal/FastAPI-style 422 `detail` entries whose `loc` names the field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wanserve.config import Settings
from wanserve.errors import InputValidationError
from wanserve.files.inputs import is_data_uri
from wanserve.schema import WanT2VRequest

PROMPT_FIELDS = ("prompt", "negative_prompt")
DATA_URI_TOO_LARGE = "data_uri_too_large"


@dataclass(frozen=True)
class InputLimits:
    max_prompt_chars: int = 10_000
    max_data_uri_bytes: int = 512 * 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> InputLimits:
        return cls(max_prompt_chars=settings.max_prompt_chars, max_data_uri_bytes=settings.max_data_uri_bytes)


def check_input_limits(request: WanT2VRequest, limits: InputLimits) -> None:
    """Raises InputValidationError (422) naming every field over its limit. Cheap: lengths only, so a data URI
    is measured by its text, never decoded."""
    errors: list[dict[str, Any]] = []
    for field in PROMPT_FIELDS:
        if field not in request.model_fields_set:
            continue  # a default (the negative prompt's is ~400 characters) is not the caller's to shorten
        text: str = getattr(request, field)
        if len(text) > limits.max_prompt_chars:
            errors.append(
                {
                    "loc": ["body", field],
                    "msg": f"String should have at most {limits.max_prompt_chars} characters, got {len(text)}",
                    "type": "string_too_long",  # pydantic's own type for a max_length error
                    "ctx": {"max_length": limits.max_prompt_chars},
                }
            )
    for i, lora in enumerate(getattr(request, "loras", None) or []):
        if is_data_uri(lora.path) and len(lora.path) > limits.max_data_uri_bytes:
            errors.append(
                {
                    "loc": ["body", "loras", i, "path"],
                    "msg": f"a data URI may be at most {limits.max_data_uri_bytes} bytes, got {len(lora.path)}: "
                    "upload the file and pass its URL",
                    "type": DATA_URI_TOO_LARGE,
                    "ctx": {"max_length": limits.max_data_uri_bytes},
                }
            )
    if errors:
        raise InputValidationError(errors)
