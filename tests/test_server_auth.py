"""API keys: on by default off loopback (a key is generated), checked on every API route; files need the signed
URLs the API hands out instead."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import fal_client
import fal_client.client as fal_module
import httpx
import pytest
from js_client import run_js_suite
from server import CHEAP_INPUT, Server

from wanserve.client.fal import use_wanserve

APP = "fal-ai/wan-22"


@pytest.fixture(scope="module")
def open_host_server(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path, coarse_model: Path
) -> Iterator[Server]:
    srv = Server(
        tmp_path_factory.mktemp("auth") / "data",
        model_cache,
        args=["--host", "0.0.0.0", "--model", str(coarse_model)],  # the cheaper tiny variant: one video is made
        env={"WANSERVE_ALLOW_PRIVATE_URLS": "false"},  # the default of a real deployment
    ).start()
    yield srv
    srv.stop()


def test_a_server_reachable_from_the_network_requires_its_generated_key(open_host_server: Server) -> None:
    srv = open_host_server
    key_file = srv.data_dir / "api-key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text().strip()
    assert len(key) >= 32
    # With no public URL, the URLs it hands out reach only this machine: the start says so, and what to set.
    start_log = srv.log_path.read_text()
    assert "listening on all addresses (0.0.0.0) with no public URL" in start_log
    assert "set --public-url (WANSERVE_PUBLIC_URL)" in start_log

    missing = httpx.post(f"{srv.url}/{APP}", json=CHEAP_INPUT)
    assert missing.status_code == 401 and missing.json()["error_type"] == "unauthorized"
    assert "Authorization: Key" in missing.json()["detail"]
    wrong = httpx.post(f"{srv.url}/{APP}", json=CHEAP_INPUT, headers={"Authorization": f"Key {key[:-1]}x"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "Invalid API key"
    for method, path in [
        ("GET", f"/{APP}/requests/x/status"),
        ("PUT", f"/{APP}/requests/x/cancel"),
        ("POST", "/rest/storage/upload/initiate"),
        ("POST", "/rest/storage/auth/token"),
        ("POST", "/cdn/files/upload"),
        ("POST", f"/run/{APP}"),
    ]:
        assert httpx.request(method, srv.url + path, json={}).status_code == 401, path
    proxied = httpx.post(
        f"{srv.url}/api/fal/proxy", json=CHEAP_INPUT, headers={"x-fal-target-url": f"https://queue.fal.run/{APP}"}
    )
    assert proxied.status_code == 401
    # Open routes: health and readiness for load balancers and the JWKS (stored files: by signed URL).
    for path in ("/health", "/ready", "/.well-known/jwks.json"):
        assert httpx.get(srv.url + path).status_code == 200, path
    # Readiness without a key says whether and which workers are ready, not their hosts or running requests.
    anonymous = httpx.get(f"{srv.url}/ready").json()
    assert anonymous == {"ready": True, "ready_workers": 1}
    keyed = httpx.get(f"{srv.url}/ready", headers={"Authorization": f"Key {key}"}).json()
    assert keyed["ready_workers"] == 1 and [w["id"] for w in keyed["details"]] == keyed["workers"]
    assert "host" in keyed["details"][0]

    ok = httpx.post(f"{srv.url}/{APP}", json=CHEAP_INPUT, headers={"Authorization": f"Key {key}"})
    assert ok.status_code == 200
    cancel = httpx.put(ok.json()["cancel_url"], headers={"Authorization": f"Key {key}"})
    assert cancel.status_code == 202


def test_the_official_client_with_a_key(
    open_host_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = (open_host_server.data_dir / "api-key").read_text().strip()
    monkeypatch.setenv("FAL_KEY", "restored-after-the-test")
    use_wanserve(open_host_server.url, key=key)
    # An upload through the CDN flow: the upload token is checked, then the file is public by URL.
    path = tmp_path / "note.txt"
    path.write_text("keyed upload")
    url = fal_client.upload_file(path)
    assert httpx.get(url).text == "keyed upload"
    # A multipart upload (over 100 MB; the threshold lowered here): fal-client returns the URL the upload started
    # with, which must download like any other.
    monkeypatch.setattr(fal_module, "MULTIPART_THRESHOLD", 1000)
    monkeypatch.setattr(fal_module, "MULTIPART_CHUNK_SIZE", 700)
    data = bytes(range(256)) * 10
    multipart_url = fal_client.upload(data, "application/octet-stream", "blob.bin")
    assert httpx.get(multipart_url).content == data
    handle = fal_client.submit(APP, arguments=CHEAP_INPUT)
    handle.cancel()
    use_wanserve(open_host_server.url, key="wrong")
    with pytest.raises(fal_client.FalClientHTTPError) as err:
        fal_client.submit(APP, arguments=CHEAP_INPUT)
    assert err.value.status_code == 401
    # Without `key`: WANSERVE_KEY, never a FAL_KEY meant for fal's hosted service.
    monkeypatch.setenv("FAL_KEY", "a-key-for-fal-ai-itself")
    monkeypatch.setenv("WANSERVE_KEY", key)
    use_wanserve(open_host_server.url)
    fal_client.submit(APP, arguments=CHEAP_INPUT).cancel()
    monkeypatch.delenv("WANSERVE_KEY")
    monkeypatch.setenv("FAL_KEY", "a-key-for-fal-ai-itself")
    use_wanserve(open_host_server.url)
    assert os.environ["FAL_KEY"] == "wanserve"  # the placeholder: the hosted key stays home


def test_the_official_client_downloads_its_result_by_signed_url(
    open_host_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = (open_host_server.data_dir / "api-key").read_text().strip()
    monkeypatch.setenv("FAL_KEY", "restored-after-the-test")
    use_wanserve(open_host_server.url, key=key)
    result = fal_client.subscribe(APP, arguments=CHEAP_INPUT)
    url = result["video"]["url"]
    assert "?exp=" in url and "&sig=" in url
    video = httpx.get(url)  # a plain GET, as the clients and browsers download
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4" and len(video.content) > 0
    unsigned = httpx.get(url.split("?")[0])
    assert unsigned.status_code == 403 and unsigned.json()["error_type"] == "forbidden"


def test_webhooks_to_private_addresses_are_refused_by_default(open_host_server: Server) -> None:
    key = (open_host_server.data_dir / "api-key").read_text().strip()
    targets = (
        "http://127.0.0.1:9/hook",
        "http://169.254.169.254/latest",
        "http://localhost/x",
        "http://[::1",
        "http://a..b/",
    )
    for target in targets:
        response = httpx.post(
            f"{open_host_server.url}/{APP}",
            json=CHEAP_INPUT,
            params={"fal_webhook": target},
            headers={"Authorization": f"Key {key}"},
        )
        assert response.status_code == 400, target
        assert "refused" in response.json()["detail"]


def test_the_official_js_client_works_with_its_key(open_host_server: Server) -> None:
    """@fal-ai/client configured with `credentials` (sent as `Authorization: Key`) against a server that requires
    one: validation errors, a plain download of an uploaded file's (signed) URL, and a generation end to end."""
    key = (open_host_server.data_dir / "api-key").read_text().strip()
    wanted = [
        "422: subscribe rejects with ValidationError naming num_frames",
        "storage.upload returns a URL that serves exactly the uploaded bytes",
        "queue.submit / status / result",
    ]
    output = run_js_suite(open_host_server.url, key=key, only="|".join(re.escape(name) for name in wanted))
    for name in wanted:
        assert re.search(rf"✔ {re.escape(name)}", output), output
