"""`/openapi.json`: FastAPI's schema of the routes, plus what the generic routes cannot declare themselves.

The submit, run and result routes take any endpoint id (`/{endpoint}`), so FastAPI sees a raw body and an
untyped answer there. The endpoints' input and output schemas (with the bounds this server adds to the hosted
one) are added here as components, and those routes point at them."""

from __future__ import annotations

import warnings
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from wanserve.schema import WanLoRAT2VRequest, WanT2VRequest, WanT2VResponse

HTTP_METHODS = ("get", "head", "post", "put", "patch", "delete", "options", "trace")
REF = "#/components/schemas/{model}"
INPUTS: tuple[type[BaseModel], ...] = (WanT2VRequest, WanLoRAT2VRequest)
INPUT_ROUTES = ("/{endpoint}", "/run/{endpoint}")  # POST: the body is one endpoint's input
OUTPUT_ROUTES = ("/run/{endpoint}", "/{app}/requests/{request_id}")  # 200: one endpoint's output


def install_openapi(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Duplicate Operation ID", UserWarning)
            schema = generate()  # cached by FastAPI: the edits below are in the cached schema
        _unique_operation_ids(schema)
        _add_endpoint_schemas(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _unique_operation_ids(schema: dict[str, Any]) -> None:
    """FastAPI names an operation `<function><path>_<method>` with a single method for a route that serves several
    (GET and HEAD of /files/, POST and GET of /run/): two operations under one id, the method picked by set order.
    Here each operation ends with its own method, so ids are unique and the same on every run."""
    for item in schema["paths"].values():
        for method, operation in item.items():
            base, _, suffix = str(operation.get("operationId", "")).rpartition("_")
            if base and suffix in HTTP_METHODS:
                operation["operationId"] = f"{base}_{method}"


def _add_endpoint_schemas(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    models: tuple[type[BaseModel], ...] = (*INPUTS, WanT2VResponse)
    for model in models:
        body = model.model_json_schema(ref_template=REF)
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    # anyOf, not oneOf: both inputs ignore fields they do not know, so every base request is also a valid LoRA one,
    # and a body valid under both would fail oneOf's "exactly one".
    inputs = {"anyOf": [{"$ref": REF.format(model=m.__name__)} for m in INPUTS]}
    for path in INPUT_ROUTES:
        operation = schema["paths"].get(path, {}).get("post")
        if operation is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": inputs}}}
    for path in OUTPUT_ROUTES:
        for operation in schema["paths"].get(path, {}).values():
            ok = operation.get("responses", {}).get("200")
            if ok is not None:
                ok["content"] = {"application/json": {"schema": {"$ref": REF.format(model=WanT2VResponse.__name__)}}}
