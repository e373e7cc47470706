#!/bin/sh
# The master image's HEALTHCHECK: `taskctl health` against the master of this container, the
# standard gRPC health check, which needs no token: healthy while the master serves (not while it
# drains or its store cannot write). It always exits on its own: taskctl gives up after 5 s and is
# killed after 8.
#
# Where the master listens and whether it serves TLS are read from its command line (PID 1, the
# image's ENTRYPOINT), so a CMD with another port still works. Overrides: HEALTHCHECK_ADDR
# (host:port), HEALTHCHECK_TLS_CA (default /run/secrets/ca.pem when the master serves TLS),
# HEALTHCHECK_TLS_CERT and HEALTHCHECK_TLS_KEY (a client certificate, when the master asks for one).
set -eu
listen=0.0.0.0:7070 tls=
args=$(tr '\0' '\n' </proc/1/cmdline 2>/dev/null || true)
prev=
while IFS= read -r arg; do
  case $prev in
    --listen) listen=$arg ;;
  esac
  case $arg in
    --listen=*) listen=${arg#*=} ;;
    --tls-cert | --tls-cert=*) tls=1 ;;
  esac
  prev=$arg
done <<END
$args
END
host=${listen%:*}
case $host in 0.0.0.0 | '' | '[::]') host=127.0.0.1 ;; esac
addr=${HEALTHCHECK_ADDR:-$host:${listen##*:}}
ca=${HEALTHCHECK_TLS_CA:-}
[ -n "$ca" ] || [ -z "$tls" ] || ca=/run/secrets/ca.pem
set --
[ -z "$ca" ] || set -- --tls-ca "$ca"
[ -z "${HEALTHCHECK_TLS_CERT:-}" ] ||
  set -- "$@" --tls-cert "$HEALTHCHECK_TLS_CERT" --tls-key "${HEALTHCHECK_TLS_KEY:?}"
exec timeout -s KILL 8 taskctl --master "$addr" "$@" health --timeout-ms 5000 >/dev/null
