#!/usr/bin/env bash
# Runs the NBD reference implementation's test client, nbd-tester-client, against vdk in each
# of its modes, as nbd's own test suite runs it against nbd-server: handshake, read, write,
# flush, oversize, integrity, integrityhuge, rowrite, unix, inetd (vdk serve -s started by the
# client), tls, tlshuge and tlswrongcert (which must fail).
#
# Usage: NBD_SRC=/path/to/nbd scripts/nbd-tester.sh
#   NBD_SRC is a NetworkBlockDevice/nbd source tree in which tests/run/nbd-tester-client has
#   been built (with GnuTLS, for the TLS modes). Neither is part of vdk, and no Debian package
#   ships the client, which is why this is not in the default test command.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NBD_SRC:?set NBD_SRC to an nbd source tree with tests/run/nbd-tester-client built}"
tester="$NBD_SRC/tests/run/nbd-tester-client"
traces="$NBD_SRC/tests/run"
[ -x "$tester" ] || { echo "no $tester: build nbd-tester-client in NBD_SRC first" >&2; exit 2; }
command -v openssl >/dev/null || { echo "needs openssl (apt-get install openssl)" >&2; exit 2; }

cargo build --release --locked -q -p vdk
vdk="$PWD/target/release/vdk"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# Certificates as nbd's tests use them: a CA, the server (localhost), a client, and a
# self-signed client the server must refuse.
pki="$work/pki"
mkdir -p "$pki"
(
  cd "$pki"
  key() { openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "$@" 2>/dev/null; }
  key -x509 -keyout ca-key.pem -out ca-cert.pem -days 2 -subj "/CN=vdk test CA"
  key -x509 -keyout selfsigned-key.pem -out selfsigned-cert.pem -days 2 -subj "/CN=mallory"
  for who in server client; do
    key -keyout "$who-key.pem" -out "$who.csr" -subj "/CN=$([ $who = server ] && echo localhost || echo client)"
    usage=$([ $who = server ] && echo serverAuth || echo clientAuth)
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=%s\n' "$usage" > "$who.ext"
    openssl x509 -req -in "$who.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
      -out "$who-cert.pem" -days 2 -extfile "$who.ext" 2>/dev/null
  done
)

port=$((20000 + RANDOM % 20000))
failed=0
results=()

# run NAME SERVER-ARGS -- CLIENT-ARGS: a fresh 50 MiB zeroed image, vdk serving it as export1
# on $port, then the client; records pass or fail.
run() {
  local name=$1; shift
  local server=()
  while [ "$1" != "--" ]; do server+=("$1"); shift; done
  shift
  local img="$work/$name.img"
  truncate -s 0 "$img"; truncate -s 50M "$img"
  "$vdk" serve --export "export1=$img" --listen "tcp://127.0.0.1:$port" \
    --listen "unix://$work/vdk.sock" "${server[@]}" 2>"$work/$name.server.log" &
  local pid=$!
  for _ in $(seq 100); do [ -S "$work/vdk.sock" ] && break; sleep 0.05; done
  local start=$SECONDS
  if "$tester" -N export1 "$@" >"$work/$name.log" 2>&1; then
    results+=("PASS $name ($((SECONDS - start)) s)")
  else
    results+=("FAIL $name: $(tail -n 2 "$work/$name.log" | tr '\n' ' ')")
    failed=1
  fi
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -f "$work/vdk.sock"
}

tls=(--tls require --tls-certificates "$pki" --tls-verify-peer)
client_cert=(-C "$pki/client-cert.pem" -K "$pki/client-key.pem" -A "$pki/ca-cert.pem")
run read -- localhost "$port"
run handshake -- -h localhost "$port"
run write -- -w localhost "$port"
run flush -- -w -f localhost "$port"
run oversize -- -o localhost "$port"
run integrity -- -i -t "$traces/integrity-test.tr" localhost "$port"
run integrityhuge -- -i -t "$traces/integrityhuge-test.tr" localhost "$port"
run rowrite --read-only -- -w -F localhost "$port"
run unix -- -u "$work/vdk.sock"
run tls "${tls[@]}" -- -i -t "$traces/integrity-test.tr" "${client_cert[@]}" localhost "$port"
run tlshuge "${tls[@]}" -- -i -t "$traces/integrityhuge-test.tr" "${client_cert[@]}" \
  -H localhost 127.0.0.1 "$port"
run tlswrongcert "${tls[@]}" -- -t "$traces/integrity-test.tr" \
  -C "$pki/selfsigned-cert.pem" -K "$pki/selfsigned-key.pem" -A "$pki/ca-cert.pem" \
  -F localhost "$port"

# inetd: the client starts vdk serve -s with a socket on its standard input and output.
img="$work/inetd.img"; truncate -s 50M "$img"
start=$SECONDS
if "$tester" -N export1 -I -- "$vdk" serve -s --export "export1=$img" >"$work/inetd.log" 2>&1; then
  results+=("PASS inetd ($((SECONDS - start)) s)")
else
  results+=("FAIL inetd: $(tail -n 2 "$work/inetd.log" | tr '\n' ' ')"); failed=1
fi

printf '%s\n' "${results[@]}"
exit $failed
