"""What the blocking and the asyncio clients share: requests built from Python values, answers
turned into plain objects, and the rules for following a job. No I/O here."""

from __future__ import annotations

import itertools
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import grpc

from . import _conn, errors
from .v1 import taskmaster_pb2 as pb

Payload = Union[bytes, str]

# Tasks per submit call: well under the master's --max-batch (100,000), and small enough that a
# job's first results come while the rest of its input is still being sent.
DEFAULT_BATCH_SIZE = 10_000
# Bytes of payloads per call, far below the 64 MiB message limit.
DEFAULT_BATCH_BYTES = 8 << 20
# Statuses after which a batch is sent again with the same number (the master applies it once):
# a lost answer, a master restarting, a queue or tenant limit that clears as workers catch up.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
# A master that went away is looked for again this often at first, then up to the maximum.
RECONNECT_INITIAL_S = 0.1
RECONNECT_MAX_S = 2.0
# Channel options that make gRPC reconnect at that pace too, not after its own 1 s to 120 s.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", int(RECONNECT_INITIAL_S * 1000)),
                   ("grpc.min_reconnect_backoff_ms", int(RECONNECT_INITIAL_S * 1000)),
                   ("grpc.max_reconnect_backoff_ms", int(RECONNECT_MAX_S * 1000))]

# A result past the master's retention comes back with no state, as taskctl shows it.
STATE_NAMES = {**{v: k for k, v in pb.TaskState.items()}, pb.TASK_STATE_UNSPECIFIED: "EXPIRED"}


@dataclass(frozen=True)
class Progress:
    """How far a running task has come, as its handler last reported it."""

    task_id: int
    done: int
    total: int  # 0: unknown
    message: str
    updated_ms: int


@dataclass(frozen=True)
class Result:
    """A finished task, as a job's results give it (without its payload: Client.task has it)."""

    id: int
    job_id: str
    state: str  # SUCCEEDED, DEAD or CANCELLED
    output: bytes
    error: str
    attempts: int
    kind: str
    queue: str
    worker: str
    finished_ms: int

    @property
    def ok(self) -> bool:
        """Whether the task succeeded."""
        return self.state == "SUCCEEDED"

    @property
    def text(self) -> str:
        """The output as UTF-8 text."""
        return self.output.decode("utf-8")


@dataclass(frozen=True)
class TaskInfo(Result):
    """Everything the master knows of one task (Client.task)."""

    payload: bytes = b""
    max_attempts: int = 0
    priority: int = 0
    waiting_for: str = ""
    created_ms: int = 0
    progress: Optional[Progress] = None


@dataclass(frozen=True)
class JobStatus:
    """A job's counts. `done` counts tasks finished in any way; `open` that it takes more tasks."""

    job_id: str
    total: int
    done: int
    succeeded: int
    dead: int
    cancelled: int
    open: bool
    running: List[Progress] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.open and self.done == self.total


@dataclass(frozen=True)
class QueueStats:
    queue: str
    pending: int
    leased: int
    succeeded: int
    failed: int
    dead: int
    cancelled: int


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    name: str
    host: str
    kinds: List[str]
    queues: List[str]
    labels: Dict[str, str]
    slots: int
    running: int
    connected: bool
    draining: bool
    stuck: int


@dataclass(frozen=True)
class Stats:
    queues: List[QueueStats]
    workers: List[WorkerInfo]
    duplicate_results: int
    # With the queues split into partitions: those counted, and how many there are (0: one).
    partitions: List[int] = field(default_factory=list)
    partition_count: int = 0

    @property
    def complete(self) -> bool:
        """Whether every partition is counted (a master taking some over may not be reached)."""
        return self.partition_count <= 1 or len(self.partitions) >= self.partition_count


def encode(payload: Payload) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8")
    raise TypeError(f"a payload is bytes or str, not {type(payload).__name__}: "
                    f"pass str({payload!r}) for a number")


def milliseconds(seconds: Optional[float], what: str) -> int:
    """A duration in seconds (float) as the API's milliseconds; None is 0 (the default)."""
    if seconds is None:
        return 0
    if (not isinstance(seconds, (int, float)) or math.isnan(seconds) or math.isinf(seconds)
            or seconds < 0):
        raise ValueError(f"{what} must be a number of seconds, 0 or more, not {seconds!r}")
    return int(round(seconds * 1000))


@dataclass(frozen=True)
class SubmitOptions:
    """What every task of a submit carries besides its payload."""

    kind: str
    queue: str = ""
    priority: int = 0
    delay_ms: int = 0
    timeout_ms: int = 0
    max_attempts: int = 0
    key: Optional[str] = None
    labels: Mapping[str, str] = field(default_factory=dict)
    batch_size: int = DEFAULT_BATCH_SIZE
    batch_bytes: int = DEFAULT_BATCH_BYTES

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError("kind must be a non-empty str (the handler's name)")
        if not 1 <= self.batch_size <= 100_000:
            raise ValueError(f"batch_size must be 1 to 100000, not {self.batch_size}")


def make_options(kind: str, queue: str, priority: int, delay: Optional[float],
                 timeout: Optional[float], max_attempts: int, key: Optional[str],
                 labels: Optional[Mapping[str, str]], batch_size: int) -> SubmitOptions:
    return SubmitOptions(kind=kind, queue=queue, priority=priority,
                         delay_ms=milliseconds(delay, "delay"),
                         timeout_ms=milliseconds(timeout, "timeout"), max_attempts=max_attempts,
                         key=key, labels=dict(labels or {}), batch_size=batch_size)


_END = object()  # the end of a submit's payloads (None is a payload, and refused as one)


class SubmitPlan:
    """The calls of one submit: the first opens the job (left open when more payloads follow);
    each later one names the job and its batch number, and the one that reaches the end closes
    the job. A batch goes as soon as it is full: one payload is read ahead, to know whether
    another follows. Keyed tasks (key/0, key/1 ...; a lone task takes the key as it is) are
    resubmitted as a whole, so they must fit one call."""

    def __init__(self, options: SubmitOptions, payloads: Iterable[Payload]) -> None:
        if isinstance(payloads, (bytes, str)):
            raise TypeError("payloads is a list (or any iterable) of payloads; wrap a single one "
                            "in a list")
        self._options = options
        self._labels = dict(options.labels)
        self._it = iter(payloads)
        self._ahead: List[Any] = []
        self._index = 0
        self.number = 0  # of the latest batch made
        self.ended = False

    def first(self) -> pb.SubmitRequest:
        request = self._batch()
        if not request.tasks:
            raise errors.InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, "no payloads to submit")
        if self._options.key is not None:
            if not self.ended:
                raise ValueError(f"key= covers at most batch_size ({self._options.batch_size}) "
                                 "payloads: a job of several calls cannot be resubmitted by key")
            if len(request.tasks) == 1:
                request.tasks[0].idempotency_key = self._options.key
        request.keep_open = not self.ended
        return request

    def next(self, job_id: str) -> Optional[pb.SubmitRequest]:
        """The next batch of job `job_id`, or None once the job is closed."""
        if self.ended:
            return None
        request = self._batch()
        self.number += 1
        request.job_id = job_id
        request.batch = self.number
        request.keep_open = not self.ended
        return request

    @staticmethod
    def closing(job_id: str, number: int) -> pb.SubmitRequest:
        """An empty call that closes the job as it is, as batch `number`."""
        return pb.SubmitRequest(job_id=job_id, batch=number)

    def _batch(self) -> pb.SubmitRequest:
        options = self._options
        request = pb.SubmitRequest()
        size = 0
        while len(request.tasks) < options.batch_size and size < options.batch_bytes:
            payload = self._ahead.pop() if self._ahead else next(self._it, _END)
            if payload is _END:
                break
            data = encode(payload)
            spec = request.tasks.add(queue=options.queue, kind=options.kind, payload=data,
                                     priority=options.priority, delay_ms=options.delay_ms,
                                     timeout_ms=options.timeout_ms,
                                     max_attempts=options.max_attempts)
            if self._labels:
                spec.labels.update(self._labels)
            if options.key is not None:
                spec.idempotency_key = f"{options.key}/{self._index}"
            self._index += 1
            size += spec.ByteSize()  # labels, kind and queue repeat in every task
        if not self._ahead:  # whether another payload follows
            self._ahead.extend(itertools.islice(self._it, 1))
        self.ended = not self._ahead
        return request


def progress_of(p: pb.TaskProgress) -> Progress:
    return Progress(p.task_id, p.done, p.total, p.message, p.updated_ms)


def result_of(t: pb.TaskInfo) -> Result:
    return Result(t.id, t.job_id, STATE_NAMES.get(t.state, str(t.state)), t.output, t.error,
                  t.attempts, t.kind, t.queue, t.worker, t.finished_ms)


def task_of(t: pb.TaskInfo) -> TaskInfo:
    return TaskInfo(t.id, t.job_id, STATE_NAMES.get(t.state, str(t.state)), t.output, t.error,
                    t.attempts, t.kind, t.queue, t.worker, t.finished_ms, t.payload,
                    t.max_attempts, t.priority, t.waiting_for, t.created_ms,
                    progress_of(t.progress) if t.HasField("progress") else None)


def status_of(j: pb.JobInfo) -> JobStatus:
    return JobStatus(j.job_id, j.total, j.done, j.succeeded, j.dead, j.cancelled, j.open,
                     [progress_of(p) for p in j.running])


def worker_of(w: pb.WorkerInfo) -> WorkerInfo:
    return WorkerInfo(w.worker_id, w.name, w.host, list(w.kinds), list(w.queues), dict(w.labels),
                      w.slots, w.running, w.connected, w.draining, w.stuck)


def stats_of(s: pb.StatsResponse) -> Stats:
    return Stats([QueueStats(q.queue, q.pending, q.leased, q.succeeded, q.failed, q.dead,
                             q.cancelled) for q in s.queues],
                 [worker_of(w) for w in s.workers], s.duplicate_results, list(s.partitions),
                 s.partition_count)


def _merge_workers(into: Any, workers: Any) -> None:
    # A worker holds a stream to each partition: shown once (the rules of the master's own
    # merge, BrokerSet).
    by_id = {w.worker_id: w for w in into}
    for w in workers:
        m = by_id.get(w.worker_id)
        if m is None:
            into.add().CopyFrom(w)
            continue
        m.running += w.running
        m.stuck += w.stuck  # each stream counts its own partition's
        m.connected = m.connected or w.connected
        m.draining = m.draining or w.draining
        m.connected_ms = min(m.connected_ms, w.connected_ms)
        m.heartbeat_age_ms = min(m.heartbeat_age_ms, w.heartbeat_age_ms)
        m.silent = m.silent and w.silent
    into.sort(key=lambda w: w.worker_id)


_SUMMED_QUEUE_FIELDS = ("pending", "leased", "succeeded", "failed", "dead", "cancelled", "delayed",
                        "submitted", "retried", "redelivered")


def _merge_stats(into: pb.StatsResponse, other: pb.StatsResponse) -> None:
    by_name = {q.queue: q for q in into.queues}
    for q in other.queues:
        m = by_name.get(q.queue)
        if m is None:
            into.queues.add().CopyFrom(q)
            continue
        for name in _SUMMED_QUEUE_FIELDS:
            setattr(m, name, getattr(m, name) + getattr(q, name))
        m.oldest_ready_age_ms = max(m.oldest_ready_age_ms, q.oldest_ready_age_ms)
    into.queues.sort(key=lambda q: q.queue)
    _merge_workers(into.workers, other.workers)
    into.duplicate_results += other.duplicate_results


class EveryPartition:
    """Stats or Workers over every partition of the queues: the first answer names the masters
    serving the partitions it does not count; each is asked once (no more masters than
    partitions), and answers that count new partitions are merged, as the C++ client does. An
    answer repeating a partition counted already (one being handed over) is left out."""

    def __init__(self, first: Any, asked: str) -> None:
        self.merged = first
        # What masters say is bounded before it steers the walk (common/partition.h).
        self._count = min(first.partition_count, _conn.MAX_PARTITIONS)
        self._counted = {p for p in first.partitions if 0 <= p < self._count}
        self._to_ask = deque(first.other_masters[:self._count])
        self._asked = {asked}
        self._unreachable: List[str] = []

    def next(self) -> Optional[str]:
        """The next master to ask; None once done."""
        while (self._to_ask and len(self._counted) < self._count
               and len(self._asked) <= self._count):
            address = self._to_ask.popleft()
            if address not in self._asked:
                self._asked.add(address)
                return address
        m = self.merged
        del m.partitions[:]
        m.partitions.extend(sorted(self._counted))
        del m.other_masters[:]
        m.other_masters.extend(self._unreachable)
        return None

    def add(self, address: str, answer: Any) -> None:
        """`address`'s answer; None when it could not be asked."""
        if answer is None:
            self._unreachable.append(address)
            return
        self._to_ask.extend(answer.other_masters[:max(0, self._count - len(self._to_ask))])
        if any(not 0 <= p < self._count or p in self._counted for p in answer.partitions):
            return
        if isinstance(answer, pb.StatsResponse):
            _merge_stats(self.merged, answer)
        else:
            _merge_workers(self.merged.workers, answer.workers)
        self._counted.update(answer.partitions)


class Backoff:
    """Jittered exponential delays between attempts to reach a master again."""

    def __init__(self) -> None:
        self._next = RECONNECT_INITIAL_S

    def reset(self) -> None:
        self._next = RECONNECT_INITIAL_S

    def next(self) -> float:
        delay = self._next * random.uniform(0.5, 1.0)
        self._next = min(RECONNECT_MAX_S, self._next * 2)
        return delay


def retry_pause(code: grpc.StatusCode, deadline: float, backoff: Backoff) -> Optional[float]:
    """How long to wait before sending a batch again after `code`; None: give up."""
    if code not in RETRYABLE or time.monotonic() >= deadline:
        return None
    return backoff.next()


class Follow:
    """Following a job's results across streams: how many were seen (a new stream starts after
    them, so each result comes once), whether the job is complete, and what to do when a stream
    ends: follow again after a pause, or raise what to tell the user."""

    def __init__(self, job_id: str, address: str, timeout: Optional[float],
                 reconnect_timeout: float) -> None:
        self.job_id = job_id
        self.address = address
        self.seen = 0
        self.complete = False
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._reconnect_timeout = reconnect_timeout
        # Since when the master has been lost: a stream's first event comes at once, so a job
        # that is merely quiet (long tasks, no results for a while) never counts as lost.
        self._lost_since: Optional[float] = None
        self._lost_master = False
        self._backoff = Backoff()

    def request(self) -> pb.WatchJobRequest:
        return pb.WatchJobRequest(job_id=self.job_id, after=self.seen)

    def remaining(self) -> Optional[float]:
        """Seconds left for the stream to run (its gRPC timeout)."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def on_event(self, event: pb.JobEvent) -> List[Result]:
        self._lost_since = None
        self._backoff.reset()
        results = [result_of(t) for t in event.results]
        self.seen += len(results)
        p = event.progress
        self.complete = not p.open and p.done == p.total and self.seen >= p.done
        return results

    def on_end(self, code: Optional[grpc.StatusCode], details: str) -> float:
        """A stream ended (`code` None: it ended OK) before the job was complete: the pause
        before following again, or raises the error to give the user."""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and self._deadline is not None:
            raise TimeoutError(f"job {self.job_id} did not complete within {self._timeout} s")
        if code == grpc.StatusCode.NOT_FOUND and self._lost_master:
            raise errors.NotFound(code, f"the master came back without job {self.job_id} (a "
                                        "master on the memory store forgets everything when it "
                                        "restarts)", self.address)
        # OK: the master ended the stream as it shut down.
        if code is not None and code not in (grpc.StatusCode.UNAVAILABLE,
                                             grpc.StatusCode.CANCELLED):
            raise errors.error_for(code, details or code.name, self.address)
        self._lost_master = True
        now = time.monotonic()
        if self._lost_since is None:
            self._lost_since = now
        if now - self._lost_since > self._reconnect_timeout:
            raise errors.Unavailable(
                grpc.StatusCode.UNAVAILABLE,
                f"lost the master at {self.address} for over {self._reconnect_timeout:.0f} s "
                f"while following {self.job_id}", self.address)
        pause = self._backoff.next()
        if self._deadline is not None and time.monotonic() + pause >= self._deadline:
            raise TimeoutError(f"job {self.job_id} did not complete within {self._timeout} s")
        return pause
