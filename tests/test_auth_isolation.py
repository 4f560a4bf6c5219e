"""API keys as owners: hashed keys, one key's requests and uploads hidden from another, signed expiring file
URLs, per-key rate limits and queued-request limits. An in-process app with no worker: jobs are completed by
hand through its job store, so nothing here runs the model."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from redis_server import RedisServer

from wanserve import cli
from wanserve.api.app import create_app
from wanserve.api.context import ServerContext
from wanserve.api.ratelimit import RateLimiter, RedisRateLimiter, retry_after_s
from wanserve.api.security import ApiKeys, hash_key, key_id
from wanserve.client.local_server import free_port
from wanserve.config import Settings
from wanserve.files.base import file_ref, new_key
from wanserve.jobs.model import WorkerInfo

APP = "fal-ai/wan-22"
KEY_A = "key-a-" + "a" * 40
KEY_B = "key-b-" + "b" * 40
A = {"Authorization": f"Key {KEY_A}"}
B = {"Authorization": f"Key {KEY_B}"}
BASE = "http://testserver"
INPUT = {"prompt": "a red fox in snow", "resolution": "480p", "num_inference_steps": 1}


def make_app(tmp_path: Path, **overrides: Any) -> FastAPI:
    settings = {"data_dir": tmp_path, "public_url": BASE, "api_keys": [KEY_A, KEY_B], **overrides}
    return create_app(Settings(**settings), workers=0)


def context(client: TestClient) -> ServerContext:
    ctx: ServerContext = client.app.state.context  # type: ignore[attr-defined]
    return ctx


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with TestClient(make_app(tmp_path_factory.mktemp("auth-isolation")), base_url=BASE) as c:
        yield c


def submit(client: TestClient, headers: dict[str, str], endpoint: str = APP) -> dict[str, Any]:
    response = client.post(f"/{endpoint}", json=INPUT, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def complete_with_video(
    ctx: ServerContext, job_id: str, data: bytes = b"not really an mp4", stored_as: str = "ref"
) -> str:
    """What a worker does: claim the job, store its video, finish it naming the file by its reference
    (`stored_as="url"`: by its plain URL under this public URL, as workers did before references)."""
    now = time.time()
    others = []  # jobs queued before ours: held while ours is found (released at once, each would come back first)
    while (claimed := ctx.store.claim("test-worker", 60, now)) is not None and claimed.id != job_id:
        others.append(claimed.id)
    for other in others:
        ctx.store.release(other, "test-worker", now)
    assert claimed is not None and claimed.id == job_id
    key = new_key(f"{job_id}.mp4")
    ctx.files.put(key, data, "video/mp4", None, now)
    url = file_ref(key) if stored_as == "ref" else ctx.files.url(key)
    output = {"video": {"url": url, "content_type": "video/mp4"}, "seed": 1, "prompt": "p"}
    assert ctx.store.finish(job_id, now, worker_id="test-worker", output=output)
    return key


def signed_parts(url: str) -> tuple[str, dict[str, str]]:
    split = urlsplit(url)
    return split.path, {k: v[0] for k, v in parse_qs(split.query).items()}


# --- keys are kept hashed ---


def test_the_app_keeps_only_hashes_of_its_keys(client: TestClient) -> None:
    ctx = context(client)
    plain = [KEY_A.encode(), KEY_B.encode()]

    def contents(value: Any, depth: int = 0) -> Iterator[bytes]:
        if depth > 4:
            return
        if isinstance(value, str):
            yield value.encode()
        elif isinstance(value, bytes | bytearray):
            yield bytes(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from contents(k, depth + 1)
                yield from contents(v, depth + 1)
        elif isinstance(value, list | tuple | set):
            for item in value:
                yield from contents(item, depth + 1)
        elif hasattr(value, "__dict__"):
            yield from contents(vars(value), depth + 1)

    held = b"\n".join(contents(ctx.api_keys))
    assert held and not any(key in held for key in plain)
    # nor in the settings the app (and its worker processes) run with
    dumped = ctx.settings.model_dump_json().encode()
    assert ctx.settings.api_keys == [] and not any(key in dumped for key in plain)
    supervisor_settings = client.app.state.supervisor.settings.model_dump_json().encode()  # type: ignore[attr-defined]
    assert not any(key in supervisor_settings for key in plain)
    assert sorted(ctx.api_keys.ids) == sorted(key_id(hash_key(k)) for k in (KEY_A, KEY_B))


def test_keys_given_by_hash_only(tmp_path: Path) -> None:
    hashes_file = tmp_path / "key-hashes"
    hashes_file.write_text(f"# operators\n{hash_key('from-the-file-' + 'f' * 30)}  # alice\n\n")
    app = make_app(tmp_path, api_keys=[], api_key_hashes=[hash_key(KEY_B).upper()], api_key_hashes_file=hashes_file)
    with TestClient(app, base_url=BASE) as c:
        assert c.get(f"/{APP}/requests/x/status", headers=B).status_code == 404  # accepted: not found
        file_key = {"Authorization": "Key from-the-file-" + "f" * 30}
        assert c.get(f"/{APP}/requests/x/status", headers=file_key).status_code == 404
        refused = c.get(f"/{APP}/requests/x/status", headers=A)
        assert refused.status_code == 401 and refused.json()["error_type"] == "unauthorized"
    with pytest.raises(ValueError, match="sha256"):
        Settings(api_key_hashes=["plain-key-by-mistake"])


def test_api_keys_identify_in_constant_form() -> None:
    keys = ApiKeys([hash_key(KEY_A), hash_key(KEY_B)])
    assert keys.identify(f"Key {KEY_A}") == key_id(hash_key(KEY_A))
    assert keys.identify(f"Bearer {KEY_B}") == key_id(hash_key(KEY_B))
    assert keys.identify(f"Key {KEY_A}x") is None
    assert keys.identify("Key ") is None and keys.identify(None) is None and keys.identify("Basic x") is None
    assert keys.identify("Key \udcff\u00e9") is None  # attacker bytes: no exception


def test_hash_key_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(KEY_A + "\n"))
    assert cli.main(["hash-key"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == hash_key(KEY_A) and key_id(hash_key(KEY_A)) in out.err
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli.main(["hash-key"]) == 2


# --- one key's requests are invisible to another ---


def test_another_keys_request_is_not_found(client: TestClient) -> None:
    reply = submit(client, A)
    rid = reply["request_id"]
    base = f"/{APP}/requests/{rid}"
    unknown = client.get(f"/{APP}/requests/00000000-0000-4000-8000-000000000000/status", headers=B)
    assert unknown.status_code == 404
    for method, path in [
        ("GET", f"{base}/status"),
        ("GET", f"{base}/status?logs=1"),
        ("GET", f"{base}/status/stream?logs=1"),
        ("GET", base),
    ]:
        answer = client.request(method, path, headers=B)
        assert answer.status_code == 404, path
        assert answer.json()["error_type"] == unknown.json()["error_type"] == "not_found"  # as if it did not exist
    cancel = client.put(f"{base}/cancel", headers=B)
    assert cancel.status_code == 404 and cancel.json()["status"] == "NOT_FOUND"
    assert context(client).store.get(rid).state.value == "IN_QUEUE"  # type: ignore[union-attr]
    # its owner sees and cancels it
    assert client.get(f"{base}/status", headers=A).status_code == 202
    assert client.put(f"{base}/cancel", headers=A).status_code == 202
    assert client.get(f"{base}/status", headers=A).json()["status"] == "COMPLETED"


def test_the_owner_is_recorded_and_the_result_is_only_the_owners(client: TestClient) -> None:
    ctx = context(client)
    rid = submit(client, A)["request_id"]
    assert ctx.store.get(rid).owner == key_id(hash_key(KEY_A))  # type: ignore[union-attr]
    complete_with_video(ctx, rid)
    assert client.get(f"/{APP}/requests/{rid}", headers=B).status_code == 404
    assert client.get(f"/{APP}/requests/{rid}/status?logs=true", headers=B).status_code == 404
    assert client.get(f"/{APP}/requests/{rid}", headers=A).status_code == 200


# --- signed, expiring file URLs ---


def test_result_urls_are_signed_and_work_without_headers(client: TestClient) -> None:
    ctx = context(client)
    rid = submit(client, A)["request_id"]
    data = b"\x00\x00\x00\x18ftypmp42 video bytes"
    key = complete_with_video(ctx, rid, data)
    assert ctx.store.get(rid).output["video"]["url"] == f"/files/{key}"  # type: ignore[index, union-attr]

    result = client.get(f"/{APP}/requests/{rid}", headers=A).json()
    url = result["video"]["url"]
    path, query = signed_parts(url)
    assert path == f"/files/{key}" and set(query) == {"exp", "sig"}
    ttl = ctx.settings.file_url_ttl_s
    assert time.time() + ttl <= int(query["exp"]) <= time.time() + ttl * 1.02
    assert result["prompt"] == "p"  # other fields untouched
    assert ctx.files.key_from_url(url) == key  # a signed URL given back as an input is still read by key
    # the same URL when read again soon after (cacheable)
    assert client.get(f"/{APP}/requests/{rid}", headers=A).json()["video"]["url"] == url

    fetched = client.get(url)  # no Authorization: a browser, an <video> tag, the fal clients
    assert fetched.status_code == 200 and fetched.content == data
    assert client.head(url).status_code == 200
    assert client.get(url, headers={"Range": "bytes=0-3"}).content == data[:4]

    def refused(target: str) -> None:
        for method in ("GET", "HEAD"):
            answer = client.request(method, target)
            assert answer.status_code == 403, (method, target)
            if method == "GET":
                assert answer.json()["error_type"] == "forbidden"

    refused(f"{BASE}/files/{key}")  # unsigned
    refused(f"{BASE}/files/{key}?exp={query['exp']}")  # no signature
    bad_sig = ("0" if query["sig"][0] != "0" else "1") + query["sig"][1:]
    refused(f"{BASE}/files/{key}?exp={query['exp']}&sig={bad_sig}")  # tampered signature
    refused(f"{BASE}/files/{key}?exp={int(query['exp']) + 1}&sig={query['sig']}")  # a longer life
    other = new_key("other.mp4")
    ctx.files.put(other, b"other", "video/mp4", None, time.time())
    refused(f"{BASE}/files/{other}?exp={query['exp']}&sig={query['sig']}")  # another file
    expired = ctx.url_signer.file_query(key, 10, time.time() - 100)
    refused(f"{BASE}/files/{key}?{expired}")
    refused(f"{BASE}/files/{key}?exp=9999999999999999999999&sig=%FF%FE")


def test_the_sync_run_route_signs_its_output_too(client: TestClient) -> None:
    ctx = context(client)
    answers: list[Any] = []
    thread = threading.Thread(target=lambda: answers.append(client.post(f"/run/{APP}", json=INPUT, headers=B)))
    thread.start()
    deadline = time.monotonic() + 10
    owner_b = key_id(hash_key(KEY_B))
    while not (queued := [j for j in _queued_jobs(ctx) if j.owner == owner_b]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    complete_with_video(ctx, queued[0].id, b"run output")
    thread.join(10)
    answer = answers[0]
    assert answer.status_code == 200
    assert client.get(answer.json()["video"]["url"]).content == b"run output"


def _queued_jobs(ctx: ServerContext) -> list[Any]:
    db = ctx.store._conn()  # type: ignore[attr-defined]
    ids = [row[0] for row in db.execute("SELECT id FROM jobs WHERE state = 'IN_QUEUE'")]
    return [job for job in (ctx.store.get(i) for i in ids) if job is not None]


def test_uploads_answer_signed_urls_and_stay_their_owners(client: TestClient) -> None:
    # REST flow (JS): initiate with the key, PUT to the signed upload URL without one
    initiate = client.post("/rest/storage/upload/initiate", json={"file_name": "a.txt", "content_type": "text/plain"})
    assert initiate.status_code == 401
    target = client.post(
        "/rest/storage/upload/initiate", json={"file_name": "a.txt", "content_type": "text/plain"}, headers=A
    ).json()
    assert client.put(target["upload_url"], content=b"mine", headers={"content-type": "text/plain"}).status_code == 200
    assert client.get(target["file_url"]).content == b"mine"
    assert client.get(target["file_url"].split("?")[0]).status_code == 403

    # CDN flow (Python): a token per key; a multipart upload only takes its owner's parts and completion
    token_a = client.post("/rest/storage/auth/token", headers=A).json()["token"]
    token_b = client.post("/rest/storage/auth/token", headers=B).json()["token"]
    started = client.post(
        "/cdn/files/upload/multipart",
        headers={"Authorization": f"Bearer {token_a}", "content-type": "text/plain", "x-fal-file-name": "big.txt"},
    ).json()
    access, upload_id = started["access_url"], started["uploadId"]
    for bearer in (f"Bearer {token_b}", f"Key {KEY_B}"):
        part = client.put(f"{access}/multipart/{upload_id}/1", content=b"theirs", headers={"Authorization": bearer})
        assert part.status_code == 404 and part.json()["error_type"] == "not_found"
        done = client.post(
            f"{access}/multipart/{upload_id}/complete", json={"parts": []}, headers={"Authorization": bearer}
        )
        assert done.status_code == 404
    # B's own upload id cannot be aimed at A's file either
    b_started = client.post(
        "/cdn/files/upload/multipart", headers={"Authorization": f"Bearer {token_b}", "x-fal-file-name": "b.txt"}
    ).json()
    hijack = client.put(
        f"{access}/multipart/{b_started['uploadId']}/1", content=b"x", headers={"Authorization": f"Bearer {token_b}"}
    )
    assert hijack.status_code == 404
    mine = {"Authorization": f"Bearer {token_a}"}
    etag = client.put(f"{access}/multipart/{upload_id}/1", content=b"big upload", headers=mine).json()["etag"]
    done = client.post(
        f"{access}/multipart/{upload_id}/complete", json={"parts": [{"partNumber": 1, "etag": etag}]}, headers=mine
    )
    assert done.status_code == 200
    assert client.get(done.json()["access_url"]).content == b"big upload"
    # fal-client returns the first access_url as the file's URL: signed in its path, it downloads too
    assert "/files/~" in access and "?" not in access
    assert client.get(access).content == b"big upload"
    expires, signature = access.split("/files/~", 1)[1].split("/", 1)[0].split(".")
    for forged in (access.replace(signature, "0" * len(signature)), access.replace(f"~{expires}.", "~9999999999.")):
        assert client.get(forged).status_code == 403
    # as an input of this server, it names the stored file
    assert context(client).files.key_from_url(access) == done.json()["access_url"].split("/files/", 1)[1].split("?")[0]
    # a forged token (another owner under A's signature) is refused
    expires, _owner, signature = token_a.split(".")
    forged = f"{expires}.{key_id(hash_key(KEY_B))}.{signature}"
    assert (
        client.post("/cdn/files/upload", content=b"x", headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    )


def test_ready_names_a_workers_current_request_only_to_the_key_that_submitted_it(client: TestClient) -> None:
    """A request id names its output file (files.base.output_key): another key sees that the worker is busy."""
    job_id = submit(client, A)["request_id"]
    ctx = context(client)
    ctx.store.register_worker(WorkerInfo("gpu-worker", True, time.time(), {"current_job": job_id, "host": "h"}))
    ctx.store.register_worker(WorkerInfo("idle-worker", True, time.time(), {"current_job": None}))

    def details(headers: dict[str, str]) -> dict[str, dict[str, Any]]:
        return {d["id"]: d for d in client.get("/ready", headers=headers).json()["details"]}

    mine, theirs = details(A)["gpu-worker"], details(B)["gpu-worker"]
    assert (mine["current_job"], mine["busy"], mine["host"]) == (job_id, True, "h")
    assert (theirs["current_job"], theirs["busy"], theirs["host"]) == (None, True, "h")
    assert details(B)["idle-worker"]["busy"] is False
    assert "details" not in client.get("/ready").json()
    # Not left queued for the module's later tests, whose stand-in worker claims jobs in queue order.
    assert client.put(f"/{APP}/requests/{job_id}/cancel", headers=A).status_code == 202
    for worker in ("gpu-worker", "idle-worker"):
        ctx.store.remove_worker(worker)


def test_metrics_take_a_key_unless_the_operator_opens_them(client: TestClient, tmp_path: Path) -> None:
    """They name workers and their hosts, which /ready shows only to a key too."""
    refused = client.get("/metrics")
    assert refused.status_code == 401 and refused.json()["error_type"] == "unauthorized"
    assert client.get("/metrics", headers={"Authorization": "Key not-a-key"}).status_code == 401
    served = client.get("/metrics", headers=A)
    assert served.status_code == 200 and "wanserve_jobs" in served.text
    with TestClient(make_app(tmp_path, metrics_open=True), raise_server_exceptions=False) as opened:
        assert opened.get("/metrics").status_code == 200


def test_a_removed_keys_upload_tokens_stop_working_at_once(tmp_path: Path) -> None:
    """A CDN token is signed with the server's secret, which outlives a restart: the key it was given to must still
    be configured, or the token (valid for an hour) would outlast the key's removal."""
    with TestClient(make_app(tmp_path), raise_server_exceptions=False) as before:
        tokens = {
            name: before.post("/rest/storage/auth/token", headers=h).json()["token"] for name, h in (("a", A), ("b", B))
        }
    with TestClient(make_app(tmp_path, api_keys=[KEY_A]), raise_server_exceptions=False) as after:

        def upload(token: str) -> int:
            headers = {"Authorization": f"Bearer {token}", "content-type": "text/plain"}
            return after.post("/cdn/files/upload", content=b"x", headers=headers).status_code

        assert (upload(tokens["a"]), upload(tokens["b"])) == (200, 401)


# --- rate limits ---


def test_submits_over_the_rate_get_429_with_retry_after(tmp_path: Path) -> None:
    app = make_app(tmp_path, rate_limit_per_s=0.5, rate_limit_burst=3, read_rate_limit_per_s=1, read_rate_limit_burst=4)
    with TestClient(app, base_url=BASE) as c:
        ids = [submit(c, A)["request_id"] for _ in range(3)]
        over = c.post(f"/{APP}", json=INPUT, headers=A)
        assert over.status_code == 429
        assert over.json()["error_type"] == "rate_limited" and over.headers["x-fal-error-type"] == "rate_limited"
        assert over.headers["Retry-After"].isdigit() and 1 <= int(over.headers["Retry-After"]) <= 2
        assert c.post(f"/run/{APP}", json=INPUT, headers=A).status_code == 429  # the same budget
        assert c.post("/rest/storage/upload/initiate", json={}, headers=A).status_code == 429
        submit(c, B)  # another key has its own budget
        statuses = [c.get(f"/{APP}/requests/{ids[0]}/status", headers=A).status_code for _ in range(5)]
        assert statuses == [202, 202, 202, 202, 429]
        assert c.get(f"/{APP}/requests/{ids[0]}/status", headers=B).status_code == 404  # B's reads: own budget
        assert c.post(f"/{APP}", json=INPUT).status_code == 401  # auth first: no key, no budget spent


def test_reads_are_counted_per_request_so_a_key_can_follow_many(tmp_path: Path) -> None:
    """fal's Python client polls each request it follows 10 times a second: one budget per key would run out when
    a script follows many at once (its client then raises after 10 refused polls). Each request has its own budget;
    the key's own, looser, bounds a client asking about too many."""
    app = make_app(tmp_path, read_rate_limit_per_s=1, read_rate_limit_burst=2, key_read_rate_limit_per_s=1,
                   key_read_rate_limit_burst=7)  # fmt: skip
    with TestClient(app, base_url=BASE) as c:
        ids = [submit(c, A)["request_id"] for _ in range(3)]

        def status(request_id: str) -> int:
            return c.get(f"/{APP}/requests/{request_id}/status", headers=A).status_code

        assert [status(i) for i in ids for _ in range(2)] == [202] * 6  # 2 each: within every request's budget
        over = c.get(f"/{APP}/requests/{ids[0]}/status", headers=A)
        assert over.status_code == 429 and "about one request" in over.json()["detail"]
        assert status(ids[1] + "-unknown") == 404  # the 7th call the key makes: within its own budget
        over_key = c.get(f"/{APP}/requests/{ids[2]}-other/status", headers=A)
        assert over_key.status_code == 429 and "about one request" not in over_key.json()["detail"]


def test_with_redis_a_keys_rate_holds_across_replicas(
    tmp_path: Path, redis_server: RedisServer, redis_prefix: str
) -> None:
    """Two API replicas on one Redis: a key's budget is one, wherever its calls land (kept per replica, it would be
    one per replica: N replicas, N times the rate)."""
    shared = {"store": redis_server.url, "redis_prefix": redis_prefix, "rate_limit_per_s": 0.5, "rate_limit_burst": 3,
              "read_rate_limit_per_s": 1, "read_rate_limit_burst": 4}  # fmt: skip
    with (
        TestClient(make_app(tmp_path / "a", **shared), base_url=BASE) as a,
        TestClient(make_app(tmp_path / "b", **shared), base_url=BASE) as b,
    ):
        ids = [submit(a, A)["request_id"], submit(b, A)["request_id"], submit(a, A)["request_id"]]
        over = b.post(f"/{APP}", json=INPUT, headers=A)
        assert over.status_code == 429 and over.json()["error_type"] == "rate_limited"
        assert 1 <= int(over.headers["Retry-After"]) <= 2
        submit(b, B)  # another key has its own budget
        replicas = [a, b, a, b, a]
        statuses = [r.get(f"/{APP}/requests/{ids[0]}/status", headers=A).status_code for r in replicas]
        assert statuses == [202, 202, 202, 202, 429]


def test_a_redis_bucket_refills_on_redis_time_and_lets_calls_through_when_redis_is_gone(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    limiter = RedisRateLimiter(client, f"{redis_prefix}:rl", rate_per_s=20, burst=1)
    assert limiter.acquire("k") == 0.0
    assert 0 < limiter.acquire("k") <= 0.05  # a refused call takes nothing: the wait is for one token
    time.sleep(0.06)
    assert limiter.acquire("k") == 0.0
    assert 0 < client.pttl(f"{redis_prefix}:rl:k") <= 2000  # a bucket expires once it would be full again
    gone = RedisRateLimiter.from_url(f"redis://127.0.0.1:{free_port()}", "x", rate_per_s=1, burst=1)
    started = time.monotonic()
    assert [gone.acquire("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert time.monotonic() - started < 1  # at once: no retries (the request meets the job store's own)


def test_token_buckets_refill_and_forget_idle_keys() -> None:
    limiter = RateLimiter(rate_per_s=2, burst=2, max_keys=3)
    assert [limiter.acquire("k", now=0.0) for _ in range(2)] == [0.0, 0.0]
    assert limiter.acquire("k", now=0.0) == pytest.approx(0.5)
    assert limiter.acquire("k", now=0.25) == pytest.approx(0.25)  # a refused call takes nothing
    assert limiter.acquire("k", now=0.5) == 0.0
    assert retry_after_s(0.01) == 1 and retry_after_s(1.2) == 2
    for i in range(10):
        limiter.acquire(f"other{i}", now=1.0)
    assert len(limiter) <= 3  # the least recently used go
    limiter.acquire("x", now=100.0)
    assert len(limiter) == 1  # full buckets are forgotten: the same as new ones
    assert RateLimiter(0, 1).acquire("k") == 0.0  # 0: no limit


# --- queued requests per key ---


def test_a_key_with_too_many_queued_requests_gets_429_and_no_job(tmp_path: Path) -> None:
    with TestClient(make_app(tmp_path, max_queued_per_key=2), base_url=BASE) as c:
        ctx = context(c)
        first, _ = submit(c, A), submit(c, A)
        before = ctx.store.counts()["IN_QUEUE"]
        refused = c.post(f"/{APP}", json=INPUT, headers=A)
        assert refused.status_code == 429 and refused.json()["error_type"] == "too_many_queued"
        assert c.post(f"/run/{APP}", json=INPUT, headers=A).status_code == 429
        assert ctx.store.counts()["IN_QUEUE"] == before  # nothing was created
        submit(c, B)  # B's queue is B's
        assert c.put(first["cancel_url"].removeprefix(BASE), headers=A).status_code == 202
        submit(c, A)  # room again


# --- without keys: as before ---


def test_an_output_stored_as_a_url_before_references_is_still_signed(client: TestClient) -> None:
    ctx = context(client)
    rid = submit(client, A)["request_id"]
    key = complete_with_video(ctx, rid, b"older", stored_as="url")
    assert ctx.store.get(rid).output["video"]["url"] == f"{BASE}/files/{key}"  # type: ignore[index, union-attr]
    path, query = signed_parts(client.get(f"/{APP}/requests/{rid}", headers=A).json()["video"]["url"])
    assert path == f"/files/{key}" and set(query) == {"exp", "sig"}
    assert client.get(path, params=query).content == b"older"


def test_a_stored_output_gets_the_public_url_of_the_server_reading_it(tmp_path: Path) -> None:
    """The public URL changed (a new domain) between the run and the read: the result names the new one. With
    URLs stored whole, every earlier result kept pointing at the old address."""
    old, new = "http://old.example", "https://new.example/wan"  # a proxy in front may add a path
    with TestClient(make_app(tmp_path, api_keys=[], public_url=old), base_url="http://old.example") as c:
        rid = submit(c, {})["request_id"]
        key = complete_with_video(context(c), rid, b"moved")
        assert c.get(f"/{APP}/requests/{rid}").json()["video"]["url"] == f"http://old.example/files/{key}"
    with TestClient(make_app(tmp_path, api_keys=[], public_url=new), base_url="https://new.example") as c:
        url = c.get(f"/{APP}/requests/{rid}").json()["video"]["url"]
        assert url == f"https://new.example/wan/files/{key}"
        assert c.get(f"/files/{key}").content == b"moved"


def test_without_keys_urls_stay_plain_and_files_open(tmp_path: Path) -> None:
    with TestClient(make_app(tmp_path, api_keys=[]), base_url=BASE) as c:
        ctx = context(c)
        assert not ctx.api_keys.enabled
        rid = submit(c, {})["request_id"]
        assert ctx.store.get(rid).owner is None  # type: ignore[union-attr]
        key = complete_with_video(ctx, rid, b"open")
        url = c.get(f"/{APP}/requests/{rid}").json()["video"]["url"]
        assert url == f"{BASE}/files/{key}"
        assert c.get(url).content == b"open"


@pytest.mark.parametrize("keys", [True, False], ids=["keys", "no-keys"])
def test_webhook_payloads_carry_urls_the_receiver_can_download(
    tmp_path: Path, receiver: tuple[Any, str], keys: bool
) -> None:
    delivered, hook_url = receiver
    # allow_private_urls: the receiver is on loopback
    overrides: dict[str, Any] = {"allow_private_urls": True} | ({} if keys else {"api_keys": []})
    with TestClient(make_app(tmp_path, **overrides), base_url=BASE) as client:
        headers = A if keys else {}
        response = client.post(f"/{APP}", params={"fal_webhook": hook_url}, json=INPUT, headers=headers)
        assert response.status_code == 200, response.text
        complete_with_video(context(client), response.json()["request_id"], b"the video")
        deadline = time.monotonic() + 20
        while not delivered.deliveries and time.monotonic() < deadline:
            time.sleep(0.05)
        assert delivered.deliveries, "the webhook was never delivered"
        url = json.loads(delivered.deliveries[0][2])["payload"]["video"]["url"]
        assert url.startswith(f"{BASE}/files/")  # a whole URL, not the stored reference
        path, query = signed_parts(url)
        assert ({"exp", "sig"} <= set(query)) is keys
        download = client.get(path, params=query)  # no Authorization header: the signature is the permission
        assert download.status_code == 200 and download.content == b"the video"


def test_a_lora_url_of_this_servers_files_needs_the_signature_a_download_would(client: TestClient) -> None:
    """The worker reads this server's files by key: a bare URL (or one whose signature expired) of another key's
    upload, answered 403 as a download, was taken as a LoRA input all the same."""
    target = client.post(
        "/rest/storage/upload/initiate", json={"file_name": "style.safetensors", "content_type": "x/y"}, headers=A
    ).json()
    assert client.put(target["upload_url"], content=b"weights").status_code == 200
    signed = target["file_url"]
    key = signed.split("/files/", 1)[1].split("?")[0]
    expires = parse_qs(urlsplit(signed).query)["exp"][0]
    expired_sig = context(client).url_signer.sign("file", key, "1000")
    path_signed = f"{BASE}/files/~{expires}.{parse_qs(urlsplit(signed).query)['sig'][0]}/{key}"

    def lora_submit(path: str) -> Any:
        body = {**INPUT, "loras": [{"path": path}]}
        return client.post(f"/{APP}/lora", json=body, headers=B)

    for refused in (signed.split("?")[0], f"{BASE}/files/{key}?exp=1000&sig={expired_sig}"):
        answer = lora_submit(refused)
        assert answer.status_code == 422, answer.text
        (error,) = answer.json()["detail"]
        assert error["loc"] == ["body", "loras", 0, "path"] and "not signed" in error["msg"]
    for accepted in (signed, path_signed):
        assert lora_submit(accepted).status_code == 200
