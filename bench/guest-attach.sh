#!/usr/bin/env bash
# vdk's three block-device attach kinds (ublk, kernel NBD, fuse-loop) beside the kernel's own
# loop device on the same image, in ONE throwaway guest (../shared/vm/vmrun.sh: Debian's 6.12
# kernel under QEMU software emulation; this host's kernel has neither ublk nor nbd).
#
# Absolute figures inside a TCG guest mean nothing: only the ratio of each kind to the guest's
# loop device in this one run is printed, labelled as such. fio runs on each raw block device
# (libaio, direct I/O): 4 KiB random read and write at queue depth 16, 1 MiB sequential read
# and write at queue depth 4, RUNTIME seconds each (default 8). Builds vdk in release mode.
# About 6 minutes. Needs root.
#
# KERNEL=newer boots the newer kernel scripts/install-test-deps.sh prepares (/var/tmp/vmkit-newer,
# Linux 6.16+), where ublk reads and writes a raw image with no copy: the column "ublk copy"
# is the same disk served by copy (vdk daemon --ublk-copy). On 6.12 both columns copy.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${RUNTIME:-8}
. bench/vmrun.sh
vm_bench_setup
if [ "${KERNEL:-}" = newer ]; then
  export VMKIT=/var/tmp/vmkit-newer
  VM_KERNEL=$(cat "$VMKIT/version") || { echo "no newer kernel kit: run scripts/install-test-deps.sh" >&2; exit 1; }
  export VM_KERNEL
fi
cargo build --release -p vdk --locked
# The guest shares only its working directory with this host (its /tmp is its own).
work=$(mktemp -d /var/tmp/vdk-guest-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp target/release/vdk "$work/vdk"
cat > "$work/run.sh" <<EOF
set -eu
V=\$PWD/vdk
modprobe ublk_drv; modprobe nbd; modprobe loop; test -e /dev/fuse || modprobe fuse
run() { # kind device
  for w in randread:4k:16 randwrite:4k:16 read:1m:4 write:1m:4; do
    IFS=: read rw bs qd <<W
\$w
W
    fio --name=b --filename="\$2" --rw=\$rw --bs=\$bs --iodepth=\$qd --ioengine=libaio \\
        --direct=1 --time_based --runtime=$RUNTIME --size=192M --output-format=json \\
        > "fio-\$1-\$rw.json"
  done
}
truncate -s 256M loop.img
dev=\$(losetup --direct-io=on -f --show loop.img)
run loop "\$dev"
losetup -d "\$dev"
for kind in ublk nbd fuse-loop ublk-copy; do
  attach=\${kind%-copy}
  if [ \$kind = ublk-copy ]; then \$V daemon --stop >/dev/null; export VDK_UBLK_ZERO_COPY=0; fi
  \$V open \$kind.img 256M --attach \$attach --json > \$kind.json
  dev=\$(sed -n 's/.*"block_device": "\(.*\)".*/\1/p' \$kind.json)
  run \$kind "\$dev"
  \$V close \$kind.img >/dev/null
done
\$V daemon --stop >/dev/null
uname -r > kernel
grep -c "ublk zero copy" /run/vdk/daemon.log > zero-copy || true
EOF
(cd "$work" && VM_MEM=1024 VM_TIMEOUT=1800 "$vmrun" 'sh run.sh') >"$work/guest.log" 2>&1 ||
  { cat "$work/guest.log"; exit 1; }
python3 - "$work" <<'EOF'
import json, os, sys
d = sys.argv[1]
def bw(kind, rw):
    j = json.load(open(os.path.join(d, "fio-%s-%s.json" % (kind, rw))))["jobs"][0]
    side = "read" if "read" in rw else "write"
    return j[side]["bw_bytes"]
rows = [("randread", "4k QD16"), ("randwrite", "4k QD16"), ("read", "1M QD4"), ("write", "1M QD4")]
kernel = open(os.path.join(d, "kernel")).read().strip()
zc = open(os.path.join(d, "zero-copy")).read().strip() not in ("", "0")
print("One run in a software-emulated guest (Linux %s, TCG): each kind's throughput as a ratio" % kernel)
print("of the guest's own loop device (direct I/O) on the same kind of image. Not a timing.")
print("ublk: %s; ublk copy: by copy (--ublk-copy)." % ("zero copy" if zc else "by copy (the kernel has no zero copy)"))
kinds = ("ublk", "ublk-copy", "nbd", "fuse-loop")
print("%-12s %-9s %8s %10s %8s %10s" % ("workload", "", "ublk", "ublk copy", "nbd", "fuse-loop"))
for rw, label in rows:
    base = bw("loop", rw)
    print("%-12s %-9s %7.2fx %9.2fx %7.2fx %9.2fx" % (rw, label, *(bw(k, rw) / base for k in kinds)))
EOF
