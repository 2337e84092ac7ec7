#!/usr/bin/env bash
# Benchmarks vdk against nbdkit and qemu-nbd with fio's nbd engine; see bench.py for options.
# Builds vdk in release mode first. Takes about 12 minutes with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in fio nbdkit qemu-nbd; do
  command -v "$tool" >/dev/null || { echo "bench needs $tool: run scripts/install-test-deps.sh" >&2; exit 1; }
done
cargo build --release -p vdk --locked
exec python3 bench/bench.py --vdk target/release/vdk "$@"
