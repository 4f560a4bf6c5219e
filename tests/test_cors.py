"""CORS: off by default (same origin only); with `cors_origins`, a page on a listed origin can do what the official
JS client does from a browser: preflighted calls with Authorization and x-fal-* headers, direct PUT uploads, and
reading the request id and error type of the answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from wanserve.api.app import create_app
from wanserve.config import Settings

APP_ORIGIN = "https://app.example"
KEY = "cors-key"


def preflight(client: TestClient, url: str, method: str, origin: str = APP_ORIGIN) -> dict[str, str]:
    response = client.options(
        url,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization,content-type,x-fal-queue-priority",
        },
    )
    return {"status": str(response.status_code), **{k.lower(): v for k, v in response.headers.items()}}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path, public_url="http://testserver", api_keys=[KEY], cors_origins=[APP_ORIGIN])
    with TestClient(create_app(settings, workers=0)) as c:
        yield c


def test_a_listed_origin_can_submit_upload_and_read_the_answers(client: TestClient) -> None:
    allowed = preflight(client, "/fal-ai/wan-22", "POST")
    assert allowed["status"] == "200" and allowed["access-control-allow-origin"] == APP_ORIGIN
    assert "authorization" in allowed["access-control-allow-headers"].lower()
    assert "x-fal-queue-priority" in allowed["access-control-allow-headers"].lower()
    submitted = client.post(
        "/fal-ai/wan-22", json={"prompt": "a fox"}, headers={"Origin": APP_ORIGIN, "Authorization": f"Key {KEY}"}
    )
    assert submitted.status_code == 200 and submitted.headers["access-control-allow-origin"] == APP_ORIGIN
    # errors carry the headers too, or the page could not read why it was refused
    refused = client.post("/fal-ai/wan-22", json={"prompt": "a fox"}, headers={"Origin": APP_ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "x-fal-error-type" in refused.headers["access-control-expose-headers"].lower()
    # the JS client PUTs the bytes straight to the signed upload URL
    initiated = client.post(
        "/rest/storage/upload/initiate",
        json={"content_type": "image/png", "file_name": "a.png"},
        headers={"Origin": APP_ORIGIN, "Authorization": f"Key {KEY}"},
    ).json()
    upload_path = initiated["upload_url"].removeprefix("http://testserver")
    assert preflight(client, upload_path, "PUT")["access-control-allow-origin"] == APP_ORIGIN
    put = client.put(upload_path, content=b"png", headers={"Origin": APP_ORIGIN, "content-type": "image/png"})
    assert put.status_code == 200 and put.headers["access-control-allow-origin"] == APP_ORIGIN


def test_other_origins_get_no_cors_headers(client: TestClient) -> None:
    assert "access-control-allow-origin" not in preflight(client, "/fal-ai/wan-22", "POST", "https://evil.example")
    answer = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in answer.headers


def test_cors_is_off_by_default(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, public_url="http://testserver", api_keys=[KEY])
    assert settings.cors_origins == []
    assert Settings(cors_origins="https://a.example, https://b.example").cors_origins == [  # type: ignore[arg-type]
        "https://a.example",
        "https://b.example",
    ]
    with TestClient(create_app(settings, workers=0)) as c:
        answer = preflight(c, "/fal-ai/wan-22", "POST")
        assert "access-control-allow-origin" not in answer


def test_an_unexpected_error_carries_the_cors_headers_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Starlette answers an unhandled error outside CORSMiddleware: the page must still read the 500's body."""
    settings = Settings(data_dir=tmp_path, public_url="http://testserver", api_keys=[KEY], cors_origins=[APP_ORIGIN])
    with TestClient(create_app(settings, workers=0), raise_server_exceptions=False) as client:

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(client.app.state.context.store, "counts", broken)  # type: ignore[attr-defined]
        monkeypatch.setattr(client.app.state.context.store, "get", broken)  # type: ignore[attr-defined]
        headers = {"Origin": APP_ORIGIN, "Authorization": f"Key {KEY}"}
        answer = client.get("/fal-ai/wan-22/requests/abc/status", headers=headers)
        assert answer.status_code == 500 and answer.json()["error_type"] == "internal_error"
        assert answer.headers["access-control-allow-origin"] == APP_ORIGIN
        assert "x-fal-error-type" in answer.headers["access-control-expose-headers"]
        other = client.get("/fal-ai/wan-22/requests/abc/status", headers={**headers, "Origin": "https://evil.example"})
        assert other.status_code == 500 and "access-control-allow-origin" not in other.headers
