"""One typed settings object. Environment variables use the WANSERVE_ prefix; CLI flags override them."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from wanserve.schema import Resolution


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "wanserve"


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "wanserve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WANSERVE_", extra="ignore")

    model: str = Field("tiny", description="`tiny` (built-in test model) or a model directory.")
    device: str = Field("auto", description="`auto`, `cpu`, `cuda` or `cuda:N`.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype of the experts and text encoder (auto: bf16 on GPU, fp32 on CPU)."
    )
    cache_dir: Path = Field(default_factory=_default_cache_dir, description="Where built models are cached.")
    video_crf: int = Field(18, ge=0, le=51, description="H.264 constant rate factor of output videos.")
    # Checked here: x264 would refuse a misspelt one only at the first encode, after a whole generation.
    video_preset: Literal[
        "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo"
    ] = Field("veryfast", description="x264 preset of output videos.")
    torch_threads: int = Field(
        0, ge=0, description="CPU threads torch may use in a worker (0: torch's default). For CPU-only serving."
    )
    preset: Literal["auto", "eager", "exact", "fast"] = Field(
        "auto",
        description="Speed preset: `exact` (GPU default: compiled, fastest exact attention, batched CFG, same output), "
        "`fast` (FP8 linears, INT8 attention where it beats cuDNN, ~2% error; on Hopper 1.10x `exact` compiled, and "
        "`exact` where it does not compile (offload, step caching) or on other GPUs until measured faster, see "
        "docs/performance.md), `eager` (CPU default: plain diffusers).",
    )
    attention: Literal["auto", "cudnn", "flash", "efficient", "flash4", "default"] = Field(
        "auto",
        description="Exact attention kernel of `exact`/`fast`: `auto` times cuDNN, PyTorch's flash and "
        "memory-efficient kernels and FlashAttention 4 (if `flash-attn-4` is installed, Hopper/Blackwell) once per "
        "GPU and keeps the fastest exact one (stored in the compile cache); or one of them; `default`: PyTorch's pick.",
    )
    memory_policy: Literal["auto", "resident", "swap", "offload"] = Field(
        "auto",
        description="Where the experts live: `resident` (both on the GPU), `swap` (one at a time, next one "
        "prefetched), `offload` (block by block, 24-48 GB cards); auto chooses from free GPU memory.",
    )
    compile: bool | None = Field(
        None, description="torch.compile the transformer blocks (default: on with a GPU under exact/fast)."
    )
    compile_cache_dir: Path | None = Field(
        None, description="Compiled-kernel cache kept across restarts (default: <cache-dir>/compile)."
    )
    warmup: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["auto"],
        description="Resolutions a worker runs once at start so that no request waits for compilation "
        "(`auto`: 480p and 720p when compiling, none otherwise; empty: none).",
    )
    step_cache_threshold: float = Field(
        0.0,
        ge=0,
        le=1,
        description="First Block Cache threshold (0: off). Reuses a step's residual when the first block's output "
        "barely changed: faster, not exact (the bench reports its error); 0.05-0.1 is typical.",
    )

    # --- the service (`wanserve serve` / `wanserve worker`) ---
    host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port the HTTP server binds (0: any free port).")
    data_dir: Path = Field(
        default_factory=_default_data_dir, description="Job database, stored files and keys (embedded defaults)."
    )
    public_url: str | None = Field(
        None, description="Base URL clients reach this server at; URLs returned to clients start with it."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys (`Authorization: Key <key>`), hashed at start (only the hashes are kept). "
        "With no keys nor key hashes: no auth on a loopback host; on any other host a key is generated into "
        "<data-dir>/api-key.",
    )
    api_key_hashes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys given by hash only, `sha256:<hex>` (`wanserve hash-key` prints one), "
        "so the plain keys never reach the server's configuration.",
    )
    api_key_hashes_file: Path | None = Field(
        None, description="A file of more key hashes, one `sha256:<hex>` per line (`#` comments), read at start."
    )
    metrics_open: bool = Field(
        False,
        description="Serve /metrics without a key on a server with API keys (a scraper on a private network). Off: "
        "a scraper sends `Authorization: Key <key>` (Prometheus: `authorization: {type: Key, credentials: ...}`), "
        "as the metrics name workers and their hosts. A server without keys serves it to anyone it answers.",
    )
    rate_limit_per_s: float = Field(
        10.0,
        ge=0,
        description="Requests that create work (submit, run, upload) one API key may send per second, on average "
        "(across all API replicas on a Redis store; 0: no limit). Over it: 429 with Retry-After.",
    )
    rate_limit_burst: int = Field(20, ge=1, description="How many such requests a key may send at once.")
    read_rate_limit_per_s: float = Field(
        20.0,
        ge=0,
        description="Status, result, cancel and stream calls per second one API key may make about one request "
        "(across replicas; 0: no limit): twice the rate at which fal's Python client polls each request it follows; "
        "a script following many at once meets the looser key_read_rate_limit_per_s instead.",
    )
    read_rate_limit_burst: int = Field(40, ge=1, description="How many such calls about one request at once.")
    key_read_rate_limit_per_s: float = Field(
        2000.0,
        ge=0,
        description="Status, result, cancel and stream calls one API key may make per second in all (across "
        "replicas; 0: no limit): a bound on a client that asks about many requests (100 followed at once, polled 10 "
        "times a second each, use half of it).",
    )
    key_read_rate_limit_burst: int = Field(4000, ge=1, description="How many such calls one key may make at once.")
    max_queued_per_key: int = Field(
        10_000,
        ge=0,
        description="Queued requests one API key may have at a time (0: no limit). Over it: 429 `too_many_queued`. "
        "The hosted queue has no such cap: the default only stops a runaway loop, not a batch of thousands.",
    )
    file_url_ttl_s: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="Lifetime of the signed /files/ URLs handed out when the server has API keys (a result read "
        "again gets a fresh one).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Browser origins (`https://app.example.com`, or `*` for any) whose pages may call this API "
        "and upload to it directly, as the official JS client does from a browser (none: same origin only).",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="With no API keys: the Host names (beyond loopback addresses, `localhost` and the public URL's "
        "host) that requests may carry, e.g. a name a reverse proxy passes on; `*` for any. Others get 403, a guard "
        "against DNS rebinding. Not checked when the server has API keys.",
    )
    app_ids: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["fal-ai/wan-22", "fal-ai/wan/v2.2-a14b/text-to-video"],
        description="Endpoint ids served; `<id>/lora` takes the LoRA request.",
    )
    workers: int = Field(1, ge=0, le=64, description="Worker child processes `serve` supervises (0: none).")
    store: str = Field(
        "sqlite",
        pattern=r"^(sqlite(:///.+)?|rediss?://.+|unix://.+)$",
        description="Job store: `sqlite` (<data-dir>/jobs.sqlite3), `sqlite:///PATH` (relative to the data dir; "
        "`sqlite:////ABSOLUTE/PATH`), or `redis://[:PASSWORD@]HOST:PORT/DB` (`rediss://` for TLS) shared by API "
        "replicas and workers on many machines.",
    )
    redis_prefix: str = Field(
        "wanserve",
        pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description="Prefix of every Redis key (several deployments can share one Redis).",
    )
    files: str = Field(
        "local",
        pattern=r"^(local|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?)$",
        description="File store: `local` (<data-dir>/files) or `s3://BUCKET/PREFIX` (any S3-compatible service).",
    )
    s3_endpoint_url: str | None = Field(
        None,
        description="S3 API URL for MinIO, R2, Ceph and friends (default: AWS). Credentials: the usual AWS_* "
        "variables or instance roles.",
    )
    s3_region: str | None = Field(None, description="S3 region (default: boto3's, e.g. AWS_DEFAULT_REGION).")
    s3_delivery: Literal["redirect", "stream"] = Field(
        "stream",
        description="How /files/ URLs serve S3 objects: `stream` (the API relays the bytes, as it serves local files: "
        "every client gets them with a 200, and the bucket need not be reachable by clients) or `redirect` (307 to a "
        "short-lived presigned GET URL, so bytes never pass through the API; clients must follow redirects, which "
        "httpx, for one, does not by default, and reach the bucket).",
    )
    s3_presign_s: int = Field(
        3600, ge=60, le=7 * 24 * 3600, description="Lifetime of the presigned GET URLs `redirect` hands out."
    )
    keys_dir: Path | None = Field(
        None,
        description="Signing keys (upload URLs, webhooks); every API replica must see the same files "
        "(default: <data-dir>/keys).",
    )
    gpus: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="GPUs one worker spreads each video over (`0,1,...`: one process per GPU, CFG-parallel and "
        "Ulysses sequence-parallel). One GPU (`3`): the worker runs on `cuda:3`. Empty: one process on `device`.",
    )
    cfg_parallel: Literal["auto", "on", "off"] = Field(
        "auto",
        description="With `gpus`: `on` splits each CFG step's conditional and unconditional predictions over two "
        "halves of the GPUs; `off` puts every GPU on the sequence (Ulysses/ring) instead; `auto` = `on` for an even "
        "GPU count. A step with guidance <= 1 (4-step distilled LoRAs) has no unconditional half, so under `on` "
        "both halves compute the same prediction: `off` suits such workloads.",
    )
    drain_s: float = Field(
        120.0,
        ge=0,
        description="On SIGTERM a worker takes no new job and finishes the running one for up to this long, then "
        "hands it back to the queue (SIGINT, or a second SIGTERM: hand it back at once).",
    )
    job_lease_s: float = Field(30.0, gt=0, description="A running job whose worker is silent this long is lost.")
    job_max_attempts: int = Field(2, ge=1, description="Runs of a job whose worker died before it is failed.")
    job_stall_s: float = Field(
        900.0,
        gt=0,
        description="A worker whose running job writes no progress for this long exits (its supervisor restarts it "
        "and the job is retried): a hung GPU or engine never holds a job forever.",
    )
    worker_poll_s: float = Field(0.05, gt=0, description="How often an idle worker looks for a queued job.")
    webhook_user_id: str = Field("wanserve", description="X-Fal-Webhook-User-Id sent with webhooks.")
    webhook_timeout_s: float = Field(15.0, gt=0, description="Time limit of one webhook delivery.")
    webhook_max_attempts: int = Field(
        11, ge=1, description="Deliveries tried before a webhook is given up (the first and 10 retries, as fal's)."
    )
    webhook_retry_base_s: float = Field(
        15.0,
        gt=0,
        description="First retry delay of a failed webhook; doubles up to 30 minutes (with the defaults the 10 "
        "retries span about 2 hours, as fal's do).",
    )
    allow_private_urls: bool = Field(
        False,
        description="Let webhooks and URL inputs reach private, loopback and link-local addresses (trusted "
        "networks only: otherwise a request could make the server call internal services).",
    )
    job_retention_s: float = Field(
        30 * 24 * 3600.0,
        ge=0,
        description="Completed requests (status, result, logs) are deleted this long after they finish "
        "(0: keep forever); their input is dropped when they finish. Stored files follow their own lifecycle.",
    )
    file_sweep_s: float = Field(60.0, gt=0, description="How often expired stored files are deleted.")
    max_upload_bytes: int = Field(2 * 1024**3, gt=0, description="Largest file the storage API accepts.")
    upload_disk_reserve_bytes: int = Field(
        1024**3,
        ge=0,
        description="Free space uploads leave on the disk they are written to (the local file store's, or the temp "
        "dir that stages uploads for S3): one that would go below it is refused with 507 `storage_full`, so that "
        "uploads never take the room results and the job database need. Each upload checks it as it starts (for "
        "its declared size) and every 64 MiB of a body without one, not against the others running at once, which "
        "can together go below it: size it for the uploads you expect at once.",
    )
    max_body_bytes: int = Field(
        1024**2,
        gt=0,
        description="Largest JSON request body, counted as it streams in (uploads have `max_upload_bytes`); "
        "larger: 413 `payload_too_large`.",
    )
    request_header_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Time a connection has to send its request headers (from when it opened, or from its last "
        "answer); then it is closed. Bounds what slow clients hold (a file descriptor each).",
    )
    request_body_idle_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Longest wait for the next part of a request body (an upload, a JSON body); longer: 408 "
        "`request_timeout`.",
    )
    request_body_min_rate: float = Field(
        1024.0,
        ge=0,
        description="Slowest a request body may arrive, in bytes per second of waiting for it, counted once the "
        "waits add up to `request_body_idle_timeout_s`; slower: 408 `request_timeout` (0: no floor).",
    )
    max_prompt_chars: int = Field(
        10_000, gt=0, description="Longest `prompt` and `negative_prompt`, in characters; longer: 422 on the field."
    )
    max_data_uri_bytes: int = Field(
        512 * 1024,
        ge=0,
        description="Longest `data:` URI an input (a LoRA `path`) may carry, measured before decoding (0: none); "
        "longer: 422 on the field. Larger files are uploaded and passed by URL.",
    )

    # --- LoRAs (the `<id>/lora` endpoint) ---
    lora_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders a LoRA `path` may name local files in (comma-separated). Empty: local paths are refused.",
    )
    max_loras: int = Field(8, ge=0, description="Most LoRAs one request may carry.")
    lora_max_bytes: int = Field(2 * 1024**3, gt=0, description="Largest LoRA file that is downloaded or read.")
    lora_download_timeout_s: float = Field(300.0, gt=0, description="Time limit of one LoRA download.")
    lora_cache_dir: Path | None = Field(
        None, description="Where downloaded LoRA files are kept, by content (default: <cache-dir>/loras)."
    )
    lora_cache_bytes: int = Field(
        20 * 1024**3, ge=0, description="Disk the LoRA file cache may fill; the least recently used files go first."
    )
    lora_url_ttl_s: float = Field(
        7 * 24 * 3600.0,
        ge=0,
        description="How long a downloaded LoRA URL is reused without downloading it again (0: download every time). "
        "A server that names versions (ETag, Last-Modified) is asked each time whether the file changed; this is then "
        "how long the copy stands in while the server cannot be reached.",
    )
    lora_memory_bytes: int = Field(
        4 * 1024**3,
        ge=0,
        description="Memory (on the model's device) that loaded LoRA adapters keep for reuse by later requests; "
        "the least recently used are unloaded first.",
    )
    hf_offline: bool = Field(
        False, description="Resolve Hugging Face repo ids from the local cache only (as does HF_HUB_OFFLINE=1)."
    )
    hf_endpoint: str | None = Field(None, description="Hugging Face Hub URL (default: huggingface.co or HF_ENDPOINT).")
    hf_token: str | None = Field(None, description="Token for private Hugging Face repos (default: HF_TOKEN).")
    hf_cache_dir: Path | None = Field(None, description="Hugging Face cache folder (default: HF_HUB_CACHE).")

    # --- prompt expansion (`enable_prompt_expansion`) ---
    prompt_expansion_model: Path | None = Field(
        None, description="A local causal LM folder (any chat model, transformers format) that expands prompts."
    )
    prompt_expansion_url: str | None = Field(
        None,
        description="Else: an OpenAI-compatible API base URL (vLLM, llama.cpp, Ollama, hosted), e.g. "
        "http://llm:8000/v1; its /chat/completions expands prompts.",
    )
    prompt_expansion_api_model: str = Field("default", description="Model name sent to that API.")
    prompt_expansion_key: str | None = Field(None, description="Bearer key for that API.")
    prompt_expansion_timeout_s: float = Field(
        30.0, gt=0, description="Longest an expansion may take; past it the original prompt is used."
    )
    prompt_expansion_max_tokens: int = Field(300, gt=0, description="Longest expansion, in tokens.")
    prompt_expansion_device: str = Field(
        "cpu",
        description="Where the local expansion model runs (`cpu`, `cuda`...). On `cuda` it is moved to the GPU only "
        "while it expands and parked in CPU memory between requests, so the video experts keep the GPU.",
    )

    # --- safety checker (`enable_safety_checker`) ---
    safety_terms_file: Path | None = Field(
        None,
        description="Prompt term policy: one case-insensitive regular expression per line (# comments), matched as "
        "whole words; re-read when the file changes.",
    )
    safety_text_model: Path | None = Field(
        None, description="A local text-classification model folder that checks prompts."
    )
    safety_text_labels: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["nsfw", "toxic", "unsafe"], description="Labels of the text model that flag."
    )
    safety_text_threshold: float = Field(0.5, ge=0, le=1, description="Score at which a text label flags.")
    safety_image_model: Path | None = Field(
        None, description="A local image-classification model folder (e.g. an NSFW classifier) that checks frames."
    )
    safety_image_labels: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["nsfw"], description="Labels of the image model that flag."
    )
    safety_image_threshold: float = Field(0.5, ge=0, le=1, description="Score at which an image label flags.")
    safety_frames: int = Field(
        4, ge=1, le=64, description="Frames of each video the image model checks (evenly spaced)."
    )
    safety_force: bool = Field(
        False, description="Check every request, even those that send `enable_safety_checker: false`."
    )

    @model_validator(mode="after")
    def _one_gpu_is_the_device(self) -> Settings:
        """`--gpus 3` is one process on that GPU: the device it runs on (and reports), not a group."""
        if len(self.gpus) == 1:
            wanted = f"cuda:{self.gpus[0]}"
            if self.device not in ("auto", "cuda", wanted):
                raise ValueError(f"gpus={self.gpus[0]} and device={self.device} name different devices")
            object.__setattr__(self, "device", wanted)  # no re-validation of the whole model
        return self

    @model_validator(mode="after")
    def _cfg_parallel_needs_an_even_gpu_count(self) -> Settings:
        if self.cfg_parallel == "on" and len(self.gpus) > 1 and len(self.gpus) % 2:
            raise ValueError(f"cfg_parallel=on splits the GPUs in two halves: {len(self.gpus)} GPUs cannot be")
        return self

    @field_validator(
        "api_keys",
        "api_key_hashes",
        "cors_origins",
        "allowed_hosts",
        "app_ids",
        "lora_roots",
        "safety_text_labels",
        "safety_image_labels",
        "warmup",
        "gpus",
        mode="before",
    )
    @classmethod
    def _comma_separated(cls, value: object, info: ValidationInfo) -> object:
        """`WANSERVE_API_KEYS=k1,k2`: lists come from the environment as comma-separated text. Keys given that are
        all blank (`--api-key "$KEY"` or `WANSERVE_API_KEYS=${KEY1},${KEY2}` with the variables unset) are refused:
        they were meant as keys, and read as none they would leave the server open."""
        items = value.split(",") if isinstance(value, str) else value
        given_blank = isinstance(items, list) and items and not any(str(item).strip() for item in items)
        if info.field_name in ("api_keys", "api_key_hashes") and given_blank:
            raise ValueError(
                "API keys are configured but none is usable (blank, or a variable set to nothing): give a key, "
                "or configure none (unset the variable)"
            )
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _not_an_empty_path(cls, value: object, info: ValidationInfo) -> object:
        """`WANSERVE_DATA_DIR=` (set, but empty) would be Path(""): the current folder, where keys and the database
        would then be written without a word. An empty path is refused, saying how to get the default. Every field
        typed as a path is checked (read from its type, so a path setting added later is too)."""
        annotation = cls.model_fields[info.field_name or ""].annotation
        is_path = annotation is Path or Path in typing.get_args(annotation)
        if is_path and isinstance(value, str) and not value.strip():
            raise ValueError("is empty: unset it for the default, or give a path")
        return value

    @field_validator("store")
    @classmethod
    def _store_url_parses(cls, value: str) -> str:
        """A Redis URL's port is read when the first connection is made: a bad one would end the start in a
        traceback. The URL is never echoed: it may hold the password."""
        if value.startswith(("redis://", "rediss://")):
            try:
                urlsplit(value).port  # noqa: B018 (reading it checks it)
            except ValueError:
                raise ValueError("the Redis URL's port is not a number from 0 to 65535") from None
        return value

    @field_validator("public_url")
    @classmethod
    def _absolute_http_url(cls, value: str | None) -> str | None:
        """Every URL handed out starts with it: `notaurl` would make each of them useless."""
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        try:
            parts.port  # noqa: B018 (reading it checks it: a port that is not a number raises)
        except ValueError:
            parts = parts._replace(netloc="")
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"must be an absolute http(s) URL such as https://video.example.com, got {value!r}")
        return value

    @field_validator("api_key_hashes")
    @classmethod
    def _key_hashes(cls, value: list[str]) -> list[str]:
        for item in value:
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", item.strip().lower()):
                # The value is never echoed: it may be a plain key put here by mistake.
                raise ValueError("an API key hash is `sha256:<64 hex digits>` (`wanserve hash-key` prints one)")
        return [item.strip().lower() for item in value]

    @field_validator("warmup")
    @classmethod
    def _known_resolutions(cls, value: list[str]) -> list[str]:
        allowed = ["auto", *(r.value for r in Resolution)]
        for item in value:
            if item not in allowed:
                raise ValueError(f"unknown warm-up resolution {item!r} (use {', '.join(allowed)})")
        return value

    def resolved_keys_dir(self) -> Path:
        return self.keys_dir or self.data_dir / "keys"

    def resolved_compile_cache_dir(self) -> Path:
        return self.compile_cache_dir or self.cache_dir / "compile"

    def resolved_lora_cache_dir(self) -> Path:
        return self.lora_cache_dir or self.cache_dir / "loras"

    def resolved_public_url(self, port: int | None = None) -> str:
        """The base URL put in every URL returned to clients (no trailing slash)."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.host if self.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port if port is not None else self.port}"
