#!/usr/bin/env bash
# The container image of deploy/docker, with rootful podman and nothing from a registry: makes a
# Debian base image with debootstrap (kept as localhost/taskmaster-base:bookworm), builds the
# master and worker images on it (kept, with their layers and the ccache of the build, so a
# second run recompiles only what changed), starts a master and two workers, runs the seed's
# scenario through them (ten `square` tasks, each n*n checked), waits for the HEALTHCHECK,
# stops everything with SIGTERM, checks each container exited 0, and reads the results back
# from a new master on the same volume. Also `docker-compose config -q` on compose.yaml and
# compose.ha.yaml.
# Exit 77 (skipped, reason printed) only when podman cannot run containers here.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
docker_dir=$src/deploy/docker
base=localhost/taskmaster-base:bookworm
master_image=localhost/taskmaster:test
worker_image=localhost/taskworker:test
builder_image=localhost/taskmaster-builder:test
run=tm-ct-$$
started=$SECONDS

skip() { echo "SKIPPED: $*"; exit 77; }
log() { echo "[$((SECONDS - started))s] $*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || skip "needs root: the test runs podman rootful"
command -v podman >/dev/null || skip "no podman (scripts/deps.sh installs it)"
podman info >/dev/null 2>&1 || skip "podman cannot run here: $(podman info 2>&1 | tail -n 1)"

# The flags every container runs with: no CNI bridge or slirp (host network, so ports are on
# this machine's loopback), runc, and limits that do not depend on the caller's.
run_flags=(--runtime runc --network host --ulimit nofile=1024:1024 --ulimit nproc=1024:1024
  --label "taskmaster-test=$run")
# podman runs a HEALTHCHECK on a systemd timer, and logs an error for each container where
# systemd is not running; the test runs the image's probe itself (podman healthcheck run).
[ -d /run/systemd/system ] || export DISABLE_HC_SYSTEMD=true

work=$(mktemp -d /tmp/tm-container.XXXXXX)
# Removes what run NAME made: containers (and their anonymous volumes), the data volume, the
# secrets. The images stay: they are the next run's cache.
remove_run() { # NAME
  podman ps -aq --filter "label=taskmaster-test=$1" | xargs -r podman rm -f -v -t 0 >/dev/null 2>&1 || true
  podman volume rm -f "$1-data" >/dev/null 2>&1 || true
  podman secret ls --format '{{.Name}}' 2>/dev/null | grep "^$1-" | xargs -r podman secret rm >/dev/null 2>&1 || true
}
cleanup() {
  local status=$?
  remove_run "$run"
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
# What an earlier run killed before its cleanup (ctest's timeout) left behind: its shell is gone.
for stale in $( (podman ps -a --format '{{index .Labels "taskmaster-test"}}'
  podman volume ls --format '{{.Name}}'; podman secret ls --format '{{.Name}}') 2>/dev/null \
  | grep -o '^tm-ct-[0-9]*' | sort -u); do
  kill -0 "${stale#tm-ct-}" 2>/dev/null || remove_run "$stale"
done

log "docker-compose config -q"
command -v docker-compose >/dev/null || fail "no docker-compose (scripts/deps.sh installs it)"
docker-compose -f "$docker_dir/compose.yaml" config -q
docker-compose -f "$docker_dir/compose.ha.yaml" config -q

# The base image: built once, kept under a stable name for later runs.
if ! podman image exists "$base"; then
  log "making $base with debootstrap (first run only)"
  command -v debootstrap >/dev/null || fail "no debootstrap (scripts/deps.sh installs it)"
  timeout 600 "$docker_dir/make-base.sh" "$base"
fi
probe_err=$(podman run --rm "${run_flags[@]}" "$base" true 2>&1) \
  || skip "podman cannot create a container: $probe_err"

# Builds compile: one at a time on this machine (the lock other builds take too), and at low
# priority beside the tests ctest runs at the same time. The layer cache and the ccache of the
# builder stage (a RUN --mount cache) make a rebuild after a change recompile only that change.
build() { # TARGET TAG SECONDS
  local old
  old=$(podman image inspect --format '{{.Id}}' "$2" 2>/dev/null || true)
  flock -n /tmp/tm-build.lock true || log "waiting for another build to finish (/tmp/tm-build.lock)"
  timeout "$3" flock /tmp/tm-build.lock nice -n 19 podman build --format docker \
    --isolation chroot --network host --build-arg "BASE=$base" --target "$1" -t "$2" \
    -f "$docker_dir/Dockerfile" "$src" >"$work/build-$1.log" 2>&1 \
    || { tail -n 40 "$work/build-$1.log" >&2; fail "podman build --target $1"; }
  # The image this tag named before is no cache any more: do not let runs pile them up.
  if [ -n "$old" ] && [ "$old" != "$(podman image inspect --format '{{.Id}}' "$2")" ]; then
    podman rmi "$old" >/dev/null 2>&1 || true
  fi
}
log "building the images (log: build-*.log)"
build builder "$builder_image" 1500
grep -E '^ *(Hits|Misses):' "$work/build-builder.log" | tr -s ' ' | sed 's/^/  ccache/' || true
build master "$master_image" 300
build worker "$worker_image" 300
# Containers run from these ids, whatever another checkout's run tags meanwhile.
master_id=$(podman image inspect --format '{{.Id}}' "$master_image")
worker_id=$(podman image inspect --format '{{.Id}}' "$worker_image")
log "image $master_image: $(($(podman image inspect --format '{{.Size}}' "$master_id") / 1000000)) MB"
[ "$(podman image inspect --format '{{.Config.User}}' "$master_id")" = 10001:10001 ] \
  || fail "the image does not run as 10001:10001"

# Secrets as compose.yaml has them, handed to podman as secrets readable by the image's user.
"$docker_dir/make-secrets.sh" "$work/secrets" >/dev/null
for name in tokens worker_token submit_token ca.pem server.pem server.key; do
  podman secret create "$run-$name" "$work/secrets/$name" >/dev/null
done
secret() { echo "--secret=$run-$1,target=$1,uid=10001,gid=10001,mode=0400"; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
master_addr=127.0.0.1:$port
podman volume create "$run-data" >/dev/null

# The image's CMD but on loopback: the network is the host's.
start_master() { # NAME
  podman run -d --name "$1" "${run_flags[@]}" -v "$run-data:/var/lib/taskmaster" \
    "$(secret tokens)" "$(secret server.pem)" "$(secret server.key)" "$(secret ca.pem)" \
    "$master_id" --listen "$master_addr" --admin-listen 127.0.0.1:0 --data-dir /var/lib/taskmaster \
    --tokens /run/secrets/tokens --tls-cert /run/secrets/server.pem \
    --tls-key /run/secrets/server.key >/dev/null
}
# taskctl in a container of its own, as a client host would run it; bounded in time.
ctl() {
  timeout 120 podman run --rm "${run_flags[@]}" "$(secret submit_token)" "$(secret ca.pem)" \
    --entrypoint taskctl "$worker_id" --master "$master_addr" \
    --token-file /run/secrets/submit_token --tls-ca /run/secrets/ca.pem "$@"
}
exit_code() { podman inspect --format '{{.State.ExitCode}}' "$1"; }
show_logs() { for c in "$@"; do echo "--- $c" >&2; podman logs "$c" 2>&1 | tail -n 20 >&2; done; }
wait_healthy() { # NAME: the HEALTHCHECK's own probe, run until it passes (at most 60 s)
  for _ in $(seq 60); do
    podman healthcheck run "$1" >/dev/null 2>&1 && return 0
    sleep 1
  done
  show_logs "$1"
  fail "$1 never became healthy: $(podman healthcheck run "$1" 2>&1 || true)"
}

log "starting a master and two workers on $master_addr"
start_master "$run-master"
for i in 1 2; do
  podman run -d --name "$run-worker-$i" "${run_flags[@]}" \
    "$(secret worker_token)" "$(secret ca.pem)" "$worker_id" \
    --master "$master_addr" --token-file /run/secrets/worker_token \
    --tls-ca /run/secrets/ca.pem --name "worker-$i" >/dev/null
done
wait_healthy "$run-master"
[ "$(podman inspect --format '{{.State.Health.Status}}' "$run-master")" = healthy ] \
  || fail "podman does not show $run-master healthy"
for _ in $(seq 60); do
  [ "$(ctl --format json workers | grep -o '"connected":true' | wc -l)" -ge 2 ] && break
  sleep 1
done
[ "$(ctl --format json workers | grep -o '"connected":true' | wc -l)" -ge 2 ] \
  || { show_logs "$run-master" "$run-worker-1" "$run-worker-2"; fail "the workers did not connect"; }

log "the seed's scenario: ten square tasks"
expected=$(for n in $(seq 1 10); do echo "$n*$n=$((n * n))"; done | sort)
ctl submit --kind square --wait $(seq 1 10) >"$work/results" \
  || { show_logs "$run-master" "$run-worker-1" "$run-worker-2"; fail "taskctl submit --wait"; }
job=$(head -n 1 "$work/results")
[ "$(tail -n +2 "$work/results" | sort)" = "$expected" ] \
  || fail "results: $(cat "$work/results"), expected $(echo $expected)"

log "stopping the workers, then the master, with SIGTERM"
# STOPSIGNAL is SIGTERM; the grace period is long enough that a SIGKILL means a hang.
podman stop -t 60 "$run-worker-1" "$run-worker-2" >/dev/null
podman stop -t 30 "$run-master" >/dev/null
for c in "$run-worker-1" "$run-worker-2" "$run-master"; do
  [ "$(exit_code "$c")" = 0 ] || { show_logs "$c"; fail "$c exited $(exit_code "$c")"; }
done

log "nothing lost: a new master on the same volume has the job's ten results"
start_master "$run-master-2"
wait_healthy "$run-master-2"
ctl wait "$job" >"$work/results-2" || fail "taskctl wait $job after the restart"
[ "$(sort "$work/results-2")" = "$expected" ] \
  || fail "after the restart: $(cat "$work/results-2"), expected $(echo $expected)"
podman stop -t 30 "$run-master-2" >/dev/null
[ "$(exit_code "$run-master-2")" = 0 ] || { show_logs "$run-master-2"; fail "the second master exited $(exit_code "$run-master-2")"; }

# Cleanup runs in the trap; here it is checked as well: no container, volume, secret, mount or
# process of this run left.
ids=$(podman ps -aq --no-trunc --filter "label=taskmaster-test=$run")
remove_run "$run"
[ -z "$(podman ps -aq --filter "label=taskmaster-test=$run")" ] || fail "containers left behind"
! podman volume exists "$run-data" || fail "volume $run-data left behind"
! podman secret ls --format '{{.Name}}' | grep -q "^$run-" || fail "secrets left behind"
for id in $ids; do
  ! mount | grep -q "$id" || fail "a mount of container $id left behind"
  ! pgrep -f "$id" >/dev/null || fail "a process of container $id left behind"
done
log "passed"
