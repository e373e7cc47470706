#!/bin/sh
# The master image's HEALTHCHECK: one `taskctl stats` against the master of this container with
# a submit or admin token of the master's own tokens file (stats needs one of those roles);
# healthy when the master answers. It always exits on its own: taskctl is killed after 8 s.
#
# Where the master listens, its tokens file and whether it serves TLS are read from its command
# line (PID 1, the image's ENTRYPOINT), so a CMD with another port still works. Overrides:
# HEALTHCHECK_ADDR (host:port), HEALTHCHECK_TOKENS (the master's tokens file), HEALTHCHECK_TLS_CA
# (default /run/secrets/ca.pem when the master serves TLS), HEALTHCHECK_TLS_CERT and
# HEALTHCHECK_TLS_KEY (a client certificate, when the master asks for one).
set -eu
listen=0.0.0.0:7070 tokens=/run/secrets/tokens tls=
args=$(tr '\0' '\n' </proc/1/cmdline 2>/dev/null || true)
prev=
while IFS= read -r arg; do
  case $prev in
    --listen) listen=$arg ;;
    --tokens) tokens=$arg ;;
  esac
  case $arg in
    --listen=*) listen=${arg#*=} ;;
    --tokens=*) tokens=${arg#*=} ;;
    --tls-cert | --tls-cert=*) tls=1 ;;
  esac
  prev=$arg
done <<END
$args
END
host=${listen%:*}
case $host in 0.0.0.0 | '' | '[::]') host=127.0.0.1 ;; esac
addr=${HEALTHCHECK_ADDR:-$host:${listen##*:}}
tokens=${HEALTHCHECK_TOKENS:-$tokens}
token=$(awk '$1 == "submit" || $1 == "admin" { print $2; exit }' "$tokens")
[ -n "$token" ] || { echo "no submit or admin token in $tokens" >&2; exit 1; }
ca=${HEALTHCHECK_TLS_CA:-}
[ -n "$ca" ] || [ -z "$tls" ] || ca=/run/secrets/ca.pem
set --
[ -z "$ca" ] || set -- --tls-ca "$ca"
[ -z "${HEALTHCHECK_TLS_CERT:-}" ] ||
  set -- "$@" --tls-cert "$HEALTHCHECK_TLS_CERT" --tls-key "${HEALTHCHECK_TLS_KEY:?}"
# The token goes by the environment, never by an argument that `ps` shows.
TASKMASTER_TOKEN=$token exec timeout -s KILL 8 taskctl --master "$addr" "$@" stats >/dev/null
