"""The worker's pools: threads for I/O-bound handlers, processes for CPU-bound ones (the GIL lets
one thread run Python at a time).

The process pool is built for throughput: tasks go to its processes in chunks (plain tuples,
one pipe message per chunk), each process runs a chunk and sends its results back in one
message, already encoded for the wire (_worker_wire), so the worker's main process spends a
few dict operations per task. Cancels reach running processes through shared memory: a ring of
(task id, attempt) the worker writes and every process reads before each task and whenever a
handler asks.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import signal
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from ._worker_slots import Partitions, Result, Slots, Task, partition_of
from ._worker_task import Handler, run_task
from ._worker_wire import CANCELLED, FAILED, RETURNED, encode_result

log = logging.getLogger("taskmaster.worker")

# A pool process sends the results it has after a task once this long has passed since it last
# sent any: short tasks go back a chunk at a time, long ones one by one.
_RESULTS_FLUSH = 0.005
# Chunks hold about this much work (judged from how long tasks take), within _MAX_CHUNK tasks:
# large enough that a pipe message per chunk costs little per task, small enough that the
# processes share the work evenly.
_CHUNK_WINDOW = 0.005
_MAX_CHUNK = 256
# Cancelled task ids the ring keeps: a process that lags this many cancels behind misses some
# (their handlers run to the end; the master keeps the cancel either way).
_RING_SIZE = 4096
# How often a process handler waiting on ctx.cancel_event looks at the ring.
_CANCEL_POLL = 0.01
# prctl(PR_SET_PDEATHSIG): a pool process dies with the worker, even one stuck in a handler.
_PR_SET_PDEATHSIG = 1


class ThreadPool:
    """`threads` threads, each running one task at a time from the partitions' accountings."""

    def __init__(self, slots: Partitions, handlers: Dict[str, Handler], threads: int,
                 max_output: int, worker_name: str) -> None:
        self._slots = slots
        self._handlers = handlers
        self._max_output = max_output
        self._worker_name = worker_name
        self._threads = [threading.Thread(target=self._loop, name=f"taskmaster-thread-{i}",
                                          daemon=True) for i in range(threads)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def close(self, timeout: float) -> None:
        """Waits up to `timeout` seconds for the threads, which exit once the feed closed; a
        handler that ignores its stop keeps its (daemon) thread."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.ident is not None:  # started
                t.join(max(0.0, deadline - time.monotonic()))
        busy = sum(t.is_alive() for t in self._threads)
        if busy:
            log.warning("%d thread handlers did not return after being told to stop; "
                        "leaving them behind", busy)

    def _loop(self) -> None:
        partitions, handlers = self._slots, self._handlers
        feed = partitions.feed
        while True:
            seen = feed.ticks()
            taken = partitions.take_one()
            if taken is None:
                if not feed.wait(seen):
                    return
                continue
            slots, task, stop = taken
            began = time.monotonic()
            outcome, encoded = run_task(handlers.get(task[2]), task, stop, slots.report_progress,
                                        self._max_output, self._worker_name)
            slots.finish([(task, (task[0], task[1], outcome, encoded))],
                         time.monotonic() - began)


class _CancelRing:
    """Tasks (id, attempt) the pool's processes must stop, in shared memory: entries
    [start, count) of a ring, the latest _RING_SIZE at most. The worker writes (the accountings
    of every partition, one at a time: the pool's ring lock), processes read; `edits` counts
    entries rewritten in place, so that readers read the ring again."""

    def __init__(self, ctx: Any) -> None:
        self.ids = ctx.RawArray(ctypes.c_uint64, _RING_SIZE)
        self.attempts = ctx.RawArray(ctypes.c_int32, _RING_SIZE)
        self.count = ctx.RawValue(ctypes.c_uint64, 0)
        self.start = ctx.RawValue(ctypes.c_uint64, 0)
        self.edits = ctx.RawValue(ctypes.c_uint64, 0)

    def add(self, task_id: int, attempt: int) -> None:
        n = self.count.value
        self.ids[n % _RING_SIZE] = task_id
        self.attempts[n % _RING_SIZE] = attempt
        # The entry is in place before the count says so (x86 and ARM keep this order for the
        # readers' loads of aligned words they see after the count).
        self.count.value = n + 1

    def forget(self, partition: int) -> None:
        """Drops the entries of `partition`'s tasks (id 0 names no task)."""
        start, n = self.start.value, self.count.value
        for i in range(max(start, n - _RING_SIZE), n):
            if partition_of(self.ids[i % _RING_SIZE]) == partition:
                self.ids[i % _RING_SIZE] = 0
        self.edits.value += 1


class _CancelView:
    """A pool process's view of the ring: read again only when the ring changed."""

    def __init__(self, ring: _CancelRing) -> None:
        self._ring = ring
        # ((start, count, edits) when read, the tasks stopped then): one attribute, replaced
        # whole, so that a handler's own threads asking at once never see halves of two reads.
        self._view: Tuple[Tuple[int, int, int], frozenset] = ((0, 0, 0), frozenset())

    def __contains__(self, task: Tuple[int, int]) -> bool:
        ring = self._ring
        seen = (ring.start.value, ring.count.value, ring.edits.value)
        view = self._view
        if seen != view[0]:
            start, n, _ = seen
            ids, attempts = ring.ids, ring.attempts
            view = (seen, frozenset((ids[i % _RING_SIZE], attempts[i % _RING_SIZE])
                                    for i in range(max(start, n - _RING_SIZE), n)))
            self._view = view
        return task in view[1]


class _ProcessStop:
    """A process handler's stop signal, with threading.Event's is_set() and wait()."""

    __slots__ = ("_view", "_task")

    def __init__(self, view: _CancelView, task: Tuple[int, int]) -> None:
        self._view = view
        self._task = task  # (id, attempt)

    def is_set(self) -> bool:
        return self._task in self._view

    def wait(self, timeout: Optional[float] = None) -> bool:
        until = None if timeout is None else time.monotonic() + timeout
        while self._task not in self._view:
            left = _CANCEL_POLL if until is None else min(_CANCEL_POLL, until - time.monotonic())
            if left <= 0:
                return False
            time.sleep(left)
        return True


class _Sender:
    """A pool process's messages to the worker: results, and progress reports at most one
    message per interval (the latest of each task; a timer sends what waits)."""

    def __init__(self, conn: multiprocessing.connection.Connection, interval: float) -> None:
        self._conn = conn
        self._interval = interval
        self._lock = threading.Lock()
        # Guarded by _lock: reports not sent yet, by task; when the next may go; its timer.
        self._pending: Dict[int, Tuple[int, int, int, int, str]] = {}
        self._next = 0.0
        self._timer: Optional[threading.Timer] = None

    def send(self, message: Tuple[Any, ...]) -> None:
        with self._lock:
            self._conn.send(message)

    def progress(self, task_id: int, attempt: int, done: int, total: int, message: str) -> None:
        with self._lock:
            self._pending[task_id] = (task_id, attempt, done, total, message)
            now = time.monotonic()
            if now >= self._next:
                self._flush_locked(now)
            elif self._timer is None:
                self._timer = threading.Timer(self._next - now, self._on_timer)
                self._timer.daemon = True
                self._timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            if self._pending:
                self._flush_locked(time.monotonic())

    def _flush_locked(self, now: float) -> None:
        self._conn.send(("p", list(self._pending.values())))
        self._pending.clear()
        self._next = now + self._interval


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass  # no prctl: the pipe's end still stops an idle process


def _process_main(handlers: Dict[str, Handler], tasks: multiprocessing.connection.Connection,
                  results: multiprocessing.connection.Connection,
                  inherited: List[multiprocessing.connection.Connection], ring: _CancelRing,
                  current_id: Any, current_start: Any, max_output: int, worker_name: str,
                  progress_interval: float) -> None:
    """A pool process: runs the chunks of tasks it receives until told to stop (None) or its
    worker goes away."""
    # The worker drains on SIGTERM and SIGINT and stops its processes itself; a terminal's ^C
    # or a service manager's SIGTERM to the whole group must not kill a handler mid-task.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    for conn in inherited:  # the worker's ends of earlier processes' pipes, copied by fork
        conn.close()
    cancels = _CancelView(ring)
    out = _Sender(results, progress_interval)
    monotonic = time.monotonic
    while True:
        try:
            chunk = tasks.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        batch: List[Result] = []
        last = monotonic()
        for task in chunk:
            task_id, attempt = key = task[0], task[1]
            if key in cancels:
                batch.append((task_id, attempt, CANCELLED,
                              encode_result(task_id, attempt, CANCELLED, error="cancelled")))
                continue
            current_start.value = monotonic()
            current_id.value = task_id
            outcome, encoded = run_task(handlers.get(task[2]), task, _ProcessStop(cancels, key),
                                        out.progress, max_output, worker_name)
            current_id.value = 0
            batch.append((task_id, attempt, outcome, encoded))
            now = monotonic()
            if now - last >= _RESULTS_FLUSH:
                out.send(("r", batch, now - last))
                batch, last = [], now
        if batch:
            out.send(("r", batch, monotonic() - last))


def _finish(done: List[Tuple[Tuple[Slots, Task], Result]], busy: Optional[float]) -> None:
    """Slots.finish for tasks taken from several accountings: each result goes back to the one
    its task came from, with `busy` shared out by count."""
    by_accounting: Dict[int, Tuple[Slots, List[Tuple[Task, Result]]]] = {}
    for (accounting, task), r in done:
        by_accounting.setdefault(id(accounting), (accounting, []))[1].append((task, r))
    for accounting, part in by_accounting.values():
        accounting.finish(part, None if busy is None else busy * len(part) / len(done))


def _returned(task: Task) -> Result:
    return task[0], task[1], RETURNED, encode_result(task[0], task[1], RETURNED)


class _Process:
    """The worker's side of one pool process."""

    def __init__(self, index: int, process: Any, tasks: multiprocessing.connection.Connection,
                 results: multiprocessing.connection.Connection, current_id: Any,
                 current_start: Any) -> None:
        self.index = index
        self.process = process
        self.tasks = tasks          # the worker writes chunks (the dispatcher only)
        self.results = results      # the worker reads results (the collector only)
        self.current_id = current_id        # the task its handler runs now; 0: none
        self.current_start = current_start  # when that handler started (monotonic)
        # Guarded by ProcessPool._lock: tasks sent, in order, with the accounting each came
        # from, whose results have not come back (a process answers every task of its chunks, in
        # order); whether it runs.
        self.inflight: Deque[Tuple[Slots, Task]] = deque()
        self.alive = True


class ProcessPool:
    """`processes` processes running process handlers. Started (forked) by start() before the
    worker opens any gRPC channel; attach() then connects it to the accounting."""

    def __init__(self, handlers: Dict[str, Handler], processes: int, mp_context: Optional[str],
                 max_output: int, worker_name: str, progress_interval: float,
                 on_failure: Callable[[str], None]) -> None:
        self._handlers = handlers
        self._size = processes
        self._ctx = multiprocessing.get_context(mp_context or "fork")
        self._max_output = max_output
        self._worker_name = worker_name
        self._progress_interval = progress_interval
        self._on_failure = on_failure
        self._ring = _CancelRing(self._ctx)
        # The ring's one writer at a time: every partition's accounting writes it, each under
        # its own lock.
        self._ring_lock = threading.Lock()
        self._processes: List[_Process] = []  # fixed once started
        self._slots: Optional[Partitions] = None
        self._threads: List[threading.Thread] = []
        # Taken before the accounting's lock when both are held (the accounting calls this pool
        # only through stop_task and forget_stops, which take only the ring's lock).
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # a process can take more tasks
        # Guarded by _lock: processes still running; the pool is closing.
        self._alive = 0
        self._closing = False

    def start(self) -> None:
        """Starts the processes."""
        inherited: List[multiprocessing.connection.Connection] = []
        fork = self._ctx.get_start_method() == "fork"
        for i in range(self._size):
            tasks_r, tasks_w = self._ctx.Pipe(duplex=False)
            results_r, results_w = self._ctx.Pipe(duplex=False)
            current_id = self._ctx.RawValue(ctypes.c_uint64, 0)
            current_start = self._ctx.RawValue(ctypes.c_double, 0.0)
            process = self._ctx.Process(
                target=_process_main, name=f"taskmaster-pool-{i}", daemon=True,
                args=(self._handlers, tasks_r, results_w, list(inherited) if fork else [],
                      self._ring, current_id, current_start, self._max_output,
                      self._worker_name, self._progress_interval))
            process.start()
            # Closed here, so that a process's death reads as the end of its results pipe.
            tasks_r.close()
            results_w.close()
            inherited += [tasks_w, results_r]
            self._processes.append(_Process(i, process, tasks_w, results_r, current_id,
                                            current_start))
        with self._lock:
            self._alive = self._size

    def attach(self, slots: Partitions) -> None:
        """Starts taking tasks from the accountings of `slots` (whose StopSink is this pool)."""
        self._slots = slots
        self._threads = [threading.Thread(target=self._dispatch, name="taskmaster-dispatch",
                                          daemon=True),
                         threading.Thread(target=self._collect, name="taskmaster-collect",
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def stop_task(self, task_id: int, attempt: int) -> None:
        """StopSink: the processes stop (or skip) this task."""
        with self._ring_lock:
            self._ring.add(task_id, attempt)

    def forget_stops(self, partition: int) -> None:
        """StopSink: the tasks of `partition` stopped so far are forgotten. Handlers of a lost
        epoch then run to their end (their results are dropped), and new tasks that reuse their
        ids run."""
        with self._ring_lock:
            self._ring.forget(partition)

    def poll(self) -> None:
        """The watchdog's pass: tells the accounting when running handlers started, so that
        their deadlines count from then."""
        assert self._slots is not None
        for p in self._processes:
            task_id = p.current_id.value
            if task_id:
                self._slots.started(task_id, p.current_start.value)

    def close(self, timeout: float) -> None:
        """Stops the processes (after the feed closed): each finishes its chunk (tasks told to
        stop are skipped) and exits; those still running after `timeout` seconds are
        killed."""
        with self._lock:
            self._closing = True
            self._room.notify_all()
        deadline = time.monotonic() + timeout
        for p in self._processes:
            p.process.join(max(0.0, deadline - time.monotonic()))
        for p in self._processes:
            if p.process.is_alive():
                log.warning("pool process %d did not exit; killing it", p.index)
                p.process.kill()
                p.process.join(1.0)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()) + 1.0)
        for p in self._processes:
            p.tasks.close()
            p.results.close()

    def _dispatch(self) -> None:
        # Keeps every process a chunk ahead (two chunks in flight, one for long tasks), the
        # tasks at hand split evenly over the processes with room.
        assert self._slots is not None
        while True:
            with self._lock:
                while True:
                    task_time = self._slots.task_time()
                    chunk = (int(min(max(_CHUNK_WINDOW / task_time, 1), _MAX_CHUNK))
                             if task_time > 0 else 1)
                    limit = 2 * chunk if chunk > 1 else 1
                    rooms = [(p, limit - len(p.inflight)) for p in self._processes
                             if p.alive and len(p.inflight) < limit]
                    if self._closing or rooms:
                        break
                    self._room.wait()
                closing = self._closing
            if closing:
                break
            seen = self._slots.feed.ticks()
            tasks = self._slots.take(sum(room for _, room in rooms))
            if not tasks:
                if not self._slots.feed.wait(seen):
                    break
                continue
            self._send(tasks, rooms)
        with self._lock:  # the processes' exits that follow are no failure
            self._closing = True
        for p in self._processes:
            try:
                p.tasks.send(None)
            except OSError:
                pass  # gone already

    def _send(self, tasks: List[Tuple[Slots, Task]], rooms: List[Tuple[_Process, int]]) -> None:
        share = -(-len(tasks) // len(rooms))
        start = 0
        unsent: List[Tuple[Slots, Task]] = []
        for p, room in rooms:
            part = tasks[start:start + min(share, room)]
            start += len(part)
            if not part:
                break
            with self._lock:
                if not p.alive:
                    unsent += part
                    continue
                p.inflight.extend(part)
            try:
                p.tasks.send([t for _, t in part])
            except OSError:
                pass  # it died: the collector reads its pipe's end and accounts for them
        unsent += tasks[start:]
        if unsent:  # only when processes died meanwhile: the master hands them to others
            _finish([(taken, _returned(taken[1])) for taken in unsent], None)

    def _collect(self) -> None:
        assert self._slots is not None
        slots = self._slots
        by_conn = {p.results: p for p in self._processes}
        while by_conn:
            for conn in multiprocessing.connection.wait(list(by_conn)):
                p = by_conn[conn]  # type: ignore[index]
                try:
                    message = conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    del by_conn[conn]
                    self._ended(p)
                    continue
                if message[0] == "p":
                    for report in message[1]:
                        slots.report_progress(*report)
                    continue
                results, busy = message[1], message[2]
                with self._lock:
                    inflight = p.inflight
                    done = [(inflight.popleft(), r) for r in results]
                    self._room.notify()
                _finish(done, busy)

    def _ended(self, p: _Process) -> None:
        # A process's results pipe ended: it exited, on its own or told to.
        assert self._slots is not None
        p.process.join(1.0)
        with self._lock:
            p.alive = False
            self._alive -= 1
            alive, closing = self._alive, self._closing
            lost = list(p.inflight)
            p.inflight.clear()
            self._room.notify_all()
        running = p.current_id.value
        why = f"pool process {p.index} exited with code {p.process.exitcode}"
        # The task it was running failed with it; the others never started.
        _finish([((a, t), (t[0], t[1], FAILED, encode_result(t[0], t[1], FAILED, error=why))
                  if t[0] == running else _returned(t)) for a, t in lost], None)
        if closing:
            return
        log.error("%s; %d tasks it held given back; %d processes left", why, len(lost), alive)
        self._slots.set_threads(alive)
        if alive == 0:
            self._on_failure("every process of the process pool exited")
