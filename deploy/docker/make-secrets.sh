#!/usr/bin/env bash
# Makes the files compose.yaml mounts as secrets, in DIR (default deploy/docker/secrets):
#
#   deploy/docker/make-secrets.sh [DIR [NAME_OR_IP ...]]
#
# tokens        the master's tokens file: one submit and one work line
# submit_token  the submit token alone, for taskctl (--token-file or TASKMASTER_TOKEN)
# worker_token  the work token alone, for workers
# ca.pem, server.pem, server.key and the rest of deploy/make-certs.sh: the master's
#               certificate is valid for the names given (default: master, the compose service)
# postgres_password  the database password of compose.ha.yaml, read by PostgreSQL's and the
#               masters' users alike (0644, in a directory only its owner enters)
#
# Files are 0600. The containers run as uid 10001: as root, the files they read are given to
# that uid (rootless podman: run it under `podman unshare`).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-$here/secrets}
shift || true
[ $# -gt 0 ] || set -- master
umask 077
mkdir -p "$dir"
token() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
submit=$(token)
work=$(token)
printf 'submit %s\nwork %s\n' "$submit" "$work" >"$dir/tokens"
echo "$submit" >"$dir/submit_token"
echo "$work" >"$dir/worker_token"
[ -e "$dir/postgres_password" ] || token >"$dir/postgres_password"
chmod 0644 "$dir/postgres_password"
"$here/../make-certs.sh" "$dir" "$@" >/dev/null
if [ "$(id -u)" -eq 0 ]; then
  chown 10001:10001 "$dir/tokens" "$dir/worker_token" "$dir/server.pem" "$dir/server.key"
fi
echo "secrets in $dir: tokens, submit_token, worker_token, postgres_password, ca.pem," \
  "server.pem/.key ($*)"
