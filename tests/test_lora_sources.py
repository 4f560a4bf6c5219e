"""Where a LoRA `path` points: URLs through the disk cache, our storage, data URIs, allowed local folders and
the Hugging Face cache; and every way a path is refused."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from file_server import FileServer, running_file_server
from hub_server import running_hub

from wanserve.client.local_server import free_port
from wanserve.config import Settings
from wanserve.errors import FieldError, InputFetchError, LoraError, PrivateAddress, StorageUnavailable
from wanserve.files.base import new_key
from wanserve.files.local import LocalFileStore
from wanserve.lora.cache import ContentCache, file_sha256
from wanserve.lora.sources import LoraResolver, SourceKind
from wanserve.schema import LoRAWeight

Make = Callable[..., LoraResolver]


@pytest.fixture
def http() -> Iterator[FileServer]:
    with running_file_server() as server:
        yield server


@pytest.fixture
def files(tmp_path: Path) -> LocalFileStore:
    return LocalFileStore(tmp_path / "files", "http://wanserve.test")


@pytest.fixture
def roots(tmp_path: Path) -> list[Path]:
    made = [tmp_path / "loras", tmp_path / "more-loras"]
    for root in made:
        root.mkdir()
    return made


@pytest.fixture
def make(tmp_path: Path, files: LocalFileStore, roots: list[Path]) -> Make:
    def build(**overrides: object) -> LoraResolver:
        defaults: dict[str, object] = {
            "cache_dir": tmp_path / "cache",
            "allow_private_urls": True,
            "lora_roots": roots,
            "hf_offline": True,
            "hf_cache_dir": tmp_path / "hf",
        }
        settings = Settings(**{**defaults, **overrides})  # type: ignore[arg-type]
        return LoraResolver(settings, files)

    return build


def test_a_url_is_downloaded_once_then_served_from_the_disk_cache(http: FileServer, make: Make) -> None:
    http.files["/style.safetensors"] = b"lora bytes " * 100
    url = http.url("/style.safetensors")
    first = make().resolve(url)
    assert first.kind is SourceKind.URL and first.downloaded and http.hits["/style.safetensors"] == 1
    assert first.path.read_bytes() == http.files["/style.safetensors"] and first.sha256 == file_sha256(first.path)
    second = make().resolve(url)  # a new resolver (a restarted worker) shares the disk cache
    assert not second.downloaded and second.sha256 == first.sha256 and second.path == first.path
    assert http.hits["/style.safetensors"] == 1


def test_a_url_whose_server_names_its_version_is_asked_again_and_a_replaced_file_is_used_at_once(
    http: FileServer, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """A Hub `resolve/main` link or an overwritten object changes in place: with an ETag, each use asks (304 while
    unchanged, nothing downloaded); a new version is used at once, not after the URL TTL (7 days)."""
    http.etags = True
    path = "/style.safetensors"
    http.files[path] = b"version 1 " * 100
    first = make().resolve(http.url(path))
    second = make().resolve(http.url(path))
    assert first.downloaded and not second.downloaded and second.sha256 == first.sha256
    assert http.hits[path] == 2 and http.not_modified[path] == 1
    http.files[path] = b"version 2 " * 100
    third = make().resolve(http.url(path))
    assert third.downloaded and third.path.read_bytes() == http.files[path] and third.sha256 != first.sha256
    assert make().resolve(http.url(path)).sha256 == third.sha256 and http.not_modified[path] == 2
    # Gone (the server answers 404): an error, not the old copy.
    del http.files[path]
    with pytest.raises(InputFetchError, match="HTTP 404"):
        make().resolve(http.url(path))
    # Unreachable: the copy fetched within the TTL is used, and the log says so.
    with running_file_server() as gone:
        gone.etags = True
        gone.files[path] = b"kept " * 100
        url = gone.url(path)
        kept = make().resolve(url)
    with caplog.at_level("WARNING", logger="wanserve.lora"):
        assert make().resolve(url).sha256 == kept.sha256
    assert "could not ask whether it changed" in caplog.text


def test_ttl_zero_downloads_every_time_and_the_same_content_is_one_blob(http: FileServer, make: Make) -> None:
    http.files["/a.safetensors"] = http.files["/b.safetensors"] = b"same content"
    resolver = make(lora_url_ttl_s=0)
    a1, a2 = resolver.resolve(http.url("/a.safetensors")), resolver.resolve(http.url("/a.safetensors"))
    b = resolver.resolve(http.url("/b.safetensors"))
    assert http.hits["/a.safetensors"] == 2 and a1.downloaded and a2.downloaded
    assert a1.sha256 == b.sha256 and len(list(resolver.cache.blobs.iterdir())) == 1


def test_cache_entries_expire_after_their_ttl(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "c", max_bytes=1 << 20, url_ttl_s=60)
    staged = cache.temp_path()
    staged.write_bytes(b"x" * 10)
    cache.add(staged, "https://example.com/x.safetensors", now=1000.0)
    assert cache.lookup("https://example.com/x.safetensors", now=1059.0) is not None
    assert cache.lookup("https://example.com/x.safetensors", now=1061.0) is None
    assert cache.lookup("https://example.com/other.safetensors", now=1001.0) is None


def test_url_index_entries_go_once_expired_even_while_their_file_stays(tmp_path: Path) -> None:
    """Presigned URLs differ on every request: each adds an index entry for the same (fresh) file."""
    cache = ContentCache(tmp_path / "c", max_bytes=1 << 20, url_ttl_s=60)
    for i in range(50):
        staged = cache.temp_path()
        staged.write_bytes(b"the same lora")
        cache.add(staged, f"https://bucket.example/l.safetensors?X-Amz-Signature={i}", now=time.time())
    assert len(list(cache.index.glob("*.json"))) == 50 and len(list(cache.blobs.iterdir())) == 1
    cache.evict(time.time() + 61)  # what the next download runs; a minute later every entry is past its TTL
    assert list(cache.index.glob("*.json")) == [] and len(list(cache.blobs.iterdir())) == 1
    no_ttl = ContentCache(tmp_path / "c2", max_bytes=1 << 20, url_ttl_s=0)
    staged = no_ttl.temp_path()
    staged.write_bytes(b"x")
    no_ttl.add(staged, "https://example.com/x.safetensors", now=time.time())
    assert list(no_ttl.index.glob("*.json")) == []  # never looked up: never written


def test_disk_cache_is_bounded_least_recently_used_first_but_spares_files_in_use(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "c", max_bytes=250, url_ttl_s=10**9)

    def add(name: str, fill: bytes) -> Path:
        staged = cache.temp_path()
        staged.write_bytes(fill * 100)
        return cache.add(staged, f"https://example.com/{name}", time.time()).path

    def age(path: Path, seconds: float) -> None:
        old = time.time() - seconds
        os.utime(path, (old, old))

    a, b = add("a", b"a"), add("b", b"b")
    age(a, 3000)
    age(b, 2000)
    assert cache.lookup("https://example.com/a", time.time()) is not None  # a hit: a is in use again
    add("c", b"c")  # 300 bytes > 250: the least recently used file not in use (b) goes
    assert cache.lookup("https://example.com/b", time.time()) is None
    assert cache.lookup("https://example.com/a", time.time()) is not None
    assert cache.lookup("https://example.com/c", time.time()) is not None
    assert sum(p.stat().st_size for p in cache.blobs.iterdir()) <= 250
    assert len(list(cache.index.iterdir())) == 2  # b's index entry went with its blob

    # files just fetched are never pulled from under the request that is about to read them
    tight = ContentCache(tmp_path / "tight", max_bytes=0, url_ttl_s=10**9)
    staged = tight.temp_path()
    staged.write_bytes(b"x" * 10)
    first = tight.add(staged, "https://example.com/1", time.time()).path
    staged = tight.temp_path()
    staged.write_bytes(b"y" * 10)
    tight.add(staged, "https://example.com/2", time.time())
    assert first.exists() and len(list(tight.blobs.iterdir())) == 2
    for blob in tight.blobs.iterdir():
        age(blob, 3600)
    assert len(tight.evict(time.time())) == 2


def test_a_truncated_index_entry_is_a_miss(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "c", max_bytes=1 << 20, url_ttl_s=3600)
    staged = cache.temp_path()
    staged.write_bytes(b"x")
    cache.add(staged, "https://example.com/x", time.time())
    (entry,) = cache.index.iterdir()
    entry.write_text(entry.read_text()[:10])
    assert cache.lookup("https://example.com/x", time.time()) is None


def test_claimed_size_over_the_cap_is_refused_before_reading_it(http: FileServer, make: Make) -> None:
    http.claimed_sizes["/huge.safetensors"] = 2_000_000_000
    resolver = make(lora_max_bytes=1024**3)
    with pytest.raises(FieldError) as err:
        resolver.uses([LoRAWeight(path=http.url("/huge.safetensors"))])
    assert err.value.loc == ("loras", 0, "path") and err.value.error_type == "file_download_error"
    assert "over the 1073741824-byte input limit" in str(err.value)
    assert list(resolver.cache.blobs.iterdir()) == [] and list(resolver.cache.tmp.iterdir()) == []


def test_private_addresses_are_refused_without_a_request(http: FileServer, make: Make) -> None:
    http.files["/x.safetensors"] = b"x"
    with pytest.raises(PrivateAddress):
        make(allow_private_urls=False).resolve(http.url("/x.safetensors"))
    assert http.hits["/x.safetensors"] == 0


def test_own_storage_and_data_uris_are_read_without_http(files: LocalFileStore, make: Make, tmp_path: Path) -> None:
    source = tmp_path / "upload.safetensors"
    source.write_bytes(b"stored lora")
    key = new_key("upload.safetensors")
    files.put(key, source, "application/octet-stream", None, time.time())
    stored = make().resolve(files.url(key))
    assert stored.kind is SourceKind.STORAGE and stored.path.read_bytes() == b"stored lora"
    data = make().resolve("data:application/octet-stream;base64," + base64.b64encode(b"inline lora").decode())
    assert data.kind is SourceKind.DATA and data.path.read_bytes() == b"inline lora"


def test_a_missing_file_of_our_own_storage_is_a_422_on_its_field(files: LocalFileStore, make: Make) -> None:
    """Not the store's 404: on a result that would read as "no such request"."""
    gone = files.url(new_key("deleted.safetensors"))
    with pytest.raises(FieldError) as err:
        make().uses([LoRAWeight(path=gone)])
    assert err.value.http_status == 422 and err.value.error_type == "file_not_found"
    assert err.value.detail()["loc"] == ["body", "loras", 0, "path"]
    outage = FieldError(("loras", 0, "path"), StorageUnavailable("S3 GetObject failed"))
    assert outage.http_status == 503  # the server failed, not the input


def test_local_paths_inside_the_roots(make: Make, roots: list[Path]) -> None:
    (roots[1] / "styles").mkdir()
    wanted = roots[1] / "styles" / "ink.safetensors"
    wanted.write_bytes(b"ink")
    resolver = make()
    for path in (str(wanted), f"file://{wanted}", "styles/ink.safetensors"):
        got = resolver.resolve(path)
        assert got.path == wanted and got.kind is SourceKind.LOCAL and got.sha256 == file_sha256(wanted)
    wanted.write_bytes(b"new ink")  # a changed file is hashed again
    assert resolver.resolve(str(wanted)).sha256 == file_sha256(wanted)


def test_local_paths_cannot_escape_their_roots(make: Make, roots: list[Path], tmp_path: Path) -> None:
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"not yours")
    (roots[0] / "link.safetensors").symlink_to(secret)
    (roots[0] / "dir-link").symlink_to(tmp_path)
    resolver = make()
    for path in (
        str(secret),
        "../secret.safetensors",
        "link.safetensors",
        "dir-link/secret.safetensors",
        f"{roots[0]}/../secret.safetensors",
        "file:///etc/passwd",
    ):
        with pytest.raises(LoraError, match="outside the folders"):
            resolver.resolve(path)
    with pytest.raises(LoraError, match="no LoRA file"):
        resolver.resolve("missing.safetensors")
    with pytest.raises(LoraError, match="disabled"):
        make(lora_roots=[]).resolve(str(secret))


def test_local_file_over_the_cap(make: Make, roots: list[Path]) -> None:
    (roots[0] / "big.safetensors").write_bytes(b"x" * 2048)
    with pytest.raises(LoraError, match="over the 1024-byte LoRA limit"):
        make(lora_max_bytes=1024).resolve("big.safetensors")


def test_unreadable_local_paths_are_clear_errors(make: Make) -> None:
    for path in ("a\x00b.safetensors", "x" * 300 + ".safetensors", "file:///a%00b.safetensors"):
        with pytest.raises(LoraError):
            make().resolve(path)


@pytest.mark.parametrize("path", ["ftp://example.com/x.safetensors", "just some words", "a/b/c"])
def test_paths_that_are_nothing_known(make: Make, path: str) -> None:
    with pytest.raises(LoraError):
        make().resolve(path)


def test_another_url_scheme_is_named_as_such_not_taken_for_a_local_file(make: Make, roots: list[Path]) -> None:
    """A path ending in .safetensors was a local path first: under a LoRA root, `s3:/bucket/...` was looked for."""
    for path in ("ftp://example.com/x.safetensors", "s3://bucket/style.safetensors", "hf://a/b.pt"):
        with pytest.raises(LoraError, match="unsupported URL scheme"):
            make().resolve(path)


def hf_cache_repo(hf: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """The layout huggingface_hub writes: blobs, a snapshot per commit, and refs/main naming it."""
    repo = hf / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def test_hugging_face_repo_offline_from_the_cache(make: Make, tmp_path: Path) -> None:
    hf_cache_repo(tmp_path / "hf", "someone/wan-style", {"wan_style.safetensors": b"hub lora", "README.md": b"#"})
    hf_cache_repo(tmp_path / "hf", "someone/pair", {"high.safetensors": b"h", "low.safetensors": b"l"})
    resolver = make()
    only = resolver.resolve("someone/wan-style")
    assert only.kind is SourceKind.HUB and only.path.read_bytes() == b"hub lora"
    assert resolver.resolve("someone/pair", "low.safetensors").path.read_bytes() == b"l"
    with pytest.raises(LoraError, match=r"several \.safetensors files; choose one with weight_name"):
        resolver.resolve("someone/pair")
    with pytest.raises(LoraError, match="not in this server's Hugging Face cache and the server is offline"):
        resolver.resolve("someone/absent")
    with pytest.raises(LoraError, match="not in this server's Hugging Face cache"):
        resolver.resolve("someone/pair", "middle.safetensors")


PEFT_CONFIG_TEXT = '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["to_q"]}'


def test_a_peft_config_beside_a_local_or_hub_file_comes_with_it(
    make: Make, roots: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """peft's save_pretrained keeps the adapter's alpha in adapter_config.json, not in the weights file."""
    (roots[0] / "peft").mkdir()
    (roots[0] / "peft" / "adapter_model.safetensors").write_bytes(b"peft weights")
    (roots[0] / "peft" / "adapter_config.json").write_text(PEFT_CONFIG_TEXT)
    (roots[0] / "plain.safetensors").write_bytes(b"peft weights")  # the same bytes, no config
    resolver = make()
    with_config = resolver.resolve("peft/adapter_model.safetensors")
    without = resolver.resolve("plain.safetensors")
    assert with_config.peft_config == PEFT_CONFIG_TEXT and without.peft_config is None
    assert with_config.sha256 == without.sha256 and with_config.identity != without.identity  # two adapters
    # a config that is a link out of the LoRA folders is not read (local paths never leave their roots)
    (roots[0] / "linked").mkdir()
    (roots[0] / "linked" / "adapter_model.safetensors").write_bytes(b"peft weights")
    (tmp_path / "outside.json").write_text(PEFT_CONFIG_TEXT)
    (roots[0] / "linked" / "adapter_config.json").symlink_to(tmp_path / "outside.json")
    assert resolver.resolve("linked/adapter_model.safetensors").peft_config is None
    # weights that are a link into a blob folder (a Hugging Face cache copied into a root): the config is found
    # beside the file as named
    (roots[0] / "blobs").mkdir()
    (roots[0] / "blobs" / "w1").write_bytes(b"blob weights")
    (roots[0] / "snapshot").mkdir()
    (roots[0] / "snapshot" / "adapter_model.safetensors").symlink_to(roots[0] / "blobs" / "w1")
    (roots[0] / "snapshot" / "adapter_config.json").write_text(PEFT_CONFIG_TEXT)
    assert resolver.resolve("snapshot/adapter_model.safetensors").peft_config == PEFT_CONFIG_TEXT
    # the Hugging Face cache (offline): the config in the snapshot beside the weights
    hf_cache_repo(tmp_path / "hf", "someone/peft", {"adapter_model.safetensors": b"w", "adapter_config.json": b"{}"})
    assert resolver.resolve("someone/peft").peft_config == "{}"
    # online (a stand-in Hub): the repo lists a config beside the weights, so it is downloaded with them
    with running_hub() as hub:
        hub.repos["someone/online"] = {
            "sub/adapter_model.safetensors": b"weights",
            "sub/adapter_config.json": PEFT_CONFIG_TEXT.encode(),
            "README.md": b"#",
        }
        online = make(hf_offline=False, hf_endpoint=hub.endpoint).resolve(
            "someone/online", "sub/adapter_model.safetensors"
        )
        assert online.path.read_bytes() == b"weights" and online.peft_config == PEFT_CONFIG_TEXT
        assert {r[2] for r in hub.requests if r[0] == "GET"} == {
            "sub/adapter_model.safetensors",
            "sub/adapter_config.json",
        }


def test_hugging_face_repo_online(make: Make, tmp_path: Path) -> None:
    """Through huggingface_hub against a stand-in Hub: the file list picks the file (the only .safetensors, or
    the one named) and checks its size before any download; a file already in the cache is not downloaded again."""
    with running_hub() as hub:
        hub.repos["someone/style"] = {"style.safetensors": b"style v1", "README.md": b"#"}
        hub.repos["someone/pair"] = {"high.safetensors": b"h", "low.safetensors": b"l"}
        hub.repos["someone/huge"] = {"huge.safetensors": b"x" * 2048}
        resolver = make(hf_offline=False, hf_endpoint=hub.endpoint, lora_max_bytes=1024)
        only = resolver.resolve("someone/style")
        assert only.kind is SourceKind.HUB and only.path.read_bytes() == b"style v1" and only.peft_config is None
        assert resolver.resolve("someone/style").path == only.path
        assert hub.requests["GET", "someone/style", "style.safetensors"] == 1  # the second time from the cache
        assert resolver.resolve("someone/pair", "low.safetensors").path.read_bytes() == b"l"
        with pytest.raises(LoraError, match=r"several \.safetensors files; choose one with weight_name"):
            resolver.resolve("someone/pair")
        with pytest.raises(LoraError, match=r"has no file middle\.safetensors"):
            resolver.resolve("someone/pair", "middle.safetensors")
        with pytest.raises(LoraError, match="is 2048 bytes, over the 1024-byte LoRA limit"):
            resolver.resolve("someone/huge")
        assert not any(r[0] == "GET" and r[1] == "someone/huge" for r in hub.requests)
        with pytest.raises(LoraError, match="Hugging Face repo nobody/absent: RepositoryNotFoundError"):
            resolver.resolve("nobody/absent")
        hub.repos["someone/style"] = {"style.safetensors": b"style v2"}  # a new commit: the new file
        assert resolver.resolve("someone/style").path.read_bytes() == b"style v2"
        for status in (503, 429):  # an outage or the Hub's rate limit, unlike a repo it says is absent: the cache
            hub.down = status
            assert resolver.resolve("someone/style").path.read_bytes() == b"style v2"
            with pytest.raises(LoraError, match="not in this server's Hugging Face cache and the Hub cannot be reach"):
                resolver.resolve("someone/never-fetched")


def test_hugging_face_hub_unreachable_falls_back_to_the_cache_then_fails_fast(make: Make, tmp_path: Path) -> None:
    hf_cache_repo(tmp_path / "hf", "someone/cached", {"x.safetensors": b"cached"})
    resolver = make(hf_offline=False, hf_endpoint=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    assert resolver.resolve("someone/cached", "x.safetensors").path.read_bytes() == b"cached"
    with pytest.raises(LoraError, match="the Hub cannot be reached"):
        resolver.resolve("someone/absent", "x.safetensors")
    assert time.monotonic() - started < 30  # never a hang


def test_a_hub_error_does_not_tell_where_the_server_keeps_its_cache(
    make: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    hf_cache_repo(tmp_path / "hf", "someone/cached", {"x.safetensors": b"cached"})

    def refusing(repo_id: str, filename: str, **kwargs: object) -> str:
        raise ValueError(f"Invalid path: {kwargs['cache_dir']}/models--{repo_id}/{filename} is outside the repo")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refusing)
    with pytest.raises(LoraError) as refused:
        make().resolve("someone/cached", "x.safetensors")
    message = str(refused.value)
    assert "ValueError: Invalid path: <cache>/models--someone/cached" in message and str(tmp_path) not in message


def test_uses_carry_scale_experts_and_a_short_label(http: FileServer, make: Make) -> None:
    http.files["/l.safetensors"] = b"l"
    long_data = "data:application/octet-stream;base64," + base64.b64encode(os.urandom(300)).decode()
    uses = make().uses(
        [
            LoRAWeight(path=http.url("/l.safetensors"), scale=0.5, transformer="high"),
            LoRAWeight(path=long_data),
        ]
    )
    assert uses[0].scale == 0.5 and uses[0].experts == ("high",) and uses[0].label == http.url("/.../l.safetensors")
    assert uses[1].experts == ("high", "low") and uses[1].label.startswith("data URI (")


def test_a_failed_download_is_not_cached(http: FileServer, make: Make) -> None:
    with pytest.raises(InputFetchError, match="HTTP 404"):
        make().resolve(http.url("/absent.safetensors"))
    http.files["/absent.safetensors"] = b"now here"
    assert make().resolve(http.url("/absent.safetensors")).path.read_bytes() == b"now here"


def test_loras_resolved_first_are_not_evicted_by_the_downloads_after_them(
    http: FileServer, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request's LoRAs are all resolved, then read: a cached one must survive the long downloads of those after
    it, however full the cache (eviction spares what was used in the last IN_USE_S seconds)."""
    from wanserve.lora import cache

    monkeypatch.setattr(cache, "IN_USE_S", 0.5)  # each download below takes 0.35 s: two take longer than this
    for name in ("a", "b", "c"):
        http.files[f"/{name}.safetensors"] = name.encode() * 1000
    urls = [http.url(f"/{name}.safetensors") for name in ("a", "b", "c")]
    resolver = make(lora_cache_bytes=1)  # always over: only "in use" keeps a file
    resolver.resolve(urls[0])  # cached earlier: a hit in the request below

    def slow_downloads(i: int, _label: str) -> None:
        if i > 0:
            time.sleep(0.35)

    uses = resolver.uses([LoRAWeight(path=url) for url in urls], before_each=slow_downloads)
    assert [use.file.path.read_bytes()[:1] for use in uses] == [b"a", b"b", b"c"]  # all still there to be read


def test_a_lora_url_is_described_without_its_signature_or_credentials() -> None:
    """What the job log and warnings say of a LoRA URL: a presigned URL's signature is a credential."""
    from wanserve.lora.sources import describe_path

    shown = describe_path("https://u:pw@bucket.s3.test/loras/style.safetensors?X-Amz-Signature=SIG123")
    assert shown == "https://bucket.s3.test/.../style.safetensors?..."
    assert describe_path("style.safetensors") == "style.safetensors"
    # a path parameter (a Java server's session id) is not part of the file's name
    assert describe_path("http://h.test/a/lora.bin;jsessionid=SECRET") == "http://h.test/.../lora.bin"
    # a last segment that is no file's name nor a number may be the credential: a download token, a JWT
    assert describe_path("https://civitai.test/api/download/models/12345") == "https://civitai.test/.../12345"
    for secret in (
        "Zx9vQ2kLm8PqR4tY",
        "Zx9vQ2kLm8PqR4tYw7NcB3dF",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlX29mX3RoZV90b2tlbg",
    ):
        assert describe_path(f"https://dl.test/get/{secret}") == "https://dl.test/..."
