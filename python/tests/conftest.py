"""Fixtures shared by the Python library's tests: the build tree's binaries, a real master on a
loopback port the OS picks (tokens in a temp dir, the memory store, fast timers), stopped by PID
at teardown; raw stub calls to it; Python workers in processes of their own.

Run from the repository root:
    PYTHONPATH=build/python /usr/bin/python3 -m pytest -q python/tests
TASKMASTER_BUILD_DIR names another build tree (default: build).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import grpc
import pytest

from taskmaster.v1 import taskmaster_pb2 as pb, taskmaster_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
SUBMIT_TOKEN = "submit-token-for-tests-0123456789"
WORK_TOKEN = "work-token-for-tests-0123456789"
ADMIN_TOKEN = "admin-token-for-tests-0123456789"
# Fast timers, as tests/harness.cc gives its masters: short leases and grace so that a killed
# worker's task runs elsewhere within seconds, quick retries.
MASTER_FLAGS = ["--store", "memory", "--tick-ms", "50", "--heartbeat-ms", "200",
                "--lease-timeout-ms", "2000", "--reconnect-grace-ms", "500",
                "--retry-backoff-ms", "100", "--shutdown-timeout-ms", "1000",
                "--log-level", "warn"]
# Every wait of the tests is bounded by this unless it says otherwise.
TIMEOUT = 20.0


def wait_for(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Polls `condition` until it returns something true, which it returns; fails the test
    naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0
                 ) -> Optional[int]:
    """Signals a process the tests started (by its PID), then kills it if it outlives
    `timeout`. Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


@pytest.fixture(scope="session")
def build_dir() -> Path:
    """The build tree (TASKMASTER_BUILD_DIR, default build): skips when the binaries are not
    built."""
    path = Path(os.environ.get("TASKMASTER_BUILD_DIR", "build"))
    path = path if path.is_absolute() else REPO / path
    for binary in ("master/taskmaster", "client/taskctl"):
        if not os.access(path / binary, os.X_OK):
            pytest.skip(f"{path / binary} is not built (cmake --build {path}); "
                        "set TASKMASTER_BUILD_DIR for another build tree")
    return path


class Master:
    """A master process on loopback with submit, work and admin tokens."""

    def __init__(self, build: Path, directory: Path, flags: Sequence[str]) -> None:
        self.build = build
        self.dir = directory
        self.flags = list(flags)
        self.tokens = directory / "tokens"
        self.tokens.write_text(f"submit {SUBMIT_TOKEN}\nwork {WORK_TOKEN}\nadmin {ADMIN_TOKEN}\n")
        self.submit_token_file = directory / "submit.token"
        self.work_token_file = directory / "work.token"
        self.submit_token_file.write_text(SUBMIT_TOKEN + "\n")
        self.work_token_file.write_text(WORK_TOKEN + "\n")
        for f in (self.tokens, self.submit_token_file, self.work_token_file):
            f.chmod(0o600)
        self.starts = 0
        self.port = 0
        self.channel: Optional[grpc.Channel] = None
        self.start()
        # Every call: the submit token, bounded, and waiting out a restart of the master.
        self.call = dict(metadata=(("authorization", f"Bearer {SUBMIT_TOKEN}"),),
                         timeout=TIMEOUT, wait_for_ready=True)

    def start(self) -> None:
        """Starts the master, or starts it again on its port once it has stopped."""
        port_file = self.dir / "port"
        port_file.unlink(missing_ok=True)
        self.log_path = self.dir / f"master-{self.starts}.log"
        self.starts += 1
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(self.build / "master/taskmaster"), "--listen", f"127.0.0.1:{self.port}",
                 "--admin-listen", "127.0.0.1:0",
                 "--tokens", str(self.tokens), "--port-file", str(port_file), *self.flags],
                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: port_file.exists() and port_file.read_text().strip()
                     or self.proc.poll() is not None, "the master to listen")
            if self.proc.poll() is not None:
                pytest.fail(f"the master exited: {self.log_path.read_text()}")
        except BaseException:
            stop_process(self.proc)
            raise
        self.port = int(port_file.read_text())
        self.address = f"127.0.0.1:{self.port}"
        # A new channel: the last one's connection went with the master it reached.
        if self.channel is not None:
            self.channel.close()
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.TaskQueueStub(self.channel)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.proc, sig)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.stop()

    def submit(self, kind: str, payloads: Sequence[bytes], **spec: Any) -> Tuple[str, List[int]]:
        """Submits one task per payload; returns the job id and the task ids."""
        request = pb.SubmitRequest(tasks=[pb.TaskSpec(kind=kind, payload=p, **spec)
                                          for p in payloads])
        response = self.stub.Submit(request, **self.call)
        return response.job_id, list(response.task_ids)

    def task(self, task_id: int) -> "pb.TaskInfo":
        return self.stub.GetTask(pb.GetTaskRequest(id=task_id), **self.call)

    def job(self, job_id: str) -> "pb.JobInfo":
        return self.stub.GetJob(pb.GetJobRequest(job_id=job_id), **self.call)

    def cancel(self, task_id: int) -> int:
        return self.stub.Cancel(pb.CancelRequest(task_id=task_id), **self.call).cancelled

    def stats(self) -> "pb.StatsResponse":
        return self.stub.Stats(pb.StatsRequest(), **self.call)

    def connected_workers(self) -> List[str]:
        workers = self.stub.Workers(pb.WorkersRequest(), **self.call)
        return sorted(w.name for w in workers.workers if w.connected)

    def watch(self, job_id: str) -> List["pb.TaskInfo"]:
        """Every result of a job, in completion order, once the job finished."""
        results: List[pb.TaskInfo] = []
        for event in self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id),
                                        **self.call):
            results.extend(event.results)
        return results

    def wait_state(self, task_id: int, state: int, timeout: float = TIMEOUT) -> "pb.TaskInfo":
        return wait_for(lambda: (lambda t: t if t.state == state else None)(self.task(task_id)),
                        f"task {task_id} to be {pb.TaskState.Name(state)}", timeout)

    def taskctl(self, *args: str, input: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.build / "client/taskctl"), "--master", self.address, "--token-file",
             str(self.submit_token_file), *args],
            input=input, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture
def master_flags() -> List[str]:
    """The master's flags; a test overrides this fixture for others."""
    return MASTER_FLAGS


@pytest.fixture
def master(build_dir: Path, tmp_path: Path, master_flags: List[str]) -> Iterator[Master]:
    m = Master(build_dir, tmp_path, master_flags)
    yield m
    m.close()


# A worker program: the handlers the tests run, in the pools its configuration names (a JSON
# object in argv[1]: "pool" for every kind, "pools" by kind), until SIGTERM. A file, run as a script: pool processes started with
# mp_context="spawn" import it again (as __mp_main__) for its handlers.
WORKER_PROGRAM = r'''
import json, logging, os, sys
from taskmaster.worker import Worker

cfg = json.loads(sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
worker = Worker(cfg["address"], token_file=cfg["token_file"], name=cfg["name"],
                reconnect_max=0.5, **cfg.get("options", {}))
def pool(kind):
    return cfg.get("pools", {}).get(kind, cfg.get("pool", "thread"))

@worker.handler("square", pool=pool("square"))
def square(payload):
    n = int(payload)
    return "%d*%d=%d" % (n, n, n * n)

@worker.handler("sleep", pool=pool("sleep"))
def sleep(payload, ctx):
    ctx.progress(0, 1, "sleeping")
    ms = int(payload)
    ctx.sleep(ms / 1000)
    return "slept %d ms" % ms

@worker.handler("first_attempt_hangs", pool=pool("first_attempt_hangs"))
def first_attempt_hangs(payload, ctx):
    if ctx.attempt == 1:
        ctx.progress(0, 1, "hanging")
        ctx.sleep(60)
    return "attempt %d" % ctx.attempt

@worker.handler("until_cancelled", pool=pool("until_cancelled"))
def until_cancelled(payload, ctx):
    ctx.progress(1, 0, "waiting for a cancel")
    ctx.cancel_event.wait(30)
    return "cancelled: %s" % ctx.cancelled

@worker.handler("pid", pool=pool("pid"))
def pid(payload):
    return str(os.getpid())

if __name__ == "__main__":
    worker.run()
'''


class WorkerProcess:
    """A Python worker in a process of its own, logging to a file."""

    def __init__(self, master: Master, name: str, pool: str, pools: Dict[str, str],
                 options: Dict[str, Any], address: Optional[str] = None) -> None:
        self.name = name
        self.log_path = master.dir / f"{name}.log"
        config = {"address": address or master.address,
                  "token_file": str(master.work_token_file),
                  "name": name, "pool": pool, "pools": pools, "options": options}
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(master.build / "python"), os.environ.get("PYTHONPATH")) if p))
        program = master.dir / "worker_program.py"
        if not program.exists():
            program.write_text(WORKER_PROGRAM)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(program), json.dumps(config)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_worker(master: Master) -> Iterator[Callable[..., WorkerProcess]]:
    """Starts a worker process running WORKER_PROGRAM (its kinds in `pool`, or as `pools` says
    by kind; `options` for its Worker; `address` in place of the master's) and waits until the master lists it (or, with two pools,
    one of its streams, "NAME/thread" or "NAME/process"); kills what is left of them at
    teardown."""
    started: List[WorkerProcess] = []

    def start(name: str, pool: str = "thread", pools: Optional[Dict[str, str]] = None,
              address: Optional[str] = None, **options: Any) -> WorkerProcess:
        w = WorkerProcess(master, name, pool, pools or {}, options, address)
        started.append(w)
        wait_for(lambda: any(n == name or n.startswith(name + "/")
                             for n in master.connected_workers()) or w.proc.poll() is not None,
                 f"worker {name} to connect")
        assert w.proc.poll() is None, f"worker {name} exited: {w.log()}"
        return w

    yield start
    for w in started:
        stop_process(w.proc, signal.SIGKILL)
