"""Prometheus metrics: HTTP traffic, and queue gauges read from the job store at scrape time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from wanserve.store.base import JobStore


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
        outcomes = GaugeMetricFamily("wanserve_jobs_completed", "Completed jobs by outcome", labels=["outcome"])
        for name, value in counts.items():
            if name.startswith("outcome:"):
                outcomes.add_metric([name.split(":", 1)[1]], value)
            else:
                jobs.add_metric([name], value)
        workers = GaugeMetricFamily("wanserve_workers_ready", "Workers with the model loaded and a fresh heartbeat")
        workers.add_metric([], len(ready_workers(self.store, self.lease_s)))
        yield from (jobs, outcomes, workers)


def ready_workers(store: JobStore, lease_s: float) -> list[str]:
    now = time.time()
    return [w.id for w in store.workers() if w.ready and now - w.heartbeat_at < lease_s]
