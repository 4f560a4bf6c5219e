from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import engines
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from server import Server
from webhook_receiver import Receiver, running_receiver

from wanserve.engine.loading import load_pipeline
from wanserve.engine.pipeline import GenerationSpec, WanEngine
from wanserve.engine.tiny import TinyConfig, ensure_tiny_model

torch.set_num_threads(2)

# fixtures: a real redis-server; a real S3 API (moto's server)
pytest_plugins = ["redis_server", "s3_server"]


@pytest.fixture(autouse=True)
def same_umask_after() -> Iterator[None]:
    """`wanserve serve` and `worker` make their files private (umask 077): a test that runs one in this process
    must not change the rest of the session's."""
    umask = os.umask(0o022)
    os.umask(umask)
    yield
    os.umask(umask)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def engine(model_cache: Path) -> WanEngine:
    """The built-in tiny model, loaded through the same code path as a real checkpoint."""
    return WanEngine(load_pipeline("tiny", model_cache, torch.float32), torch.device("cpu"))


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path, coarse_model: Path) -> Iterator[Server]:
    """One real `wanserve serve` on loopback (SQLite, local files) shared by the service tests. It serves the
    `coarse` tiny model: the same protocol at a fraction of the cost per video (480p and 580p only)."""
    srv = Server(tmp_path_factory.mktemp("server") / "data", model_cache, args=["--model", str(coarse_model)]).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def coarse_model(model_cache: Path) -> Path:
    """The `coarse` tiny variant (480p/580p only, about half the cost per video) for queue-heavy tests."""
    return ensure_tiny_model(model_cache, TinyConfig(vae="coarse"))


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    """A real webhook receiver on loopback: (its delivery record, its URL)."""
    with running_receiver() as running:
        yield running


@pytest.fixture
def small_spec() -> Callable[..., GenerationSpec]:
    """A spec at a small size (engine tests): the behaviour is size-independent, the cost is not."""
    return engines.small_spec
