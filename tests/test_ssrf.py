"""SSRF: every URL a request can name (a LoRA `path`, a `fal_webhook`, any downloaded input) is refused when it
reaches a loopback, private, link-local, metadata or otherwise non-public address, however the address is
spelled, whatever a DNS name resolves to, after any redirect, unless the operator allows private URLs. A checked
name is pinned to its checked address (DNS rebinding). Local LoRA paths never leave the operator's roots.

Unit level: the guards in wanserve.files.inputs, wanserve.lora.sources and wanserve.webhooks, with DNS simulated
by replacing socket.getaddrinfo. End to end: a real `wanserve serve` refuses such requests at submit, with no job
created."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from server import Server

import wanserve.files.inputs as inputs
from wanserve.config import Settings
from wanserve.errors import BadRequest, FieldError, InputFetchError, InputValidationError, LoraError, PrivateAddress
from wanserve.files.base import new_key
from wanserve.files.inputs import FetchPolicy, check_public_url, fetch_input, ipv4_literal, pin_public_url
from wanserve.files.local import LocalFileStore
from wanserve.jobs.endpoints import EndpointRegistry
from wanserve.jobs.model import NewJob
from wanserve.jobs.service import JobService
from wanserve.lora.sources import LoraResolver, check_lora_urls
from wanserve.schema import LoRAWeight
from wanserve.store.sqlite import SQLiteJobStore
from wanserve.webhooks import WebhookDispatcher, WebhookSigner

APP = "fal-ai/wan-22"
LORA_APP = f"{APP}/lora"

# Every way this suite knows to name a non-public address in a URL without DNS.
REFUSED_LITERALS = [
    # loopback
    "http://127.0.0.1/x",
    "http://127.8.9.10/x",
    "http://[::1]/x",
    "https://127.0.0.1:8443/x",
    "HTTP://127.0.0.1/x",
    # private (RFC 1918), shared (CGNAT), benchmarking
    "http://10.0.0.1/x",
    "http://172.16.0.1/x",
    "http://172.31.255.254/x",
    "http://192.168.1.1/x",
    "http://100.64.0.1/x",
    "http://198.18.0.1/x",
    # link-local and the cloud metadata service
    "http://169.254.1.1/x",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]/x",
    "http://[fd00:ec2::254]/latest/meta-data/",
    # unspecified, broadcast, multicast, reserved
    "http://0.0.0.0/x",
    "http://[::]/x",
    "http://255.255.255.255/x",
    "http://224.0.0.1/x",
    "http://240.0.0.1/x",
    "http://192.0.0.8/x",  # the IPv4 dummy address, which Python 3.11 counts as global
    "http://[::ffff:192.0.0.8]/x",
    "http://192.88.99.1/x",  # 6to4 relay anycast, SRv6 segment ids, IPv6 documentation: not in Python 3.11's tables
    "http://[5f00::1]/x",
    "http://[3fff:fff::1]/x",
    "http://[ff02::1]/x",
    # unique-local and (deprecated) site-local IPv6
    "http://[fc00::1]/x",
    "http://[fd12:3456:789a::1]/x",
    "http://[fec0::1]/x",
    # IPv4 inside IPv6: mapped, translated (SIIT), compatible, NAT64 (well-known and local-use), 6to4, Teredo
    "http://[::ffff:127.0.0.1]/x",
    "http://[::ffff:7f00:1]/x",
    "http://[::ffff:169.254.169.254]/x",
    "http://[::ffff:10.0.0.1]/x",
    "http://[::ffff:0:7f00:1]/x",
    "http://[::127.0.0.1]/x",
    "http://[::a9fe:a9fe]/x",
    "http://[64:ff9b::7f00:1]/x",
    "http://[64:ff9b::a9fe:a9fe]/x",
    "http://[64:ff9b:1::a00:1]/x",
    "http://[2002:7f00:1::]/x",
    "http://[2002:a9fe:a9fe::1]/x",
    "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/x",
    # decimal, octal, hexadecimal and short IPv4 spellings
    "http://2130706433/x",
    "http://0x7f.1/x",
    "http://017700000001/x",
    "http://0x7f000001/x",
    "http://0177.0.0.1/x",
    "http://0x7F.0.0.1/x",
    "http://127.1/x",
    "http://0/x",
    "http://2852039166/latest/meta-data/",  # 169.254.169.254
    "http://0xa9.0xfe.0xa9.0xfe/x",
    "http://0251.0376.0251.0376/x",
    "http://127.0.0.1./x",
    # userinfo that looks like a host
    "http://example.com@127.0.0.1/x",
    "http://8.8.8.8:80@127.0.0.1/x",
]

# Names resolved by the simulated DNS below.
DNS: dict[str, list[str]] = {
    "public.example.test": ["93.184.216.34"],
    "public6.example.test": ["2606:2800:220:1:248:1893:25c8:1946"],
    "internal.example.test": ["10.0.0.5"],
    "metadata.example.test": ["169.254.169.254"],
    "ec2v6.example.test": ["fd00:ec2::254"],
    "loop.example.test": ["127.0.0.1"],
    "loop6.example.test": ["::1"],
    "mixed.example.test": ["93.184.216.34", "192.168.0.10"],  # one private answer is enough
    "mapped.example.test": ["::ffff:10.0.0.1"],
    "nat64.example.test": ["64:ff9b::a9fe:a9fe"],
    "ula.example.test": ["fd00::1"],
    "zero.example.test": ["0.0.0.0"],
    "localhost": ["127.0.0.1", "::1"],
}
PRIVATE_NAMES = sorted(name for name in DNS if not name.startswith("public"))


def fake_getaddrinfo(table: dict[str, list[str]]) -> Callable[..., list[tuple[Any, ...]]]:
    """DNS answering from `table` only; numeric addresses (what a pinned connection asks for) as usual."""
    real = socket.getaddrinfo

    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if host not in table:
            with contextlib.suppress(ValueError):
                ipaddress.ip_address(host)
                return real(host, port, *args, **kwargs)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in table[host]
        ]

    return getaddrinfo


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    table = dict(DNS)
    monkeypatch.setattr(inputs.socket, "getaddrinfo", fake_getaddrinfo(table))
    return table


@pytest.fixture
def no_connections(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Records (and refuses) every outgoing TCP connection httpx would open."""
    attempts: list[object] = []

    def refuse(address: object, *args: object, **kwargs: object) -> None:
        attempts.append(address)
        raise OSError("connections are not allowed in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture
def files(tmp_path: Path) -> LocalFileStore:
    return LocalFileStore(tmp_path / "files", "http://127.0.0.1:1")


def resolver(tmp_path: Path, files: LocalFileStore, **settings: Any) -> LoraResolver:
    base: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "public_url": "http://127.0.0.1:1",
        "lora_download_timeout_s": 2.0,
        "hf_offline": True,
    }
    return LoraResolver(Settings(**{**base, **settings}), files)


# --- the address matrix: every guard refuses every spelling ---


@pytest.mark.parametrize("url", REFUSED_LITERALS)
def test_non_public_addresses_are_refused_by_every_guard(
    url: str, tmp_path: Path, files: LocalFileStore, no_connections: list[object]
) -> None:
    with pytest.raises(PrivateAddress, match="private or local address"):
        pin_public_url(url, allow_private=False)  # webhooks (at delivery) and every download hop
    with pytest.raises(PrivateAddress):
        check_public_url(url)  # webhooks at submit
    dest = tmp_path / "input.bin"
    with pytest.raises(PrivateAddress):
        fetch_input(url, dest, files, FetchPolicy(timeout_s=1.0))  # any URL input
    with pytest.raises(InputValidationError) as refused:
        check_lora_urls([LoRAWeight(path=url)], "http://127.0.0.1:1", allow_private=False)  # LoRAs at submit
    (detail,) = refused.value.errors
    assert detail["loc"] == ["body", "loras", 0, "path"] and "private or local address" in str(detail["msg"])
    assert not dest.exists() and no_connections == []
    # the operator's switch lets them through (nothing is checked, nothing pinned), except spellings httpx itself
    # cannot fetch (octal IPv4 parts): the fetch refuses those as invalid URLs (a 422 on the job, not a crash)
    check_lora_urls([LoRAWeight(path=url)], "http://127.0.0.1:1", allow_private=True)
    try:
        assert pin_public_url(url, allow_private=True).url == url
    except InputFetchError as exc:
        assert not isinstance(exc, PrivateAddress) and "not a valid URL" in str(exc)


@pytest.mark.parametrize(
    ("spelling", "address"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("192.168.257", "192.168.1.1"),
        ("0", "0.0.0.0"),
        ("127.0.0.1.", "127.0.0.1"),
        ("134744072", "8.8.8.8"),
        ("0x0000000000007f.1", "127.0.0.1"),  # leading zeros are not significant digits
        ("000000000000000177.1", "127.0.0.1"),
        ("4294967295", "255.255.255.255"),
    ],
)
def test_numeric_ipv4_spellings_are_read_as_inet_aton_reads_them(spelling: str, address: str) -> None:
    literal = ipv4_literal(spelling)
    assert literal is not None and str(literal) == address
    # and the system resolver (what httpx would use) agrees wherever it accepts the spelling
    with contextlib.suppress(socket.gaierror):
        assert socket.getaddrinfo(spelling, 80, proto=socket.IPPROTO_TCP)[0][4][0] == address


@pytest.mark.parametrize(
    "name",
    [
        *["example.com", "1.2.3.4.5", "256.1.1.1", "1.2.65536", "08.1.1.1", "0x1g.1", "", "4294967296", "0x100000000"],
        *["1" + "0" * 5000, "127.0." + "1" * 5000, "0x" + "f" * 5000, "0" + "7" * 5000],  # never int()'s ValueError
    ],
)
def test_names_that_are_not_numeric_addresses_go_to_dns(name: str) -> None:
    assert ipv4_literal(name) is None


def test_a_public_literal_is_pinned_as_is() -> None:
    target = pin_public_url("https://user:pw@8.8.8.8:8443/a?b=1", allow_private=False)
    assert target.url == "https://user:pw@8.8.8.8:8443/a?b=1"
    assert target.headers == {"Host": "8.8.8.8:8443"} and target.extensions == {"sni_hostname": "8.8.8.8"}
    decimal = pin_public_url("http://134744072/x", allow_private=False)
    assert decimal.url == "http://8.8.8.8/x" and decimal.headers == {"Host": "134744072"}


# --- DNS names: what they resolve to is what counts ---


@pytest.mark.parametrize("name", PRIVATE_NAMES)
def test_names_resolving_to_non_public_addresses_are_refused(
    name: str, dns: dict[str, list[str]], tmp_path: Path, files: LocalFileStore, no_connections: list[object]
) -> None:
    url = f"https://{name}/weights.safetensors"
    with pytest.raises(PrivateAddress, match=f"{name} resolves to a private or local address"):
        pin_public_url(url, allow_private=False)
    with pytest.raises(PrivateAddress):
        fetch_input(url, tmp_path / "in.bin", files, FetchPolicy(timeout_s=1.0))
    with pytest.raises(InputValidationError, match=r"loras\.0\.path"):
        check_lora_urls([LoRAWeight(path=url)], "http://127.0.0.1:1", allow_private=False)
    with pytest.raises(FieldError, match="private or local address") as refused:  # the worker's resolver
        resolver(tmp_path, files, allow_private_urls=False).uses([LoRAWeight(path=url)])
    assert refused.value.detail()["loc"] == ["body", "loras", 0, "path"]
    assert refused.value.error_type == "file_download_error"
    assert no_connections == []


def test_public_names_pass_and_are_pinned_to_the_checked_address(dns: dict[str, list[str]]) -> None:
    target = pin_public_url("https://public.example.test/w.safetensors?sig=1", allow_private=False)
    assert target.url == "https://93.184.216.34/w.safetensors?sig=1"
    assert target.headers == {"Host": "public.example.test"}
    assert target.extensions == {"sni_hostname": "public.example.test"}  # TLS checks the name, not the address
    v6 = pin_public_url("http://public6.example.test:8080/x", allow_private=False)
    assert v6.url == "http://[2606:2800:220:1:248:1893:25c8:1946]:8080/x"
    assert v6.headers == {"Host": "public6.example.test:8080"}
    check_lora_urls([LoRAWeight(path="https://public.example.test/w.safetensors")], "http://x", allow_private=False)


def test_at_submit_an_unresolvable_lora_host_is_left_to_the_worker_but_a_broken_url_is_not(
    dns: dict[str, list[str]],
) -> None:
    check_lora_urls([LoRAWeight(path="https://nowhere.example.test/w.safetensors")], "http://x", allow_private=False)
    with pytest.raises(InputValidationError) as refused:
        check_lora_urls(
            [
                LoRAWeight(path="style.safetensors"),
                LoRAWeight(path="http://[::1/x"),
                LoRAWeight(path="http://a:99999/"),
            ],
            "http://x",
            allow_private=True,
        )
    assert [e["loc"] for e in refused.value.errors] == [["body", "loras", 1, "path"], ["body", "loras", 2, "path"]]


def test_this_servers_own_file_urls_are_not_refused_although_on_loopback(
    files: LocalFileStore, tmp_path: Path, no_connections: list[object]
) -> None:
    key = new_key("style.safetensors")
    files.put(key, b"weights", "application/octet-stream", None, time.time())
    check_lora_urls([LoRAWeight(path=files.url(key))], files.public_url, allow_private=False)
    fetch_input(files.url(key), tmp_path / "own.bin", files, FetchPolicy())  # read from disk, no connection
    assert (tmp_path / "own.bin").read_bytes() == b"weights" and no_connections == []
    # the same host with anything but a stored-file path is a loopback URL like any other
    with pytest.raises(InputValidationError):
        check_lora_urls([LoRAWeight(path=files.public_url + "/files/../jobs")], files.public_url, allow_private=False)


# --- submit (in process): refused before a job exists ---


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[JobService, SQLiteJobStore]]:
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    yield JobService(store, EndpointRegistry([APP]), "http://127.0.0.1:1", allow_private_urls=False), store
    store.close()


@pytest.mark.parametrize("host", ["internal.example.test", "metadata.example.test", "loop6.example.test", "0x7f.1"])
def test_submit_refuses_private_lora_urls_and_webhooks_and_creates_no_job(
    host: str, dns: dict[str, list[str]], service: tuple[JobService, SQLiteJobStore]
) -> None:
    svc, store = service
    body = {"prompt": "a fox", "loras": [{"path": "owner/repo"}, {"path": f"http://{host}/w.safetensors"}]}
    with pytest.raises(InputValidationError) as refused:
        svc.submit(LORA_APP, body)
    assert [e["loc"] for e in refused.value.errors] == [["body", "loras", 1, "path"]]
    with pytest.raises(BadRequest, match=r"fal_webhook is refused: .*private or local address"):
        svc.submit(APP, {"prompt": "a fox"}, webhook_url=f"https://{host}/hook")
    assert sum(v for k, v in store.counts().items() if not k.startswith("outcome:")) == 0
    svc.submit(LORA_APP, {**body, "loras": body["loras"][:1]}, webhook_url="https://public.example.test/hook")
    assert store.counts()["IN_QUEUE"] == 1


# --- redirects: every hop is checked, and the first (public) hop is pinned ---


class _Hops(ThreadingHTTPServer):
    daemon_threads = True
    hits: Counter[str]
    redirect_to: str


@pytest.fixture
def hops() -> Iterator[_Hops]:
    """A loopback server standing in for a public host: /hop redirects to `redirect_to`, /secret is what a
    successful SSRF would read, /weights.safetensors is the legitimate file."""

    class Handler(BaseHTTPRequestHandler):
        server: _Hops

        def do_GET(self) -> None:
            self.server.hits[self.path] += 1
            if self.path == "/hop":
                self.send_response(302)
                self.send_header("Location", self.server.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = b"weights" if self.path == "/weights.safetensors" else b"secret"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    srv = _Hops(("127.0.0.1", 0), Handler)
    srv.hits = Counter()
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture
def cdn_is_public(monkeypatch: pytest.MonkeyPatch, dns: dict[str, list[str]]) -> list[str]:
    """`cdn.example.test` is a public host that (for this test) lives at 127.0.0.1: only that first hop is let
    through; every other host goes through the real check. Returns the hosts checked, in order."""
    real = inputs.check_public_host
    checked: list[str] = []

    def check(host: str, port: int, resolve_timeout_s: float | None = None) -> list[str]:
        checked.append(host)
        return ["127.0.0.1"] if host == "cdn.example.test" else real(host, port, resolve_timeout_s)

    monkeypatch.setattr(inputs, "check_public_host", check)
    return checked


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1:{port}/secret",
        "http://localhost:{port}/secret",
        "http://[::1]:{port}/secret",
        "http://2130706433:{port}/secret",
        "http://0x7f.1:{port}/secret",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[::ffff:127.0.0.1]:{port}/secret",
        "http://internal.example.test/secret",
        "//loop.example.test:{port}/secret",  # scheme-relative
    ],
)
def test_a_redirect_to_a_private_address_is_refused(
    location: str, hops: _Hops, cdn_is_public: list[str], tmp_path: Path, files: LocalFileStore
) -> None:
    port = hops.server_address[1]
    hops.redirect_to = location.format(port=port)
    dest = tmp_path / "in.bin"
    with pytest.raises(PrivateAddress, match="private or local address"):
        fetch_input(f"http://cdn.example.test:{port}/hop", dest, files, FetchPolicy(timeout_s=2.0))
    assert hops.hits == Counter({"/hop": 1}), "the redirect target must never be requested"
    assert cdn_is_public[0] == "cdn.example.test" and len(cdn_is_public) == 2
    assert not dest.exists()
    # the LoRA resolver downloads through the same guard
    with pytest.raises(PrivateAddress):
        resolver(tmp_path, files, allow_private_urls=False).resolve(f"http://cdn.example.test:{port}/hop")
    assert hops.hits["/secret"] == 0


def test_a_redirect_to_a_public_place_is_followed_and_pinned(
    hops: _Hops, cdn_is_public: list[str], tmp_path: Path, files: LocalFileStore
) -> None:
    port = hops.server_address[1]
    hops.redirect_to = f"http://cdn.example.test:{port}/weights.safetensors"
    fetch_input(f"http://cdn.example.test:{port}/hop", tmp_path / "in.bin", files, FetchPolicy(timeout_s=2.0))
    assert (tmp_path / "in.bin").read_bytes() == b"weights"
    assert cdn_is_public == ["cdn.example.test", "cdn.example.test"]


# --- DNS rebinding: the connection goes to the address that was checked ---


def _rebinding(monkeypatch: pytest.MonkeyPatch, host: str, port: int) -> list[str]:
    """`host` answers 127.0.0.1 (which this test counts as public) once, then 10.0.0.1 (or nothing)."""
    answers = [["127.0.0.1"], ["10.0.0.1"]]
    lookups: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(name: str, *args: Any, **kwargs: Any) -> Any:
        if name != host:
            return real(name, *args, **kwargs)
        lookups.append(name)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "gone")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers.pop(0)]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)  # httpx would resolve through this one too
    monkeypatch.setattr(inputs, "_is_public", lambda address: address == "127.0.0.1")
    return lookups


def test_a_download_connects_to_the_checked_address_not_a_second_dns_answer(
    hops: _Hops, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, files: LocalFileStore
) -> None:
    port = hops.server_address[1]
    lookups = _rebinding(monkeypatch, "rebind.example.test", port)
    dest = tmp_path / "in.bin"
    fetch_input(f"http://rebind.example.test:{port}/weights.safetensors", dest, files, FetchPolicy(timeout_s=2.0))
    assert dest.read_bytes() == b"weights"
    assert lookups == ["rebind.example.test"]  # one lookup: the check's; the connection reused its answer


def test_a_webhook_is_checked_again_at_delivery_and_posted_to_the_checked_address(
    hops: _Hops, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    port = hops.server_address[1]
    lookups = _rebinding(monkeypatch, "hooks.example.test", port)
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    signer = WebhookSigner.load_or_create(tmp_path / "key.pem")
    for job_id, url in (("pinned", f"http://hooks.example.test:{port}/hook"), ("private", "http://10.1.2.3/hook")):
        store.submit(NewJob(id=job_id, endpoint=APP, app=APP, input={}, webhook_url=url), time.time() - 1)
        assert store.finish(job_id, time.time() - 1, output={})
    dispatcher = WebhookDispatcher(
        store, signer, user_id="me", timeout_s=2.0, max_attempts=3, retry_base_s=60.0, allow_private=False
    )

    async def deliver() -> None:
        async with httpx.AsyncClient(follow_redirects=True) as client:  # even a lax client follows nothing
            await dispatcher.deliver_due(client)
            await dispatcher.drain()

    asyncio.run(deliver())
    assert hops.hits == Counter({"/hook": 1}) and lookups == ["hooks.example.test"]
    assert store.due_webhooks(time.time() + 10**6) == []  # one delivered, the private one given up for good
    store.close()


def test_a_webhook_receiver_redirecting_elsewhere_is_a_failed_delivery(
    hops: _Hops, cdn_is_public: list[str], tmp_path: Path
) -> None:
    port = hops.server_address[1]
    hops.redirect_to = f"http://127.0.0.1:{port}/secret"
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    store.submit(
        NewJob(id="r", endpoint=APP, app=APP, input={}, webhook_url=f"http://cdn.example.test:{port}/hop"), time.time()
    )
    assert store.finish("r", time.time(), output={})
    dispatcher = WebhookDispatcher(
        store,
        WebhookSigner.load_or_create(tmp_path / "key.pem"),
        user_id="me",
        timeout_s=2.0,
        max_attempts=3,
        retry_base_s=60.0,
    )

    async def deliver() -> None:
        async with httpx.AsyncClient(follow_redirects=True) as client:
            await dispatcher.deliver_due(client)
            await dispatcher.drain()

    asyncio.run(deliver())
    assert hops.hits == Counter({"/hop": 1})
    (hook,) = store.due_webhooks(time.time() + 10**6)
    assert hook.attempts == 1 and hook.next_attempt_at > time.time() + 30  # retried later, like any failure
    store.close()


# --- local LoRA paths stay inside the operator's roots ---


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """(the LoRA root, a folder outside it with a secret in it)."""
    root, outside = tmp_path / "loras", tmp_path / "outside"
    (root / "styles").mkdir(parents=True)
    outside.mkdir()
    (root / "styles" / "ink.safetensors").write_bytes(b"ink")
    (outside / "secret.safetensors").write_bytes(b"secret")
    (root / "escape.safetensors").symlink_to(outside / "secret.safetensors")
    (root / "escape-dir").symlink_to(outside)
    (root / "inside.safetensors").symlink_to(root / "styles" / "ink.safetensors")
    return root, outside


@pytest.mark.parametrize(
    "path",
    [
        "../outside/secret.safetensors",
        "styles/../../outside/secret.safetensors",
        "{outside}/secret.safetensors",
        "{root}/../outside/secret.safetensors",
        "file://{outside}/secret.safetensors",
        "file://{root}/%2e%2e/outside/secret.safetensors",
        "file://localhost{outside}/secret.safetensors",
        "escape.safetensors",  # a symlink pointing out
        "escape-dir/secret.safetensors",  # a path through a symlinked folder
        "{root}/escape-dir/secret.safetensors",
        "/etc/passwd",
        "/proc/self/environ",
        "file:///etc/shadow",
    ],
)
def test_local_lora_paths_cannot_escape_their_roots(
    path: str, roots: tuple[Path, Path], tmp_path: Path, files: LocalFileStore
) -> None:
    root, outside = roots
    spelled = path.format(root=root, outside=outside)
    lora = resolver(tmp_path, files, lora_roots=[root])
    with pytest.raises(LoraError, match="outside the folders LoRAs may be read from"):
        lora.resolve(spelled)
    with pytest.raises(LoraError, match="local LoRA paths are disabled"):
        resolver(tmp_path, files, lora_roots=[]).resolve(spelled)


def test_local_lora_paths_inside_the_roots_resolve(
    roots: tuple[Path, Path], tmp_path: Path, files: LocalFileStore
) -> None:
    root, _ = roots
    lora = resolver(tmp_path, files, lora_roots=[root])
    for path in ("styles/ink.safetensors", f"{root}/styles/ink.safetensors", "inside.safetensors"):
        assert lora.resolve(path).path == root / "styles" / "ink.safetensors"


# --- end to end: a real server refuses at submit, and no job is created ---


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    """An API-only server with the default policy (no private URLs). No worker: nothing here may run."""
    srv = Server(
        tmp_path_factory.mktemp("strict") / "data",
        model_cache,
        env={"WANSERVE_ALLOW_PRIVATE_URLS": "false", "WANSERVE_RATE_LIMIT_PER_S": "0"},  # many submits at once
        args=["--no-worker"],
    )
    srv.start(wait_ready=False)
    yield srv
    srv.stop()


def _jobs(server: Server) -> int:
    store = SQLiteJobStore(server.data_dir / "jobs.sqlite3")
    try:
        return sum(v for k, v in store.counts().items() if not k.startswith("outcome:"))
    finally:
        store.close()


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/x.safetensors",
        "http://127.0.0.1:9/x.safetensors",
        "http://localhost/x.safetensors",
        "http://2130706433/x.safetensors",
        "http://[::ffff:10.0.0.1]/x.safetensors",
        "https://[fd00:ec2::254]/x.safetensors",
    ],
)
def test_server_refuses_a_private_lora_url_at_submit(strict_server: Server, url: str) -> None:
    before = _jobs(strict_server)
    body = {"prompt": "a fox", "loras": [{"path": url}]}
    for route in (f"/{LORA_APP}", f"/run/{LORA_APP}"):  # queue and synchronous run
        response = httpx.post(strict_server.url + route, json=body, timeout=10)
        assert response.status_code == 422, response.text
        (detail,) = response.json()["detail"]
        assert detail["loc"] == ["body", "loras", 0, "path"]
        assert "private or local address" in detail["msg"] and "operator can allow private URLs" in detail["msg"]
    assert _jobs(strict_server) == before


@pytest.mark.parametrize(
    "hook", ["http://127.0.0.1:9/hook", "http://169.254.169.254/hook", "http://0x7f.1/hook", "http://[::1]/hook"]
)
def test_server_refuses_a_private_webhook_at_submit(strict_server: Server, hook: str) -> None:
    before = _jobs(strict_server)
    response = httpx.post(f"{strict_server.url}/{APP}", params={"fal_webhook": hook}, json={"prompt": "a fox"})
    assert response.status_code == 400, response.text
    assert "fal_webhook is refused" in response.json()["detail"]
    assert "private or local address" in response.json()["detail"]
    assert _jobs(strict_server) == before


def test_server_accepts_public_and_own_urls(strict_server: Server) -> None:
    """The guard does not over-refuse: a public address and this server's own stored file are queued."""
    before = _jobs(strict_server)
    upload = httpx.post(
        f"{strict_server.url}/rest/storage/upload/initiate",
        json={"file_name": "style.safetensors", "content_type": "application/octet-stream"},
    )
    assert upload.status_code == 200, upload.text
    # a public address, and this server's own file URL (on loopback, but read from disk)
    loras = [{"path": "http://93.184.216.34/x.safetensors"}, {"path": upload.json()["file_url"]}]
    response = httpx.post(
        f"{strict_server.url}/{LORA_APP}",
        params={"fal_webhook": "https://93.184.216.34/hook"},
        json={"prompt": "a fox", "loras": loras},
    )
    assert response.status_code == 200, response.text
    assert _jobs(strict_server) == before + 1
