"""What a handler sees of its task (TaskContext), and how a handler's return becomes the result the
master records: the Python side of worker/pool.cc's RunTask. Runs in the worker's threads and in
its pool processes alike; no gRPC here.
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Callable, NamedTuple, Optional, Protocol, Tuple

from ._worker_wire import (CANCELLED, FAILED, MAX_PROGRESS_MESSAGE_BYTES, SUCCEEDED,
                           encode_result)

# (task_id, attempt, done, total, message) of a running task, to whoever sends it to the master.
ProgressSink = Callable[[int, int, int, int, str], None]


class PermanentError(Exception):
    """Raise it from a handler for a failure no retry can fix (a malformed payload, say): the
    task goes DEAD at once instead of being retried. Any other exception fails only this
    attempt."""


class StopSignal(Protocol):
    """What tells a handler to stop: a threading.Event in thread pools; in pool processes, an
    object with the same is_set() and wait()."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: Optional[float] = None) -> bool: ...


class Handler(NamedTuple):
    """A registered handler: its function, whether it takes a TaskContext, and its pool."""

    fn: Callable[..., Any]
    takes_context: bool
    pool: str


def takes_context(fn: Callable[..., Any]) -> bool:
    """Whether `fn` is called as fn(payload, ctx) rather than fn(payload); raises TypeError for
    any other signature."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as e:
        raise TypeError(f"cannot read the signature of handler {fn!r}: {e}") from None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    variadic = any(p.kind == p.VAR_POSITIONAL for p in params)
    required_kw = [p for p in params if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    if required_kw or len(required) > 2 or (not positional and not variadic):
        raise TypeError(f"handler {getattr(fn, '__qualname__', fn)!r} must take (payload) or "
                        f"(payload, ctx), not {inspect.signature(fn)}")
    return len(positional) >= 2 or variadic


class TaskContext:
    """What a handler sees of the task it runs, given as its second argument when it takes two.

    Attributes: `task_id`, `attempt` (1 for the first run), `kind`, `payload` (bytes), and
    `deadline`: the time.monotonic() by which the task must be done (from its timeout), or None.
    """

    __slots__ = ("task_id", "attempt", "kind", "payload", "deadline", "_stop", "_sink")

    def __init__(self, task_id: int, attempt: int, kind: str, payload: bytes,
                 deadline: Optional[float], stop: StopSignal, sink: ProgressSink) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self.kind = kind
        self.payload = payload
        self.deadline = deadline
        self._stop = stop
        self._sink = sink

    @property
    def cancelled(self) -> bool:
        """True once the task was cancelled, or the worker must stop it (its lease may have
        lapsed, the worker is stopping): the handler should return soon; its result is not
        recorded as a success."""
        return self._stop.is_set()

    @property
    def cancel_event(self) -> StopSignal:
        """Set when `cancelled` turns true: wait on it (`ctx.cancel_event.wait(5)`) instead of
        sleeping. A threading.Event in thread pools; an object with its is_set() and wait() in
        process pools."""
        return self._stop

    @property
    def should_stop(self) -> bool:
        """`cancelled`, or the deadline has passed."""
        return self._stop.is_set() or (self.deadline is not None
                                       and time.monotonic() >= self.deadline)

    def time_left(self) -> Optional[float]:
        """Seconds until the deadline (negative once past), or None without one."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def sleep(self, seconds: float) -> bool:
        """Sleeps up to `seconds`, waking early when the handler should stop (cancelled, or the
        deadline passed). Returns True when it slept the whole time."""
        until = time.monotonic() + seconds
        if self.deadline is not None and self.deadline < until:
            self._stop.wait(max(0.0, self.deadline - time.monotonic()))
            return False
        return not self._stop.wait(max(0.0, until - time.monotonic()))

    def progress(self, done: int, total: int = 0, message: str = "") -> None:
        """Reports how far the task has come (`done` of `total`, 0: unknown, and a few words,
        cut to 256 bytes). Cheap to call often: the worker sends the latest at most every
        progress interval."""
        if not isinstance(done, int) or not isinstance(total, int):
            raise TypeError("progress: done and total must be integers")
        if not isinstance(message, str):
            raise TypeError("progress: message must be a str")
        # Cut to as many characters as the master keeps bytes (the bytes are cut when sent):
        # a long message should not travel whole through the worker's pipes.
        self._sink(self.task_id, self.attempt, done, total,
                   message[:MAX_PROGRESS_MESSAGE_BYTES])


def _no_progress(task_id: int, attempt: int, done: int, total: int, message: str) -> None:
    """The sink of a handler that takes no context: it cannot report."""


def run_task(handler: Optional[Handler], task: Tuple[int, int, str, bytes, int],
             stop: StopSignal, sink: ProgressSink, max_output: int, worker_name: str
             ) -> Tuple[int, bytes]:
    """Runs one task's handler; returns (outcome, the result's encoded WorkerMessage entry)."""
    task_id, attempt, kind, payload, timeout_ms = task
    if handler is None:
        return FAILED, encode_result(task_id, attempt, FAILED,
                                     error=f"worker {worker_name} does not run kind '{kind}'")
    deadline = time.monotonic() + timeout_ms / 1000.0 if timeout_ms > 0 else None
    error = ""
    permanent = False
    output: Any = None
    try:
        if handler.takes_context:
            output = handler.fn(payload, TaskContext(task_id, attempt, kind, payload, deadline,
                                                     stop, sink))
        else:
            output = handler.fn(payload)
    except PermanentError as e:
        error, permanent = str(e) or type(e).__name__, True
    except BaseException as e:  # noqa: B902 - a handler's sys.exit() must not end a pool thread
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if stop.is_set():
        return CANCELLED, encode_result(task_id, attempt, CANCELLED,
                                        error="cancelled while running")
    if deadline is not None and time.monotonic() >= deadline:
        return FAILED, encode_result(task_id, attempt, FAILED,
                                     error=f"timed out after {timeout_ms} ms")
    if error:
        return FAILED, encode_result(task_id, attempt, FAILED, error=error, permanent=permanent)
    if output is None:
        data = b""
    elif isinstance(output, bytes):
        data = output
    elif isinstance(output, str):
        data = output.encode("utf-8", "surrogateescape")
    elif isinstance(output, (bytearray, memoryview)):
        data = bytes(output)
    else:
        # The same handler fails the same way on every attempt.
        return FAILED, encode_result(
            task_id, attempt, FAILED, permanent=True,
            error=f"handler returned {type(output).__name__}; it must return bytes, str or None")
    if len(data) > max_output:
        # It could never reach the master: a result the stream cannot carry would be refused,
        # and resent, forever.
        return FAILED, encode_result(
            task_id, attempt, FAILED, permanent=True,
            error=f"output of {len(data)} bytes is over the {max_output} a result may carry "
                  "(max_message_bytes)")
    return SUCCEEDED, encode_result(task_id, attempt, SUCCEEDED, data)
