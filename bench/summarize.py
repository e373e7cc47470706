#!/usr/bin/env python3
"""Summarizes bench/run.sh's measurements: medians over the runs, ratios to the seed's design
measured in the same runs, and the issue's targets. Usage: summarize.py RESULTS OUT MACHINE N"""
import datetime
import json
import statistics
import sys


def main():
    results_path, out_path, machine, tasks = sys.argv[1:5]
    rows = [json.loads(line) for line in open(results_path) if line.strip()]
    by_kind = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row["data"])

    def median(kind, field, transform=lambda d, v: v):
        values = [transform(d, d[field]) for d in by_kind.get(kind, [])]
        return statistics.median(values) if values else None

    def ratio_median(kind_a, field_a, kind_b, field_b):
        """Median over runs of the per-run ratio a/b (both from the same run)."""
        a = by_kind.get(kind_a, [])
        b = by_kind.get(kind_b, [])
        ratios = [x[field_a] / y[field_b] for x, y in zip(a, b) if y[field_b]]
        return statistics.median(ratios) if ratios else None

    per_task = [(d["rss_after_kb"] - d["rss_before_kb"]) * 1024 / d["tasks"]
                for d in by_kind.get("memory", [])]
    figures = {
        "seed_tasks_per_s": median("seed", "tasks_per_s"),
        "seed_p50_us": median("seed", "p50_us"),
        "seed_p99_us": median("seed", "p99_us"),
        "memory_tasks_per_s": median("throughput-memory", "tasks_per_s"),
        "taskctl_memory_tasks_per_s": median("taskctl-memory", "tasks_per_s"),
        "taskctl_durable_tasks_per_s": median("taskctl-sqlite", "tasks_per_s"),
        "durable_tasks_per_s": median("throughput-sqlite", "tasks_per_s"),
        "one_per_call_tasks_per_s": median("throughput-memory-one-per-call", "tasks_per_s"),
        "admin_off_tasks_per_s": median("throughput-admin-off", "tasks_per_s"),
        "admin_scraped_tasks_per_s": median("throughput-admin-scraped", "tasks_per_s"),
        "memory_p50_us": median("latency-memory", "p50_us"),
        "memory_p99_us": median("latency-memory", "p99_us"),
        "durable_p50_us": median("latency-sqlite", "p50_us"),
        "durable_p99_us": median("latency-sqlite", "p99_us"),
        "one_worker_tasks_per_s": median("throughput-one-worker", "tasks_per_s"),
        "idle_streams_10000_tasks_per_s": median("throughput-10000-idle-streams", "tasks_per_s"),
        "working_streams_1000_tasks_per_s": median("throughput-1000-working-streams",
                                                   "tasks_per_s"),
        "echo_tasks_per_s": median("throughput-echo", "tasks_per_s"),
        "exec_cat_tasks_per_s": median("throughput-cat", "tasks_per_s"),
        "python_worker_tasks_per_s": median("throughput-python-worker", "tasks_per_s"),
        "python_submit_tasks_per_s": median("python-submit", "tasks_per_s"),
        "bytes_per_pending_task": statistics.median(per_task) if per_task else None,
        "recovery_1m_ms": median("recovery", "ms"),
        "postgres_tasks_per_s": median("throughput-postgres", "tasks_per_s"),
        "postgres_p50_us": median("latency-postgres", "p50_us"),
        "postgres_p99_us": median("latency-postgres", "p99_us"),
        "pg_baseline_claim_100_tasks_per_s": median("pg-baseline-claim-100", "tasks_per_s"),
        "pg_baseline_claim_1_tasks_per_s": median("pg-baseline-claim-1", "tasks_per_s"),
        "pg_baseline_p50_us": median("pg-baseline-latency", "p50_us"),
        "commit_mark_us": median("commit-mark", "mark_us"),
        "commit_fsync_us": median("commit-mark", "fsync_us"),
    }
    ratios = {
        "memory_vs_seed": ratio_median("throughput-memory", "tasks_per_s", "seed", "tasks_per_s"),
        "durable_vs_seed": ratio_median("throughput-sqlite", "tasks_per_s", "seed", "tasks_per_s"),
        "one_per_call_vs_seed": ratio_median("throughput-memory-one-per-call", "tasks_per_s",
                                             "seed", "tasks_per_s"),
        "memory_p50_vs_seed": ratio_median("latency-memory", "p50_us", "seed", "p50_us"),
        "memory_p99_vs_p50": ratio_median("latency-memory", "p99_us", "latency-memory", "p50_us"),
        "python_worker_vs_seed": ratio_median("throughput-python-worker", "tasks_per_s", "seed",
                                              "tasks_per_s"),
        "scraped_vs_admin_off": ratio_median("throughput-admin-scraped", "tasks_per_s",
                                             "throughput-admin-off", "tasks_per_s"),
        "postgres_vs_baseline": ratio_median("throughput-postgres", "tasks_per_s",
                                             "pg-baseline-claim-100", "tasks_per_s"),
        "exec_cat_vs_echo": ratio_median("throughput-cat", "tasks_per_s", "throughput-echo",
                                         "tasks_per_s"),
        "idle_streams_vs_one_worker": ratio_median("throughput-10000-idle-streams", "tasks_per_s",
                                                   "throughput-one-worker", "tasks_per_s"),
        "working_streams_vs_one_worker": ratio_median("throughput-1000-working-streams",
                                                      "tasks_per_s", "throughput-one-worker",
                                                      "tasks_per_s"),
    }
    def num(v, digits=0):
        return "?" if v is None else f"{v:,.{digits}f}"

    f = figures
    fsync2 = None if f["commit_fsync_us"] is None else 2 * f["commit_fsync_us"]
    # What each target is measured against, printed with a miss: the reason in figures of the
    # same runs (the README's Performance section says where the rest of the time goes).
    context = {
        "taskctl_memory": f"taskbench, the same tasks without process start or printing: "
                          f"{num(f['memory_tasks_per_s'])}/s",
        "taskctl_durable": f"taskbench, durable: {num(f['durable_tasks_per_s'])}/s",
        "p50": f"{num(f['memory_p50_us'])} us against the seed's {num(f['seed_p50_us'])} us",
        "p99": f"p99 {num(f['memory_p99_us'])} us (the seed's: {num(f['seed_p99_us'])} us)",
        "durable": f"two commits' fsyncs alone take {num(fsync2)} us, the memory round trip "
                   f"{num(f['memory_p50_us'])} us more",
        "streams": f"1 worker alone: {num(f['one_worker_tasks_per_s'])}/s",
        "recovery": "reading and checking every record of the SQLite file",
        "postgres": f"the SKIP LOCKED baseline, 100 per claim: "
                    f"{num(f['pg_baseline_claim_100_tasks_per_s'])}/s; one master on SQLite: "
                    f"{num(f['durable_tasks_per_s'])}/s",
        "postgres_p50": f"the baseline's LISTEN/NOTIFY round trip: "
                        f"{num(f['pg_baseline_p50_us'])} us",
    }

    # (name, measured, target, passes, what it is measured against)
    def check(name, value, target, ok, why=""):
        return {"target": name, "measured": value, "goal": target,
                "met": None if value is None else bool(ok(value)), "context": why}

    targets = [
        check("memory throughput vs seed", ratios["memory_vs_seed"], ">= 40x", lambda v: v >= 40),
        check("durable throughput vs seed", ratios["durable_vs_seed"], ">= 15x", lambda v: v >= 15),
        check("taskctl --wait, memory (tasks/s)", figures["taskctl_memory_tasks_per_s"],
              ">= 500000", lambda v: v >= 500_000, context["taskctl_memory"]),
        check("taskctl --wait, durable (tasks/s)", figures["taskctl_durable_tasks_per_s"],
              ">= 250000", lambda v: v >= 250_000, context["taskctl_durable"]),
        check("memory p50 vs seed p50", ratios["memory_p50_vs_seed"], "<= 1.0x",
              lambda v: v <= 1.0, context["p50"]),
        check("memory p99 vs its p50", ratios["memory_p99_vs_p50"], "<= 2x", lambda v: v <= 2,
              context["p99"]),
        check("durable p50 (us)", figures["durable_p50_us"], "<= 450", lambda v: v <= 450,
              context["durable"]),
        check("durable p99 (us)", figures["durable_p99_us"], "<= 1000", lambda v: v <= 1000,
              context["durable"]),
        check("10,000 streams attached vs 1 worker", ratios["idle_streams_vs_one_worker"],
              ">= 0.8", lambda v: v >= 0.8, context["streams"]),
        check("1,000 streams working vs 1 worker", ratios["working_streams_vs_one_worker"],
              ">= 0.8", lambda v: v >= 0.8, context["streams"]),
        check("metrics served and scraped vs off", ratios["scraped_vs_admin_off"], ">= 0.97",
              lambda v: v >= 0.97),
        check("bytes per pending task", figures["bytes_per_pending_task"], "<= 200",
              lambda v: v <= 200),
        check("recovery of 1,000,000 (ms)", figures["recovery_1m_ms"], "<= 1000",
              lambda v: v <= 1000, context["recovery"]),
        check("postgres, 2 masters (tasks/s)", figures["postgres_tasks_per_s"], ">= 100000",
              lambda v: v >= 100_000, context["postgres"]),
        check("postgres vs SKIP LOCKED baseline", ratios["postgres_vs_baseline"], ">= 2x",
              lambda v: v >= 2, context["postgres"]),
        check("postgres p50 (us)", figures["postgres_p50_us"], "<= 1000", lambda v: v <= 1000,
              context["postgres_p50"]),
        check("Python worker vs seed", ratios["python_worker_vs_seed"], ">= 10x",
              lambda v: v >= 10),
        check("Python client submit (tasks/s)", figures["python_submit_tasks_per_s"],
              ">= 50000", lambda v: v >= 50_000),
    ]
    runs = len(by_kind.get("throughput-memory", []))
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "runs": runs,
        "tasks": int(tasks),
        "figures": figures,
        "ratios": ratios,
        "targets": targets,
        "measurements": rows,
    }
    with open(out_path, "w") as f:
        json.dump(summary, f, indent=1)

    def fmt(v, digits=1):
        return "-" if v is None else f"{v:,.{digits}f}"

    print(f"taskmaster benchmark, {summary['date']}, {machine}, median of {runs} runs")
    print(f"{'':34}{'taskmaster':>14}{'seed':>12}{'ratio':>9}")
    print(f"{'throughput, memory (tasks/s)':34}{fmt(figures['memory_tasks_per_s'], 0):>14}"
          f"{fmt(figures['seed_tasks_per_s'], 0):>12}{fmt(ratios['memory_vs_seed']):>8}x")
    print(f"{'throughput, durable (tasks/s)':34}{fmt(figures['durable_tasks_per_s'], 0):>14}"
          f"{fmt(figures['seed_tasks_per_s'], 0):>12}{fmt(ratios['durable_vs_seed']):>8}x")
    print(f"{'taskctl submit --wait, memory':34}"
          f"{fmt(figures['taskctl_memory_tasks_per_s'], 0):>14}")
    print(f"{'taskctl submit --wait, durable':34}"
          f"{fmt(figures['taskctl_durable_tasks_per_s'], 0):>14}")
    print(f"{'throughput, one task per call':34}"
          f"{fmt(figures['one_per_call_tasks_per_s'], 0):>14}"
          f"{fmt(figures['seed_tasks_per_s'], 0):>12}{fmt(ratios['one_per_call_vs_seed']):>8}x")
    print(f"{'memory, admin listeners off':34}{fmt(figures['admin_off_tasks_per_s'], 0):>14}")
    print(f"{'  on, scraped every second':34}{fmt(figures['admin_scraped_tasks_per_s'], 0):>14}"
          f"{'':12}{fmt(ratios['scraped_vs_admin_off'], 3):>8}x")
    print(f"{'latency p50, memory (us)':34}{fmt(figures['memory_p50_us']):>14}"
          f"{fmt(figures['seed_p50_us']):>12}{fmt(ratios['memory_p50_vs_seed'], 2):>8}x")
    print(f"{'latency p99, memory (us)':34}{fmt(figures['memory_p99_us']):>14}"
          f"{fmt(figures['seed_p99_us']):>12}")
    print(f"{'latency p50 / p99, durable (us)':34}"
          f"{fmt(figures['durable_p50_us']) + ' / ' + fmt(figures['durable_p99_us']):>14}")
    print(f"{'1 worker (tasks/s)':34}{fmt(figures['one_worker_tasks_per_s'], 0):>14}")
    print(f"{'  + 10,000 streams attached':34}"
          f"{fmt(figures['idle_streams_10000_tasks_per_s'], 0):>14}{'':12}"
          f"{fmt(ratios['idle_streams_vs_one_worker'], 2):>8}x")
    print(f"{'  + 1,000 streams working instead':34}"
          f"{fmt(figures['working_streams_1000_tasks_per_s'], 0):>14}{'':12}"
          f"{fmt(ratios['working_streams_vs_one_worker'], 2):>8}x")
    print(f"{'echo, 1 worker of 2 (tasks/s)':34}{fmt(figures['echo_tasks_per_s'], 0):>14}")
    print(f"{'  exec /bin/cat instead':34}{fmt(figures['exec_cat_tasks_per_s'], 0):>14}{'':12}"
          f"{fmt(ratios['exec_cat_vs_echo'], 3):>8}x")
    print(f"{'Python worker, 2 processes':34}"
          f"{fmt(figures['python_worker_tasks_per_s'], 0):>14}"
          f"{fmt(figures['seed_tasks_per_s'], 0):>12}{fmt(ratios['python_worker_vs_seed']):>8}x")
    print(f"{'Python client submit, durable':34}"
          f"{fmt(figures['python_submit_tasks_per_s'], 0):>14}")
    print(f"{'master bytes per pending task':34}{fmt(figures['bytes_per_pending_task'], 0):>14}")
    print(f"{'recovery of 1,000,000 tasks (ms)':34}{fmt(figures['recovery_1m_ms'], 0):>14}")
    print(f"{'postgres, 2 masters (tasks/s)':34}{fmt(figures['postgres_tasks_per_s'], 0):>14}")
    print(f"{'  SKIP LOCKED, 100 / 1 per claim':34}"
          f"{fmt(figures['pg_baseline_claim_100_tasks_per_s'], 0):>14}"
          f"{fmt(figures['pg_baseline_claim_1_tasks_per_s'], 0):>12}"
          f"{fmt(ratios['postgres_vs_baseline']):>8}x")
    print(f"{'latency p50 / p99, postgres (us)':34}"
          f"{fmt(figures['postgres_p50_us']) + ' / ' + fmt(figures['postgres_p99_us']):>14}"
          f"{fmt(figures['pg_baseline_p50_us']):>12}  (LISTEN/NOTIFY)")
    print(f"{'commit mark / fsync per commit (us)':34}"
          f"{fmt(figures['commit_mark_us'], 2) + ' / ' + fmt(figures['commit_fsync_us']):>14}")
    print()
    for t in targets:
        mark = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        print(f"  {t['target']:32} {fmt(t['measured'], 2):>12}  goal {t['goal']:8} {mark}")
        if t["met"] is False and t["context"]:
            print(f"  {'':32} {'':12}  {t['context']}")
    print(f"\nall figures: {out_path}")


if __name__ == "__main__":
    main()
