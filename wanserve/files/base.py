"""The file store interface, stored-file metadata and the object lifecycle (expiry) rules."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from wanserve.errors import InvalidFileKey, InvalidUpload, PayloadTooLarge

log = logging.getLogger(__name__)

ABANDONED_UPLOAD_S = 24 * 3600
INLINE_TYPES = {"video", "image", "audio"}


@dataclass(frozen=True)
class StoredFile:
    key: str
    content_type: str
    size: int
    file_name: str
    created_at: float
    expires_at: float | None = None
    etag: str = ""
    # Which write of the key these bytes are, where a store keeps several (the local store, see files.local); None
    # elsewhere. A reader that serves the file by `local_path` gets the bytes this metadata describes.
    version: str | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> StoredFile:
        return cls(**json.loads(text))


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_KEY = re.compile(r"^[A-Za-z0-9_-]{8,64}/[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


def write_synced(fd: int, data: bytes) -> None:
    """Writes `data` to the open file `fd`, closes it, and waits until the bytes are on disk."""
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sync_dirs(*folders: Path) -> None:
    """Waits until the entries of `folders` (a rename into them) are on disk: a synced file's bytes survive a power
    cut, but its new name there is the folder's, which some filesystems write later. Best effort once the rename is
    done: a folder that cannot be synced (a filesystem without it) leaves the rename as it stands."""
    for folder in dict.fromkeys(folders):
        try:
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError as exc:
            log.debug("could not sync folder %s: %s", folder, exc)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """`path` holds `data`, whole, or keeps what it held: written beside it (or in `tmp_dir`, on the same disk),
    synced, then renamed into place, and the rename synced too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=f".{path.name}.")
    try:
        write_synced(fd, data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_dirs(path.parent)


def safe_file_name(name: str | None, default: str = "file.bin") -> str:
    """A file name that is safe in a URL path and a filesystem: no directories, no dot-files."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = _SAFE_NAME.sub("_", base).strip("._")[:128]
    return base or default


def new_key(file_name: str | None, default: str = "file.bin") -> str:
    """A fresh, unguessable key: `<random>/<safe file name>`."""
    return f"{secrets.token_urlsafe(16)}/{safe_file_name(file_name, default)}"


def output_key(job_id: str, attempt: int) -> str:
    """Where attempt `attempt` of job `job_id` stores its video. Derived rather than random, so that a later attempt
    can delete what an earlier one stored but never reported (its worker died in between). As hard to guess as the
    request id, whose result already names the file (and with API keys on, files need signed URLs anyway)."""
    digest = hashlib.sha256(f"{job_id}\n{attempt}".encode()).hexdigest()[:32]
    return f"{digest}/{safe_file_name(f'{job_id}.mp4')}"


def delete_outputs(files: FileStore, job_id: str, attempts: Iterable[int]) -> None:
    """Removes what these attempts of a job may have stored but never reported (their worker died in between):
    referenced by nothing, such a video would stay in the store for ever. A store outage leaves them, logged: not
    worth failing anything for."""
    for attempt in attempts:
        try:
            files.delete(output_key(job_id, attempt))
        except Exception as exc:
            log.warning("job %s: could not remove attempt %d's unreported video: %s", job_id, attempt, exc)


def check_key(key: str) -> str:
    """Keys come from URLs: only the shape `new_key` makes is accepted, so no key can escape the store."""
    if not _KEY.fullmatch(key):  # fullmatch: `$` alone would let a trailing newline through
        raise InvalidFileKey(f"not a stored file key: {key!r}")
    return key


_UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")


def new_upload_id() -> str:
    return secrets.token_urlsafe(18)


def check_upload_id(upload_id: str) -> str:
    """Upload ids come from URLs too: the shape `new_upload_id` makes, nothing a path or key could hide in."""
    if not _UPLOAD_ID.fullmatch(upload_id):
        raise InvalidUpload(f"not an upload id: {upload_id!r}")
    return upload_id


MAX_PARTS = 10_000


def check_part_number(part_number: int) -> None:
    if not 1 <= part_number <= MAX_PARTS:
        raise InvalidUpload(f"part number must be 1..{MAX_PARTS}, got {part_number}")


def check_parts_total(stored: dict[int, int], part_number: int, size: int, max_total: int | None) -> None:
    """Refuse a part that would take an upload's stored parts (part number -> bytes) past `max_total` bytes; a part
    sent again replaces its earlier bytes. Checked per part, so that parts cannot fill a disk before the completion
    (which checks the joined file) ever comes; parts uploaded in parallel can pass it together, at most one part
    each past the limit."""
    if max_total is None:
        return
    total = sum(n for number, n in stored.items() if number != part_number) + size
    if total > max_total:
        raise PayloadTooLarge(f"the upload's parts come to {total} bytes, over the {max_total}-byte limit")


def check_part_numbers(parts: list[tuple[int, str]]) -> None:
    """A completion lists parts 1..n, each once: joined in order, they leave no hole in the file."""
    if not parts:
        raise InvalidUpload("a multipart upload needs at least one part")
    numbers = sorted(n for n, _ in parts)
    if numbers != list(range(1, len(numbers) + 1)):
        raise InvalidUpload(f"parts must be numbered 1..{len(numbers)} without gaps, got {numbers}")


def file_url(public_url: str, key: str) -> str:
    return f"{public_url.rstrip('/')}/files/{check_key(key)}"


def file_ref(key: str) -> str:
    """How a stored job output names one of our files: its URL's path alone (`/files/<key>`). The API makes the
    URL a client gets from it each time the output is read (`api.files.with_file_urls`): the output outlives a
    change of public URL, and does not depend on the public URL its worker was started with."""
    return file_url("", key)


def key_from_file_ref(ref: str) -> str | None:
    """The key in a `file_ref`; None for anything else."""
    return key_from_file_url("", ref)


# A file URL may carry its signature in its path, `/files/~<expiry>.<signature>/<key>`, where a client appends
# paths to the URL (fal-client's multipart upload). No key starts with it (see _KEY).
PATH_SIGNATURE_MARK = "~"


def split_path_signature(path: str) -> tuple[str, str | None, str | None]:
    """(key, expiry, signature) of the path after `/files/`: the signature in the path, or none."""
    if not path.startswith(PATH_SIGNATURE_MARK):
        return path, None, None
    signature, _, key = path.partition("/")
    expires, _, sig = signature[len(PATH_SIGNATURE_MARK) :].partition(".")
    return key, expires, sig


def key_from_file_url(public_url: str, url: str) -> str | None:
    """The key in a URL `file_url` made for this `public_url`; None for any other URL."""
    prefix = f"{public_url.rstrip('/')}/files/"
    if not url.startswith(prefix):
        return None
    key = split_path_signature(url[len(prefix) :].split("?", 1)[0])[0]
    try:
        return check_key(key)
    except InvalidFileKey:
        return None


def content_disposition(stored: StoredFile, attachment: bool = False) -> str:
    """Media plays in the browser; anything else downloads. Anyone may upload, so an upload must never open
    as a page (wherever it is served from). `attachment`: saved, even a video (a "Download" link: the HTML
    `download` attribute does nothing once the link leads to another origin, as an S3 redirect does)."""
    inline = stored.content_type.split("/")[0] in INLINE_TYPES and not attachment
    return f'{"inline" if inline else "attachment"}; filename="{stored.file_name}"'


MAX_LIFETIME_S = 100 * 365 * 24 * 3600


_CONTENT_TYPE = re.compile(r"[\w!#$&^.+-]{1,64}/[\w!#$&^.+-]{1,128}(\s*;\s*[\w!#$&^.+-]{1,64}=[\w!#$&^.+\"-]{1,128})*")


def check_content_type(value: str) -> str:
    """A MIME type that is safe to send back as a header (ASCII, no line breaks); 400 otherwise."""
    if not value.isascii() or not _CONTENT_TYPE.fullmatch(value):
        raise InvalidUpload(f"not a valid content type: {value[:100]!r}")
    return value


def lifecycle_expiry(preference: dict[str, Any] | None, now: float) -> float | None:
    """`{"expiration_duration_seconds": N}` (fal's object lifecycle preference) -> absolute expiry time. None and 0
    mean no expiry, as fal's backend reads them (fal-client says so, and the JS client sends `expiresIn: 0` as is)."""
    if not preference:
        return None
    seconds = preference.get("expiration_duration_seconds")
    if seconds is None or (seconds == 0 and not isinstance(seconds, bool)):
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not (0 < seconds <= MAX_LIFETIME_S):
        raise InvalidUpload(f"expiration_duration_seconds must be a number of seconds in (0, {MAX_LIFETIME_S}]")
    return now + float(seconds)


def parse_lifecycle_header(value: str | None) -> dict[str, Any] | None:
    """The JSON of an `X-Fal-Object-Lifecycle(-Preference)` header; a clear 400 when it is not JSON."""
    if not value:
        return None
    try:
        data = json.loads(value)
    except (ValueError, RecursionError) as exc:
        raise InvalidUpload(f"object lifecycle header is not JSON: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise InvalidUpload("object lifecycle header must be a JSON object")
    return data


class FileStore(Protocol):
    def url(self, key: str) -> str:
        """The URL clients download the file from."""
        ...

    def key_from_url(self, url: str) -> str | None:
        """The key of a URL this store handed out (so inputs that point at our own files are read locally)."""
        ...

    def put(
        self, key: str, source: Path | bytes, content_type: str, expires_at: float | None, now: float
    ) -> StoredFile:
        """Stores a file atomically (a reader never sees half of it). A Path source is consumed: moved when
        possible, so the caller must not use it afterwards."""
        ...

    def stat(self, key: str, now: float) -> StoredFile:
        """Metadata of a live file; FileNotFound when absent or expired."""
        ...

    def open(self, key: str, byte_range: tuple[int, int] | None = None) -> BinaryIO:
        """The bytes of a file, or only those from `byte_range[0]` to `byte_range[1]` (inclusive, both within
        the file); FileNotFound when absent."""
        ...

    def local_path(self, stored: StoredFile) -> Path | None:
        """Where the bytes of `stored` (as `stat` answered it) are on this machine (None for remote stores)."""
        ...

    def staging_dir(self) -> Path | None:
        """Where an upload's bytes are best written before `put` (on the store's own disk, so that `put` renames
        them in and stale ones are swept); None: the system temp dir."""
        ...

    def download_url(self, key: str, now: float, attachment: bool = False) -> str | None:
        """A URL the client may fetch the bytes from directly (e.g. a presigned GET), or None when the API
        serves them itself. A store that gives URLs raises FileNotFound for a file absent or expired.
        `attachment`: the bytes come with `content_disposition(stored, attachment=True)`."""
        ...

    def delete(self, key: str) -> None: ...
    def sweep_expired(self, now: float) -> int:
        """Deletes expired files; returns how many."""
        ...

    # multipart uploads: parts are numbered from 1 and joined in order on completion
    def create_multipart(self, key: str, content_type: str, expires_at: float | None) -> str: ...
    def put_part(self, upload_id: str, part_number: int, source: Path | bytes, max_total: int | None = None) -> str:
        """Stores one part (its bytes, or a file that the store may move in); returns its ETag. With `max_total`, a
        part that would take the upload's parts past that many bytes is refused (PayloadTooLarge, see
        check_parts_total). A store on a local disk refuses parts and completions that would leave less than its
        upload reserve free (StorageFull)."""
        ...

    def complete_multipart(self, upload_id: str, parts: list[tuple[int, str]], now: float) -> StoredFile: ...
