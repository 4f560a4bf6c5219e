"""The processes' log format: one record, one line.

Uvicorn's own lines go through the same handler and format (serve passes no uvicorn log config), and its access
log never shows a query string, nor a signature in a file URL's path: a signed file URL's signature or an upload
URL's is a secret for days.

Log messages carry text from requests (webhook URLs, LoRA paths, error messages of a receiver or a download): a
newline in one would start a line that reads like the server's own (log injection). The message's control
characters are written escaped; a traceback, logged as exc_info, keeps its lines.
"""

from __future__ import annotations

import logging
import re
from pathlib import PurePosixPath
from urllib.parse import urlsplit

_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


def one_line(text: str) -> str:
    """`text` with its control characters (C0, DEL, C1) written as escapes."""
    return text.translate(_ESCAPES)


class OneLineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


def configure_logging(level: int, fmt: str) -> None:
    """The root logger's one handler (stderr), as logging.basicConfig would make it, with the one-line format."""
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])
    # The HTTP libraries log every request's whole URL at INFO and DEBUG: webhook and LoRA URLs carry credentials
    # and tokens. Their warnings still show; our own lines name URLs without those parts (loggable_url).
    for library in ("httpx", "httpcore", "urllib3", "botocore", "boto3", "s3transfer"):
        logging.getLogger(library).setLevel(max(level, logging.WARNING))


def loggable_url(url: str) -> str:
    """A URL without what may be a secret, for logs and the descriptions `/ready` shows: its scheme, host and port
    only. A user and password, a query (`?token=`) and a path (Slack's `/services/<secret>`, Telegram's
    `/bot<token>/...`, a topic name) may each be the credential. Logs are read by more people than the keys are."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        netloc += f":{parts.port}" if parts.port else ""
    except ValueError:  # what it holds cannot be told apart: a user and password may be anywhere in it
        return "<a URL that does not parse>"
    path = "/..." if parts.path.strip("/") else parts.path
    return f"{parts.scheme}://{netloc}{path}" + ("?..." if parts.query else "")


# What the last segment of a URL's path is shown for: a file's name (`style.safetensors`, `lora-v2.bin`) or a number
# (civitai's `/api/download/models/12345`). Any other segment without an extension (`/dl/<token>`, a JWT, whose
# last part is long too) may be the credential itself.
_SHOWN_FILE_NAME = re.compile(r"[^/]{1,100}\.[A-Za-z0-9]{1,16}|\d{1,16}")


def loggable_file_url(url: str) -> str:
    """`loggable_url` with the file's name kept (`https://host/.../lora.safetensors?...`): what a message about
    downloading one file names, for its reader to know which. A last segment that is neither a file's name nor a
    number is not shown."""
    shown = loggable_url(url)
    try:
        name = PurePosixPath(urlsplit(url).path).name.split(";", 1)[0]  # no `;jsessionid=...`
    except ValueError:
        return shown
    return shown.replace("/...", f"/.../{name}", 1) if _SHOWN_FILE_NAME.fullmatch(name) else shown


# A file URL signed in its path (`/files/~<expiry>.<signature>/<key>`, see files.base.PATH_SIGNATURE_MARK).
_PATH_SIGNATURE = re.compile(r"(/files/~)[^/?]*")


class HideQueryStrings(logging.Filter):
    """For uvicorn's access log, whose record arguments are (client, method, path with query, HTTP version,
    status): the path keeps `?...` in place of its query, and `~...` in place of a signature in its path."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            path = args[2]
            if "?" in path:
                path = path.split("?", 1)[0] + "?..."
            record.args = (*args[:2], _PATH_SIGNATURE.sub(r"\1...", path), *args[3:])
        return True
