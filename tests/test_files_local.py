"""LocalFileStore and the file-store rules: keys, URLs, expiry, lifecycle headers, multipart and atomicity."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from file_checks import object_files

import wanserve.files.local as local_mod
from wanserve.errors import FileNotFound, InvalidFileKey, InvalidUpload
from wanserve.files.base import (
    ABANDONED_UPLOAD_S,
    StoredFile,
    check_key,
    lifecycle_expiry,
    new_key,
    parse_lifecycle_header,
    safe_file_name,
)
from wanserve.files.local import REPLACED_VERSION_S, LocalFileStore

PUBLIC = "http://files.test:8000/base"
T0 = 1_700_000_000.0


@pytest.fixture
def fs(tmp_path: Path) -> LocalFileStore:
    return LocalFileStore(tmp_path / "files", PUBLIC + "/")


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def tmp_leftovers(fs: LocalFileStore) -> list[Path]:
    return list((fs.root / "tmp").iterdir())


# --- put / stat / open / url ---


def test_put_bytes_round_trip(fs: LocalFileStore) -> None:
    data = b"\x00video bytes\xff" * 1000
    key = new_key("clip.mp4")
    stored = fs.put(key, data, "video/mp4", None, T0)
    assert stored.key == key
    assert stored.content_type == "video/mp4"
    assert stored.size == len(data)
    assert stored.etag == md5(data)
    assert stored.file_name == "clip.mp4"
    assert stored.created_at == T0 and stored.expires_at is None
    assert fs.stat(key, T0 + 10**9) == stored
    with fs.open(key) as f:
        assert f.read() == data
    assert fs.local_path(fs.stat(key, T0)).read_bytes() == data  # type: ignore[union-attr]


def test_put_path_copies_the_source(fs: LocalFileStore, tmp_path: Path) -> None:
    src = tmp_path / "render.mp4"
    data = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(data)
    key = new_key(src.name)
    stored = fs.put(key, src, "video/mp4", T0 + 60, T0)
    assert stored.size == len(data) and stored.etag == md5(data) and stored.expires_at == T0 + 60
    with fs.open(key) as f:
        assert f.read() == data
    assert fs.stat(key, T0) == stored
    assert tmp_leftovers(fs) == []


def test_a_stored_file_has_its_renames_synced(fs: LocalFileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file's bytes are synced, but its name is an entry of its folder: the object's and the metadata's folders
    are synced once they hold the new names, before the store answers (a completed job whose video a power cut took
    back would answer 404). Checked by watching fsync on folders."""
    synced: list[str] = []
    real_fsync = os.fsync

    def watching_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watching_fsync)
    key = new_key("clip.mp4")
    stored = fs.put(key, b"video" * 100, "video/mp4", None, T0)
    object_folder = str(fs.local_path(stored).parent)  # type: ignore[union-attr]
    meta_folder = str(fs._meta_path(key).parent)
    assert object_folder in synced and meta_folder in synced
    synced.clear()
    fs.create_multipart(new_key("big.bin"), "application/octet-stream", None)  # its state: atomic_write
    assert synced, "the multipart upload's state file was renamed into place without syncing its folder"


def test_url_and_key_from_url_round_trip(fs: LocalFileStore) -> None:
    key = new_key("a b.png")
    url = fs.url(key)
    assert url == f"{PUBLIC}/files/{key}"  # trailing slash of public_url is not doubled
    assert fs.key_from_url(url) == key
    assert fs.key_from_url(url + "?download=1") == key


@pytest.mark.parametrize(
    "url",
    [
        "http://elsewhere.test/base/files/abcdefgh12/x.png",  # foreign host
        "http://files.test:8000/other/files/abcdefgh12/x.png",  # foreign path prefix
        "https://files.test:8000/base/files/abcdefgh12/x.png",  # other scheme
        f"{PUBLIC}/files/../meta/abcdefgh12/x.png.json",
        f"{PUBLIC}/files/abcdefgh12/../../etc/passwd",
        f"{PUBLIC}/files/abcdefgh12/..",
        f"{PUBLIC}/files/abcdefgh12/sub/x.png",
        f"{PUBLIC}/files/abcdefgh12/%2e%2e",
        f"{PUBLIC}/files/",
        f"{PUBLIC}/filesabcdefgh12/x.png",
    ],
)
def test_key_from_url_rejects_foreign_and_traversal(fs: LocalFileStore, url: str) -> None:
    assert fs.key_from_url(url) is None


@pytest.mark.parametrize(
    "key",
    [
        "",
        "../x",
        "abcdefgh12/../x",
        "abcdefgh12/..",
        "a/b/c",
        "abcdefgh12/b/c",
        "/abcdefgh12/x",
        "/etc/passwd",
        "abcdefgh12/",
        "short/x",  # random part too short
        "abcdefgh12/.hidden",
        "abcdefgh12\\x",
        "abcdefgh12/x\n",
        "abcdefgh12/x\x00",
    ],
)
def test_check_key_rejects(key: str) -> None:
    with pytest.raises(InvalidFileKey):
        check_key(key)


def test_check_key_accepts_new_keys() -> None:
    for name in ("clip.mp4", None, "../../etc/passwd", ".env", "x" * 300, "видео.mp4"):
        key = new_key(name)
        assert check_key(key) == key
    assert new_key("x.bin") != new_key("x.bin")


def test_store_operations_reject_bad_keys(fs: LocalFileStore) -> None:
    for bad in ("../x", "a/b/c", "/abs/olute"):
        with pytest.raises(InvalidFileKey):
            fs.put(bad, b"x", "text/plain", None, T0)
        with pytest.raises(InvalidFileKey):
            fs.stat(bad, T0)
        with pytest.raises(InvalidFileKey):
            fs.open(bad)
        with pytest.raises(InvalidFileKey):
            fs.url(bad)
    assert not list((fs.root / "objects").iterdir())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("clip.mp4", "clip.mp4"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\photo.jpg", "photo.jpg"),
        (".bashrc", "bashrc"),
        ("...hidden.txt", "hidden.txt"),
        ("dir/.env", "env"),
        ("a b?c#d.png", "a_b_c_d.png"),
        ("trailing/", "file.bin"),
        ("..", "file.bin"),
        ("", "file.bin"),
        (None, "file.bin"),
    ],
)
def test_safe_file_name(name: str | None, expected: str) -> None:
    assert safe_file_name(name) == expected


def test_safe_file_name_is_bounded_and_default_is_configurable() -> None:
    assert len(safe_file_name("x" * 1000 + ".mp4")) == 128
    assert safe_file_name("/", default="upload.png") == "upload.png"


def test_missing_file(fs: LocalFileStore) -> None:
    key = new_key("nothing.bin")
    with pytest.raises(FileNotFound):
        fs.stat(key, T0)
    with pytest.raises(FileNotFound):
        fs.open(key)


def test_delete(fs: LocalFileStore) -> None:
    key = new_key("x.txt")
    fs.put(key, b"x", "text/plain", None, T0)
    fs.delete(key)
    with pytest.raises(FileNotFound):
        fs.stat(key, T0)
    assert not object_files(fs.root, key)
    assert not (fs.root / "objects" / key.split("/")[0]).exists()  # its folder went too
    fs.delete(key)  # idempotent


def test_stat_without_object_is_not_found(fs: LocalFileStore) -> None:
    key = new_key("x.txt")
    fs.put(key, b"x", "text/plain", None, T0)
    fs.local_path(fs.stat(key, T0)).unlink()  # type: ignore[union-attr]
    with pytest.raises(FileNotFound):
        fs.stat(key, T0)


# --- expiry ---


def test_stat_raises_after_expiry(fs: LocalFileStore) -> None:
    key = new_key("x.txt")
    fs.put(key, b"x", "text/plain", T0 + 60, T0)
    assert fs.stat(key, T0 + 59.9).size == 1
    with pytest.raises(FileNotFound):
        fs.stat(key, T0 + 60)
    with pytest.raises(FileNotFound):
        fs.stat(key, T0 + 3600)


def test_sweep_expired_deletes_only_expired(fs: LocalFileStore) -> None:
    expired = [new_key(f"old{i}.txt") for i in range(3)]
    alive = [new_key("later.txt"), new_key("forever.txt")]
    for key in expired:
        fs.put(key, b"old", "text/plain", T0 + 10, T0)
    fs.put(alive[0], b"new", "text/plain", T0 + 1000, T0)
    fs.put(alive[1], b"new", "text/plain", None, T0)
    assert fs.sweep_expired(T0 + 5) == 0
    assert fs.sweep_expired(T0 + 10) == 3
    for key in expired:
        assert not object_files(fs.root, key)
        assert not (fs.root / "meta" / (key + ".json")).exists()
    for key in alive:
        assert fs.stat(key, T0 + 10).size == 3
    assert fs.sweep_expired(T0 + 10) == 0


def test_the_sweep_spares_a_key_written_again_after_it_read_the_metadata(
    fs: LocalFileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second PUT to an expired key's upload URL lands between the sweep's reading of the old metadata and its
    deletion: the new file stays (the sweep deleted the whole key before)."""
    key = new_key("clip.mp4")
    fs.put(key, b"old", "video/mp4", T0 + 10, T0)
    sweep_reads = fs._delete_expired

    def rewritten_meanwhile(stored: StoredFile, now: float) -> bool:
        fs.put(key, b"new file", "video/mp4", None, T0 + 20)
        return sweep_reads(stored, now)

    monkeypatch.setattr(fs, "_delete_expired", rewritten_meanwhile)
    assert fs.sweep_expired(T0 + 30) == 0
    with fs.open(key) as f:
        assert f.read() == b"new file"


def test_sweep_skips_corrupt_metadata(fs: LocalFileStore) -> None:
    key = new_key("x.txt")
    fs.put(key, b"x", "text/plain", T0, T0)
    bad = fs.root / "meta" / "abcdefghij" / "junk.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    assert fs.sweep_expired(T0 + 1) == 1
    assert bad.exists()


# --- lifecycle ---


def test_lifecycle_expiry() -> None:
    assert lifecycle_expiry(None, T0) is None
    assert lifecycle_expiry({}, T0) is None
    assert lifecycle_expiry({"initial_acl": {"default": "allow"}}, T0) is None
    assert lifecycle_expiry({"expiration_duration_seconds": 3600}, T0) == T0 + 3600
    assert lifecycle_expiry({"expiration_duration_seconds": 1.5}, T0) == T0 + 1.5
    for no_expiry in (0, 0.0, None):  # as fal's backend reads them
        assert lifecycle_expiry({"expiration_duration_seconds": no_expiry}, T0) is None


@pytest.mark.parametrize("value", [-1, -0.5, True, False, "60", [60], {"s": 1}, float("nan"), float("inf")])
def test_lifecycle_expiry_rejects(value: object) -> None:
    with pytest.raises(InvalidUpload):
        lifecycle_expiry({"expiration_duration_seconds": value}, T0)


def test_parse_lifecycle_header() -> None:
    assert parse_lifecycle_header(None) is None
    assert parse_lifecycle_header("") is None
    header = json.dumps({"expiration_duration_seconds": 60, "initial_acl": {"default": "hide"}})
    assert parse_lifecycle_header(header) == {"expiration_duration_seconds": 60, "initial_acl": {"default": "hide"}}
    with pytest.raises(InvalidUpload):
        parse_lifecycle_header("{expiration_duration_seconds: 60")
    with pytest.raises(InvalidUpload):
        parse_lifecycle_header("[60]")
    with pytest.raises(InvalidUpload):
        parse_lifecycle_header("60")
    with pytest.raises(InvalidUpload):
        lifecycle_expiry(parse_lifecycle_header('{"expiration_duration_seconds": NaN}'), T0)


# --- multipart ---


def test_multipart_joins_parts_in_number_order(fs: LocalFileStore) -> None:
    key = new_key("big.bin")
    upload_id = fs.create_multipart(key, "application/octet-stream", T0 + 600)
    chunks = {1: b"A" * 1000, 2: b"B" * 10, 3: b"C" * 777}
    etags = {}
    for n in (3, 1, 2):  # parts arrive in any order
        etags[n] = fs.put_part(upload_id, n, chunks[n])
        assert etags[n] == md5(chunks[n])
    # the completion lists them out of order too, and with ETag quotes as a header would carry them
    stored = fs.complete_multipart(upload_id, [(2, f'"{etags[2]}"'), (3, etags[3]), (1, etags[1])], T0)
    whole = chunks[1] + chunks[2] + chunks[3]
    assert stored.size == len(whole) and stored.etag == md5(whole)
    assert stored.content_type == "application/octet-stream" and stored.expires_at == T0 + 600
    with fs.open(key) as f:
        assert f.read() == whole
    assert fs.stat(key, T0) == stored
    assert not (fs.root / "multipart" / upload_id).exists()
    assert tmp_leftovers(fs) == []
    with pytest.raises(FileNotFound):
        fs.complete_multipart(upload_id, [(1, etags[1])], T0)


def test_a_completion_sent_while_another_joins_the_parts_waits_for_it(
    fs: LocalFileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Python client retries a completion that timed out while the first one is still joining the parts: the
    second waits for the first, then finds the upload gone (as S3 answers), instead of reading parts that are being
    deleted (a missing part or a server error) or joining them a second time."""
    key = new_key("t.bin")
    upload_id = fs.create_multipart(key, "video/mp4", None)
    parts = [(n, fs.put_part(upload_id, n, bytes([n]) * 1000)) for n in (1, 2, 3)]
    committing, go_on = threading.Event(), threading.Event()
    real_commit = fs._commit

    def slow_commit(*args: Any) -> Any:
        committing.set()
        assert go_on.wait(10)
        return real_commit(*args)

    monkeypatch.setattr(fs, "_commit", slow_commit)
    answers: dict[str, object] = {}

    def complete(name: str) -> None:
        try:
            answers[name] = fs.complete_multipart(upload_id, parts, T0)
        except Exception as exc:
            answers[name] = exc

    first = threading.Thread(target=complete, args=("first",))
    first.start()
    assert committing.wait(10)
    committing.clear()
    second = threading.Thread(target=complete, args=("retry",))
    second.start()
    assert not committing.wait(0.3)  # the retry waits: it does not join the parts meanwhile
    go_on.set()
    first.join(10)
    second.join(10)
    assert answers["first"] == fs.stat(key, T0) and isinstance(answers["retry"], FileNotFound), answers


KILLED_WRITE = """
import os, sys
import wanserve.files.local as local
store = local.LocalFileStore(sys.argv[1], "http://files.test")
real_replace = local.os.replace
def replace(src, dst):
    real_replace(src, dst)
    if sys.argv[3] in str(dst):  # the rename after which the process dies (kill -9: nothing runs after it)
        os._exit(9)
local.os.replace = replace
store.put(sys.argv[2], b"second version, longer than the first", "application/json", None, 2.0)
"""


@pytest.mark.parametrize("killed_after", ["objects", "meta"])
def test_a_write_killed_between_its_renames_leaves_the_key_whole(
    fs: LocalFileStore, tmp_path: Path, killed_after: str
) -> None:
    """A second write of a key (a second PUT to a signed upload URL) killed after its object is in place but before
    its metadata is, or after both: the key is either the first file or the second, each with its own size, ETag and
    type; never the new bytes described by the old metadata. The version nothing names goes with the sweep."""
    key = new_key("doc.txt")
    first = fs.put(key, b"first", "text/plain", None, 1.0)
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITE, str(fs.root), key, f"{os.sep}{killed_after}{os.sep}"], timeout=60
    )
    assert proc.returncode == 9
    stored = fs.stat(key, T0)
    with fs.open(key) as f:
        data = f.read()
    assert (stored.size, stored.etag) == (len(data), md5(data))
    if killed_after == "objects":
        assert stored == first and data == b"first"
    else:
        assert stored.content_type == "application/json" and data.startswith(b"second version")
    assert len(object_files(fs.root, key)) == 2  # the other version, which nothing names now
    for obj in object_files(fs.root, key):
        os.utime(obj, (T0 - 2 * ABANDONED_UPLOAD_S,) * 2)
    fs.sweep_expired(T0)
    assert len(object_files(fs.root, key)) == 1 and fs.open(key).read() == data


def test_a_second_write_whose_metadata_cannot_be_put_in_place_keeps_the_first(
    fs: LocalFileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = new_key("doc.txt")
    first = fs.put(key, b"first", "text/plain", None, T0)
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if f"{os.sep}meta{os.sep}" in str(dst):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr("wanserve.files.local.os.replace", replace)
    with pytest.raises(OSError):
        fs.put(key, b"second", "text/plain", None, T0 + 1)
    monkeypatch.undo()
    assert fs.stat(key, T0) == first and fs.open(key).read() == b"first"
    assert len(object_files(fs.root, key)) == 1 and tmp_leftovers(fs) == []


def test_a_download_that_read_the_metadata_gets_those_bytes_though_the_key_is_written_again(
    fs: LocalFileStore,
) -> None:
    """The file route stats a key (ETag, size) and then serves the path: a second PUT in between must neither
    remove that path (a 500) nor put other bytes under the first's ETag (a resume would mix versions)."""
    key = new_key("doc.txt")
    fs.put(key, b"version one", "text/plain", None, T0)
    stored = fs.stat(key, T0)
    fs.put(key, b"VERSION TWO, longer", "text/plain", None, T0)
    path = fs.local_path(stored)
    assert path is not None and path.read_bytes() == b"version one" and md5(path.read_bytes()) == stored.etag
    assert fs.open(key).read() == b"VERSION TWO, longer"
    fs.sweep_expired(time.time())
    assert path.exists()  # within the grace
    fs.sweep_expired(time.time() + REPLACED_VERSION_S + 1)
    assert not path.exists() and len(object_files(fs.root, key)) == 1


def test_files_stored_before_versions_are_read_rewritten_and_deleted(fs: LocalFileStore) -> None:
    """A data dir from before versions: metadata without one, the object under the key's plain name."""
    key = new_key("old.bin")
    plain = fs.root / "objects" / key
    plain.parent.mkdir(parents=True)
    plain.write_bytes(b"old bytes")
    meta = fs.root / "meta" / f"{key}.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"key": key, "content_type": "x/y", "size": 9, "file_name": "old.bin",
                                "created_at": T0, "expires_at": None, "etag": md5(b"old bytes")}))  # fmt: skip
    assert (
        fs.stat(key, T0).size == 9 and fs.open(key).read() == b"old bytes" and fs.local_path(fs.stat(key, T0)) == plain
    )
    fs.sweep_expired(T0 + 2 * ABANDONED_UPLOAD_S)
    assert plain.exists()  # named by its metadata: not an orphan
    fs.put(key, b"new", "x/y", None, T0)
    assert fs.open(key).read() == b"new" and plain.exists()  # kept a while: a download may be about to open it
    fs.sweep_expired(time.time() + REPLACED_VERSION_S + 1)
    assert not plain.exists() and len(object_files(fs.root, key)) == 1
    fs.delete(key)
    assert not object_files(fs.root, key) and not (fs.root / "objects" / key.split("/")[0]).exists()


def test_multipart_reuploaded_part_replaces_the_old_one(fs: LocalFileStore) -> None:
    key = new_key("x.bin")
    upload_id = fs.create_multipart(key, "x/y", None)
    fs.put_part(upload_id, 1, b"first try")
    etag = fs.put_part(upload_id, 1, b"second")
    fs.complete_multipart(upload_id, [(1, etag)], T0)
    with fs.open(key) as f:
        assert f.read() == b"second"


@pytest.mark.parametrize(
    "numbers",
    [[1, 3], [2, 3], [1, 1], [0, 1], []],
)
def test_multipart_rejects_gaps_duplicates_and_empty(fs: LocalFileStore, numbers: list[int]) -> None:
    key = new_key("x.bin")
    upload_id = fs.create_multipart(key, "x/y", None)
    for n in (1, 2, 3):
        fs.put_part(upload_id, n, b"p%d" % n)
    with pytest.raises(InvalidUpload):
        fs.complete_multipart(upload_id, [(n, "") for n in numbers], T0)
    with pytest.raises(FileNotFound):
        fs.stat(key, T0)
    assert (fs.root / "multipart" / upload_id).is_dir()  # the upload can still be completed properly
    fs.complete_multipart(upload_id, [(1, ""), (2, ""), (3, "")], T0)
    with fs.open(key) as f:
        assert f.read() == b"p1p2p3"


def test_multipart_rejects_a_part_never_uploaded(fs: LocalFileStore) -> None:
    upload_id = fs.create_multipart(new_key("x.bin"), "x/y", None)
    fs.put_part(upload_id, 1, b"one")
    with pytest.raises(InvalidUpload):
        fs.complete_multipart(upload_id, [(1, ""), (2, "")], T0)
    assert tmp_leftovers(fs) == []


def test_multipart_rejects_wrong_etag(fs: LocalFileStore) -> None:
    key = new_key("x.bin")
    upload_id = fs.create_multipart(key, "x/y", None)
    e1 = fs.put_part(upload_id, 1, b"one")
    fs.put_part(upload_id, 2, b"two")
    with pytest.raises(InvalidUpload, match="part 2"):
        fs.complete_multipart(upload_id, [(1, e1), (2, md5(b"not two"))], T0)
    with pytest.raises(FileNotFound):
        fs.stat(key, T0)
    assert not object_files(fs.root, key)
    assert tmp_leftovers(fs) == []


def test_multipart_unknown_and_malformed_upload_ids(fs: LocalFileStore) -> None:
    unknown = "A" * 24
    with pytest.raises(FileNotFound):
        fs.put_part(unknown, 1, b"x")
    with pytest.raises(FileNotFound):
        fs.complete_multipart(unknown, [(1, "")], T0)
    for bad in ("../tmp", "short", "a/b" * 8, "", "A" * 24 + "\n"):
        with pytest.raises(InvalidUpload):
            fs.put_part(bad, 1, b"x")
        with pytest.raises(InvalidUpload):
            fs.complete_multipart(bad, [(1, "")], T0)


def test_multipart_part_number_bounds_and_key_check(fs: LocalFileStore) -> None:
    upload_id = fs.create_multipart(new_key("x.bin"), "x/y", None)
    for n in (0, -1, 10_001):
        with pytest.raises(InvalidUpload):
            fs.put_part(upload_id, n, b"x")
    with pytest.raises(InvalidFileKey):
        fs.create_multipart("../evil", "x/y", None)


# --- atomicity ---


def test_failed_put_bytes_leaves_nothing(fs: LocalFileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    key = new_key("x.bin")

    def boom(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local_mod.os, "replace", boom)
    with pytest.raises(OSError, match="No space"):
        fs.put(key, b"data" * 1000, "x/y", None, T0)
    monkeypatch.undo()
    assert not object_files(fs.root, key)
    assert not (fs.root / "meta" / (key + ".json")).exists()
    assert tmp_leftovers(fs) == []
    with pytest.raises(FileNotFound):
        fs.stat(key, T0)


def test_failed_put_path_leaves_nothing(fs: LocalFileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 5000)
    key = new_key("x.bin")
    monkeypatch.setattr(local_mod.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError):
        fs.put(key, src, "x/y", None, T0)
    monkeypatch.undo()
    assert not object_files(fs.root, key)
    assert not (fs.root / "meta" / (key + ".json")).exists()
    assert tmp_leftovers(fs) == []
    assert src.read_bytes() == b"x" * 5000  # the source is untouched


def test_unreadable_source_leaves_nothing(fs: LocalFileStore, tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist.bin"
    key = new_key("x.bin")
    with pytest.raises(OSError):
        fs.put(key, missing, "x/y", None, T0)
    assert not object_files(fs.root, key)
    assert not (fs.root / "meta" / (key + ".json")).exists()
    assert tmp_leftovers(fs) == []


def test_failed_metadata_write_leaves_no_orphan_object(fs: LocalFileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    key = new_key("x.bin")
    real_replace = os.replace
    calls = []

    def second_fails(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 2:  # the object went in; the metadata rename fails
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(local_mod.os, "replace", second_fails)
    with pytest.raises(OSError):
        fs.put(key, b"data", "x/y", None, T0)
    monkeypatch.undo()
    assert len(calls) == 2
    with pytest.raises(FileNotFound):
        fs.stat(key, T0)
    assert not object_files(fs.root, key)  # sweep could never find an object without metadata
    assert tmp_leftovers(fs) == []


def test_failed_multipart_assembly_leaves_nothing(fs: LocalFileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    key = new_key("x.bin")
    upload_id = fs.create_multipart(key, "x/y", None)
    fs.put_part(upload_id, 1, b"one")
    monkeypatch.setattr(local_mod.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(OSError):
        fs.complete_multipart(upload_id, [(1, "")], T0)
    monkeypatch.undo()
    assert not object_files(fs.root, key)
    assert tmp_leftovers(fs) == []
    fs.complete_multipart(upload_id, [(1, "")], T0)  # a retry works: the parts were kept
    assert fs.stat(key, T0).size == 3


def test_data_visible_to_a_second_store_on_the_same_root(fs: LocalFileStore) -> None:
    key = new_key("x.bin")
    stored = fs.put(key, b"shared", "x/y", None, T0)
    other = LocalFileStore(fs.root, PUBLIC)
    assert other.stat(key, T0) == stored
    assert other.key_from_url(fs.url(key)) == key


def test_sweep_removes_abandoned_multipart_uploads_and_temp_files(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path / "files", "http://files.test")
    old = store.create_multipart(new_key("old.bin"), "application/octet-stream", None)
    fresh = store.create_multipart(new_key("fresh.bin"), "application/octet-stream", None)
    leftover = tmp_path / "files" / "tmp" / "tmpabc"
    leftover.write_bytes(b"half")
    now = time.time()
    long_ago = now - local_mod.ABANDONED_UPLOAD_S - 10
    for path in (tmp_path / "files" / "multipart" / old, leftover):
        os.utime(path, (long_ago, long_ago))
    store.sweep_expired(now)
    assert not (tmp_path / "files" / "multipart" / old).exists() and not leftover.exists()
    assert (tmp_path / "files" / "multipart" / fresh).is_dir()


def test_sweep_removes_objects_a_crash_left_without_metadata(tmp_path: Path) -> None:
    """A kill between moving a file in and writing its metadata leaves an object nothing points at: swept once no
    write can still be finishing it; objects with metadata and fresh ones stay."""
    store = LocalFileStore(tmp_path / "files", "http://files.test")
    kept, orphan, fresh = new_key("kept.mp4"), new_key("orphan.mp4"), new_key("fresh.mp4")
    store.put(kept, b"kept", "video/mp4", None, T0)
    for key in (orphan, fresh):
        path = tmp_path / "files" / "objects" / key
        path.parent.mkdir(parents=True)
        path.write_bytes(b"no metadata")
    now = time.time()
    long_ago = now - local_mod.ABANDONED_UPLOAD_S - 10
    for key in (kept, orphan):
        (path,) = object_files(store.root, key)
        os.utime(path, (long_ago, long_ago))
    store.sweep_expired(now)
    assert not (tmp_path / "files" / "objects" / orphan).parent.exists()
    assert store.open(kept).read() == b"kept" and (tmp_path / "files" / "objects" / fresh).exists()


def test_put_moves_a_file_from_the_same_filesystem_instead_of_copying_it(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path / "files", PUBLIC)
    source = tmp_path / "video.mp4"
    source.write_bytes(b"\x00\x00\x00\x18ftypisom")
    inode = source.stat().st_ino
    key = new_key("video.mp4")
    store.put(key, source, "video/mp4", None, T0)
    assert not source.exists()
    assert store.local_path(store.stat(key, T0)).stat().st_ino == inode  # type: ignore[union-attr]  # renamed
    assert store.open(key).read() == b"\x00\x00\x00\x18ftypisom"
