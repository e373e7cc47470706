#!/usr/bin/env bash
# Makes a certificate authority and the certificates a quick start needs, with openssl:
#
#   deploy/make-certs.sh DIR [NAME_OR_IP ...]
#
# DIR/ca.pem, ca.key          the authority: give ca.pem to every master, worker and client
# DIR/server.pem, server.key  the master's, valid for the names and addresses given (and
#                             localhost, 127.0.0.1 and ::1)
# DIR/worker.pem, worker.key  a worker's, for mutual TLS (--tls-client-ca ca.pem on the master)
# DIR/client.pem, client.key  a client's (taskctl), for mutual TLS
#
# Keys are written 0600. Certificates last --days (default 825). Keep ca.key offline.
set -euo pipefail
days=825
if [ "${1:-}" = "--days" ]; then days=$2; shift 2; fi
[ $# -ge 1 ] || { echo "usage: $0 [--days N] DIR [NAME_OR_IP ...]" >&2; exit 2; }
dir=$1; shift
mkdir -p "$dir"
cd "$dir"
umask 077
san="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+=",IP:$name"; else san+=",DNS:$name"; fi
done
quiet() { "$@" 2>/dev/null || { echo "failed: $*" >&2; exit 1; }; }
quiet openssl req -x509 -newkey rsa:3072 -nodes -days "$days" -subj /CN=taskmaster-ca \
  -keyout ca.key -out ca.pem
# issue NAME CN EXTENSIONS: NAME.key and NAME.pem, signed by the authority.
issue() {
  quiet openssl req -newkey rsa:2048 -nodes -subj "/CN=$2" -keyout "$1.key" -out "$1.csr"
  printf '%s\n' "$3" > "$1.ext"
  quiet openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days "$days" \
    -extfile "$1.ext" -out "$1.pem"
  rm -f "$1.csr" "$1.ext"
}
issue server "${1:-localhost}" "subjectAltName=$san
extendedKeyUsage=serverAuth"
issue worker taskmaster-worker "extendedKeyUsage=clientAuth"
issue client taskmaster-client "extendedKeyUsage=clientAuth"
rm -f ca.srl
chmod 644 ca.pem server.pem worker.pem client.pem
echo "certificates in $dir: ca.pem, server.pem/.key ($san), worker.pem/.key, client.pem/.key"
