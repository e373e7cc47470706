#!/usr/bin/env bash
# Installs the Debian packages taskmaster needs to build and test, only those missing.
set -euo pipefail
packages=(build-essential cmake pkg-config protobuf-compiler protobuf-compiler-grpc libprotobuf-dev
  libgrpc++-dev libabsl-dev libspdlog-dev libcli11-dev libsqlite3-dev nlohmann-json3-dev
  libgtest-dev libgmock-dev libjemalloc-dev libssl-dev openssl python3 iproute2 iptables
  libtomlplusplus-dev libsystemd-dev python3-grpcio python3-grpc-tools python3-protobuf
  python3-pytest python3-venv python3-pip python3-setuptools clang-14 libfuzzer-14-dev
  libclang-rt-14-dev llvm-14)
# The deploy and package tests: systemd-analyze (verify, security), cpack's DEB generator (file,
# dpkg-shlibdeps) and lintian.
packages+=(systemd file dpkg-dev lintian)
# taskctl top's test drives it on a terminal: a tmux pane.
packages+=(tmux)
# The admin listeners: Prometheus' text format (prometheus-cpp); their tests ask them with
# cpp-httplib's client, check scrapes with promtool (Debian's prometheus package, whose server is
# kept from starting, below) and the status page in headless Chromium.
packages+=(prometheus-cpp-dev libcpp-httplib-dev prometheus chromium)
# The postgres store (libpq), and its high-availability tests and benchmark: a PostgreSQL 15
# server each test starts in a temporary directory (the package's own cluster is kept from
# starting, as prometheus' server is), psql, and psycopg2 for the benchmark's SKIP LOCKED baseline.
packages+=(libpq-dev postgresql-15 postgresql-client-15 python3-psycopg2)
# The container test: rootful podman (runc, conmon), a base image made with debootstrap (nothing
# from a registry), the compose file checked by docker-compose; pgrep checks what it left.
packages+=(podman buildah runc conmon debootstrap docker-compose procps)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  # Only promtool is wanted of the prometheus package: policy-rc.d keeps its server (and any other
  # service a package brings) from starting while installing, and its unit stays disabled.
  policy=/usr/sbin/policy-rc.d
  made_policy=false
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy" >/dev/null
    "${sudo_cmd[@]}" chmod 755 "$policy"
    made_policy=true
  fi
  installed=0
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    installed=$?
  if $made_policy; then "${sudo_cmd[@]}" rm -f "$policy"; fi
  ((installed == 0)) || exit "$installed"
  if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    "${sudo_cmd[@]}" systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
  if [[ " ${missing[*]} " == *" postgresql-15 "* ]] && [ -d /run/systemd/system ]; then
    "${sudo_cmd[@]}" systemctl disable --now postgresql >/dev/null 2>&1 || true
  fi
fi
