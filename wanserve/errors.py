"""The error tree. Each error knows the HTTP status and the fal `error_type` it maps to."""

from __future__ import annotations


class WanserveError(Exception):
    """Base of every error this project raises on purpose."""

    http_status: int = 500
    error_type: str = "internal_error"


class ModelLoadError(WanserveError):
    """A model directory is missing, incomplete or corrupt. The message names the file."""

    http_status = 503
    error_type = "runner_server_error"


class GenerationCancelled(WanserveError):
    """The caller cancelled a generation between two denoising steps."""

    http_status = 499
    error_type = "client_cancelled"


class InvalidGenerationInput(WanserveError):
    """An input the schema admits but the loaded model cannot honour."""

    http_status = 422
    error_type = "bad_request"
