"""The Python worker (taskmaster.worker) against a real master: the seed's scenario, many tasks
over two worker processes, a killed worker, drain, cancel, process pools, failures, progress,
refused tokens, argument checks.

Workers that fork a process pool, or that a test signals or kills, run in processes of their own
(conftest.WORKER_PROGRAM); the others run in a thread of the test process, where handlers can
tell the test what they saw.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable, Iterator, List, Optional

import pytest

from conftest import MASTER_FLAGS, TIMEOUT, Master, wait_for
from taskmaster._worker_slots import (Feed, Partitions, SharedCredits, Slots, SlotsOptions,
                                      Welcome)
from taskmaster.errors import PermissionDenied, Unauthenticated
from taskmaster.v1 import taskmaster_pb2 as pb
from taskmaster.worker import PermanentError, TaskContext, Worker


def squared(n: int) -> str:
    return "%d*%d=%d" % (n, n, n * n)


class RunningWorker:
    """A Worker whose run() runs in a thread of the test process; `error` is what it raised."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as e:  # noqa: B902 - the test looks at whatever it was
            self.error = e


@pytest.fixture
def run_in_thread(master: Master) -> Iterator[Callable[[Worker], RunningWorker]]:
    """Runs workers in threads, and waits until the master lists them; stops them at
    teardown."""
    running: List[RunningWorker] = []

    def run(worker: Worker, wait_connected: bool = True) -> RunningWorker:
        r = RunningWorker(worker)
        running.append(r)
        if wait_connected:
            wait_for(lambda: worker.name in master.connected_workers(),
                     f"worker {worker.name} to connect")
        return r

    yield run
    for r in running:
        r.worker.stop()
    for r in running:
        r.thread.join(TIMEOUT)
        assert not r.thread.is_alive(), f"worker {r.worker.name} did not stop"


def thread_worker(master: Master, name: str, **options) -> Worker:
    return Worker(master.address, token_file=str(master.work_token_file), name=name,
                  reconnect_max=0.5, **options)


@pytest.mark.parametrize("mp_context", ["fork", "spawn"])
def test_seed_scenario_ten_numbers_squared(master, start_worker, mp_context):
    start_worker("seed", pool="process", processes=2, mp_context=mp_context)
    out = master.taskctl("submit", "--kind", "square", "--wait", *map(str, range(1, 11)))
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()[1:]) == sorted(squared(n) for n in range(1, 11))


def test_2000_tasks_over_two_worker_processes_one_result_each(master, start_worker):
    start_worker("pair-a", pool="process", processes=1)
    start_worker("pair-b", pool="process", processes=1)
    job, ids = master.submit("square", [b"%d" % n for n in range(2000)])
    results = master.watch(job)
    assert sorted(r.id for r in results) == sorted(ids)
    number = {task_id: n for n, task_id in enumerate(ids)}
    for r in results:
        assert (r.state, r.output) == (pb.SUCCEEDED, squared(number[r.id]).encode())
    assert {r.worker for r in results} == {"pair-a", "pair-b"}
    assert master.stats().duplicate_results == 0


def test_killed_worker_task_finished_by_another(master, start_worker):
    doomed = start_worker("doomed")
    _, [task_id] = master.submit("first_attempt_hangs", [b""])
    wait_for(lambda: master.task(task_id).progress.message == "hanging", "the handler to start")
    doomed.proc.kill()
    doomed.proc.wait(TIMEOUT)
    start_worker("rescuer")
    task = master.wait_state(task_id, pb.SUCCEEDED)
    assert (task.output, task.worker, task.attempts) == (b"attempt 2", "rescuer", 2)


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_sigterm_drains_running_task_and_exits_0(master, start_worker, pool):
    w = start_worker(f"drained-{pool}", pool=pool, processes=1)
    _, [task_id] = master.submit("sleep", [b"1000"])
    wait_for(lambda: master.task(task_id).progress.message == "sleeping", "the handler to start")
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(TIMEOUT) == 0, w.log()
    task = master.task(task_id)
    assert (task.state, task.output) == (pb.SUCCEEDED, b"slept 1000 ms"), w.log()
    assert "draining" in w.log()
    assert f"drained-{pool}" not in master.connected_workers()


def test_cancel_reaches_running_thread_handler(master, run_in_thread):
    worker = thread_worker(master, "canceller")
    started = threading.Event()
    seen: List[bool] = []

    @worker.handler("wait")
    def wait(payload: bytes, ctx: TaskContext) -> str:
        started.set()
        ctx.cancel_event.wait(TIMEOUT)
        seen.append(ctx.cancelled)
        return "never recorded"

    previous = signal.getsignal(signal.SIGTERM)
    run_in_thread(worker)
    assert signal.getsignal(signal.SIGTERM) is previous  # not the main thread: no handlers
    _, [task_id] = master.submit("wait", [b""])
    wait_for(started.is_set, "the handler to start")
    assert master.cancel(task_id) == 1
    wait_for(lambda: seen, "the handler to return")
    assert seen == [True]
    assert master.wait_state(task_id, pb.CANCELLED).output == b""


def test_process_pool_handler(master, start_worker):
    # One process: a task after the cancelled one runs only once its handler saw the cancel.
    w = start_worker("processes", pool="process", processes=1)
    _, [pid_task] = master.submit("pid", [b""])
    pool_pid = int(master.wait_state(pid_task, pb.SUCCEEDED).output)
    assert pool_pid != w.proc.pid
    _, [task_id] = master.submit("until_cancelled", [b""])
    wait_for(lambda: master.task(task_id).progress.message == "waiting for a cancel",
             "progress from the pool process")
    assert master.cancel(task_id) == 1
    master.wait_state(task_id, pb.CANCELLED)
    _, [after] = master.submit("pid", [b""])
    assert int(master.wait_state(after, pb.SUCCEEDED, timeout=10).output) == pool_pid


def test_handler_failures(master, run_in_thread):
    worker = thread_worker(master, "failing")

    @worker.handler("boom")
    def boom(payload: bytes) -> bytes:
        raise ValueError(f"bad payload {payload.decode()}")

    @worker.handler("malformed")
    def malformed(payload: bytes) -> bytes:
        raise PermanentError("cannot parse this")

    run_in_thread(worker)
    _, [retried] = master.submit("boom", [b"x"], max_attempts=2)
    _, [permanent] = master.submit("malformed", [b""], max_attempts=3)
    task = master.wait_state(retried, pb.DEAD)
    assert task.attempts == 2 and "ValueError: bad payload x" in task.error
    task = master.wait_state(permanent, pb.DEAD)
    assert (task.attempts, task.error) == (1, "cannot parse this")


def test_progress_visible_while_running(master, run_in_thread):
    worker = thread_worker(master, "reporter")
    release = threading.Event()

    @worker.handler("report")
    def report(payload: bytes, ctx: TaskContext) -> bytes:
        ctx.progress(3, 10, "three of ten")
        release.wait(TIMEOUT)
        return b"done"

    run_in_thread(worker)
    _, [task_id] = master.submit("report", [b""])
    task = wait_for(lambda: (lambda t: t if t.progress.done == 3 else None)(master.task(task_id)),
                    "the progress to reach the master")
    assert (task.state, task.progress.total, task.progress.message) == \
        (pb.LEASED, 10, "three of ten")
    release.set()
    assert master.wait_state(task_id, pb.SUCCEEDED).output == b"done"


@pytest.mark.parametrize("token,error", [("not-a-token-0123456789", Unauthenticated),
                                         ("submit-token-for-tests-0123456789", PermissionDenied)])
def test_refused_token_raises_from_run(master, run_in_thread, token, error):
    worker = Worker(master.address, token=token, name="intruder")
    worker.handler("square")(lambda payload: payload)
    r = run_in_thread(worker, wait_connected=False)
    r.thread.join(TIMEOUT)
    assert isinstance(r.error, error), r.error


def test_stop_without_a_master():
    worker = Worker("127.0.0.1:1", token="t", name="alone")
    worker.handler("square")(lambda payload: payload)
    r = RunningWorker(worker)
    worker.stop()
    r.thread.join(TIMEOUT)
    assert not r.thread.is_alive() and r.error is None


def test_arguments_checked(monkeypatch):
    monkeypatch.delenv("TASKMASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="no master address"):
        Worker(token="t")
    for bad, exc in [(dict(threads=0), ValueError), (dict(threads="4"), TypeError),
                     (dict(processes=True), TypeError), (dict(prefetch=-1), ValueError),
                     (dict(queues="default"), TypeError), (dict(queues=["no spaces"]), ValueError),
                     (dict(labels={"k": 1}), TypeError), (dict(mp_context="threads"), ValueError),
                     (dict(drain_timeout=-1), ValueError), (dict(name=""), ValueError),
                     (dict(labels={"k": "\ud800"}), ValueError),
                     (dict(tls="/nonexistent/ca.pem"), ValueError)]:
        with pytest.raises(exc):
            Worker("127.0.0.1:1", token="t", **bad)
    worker = Worker("127.0.0.1:1", token="t")
    with pytest.raises(ValueError, match="no handler"):
        worker.run()
    with pytest.raises(ValueError, match="kind"):
        worker.handler("has space")
    with pytest.raises(ValueError, match="pool"):
        worker.handler("square", pool="fiber")
    with pytest.raises(TypeError, match="payload"):
        worker.handler("three")(lambda a, b, c: None)
    worker.handler("square")(lambda payload: payload)
    with pytest.raises(ValueError, match="twice"):
        worker.handler("square")(lambda payload: payload)
    assert worker.kinds == ["square"]


class TestDurableMaster:
    @pytest.fixture
    def master_flags(self, tmp_path):
        flags = list(MASTER_FLAGS)
        flags[flags.index("--store") + 1] = "sqlite"
        return flags + ["--data-dir", str(tmp_path / "data"), "--recovery-hold-ms", "5000"]

    def test_restarted_master_leases_held_task_back(self, master, start_worker):
        start_worker("loyal")
        _, [task_id] = master.submit("sleep", [b"1500"])
        wait_for(lambda: master.task(task_id).progress.message == "sleeping",
                 "the handler to start")
        master.stop(signal.SIGKILL)
        master.start()
        # The worker's hello names the task it holds (with the epoch and its secret): the
        # master leases it back at the same attempt, and takes its result.
        task = master.wait_state(task_id, pb.SUCCEEDED)
        assert (task.attempts, task.output, task.worker) == (1, b"slept 1500 ms", "loyal")


def test_master_losing_its_state(master, start_worker):
    w = start_worker("forgetful")
    _, [old] = master.submit("sleep", [b"2000"])
    wait_for(lambda: master.task(old).progress.message == "sleeping", "the handler to start")
    master.stop(signal.SIGKILL)
    master.start()  # the memory store: a new epoch, and task ids start again
    wait_for(lambda: "lost its state" in w.log(), "the worker to see the new epoch")
    _, [new] = master.submit("square", [b"7"])
    assert new == old  # the new task reuses the id the old handler still runs under
    assert master.wait_state(new, pb.SUCCEEDED).output == b"7*7=49"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def welcomed_slots(clock: FakeClock, epoch: str = "e1", feed: Optional[Feed] = None) -> Slots:
    slots = Slots(SlotsOptions(threads=1, prefetch=1, prefetch_max=1, prefetch_window=0.02,
                               progress_interval=0.5, feed=feed or Feed(), now=clock))
    assert slots.begin_session(1) is not None
    slots.welcomed(Welcome(master_epoch=epoch, heartbeat_interval_ms=200, lease_timeout_ms=2000,
                           revoked=[], echoes_heartbeats=True, worker_secret="s"))
    return slots


def make_task(task_id, attempt):
    """A task as the session makes it: a new tuple each time (the accounting tells a handler's
    task from a new lease of the same id by the tuple's identity)."""
    return task_id, attempt, "k", b"", 0


def result(t, outcome=1):
    return t, (t[0], t[1], outcome, b"r%d" % t[1])


def test_slots_new_lease_of_a_fenced_task_runs():
    clock = FakeClock()
    slots = welcomed_slots(clock)
    slots.received([make_task(5, 1)], [], [], 0)
    first, first_stop = slots.take_one()
    clock.now += 3  # no heartbeat echo for a whole lease: the task is fenced
    assert slots.watch().stopped == 1 and first_stop.is_set()
    slots.close_session()
    slots.session_ended(False, "")
    assert slots.begin_session(2).held == []  # the fenced task is not claimed
    slots.welcomed(Welcome("e1", 200, 2000, [], True, "s"))
    slots.received([make_task(5, 2)], [], [], 0)  # leased again, at the next attempt
    second, _ = slots.take_one()
    assert second[:2] == (5, 2)
    slots.finish([result(first)], 0.001)  # the orphan's result is dropped
    slots.finish([result(second)], 0.001)
    out = slots.next_to_send(2)
    assert out.results == [b"r2"]


def test_slots_tell_the_master_how_long_tasks_take():
    clock = FakeClock()
    slots = welcomed_slots(clock)
    first = slots.next_to_send(1)
    assert first.credits == 2 and first.task_us == 0  # nothing measured yet
    slots.received([make_task(5, 1)], [], [], 0)
    task, _ = slots.take_one()
    slots.finish([result(task)], 0.002)
    out = slots.next_to_send(1)
    assert out.credits == 1 and out.task_us == 2000  # the master packs a fast worker's tasks


def test_slots_new_epoch_drops_held_and_accepts_reused_ids():
    clock = FakeClock()
    slots = welcomed_slots(clock, "e1")
    slots.received([make_task(7, 1), make_task(8, 1)], [], [], 0)
    old, old_stop = slots.take_one()
    slots.close_session()
    slots.session_ended(False, "")
    assert sorted(slots.begin_session(2).held) == [(7, 1), (8, 1)]
    lost = slots.welcomed(Welcome("e2", 200, 2000, [], True, "s2"))
    assert "lost its state" in lost and old_stop.is_set()
    slots.received([make_task(7, 1)], [], [], 0)
    new, _ = slots.take_one()
    assert new is not old and new[:2] == (7, 1)
    slots.finish([result(old, outcome=2)], 0.001)
    slots.finish([result(new)], 0.001)
    assert slots.next_to_send(2).results == [b"r1"]
    assert slots.begin_session(3).held == [(7, 1)]  # its result, until acknowledged


def test_thread_and_process_pools_hold_a_stream_each(master, start_worker):
    w = start_worker("mixed", pools={"square": "process"}, processes=1)
    wait_for(lambda: {"mixed/thread", "mixed/process"} <= set(master.connected_workers()),
             "both pools to connect")
    _, [square] = master.submit("square", [b"12"])
    _, [pid] = master.submit("pid", [b""])
    task = master.wait_state(square, pb.SUCCEEDED)
    assert (task.output, task.worker) == (squared(12).encode(), "mixed/process")
    task = master.wait_state(pid, pb.SUCCEEDED)
    assert (int(task.output), task.worker) == (w.proc.pid, "mixed/thread")  # in the worker


def test_handler_ignoring_its_deadline_is_reported_timed_out(master, run_in_thread):
    worker = thread_worker(master, "stubborn")
    release = threading.Event()

    @worker.handler("stubborn")
    def stubborn(payload: bytes) -> bytes:
        release.wait(TIMEOUT)  # deaf to its deadline and to cancels
        return b"too late"

    run_in_thread(worker)
    try:
        _, [task_id] = master.submit("stubborn", [b""], timeout_ms=200, max_attempts=1)
        task = master.wait_state(task_id, pb.DEAD)
        assert "timed out after 200 ms" in task.error and "did not stop" in task.error
        wait_for(lambda: [w.stuck for w in master.stats().workers if w.name == "stubborn"] == [1],
                 "the master to show the stuck handler")
    finally:
        release.set()


def test_partitions_take_from_each_with_its_accounting():
    clock = FakeClock()
    partitions = Partitions(Feed(), threads=1)
    first = welcomed_slots(clock, feed=partitions.feed)
    second = welcomed_slots(clock, feed=partitions.feed)
    partitions.add(first)
    partitions.add(second)
    seen = partitions.feed.ticks()
    in_second = make_task((1 << 48) + 5, 1)  # a task id carries its partition
    second.received([in_second], [], [], 0)
    assert partitions.feed.wait(seen)  # queuing told the feed
    accounting, task, _ = partitions.take_one()
    assert task is in_second and accounting is second
    first.received([make_task(6, 1)], [], [], 0)
    assert [(a, t[0]) for a, t in partitions.take(5)] == [(first, 6)]
    accounting.finish([result(in_second)], 0.002)
    assert first.next_to_send(1).results == []
    assert second.next_to_send(1).results == [b"r1"]
    assert partitions.take_one() is None
    partitions.feed.close()
    assert not partitions.feed.wait(partitions.feed.ticks())


def test_shared_credits_idle_partition_keeps_one_and_busy_ones_share_the_pool():
    credits = SharedCredits()
    assert credits.allow(0, 0, 0, 10) == 10  # alone so far: the whole pool
    assert credits.allow(1, 0, 0, 10) == 5  # no partition has tasks: each its part
    assert credits.allow(0, 10, 0, 10) == 0
    assert credits.allow(1, 0, 0, 10) == 1  # one credit waits at the idle partition
    assert credits.allow(1, 1, 0, 10) == 0  # it has a task now, held back below its share
    assert credits.take_waiting(0) and not credits.take_waiting(0)
    to_one = 0
    for held in range(9, 4, -1):  # partition 0 finishes tasks: the room goes to partition 1
        assert credits.allow(0, held, 0, 10) == 0
        to_one += credits.allow(1, 1, to_one, 10)
    assert to_one == 4  # its share: five with the task it holds
    assert credits.allow(0, 4, 0, 10) == 1  # back to its own share
    assert not credits.take_waiting(1)


def test_slots_room_opened_in_one_partition_goes_to_the_one_held_back():
    clock = FakeClock()
    credits = SharedCredits()
    partitions = Partitions(Feed(), threads=4)

    def make(member: int) -> Slots:
        return Slots(SlotsOptions(threads=4, prefetch=0, prefetch_max=0, prefetch_window=0.02,
                                  progress_interval=0.5, feed=partitions.feed,
                                  shared_credits=credits, member=member, now=clock,
                                  on_room=lambda: [s.top_up() for s in partitions.all()]))

    first, second = make(0), make(1)
    partitions.add(first)
    partitions.add(second)
    welcome = Welcome("e1", 200, 2000, [], True, "s")
    first.begin_session(1)
    first.welcomed(welcome)
    assert first.next_to_send(1).credits == 4  # alone so far
    tasks = [make_task(i, 1) for i in range(1, 5)]
    first.received(tasks, [], [], 0)
    assert [t[0] for t in first.take(4)] == [1, 2, 3, 4]
    second.begin_session(1)
    second.welcomed(welcome)
    assert second.next_to_send(1).credits == 1  # one waits at the idle partition
    second.received([make_task((1 << 48) + 5, 1)], [], [], 0)
    first.finish([result(tasks[0])], 0.001)  # task 5 takes the thread
    clock.now += 1
    assert first.next_to_send(1).credits == 0 and second.next_to_send(1).credits == 0
    first.finish([result(tasks[1])], 0.001)
    clock.now += 1
    assert first.next_to_send(1).credits == 0  # partition 0 holds its share of two
    assert second.next_to_send(1).credits == 1  # partition 1 gets the room that opened


def test_cancel_ring_forgets_one_partitions_stops_only():
    import multiprocessing as mp
    from taskmaster._worker_pools import _CancelRing, _CancelView
    ring = _CancelRing(mp.get_context("fork"))
    view = _CancelView(ring)
    in_zero, in_one = (7, 1), ((1 << 48) + 7, 1)
    ring.add(*in_zero)
    ring.add(*in_one)
    assert in_zero in view and in_one in view
    ring.forget(0)  # partition 0's master lost its state: its ids may come again as new tasks
    assert in_zero not in view and in_one in view
