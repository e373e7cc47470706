#!/usr/bin/python3
"""The PostgreSQL queue baseline: what a queue built on `FOR UPDATE SKIP LOCKED` does on this
machine, measured beside taskmaster's postgres store by bench/run.sh.

  pg_baseline.py --dsn DSN throughput --numbers FILE --claim N --workers W
  pg_baseline.py --dsn DSN latency --count N

throughput: every number is inserted as a pending job (in batches of 1,000); W worker processes
each claim N jobs per transaction (SELECT ... FOR UPDATE SKIP LOCKED), compute n*n, and mark
them done in the same transaction, until none is left. Timed from the first insert to the last
commit, checked: every job done with its right result.

latency: one job at a time, as a client waiting on it would: insert it and NOTIFY the worker,
which LISTENs, claims it, writes its result and NOTIFYs back; the client's LISTEN receives it.
Prints the round trip's p50 and p99.

Prints one JSON line. Every loop is bounded (a deadline of 300 s).
"""
import argparse
import json
import multiprocessing
import select
import statistics
import time

import psycopg2

DEADLINE_S = 300

SCHEMA = """
DROP TABLE IF EXISTS baseline_jobs;
CREATE TABLE baseline_jobs (
  id bigserial PRIMARY KEY,
  payload text NOT NULL,
  state text NOT NULL DEFAULT 'pending',
  result text);
CREATE INDEX baseline_jobs_pending ON baseline_jobs (id) WHERE state = 'pending';
"""


def connect(dsn):
    conn = psycopg2.connect(dsn)
    conn.autocommit = False
    return conn


def work(dsn, claim, deadline):
    """A worker process: claims `claim` jobs per transaction until none is left."""
    conn = connect(dsn)
    cur = conn.cursor()
    done = 0
    while time.monotonic() < deadline:
        cur.execute(
            "SELECT id, payload FROM baseline_jobs WHERE state = 'pending' ORDER BY id "
            "LIMIT %s FOR UPDATE SKIP LOCKED", (claim,))
        rows = cur.fetchall()
        if not rows:
            conn.commit()
            break
        ids = [r[0] for r in rows]
        results = [f"{int(p)}*{int(p)}={int(p) * int(p)}" for _, p in rows]
        cur.execute(
            "UPDATE baseline_jobs AS j SET state = 'done', result = r.result "
            "FROM unnest(%s::bigint[], %s::text[]) AS r(id, result) WHERE j.id = r.id",
            (ids, results))
        conn.commit()
        done += len(rows)
    conn.close()
    return done


def throughput(args):
    numbers = [line.strip() for line in open(args.numbers, encoding="utf-8") if line.strip()]
    conn = connect(args.dsn)
    cur = conn.cursor()
    cur.execute(SCHEMA)
    conn.commit()
    deadline = time.monotonic() + DEADLINE_S
    began = time.monotonic()
    with multiprocessing.Pool(args.workers) as pool:
        # Workers start claiming while the jobs go in, as a queue's consumers would.
        pending = [pool.apply_async(work, (args.dsn, args.claim, deadline)) for _ in
                   range(args.workers)]
        for i in range(0, len(numbers), 1000):
            cur.execute("INSERT INTO baseline_jobs (payload) SELECT unnest(%s::text[])",
                        (numbers[i:i + 1000],))
            conn.commit()
        done = sum(p.get(timeout=DEADLINE_S) for p in pending)
        # A worker that found the table empty before the last insert leaves jobs behind: the
        # others (or a second round) finish them.
        while done < len(numbers) and time.monotonic() < deadline:
            done += pool.apply_async(work, (args.dsn, args.claim, deadline)).get(DEADLINE_S)
    seconds = time.monotonic() - began
    cur.execute("SELECT count(*) FROM baseline_jobs WHERE state = 'done' AND "
                "result = payload || '*' || payload || '=' || (payload::bigint * "
                "payload::bigint)::text")
    right = cur.fetchone()[0]
    conn.close()
    if right != len(numbers):
        raise SystemExit(f"{right} of {len(numbers)} jobs done right")
    print(json.dumps({"tasks": len(numbers), "claim": args.claim, "workers": args.workers,
                      "seconds": seconds, "tasks_per_s": len(numbers) / seconds}))


def latency_worker(dsn, count, ready):
    """Claims a job whenever one is pending, and sleeps on LISTEN only when none is: a
    notification that arrived while it worked (psycopg2 keeps those it reads meanwhile) is never
    waited for again."""
    conn = connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("LISTEN baseline_jobs")
    ready.set()
    served = 0
    deadline = time.monotonic() + DEADLINE_S
    while served < count and time.monotonic() < deadline:
        conn.notifies.clear()
        conn.autocommit = False
        cur.execute(
            "SELECT id, payload FROM baseline_jobs WHERE state = 'pending' ORDER BY id "
            "LIMIT 1 FOR UPDATE SKIP LOCKED")
        row = cur.fetchone()
        if row:
            n = int(row[1])
            cur.execute("UPDATE baseline_jobs SET state = 'done', result = %s WHERE id = %s",
                        (f"{n}*{n}={n * n}", row[0]))
            cur.execute("SELECT pg_notify('baseline_results', %s::text)", (row[0],))
            served += 1
        conn.commit()
        conn.autocommit = True
        if not row and not conn.notifies:
            select.select([conn], [], [], 0.1)
            conn.poll()
    conn.close()


def latency(args):
    conn = connect(args.dsn)
    cur = conn.cursor()
    cur.execute(SCHEMA)
    conn.commit()
    conn.autocommit = True
    cur.execute("LISTEN baseline_results")
    ready = multiprocessing.Event()
    total = args.count + args.warmup
    worker = multiprocessing.Process(target=latency_worker, args=(args.dsn, total, ready))
    worker.start()
    ready.wait(30)
    times = []
    deadline = time.monotonic() + DEADLINE_S
    for i in range(total):
        began = time.monotonic()
        conn.autocommit = False
        cur.execute("INSERT INTO baseline_jobs (payload) VALUES (%s) RETURNING id", (str(i),))
        job_id = cur.fetchone()[0]
        cur.execute("SELECT pg_notify('baseline_jobs', '')")
        conn.commit()
        conn.autocommit = True
        answered = False
        while time.monotonic() < deadline:
            # Those psycopg2 read meanwhile first, then the socket.
            answered = any(n.payload == str(job_id) for n in conn.notifies)
            conn.notifies.clear()
            if answered:
                break
            select.select([conn], [], [], 1.0)
            conn.poll()
        if not answered:
            raise SystemExit(f"no answer for job {job_id}")
        if i >= args.warmup:
            times.append((time.monotonic() - began) * 1e6)
    worker.join(30)
    conn.close()
    times.sort()
    print(json.dumps({"round_trips": len(times), "p50_us": statistics.median(times),
                      "p99_us": times[int(len(times) * 0.99) - 1]}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True, help="libpq connection string")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--numbers", required=True)
    t.add_argument("--claim", type=int, default=100, help="jobs per claiming transaction")
    t.add_argument("--workers", type=int, default=2, help="worker processes")
    t.set_defaults(run=throughput)
    lat = sub.add_parser("latency")
    lat.add_argument("--count", type=int, default=1000)
    lat.add_argument("--warmup", type=int, default=50)
    lat.set_defaults(run=latency)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
