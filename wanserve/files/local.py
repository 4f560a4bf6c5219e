"""The embedded file store: a directory. Objects and their metadata are written to a temporary file and
renamed into place, so a crash or a full disk never leaves a half-written file behind a live key.

Each write of a key is a version of its own: the object lands under a new name (`<version>~<name>`) and the
metadata, which names that version, is renamed over the old metadata last. That rename is the one moment a key
changes, so a kill at any point leaves the key either as it was or as written (never new bytes described by old
metadata), and the version it replaced, or the one it never reached, is an orphan the sweep removes an hour on.
Files stored before versions existed (metadata without one) keep their plain name until written again."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from wanserve.errors import FileNotFound, InvalidFileKey, InvalidUpload
from wanserve.files.base import (
    ABANDONED_UPLOAD_S,
    StoredFile,
    atomic_write,
    check_key,
    check_part_number,
    check_part_numbers,
    check_parts_total,
    check_upload_id,
    file_url,
    key_from_file_url,
    new_upload_id,
    sync_dirs,
    write_synced,
)
from wanserve.files.space import check_room

# Between a key's file name and the version of its object: never in a key (safe names have no `~`).
VERSION_MARK = "~"
# How long an object no metadata names stays: a version a write replaced (a download may have read the metadata
# that named it and not opened it yet) or one a killed write never switched to. Minutes would do; an hour is safe.
REPLACED_VERSION_S = 3600.0


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _versioned_name(file_name: str) -> tuple[str | None, str]:
    """(version, the key's file name) of an object file's name."""
    version, mark, name = file_name.partition(VERSION_MARK)
    return (version, name) if mark else (None, file_name)


class _Window(io.RawIOBase):
    """The next `length` bytes of a file, then its end: a byte range read without loading it."""

    def __init__(self, f: io.BufferedReader, length: int) -> None:
        self._f = f
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._f.readinto(memoryview(buffer)[: self._left])
        self._left -= n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


class LocalFileStore:
    def __init__(self, root: Path, public_url: str, upload_reserve: int = 0) -> None:
        """`upload_reserve`: bytes multipart uploads leave free on this disk (space.check_room)."""
        self.root = Path(root)
        self.public_url = public_url.rstrip("/")
        self.upload_reserve = upload_reserve
        self._objects = self.root / "objects"
        self._meta = self.root / "meta"
        self._multipart = self.root / "multipart"
        self._tmp = self.root / "tmp"
        for d in (self._objects, self._meta, self._multipart, self._tmp):
            d.mkdir(parents=True, exist_ok=True)

    def url(self, key: str) -> str:
        return file_url(self.public_url, key)

    def key_from_url(self, url: str) -> str | None:
        return key_from_file_url(self.public_url, url)

    def _object(self, key: str, version: str | None) -> Path:
        path = self._objects / check_key(key)
        return path.with_name(f"{version}{VERSION_MARK}{path.name}") if version else path

    def _meta_path(self, key: str) -> Path:
        return self._meta / (check_key(key) + ".json")

    def _read_meta(self, key: str) -> StoredFile:
        """The key's metadata, which names the version of its object; FileNotFound without metadata."""
        try:
            return StoredFile.from_json(self._meta_path(key).read_text())
        except FileNotFoundError:
            raise FileNotFound(f"no such file: {key}") from None

    def put(
        self, key: str, source: Path | bytes, content_type: str, expires_at: float | None, now: float
    ) -> StoredFile:
        return self._commit(key, self._stage(source), content_type, expires_at, now)

    def _stage(self, source: Path | bytes) -> Path:
        """`source` as a synced file in the store's temp dir (on this disk): moved there when it is on this
        filesystem (uploads and videos are not written twice), else copied."""
        fd, tmp = tempfile.mkstemp(dir=self._tmp)
        staged = Path(tmp)
        try:
            if isinstance(source, bytes):
                write_synced(fd, source)
                return staged
            os.close(fd)
            with open(source, "rb+") as f:
                os.fsync(f.fileno())
            try:
                os.replace(source, staged)
                return staged
            except OSError:  # another filesystem (e.g. /tmp on tmpfs)
                pass
            shutil.copyfile(source, staged)
            with open(staged, "rb+") as f:
                os.fsync(f.fileno())
            return staged
        except BaseException:
            staged.unlink(missing_ok=True)
            raise

    def _commit(self, key: str, staged: Path, content_type: str, expires_at: float | None, now: float) -> StoredFile:
        """Makes `staged` the object at `key`, as a new version, with its metadata. Everything that needs room on
        the disk (the object, the metadata, the folders) is written first; then two renames, which need none: the
        object to its new version's name (it replaces nothing), then the metadata over the old (the key changes
        here, whole). A failure or a kill before that leaves the key as it was: absent, or its earlier file whole
        (a second PUT to a signed upload URL must not lose the first)."""
        version = secrets.token_hex(8)
        meta_staged: Path | None = None
        placed: Path | None = None
        try:
            replaced: Path | None = self._object(key, self._read_meta(key).version)
        except (FileNotFound, ValueError, TypeError):  # a new key, or unreadable metadata: nothing is replaced
            replaced = None
        try:
            stored, meta_staged = self._staged_meta(key, staged, content_type, expires_at, now, version)
            for folder in (self._object(key, version).parent, self._meta_path(key).parent):
                folder.mkdir(parents=True, exist_ok=True)
            placed = self._object(key, version)
            os.replace(staged, placed)
            os.replace(meta_staged, self._meta_path(key))
        except BaseException:
            for leftover in (staged, meta_staged, placed):
                if leftover is not None:
                    leftover.unlink(missing_ok=True)
            self._remove_empty_dirs(key)
            raise
        # The key is committed: both renames made durable before the caller reports the file stored (a job completed
        # whose video's name a power cut took back would answer 404).
        sync_dirs(placed.parent, self._meta_path(key).parent)
        if replaced is not None:
            # Nothing names it now, but a download may have read its metadata and not yet opened it: it stays for
            # the sweep, REPLACED_VERSION_S from now.
            with contextlib.suppress(OSError):
                os.utime(replaced)
        return stored

    def _staged_meta(
        self, key: str, staged: Path, content_type: str, expires_at: float | None, now: float, version: str
    ) -> tuple[StoredFile, Path]:
        stored = StoredFile(
            key=key,
            content_type=content_type,
            size=staged.stat().st_size,
            file_name=key.split("/", 1)[1],
            created_at=now,
            expires_at=expires_at,
            etag=_md5_file(staged),
            version=version,
        )
        return stored, self._stage(stored.to_json().encode())

    def _remove_empty_dirs(self, key: str) -> None:
        for d in (self._meta_path(key).parent, self._object(key, None).parent):
            with contextlib.suppress(OSError):
                d.rmdir()

    def stat(self, key: str, now: float) -> StoredFile:
        stored = self._read_meta(key)
        if stored.expires_at is not None and stored.expires_at <= now:
            raise FileNotFound(f"file expired: {key}")
        if not self._object(key, stored.version).is_file():
            raise FileNotFound(f"no such file: {key}")
        return stored

    def open(self, key: str, byte_range: tuple[int, int] | None = None) -> BinaryIO:
        for _attempt in range(3):  # a new version written between reading the metadata and opening: read again
            try:
                f = self._object(key, self._read_meta(key).version).open("rb")
                break
            except FileNotFoundError:
                continue
        else:
            raise FileNotFound(f"no such file: {key}")
        if byte_range is None:
            return f
        start, end = byte_range
        f.seek(start)
        return io.BufferedReader(_Window(f, end - start + 1))

    def local_path(self, stored: StoredFile) -> Path | None:
        return self._object(stored.key, stored.version)

    def staging_dir(self) -> Path | None:
        return self._tmp

    def download_url(self, key: str, now: float, attachment: bool = False) -> str | None:
        return None  # the API serves local files itself

    def delete(self, key: str) -> None:
        # Metadata first: once it is gone the key is dead, even if removing the object then fails.
        self._meta_path(key).unlink(missing_ok=True)
        plain = self._object(key, None)
        for obj in plain.parent.glob("*") if plain.parent.is_dir() else ():
            if _versioned_name(obj.name)[1] == plain.name:  # each version (and a file stored before versions)
                obj.unlink(missing_ok=True)
        self._remove_empty_dirs(key)

    def sweep_expired(self, now: float) -> int:
        deleted = 0
        for meta in self._meta.glob("*/*.json"):
            try:
                stored = StoredFile.from_json(meta.read_text())
            except (OSError, ValueError, TypeError):
                continue
            if stored.expires_at is not None and stored.expires_at <= now and self._delete_expired(stored, now):
                deleted += 1
        # Leftovers: multipart uploads never completed, temporary files of writes a crash interrupted.
        for stale, max_age in ((self._multipart, ABANDONED_UPLOAD_S), (self._tmp, ABANDONED_UPLOAD_S)):
            for entry in stale.iterdir():
                try:
                    if now - entry.stat().st_mtime > max_age:
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                except OSError:
                    continue
        # Objects no metadata names: a version a killed write never switched to, or one a later write replaced (kept
        # for downloads that read its metadata). They would never expire; an hour on (REPLACED_VERSION_S), nothing
        # can still need them.
        for obj in self._objects.glob("*/*"):
            try:
                if now - obj.stat().st_mtime > REPLACED_VERSION_S and not self._names(obj):
                    obj.unlink()
                    with contextlib.suppress(OSError):
                        obj.parent.rmdir()
            except (OSError, InvalidFileKey):
                continue
        return deleted

    def _delete_expired(self, stored: StoredFile, now: float) -> bool:
        """Deletes the expired version `stored` of its key, unless the key was written again since its metadata was
        read (a second PUT to an upload URL): the metadata is read again first, and only that version's object is
        removed, so a write committing meanwhile keeps the object it has just placed (a version no metadata names
        is the orphan sweep's, REPLACED_VERSION_S on)."""
        try:
            current = self._read_meta(stored.key)
        except (FileNotFound, ValueError, TypeError):
            return False
        if current.version != stored.version or current.expires_at is None or current.expires_at > now:
            return False
        self._meta_path(stored.key).unlink(missing_ok=True)
        self._object(stored.key, stored.version).unlink(missing_ok=True)
        self._remove_empty_dirs(stored.key)
        return True

    def _names(self, obj: Path) -> bool:
        """Whether the key's metadata names this object file as its current version."""
        version, name = _versioned_name(obj.name)
        try:
            return self._read_meta(f"{obj.parent.name}/{name}").version == version
        except FileNotFound:
            return False
        except (ValueError, TypeError):  # unreadable metadata: not this sweep's to judge
            return True

    # --- multipart ---
    def _upload_dir(self, upload_id: str) -> Path:
        path = self._multipart / check_upload_id(upload_id)
        if not path.is_dir():
            raise FileNotFound(f"no such multipart upload: {upload_id}")
        return path

    def create_multipart(self, key: str, content_type: str, expires_at: float | None) -> str:
        check_key(key)
        upload_id = new_upload_id()
        path = self._multipart / upload_id
        path.mkdir(parents=True)
        info = {"key": key, "content_type": content_type, "expires_at": expires_at}
        try:
            atomic_write(path / "upload.json", json.dumps(info).encode(), self._tmp)
        except BaseException:  # a full disk: no upload, and no empty folder left for the sweep
            shutil.rmtree(path, ignore_errors=True)
            raise
        return upload_id

    def put_part(self, upload_id: str, part_number: int, source: Path | bytes, max_total: int | None = None) -> str:
        check_part_number(part_number)
        folder = self._upload_dir(upload_id)
        size = len(source) if isinstance(source, bytes) else source.stat().st_size
        stored = {int(p.name[5:]): p.stat().st_size for p in folder.glob("part-[0-9][0-9][0-9][0-9][0-9]")}
        check_parts_total(stored, part_number, size, max_total)
        target = folder / f"part-{part_number:05d}"
        if isinstance(source, bytes):
            check_room(self._tmp, size, self.upload_reserve)
            atomic_write(target, source, self._tmp)
            return hashlib.md5(source, usedforsecurity=False).hexdigest()
        etag = _md5_file(source)
        os.replace(self._stage(source), target)  # a staged file is on the disk already: its room was checked
        return etag

    def complete_multipart(self, upload_id: str, parts: list[tuple[int, str]], now: float) -> StoredFile:
        """Joins the parts into the file. Completions of one upload run one at a time: one retried by a client (the
        Python client retries a completion that timed out) while the first is still joining waits for it, then
        finds the upload gone (as on S3: no such upload), instead of reading parts that are being deleted."""
        check_upload_id(upload_id)
        with self._upload_lock(upload_id):
            stored = self._join(upload_id, parts, now)
            shutil.rmtree(self._multipart / upload_id, ignore_errors=True)
            return stored

    @contextlib.contextmanager
    def _upload_lock(self, upload_id: str) -> Iterator[None]:
        # Not an upload id (`.` is not in their alphabet). Left in place, for the sweep to remove a day on: removed
        # now, a third completion would lock a new file while a waiter holds the old one.
        with open(self._multipart / f"{upload_id}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another open file: threads and processes alike wait here
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _join(self, upload_id: str, parts: list[tuple[int, str]], now: float) -> StoredFile:
        folder = self._upload_dir(upload_id)
        info = json.loads((folder / "upload.json").read_text())
        check_part_numbers(parts)
        # The parts are copied into one file (then deleted): the copy needs their size again, for a moment.
        paths = [folder / f"part-{number:05d}" for number, _etag in parts]
        check_room(self._tmp, sum(path.stat().st_size for path in paths if path.is_file()), self.upload_reserve)
        fd, tmp = tempfile.mkstemp(dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as out:
                for number, etag in sorted(parts):
                    part = folder / f"part-{number:05d}"
                    if not part.is_file():
                        raise InvalidUpload(f"part {number} was never uploaded")
                    if etag and etag.strip('"') != _md5_file(part):
                        raise InvalidUpload(f"part {number}: ETag does not match the uploaded bytes")
                    with part.open("rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # The parts stay until the file is committed: a completion that failed (a full disk) can be retried.
        return self._commit(info["key"], Path(tmp), info["content_type"], info["expires_at"], now)
