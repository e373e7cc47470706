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
# The status page's test loads it in headless Chromium.
packages+=(chromium)
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
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
