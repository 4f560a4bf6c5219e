"""Which endpoint ids this server answers, and the request schema each one takes."""

from __future__ import annotations

from dataclasses import dataclass, field

from wanserve.jobs.limits import InputLimits
from wanserve.schema import WanLoRAT2VRequest, WanT2VRequest

# First path segments that other routes of the server own: an app id there would be unreachable.
RESERVED_PREFIXES = frozenset(
    {"run", "rest", "cdn", "files", "api", "health", "ready", "metrics", ".well-known", "docs"}
)
NAMESPACES = ("workflows", "comfy")  # fal ids whose first segment is a namespace, not an owner


def app_of(endpoint_id: str) -> str:
    """`owner/app` (with its namespace, if any): what status, result and cancel URLs carry."""
    parts = endpoint_id.strip("/").split("/")
    width = 3 if parts[0] in NAMESPACES else 2
    return "/".join(parts[:width])


@dataclass(frozen=True)
class Endpoint:
    id: str  # full id, as submitted: `fal-ai/wan-22/lora`
    app: str  # `fal-ai/wan-22`
    request_model: type[WanT2VRequest]
    # what the input must keep beyond the schema (checked at submit)
    limits: InputLimits = field(default_factory=InputLimits)


class EndpointRegistry:
    """Each configured app id serves the T2V request; `<id>/lora` serves the LoRA request. Every endpoint
    checks its input against `limits` at submit."""

    def __init__(self, app_ids: list[str], limits: InputLimits | None = None) -> None:
        limits = limits or InputLimits()
        self._endpoints: dict[str, Endpoint] = {}
        for app_id in app_ids:
            app_id = app_id.strip("/")
            if app_id.count("/") < 1:
                raise ValueError(f"an app id is owner/app[/path], got {app_id!r}")
            if app_id.split("/")[0] in RESERVED_PREFIXES:
                raise ValueError(f"app id {app_id!r} starts with {app_id.split('/')[0]!r}, a path this server uses")
            self._endpoints[app_id] = Endpoint(app_id, app_of(app_id), WanT2VRequest, limits)
            self._endpoints[f"{app_id}/lora"] = Endpoint(f"{app_id}/lora", app_of(app_id), WanLoRAT2VRequest, limits)

    def get(self, endpoint_id: str) -> Endpoint | None:
        return self._endpoints.get(endpoint_id.strip("/"))

    def knows_app(self, app: str) -> bool:
        return any(e.app == app for e in self._endpoints.values())

    @property
    def ids(self) -> list[str]:
        return list(self._endpoints)

    def request_model(self, endpoint_id: str) -> type[WanT2VRequest]:
        endpoint = self.get(endpoint_id)
        if endpoint is None:
            raise KeyError(endpoint_id)
        return endpoint.request_model
