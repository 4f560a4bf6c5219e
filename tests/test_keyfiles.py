"""Secrets files created by several processes at once (API replicas starting together on one keys folder)."""

from __future__ import annotations

import errno
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from wanserve.api.security import read_or_create_secret
from wanserve.keyfiles import read_or_create
from wanserve.webhooks import WebhookSigner

PROCESSES = 6


def _secret(path: str, barrier: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue) -> None:
    barrier.wait()
    out.put(read_or_create_secret(Path(path)))


def _signer(path: str, barrier: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue) -> None:
    barrier.wait()
    out.put(WebhookSigner.load_or_create(Path(path)).key_id)


def race(target: object, path: Path) -> list[str]:
    context = multiprocessing.get_context("fork")
    barrier, out = context.Barrier(PROCESSES), context.Queue()
    procs = [context.Process(target=target, args=(str(path), barrier, out)) for _ in range(PROCESSES)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    return [out.get(timeout=5) for _ in procs]


def test_replicas_starting_together_share_one_url_secret(tmp_path: Path) -> None:
    for round_ in range(5):
        path = tmp_path / f"keys-{round_}" / "url-secret"
        values = race(_secret, path)
        assert len(set(values)) == 1 and values[0] == path.read_text().strip()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [p.name for p in path.parent.iterdir()] == ["url-secret"]  # no temporary file left


def test_replicas_starting_together_sign_webhooks_with_one_key(tmp_path: Path) -> None:
    for round_ in range(3):
        path = tmp_path / f"keys-{round_}" / "webhook-ed25519.pem"
        ids = race(_signer, path)
        assert len(set(ids)) == 1 and ids[0] == WebhookSigner.load_or_create(path).key_id


def test_an_existing_file_is_read_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"kept\n")
    assert read_or_create(path, lambda: b"new") == b"kept\n"
    fresh = tmp_path / "deeper" / "secret"
    assert read_or_create(fresh, lambda: b"made") == b"made" and fresh.read_bytes() == b"made"


def test_on_a_filesystem_without_hard_links_one_creation_still_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vfat, gcsfuse, s3fs, many SMB mounts: os.link fails with EPERM; an exclusive create claims the name."""

    def no_links(src: object, dst: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "keys" / "url-secret"
    first = read_or_create_secret(path)
    assert first and read_or_create_secret(path) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["url-secret"]
    signer = tmp_path / "keys" / "webhook.pem"
    assert WebhookSigner.load_or_create(signer).key_id == WebhookSigner.load_or_create(signer).key_id


def test_an_empty_secret_file_is_an_error_not_an_empty_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exclusive create whose writer died before writing leaves an empty file: never used as a secret."""
    monkeypatch.setattr("wanserve.keyfiles.SETTLE_S", 0.05)
    path = tmp_path / "url-secret"
    path.touch()
    with pytest.raises(RuntimeError, match="is empty"):
        read_or_create_secret(path)
