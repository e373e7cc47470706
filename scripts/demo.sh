#!/usr/bin/env bash
# The seed's scenario: installs what is missing, builds, starts a master and two workers on
# loopback with generated tokens, submits ten random numbers as `square` tasks, prints each
# result as n*n=r, and stops everything it started.
# --python: the seed's two programs, ported to the Python library (examples/python), in place
# of taskworker and taskctl.
set -euo pipefail
cd "$(dirname "$0")/.."
python=false
case "${1:-}" in
  --python) python=true ;;
  "") ;;
  *) echo "usage: $0 [--python]" >&2; exit 2 ;;
esac
./scripts/deps.sh
echo "building (log: build/build.log) ..." >&2
mkdir -p build
if ! ./scripts/build.sh >build/build.log 2>&1; then
  tail -n 40 build/build.log >&2
  exit 1
fi
bin=build

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

token() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
submit_token=$(token)
work_token=$(token)
printf 'submit %s\nwork %s\n' "$submit_token" "$work_token" >"$work/tokens"
echo "$submit_token" >"$work/submit.token"
echo "$work_token" >"$work/work.token"
chmod 600 "$work"/*

# The embedded SQLite store, in a directory of its own that goes away with the demo.
"$bin/master/taskmaster" --listen 127.0.0.1:0 --tokens "$work/tokens" --data-dir "$work/data" \
  --admin-listen 127.0.0.1:0 --port-file "$work/port" 2>"$work/master.log" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/port" ] && break; sleep 0.1; done
if [ ! -s "$work/port" ]; then
  cat "$work/master.log" >&2
  exit 1
fi
master="127.0.0.1:$(cat "$work/port")"
echo "master listening on $master" >&2

ctl=("$bin/client/taskctl" --master "$master" --token-file "$work/submit.token")
wait_for_workers() {
  for _ in $(seq 100); do
    [ "$("${ctl[@]}" --format json workers | grep -o '"connected":true' | wc -l)" -ge "$1" ] && return
    sleep 0.1
  done
  echo "the workers did not connect; their logs are in $work" >&2
  exit 1
}

if $python; then
  export PYTHONPATH="$PWD/$bin/python${PYTHONPATH:+:$PYTHONPATH}" TASKMASTER_ADDR="$master"
  TASKMASTER_TOKEN="$work_token" /usr/bin/python3 examples/python/task_worker.py \
    >"$work/worker.out" 2>"$work/worker.log" &
  worker=$!
  pids+=("$worker")
  wait_for_workers 1
  TASKMASTER_TOKEN="$submit_token" /usr/bin/python3 examples/python/task_master.py
  kill -TERM "$worker"
  wait "$worker"
  cat "$work/worker.out"
  exit 0
fi

for i in 1 2; do
  "$bin/worker/taskworker" --master "$master" --token-file "$work/work.token" \
    --name "worker-$i" 2>"$work/worker-$i.log" &
  pids+=($!)
done
wait_for_workers 2

numbers=()
for _ in $(seq 10); do numbers+=($((RANDOM % 10001))); done
echo "submitting ${numbers[*]}" >&2
"${ctl[@]}" submit --kind square --wait "${numbers[@]}"
