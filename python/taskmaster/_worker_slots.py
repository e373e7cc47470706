"""The worker's accounting, as worker/slots.cc keeps it for the C++ worker: the tasks a pool holds,
the credits it grants, the results it keeps until the master acknowledges them, and the lease
fence. Plain Python: no gRPC, no protobuf; the session and the pool drive it, and tests can drive
it with a fake clock.

Tasks travel as plain tuples `(task_id, attempt, kind, payload, timeout_ms)`, and results as
`(task_id, attempt, outcome, encoded)`, where `encoded` is the result's ready-made entry of a
WorkerMessage (see _worker_wire). Times are seconds on the monotonic clock.

Unlike slots.cc, a running handler whose result no longer counts (its task revoked, fenced, timed
out while it ran on, or from a master that lost its state) leaves `held` for `orphans`, where its
task tuple's identity finds it when it returns: the master may lease the same task id again
meanwhile (at the next attempt, or as a new task of a new epoch), and that lease must run.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import (Any, Callable, Deque, Dict, Iterable, List, Optional, Protocol, Sequence,
                    Set, Tuple)

from ._worker_wire import CANCELLED, OUTCOME_NAMES, RETURNED, FAILED, encode_result

Task = Tuple[int, int, str, bytes, int]
Result = Tuple[int, int, int, bytes]
TaskRef = Tuple[int, int]
# (task_id, attempt, done, total, message)
ProgressReport = Tuple[int, int, int, int, str]

# How often the watchdog looks at the session (Slots.watch).
WATCHDOG_PERIOD = 0.05
# How long past its deadline a handler may take to return on its own before its task is reported
# timed out without it.
_STUCK_GRACE = 0.5
# Results per message: bounds one write when many piled up during an outage.
_MAX_RESULTS_PER_MESSAGE = 1000
# A message of results closes once it holds about this many bytes (common/limits.h, kBatchBytes).
_BATCH_BYTES = 1 << 20
# Cancels that arrived before their task (messages can pass each other), remembered this many.
_RECENT_CANCELS = 4096
# Results unacknowledged this long are sent again on the same stream.
_RESEND_AFTER = 10.0
# After the drain, how long results may wait for the master's acknowledgement.
_ACK_GRACE = 5.0
# After the drain, how long the sender's bye may take to end the stream before it is cut.
_BYE_GRACE = 5.0
# A master silent for this many heartbeat intervals is given up on: a fresh connection gets
# through where a stalled one sits in TCP's retransmission backoff.
_SILENT_HEARTBEATS = 3
# A result whose sending ended the master's stream this many times is given up on.
_MAX_REFUSALS = 5
# The longest wait between reconnects while the worker holds tasks or results.
_HURRIED = 1.0
# Until a master says otherwise (in its welcome).
_DEFAULT_HEARTBEAT = 5.0
# The shortest heartbeat interval a welcome may set: a smaller one would make the sender spin.
_MIN_HEARTBEAT = 0.1
# The weight of the newest task in the moving average of task times.
_TASK_TIME_WEIGHT = 0.05


class StopSink(Protocol):
    """Where the accounting tells a process pool to stop running tasks (thread pools see each
    task's event instead). Called under the accounting's lock: must not block."""

    def stop_task(self, task_id: int, attempt: int) -> None:
        """The handler of this task must stop, or not start."""

    def forget_stops(self, partition: int) -> None:
        """The master of `partition` lost its state: its task ids stopped so far may come again
        as new tasks."""


class Feed:
    """Where a pool's threads wait for tasks from any of its accountings (a pool holds one per
    partition of the queues): each accounting says when it queues tasks, and a thread that found
    none anywhere waits for the next such word. Thread-safe."""

    def __init__(self) -> None:
        self._ready = threading.Condition(threading.Lock())
        # Guarded by _ready's lock: how many times tasks were queued; the pool stopped.
        self._ticks = 0
        self._closed = False

    def ticks(self) -> int:
        """Read before looking for tasks, for wait()."""
        with self._ready:
            return self._ticks

    def notify(self, n: Optional[int] = None) -> None:
        """Tasks were queued: wakes `n` waiting threads (None: all)."""
        with self._ready:
            self._ticks += 1
            if n is None:
                self._ready.notify_all()
            else:
                self._ready.notify(n)

    def wait(self, seen: int) -> bool:
        """Waits until tasks were queued after ticks() returned `seen`; False once closed."""
        with self._ready:
            self._ready.wait_for(lambda: self._closed or self._ticks != seen)
            return not self._closed

    def close(self) -> None:
        """The pool stops: every wait returns False."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()


class SharedCredits:
    """The credits of one pool's accountings, one per partition of the queues, shared out as the
    C++ worker's SharedCredits (worker/slots.h) does: the partitions with tasks share the pool's
    threads and prefetch, in equal parts when each wants more; a partition without any keeps one
    credit, so that its master can hand it a task at once; when none has tasks, each is granted
    its part. Credits granted cannot be taken back: a partition whose tasks ran out keeps what it
    was granted, and the others share the pool without counting it. Thread-safe; the
    accountings call it under their own locks (it takes only its own)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Guarded by _lock: per member, [held, outstanding, capacity, held back below its
        # share].
        self._members: List[List[Any]] = []

    def allow(self, member: int, held: int, outstanding: int, capacity: int) -> int:
        """Accounting `member` holds `held` tasks with `outstanding` credits granted and not
        used, and would take `capacity` (its threads and prefetch; 0 while it grants nothing).
        Returns how many more it may grant now, counted as granted."""
        with self._lock:
            members = self._members
            while len(members) <= member:
                members.append([0, 0, 0, False])
            use = members[member]
            if use[0] > 0 and held == 0:
                # One partition fewer with tasks: the others' shares grow.
                for u in members:
                    u[3] = u[3] or u[0] > 0
            use[:] = [held, outstanding, capacity, False]
            busy = [u for u in members if u[0] > 0]
            if capacity <= 0:
                allow = 0
            elif held == 0:
                # With no partition busy a burst anywhere starts at once; otherwise one credit
                # waits.
                allow = (-(-capacity // len(members)) if not busy else 1) - outstanding
            else:
                # The pool as the most demanding busy partition sees it (a partition of short
                # tasks prefetches more), shared equally, each within what it takes itself.
                pool = max(u[2] for u in busy)
                share = min(capacity, -(-pool // len(busy)))
                used = held + outstanding
                allow = min(pool - sum(u[0] + u[1] for u in busy), share - used)
                # Held back below its share by the others' tasks: their finishes open room.
                use[3] = used < share and allow < share - used
            allow = max(0, allow)
            use[1] += allow
            return allow

    def take_waiting(self, member: int) -> bool:
        """Called by `member` after its tasks changed: whether another partition with tasks was
        held back below its share, or saw its share grow (one partition fewer has tasks), since
        (every accounting is then asked to top up)."""
        with self._lock:
            waiting = False
            for i, use in enumerate(self._members):
                if i != member and use[3]:
                    use[3] = False
                    waiting = True
            return waiting


@dataclass(frozen=True)
class SlotsOptions:
    """What a pool's accounting needs to know; the Worker fills it from its arguments."""

    threads: int                # tasks run at once (threads or processes)
    prefetch: Optional[int]     # tasks held beyond the running ones; None: adaptive
    prefetch_max: int           # the adaptive prefetch's ceiling
    prefetch_window: float      # seconds of work the adaptive prefetch keeps at hand
    progress_interval: float    # progress reaches the master at most this often
    stops: Optional[StopSink] = None
    feed: "Feed" = field(default_factory=lambda: Feed())  # told when tasks are queued
    # The pool's credits, shared with its other partitions' accountings (this one is `member`);
    # None: this accounting grants the whole pool. `on_room` runs (outside the lock) when
    # another's accounting may now grant more: it calls their top_up.
    shared_credits: Optional["SharedCredits"] = None
    member: int = 0
    on_room: Optional[Callable[[], None]] = None
    now: Callable[[], float] = time.monotonic


@dataclass
class Welcome:
    """A master's welcome, as the session read it."""

    master_epoch: str
    heartbeat_interval_ms: int
    lease_timeout_ms: int
    revoked: List[TaskRef]
    echoes_heartbeats: bool
    worker_secret: str


@dataclass
class HelloState:
    """What a new stream's hello carries of the worker's state."""

    held: List[TaskRef]   # queued, running, or with a result not yet acknowledged
    master_epoch: str     # the epoch they came from
    worker_secret: str    # from the last welcome
    lease: float          # the master's lease, seconds; 0 until a welcome said


@dataclass
class ToMaster:
    """What the sender writes next."""

    results: List[bytes] = field(default_factory=list)  # encoded WorkerMessage.results entries
    credits: int = 0
    task_us: int = 0  # with credits: a task's average time in microseconds (0: not measured)
    heartbeat_at_ms: Optional[int] = None  # a heartbeat, on the worker's monotonic clock
    stuck: int = 0
    progress: List[ProgressReport] = field(default_factory=list)
    draining: bool = False
    bye: bool = False

    def empty(self) -> bool:
        return not (self.results or self.credits or self.heartbeat_at_ms is not None
                    or self.progress or self.draining or self.bye)


@dataclass
class WatchReport:
    """What the watchdog found on one pass."""

    cut_session: int = 0   # the session to cut and reconnect afresh; 0: none
    why: str = ""
    stopped: int = 0       # running tasks stopped before their leases lapse
    dropped: int = 0       # queued tasks dropped for the same reason
    lease: float = 0.0
    stuck: List[TaskRef] = field(default_factory=list)  # handlers found past their deadline


class _Held:
    """A task this pool holds, queued or running; or an orphan: a running handler whose result
    will be dropped."""

    __slots__ = ("task", "running", "stuck", "deadline", "progress", "event")

    def __init__(self, task: Task) -> None:
        self.task = task
        self.running = False
        # An orphan reported timed out while its handler runs on: its slot is busy, so it
        # counts against the credits (other orphans were told to stop, and soon free theirs).
        self.stuck = False
        self.deadline: Optional[float] = None  # from its start, when the task has a timeout
        self.progress: Optional[Tuple[int, int, str]] = None  # the latest report, until sent
        self.event: Optional[threading.Event] = None  # a thread pool's stop signal


class Slots:
    """Thread-safe: `_lock` guards every field below it; no method does I/O or runs a handler
    under it. next_to_send, finish_drain and await_leaving block."""

    def __init__(self, options: SlotsOptions) -> None:
        self._options = options
        self._now = options.now
        self._lock = threading.Lock()
        # One lock, two wait lists (pool threads wait on the options' feed).
        self._send_ready = threading.Condition(self._lock)   # the sender
        self._changed = threading.Condition(self._lock)      # drain and leaving waits
        self._threads = options.threads
        # ---- Tasks ----
        self._held: Dict[int, _Held] = {}  # by task id
        self._orphans: Dict[int, _Held] = {}  # by id() of their task tuple
        self._stuck = 0  # orphans marked stuck
        self._queue: Deque[int] = deque()  # held, not started, in arrival order
        self._recent_cancels: Set[int] = set()
        self._recent_cancels_order: Deque[int] = deque()
        self._progress_pending = False  # some _held entry has progress to send
        self._progress_due = 0.0        # not sent before then
        # ---- Results ----
        # Results (and give-backs) until the master acknowledges them; sent again after a
        # reconnect.
        self._unacked: Dict[int, Result] = {}
        self._to_send: Deque[int] = deque()          # unacked results not written yet
        self._sent_in_session: Set[int] = set()      # results written on this stream
        self._unacked_before: List[int] = []         # at the last resend check
        self._resend_at = 0.0
        self._refusals: Dict[int, int] = {}  # streams the master ended with these on them
        # ---- Credits ----
        self._credits_to_send = 0     # granted, not written yet
        self._outstanding_credit = 0  # granted this session, not used yet
        self._task_time_ewma = 0.0    # seconds a task takes; 0: unknown
        # ---- The master, from its last welcome ----
        self._epoch = ""
        self._secret = ""
        self._heartbeat = _DEFAULT_HEARTBEAT
        self._lease = 0.0  # 0 until a welcome came
        self._echoes = False
        self._fence_at = 0.0  # tasks still held then are stopped (_fence_locked)
        # ---- The session ----
        self._live_session = 0  # from its hello to its end; 0: none
        self._cut = False
        self._welcomed = False
        self._session_open = False  # from its welcome until it stops reading
        self._session_started = 0.0
        self._heard_at = 0.0
        self._heartbeat_due = 0.0
        # ---- The worker's life ----
        self._draining = False
        self._drain_sent = False
        self._leaving = False
        self._stopped = False

    # ---- The pool ----

    def take_one(self) -> Optional[Tuple[Task, threading.Event]]:
        """The next queued task, marked running with an event that tells its handler to stop;
        None when none is queued or the pool stopped. For thread pools (which wait on the feed
        when every accounting returned None)."""
        with self._lock:
            if self._stopped or not self._queue:
                return None
            h = self._held[self._queue.popleft()]
            h.running = True
            h.event = threading.Event()
            if h.task[4] > 0:
                h.deadline = self._now() + h.task[4] / 1000.0
            return h.task, h.event

    def take(self, max_tasks: int) -> List[Task]:
        """Up to `max_tasks` queued tasks, marked running; none when none is queued or the pool
        stopped. For the process pool's dispatcher, which reports starts with `started`."""
        with self._lock:
            if self._stopped:
                return []
            queue, held = self._queue, self._held
            tasks = []
            for _ in range(min(max_tasks, len(queue))):
                h = held[queue.popleft()]
                h.running = True
                tasks.append(h.task)
            return tasks

    def started(self, task_id: int, at: float) -> None:
        """A running task's handler started at `at`: its deadline runs from then."""
        with self._lock:
            h = self._held.get(task_id)
            if h is not None and h.running and h.deadline is None and h.task[4] > 0:
                h.deadline = at + h.task[4] / 1000.0

    def finish(self, done: Sequence[Tuple[Task, Result]], busy: Optional[float]) -> None:
        """Running tasks' handlers returned, taking `busy` seconds together (None: they never
        ran): each pairs the task tuple it was given (by take or take_one) with its result,
        which waits for the master's acknowledgement, unless the handler was orphaned
        meanwhile."""
        if not done:
            return
        with self._lock:
            if busy is not None:
                per_task = busy / len(done)
                weight = 1 - (1 - _TASK_TIME_WEIGHT) ** len(done)
                self._task_time_ewma = (per_task if self._task_time_ewma <= 0 else
                                        (1 - weight) * self._task_time_ewma + weight * per_task)
            held, unacked, to_send = self._held, self._unacked, self._to_send
            for task, r in done:
                tid = task[0]
                h = held.get(tid)
                if h is not None and h.task is task:
                    del held[tid]
                    unacked[tid] = r
                    to_send.append(tid)
                    continue
                orphan = self._orphans.pop(id(task), None)
                if orphan is not None and orphan.stuck:
                    self._stuck -= 1
            self._top_up_credits_locked()
            waiting = self._others_waiting()
            self._send_ready.notify()
            self._changed.notify_all()
        self._tell_room(waiting)

    def report_progress(self, task_id: int, attempt: int, done: int, total: int,
                        message: str) -> None:
        """A running task's handler says how far it has come: the latest is kept and sent with
        the next message at most every progress interval."""
        with self._lock:
            h = self._held.get(task_id)
            if h is None or not h.running or h.task[1] != attempt:
                return
            h.progress = (done, total, message)
            if not self._progress_pending:
                self._progress_pending = True
                self._send_ready.notify()

    def task_time(self) -> float:
        """How long a task takes, seconds (a moving average); 0: unknown yet."""
        with self._lock:
            return self._task_time_ewma

    def set_threads(self, threads: int) -> None:
        """The pool now runs `threads` tasks at once (a pool process died)."""
        with self._lock:
            self._threads = threads

    # ---- The session ----

    def begin_session(self, session: int) -> Optional[HelloState]:
        """A new stream, numbered `session` (non-zero, increasing): what its hello says; None
        when the worker is leaving."""
        with self._lock:
            if self._leaving:
                return None
            self._live_session = session
            self._cut = False
            self._welcomed = False
            self._session_started = self._now()
            held = [(tid, h.task[1]) for tid, h in self._held.items()]
            held += [(tid, r[1]) for tid, r in self._unacked.items() if tid not in self._held]
            return HelloState(held, self._epoch, self._secret, self._lease)

    def welcomed(self, welcome: Welcome) -> Optional[str]:
        """The master's welcome opens the session. Returns what to tell the operator when the
        master lost its state (and with it this worker's tasks and results)."""
        with self._lock:
            lost_state = None
            if self._epoch and self._epoch != welcome.master_epoch:
                lost_state = (f"the master lost its state (epoch {self._epoch} -> "
                              f"{welcome.master_epoch}): dropping {len(self._held)} held tasks "
                              f"and {len(self._unacked)} unacknowledged results")
                for tid in list(self._held):
                    self._drop_locked(tid)
                self._unacked.clear()
                self._refusals.clear()
                self._recent_cancels.clear()
                self._recent_cancels_order.clear()
                if self._options.stops is not None:
                    self._options.stops.forget_stops(self._options.member)
            for tid, _ in welcome.revoked:
                if tid in self._held:
                    self._drop_locked(tid)
                self._unacked.pop(tid, None)
            self._prune_queue_locked()
            self._epoch = welcome.master_epoch
            self._heartbeat = max(_MIN_HEARTBEAT, welcome.heartbeat_interval_ms / 1000.0)
            self._lease = max(0.0, welcome.lease_timeout_ms / 1000.0)
            self._echoes = welcome.echoes_heartbeats
            self._secret = welcome.worker_secret
            now = self._now()
            self._heard_at = now
            self._welcomed = True
            # Attaching extended every lease this worker kept: from when the hello left at the
            # latest.
            self._leases_held_since_locked(self._session_started)
            self._to_send = deque(self._unacked)
            self._unacked_before = []
            self._resend_at = now + _RESEND_AFTER
            self._heartbeat_due = now  # at once: its echo tells how long the leases hold
            self._credits_to_send = 0
            self._outstanding_credit = 0
            self._drain_sent = False
            self._session_open = True
            self._top_up_credits_locked()
            waiting = self._others_waiting()
            self._send_ready.notify()
        self._tell_room(waiting)
        return lost_state

    def received(self, tasks: Iterable[Task], cancels: Iterable[int], acked: Iterable[TaskRef],
                 heartbeat_echo_ms: int) -> None:
        """A message from the master: tasks, cancels, acknowledgements, a heartbeat's echo."""
        with self._lock:
            self._heard_at = self._now()
            if heartbeat_echo_ms > 0:
                self._leases_held_since_locked(heartbeat_echo_ms / 1000.0)
            held, queue = self._held, self._queue
            arrived = 0
            for t in tasks:
                arrived += 1
                tid = t[0]
                if tid in held:
                    continue  # delivered twice
                if tid in self._recent_cancels:
                    self._recent_cancels.discard(tid)
                    self._add_result_locked(tid, t[1], CANCELLED, "cancelled")
                elif self._draining:
                    self._add_result_locked(tid, t[1], RETURNED)
                else:
                    held[tid] = _Held(t)
                    queue.append(tid)
            self._outstanding_credit = max(0, self._outstanding_credit - arrived)
            dequeued = False
            for tid in cancels:
                h = held.get(tid)
                if h is None:
                    self._remember_cancel_locked(tid)
                elif h.running:
                    # Its handler returns with the task CANCELLED (run_task sees the stop).
                    self._stop_locked(h)
                else:
                    self._add_result_locked(tid, h.task[1], CANCELLED, "cancelled")
                    del held[tid]
                    dequeued = True
            if dequeued:
                self._prune_queue_locked()
                queue = self._queue
            unacked = self._unacked
            for tid, attempt in acked:
                r = unacked.get(tid)
                if r is not None and r[1] == attempt:
                    del unacked[tid]
                    if self._refusals:
                        self._refusals.pop(tid, None)
            self._top_up_credits_locked()
            waiting = self._others_waiting()
            if queue:
                self._options.feed.notify(len(queue))
            self._send_ready.notify()
            self._changed.notify_all()
        self._tell_room(waiting)

    def _remember_cancel_locked(self, tid: int) -> None:
        if len(self._recent_cancels_order) >= _RECENT_CANCELS:
            self._recent_cancels.discard(self._recent_cancels_order.popleft())
        self._recent_cancels.add(tid)
        self._recent_cancels_order.append(tid)

    def _send_wanted_locked(self, session: int, now: float) -> bool:
        return (not self._session_open or session != self._live_session
                or bool(self._to_send) or self._credits_to_send > 0
                or (self._draining and not self._drain_sent) or self._leaving
                or (self._progress_pending and now >= self._progress_due)
                or now >= self._heartbeat_due)

    def next_to_send(self, session: int) -> Optional[ToMaster]:
        """Blocks until there is something to write on `session` or a heartbeat is due; None
        once that session closed (a sender that wakes late never takes what a later session's
        sender should write)."""
        with self._lock:
            now = self._now()
            while not self._send_wanted_locked(session, now):
                due = self._heartbeat_due
                if self._progress_pending:
                    due = min(due, self._progress_due)
                self._send_ready.wait(max(0.0, due - now))
                now = self._now()
            if not self._session_open or session != self._live_session:
                return None
            if now >= self._resend_at:
                # Still unacknowledged a whole period later: the master could not store them
                # (its disk was full, say). Send them again; it records each result once.
                self._to_send.extend(t for t in self._unacked_before if t in self._unacked)
                self._unacked_before = list(self._unacked)
                self._resend_at = now + _RESEND_AFTER
            out = ToMaster()
            size = 0
            to_send, unacked, sent = self._to_send, self._unacked, self._sent_in_session
            while to_send and len(out.results) < _MAX_RESULTS_PER_MESSAGE and size < _BATCH_BYTES:
                tid = to_send.popleft()
                r = unacked.get(tid)
                if r is None:
                    continue
                size += len(r[3])
                out.results.append(r[3])
                sent.add(tid)
            if self._credits_to_send > 0 and not self._draining:
                out.credits = self._credits_to_send
                # The master packs tasks for a worker that says it is fast (at least 1: 0 is
                # "not measured").
                if self._task_time_ewma > 0:
                    out.task_us = max(1, round(self._task_time_ewma * 1e6))
            self._credits_to_send = 0
            if self._draining and not self._drain_sent:
                out.draining = True
                self._drain_sent = True
            out.bye = self._leaving and not to_send
            if self._progress_pending and now >= self._progress_due:
                for tid, h in self._held.items():
                    if h.progress is not None:
                        out.progress.append((tid, h.task[1]) + h.progress)
                        h.progress = None
                self._progress_pending = False
                self._progress_due = now + self._options.progress_interval
            if now >= self._heartbeat_due:
                out.heartbeat_at_ms = int(now * 1000)
                out.stuck = self._stuck
                self._heartbeat_due = now + self._heartbeat
            return out

    def close_session(self) -> None:
        """The stream stopped reading: the sender stops too."""
        with self._lock:
            self._session_open = False
            self._allow_locked(0)  # its credits are void: the others may use the room
            waiting = self._others_waiting()
            self._send_ready.notify_all()
            self._changed.notify_all()
        self._tell_room(waiting)

    def session_ended(self, master_stopping: bool, error: str) -> List[str]:
        """The stream ended, with the master's `error` message. Returns what to log of the
        results given up on: those on this stream when the master ended it once too often."""
        with self._lock:
            given_up = []
            if not self._cut and not self._leaving and not master_stopping:
                given_up = self._count_refusals_locked(error)
            self._sent_in_session.clear()
            self._live_session = 0
            self._changed.notify_all()
            return given_up

    def _count_refusals_locked(self, error: str) -> List[str]:
        # Results the master keeps refusing (it ends the stream each time one arrives) would be
        # resent forever and keep this worker from doing anything else.
        given_up = []
        for tid in self._sent_in_session:
            r = self._unacked.get(tid)
            if r is None:
                continue
            self._refusals[tid] = self._refusals.get(tid, 0) + 1
            if self._refusals[tid] < _MAX_REFUSALS:
                continue
            given_up.append(
                f"giving up on the result of task {tid} attempt {r[1]} ({OUTCOME_NAMES[r[2]]}, "
                f"{len(r[3])} bytes): the master ended the stream each of the last "
                f"{_MAX_REFUSALS} times it was sent ({error!r}); the task runs again once its "
                "lease lapses")
            del self._unacked[tid]
            del self._refusals[tid]
        return given_up

    def reconnect_delay(self, wait: float) -> float:
        """How long to wait before the next connection, given the backoff's `wait`."""
        with self._lock:
            # Holding tasks, the worker must be back before their leases lapse, and a restarted
            # master waits for it before it hands anything out: retry at least every second.
            if self._held or self._unacked:
                return min(wait, self._heartbeat, _HURRIED)
            return wait

    def leaving(self) -> bool:
        with self._lock:
            return self._leaving

    def await_leaving(self, wait: float) -> bool:
        """Waits up to `wait` seconds for the worker to leave; returns whether it does."""
        with self._lock:
            return self._changed.wait_for(lambda: self._leaving, wait)

    def watch(self) -> Optional[WatchReport]:
        """The watchdog's pass: a session to cut, tasks to stop before their leases lapse on the
        master, handlers past their deadline; None once the pool stopped."""
        with self._lock:
            if self._stopped:
                return None
            report = WatchReport(lease=self._lease)
            now = self._now()
            silence = _SILENT_HEARTBEATS * self._heartbeat
            if self._live_session and not self._cut:
                # A master that accepted the connection but says nothing (paused, or its answer
                # lost in a partition): try again, though not so soon that a busy master never
                # makes it.
                if (not self._welcomed
                        and now - self._session_started > max(silence, self._lease / 2, _HURRIED)):
                    report.why = "no welcome"
                elif self._session_open and self._echoes and now - self._heard_at > silence:
                    report.why = f"no word for {int((now - self._heard_at) * 1000)} ms"
                if report.why:
                    report.cut_session = self._live_session
                    self._cut = True
            if self._echoes and self._lease > 0 and now > self._fence_at:
                self._fence_locked(report)
            self._report_stuck_locked(report, now)
            waiting = False
            if report.stuck or report.stopped or report.dropped:
                self._allow_locked(0)  # fewer held: the others may use the room
                waiting = self._others_waiting()
                self._send_ready.notify()
                self._changed.notify_all()
        self._tell_room(waiting)
        return report

    def _report_stuck_locked(self, report: WatchReport, now: float) -> None:
        # A handler that ignores its deadline must not hold its result back forever: past the
        # deadline and a grace the task is reported timed out, and whatever the handler returns
        # later is dropped. Its thread stays busy meanwhile, and counts so.
        for tid in [tid for tid, h in self._held.items() if h.running
                    and h.deadline is not None and now - h.deadline >= _STUCK_GRACE]:
            h = self._held[tid]
            self._orphan_locked(tid, h)
            h.stuck = True
            self._stuck += 1
            report.stuck.append((tid, h.task[1]))
            self._add_result_locked(
                tid, h.task[1], FAILED,
                f"timed out after {h.task[4]} ms; the handler did not stop, and its slot on the "
                "worker stays busy until it does")

    def _fence_locked(self, report: WatchReport) -> None:
        # Stops every task whose lease may lapse on the master: results not yet acknowledged
        # are kept.
        report.dropped = len(self._queue)
        report.stopped = len(self._held) - report.dropped
        for tid in list(self._held):
            self._drop_locked(tid)
        self._queue.clear()

    def _leases_held_since_locked(self, since: float) -> None:
        # The master extended this worker's leases at `since` at the latest: they hold for a
        # lease period from then. Stop a little earlier than the master would expire them.
        margin = max(self._lease / 10, 2 * WATCHDOG_PERIOD)
        self._fence_at = max(self._fence_at, since + self._lease - margin)

    def _prefetch_locked(self) -> int:
        # Adaptive: enough to keep the pool busy for the prefetch window while the next tasks
        # travel, judged from how long tasks take; so short tasks stream without a round trip
        # between them, and long ones never queue behind each other.
        o = self._options
        if o.prefetch is not None:
            return o.prefetch
        if self._task_time_ewma <= 0:
            return self._threads
        want = self._threads * o.prefetch_window / self._task_time_ewma
        return int(min(max(want, 0), o.prefetch_max))

    def top_up(self) -> None:
        """Grants what the shared credits allow now (see SlotsOptions.on_room)."""
        with self._lock:
            self._top_up_credits_locked()
            if self._credits_to_send > 0:
                self._send_ready.notify()

    def _top_up_credits_locked(self) -> None:
        # Grants the master what the pool can take now: its slots plus prefetch, less what it
        # holds and what it granted already; with shared credits, this partition's part of that.
        granting = not self._draining and self._session_open
        want = self._allow_locked(self._threads + self._prefetch_locked() if granting else 0)
        if granting and want > 0:
            self._credits_to_send += want
            self._outstanding_credit += want

    def _allow_locked(self, capacity: int) -> int:
        # What this accounting may grant of `capacity` (threads and prefetch; 0: it grants
        # nothing, and only tells the shared credits what it holds).
        held = len(self._held) + self._stuck
        shared = self._options.shared_credits
        if shared is None:
            return capacity - held - self._outstanding_credit
        # A closed session's credits are void (the next welcome starts from none).
        return shared.allow(self._options.member, held,
                            self._outstanding_credit if self._session_open else 0, capacity)

    def _others_waiting(self) -> bool:
        # After this accounting's tasks changed: whether another partition's waits for room (to
        # tell on_room, once the lock is released).
        shared = self._options.shared_credits
        return shared is not None and shared.take_waiting(self._options.member)

    def _tell_room(self, waiting: bool) -> None:
        if waiting and self._options.on_room is not None:
            self._options.on_room()

    def _stop_locked(self, h: _Held) -> None:
        if h.event is not None:
            h.event.set()
        if self._options.stops is not None:
            self._options.stops.stop_task(h.task[0], h.task[1])

    def _orphan_locked(self, tid: int, h: _Held) -> None:
        # A running handler whose result will not count: told to stop, and out of _held, where a
        # new lease of the same task id may come.
        del self._held[tid]
        self._stop_locked(h)
        self._orphans[id(h.task)] = h

    def _drop_locked(self, tid: int) -> None:
        # Drops a held task: a queued one now (the caller prunes the queue), a running one's
        # result when its handler returns.
        h = self._held[tid]
        if h.running:
            self._orphan_locked(tid, h)
        else:
            del self._held[tid]

    def _prune_queue_locked(self) -> None:
        # One pass for any number of queued tasks dropped from _held.
        if len(self._queue) > 0:
            self._queue = deque(tid for tid in self._queue if tid in self._held)

    def _add_result_locked(self, tid: int, attempt: int, outcome: int, error: str = "") -> None:
        self._unacked[tid] = (tid, attempt, outcome, encode_result(tid, attempt, outcome,
                                                                   error=error))
        self._to_send.append(tid)

    # ---- The worker's life ----

    def start_drain(self) -> Optional[Tuple[int, int]]:
        """Stops taking tasks and gives back the queued ones; returns (given back, running), or
        None when draining or stopped already."""
        with self._lock:
            if self._stopped or self._draining:
                return None
            self._draining = True
            self._credits_to_send = 0
            returned = len(self._queue)
            # The master requeues what never started without using an attempt.
            for tid in self._queue:
                self._add_result_locked(tid, self._held.pop(tid).task[1], RETURNED)
            self._queue.clear()
            self._send_ready.notify()
            return returned, len(self._held)

    def finish_drain(self, deadline: float) -> Tuple[int, int]:
        """Waits for the running tasks until `deadline` (monotonic), for their acknowledgements
        a little longer, then leaves: the sender says bye. Returns (tasks unfinished at the
        deadline, results unacknowledged) once the session closed, or a little later."""
        with self._lock:
            self._changed.wait_for(lambda: self._stopped or not self._held,
                                   max(0.0, deadline - self._now()))
            unfinished = len(self._held)
            self._changed.wait_for(lambda: self._stopped or not self._unacked,
                                   max(0.0, deadline + _ACK_GRACE - self._now()))
            unacked = len(self._unacked)
            self._leaving = True
            self._send_ready.notify()
            self._changed.notify_all()
            # The sender says bye and the stream ends; wait a little for that before cutting it.
            self._changed.wait_for(lambda: not self._session_open, _BYE_GRACE)
            return unfinished, unacked

    def stop(self) -> None:
        """Stops: running handlers are told to stop, no more sessions (the pool's threads exit
        once its feed closes)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._leaving = True
            for h in list(self._held.values()) + list(self._orphans.values()):
                if h.running:
                    self._stop_locked(h)
            self._queue.clear()
            self._send_ready.notify_all()
            self._changed.notify_all()


# A task id carries its partition in its high bits (common/partition.h).
_PARTITION_SHIFT = 48


def partition_of(task_id: int) -> int:
    return task_id >> _PARTITION_SHIFT


class Partitions:
    """A pool's accountings, one per partition of the queues (each with a stream of its own to
    the master serving that partition), as the pool sees them: its threads take tasks from any,
    and each result goes back to the accounting its task came from. Thread-safe; accountings are
    only ever added."""

    def __init__(self, feed: Feed, threads: int) -> None:
        self.feed = feed
        self._lock = threading.Lock()
        # Guarded by _lock. The accountings, by partition, replaced whole when one is added
        # (readers use the list they got); where the next take looks first, so that every
        # partition's tasks get their turn; tasks the pool runs at once.
        self._slots: List[Slots] = []
        self._next = 0
        self._threads = threads

    def add(self, slots: Slots) -> None:
        """Adds the next partition's accounting, granting the pool's threads as they are now."""
        with self._lock:
            slots.set_threads(self._threads)
            self._slots = self._slots + [slots]

    def all(self) -> List[Slots]:
        with self._lock:
            return self._slots

    def of(self, task_id: int) -> Optional[Slots]:
        """The accounting of the task's partition (for reports about a running task; results go
        back to the accounting their task was taken from)."""
        slots = self.all()
        p = partition_of(task_id)
        return slots[p] if p < len(slots) else None

    def take_one(self) -> Optional[Tuple[Slots, Task, threading.Event]]:
        """A queued task of any partition, with its accounting; None when none is queued."""
        with self._lock:
            slots, start = self._slots, self._next
            self._next = (start + 1) % max(1, len(slots))
        for i in range(len(slots)):
            s = slots[(start + i) % len(slots)]
            taken = s.take_one()
            if taken is not None:
                return s, taken[0], taken[1]
        return None

    def take(self, max_tasks: int) -> List[Tuple[Slots, Task]]:
        """Up to `max_tasks` queued tasks from the partitions in turn, each with its
        accounting."""
        with self._lock:
            slots, start = self._slots, self._next
            self._next = (start + 1) % max(1, len(slots))
        taken: List[Tuple[Slots, Task]] = []
        for i in range(len(slots)):
            if len(taken) >= max_tasks:
                break
            s = slots[(start + i) % len(slots)]
            taken += [(s, t) for t in s.take(max_tasks - len(taken))]
        return taken

    def started(self, task_id: int, at: float) -> None:
        slots = self.of(task_id)
        if slots is not None:
            slots.started(task_id, at)

    def report_progress(self, task_id: int, attempt: int, done: int, total: int,
                        message: str) -> None:
        slots = self.of(task_id)
        if slots is not None:
            slots.report_progress(task_id, attempt, done, total, message)

    def task_time(self) -> float:
        """How long a task takes, seconds: the mean of the partitions that measured it; 0 when
        none did."""
        times = [t for t in (s.task_time() for s in self.all()) if t > 0]
        return sum(times) / len(times) if times else 0.0

    def set_threads(self, threads: int) -> None:
        """The pool now runs `threads` tasks at once (a pool process died)."""
        with self._lock:
            self._threads = threads
            slots = self._slots
        for s in slots:
            s.set_threads(threads)
