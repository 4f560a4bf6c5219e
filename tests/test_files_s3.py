"""S3FileStore against a real S3 API (moto's server): layout in the bucket, expiry markers, multipart with S3's
own rules, presigned URLs, error mapping; then the /files/ route of a live app on `--files s3://...`."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import fal_client
import fal_client.client as fal_module
import httpx
import pytest
import uvicorn
from boto3.s3.transfer import TransferConfig
from file_checks import assert_conditional_requests, assert_served_with_its_own_type
from s3_server import PUBLIC, REGION, bucket_keys, s3_client, s3_store

from wanserve.api.app import create_app
from wanserve.client.fal import use_wanserve
from wanserve.client.local_server import free_port
from wanserve.config import Settings
from wanserve.errors import FileNotFound, InvalidFileKey, InvalidUpload, StorageUnavailable
from wanserve.files.base import ABANDONED_UPLOAD_S, new_key
from wanserve.files.s3 import S3FileStore

T0 = 1_700_000_000.0
MiB = 1 << 20
ROOT = "wanserve/files/"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def fs(s3_endpoint: str, s3_bucket: str) -> S3FileStore:
    return s3_store(s3_endpoint, s3_bucket)


@pytest.fixture
def keys(s3_endpoint: str, s3_bucket: str) -> Callable[[], list[str]]:
    """Lists what the store has left in its bucket."""
    return lambda: bucket_keys(s3_endpoint, s3_bucket)


# --- put / stat / open ---


def test_a_put_that_fails_after_its_upload_can_be_tried_again(
    fs: S3FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker retries a put through an S3 outage: one whose upload went through but whose check after it failed
    must leave its source file, or the retry finds nothing to upload and a rendered video is lost."""
    source = tmp_path / "video.mp4"
    source.write_bytes(b"frames" * 1000)
    real_head, calls = fs._head, []

    def head_once_unavailable(key: str) -> object:
        calls.append(key)
        if len(calls) == 1:
            raise StorageUnavailable("the file store failed (HeadObject: 503)", transient=True)
        return real_head(key)

    monkeypatch.setattr(fs, "_head", head_once_unavailable)
    key = new_key("video.mp4")
    with pytest.raises(StorageUnavailable):
        fs.put(key, source, "video/mp4", None, T0)
    assert source.exists()
    stored = fs.put(key, source, "video/mp4", None, T0)
    assert stored.size == 6000 and not source.exists()  # consumed once stored


def test_put_bytes_is_one_object_with_its_metadata(fs: S3FileStore, keys: Callable[[], list[str]]) -> None:
    data = b"\x00video\xff" * 999
    key = new_key("clip.mp4")
    stored = fs.put(key, data, "video/mp4", T0 + 60, T0)
    assert (stored.key, stored.content_type, stored.size, stored.file_name) == (key, "video/mp4", len(data), "clip.mp4")
    assert (stored.created_at, stored.expires_at, stored.etag) == (T0, T0 + 60, md5(data))
    assert fs.stat(key, T0) == stored  # times survive S3 metadata exactly
    with fs.open(key) as f:
        assert f.read() == data
    assert fs.local_path(stored) is None
    marker = f"{ROOT}.expiry/{int(T0) + 60:012d}/{key.replace('/', '~')}"
    assert keys() == sorted([marker, ROOT + key])  # the prefix joined with exactly one "/" (listed in key order)


def test_put_path_uploads_and_consumes_the_file(fs: S3FileStore, keys: Callable[[], list[str]], tmp_path: Path) -> None:
    src = tmp_path / "render.mp4"
    src.write_bytes(b"mp4 bytes" * 1000)
    key = new_key(src.name)
    stored = fs.put(key, src, "video/mp4", None, T0)
    assert not src.exists()
    assert stored.size == 9000 and stored.etag == md5(b"mp4 bytes" * 1000) and stored.expires_at is None
    with fs.open(key) as f:
        assert f.read() == b"mp4 bytes" * 1000
    assert keys() == [ROOT + key]  # no expiry, no marker


def test_large_path_goes_up_in_parts_with_its_metadata(fs: S3FileStore, tmp_path: Path) -> None:
    fs.transfer = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    data = bytes(range(256)) * (11 * MiB // 256)
    src = tmp_path / "big.mp4"
    src.write_bytes(data)
    key = new_key("big.mp4")
    stored = fs.put(key, src, "video/mp4", T0 + 5, T0)
    assert stored.etag.endswith("-3")  # S3 joined three parts
    assert (stored.size, stored.content_type, stored.created_at, stored.expires_at) == (
        len(data),
        "video/mp4",
        T0,
        T0 + 5,
    )
    with fs.open(key) as f:
        assert hashlib.md5(f.read()).hexdigest() == md5(data)


def test_open_a_byte_range(fs: S3FileStore) -> None:
    key = new_key("x.bin")
    fs.put(key, bytes(range(100)), "application/octet-stream", None, T0)
    with fs.open(key, (10, 19)) as f:
        assert f.read() == bytes(range(10, 20))
    with fs.open(key, (95, 99)) as f:
        assert f.read() == bytes(range(95, 100))


def test_missing_file(fs: S3FileStore) -> None:
    key = new_key("nothing.bin")
    with pytest.raises(FileNotFound):
        fs.stat(key, T0)
    with pytest.raises(FileNotFound):
        fs.open(key)
    with pytest.raises(FileNotFound):
        fs.download_url(key, T0)
    fs.delete(key)  # nothing to do is not an error


def test_delete_removes_the_object_and_its_marker(fs: S3FileStore, keys: Callable[[], list[str]]) -> None:
    key = new_key("x.txt")
    fs.put(key, b"x", "text/plain", T0 + 60, T0)
    fs.delete(key)
    with pytest.raises(FileNotFound):
        fs.stat(key, T0)
    assert keys() == []


def test_url_and_key_from_url_round_trip(fs: S3FileStore) -> None:
    key = new_key("a b.png")
    assert fs.url(key) == f"{PUBLIC}/files/{key}"  # stable: never a presigned URL
    assert fs.key_from_url(fs.url(key)) == key
    assert fs.key_from_url(f"{PUBLIC}/files/../x/y") is None
    assert fs.key_from_url(f"http://{fs.bucket}.s3.amazonaws.com/{ROOT}{key}") is None


@pytest.mark.parametrize("bad", ["../x", "abcdefgh12/../x", "a/b/c", "/abs/olute", "abcdefgh12/x\n", ".expiry/x"])
def test_bad_keys_never_reach_s3(fs: S3FileStore, keys: Callable[[], list[str]], bad: str) -> None:
    for call in (
        lambda: fs.put(bad, b"x", "text/plain", T0 + 1, T0),
        lambda: fs.stat(bad, T0),
        lambda: fs.open(bad),
        lambda: fs.download_url(bad, T0),
        lambda: fs.delete(bad),
        lambda: fs.url(bad),
        lambda: fs.create_multipart(bad, "x/y", T0 + 1),
    ):
        with pytest.raises(InvalidFileKey):
            call()
    assert keys() == []


@pytest.mark.parametrize("bad_id", ["../.multipart/x", "short", "A" * 24 + "\n", "A" * 20 + ".json"])
def test_bad_upload_ids_never_reach_s3(fs: S3FileStore, bad_id: str) -> None:
    with pytest.raises(InvalidUpload):
        fs.put_part(bad_id, 1, b"x")
    with pytest.raises(InvalidUpload):
        fs.complete_multipart(bad_id, [(1, "")], T0)


# --- expiry ---


def test_sweep_lists_only_due_markers_and_deletes_exactly_the_expired(
    fs: S3FileStore, keys: Callable[[], list[str]]
) -> None:
    expired = [new_key(f"old{i}.txt") for i in range(3)]
    later, forever, restored = new_key("later.txt"), new_key("forever.txt"), new_key("again.txt")
    for key in expired:
        fs.put(key, b"old", "text/plain", T0 + 10, T0)
    fs.put(later, b"new", "text/plain", T0 + 1000, T0)
    fs.put(forever, b"new", "text/plain", None, T0)
    fs.put(restored, b"v1", "text/plain", T0 + 10, T0)
    fs.put(restored, b"v2", "text/plain", None, T0)  # stored again, without expiry: its old marker is stale
    with pytest.raises(FileNotFound):
        fs.stat(expired[0], T0 + 10)
    assert fs.stat(expired[0], T0 + 9.5).size == 3
    assert fs.sweep_expired(T0 + 9) == 0
    assert fs.sweep_expired(T0 + 10) == 3
    for key in (later, forever, restored):
        assert fs.stat(key, T0 + 10).size in (2, 3)
    assert keys() == sorted(
        [f"{ROOT}.expiry/{int(T0) + 1000:012d}/{later.replace('/', '~')}"]
        + [ROOT + k for k in (later, forever, restored)]
    )
    assert fs.sweep_expired(T0 + 10) == 0


def test_fractional_expiry_is_swept_once_its_whole_second_passes(fs: S3FileStore) -> None:
    key = new_key("x.txt")
    fs.put(key, b"x", "text/plain", T0 + 0.5, T0)
    with pytest.raises(FileNotFound):
        fs.stat(key, T0 + 0.5)  # expired to readers at once
    assert fs.sweep_expired(T0 + 0.7) == 0  # its marker (second T0 + 1) is not due yet
    assert fs.sweep_expired(T0 + 1) == 1


def test_a_file_due_before_its_upload_ends_is_still_swept(fs: S3FileStore, keys: Callable[[], list[str]]) -> None:
    # The sweeps' clock is set before moto's date for every upload (2010-11-10), so they do not abort this one.
    now = 1_289_000_000.0
    key = new_key("x.bin")
    upload_id = fs.create_multipart(key, "x/y", now - 1)
    fs.put_part(upload_id, 1, b"slow")
    assert fs.sweep_expired(now) == 0  # no object yet: its marker goes
    assert [k for k in keys() if ".expiry/" in k] == []
    fs.complete_multipart(upload_id, [(1, "")], now)
    with pytest.raises(FileNotFound):
        fs.stat(key, now)
    assert fs.sweep_expired(now) == 1
    assert keys() == []


def test_sweep_aborts_multipart_uploads_abandoned_for_a_day(
    fs: S3FileStore, keys: Callable[[], list[str]], s3_endpoint: str
) -> None:
    # (Only the abandoned side: moto dates every upload to 2010, so it cannot show a fresh one kept.)
    abandoned = fs.create_multipart(new_key("old.bin"), "x/y", None)
    fs.put_part(abandoned, 1, b"part")
    uploads = s3_client(s3_endpoint).list_multipart_uploads
    assert len(uploads(Bucket=fs.bucket)["Uploads"]) == 1 and len(keys()) == 1
    assert fs.sweep_expired(time.time() + ABANDONED_UPLOAD_S + 60) == 0
    assert uploads(Bucket=fs.bucket).get("Uploads", []) == []
    assert keys() == []  # its state is gone too
    with pytest.raises(FileNotFound):
        fs.put_part(abandoned, 3, b"late")


# --- multipart ---


def test_multipart_joins_two_parts_in_order(fs: S3FileStore, keys: Callable[[], list[str]]) -> None:
    key = new_key("big.bin")
    upload_id = fs.create_multipart(key, "application/octet-stream", T0 + 600)
    first, second = b"A" * (5 * MiB), b"B" * 1000
    e2 = fs.put_part(upload_id, 2, second)  # parts arrive in any order
    e1 = fs.put_part(upload_id, 1, first)
    assert (e1, e2) == (md5(first), md5(second))
    stored = fs.complete_multipart(upload_id, [(2, f'"{e2}"'), (1, e1)], T0)
    assert stored.size == len(first) + len(second) and stored.etag.endswith("-2")
    assert stored.content_type == "application/octet-stream" and stored.expires_at == T0 + 600
    with fs.open(key) as f:
        assert f.read() == first + second
    assert fs.stat(key, T0) == stored
    assert not [k for k in keys() if ".multipart/" in k]
    with pytest.raises(FileNotFound):
        fs.complete_multipart(upload_id, [(1, e1)], T0)


@pytest.mark.parametrize("numbers", [[1, 3], [2, 3], [1, 1], [0, 1], []])
def test_multipart_rejects_gaps_duplicates_and_empty(fs: S3FileStore, numbers: list[int]) -> None:
    key = new_key("x.bin")
    upload_id = fs.create_multipart(key, "x/y", None)
    for n in (1, 2, 3):
        fs.put_part(upload_id, n, b"p%d" % n)
    with pytest.raises(InvalidUpload, match=r"without gaps|at least one"):
        fs.complete_multipart(upload_id, [(n, "") for n in numbers], T0)
    with pytest.raises(FileNotFound):
        fs.stat(key, T0)


def test_multipart_rejects_a_wrong_etag_and_a_missing_part(fs: S3FileStore) -> None:
    key = new_key("x.bin")
    upload_id = fs.create_multipart(key, "x/y", None)
    e1 = fs.put_part(upload_id, 1, b"one")
    with pytest.raises(InvalidUpload, match="part 2 was never uploaded"):
        fs.complete_multipart(upload_id, [(1, e1), (2, "")], T0)
    fs.put_part(upload_id, 2, b"two")
    with pytest.raises(InvalidUpload, match="part 2: ETag"):
        fs.complete_multipart(upload_id, [(1, e1), (2, md5(b"not two"))], T0)
    with pytest.raises(FileNotFound):
        fs.stat(key, T0)
    stored = fs.complete_multipart(upload_id, [(1, "")], T0)  # still completable, ETags optional
    assert stored.size == 3


def test_a_small_part_before_the_last_is_a_clear_refusal(fs: S3FileStore) -> None:
    upload_id = fs.create_multipart(new_key("x.bin"), "x/y", None)
    fs.put_part(upload_id, 1, b"small")
    fs.put_part(upload_id, 2, b"last")
    with pytest.raises(InvalidUpload, match="at least 5 MiB"):
        fs.complete_multipart(upload_id, [(1, ""), (2, "")], T0)


def test_multipart_part_number_bounds(fs: S3FileStore) -> None:
    upload_id = fs.create_multipart(new_key("x.bin"), "x/y", None)
    for n in (0, -1, 10_001):
        with pytest.raises(InvalidUpload):
            fs.put_part(upload_id, n, b"x")
    with pytest.raises(FileNotFound):
        fs.put_part("A" * 24, 1, b"x")


def test_multipart_state_lives_in_the_bucket_only(s3_endpoint: str, s3_bucket: str) -> None:
    """Each step on a new store (another replica, or this one restarted) with its own client."""

    def replica() -> S3FileStore:
        return S3FileStore(s3_bucket, "wanserve/files", PUBLIC, endpoint_url=s3_endpoint, region=REGION)

    key = new_key("x.bin")
    upload_id = replica().create_multipart(key, "video/mp4", None)
    e1 = replica().put_part(upload_id, 1, b"1" * (5 * MiB))
    e2 = replica().put_part(upload_id, 2, b"2")
    stored = replica().complete_multipart(upload_id, [(1, e1), (2, e2)], T0)
    assert stored.size == 5 * MiB + 1 and stored.content_type == "video/mp4"
    state = [k for k in bucket_keys(s3_endpoint, s3_bucket) if ".multipart/" in k]
    assert state == []


# --- delivery, settings, failures ---


def test_presigned_download_url_serves_the_bytes(fs: S3FileStore, s3_endpoint: str) -> None:
    data = b"\x89PNG" + bytes(range(256)) * 4
    key = new_key("still.png")
    fs.put(key, data, "image/png", None, T0)
    url = fs.download_url(key, time.time())
    assert url is not None and url.startswith(f"{s3_endpoint}/{fs.bucket}/{ROOT}{key}?")
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == data
    assert response.headers["content-type"] == "image/png"
    assert response.headers["content-disposition"] == 'inline; filename="still.png"'
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["3600"]
    # `?download=1` on the file route: S3 sends it as an attachment, which a browser saves across origins
    saved = fs.download_url(key, time.time(), attachment=True)
    assert saved is not None and httpx.get(saved).headers["content-disposition"] == 'attachment; filename="still.png"'


def test_presigned_url_never_outlives_the_file(fs: S3FileStore) -> None:
    key = new_key("x.txt")
    now = time.time()
    fs.put(key, b"x", "text/plain", now + 90.5, now)
    url = fs.download_url(key, now)
    assert url is not None and parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["91"]
    with pytest.raises(FileNotFound):
        fs.download_url(key, now + 91)


def test_stream_delivery_offers_no_direct_url(s3_endpoint: str, s3_bucket: str) -> None:
    fs = s3_store(s3_endpoint, s3_bucket, delivery="stream")
    key = new_key("x.txt")
    fs.put(key, b"x", "text/plain", None, T0)
    assert fs.download_url(key, T0) is None


def test_from_settings(s3_endpoint: str, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        public_url="https://video.example/",
        files="s3://my-bucket/deep/prefix/",
        s3_endpoint_url=s3_endpoint,
        s3_region=REGION,
        s3_delivery="stream",
        s3_presign_s=600,
    )
    fs = S3FileStore.from_settings(settings)
    assert (fs.bucket, fs.root, fs.delivery, fs.presign_s) == ("my-bucket", "deep/prefix/", "stream", 600)
    assert fs.url("abcdefgh12/x.mp4") == "https://video.example/files/abcdefgh12/x.mp4"
    assert fs._client.meta.endpoint_url == s3_endpoint and fs._client.meta.region_name == REGION
    bare = S3FileStore.from_settings(settings.model_copy(update={"files": "s3://my-bucket"}))
    assert bare.root == ""


def test_an_unusable_bucket_is_a_503_naming_the_cause(s3_endpoint: str) -> None:
    fs = s3_store(s3_endpoint, "no-such-bucket-here")
    with pytest.raises(StorageUnavailable, match="NoSuchBucket") as err:
        fs.put(new_key("x.txt"), b"x", "text/plain", None, T0)
    assert err.value.http_status == 503
    assert not err.value.transient  # the operator's to fix: a worker does not wait for it to change
    unreachable = s3_store("http://127.0.0.1:9", "my-bucket")  # nothing listens on the discard port
    unreachable._client.meta.config.retries = {"max_attempts": 0}
    with pytest.raises(StorageUnavailable) as err:
        unreachable.put(new_key("x.txt"), b"x", "text/plain", None, T0)
    assert err.value.transient


# --- the /files/ route of a live app on S3 ---


@contextmanager
def live_app(settings: Settings) -> Iterator[str]:
    """The app on uvicorn in a thread (the official client needs a real URL); yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(create_app(settings, workers=0), port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.01)
    try:
        yield settings.resolved_public_url()
    finally:
        server.should_exit = True
        thread.join(10)


def s3_settings(tmp_path: Path, endpoint: str, bucket: str, delivery: str | None = None) -> Settings:
    """`delivery` None: the default."""
    port = free_port()
    return Settings(
        data_dir=tmp_path / "data",
        port=port,
        public_url=f"http://127.0.0.1:{port}",
        files=f"s3://{bucket}/served",
        s3_endpoint_url=endpoint,
        s3_region=REGION,
        **({} if delivery is None else {"s3_delivery": delivery}),
    )


def expired_file_404s(base: str, settings: Settings) -> None:
    fs = S3FileStore.from_settings(settings)
    key = new_key("gone.txt")
    fs.put(key, b"gone", "text/plain", time.time() - 1, time.time() - 2)
    for method in ("GET", "HEAD"):
        response = httpx.request(method, f"{base}/files/{key}")
        assert response.status_code == 404


def test_api_redirects_to_a_presigned_url(
    tmp_path: Path, s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = s3_settings(tmp_path, s3_endpoint, s3_bucket, "redirect")
    upload = tmp_path / "still.png"
    data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
    upload.write_bytes(data)
    for name in ("QUEUE_URL_FORMAT", "RUN_URL_FORMAT", "REST_URL", "CDN_URL", "REALTIME_URL_FORMAT"):
        monkeypatch.setattr(fal_module, name, getattr(fal_module, name))  # put back after the test
    monkeypatch.setenv("FAL_KEY", "wanserve")
    with live_app(settings) as base:
        use_wanserve(base)
        url = fal_client.SyncClient(key="wanserve").upload_file(upload)  # the CDN flow, into S3
        assert url.startswith(f"{base}/files/") and url.endswith("/still.png")
        key = url.removeprefix(f"{base}/files/")
        assert bucket_keys(s3_endpoint, s3_bucket) == [f"served/{key}"]

        redirect = httpx.get(url)
        assert redirect.status_code == 307 and redirect.headers["cache-control"] == "no-store, private"
        assert redirect.headers["location"].startswith(f"{s3_endpoint}/{s3_bucket}/served/{key}?")
        followed = httpx.get(url, follow_redirects=True)
        assert followed.status_code == 200 and followed.content == data
        assert followed.headers["content-type"] == "image/png"

        head = httpx.head(url)  # answered by the API: a presigned GET does not sign HEAD
        assert head.status_code == 200 and head.headers["content-length"] == str(len(data))
        assert httpx.get(f"{base}/files/{new_key('never.bin')}").status_code == 404
        expired_file_404s(base, settings)


def test_api_streams_from_s3_with_ranges(tmp_path: Path, s3_endpoint: str, s3_bucket: str) -> None:
    """The default delivery: a plain GET (httpx follows no redirect by default) gets the bytes, as from fal's CDN."""
    settings = s3_settings(tmp_path, s3_endpoint, s3_bucket)
    data = bytes(range(256)) * 4
    with live_app(settings) as base:
        initiated = httpx.post(
            f"{base}/rest/storage/upload/initiate", json={"content_type": "video/mp4", "file_name": "clip.mp4"}
        ).json()
        assert httpx.put(initiated["upload_url"], content=data).status_code == 200
        url = initiated["file_url"]

        whole = httpx.get(url)
        assert whole.status_code == 200 and whole.content == data
        assert whole.headers["content-type"] == "video/mp4" and whole.headers["content-length"] == str(len(data))
        assert whole.headers["accept-ranges"] == "bytes" and whole.headers["x-content-type-options"] == "nosniff"

        part = httpx.get(url, headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == data[10:20]
        assert part.headers["content-range"] == f"bytes 10-19/{len(data)}" and part.headers["content-length"] == "10"
        tail = httpx.get(url, headers={"Range": "bytes=-6"})
        assert tail.status_code == 206 and tail.content == data[-6:]
        open_ended = httpx.get(url, headers={"Range": "bytes=1000-"})
        assert open_ended.status_code == 206 and open_ended.content == data[1000:]
        assert httpx.get(url, headers={"Range": "bytes=5000-"}).status_code == 416
        one_left = httpx.get(url, headers={"Range": "bytes=5000-, 10-19"})  # the unsatisfiable range is ignored
        assert one_left.status_code == 206 and one_left.content == data[10:20]
        several = httpx.get(url, headers={"Range": "bytes=0-1, 10-19"})  # answered whole, as a server may
        assert several.status_code == 200 and several.content == data
        other_version = httpx.get(url, headers={"Range": "bytes=10-19", "If-Range": '"another-version"'})
        assert other_version.status_code == 200 and other_version.content == data
        same_version = httpx.get(url, headers={"Range": "bytes=10-19", "If-Range": whole.headers["etag"]})
        assert same_version.status_code == 206 and same_version.content == data[10:20]

        head = httpx.head(url, headers={"Range": "bytes=0-9"})
        assert head.status_code == 206 and head.headers["content-length"] == "10" and head.content == b""
        assert_conditional_requests(url, data)
        assert_served_with_its_own_type(base)
        expired_file_404s(base, settings)
