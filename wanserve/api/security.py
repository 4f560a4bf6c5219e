"""API keys (checked in constant time) and the HMAC signatures of upload URLs and CDN tokens."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from pathlib import Path

from wanserve.errors import Unauthorized


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_or_create_secret(path: Path, nbytes: int = 32) -> str:
    """A random secret kept in a 0600 file, created on first use."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(nbytes)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    tmp.replace(path)
    return value


class ApiKeys:
    """`Authorization: Key <key>` (fal's scheme; `Key id:secret` is one key) or `Bearer <key>`."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def matches(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, credential = authorization.strip().partition(" ")
        if scheme.lower() not in ("key", "bearer") or not credential:
            return False
        given = credential.strip().encode("utf-8", "replace")
        # Compare against every key, always: the time taken does not tell which key (or how much) matched.
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(given, key)
        return found

    def check(self, authorization: str | None) -> None:
        if not self.enabled:
            return
        if not authorization:
            raise Unauthorized("Missing credentials: send the header 'Authorization: Key <your API key>'")
        if not self.matches(authorization):
            raise Unauthorized("Invalid API key")


class UrlSigner:
    """Signs the parameters of upload URLs and CDN tokens, so an upload needs no Authorization header."""

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()

    def sign(self, *parts: str) -> str:
        return hmac.new(self._secret, "\x1f".join(parts).encode(), hashlib.sha256).hexdigest()

    def verify(self, signature: str | None, *parts: str) -> bool:
        # bytes, not str: compare_digest refuses non-ASCII str, and a signature is attacker input.
        given = (signature or "").encode("utf-8", "replace")
        return bool(signature) and hmac.compare_digest(self.sign(*parts).encode(), given)

    def token(self, ttl_s: float) -> tuple[str, float]:
        """A bearer token for the CDN upload routes: `<expiry>.<signature>`."""
        expires = int(time.time() + ttl_s)
        return f"{expires}.{self.sign('cdn', str(expires))}", float(expires)

    def token_valid(self, token: str) -> bool:
        expires, _, signature = token.partition(".")
        if not (expires.isascii() and expires.isdigit()) or int(expires) < time.time():
            return False
        return self.verify(signature, "cdn", expires)
