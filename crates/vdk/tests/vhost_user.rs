//! vhost-user-blk exports proven with QEMU and a Linux guest: `../shared/vm/vmrun.sh` boots
//! a guest whose RAM is shared (VM_SHAREDMEM=1) with vhost-user-blk devices on vdk's sockets
//! on this host; the guest's own virtio-blk driver, mkfs, mount, fsx, fio, fstrim, blkdiscard
//! and e2fsck do the rest. Nothing is timed.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use common::admin::Guard;
use common::vm::{self, FSX_CONFIGS};
use common::{wait_for, Daemon};

/// QEMU options for a vhost-user-blk device on `socket`, reconnecting when its server goes.
fn device(id: &str, socket: &Path, queues: u16) -> String {
    format!(
        "-chardev socket,id={id},path={},reconnect-ms=500 \
         -device vhost-user-blk-pci,chardev={id},num-queues={queues}",
        socket.display()
    )
}

/// `vdk serve` of `image` on the vhost-user socket `socket`, once the socket is there.
fn serve(image: &Path, socket: &Path, args: &[&str]) -> Guard {
    let log = std::fs::File::create(socket.with_extension("log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_vdk"))
        .arg("serve")
        .args(args)
        .arg("--listen")
        .arg(format!("vhost-user-blk://{}", socket.display()))
        .arg(image)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for(20, "the vhost-user socket", || socket.exists());
    Guard(Some(child))
}

#[test]
fn a_vm_runs_ext4_on_a_vhost_user_disk_through_a_daemon_kill_and_a_qemu_restart() {
    let d = Daemon::new();
    let dir = d.dir.path();
    let image = d.path("d.img");
    let rw = d.path("rw.sock");
    let st = d.open(&[
        image.to_str().unwrap(),
        "256M",
        "--attach",
        "none",
        "--vhost-user",
        rw.to_str().unwrap(),
    ]);
    assert_eq!(st["vhost_user"], rw.to_str().unwrap(), "{st}");
    // A read-only export beside it, from `vdk serve`: bytes the guest compares.
    let ro_image = d.path("ro.img");
    std::fs::write(&ro_image, common::pattern(8 << 20, 7)).unwrap();
    let ro = d.path("ro.sock");
    let _ro_server = serve(&ro_image, &ro, &["--read-only"]);

    // When the guest says so (mid-write): kill -9 of the daemon, then the disk opened again
    // by a new one on the same socket; QEMU reconnects and the guest's I/O carries on.
    let killer = {
        let kill_now = d.path("kill-now");
        let restarted = d.path("restarted");
        let pid = d.pid();
        let reopen = d.cmd(&[
            "open",
            image.to_str().unwrap(),
            "--attach",
            "none",
            "--vhost-user",
            rw.to_str().unwrap(),
        ]);
        thread::spawn(move || {
            let mut reopen = reopen;
            for _ in 0..6000 {
                if kill_now.exists() {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
            assert!(kill_now.exists(), "the guest never asked for the kill");
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            thread::sleep(Duration::from_secs(1));
            let out = reopen.output().unwrap();
            assert!(out.status.success(), "reopen: {out:?}");
            std::fs::write(restarted, b"").unwrap();
        })
    };
    let script = format!(
        r#"{FSX_CONFIGS}
modprobe virtio_blk
for i in $(seq 100); do [ -b /dev/vdb ] && break; sleep 0.1; done
# Which is which: the serial is the export's name for vdk serve.
ro=vda; rw=vdb
if [ "$(cat /sys/block/vdb/serial)" = ro.img ]; then ro=vdb; rw=vda; fi
test "$(cat /sys/block/$ro/serial)" = ro.img
# Read-only: flagged so, its bytes the image's, writes refused.
test "$(cat /sys/block/$ro/ro)" = 1
test "$(cat /sys/block/$rw/ro)" = 0
cmp /dev/$ro ro.img
if dd if=/dev/zero of=/dev/$ro bs=4k count=1 oflag=direct 2>/dev/null; then echo "wrote to ro"; exit 1; fi
# The disk: its size, two queues, discard offered.
test "$(blockdev --getsize64 /dev/$rw)" = 268435456
test "$(ls /sys/block/$rw/mq | wc -l)" = 2
test "$(cat /sys/block/$rw/queue/discard_max_bytes)" -gt 0
mkfs.ext4 -q /dev/$rw
mkdir -p /tmp/m
mount /dev/$rw /tmp/m
echo hello > /tmp/m/small
dd if=/dev/urandom of=/tmp/m/big bs=1M count=16 status=none
$FSX -q -S 7 -N 2000 -f fsx-fs.toml -P fsx-fs /tmp/m/fsx.bin
sync
here=$PWD
(cd /tmp/m && sha256sum small big fsx.bin) > sums
# A verifying writer, with vdk's daemon killed and a new one started under it.
$FIO --name=v --filename=/tmp/m/fio.dat --size=24M --rw=randwrite --bs=4k \
    --ioengine=libaio --iodepth=8 --direct=1 --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --output=fio.out &
job=$!
sleep 2
kill -0 $job
touch kill-now
wait $job
grep -q "err= 0" fio.out || {{ cat fio.out; exit 1; }}
test -e restarted
# Discard and flush reach vdk; the files are intact.
fstrim /tmp/m
sync
(cd /tmp/m && sha256sum -c --quiet "$here/sums")
umount /tmp/m
e2fsck -fn /dev/$rw
echo VHOST-FIRST-BOOT-OK
"#
    );
    let qemu = format!("{} {}", device("vu0", &rw, 2), device("vu1", &ro, 1));
    let env = [("VM_SHAREDMEM", "1".to_string()), ("VM_QEMU_ARGS", qemu)];
    let out = vm::boot(dir, &script, &env);
    killer.join().unwrap();
    assert!(out.contains("VHOST-FIRST-BOOT-OK"), "{out}");

    // QEMU gone and a new one started: the same export serves it. The file system is as
    // the first guest left it; then fsx, discard and write zeroes on the bare device.
    let script = format!(
        r#"{FSX_CONFIGS}
modprobe virtio_blk
for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
e2fsck -fn /dev/vda
mkdir -p /tmp/m
mount -o ro /dev/vda /tmp/m
here=$PWD
(cd /tmp/m && sha256sum -c --quiet "$here/sums")
umount /tmp/m
$FSX -q -S 11 -N 3000 -f fsx-dev.toml -P fsx-dev /dev/vda
dd if=/dev/urandom of=/dev/vda bs=1M count=4 oflag=direct status=none
blkdiscard -o 1048576 -l 1048576 /dev/vda
blkdiscard -z -o 2097152 -l 1048576 /dev/vda
blockdev --flushbufs /dev/vda
echo VHOST-SECOND-BOOT-OK
"#
    );
    let env = [
        ("VM_SHAREDMEM", "1".to_string()),
        ("VM_QEMU_ARGS", device("vu0", &rw, 1)),
    ];
    let out = vm::boot(dir, &script, &env);
    assert!(out.contains("VHOST-SECOND-BOOT-OK"), "{out}");
    let status = d.json(&["list"]);
    assert!(status.to_string().contains("rw.sock"), "{status}");
    d.ok(&["close", image.to_str().unwrap()]);
    assert!(!rw.exists(), "the socket outlived the disk");
    // What the guest discarded and zeroed reads as zeroes in the image; its data around it
    // is there.
    let bytes = std::fs::read(&image).unwrap();
    assert!(bytes[1 << 20..3 << 20].iter().all(|&b| b == 0));
    assert!(bytes[3 << 20..4 << 20].iter().any(|&b| b != 0));
    assert!(bytes[..1 << 20].iter().any(|&b| b != 0));
}

#[test]
fn an_attached_vm_keeps_its_disk_open_and_bad_sockets_are_refused() {
    let d = Daemon::new();
    let metrics = common::metrics::start(&d);
    let image = d.path("d.img");
    let sock = d.path("vm.sock");
    let img = image.to_str().unwrap();
    // A file that is not a socket is never replaced.
    let plain = d.path("plain");
    std::fs::write(&plain, b"keep").unwrap();
    let open = |socket: &Path| {
        let socket = socket.to_str().unwrap().to_owned();
        move |d: &Daemon, ok: bool| {
            let args = [
                "open",
                img,
                "16M",
                "--attach",
                "none",
                "--vhost-user",
                &socket,
            ];
            if ok {
                d.ok(&args)
            } else {
                d.fails(&args)
            }
        }
    };
    let err = open(&plain)(&d, false);
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&plain).unwrap(), b"keep");
    open(&sock)(&d, true);
    // With a VM connected (QEMU in a guest that waits): the disk grows under the guest's
    // mounted ext4 and the guest sees it; close refuses unless --force.
    let script = r#"
modprobe virtio_blk
for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
test "$(cat /sys/block/vda/size)" = 32768
mkfs.ext4 -q /dev/vda
mkdir -p /tmp/m
mount /dev/vda /tmp/m
echo before > /tmp/m/before
blocks=$(df -k /tmp/m | awk 'NR == 2 { print $2 }')
touch attached
# vdk resize: the virtio config change reaches the guest, resize2fs grows the mounted ext4.
for i in $(seq 600); do [ "$(cat /sys/block/vda/size)" = 98304 ] && break; sleep 0.1; done
test "$(cat /sys/block/vda/size)" = 98304
dmesg | grep -q "vda: detected capacity change"
resize2fs /dev/vda
grown=$(df -k /tmp/m | awk 'NR == 2 { print $2 }')
test "$grown" -gt $((blocks * 2))
# More than the disk held before, and back intact after a remount and a check.
dd if=/dev/urandom of=/tmp/m/big bs=1M count=24 status=none
sum=$(sha256sum < /tmp/m/big)
umount /tmp/m
e2fsck -fn /dev/vda
mount /dev/vda /tmp/m
test "$(sha256sum < /tmp/m/big)" = "$sum"
test "$(cat /tmp/m/before)" = before
umount /tmp/m
touch grown
for i in $(seq 600); do [ -e closed ] && break; sleep 0.1; done
test -e closed
# The disk went under the guest: its requests now wait or fail, the guest lives.
echo VM-ENDS
"#;
    let dir = d.dir.path().to_path_buf();
    let env = [
        ("VM_SHAREDMEM", "1".to_string()),
        ("VM_QEMU_ARGS", device("vu0", &sock, 1)),
    ];
    let mut guest = Some(thread::spawn(move || vm::boot(&dir, script, &env)));
    // Waits for the guest's mark, or for the guest to end without it (its output tells why).
    let mut reached = |mark: &str| {
        let path = d.path(mark);
        let running =
            |g: &Option<thread::JoinHandle<String>>| g.as_ref().is_some_and(|g| !g.is_finished());
        wait_for(600, "the guest", || path.exists() || !running(&guest));
        if !path.exists() {
            let out = guest.take().map(|g| g.join().unwrap()).unwrap_or_default();
            panic!("the guest ended before {mark}: {out}");
        }
    };
    reached("attached");
    let out = d.ok(&["resize", img, "48M"]);
    assert!(out.contains("was told"), "{out}");
    assert!(
        d.log_has("the VM was told the disk grew"),
        "the daemon's log does not say the VM was told"
    );
    reached("grown");
    let list = d.json(&["list"]);
    assert_eq!(list[0]["vhost_user_connected"], true, "{list}");
    // Metrics count the VM's connection, and its requests as the disk's.
    let m = common::metrics::samples(&common::metrics::scrape(&metrics));
    assert_eq!(m["vdk_frontend_connections{frontend=\"vhost-user\"}"], 1.0);
    let id = list[0]["id"].as_str().unwrap();
    let reads = m[&format!("vdk_disk_reads_total{{disk=\"{id}\"}}")];
    assert!(reads > 0.0, "the guest's reads of its new disk are counted");
    assert!(reads >= list[0]["stats"]["reads"].as_f64().unwrap());
    let err = d.fails(&["close", img]);
    assert!(err.contains("attached to a VM"), "{err}");
    d.ok(&["close", img, "--force"]);
    assert!(!sock.exists());
    std::fs::write(d.path("closed"), b"").unwrap();
    let out = guest.take().unwrap().join().unwrap();
    assert!(out.contains("VM-ENDS"), "{out}");
}

#[test]
fn vdk_serve_refuses_bad_vhost_user_sockets_in_one_line() {
    use common::admin::{one_line_error, s, vdk};
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    for f in [&a, &b] {
        std::fs::write(f, vec![0u8; 1 << 20]).unwrap();
    }
    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"keep").unwrap();
    let uri = |p: &Path| format!("vhost-user-blk://{}", p.display());
    let (x, plain_uri) = (uri(&dir.path().join("x.sock")), uri(&plain));
    let cases = [
        (
            vec!["--listen", "vhost-user-blk://rel.sock", s(&a)],
            "absolute",
        ),
        (vec!["--listen", &x, s(&a), s(&b)], "one socket per export"),
        (vec!["--listen", &plain_uri, s(&a)], "not a socket"),
    ];
    for (args, want) in cases {
        let mut cmd = vdk(&["serve"]);
        cmd.args(&args);
        let err = one_line_error(&mut cmd);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read(&plain).unwrap(), b"keep");
    // The daemon serves VMs per disk (vdk open --vhost-user), not on a listener of its own.
    let mut daemon = vdk(&["daemon", "--listen", &x]);
    daemon.env("VDK_SOCKET", dir.path().join("run/control.sock"));
    let err = one_line_error(&mut daemon);
    assert!(err.contains("--vhost-user"), "{err}");
}
