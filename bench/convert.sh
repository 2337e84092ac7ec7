#!/usr/bin/env bash
# vdk convert beside qemu-img convert; see convert.py. About 3 minutes, 10 GB of disk.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-img >/dev/null || { echo "bench needs qemu-img: run scripts/install-test-deps.sh" >&2; exit 1; }
cargo build --release -p vdk --locked
exec python3 bench/convert.py --vdk target/release/vdk "$@"
