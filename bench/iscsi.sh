#!/usr/bin/env bash
# The iSCSI target of vdk beside tgt (tgtd) on copies of one image, with libiscsi's iscsi-perf
# (reads) and qemu-img bench over iscsi:// (writes); see iscsi.py. Needs root (tgtd). About
# 5 minutes with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in iscsi-perf tgtd tgtadm qemu-img; do
  command -v "$tool" >/dev/null || { echo "bench needs $tool: run scripts/install-test-deps.sh" >&2; exit 1; }
done
cargo build --release -p vdk --locked
exec python3 bench/iscsi.py --vdk target/release/vdk "$@"
