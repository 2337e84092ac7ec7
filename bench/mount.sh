#!/usr/bin/env bash
# ext4 on vdk's fuse-loop attach beside ext4 on nbdkit + nbdfuse + loop, with fio; see
# mount.py. Needs root. Builds vdk in release mode first. About 3 minutes with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in fio nbdkit nbdfuse losetup mkfs.ext4; do
  command -v "$tool" >/dev/null || { echo "bench needs $tool: run scripts/install-test-deps.sh" >&2; exit 1; }
done
cargo build --release -p vdk --locked
exec python3 bench/mount.py --vdk target/release/vdk "$@"
