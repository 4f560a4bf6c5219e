"""API keys (kept hashed, checked in constant time) and the HMAC signatures of upload URLs, CDN tokens and
file URLs."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from pathlib import Path
from urllib.parse import urlencode

from wanserve.config import Settings
from wanserve.errors import Unauthorized
from wanserve.keyfiles import read_or_create
from wanserve.numbers import ascii_int


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    # ::ffff:127.0.0.1 reaches the IPv4 loopback too; Python counts it as loopback only from 3.13 on.
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def read_or_create_secret(path: Path, nbytes: int = 32) -> str:
    """A random secret kept in a 0600 file, created on first use."""
    return read_or_create(path, lambda: (secrets.token_urlsafe(nbytes) + "\n").encode()).decode().strip()


KEY_HASH_PREFIX = "sha256:"
KEY_ID_CHARS = 12


def hash_key(key: str) -> str:
    """The stored form of an API key: `sha256:<hex>`.

    A fast hash is the right one here: keys are long random secrets (>= 128 bits), so a leaked hash cannot be
    reversed by guessing however fast the hash is, and a slow one (scrypt, bcrypt) would add its cost to every
    API call, status polls included (and hand attackers a cheap way to burn CPU with made-up keys). Operators
    who pick short, memorable keys lose this argument: keys should come from `secrets.token_urlsafe(32)`.
    """
    return KEY_HASH_PREFIX + hashlib.sha256(key.strip().encode("utf-8", "replace")).hexdigest()


def key_id(key_hash: str) -> str:
    """The public id of a key: the first hex digits of its hash. It names the owner of requests (in the job store,
    logs and limits) and reveals nothing usable about the key."""
    return key_hash.removeprefix(KEY_HASH_PREFIX)[:KEY_ID_CHARS]


def read_key_hashes(path: Path) -> list[str]:
    """A file of key hashes: one `sha256:<hex>` per line; blank lines and `#` comments are skipped."""
    hashes = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        item = line.split("#", 1)[0].strip().lower()
        if not item:
            continue
        if not (item.startswith(KEY_HASH_PREFIX) and len(item) == len(KEY_HASH_PREFIX) + 64):
            raise ValueError(f"{path}:{number}: not a `sha256:<64 hex digits>` key hash")
        bytes.fromhex(item.removeprefix(KEY_HASH_PREFIX))  # ValueError when not hex
        hashes.append(item)
    return hashes


def key_hashes(settings: Settings) -> list[str]:
    """Every accepted key's hash: the plain keys' (hashed here), the hashes given, the hashes file's."""
    hashes = [hash_key(k) for k in settings.api_keys if k.strip()] + list(settings.api_key_hashes)
    if settings.api_key_hashes_file is not None:
        hashes += read_key_hashes(settings.api_key_hashes_file)
    return list(dict.fromkeys(hashes))


def without_plain_keys(settings: Settings) -> Settings:
    """The settings with the plain keys replaced by their hashes (and the hashes file read): what the server
    keeps, and passes on to its worker processes."""
    return settings.model_copy(
        update={"api_keys": [], "api_key_hashes": key_hashes(settings), "api_key_hashes_file": None}
    )


class ApiKeys:
    """`Authorization: Key <key>` (fal's scheme; `Key id:secret` is one key) or `Bearer <key>`.

    Only the SHA-256 digests of the keys are held (see `hash_key`); a credential is hashed and its digest compared,
    in constant time, with every key's."""

    def __init__(self, key_hashes: list[str]) -> None:
        digests: dict[bytes, str] = {}
        for item in key_hashes:
            item = item.strip().lower()
            digests[bytes.fromhex(item.removeprefix(KEY_HASH_PREFIX))] = key_id(item)
        if len(set(digests.values())) != len(digests):
            raise ValueError("two API keys share a key id (the first 12 hex digits of their hashes): replace one")
        self._digests = list(digests.items())

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    @property
    def ids(self) -> list[str]:
        return [owner for _, owner in self._digests]

    def identify(self, authorization: str | None) -> str | None:
        """The id of the key the header carries; None when it carries no accepted key."""
        if not authorization:
            return None
        scheme, _, credential = authorization.strip().partition(" ")
        if scheme.lower() not in ("key", "bearer") or not credential.strip():
            return None
        given = hashlib.sha256(credential.strip().encode("utf-8", "replace")).digest()
        # Compare against every key, always: the time taken does not tell which key (or how much) matched.
        found = None
        for digest, owner in self._digests:
            if hmac.compare_digest(given, digest):
                found = owner
        return found

    def check(self, authorization: str | None) -> str | None:
        """The caller's key id (None when the server has no keys); Unauthorized without an accepted key."""
        if not self.enabled:
            return None
        if not authorization:
            raise Unauthorized("Missing credentials: send the header 'Authorization: Key <your API key>'")
        owner = self.identify(authorization)
        if owner is None:
            raise Unauthorized("Invalid API key")
        return owner


class UrlSigner:
    """HMAC signatures: upload URLs and CDN tokens (an upload needs no Authorization header), multipart upload ids
    bound to their file and owner, and the expiring `/files/` URLs handed out when the server has keys."""

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()

    def sign(self, *parts: str) -> str:
        return hmac.new(self._secret, "\x1f".join(parts).encode(), hashlib.sha256).hexdigest()

    def verify(self, signature: str | None, *parts: str) -> bool:
        # bytes, not str: compare_digest refuses non-ASCII str, and a signature is attacker input.
        given = (signature or "").encode("utf-8", "replace")
        return bool(signature) and hmac.compare_digest(self.sign(*parts).encode(), given)

    def token(self, ttl_s: float, owner: str = "") -> tuple[str, float]:
        """A bearer token for the CDN upload routes, `<expiry>.<owner key id>.<signature>`."""
        expires = int(time.time() + ttl_s)
        return f"{expires}.{owner}.{self.sign('cdn', str(expires), owner)}", float(expires)

    def token_owner(self, token: str) -> str | None:
        """The key id a valid, unexpired token was given to ("" when the server had no keys); None if invalid."""
        expires, _, rest = token.partition(".")
        owner, _, signature = rest.partition(".")
        expiry = ascii_int(expires)
        if expiry is None or expiry < time.time():
            return None
        return owner if self.verify(signature, "cdn", expires, owner) else None

    # --- /files/ URLs ---
    def file_signature(self, key: str, ttl_s: float, now: float) -> tuple[str, str]:
        """(expiry, signature) for a file URL. The expiry is rounded up to 1% of the lifetime, so the same file read
        again soon after gets the same URL (which browsers and proxies can cache)."""
        step = max(1, int(ttl_s // 100))
        expires = str(-(-int(now + ttl_s) // step) * step)
        return expires, self.sign("file", key, expires)

    def file_query(self, key: str, ttl_s: float, now: float) -> str:
        """`exp=...&sig=...` for a file URL (see `file_signature`)."""
        expires, signature = self.file_signature(key, ttl_s, now)
        return urlencode({"exp": expires, "sig": signature})

    def file_signature_valid(self, key: str, expires: str | None, signature: str | None, now: float) -> bool:
        expiry = ascii_int(expires)
        if expires is None or expiry is None or expiry < now:
            return False
        return self.verify(signature, "file", key, expires)

    # --- multipart upload ids (the CDN flow, whose part and completion URLs carry no signature) ---
    def bind_upload(self, upload_id: str, key: str, owner: str) -> str:
        """The upload id handed to the client: the store's, plus a MAC of the file key and owner it was made for,
        so parts and completion are refused to other keys and cannot be aimed at another upload."""
        return f"{upload_id}.{self.sign('upload', upload_id, key, owner)[:32]}"

    def bound_upload(self, handed_out: str, key: str, owner: str) -> str | None:
        """The store's upload id in one `bind_upload` made for this key and owner; None for any other."""
        upload_id, _, tag = handed_out.partition(".")
        expected = self.sign("upload", upload_id, key, owner)[:32].encode()
        return upload_id if hmac.compare_digest(expected, tag.encode("utf-8", "replace")) else None
