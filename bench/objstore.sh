#!/usr/bin/env bash
# ext4 on an object-store disk: vdk (vdk open s3://... --mkfs ext4) against s3backer (Debian)
# through a loop device, on the same S3 server (s3s-fs on loopback, disk-backed), in one run.
# Each job is timed until its data is in the bucket: for vdk until `vdk close` returns (a
# flush returns only once the chunks are stored); for s3backer until its process exits after
# the unmount (its fsync returns before its uploads finish). Root only. Prints ratios.
#
#   bench/objstore.sh [SIZE_MIB]      (default 256)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench/objstore.sh: run as root (loop devices, mounts)" >&2; exit 1; }
for t in s3backer fio mkfs.ext4 losetup; do
  command -v "$t" >/dev/null || { echo "bench/objstore.sh: $t is missing: run scripts/install-test-deps.sh" >&2; exit 1; }
done
scripts/install-test-deps.sh >/dev/null
tools=${VDK_TEST_TOOLS:-/opt/vdk-test}
size=${1:-256}
cargo build --release --locked -q -p vdk
vdk=$PWD/target/release/vdk
work=$(mktemp -d /tmp/vdk-bench-objstore.XXXXXX)
port=$((20000 + RANDOM % 20000))
mkdir -p "$work/data/vdk" "$work/mnt" "$work/s3b"
export AWS_ACCESS_KEY_ID=vdkbench AWS_SECRET_ACCESS_KEY=vdkbenchsecret
export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_REGION=us-east-1 VDK_SOCKET=$work/run/control.sock
"$tools/bin/s3s-fs" --host 127.0.0.1 --port "$port" --access-key "$AWS_ACCESS_KEY_ID" \
  --secret-key "$AWS_SECRET_ACCESS_KEY" "$work/data" 2>"$work/s3s.log" &
s3pid=$!
cleanup() {
  umount -l "$work/mnt" 2>/dev/null || true
  "$vdk" daemon --stop 2>/dev/null || true
  [ -n "${loop:-}" ] && losetup -d "$loop" 2>/dev/null || true
  fusermount -u "$work/s3b" 2>/dev/null || true
  kill "$s3pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
head -c "$((size << 20))" /dev/urandom >"$work/payload"
fio_job=(--name=rw --filename="$work/mnt/fio" --size="$((size / 4))M" --rw=randwrite --bs=4k
  --ioengine=psync --end_fsync=1 --output-format=terse --minimal)
now() { date +%s.%N; }

# One disk size and block size for both: 2 GiB, 4 MiB chunks/blocks.
bench_vdk() {
  local id
  id=$("$vdk" open "s3://vdk/vdk-$1" 2G --mkfs ext4 --mount "$work/mnt" --cache "$work/cache" \
    --cache-size 4G --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  local t0; t0=$(now)
  case $1 in
    dd) dd if="$work/payload" of="$work/mnt/f" bs=1M conv=fsync status=none ;;
    fio) fio "${fio_job[@]}" >/dev/null ;;
  esac
  "$vdk" close "$id" >/dev/null
  python3 -c "print($(now) - $t0)"
  "$vdk" daemon --stop >/dev/null
  rm -rf "$work/cache"
}

bench_s3backer() {
  s3backer --baseURL="$AWS_ENDPOINT_URL/" --accessId="$AWS_ACCESS_KEY_ID" \
    --accessKey="$AWS_SECRET_ACCESS_KEY" --authVersion=aws4 \
    --size=2G --blockSize=4M --prefix="s3b-$1/" --listBlocks --force \
    vdk "$work/s3b" 2>>"$work/s3backer.log"
  local pid; pid=$(pgrep -n -f "s3backer.*$work/s3b")
  loop=$(losetup --find --show "$work/s3b/file")
  mkfs.ext4 -q -F "$loop"
  mount "$loop" "$work/mnt"
  local t0; t0=$(now)
  case $1 in
    dd) dd if="$work/payload" of="$work/mnt/f" bs=1M conv=fsync status=none ;;
    fio) fio "${fio_job[@]}" >/dev/null ;;
  esac
  umount "$work/mnt"
  losetup -d "$loop"; loop=
  fusermount -u "$work/s3b"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  python3 -c "print($(now) - $t0)"
}

printf '%-34s %10s %10s %8s\n' job vdk s3backer ratio
for job in dd fio; do
  v=$(bench_vdk $job)
  s=$(bench_s3backer $job)
  case $job in
    dd) what="dd ${size} MiB, conv=fsync" ;;
    fio) what="fio randwrite 4k, $((size / 4)) MiB" ;;
  esac
  printf '%-34s %9.2fs %9.2fs %7.2fx\n' "$what" "$v" "$s" "$(python3 -c "print($s / $v)")"
done
