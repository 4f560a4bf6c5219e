"""Webhooks: key persistence, signatures a receiver can verify from the JWKS alone, the fal payload and
delivery with persisted retries against a real local HTTP receiver."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi.testclient import TestClient
from file_server import running, serving, tls_http_server, tunnel_proxy

from wanserve.api.app import create_app
from wanserve.config import Settings
from wanserve.files.inputs import pinned_async_client
from wanserve.jobs.model import Failure, Job, JobState, NewJob, Priority
from wanserve.logsetup import OneLineFormatter
from wanserve.store.sqlite import SQLiteJobStore
from wanserve.webhooks import MAX_RETRY_DELAY_S, WebhookDispatcher, WebhookSigner, retry_delay, webhook_payload

# --- signer ---


def public_key_from_jwks(jwks: dict[str, Any]) -> Ed25519PublicKey:
    """What a receiver does: only the JWKS `x` (base64url, unpadded) is known."""
    (key,) = jwks["keys"]
    assert key["kty"] == "OKP" and key["crv"] == "Ed25519"
    x = key["x"]
    raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
    assert len(raw) == 32
    return Ed25519PublicKey.from_public_bytes(raw)


def verify(jwks: dict[str, Any], headers: dict[str, str], body: bytes) -> None:
    message = "\n".join(
        [
            headers["X-Fal-Webhook-Request-Id"],
            headers["X-Fal-Webhook-User-Id"],
            headers["X-Fal-Webhook-Timestamp"],
            hashlib.sha256(body).hexdigest(),
        ]
    ).encode()
    public_key_from_jwks(jwks).verify(bytes.fromhex(headers["X-Fal-Webhook-Signature"]), message)


def test_signer_persists_its_key(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "webhook.pem"
    first = WebhookSigner.load_or_create(path)
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = WebhookSigner.load_or_create(path)
    assert second.jwks() == first.jwks()
    assert second.key_id == first.key_id
    # a signature made before the restart verifies against the JWKS published after it
    body = b'{"a":1}'
    verify(second.jwks(), first.headers("req", "user", body, timestamp=1), body)
    other = WebhookSigner.load_or_create(tmp_path / "other.pem")
    assert other.jwks() != first.jwks()


def test_signer_key_is_private_even_over_a_stale_tmp_file(tmp_path: Path) -> None:
    path = tmp_path / "webhook.pem"
    stale = path.with_suffix(".tmp")  # what a crash between writing and renaming leaves
    stale.write_bytes(b"junk")
    stale.chmod(0o644)
    WebhookSigner.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_signer_rejects_a_non_ed25519_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = tmp_path / "ec.pem"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    with pytest.raises(ValueError, match="Ed25519"):
        WebhookSigner.load_or_create(path)


def test_headers_verify_with_the_jwks_and_fail_when_tampered(tmp_path: Path) -> None:
    signer = WebhookSigner.load_or_create(tmp_path / "k.pem")
    body = json.dumps({"request_id": "r-1", "status": "OK", "payload": {"x": "ü"}}).encode()
    before = int(time.time())
    headers = signer.headers("r-1", "user-42", body)
    assert set(headers) == {
        "X-Fal-Webhook-Request-Id",
        "X-Fal-Webhook-User-Id",
        "X-Fal-Webhook-Timestamp",
        "X-Fal-Webhook-Signature",
    }
    assert headers["X-Fal-Webhook-Request-Id"] == "r-1"
    assert headers["X-Fal-Webhook-User-Id"] == "user-42"
    assert before <= int(headers["X-Fal-Webhook-Timestamp"]) <= int(time.time())
    assert len(headers["X-Fal-Webhook-Signature"]) == 128  # 64 bytes, hex
    jwks = signer.jwks()
    verify(jwks, headers, body)
    with pytest.raises(InvalidSignature):
        verify(jwks, headers, body + b" ")
    for name, value in [
        ("X-Fal-Webhook-Request-Id", "r-2"),
        ("X-Fal-Webhook-User-Id", "user-43"),
        ("X-Fal-Webhook-Timestamp", str(int(headers["X-Fal-Webhook-Timestamp"]) + 1)),
    ]:
        with pytest.raises(InvalidSignature):
            verify(jwks, {**headers, name: value}, body)
    assert signer.headers("r-1", "u", b"", timestamp=1234)["X-Fal-Webhook-Timestamp"] == "1234"


# --- payload ---


def make_job(**kw: Any) -> Job:
    base: dict[str, Any] = dict(
        id="req-1",
        endpoint="fal-ai/wan-22/t2v",
        app="fal-ai/wan-22",
        input={"prompt": "p"},
        priority=Priority.NORMAL,
        state=JobState.COMPLETED,
        seq=1,
        created_at=0.0,
    )
    base.update(kw)
    return Job(**base)


def test_payload_success() -> None:
    output = {"video": {"url": "http://x/files/k/v.mp4"}, "seed": 3}
    assert webhook_payload(make_job(output=output)) == {
        "request_id": "req-1",
        "gateway_request_id": "req-1",
        "status": "OK",
        "payload": output,
        "error": None,
    }


def test_payload_failure() -> None:
    detail = {"detail": [{"loc": ["body", "num_frames"], "msg": "too many"}]}
    payload = webhook_payload(make_job(failure=Failure("bad_request", "too many", 422, detail)))
    assert payload == {
        "request_id": "req-1",
        "gateway_request_id": "req-1",
        "status": "ERROR",
        "payload": detail,
        "error": "Invalid status code: 422",
    }
    # without an explicit body the result body is the generic one the result endpoint answers with
    generic = webhook_payload(make_job(failure=Failure("request_timeout", "late", 504)))
    assert generic["status"] == "ERROR" and generic["error"] == "Invalid status code: 504"
    assert generic["payload"] == {"detail": "late", "error_type": "request_timeout"}
    json.dumps(payload)  # serialisable as sent


def test_the_default_retries_span_about_two_hours_as_fals_do() -> None:
    """FAL_PROTOCOL.md section 8: up to 10 retries over 2 h. A receiver down for an hour still gets the webhook."""
    s = Settings()
    delays = [retry_delay(n, s.webhook_retry_base_s) for n in range(1, s.webhook_max_attempts)]
    assert len(delays) == 10
    assert 1.9 * 3600 < sum(delays) < 2.2 * 3600
    assert sum(delays[:-1]) > 3600  # the last try comes more than an hour after the first


def test_retry_delay_doubles_and_caps() -> None:
    assert [retry_delay(n, 5.0) for n in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert retry_delay(0, 5.0) == 5.0
    assert retry_delay(30, 5.0) == MAX_RETRY_DELAY_S
    assert retry_delay(1000, 5.0) == MAX_RETRY_DELAY_S  # no overflow


# --- delivery against a real receiver ---


@dataclass
class Receiver:
    url: str
    status: list[int]  # answers, in order (the last one repeats)
    seen: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(url="", status=[200])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            rec.seen.append((self.path, dict(self.headers.items()), body))
            code = rec.status.pop(0) if len(rec.status) > 1 else rec.status[0]
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    rec.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteJobStore]:
    s = SQLiteJobStore(tmp_path / "jobs.sqlite")
    yield s
    s.close()


@pytest.fixture
def signer(tmp_path: Path) -> WebhookSigner:
    return WebhookSigner.load_or_create(tmp_path / "webhook.pem")


def finished_job(store: SQLiteJobStore, job_id: str, url: str, **finish: Any) -> None:
    now = time.time() - 1
    store.submit(NewJob(id=job_id, endpoint="fal-ai/wan-22", app="fal-ai/wan-22", input={}, webhook_url=url), now)
    assert store.finish(job_id, now, **finish)


def dispatcher(store: SQLiteJobStore, signer: WebhookSigner, **kw: Any) -> WebhookDispatcher:
    # The receivers here listen on loopback, which only an operator's allow_private_urls lets webhooks reach.
    opts: dict[str, Any] = dict(user_id="me", timeout_s=5.0, max_attempts=3, retry_base_s=0.05, allow_private=True)
    opts.update(kw)
    return WebhookDispatcher(store, signer, **opts)


def deliver(d: WebhookDispatcher) -> int:
    async def run() -> int:
        async with pinned_async_client(d.timeout_s) as client:  # the server's own
            started = await d.deliver_due(client)
            await d.drain()
            return started

    return asyncio.run(run())


def wait_until_due(store: SQLiteJobStore, timeout: float = 5.0) -> None:
    end = time.time() + timeout
    while not store.due_webhooks(time.time()):
        assert time.time() < end, "webhook never became due again"
        time.sleep(0.01)


def test_delivery_success_is_signed_and_marked_delivered(
    store: SQLiteJobStore, signer: WebhookSigner, receiver: Receiver
) -> None:
    output = {"video": {"url": "http://x/v.mp4"}}
    finished_job(store, "ok-1", receiver.url + "/hook?token=abc", output=output)
    d = dispatcher(store, signer)
    assert deliver(d) == 1
    assert len(receiver.seen) == 1
    path, headers, body = receiver.seen[0]
    assert path == "/hook?token=abc"
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {
        "request_id": "ok-1",
        "gateway_request_id": "ok-1",
        "status": "OK",
        "payload": output,
        "error": None,
    }
    assert headers["X-Fal-Webhook-User-Id"] == "me"
    verify(signer.jwks(), headers, body)  # over the exact bytes received
    assert store.due_webhooks(time.time() + 10_000) == []
    assert deliver(d) == 0
    assert len(receiver.seen) == 1


def test_failed_job_delivers_an_error_payload(store: SQLiteJobStore, signer: WebhookSigner, receiver: Receiver) -> None:
    finished_job(store, "bad-1", receiver.url, failure=Failure("bad_request", "nope", 422, {"detail": "nope"}))
    assert deliver(dispatcher(store, signer)) == 1
    sent = json.loads(receiver.seen[0][2])
    assert sent["status"] == "ERROR" and sent["error"] == "Invalid status code: 422"
    assert sent["payload"] == {"detail": "nope"}
    assert store.due_webhooks(time.time() + 10_000) == []


def test_receiver_error_is_retried_then_delivered(
    store: SQLiteJobStore, signer: WebhookSigner, receiver: Receiver
) -> None:
    receiver.status = [500, 200]
    finished_job(store, "r-1", receiver.url, output={})
    d = dispatcher(store, signer, retry_base_s=0.5)
    assert deliver(d) == 1
    (hook,) = store.due_webhooks(time.time() + 10)
    assert hook.attempts == 1
    assert time.time() < hook.next_attempt_at <= time.time() + 0.5
    assert deliver(d) == 0  # not due yet: no second request
    assert len(receiver.seen) == 1
    wait_until_due(store)
    assert deliver(d) == 1
    assert len(receiver.seen) == 2
    assert receiver.seen[0][2] == receiver.seen[1][2]  # the same payload again
    assert store.due_webhooks(time.time() + 10_000) == []


def test_gives_up_after_max_attempts(store: SQLiteJobStore, signer: WebhookSigner, receiver: Receiver) -> None:
    receiver.status = [500]
    finished_job(store, "g-1", receiver.url, output={})
    d = dispatcher(store, signer, max_attempts=3, retry_base_s=0.01)
    for attempt in range(1, 3):
        assert deliver(d) == 1
        (hook,) = store.due_webhooks(time.time() + 10)
        assert hook.attempts == attempt
        wait_until_due(store)
    assert deliver(d) == 1  # the third and last try
    assert len(receiver.seen) == 3
    assert store.due_webhooks(time.time() + 10_000) == []
    assert deliver(d) == 0
    assert len(receiver.seen) == 3


def test_unreachable_receiver_counts_as_a_failure(store: SQLiteJobStore, signer: WebhookSigner) -> None:
    finished_job(store, "u-1", "http://127.0.0.1:9/unreachable", output={})
    finished_job(store, "u-2", "http://[::1/broken-url", output={})  # passes the http(s) check at submit
    d = dispatcher(store, signer, max_attempts=2, retry_base_s=60)
    assert deliver(d) == 2
    hooks = store.due_webhooks(time.time() + 120)
    assert sorted((h.job_id, h.attempts) for h in hooks) == [("u-1", 1), ("u-2", 1)]
    assert all(h.next_attempt_at > time.time() + 30 for h in hooks)


def test_one_bad_receiver_does_not_block_the_others(
    store: SQLiteJobStore, signer: WebhookSigner, receiver: Receiver
) -> None:
    finished_job(store, "a", "http://[::1/broken-url", output={})
    finished_job(store, "b", receiver.url + "/b", output={})
    d = dispatcher(store, signer, max_attempts=1)
    assert deliver(d) == 2
    assert [p for p, _, _ in receiver.seen] == ["/b"]
    assert store.due_webhooks(time.time() + 10_000) == []  # b delivered, a given up


def test_delivery_to_a_private_address_is_given_up_without_a_request(
    store: SQLiteJobStore, signer: WebhookSigner, receiver: Receiver
) -> None:
    finished_job(store, "priv-1", receiver.url + "/hook")
    d = dispatcher(store, signer, allow_private=False)
    assert deliver(d) == 1
    assert receiver.seen == []
    assert store.due_webhooks(time.time() + 10**6) == []  # given up, not rescheduled


def test_a_host_that_does_not_resolve_is_retried_not_given_up(store: SQLiteJobStore, signer: WebhookSigner) -> None:
    finished_job(store, "dns-1", "http://no-such-host.invalid/hook")
    d = dispatcher(store, signer, allow_private=False)
    assert deliver(d) == 1
    (hook,) = store.due_webhooks(time.time() + 10**6)  # still pending, with a later attempt
    assert hook.attempts == 1 and hook.next_attempt_at > time.time()


def test_a_claimed_webhook_is_not_handed_out_again_while_in_flight(store: SQLiteJobStore) -> None:
    finished_job(store, "c-1", "http://hook.test/")
    now = time.time()
    assert len(store.claim_due_webhooks(now, hold_s=60)) == 1
    assert store.claim_due_webhooks(now + 1, hold_s=60) == []  # another loop or replica gets nothing
    (hook,) = store.claim_due_webhooks(now + 61, hold_s=60)  # a delivery that never reported is retried
    store.webhook_delivered(hook.id, now + 62)
    assert store.claim_due_webhooks(now + 10**6, hold_s=60) == []


def deliver_through(d: WebhookDispatcher, handler: Any) -> int:
    async def run() -> int:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            started = await d.deliver_due(client)
            await d.drain()
            return started

    return asyncio.run(run())


def test_a_webhook_to_an_internationalised_host_is_sent_with_its_ascii_name(
    store: SQLiteJobStore, signer: WebhookSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    public = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *_a, **_k: public)
    finished_job(store, "idn-1", "https://bücher.example/hook", output={})
    seen: list[httpx.Request] = []
    d = dispatcher(store, signer, allow_private=False)
    assert deliver_through(d, lambda request: seen.append(request) or httpx.Response(200)) == 1
    (request,) = seen
    assert request.url.host == "93.184.216.34"  # pinned to the checked address
    assert request.headers["host"] == "xn--bcher-kva.example"
    assert request.extensions["sni_hostname"] == "xn--bcher-kva.example"
    assert store.due_webhooks(time.time() + 10**6) == []  # delivered


@pytest.mark.parametrize("through", ["dispatcher", "server"])
def test_an_https_webhook_goes_through_the_environments_proxy_verified_for_its_host(
    store: SQLiteJobStore, signer: WebhookSigner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, through: str
) -> None:
    """HTTPS_PROXY: the proxy is asked to connect to the address checked for the webhook's host (pinned), and TLS is
    verified for the host's name. httpcore's tunnel would verify the certificate against the pinned address, and
    every HTTPS webhook through a proxy failed. `server`: the app's own delivery loop and client, from the submit."""
    received: list[str] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            received.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    tls_server, cert = tls_http_server(tmp_path, "hooks.example.test", Hook)
    port = tls_server.server_address[1]
    real = socket.getaddrinfo
    public = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]

    def resolving(host: str, *args: Any, **kwargs: Any) -> Any:
        return public if host == "hooks.example.test" else real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolving)
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    asked: list[str] = []
    url = f"https://hooks.example.test:{port}/hook"
    with running(tls_server), tunnel_proxy(port, asked) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy)
        if through == "dispatcher":
            finished_job(store, "proxied-1", url, output={})
            assert deliver(dispatcher(store, signer, allow_private=False)) == 1
        else:
            app = create_app(Settings(data_dir=tmp_path / "data", public_url="http://testserver"), workers=0)
            with TestClient(app) as client:
                submitted = client.post("/fal-ai/wan-22", params={"fal_webhook": url}, json={"prompt": "a fox"})
                store = app.state.context.store
                assert store.finish(submitted.json()["request_id"], time.time(), output={})
                deadline = time.monotonic() + 15
                while store.due_webhooks(time.time() + 10**6) and time.monotonic() < deadline:
                    time.sleep(0.05)
    assert asked == [f"CONNECT 93.184.216.34:{port} HTTP/1.1"]
    assert received == ["/hook"]
    assert store.due_webhooks(time.time() + 10**6) == []  # delivered


def test_an_unforeseen_error_in_a_delivery_counts_as_a_failed_try(store: SQLiteJobStore, signer: WebhookSigner) -> None:
    """Not an HTTP error: a bug, say. The webhook must be retried and in the end given up, never left pending for
    ever (which would also keep its job from ever being pruned)."""
    finished_job(store, "bug-1", "http://hook.test/", output={})

    def broken(_request: httpx.Request) -> httpx.Response:
        raise RuntimeError("something nobody expected")

    d = dispatcher(store, signer, max_attempts=2, retry_base_s=60)
    assert deliver_through(d, broken) == 1
    (hook,) = store.due_webhooks(time.time() + 120)
    assert hook.attempts == 1 and hook.next_attempt_at > time.time() + 30


def test_closing_lets_a_delivery_in_flight_finish_so_it_is_not_sent_again(
    store: SQLiteJobStore, signer: WebhookSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server stopping (a deploy) while a receiver is still answering: the answer is waited for and stored.
    Cancelled instead, the try would record nothing and the webhook go out again when its claim ran out."""
    public = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *_a, **_k: public)
    finished_job(store, "closing-1", "http://hook.test/", output={})
    answered: list[float] = []

    async def slow_receiver(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.5)
        answered.append(time.monotonic())
        return httpx.Response(200)

    async def run() -> None:
        d = dispatcher(store, signer, allow_private=False, timeout_s=5.0)
        async with httpx.AsyncClient(transport=httpx.MockTransport(slow_receiver)) as client:
            assert await d.deliver_due(client) == 1
            await asyncio.sleep(0.1)  # the POST is out, the receiver still working on it
            await d.close()

    asyncio.run(run())
    assert len(answered) == 1
    assert store.due_webhooks(time.time() + 10**6) == []  # delivered: nothing left to send again

    # A receiver that outlasts the delivery's own limit is cut off at that limit, not waited for without end.
    finished_job(store, "closing-2", "http://hook.test/", output={})

    async def hung_receiver(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(3600)
        return httpx.Response(200)

    async def run_hung() -> float:
        d = dispatcher(store, signer, allow_private=False, timeout_s=0.3)
        async with httpx.AsyncClient(transport=httpx.MockTransport(hung_receiver)) as client:
            assert await d.deliver_due(client) == 1
            started = time.monotonic()
            await d.close()
            return time.monotonic() - started

    assert asyncio.run(run_hung()) < 0.3 + 2.0 + 1.0
    (hook,) = store.due_webhooks(time.time() + 10**6)
    assert hook.job_id == "closing-2" and hook.attempts == 1  # a failed try, retried after the restart


def test_a_receiver_trickling_its_answer_fails_the_try_within_the_timeout(
    store: SQLiteJobStore, signer: WebhookSigner, caplog: pytest.LogCaptureFixture
) -> None:
    """httpx's timeout bounds each read alone: a receiver sending a byte now and then would hold a delivery past its
    claim, and another replica would send the webhook again. The whole try has the one limit."""

    class Trickle(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            try:
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + b"X-Pad: x\r\n" * 20 + b"\r\n":
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.05)  # each read well within the 1 s timeout, the status never done in time
            except OSError:
                pass

        def log_message(self, *args: object) -> None:
            pass

    with serving(Trickle) as url:
        finished_job(store, "slow-1", f"{url}/hook", output={})
        d = dispatcher(store, signer, timeout_s=1.0, retry_base_s=60)
        started = time.monotonic()
        assert deliver(d) == 1
        assert time.monotonic() - started < 3  # not the 20 s the answer takes
    hooks = store.due_webhooks(time.time() + 120)
    assert [(h.job_id, h.attempts) for h in hooks] == [("slow-1", 1)]  # a failed try, retried later
    assert "no complete answer within 1 s" in caplog.text


def test_a_receivers_answer_body_is_never_read(
    store: SQLiteJobStore, signer: WebhookSigner, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the status counts. A body read whole would let a receiver fill the API process's memory (a gzip bomb:
    1 MB on the wire, 1 GiB unpacked) or hold the try with an answer that never ends."""
    sent: list[int] = []

    class Endless(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            sent.append(0)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            chunk = gzip.compress(b"\0" * 2**20)
            try:
                for _ in range(10_000):
                    self.wfile.write(chunk)
                    sent[0] += len(chunk)
            except OSError:
                pass

        def log_message(self, *args: object) -> None:
            pass

    with serving(Endless) as url:
        finished_job(store, "bomb-1", f"{url}/hook", output={})
        d = dispatcher(store, signer, timeout_s=5.0, retry_base_s=60)
        assert deliver(d) == 1
        time.sleep(0.2)  # the receiver's writes stop once the connection is closed
        written = sent[0]
    assert store.due_webhooks(time.time() + 10**6) == []  # delivered, the 200 alone enough
    assert written < 2**30 // 100  # not the gigabytes the answer would take
    assert "bomb-1" not in caplog.text  # no failed try


def test_a_webhook_url_logged_is_quoted(
    store: SQLiteJobStore, signer: WebhookSigner, caplog: pytest.LogCaptureFixture
) -> None:
    """One stored before submits refused control characters still cannot write a line of its own into the log (the
    servers' one-line format escapes the rest of the message, the error that names the URL too)."""
    caplog.handler.setFormatter(OneLineFormatter("%(levelname)s %(message)s"))
    finished_job(store, "log-1", "http://127.0.0.1:9/x\n2030-01-01 FORGED line", output={})
    d = dispatcher(store, signer, timeout_s=1.0, retry_base_s=60)
    assert deliver(d) == 1
    assert "failed (try 1/3)" in caplog.text
    assert [line for line in caplog.text.splitlines() if "FORGED" in line and not line.startswith("WARNING ")] == []


def test_a_webhook_urls_query_and_credentials_stay_out_of_the_log(
    store: SQLiteJobStore, signer: WebhookSigner, caplog: pytest.LogCaptureFixture
) -> None:
    """Receivers often take a token in the URL; the log says where a delivery went, not with what."""
    finished_job(store, "secret-1", "http://user:pw@127.0.0.1:9/hook?token=SUPERSECRET", output={})
    finished_job(store, "secret-2", "http://127.0.0.1:9/hook?token=SUPERSECRET\n", output={})  # an invalid URL
    finished_job(store, "secret-3", "http://user:pw@127.0.0.1:99999/hook", output={})  # a port that does not parse
    finished_job(store, "secret-4", "http://127.0.0.1:9/services/T000/PATHSECRET", output={})  # Slack-style
    finished_job(store, "secret-5", "http://127.0.0.1:9/bot123:BOTSECRET/sendMessage", output={})  # Telegram-style
    d = dispatcher(store, signer, timeout_s=1.0, retry_base_s=60)
    assert deliver(d) == 5
    assert "to 'http://127.0.0.1:9/...?...' failed (try 1/3)" in caplog.text
    assert "to 'http://127.0.0.1:9/...' failed (try 1/3)" in caplog.text
    assert "SUPERSECRET" not in caplog.text and "pw" not in caplog.text
    assert "PATHSECRET" not in caplog.text and "BOTSECRET" not in caplog.text


def test_a_hung_name_lookup_fails_the_try_without_holding_a_worker_thread(
    store: SQLiteJobStore, signer: WebhookSigner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The lookup gives up at the try's limit on a thread of its own: the executor thread that asked (one of the few
    the store calls share) is free again at once, not when the resolver finally answers."""
    release = threading.Event()

    def hung_getaddrinfo(*args: Any, **kwargs: Any) -> Any:
        release.wait(10)
        raise socket.gaierror("gave up")

    monkeypatch.setattr("wanserve.files.inputs.socket.getaddrinfo", hung_getaddrinfo)
    finished_job(store, "dns-1", "https://hung-dns.example/hook", output={})
    d = dispatcher(store, signer, timeout_s=0.5, retry_base_s=60, allow_private=False)
    try:
        started = time.monotonic()
        assert deliver(d) == 1
        assert time.monotonic() - started < 3
        assert "no DNS answer for hung-dns.example within 0.5 s" in caplog.text
        (hook,) = store.due_webhooks(time.time() + 120)
        assert hook.attempts == 1  # a failed try, retried later
        assert [t.name for t in threading.enumerate() if t.name == "dns-lookup"]  # the lookup waits on its own
    finally:
        release.set()
