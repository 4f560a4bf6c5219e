"""The Host names a server without API keys answers to: its defence against DNS rebinding.

Such a server listens on loopback and trusts whoever can reach it. A web page cannot reach it directly (browsers keep
pages to their own origin, and `context.check_cross_site` refuses their cross-site work), but DNS rebinding gets
around that: a page on `attacker.example` re-points that name at 127.0.0.1, and its requests then reach this server
as same-origin requests from the page's point of view, free to read statuses, results and `/ready`'s list of running
requests. What gives them away is the Host header, which still names the attacker's domain. So without keys, only
requests whose Host is a loopback address, `localhost` (or a name under `.localhost`, which browsers resolve to
loopback themselves), the public URL's host, or a name the operator allows (`WANSERVE_ALLOWED_HOSTS`) are answered.
With API keys every request needs a key and the check is off: the Host then decides nothing.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from wanserve.api.responses import error_response
from wanserve.api.security import is_loopback_host
from wanserve.errors import Forbidden

# IPv4 in the shorter forms that curl and the C library take (and browsers rewrite before sending): `127.1`,
# `0x7f.0.0.1`, `2130706433`. No host name looks like one: its last label would be a number.
_LEGACY_IPV4 = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}")


def canonical_host(name: str) -> str:
    """A host name or address as Host headers carry it: lower case, no root dot, IPv4 in dotted-quad form, IPv6 in
    its short form, a non-ASCII name in its ASCII (punycode) form, which is what browsers send."""
    name = name.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if _LEGACY_IPV4.fullmatch(name):
        try:
            return socket.inet_ntoa(socket.inet_aton(name))
        except OSError:
            return name  # over 32 bits: no address
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


def host_name(host_header: str) -> str:
    """The name or address of a Host header value (`name`, `name:port`, `[v6]`, `[v6]:port`), canonical; "" for a
    value of another shape."""
    value = host_header.strip()
    if value.startswith("["):
        address, bracket, rest = value[1:].partition("]")
        port_ok = rest == "" or (rest.startswith(":") and _is_port(rest[1:]))
        return canonical_host(address) if bracket and port_ok and ":" in address else ""
    name, colon, port = value.rpartition(":")
    if colon and not _is_port(port):
        return ""
    name = name if colon else value
    return canonical_host(name) if name and ":" not in name else ""


def _is_port(text: str) -> bool:
    return text == "" or (text.isascii() and text.isdigit())


_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def _entry(item: str) -> str:
    """An allowed host as the operator wrote it: a name, an address (IPv6 with or without brackets), either with a
    port, or a URL. A ValueError names an entry that no Host header could ever match (a pattern, a typo)."""
    if "://" in item:
        name = canonical_host(urlsplit(item).hostname or "")
    else:
        try:
            name = str(ipaddress.ip_address(item.lower()))
        except ValueError:
            name = host_name(item)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        if not _HOST_NAME.fullmatch(name):
            raise ValueError(
                f"WANSERVE_ALLOWED_HOSTS: {item!r} is not a host name, address or URL (no patterns: `*` alone allows "
                "any host)"
            ) from None
    return name


class AllowedHosts:
    def __init__(self, names: Iterable[str]) -> None:
        self.any = False
        self.names: set[str] = set()
        for item in (name.strip() for name in names):
            if item == "*":
                self.any = True
            elif item:
                self.names.add(_entry(item))

    def allows(self, host_header: str | None) -> bool:
        if self.any:
            return True
        name = host_name(host_header or "")
        return bool(name) and (name in self.names or name.endswith(".localhost") or is_loopback_host(name))


class HostCheckMiddleware:
    """Refuses (403 `forbidden`) an HTTP request whose Host `allowed` does not allow; a request with no Host header
    (HTTP/1.0 from a local tool) names no foreign domain and is answered."""

    def __init__(self, app: ASGIApp, allowed: AllowedHosts) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hosts = [value.decode("latin-1") for name, value in scope["headers"] if name == b"host"]
        if not hosts or self.allowed.allows(hosts[0]):
            await self.app(scope, receive, send)
            return
        refusal = Forbidden(
            f"this server has no API keys and answers only requests for its own host names, not {hosts[0][:100]!r} "
            "(a guard against DNS rebinding): add the name to WANSERVE_ALLOWED_HOSTS, or set API keys"
        )
        # Closed after the answer: the request's body (if any) is not read, and the client has no business here.
        await error_response(refusal, headers={"connection": "close"})(scope, receive, send)
