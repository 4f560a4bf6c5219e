"""Clients of a wanserve server: `WanserveClient` / `AsyncWanserveClient` (ours), `fal.use_wanserve` (the
official fal-client pointed at a wanserve server) and `local_server` (start one for scripts and tests)."""

from wanserve.client.client import (
    ApiError,
    AsyncWanserveClient,
    AuthError,
    ConfigError,
    InputError,
    NotFoundError,
    NotReady,
    QueueStatus,
    RequestCancelled,
    ServerError,
    Submitted,
    WanserveClient,
)
from wanserve.schema import LoRAWeight, WanLoRAT2VRequest, WanT2VRequest, WanT2VResponse

__all__ = [
    "ApiError",
    "AsyncWanserveClient",
    "AuthError",
    "ConfigError",
    "InputError",
    "LoRAWeight",
    "NotFoundError",
    "NotReady",
    "QueueStatus",
    "RequestCancelled",
    "ServerError",
    "Submitted",
    "WanLoRAT2VRequest",
    "WanT2VRequest",
    "WanT2VResponse",
    "WanserveClient",
]
