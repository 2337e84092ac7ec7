#!/usr/bin/env bash
# vdk's vhost-user-blk export beside qemu-storage-daemon's, both serving a raw image on this
# host to ONE throwaway guest (../shared/vm/vmrun.sh: Debian's 6.12 kernel under QEMU software
# emulation, its RAM a shared memfd) as two virtio-blk disks with 2 queues each.
#
# Absolute figures inside a TCG guest mean nothing: only vdk's throughput as a ratio of
# qemu-storage-daemon's in this one run is printed, labelled as such. fio runs on each raw
# device in turn, row by row (libaio, direct I/O): 4 KiB random write and read at queue depth
# 16, 1 MiB sequential write and read at queue depth 4, RUNTIME seconds each (default 8).
# Both servers open their file buffered (QSD: cache.direct=off). Builds vdk in release mode.
# About 3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${RUNTIME:-8}
. bench/vmrun.sh
vm_bench_setup qemu-storage-daemon
cargo build --release -p vdk --locked
work=$(mktemp -d /var/tmp/vdk-vhost-bench.XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
truncate -s 256M "$work/vdk.img" "$work/qsd.img"
target/release/vdk serve --listen "vhost-user-blk://$work/vdk.sock" "$work/vdk.img" 2>"$work/vdk.log" &
pids+=($!)
qemu-storage-daemon \
  --blockdev "driver=file,node-name=f,filename=$work/qsd.img,cache.direct=off" \
  --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$work/qsd.sock,writable=on,num-queues=2" \
  2>"$work/qsd.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/vdk.sock" ] && [ -S "$work/qsd.sock" ] && break; sleep 0.1; done
cat > "$work/run.sh" <<EOF
set -eu
modprobe virtio_blk
for i in \$(seq 100); do [ -b /dev/vdb ] && break; sleep 0.1; done
vdk=vda; qsd=vdb
[ "\$(cat /sys/block/vda/serial)" = vdk.img ] || { vdk=vdb; qsd=vda; }
for w in randwrite:4k:16 randread:4k:16 write:1m:4 read:1m:4; do
  IFS=: read rw bs qd <<W
\$w
W
  for s in vdk qsd; do
    eval dev=\\\$\$s
    fio --name=b --filename=/dev/\$dev --rw=\$rw --bs=\$bs --iodepth=\$qd --ioengine=libaio \\
        --direct=1 --time_based --runtime=$RUNTIME --size=192M --output-format=json \\
        > "fio-\$s-\$rw.json"
  done
done
EOF
(cd "$work" && VM_MEM=1024 VM_TIMEOUT=1800 VM_SHAREDMEM=1 \
  VM_QEMU_ARGS="-chardev socket,id=v0,path=$work/vdk.sock -device vhost-user-blk-pci,chardev=v0,num-queues=2 -chardev socket,id=v1,path=$work/qsd.sock -device vhost-user-blk-pci,chardev=v1,num-queues=2" \
  "$vmrun" 'sh run.sh') >"$work/guest.log" 2>&1 || { cat "$work/guest.log"; exit 1; }
python3 - "$work" <<'EOF'
import json, os, sys
d = sys.argv[1]
def bw(who, rw):
    j = json.load(open(os.path.join(d, "fio-%s-%s.json" % (who, rw))))["jobs"][0]
    return j["read" if "read" in rw else "write"]["bw_bytes"]
print("One run in a software-emulated guest (QEMU TCG): vdk's vhost-user-blk throughput as a")
print("ratio of qemu-storage-daemon's, same guest, same kind of image. Not a timing.")
for rw, label in [("randwrite", "4k QD16"), ("randread", "4k QD16"), ("write", "1M QD4"), ("read", "1M QD4")]:
    print("%-10s %-8s vdk/QSD %5.2fx" % (rw, label, bw("vdk", rw) / bw("qsd", rw)))
EOF
