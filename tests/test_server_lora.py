"""LoRA requests through the real server (`fal-ai/wan-22/lora`): sources, caching, isolation, bad LoRAs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fal_client
import httpx
import pytest
from file_server import FileServer, running_file_server
from lora_files import random_factors, write_musubi, write_wan
from server import CHEAP_INPUT, Server, run_request

from wanserve.client import WanserveClient
from wanserve.client.fal import use_wanserve
from wanserve.engine.tiny import TinyConfig, build_expert

APP = "fal-ai/wan-22"
LORA_APP = f"{APP}/lora"
# One step at 480p: only the high-noise expert runs, which makes "low"-only LoRAs observable as no change.
INPUT = {**CHEAP_INPUT, "seed": 42}


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LoRA files with the tiny experts' shapes (the `coarse` model has the same experts)."""
    folder = tmp_path_factory.mktemp("lora-root")
    expert = build_expert(TinyConfig())
    broken = dict(random_factors(expert, seed=9))
    (first, (a, b)) = next(iter(broken.items()))
    broken[first] = (a[:, :-1].contiguous(), b)  # one input column short
    return {
        "style": write_wan(folder / "style.safetensors", random_factors(expert, seed=1), alpha=8),
        "other": write_musubi(folder / "other.safetensors", random_factors(expert, seed=2), alpha=4),
        "broken": write_wan(folder / "broken.safetensors", broken),
    }


@pytest.fixture(scope="module")
def lora_server(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path, coarse_model: Path, loras: dict[str, Path]
) -> Iterator[Server]:
    srv = Server(
        tmp_path_factory.mktemp("lora-server") / "data",
        model_cache,
        env={
            "WANSERVE_LORA_ROOTS": str(loras["style"].parent),
            "WANSERVE_LORA_MAX_BYTES": str(1024**3),
            "WANSERVE_HF_OFFLINE": "true",
            "WANSERVE_MAX_LORAS": "3",
            # fine enough that a LoRA's change to the frames survives the encode (CRF 51 would quantize it away)
            "WANSERVE_VIDEO_CRF": "10",
        },
        args=["--model", str(coarse_model)],
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http() -> Iterator[FileServer]:
    with running_file_server() as server:
        yield server


@pytest.fixture(scope="module")
def base(lora_server: Server) -> bytes:
    """The video of INPUT without LoRAs, before any LoRA request ran."""
    return video(lora_server, INPUT, app=APP)[0]


def video(server: Server, body: dict[str, Any], app: str = LORA_APP) -> tuple[bytes, list[str]]:
    status, result, logs = run_request(server, app, body)
    assert result.status_code == 200, (result.text, status)
    return httpx.get(result.json()["video"]["url"], timeout=30).content, logs


def put_file(server: Server, path: Path) -> str:
    with WanserveClient(server.url) as client:
        return client.upload_file(path)


def test_lora_from_storage_local_and_url_isolated_and_cached(
    lora_server: Server, base: bytes, loras: dict[str, Path], http: FileServer
) -> None:
    # Through the official Python client: the file goes up through the storage API, the request names its URL.
    use_wanserve(lora_server.url)
    url = fal_client.upload_file(loras["style"])
    events: list[str] = []
    output = fal_client.subscribe(
        LORA_APP,
        arguments={**INPUT, "loras": [{"path": url, "scale": 1.0}]},
        with_logs=True,
        on_queue_update=lambda u: events.extend(log["message"] for log in getattr(u, "logs", None) or []),
    )
    styled = httpx.get(output["video"]["url"]).content
    assert styled != base
    assert any("LoRA 1/1" in e and "loaded into the high and low-noise experts" in e for e in events), events
    # isolation: the same request without the LoRA gives the very same video as before
    assert video(lora_server, INPUT)[0] == base
    # the same LoRA from an allowed local folder: same content, so the adapter is still in memory
    local, logs = video(lora_server, {**INPUT, "loras": [{"path": "style.safetensors"}]})
    assert local == styled
    assert any("already loaded in memory" in line for line in logs), logs
    # and from a URL: downloaded once, then from the disk cache
    http.files["/style.safetensors"] = loras["style"].read_bytes()
    body = {**INPUT, "loras": [{"path": http.url("/style.safetensors")}]}
    first, first_logs = video(lora_server, body)
    second, second_logs = video(lora_server, body)
    assert first == second == styled
    assert http.hits["/style.safetensors"] == 1
    assert any("downloaded" in line for line in first_logs), first_logs
    assert any("from the disk cache" in line for line in second_logs), second_logs


def test_scale_and_expert_choice_through_the_api(lora_server: Server, base: bytes) -> None:
    """(Scale 2 against scale 1 is checked on the engine, where it costs a fraction of a video.)"""
    style = {"path": "style.safetensors"}
    zero, _ = video(lora_server, {**INPUT, "loras": [{**style, "scale": 0}]})
    one, _ = video(lora_server, {**INPUT, "loras": [style]})
    assert zero == base and one != base
    # one step runs only the high-noise expert: a low-only LoRA cannot change it, a high-only one does
    low, _ = video(lora_server, {**INPUT, "loras": [{**style, "transformer": "low"}]})
    high, _ = video(lora_server, {**INPUT, "loras": [{**style, "transformer": "high"}]})
    assert low == base and high == one
    combined, _ = video(lora_server, {**INPUT, "loras": [style, {"path": "other.safetensors", "scale": 0.5}]})
    assert combined not in (base, one)


def failure(server: Server, lora: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    status, result, _ = run_request(server, LORA_APP, {**INPUT, "loras": [lora]})
    assert result.status_code == 422, result.text
    return status, result.json()


def test_bad_loras_fail_clearly_and_the_next_request_succeeds(
    lora_server: Server, http: FileServer, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a LoRA " * 50)
    http.claimed_sizes["/huge.safetensors"] = 2_000_000_000
    cases = [
        ({"path": "broken.safetensors"}, "invalid_lora", "does not fit layer blocks.0.attn1.to_q"),
        ({"path": put_file(lora_server, garbage)}, "invalid_lora", "not a valid safetensors file"),
        ({"path": http.url("/huge.safetensors")}, "file_download_error", "over the 1073741824-byte input limit"),
        ({"path": "../../etc/passwd.safetensors"}, "invalid_lora", "outside the folders"),
        ({"path": "/etc/hostname"}, "invalid_lora", "outside the folders"),
        ({"path": "someone/not-cached"}, "invalid_lora", "not in this server's Hugging Face cache"),
    ]
    for lora, error_type, fragment in cases:
        status, body = failure(lora_server, lora)
        assert status["error_type"] == error_type, (lora, status)
        (detail,) = body["detail"]
        assert detail["loc"] == ["body", "loras", 0, "path"] and detail["type"] == error_type
        assert fragment in detail["msg"] and fragment in status["error"], (fragment, detail)
        assert any("Failed: loras.0.path" in entry["message"] for entry in status["logs"])
    assert http.hits["/huge.safetensors"] == 1
    ok, _ = video(lora_server, {**INPUT, "loras": [{"path": "style.safetensors"}]})
    assert ok


def test_too_many_loras_are_refused_at_submit(lora_server: Server) -> None:
    body = {**INPUT, "loras": [{"path": "style.safetensors"}] * 4}
    response = httpx.post(f"{lora_server.url}/{LORA_APP}", json=body)
    assert response.status_code == 422
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", "loras"] and "at most 3 LoRAs" in detail["msg"]


def test_private_address_lora_url_is_refused_by_default(tmp_path: Path, model_cache: Path) -> None:
    """Refused at submit, before a job exists (the worker checks again when it downloads: tests/test_ssrf.py)."""
    strict = Server(tmp_path / "data", model_cache, env={"WANSERVE_ALLOW_PRIVATE_URLS": "false"}, args=["--no-worker"])
    strict.start(wait_ready=False)
    try:
        for url in ("http://127.0.0.1:9/x.safetensors", "http://169.254.169.254/latest/x.safetensors"):
            response = httpx.post(f"{strict.url}/{LORA_APP}", json={**INPUT, "loras": [{"path": url}]})
            assert response.status_code == 422, response.text
            (detail,) = response.json()["detail"]
            assert detail["loc"] == ["body", "loras", 0, "path"] and detail["type"] == "file_download_error"
            assert "private or local address" in detail["msg"]
    finally:
        strict.stop()
