"""/metrics: the job-timing histograms, read from the job store at scrape time (so every API replica reports the
same), parsed as Prometheus parses them."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from wanserve.api.app import create_app
from wanserve.api.context import ServerContext
from wanserve.config import Settings
from wanserve.jobs.model import Failure, NewJob

BASE = "http://testserver"


def scrape(client: TestClient) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_job_timings_are_histograms_over_every_completion(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, public_url=BASE, api_keys=[]), workers=0)
    with TestClient(app, base_url=BASE) as client:
        before = scrape(client)
        assert before["wanserve_job_inference_seconds_count"] == {(): 0.0}
        assert before["wanserve_job_queue_wait_seconds_bucket"][(("le", "+Inf"),)] == 0.0

        ctx: ServerContext = client.app.state.context  # type: ignore[attr-defined]
        store, now = ctx.store, ctx.store.now()
        for job_id in ("a", "b"):
            store.submit(NewJob(id=job_id, endpoint="fal-ai/wan-22", app="fal-ai/wan-22", input={}), now)
        for job_id, wait_s, inference_s in (("a", 3.0, 45.0), ("b", 90.0, 8.0)):
            assert store.claim("w", 60, now + wait_s) is not None
            done = now + wait_s + inference_s
            assert store.finish(job_id, done, worker_id="w", output={}, inference_time=inference_s)

        samples = scrape(client)
        inference = samples["wanserve_job_inference_seconds_bucket"]
        assert inference[(("le", "5.0"),)] == 0 and inference[(("le", "10.0"),)] == 1
        assert inference[(("le", "30.0"),)] == 1 and inference[(("le", "60.0"),)] == 2  # cumulative
        assert inference[(("le", "+Inf"),)] == 2
        assert samples["wanserve_job_inference_seconds_sum"] == {(): 53.0}
        assert samples["wanserve_job_inference_seconds_count"] == {(): 2.0}
        wait = samples["wanserve_job_queue_wait_seconds_bucket"]
        assert wait[(("le", "2.0"),)] == 0 and wait[(("le", "5.0"),)] == 1 and wait[(("le", "60.0"),)] == 1
        assert wait[(("le", "120.0"),)] == 2
        assert samples["wanserve_job_queue_wait_seconds_sum"] == {(): 93.0}


def test_jobs_finished_is_a_counter_by_outcome_that_pruning_does_not_lower(tmp_path: Path) -> None:
    """`wanserve_jobs_completed` counts the completed jobs still stored, so it falls as they pass their retention:
    a rate of failures needs a counter that only grows."""
    app = create_app(Settings(data_dir=tmp_path, public_url=BASE, api_keys=[]), workers=0)
    with TestClient(app, base_url=BASE) as client:
        ctx: ServerContext = client.app.state.context  # type: ignore[attr-defined]
        store, now = ctx.store, ctx.store.now()
        for job_id in ("a", "b", "c"):
            store.submit(NewJob(id=job_id, endpoint="fal-ai/wan-22", app="fal-ai/wan-22", input={}), now)
            assert store.claim("w", 60, now) is not None
        store.finish("a", now + 1, worker_id="w", output={})
        store.finish("b", now + 1, worker_id="w", output={})
        store.finish("c", now + 1, worker_id="w", failure=Failure("generation_failed", "out of memory", 500))
        assert store.prune_completed(now + 10) == 3

        samples = scrape(client)
        assert samples["wanserve_jobs_finished_total"] == {
            (("outcome", "ok"),): 2.0,
            (("outcome", "generation_failed"),): 1.0,
        }
        assert "wanserve_jobs_completed" not in samples  # nothing stored any more
