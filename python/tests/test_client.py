"""The Python client (blocking and asyncio) and python3 -m taskmaster against a real master."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import List

import pytest

import taskmaster
import taskmaster.aio
from taskmaster import errors
from conftest import MASTER_FLAGS, SUBMIT_TOKEN, TIMEOUT, wait_for


def square(n: int) -> str:
    return "%d*%d=%d" % (n, n, n * n)


@pytest.fixture
def client(master):
    with taskmaster.Client(master.address, token_file=str(master.submit_token_file)) as c:
        yield c


def test_the_seed_scenario(master, start_worker, client):
    start_worker("w1")
    numbers = [random.randint(0, 10000) for _ in range(10)]
    job = client.submit("square", [str(n) for n in numbers])
    assert len(job.task_ids) == 10
    outputs = sorted(r.text for r in job.results(timeout=TIMEOUT))
    assert outputs == sorted(square(n) for n in numbers)
    status = job.wait(timeout=TIMEOUT)
    assert (status.total, status.succeeded, status.open) == (10, 10, False)
    assert client.task(job.task_ids[0]).payload == str(numbers[0]).encode()


def test_a_job_of_any_size_streams_in_batches(master, start_worker, client):
    start_worker("w1", threads=4)
    count = 25_000
    # A generator: read as it is sent, several calls of 1,000 make one job.
    job = client.submit("square", (str(i) for i in range(count)), batch_size=1000)
    assert len(job.task_ids) == count and len(set(job.task_ids)) == count
    ids = [r.id for r in job.results(timeout=60)]
    assert len(ids) == count and set(ids) == set(job.task_ids), "each result once"
    status = job.status()
    assert (status.total, status.done, status.open) == (count, count, False)
    assert client.task(job.task_ids[-1]).output == square(count - 1).encode()


def test_payloads_are_bytes_or_text_and_keys_make_resubmits_safe(master, start_worker, client):
    start_worker("w1")
    first = client.submit("square", [b"7", "8"], key="nightly")
    again = client.submit("square", [b"7", "8"], key="nightly")
    assert again.task_ids == first.task_ids
    assert sorted(r.output for r in first.results(timeout=TIMEOUT)) == [b"7*7=49", b"8*8=64"]
    with pytest.raises(ValueError, match="key= covers at most batch_size"):
        client.submit("square", ["1", "2", "3"], key="big", batch_size=2)
    with pytest.raises(TypeError, match="bytes or str"):
        client.submit("square", [7])
    with pytest.raises(TypeError, match="bytes or str"):
        client.submit("square", ["1", None])
    with pytest.raises(TypeError, match="wrap a single one"):
        client.submit("square", "7")


def test_cancel_and_timeout(master, client):
    job = client.submit("square", ["1", "2", "3"], queue="nobody-serves-this")
    with pytest.raises(TimeoutError):
        for _ in job.results(timeout=0.5):
            pass
    assert job.cancel() == 3
    status = job.wait(timeout=TIMEOUT)
    assert (status.cancelled, status.succeeded) == (3, 0)
    assert [r.state for r in job.results(timeout=TIMEOUT)] == ["CANCELLED"] * 3


def test_errors_carry_the_status_and_the_masters_message(master, client):
    with taskmaster.Client(master.address, token="not-a-valid-token-0123456789") as bad:
        with pytest.raises(errors.Unauthenticated) as e:
            bad.stats()
        assert "refused the token" in e.value.message
    with pytest.raises(errors.InvalidArgument) as e:
        client.submit("square", ["1"], queue="no spaces allowed")
    assert "queue" in e.value.message and e.value.code.name == "INVALID_ARGUMENT"
    with pytest.raises(errors.NotFound):
        client.job("job-00000000").status()
    with pytest.raises(ValueError, match="kind"):
        client.submit("", ["1"])
    with pytest.raises(ValueError, match="delay"):
        client.submit("square", ["1"], delay=-1)
    # A port nobody listens on.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with taskmaster.Client(f"127.0.0.1:{port}", token=SUBMIT_TOKEN, timeout=2) as nowhere:
        with pytest.raises(errors.Unavailable) as e:
            nowhere.stats()
        assert "cannot reach the master" in e.value.message


def test_address_and_token_come_from_the_environment(master, monkeypatch):
    monkeypatch.setenv("TASKMASTER_ADDR", master.address)
    monkeypatch.setenv("TASKMASTER_TOKEN", SUBMIT_TOKEN)
    with taskmaster.Client() as c:
        assert c.stats().duplicate_results == 0
    monkeypatch.delenv("TASKMASTER_ADDR")
    with pytest.raises(errors.InvalidArgument, match="TASKMASTER_ADDR"):
        taskmaster.Client()


def test_the_async_client(master, start_worker):
    start_worker("w1")

    async def scenario() -> None:
        async with taskmaster.aio.Client(master.address,
                                         token_file=str(master.submit_token_file)) as c:
            job = await c.submit("square", (str(n) for n in range(30)), batch_size=7)
            outputs = sorted([r.text async for r in job.results(timeout=TIMEOUT)])
            assert outputs == sorted(square(n) for n in range(30))
            status = await job.wait(timeout=TIMEOUT)
            assert (status.total, status.succeeded) == (30, 30)
            assert (await c.task(job.task_ids[0])).state == "SUCCEEDED"
            idle = await c.submit("square", ["1"], queue="nobody-serves-this")
            assert await idle.cancel() == 1
            with pytest.raises(errors.NotFound):
                await c.job("job-00000000").status()
            assert any(w.name == "w1" for w in await c.workers())

    asyncio.run(scenario())


def test_a_list_of_masters_finds_the_one_that_serves(master, start_worker):
    """Given several masters (as the postgres store runs them), the clients and the worker skip
    one that cannot be reached and follow the one that serves."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there
    addresses = f"{down},{master.address}"
    start_worker("w1", address=addresses)
    with taskmaster.Client(addresses, token_file=str(master.submit_token_file)) as c:
        job = c.submit("square", ["3", "4"])
        assert sorted(r.text for r in job.results(timeout=TIMEOUT)) == [square(3), square(4)]

    async def scenario() -> None:
        async with taskmaster.aio.Client(addresses,
                                         token_file=str(master.submit_token_file)) as c:
            job = await c.submit("square", ["5"])
            assert [r.text async for r in job.results(timeout=TIMEOUT)] == [square(5)]

    asyncio.run(scenario())


@pytest.fixture
def master_flags(tmp_path: Path) -> List[str]:
    """A durable master (SQLite in the test's directory), so a restart keeps the jobs."""
    flags = [f for f in MASTER_FLAGS if f not in ("--store", "memory")]
    return flags + ["--data-dir", str(tmp_path / "data")]


def test_results_follow_the_job_across_a_master_restart(master, start_worker, client):
    start_worker("w1", threads=2)
    job = client.submit("sleep", ["50"] * 60)
    seen: List[int] = []
    failure: List[BaseException] = []

    def follow() -> None:
        try:
            seen.extend(r.id for r in job.results(timeout=60))
        except BaseException as e:  # reported by the test below
            failure.append(e)

    follower = threading.Thread(target=follow)
    follower.start()
    wait_for(lambda: len(seen) >= 5, "the first results")
    master.stop(signal.SIGKILL)
    assert len(seen) < len(job.task_ids), "the master must die while the job runs"
    master.start()
    follower.join(60)
    assert not follower.is_alive() and not failure, failure
    assert sorted(seen) == sorted(job.task_ids), "every result once, across the restart"


def run_cli(master, *args: str, input: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, TASKMASTER_ADDR=master.address,
               PYTHONPATH=os.pathsep.join(p for p in (str(master.build / "python"),
                                                      os.environ.get("PYTHONPATH")) if p))
    env.pop("TASKMASTER_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "taskmaster", "--token-file",
                           str(master.submit_token_file), *args],
                          input=input, capture_output=True, text=True, timeout=60, env=env)


def test_the_command_line(master, start_worker):
    start_worker("w1", threads=4)
    r = run_cli(master, "submit", "--kind", "square", "--wait", "3", "4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0].startswith("job-") and sorted(lines[1:]) == [square(3), square(4)]
    # Input of any size from stdin, in several calls, followed as one job.
    count = 12_000
    r = run_cli(master, "submit", "--kind", "square", "--wait",
                input="".join(f"{i}\n" for i in range(count)))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == count + 1 and len(set(lines[1:])) == count
    r = run_cli(master, "wait", lines[0])
    assert r.returncode == 0 and len(r.stdout.splitlines()) == count
    r = run_cli(master, "submit", "--kind", "square", "--wait", "not-a-number")
    assert r.returncode == 1 and "DEAD" in r.stdout
    r = run_cli(master, "status", "nonsense")
    assert r.returncode == 2 and "neither a job id" in r.stderr
