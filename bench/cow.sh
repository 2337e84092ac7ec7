#!/usr/bin/env bash
# The cow filter beside the raw disk under it and beside nbdkit's cow filter; see cow.py.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in fio nbdkit; do
  command -v "$tool" >/dev/null || { echo "bench needs $tool: run scripts/install-test-deps.sh" >&2; exit 1; }
done
cargo build --release -p vdk --locked
exec python3 bench/cow.py --vdk target/release/vdk "$@"
