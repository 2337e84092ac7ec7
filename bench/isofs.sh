#!/usr/bin/env bash
# The ISO browser (vdk fs mount) reading a big file beside xorriso extracting it; see
# isofs.py. Needs root (FUSE mounts by the daemon). About 3 minutes with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in xorriso; do
  command -v "$tool" >/dev/null || { echo "bench needs $tool: run scripts/install-test-deps.sh" >&2; exit 1; }
done
cargo build --release -p vdk --locked
exec python3 bench/isofs.py --vdk target/release/vdk "$@"
