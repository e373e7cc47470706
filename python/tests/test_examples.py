"""The seed's two programs, ported (examples/python), run as a user runs them: the worker and
the master script as processes of their own, the address and tokens in the environment."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from conftest import REPO, SUBMIT_TOKEN, TIMEOUT, WORK_TOKEN, stop_process, wait_for


def test_the_ported_seed_programs(master) -> None:
    env = dict(os.environ, TASKMASTER_ADDR=master.address,
               PYTHONPATH=os.pathsep.join(p for p in (str(master.build / "python"),
                                                      os.environ.get("PYTHONPATH")) if p))
    worker_out = master.dir / "task_worker.out"
    with open(worker_out, "wb") as out:
        worker = subprocess.Popen([sys.executable, str(REPO / "examples/python/task_worker.py")],
                                  stdout=out, stderr=subprocess.STDOUT,
                                  env=dict(env, TASKMASTER_TOKEN=WORK_TOKEN))
    try:
        wait_for(lambda: master.connected_workers() or worker.poll() is not None,
                 "the ported worker to connect")
        assert worker.poll() is None, worker_out.read_text()
        run = subprocess.run([sys.executable, str(REPO / "examples/python/task_master.py")],
                             capture_output=True, text=True, timeout=TIMEOUT,
                             env=dict(env, TASKMASTER_TOKEN=SUBMIT_TOKEN))
    finally:
        code = stop_process(worker, signal.SIGTERM)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    put = [int(m.group(1)) for m in map(re.compile(r"Put task (\d+)\.\.\.$").match, lines[:10])
           if m]
    assert len(put) == 10, run.stdout
    assert lines[10] == "Try get result..."
    assert sorted(lines[11:21]) == sorted(f"Result: {n}*{n}={n * n}" for n in put)
    assert lines[21:] == ["master exit."]
    # SIGTERM drains the worker, which then says goodbye as the seed's did.
    assert code == 0, worker_out.read_text()
    said = worker_out.read_text().splitlines()
    assert sorted(line for line in said if line.startswith("run task")) == sorted(
        f"run task {n} * {n}..." for n in put)
    assert said[-1] == "worker exit"
