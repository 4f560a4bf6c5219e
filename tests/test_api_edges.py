"""Protocol edges of the API, in-process (no worker): what a stream carries while queued, submit-time webhook
checks, numbers too long for Python, proxy errors, unknown routes."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from jsonschema import Draft202012Validator
from starlette.testclient import TestClient

from wanserve.api.app import create_app
from wanserve.api.queue import status_events
from wanserve.config import Settings

APP = "fal-ai/wan-22"


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    return create_app(Settings(data_dir=tmp_path / "data", public_url="http://testserver"), workers=0)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def events(app: FastAPI, request_id: str, between: Any) -> list[dict[str, Any]]:
    """The first status-stream event, then `between()`, then the next one."""
    ctx = app.state.context

    async def read() -> list[dict[str, Any]]:
        stream = status_events(ctx, request_id, True)
        first = await anext(stream)
        between()
        second = await anext(stream)
        return [json.loads(event.decode().removeprefix("data: ")) for event in (first, second)]

    return asyncio.run(read())


def test_log_lines_written_while_queued_reach_the_stream(app: FastAPI, client: TestClient) -> None:
    """A queued status has no logs; the lines written meanwhile must come with the next event (JS concatenates the
    events' logs, so a skipped line is lost for a streaming client although a polling one sees it)."""
    request_id = client.post(f"/{APP}", json={"prompt": "a fox", "unknown_field": 1}).json()["request_id"]
    queued, cancelled = events(app, request_id, lambda: client.put(f"/{APP}/requests/{request_id}/cancel"))
    assert queued["status"] == "IN_QUEUE" and "logs" not in queued
    assert cancelled["status"] == "COMPLETED"
    streamed = [line["message"] for line in cancelled["logs"]]
    polled = client.get(f"/{APP}/requests/{request_id}/status", params={"logs": 1}).json()["logs"]
    assert streamed == [line["message"] for line in polled]
    assert streamed[0] == "Ignored unknown input fields: unknown_field"


def test_a_misspelt_lora_scale_is_named_in_the_log(client: TestClient) -> None:
    lora = {"path": "owner/style", "strength": 0.25}
    request_id = client.post(f"/{APP}/lora", json={"prompt": "a fox", "loras": [lora]}).json()["request_id"]
    client.put(f"/{APP}/requests/{request_id}/cancel")  # a queued request shows no logs
    logs = client.get(f"/{APP}/requests/{request_id}/status", params={"logs": 1}).json()["logs"]
    assert logs[0]["message"] == "Ignored unknown input fields: loras.0.strength"


def test_a_webhook_host_that_does_not_resolve_yet_is_accepted_a_private_one_is_not(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delivery checks the host again and retries; DNS failing at submit time must not lose the request."""

    def resolve(host: str, *_args: Any, **_kwargs: Any) -> Any:
        if host == "hooks.example.com":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 443))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    later = client.post(f"/{APP}", params={"fal_webhook": "https://hooks.example.com/h"}, json={"prompt": "a fox"})
    assert later.status_code == 200, later.text
    private = client.post(f"/{APP}", params={"fal_webhook": "https://intranet.example/h"}, json={"prompt": "a fox"})
    assert private.status_code == 400 and "private" in private.json()["detail"]


@pytest.mark.parametrize(
    "url",
    ["https://hooks.example.com/h\n2030-01-01 ERROR forged", "https://hooks.example.com/a b", "https://h.example/\x85"],
)
def test_a_webhook_url_with_a_blank_or_control_character_is_refused(client: TestClient, url: str) -> None:
    """urlsplit drops some of them silently, so the URL checked is not the one stored and logged at each try."""
    response = client.post(f"/{APP}", params={"fal_webhook": url}, json={"prompt": "a fox"})
    assert response.status_code == 400
    assert response.json()["detail"].startswith("fal_webhook has a blank or control character")


def test_a_hung_name_lookup_at_submit_is_given_up_and_the_request_accepted(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The webhook's and the LoRA URLs' hosts are looked up at submit within one time budget for the request (a hung
    resolver would otherwise hold the request, and an API thread, for as long as it takes, or for the budget once
    per URL); the delivery or download looks again."""
    release = threading.Event()
    lookups: list[str] = []

    def hung(host: str, *_args: Any, **_kwargs: Any) -> Any:
        lookups.append(host)
        release.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hung)
    monkeypatch.setattr("wanserve.files.inputs.SUBMIT_LOOKUP_S", 0.5)
    try:
        started = time.monotonic()
        hook = client.post(f"/{APP}", params={"fal_webhook": "https://hung.example/h"}, json={"prompt": "a fox"})
        assert hook.status_code == 200, hook.text
        assert time.monotonic() - started < 1.5  # the 0.5 s budget, not the resolver's 10 s
        loras = [{"path": f"https://hung{i}.example/l.safetensors"} for i in range(6)]
        lookups.clear()
        started = time.monotonic()
        with_loras = client.post(
            f"/{APP}/lora", params={"fal_webhook": "https://hung.example/h"}, json={"prompt": "a fox", "loras": loras}
        )
        assert with_loras.status_code == 200, with_loras.text
        # Seven hosts, one 0.5 s budget: the first lookup spends it, the others are left to the worker at once.
        assert time.monotonic() - started < 1.5 and len(lookups) == 1, lookups
    finally:
        release.set()


def test_an_integer_too_long_for_python_is_a_422_naming_its_field(client: TestClient) -> None:
    body = b'{"prompt": "a fox", "num_frames": ' + b"9" * 5000 + b"}"
    response = client.post(f"/{APP}", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert [error["loc"] for error in response.json()["detail"]] == [["body", "num_frames"]]


@pytest.mark.parametrize("target", [None, "https://evil.example/x"])
def test_proxy_errors_carry_the_error_type_header(client: TestClient, target: str | None) -> None:
    headers = {"x-fal-target-url": target} if target else {}
    response = client.post("/api/fal/proxy", json={}, headers=headers)
    assert response.status_code == 400
    assert response.headers["x-fal-error-type"] == response.json()["error_type"] == "bad_request"


def test_unknown_get_routes_are_404_and_the_jwks_is_also_where_fal_serves_it(client: TestClient) -> None:
    missing = client.get("/no/such/route")
    assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"
    assert client.get("/openapi.json").status_code == 200  # the framework's own routes still answer
    jwks = client.get("/.well-known/jwks.json").json()
    assert client.get("/rest/.well-known/jwks.json").json() == jwks
    proxied = client.get(
        "/api/fal/proxy", headers={"x-fal-target-url": "https://rest.alpha.fal.ai/.well-known/jwks.json"}
    )
    assert proxied.status_code == 200 and proxied.json() == jwks


def test_a_temporary_token_request_says_what_is_not_served(client: TestClient) -> None:
    """The clients' realtime and client-mode streams first POST rest.fal.ai/tokens/: a clear 404, not the queue's
    "unknown endpoint rest/tokens/", and no job."""
    queued = client.app.state.context.store.queued_count()  # type: ignore[attr-defined]
    for answer in (
        client.post("/rest/tokens/", json={"allowed_apps": ["wan-22"], "token_expiration": 120}),
        client.post("/api/fal/proxy", json={}, headers={"x-fal-target-url": "https://rest.alpha.fal.ai/tokens/"}),
    ):
        assert answer.status_code == 404 and answer.json()["error_type"] == "not_found", answer.text
        assert "temporary tokens are not issued here" in answer.json()["detail"]
    assert client.app.state.context.store.queued_count() == queued  # type: ignore[attr-defined]


def test_a_file_is_never_cached_past_its_expiry(client: TestClient) -> None:
    lifecycle = {"x-fal-object-lifecycle-preference": json.dumps({"expiration_duration_seconds": 60})}
    for headers, longest in (({}, 3600), (lifecycle, 60)):
        init = client.post("/rest/storage/upload/initiate", json={"file_name": "a.bin"}, headers=headers).json()
        assert client.put(init["upload_url"], content=b"bytes").status_code == 200
        cache_control = client.get(init["file_url"]).headers["cache-control"]
        scope, _, max_age = cache_control.partition(", max-age=")
        assert scope == "public" and longest - 5 <= int(max_age) <= longest, cache_control


def test_fal_max_queue_length_refuses_a_submit_to_a_longer_queue(client: TestClient) -> None:
    """fal's `fal_max_queue_length` query parameter: not queued (429, nothing created) when that many requests wait;
    never taken as an input field of a GET run."""
    for _ in range(2):
        assert client.post(f"/{APP}?fal_max_queue_length=5", json={"prompt": "a fox"}).status_code == 200
    refused = client.post(f"/{APP}?fal_max_queue_length=2", json={"prompt": "a fox"})
    assert refused.status_code == 429 and refused.json()["error_type"] == "queue_full"
    assert refused.headers["x-fal-error-type"] == "queue_full"
    assert client.app.state.context.store.queued_count() == 2  # type: ignore[attr-defined]
    for bad in ("-1", "two", "1e3", "9" * 40, "①", "²"):  # str.isdigit() accepts the last two; int() does not
        answer = client.post(f"/{APP}", params={"fal_max_queue_length": bad}, json={"prompt": "a fox"})
        assert answer.status_code == 400, bad
    assert client.post(f"/{APP}?fal_max_queue_length=3", json={"prompt": "a fox"}).status_code == 200


def test_a_run_whose_worker_died_every_time_is_not_answered_with_a_status_the_js_client_reposts(
    client: TestClient,
) -> None:
    """`runner_disconnected` is 503 in fal's spec, and the JS client posts a run again on 503 (a new job, which
    would kill its worker again, up to three more times): the run answers 500 with the same error type. The queue's
    result route keeps 503 (fetching a result again runs nothing)."""
    import threading
    import time

    from wanserve.jobs.model import disconnected_failure

    store = client.app.state.context.store  # type: ignore[attr-defined]

    def worker_dies() -> None:
        deadline = time.monotonic() + 10
        while (job := store.claim("w", 30, time.time())) is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        store.finish(job.id, time.time(), worker_id="w", failure=disconnected_failure(3))

    thread = threading.Thread(target=worker_dies)
    thread.start()
    response = client.post("/run/fal-ai/wan-22", json={"prompt": "a fox"})
    thread.join(10)
    assert response.status_code == 500 and response.json()["error_type"] == "runner_disconnected"
    assert response.headers["x-fal-error-type"] == "runner_disconnected"
    request_id = response.headers["x-fal-request-id"]
    again = client.get(f"/fal-ai/wan-22/requests/{request_id}")
    assert again.status_code == 503 and again.json()["error_type"] == "runner_disconnected"


def test_a_signed_url_expiry_that_is_not_a_number_is_not_a_500(client: TestClient) -> None:
    init = client.post("/rest/storage/upload/initiate", json={"content_type": "text/plain", "file_name": "a.txt"})
    assert client.put(init.json()["upload_url"], content=b"abc").status_code == 200
    url = init.json()["file_url"]
    for exp in ("²", "1" + "0" * 400, "9" * 5000):  # not a number; too big for a float; too long for int()
        answer = client.get(url, params={"exp": exp})
        assert answer.status_code < 500 and "Traceback" not in answer.text, exp


BIG = "1" * 5000  # past the 4,300 digits Python's int() converts


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (f"/{APP}?fal_max_queue_length={BIG}", {"prompt": "a fox"}),
        (f"/{APP}?fal_webhook=http://{BIG}/", {"prompt": "a fox"}),
        (f"/{APP}/lora", {"prompt": "a fox", "loras": [{"path": f"http://{BIG}/x.safetensors"}]}),
        (f"/files/aaaaaaaaaa/x?exp={BIG}&sig=ab", None),
    ],
)
def test_numbers_too_long_for_python_in_urls_and_query_values_are_never_a_500(
    client: TestClient, path: str, body: dict[str, Any] | None
) -> None:
    answer = client.get(path) if body is None else client.post(path, json=body)
    assert answer.status_code < 500 and "Traceback" not in answer.text, answer.text


def test_a_page_on_another_site_cannot_start_work_on_a_server_without_keys(tmp_path: Path) -> None:
    """A server at localhost with no API keys: a browser page elsewhere could post a form (text/plain, no CORS
    preflight) or load an image URL to start generations. Browsers mark such requests `Sec-Fetch-Site: cross-site`."""
    cross = {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}
    with TestClient(create_app(Settings(data_dir=tmp_path / "a", public_url="http://testserver"), workers=0)) as c:
        for answer in (
            c.post(f"/{APP}", content=b'{"prompt": "a fox"}', headers={**cross, "Content-Type": "text/plain"}),
            c.get(f"/run/{APP}", params={"prompt": "a fox"}, headers=cross),
            c.post("/rest/storage/upload/initiate", json={"content_type": "text/plain"}, headers=cross),
            c.post("/cdn/files/upload", content=b"x", headers=cross),
        ):
            assert answer.status_code == 403 and answer.json()["error_type"] == "forbidden", answer.text
        # Another port of the same host is the same site, not the same origin; an older browser sends only Origin.
        for headers in (
            {"Sec-Fetch-Site": "same-site", "Origin": "http://testserver:3000"},
            {"Origin": "http://testserver:3000"},
            {"Origin": "null"},
        ):
            form = {**headers, "Content-Type": "text/plain"}
            answer = c.post(f"/{APP}", content=b'{"prompt": "a fox"}', headers=form)
            assert answer.status_code == 403, (headers, answer.text)
        assert c.app.state.context.store.queued_count() == 0  # type: ignore[attr-defined]
        # an older browser on this server's own page (behind a proxy that ends TLS, too)
        for origin in ("http://testserver", "https://testserver"):
            assert c.post(f"/{APP}", json={"prompt": "a fox"}, headers={"Origin": origin}).status_code == 200
        # the same page's own origin (the playground), and clients that are not browsers, are served
        assert c.post(f"/{APP}", json={"prompt": "a fox"}, headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
        assert c.post(f"/{APP}", json={"prompt": "a fox"}).status_code == 200
    allowed = Settings(data_dir=tmp_path / "b", public_url="http://testserver", cors_origins=["https://evil.example"])
    with TestClient(create_app(allowed, workers=0)) as c:  # an origin the operator allowed
        assert c.post(f"/{APP}", json={"prompt": "a fox"}, headers=cross).status_code == 200


def test_openapi_carries_the_endpoints_input_and_output_schemas_with_their_bounds(client: TestClient) -> None:
    """The submit, run and result routes take any endpoint id, so their schemas are added: a client generated from
    /openapi.json knows the inputs, the bounds this server adds to the hosted ones, and the output."""
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    steps = schemas["WanT2VRequest"]["properties"]["num_inference_steps"]
    assert (steps["default"], steps["minimum"], steps["maximum"]) == (30, 1, 100)
    (seed, null) = schemas["WanT2VRequest"]["properties"]["seed"]["anyOf"]
    assert seed == {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1} and null == {"type": "null"}
    assert "loras" in schemas["WanLoRAT2VRequest"]["properties"]
    assert "loras" not in schemas["WanT2VRequest"]["properties"]
    assert schemas["LoRAWeight"]["required"] == ["path"]
    assert set(schemas["WanT2VResponse"]["required"]) >= {"video", "seed"}
    inputs = [{"$ref": "#/components/schemas/WanT2VRequest"}, {"$ref": "#/components/schemas/WanLoRAT2VRequest"}]
    for path in ("/{endpoint}", "/run/{endpoint}"):
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"anyOf": inputs}
    # What a client validating against the document sees: valid requests of either endpoint pass, bad ones do not
    # (a oneOf here refused every body: each one is valid under both inputs, which ignore unknown fields).
    validator = Draft202012Validator({**body, "components": document["components"]})
    lora = {"path": "https://x.test/a.safetensors", "scale": 0.5}
    for good in ({"prompt": "a fox"}, {"prompt": "a fox", "loras": [lora], "reverse_video": True}):
        assert list(validator.iter_errors(good)) == [], good
    for bad in ({}, {"prompt": "a fox", "num_inference_steps": 0}, {"prompt": "a fox", "resolution": "1080p"}):
        assert not validator.is_valid(bad), bad
    # The API key is a security scheme (an Authorization header parameter is ignored by OpenAPI tools), required
    # where the server checks it and nowhere else; a cancel answers 202.
    scheme = document["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "Authorization")
    assert document["paths"]["/{endpoint}"]["post"]["security"] == [{"apiKey": []}]
    assert "security" not in document["paths"]["/health"]["get"]
    cancel = document["paths"]["/{app}/requests/{request_id}/cancel"]["put"]["responses"]
    assert "202" in cancel and "200" not in cancel and "400" in cancel
    result = document["paths"]["/{app}/requests/{request_id}"]["get"]["responses"]["200"]
    assert result["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/WanT2VResponse"}
    refs = [value for value in _walk(document) if isinstance(value, str) and value.startswith("#/components/")]
    assert all(ref.removeprefix("#/components/schemas/") in schemas for ref in refs)  # every $ref resolves


def _walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _walk(child)


def test_the_store_read_threads_end_with_the_app(tmp_path: Path) -> None:
    """Each app has its own pool for store reads off the event loop: shut down with it, or every app a process
    makes (tests, reloads) would leave its threads behind."""
    app = create_app(Settings(data_dir=tmp_path / "data", public_url="http://testserver"), workers=0)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        assert app.state.context.store_reads.submit(lambda: 42).result(5) == 42
    with pytest.raises(RuntimeError, match="shutdown"):
        app.state.context.store_reads.submit(lambda: 42)


@pytest.mark.parametrize("stopping", [False, True])
def test_a_streamed_run_cut_off_by_the_servers_own_stop_is_not_cancelled(
    app: FastAPI, client: TestClient, stopping: bool
) -> None:
    """A caller hanging up on `/run/.../stream` cancels its request; the server cutting the stream off as it stops
    (uvicorn's graceful wait over) must not: the worker hands the request back, and it runs after the restart."""
    from wanserve.api.run import stream_run
    from wanserve.jobs.model import JobState

    ctx = app.state.context
    request_id = client.post(f"/{APP}", json={"prompt": "a fox"}).json()["request_id"]

    async def cut_off() -> None:
        stream = stream_run(ctx, ctx.store.get(request_id))
        assert b'"IN_QUEUE"' in await anext(stream)
        if stopping:
            app.state.begin_shutdown()  # what `wanserve serve` calls on SIGTERM
        await stream.aclose()  # the stream ends without its output

    asyncio.run(cut_off())
    job = ctx.store.get(request_id)
    if stopping:
        assert job.state is JobState.QUEUED and job.failure is None
    else:
        assert job.state is JobState.COMPLETED and job.failure.error_type == "client_cancelled"


def test_serve_tells_the_app_of_a_stop_signal_before_uvicorn_acts_on_it() -> None:
    import signal

    import uvicorn

    from wanserve.cli import _server_telling_the_app

    told: list[bool] = []
    server = _server_telling_the_app(uvicorn.Config(lambda *a: None), lambda: told.append(True))
    server.handle_exit(signal.SIGTERM, None)
    assert told == [True] and server.should_exit


def test_the_docs_page_serves_its_own_files_and_no_others(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and "https://" not in page.text  # nothing from a CDN
    assert '<script src="/docs/assets/swagger-ui-bundle.js">' in page.text
    script = client.get("/docs/assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert b"SwaggerUIBundle" in script.content
    # the package's other files (its Python code) are not served
    for name in ("core.py", "__init__.py", "%2E%2E%2Fcore.py"):
        assert client.get(f"/docs/assets/{name}").status_code == 404
    assert client.get("/redoc").status_code in (404, 405)  # not served: ReDoc fetches from its CDN
