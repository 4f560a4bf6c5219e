"""The distributed file store: an S3-compatible bucket (AWS, MinIO, R2, Ceph...) that every API replica and
worker shares. All state lives in the bucket, under `<prefix>/`:

- `<key>`: a file. Its content type is the object's and its times are user metadata, so one PUT (atomic in
  S3: no reader ever sees half an object) stores both, and one HEAD reads both.
- `.expiry/<second>/<key, / as ~>`: an empty marker for each file that expires, named by when, so that a
  sweep lists only the markers that are due instead of every object.
- `.multipart/<upload id>.json`: the S3 upload behind one of our upload ids, so any replica (or a restarted
  one) takes the next part.

No key can reach the last two: the first segment of a key never holds a dot (see `check_key`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from wanserve.errors import FileNotFound, InvalidFileKey, InvalidUpload, StorageUnavailable
from wanserve.files.base import (
    ABANDONED_UPLOAD_S,
    StoredFile,
    check_key,
    check_part_number,
    check_part_numbers,
    check_parts_total,
    check_upload_id,
    content_disposition,
    file_url,
    key_from_file_url,
    new_upload_id,
)
from wanserve.numbers import ascii_int

if TYPE_CHECKING:
    from wanserve.config import Settings

log = logging.getLogger("wanserve.files.s3")

Delivery = Literal["redirect", "stream"]

EXPIRY_DIR = ".expiry/"
MULTIPART_DIR = ".multipart/"
_SEP = "~"  # stands for the key's "/" in a marker name: never in a key, so the name maps back to one key
_CREATED = "created-at"
_EXPIRES = "expires-at"
_ABSENT = {"404", "NoSuchKey", "NotFound", "NoSuchUpload"}
# Answers that may well be different a moment later (besides any 5xx or 429).
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable", "InternalError"}
# S3's refusals of a multipart completion that the client caused (a 400 with a reason, not an outage).
_REFUSED_PARTS = {
    "EntityTooSmall": "every part but the last must be at least 5 MiB (the S3 minimum)",
    "InvalidPart": "a listed part is not among the uploaded ones",
    "InvalidPartOrder": "parts must be listed in ascending order",
}


@contextmanager
def _s3(operation: str, missing: str) -> Iterator[None]:
    """S3's answers as this project's errors: absent -> FileNotFound (`missing` is its message), a refused
    multipart completion -> InvalidUpload, anything else S3 could not do -> StorageUnavailable (503), logged
    here with S3's own code so an operator sees the cause (credentials, bucket name, network)."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code in _ABSENT:
            raise FileNotFound(missing) from None
        if code in _REFUSED_PARTS:
            raise InvalidUpload(f"multipart upload refused: {_REFUSED_PARTS[code]}") from None
        log.error("S3 %s failed: %s: %s", operation, code, error.get("Message", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        transient = status >= 500 or status == 429 or code in _TRANSIENT
        raise StorageUnavailable(f"the file store failed ({operation}: {code})", transient=transient) from exc
    except (BotoCoreError, Boto3Error) as exc:  # unreachable, timed out, a broken connection
        log.error("S3 %s failed: %s", operation, exc)
        raise StorageUnavailable(f"the file store failed ({operation}: {type(exc).__name__})", transient=True) from exc


def new_client(endpoint_url: str | None, region: str | None) -> Any:
    """The boto3 S3 client a store uses unless given one: one per process is enough (it is thread-safe)."""
    config = Config(
        retries={"mode": "standard", "max_attempts": 5},  # throttling and 5xx answers are retried with backoff
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=50,  # in `stream` delivery every download holds a connection while it lasts
        # Services outside AWS (MinIO, Ceph) are usually reached by path; AWS prefers virtual hosts.
        s3={"addressing_style": "path" if endpoint_url else "auto"},
        # Checksums only where S3 requires them: botocore's newer defaults break several S3-compatible services.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        signature_version="s3v4",
    )
    # A session of its own: boto3's default session is shared state, a client is safe across threads.
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def _metadata(created_at: float, expires_at: float | None) -> dict[str, str]:
    meta = {_CREATED: repr(created_at)}  # repr: the float reads back exactly
    if expires_at is not None:
        meta[_EXPIRES] = repr(expires_at)
    return meta


class S3FileStore:
    """`url(key)` is always the API's `/files/<key>` (job outputs keep it; a presigned URL would expire); the
    API then redirects to a fresh presigned GET (`delivery="redirect"`) or relays the bytes (`"stream"`)."""

    # How `put` uploads a finished file: multipart above the threshold, parts in parallel.
    transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=16 << 20, max_concurrency=4)

    def __init__(
        self,
        bucket: str,
        prefix: str,
        public_url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        delivery: Delivery = "redirect",
        presign_s: int = 3600,
        client: Any = None,
    ) -> None:
        self.bucket = bucket
        self.root = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.public_url = public_url.rstrip("/")
        self.delivery = delivery
        self.presign_s = presign_s
        self._client = client if client is not None else new_client(endpoint_url, region)

    @classmethod
    def from_settings(cls, settings: Settings) -> S3FileStore:
        bucket, _, prefix = settings.files.removeprefix("s3://").partition("/")
        return cls(
            bucket,
            prefix,
            settings.resolved_public_url(),
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            delivery=settings.s3_delivery,
            presign_s=settings.s3_presign_s,
        )

    # --- names in the bucket ---
    def _object(self, key: str) -> str:
        return self.root + check_key(key)

    def _marker(self, key: str, expires_at: float) -> str:
        # Whole seconds rounded up: a marker listed as due is never early (a file may outlive it by < 1 s).
        return f"{self.root}{EXPIRY_DIR}{math.ceil(expires_at):012d}/{key.replace('/', _SEP)}"

    def _state(self, upload_id: str) -> str:
        return f"{self.root}{MULTIPART_DIR}{check_upload_id(upload_id)}.json"

    # --- files ---
    def url(self, key: str) -> str:
        return file_url(self.public_url, key)

    def key_from_url(self, url: str) -> str | None:
        return key_from_file_url(self.public_url, url)

    def put(
        self, key: str, source: Path | bytes, content_type: str, expires_at: float | None, now: float
    ) -> StoredFile:
        target = self._object(key)
        self._mark_expiry(key, expires_at)
        extra = {"ContentType": content_type, "Metadata": _metadata(now, expires_at)}
        if isinstance(source, bytes):
            with _s3("PutObject", f"no such file: {key}"):
                self._client.put_object(Bucket=self.bucket, Key=target, Body=source, **extra)
        else:
            with _s3("upload", f"no such file: {key}"):
                self._client.upload_file(str(source), self.bucket, target, ExtraArgs=extra, Config=self.transfer)
        stored = self._still_swept(self._head(key))
        if isinstance(source, Path):  # only now: a put that failed after the upload is tried again from the file
            source.unlink(missing_ok=True)
        return stored

    def _mark_expiry(self, key: str, expires_at: float | None) -> None:
        """Written before the object: no file is ever without the marker that sweeps it. A marker whose
        object never came is dropped by the sweep."""
        if expires_at is None:
            return
        with _s3("PutObject", f"no such file: {key}"):
            self._client.put_object(Bucket=self.bucket, Key=self._marker(key, expires_at), Body=b"")

    def _still_swept(self, stored: StoredFile) -> StoredFile:
        """A file that was already due when its bytes arrived may have lost its marker to a sweep that found
        no object yet (a lifetime shorter than the upload): marked again, or it would never be deleted."""
        if stored.expires_at is not None and stored.expires_at <= time.time():
            self._mark_expiry(stored.key, stored.expires_at)
        return stored

    def _head(self, key: str) -> StoredFile:
        """A file's metadata whether or not it has expired."""
        with _s3("HeadObject", f"no such file: {key}"):
            head = self._client.head_object(Bucket=self.bucket, Key=self._object(key))
        meta = head.get("Metadata", {})
        created = float(meta[_CREATED]) if _CREATED in meta else head["LastModified"].timestamp()
        return StoredFile(
            key=key,
            content_type=head.get("ContentType", "application/octet-stream"),
            size=int(head["ContentLength"]),
            file_name=key.split("/", 1)[1],
            created_at=created,
            expires_at=float(meta[_EXPIRES]) if _EXPIRES in meta else None,
            etag=str(head["ETag"]).strip('"'),  # a multipart object's is `<md5 of part md5s>-<parts>`
        )

    def stat(self, key: str, now: float) -> StoredFile:
        stored = self._head(key)
        if stored.expires_at is not None and stored.expires_at <= now:
            raise FileNotFound(f"file expired: {key}")
        return stored

    def open(self, key: str, byte_range: tuple[int, int] | None = None) -> BinaryIO:
        request = {"Bucket": self.bucket, "Key": self._object(key)}
        if byte_range is not None:
            request["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
        with _s3("GetObject", f"no such file: {key}"):
            body: BinaryIO = self._client.get_object(**request)["Body"]  # a file-like StreamingBody
        return body

    def local_path(self, stored: StoredFile) -> Path | None:
        return None

    def staging_dir(self) -> Path | None:
        return None

    def download_url(self, key: str, now: float, attachment: bool = False) -> str | None:
        if self.delivery != "redirect":
            return None
        stored = self.stat(key, now)
        lifetime = self.presign_s
        if stored.expires_at is not None:  # the URL must not outlive the file
            lifetime = max(1, min(lifetime, math.ceil(stored.expires_at - now)))
        params = {
            "Bucket": self.bucket,
            "Key": self._object(key),
            "ResponseContentType": stored.content_type,
            "ResponseContentDisposition": content_disposition(stored, attachment),
        }
        with _s3("presign", f"no such file: {key}"):
            url: str = self._client.generate_presigned_url("get_object", Params=params, ExpiresIn=lifetime)
        return url

    def delete(self, key: str) -> None:
        try:
            expires_at = self._head(key).expires_at
        except FileNotFound:
            expires_at = None
        with _s3("DeleteObject", f"no such file: {key}"):
            self._client.delete_object(Bucket=self.bucket, Key=self._object(key))
            if expires_at is not None:
                self._client.delete_object(Bucket=self.bucket, Key=self._marker(key, expires_at))

    def sweep_expired(self, now: float) -> int:
        deleted = 0
        for marker, key in self._due_markers(now):
            deleted += self._sweep(marker, key, now)
        self._abort_abandoned_uploads(now)
        return deleted

    def _due_markers(self, now: float) -> Iterator[tuple[str, str]]:
        """(marker, key) of every marker due by `now`: the listing is in name order, so it stops at the
        first marker still in the future."""
        prefix = f"{self.root}{EXPIRY_DIR}"
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        with _s3("ListObjectsV2", "no such bucket"):
            for page in pages:
                for entry in page.get("Contents", []):
                    second, _, name = entry["Key"][len(prefix) :].partition("/")
                    expiry = ascii_int(second)
                    if expiry is None:
                        continue
                    if expiry > now:
                        return
                    try:
                        yield entry["Key"], check_key(name.replace(_SEP, "/"))
                    except InvalidFileKey:
                        continue  # not a name this store writes: leave it

    def _sweep(self, marker: str, key: str, now: float) -> bool:
        """Deletes the file a due marker names if it has expired (it may have been stored again since, with
        a later expiry or none), then the marker."""
        try:
            stored: StoredFile | None = self._head(key)
        except FileNotFound:
            stored = None
        expired = stored is not None and stored.expires_at is not None and stored.expires_at <= now
        with _s3("DeleteObject", f"no such file: {key}"):
            if expired:
                self._client.delete_object(Bucket=self.bucket, Key=self._object(key))
            self._client.delete_object(Bucket=self.bucket, Key=marker)
        return expired

    def _abort_abandoned_uploads(self, now: float) -> None:
        """Multipart uploads never completed (ours, and `put`'s own that a crash interrupted) keep their parts
        (and S3 bills them) until aborted."""
        cutoff = now - ABANDONED_UPLOAD_S
        uploads = self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.root)
        with _s3("ListMultipartUploads", "no such bucket"):
            for page in uploads:
                for upload in page.get("Uploads", []):
                    if upload["Initiated"].timestamp() < cutoff:
                        # suppress: completed or aborted since the listing
                        with suppress(FileNotFound), _s3("AbortMultipartUpload", "no such upload"):
                            self._client.abort_multipart_upload(
                                Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                            )
        states = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.root}{MULTIPART_DIR}"
        )
        with _s3("ListObjectsV2", "no such bucket"):
            for page in states:
                for entry in page.get("Contents", []):
                    if entry["LastModified"].timestamp() < cutoff:
                        self._client.delete_object(Bucket=self.bucket, Key=entry["Key"])

    # --- multipart ---
    def create_multipart(self, key: str, content_type: str, expires_at: float | None) -> str:
        """S3 fixes an object's metadata when its upload is created, so the file's `created_at` is the time
        the upload began."""
        target = self._object(key)
        upload_id = new_upload_id()
        self._mark_expiry(key, expires_at)
        with _s3("CreateMultipartUpload", f"no such file: {key}"):
            s3_upload = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=target, ContentType=content_type, Metadata=_metadata(time.time(), expires_at)
            )["UploadId"]
            state = json.dumps({"key": key, "s3_upload_id": s3_upload}).encode()
            self._client.put_object(
                Bucket=self.bucket, Key=self._state(upload_id), Body=state, ContentType="application/json"
            )
        return upload_id

    def _upload(self, upload_id: str) -> tuple[str, str]:
        """(key, S3 upload id) of one of our upload ids."""
        with _s3("GetObject", f"no such multipart upload: {upload_id}"):
            state = json.loads(self._client.get_object(Bucket=self.bucket, Key=self._state(upload_id))["Body"].read())
        return str(state["key"]), str(state["s3_upload_id"])

    def put_part(self, upload_id: str, part_number: int, source: Path | bytes, max_total: int | None = None) -> str:
        check_part_number(part_number)
        key, s3_upload = self._upload(upload_id)
        if max_total is not None:
            sizes = {number: size for number, (_etag, size) in self._uploaded_parts(upload_id, key, s3_upload).items()}
            check_parts_total(
                sizes, part_number, len(source) if isinstance(source, bytes) else source.stat().st_size, max_total
            )
        with ExitStack() as stack, _s3("UploadPart", f"no such multipart upload: {upload_id}"):
            body = source if isinstance(source, bytes) else stack.enter_context(source.open("rb"))
            answer = self._client.upload_part(
                Bucket=self.bucket, Key=self._object(key), UploadId=s3_upload, PartNumber=part_number, Body=body
            )
        return str(answer["ETag"]).strip('"')

    def complete_multipart(self, upload_id: str, parts: list[tuple[int, str]], now: float) -> StoredFile:
        key, s3_upload = self._upload(upload_id)
        check_part_numbers(parts)
        uploaded = self._uploaded_parts(upload_id, key, s3_upload)
        for number, etag in sorted(parts):
            if number not in uploaded:
                raise InvalidUpload(f"part {number} was never uploaded")
            if etag and etag.strip('"') != uploaded[number][0]:
                raise InvalidUpload(f"part {number}: ETag does not match the uploaded bytes")
        listed = [{"PartNumber": number, "ETag": uploaded[number][0]} for number, _ in sorted(parts)]
        with _s3("CompleteMultipartUpload", f"no such multipart upload: {upload_id}"):
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=self._object(key), UploadId=s3_upload, MultipartUpload={"Parts": listed}
            )
        # The file is stored: a state left behind only answers "no such upload" and the sweep removes it.
        with suppress(StorageUnavailable), _s3("DeleteObject", "no such upload state"):
            self._client.delete_object(Bucket=self.bucket, Key=self._state(upload_id))
        return self._still_swept(self._head(key))

    def _uploaded_parts(self, upload_id: str, key: str, s3_upload: str) -> dict[int, tuple[str, int]]:
        """Part number -> (ETag, bytes), as S3 has them (a completion may list a part without its ETag)."""
        pages = self._client.get_paginator("list_parts").paginate(
            Bucket=self.bucket, Key=self._object(key), UploadId=s3_upload
        )
        with _s3("ListParts", f"no such multipart upload: {upload_id}"):
            return {
                int(p["PartNumber"]): (str(p["ETag"]).strip('"'), int(p["Size"]))
                for page in pages
                for p in page.get("Parts", [])
            }
