"""The package installs offline, as the README says, into a virtual environment that sees
Debian's grpcio and protobuf: pip install --no-build-isolation --no-deps ./python."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_pip_installs_the_package_with_generated_stubs(tmp_path: Path) -> None:
    # A copy of the sources: pip builds in the tree it is given, and ours stays clean.
    src = tmp_path / "src"
    shutil.copytree(REPO / "python", src / "python",
                    ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info", "v1"))
    shutil.copytree(REPO / "proto", src / "proto")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = subprocess.run(
        [str(venv / "bin/pip"), "install", "--no-build-isolation", "--no-deps", "--no-index",
         str(src / "python")], capture_output=True, text=True, timeout=300, env=env)
    assert install.returncode == 0, install.stdout + install.stderr
    probe = subprocess.run(
        [str(venv / "bin/python"), "-c",
         "import taskmaster, taskmaster.aio, taskmaster.worker\n"
         "from taskmaster.v1 import taskmaster_pb2 as pb\n"
         "assert pb.SubmitRequest(keep_open=True).keep_open\n"
         "print(taskmaster.__file__)"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(venv)), probe.stdout
    cli = subprocess.run([str(venv / "bin/taskmaster-py"), "--help"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert cli.returncode == 0 and "submit" in cli.stdout, cli.stderr
