"""The FileStore contract: what the API and the workers rely on, run against every store (the local directory
and S3 through a real S3 API). A store-specific detail (layout, atomicity tricks) belongs in its own tests."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from s3_server import PUBLIC, s3_store

from wanserve.errors import FileNotFound, InvalidFileKey, InvalidUpload, PayloadTooLarge
from wanserve.files.base import FileStore, new_key
from wanserve.files.local import LocalFileStore

T0 = 1_700_000_000.0
MiB = 1 << 20

OpenStore = Callable[[], FileStore]


@pytest.fixture(params=["local", "s3"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> OpenStore:
    """Opens a store over the same storage each call: a second one is another replica (or a restart)."""
    if request.param == "local":
        return lambda: LocalFileStore(tmp_path / "files", PUBLIC)
    endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
    return lambda: s3_store(endpoint, bucket)


@pytest.fixture
def fs(open_store: OpenStore) -> FileStore:
    return open_store()


def read(fs: FileStore, key: str, byte_range: tuple[int, int] | None = None) -> bytes:
    with fs.open(key, byte_range) as f:
        return f.read()


def test_put_stat_open_round_trip(fs: FileStore) -> None:
    data = b"\x00video\xff" * 5000
    key = new_key("clip.mp4")
    stored = fs.put(key, data, "video/mp4", T0 + 60, T0)
    assert (stored.key, stored.content_type, stored.size, stored.file_name) == (key, "video/mp4", len(data), "clip.mp4")
    assert (stored.created_at, stored.expires_at) == (T0, T0 + 60)
    assert fs.stat(key, T0) == stored
    assert read(fs, key) == data
    assert read(fs, key, (3, 9)) == data[3:10] and read(fs, key, (len(data) - 2, len(data) - 1)) == data[-2:]


def test_put_from_a_file(fs: FileStore, tmp_path: Path) -> None:
    src = tmp_path / "render.mp4"
    src.write_bytes(b"frames" * 3000)
    key = new_key("render.mp4")
    assert fs.put(key, src, "video/mp4", None, T0).size == 18000
    assert read(fs, key) == b"frames" * 3000 and fs.stat(key, T0 + 10**9).expires_at is None


def test_etag_names_the_content(fs: FileStore) -> None:
    one, two = new_key("a.txt"), new_key("b.txt")
    etag = fs.put(one, b"one", "text/plain", None, T0).etag
    assert etag and fs.stat(one, T0).etag == etag
    assert fs.put(two, b"two", "text/plain", None, T0).etag != etag


def test_missing_and_deleted_files_are_not_found(fs: FileStore) -> None:
    key = new_key("x.txt")
    for call in (lambda: fs.stat(key, T0), lambda: fs.open(key)):
        with pytest.raises(FileNotFound):
            call()
    fs.put(key, b"x", "text/plain", T0 + 60, T0)
    fs.delete(key)
    with pytest.raises(FileNotFound):
        fs.stat(key, T0)
    fs.delete(key)  # idempotent
    assert fs.sweep_expired(T0 + 61) == 0  # a deleted file is not swept again


def test_url_and_key_from_url(fs: FileStore) -> None:
    key = new_key("a b.png")
    assert fs.url(key) == f"{PUBLIC}/files/{key}"
    assert fs.key_from_url(fs.url(key)) == key and fs.key_from_url(fs.url(key) + "?x=1") == key
    for foreign in ("http://elsewhere.test/base/files/abcdefgh12/x.png", f"{PUBLIC}/files/abcdefgh12/../x"):
        assert fs.key_from_url(foreign) is None


@pytest.mark.parametrize("bad", ["../x", "abcdefgh12/../x", "a/b/c", "/etc/passwd", "abcdefgh12/x\n"])
def test_bad_keys_are_refused(fs: FileStore, bad: str) -> None:
    for call in (
        lambda: fs.put(bad, b"x", "text/plain", None, T0),
        lambda: fs.stat(bad, T0),
        lambda: fs.open(bad),
        lambda: fs.url(bad),
        lambda: fs.create_multipart(bad, "x/y", None),
    ):
        with pytest.raises(InvalidFileKey):
            call()


def test_expiry_hides_then_sweep_deletes_exactly_the_due(fs: FileStore) -> None:
    due = [new_key(f"old{i}.txt") for i in range(3)]
    later, forever = new_key("later.txt"), new_key("forever.txt")
    for key in due:
        fs.put(key, b"old", "text/plain", T0 + 10, T0)
    fs.put(later, b"new", "text/plain", T0 + 1000, T0)
    fs.put(forever, b"new", "text/plain", None, T0)
    assert fs.stat(due[0], T0 + 9.9).size == 3
    with pytest.raises(FileNotFound):
        fs.stat(due[0], T0 + 10)
    assert fs.sweep_expired(T0 + 9) == 0
    assert fs.sweep_expired(T0 + 10) == 3
    assert fs.sweep_expired(T0 + 10) == 0
    for key in due:
        with pytest.raises(FileNotFound):
            fs.open(key)  # the bytes are gone, not just hidden
    assert fs.stat(later, T0 + 10).size == 3 and fs.stat(forever, T0 + 10**9).size == 3


def test_download_url_when_given_serves_the_bytes(fs: FileStore) -> None:
    key = new_key("x.bin")
    fs.put(key, b"direct", "application/octet-stream", None, T0)
    url = fs.download_url(key, time.time())
    if isinstance(fs, LocalFileStore):
        assert url is None  # the API serves local files itself
    else:  # S3 with redirect delivery (s3_store's default) gives a presigned URL
        assert url is not None and httpx.get(url).content == b"direct"


def test_multipart_joins_parts_in_number_order(open_store: OpenStore) -> None:
    key = new_key("big.bin")
    upload_id = open_store().create_multipart(key, "video/mp4", T0 + 600)
    first, second = b"1" * (5 * MiB), b"2" * 100  # S3's minimum for all parts but the last
    e2 = open_store().put_part(upload_id, 2, second)
    e1 = open_store().put_part(upload_id, 1, first)
    assert (e1, e2) == (hashlib.md5(first).hexdigest(), hashlib.md5(second).hexdigest())
    fs = open_store()  # every step on another replica: the upload's state is shared
    stored = fs.complete_multipart(upload_id, [(2, f'"{e2}"'), (1, e1)], T0)
    assert stored.size == len(first) + len(second)
    assert (stored.content_type, stored.expires_at, stored.file_name) == ("video/mp4", T0 + 600, "big.bin")
    assert fs.stat(key, T0) == stored and read(fs, key) == first + second
    with pytest.raises(FileNotFound):
        fs.complete_multipart(upload_id, [(1, e1)], T0)


def test_a_part_given_as_a_file_is_the_same_part_as_its_bytes(fs: FileStore, tmp_path: Path) -> None:
    """The API stages a part's body in a file (parts in flight never sit in memory) and hands the store that file."""
    key = new_key("from-files.bin")
    upload_id = fs.create_multipart(key, "x/y", None)
    first, second = bytes(range(256)) * (5 * MiB // 256), b"tail"
    staged = tmp_path / "part-1"
    staged.write_bytes(first)
    e1 = fs.put_part(upload_id, 1, staged, max_total=len(first) + len(second))
    e2 = fs.put_part(upload_id, 2, second)
    assert e1 == hashlib.md5(first).hexdigest()
    assert fs.complete_multipart(upload_id, [(1, e1), (2, e2)], T0).size == len(first) + len(second)
    assert read(fs, key) == first + second
    over = tmp_path / "part-2"
    over.write_bytes(b"x" * 10)
    other = fs.create_multipart(new_key("over.bin"), "x/y", None)
    with pytest.raises(PayloadTooLarge):
        fs.put_part(other, 1, over, max_total=9)


def test_multipart_refusals_leave_the_upload_completable(fs: FileStore) -> None:
    key = new_key("x.bin")
    upload_id = fs.create_multipart(key, "x/y", None)
    e1 = fs.put_part(upload_id, 1, b"one")
    fs.put_part(upload_id, 3, b"three")
    for parts in ([(1, e1), (3, "")], [(2, "")], [(1, e1), (1, e1)], []):
        with pytest.raises(InvalidUpload):
            fs.complete_multipart(upload_id, parts, T0)
    with pytest.raises(InvalidUpload, match="part 2 was never uploaded"):
        fs.complete_multipart(upload_id, [(1, e1), (2, "")], T0)
    with pytest.raises(InvalidUpload, match="part 1: ETag"):
        fs.complete_multipart(upload_id, [(1, hashlib.md5(b"other").hexdigest())], T0)
    with pytest.raises(FileNotFound):
        fs.stat(key, T0)
    assert fs.complete_multipart(upload_id, [(1, e1)], T0).size == 3
    assert read(fs, key) == b"one"


def test_multipart_parts_are_held_to_a_total(open_store: OpenStore) -> None:
    key = new_key("x.bin")
    limit = 6 * MiB  # parts but the last are at least 5 MiB on S3
    upload_id = open_store().create_multipart(key, "x/y", None)
    open_store().put_part(upload_id, 1, b"a" * (5 * MiB + 1), max_total=limit)
    with pytest.raises(PayloadTooLarge):
        open_store().put_part(upload_id, 2, b"b" * MiB, max_total=limit)  # counted on another replica too
    open_store().put_part(upload_id, 1, b"a" * (5 * MiB), max_total=limit)  # a part sent again replaces its bytes
    e2 = open_store().put_part(upload_id, 2, b"b" * MiB, max_total=limit)  # exactly the limit
    fs = open_store()
    assert fs.complete_multipart(upload_id, [(1, ""), (2, e2)], T0).size == limit
    assert read(fs, key) == b"a" * (5 * MiB) + b"b" * MiB


def test_multipart_ids_and_part_numbers_are_checked(fs: FileStore) -> None:
    upload_id = fs.create_multipart(new_key("x.bin"), "x/y", None)
    for n in (0, 10_001):
        with pytest.raises(InvalidUpload):
            fs.put_part(upload_id, n, b"x")
    for malformed in ("../x", "short", "A" * 24 + "\n"):
        with pytest.raises(InvalidUpload):
            fs.put_part(malformed, 1, b"x")
    unknown = "A" * 24
    with pytest.raises(FileNotFound):
        fs.put_part(unknown, 1, b"x")
    with pytest.raises(FileNotFound):
        fs.complete_multipart(unknown, [(1, "")], T0)


def test_a_second_store_sees_the_files(open_store: OpenStore) -> None:
    key = new_key("x.bin")
    stored = open_store().put(key, b"shared", "x/y", T0 + 60, T0)
    other = open_store()
    assert other.stat(key, T0) == stored and read(other, key) == b"shared"
    assert other.sweep_expired(T0 + 60) == 1
    with pytest.raises(FileNotFound):
        open_store().stat(key, T0)
