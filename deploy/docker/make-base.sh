#!/usr/bin/env bash
# Makes a Debian 12 base image without a registry: debootstrap (minbase) from the Debian mirror,
# imported into podman under NAME (default localhost/taskmaster-base:bookworm). Build the
# Dockerfile on it with --build-arg BASE=NAME. Needs root, debootstrap and podman.
# MIRROR overrides the mirror (default: the first Debian URI in this machine's apt sources).
set -euo pipefail
name=${1:-localhost/taskmaster-base:bookworm}
if podman image exists "$name"; then
  echo "base image $name exists" >&2
  exit 0
fi
mirror=${MIRROR:-$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
  /etc/apt/sources.list.d/*.list 2>/dev/null | grep -v '^[[:space:]]*#' \
  | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true)}
mirror=${mirror:-http://deb.debian.org/debian}
mirror=${mirror%/}
root=$(mktemp -d /var/tmp/taskmaster-base.XXXXXX)
trap 'rm -rf --one-file-system "$root"' EXIT
echo "debootstrap bookworm from $mirror into $root" >&2
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 \
  || { tail -n 30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# The same sources as debian:bookworm-slim: point releases and security updates too.
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# Like the slim image: no package lists or downloaded packages kept in the layer.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
tar --numeric-owner -C "$root" -c . | podman import \
  --change 'CMD ["/bin/bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  - "$name" >/dev/null
echo "imported $name" >&2
