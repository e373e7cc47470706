"""A pool's stream to the master serving one partition of the queues, as worker/session.cc runs it
for the C++ worker: connecting, the hello and welcome, reading, the sender, reconnecting with
backoff, and the watchdog that cuts a silent stream. The only part of the worker that sees gRPC or
protobuf: it converts messages from and to the plain tuples of _worker_slots. Results go out as the
ready-made bytes their handlers' side encoded (_worker_wire), after the other fields of their
message.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import grpc

from . import _conn, errors
from ._conn import Connection, Masters
from ._worker_slots import WATCHDOG_PERIOD, HelloState, Slots, ToMaster, Welcome
from ._worker_wire import MAX_PROGRESS_MESSAGE_BYTES, valid_utf8
from .v1 import taskmaster_pb2 as pb

log = logging.getLogger("taskmaster.worker")

_CONNECT = "/taskmaster.v1.WorkerService/Connect"
# A hello refused with these is refused again on every attempt: the worker stops and says why.
_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.INVALID_ARGUMENT)
# Keepalive pings tell a dead connection well within a lease (common/limits.h): this many per
# lease period, never closer than the minimum, and this far apart until a welcome says.
_KEEPALIVES_PER_LEASE = 3
_MIN_KEEPALIVE_MS = 1000
_DEFAULT_KEEPALIVE_MS = 30000
_KEEPALIVE_TIMEOUT_MS = 10000
# The first reconnect waits about this long; each failure doubles it, up to reconnect_max.
_RECONNECT_MIN = 0.1


@dataclass(frozen=True)
class Identity:
    """How a pool presents itself in every hello."""

    worker_id: str  # stable for the process: a reconnect keeps its leases
    name: str
    host: str
    kinds: Sequence[str]
    queues: Sequence[str]
    labels: Dict[str, str]
    slots: int  # tasks it runs at once
    partition: int = 0  # the partition of the queues this stream serves
    # Hears how many partitions the queues have, from every welcome.
    on_partitions: Optional[Callable[[int], None]] = None


class _Backoff:
    """Waits before reconnecting: uniform in [next/2, next], then next doubles up to the max."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._initial = initial
        self._max = maximum
        self._next = initial

    def next(self) -> float:
        wait = random.uniform(self._next / 2, self._next)
        self._next = min(self._next * 2, self._max)
        return wait

    def reset(self) -> None:
        self._next = self._initial


class Session:
    """Thread-safe. start() once; cancel() any time; join() after the accounting stopped."""

    def __init__(self, conn: Connection, identity: Identity, slots: Slots,
                 poll: Optional[Callable[[], None]], reconnect_max: float,
                 on_fatal: Callable[[BaseException], None]) -> None:
        """`poll`, if any, runs on each watchdog pass, before the accounting's; `on_fatal`
        hears why the session stopped for good: the master refused this worker's hello (a bad
        token, say), or the session failed in a way it cannot retry."""
        self._conn = conn
        self._masters = Masters(conn.address)
        self._identity = identity
        self._slots = slots
        self._poll = poll
        self._reconnect_max = reconnect_max
        self._on_fatal = on_fatal
        self._threads = [threading.Thread(target=self._loop, name="taskmaster-session",
                                          daemon=True),
                         threading.Thread(target=self._watchdog, name="taskmaster-watchdog",
                                          daemon=True)]
        self._mu = threading.Lock()
        # Guarded by _mu: the latest session's number; its call once made (the watchdog and
        # cancel() cancel it); a cancel asked for before the call was made.
        self._number = 0
        self._call: Optional[grpc.RpcContext] = None
        self._cancel_pending = False

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def cancel(self) -> None:
        """Cancels the live stream, if any: the worker is leaving."""
        self._cancel_session(0)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.ident is not None:  # started
                t.join(max(0.0, deadline - time.monotonic()))

    def _cancel_session(self, number: int) -> None:
        # Session `number` if it is still the live one; 0: whichever is.
        with self._mu:
            if number not in (0, self._number):
                return
            call = self._call
            if call is None:
                self._cancel_pending = True
        if call is not None:
            call.cancel()  # outside the lock: the call takes its own

    def _loop(self) -> None:
        try:
            self._reconnect_loop()
        except Exception as e:  # a bug: stop the worker and say so, rather than hang
            log.exception("the session with master %s failed", self._conn.address)
            self._on_fatal(e)

    def _reconnect_loop(self) -> None:
        backoff = _Backoff(_RECONNECT_MIN, self._reconnect_max)
        warned = False
        while True:
            address = self._masters.current()
            welcomed, error = self._run(address)
            if welcomed:
                self._masters.served(address)
                backoff.reset()
                warned = False
            if self._slots.leaving():
                return
            if not welcomed and error is not None and error.code() in _REFUSED:
                refused = errors.from_rpc_error(error, address)
                log.error("master %s refused this worker: %s", address, refused.message)
                self._on_fatal(refused)
                return
            # Given several masters, the next is tried at once; a round of them all failing
            # backs off.
            serving_at = _conn.serving_master(error) if error is not None else ""
            round_failed = self._masters.failed(address, serving_at)
            wait = self._slots.reconnect_delay(backoff.next()) if round_failed else 0.0
            why = _describe(error)
            if not warned and round_failed:
                log.warning("lost the master %s (%s); reconnecting with backoff",
                            self._conn.address, why)
                warned = True
            log.debug("stream to %s ended (%s); next attempt %s in %.0f ms", address, why,
                      self._masters.current(), wait * 1000)
            if self._slots.await_leaving(wait):
                return

    def _run(self, address: str) -> Tuple[bool, Optional[grpc.RpcError]]:
        """One stream to `address`, from hello to its end: whether the master welcomed us, and
        how the stream ended (None: with OK, or not at all: the worker is leaving)."""
        with self._mu:
            self._number += 1
            number = self._number
            self._call = None
            self._cancel_pending = False
        state = self._slots.begin_session(number)
        if state is None:  # leaving
            return False, None
        keepalive_ms = (max(_MIN_KEEPALIVE_MS, int(state.lease * 1000) // _KEEPALIVES_PER_LEASE)
                        if state.lease > 0 else _DEFAULT_KEEPALIVE_MS)
        # A fresh connection each time: one stalled in TCP's retransmission backoff would not
        # get through.
        try:
            channel = self._conn.channel(address, [("grpc.keepalive_time_ms", keepalive_ms),
                                          ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
                                          ("grpc.keepalive_permit_without_calls", 1),
                                          ("grpc.http2.max_pings_without_data", 0)])
        except errors.TaskmasterError as e:  # checked at start: the TLS files went away since
            self._slots.session_ended(False, e.message)
            return False, _Ended(grpc.StatusCode.FAILED_PRECONDITION, e.message)
        opened = threading.Event()  # the welcome came, or the stream ended without one
        welcomed = False
        error: Optional[grpc.RpcError] = None
        master_stopping = False
        try:
            # Requests are bytes already (no serializer): results arrive encoded.
            connect = channel.stream_stream(_CONNECT, request_serializer=None,
                                            response_deserializer=pb.MasterMessage.FromString)
            call = connect(self._requests(number, self._hello(state), opened),
                           metadata=self._conn.metadata)
            with self._mu:
                self._call = call
                cancel_now = self._cancel_pending
            if cancel_now:
                call.cancel()
            first = next(call)
            if not first.HasField("welcome"):
                call.cancel()
                raise _Ended(grpc.StatusCode.UNKNOWN,
                             "the first answer was no welcome: not a taskmaster master?")
            lost_state = self._slots.welcomed(_welcome(first.welcome))
            welcomed = True
            opened.set()
            if lost_state:
                log.warning("%s", lost_state)
            me = self._identity
            if first.welcome.partitions > 1:
                log.info("%s connected to master %s for partition %d of %d (epoch %s)", me.name,
                         address, me.partition, first.welcome.partitions,
                         first.welcome.master_epoch)
            else:
                log.info("%s connected to master %s (epoch %s)", me.name, address,
                         first.welcome.master_epoch)
            if me.on_partitions is not None:
                me.on_partitions(first.welcome.partitions)
            message = first
            while True:
                self._slots.received(
                    [(t.task_id, t.attempt, t.kind, t.payload, t.timeout_ms)
                     for t in message.tasks],
                    message.cancel, [(a.task_id, a.attempt) for a in message.acked],
                    message.heartbeat_echo)
                if message.shutting_down:
                    master_stopping = True
                    error = _Ended(grpc.StatusCode.UNAVAILABLE, "master stopping")
                    break
                message = next(call)
        except StopIteration:
            pass  # the master ended the stream with OK
        except grpc.RpcError as e:
            error = e
        finally:
            opened.set()
            self._slots.close_session()  # the sender returns
            channel.close()  # and the call ends, if it had not
        for line in self._slots.session_ended(master_stopping, _describe(error)):
            log.error("%s", line)
        return welcomed, error

    def _requests(self, number: int, hello: bytes, opened: threading.Event) -> Iterator[bytes]:
        # gRPC's own thread runs this (it cannot be joined as session.cc joins its sender): the
        # hello, then (once welcomed) whatever the accounting has to send on session `number`,
        # until it closes or the worker says bye.
        yield hello
        opened.wait()
        while True:
            out = self._slots.next_to_send(number)
            if out is None:
                return
            if out.empty():
                continue
            yield _encode(out)
            if out.bye:
                return

    def _hello(self, state: HelloState) -> bytes:
        me = self._identity
        message = pb.WorkerMessage()
        hello = message.hello
        hello.worker_id = me.worker_id
        hello.name = me.name
        hello.host = me.host
        hello.kinds.extend(me.kinds)
        hello.queues.extend(me.queues)
        hello.labels.update(me.labels)
        hello.slots = me.slots
        hello.partition = me.partition
        for task_id, attempt in state.held:
            hello.held.add(task_id=task_id, attempt=attempt)
        hello.master_epoch = state.master_epoch
        hello.worker_secret = state.worker_secret
        return message.SerializeToString()

    def _watchdog(self) -> None:
        while True:
            time.sleep(WATCHDOG_PERIOD)
            if self._poll is not None:
                self._poll()
            report = self._slots.watch()
            if report is None:
                return
            if report.cut_session:
                log.warning("master %s: %s; reconnecting on a fresh connection",
                            self._masters.current(), report.why)
                self._cancel_session(report.cut_session)
            for task_id, attempt in report.stuck:
                log.warning("task %d attempt %d: the handler is past its deadline and did not "
                            "stop; reported timed out, its slot stays busy until it returns",
                            task_id, attempt)
            if report.stopped + report.dropped > 0:
                log.warning("no heartbeat answered by the master for %.0f ms: stopped %d running "
                            "and dropped %d queued tasks before their leases lapse there (the "
                            "master hands them to others)", report.lease * 1000, report.stopped,
                            report.dropped)


class _Ended(grpc.RpcError):
    """How a stream ended that gRPC saw end well: the master said it is stopping, or was not a
    master."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _describe(error: Optional[grpc.RpcError]) -> str:
    if error is None:
        return "ended"
    return f"{error.code().name}: {error.details() or ''}"


def _welcome(w: "pb.Welcome") -> Welcome:
    return Welcome(master_epoch=w.master_epoch, heartbeat_interval_ms=w.heartbeat_interval_ms,
                   lease_timeout_ms=w.lease_timeout_ms,
                   revoked=[(r.task_id, r.attempt) for r in w.revoked],
                   echoes_heartbeats=w.echoes_heartbeats, worker_secret=w.worker_secret)


def _encode(out: ToMaster) -> bytes:
    """The message's own fields, then its results: protobuf reads the concatenation as one
    message."""
    head = pb.WorkerMessage()
    if out.credits:
        head.credits = out.credits
    if out.task_us:
        head.task_us = out.task_us
    if out.heartbeat_at_ms is not None:
        head.heartbeat = True
        head.heartbeat_at = out.heartbeat_at_ms
        head.stuck = out.stuck
    if out.draining:
        head.draining = True
    if out.bye:
        head.bye = True
    for task_id, attempt, done, total, message in out.progress:
        head.progress.add(task_id=task_id, attempt=attempt, done=done, total=total,
                          message=valid_utf8(message, MAX_PROGRESS_MESSAGE_BYTES).decode())
    if not out.results:
        return head.SerializeToString()
    return head.SerializeToString() + b"".join(out.results)
