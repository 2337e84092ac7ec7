//! Block devices through kernel drivers this host lacks (ublk), proven in a throwaway guest:
//! `../shared/vm/vmrun.sh` boots Debian's 6.12 kernel under QEMU with this host's root read
//! only and a scratch directory read-write, and runs a shell script there as root. The
//! scripts drive the vdk binary built here with real tools: mkfs, mount, fsx, fio, e2fsck.
//! Timings inside the software-emulated guest mean nothing; nothing here times anything.

mod common;

use std::path::PathBuf;

use common::vm::{self, FSX_CONFIGS};

/// The newer guest kernel (trixie-backports') that scripts/install-test-deps.sh prepares
/// with scripts/guest-kernel.sh: its kit and its version, for vmrun.sh's `VMKIT` and
/// `VM_KERNEL`.
fn newer_kernel() -> (PathBuf, String) {
    let kit = PathBuf::from(
        std::env::var_os("VDK_NEWER_VMKIT").unwrap_or_else(|| "/var/tmp/vmkit-newer".into()),
    );
    let version = std::fs::read_to_string(kit.join("version")).unwrap_or_else(|e| {
        panic!(
            "{}/version: {e}: this test boots a newer guest kernel, which \
             scripts/install-test-deps.sh prepares (scripts/guest-kernel.sh \
             LINK=/var/tmp/vmkit-newer)",
            kit.display()
        )
    });
    (kit, version.trim().to_owned())
}

/// Runs `script` in a guest, in a scratch directory of its own; what it printed. The script
/// runs under `sh -eu` with `$V` the vdk binary (a link to it in the scratch directory),
/// `$FSX` fsx, `$FIO` fio; it fails the test by failing. The tools must not live under /tmp.
fn guest(script: &str) -> String {
    guest_on(None, script)
}

/// [`guest`] on the kernel of another kit ([`newer_kernel`]), or vmrun.sh's own.
fn guest_on(kernel: Option<(PathBuf, String)>, script: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    // The guest sees the host's root, but /tmp and /run are its own: the binary goes into
    // the scratch directory, which it shares, wherever this checkout is.
    let vdk = dir.path().join("vdk");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_vdk"), &vdk).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_vdk"), &vdk).unwrap();
    }
    let body = format!("V={}\n{KILL_UNDER_WRITER}{script}", vdk.display());
    let mut env = Vec::new();
    if let Some((kit, version)) = &kernel {
        env.push(("VMKIT", kit.display().to_string()));
        env.push(("VM_KERNEL", version.clone()));
    }
    vm::boot(dir.path(), &body, &env)
}

/// A shell function for the guest scripts: a verifying writer of SIZE ($1) on the file system
/// mounted at /tmp/m (O_DIRECT, so that it waits on the device), then `kill -9` of the daemon
/// under it; `$job` is the writer, whose report goes to fio.out.
const KILL_UNDER_WRITER: &str = r#"
kill_daemon_under_writer() {
    $FIO --name=v --filename=/tmp/m/fio.dat --size=$1 --rw=randwrite --bs=4k \
        --ioengine=psync --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --output=fio.out &
    job=$!
    sleep 3
    kill -0 $job
    kill -9 $(pgrep -f "vdk daemon")
    sleep 1
}
"#;

#[test]
fn a_ublk_disk_is_formatted_mounted_exercised_closed_and_reopened_intact() {
    let out = guest(&format!(
        r#"{FSX_CONFIGS}
# Without the driver: a clear refusal naming it.
if msg=$($V open none.img 16M --attach ublk 2>&1); then echo "attached without ublk_drv"; exit 1; fi
echo "$msg" | grep -q ublk_drv || {{ echo "unclear refusal: $msg"; exit 1; }}
modprobe ublk_drv
# auto picks ublk where the kernel has it.
$V open d.img 128M --mkfs ext4 --mount /tmp/m --json > open.json
grep -q '"attach": "ublk"' open.json || {{ cat open.json; exit 1; }}
dev=$(sed -n 's/.*"block_device": "\(.*\)".*/\1/p' open.json)
case "$dev" in /dev/ublkb*) ;; *) echo "device $dev"; exit 1 ;; esac
findmnt -n -o SOURCE /tmp/m | grep -qx "$dev"
# A second attach of the open disk is refused.
if $V open d.img --attach ublk 2>err; then echo "attached twice"; exit 1; fi
grep -q "already open" err
echo hello > /tmp/m/small
dd if=/dev/urandom of=/tmp/m/big bs=1M count=24 status=none
$FSX -q -S 7 -N 3000 -f fsx-fs.toml -P fsx-fs /tmp/m/fsx.bin
here=$PWD
(cd /tmp/m && sha256sum small big fsx.bin) > sums
$V close d.img
test ! -e "$dev"
if findmnt /tmp/m >/dev/null; then echo "still mounted"; exit 1; fi
e2fsck -fn d.img
$V open d.img --attach ublk --mount /tmp/m >/dev/null
(cd /tmp/m && sha256sum -c --quiet "$here/sums")
$V close d.img
# fsx straight on the block device: reads, writes, mapped I/O, fsync. (It punches holes at
# any byte; a block device takes whole sectors: blkdiscard does that below.)
$V create b.img 32M >/dev/null
$V open b.img --attach ublk --json > b.json
bdev=$(sed -n 's/.*"block_device": "\(.*\)".*/\1/p' b.json)
$FSX -q -S 11 -N 5000 -f fsx-dev.toml -P fsx-dev "$bdev"
# Discard and write zeroes reach the image: the ranges read back as zeroes there.
dd if=/dev/urandom of="$bdev" bs=1M count=4 oflag=direct status=none
blkdiscard -o 1048576 -l 1048576 "$bdev"
blkdiscard -z -o 2097152 -l 1048576 "$bdev"
blockdev --flushbufs "$bdev"
$V close b.img
cmp -n 2097152 b.img /dev/zero --ignore-initial=1048576:0
if cmp -s -n 1048576 -i 3145728:0 b.img /dev/zero; then echo "data gone"; exit 1; fi
$V daemon --stop
echo UBLK-ROUND-TRIP-OK
"#
    ));
    assert!(out.contains("UBLK-ROUND-TRIP-OK"), "{out}");
}

#[test]
fn a_ublk_device_outlives_kill_9_of_its_daemon_and_the_next_one_takes_it_over() {
    let out = guest(
        r#"
modprobe ublk_drv
$V open d.img 256M --attach ublk --mkfs ext4 --mount /tmp/m --json > open.json
dev=$(sed -n 's/.*"block_device": "\(.*\)".*/\1/p' open.json)
# A verifying writer on the mounted file system, and kill -9 of the daemon under it.
kill_daemon_under_writer 48M
# The device stays while nobody serves it; its I/O waits.
test -b "$dev"
kill -0 $job
# The next daemon (started by vdk open) says at start that the device waits for it, then
# takes it over.
$V open d.img --attach ublk --json > again.json
grep -q "\"block_device\": \"$dev\"" again.json || { cat again.json; exit 1; }
grep "waits for its server" /run/vdk/daemon.log | grep -q "$dev" || { cat /run/vdk/daemon.log; exit 1; }
wait $job
grep -q "err= 0" fio.out || { cat fio.out; exit 1; }
echo after > /tmp/m/after
sync
# The new daemon knows the file system is still mounted there, and close unmounts it.
$V list | grep -q " /tmp/m "
$V close d.img
if findmnt /tmp/m >/dev/null; then echo "still mounted"; exit 1; fi
test ! -e "$dev"
e2fsck -fn d.img
ls -R /run/vdk; grep -rh "took over" /run/vdk || true
$V daemon --stop
echo UBLK-RECOVERY-OK
"#,
    );
    assert!(out.contains("UBLK-RECOVERY-OK"), "{out}");
}

#[test]
fn a_kernel_nbd_disk_round_trips_and_reconnects_to_a_restarted_daemon() {
    let out = guest(
        r#"
# Without the driver: a clear refusal naming it.
if msg=$($V open none.img 16M --attach nbd 2>&1); then echo "attached without nbd"; exit 1; fi
echo "$msg" | grep -q "modprobe nbd" || { echo "unclear refusal: $msg"; exit 1; }
$V daemon --stop || true
modprobe nbd
# A daemon that requires TLS of NBD clients still attaches: its own connections stay inside.
mkdir certs
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=localhost -keyout certs/server-key.pem -out certs/server-cert.pem 2>/dev/null
$V daemon --tls require --tls-certificates "$PWD/certs" 2> tls-daemon.log &
until [ -S /run/vdk/control.sock ]; do sleep 0.1; done
$V open d.img 192M --attach nbd --mkfs ext4 --mount /tmp/m --json > open.json
grep -q '"attach": "nbd"' open.json || { cat open.json; exit 1; }
dev=$(sed -n 's/.*"block_device": "\(.*\)".*/\1/p' open.json)
name=${dev#/dev/}
# Tagged with the disk, one connection per CPU.
grep -q . /sys/block/$name/backend
if $V open d.img --attach nbd 2>err; then echo "attached twice"; exit 1; fi
grep -q "already open" err
echo hello > /tmp/m/small
dd if=/dev/urandom of=/tmp/m/big bs=1M count=16 status=none
here=$PWD
(cd /tmp/m && sha256sum small big) > sums
$V close d.img
# Disconnected and freed.
test ! -e /sys/block/$name/backend
e2fsck -fn d.img
$V open d.img --attach nbd --mount /tmp/m --json > again.json
dev=$(sed -n 's/.*"block_device": "\(.*\)".*/\1/p' again.json)
(cd /tmp/m && sha256sum -c --quiet "$here/sums")
# kill -9 of the daemon under a verifying writer: the device waits for a new daemon, which
# gives it new connections.
kill_daemon_under_writer 32M
kill -0 $job
$V open d.img --attach nbd --json > third.json
grep -q "\"block_device\": \"$dev\"" third.json || { cat third.json; exit 1; }
wait $job
grep -q "err= 0" fio.out || { cat fio.out; exit 1; }
dmesg | grep -q "reconnected socket"
(cd /tmp/m && sha256sum -c --quiet "$here/sums")
$V list | grep -q " /tmp/m "
$V close d.img
if findmnt /tmp/m >/dev/null; then echo "still mounted"; exit 1; fi
e2fsck -fn d.img
$V daemon --stop
echo NBD-OK
"#,
    );
    assert!(out.contains("NBD-OK"), "{out}");
}

#[test]
fn a_mounted_ext4_grows_online_on_each_kind_of_block_device() {
    let out = guest(
        r#"
# FUSE is a module in Debian's 6.12, built in to later kernels.
test -e /dev/fuse || modprobe fuse
modprobe loop
modprobe ublk_drv
modprobe nbd
for kind in fuse-loop ublk nbd; do
    $V open $kind.img 128M --attach $kind --mkfs ext4 --mount /tmp/m-$kind --json > o.json
    dev=$(sed -n 's/.*"block_device": "\(.*\)".*/\1/p' o.json)
    dd if=/dev/urandom of=/tmp/m-$kind/data bs=1M count=8 status=none
    sum=$(sha256sum < /tmp/m-$kind/data)
    before=$(df -B1 --output=size /tmp/m-$kind | tail -1)
    if $V resize $kind.img +64M > resize.out 2> resize.err; then
        test "$(blockdev --getsize64 $dev)" = 201326592
        # Online: ext4 grows into the device while mounted (the NBD device's requests past
        # its old end reach the daemon on connections made before the disk grew).
        resize2fs $dev
        after=$(df -B1 --output=size /tmp/m-$kind | tail -1)
        test "$after" -gt $((before + 50000000)) || { echo "$kind: $before -> $after"; exit 1; }
        dd if=/dev/urandom of=/tmp/m-$kind/more bs=1M count=40 status=none
        sync
        echo "$kind GREW"
    else
        # Only where this kernel's driver cannot resize a live device, and it must say so.
        case $kind in
            ublk) grep -q "UBLK_F_UPDATE_SIZE, Linux 6.16" resize.err ;;
            *) cat resize.err; exit 1 ;;
        esac
        grep -q "grew to 201326592 bytes" resize.err
        test "$(blockdev --getsize64 $dev)" = 134217728
        echo "$kind SAID: $(cat resize.err)"
    fi
    test "$(sha256sum < /tmp/m-$kind/data)" = "$sum"
    $V close $kind.img
    test "$(stat -c %s $kind.img)" = 201326592
    e2fsck -fn $kind.img
done
$V daemon --stop
echo RESIZE-OK
"#,
    );
    assert!(out.contains("RESIZE-OK"), "{out}");
    assert!(out.contains("fuse-loop GREW"), "{out}");
    assert!(out.contains("nbd GREW"), "{out}");
    // The guest's kernel (6.12) has no ublk UPDATE_SIZE; a newer one grows it.
    assert!(
        out.contains("ublk GREW") || out.contains("ublk SAID"),
        "{out}"
    );
}

/// Zero copy and live resize, which Linux 6.16 brought to ublk, on the newer guest kernel: a
/// raw image with no filter is read and written by io_uring straight between the kernel's
/// pages and the file, and counted as the disk's; its device survives kill -9 of the daemon
/// (taken over only by the image as it was); it grows under a mounted ext4. A qcow2 disk on
/// the same kernel is served by copy, as before.
#[test]
fn ublk_reads_and_writes_raw_images_with_no_copy_on_newer_kernels() {
    let out = guest_on(
        Some(newer_kernel()),
        &format!(
            r#"{FSX_CONFIGS}
modprobe ublk_drv
uname -r
log=/run/vdk/daemon.log
$V create b.img 32M >/dev/null
$V open b.img --attach ublk --json > b.json
bdev=$(sed -n 's/.*"block_device": "\(.*\)".*/\1/p' b.json)
grep -q "ublk zero copy" $log || {{ cat $log; exit 1; }}
$FSX -q -S 13 -N 4000 -f fsx-dev.toml -P fsx-dev "$bdev"
# What the device wrote is in the image; what the image holds, the device reads.
dd if=/dev/urandom of=src bs=1M count=8 status=none
dd if=src of="$bdev" bs=1M oflag=direct status=none
dd if=src of="$bdev" bs=4k seek=4096 count=64 oflag=direct,dsync status=none
cmp -n 8388608 src b.img
cmp -n 262144 src b.img --ignore-initial=0:16777216
echo 3 > /proc/sys/vm/drop_caches
dd if="$bdev" of=back bs=64k count=128 iflag=direct status=none
cmp back src
# The kernel's own reads and writes count as the disk's.
$V list --json | tr -d ' \n' > list.json
grep -q '"bytes_written":[1-9][0-9]\{{7,\}}' list.json || {{ cat list.json; exit 1; }}
grep -q '"bytes_read":[1-9][0-9]\{{6,\}}' list.json || {{ cat list.json; exit 1; }}
# Discard and write zeroes still go to the disk.
blkdiscard -o 1048576 -l 1048576 "$bdev"
blkdiscard -z -o 2097152 -l 1048576 "$bdev"
$V close b.img
cmp -n 2097152 b.img /dev/zero --ignore-initial=1048576:0
# kill -9 under a verifying writer on the mounted file system: the next daemon takes the
# device over, with zero copy again; the image with a filter cannot.
$V open d.img 256M --attach ublk --mkfs ext4 --mount /tmp/m --json > open.json
dev=$(sed -n 's/.*"block_device": "\(.*\)".*/\1/p' open.json)
kill_daemon_under_writer 32M
test -b "$dev"
if $V open d.img --attach ublk --filter stats 2> filtered.err; then echo "taken over with a filter"; exit 1; fi
grep -q "can take it over" filtered.err || {{ cat filtered.err; exit 1; }}
$V open d.img --attach ublk --json > again.json
grep -q "\"block_device\": \"$dev\"" again.json || {{ cat again.json; exit 1; }}
wait $job
grep -q "err= 0" fio.out || {{ cat fio.out; exit 1; }}
grep -q "ublk zero copy" $log
# Live resize (UBLK_F_UPDATE_SIZE): the mounted ext4 grows online.
dd if=/dev/urandom of=/tmp/m/data bs=1M count=8 status=none
sum=$(sha256sum < /tmp/m/data)
$V resize d.img +64M
test "$(blockdev --getsize64 $dev)" = 335544320
resize2fs $dev
dd if=/dev/urandom of=/tmp/m/more bs=1M count=40 status=none
sync
test "$(sha256sum < /tmp/m/data)" = "$sum"
$V close d.img
test ! -e "$dev"
e2fsck -fn d.img
# qcow2 has no file that holds it byte for byte: served by copy, on the same kernel.
$V daemon --stop
rm $log
qemu-img create -q -f qcow2 q.qcow2 64M
$V open q.qcow2 --attach ublk --mkfs ext4 --mount /tmp/q >/dev/null
if grep -q "ublk zero copy" $log; then echo "qcow2 by zero copy"; exit 1; fi
dd if=/dev/urandom of=/tmp/q/f bs=1M count=8 status=none
qsum=$(sha256sum < /tmp/q/f)
$V close q.qcow2
qemu-img check -q q.qcow2
$V open q.qcow2 --attach ublk --mount /tmp/q >/dev/null
test "$(sha256sum < /tmp/q/f)" = "$qsum"
$V close q.qcow2
$V daemon --stop
echo ZERO-COPY-OK
"#
        ),
    );
    assert!(out.contains("ZERO-COPY-OK"), "{out}");
}
