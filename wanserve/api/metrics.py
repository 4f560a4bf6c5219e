"""Prometheus metrics: HTTP traffic, and queue gauges read from the job store at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from wanserve.jobs.model import WorkerInfo
from wanserve.store.base import INFERENCE, QUEUE_WAIT, TIMING_BUCKETS_S, JobStore, TimingTotals


class Metrics:
    """One registry per app (so several apps in one process, as in tests, do not collide)."""

    def __init__(self, store: JobStore, lease_s: float) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "wanserve_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.http_seconds = Histogram(
            "wanserve_http_request_seconds", "HTTP request latency", ["method", "route"], registry=self.registry
        )
        self.registry.register(_StoreCollector(store, lease_s))


class _StoreCollector(Collector):
    """Queue gauges read from the job store at scrape time, so every API replica reports the same."""

    def __init__(self, store: JobStore, lease_s: float) -> None:
        self.store = store
        self.lease_s = lease_s

    def collect(self) -> Iterator[Any]:
        counts = self.store.counts()
        jobs = GaugeMetricFamily("wanserve_jobs", "Jobs by state", labels=["state"])
        outcomes = GaugeMetricFamily(
            "wanserve_jobs_completed",
            "Completed jobs still stored, by outcome (a gauge: it falls as jobs pass their retention; for rates use "
            "wanserve_jobs_finished_total)",
            labels=["outcome"],
        )
        finished = CounterMetricFamily(
            "wanserve_jobs_finished",
            "Jobs completed, by outcome (ok, or the error type), counted in the job store as they complete",
            labels=["outcome"],
        )
        for name, value in counts.items():
            if name.startswith("outcome:"):
                outcomes.add_metric([name.split(":", 1)[1]], value)
            elif name.startswith("finished:"):
                finished.add_metric([name.split(":", 1)[1]], value)
            else:
                jobs.add_metric([name], value)
        live = live_workers(self.store, self.lease_s)
        ready = GaugeMetricFamily("wanserve_workers_ready", "Workers with the model loaded and a fresh heartbeat")
        ready.add_metric([], sum(1 for w in live if w.ready))
        labels = ["worker", "host", "model", "gpus"]
        info = GaugeMetricFamily("wanserve_worker_info", "Live workers (heartbeat within the lease)", labels=labels)
        busy = GaugeMetricFamily("wanserve_worker_busy", "1 while the worker runs a job", labels=["worker"])
        for w in live:
            gpus = ",".join(str(g) for g in w.detail.get("gpus") or [])
            info.add_metric([w.id, str(w.detail.get("host", "")), str(w.detail.get("model", "")), gpus], 1)
            busy.add_metric([w.id], 1 if w.detail.get("current_job") else 0)
        yield from (jobs, outcomes, finished, ready, info, busy)
        timings = self.store.timings()
        for metric, name, doc in _TIMINGS:
            yield _histogram(name, doc, timings.get(metric, TimingTotals()))


_TIMINGS = [
    (INFERENCE, "wanserve_job_inference_seconds", "Generation time of successful jobs, as their workers measured it"),
    (QUEUE_WAIT, "wanserve_job_queue_wait_seconds", "From submission to the start of the run that completed the job"),
]


def _histogram(name: str, doc: str, totals: TimingTotals) -> HistogramMetricFamily:
    """A Prometheus histogram (cumulative buckets) from the store's per-bucket counts."""
    bounds = [repr(float(bound)) for bound in TIMING_BUCKETS_S] + ["+Inf"]
    buckets = list(zip(bounds, accumulate(totals.bucket_counts), strict=True))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=totals.total_s)


def live_workers(store: JobStore, lease_s: float) -> list[WorkerInfo]:
    """Workers whose heartbeat is fresh: one silent for a lease is gone (or hung) whatever it last said."""
    now = store.now()
    return [w for w in store.workers() if now - w.heartbeat_at < lease_s]
