"""Command line: local generation and conversion, the server and its workers, and the client commands
(`submit`, `status`, `result`, `cancel`, `run`) against a running server. Wiring only; the work is elsewhere."""

from __future__ import annotations

import argparse
import enum
import json
import logging
import sys
import time
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from wanserve import __version__
from wanserve.config import Settings
from wanserve.errors import WanserveError
from wanserve.logsetup import HideQueryStrings, configure_logging
from wanserve.schema import WanLoRAT2VRequest

log = logging.getLogger("wanserve")

# Request fields that are not plain flags (the prompt is positional; LoRAs are `--lora PATH[:SCALE[:EXPERT]]`).
_NOT_FLAGS = {"prompt", "loras"}
MIN_KEY_CHARS = 22  # about 128 bits of a random URL-safe key


def _flag_type(annotation: Any) -> tuple[Any, list[str] | None]:
    """(argparse type, choices) for a pydantic field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return str, [str(m.value) for m in annotation]
    if typing.get_origin(annotation) is typing.Literal:
        return str, [str(a) for a in typing.get_args(annotation)]
    while typing.get_origin(annotation) is typing.Annotated:  # schema.Integer: the int it validates
        annotation = typing.get_args(annotation)[0]
    return annotation, None


def add_request_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One flag per request field (`--num-frames`...), defaulting to 'not given' so the schema decides."""
    for name, info in model.model_fields.items():
        if name in _NOT_FLAGS:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = (info.description or "").replace("%", "%%")
        if info.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        arg_type, choices = _flag_type(info.annotation)
        parser.add_argument(flag, dest=name, type=arg_type, choices=choices, default=None, help=help_text)


def request_from_args(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": args.prompt}
    for name in model.model_fields:
        value = getattr(args, name, None)
        if name not in _NOT_FLAGS and value is not None:
            body[name] = value
    return body


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "request"
        lines.append(f"  {field}: {err['msg']}")
    return "invalid request:\n" + "\n".join(lines)


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from wanserve.client.commands import parse_lora

    body = request_from_args(args, WanLoRAT2VRequest)
    if args.lora:
        body["loras"] = [parse_lora(spec) for spec in args.lora]
    try:
        request = WanLoRAT2VRequest.model_validate(body)
    except ValidationError as exc:
        print(_format_validation_error(exc), file=sys.stderr)
        return 2
    loras = _local_loras(request, settings)

    out = Path(args.output)
    if out.is_dir():  # refused now, not after minutes of generation
        print(f"error: the output path {out} is a folder; give a file name (e.g. {out / 'video.mp4'})", file=sys.stderr)
        return 2

    # Heavy imports only here: `wanserve --help` and the API never load torch.
    from wanserve.engine.prompt_gate import PromptGate
    from wanserve.engine.runner import EngineRunner

    def say(line: str, _level: object = None) -> None:
        print(line, file=sys.stderr, flush=True)

    # As a worker does: the safety checker and the prompt expansion the request asks for (or the operator forces).
    prompts = PromptGate(settings)
    checked = prompts.checks(request)
    request = prompts.prepare(request, say)
    started = time.perf_counter()
    runner = EngineRunner.from_settings(settings)
    print(f"model {settings.model} loaded in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    with _progress_bar(request.num_inference_steps) as report:
        result = runner.generate_video(
            request,
            out,
            on_step=report,
            loras=loras,
            on_phase=say,
            check_frames=prompts.safety.check_frames if checked and prompts.safety.checks_output else None,
        )
    summary = {
        "path": str(out.resolve()),
        "seed": result.seed,
        "num_frames": result.video.num_frames,
        "width": result.video.width,
        "height": result.video.height,
        "fps": result.video.fps,
        "size_bytes": result.video.size_bytes,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['path']}\nseed {result.seed}")
    return 0


def _local_loras(request: WanLoRAT2VRequest, settings: Settings) -> list[Any]:
    """The LoRAs of a local generation. The person at the keyboard is the operator here: files named on the
    command line may be read wherever they are, and URLs may point at their own network."""
    if not request.loras:
        return []
    import tempfile

    from wanserve.client.commands import local_file
    from wanserve.errors import LoraError
    from wanserve.files.local import LocalFileStore
    from wanserve.lora.sources import LoraResolver, SourceKind, classify

    files = [local_file(lora.path) for lora in request.loras]
    # A file named on the command line goes by its absolute path, inside a root made of its own folder.
    loras = [
        lora if file is None else lora.model_copy(update={"path": str(file)})
        for lora, file in zip(request.loras, files, strict=True)
    ]
    roots = [*settings.lora_roots, *(file.parent for file in files if file is not None)]
    local = settings.model_copy(update={"lora_roots": roots, "allow_private_urls": True})
    with tempfile.TemporaryDirectory() as no_storage:  # a local run has no file storage of its own
        store = LocalFileStore(Path(no_storage), "http://wanserve.invalid")
        for lora, file in zip(request.loras, files, strict=True):
            # A path (not a URL or a Hub repo) that is no file here, with no LoRA folders set to look in.
            if file is None and not settings.lora_roots and classify(lora.path, store) is SourceKind.LOCAL:
                raise LoraError(f"LoRA {lora.path}: no such file")
        return LoraResolver(local, store).uses(loras)


class _progress_bar:
    """tqdm on a terminal; one plain line per step otherwise (logs, CI)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar: Any = None

    def __enter__(self) -> Any:
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="step", file=sys.stderr, dynamic_ncols=True)

        def report(p: Any) -> None:
            if self.bar is not None:
                self.bar.set_postfix_str(f"{p.expert.value} expert, t={p.timestep}")
                self.bar.update(1)
            else:
                print(
                    f"step {p.step}/{p.total} ({p.expert.value} expert, t={p.timestep}) "
                    f"{p.seconds:.2f}s/step, eta {p.eta_seconds:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )

        return report

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_convert(args: argparse.Namespace, settings: Settings) -> int:
    from wanserve.engine.convert import convert_model

    dst = convert_model(Path(args.src), Path(args.dst), dtype=settings.dtype)
    print(dst)
    return 0


def _files_private_to_this_user() -> None:
    """What the server and workers write (the job database with every prompt, videos, uploads, caches) is readable
    by their own user only: result URLs are secrets, and so are the files behind them."""
    import os

    os.umask(0o077)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import os

    import uvicorn

    from wanserve.api.app import create_app
    from wanserve.api.security import (
        hash_key,
        is_loopback_host,
        key_hashes,
        read_or_create_secret,
        without_plain_keys,
    )
    from wanserve.api.timeouts import KEEP_ALIVE_S, http_protocol

    _files_private_to_this_user()
    _check_folders("data folder", [("--data-dir, WANSERVE_DATA_DIR", settings.data_dir)])
    if settings.port == 0:
        settings = settings.model_copy(update={"port": _free_port(settings.host)})
    try:
        keyed = bool(key_hashes(settings))
    except (OSError, ValueError) as exc:  # the key hashes file: missing, unreadable, or not hashes
        print(f"error: the API key hashes: {exc}", file=sys.stderr)
        return 2
    if not keyed and settings.api_key_hashes_file:
        # A hashes file still to be filled in: meant as keys, not as an open server (blank keys are refused by the
        # settings themselves).
        print(
            f"error: API keys are configured (WANSERVE_API_KEY_HASHES_FILE) but none is usable: "
            f"{settings.api_key_hashes_file} lists no key hash; give one, or configure none",
            file=sys.stderr,
        )
        return 2
    for number, key in enumerate(settings.api_keys, 1):
        if len(key) < MIN_KEY_CHARS:  # its hash is only as hard to reverse as the key is to guess
            log.warning(
                "API key %d of %d is only %d characters: use a random key of at least %d (about 128 bits), "
                "e.g. from `python -c 'import secrets; print(secrets.token_urlsafe())'`",
                number, len(settings.api_keys), len(key), MIN_KEY_CHARS,
            )  # fmt: skip
    problem = _cannot_listen(settings.host, settings.port)  # before anything is written (the generated key)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    if not keyed and not is_loopback_host(settings.host):
        # Reachable from other machines: never open by default. The key is kept for the next start (for the
        # operator to read); the server itself keeps only its hash.
        key_file = settings.data_dir / "api-key"
        settings = settings.model_copy(update={"api_key_hashes": [hash_key(read_or_create_secret(key_file))]})
        log.warning("no API key configured for host %s: using the key in %s", settings.host, key_file)
    configured_public_url = settings.public_url
    try:
        settings = without_plain_keys(settings.model_copy(update={"public_url": settings.resolved_public_url()}))
    except (OSError, ValueError) as exc:  # the key hashes file: missing, unreadable, or not hashes
        print(f"error: the API key hashes: {exc}", file=sys.stderr)
        return 2
    if settings.host in ("0.0.0.0", "::", "") and not configured_public_url:
        # Not refused: a container's published port reached from its own host works with these URLs.
        log.warning(
            "listening on all addresses (%s) with no public URL: every URL handed out (status, result, uploads, "
            "videos) starts with %s, which only this machine reaches; for clients elsewhere, set --public-url "
            "(WANSERVE_PUBLIC_URL) to the URL they reach this server at",
            settings.host or "all",
            settings.public_url,
        )
    _check_job_store(settings)
    if settings.workers > 0:  # an API-only server (--workers 0) need not have the model
        _check_model(settings)
        _check_cache_dir(settings)
    os.environ.pop("WANSERVE_API_KEYS", None)  # not inherited by the worker processes either
    logging.getLogger("wanserve").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    app = create_app(settings)
    log.info("serving %s on %s (data in %s)", ", ".join(settings.app_ids), settings.public_url, settings.data_dir)
    _raise_open_files_limit()
    logging.getLogger("uvicorn.access").addFilter(HideQueryStrings())
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=http_protocol(settings.request_header_timeout_s),
        timeout_keep_alive=int(KEEP_ALIVE_S),
        log_config=None,  # uvicorn's lines in this process's one format (logsetup)
        log_level="debug" if args.verbose else "info",
        access_log=args.access_log,
        timeout_graceful_shutdown=15,
    )
    server = _server_telling_the_app(config, app.state.begin_shutdown)
    server.run()
    return 0 if server.started else 3  # 3: uvicorn's own code for a server that never started


def _server_telling_the_app(config: Any, begin_shutdown: Any) -> Any:
    """uvicorn's server, which tells the app when a stop signal arrives: before uvicorn's graceful wait ends by
    cutting off the requests still open."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
            begin_shutdown()
            super().handle_exit(sig, frame)

    return Server(config)


def _raise_open_files_limit() -> None:
    """Each connection holds a file descriptor: the usual soft limit (1024) is raised to what the system allows
    (the hard limit), so that a burst of clients is not what stops the server."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open files limit from %d: %s", soft, exc)


def cmd_hash_key(args: argparse.Namespace, settings: Settings | None) -> int:
    """Prints the hash of the key on stdin, for `WANSERVE_API_KEY_HASHES` or a hashes file (the server then never
    sees the plain key)."""
    from wanserve.api.security import hash_key, key_id

    key = sys.stdin.readline().strip()
    if not key:
        print('no key on stdin (e.g. `printf %s "$KEY" | wanserve hash-key`)', file=sys.stderr)
        return 2
    if len(key) < MIN_KEY_CHARS:
        print("warning: short key; generate keys with `python -c 'import secrets; print(secrets.token_urlsafe())'`",
              file=sys.stderr)  # fmt: skip
    digest = hash_key(key)
    print(digest)
    print(f"key id: {key_id(digest)}", file=sys.stderr)
    return 0


def _cannot_listen(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (taken, or no such address), checked before anything starts:
    uvicorn would find out only after the worker process had been started, and end in a traceback."""
    import socket

    try:
        family, kind, proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        return f"cannot listen on {host}: {exc.strerror}"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


def _check_job_store(settings: Settings) -> None:
    """Opens the job store once (its folder, its file, the Redis server): a store that cannot be used stops the
    start with main's one-line error, before any process is started."""
    from wanserve.backends import open_job_store

    store = open_job_store(settings)
    try:
        store.queued_count()
    finally:
        store.close()


def _check_model(settings: Settings) -> None:
    """A model folder that is not there (or not a model) stops the start with main's one-line error: its workers
    would otherwise fail to load it and restart for ever while requests queue."""
    if settings.model != "tiny":
        from wanserve.engine.model_dir import model_dir  # no torch: the API process never loads it

        model_dir(settings.model)


def _check_cache_dir(settings: Settings) -> None:
    """The cache folders a worker writes (the built-in model's, compiled kernels, downloaded LoRAs) must be usable:
    a worker that cannot create one fails at each start, and would be restarted for ever."""

    folders = [
        ("--cache-dir, WANSERVE_CACHE_DIR", settings.cache_dir) if settings.model == "tiny" else None,
        ("WANSERVE_COMPILE_CACHE_DIR", settings.resolved_compile_cache_dir()),
        ("WANSERVE_LORA_CACHE_DIR", settings.resolved_lora_cache_dir()),
    ]
    _check_folders("cache folder", [f for f in folders if f is not None])


def _check_folders(what: str, folders: list[tuple[str, Path]]) -> None:
    """Each (setting names, folder) exists or can be made, and this user may write in it; else an OSError naming
    the setting (main prints it as one line)."""
    import os

    for names, folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(f"not writable by this user: {folder}")
        except OSError as exc:
            raise OSError(f"the {what} {folder} ({names}) cannot be used: {exc}") from None


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    import os
    import signal

    from wanserve.backends import open_file_store, open_job_store
    from wanserve.worker.loop import Worker
    from wanserve.worker.signals import handle_signals_at_once
    from wanserve.worker.supervisor import SETTINGS_ENV, exit_cannot_run_here

    _files_private_to_this_user()
    inherited = os.environ.get(SETTINGS_ENV)
    if inherited:  # started by `wanserve serve`: exactly the server's settings
        settings = Settings.model_validate_json(inherited)
    logging.getLogger("wanserve").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not inherited:  # `wanserve serve` checked these before starting this one
        _check_model(settings)
        _check_cache_dir(settings)
        if settings.public_url is None:
            log.warning(
                "no public URL: this worker takes %s for the API's, so a request naming one of the API's files by "
                "its URL (an uploaded LoRA, say) is downloaded over HTTP instead of read from the file store, and "
                "refused where that address is private; set --public-url (WANSERVE_PUBLIC_URL) to the API's URL",
                settings.resolved_public_url(),
            )
    from wanserve.engine.loading import device_problem

    if settings.gpus and len(settings.gpus) > 1:
        from wanserve.worker.group import group_devices, run_worker_group  # one process per GPU, torch.distributed

        problems = [p for p in map(device_problem, group_devices(settings, settings.gpus)) if p is not None]
        if problems:
            return exit_cannot_run_here("; ".join(problems))
        return run_worker_group(settings, args.worker_id, settings.gpus, exit_with_parent=args.exit_with_parent)
    problem = device_problem(settings.device)
    if problem is not None:
        return exit_cannot_run_here(problem)
    _check_job_store(settings)
    worker = Worker(settings, open_job_store(settings), open_file_store(settings), worker_id=args.worker_id)
    # SIGTERM (systemd, Kubernetes, the supervisor): finish the running job first; Ctrl-C: hand it back now.
    handle_signals_at_once({signal.SIGTERM: worker.drain, signal.SIGINT: worker.stop})
    parent = os.getppid()
    worker.run(stop_when=lambda: args.exit_with_parent and os.getppid() != parent)
    return 0


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from wanserve.engine.bench import BenchConfig, VideoCase, run_bench
    from wanserve.engine.speed import Preset
    from wanserve.schema import Resolution

    def items(text: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in text.split(",") if x.strip())

    # Checked before anything loads: a bad item would otherwise fail only its own row, minutes into the run.
    for flag, text, known in (("--sizes", args.sizes, Resolution), ("--presets", args.presets, Preset)):
        unknown = [item for item in items(text) if item not in {m.value for m in known}]
        if unknown:
            print(f"error: {flag}: unknown {', '.join(unknown)} (one of {', '.join(m.value for m in known)})",
                  file=sys.stderr)  # fmt: skip
            return 2
    for video in items(args.videos):
        try:
            VideoCase.parse(video, args.frames)
        except ValueError as exc:
            print(f"error: --videos: {exc}", file=sys.stderr)
            return 2

    config = BenchConfig(
        model=args.bench_model,
        device=args.device or settings.device,
        sizes=items(args.sizes),
        frames=args.frames,
        presets=items(args.presets),
        videos=items(args.videos),
        baseline_videos=not args.no_baseline_videos,
        warm_up_videos=not args.cold_videos,
        step_cache=args.step_cache,
        memory_policy=args.memory_policy,
        memory_cap_gib=args.memory_cap_gib,
        lowbit_attention={"auto": None, "on": True, "off": False}[args.lowbit_attention],
        lowbit_kernel=args.lowbit_kernel,
        attention=args.attention or settings.attention,
        deadline_s=args.deadline_s,
        out_dir=Path(args.out_dir),
        cache_dir=settings.cache_dir,
    )
    if args.verbose:
        logging.getLogger("wanserve").setLevel(logging.INFO)
    bench = run_bench(config, emit=lambda line: print(line, flush=True))
    if bench.failed:
        print(f"error: {len(bench.failed)} measurement(s) failed: {', '.join(bench.failed)}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"wanserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate one video locally (no server)")
    gen.add_argument("prompt", help="the text prompt")
    add_request_flags(gen, WanLoRAT2VRequest)
    _add_lora_flag(gen, "a local .safetensors file, a URL or owner/name (from the Hugging Face cache)")
    gen.add_argument("-o", "--output", default="wanserve.mp4", help="output mp4 path")
    gen.add_argument("--json", action="store_true", help="print a JSON summary")
    _add_model_flags(gen)
    gen.set_defaults(func=cmd_generate)

    conv = sub.add_parser("convert", help="convert an official Wan2.2 directory to the diffusers layout")
    conv.add_argument("src", help="official Wan2.2 directory (high_noise_model/, low_noise_model/, ...)")
    conv.add_argument("dst", help="destination directory (diffusers layout)")
    conv.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default=None,
        help="dtype of the converted weights (WANSERVE_DTYPE; auto: the checkpoint's bfloat16)",
    )
    conv.set_defaults(func=cmd_convert)

    serve = sub.add_parser("serve", help="run the fal-compatible HTTP server and its GPU worker(s)")
    _add_model_flags(serve)
    _add_service_flags(serve)
    serve.add_argument("--host", default=None, help="bind address (env WANSERVE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (env WANSERVE_PORT, default 8000)")
    serve.add_argument("--public-url", default=None, help="base URL clients use (env WANSERVE_PUBLIC_URL)")
    serve.add_argument(
        "--api-key", dest="api_keys", action="append", default=None, help="accepted API key (repeatable)"
    )
    serve.add_argument(
        "--workers", type=int, default=None, help="worker processes to supervise, all on the one device (default 1)"
    )
    serve.add_argument(
        "--no-worker", dest="workers", action="store_const", const=0, help="API only: workers run elsewhere"
    )
    serve.add_argument("--access-log", action="store_true", help="log every HTTP request")
    serve.set_defaults(func=cmd_serve)

    hash_cmd = sub.add_parser(
        "hash-key", help="print the hash of the API key read from stdin (for WANSERVE_API_KEY_HASHES)"
    )
    hash_cmd.set_defaults(func=cmd_hash_key)

    worker = sub.add_parser("worker", help="run one worker against the job store")
    _add_model_flags(worker)
    _add_service_flags(worker)
    worker.add_argument("--worker-id", default=None, help="unique worker name (default host-pid)")
    worker.add_argument(
        "--public-url",
        default=None,
        help="the API's base URL, to know its files' URLs in requests (env WANSERVE_PUBLIC_URL)",
    )
    worker.add_argument(
        "--gpus", default=None, help="spread each video over these GPUs, e.g. 0,1,2,3 (env WANSERVE_GPUS)"
    )
    worker.add_argument(
        "--cfg-parallel", choices=["auto", "on", "off"], default=None,
        help="with --gpus: CFG halves on separate GPUs (on) or every GPU on the sequence (off; for guidance-1 work)",
    )  # fmt: skip
    worker.add_argument("--drain-s", type=float, default=None, help="on SIGTERM, finish the running job this long")
    worker.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    worker.set_defaults(func=cmd_worker)
    bench = sub.add_parser(
        "bench", help="time our speed presets against plain diffusers (forwards, whole videos, memory, error)"
    )
    bench.add_argument("--model", dest="bench_model", choices=["tiny", "a14b"], default="tiny",
                       help="tiny (built-in) or a14b (full-size, random bf16 weights made on the GPU)")  # fmt: skip
    bench.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N")
    bench.add_argument("--sizes", default="480p,580p,720p", help="resolutions of the forward timings ('' for none)")
    bench.add_argument("--frames", type=int, default=81, help="frames per video")
    bench.add_argument("--presets", default="exact,fast", help="our presets to compare with diffusers")
    bench.add_argument("--videos", default="480p:30:5,720p:4:1",
                       help="whole videos as RESOLUTION:STEPS:GUIDANCE, comma-separated ('' for none)")  # fmt: skip
    bench.add_argument("--no-baseline-videos", action="store_true", help="skip the plain-diffusers videos")
    bench.add_argument(
        "--cold-videos",
        action="store_true",
        help="time each video's first run (compiling included) instead of after a 2-step warm-up",
    )
    bench.add_argument("--step-cache", type=float, default=0.0,
                       help="also run the first preset's videos with First Block Cache at this threshold")  # fmt: skip
    bench.add_argument("--memory-policy", choices=["auto", "resident", "swap", "offload"], default="auto")
    bench.add_argument("--memory-cap-gib", type=float, default=0.0,
                       help="cap this process's GPU memory (e.g. 24 to prove the small-card policy)")  # fmt: skip
    bench.add_argument("--lowbit-attention", choices=["auto", "on", "off"], default="auto",
                       help="fast's low-bit attention (auto: where one beats cuDNN)")  # fmt: skip
    bench.add_argument("--lowbit-kernel", choices=["auto", "int8", "fp8"], default="auto",
                       help="which low-bit attention: our INT8 Triton kernel or cuDNN's FP8 one (auto: the one "
                            "measured faster on this GPU, else int8)")  # fmt: skip
    bench.add_argument(
        "--attention",
        default=None,
        choices=typing.get_args(Settings.model_fields["attention"].annotation),
        help="our presets' exact attention kernel (default: WANSERVE_ATTENTION, auto = measured)",
    )
    bench.add_argument("--deadline-s", type=float, default=float("inf"), help="skip what would start after this")
    bench.add_argument("--out-dir", default="bench-out", help="bench.json and the videos go here")
    bench.add_argument("--cache-dir", default=None, help="model and compile caches (env WANSERVE_CACHE_DIR)")
    bench.set_defaults(func=cmd_bench)
    _add_client_commands(sub)
    return parser


def _add_lora_flag(p: argparse.ArgumentParser, sources: str) -> None:
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE[:high|low|both]]",
        help=f"a LoRA (repeatable): {sources}",
    )


def _add_client_commands(sub: Any) -> None:
    from wanserve.client import commands

    def request_command(name: str, help_text: str, run: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("prompt", help="the text prompt")
        add_request_flags(p, WanLoRAT2VRequest)
        _add_lora_flag(p, "URL, server path or owner/name; a file on this machine is uploaded first")
        commands.add_client_flags(p)
        p.set_defaults(func=lambda args, _settings: run(args, request_from_args(args, WanLoRAT2VRequest)))
        return p

    run = request_command("run", "generate a video on a server, with live progress", commands.cmd_run)
    run.add_argument("-o", "--output", default=None, help="download the video to this path")
    submit = request_command("submit", "queue a request on a server; prints its id", commands.cmd_submit)
    submit.add_argument("--webhook", default=None, help="URL the server POSTs the result to")
    submit.add_argument("--priority", choices=["normal", "low"], default=None, help="queue priority")

    status = sub.add_parser("status", help="status of a queued request")
    status.add_argument("request_id")
    status.add_argument("--logs", action="store_true", help="print the request's log lines")
    status.add_argument("--follow", action="store_true", help="follow live progress until it completes")
    result = sub.add_parser("result", help="result of a completed request")
    result.add_argument("request_id")
    result.add_argument("-o", "--output", default=None, help="download the video to this path")
    cancel = sub.add_parser("cancel", help="cancel a queued or running request")
    cancel.add_argument("request_id")
    for p, func in ((status, commands.cmd_status), (result, commands.cmd_result), (cancel, commands.cmd_cancel)):
        commands.add_client_flags(p)
        p.set_defaults(func=lambda args, _settings, func=func: func(args))


def _add_service_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="jobs database and files (env WANSERVE_DATA_DIR)")
    p.add_argument("--store", default=None, help="job store: sqlite or redis://HOST:PORT/DB (env WANSERVE_STORE)")
    p.add_argument("--files", default=None, help="file store: local or s3://BUCKET/PREFIX (env WANSERVE_FILES)")
    p.add_argument("--s3-endpoint-url", default=None, help="S3 API URL for MinIO etc. (env WANSERVE_S3_ENDPOINT_URL)")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="`tiny` or a model directory (env WANSERVE_MODEL)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (env WANSERVE_DEVICE)")
    p.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default=None,
        help="dtype of the model's weights (WANSERVE_DTYPE; auto: bfloat16 on a GPU, float32 on a CPU)",
    )
    p.add_argument("--cache-dir", default=None, help="where built models are cached (env WANSERVE_CACHE_DIR)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {
        key: getattr(args, key)
        for key in (
            "model",
            "device",
            "dtype",
            "cache_dir",
            "host",
            "port",
            "data_dir",
            "public_url",
            "api_keys",
            "workers",
            "store",
            "files",
            "s3_endpoint_url",
            "gpus",
            "cfg_parallel",
            "drain_s",
        )
        if getattr(args, key, None) is not None
    }
    return Settings(**overrides)


def _resource_error(exc: Exception) -> bool:
    """A folder, file, address or server this machine cannot use (--data-dir, the store)."""
    if isinstance(exc, OSError):
        return True
    try:  # imported here: the GPU benchmark machine runs `wanserve bench` without the store's client library
        from redis.exceptions import RedisError
    except ImportError:
        return False
    return isinstance(exc, RedisError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(
        logging.DEBUG if args.verbose else logging.WARNING, "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The client commands talk to a server, and hash-key only hashes: this machine's WANSERVE_* server settings are
    # none of their business (one bad variable must not stop `wanserve status`).
    client_command = hasattr(args, "url")
    try:
        settings = None if client_command or args.func is cmd_hash_key else settings_from_args(args)
    except ValidationError as exc:
        print(_format_validation_error(exc).replace("invalid request", "invalid settings"), file=sys.stderr)
        return 2
    try:
        return int(args.func(args, settings))
    except WanserveError as exc:
        print(f"error ({exc.error_type}): {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from wanserve.client.commands import CLIENT_ERRORS, report_error

        if client_command and isinstance(exc, CLIENT_ERRORS):  # the server said no, is unreachable, or is not one
            return report_error(exc, args)
        if not client_command and not args.verbose and _resource_error(exc):
            # The message says which; --verbose shows the traceback.
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise
