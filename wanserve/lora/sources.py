"""Where a LoRA `path` points, turned into a local file named by its content.

A path is, in this order:
- an `http(s)://` URL: downloaded with the LoRA size cap, time limit and private-address guard of every URL
  input, and kept in the disk cache by content; the URL is reused without downloading again for
  `lora_url_ttl_s`. A URL of this server's own storage is read locally, and a `data:` URI decodes;
- a `file://` URL, an absolute path, or a relative path ending in a weights suffix: a local file inside
  one of the operator's `lora_roots` (symlinks are followed before the check, so none leads out);
- `owner/name`: a Hugging Face repo, resolved by `huggingface_hub` through its cache (`weight_name` picks
  the file; required when the repo has several `.safetensors`). Offline, only the cache is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import unquote, urlsplit

from wanserve.config import Settings
from wanserve.errors import FieldError, InputFetchError, InputValidationError, LoraError, PrivateAddress, WanserveError
from wanserve.files.base import FileStore, key_from_file_url
from wanserve.files.inputs import (
    FetchPolicy,
    HostNotResolved,
    check_public_host,
    fetch_if_changed,
    is_data_uri,
    lookup_time_left,
    parse_http_url,
    submit_lookup_deadline,
)
from wanserve.logsetup import loggable_file_url
from wanserve.lora.cache import CachedFile, ContentCache, file_sha256
from wanserve.schema import LoRAWeight

log = logging.getLogger("wanserve.lora")

WEIGHT_SUFFIXES = (".safetensors", ".sft")
HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
HF_METADATA_TIMEOUT_S = 10.0
MAX_REMEMBERED_HASHES = 4096
# What peft's `save_pretrained` writes beside `adapter_model.safetensors`: the adapter's rank and alpha, which the
# weights file does not carry. Read from beside a local file or a Hugging Face repo's weights file.
PEFT_CONFIG = "adapter_config.json"
MAX_PEFT_CONFIG_BYTES = 64 * 1024

ExpertName = Literal["high", "low"]
EXPERTS: dict[str, tuple[ExpertName, ...]] = {"high": ("high",), "low": ("low",), "both": ("high", "low")}


class SourceKind(StrEnum):
    URL = "url"
    STORAGE = "storage"
    DATA = "data URI"
    LOCAL = "local file"
    HUB = "Hugging Face"


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file on this machine. `sha256` names the content: the same bytes from two sources are one LoRA."""

    path: Path
    sha256: str
    size: int
    kind: SourceKind
    downloaded: bool  # False: served from a cache (ours or the Hugging Face one) or a local file
    seconds: float  # spent resolving it (download included)
    peft_config: str | None = None  # the text of the adapter_config.json beside it, if any

    @property
    def identity(self) -> str:
        """What names the adapter once loaded: its content, and the PEFT config that scales it."""
        if self.peft_config is None:
            return self.sha256
        return hashlib.sha256(f"{self.sha256}\n{self.peft_config}".encode()).hexdigest()


@dataclass(frozen=True)
class LoraUse:
    """One LoRA of a request: its file, its scale and the experts it applies to."""

    file: LoraFile
    scale: float
    experts: tuple[ExpertName, ...]
    label: str  # the request's path, shortened, for logs and errors


def _hub_unreachable(exc: BaseException) -> bool:
    """A connection or timeout failure, or an answer that says nothing about the repo: the Hub's own error (5xx),
    its rate limit (429) or a request timeout (408). The cache may stand in. An answer about the repo (not found,
    gated, unauthorized) is not one, although huggingface_hub's HTTP errors are OSErrors too. Its errors come from
    its own httpx fork (httpx2), so the check goes by class names rather than by one library's classes."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    return isinstance(exc, OSError) or any(cls.__name__ == "TransportError" for cls in type(exc).__mro__)


def describe_path(path: str) -> str:
    if is_data_uri(path):
        return f"data URI ({len(path)} characters)"
    if path.lower().startswith(("http://", "https://")):
        # No user, password, query (a presigned URL's signature) or folders (a token in the path), but the file's
        # name, which the job log's lines are about.
        return loggable_file_url(path)
    return path if len(path) <= 120 else path[:117] + "..."


def classify(path: str, files: FileStore) -> SourceKind:
    lowered = path.lower()
    if lowered.startswith(("http://", "https://")):
        return SourceKind.STORAGE if files.key_from_url(path) is not None else SourceKind.URL
    if is_data_uri(path):
        return SourceKind.DATA
    if lowered.startswith("file://") or os.path.isabs(path):
        return SourceKind.LOCAL
    if _other_scheme(path):  # before the suffix: s3://bucket/x.safetensors is not a local file named "s3:"
        raise LoraError(unsupported_scheme(path))
    if lowered.endswith(WEIGHT_SUFFIXES):
        return SourceKind.LOCAL
    if HF_REPO_ID.match(path):
        return SourceKind.HUB
    raise LoraError(
        f"{describe_path(path)} is not a URL, a local .safetensors path or a Hugging Face repo id (owner/name)"
    )


def _other_scheme(path: str) -> bool:
    """A URL of a scheme other than http(s) and file (what `classify` refuses)."""
    lowered = path.lower()
    if lowered.startswith(("http://", "https://", "file://")) or is_data_uri(path) or os.path.isabs(path):
        return False
    return "://" in path


def unsupported_scheme(path: str) -> str:
    return f"unsupported URL scheme in {describe_path(path)}: use http(s), a local path or owner/name"


def check_lora_urls(
    loras: Sequence[LoRAWeight],
    public_url: str,
    allow_private: bool,
    deadline: float | None = None,
    own_file_url_valid: Callable[[str], bool] | None = None,
) -> None:
    """At submit, before any job exists: refuses a LoRA URL that is not a valid http(s) URL or whose host is,
    or resolves to, a private, loopback or link-local address (unless `allow_private`), naming `loras.N.path`.
    The worker checks again when it downloads, and connects to the address it checked; a name that does not
    resolve now, or not before `deadline` (all the lookups share it; None: SUBMIT_LOOKUP_S from now), is left to
    it (its error says so). This server's own file URLs are read locally: allowed when `own_file_url_valid` says so
    (on a server with keys, when they are signed and unexpired, as a download of them would need to be)."""
    if deadline is None:
        deadline = submit_lookup_deadline()
    errors: list[dict[str, object]] = []
    for i, lora in enumerate(loras):
        if not lora.path.lower().startswith(("http://", "https://")):
            if _other_scheme(lora.path):
                errors.append(
                    {
                        "loc": ["body", "loras", i, "path"],
                        "msg": unsupported_scheme(lora.path),
                        "type": LoraError.error_type,
                        "input": describe_path(lora.path),
                    }
                )
            continue
        if key_from_file_url(public_url, lora.path) is not None:
            if own_file_url_valid is None or own_file_url_valid(lora.path):
                continue
            errors.append(
                {
                    "loc": ["body", "loras", i, "path"],
                    "msg": "this server's file URL is not signed, or its signature has expired: use the URL its "
                    "upload returned (within its lifetime), or upload the file again",
                    "type": LoraError.error_type,
                    "input": describe_path(lora.path),
                }
            )
            continue
        try:
            _, host, port = parse_http_url(lora.path)
            if not allow_private:
                check_public_host(host, port, lookup_time_left(deadline))
        except PrivateAddress as exc:
            why = f"{exc} (the operator can allow private URLs)"
        except HostNotResolved:
            continue
        except InputFetchError as exc:
            why = str(exc)
        else:
            continue
        errors.append(
            {
                "loc": ["body", "loras", i, "path"],
                "msg": why,
                "type": InputFetchError.error_type,
                "input": describe_path(lora.path),
            }
        )
    if errors:
        raise InputValidationError(errors)


class LoraResolver:
    def __init__(self, settings: Settings, files: FileStore) -> None:
        self.settings = settings
        self.files = files
        self.cache = ContentCache(
            settings.resolved_lora_cache_dir(), settings.lora_cache_bytes, settings.lora_url_ttl_s
        )
        self.policy = FetchPolicy(
            max_bytes=settings.lora_max_bytes,
            timeout_s=settings.lora_download_timeout_s,
            allow_private=settings.allow_private_urls,
        )
        self.roots = [root.expanduser().resolve() for root in settings.lora_roots]
        # Local and Hugging Face files are hashed once per version of the file (path, size, mtime, inode).
        self._hashes: dict[tuple[str, int, int, int], str] = {}

    def uses(self, loras: Sequence[LoRAWeight], before_each: Callable[[int, str], None] | None = None) -> list[LoraUse]:
        """Resolves every LoRA of a request; a failure names the field (`loras.N.path`) it came from.
        `before_each(index, label)` runs before each one (the worker logs progress and checks for a cancel)."""
        out: list[LoraUse] = []
        for i, lora in enumerate(loras):
            # The files resolved so far are read only once all are: a long download must not let them age out of
            # the cache meanwhile (eviction spares what was used in the last IN_USE_S seconds).
            self._keep(out)
            if before_each is not None:
                before_each(i, describe_path(lora.path))
            try:
                file = self.resolve(lora.path, lora.weight_name)
            except WanserveError as exc:
                raise FieldError(("loras", i, "path"), exc, describe_path(lora.path)) from exc
            out.append(LoraUse(file, lora.scale, EXPERTS[lora.transformer], describe_path(lora.path)))
        self._keep(out)
        return out

    def _keep(self, uses: list[LoraUse]) -> None:
        for use in uses:
            self.cache.keep(use.file.path)

    def resolve(self, path: str, weight_name: str | None = None) -> LoraFile:
        started = time.perf_counter()
        kind = classify(path, self.files)
        if kind in (SourceKind.LOCAL, SourceKind.HUB):
            try:
                if kind is SourceKind.LOCAL:
                    found, named = self._local(path)
                    # beside the file as the request names it (a link into a blob store keeps its config beside the
                    # link), else beside its target; either only inside the roots
                    config = _peft_config_beside(named, self.roots)
                    if config is None and found.parent != named.parent:  # the same folder is not read twice
                        config = _peft_config_beside(found, self.roots)
                else:
                    found = self._hub(path, weight_name)
                    config = _peft_config_beside(found)
                return replace(self._hashed(found, kind, started), peft_config=config)
            except (OSError, ValueError) as exc:  # a NUL in the path, a name too long, a file we may not read
                raise LoraError(f"cannot read {describe_path(path)}: {type(exc).__name__}") from None
        now = time.time()
        # a data URI is its own content: nothing to look up, and not worth an index entry holding all of it
        index_key = None if kind is SourceKind.DATA else path
        entry = self.cache.entry(index_key) if index_key is not None else None
        fresh = entry is not None and now - entry.fetched_at <= self.cache.url_ttl_s

        def cached(file: CachedFile) -> LoraFile:
            return LoraFile(file.path, file.sha256, file.size, kind, False, time.perf_counter() - started)

        if entry is not None and fresh and entry.validators is None:  # a source that names no version: the TTL
            return cached(entry.file)
        staged = self.cache.temp_path()
        try:
            try:
                # A server that named its version (ETag, Last-Modified) is asked each time: a file replaced at
                # the same URL (a Hub `resolve/main` link, an overwritten object) is used at once.
                known = entry.validators if entry is not None else None
                fetched = fetch_if_changed(path, staged, self.files, self.policy, known)
            except InputFetchError as exc:
                if entry is None or not fresh or exc.answered is not None:  # it answered: gone, or forbidden now
                    raise
                log.warning("LoRA %s: could not ask whether it changed (%s); using the copy fetched %.0f s ago",
                            describe_path(path), exc, now - entry.fetched_at)  # fmt: skip
                return cached(entry.file)
            if not fetched.changed and entry is not None:
                assert index_key is not None
                self.cache.confirm(index_key, entry.file, now, fetched.validators)
                return cached(entry.file)
            added = self.cache.add(staged, index_key, now, fetched.validators)
        finally:
            staged.unlink(missing_ok=True)
        downloaded = kind is SourceKind.URL
        return LoraFile(added.path, added.sha256, added.size, kind, downloaded, time.perf_counter() - started)

    def _hashed(self, path: Path, kind: SourceKind, started: float) -> LoraFile:
        st = path.stat()
        if st.st_size > self.policy.max_bytes:
            raise LoraError(f"the file is {st.st_size} bytes, over the {self.policy.max_bytes}-byte LoRA limit")
        version = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        sha = self._hashes.get(version)
        if sha is None:
            if len(self._hashes) >= MAX_REMEMBERED_HASHES:
                self._hashes.clear()
            sha = self._hashes[version] = file_sha256(path)
        return LoraFile(path, sha, st.st_size, kind, False, time.perf_counter() - started)

    # --- local folders ---
    def _local(self, raw: str) -> tuple[Path, Path]:
        """The file `raw` names inside the roots: its real path, and the path as named (before links)."""
        if not self.roots:
            raise LoraError(
                f"{describe_path(raw)} is neither a URL nor a Hugging Face repo, and local LoRA paths are disabled on "
                "this server (the operator sets WANSERVE_LORA_ROOTS); a file on your machine must be uploaded first "
                "(`wanserve run --lora FILE` and the fal clients do that for a file that exists)"
            )
        text = unquote(urlsplit(raw).path) if raw.lower().startswith("file://") else raw
        requested = Path(text)
        candidates = [requested] if requested.is_absolute() else [root / requested for root in self.roots]
        for candidate in candidates:  # roots in order; one whose path leads out (`..`, a symlink) is refused
            real = candidate.resolve()  # follows every symlink, so the check sees the real target
            if not any(real.is_relative_to(root) for root in self.roots):
                raise LoraError(f"{describe_path(raw)} is outside the folders LoRAs may be read from")
            if real.is_file():
                return real, candidate
        raise LoraError(f"no LoRA file {describe_path(raw)} in the folders LoRAs may be read from")

    # --- the Hugging Face Hub ---
    @property
    def hub_offline(self) -> bool:
        from huggingface_hub import constants

        return self.settings.hf_offline or bool(constants.HF_HUB_OFFLINE)

    def _hub(self, repo_id: str, weight_name: str | None) -> Path:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        s = self.settings
        where = f"Hugging Face repo {repo_id}" + (f" file {weight_name}" if weight_name else "")
        reachable = not self.hub_offline
        with_config = False
        try:
            if reachable:
                try:
                    weight_name, with_config = self._hub_pick_online(repo_id, weight_name)
                except Exception as exc:
                    if not _hub_unreachable(exc):
                        raise
                    # the Hub is unreachable: the cache may still have the file
                    log.warning("Hugging Face Hub unreachable (%s): looking in the local cache", type(exc).__name__)
                    reachable = False
            if weight_name is None:
                snapshot = Path(snapshot_download(repo_id, cache_dir=s.hf_cache_dir, local_files_only=True))
                names = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*.safetensors"))
                weight_name = self._only_weights(repo_id, names)

            def download(name: str) -> Path:
                return Path(
                    hf_hub_download(
                        repo_id,
                        name,
                        cache_dir=s.hf_cache_dir,
                        local_files_only=not reachable,
                        token=s.hf_token,
                        endpoint=s.hf_endpoint,
                        etag_timeout=HF_METADATA_TIMEOUT_S,
                    )
                )

            weights = download(weight_name)
            if with_config:  # into the snapshot beside the weights, where _peft_config_beside finds it
                download(_beside(weight_name, PEFT_CONFIG))
            return weights
        except LoraError:
            raise
        except LocalEntryNotFoundError:
            why = "the server is offline" if self.hub_offline else "the Hub cannot be reached"
            raise LoraError(f"{where} is not in this server's Hugging Face cache and {why}") from None
        except Exception as exc:  # RepositoryNotFound, gated repos, HTTP and network errors
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise LoraError(f"{where}: {type(exc).__name__}: {self._without_cache_path(first_line)[:300]}") from None

    def _without_cache_path(self, text: str) -> str:
        """The library's own message, without the server's cache folder in it (a refused file name is reported
        with the path it would have had there): the caller learns what went wrong, not where this server keeps
        files."""
        from huggingface_hub import constants

        for folder in sorted({str(self.settings.hf_cache_dir or ""), str(constants.HF_HUB_CACHE)}, key=len)[::-1]:
            if folder:
                text = text.replace(folder, "<cache>")
        return text

    def _hub_pick_online(self, repo_id: str, weight_name: str | None) -> tuple[str, bool]:
        """The file to use (the only .safetensors when `weight_name` is None), checked against the size cap, and
        whether a PEFT adapter_config.json lies beside it."""
        from huggingface_hub import HfApi

        info = HfApi(endpoint=self.settings.hf_endpoint, token=self.settings.hf_token).model_info(
            repo_id, files_metadata=True, timeout=HF_METADATA_TIMEOUT_S
        )
        sizes = {f.rfilename: f.size for f in info.siblings or []}
        if weight_name is None:
            weight_name = self._only_weights(repo_id, sorted(n for n in sizes if n.endswith(".safetensors")))
        if weight_name not in sizes:
            raise LoraError(f"Hugging Face repo {repo_id} has no file {weight_name}")
        size = sizes[weight_name]
        if size is not None and size > self.policy.max_bytes:
            raise LoraError(
                f"Hugging Face repo {repo_id} file {weight_name} is {size} bytes, "
                f"over the {self.policy.max_bytes}-byte LoRA limit"
            )
        config_size = sizes.get(_beside(weight_name, PEFT_CONFIG), -1)
        return weight_name, config_size is not None and 0 <= config_size <= MAX_PEFT_CONFIG_BYTES

    @staticmethod
    def _only_weights(repo_id: str, names: list[str]) -> str:
        if not names:
            raise LoraError(f"Hugging Face repo {repo_id} has no .safetensors file")
        if len(names) > 1:
            shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
            raise LoraError(
                f"Hugging Face repo {repo_id} has several .safetensors files; choose one with weight_name ({shown})"
            )
        return names[0]


def _beside(name: str, sibling: str) -> str:
    """A repo path in the same folder as `name`."""
    return str(PurePosixPath(name).parent / sibling).removeprefix("./")


def _peft_config_beside(weights: Path, roots: Sequence[Path] | None = None) -> str | None:
    """The text of a PEFT adapter_config.json in the weights file's folder, if there is a small one (and, given
    `roots`, one that is really inside them: not a link that leads out)."""
    config = weights.parent / PEFT_CONFIG
    try:
        if roots is not None and not any(config.resolve().is_relative_to(root) for root in roots):
            return None
        if not config.is_file() or config.stat().st_size > MAX_PEFT_CONFIG_BYTES:
            return None
        return config.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
