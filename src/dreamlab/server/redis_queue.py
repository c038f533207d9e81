"""A job queue shared by machines, on a Redis server: ``dreamlab serve --queue redis://HOST:6379/0`` (the
API node) and ``dreamlab worker --queue redis://...`` (workers anywhere that reach that server).

Two layers, each with one job:

- **Delivery** is dramatiq's (its Redis broker): every job is one message on the ``dreamlab-jobs`` queue. A
  worker's fetch moves the message, in one Lua call, into that worker's ack set, and the worker acks it only
  after the job ended. Every broker call stamps its process's heartbeat; while a job runs, the consumer
  that fetched it is at its prefetch limit and silent, but the delay-queue consumer dramatiq runs beside it
  polls every ``POLL_MS`` (test_redis_queue.py checks that a job longer than the timeout stays with its
  worker). Every broker call also runs dramatiq's maintenance here, which puts the unacked messages of a
  process silent for ``heartbeat_timeout`` back on the queue: so the job of a worker killed mid-job
  (SIGKILL, power loss) is delivered to another worker, once.
- **The job record** is ours (``redis_jobs.lua``): state, attempts, progress, cancellation, the images handed
  in. Every change is one atomic script call. A claim gives the attempt a fresh token and the record keeps
  the token of the attempt that owns the job; progress, hand-in, failure and release are accepted only
  from that owner. So even a worker wrongly taken for dead (a long pause, a network split) cannot finish
  a job another worker has taken over: a job's images are accepted once (``deliveries`` is 0 or 1), and a
  rerun starts from the seed fixed at submission, so it makes the same image.

Images travel back as PNG bytes: the worker encodes each (``metadata.png_bytes``, the same codec the embedded
server writes with) and hands them in with their manifests; the API node writes them into its gallery under
server-made names (``redis_store.RedisJobStore``) and only then marks the job ``done``.

This module imports redis and dramatiq; nothing imports it unless a Redis queue is asked for.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import time
import uuid
from importlib import resources
from typing import Any, Callable
from urllib.parse import urlsplit

import dramatiq
import redis
from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ..errors import DreamlabError
from .queue import Job, QueueFullError, QueueUnavailableError, new_id

log = logging.getLogger("dreamlab.server")

PREFIX = "dreamlab"
QUEUE = "dreamlab-jobs"  # the dramatiq queue
ACTOR = "dreamlab.run_job"
POLL_MS = 50  # a worker's consumers poll (and heartbeat) at least this often
STATES = ("queued", "running", "done", "failed", "cancelled")
_JOB_FIELDS = ("id", "seq", "state", "created", "started", "finished", "attempts", "cancel_requested", "error")
_SCRIPT = resources.files(__package__).joinpath("redis_jobs.lua").read_text()


def check_url(url: str) -> None:
    """redis://HOST[:PORT][/DB], rediss:// (TLS) or unix://PATH; redis-py would take a bad DB for 0."""
    parts = urlsplit(url)
    expected = f"--queue {shown(url)}: expected redis://HOST:PORT/DB (rediss:// with TLS, unix:// for a socket)"
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise DreamlabError(expected)
    try:
        parts.port  # noqa: B018 (it parses the port)
    except ValueError:
        raise DreamlabError(f"--queue {shown(url)}: the port is not a number") from None
    db = parts.path.strip("/")
    if parts.scheme != "unix" and (not parts.hostname or not (db == "" or db.isdigit())):
        raise DreamlabError(expected)


def shown(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def _client(url: str, retries: int, timeout: float) -> redis.Redis:
    # A restart of the Redis server (seconds, with its append-only file) should look like a slow call, not an
    # error: state changes retry with backoff; best-effort calls (progress, polling) fail fast instead.
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries)
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=retry,
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError], health_check_interval=30)


class RedisQueue:
    """The job records and the broker, for both roles: the API node (submit, cancel, read) and a worker
    (claim, progress, hand in, fail, release). One worker per process: the tokens of the attempts this
    process runs are kept here."""

    def __init__(self, url: str, *, max_attempts: int = 3, heartbeat_timeout: float = 10.0):
        check_url(url)
        try:
            self.redis = _client(url, retries=12, timeout=10)  # about 10 s of retries
            self.fast = _client(url, retries=0, timeout=2)
        except ValueError as e:
            raise DreamlabError(f"--queue {shown(url)}: {e}") from None
        try:
            self.fast.ping()
        except redis.RedisError as e:
            raise DreamlabError(f"cannot reach the Redis server at {shown(url)}: {e}") from None
        self.url, self.max_attempts = url, max_attempts
        self.name = f"{socket.gethostname()}:{os.getpid()}"  # this process, as the records name its attempts
        self._script = self.redis.register_script(_SCRIPT)
        self._tokens: dict[str, str] = {}  # job id -> token of this process's attempt at it
        # The broker's calls wait out a restart too: a dramatiq consumer that lost its connection restarts only
        # after 3 s, and sends no heartbeat meanwhile.
        self.broker = RedisBroker(client=_client(url, retries=12, timeout=10), namespace=f"{PREFIX}:dramatiq",
                                  middleware=[], heartbeat_timeout=int(heartbeat_timeout * 1000),
                                  maintenance_chance=MAINTENANCE_SCALE)  # look for dead workers on every call
        self.broker.declare_queue(QUEUE)

    def key(self, *parts: str) -> str:
        return ":".join((PREFIX, *parts))

    def _call(self, command: str, job_id: str, *args: Any, client: redis.Redis | None = None) -> Any:
        try:
            return self._script(keys=[PREFIX], args=[command, repr(time.time()), job_id, *args], client=client or self.redis)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise QueueUnavailableError(f"the job queue's Redis server is unreachable: {e}") from None

    def close(self) -> None:
        self.broker.client.close()
        self.redis.close()
        self.fast.close()

    # --- the API node ---------------------------------------------------------------------------------

    def submit(self, request: dict[str, Any], max_queue: int) -> str:
        """Queue a job; its id. The message goes first: a worker that gets it before the record exists waits
        for the record (``claim``), while a record without a message would wait forever."""
        pending = self._read(lambda r: r.zcard(self.key("q", "queued")) + r.zcard(self.key("q", "running")))
        if pending >= max_queue:  # checked before queueing, so concurrent submissions can pass it by their number
            raise QueueFullError(pending)
        job_id = new_id()
        self.enqueue(job_id)
        self._call("submit", job_id, json.dumps(request))
        return job_id

    def enqueue(self, job_id: str) -> None:
        try:
            self.broker.enqueue(dramatiq.Message(queue_name=QUEUE, actor_name=ACTOR, args=(job_id,), kwargs={}, options={}))
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise QueueUnavailableError(f"the job queue's Redis server is unreachable: {e}") from None

    def cancel(self, job_id: str) -> str | None:
        """The state the job was in (None: no such job); a running job stops at its next step."""
        state = self._call("cancel", job_id)
        return state.decode() if state else None

    def collected(self, job_id: str, error: str | None, client: redis.Redis) -> None:
        """The API node wrote the job's handed-in images into its gallery (error: it could not): it ends."""
        self._call("collected", job_id, *([error] if error else []), client=client)

    def _read(self, fn: Any) -> Any:
        try:
            return fn(self.redis)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise QueueUnavailableError(f"the job queue's Redis server is unreachable: {e}") from None

    def get(self, job_id: str, *, with_request: bool = True) -> Job | None:
        return self.get_many([job_id], with_request=with_request)[0]

    def get_many(self, ids: list[str], *, with_request: bool = True) -> list[Job | None]:
        fields = (*_JOB_FIELDS, "request") if with_request else _JOB_FIELDS

        def read(r: redis.Redis) -> list:
            pipe = r.pipeline(transaction=False)
            for job_id in ids:
                pipe.hmget(self.key("job", job_id), fields)
            return pipe.execute()

        return [_job(dict(zip(fields, values))) for values in self._read(read)]

    def list_jobs(self, state: str | None, limit: int, offset: int) -> list[Job]:
        """Newest first: by submission, or for queued jobs by their place in the queue."""
        zset = self.key("q", state) if state else self.key("jobs")
        ids = [i.decode() for i in self._read(lambda r: r.zrange(zset, offset, offset + limit - 1, desc=True))]
        return [j for j in self.get_many(ids) if j is not None]

    def counts(self) -> dict[str, int]:
        def read(r: redis.Redis) -> list[int]:
            pipe = r.pipeline(transaction=False)
            for state in STATES:
                pipe.zcard(self.key("q", state))
            return pipe.execute()

        return {state: n for state, n in zip(STATES, self._read(read)) if n}

    def position(self, job_id: str) -> int | None:
        """Queued jobs ahead of this one, in the broker's order (None unless queued)."""
        return self._read(lambda r: r.zrank(self.key("q", "queued"), job_id))

    def running_ids(self) -> list[str]:
        """Running jobs, oldest claim first."""
        return [i.decode() for i in self._read(lambda r: r.zrange(self.key("q", "running"), 0, -1))]

    # --- a worker -------------------------------------------------------------------------------------

    def claim(self, job_id: str, wait: float = 5.0) -> Job | None:
        """Start an attempt at the job of a message this worker got (None: nothing to run). A job whose
        record is not written yet (its message went first) is waited for a while; after that the message
        is an orphan of a submission that failed halfway, and is dropped. Waits out a Redis restart: the
        message is acked once this returns, so the record must say what happened first."""
        token = f"{self.name}:{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + wait
        while (outcome := self._persist(lambda: self._call("claim", job_id, token, self.max_attempts))) == b"missing":
            if time.monotonic() > deadline:
                log.warning("dropped the message of job %s: no such job", job_id)
                return None
            time.sleep(0.05)
        if outcome != b"claimed":
            return None
        self._tokens[job_id] = token
        return self._persist(lambda: self.get(job_id))

    def owner(self, job_id: str) -> str | None:
        """The token of the attempt that owns the job (the worker's name, then a colon and a random part)."""
        value = self._read(lambda r: r.hget(self.key("job", job_id), "owner"))
        return value.decode() if value else None

    def set_progress(self, job_id: str, step: int, total: int, preview: bytes | None = None) -> None:
        """Best effort: progress lost while Redis is unreachable is not worth stopping the job for."""
        try:
            self._call("progress", job_id, self._tokens[job_id], step, total, *([preview] if preview else []), client=self.fast)
        except QueueUnavailableError:
            pass

    def cancel_requested(self, job_id: str) -> bool:
        """Cancellation was asked for, or another worker took the job over (this attempt is void)."""
        try:
            cancel, owner = self.fast.hmget(self.key("job", job_id), ("cancel_requested", "owner"))
        except (redis.ConnectionError, redis.TimeoutError):
            return False  # go on; the hand-in will say whether the attempt still counts
        return cancel == b"1" or owner is None or owner.decode() != self._tokens.get(job_id)

    def deliver(self, job_id: str, pngs: list[bytes], manifests: list[dict[str, Any]]) -> bool:
        """Hand in the images of a finished attempt; False if it no longer owned the job."""
        items = [x for png, m in zip(pngs, manifests, strict=True) for x in (png, json.dumps(m, sort_keys=True))]
        return self._attempt("deliver", job_id, *items)

    def fail(self, job_id: str, error: str) -> None:
        self._attempt("fail", job_id, error)

    def mark_cancelled(self, job_id: str) -> None:
        self._attempt("cancelled", job_id)

    def release(self, job_id: str) -> None:
        """The worker is stopping: the job goes back to the queue (a new message, at its end) with the
        attempt not counted."""
        if self._attempt("release", job_id):
            self.enqueue_again(job_id)

    def enqueue_again(self, job_id: str) -> None:
        """A new message for a job whose message this worker will ack without running it."""
        self._persist(lambda: self.enqueue(job_id))

    def notify(self) -> None:
        """Nothing to wake: dramatiq's consumers poll."""

    def _attempt(self, command: str, job_id: str, *args: Any) -> bool:
        """A state change by this process's attempt at the job. False when another attempt owns it now."""
        token = self._tokens.pop(job_id, "")
        return self._persist(lambda: self._call(command, job_id, token, *args)) == 1

    @staticmethod
    def _persist(call: Callable[[], Any]) -> Any:
        """``call()``, waiting out a Redis outage: a worker's message is acked when its job ends, so what
        became of the job must be recorded first (else the record would say ``running`` forever)."""
        for tries in itertools.count():
            try:
                return call()
            except QueueUnavailableError as e:
                if tries % 30 == 0:
                    log.warning("%s; retrying", e)
                time.sleep(1.0)

    def stats(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self._read(lambda r: r.hgetall(self.key("stats"))).items()}


def _num(value: bytes | None) -> float | None:
    return float(value) if value is not None else None


def _job(fields: dict[str, bytes | None]) -> Job | None:
    if fields["state"] is None:
        return None
    request = fields.get("request")
    return Job(
        id=fields["id"].decode(),
        state=fields["state"].decode(),
        request=json.loads(request) if request else {},
        created=float(fields["created"]),
        started=_num(fields["started"]),
        finished=_num(fields["finished"]),
        attempts=int(fields["attempts"]),
        cancel_requested=fields["cancel_requested"] == b"1",
        error=fields["error"].decode() if fields["error"] else None,
        seq=int(fields["seq"]),
    )

