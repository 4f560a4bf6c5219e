"""Webhooks: the fal payload, Ed25519 signatures as the hosted service sends them, the JWKS that
verifies them, and delivery with persisted retries. A webhook never changes the job it reports."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from wanserve.errors import InputFetchError, PrivateAddress
from wanserve.files.inputs import pin_public_url, verifying_tls_for
from wanserve.jobs.model import Job
from wanserve.keyfiles import read_or_create
from wanserve.logsetup import loggable_url
from wanserve.store.base import JobStore

log = logging.getLogger("wanserve.webhooks")

MAX_RETRY_DELAY_S = 1800.0
CLOSE_MARGIN_S = 2.0  # a try's limit is timeout_s (+1 s for a name lookup); then its outcome is stored


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class WebhookSigner:
    """One Ed25519 key, kept in a PEM file (0600) so signatures stay verifiable across restarts."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        raw = self.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = hashlib.sha256(raw).hexdigest()[:16]

    @classmethod
    def load_or_create(cls, path: Path) -> WebhookSigner:
        """The key in `path`, made there first if there is none (by one process only: replicas share it)."""

        def new_pem() -> bytes:
            fresh = Ed25519PrivateKey.generate()
            return fresh.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )

        key = serialization.load_pem_private_key(read_or_create(path, new_pem), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return cls(key)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def jwks(self) -> dict[str, Any]:
        raw = self.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw), "kid": self.key_id, "use": "sig"}]}

    def headers(self, request_id: str, user_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """The four X-Fal-Webhook-* headers: a hex Ed25519 signature over
        `request_id \\n user_id \\n timestamp \\n sha256_hex(body)`."""
        ts = str(int(time.time()) if timestamp is None else timestamp)
        message = "\n".join([request_id, user_id, ts, hashlib.sha256(body).hexdigest()]).encode()
        return {
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": user_id,
            "X-Fal-Webhook-Timestamp": ts,
            "X-Fal-Webhook-Signature": self._key.sign(message).hex(),
        }


def webhook_payload(job: Job) -> dict[str, Any]:
    """The body fal POSTs to `fal_webhook` when a request completes."""
    if job.failure is None:
        return {
            "request_id": job.id,
            "gateway_request_id": job.id,
            "status": "OK",
            "payload": job.output,
            "error": None,
        }
    return {
        "request_id": job.id,
        "gateway_request_id": job.id,
        "status": "ERROR",
        "payload": job.failure.result_body(),
        "error": f"Invalid status code: {job.failure.http_status}",
    }


def retry_delay(attempts: int, base_s: float) -> float:
    """Delay before the next try after `attempts` failed ones: base, 2x base, 4x base... capped."""
    return min(base_s * (2 ** max(attempts - 1, 0)), MAX_RETRY_DELAY_S)


class WebhookDispatcher:
    """Delivers due webhooks from the job store. Runs in the API process; a restart resumes from the store."""

    def __init__(
        self,
        store: JobStore,
        signer: WebhookSigner,
        *,
        user_id: str,
        timeout_s: float,
        max_attempts: int,
        retry_base_s: float,
        allow_private: bool = False,
        output_urls: Callable[[Any], Any] = lambda output: output,
    ) -> None:
        """`output_urls` turns a result's stored file references into URLs the receiver may download (this
        server's public URL; signed, when it has keys), as the result route does."""
        self.store = store
        self.output_urls = output_urls
        self.signer = signer
        self.user_id = user_id
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.retry_base_s = retry_base_s
        self.allow_private = allow_private
        self._in_flight: dict[int, asyncio.Task[None]] = {}

    async def deliver_due(self, client: httpx.AsyncClient) -> int:
        """Starts a delivery for each due webhook not already in flight (a slow receiver holds up only its own
        webhooks), sent with `client` (a `pinned_async_client`); returns how many started. `drain()` waits for
        them."""
        # Claimed for longer than one delivery can take, so no other loop (or replica) starts it meanwhile.
        # store.now() may ask the store (Redis's clock), so it is read in the thread, never on the event loop.
        due = await asyncio.to_thread(lambda: self.store.claim_due_webhooks(self.store.now(), self.timeout_s + 30, 100))
        started = 0
        for hook in due:
            if hook.id in self._in_flight:
                continue
            task = asyncio.create_task(self._deliver(client, hook.id, hook.job_id, hook.url, hook.attempts))
            self._in_flight[hook.id] = task
            task.add_done_callback(functools.partial(self._done, hook.id))
            started += 1
        return started

    def _done(self, hook_id: int, _task: asyncio.Task[None]) -> None:
        self._in_flight.pop(hook_id, None)

    async def drain(self) -> None:
        await asyncio.gather(*self._in_flight.values(), return_exceptions=True)

    async def close(self) -> None:
        """Lets the deliveries in flight finish first, each within its own time limit: one cut off (a server
        restarting) records no outcome, so its receiver, which may have accepted it, would get it again once the
        claim runs out. What is left after that limit is cancelled."""
        pending = list(self._in_flight.values())
        if pending:
            _, unfinished = await asyncio.wait(pending, timeout=self.timeout_s + CLOSE_MARGIN_S)
            for task in unfinished:
                task.cancel()
        await self.drain()

    async def _deliver(self, client: httpx.AsyncClient, hook_id: int, job_id: str, url: str, attempts: int) -> None:
        try:
            await self._attempt(client, hook_id, job_id, url, attempts)
        except Exception as exc:  # unforeseen: a failed try like any other, never a webhook left pending for ever
            log.exception("webhook for %s to %r: unexpected error", job_id, loggable_url(url))
            # If the store is what failed, the claim on this webhook expires and it is tried again then.
            with contextlib.suppress(Exception):
                await self._failed(hook_id, job_id, url, attempts, f"{type(exc).__name__}: {exc}")

    async def _attempt(self, client: httpx.AsyncClient, hook_id: int, job_id: str, url: str, attempts: int) -> None:
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is None:
            await asyncio.to_thread(self.store.webhook_failed, hook_id, "job no longer exists", None)
            return
        # One limit on the whole try, name lookup included: httpx's timeout bounds each connect or read alone, so a
        # receiver trickling its answer would outlast the claim (deliver_due) and another replica would send it again.
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        try:
            # Checked again at every delivery (DNS may have changed since the submit), and the POST goes to
            # the address that was checked.
            # The lookup itself gives up at the deadline (on a thread of its own), so a hung resolver never holds
            # one of the default executor's few threads, which the store calls share; the outer limit, a second
            # later, is only a backstop.
            async with asyncio.timeout_at(deadline + 1.0):
                target = await asyncio.to_thread(pin_public_url, url, self.allow_private, self.timeout_s)
        except TimeoutError:
            await self._failed(hook_id, job_id, url, attempts, f"name lookup took over {self.timeout_s:g} s")
            return
        except PrivateAddress as exc:
            log.warning("webhook for %s to %r refused: %s", job_id, loggable_url(url), exc)
            await asyncio.to_thread(self.store.webhook_failed, hook_id, str(exc), None)
            return
        except InputFetchError as exc:  # cannot resolve (yet): retried like a refused connection
            await self._failed(hook_id, job_id, url, attempts, str(exc))
            return
        payload = webhook_payload(job)
        if job.failure is None:
            payload["payload"] = self.output_urls(payload["payload"])
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", **self.signer.headers(job.id, self.user_id, body)}
        error: str | None = None
        try:
            # Streamed and closed unread: only the status counts, and a receiver's body (a gzip bomb, a trickle)
            # would otherwise be read whole into this process's memory.
            with verifying_tls_for(target):
                async with (
                    asyncio.timeout_at(deadline),
                    client.stream(
                        "POST",
                        target.url,
                        content=body,
                        headers={**headers, "Accept-Encoding": "identity", **target.headers},
                        extensions=target.extensions,
                        timeout=self.timeout_s,
                        follow_redirects=False,  # a redirect is a failure: it could point at a private address
                    ) as response,
                ):
                    status = response.status_code
            if not 200 <= status < 300:
                error = f"receiver answered HTTP {status}"
        except TimeoutError:
            error = f"no complete answer within {self.timeout_s:g} s"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL is not an HTTPError
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            await asyncio.to_thread(lambda: self.store.webhook_delivered(hook_id, self.store.now()))
            return
        await self._failed(hook_id, job_id, url, attempts, error)

    async def _failed(self, hook_id: int, job_id: str, url: str, attempts: int, error: str) -> None:
        tried = attempts + 1
        shown = loggable_url(url)
        log.warning(
            "webhook for %s to %r failed (try %d/%d): %s",
            job_id,
            shown,
            tried,
            self.max_attempts,
            error.replace(url, shown),
        )

        def settle() -> None:
            delay = retry_delay(tried, self.retry_base_s) if tried < self.max_attempts else None
            self.store.webhook_failed(hook_id, error, None if delay is None else self.store.now() + delay)

        await asyncio.to_thread(settle)
