#!/usr/bin/env bash
# The benchmark: builds the daemons and tools in Release, then, RUNS times over, measures the seed's design
# (shared/peers/seed-manager) and taskmaster side by side on loopback, on the same tasks, and
# prints the medians, the ratios and the targets; bench/results.json gets every figure. Every
# measurement starts a fresh master.
#
#   bench/run.sh [--runs N] [--out FILE] [--tasks N] [--exec-tasks N] [--bin BUILD_DIR]
#
# The Python rows run bench/python_bench.py: a Python worker with a pool of 2 processes against
# the seed's design, and the Python client's submit rate.
#
# --exec-tasks (5,000) is how many tasks measure an exec kind against the built-in echo: a
# process per task is far slower than the rest, so it gets fewer.
#
# --bin measures the binaries of another build (say, of an earlier commit, built with
# `cmake -DCMAKE_BUILD_TYPE=Release`) with this script, so two versions compare on one method.
#
# Every process it starts it stops by PID; every wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
runs=5
out=bench/results.json
tasks=200000
exec_tasks=5000
bin=
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --tasks) tasks=$2; shift 2 ;;
    --exec-tasks) exec_tasks=$2; shift 2 ;;
    --bin) bin=$(cd "$2" && pwd); shift 2 ;;
    *) echo "usage: $0 [--runs N] [--out FILE] [--tasks N] [--exec-tasks N] [--bin BUILD_DIR]" >&2
       exit 2 ;;
  esac
done
seed_peer=${SEED_PEER:-$root/../shared/peers/seed-manager}
if [ ! -x "$seed_peer/run.sh" ]; then
  echo "warning: the seed's design is not at $seed_peer (set SEED_PEER): no ratios to it" >&2
fi

if [ -z "$bin" ]; then
  ./scripts/deps.sh
  mkdir -p build-release
  echo "building Release (log: build-release/build.log) ..." >&2
  # Only what the benchmark runs: the tests are not needed here.
  if ! { cmake -S . -B build-release -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF &&
    cmake --build build-release -j"$(nproc)" --target taskmaster taskworker taskctl taskbench \
      commit_mark python_package; } >build-release/build.log 2>&1; then
    tail -n 40 build-release/build.log >&2
    exit 1
  fi
  bin=$root/build-release
fi

work=$(mktemp -d)
pids=()
pg_dir=
cleanup() {
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ -z "$pg_dir" ] || pg_ctl_as -D "$pg_dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$work" "$pg_dir"
}
trap cleanup EXIT
results=$work/results.jsonl

# Stops one process we started: SIGTERM, then SIGKILL after 10 s.
stop() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# The admin listener of the masters started next: on, as by default, on a free port.
master_admin=127.0.0.1:0

# A port free now on loopback (for an admin listener the benchmark scrapes).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Scrapes URLS once a second until stopped (bounded: 600 rounds), counting rounds in FILE.
scrape_every_second() {
  python3 - "$@" <<'PY' &
import sys, time, urllib.request
count_file, urls = sys.argv[1], sys.argv[2:]
for rounds in range(1, 601):
    began = time.monotonic()
    for url in urls:
        urllib.request.urlopen(url, timeout=5).read()
    with open(count_file, "w") as f:
        f.write(str(rounds))
    time.sleep(max(0.0, 1.0 - (time.monotonic() - began)))
PY
  scraper_pid=$!
  pids+=("$scraper_pid")
}

# Starts a master (insecure, loopback, port chosen by the OS); sets master_pid and addr.
start_master() {
  local data=$1; shift
  rm -f "$work/port"
  "$bin/master/taskmaster" --insecure --listen 127.0.0.1:0 --port-file "$work/port" \
    --admin-listen "$master_admin" --data-dir "$data" --log-level warn "$@" 2>>"$work/master.log" &
  master_pid=$!
  pids+=("$master_pid")
  # Listening once it has written its port (bounded: 600 polls, about 6 s), unless it exits first.
  for _ in $(seq 600); do
    [ -s "$work/port" ] && break
    kill -0 "$master_pid" 2>/dev/null || break
    sleep 0.01
  done
  [ -s "$work/port" ] || { echo "the master did not start" >&2; cat "$work/master.log" >&2; exit 1; }
  addr=127.0.0.1:$(cat "$work/port")
}

# Starts one worker of 2 threads (extra flags: "$@"); sets worker_pid.
start_worker() {
  "$bin/worker/taskworker" --master "$addr" --threads 2 --name bench-worker --log-level warn "$@" \
    2>>"$work/worker.log" &
  worker_pid=$!
  pids+=("$worker_pid")
  wait_worker bench-worker
}

# Waits until the master lists a worker named NAME (bounded: 10 s).
wait_worker() {
  for _ in $(seq 200); do
    "$bin/client/taskctl" --master "$addr" workers 2>/dev/null | grep -q "$1" && return
    sleep 0.05
  done
  echo "the worker $1 did not connect" >&2
  exit 1
}

# The Python library's benchmark program (bench/python_bench.py), with Debian's interpreter.
py_bench() { PYTHONPATH="$bin/python" timeout 300 /usr/bin/python3 bench/python_bench.py "$@"; }

# One measurement on a fresh master (store, flags...) with one worker: measure KIND RUN TB-ARGS...
measure() {
  local kind=$1 run=$2; shift 2
  start_master "$work/data-$kind-$run" --sync full "${store_flags[@]}"
  start_worker
  record "$kind" "$run" "$(tb "$@")"
  stop "$worker_pid"
  stop "$master_pid"
  rm -rf "$work/data-$kind-$run"
}

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# Waits until the master lists N pending tasks (bounded: 100 polls, about 10 s at least).
wait_pending() {
  local want=$1 have=
  for _ in $(seq 100); do
    have=$("$bin/client/taskctl" --master "$addr" --format json stats 2>/dev/null |
      python3 -c 'import json, sys; print(sum(q["pending"] for q in json.load(sys.stdin)["queues"]))' \
        2>/dev/null) || true
    [ "$have" = "$want" ] && return
    sleep 0.1
  done
  echo "the master lists ${have:-no} pending tasks, not $want" >&2
  exit 1
}

# PostgreSQL for the postgres store and its baseline: a server of our own in a temporary
# directory on a free loopback port, with its default durability (fsync, synchronous commit),
# run as the postgres user when we are root; stopped and removed at exit.
pg_bin=/usr/lib/postgresql/15/bin
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
pg_ctl_as() { as_pg "$pg_bin/pg_ctl" "$@"; }
start_postgres() {
  pg_dir=$(mktemp -d)
  [ "$(id -u)" -ne 0 ] || chown postgres "$pg_dir"
  as_pg "$pg_bin/initdb" -D "$pg_dir/data" -A trust -U postgres -E UTF8 >/dev/null
  pg_port=$(free_port)
  pg_ctl_as -D "$pg_dir/data" -l "$pg_dir/server.log" -w -t 60 \
    -o "-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1" start >/dev/null
  pg_dsn="host=127.0.0.1 port=$pg_port user=postgres dbname=postgres"
}
# A clean database between measurements: taskmaster's schema and the baseline's table dropped.
pg_reset() {
  PGOPTIONS='-c client_min_messages=warning' psql -X -q -d "$pg_dsn" \
    -c 'DROP SCHEMA IF EXISTS taskmaster CASCADE' -c 'DROP TABLE IF EXISTS baseline_jobs' >/dev/null
}
pg_baseline() { timeout 400 /usr/bin/python3 bench/pg_baseline.py --dsn "$pg_dsn" "$@"; }

# Waits until the master at $addr serves (a postgres master takes its lease first; bounded: 10 s).
wait_serving() {
  for _ in $(seq 200); do
    "$bin/client/taskctl" --master "$addr" stats >/dev/null 2>&1 && return
    sleep 0.05
  done
  echo "the master at $addr does not serve" >&2
  exit 1
}

# Waits until two masters serve a partition each: the first took both alone, and hands one over
# once it counts the second (bounded: 300 polls, 30 s at least).
wait_partitions_shared() {
  local owners=
  for _ in $(seq 300); do
    owners=$(psql -X -q -t -A -d "$pg_dsn" -c "SELECT count(DISTINCT owner) FROM
      taskmaster.partitions WHERE owner <> '' AND expires_at > now()" 2>/dev/null) || true
    [ "$owners" = 2 ] && return
    sleep 0.1
  done
  echo "the two masters did not share the partitions (${owners:-no} owners)" >&2
  exit 1
}

# taskbench throughput through each of two masters at once, half the numbers each: the JSON of
# both together (the tasks of both over the longer time).
tb_each_master() {
  local half=$(( $(wc -l <"$work/numbers") / 2 ))
  head -n "$half" "$work/numbers" >"$work/numbers-a"
  tail -n +"$((half + 1))" "$work/numbers" >"$work/numbers-b"
  timeout 300 "$bin/bench/taskbench" --master "$1" throughput --numbers "$work/numbers-a" \
    >"$work/tb-a.json" &
  local a=$!
  timeout 300 "$bin/bench/taskbench" --master "$2" throughput --numbers "$work/numbers-b" \
    >"$work/tb-b.json" &
  local b=$!
  wait "$a" && wait "$b" || { echo "taskbench through each master failed" >&2; exit 1; }
  python3 - "$work/tb-a.json" "$work/tb-b.json" <<'PY'
import json, sys
parts = [json.load(open(path)) for path in sys.argv[1:]]
tasks = sum(p["tasks"] for p in parts)
seconds = max(p["seconds"] for p in parts)
print(json.dumps({"tasks": tasks, "seconds": seconds, "tasks_per_s": tasks / seconds}))
PY
}

# Appends one measurement: record KIND RUN JSON.
record() { echo "{\"kind\":\"$1\",\"run\":$2,\"data\":$3}" >>"$results"; }

tb() { timeout 300 "$bin/bench/taskbench" --master "$addr" "$@"; }

# `taskctl submit --wait` of every number, timed from the process's start to its exit; prints the
# JSON line of a measurement, or fails unless every result is the square of its number.
taskctl_submit_wait() {
  local t0 t1
  t0=$(date +%s%N)
  timeout 300 "$bin/client/taskctl" --master "$addr" submit --kind square --file "$work/numbers" \
    --wait >"$work/taskctl.out" 2>"$work/taskctl.err" ||
    { echo "taskctl submit --wait failed" >&2; cat "$work/taskctl.err" >&2; exit 1; }
  t1=$(date +%s%N)
  python3 - "$work/numbers" "$work/taskctl.out" "$t0" "$t1" <<'PY'
import json, re, sys
numbers = [int(line) for line in open(sys.argv[1])]
want = {f"{n}*{n}={n * n}" for n in numbers}
got = [m.group(1) for m in (re.search(r"(\d+\*\d+=\d+)", line) for line in open(sys.argv[2])) if m]
if len(got) != len(numbers) or not set(got) <= want:
    sys.exit(f"taskctl printed {len(got)} results, not {len(numbers)} correct ones")
seconds = (int(sys.argv[4]) - int(sys.argv[3])) / 1e9
print(json.dumps({"tasks": len(numbers), "seconds": seconds, "tasks_per_s": len(numbers) / seconds}))
PY
}

python3 -c "
import random
r = random.Random(12345)
print('\n'.join(str(r.randint(0, 10000)) for _ in range($tasks)))" >"$work/numbers"

if [ -x "$pg_bin/postgres" ]; then
  start_postgres
  head -n 20000 "$work/numbers" >"$work/numbers-20k"
  head -n 2000 "$work/numbers" >"$work/numbers-2k"
else
  echo "warning: no PostgreSQL 15 server ($pg_bin): no postgres rows" >&2
fi

for run in $(seq "$runs"); do
  echo "run $run of $runs ..." >&2
  if [ -x "$seed_peer/run.sh" ]; then
    # The same tasks as taskmaster's throughput runs, put one by one (the seed's way).
    line=$(timeout 900 "$seed_peer/run.sh" -n "$tasks" | grep '^{')
    record seed "$run" "$line"
  fi

  record "commit-mark" "$run" "$("$bin/bench/commit_mark")"

  for store in memory sqlite; do
    store_flags=(--store "$store")
    measure "throughput-$store" "$run" throughput --numbers "$work/numbers"
    measure "latency-$store" "$run" latency --numbers "$work/numbers" --count 1000 --warmup 50
    # What a user sees: `taskctl submit --wait` over the same tasks, process start included,
    # every printed result checked.
    start_master "$work/data-taskctl-$store-$run" --sync full "${store_flags[@]}"
    start_worker
    record "taskctl-$store" "$run" "$(taskctl_submit_wait)"
    stop "$worker_pid"
    stop "$master_pid"
    rm -rf "$work/data-taskctl-$store-$run"
  done
  # What observing costs: memory throughput of 5x the tasks (a few seconds, so that several
  # scrapes land in it) with the admin listeners off, and with the master's and a worker's on and
  # scraped every second (the master's /metrics and /api/status, the worker's /metrics).
  for _ in 1 2 3 4 5; do cat "$work/numbers"; done >"$work/numbers-5x"
  master_admin=
  start_master "$work/data-admin-$run" --store memory
  start_worker
  record "throughput-admin-off" "$run" "$(tb throughput --numbers "$work/numbers-5x")"
  stop "$worker_pid"
  stop "$master_pid"
  master_admin=127.0.0.1:$(free_port)
  worker_admin=127.0.0.1:$(free_port)
  start_master "$work/data-admin-$run" --store memory
  start_worker --admin-listen "$worker_admin"
  rm -f "$work/scrapes"
  scrape_every_second "$work/scrapes" "http://$master_admin/metrics" \
    "http://$master_admin/api/status" "http://$worker_admin/metrics"
  line=$(tb throughput --numbers "$work/numbers-5x")
  stop "$scraper_pid"
  [ -s "$work/scrapes" ] || { echo "the scraper got no answer from the admin listeners" >&2; exit 1; }
  record "throughput-admin-scraped" "$run" "${line%\}},\"scrape_rounds\":$(cat "$work/scrapes")}"
  stop "$worker_pid"
  stop "$master_pid"
  master_admin=127.0.0.1:0
  rm -rf "$work/data-admin-$run"

  # One task per Submit call, as the seed puts them: the same tasks, no batching.
  store_flags=(--store memory)
  measure "throughput-memory-one-per-call" "$run" throughput --numbers "$work/numbers" --batch 1

  # Simulated worker streams beside the worker: 1,000 working (2 slots, 64 credits each, running
  # square), then 10,000 attached and idle (connected, heartbeating, asking for no task). In that
  # order: for some seconds after 10,000 streams end at once, the master completes no new
  # connection's handshake (seen with gRPC's callback server as with its queues).
  start_master "$work/data-scale-$run" --store memory
  start_worker
  record "throughput-one-worker" "$run" "$(tb throughput --numbers "$work/numbers")"
  for mode in working idle; do
    credits=0 count=10000
    [ "$mode" = working ] && credits=64 count=1000
    rm -f "$work/streams.out"
    # Not through tb: $! must be timeout's own pid, which passes our SIGTERM on.
    timeout 300 "$bin/bench/taskbench" --master "$addr" streams --count "$count" \
      --credits "$credits" >"$work/streams.out" 2>>"$work/streams.log" &
    streams_pid=$!
    pids+=("$streams_pid")
    # taskbench prints its line once every stream is welcomed, and gives up after 60 s (bounded
    # here too: 700 polls, about 70 s); measuring without the streams would mislabel the figure.
    for _ in $(seq 700); do
      grep -q streams "$work/streams.out" 2>/dev/null && break
      kill -0 "$streams_pid" 2>/dev/null || break
      sleep 0.1
    done
    if ! grep -q streams "$work/streams.out" 2>/dev/null; then
      echo "the $count $mode streams did not attach" >&2
      cat "$work/streams.log" >&2
      exit 1
    fi
    record "throughput-$count-$mode-streams" "$run" "$(tb throughput --numbers "$work/numbers")"
    stop "$streams_pid"
  done
  stop "$worker_pid"
  stop "$master_pid"

  # What an exec task costs: the same payloads to the built-in echo and to an exec kind running
  # /bin/cat (a process per task), on one worker of 2 threads, a fresh memory master each.
  head -n "$exec_tasks" "$work/numbers" >"$work/exec-numbers"
  printf '[exec.cat]\ncommand = ["/bin/cat"]\n' >"$work/exec.toml"
  for kind in echo cat; do
    start_master "$work/data-exec-$run" --store memory
    start_worker --config "$work/exec.toml"
    record "throughput-$kind" "$run" \
      "$(tb throughput --numbers "$work/exec-numbers" --kind "$kind" --batch 1000)"
    stop "$worker_pid"
    stop "$master_pid"
  done

  # The Python library on the seed's workload: a Python worker (`square` on a pool of 2
  # processes) measured as taskmaster's throughput is, in place of taskworker; and the Python
  # client submitting the same tasks as one job to a durable master (stored when it returns).
  start_master "$work/data-py-$run" --store memory
  py_bench worker "$addr" py-worker 2>>"$work/py-worker.log" &
  py_pid=$!
  pids+=("$py_pid")
  wait_worker py-worker
  record "throughput-python-worker" "$run" "$(tb throughput --numbers "$work/numbers")"
  stop "$py_pid"
  stop "$master_pid"
  start_master "$work/data-py-$run" --store sqlite --sync full
  record "python-submit" "$run" "$(py_bench submit "$addr" "$work/numbers")"
  stop "$master_pid"

  # Master memory per pending task: 1,000,000 tasks of 16-byte payloads.
  start_master "$work/data-mem-$run" --store memory
  before=$(rss_kb "$master_pid")
  tb fill --count 1000000 --payload-bytes 16 >/dev/null
  wait_pending 1000000
  after=$(rss_kb "$master_pid")
  record "memory" "$run" "{\"rss_before_kb\":$before,\"rss_after_kb\":$after,\"tasks\":1000000}"
  stop "$master_pid"

  # Recovery: 1,000,000 pending tasks on the durable store, then a restart timed to listening.
  data=$work/data-recovery-$run
  start_master "$data" --store sqlite --sync normal
  tb fill --count 1000000 --payload-bytes 16 >/dev/null
  stop "$master_pid"
  t0=$(date +%s%N)
  start_master "$data" --store sqlite
  t1=$(date +%s%N)
  record "recovery" "$run" "{\"tasks\":1000000,\"ms\":$(( (t1 - t0) / 1000000 ))}"
  stop "$master_pid"

  if [ -n "$pg_dir" ]; then
    # The SKIP LOCKED queue on the same server: 100 jobs per claim, then one (on fewer jobs:
    # it is far slower), and a LISTEN/NOTIFY round trip.
    pg_reset
    record "pg-baseline-claim-100" "$run" \
      "$(pg_baseline throughput --numbers "$work/numbers-20k" --claim 100 --workers 2)"
    pg_reset
    record "pg-baseline-claim-1" "$run" \
      "$(pg_baseline throughput --numbers "$work/numbers-2k" --claim 1 --workers 2)"
    pg_reset
    record "pg-baseline-latency" "$run" "$(pg_baseline latency --count 500 --warmup 50)"
    # Two masters on it, each serving one of two partitions; one worker (as above) on both.
    # Throughput: a taskbench per master, half the numbers each, at once. Latency: through one.
    for what in throughput latency; do
      pg_reset
      start_master "$work/data-pg-$run" --store postgres --postgres "$pg_dsn" \
        --postgres-partitions 2
      first_pid=$master_pid first_addr=$addr
      wait_serving
      start_master "$work/data-pg2-$run" --store postgres --postgres "$pg_dsn" \
        --postgres-partitions 2
      second_pid=$master_pid second_addr=$addr
      wait_partitions_shared
      addr="$first_addr,$second_addr"
      start_worker
      if [ "$what" = throughput ]; then
        record "throughput-postgres" "$run" "$(tb_each_master "$first_addr" "$second_addr")"
      else
        addr=$first_addr
        record "latency-postgres" "$run" \
          "$(tb latency --numbers "$work/numbers" --count 1000 --warmup 50)"
      fi
      stop "$worker_pid"
      stop "$second_pid"
      stop "$first_pid"
    done
  fi
  rm -rf "$work"/data-*
done

machine="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
python3 bench/summarize.py "$results" "$out" "$machine" "$tasks"
