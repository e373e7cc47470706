#!/usr/bin/env bash
# The .deb packages: cpack builds them from the build tree, lintian finds no error in them, they
# unpack into a scratch root with the files, conffiles and dependencies they should have, the
# systemd units pass `systemd-analyze verify` there as installed, and the installed binaries and
# config files run the seed's scenario (ten numbers squared by two workers).
#
#   tests/package_test.sh SOURCE_DIR BUILD_DIR
# Exit 77 (skipped, with the reason) when a tool it needs is missing.
set -euo pipefail
src=$(cd "$1" && pwd)
build=$(cd "$2" && pwd)
for tool in cpack dpkg-deb lintian dpkg-shlibdeps systemd-analyze; do
  command -v "$tool" >/dev/null || { echo "SKIP: $tool is not installed (scripts/deps.sh)"; exit 77; }
done

work=$(mktemp -d /tmp/taskmaster-package-XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

echo "== cpack -G DEB"
(cd "$build" && cpack -G DEB -B "$work/out" >"$work/cpack.log" 2>&1) || {
  cat "$work/cpack.log"; fail "cpack"; }
mapfile -t debs < <(ls "$work"/out/*.deb)
[ "${#debs[@]}" -eq 4 ] || fail "expected 4 packages, got: ${debs[*]}"

declare -A want_files=(
  [taskmaster]="./usr/bin/taskmaster ./usr/lib/systemd/system/taskmaster.service ./etc/taskmaster/master.toml ./usr/share/doc/taskmaster/copyright"
  [taskmaster-worker]="./usr/bin/taskworker ./usr/lib/systemd/system/taskworker@.service ./etc/taskmaster/worker.toml"
  [taskmaster-client]="./usr/bin/taskctl"
  [taskmaster-dev]="./usr/include/taskmaster/worker.h ./usr/lib/cmake/taskmaster/taskmasterConfig.cmake"
)
root=$work/root
mkdir -p "$root"
for deb in "${debs[@]}"; do
  name=$(dpkg-deb -f "$deb" Package)
  echo "== $name: $(dpkg-deb -f "$deb" Version), Depends: $(dpkg-deb -f "$deb" Depends)"
  # lintian: no error (warnings and notes are printed, not failed on).
  lintian --fail-on error --tag-display-limit 0 "$deb" | tee "$work/lintian-$name.txt" || {
    fail "lintian found errors in $name"; }
  listing=$(dpkg-deb -c "$deb" | awk '{print $6}')
  for f in ${want_files[$name]}; do
    grep -qxF "$f" <<<"$listing" || fail "$name lacks $f"
  done
  dpkg-deb -x "$deb" "$root"
  mkdir -p "$work/control-$name"
  dpkg-deb -e "$deb" "$work/control-$name"
done
# Config files are conffiles: an edited one survives an upgrade.
grep -qxF /etc/taskmaster/master.toml "$work/control-taskmaster/conffiles" || fail "conffiles"
grep -qxF /etc/taskmaster/worker.toml "$work/control-taskmaster-worker/conffiles" || fail "conffiles"
# Dependencies found from the libraries the binaries link.
depends=$(dpkg-deb -f "$work"/out/taskmaster_*.deb Depends)
for lib in libc6 libgrpc++1.51 libsqlite3-0 libsystemd0 adduser; do
  grep -q "$lib" <<<"$depends" || fail "taskmaster does not depend on $lib: $depends"
done

echo "== maintainer scripts, into the scratch root (DPKG_ROOT), with adduser and getent stubbed"
stubs=$work/stubs
mkdir -p "$stubs"
printf '#!/bin/sh\nexit 2\n' >"$stubs/getent"                       # no such user yet
printf '#!/bin/sh\necho "adduser $*" >>"%s"\n' "$work/calls" >"$stubs/adduser"
chmod +x "$stubs"/*
maint() { DPKG_ROOT=$root PATH=$stubs:$PATH sh "$work/control-$1/$2" "${@:3}"; }
maint taskmaster postinst configure
maint taskmaster-worker postinst configure
[ "$(grep -c -- '--system --group --no-create-home --home /var/lib/taskmaster' "$work/calls")" -eq 2 ] ||
  fail "adduser was not asked for the system user: $(cat "$work/calls")"
etc=$root/etc/taskmaster
for f in tokens worker.token submit.token admin.token; do
  [ "$(stat -c %a "$etc/$f")" = 600 ] || fail "$f is not 0600"
done
[ "$(awk '$1 == "work" {print $2}' "$etc/tokens")" = "$(cat "$etc/worker.token")" ] || fail "work token"
[ "$(awk '$1 == "submit" {print $2}' "$etc/tokens")" = "$(cat "$etc/submit.token")" ] ||
  fail "submit token"
[ "$(awk '$1 == "admin" {print length($2)}' "$etc/tokens")" = 48 ] || fail "admin token"
before=$(sha256sum "$etc/tokens")
maint taskmaster postinst configure 0.1.0-1                          # an upgrade: made once
[ "$(sha256sum "$etc/tokens")" = "$before" ] || fail "an upgrade replaced the tokens"

echo "== systemd-analyze verify, on the units as installed"
# The system's own units (targets the service units are ordered after) go beside them.
mkdir -p "$root/usr/lib/systemd"
cp -a /lib/systemd/system/. "$root/usr/lib/systemd/system/"
ln -s usr/bin "$root/bin"
cp "$(readlink -f /bin/kill)" "$root/usr/bin/kill"
for unit in taskmaster.service taskworker@worker.service; do
  out=$(systemd-analyze verify --root="$root" "$unit" 2>&1) || fail "verify $unit: $out"
  [ -z "$out" ] || fail "verify $unit said: $out"
done

echo "== cmake --install under another prefix: the units name what it placed"
prefix=$work/prefix
for component in master worker; do
  cmake --install "$build" --prefix "$prefix" --component "$component" >/dev/null
done
unit=$prefix/lib/systemd/system/taskmaster.service
grep -qxF "ExecStart=$prefix/bin/taskmaster --config $prefix/etc/taskmaster/master.toml" "$unit" ||
  fail "$unit: $(grep ExecStart "$unit")"
grep -qxF "LoadCredential=tokens:$prefix/etc/taskmaster/tokens" "$unit" || fail "$unit credential"
[ -f "$prefix/etc/taskmaster/master.toml" ] && [ -x "$prefix/bin/taskmaster" ] || fail "prefix files"
grep -qF "ExecStart=$prefix/bin/taskworker --config $prefix/etc/taskmaster/%i.toml" \
  "$prefix/lib/systemd/system/taskworker@.service" || fail "worker unit under the prefix"

echo "== the seed's scenario with the installed binaries and config files"
bin=$root/usr/bin
# The installed master.toml, with what differs on a test machine given as variables and flags,
# and the tokens the postinst made.
TASKMASTER_DATA_DIR=$work/data TASKMASTER_TOKENS=$etc/tokens \
  "$bin/taskmaster" --config "$etc/master.toml" --listen 127.0.0.1:0 --port-file "$work/port" \
  --admin-listen 127.0.0.1:0 \
  >"$work/master.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do [ -s "$work/port" ] && break; sleep 0.1; done
[ -s "$work/port" ] || { cat "$work/master.log"; fail "the master did not start"; }
addr=127.0.0.1:$(cat "$work/port")
for i in 1 2; do
  "$bin/taskworker" --config "$etc/worker.toml" --master "$addr" \
    --token-file "$etc/worker.token" --name "packaged-$i" >"$work/worker-$i.log" 2>&1 &
  pids+=($!)
done
seq 1 10 | timeout 60 "$bin/taskctl" --master "$addr" --token-file "$etc/submit.token" \
  submit --kind square --wait >"$work/results.txt" 2>"$work/taskctl.err" || {
  cat "$work/taskctl.err" "$work/master.log"; fail "taskctl submit --wait"; }
cat "$work/results.txt"
for n in $(seq 1 10); do
  grep -qw "$((n * n))" "$work/results.txt" || fail "no result $((n * n)) for $n"
done
# Workers first (each drains and says goodbye), then the master: each exits 0 on SIGTERM.
stop() {
  kill -TERM "$1"
  local rc=0
  timeout 60 tail --pid="$1" -f /dev/null || true
  wait "$1" || rc=$?
  [ "$rc" -eq 0 ] || fail "$2 (pid $1) exited $rc on SIGTERM"
}
stop "${pids[1]}" worker-1
stop "${pids[2]}" worker-2
stop "${pids[0]}" master
maint taskmaster postrm purge
[ ! -e "$etc/tokens" ] && [ ! -e "$etc/worker.token" ] || fail "purge left the tokens"
pids=()
echo "PASS: 4 packages, lintian clean of errors, maintainer scripts, units verified, seed scenario on the installed binaries with the tokens the postinst made"
