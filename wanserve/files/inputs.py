"""File inputs given as URLs (LoRA weights, images): our own stored files are read locally, data URIs
decode, and anything else is downloaded with a size cap, a time limit and no access to private,
loopback or link-local addresses unless the operator allows it."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import SplitResult, unquote_to_bytes, urljoin, urlsplit, urlunsplit

import httpcore
import httpx
from httpx._utils import get_environment_proxies  # what httpx's own clients mount

from wanserve.errors import InputFetchError, PrivateAddress
from wanserve.files.base import FileStore
from wanserve.logsetup import loggable_file_url
from wanserve.numbers import ascii_int

MAX_REDIRECTS = 5


class HostNotResolved(InputFetchError):
    """The URL's host name does not resolve (now): DNS may answer later, unlike for a private address."""


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int = 2 * 1024**3
    timeout_s: float = 120.0
    allow_private: bool = False


# IPv6 prefixes whose last 32 bits are an IPv4 address the packet reaches (or may reach) through translation
EMBEDS_IPV4 = (
    ipaddress.ip_network("64:ff9b::/96"),  # well-known NAT64 prefix (RFC 6052)
    ipaddress.ip_network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT, RFC 2765)
    ipaddress.ip_network("::/96"),  # IPv4-compatible (deprecated; still routed by some stacks)
)
NEVER_PUBLIC = (
    ipaddress.ip_network("64:ff9b:1::/48"),  # local-use NAT64 (RFC 8215): a site's own translator
    ipaddress.ip_network("fec0::/10"),  # site-local (deprecated, but still routed on some networks)
    ipaddress.ip_network("192.0.0.8/32"),  # IPv4 dummy address (RFC 7600), which Python 3.11 counts as global
    # Not globally reachable in IANA's registries, yet newer than Python 3.11's tables, which count them as global:
    ipaddress.ip_network("192.88.99.0/24"),  # 6to4 relay anycast (deprecated, RFC 7526): the nearest relay, maybe ours
    ipaddress.ip_network("5f00::/16"),  # SRv6 segment identifiers (RFC 9602): a provider's own network
    ipaddress.ip_network("3fff::/20"),  # documentation (RFC 9637)
)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address reaches through a translation mechanism (mapped, 6to4, NAT64, SIIT,
    IPv4-compatible, Teredo)."""
    found = [v4 for v4 in (ip.ipv4_mapped, ip.sixtofour) if v4 is not None]
    if any(ip in net for net in EMBEDS_IPV4):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.teredo is not None:
        found.extend(ip.teredo)
    return found


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if any(ip in net for net in NEVER_PUBLIC):  # (a network of the other IP version contains no address)
        return False
    if isinstance(ip, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(ip)):
        return all(_is_public(str(v4)) for v4 in embedded)
    return ip.is_global and not ip.is_multicast


_IPV4_PART = re.compile(r"0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*")


def _ipv4_part(part: str) -> int:
    """One dotted part's value; 2**32 for one with more significant digits than 32 bits hold (inet_aton refuses
    it; Python's int() would even raise past 4,300 digits)."""
    if part[:2].lower() == "0x":
        digits, base, most = part[2:].lstrip("0"), 16, 8
    elif part.startswith("0"):
        digits, base, most = part.lstrip("0"), 8, 11
    else:
        digits, base, most = part, 10, 10
    return int(digits or "0", base) if len(digits) <= most else 1 << 32


def ipv4_literal(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a host name spells the way `inet_aton` (and so `getaddrinfo`) or a browser reads it:
    `2130706433`, `0x7f.1`, `017700000001`, `127.1`, `127.0.0.1.`... None when it is not such a spelling.
    Read here rather than left to the resolver, so the check never depends on which resolver runs."""
    parts = host.removesuffix(".").split(".")
    if not 1 <= len(parts) <= 4 or not all(_IPV4_PART.fullmatch(part) for part in parts):
        return None
    *leading, last = [_ipv4_part(part) for part in parts]
    if any(v > 0xFF for v in leading) or last >= 1 << (8 * (4 - len(leading))):
        return None
    number = last
    for i, v in enumerate(leading):
        number |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def _getaddrinfo(host: str, port: int, timeout_s: float | None) -> list[Any]:
    """socket.getaddrinfo, given up after `timeout_s` (None: as long as the resolver takes). The system resolver
    has no timeout of its own to pass (its retries can take tens of seconds), so the lookup runs on a thread that
    is left to finish on its own."""
    if timeout_s is None:
        return socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    if timeout_s <= 0:  # a budget already spent (one submit's lookups share one): no thread for a lookup never read
        raise HostNotResolved(f"no time left to look {host[:100]} up")
    answers: list[Any] = []

    def lookup() -> None:
        try:
            answers.append(socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP))
        except BaseException as exc:  # handed to the caller
            answers.append(exc)

    thread = threading.Thread(target=lookup, name="dns-lookup", daemon=True)
    thread.start()
    thread.join(max(timeout_s, 0.0))
    if not answers:
        raise HostNotResolved(f"no DNS answer for {host[:100]} within {timeout_s:.3g} s")
    if isinstance(answers[0], BaseException):
        raise answers[0]
    return list(answers[0])


def check_public_host(host: str, port: int, resolve_timeout_s: float | None = None) -> list[str]:
    """Refuses a host that is, or resolves to, anything but public unicast addresses; returns the addresses."""
    literal = ipv4_literal(host)
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            infos = _getaddrinfo(host, port, resolve_timeout_s)
        except socket.gaierror as exc:
            raise HostNotResolved(f"cannot resolve {host[:100]}: {exc}") from None
        except UnicodeError as exc:  # a label IDNA cannot encode (empty, too long): no DNS answer will ever come
            raise InputFetchError(f"not a valid host name: {host[:100]} ({exc})") from None
        addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise HostNotResolved(f"cannot resolve {host[:100]}: no address")
    for address in addresses:
        try:
            public = _is_public(address)
        except ValueError:  # not an address at all: nothing to connect to that we could check
            public = False
        if not public:
            raise PrivateAddress(f"{host[:100]} resolves to a private or local address; URL inputs must be public")
    return addresses


@dataclass(frozen=True)
class PinnedTarget:
    """A request aimed at the very address that was checked, so a second DNS answer (rebinding) cannot
    send it elsewhere: the URL carries the IP, `Host` and TLS SNI carry the name."""

    url: str
    headers: dict[str, str]
    extensions: dict[str, Any]


def tls_names_of(target: PinnedTarget) -> dict[str, str]:
    """Pinned address -> the name its TLS is verified for, for an HTTPS target (empty otherwise). Through a proxy's
    tunnel httpcore verifies the server's certificate against the address the request names (ours, pinned),
    ignoring the request's `sni_hostname`: the streams below map it back, or HTTPS through HTTPS_PROXY always
    fails."""
    name = target.extensions.get("sni_hostname")
    return {urlsplit(target.url).hostname or "": name} if name else {}


def _tls_name(names: Mapping[str, str], server_hostname: str | None) -> str | None:
    return names.get(server_hostname, server_hostname) if server_hostname else server_hostname


_USERINFO = re.compile(r"[A-Za-z0-9._~%!$&'()*+,;=:-]*")  # RFC 3986 userinfo: nothing a parser reads as a delimiter


def parse_http_url(url: str) -> tuple[SplitResult, str, int]:
    """`url`'s parts, host name and port (the scheme's default if none); InputFetchError if it is not a valid
    http(s) URL with a host."""
    try:
        parts = urlsplit(url)
        hostname, port = parts.hostname, parts.port
    except ValueError:  # a bad port or an unclosed IPv6 bracket
        raise InputFetchError(f"not a valid URL: {url[:200]}") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise InputFetchError(f"not an http(s) URL: {url[:200]}")
    return parts, hostname, port or (443 if parts.scheme == "https" else 80)


def pin_public_url(url: str, allow_private: bool, resolve_timeout_s: float | None = None) -> PinnedTarget:
    """Checks `url` (http(s), public unless `allow_private`) and pins it to the checked address, resolved within
    `resolve_timeout_s`."""
    parts, hostname, default_port = parse_http_url(url)
    if allow_private:
        try:  # what httpx would refuse later, as a 500, refused here as the bad input it is
            httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise InputFetchError(f"not a valid URL: {loggable_file_url(url)} ({exc})") from None
        return PinnedTarget(url, {}, {})
    port = parts.port
    address = check_public_host(hostname, default_port, resolve_timeout_s)[0]
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{port}" if port else host
    userinfo, at, _host_and_port = parts.netloc.rpartition("@")
    if at and _USERINFO.fullmatch(userinfo):  # credentials in the URL still travel (as HTTP basic auth)
        netloc = f"{userinfo}@{netloc}"
    try:  # the Host header and the TLS server name are ASCII: an internationalised name goes as its IDNA form
        wire = httpx.URL(url)
        host_header, server_name = wire.netloc.decode("ascii"), wire.raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise InputFetchError(f"not a valid URL: {loggable_file_url(url)} ({exc})") from None
    return PinnedTarget(
        urlunsplit(parts._replace(netloc=netloc)),
        {"Host": host_header},
        {"sni_hostname": server_name} if parts.scheme == "https" else {},
    )


# At submit, a URL's host is looked up for this long at most: a name that has not resolved by then is left to the
# delivery or download, which looks it up again (as a name that does not resolve at all is).
SUBMIT_LOOKUP_S = 5.0


def submit_lookup_deadline() -> float:
    """When one request's name lookups at submit (its LoRA URLs', its webhook's) must all be done: one budget for
    them all, so a slow resolver holds a submit (and an API thread) SUBMIT_LOOKUP_S at most, not that per URL."""
    return time.monotonic() + SUBMIT_LOOKUP_S


def lookup_time_left(deadline: float | None) -> float:
    return (deadline if deadline is not None else submit_lookup_deadline()) - time.monotonic()


def check_public_url(url: str, deadline: float | None = None) -> None:
    """Refuses an http(s) URL whose host is private, loopback or link-local (webhooks, at submit), looking it up
    until `deadline` (None: SUBMIT_LOOKUP_S from now)."""
    pin_public_url(url, allow_private=False, resolve_timeout_s=lookup_time_left(deadline))


def is_data_uri(value: str) -> bool:
    """RFC 2397: the scheme (like every URI scheme) and `;base64` are case-insensitive."""
    return value[:5].lower() == "data:"


def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or not is_data_uri(header):
        raise InputFetchError("malformed data URI")
    base64_encoded = header.lower().endswith(";base64")
    # the longest payload that can decode to max_bytes: 4 characters per 3 bytes, or 3 ("%XX") per byte
    if len(payload) > (max_bytes * 4 // 3 + 4 if base64_encoded else max_bytes * 3):
        raise InputFetchError(f"data URI is over the {max_bytes}-byte input limit")
    try:
        data = base64.b64decode(payload, validate=True) if base64_encoded else unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise InputFetchError(f"data URI does not decode: {exc}") from None
    if len(data) > max_bytes:
        raise InputFetchError(f"data URI is over the {max_bytes}-byte input limit")
    return data


@dataclass(frozen=True)
class Validators:
    """What a web server said identifies the content it sent (ETag, Last-Modified): asked again with them, it
    answers 304 Not Modified while that content is unchanged."""

    etag: str | None = None
    last_modified: str | None = None

    @classmethod
    def of(cls, headers: httpx.Headers) -> Validators | None:
        found = cls(headers.get("etag"), headers.get("last-modified"))
        return found if found.etag or found.last_modified else None

    def request_headers(self) -> dict[str, str]:
        asked = {"if-none-match": self.etag} if self.etag else {}
        return asked | ({"if-modified-since": self.last_modified} if self.last_modified else {})


@dataclass(frozen=True)
class Fetched:
    changed: bool  # False: the server answered 304 to the `known` validators, and nothing was written
    validators: Validators | None  # to ask with next time (None: the source gave none)


def fetch_input(url: str, dest: Path, files: FileStore, policy: FetchPolicy) -> Path:
    """Writes the input at `url` to `dest` and returns it."""
    fetch_if_changed(url, dest, files, policy)
    return dest


def fetch_if_changed(
    url: str, dest: Path, files: FileStore, policy: FetchPolicy, known: Validators | None = None
) -> Fetched:
    """Writes the input at `url` to `dest`, unless a web server says its content is still the one `known` names."""
    if is_data_uri(url):
        dest.write_bytes(decode_data_uri(url, policy.max_bytes))
        return Fetched(True, None)
    key = files.key_from_url(url)
    if key is not None:
        stored = files.stat(key, time.time())
        if stored.size > policy.max_bytes:
            raise InputFetchError(f"{loggable_file_url(url)} is over the {policy.max_bytes}-byte input limit")
        with files.open(key) as src, dest.open("wb") as out:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                out.write(chunk)
        return Fetched(True, None)
    return _download(url, dest, policy, known)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write must end by `deadline` (monotonic): httpx's timeouts bound each
    read alone, so a server sending its headers a byte at a time could hold a download for ever. `tls_names` maps a
    pinned address to the name its TLS is for (`tls_names_of`)."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float, tls_names: dict[str, str]) -> None:
        self._inner, self._deadline, self._tls_names = inner, deadline, tls_names

    def _left(self, timeout: float | None) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("the download's time limit passed")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._left(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        tls = self._inner.start_tls(ssl_context, _tls_name(self._tls_names, server_hostname), self._left(timeout))
        return _DeadlineStream(tls, self._deadline, self._tls_names)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend, deadline: float, tls_names: dict[str, str]) -> None:
        self._inner, self._deadline, self._tls_names = inner, deadline, tls_names

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        left = max(self._deadline - time.monotonic(), 0.0)
        stream = self._inner.connect_tcp(host, port, left if timeout is None else min(timeout, left), local_address,
                                         socket_options)  # fmt: skip
        return _DeadlineStream(stream, self._deadline, self._tls_names)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        unix = self._inner.connect_unix_socket(path, timeout, socket_options)
        return _DeadlineStream(unix, self._deadline, self._tls_names)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _deadline_transport(deadline: float, tls_names: dict[str, str], proxy: str | None = None) -> httpx.HTTPTransport:
    """httpx's own transport (through `proxy` if any), its connections bounded by `deadline`. No kept-alive
    connections either: a pinned request names the checked address, and a pooled connection is found by address
    alone, so a redirect to another host on the same address would reuse a TLS session verified for the first."""
    transport = httpx.HTTPTransport(proxy=proxy, limits=httpx.Limits(max_keepalive_connections=0))
    pool = transport._pool  # httpcore's pool (a proxy's too): httpx (>=0.27, <1) cannot be given a network backend
    pool._network_backend = _DeadlineBackend(pool._network_backend, deadline, tls_names)
    return transport


def _deadline_client(deadline: float, timeout_s: float, tls_names: dict[str, str]) -> httpx.Client:
    """A client as httpx would make it (HTTP(S)_PROXY, ALL_PROXY and NO_PROXY from the environment, which httpx
    reads only when it builds the transports itself), with every transport bounded by `deadline` and verifying TLS
    for the names in `tls_names` (pinned address -> name), which the caller fills as it pins."""
    mounts = {
        pattern: _deadline_transport(deadline, tls_names, proxy)
        for pattern, proxy in get_environment_proxies().items()  # the patterns httpx itself would mount
    }
    return httpx.Client(
        timeout=timeout_s, follow_redirects=False, transport=_deadline_transport(deadline, tls_names), mounts=mounts
    )


# Pinned address -> TLS name (`tls_names_of`) for the request this task is sending through a `pinned_async_client`.
# A context variable, not the client's: the client is shared, and two receivers may share an address.
_PINNED_TLS_NAMES: ContextVar[Mapping[str, str]] = ContextVar("pinned_tls_names", default=MappingProxyType({}))


@contextmanager
def verifying_tls_for(target: PinnedTarget) -> Iterator[None]:
    """Requests this task sends to `target` through a `pinned_async_client` verify TLS for its host name, also
    through an HTTPS proxy's tunnel."""
    token = _PINNED_TLS_NAMES.set(tls_names_of(target))
    try:
        yield
    finally:
        _PINNED_TLS_NAMES.reset(token)


class _PinnedAsyncStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        name = _tls_name(_PINNED_TLS_NAMES.get(), server_hostname)
        return _PinnedAsyncStream(await self._inner.start_tls(ssl_context, name, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinnedAsyncBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _PinnedAsyncStream(await self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        return _PinnedAsyncStream(await self._inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _pinned_async_transport(proxy: str | None = None) -> httpx.AsyncHTTPTransport:
    # No kept-alive connections, as for downloads (`_deadline_transport`): a pooled connection is found by address.
    transport = httpx.AsyncHTTPTransport(proxy=proxy, limits=httpx.Limits(max_keepalive_connections=0))
    pool = transport._pool
    pool._network_backend = _PinnedAsyncBackend(pool._network_backend)
    return transport


def pinned_async_client(timeout_s: float) -> httpx.AsyncClient:
    """An async client for pinned requests (`pin_public_url`; each sent within `verifying_tls_for`), shared by
    many: the environment's proxies as httpx would mount them, no redirects followed, no kept-alive connections."""
    mounts = {pattern: _pinned_async_transport(proxy) for pattern, proxy in get_environment_proxies().items()}
    return httpx.AsyncClient(
        timeout=timeout_s, follow_redirects=False, transport=_pinned_async_transport(), mounts=mounts
    )


# A compressed body is inflated this much at a time, so that a few kilobytes on the wire cannot become gigabytes in
# memory before the size limit sees them.
INFLATE_STEP = 1 << 20
_ZLIB_ENCODINGS = {"gzip", "x-gzip", "deflate"}


def _decoded(response: httpx.Response, shown_url: str, max_bytes: int) -> Iterator[bytes]:
    """The body's bytes as they arrive (a fixed chunk size would let a trickle sit unchecked in its buffer), undoing
    a server's gzip or deflate, which it should not send after `Accept-Encoding: identity` but may. httpx would
    inflate any stack of encodings whole, before a limit could look; here one layer is inflated a step at a time
    and the inflating stops one byte past `max_bytes`. Any other encoding is refused."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        yield from response.iter_raw()
        return
    if encoding not in _ZLIB_ENCODINGS:
        raise InputFetchError(
            f"{shown_url} is sent with Content-Encoding {encoding[:40]!r}: only an unencoded file is read"
        )
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 32)  # a gzip or a zlib header, told apart by zlib
    budget = max_bytes + 1  # one byte over tells the caller the limit was passed
    try:
        for raw in response.iter_raw():
            pending = raw
            while pending and budget > 0:
                out = inflater.decompress(pending, min(INFLATE_STEP, budget))
                pending = inflater.unconsumed_tail
                budget -= len(out)
                yield out
            if budget <= 0:
                return
        yield inflater.flush(min(INFLATE_STEP, max(budget, 1)))
    except zlib.error as exc:
        raise InputFetchError(f"{shown_url} is not valid {encoding} data: {exc}") from None


def _download(url: str, dest: Path, policy: FetchPolicy, known: Validators | None) -> Fetched:
    deadline = time.monotonic() + policy.timeout_s
    tls_names: dict[str, str] = {}
    with _deadline_client(deadline, policy.timeout_s, tls_names) as client:
        for _ in range(MAX_REDIRECTS + 1):
            shown = loggable_file_url(url)  # this hop's URL as messages name it
            try:
                parts = urlsplit(url)
                web = parts.scheme in ("http", "https") and bool(parts.hostname)
            except ValueError:  # an unclosed IPv6 bracket, a bad port (from a redirect's Location, say)
                web = False
            if not web:
                raise InputFetchError(f"only http(s) URLs, data URIs and this server's files are accepted: {shown}")
            # The lookup counts against the deadline too: a slow resolver cannot stretch a download.
            target = pin_public_url(url, policy.allow_private, deadline - time.monotonic())
            tls_names.update(tls_names_of(target))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise InputFetchError(f"{shown} took longer than {policy.timeout_s:g} s")
            try:
                # no single connect or read may wait past the deadline
                headers = target.headers | (known.request_headers() if known is not None else {})
                headers["Accept-Encoding"] = "identity"  # the size limit is on the file, not on its compressed form
                with client.stream(
                    "GET", target.url, headers=headers, extensions=target.extensions, timeout=remaining
                ) as response:
                    if response.status_code == 304 and known is not None:  # (httpx counts a 304 as a redirect)
                        return Fetched(False, Validators.of(response.headers) or known)
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise InputFetchError(f"{shown} answered HTTP {response.status_code}", response.status_code)
                    declared = ascii_int(response.headers.get("content-length"))
                    if declared is not None and declared > policy.max_bytes:
                        raise InputFetchError(f"{shown} is over the {policy.max_bytes}-byte input limit")
                    decoded = _decoded(response, shown, policy.max_bytes)
                    size = 0
                    with dest.open("wb") as out:
                        for chunk in decoded:
                            size += len(chunk)
                            if size > policy.max_bytes:
                                raise InputFetchError(f"{shown} is over the {policy.max_bytes}-byte input limit")
                            if time.monotonic() > deadline:
                                raise InputFetchError(f"{shown} took longer than {policy.timeout_s:g} s")
                            out.write(chunk)
                    return Fetched(True, Validators.of(response.headers))
            except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:  # ValueError: urljoin of a bad Location
                dest.unlink(missing_ok=True)
                if time.monotonic() >= deadline:
                    raise InputFetchError(f"{shown} took longer than {policy.timeout_s:g} s") from None
                raise InputFetchError(f"cannot download {shown}: {type(exc).__name__}: {exc}") from None
            except InputFetchError:
                dest.unlink(missing_ok=True)
                raise
    raise InputFetchError(f"{loggable_file_url(url)}: more than {MAX_REDIRECTS} redirects")
