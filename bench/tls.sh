#!/usr/bin/env bash
# NBD over TLS: vdk beside nbdkit and qemu-nbd; see tls.py. About 2 minutes, 3 GiB of /dev/shm.
set -euo pipefail
cd "$(dirname "$0")/.."
for t in nbdkit qemu-nbd nbdcopy openssl; do
  command -v "$t" >/dev/null || { echo "bench needs $t: run scripts/install-test-deps.sh" >&2; exit 1; }
done
cargo build --release -p vdk --locked
exec python3 bench/tls.py --vdk target/release/vdk "$@"
