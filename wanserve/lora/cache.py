"""Downloaded files kept on disk by content (sha256), with an index from each source URL to its content.

Several workers on one machine share the folder safely: a blob appears by atomic rename once complete
(and fsynced), an index entry is written after its blob, and a blob that is gone when read (evicted by a
neighbour) is simply a miss. Eviction is least recently used, by modification time, which a hit renews.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from wanserve.files.inputs import Validators

ABANDONED_TEMP_S = 24 * 3600.0  # a temp file this old belongs to a download that died with its process
# A blob used or added this recently may be about to be read by a worker (this one or a neighbour): eviction
# leaves it alone, so the cache can run over its bound for that long rather than pull a file from under a job.
IN_USE_S = 600.0


@dataclass(frozen=True)
class CachedFile:
    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class IndexEntry:
    """What the cache knows of a URL: its content, when that was fetched (or last confirmed unchanged), and the
    server's validators to ask it again with (None: it gave none)."""

    file: CachedFile
    fetched_at: float
    validators: Validators | None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ContentCache:
    def __init__(self, root: Path, max_bytes: int, url_ttl_s: float) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.url_ttl_s = url_ttl_s
        self.blobs = root / "blobs"
        self.index = root / "urls"
        self.tmp = root / "tmp"
        for folder in (self.blobs, self.index, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self._remove_abandoned_temp(time.time())

    def _index_path(self, url: str) -> Path:
        return self.index / f"{hashlib.sha256(url.encode()).hexdigest()}.json"

    def lookup(self, url: str, now: float) -> CachedFile | None:
        """The cached content of `url`, if it was fetched less than `url_ttl_s` ago and is still here."""
        entry = self.entry(url)
        return entry.file if entry is not None and now - entry.fetched_at <= self.url_ttl_s else None

    def entry(self, url: str) -> IndexEntry | None:
        """The index entry of `url` whose content is still here, however old (None with no TTL: nothing kept)."""
        if self.url_ttl_s <= 0:
            return None
        try:
            entry = json.loads(self._index_path(url).read_text())
            if entry["url"] != url:
                return None
            blob = self.blobs / str(entry["sha256"])
            os.utime(blob)  # a hit makes it the most recently used
            file = CachedFile(blob, str(entry["sha256"]), blob.stat().st_size)
            validators = Validators(entry.get("etag"), entry.get("last_modified"))
            has_validators = validators.etag or validators.last_modified
            return IndexEntry(file, float(entry["fetched_at"]), validators if has_validators else None)
        except (OSError, ValueError, KeyError, TypeError):  # absent, evicted, or an index entry cut short
            return None

    def confirm(self, url: str, file: CachedFile, now: float, validators: Validators | None) -> None:
        """The server said `url` still has this content (304): its entry counts as fetched now."""
        self._write_entry(url, file, now, validators)

    def _write_entry(self, url: str, file: CachedFile, now: float, validators: Validators | None) -> None:
        if self.url_ttl_s <= 0:  # with no TTL, lookups never read an entry: write none
            return
        entry = {"url": url, "sha256": file.sha256, "size": file.size, "fetched_at": now}
        if validators is not None:
            entry |= {"etag": validators.etag, "last_modified": validators.last_modified}
        staged = self.temp_path()
        staged.write_text(json.dumps(entry))
        os.replace(staged, self._index_path(url))

    def keep(self, path: Path) -> None:
        """Marks a blob of this cache as in use now (see IN_USE_S); any other path is left untouched."""
        if path.parent == self.blobs:
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)

    def temp_path(self) -> Path:
        return self.tmp / uuid.uuid4().hex

    def add(self, downloaded: Path, url: str | None, now: float, validators: Validators | None = None) -> CachedFile:
        """Moves a complete download (a `temp_path()`) into the cache and indexes it under `url`, with the server's
        `validators`. The blob stays (see IN_USE_S) long enough for the request that fetched it to read it."""
        with downloaded.open("rb+") as f:
            os.fsync(f.fileno())  # a power cut must not leave a blob whose name promises other content
        sha = file_sha256(downloaded)
        blob = self.blobs / sha
        os.replace(downloaded, blob)
        added = CachedFile(blob, sha, blob.stat().st_size)
        if url is not None:
            self._write_entry(url, added, now, validators)
        self.evict(time.time())
        return added

    def evict(self, now: float) -> list[str]:
        """Removes least recently used blobs until the cache fits `max_bytes`, sparing those used in the last
        IN_USE_S seconds; returns the removed hashes."""
        blobs: list[tuple[float, int, Path]] = []
        for path in self.blobs.iterdir():
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                blobs.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in blobs)
        removed: list[str] = []
        for mtime, size, path in sorted(blobs):
            if total <= self.max_bytes:
                break
            if now - mtime < IN_USE_S:
                break  # sorted by age: every blob from here on is in use
            path.unlink(missing_ok=True)
            total -= size
            removed.append(path.name)
        self._prune_index(now, set(removed))
        return removed

    def _prune_index(self, now: float, gone: set[str]) -> None:
        """One pass over the URL index: entries of removed blobs go, and so do entries past the URL TTL, which are
        never used again (an entry file's mtime is when it was written). Without the latter, URLs that differ on
        every request (presigned ones) would add an entry each, for ever."""
        for entry_path in self.index.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                if now - entry_path.stat().st_mtime > max(self.url_ttl_s, 0.0) or (
                    gone and json.loads(entry_path.read_text())["sha256"] in gone
                ):
                    entry_path.unlink()

    def _remove_abandoned_temp(self, now: float) -> None:
        for path in self.tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime > ABANDONED_TEMP_S:
                    path.unlink()
