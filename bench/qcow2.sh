#!/usr/bin/env bash
# qcow2 served by vdk beside qemu-nbd, with fio's nbd engine; see qcow2.py. About 4 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in fio qemu-nbd qemu-img; do
  command -v "$tool" >/dev/null || { echo "bench needs $tool: run scripts/install-test-deps.sh" >&2; exit 1; }
done
cargo build --release -p vdk --locked
exec python3 bench/qcow2.py --vdk target/release/vdk "$@"
