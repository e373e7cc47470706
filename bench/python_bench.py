"""The Python library on the benchmark's workload (bench/run.sh runs it with Debian's python3 and
the build's python package on PYTHONPATH).

    python_bench.py worker ADDRESS NAME      a Worker: `square` on a pool of 2 processes, until
                                             SIGTERM (the seed's worker, as a user would port it)
    python_bench.py submit ADDRESS NUMBERS   submits NUMBERS (one per line) as one job with
                                             Client.submit; prints its rate as a JSON line

Insecure masters only (the benchmark's): no token.
"""

from __future__ import annotations

import json
import sys
import time

from taskmaster import Client, Worker


def run_worker(address: str, name: str) -> None:
    worker = Worker(address, token="", name=name, processes=2)

    @worker.handler("square", pool="process")
    def square(payload: bytes) -> str:
        n = int(payload)
        return "%d*%d=%d" % (n, n, n * n)

    worker.run()


def submit(address: str, numbers_file: str) -> None:
    with open(numbers_file, encoding="ascii") as f:
        numbers = f.read().split()
    with Client(address, token="") as client:
        start = time.monotonic()
        job = client.submit("square", numbers)
        seconds = time.monotonic() - start
    print(json.dumps({"tasks": len(numbers), "seconds": seconds,
                      "tasks_per_s": len(numbers) / seconds, "job_id": job.id}))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        run_worker(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "submit":
        submit(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
