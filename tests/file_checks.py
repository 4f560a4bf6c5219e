"""Checks that every file backend's download route must pass (local files served by the API, S3 relayed), and what
the local store holds on disk."""

from __future__ import annotations

from pathlib import Path

import httpx


def assert_conditional_requests(url: str, content: bytes) -> None:
    """RFC 9110 13.2.2: If-Match before If-None-Match before Range; the range unit's name is case-insensitive."""
    etag = httpx.head(url).headers["etag"]
    revalidated = httpx.get(url, headers={"If-None-Match": f'"old", W/{etag}'})  # a weak match is enough here
    assert revalidated.status_code == 304 and revalidated.content == b"" and revalidated.headers["etag"] == etag
    assert "max-age" in revalidated.headers["cache-control"]
    assert httpx.head(url, headers={"If-None-Match": "*"}).status_code == 304
    assert httpx.get(url, headers={"If-None-Match": '"another-version"'}).content == content
    refused = httpx.get(url, headers={"If-Match": '"another-version"', "Range": "bytes=0-1"})
    assert refused.status_code == 412 and refused.json()["error_type"] == "precondition_failed"
    assert httpx.get(url, headers={"If-Match": f'"x", {etag}'}).content == content
    assert httpx.get(url, headers={"If-Match": "*"}).content == content
    for unit in ("Bytes", "BYTES"):
        part = httpx.get(url, headers={"Range": f"{unit}=1-2"})
        assert part.status_code == 206 and part.content == content[1:3], unit


def assert_served_with_its_own_type(base: str) -> None:
    """A text file is served with the type it was uploaded with: no charset the uploader never declared."""
    for content_type in ("text/plain", "text/csv; charset=latin-1"):
        init = httpx.post(
            f"{base}/rest/storage/upload/initiate", json={"content_type": content_type, "file_name": "notes.txt"}
        ).json()
        assert httpx.put(init["upload_url"], content="café crème\n".encode("latin-1")).status_code == 200
        for method in ("GET", "HEAD"):
            assert httpx.request(method, init["file_url"]).headers["content-type"] == content_type, method


def object_files(root: Path, key: str) -> list[Path]:
    """The object files a local store (rooted at `root`) holds for `key`: any version of it."""
    folder, name = key.split("/", 1)
    return [p for p in (root / "objects" / folder).glob("*") if p.name == name or p.name.endswith(f"~{name}")]
