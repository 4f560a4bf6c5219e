"""Webhooks from a real server to a real receiver: one good delivery per job, signed, retried on failure."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from server import CHEAP_INPUT, Server, wait_completed
from webhook_receiver import Receiver

APP = "fal-ai/wan-22"


def verify(server: Server, headers: dict[str, str], body: bytes) -> None:
    """Verifies a delivery the way a receiver of the hosted service does: key from the JWKS, ±300 s skew."""
    jwk = httpx.get(f"{server.url}/.well-known/jwks.json").json()["keys"][0]
    key = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(jwk["x"] + "=="))
    timestamp = headers["x-fal-webhook-timestamp"]
    assert abs(int(timestamp) - time.time()) < 300
    message = "\n".join(
        [
            headers["x-fal-webhook-request-id"],
            headers["x-fal-webhook-user-id"],
            timestamp,
            hashlib.sha256(body).hexdigest(),
        ]
    ).encode()
    key.verify(bytes.fromhex(headers["x-fal-webhook-signature"]), message)
    with pytest.raises(InvalidSignature):
        key.verify(bytes.fromhex(headers["x-fal-webhook-signature"]), message + b"x")


def _wait(predicate: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_failing_receiver_is_retried_until_one_delivery_succeeds(
    server: Server, receiver: tuple[Receiver, str]
) -> None:
    state, url = receiver
    state.fail_first = 2
    submitted = httpx.post(f"{server.url}/{APP}", json={**CHEAP_INPUT, "seed": 21}, params={"fal_webhook": url}).json()
    wait_completed(server, APP, submitted["request_id"])
    _wait(lambda: any(status == 200 for status, _, _ in state.deliveries))
    time.sleep(1.5)  # well past the retry delays: no delivery may follow the successful one
    assert [status for status, _, _ in state.deliveries] == [500, 500, 200]
    bodies = {body for _, _, body in state.deliveries}
    assert len(bodies) == 1  # every retry carries the same payload
    _, headers, body = state.deliveries[-1]
    verify(server, headers, body)
    payload = json.loads(body)
    assert payload["request_id"] == submitted["request_id"] == headers["x-fal-webhook-request-id"]
    assert payload["status"] == "OK" and payload["error"] is None
    # The job itself is unaffected by its webhook's failures.
    result = httpx.get(submitted["response_url"])
    assert result.status_code == 200 and payload["payload"] == result.json()


def test_a_cancelled_request_sends_an_error_webhook(server: Server, receiver: tuple[Receiver, str]) -> None:
    state, url = receiver
    blocker = httpx.post(f"{server.url}/{APP}", json={**CHEAP_INPUT, "num_inference_steps": 3}).json()
    submitted = httpx.post(f"{server.url}/{APP}", json=CHEAP_INPUT, params={"fal_webhook": url}).json()
    assert httpx.put(submitted["cancel_url"]).status_code == 202
    _wait(lambda: len(state.deliveries) == 1)
    _, headers, body = state.deliveries[0]
    verify(server, headers, body)
    payload = json.loads(body)
    assert payload["status"] == "ERROR" and payload["error"] == "Invalid status code: 499"
    assert payload["payload"]["error_type"] == "client_cancelled"
    httpx.put(blocker["cancel_url"])
    wait_completed(server, APP, blocker["request_id"])
