"""Submit work to a taskmaster master and follow it (the blocking API; taskmaster.aio has the same
names for asyncio).

    from taskmaster import Client

    with Client("master.example:7070", token_file="/etc/taskmaster/submit.token") as client:
        job = client.submit("square", [str(n) for n in range(10)])
        for result in job.results():          # as they complete, each once
            print(result.text)

Payloads are bytes or str (sent as UTF-8); results come back as bytes, with a .text helper.
Failed calls raise taskmaster.errors.TaskmasterError subclasses carrying the gRPC status code
and the master's message.
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator, List, Mapping, Optional, Union

import grpc

from . import _client_common as common
from . import _conn, errors
from ._client_common import (JobStatus, Payload, Result, Stats, TaskInfo, WorkerInfo)
from .v1 import taskmaster_pb2 as pb
from .v1 import taskmaster_pb2_grpc as pb_grpc

__all__ = ["Client", "Job", "Result", "JobStatus", "TaskInfo", "Stats", "WorkerInfo"]


class Client:
    """A connection to a master for submitting and following work.

    `address` is host:port (default: $TASKMASTER_ADDR), or several comma-separated: masters
    sharing a PostgreSQL store, of which the client finds and follows the one that serves; the token comes from `token`,
    `token_file` or $TASKMASTER_TOKEN; `tls` is a CA file path or a taskmaster.TLS for mutual
    TLS. `timeout` bounds each call (seconds); `reconnect_timeout` is how long a job's results
    are looked for while the master is unreachable (a restart, say) before giving up.
    """

    def __init__(self, address: Optional[str] = None, *, token: Optional[str] = None,
                 token_file: Optional[str] = None, tls: Union[_conn.TLS, str, None] = None,
                 timeout: float = 30.0, reconnect_timeout: float = 60.0,
                 max_message_bytes: int = _conn.DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._conn = _conn.resolve(address, token, token_file, tls, max_message_bytes)
        self._timeout = timeout
        self._reconnect_timeout = reconnect_timeout
        self._masters = _conn.Masters(self._conn.address)
        self._channels = {a: self._conn.channel(a, common.CHANNEL_OPTIONS)
                          for a in self._masters.all}
        self._stubs = {a: pb_grpc.TaskQueueStub(c) for a, c in self._channels.items()}

    @property
    def address(self) -> str:
        return self._conn.address

    def close(self) -> None:
        """Closes the connection; the client is unusable afterwards."""
        for channel in self._channels.values():
            channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, kind: str, payloads: Iterable[Payload], *, queue: str = "",
               priority: int = 0, delay: Optional[float] = None, timeout: Optional[float] = None,
               max_attempts: int = 0, key: Optional[str] = None,
               labels: Optional[Mapping[str, str]] = None,
               batch_size: int = common.DEFAULT_BATCH_SIZE) -> "Job":
        """Submits one task per payload as one job and returns it once every task is stored.

        `payloads` may be any iterable, of any size (a generator reading a file, say): it is
        sent `batch_size` tasks per call, and the job takes them all. `delay` and `timeout` are
        seconds (None: none, and the master's default); `max_attempts` 0 takes the master's;
        `key` is an idempotency key (one task: the key; several: key/0, key/1 ...), which makes
        the job resubmittable as a whole, so it covers at most `batch_size` payloads; `labels`
        must all be carried by the worker that runs a task. A full queue or a tenant's limit is
        waited out (up to `reconnect_timeout` per batch); if a later batch fails for good, the
        job is closed with what it has and the error raised.
        """
        plan = common.SubmitPlan(common.make_options(kind, queue, priority, delay, timeout,
                                                     max_attempts, key, labels, batch_size),
                                 payloads)
        response = self._call("Submit", plan.first())
        job = Job(self, response.job_id, list(response.task_ids), list(response.warnings))
        try:
            request = plan.next(job.id)
            while request is not None:
                response = self._append(request)
                if response.duplicate or job.task_ids is None:
                    job.task_ids = None  # that batch's answer was lost, and its ids with it
                else:
                    job.task_ids.extend(response.task_ids)
                request = plan.next(job.id)
        except BaseException:  # the input failing or an interrupt too: the job must not hang
            # Closed as it is, so that it completes and its followers end. The failed batch may
            # have been stored all the same (its answer lost): then the next number closes it.
            for number in (n for n in (plan.number, plan.number + 1) if n >= 1):
                try:
                    closed = self._append(plan.closing(job.id, number))
                except errors.TaskmasterError:
                    break
                if not closed.duplicate:
                    break
            raise
        return job

    def job(self, job_id: str) -> "Job":
        """A job submitted earlier (by anyone of this token's tenant), to follow or cancel."""
        return Job(self, job_id, None, [])

    def task(self, task_id: int) -> TaskInfo:
        """Everything the master knows of one task, its payload and progress included."""
        return common.task_of(self._call("GetTask", pb.GetTaskRequest(id=task_id)))

    def cancel_task(self, task_id: int) -> int:
        """Cancels a task (its worker is told to stop it); returns 1, or 0 if it had finished."""
        return self._call("Cancel", pb.CancelRequest(task_id=task_id)).cancelled

    def stats(self) -> Stats:
        """Queue counts and the workers the masters know. With the queues split into
        partitions, every master serving some is asked (the masters name each other) and the
        answers merged; `complete` says whether every partition was counted."""
        return common.stats_of(self._every_partition("Stats", pb.StatsRequest()))

    def workers(self) -> List[WorkerInfo]:
        """The workers the masters know (of every partition, as stats())."""
        response = self._every_partition("Workers", pb.WorkersRequest())
        return [common.worker_of(w) for w in response.workers]

    # ---- internals ----

    def _call(self, method: str, request):  # type: ignore[no-untyped-def]
        """A unary call of the stub's `method`, at the master that serves."""
        deadline = time.monotonic() + _conn.FAILOVER_S
        while True:
            address = self._masters.current()
            try:
                response = getattr(self._stubs[address], method)(
                    request, timeout=self._timeout, metadata=self._conn.metadata)
                self._masters.served(address)
                return response
            except grpc.RpcError as e:
                pause = _conn.fail_over(self._masters, address, e, deadline)
                if pause is None:
                    raise errors.from_rpc_error(e, address) from None
            time.sleep(pause)

    def _every_partition(self, method: str, request):  # type: ignore[no-untyped-def]
        walk = common.EveryPartition(self._call(method, request), self._masters.current())
        address = walk.next()
        while address is not None:
            walk.add(address, self._call_at(address, method, request))
            address = walk.next()
        return walk.merged

    def _call_at(self, address: str, method: str, request):  # type: ignore[no-untyped-def]
        """One call at `address` (a master the others named, perhaps not in this client's
        list); None when it fails."""
        try:
            channel = None if address in self._stubs else self._conn.channel(
                address, common.CHANNEL_OPTIONS)
        except errors.TaskmasterError:  # its TLS files went away since
            return None
        stub = self._stubs[address] if channel is None else pb_grpc.TaskQueueStub(channel)
        try:
            return getattr(stub, method)(request, timeout=self._timeout,
                                         metadata=self._conn.metadata)
        except grpc.RpcError:
            return None
        finally:
            if channel is not None:
                channel.close()

    def _append(self, request: pb.SubmitRequest) -> pb.SubmitResponse:
        """A later batch of an open job: a lost answer or a master restarting is retried with
        the same batch number, which the master applies once."""
        deadline = time.monotonic() + self._reconnect_timeout
        backoff = common.Backoff()
        while True:
            address = self._masters.current()
            try:
                return self._stubs[address].Submit(request, timeout=self._timeout,
                                                   metadata=self._conn.metadata)
            except grpc.RpcError as e:
                pause = common.retry_pause(e.code(), deadline, backoff)
                if pause is None:
                    raise errors.from_rpc_error(e, address) from None
                if not self._masters.failed(address, _conn.serving_master(e)):
                    pause = 0.0  # the next master at once
            time.sleep(pause)

    def _follow(self, job_id: str, timeout: Optional[float]) -> Iterator[Result]:
        state = common.Follow(job_id, self._conn.address, timeout, self._reconnect_timeout)
        while True:
            address = self._masters.current()
            stream = self._stubs[address].WatchJob(state.request(), timeout=state.remaining(),
                                                   metadata=self._conn.metadata)
            code: Optional[grpc.StatusCode] = None
            details = ""
            serving_at = ""
            try:
                for event in stream:
                    yield from state.on_event(event)
                    if state.complete:
                        return
            except grpc.RpcError as e:
                code, details, serving_at = e.code(), e.details() or "", _conn.serving_master(e)
            finally:
                stream.cancel()  # also when the caller stops iterating early
            pause = state.on_end(code, details)
            # Given several masters, the next one (or the one a standby named) at once.
            time.sleep(pause if self._masters.failed(address, serving_at) else 0.0)


class Job:
    """A submitted job: its id, its tasks' ids (in the order of the payloads; None when the
    answer to one of its calls was lost, so that call's ids are unknown, or for a job found by
    id), and the master's warnings (such as a kind no connected worker runs)."""

    def __init__(self, client: Client, job_id: str, task_ids: Optional[List[int]],
                 warnings: List[str]) -> None:
        self._client = client
        self.id = job_id
        self.task_ids = task_ids
        self.warnings = warnings

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def results(self, timeout: Optional[float] = None) -> Iterator[Result]:
        """Yields the job's results as its tasks finish, in completion order, each once, until
        the last; it follows the job across a restart of the master. Raises TimeoutError when
        `timeout` seconds pass first."""
        return self._client._follow(self.id, timeout)

    def wait(self, timeout: Optional[float] = None) -> JobStatus:
        """Blocks until every task of the job finished; returns the job's final counts. Raises
        TimeoutError when `timeout` seconds pass first."""
        for _ in self.results(timeout):
            pass
        return self.status()

    def status(self) -> JobStatus:
        """The job's counts now."""
        client = self._client
        return common.status_of(client._call("GetJob", pb.GetJobRequest(job_id=self.id)))

    def cancel(self) -> int:
        """Cancels every unfinished task of the job; returns how many were cancelled."""
        client = self._client
        return client._call("Cancel", pb.CancelRequest(job_id=self.id)).cancelled
