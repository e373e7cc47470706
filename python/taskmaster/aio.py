"""The client for asyncio (grpc.aio), with the names of taskmaster.client.

    from taskmaster.aio import Client

    async with Client("master.example:7070", token_file="submit.token") as client:
        job = await client.submit("square", [str(n) for n in range(10)])
        async for result in job.results():
            print(result.text)
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Iterable, List, Mapping, Optional, Union

import grpc
import grpc.aio

from . import _client_common as common
from . import _conn, errors
from ._client_common import JobStatus, Payload, Result, Stats, TaskInfo, WorkerInfo
from .v1 import taskmaster_pb2 as pb
from .v1 import taskmaster_pb2_grpc as pb_grpc

__all__ = ["Client", "Job"]


class Client:
    """taskmaster.client.Client for asyncio: the same arguments; its methods are coroutines."""

    def __init__(self, address: Optional[str] = None, *, token: Optional[str] = None,
                 token_file: Optional[str] = None, tls: Union[_conn.TLS, str, None] = None,
                 timeout: float = 30.0, reconnect_timeout: float = 60.0,
                 max_message_bytes: int = _conn.DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._conn = _conn.resolve(address, token, token_file, tls, max_message_bytes)
        self._timeout = timeout
        self._reconnect_timeout = reconnect_timeout
        self._masters = _conn.Masters(self._conn.address)
        self._channels = {a: self._conn.aio_channel(a, common.CHANNEL_OPTIONS)
                          for a in self._masters.all}
        self._stubs = {a: pb_grpc.TaskQueueStub(c) for a, c in self._channels.items()}

    @property
    def address(self) -> str:
        return self._conn.address

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(self, kind: str, payloads: Iterable[Payload], *, queue: str = "",
                     priority: int = 0, delay: Optional[float] = None,
                     timeout: Optional[float] = None, max_attempts: int = 0,
                     key: Optional[str] = None, labels: Optional[Mapping[str, str]] = None,
                     batch_size: int = common.DEFAULT_BATCH_SIZE) -> "Job":
        """See taskmaster.client.Client.submit."""
        plan = common.SubmitPlan(common.make_options(kind, queue, priority, delay, timeout,
                                                     max_attempts, key, labels, batch_size),
                                 payloads)
        response = await self._call("Submit", plan.first())
        job = Job(self, response.job_id, list(response.task_ids), list(response.warnings))
        try:
            request = plan.next(job.id)
            while request is not None:
                response = await self._append(request)
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
                    closed = await self._append(plan.closing(job.id, number))
                except errors.TaskmasterError:
                    break
                if not closed.duplicate:
                    break
            raise
        return job

    def job(self, job_id: str) -> "Job":
        """A job submitted earlier, to follow or cancel."""
        return Job(self, job_id, None, [])

    async def task(self, task_id: int) -> TaskInfo:
        return common.task_of(await self._call("GetTask",
                                               pb.GetTaskRequest(id=task_id)))

    async def cancel_task(self, task_id: int) -> int:
        return (await self._call("Cancel", pb.CancelRequest(task_id=task_id))).cancelled

    async def stats(self) -> Stats:
        return common.stats_of(await self._every_partition("Stats", pb.StatsRequest()))

    async def workers(self) -> List[WorkerInfo]:
        response = await self._every_partition("Workers", pb.WorkersRequest())
        return [common.worker_of(w) for w in response.workers]

    # ---- internals ----

    async def _call(self, method: str, request):  # type: ignore[no-untyped-def]
        """A unary call of the stub's `method`, at the master that serves."""
        deadline = time.monotonic() + _conn.FAILOVER_S
        while True:
            address = self._masters.current()
            try:
                response = await getattr(self._stubs[address], method)(
                    request, timeout=self._timeout, metadata=self._conn.metadata)
                self._masters.served(address)
                return response
            except grpc.aio.AioRpcError as e:
                pause = _conn.fail_over(self._masters, address, e, deadline)
                if pause is None:
                    raise errors.from_rpc_error(e, address) from None
            await asyncio.sleep(pause)

    async def _every_partition(self, method: str, request):  # type: ignore[no-untyped-def]
        walk = common.EveryPartition(await self._call(method, request), self._masters.current())
        address = walk.next()
        while address is not None:
            walk.add(address, await self._call_at(address, method, request))
            address = walk.next()
        return walk.merged

    async def _call_at(self, address: str, method: str, request):  # type: ignore[no-untyped-def]
        try:
            channel = None if address in self._stubs else self._conn.aio_channel(
                address, common.CHANNEL_OPTIONS)
        except errors.TaskmasterError:  # its TLS files went away since
            return None
        stub = self._stubs[address] if channel is None else pb_grpc.TaskQueueStub(channel)
        try:
            return await getattr(stub, method)(request, timeout=self._timeout,
                                               metadata=self._conn.metadata)
        except grpc.aio.AioRpcError:
            return None
        finally:
            if channel is not None:
                await channel.close()

    async def _append(self, request: pb.SubmitRequest) -> pb.SubmitResponse:
        deadline = time.monotonic() + self._reconnect_timeout
        backoff = common.Backoff()
        while True:
            address = self._masters.current()
            try:
                return await self._stubs[address].Submit(request, timeout=self._timeout,
                                                         metadata=self._conn.metadata)
            except grpc.aio.AioRpcError as e:
                pause = common.retry_pause(e.code(), deadline, backoff)
                if pause is None:
                    raise errors.from_rpc_error(e, address) from None
                if not self._masters.failed(address, _conn.serving_master(e)):
                    pause = 0.0  # the next master at once
            await asyncio.sleep(pause)

    async def _follow(self, job_id: str, timeout: Optional[float]) -> AsyncIterator[Result]:
        state = common.Follow(job_id, self._conn.address, timeout, self._reconnect_timeout)
        while True:
            address = self._masters.current()
            call = self._stubs[address].WatchJob(state.request(), timeout=state.remaining(),
                                                 metadata=self._conn.metadata)
            code: Optional[grpc.StatusCode] = None
            details = ""
            serving_at = ""
            try:
                async for event in call:
                    for result in state.on_event(event):
                        yield result
                    if state.complete:
                        return
            except grpc.aio.AioRpcError as e:
                code, details, serving_at = e.code(), e.details() or "", _conn.serving_master(e)
            finally:
                call.cancel()  # also when the caller stops iterating early
            pause = state.on_end(code, details)
            # Given several masters, the next one (or the one a standby named) at once.
            await asyncio.sleep(pause if self._masters.failed(address, serving_at) else 0.0)


class Job:
    """taskmaster.client.Job for asyncio."""

    def __init__(self, client: Client, job_id: str, task_ids: Optional[List[int]],
                 warnings: List[str]) -> None:
        self._client = client
        self.id = job_id
        self.task_ids = task_ids
        self.warnings = warnings

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def results(self, timeout: Optional[float] = None) -> AsyncIterator[Result]:
        """An async iterator of the job's results, as taskmaster.client.Job.results."""
        return self._client._follow(self.id, timeout)

    async def wait(self, timeout: Optional[float] = None) -> JobStatus:
        async for _ in self.results(timeout):
            pass
        return await self.status()

    async def status(self) -> JobStatus:
        client = self._client
        return common.status_of(await client._call("GetJob",
                                                   pb.GetJobRequest(job_id=self.id)))

    async def cancel(self) -> int:
        client = self._client
        return (await client._call("Cancel",
                                   pb.CancelRequest(job_id=self.id))).cancelled
