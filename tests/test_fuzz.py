"""Schema fuzzing of every route: schemathesis generates valid and invalid requests from the server's OpenAPI and
sends them to the app in-process (no worker). No answer may be a 5xx, none may hang, and every 4xx is JSON that
says why (a HEAD answer, which has no body, says it in `x-fal-error-type`).

The queue routes take their endpoint from a catch-all path (their input schemas are components of /openapi.json,
any of which the catch-all takes), so the fuzzed document also names the served endpoints, each with its own request
schema, and the request ids of a few real jobs: otherwise nearly every case would stop at a 404."""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.python import asgi

from wanserve.api.app import create_app
from wanserve.config import Settings
from wanserve.jobs.model import WorkerInfo
from wanserve.schema import WanLoRAT2VRequest, WanT2VRequest

SEED = 22_2022
EXAMPLES = 25  # per operation and generation mode: the whole run stays well under a minute on 2 cores
MIN_CASES = 900  # what this seed runs is 984 (fewer when an operation's inputs run out): guards against a no-op
HANG_S = 15.0  # the transport gives up on a request after this: a hang is a failure, not a stuck test
APP = "fal-ai/wan-22"


def error_has_reason(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Case) -> bool | None:
    """Every 4xx is JSON with a non-empty `detail` or `error_type` (HEAD: the `x-fal-error-type` header)."""
    if not 400 <= response.status_code < 500:
        return None
    if case.method.upper() == "HEAD":
        assert response.headers.get("x-fal-error-type"), f"HEAD {response.status_code} without x-fal-error-type"
        return None
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.startswith("application/json"), f"{response.status_code} answered as {content_type!r}"
    body = response.json()
    assert isinstance(body, dict) and (body.get("detail") or body.get("error_type")), (
        f"{response.status_code} without a reason: {response.text[:300]}"
    )
    return None


CHECKS = [not_a_server_error, error_has_reason]


def fuzzed_document(raw: dict[str, Any], queued: list[str], completed: list[str]) -> dict[str, Any]:
    """The server's OpenAPI plus the concrete queue routes of one app: submit (with the request schema of each
    endpoint); status, result and cancel of the known request ids (negative cases: any other id); the status stream
    of completed ones (a queued job's stream would rightly stay open: no worker runs it here)."""
    doc = copy.deepcopy(raw)
    assert {"WanT2VRequest", "WanLoRAT2VRequest"} <= doc["components"]["schemas"].keys()  # the server's own

    def request_id(known: list[str]) -> dict[str, Any]:
        # positive cases use these ids; negative ones, anything else (unknown ids: 404)
        return {"name": "request_id", "in": "path", "required": True, "schema": {"type": "string", "enum": known}}

    queue_headers = [
        {"name": "x-fal-queue-priority", "in": "header", "schema": {"type": "string", "enum": ["normal", "low"]}},
        {"name": "x-fal-request-timeout", "in": "header", "schema": {"type": "string"}},
        {"name": "x-fal-object-lifecycle-preference", "in": "header", "schema": {"type": "string"}},
    ]
    json_200 = {"200": {"description": "OK", "content": {"application/json": {"schema": {}}}}}
    for endpoint, model in ((APP, WanT2VRequest), (f"{APP}/lora", WanLoRAT2VRequest)):
        doc["paths"][f"/{endpoint}"] = {
            "post": {
                "operationId": f"submit_{endpoint.replace('/', '_')}",
                "parameters": queue_headers,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
                },
                "responses": json_200,
            }
        }
    base = f"/{APP}/requests/{{request_id}}"
    known = queued + completed
    doc["paths"][f"{base}/status"] = {
        "get": {
            "operationId": "fuzz_status",
            "parameters": [request_id(known), {"name": "logs", "in": "query", "schema": {"type": "string"}}],
            "responses": json_200,
        }
    }
    doc["paths"][f"{base}/status/stream"] = {
        "get": {"operationId": "fuzz_stream", "parameters": [request_id(completed)], "responses": json_200}
    }
    doc["paths"][base] = {
        "get": {"operationId": "fuzz_result", "parameters": [request_id(known)], "responses": json_200}
    }
    doc["paths"][f"{base}/cancel"] = {
        "put": {"operationId": "fuzz_cancel", "parameters": [request_id(known)], "responses": json_200}
    }
    # The catch-alls' inputs are fuzzed through the served endpoints above; through an endpoint id made up by the
    # fuzzer they would all stop at its 404, at twice the suite's fuzzing time.
    for path in ("/{endpoint}", "/run/{endpoint}"):
        for operation in doc["paths"][path].values():
            operation.pop("requestBody", None)
    return doc


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Any, dict[str, Any]]]:
    """The app with a ready (pretend) worker, one queued and one completed job; yields (app, document)."""
    app = create_app(Settings(data_dir=tmp_path / "data", public_url="http://testserver"), workers=0)
    ctx = app.state.context
    ctx.store.register_worker(WorkerInfo("fuzz-worker", True, time.time() + 3600))  # /ready answers 200
    queued = ctx.service.submit(APP, {"prompt": "a queued fox"}).id
    completed = ctx.service.submit(APP, {"prompt": "a cancelled fox"}).id
    ctx.service.cancel(APP, completed)
    try:
        yield app, fuzzed_document(app.openapi(), [queued], [completed])
    finally:
        asgi.shutdown_lifespans()  # the transport started the app's lifespan (its background loops)
        ctx.store.close()


class Run:
    """What the fuzzing saw: cases per operation and mode, answers by status, failures (all of them, not the first)."""

    def __init__(self) -> None:
        self.cases: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []

    def fuzz(self, operation: Any, mode: GenerationMode) -> None:
        label = f"{operation.label} [{mode.value}]"

        @seed(SEED)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: Case) -> None:
            self.cases[label] += 1
            try:
                response = case.call_and_validate(checks=CHECKS, timeout=HANG_S)
                self.statuses[response.status_code] += 1
            except FailureGroup as exc:
                self.failures.append(f"{label}: {exc}")
            except requests.Timeout:
                self.failures.append(f"{label}: no answer within {HANG_S:g} s: {case.as_curl_command()}")
            except Exception as exc:  # in-process, an unhandled error reaches the caller after its 500
                self.failures.append(f"{label}: the app raised {type(exc).__name__}: {exc}: {case.as_curl_command()}")

        with suppress(Unsatisfiable):  # no invalid request exists for these inputs (e.g. a free-text header only)
            fuzz()


def test_every_route_survives_schema_fuzzing(served: tuple[Any, dict[str, Any]]) -> None:
    app, document = served
    schema = schemathesis.openapi.from_dict(document)
    schema.app = app
    operations = [result.ok() for result in schema.get_all_operations()]  # ok(): none failed to load
    assert len(operations) == sum(len(item) for item in document["paths"].values()) > 6
    run = Run()
    for operation in operations:
        definition = document["paths"][operation.path][operation.method.lower()]
        run.fuzz(operation, GenerationMode.POSITIVE)
        if definition.get("parameters") or definition.get("requestBody"):
            run.fuzz(operation, GenerationMode.NEGATIVE)

    total = sum(run.cases.values())
    statuses = dict(sorted(run.statuses.items()))
    print(f"\nschema fuzzing: {total} cases over {len(operations)} operations (seed {SEED}); statuses {statuses}")
    assert not run.failures, f"{len(run.failures)} failing case(s):\n\n" + "\n\n".join(run.failures[:10])
    assert total >= MIN_CASES
    assert run.statuses[200] and run.statuses[202] and run.statuses[422] and run.statuses[404]  # routes reached
