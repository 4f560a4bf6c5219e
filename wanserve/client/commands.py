"""`wanserve submit|status|result|cancel|run`: the queue API from a terminal, with live progress.

Progress goes to stderr: on a terminal one line redrawn in place (queue position, then a bar of denoising steps
with the ETA); otherwise one plain line per new log line, so logs and CI stay readable. stdout carries the
result: the video URL/path and the seed, or with `--json` one JSON document for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, TextIO

import httpx
from pydantic import ValidationError

from wanserve.client.client import (
    DEFAULT_APP,
    ApiError,
    ConfigError,
    InputError,
    OnOutage,
    QueueStatus,
    WanserveClient,
    detail_lines,
    server_url,
)
from wanserve.lora.sources import EXPERTS
from wanserve.progress import format_duration

TRANSFORMERS = tuple(EXPERTS)  # high, low, both


def parse_lora(spec: str) -> dict[str, Any]:
    """`PATH[:SCALE[:high|low|both]]`, read from the right so that URLs (with their colons) stay whole."""
    path, lora = spec, dict[str, Any]()
    head, sep, tail = path.rpartition(":")
    if sep and tail in TRANSFORMERS:
        lora["transformer"], path = tail, head
    head, sep, tail = path.rpartition(":")
    if sep:
        try:
            lora["scale"] = float(tail)
            path = head
        except ValueError:
            pass
    return {"path": path, **lora}


def local_file(path: str) -> Path | None:
    """`path` as a file on this machine, if it names one. URLs and data URIs never do (and a data URI is too long
    to be a file name: asking the file system would fail rather than answer no)."""
    if "://" in path or path[:5].lower() == "data:":
        return None
    try:
        local = Path(path).expanduser()
        return local.resolve() if local.is_file() else None
    except (OSError, ValueError):  # a name too long, or with a NUL byte: not a file here
        return None


def lora_arguments(client: WanserveClient, specs: list[str], out: TextIO) -> list[dict[str, Any]]:
    """LoRA entries of a request; a path that is a file on this machine is uploaded first (as the fal clients
    do with a Blob), anything else goes to the server as it is (a URL, a server-side path, `owner/name`)."""
    loras = []
    for spec in specs:
        lora = parse_lora(spec)
        local = local_file(lora["path"])
        if local is None and lora["path"].startswith(("./", "../", "~/")):  # only ever a path on this machine
            raise ConfigError(f"LoRA {lora['path']}: no such file on this machine")
        if local is not None:
            try:
                lora["path"] = client.upload_file(local)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                target = exc.request.url  # (httpx sets it on every error of a call)
                if target.host == httpx.URL(client.url).host:
                    raise
                # The server answered, and handed out an upload URL under its public URL, which is not reachable
                # from here (a server on 0.0.0.0 without WANSERVE_PUBLIC_URL hands out 127.0.0.1).
                raise ConfigError(
                    f"LoRA {local}: cannot upload it to {target.scheme}://{target.netloc.decode()}, the upload URL "
                    f"the server gave ({exc}): its public URL (WANSERVE_PUBLIC_URL) must be reachable from here"
                ) from None
            except OSError as exc:  # unreadable (permissions, an I/O error): found before anything is sent
                raise ConfigError(f"LoRA {local}: cannot read it ({exc.strerror or exc})") from None
            print(f"uploaded {local} -> {lora['path']}", file=out, flush=True)
        loras.append(lora)
    return loras


class ProgressView:
    """Shows the status updates of one request."""

    def __init__(self, out: TextIO, live: bool | None = None) -> None:
        self.out = out
        self.live = out.isatty() if live is None else live
        self.seen_logs = 0
        self.last_position: int | None = None
        self.drawn = False

    def update(self, status: QueueStatus) -> None:
        # A status without logs (a job back in the queue after its worker died) says nothing of those already shown.
        logs = status.logs or []
        new = logs[self.seen_logs :]
        if status.logs is not None:
            self.seen_logs = len(logs)
        if self.live:
            self._draw(self._line(status))
            if status.status == "COMPLETED":
                self._end()
            return
        if status.status == "IN_QUEUE" and status.queue_position != self.last_position:
            self.last_position = status.queue_position
            print(f"in queue, position {status.queue_position}", file=self.out, flush=True)
        for entry in new:
            print(entry.message, file=self.out, flush=True)

    def _line(self, status: QueueStatus) -> str:
        if status.status == "IN_QUEUE":
            return f"in queue · position {status.queue_position}"
        step = status.last_step
        last = status.logs[-1].message if status.logs else ""
        if step is None:
            return last or status.status.lower().replace("_", " ")
        width = 24
        filled = round(width * step.step / step.total)
        bar = "█" * filled + "░" * (width - filled)
        tail = f" · {last}" if step.step == step.total and last != step.format() else ""
        return (
            f"{bar} step {step.step}/{step.total} · {step.expert}-noise · {step.seconds_per_step:.2f}s/step"
            f" · ETA {format_duration(step.eta_seconds)}{tail}"
        )

    def _draw(self, line: str) -> None:
        columns = shutil.get_terminal_size((100, 20)).columns
        self.out.write("\r\x1b[2K" + line[: max(columns - 1, 10)])
        self.out.flush()
        self.drawn = True

    def _end(self) -> None:
        if self.drawn:
            self.out.write("\n")
            self.out.flush()
            self.drawn = False


def _client(args: argparse.Namespace) -> WanserveClient:
    return WanserveClient(args.url, args.key, app=args.app)


def check_output_path(args: argparse.Namespace) -> None:
    """`-o PATH` checked before anything runs: a generation must not be lost to a typo in a folder name."""
    if not getattr(args, "output", None):
        return
    path = Path(args.output)
    try:
        if path.is_dir() or path.name in ("", ".", ".."):
            raise ConfigError(f"-o {args.output}: a folder; give a file name (e.g. {path / 'video.mp4'})")
        if not path.parent.is_dir():
            raise ConfigError(f"-o {args.output}: the folder {path.parent} does not exist")
        # The download writes a new file beside the target, then renames it into place: that needs the folder.
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise ConfigError(f"-o {args.output}: the folder {path.parent} is not writable")
    except OSError as exc:  # a folder on the way that cannot be searched (permissions), an I/O error
        raise ConfigError(f"-o {args.output}: {exc.strerror or exc}") from None


class Submitted(Exception):
    """A client command that failed once its request existed on the server (queued, running or done): the error
    names the request, so that it can still be followed, fetched or cancelled."""

    def __init__(self, cause: Exception, request_id: str, video_url: str | None = None) -> None:
        super().__init__(str(cause))
        self.cause, self.request_id, self.video_url = cause, request_id, video_url


class NotSaved(Exception):
    """The video is made and stored on the server, but `-o` could not save it here."""


def print_interrupted(args: argparse.Namespace, request_id: str | None, **facts: Any) -> None:
    """With `--json`, the one document a command interrupted by Ctrl-C still prints."""
    if args.json:
        print(json.dumps({**({"request_id": request_id} if request_id else {}), "error_type": "interrupted", **facts}))


def _print_output(args: argparse.Namespace, client: WanserveClient, output: Any, request_id: str | None) -> None:
    body = output.model_dump(mode="json", exclude_none=True)
    saved = None
    if getattr(args, "output", None):
        try:
            saved = str(client.download(output.video.url, args.output).resolve())
        except KeyboardInterrupt:  # the video is made: say where it is, then stop
            print(f"interrupted: the video is at {output.video.url}", file=sys.stderr)
            print_interrupted(args, request_id, video_url=output.video.url)
            raise
        except (OSError, httpx.HTTPError, ApiError) as exc:  # say where the video is, rather than lose it
            if isinstance(exc, OSError) and not isinstance(exc, httpx.HTTPError):
                why = str(exc.strerror or exc)
            elif isinstance(exc, httpx.TransportError):
                why = f"cannot reach {httpx.URL(output.video.url).host}: {exc}"
            else:
                why = str(exc)
            failure = NotSaved(f"the video is ready but could not be saved to {args.output} ({why}); it is at "
                               f"{output.video.url} (seed {output.seed})")  # fmt: skip
            raise Submitted(failure, request_id or "", output.video.url) from None
    if args.json:
        print(json.dumps({"request_id": request_id, **body, **({"path": saved} if saved else {})}))
        return
    print(saved or output.video.url)
    print(f"seed {output.seed}")


def cmd_submit(args: argparse.Namespace, body: dict[str, Any]) -> int:
    with _client(args) as client:
        if args.lora:
            body["loras"] = lora_arguments(client, args.lora, sys.stderr)
        submitted = client.submit(body, webhook_url=args.webhook, priority=args.priority)
    if args.json:
        print(submitted.model_dump_json())
    else:
        print(submitted.request_id)
    return 0


def cmd_run(args: argparse.Namespace, body: dict[str, Any]) -> int:
    check_output_path(args)
    with _client(args) as client:
        if args.lora:
            body["loras"] = lora_arguments(client, args.lora, sys.stderr)
        view = ProgressView(sys.stderr)
        request_ids: list[str] = []

        def enqueued(request_id: str) -> None:
            request_ids.append(request_id)
            if not args.json:
                print(f"request {request_id}", file=sys.stderr, flush=True)

        try:
            output = client.subscribe(
                body, on_enqueue=enqueued, on_queue_update=view.update, on_outage=_outage_notice(view)
            )
        except KeyboardInterrupt:
            # Ctrl-C means stop: the GPU should not go on with a video nobody waits for.
            view._end()
            cancelled = False
            if request_ids:
                print(f"interrupted: cancelling request {request_ids[0]}", file=sys.stderr)
                try:
                    cancelled = client.cancel(request_ids[0])
                except (ApiError, httpx.HTTPError):
                    print(f"could not cancel it: wanserve cancel {request_ids[0]}", file=sys.stderr)
            print_interrupted(args, request_ids[0] if request_ids else None, cancelled=cancelled)
            return 130
        except CLIENT_ERRORS as exc:
            if request_ids and not isinstance(exc, Submitted):
                raise Submitted(exc, request_ids[0]) from None
            raise
        _print_output(args, client, output, request_ids[0] if request_ids else None)
    return 0


def _outage_notice(view: ProgressView) -> OnOutage:
    def notice(exc: Exception, grace_s: float) -> None:
        view._end()
        if isinstance(exc, ApiError) and exc.status_code == 429:
            what = "status reads rate-limited for this key (HTTP 429)"
        elif isinstance(exc, ApiError):
            what = f"server unavailable (HTTP {exc.status_code})"
        else:
            what = f"server unreachable ({str(exc) or type(exc).__name__})"
        print(f"{what}; trying again for up to {grace_s:.0f} s", file=view.out, flush=True)

    return notice


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.follow:
            view = ProgressView(sys.stderr)
            status = None
            try:
                for status in client.follow(args.request_id, on_outage=_outage_notice(view)):
                    view.update(status)
            except KeyboardInterrupt:  # stops following; the request goes on
                view._end()
                print_interrupted(args, args.request_id)
                return 130
            assert status is not None
        else:
            status = client.status(args.request_id, logs=True)  # the step line comes from the logs
    # Following waits for the outcome, which a script reads from the exit status: 1 when the request failed.
    failed = 1 if args.follow and status.error else 0
    if args.json:
        print(status.model_dump_json(exclude_none=True))
        return failed
    line = status.status + (f" (position {status.queue_position})" if status.queue_position is not None else "")
    step = status.last_step
    if step is not None and status.status == "IN_PROGRESS":
        line += f" · step {step.step}/{step.total} · ETA {format_duration(step.eta_seconds)}"
    if status.error:
        line += f" · {status.error_type}: {status.error}"
    print(line)
    if args.logs and not args.follow:
        for entry in status.logs or []:
            print(f"  {entry.message}")
    return failed


def cmd_result(args: argparse.Namespace) -> int:
    check_output_path(args)
    with _client(args) as client:
        _print_output(args, client, client.result(args.request_id), args.request_id)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        accepted = client.cancel(args.request_id)
    if args.json:
        print(json.dumps({"request_id": args.request_id, "cancelled": accepted}))
    else:
        print("cancel requested" if accepted else "already completed: nothing to cancel")
    return 0


def _request_ended(exc: Exception) -> bool:
    """Whether an error is the request's own end (it failed, was cancelled, is gone), rather than this call's."""
    return isinstance(exc, ApiError) and (exc.for_request or exc.status_code == 404)


def report_error(exc: Exception, args: argparse.Namespace) -> int:
    """A failed call as a clear message (and JSON with `--json`), exit status 1."""
    server = server_url(getattr(args, "url", None))
    submitted = exc if isinstance(exc, Submitted) else None
    if submitted is not None:
        exc = submitted.cause
    error: dict[str, Any]
    if isinstance(exc, NotSaved):
        error, message = {"error_type": "not_saved"}, str(exc)
    elif isinstance(exc, ApiError):
        error = {"status_code": exc.status_code, "error_type": exc.error_type, "detail": exc.detail}
        if isinstance(exc, InputError) and exc.field_errors:
            fields = "\n".join(f"  {line}" for line in detail_lines(exc.field_errors))
            message = f"invalid request ({exc.error_type}):\n{fields}"
        else:
            message = str(exc)
    elif isinstance(exc, httpx.LocalProtocolError):  # its text can quote the request's headers, the key among them
        error, message = {"error_type": "request_not_sent"}, "the request could not be sent (a bad header value?)"
    elif isinstance(exc, httpx.TransportError):
        error, message = {"error_type": "unreachable"}, f"cannot reach the server at {server}: {exc}"
    elif isinstance(exc, json.JSONDecodeError | ValidationError):
        error = {"error_type": "unexpected_answer"}
        message = f"{server} answered with something a wanserve (or fal) server does not send: is --url right?"
    elif isinstance(exc, httpx.HTTPError):  # too many redirects, a body that does not decode
        error, message = {"error_type": "unexpected_answer"}, f"{server} answered in a way no call can use: {exc}"
    else:  # ConfigError, httpx.InvalidURL
        error, message = {"error_type": "bad_configuration"}, str(exc)
    request_id = submitted.request_id if submitted else getattr(exc, "request_id", None)
    if submitted and submitted.video_url:
        error["video_url"] = submitted.video_url
    elif submitted and request_id and not _request_ended(exc):  # it goes on on the server: say how to reach it
        message += f"\nrequest {request_id} was submitted: `wanserve status {request_id} --follow` follows it"
    if getattr(args, "json", False):
        print(json.dumps({**({"request_id": request_id} if request_id else {}), **error, "message": message}))
    print(f"error: {message}", file=sys.stderr)
    return 1


# What a client command can fail with, besides its own errors: each gets a message, never a traceback.
CLIENT_ERRORS = (
    ApiError,
    ConfigError,
    Submitted,
    httpx.HTTPError,  # unreachable, too many redirects, an undecodable body
    httpx.InvalidURL,
    json.JSONDecodeError,
    ValidationError,
)


def add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="server URL (env WANSERVE_URL, default http://127.0.0.1:8000)")
    p.add_argument("--key", default=None, help="API key (env WANSERVE_KEY)")
    p.add_argument("--app", default=DEFAULT_APP, help=f"endpoint id (default {DEFAULT_APP})")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
