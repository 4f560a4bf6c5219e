"""The housekeeping's lease recovery (jobs.service.LeaseRecovery) on a real SQLite store: it takes back the jobs of
dead workers, but not those of healthy workers that could not renew their leases (the store took no writes, its
clock jumped ahead)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from wanserve.jobs.model import JobState, NewJob
from wanserve.jobs.service import LeaseRecovery
from wanserve.store.sqlite import SQLiteJobStore

T0 = 1_700_000_000.0
LEASE_S = 30.0


class Store(SQLiteJobStore):
    """The real store with its clock set by the test, and writes that fail as on a full disk while `full`.
    `slow_probe`: called at each write probe (a test advances the clocks there: a slow store call)."""

    clock = T0
    full = False
    slow_probe: Callable[[], None] = staticmethod(lambda: None)

    def now(self) -> float:
        return self.clock

    def probe_write(self, now: float) -> None:
        if self.full:
            raise sqlite3.OperationalError("database or disk is full")
        self.slow_probe()
        super().probe_write(now)


class Passes:
    """Runs housekeeping passes as the server does (one a second), both clocks moving together unless told."""

    def __init__(self, store: Store, worker_alive: bool = True) -> None:
        self.store, self.mono, self.worker_alive = store, 0.0, worker_alive
        self.recovery = LeaseRecovery(store, LEASE_S, max_attempts=3, clock=lambda: self.mono)

    def advance(self, seconds: float, store_jump: float = 0.0) -> None:
        self.mono += seconds
        self.store.clock += seconds + store_jump

    def run_for(self, seconds: int) -> None:
        for _ in range(seconds):
            self.advance(1.0)
            try:
                self.recovery.run()
            except sqlite3.OperationalError:
                assert self.store.full
            # The worker's heartbeat thread renews its lease every lease/4 s (7.5 s), when the store takes writes.
            if self.worker_alive and not self.store.full and int(self.mono) % 7 == 0:
                self.store.heartbeat("running", "w1", LEASE_S, self.store.now())


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "jobs.db")
    store.submit(NewJob("running", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "x"}), T0)
    assert store.claim("w1", LEASE_S, T0) is not None
    return store


def state(store: Store) -> JobState:
    job = store.get("running")
    assert job is not None
    return job.state


def test_a_lease_that_ran_out_while_the_store_took_no_writes_is_left_to_its_worker(store: Store) -> None:
    passes = Passes(store)
    passes.run_for(5)
    store.full = True  # nobody can write: the worker's heartbeats fail too
    passes.run_for(35)  # the lease ran out at T0 + 30
    store.full = False
    passes.run_for(1)
    assert state(store) is JobState.RUNNING  # not taken at the first write after the outage
    passes.run_for(60)  # the worker's next heartbeat renewed it
    assert state(store) is JobState.RUNNING


def test_a_worker_that_died_in_the_outage_loses_its_job_one_lease_later(store: Store) -> None:
    passes = Passes(store, worker_alive=False)
    store.full = True
    passes.run_for(40)
    store.full = False
    passes.run_for(int(LEASE_S) - 2)
    assert state(store) is JobState.RUNNING
    passes.run_for(3)
    assert state(store) is JobState.QUEUED


def test_a_store_clock_that_jumps_ahead_takes_no_lease_at_once(store: Store) -> None:
    passes = Passes(store)
    passes.run_for(3)
    passes.advance(0.0, store_jump=40.0)  # the wall clock stepped: the lease looks 10+ s past its end
    passes.recovery.run()
    assert state(store) is JobState.RUNNING
    passes.run_for(60)  # the worker renews on the new time
    assert state(store) is JobState.RUNNING


def test_a_lease_that_runs_out_on_a_steady_clock_and_a_writable_store_is_taken_back(store: Store) -> None:
    passes = Passes(store, worker_alive=False)
    passes.run_for(29)
    assert state(store) is JobState.RUNNING
    passes.run_for(2)
    assert state(store) is JobState.QUEUED


def test_passes_that_did_not_get_through_hold_the_recovery_whatever_failed(store: Store) -> None:
    """The server's housekeeping does more than this recovery; a Redis outage can fail another of its calls first,
    or be ridden out inside one slow call: a long gap between whole passes holds the recovery all the same."""
    passes = Passes(store, worker_alive=False)
    passes.run_for(3)
    passes.advance(40.0)  # 40 s with no pass through (the lease ran out at T0 + 30)
    passes.recovery.run()
    assert state(store) is JobState.RUNNING
    passes.run_for(int(LEASE_S) + 1)  # a dead worker's job goes one lease later
    assert state(store) is JobState.QUEUED


def test_a_slow_store_call_is_not_taken_for_a_clock_jump(store: Store) -> None:
    """A probe that takes 6 s (a lock wait) moves both clocks alike: no hold, the dead worker's job goes on time."""
    passes = Passes(store, worker_alive=False)
    passes.run_for(20)
    store.slow_probe = lambda: passes.advance(6.0)
    passes.run_for(1)
    store.slow_probe = lambda: None
    passes.run_for(4)  # the lease ran out at T0 + 30: taken at the first pass after
    assert state(store) is JobState.QUEUED


def test_an_outage_ridden_out_inside_one_store_call_holds_the_recovery(store: Store) -> None:
    """The Redis client retries for many seconds inside one call: the probe that returns after a 40 s outage is the
    first write after it, and the leases that ran out meanwhile belong to workers that could not renew them."""
    passes = Passes(store)
    passes.run_for(3)
    store.slow_probe = lambda: passes.advance(40.0)
    passes.run_for(1)
    store.slow_probe = lambda: None
    assert state(store) is JobState.RUNNING
    passes.run_for(60)  # the worker renewed its lease meanwhile
    assert state(store) is JobState.RUNNING


def test_a_replica_that_starts_after_an_outage_leaves_leases_one_lease_for_their_workers(store: Store) -> None:
    """A replica started by a deploy or an autoscaler right after a Redis outage has no history to tell it that
    the store took no writes: its first passes must not take the leases that ran out in the outage before their
    workers' next heartbeat renews them. A dead worker's job goes one lease after the start."""
    store.clock += 40.0  # the lease ran out at T0 + 30, in an outage this process never saw
    alive = Passes(store)
    alive.run_for(int(LEASE_S) + 5)
    assert state(store) is JobState.RUNNING  # its worker renewed it meanwhile
    store.clock += 40.0
    dead = Passes(store, worker_alive=False)
    dead.run_for(int(LEASE_S) - 2)
    assert state(store) is JobState.RUNNING
    dead.run_for(3)
    assert state(store) is JobState.QUEUED
