"""The distributed job store: one Redis (with AOF persistence on) shared by API replicas and workers on
many machines.

Every state change is one Lua script, which Redis runs atomically: a claim, a cancel or a finish is
all-or-nothing, whoever runs it. Times are computed by the caller and passed in as exact decimal strings
that the scripts store as they are: Lua's own number formatting (tostring, cjson) keeps 14 digits, which
would round a Unix time to the millisecond.

Layout, every key under `<prefix>:`:
  job:<id>         hash, the job's fields (JSON for structured ones); `qscore` its queue order
  queue            zset of queued ids by (priority, submission order)
  deadlines        zset of queued, never-started ids by start deadline
  leases           zset of running ids by lease expiry
  completed        zset of completed ids by finish time; `prunable`: those whose webhook has settled
  outcomes         hash outcome -> completed jobs (`ok` or the error type) still stored
  finished         hash outcome -> every completion ever (a counter: pruning takes nothing off)
  timings          hash `<metric>:<bucket>` -> completions, `<metric>:sum` -> seconds (store.base TIMING_BUCKETS_S)
  logs:<id>        list of [ts, level, message]; an entry's seq is its position from 1
  workers          hash worker id -> JSON
  claim:<token>    the job one claim took, for an hour: a claim resent after a lost reply returns it again
  queued_by:<key>  set of the queued ids one owner (API key id) submitted: kept by the scripts that queue,
                   claim or complete a job, so `queued_count` is one SCARD
  webhook:<n>      hash, one delivery; `webhooks:due`: zset of pending ones by next attempt
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError
from redis.retry import Retry

from wanserve.jobs.model import (
    CancelOutcome,
    Failure,
    Job,
    JobState,
    LogEntry,
    LogLevel,
    NewJob,
    Priority,
    Webhook,
    WorkerInfo,
    cancelled_failure,
    start_timeout_failure,
)
from wanserve.store.base import INFERENCE, QUEUE_WAIT, TIMING_BUCKETS_S, TimingTotals, generation_seconds

# Queue order as one exact zset score: priority first, then submission order (seq < 2^48).
_PRIORITY_WEIGHT = 2**48
_QUEUED, _RUNNING, _COMPLETED = JobState.QUEUED.value, JobState.RUNNING.value, JobState.COMPLETED.value

# Shared by the scripts that complete a job. ARGV from `first`: now, output, failure, inference_time,
# outcome, log level, log message ('' = none).
_COMPLETE = (
    """
local TIMING_BUCKETS = {TIMING_BOUNDS}
-- One more completion in a job-timing histogram (store.base.timing_bucket: the first bound >= seconds).
local function add_timing(p, metric, seconds)
  local bucket = 0
  while bucket < #TIMING_BUCKETS and seconds > TIMING_BUCKETS[bucket + 1] do bucket = bucket + 1 end
  redis.call('HINCRBY', p .. ':timings', metric .. ':' .. bucket, 1)
  redis.call('HINCRBYFLOAT', p .. ':timings', metric .. ':sum', seconds)
end

local function complete(p, id, now, output, failure, inference_time, outcome, level, message)
  local jk = p .. ':job:' .. id
  -- as store.base.completion_timings: a generation time that is no finite number of seconds is not counted
  -- (HINCRBYFLOAT would refuse it, and a script that fails half way keeps what it wrote: the job never completes)
  local seconds = tonumber(inference_time)
  if seconds and seconds >= 0 and seconds < math.huge then add_timing(p, 'INFERENCE', seconds) end
  local started = redis.call('HGET', jk, 'started_at')
  if started then
    add_timing(p, 'QUEUE_WAIT', math.max(0, tonumber(started) - tonumber(redis.call('HGET', jk, 'created_at'))))
  end
  -- the input goes: nothing reads it once the job is done (see the SQLite store)
  redis.call('HSET', jk, 'state', 'COMPLETED', 'finished_at', now, 'outcome', outcome, 'input', '{}')
  for field, value in pairs({output = output, failure = failure, inference_time = inference_time}) do
    if value ~= '' then redis.call('HSET', jk, field, value) end
  end
  redis.call('HDEL', jk, 'lease_expires_at')
  local owner = redis.call('HGET', jk, 'owner')
  if owner then redis.call('SREM', p .. ':queued_by:' .. owner, id) end
  redis.call('ZREM', p .. ':queue', id)
  redis.call('ZREM', p .. ':deadlines', id)
  redis.call('ZREM', p .. ':leases', id)
  redis.call('ZADD', p .. ':completed', now, id)
  redis.call('HINCRBY', p .. ':outcomes', outcome, 1)
  redis.call('HINCRBY', p .. ':finished', outcome, 1)
  if message ~= '' then
    redis.call('RPUSH', p .. ':logs:' .. id, cjson.encode({now, level, message}))
  end
  local url = redis.call('HGET', jk, 'webhook_url')
  if url then
    local wid = redis.call('INCR', p .. ':webhook_seq')
    redis.call('HSET', p .. ':webhook:' .. wid, 'job_id', id, 'url', url, 'state', 'pending', 'attempts', 0,
      'next_attempt_at', now)
    redis.call('ZADD', p .. ':webhooks:due', now, wid)
    redis.call('HSET', jk, 'webhook_id', wid)
  else
    redis.call('ZADD', p .. ':prunable', now, id)
  end
end
""".replace("TIMING_BOUNDS", ", ".join(map(repr, TIMING_BUCKETS_S)))
    .replace("'INFERENCE'", repr(INFERENCE))
    .replace("'QUEUE_WAIT'", repr(QUEUE_WAIT))
)

# Returns the stored job's fields (one round trip for the submit and the read-back).
_SUBMIT = """
local p, id = ARGV[1], ARGV[2]
local jk = p .. ':job:' .. id
if redis.call('EXISTS', jk) == 1 then return redis.call('HGETALL', jk) end  -- a retried submit after a lost reply
local seq = redis.call('INCR', p .. ':seq')
local qscore = string.format('%d', tonumber(ARGV[3]) * PRIORITY_WEIGHT + seq)
redis.call('HSET', jk, 'seq', seq, 'qscore', qscore, 'state', 'IN_QUEUE', 'attempts', 0, unpack(ARGV, 6))
redis.call('ZADD', p .. ':queue', qscore, id)
if ARGV[5] ~= '' then redis.call('SADD', p .. ':queued_by:' .. ARGV[5], id) end
if ARGV[4] ~= '' then redis.call('ZADD', p .. ':deadlines', ARGV[4], id) end
return redis.call('HGETALL', jk)
""".replace("PRIORITY_WEIGHT", str(_PRIORITY_WEIGHT))

_CANCEL = (
    _COMPLETE
    + """
local p, id, now = ARGV[1], ARGV[2], ARGV[3]
local jk = p .. ':job:' .. id
local state = redis.call('HGET', jk, 'state')
if not state then return 'NOT_FOUND' end
if state == 'COMPLETED' then return 'ALREADY_COMPLETED' end
if state == 'IN_QUEUE' then
  complete(p, id, now, '', ARGV[4], '', ARGV[5], ARGV[6], ARGV[7])
  return 'CANCELLED'
end
redis.call('HSET', jk, 'cancel_requested', 1)
redis.call('RPUSH', p .. ':logs:' .. id, cjson.encode({now, 'INFO', ARGV[8]}))
return 'CANCELLATION_REQUESTED'
"""
)

# Completes one queued job whose start deadline passed (the failure names its own timeout, so the caller
# builds it); a job claimed in the meantime is left alone.
_EXPIRE = (
    _COMPLETE
    + """
local p, id, now = ARGV[1], ARGV[2], ARGV[3]
local jk = p .. ':job:' .. id
if redis.call('HGET', jk, 'state') ~= 'IN_QUEUE' or redis.call('HEXISTS', jk, 'first_started_at') == 1 then
  redis.call('ZREM', p .. ':deadlines', id)
  return 0
end
complete(p, id, now, '', ARGV[4], '', 'request_timeout', 'ERROR', ARGV[5])
return 1
"""
)

# The head of the queue, unless its start deadline passed (then the caller expires it and asks again): 'claimed'
# followed by the claimed job's fields, or 'overdue' and the head's id. `token` is the caller's own for this claim:
# run again (a lost reply is resent), it returns the same job, while that job is still running on this worker.
_CLAIM = """
local p, worker, now, lease_until, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local tk = p .. ':claim:' .. token
local function claimed(id)
  local reply = redis.call('HGETALL', p .. ':job:' .. id)
  table.insert(reply, 1, 'claimed')
  return reply
end
local done = redis.call('GET', tk)
if done then
  -- Only while the job is still this claim's: its lease may have run out and another worker taken it since.
  local jk = p .. ':job:' .. done
  if redis.call('HGET', jk, 'state') == 'IN_PROGRESS' and redis.call('HGET', jk, 'worker_id') == worker then
    return claimed(done)
  end
  redis.call('DEL', tk)
end
local head = redis.call('ZRANGE', p .. ':queue', 0, 0)
if #head == 0 then return false end
local id = head[1]
local deadline = redis.call('ZSCORE', p .. ':deadlines', id)
if deadline and tonumber(deadline) < tonumber(now) then return {'overdue', id} end
local jk = p .. ':job:' .. id
redis.call('ZREM', p .. ':queue', id)
redis.call('ZREM', p .. ':deadlines', id)
local owner = redis.call('HGET', jk, 'owner')
if owner then redis.call('SREM', p .. ':queued_by:' .. owner, id) end
redis.call('HSET', jk, 'state', 'IN_PROGRESS', 'worker_id', worker, 'started_at', now, 'lease_expires_at', lease_until)
redis.call('HSETNX', jk, 'first_started_at', now)
redis.call('HINCRBY', jk, 'attempts', 1)
redis.call('ZADD', p .. ':leases', lease_until, id)
redis.call('SET', tk, id, 'EX', 3600)
return claimed(id)
"""

_HEARTBEAT = """
local p, id, worker, lease_until = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local jk = p .. ':job:' .. id
local fields = redis.call('HMGET', jk, 'state', 'worker_id')
if fields[1] ~= 'IN_PROGRESS' or fields[2] ~= worker then return 0 end
redis.call('HSET', jk, 'lease_expires_at', lease_until)
redis.call('ZADD', p .. ':leases', lease_until, id)
return 1
"""

# Back to the queue at its old place. Used by `release` (the run does not count) and `recover_lost`.
_REQUEUE = """
local function requeue(p, id, uncount)
  local jk = p .. ':job:' .. id
  redis.call('HSET', jk, 'state', 'IN_QUEUE')
  redis.call('HDEL', jk, 'worker_id', 'lease_expires_at', 'started_at')
  if uncount then
    local attempts = tonumber(redis.call('HGET', jk, 'attempts') or '0')
    redis.call('HSET', jk, 'attempts', math.max(attempts - 1, 0))
  end
  redis.call('ZREM', p .. ':leases', id)
  redis.call('ZADD', p .. ':queue', redis.call('HGET', jk, 'qscore'), id)
  local owner = redis.call('HGET', jk, 'owner')
  if owner then redis.call('SADD', p .. ':queued_by:' .. owner, id) end
end
"""

# ARGV: prefix, id, worker, now, note ('' = none), then the cancelled failure: JSON, outcome, log level, message.
_RELEASE = (
    _REQUEUE
    + _COMPLETE
    + """
local p, id, worker, now, note = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local fields = redis.call('HMGET', p .. ':job:' .. id, 'state', 'worker_id', 'cancel_requested')
if fields[1] ~= 'IN_PROGRESS' or fields[2] ~= worker then return 0 end
if fields[3] == '1' then
  complete(p, id, now, '', ARGV[6], '', ARGV[7], ARGV[8], ARGV[9])
  return 1
end
requeue(p, id, true)
if note ~= '' then redis.call('RPUSH', p .. ':logs:' .. id, cjson.encode({now, 'WARN', note})) end
return 1
"""
)

_FINISH = (
    _COMPLETE
    + """
local p, id, worker = ARGV[1], ARGV[2], ARGV[3]
local fields = redis.call('HMGET', p .. ':job:' .. id, 'state', 'worker_id')
if not fields[1] or fields[1] == 'COMPLETED' then return 0 end
if worker ~= '' and (fields[1] ~= 'IN_PROGRESS' or fields[2] ~= worker) then return 0 end
complete(p, id, ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10])
return 1
"""
)

# Running jobs of the named dead workers, or whose lease expired. Running jobs number at most the workers,
# so reading them all is cheap. Returns the ids the caller must complete (out of attempts, or cancelled).
_RECOVER = (
    _REQUEUE
    + """
local p, now, max_attempts = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local dead = {}
for i = 4, #ARGV do dead[ARGV[i]] = true end
local exhausted = {}
local running = redis.call('ZRANGE', p .. ':leases', 0, -1, 'WITHSCORES')
for i = 1, #running, 2 do
  local id, lease_until = running[i], tonumber(running[i + 1])
  local fields = redis.call('HMGET', p .. ':job:' .. id, 'worker_id', 'attempts', 'cancel_requested')
  if dead[fields[1]] or lease_until < now then
    if tonumber(fields[2] or '0') >= max_attempts or fields[3] == '1' then
      -- the job as found here: read again later, it may have been handed back meanwhile
      table.insert(exhausted, redis.call('HGETALL', p .. ':job:' .. id))
    else
      requeue(p, id, false)
    end
  end
end
return exhausted
"""
)

_CLAIM_WEBHOOKS = """
local p, now, hold_until, limit = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ids = redis.call('ZRANGEBYSCORE', p .. ':webhooks:due', '-inf', now, 'LIMIT', 0, limit)
local out = {}
for _, wid in ipairs(ids) do
  local wk = p .. ':webhook:' .. wid
  table.insert(out, {wid, unpack(redis.call('HMGET', wk, 'job_id', 'url', 'attempts', 'next_attempt_at'))})
  redis.call('HSET', wk, 'next_attempt_at', hold_until)
  redis.call('ZADD', p .. ':webhooks:due', hold_until, wid)
end
return out
"""

# A delivery's outcome. ARGV: prefix, webhook id, new state ('delivered' / 'pending' / 'failed'), time
# (delivered_at or the next attempt; '' keeps it), error.
_WEBHOOK_SETTLE = """
local p, wid, state, at, err = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local wk = p .. ':webhook:' .. wid
if redis.call('EXISTS', wk) == 0 then return 0 end
redis.call('HINCRBY', wk, 'attempts', 1)
redis.call('HSET', wk, 'state', state)
if err ~= '' then redis.call('HSET', wk, 'last_error', err) end
if state == 'pending' then
  -- pending again (a second delivery of it overlapped one that settled): its job must wait for it again
  redis.call('ZREM', p .. ':prunable', redis.call('HGET', wk, 'job_id'))
  if at ~= '' then redis.call('HSET', wk, 'next_attempt_at', at) end
  redis.call('ZADD', p .. ':webhooks:due', redis.call('HGET', wk, 'next_attempt_at'), wid)
  return 1
end
if state == 'delivered' then redis.call('HSET', wk, 'delivered_at', at) end
redis.call('ZREM', p .. ':webhooks:due', wid)
local id = redis.call('HGET', wk, 'job_id')
local finished = redis.call('HGET', p .. ':job:' .. id, 'finished_at')
if finished then redis.call('ZADD', p .. ':prunable', finished, id) end
return 1
"""

_PRUNE = """
local p, before, limit = ARGV[1], ARGV[2], ARGV[3]
local ids = redis.call('ZRANGEBYSCORE', p .. ':prunable', '-inf', '(' .. before, 'LIMIT', 0, limit)
for _, id in ipairs(ids) do
  local jk = p .. ':job:' .. id
  local fields = redis.call('HMGET', jk, 'outcome', 'webhook_id')
  if fields[1] then redis.call('HINCRBY', p .. ':outcomes', fields[1], -1) end
  if fields[2] then redis.call('DEL', p .. ':webhook:' .. fields[2]) end
  redis.call('DEL', jk, p .. ':logs:' .. id)
  redis.call('ZREM', p .. ':completed', id)
  redis.call('ZREM', p .. ':prunable', id)
end
return #ids
"""


def _num(value: float | None) -> str:
    """An exact decimal form of a float for Lua ('' for None): repr round-trips."""
    return "" if value is None else repr(float(value))


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def _failure_message(failure: Failure) -> tuple[str, str]:
    """The failure's log line (Failure.log_line) as script arguments."""
    level, message = failure.log_line()
    return level.value, message


def _completion_args(failure: Failure) -> tuple[str, str, str, str]:
    """What `complete()` needs of a failure, in the order _CANCEL and _RELEASE take it: JSON, outcome, log line."""
    return (failure.to_json(), failure.error_type, *_failure_message(failure))


def _pairs(flat: list[str]) -> dict[str, str]:
    """A hash as HGETALL returns it from a script: field, value, field, value..."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _job(fields: dict[str, str]) -> Job:
    timeout = _float(fields.get("start_timeout_s"))
    created = float(fields["created_at"])
    return Job(
        id=fields["id"],
        endpoint=fields["endpoint"],
        app=fields["app"],
        input=json.loads(fields["input"]),
        priority=Priority(int(fields["priority"])),
        state=JobState(fields["state"]),
        seq=int(fields["seq"]),
        created_at=created,
        start_deadline=created + timeout if timeout is not None else None,
        started_at=_float(fields.get("started_at")),
        finished_at=_float(fields.get("finished_at")),
        attempts=int(fields.get("attempts", 0)),
        worker_id=fields.get("worker_id") or None,
        lease_expires_at=_float(fields.get("lease_expires_at")),
        cancel_requested=fields.get("cancel_requested") == "1",
        output=json.loads(fields["output"]) if fields.get("output") else None,
        failure=Failure.from_json(fields["failure"]) if fields.get("failure") else None,
        inference_time=_float(fields.get("inference_time")),
        webhook_url=fields.get("webhook_url") or None,
        output_lifecycle=json.loads(fields["output_lifecycle"]) if fields.get("output_lifecycle") else None,
        owner=fields.get("owner") or None,
    )


log = logging.getLogger(__name__)

# How often the offset between this machine's clock and Redis's is measured again (one TIME call at most this
# often per process). Not for drift (well under a millisecond a minute) but for a step of Redis's own clock (NTP, a
# failover to a replica on another machine): every worker and replica must see it within a moment of the others,
# or a worker's fresh lease looks expired to a replica still counting on the old time (and after a forward step,
# the housekeeping's hold of one lease would end before a worker saw the new time).
CLOCK_REFRESH_S = 1.0


class RedisJobStore:
    reads_are_local = False

    def __init__(
        self, client: redis.Redis, prefix: str = "wanserve", machine_clock: Callable[[], float] = time.time
    ) -> None:
        # Any: redis-py's annotations cannot tell that `decode_responses=True` makes every reply a str.
        self.redis: Any = client
        self.prefix = prefix
        scripts = {
            "submit": _SUBMIT,
            "cancel": _CANCEL,
            "expire": _EXPIRE,
            "claim": _CLAIM,
            "heartbeat": _HEARTBEAT,
            "release": _RELEASE,
            "finish": _FINISH,
            "recover": _RECOVER,
            "claim_webhooks": _CLAIM_WEBHOOKS,
            "webhook_settle": _WEBHOOK_SETTLE,
            "prune": _PRUNE,
        }
        # register_script reloads a script that a restarted Redis no longer has (NOSCRIPT) by itself.
        self._scripts = {name: client.register_script(body) for name, body in scripts.items()}
        self._machine_clock = machine_clock  # this machine's wall clock: only to warn when it is far off Redis's
        self._clock_lock = threading.Lock()
        # Redis's TIME at the last measurement, and time.monotonic() then: `now()` counts on from there.
        self._clock_base: tuple[float, float] | None = None
        self._clock_unreadable = False  # the last TIME call failed (warned once per outage)

    @classmethod
    def from_url(cls, url: str, prefix: str = "wanserve", retries: int = 40) -> RedisJobStore:
        """A store on the Redis at `url`. Calls ride out a Redis restart or failover (retried with backoff for
        about `retries` x 0.5 s). A call whose reply was lost is sent again: no script then corrupts the store
        (a claim returns the job it took; a submit, finish or expire never acts twice), but a resent finish or
        release answers False, a resent cancel ALREADY_COMPLETED, a resent webhook outcome counts its attempt
        twice and a resent add_log writes its line twice."""
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=30,
            socket_connect_timeout=5,
            health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), retries),
            retry_on_error=[ConnectionError, TimeoutError, BusyLoadingError],
        )
        return cls(client, prefix)

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _run(self, script: str, *args: str | int) -> Any:
        return self._scripts[script](keys=[], args=[self.prefix, *args])

    def close(self) -> None:
        self.redis.close()

    def now(self) -> float:
        """Redis's clock (its TIME): read every CLOCK_REFRESH_S, and counted on in between with this machine's
        monotonic clock. Workers and replicas on machines whose clocks disagree then agree on when a lease ran out
        or a worker went silent, and a step of this machine's wall clock (NTP, an operator) changes nothing: read
        off the wall clock, a step of 40 s would make every lease look expired to this replica's housekeeping."""
        with self._clock_lock:
            if self._clock_base is None or time.monotonic() - self._clock_base[1] >= CLOCK_REFRESH_S:
                self._measure_clock()
            assert self._clock_base is not None
            redis_then, monotonic_then = self._clock_base
            return redis_then + (time.monotonic() - monotonic_then)

    def _measure_clock(self) -> None:
        before = time.monotonic()
        try:
            seconds, micros = self.redis.time()
        except redis.RedisError:
            if self._clock_base is None:
                raise
            # The last measurement stays good for a long time; the call that needs Redis next says it is gone.
            if not self._clock_unreadable:
                log.warning("could not read Redis's clock; counting on from the last reading", exc_info=True)
            self._clock_unreadable = True
            redis_then, monotonic_then = self._clock_base  # the same reading, asked again CLOCK_REFRESH_S from now
            self._clock_base = (redis_then + (before - monotonic_then), before)
            return
        self._clock_unreadable = False
        after = time.monotonic()
        # TIME was read somewhere between `before` and `after`: the midpoint errs by at most half the round trip.
        redis_time, midpoint = seconds + micros / 1e6, (before + after) / 2
        if self._clock_base is None and abs(offset := redis_time - self._machine_clock()) > 1.0:
            log.warning(
                "this machine's clock is %.1f s %s Redis's; the job store uses Redis's",
                abs(offset),
                "behind" if offset > 0 else "ahead of",
            )
        self._clock_base = (redis_time, midpoint)

    # --- requests ---
    def submit(self, new: NewJob, now: float) -> Job:
        timeout = new.start_timeout_s
        fields: dict[str, str] = {
            "id": new.id,
            "endpoint": new.endpoint,
            "app": new.app,
            "input": json.dumps(new.input),
            "priority": str(int(new.priority)),
            "created_at": _num(now),
        }
        if timeout is not None:
            fields["start_timeout_s"] = _num(timeout)
        if new.webhook_url is not None:
            fields["webhook_url"] = new.webhook_url
        if new.output_lifecycle is not None:
            fields["output_lifecycle"] = json.dumps(new.output_lifecycle)
        if new.owner:
            fields["owner"] = new.owner
        flat = [item for pair in fields.items() for item in pair]
        deadline = _num(now + timeout) if timeout is not None else ""
        return _job(_pairs(self._run("submit", new.id, int(new.priority), deadline, new.owner or "", *flat)))

    def get(self, job_id: str) -> Job | None:
        fields = self.redis.hgetall(self._key("job", job_id))
        return _job(fields) if fields else None

    def queue_position(self, job: Job) -> int:
        score = int(job.priority) * _PRIORITY_WEIGHT + job.seq
        return int(self.redis.zcount(self._key("queue"), "-inf", f"({score}"))

    def queued_count(self, owner: str | None = None) -> int:
        if owner is None:
            return int(self.redis.zcard(self._key("queue")))
        return int(self.redis.scard(self._key("queued_by", owner)))

    def cancel(self, job_id: str, failure: Failure, now: float) -> CancelOutcome:
        outcome = self._run(
            "cancel",
            job_id,
            _num(now),
            *_completion_args(failure),
            "Cancellation requested: stopping at the next denoising step",
        )
        return CancelOutcome(outcome)

    def expire_overdue(self, now: float) -> list[str]:
        expired = []
        for job_id in self.redis.zrangebyscore(self._key("deadlines"), "-inf", f"({_num(now)}"):
            timeout = _float(self.redis.hget(self._key("job", job_id), "start_timeout_s"))
            failure = start_timeout_failure(timeout or 0.0)
            if self._run("expire", job_id, _num(now), failure.to_json(), _failure_message(failure)[1]):
                expired.append(job_id)
        return expired

    # --- logs ---
    def add_log(self, job_id: str, level: LogLevel, message: str, now: float) -> None:
        self.redis.rpush(self._key("logs", job_id), json.dumps([now, level.value, message]))

    def logs(self, job_id: str, after_seq: int = 0) -> list[LogEntry]:
        after_seq = max(after_seq, 0)  # a list index: a negative one would count from the end
        rows = self.redis.lrange(self._key("logs", job_id), after_seq, -1)
        entries = []
        for seq, row in enumerate(rows, start=after_seq + 1):
            ts, level, message = json.loads(row)
            entries.append(LogEntry(seq, float(ts), LogLevel(level), message))
        return entries

    # --- workers ---
    def claim(self, worker_id: str, lease_s: float, now: float, token: str | None = None) -> Job | None:
        self.expire_overdue(now)  # as SQLite's claim does: every queued job past its start deadline ends now
        token = token or uuid.uuid4().hex
        while True:
            found = self._run("claim", worker_id, _num(now), _num(now + lease_s), token)
            if not found:
                return None
            if found[0] == "claimed":
                return _job(_pairs(found[1:]))
            self.expire_overdue(now)  # the head was past its start deadline: complete it, take the next

    def claimed_with(self, worker_id: str, token: str) -> Job | None:
        # A plain read: only this worker's claim could have set the token, and only its worker acts on the answer.
        job_id = self.redis.get(self._key("claim", token))
        job = self.get(job_id) if job_id else None
        return job if job is not None and job.state is JobState.RUNNING and job.worker_id == worker_id else None

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float, now: float) -> bool:
        return bool(self._run("heartbeat", job_id, worker_id, _num(now + lease_s)))

    def release(self, job_id: str, worker_id: str, now: float, note: str | None = None) -> bool:
        cancelled = _completion_args(cancelled_failure())
        return bool(self._run("release", job_id, worker_id, _num(now), note or "", *cancelled))

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self._key("job", job_id), "cancel_requested") == "1"

    def finish(
        self,
        job_id: str,
        now: float,
        *,
        worker_id: str | None = None,
        output: dict[str, Any] | None = None,
        failure: Failure | None = None,
        inference_time: float | None = None,
        note: str | None = None,
    ) -> bool:
        if failure is not None:
            level, message = _failure_message(failure)
        else:
            level, message = (LogLevel.INFO.value, note) if note is not None else ("", "")
        return bool(
            self._run(
                "finish",
                job_id,
                worker_id or "",
                _num(now),
                json.dumps(output) if output is not None else "",
                failure.to_json() if failure is not None else "",
                _num(generation_seconds(inference_time)),
                failure.error_type if failure is not None else "ok",
                level,
                message,
            )
        )

    def recover_lost(self, now: float, dead_workers: list[str], max_attempts: int) -> list[Job]:
        return [_job(_pairs(fields)) for fields in self._run("recover", _num(now), max_attempts, *dead_workers)]

    def register_worker(self, info: WorkerInfo) -> None:
        record = {"ready": info.ready, "heartbeat_at": info.heartbeat_at, "detail": info.detail}
        self.redis.hset(self._key("workers"), info.id, json.dumps(record))

    def probe_write(self, now: float) -> None:
        self.redis.set(self._key("probe"), repr(now))

    def remove_worker(self, worker_id: str) -> None:
        self.redis.hdel(self._key("workers"), worker_id)

    def workers(self) -> list[WorkerInfo]:
        records = self.redis.hgetall(self._key("workers"))
        out = []
        for worker_id in sorted(records):
            record = json.loads(records[worker_id])
            out.append(WorkerInfo(worker_id, bool(record["ready"]), float(record["heartbeat_at"]), record["detail"]))
        return out

    # --- webhooks ---
    def _webhooks(self, rows: list[list[str]]) -> list[Webhook]:
        return [Webhook(int(w), job_id, url, int(attempts), float(at)) for w, job_id, url, attempts, at in rows]

    def due_webhooks(self, now: float, limit: int = 20) -> list[Webhook]:
        ids = self.redis.zrangebyscore(self._key("webhooks:due"), "-inf", _num(now), start=0, num=limit)
        rows = []
        for wid in ids:
            fields = self.redis.hmget(self._key("webhook", wid), "job_id", "url", "attempts", "next_attempt_at")
            if fields[0] is not None:
                rows.append([wid, *fields])
        return self._webhooks(rows)

    def claim_due_webhooks(self, now: float, hold_s: float, limit: int = 20) -> list[Webhook]:
        return self._webhooks(self._run("claim_webhooks", _num(now), _num(now + hold_s), limit))

    def webhook_delivered(self, webhook_id: int, now: float) -> None:
        self._run("webhook_settle", webhook_id, "delivered", _num(now), "")

    def webhook_failed(self, webhook_id: int, error: str, retry_at: float | None) -> None:
        state = "pending" if retry_at is not None else "failed"
        self._run("webhook_settle", webhook_id, state, _num(retry_at), error[:1000])

    def prune_completed(self, finished_before: float, batch: int = 500) -> int:
        pruned = 0
        while True:  # batches: one script holds Redis for its whole run, so keep each short
            count = int(self._run("prune", _num(finished_before), batch))
            pruned += count
            if count < batch:
                return pruned

    # --- metrics ---
    def counts(self) -> dict[str, int]:
        with self.redis.pipeline(transaction=True) as pipe:
            for name in ("queue", "leases", "completed"):
                pipe.zcard(self._key(name))
            pipe.hgetall(self._key("outcomes"))
            pipe.hgetall(self._key("finished"))
            queued, running, completed, outcomes, finished = pipe.execute()
        counts = {_QUEUED: int(queued), _RUNNING: int(running), _COMPLETED: int(completed)}
        counts.update({f"outcome:{name}": int(n) for name, n in outcomes.items() if int(n) > 0})
        counts.update({f"finished:{name}": int(n) for name, n in finished.items()})
        return counts

    def timings(self) -> dict[str, TimingTotals]:
        totals: dict[str, TimingTotals] = {}
        for field_name, value in self.redis.hgetall(self._key("timings")).items():
            metric, _, part = field_name.rpartition(":")
            timing = totals.setdefault(metric, TimingTotals())
            if part == "sum":
                timing.total_s = float(value)
            else:
                timing.bucket_counts[min(int(part), len(TIMING_BUCKETS_S))] += int(value)
        return totals
