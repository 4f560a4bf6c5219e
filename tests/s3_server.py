"""A real S3 API for tests: moto's server on loopback (HTTP, as boto3 talks to any S3-compatible service),
one per session, with a fresh bucket per test."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from wanserve.client.local_server import free_port
from wanserve.files.s3 import Delivery, S3FileStore, new_client

PUBLIC = "http://files.test:8000/base"
REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server's URL, with dummy credentials in the environment (and no profile or config file of the
    machine's) so that boto3 never reaches a real account."""
    nowhere = tmp_path_factory.mktemp("aws") / "absent"
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", REGION)
        env.setenv("AWS_CONFIG_FILE", str(nowhere))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A new, empty bucket: tests never see each other's objects."""
    name = f"test-{uuid.uuid4().hex[:20]}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


def s3_store(
    endpoint: str, bucket: str, delivery: Delivery = "redirect", prefix: str = "wanserve/files"
) -> S3FileStore:
    """A store as `--files s3://<bucket>/<prefix>` opens it, on the client it would make (made once per
    session: making one costs more than most tests)."""
    return S3FileStore(bucket, prefix, PUBLIC, delivery=delivery, client=_store_client(endpoint))


@functools.cache
def _store_client(endpoint: str) -> Any:
    return new_client(endpoint, REGION)


@functools.cache
def s3_client(endpoint: str) -> Any:
    """A client of the test's own, to look at the bucket without the store."""
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION)


def bucket_keys(endpoint: str, bucket: str) -> list[str]:
    """Every object in the bucket (a test's view of what the store left behind)."""
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(entry["Key"] for page in pages for entry in page.get("Contents", []))
