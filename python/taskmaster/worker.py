"""Write taskmaster handlers in Python and run them in a worker process.

    from taskmaster.worker import TaskContext, Worker

    worker = Worker("master.example:7070", token_file="/etc/taskmaster/work.token")

    @worker.handler("square", pool="process")   # CPU-bound: a process pool
    def square(payload: bytes) -> str:
        n = int(payload)
        return "%d*%d=%d" % (n, n, n * n)

    @worker.handler("fetch")                    # I/O-bound: the thread pool (the default)
    def fetch(payload: bytes, ctx: TaskContext) -> bytes:
        ctx.progress(0, 1, "fetching")
        ...

    if __name__ == "__main__":
        worker.run()    # until SIGTERM or SIGINT (or worker.stop()), which drain it

A handler takes the payload (bytes), and a TaskContext when it takes a second argument. It
returns the task's output: bytes, str (sent as UTF-8) or None (empty). An exception fails the
attempt (the master retries it while attempts remain) with the exception's text; PermanentError
fails the task for good.

Each pool holds its own stream to the master, as the C++ worker's pools do: a worker with
thread and process handlers shows as two workers, "NAME/thread" and "NAME/process". When the
queues are split into partitions (several masters on PostgreSQL, each serving some), each pool
holds a stream for every partition, to the master serving it, and runs the tasks of all. The
stream protocol (credits and prefetch, heartbeats, leases, results kept until acknowledged and sent
again after a reconnect, cancels, drain) is the C++ worker's: see docs/api.md.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import (Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar,
                    Union)

from . import _conn
from ._worker_pools import ProcessPool, ThreadPool
from ._worker_session import Identity, Session
from ._worker_slots import Feed, Partitions, SharedCredits, Slots, SlotsOptions
from ._worker_task import Handler, PermanentError, TaskContext, takes_context
from ._worker_wire import RESULT_OVERHEAD_BYTES
from .errors import InvalidArgument

__all__ = ["Worker", "TaskContext", "PermanentError", "THREAD", "PROCESS"]

log = logging.getLogger("taskmaster.worker")

THREAD = "thread"
PROCESS = "process"

F = TypeVar("F", bound=Callable[..., Any])

# Kind and queue names, as the master accepts them.
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
# Hello limits the master enforces (docs/api.md, Connect).
_MAX_ID_BYTES = 255
_MAX_SLOTS = 100000
_MAX_QUEUES = 1000
_MAX_LABELS = 64
_MAX_LABEL_VALUE_BYTES = 256
# A worker holds at most threads + prefetch tasks, and a hello lists at most 100,000.
_MAX_PREFETCH = 50000
# Random bytes in a worker's id after its name: two processes of one name never share an id.
_WORKER_ID_RANDOM_BYTES = 6
# How long the session and pool threads may take to end once stopped, and how long process
# handlers that ignore their stop may run on before their processes are killed.
_CLOSE_TIMEOUT = 5.0
# How often run() looks for a signal (its handler only counts it: taking a lock in a signal
# handler could deadlock against the code it interrupted).
_SIGNAL_POLL = 0.1


class Worker:
    """A worker process's handlers, and their pools and streams to the master.

    Thread-safe: handler() before run(), run() once, stop() from any thread or signal.
    """

    def __init__(self, address: Optional[str] = None, *, token: Optional[str] = None,
                 token_file: Optional[str] = None, tls: Union[_conn.TLS, str, None] = None,
                 queues: Optional[Sequence[str]] = None,
                 labels: Optional[Mapping[str, str]] = None, name: Optional[str] = None,
                 threads: Optional[int] = None, processes: Optional[int] = None,
                 prefetch: Optional[int] = None, prefetch_max: int = 2000,
                 prefetch_window: float = 0.02, mp_context: Optional[str] = None,
                 drain_timeout: float = 30.0, progress_interval: float = 0.5,
                 reconnect_max: float = 10.0,
                 max_message_bytes: int = _conn.DEFAULT_MAX_MESSAGE_BYTES) -> None:
        """
        address: the master's host:port (default: $TASKMASTER_ADDR).
        token, token_file: a `work` (or `admin`) token, or the file holding it (default:
            $TASKMASTER_TOKEN).
        tls: a TLS(ca_file, cert_file, key_file), or a CA file's path; None: plaintext.
        queues: the queues to take tasks from (default: ["default"]).
        labels: labels this worker carries; tasks that require labels go to workers that have
            them all.
        name: shown in the master's worker list (default: HOSTNAME-PID).
        threads: threads of the thread pool (default: min(32, CPUs + 4)).
        processes: processes of the process pool (default: the CPUs), started only when a
            handler is registered with pool="process".
        prefetch: tasks each pool holds beyond those it runs; None (the default): adaptive,
            enough for `prefetch_window` seconds of work judged from how long tasks take, at
            most `prefetch_max`.
        mp_context: how pool processes start: "fork" (the default: they inherit the handlers),
            "forkserver" or "spawn" (handlers must then be importable module-level
            functions, and the script guarded by `if __name__ == "__main__"`).
        drain_timeout: on stop, seconds running tasks may take to finish before the worker
            leaves them for the master to requeue.
        progress_interval: handlers' progress reaches the master at most this often (seconds).
        reconnect_max: the longest wait between attempts to reach the master (seconds).
        max_message_bytes: the largest gRPC message either way (as the master's).

        Raises ValueError or TypeError for an argument out of range or of the wrong type.
        """
        try:
            conn = _conn.resolve(address, token, token_file, tls, max_message_bytes)
            conn.credentials()  # unreadable TLS files fail here, not in every reconnect
        except InvalidArgument as e:
            raise ValueError(e.message) from None
        if mp_context is not None and mp_context not in multiprocessing.get_all_start_methods():
            raise ValueError(f"mp_context must be one of "
                             f"{multiprocessing.get_all_start_methods()}, not {mp_context!r}")
        host = socket.gethostname()
        self._settings = _Settings(
            conn=conn, host=host,
            name=_check_text("name", name) if name is not None else f"{host}-{os.getpid()}",
            queues=_check_queues(queues), labels=_check_labels(labels),
            threads=(_check_int("threads", threads, 1, _MAX_SLOTS) if threads is not None
                     else min(32, (os.cpu_count() or 1) + 4)),
            processes=(_check_int("processes", processes, 1, _MAX_SLOTS)
                       if processes is not None else os.cpu_count() or 1),
            prefetch=(_check_int("prefetch", prefetch, 0, _MAX_PREFETCH)
                      if prefetch is not None else None),
            prefetch_max=_check_int("prefetch_max", prefetch_max, 0, _MAX_PREFETCH),
            prefetch_window=_check_seconds("prefetch_window", prefetch_window, positive=True),
            mp_context=mp_context,
            drain_timeout=_check_seconds("drain_timeout", drain_timeout, positive=False),
            progress_interval=_check_seconds("progress_interval", progress_interval,
                                             positive=True),
            reconnect_max=_check_seconds("reconnect_max", reconnect_max, positive=True),
            max_output=max(0, conn.max_message_bytes - RESULT_OVERHEAD_BYTES))
        self._worker_id = f"{self._settings.name}-{secrets.token_hex(_WORKER_ID_RANDOM_BYTES)}"
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # Guarded by _lock: kind -> handler; run() was called; stop() was; why the worker must
        # stop at once (a refusal by the master, a dead process pool).
        self._handlers: Dict[str, Handler] = {}
        self._started = False
        self._stop_requested = False
        self._fatal: Optional[BaseException] = None
        # Signals received while run() waits: written by the signal handler, read by run() (an
        # int's update is atomic under the GIL, and the handler takes no lock).
        self._signals = 0
        self._last_signal = 0

    @property
    def worker_id(self) -> str:
        """This worker's id at the master, stable for the process (pools add "/thread" or
        "/process" when there are two)."""
        return self._worker_id

    @property
    def name(self) -> str:
        return self._settings.name

    @property
    def kinds(self) -> List[str]:
        """The kinds registered so far, sorted."""
        with self._lock:
            return sorted(self._handlers)

    def handler(self, kind: str, *, pool: str = THREAD) -> Callable[[F], F]:
        """Registers the decorated function as the handler of `kind`, run by the thread pool
        (pool="thread", the default: I/O-bound work) or by the process pool (pool="process":
        CPU-bound work, which threads cannot run in parallel under the GIL). The function is
        returned as it is. Raises ValueError for a malformed or already registered kind."""
        if not isinstance(kind, str) or not _NAME.match(kind):
            raise ValueError(f"kind must match [A-Za-z0-9_.-]{{1,64}}, not {kind!r}")
        if pool not in (THREAD, PROCESS):
            raise ValueError(f"pool must be {THREAD!r} or {PROCESS!r}, not {pool!r}")

        def register(fn: F) -> F:
            if not callable(fn):
                raise TypeError(f"the handler of {kind!r} must be callable, not {fn!r}")
            entry = Handler(fn, takes_context(fn), pool)
            with self._lock:
                if self._started:
                    raise RuntimeError("handlers must be registered before run()")
                if kind in self._handlers:
                    raise ValueError(f"kind {kind!r} is registered twice")
                self._handlers[kind] = entry
            return fn

        return register

    def stop(self) -> None:
        """Asks the worker to drain: no more tasks, queued ones given back, running ones
        finished (up to drain_timeout), their results delivered; run() then returns. Returns at
        once; callable from any thread."""
        with self._lock:
            self._stop_requested = True
            self._changed.notify_all()

    def run(self) -> None:
        """Runs the worker until stop(), SIGTERM or SIGINT (which drain it; a second signal
        stops it at once), then returns. Signal handlers are installed only when called from the
        main thread. Process pools start here, before any connection to the master.

        Raises taskmaster.errors.Unauthenticated or PermissionDenied when the master refuses
        the token (it is not retried), ValueError when no handler is registered, and
        RuntimeError when every process of the process pool died or run() was called before.
        """
        with self._lock:
            if self._started:
                raise RuntimeError("run() was called already: a Worker runs once")
            if not self._handlers:
                raise ValueError("no handler registered: decorate one with @worker.handler(kind)")
            self._started = True
            handlers = dict(self._handlers)
        lanes = self._make_lanes(handlers)
        previous = self._install_signal_handlers()
        try:
            for lane in lanes:
                lane.start()
            self._wait(lanes)
        finally:
            for lane in lanes:
                lane.abort()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            log.info("worker %s stopped", self._settings.name)
        with self._lock:
            fatal = self._fatal
        if fatal is not None:
            raise fatal

    def _make_lanes(self, handlers: Dict[str, Handler]) -> List["_Lane"]:
        # Process pools first: their processes must fork before any gRPC channel exists.
        pools = sorted({h.pool for h in handlers.values()}, key=lambda p: p != PROCESS)
        one = len(pools) == 1
        name = self._settings.name
        lanes: List[_Lane] = []
        try:
            for pool in pools:
                lanes.append(_Lane(
                    self._settings, pool, {k: h for k, h in handlers.items() if h.pool == pool},
                    worker_id=self._worker_id if one else f"{self._worker_id}/{pool}",
                    name=name if one else f"{name}/{pool}", on_fatal=self._fail))
        except BaseException:
            for lane in lanes:
                lane.abort()
            raise
        return lanes

    def _install_signal_handlers(self) -> Dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._last_signal = signum
        self._signals += 1

    def _fail(self, error: BaseException) -> None:
        # The worker cannot go on: run() stops it and raises `error`.
        with self._lock:
            if self._fatal is None:
                self._fatal = error
            self._changed.notify_all()

    def _wait(self, lanes: List["_Lane"]) -> None:
        # Waits for a stop, drains the lanes on a thread of their own (so that a second signal
        # finds this thread free to stop them at once), and returns once they drained.
        drainer: Optional[threading.Thread] = None
        signals_seen = 0
        while drainer is None or drainer.is_alive():
            with self._lock:
                self._changed.wait(_SIGNAL_POLL)
                stop, fatal = self._stop_requested, self._fatal
            signals = self._signals
            if signals > signals_seen:
                signals_seen = signals
                name = signal.Signals(self._last_signal).name
                if signals > 1:
                    log.warning("%s again: stopping without waiting for running tasks", name)
                    return
                log.info("%s: draining", name)
            if fatal is not None:
                return
            if (stop or signals) and drainer is None:
                drainer = threading.Thread(target=self._drain, args=(lanes,),
                                           name="taskmaster-drain", daemon=True)
                drainer.start()

    def _drain(self, lanes: List["_Lane"]) -> None:
        deadline = time.monotonic() + self._settings.drain_timeout
        # Every pool drains at once, so that the drain takes the timeout once, not per pool.
        threads = [threading.Thread(target=lane.drain, args=(deadline,), daemon=True)
                   for lane in lanes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


@dataclass(frozen=True)
class _Settings:
    """A worker's checked arguments (see Worker.__init__), for its lanes."""

    conn: _conn.Connection
    host: str
    name: str
    queues: List[str]
    labels: Dict[str, str]
    threads: int
    processes: int
    prefetch: Optional[int]
    prefetch_max: int
    prefetch_window: float
    mp_context: Optional[str]
    drain_timeout: float
    progress_interval: float
    reconnect_max: float
    max_output: int  # bytes of output a result may carry


class _Lane:
    """One pool of the worker, with an accounting and a stream to the master for each partition
    of the queues (a welcome says how many there are). It shows as a worker of its own serving
    only its kinds: separate streams keep each pool's credits and prefetch apart without the
    master knowing of pools."""

    def __init__(self, settings: _Settings, pool: str, handlers: Dict[str, Handler],
                 worker_id: str, name: str, on_fatal: Callable[[BaseException], None]) -> None:
        """Starts the pool's processes, if it has any: before any gRPC channel exists."""
        s = settings
        self._settings = settings
        self._worker_id = worker_id
        self._on_fatal = on_fatal
        self.name = name
        self.pool = pool
        self.kinds = sorted(handlers)
        self.size = s.processes if pool == PROCESS else s.threads
        self.process_pool: Optional[ProcessPool] = None
        self.thread_pool: Optional[ThreadPool] = None
        self.slots = Partitions(Feed(), self.size)
        self._credits = SharedCredits()
        if pool == PROCESS:
            self.process_pool = ProcessPool(handlers, self.size, s.mp_context, s.max_output,
                                            name, s.progress_interval,
                                            lambda why: on_fatal(RuntimeError(why)))
            self.process_pool.start()
            self.process_pool.attach(self.slots)
        else:
            self.thread_pool = ThreadPool(self.slots, handlers, self.size, s.max_output, name)
        self._lock = threading.Lock()
        # Guarded by _lock: a session for each partition's accounting, in order; no partition
        # is added once the lane drains or stops.
        self._sessions: List[Session] = []
        self._closed = False

    def start(self) -> None:
        s = self._settings
        if self.thread_pool is not None:
            self.thread_pool.start()
        self._ensure_partitions(1)
        prefetch = (str(s.prefetch) if s.prefetch is not None
                    else f"adaptive up to {s.prefetch_max}")
        log.info("worker %s started: %d %s, prefetch %s, kinds [%s], master %s", self.name,
                 self.size, "processes" if self.pool == PROCESS else "threads", prefetch,
                 ",".join(self.kinds), s.conn.address)

    def _ensure_partitions(self, partitions: int) -> None:
        # The queues have `partitions` partitions (as a welcome said): an accounting and a
        # stream for each this lane lacks.
        s = self._settings
        with self._lock:
            if self._closed:
                return
            for p in range(len(self._sessions), min(partitions, _conn.MAX_PARTITIONS)):
                slots = Slots(SlotsOptions(
                    threads=self.size, prefetch=s.prefetch,
                    prefetch_max=s.prefetch_max, prefetch_window=s.prefetch_window,
                    progress_interval=s.progress_interval, stops=self.process_pool,
                    feed=self.slots.feed, shared_credits=self._credits, member=p,
                    on_room=self._top_up))
                self.slots.add(slots)
                # One watchdog polls the process pool, which reports for every partition.
                poll = self.process_pool.poll if self.process_pool and p == 0 else None
                session = Session(
                    s.conn, Identity(worker_id=self._worker_id, name=self.name, host=s.host,
                                     kinds=self.kinds, queues=s.queues, labels=s.labels,
                                     slots=self.size, partition=p,
                                     on_partitions=self._ensure_partitions),
                    slots, poll, s.reconnect_max, self._on_fatal)
                self._sessions.append(session)
                session.start()

    def _top_up(self) -> None:
        # Room for credits opened in one partition: whichever is held back takes it.
        for a in self.slots.all():
            a.top_up()

    def _close(self) -> List[Session]:
        # No partition is added after this.
        with self._lock:
            self._closed = True
            return list(self._sessions)

    def drain(self, deadline: float) -> None:
        self._close()
        accountings = self.slots.all()
        starts = [start for start in (a.start_drain() for a in accountings) if start is not None]
        if not starts:
            return
        log.info("%s draining: %d tasks given back, %d running (up to %.0f s)", self.name,
                 sum(given for given, _ in starts), sum(running for _, running in starts),
                 self._settings.drain_timeout)
        # Every partition's stream waits for its tasks and acknowledgements at once.
        left: List[Tuple[int, int]] = []
        waits = [threading.Thread(target=lambda a=a: left.append(a.finish_drain(deadline)),
                                  daemon=True) for a in accountings]
        for t in waits:
            t.start()
        for t in waits:
            t.join()
        unfinished, unacked = sum(u for u, _ in left), sum(a for _, a in left)
        if unfinished:
            log.warning("%s: drain timeout: left %d tasks unfinished for the master to requeue",
                        self.name, unfinished)
        if unacked:
            log.warning("%s: left with %d results the master had not acknowledged", self.name,
                        unacked)

    def abort(self) -> None:
        """Stops at once: handlers told to stop, the streams cancelled, threads and processes
        ended."""
        sessions = self._close()
        for a in self.slots.all():
            a.stop()
        self.slots.feed.close()
        for session in sessions:
            session.cancel()
        for session in sessions:
            session.join(_CLOSE_TIMEOUT)
        if self.thread_pool is not None:
            self.thread_pool.close(_CLOSE_TIMEOUT)
        if self.process_pool is not None:
            self.process_pool.close(_CLOSE_TIMEOUT)


def _check_int(what: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be in {low}..{high}, not {value}")
    return value


def _check_seconds(what: str, value: Any, positive: bool) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    if value < 0 or (positive and value == 0) or value != value:
        raise ValueError(f"{what} must be {'positive' if positive else 'at least 0'}, "
                         f"not {value}")
    return float(value)


def _utf8_size(what: str, value: str) -> int:
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: a protobuf string cannot carry it
        raise ValueError(f"{what} is not valid text: {value!r}") from None


def _check_text(what: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not 0 < _utf8_size(what, value) <= _MAX_ID_BYTES:
        raise ValueError(f"{what} must be 1 to {_MAX_ID_BYTES} bytes, not {value!r}")
    return value


def _check_queues(queues: Optional[Sequence[str]]) -> List[str]:
    if queues is None:
        return ["default"]
    if isinstance(queues, str):
        raise TypeError("queues must be a list of queue names, not a str")
    names = list(queues)
    if not names or len(names) > _MAX_QUEUES:
        raise ValueError(f"queues must name 1 to {_MAX_QUEUES} queues")
    for q in names:
        if not isinstance(q, str) or not _NAME.match(q):
            raise ValueError(f"queue names must match [A-Za-z0-9_.-]{{1,64}}, not {q!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"queues lists a queue twice: {names}")
    return names


def _check_labels(labels: Optional[Mapping[str, str]]) -> Dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise TypeError(f"labels must be a mapping of str to str, not {type(labels).__name__}")
    if len(labels) > _MAX_LABELS:
        raise ValueError(f"at most {_MAX_LABELS} labels, not {len(labels)}")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"labels must map str to str, not {key!r}: {value!r}")
        if not _utf8_size("a label key", key):
            raise ValueError("a label key is empty")
        if _utf8_size(f"label {key!r}", value) > _MAX_LABEL_VALUE_BYTES:
            raise ValueError(f"label {key!r}: its value is over {_MAX_LABEL_VALUE_BYTES} bytes")
    return dict(labels)
