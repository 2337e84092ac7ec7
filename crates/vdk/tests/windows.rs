//! vdk.exe: the Windows build, cross-compiled with mingw and run under Wine, serving disks to
//! the Linux clients nobody here wrote (nbdinfo, qemu-io, qemu-img, nbdcopy, libiscsi's
//! tools) and making images that qemu-img checks, all through Windows paths (`Z:\...`).
//!
//! Wine stands in for Windows: the file, socket and console calls vdk.exe makes are Windows
//! calls that Wine answers. What Wine cannot show (the iSCSI initiator, NTFS sparse files) is
//! in docs/windows.md's manual check.
#![cfg(target_os = "linux")]

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use common::admin::{exit_within, qemu_io, qemu_json, s, same_raw, Guard};
use common::{free_port, need, pki, run, stdout, wait_for};

const TARGET: &str = "x86_64-pc-windows-gnu";

/// vdk.exe, built once per test run, and how Wine runs it.
struct Wine {
    loader: PathBuf,
    exe: PathBuf,
    prefix: PathBuf,
}

/// Builds vdk.exe and the ProcessPrng stand-in beside it (tests/windows/bcryptprimitives.c),
/// and makes the Wine prefix, once.
fn wine() -> &'static Wine {
    static WINE: OnceLock<Wine> = OnceLock::new();
    WINE.get_or_init(|| {
        // Debian's wine64 keeps its loader out of PATH.
        let loader = PathBuf::from("/usr/lib/wine/wine64");
        assert!(
            loader.exists(),
            "this test runs vdk.exe under Wine: install it with `apt-get install wine64` \
             (scripts/install-test-deps.sh installs everything the tests use)"
        );
        need("x86_64-w64-mingw32-gcc");
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target dir")
            .join("windows-check");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        run(Command::new(cargo)
            .args([
                "build", "--locked", "--target", TARGET, "-p", "vdk", "--bin", "vdk",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("CARGO_TARGET_DIR", &target)
            // Lean: no debug information in a 200 MB executable only these tests run.
            .env("CARGO_PROFILE_DEV_DEBUG", "0"));
        let dir = target.join(TARGET).join("debug");
        run(Command::new("x86_64-w64-mingw32-gcc")
            .args(["-shared", "-O2", "-o"])
            .arg(dir.join("bcryptprimitives.dll"))
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/windows/bcryptprimitives.c"))
            .arg("-ladvapi32"));
        let wine = Wine {
            loader,
            exe: dir.join("vdk.exe"),
            prefix: target.join("wine-prefix"),
        };
        // The prefix is made by the first program Wine runs.
        ok(&mut wine.vdk(&["--version"]));
        // Services do not get WINEDLLOVERRIDES from whoever starts them: the prefix's own
        // setting chooses the stand-in for them too.
        let mut reg = Command::new(&wine.loader);
        reg.args(["reg", "add", r"HKCU\Software\Wine\DllOverrides"])
            .args(["/v", "bcryptprimitives", "/d", "native,builtin", "/f"])
            .env("WINEPREFIX", &wine.prefix)
            .env("WINEDEBUG", "-all");
        ok(&mut reg);
        // And the session that made the prefix ends here: its service manager cannot start
        // services installed later (they fail with 1053); the next session's can.
        let server = wine.loader.with_file_name("wineserver64");
        for flag in ["-k", "-w"] {
            let _ = Command::new(&server)
                .arg(flag)
                .env("WINEPREFIX", &wine.prefix)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // One program stays for the whole run: a session whose last program exits ends (its
        // server kills what still runs and refuses what starts meanwhile), which under load
        // could catch a command of another test starting or exiting at that moment. Wine's
        // cmd reads its standard input until this process ends and closes the pipe.
        let keeper = Command::new(&wine.loader)
            .arg("cmd")
            .env("WINEPREFIX", &wine.prefix)
            .env("WINEDEBUG", "-all")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start Wine's cmd");
        std::mem::forget(keeper);
        wine
    })
}

/// Runs a Wine command to its end; its output through files, not pipes: the Wine services the
/// first command of a session starts (wineserver, winedevice) inherit its descriptors and
/// would hold a pipe open long after the command is done.
fn out(cmd: &mut Command) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let status = cmd
        .stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    Output {
        status,
        stdout: std::fs::read(&o).unwrap(),
        stderr: std::fs::read(&e).unwrap(),
    }
}

/// [`out`], which must succeed; its standard output.
///
/// Wine's server has been seen, under load, to kill a program with SIGKILL as it exits, after
/// it printed its whole answer (never vdk.exe's own doing: vdk reports its failures with an
/// exit code and a message on stderr). So a SIGKILL is taken as success when the command had
/// printed a whole answer (non-empty, ending in a newline: vdk prints its result only once the
/// work is done, and the tests then check the work itself); a command that changes nothing
/// (`list`, `info`, `check`, `daemon --reload`, `--version`) killed before answering is run
/// again, up to twice.
fn ok(cmd: &mut Command) -> String {
    let args: Vec<String> = cmd
        .get_args()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let again = matches!(
        args.first().map(String::as_str),
        Some("list" | "info" | "check" | "--version")
    ) || args.starts_with(&["daemon".to_owned(), "--reload".to_owned()]);
    let killed = |o: &std::process::Output| {
        std::os::unix::process::ExitStatusExt::signal(&o.status) == Some(9)
    };
    let answered = |o: &std::process::Output| o.stdout.ends_with(b"\n");
    let mut o = out(cmd);
    for _ in 0..2 {
        if !(again && killed(&o) && !answered(&o)) {
            break;
        }
        o = out(cmd);
    }
    if killed(&o) && answered(&o) {
        eprintln!("note: Wine killed {cmd:?} with SIGKILL after its whole answer; taken as done");
        return String::from_utf8(o.stdout).unwrap();
    }
    assert!(
        o.status.success(),
        "{cmd:?} failed ({}): {}",
        o.status,
        text(&o)
    );
    String::from_utf8(o.stdout).unwrap()
}

impl Wine {
    /// `vdk.exe ARGS` under Wine.
    fn vdk(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.loader);
        c.arg(&self.exe)
            .args(args)
            .env("WINEPREFIX", &self.prefix)
            .env("WINEDEBUG", "-all")
            .env("WINEDLLOVERRIDES", "bcryptprimitives=n,b")
            .stdin(Stdio::null());
        c
    }
}

/// `p` as Windows programs under Wine name it: drive Z: is the Linux root.
fn win(p: &Path) -> String {
    format!("Z:{}", s(p).replace('/', "\\"))
}

/// `vdk.exe serve ARGS --listen SCHEME://127.0.0.1:PORT` on a free port with `env` added,
/// logging into `dir/serve.log`, once it accepts connections; the process and the port.
fn serve(dir: &Path, args: &[&str], scheme: &str, env: &[(&str, String)]) -> (Guard, u16) {
    let port = free_port();
    let listen = format!("{scheme}://127.0.0.1:{port}");
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    let mut child = Guard(Some(
        wine()
            .vdk(&[&["serve"], args, &["--listen", &listen]].concat())
            .envs(env.iter().cloned())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start vdk.exe"),
    ));
    wait_for(60, "vdk.exe to listen", || {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("vdk.exe exited ({st}): {}", log_of(dir));
        }
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (child, port)
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
}

/// Ctrl-C (Wine turns SIGINT into the console's CTRL_C_EVENT): vdk.exe must finish, flush
/// and exit 0 within 20 s.
fn ctrl_c(mut child: Guard, dir: &Path) {
    run(Command::new("kill").args(["-INT", &child.id().to_string()]));
    let status = exit_within(&mut child, 20)
        .unwrap_or_else(|| panic!("vdk.exe still runs 20 s after Ctrl-C: {}", log_of(dir)));
    assert!(status.success(), "{status} after Ctrl-C: {}", log_of(dir));
    let log = log_of(dir);
    assert!(log.contains("Ctrl-C: shutting down"), "{log}");
    assert!(log.contains("stopped"), "{log}");
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The same writes, zeroes and trims through `target` (qemu-io's `-f FORMAT TARGET`).
fn write_pattern(format: &str, target: &str) {
    qemu_io(
        format,
        target,
        &[
            "write -P 0x5a 0 1M",
            "write -P 0xa5 3M 64k",
            "write -P 0x33 10M 2M",
            "write -z 10M 512k",
            "discard 11M 512k",
            "flush",
        ],
    );
}

#[test]
fn nbd_from_vdk_exe_is_a_disk_linux_clients_read_and_write() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let out = ok(&mut wine().vdk(&["create", &win(&image), "64M"]));
    assert!(out.contains("created"), "{out}");
    let (serving, port) = serve(dir.path(), &[&win(&image)], "tcp", &[]);
    let uri = format!("nbd://127.0.0.1:{port}/disk.qcow2");
    need("nbdinfo");
    let info: serde_json::Value =
        serde_json::from_str(&stdout(Command::new("nbdinfo").args(["--json", &uri]))).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 64 << 20, "{info}");
    assert_eq!(export["is_read_only"], false, "{info}");
    assert!(
        export["can_flush"] == true && export["can_trim"] == true,
        "{info}"
    );
    // The same writes into a raw file by qemu-io itself: what the disk must then hold.
    let reference = dir.path().join("reference.raw");
    run(Command::new("truncate").args(["-s", "64M", s(&reference)]));
    write_pattern("raw", s(&reference));
    write_pattern("raw", &uri);
    // The holes and data vdk.exe reports, and every byte, through nbdcopy.
    let map = stdout(Command::new("nbdinfo").args(["--map", &uri]));
    assert!(map.lines().any(|l| l.contains("hole")), "{map}");
    let copy = dir.path().join("copy.raw");
    need("nbdcopy");
    run(Command::new("nbdcopy").args([&uri, s(&copy)]));
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&reference).unwrap(),
        "the export differs from the reference"
    );
    ctrl_c(serving, dir.path());
    // Flushed and closed: the qcow2 is clean and holds the writes for qemu too.
    run(Command::new("qemu-img").args(["check", s(&image)]));
    run(Command::new("qemu-img").args(["compare", s(&image), s(&reference)]));
}

#[test]
fn a_raw_image_under_vdk_exe_trims_and_zeroes_to_what_qemu_writes() {
    // Trim and write-zeroes go to FSCTL_SET_ZERO_DATA, extents to
    // FSCTL_QUERY_ALLOCATED_RANGES, or to written zeroes and all-data where the file
    // system answers neither: either way every byte must be what qemu-io wrote.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    ok(&mut wine().vdk(&["create", &win(&image), "64M"]));
    let (serving, port) = serve(dir.path(), &[&win(&image)], "tcp", &[]);
    let reference = dir.path().join("reference.raw");
    run(Command::new("truncate").args(["-s", "64M", s(&reference)]));
    write_pattern("raw", s(&reference));
    let uri = format!("nbd://127.0.0.1:{port}/disk.raw");
    write_pattern("raw", &uri);
    qemu_io(
        "raw",
        &uri,
        &[
            "read -P 0 11M 512k",
            "read -P 0 10M 512k",
            "read -P 0x33 10752k 512k",
        ],
    );
    ctrl_c(serving, dir.path());
    same_raw(s(&image), s(&reference));
    // Wine has neither control: the log says once what was done instead.
    let log = log_of(dir.path());
    assert_eq!(log.matches("(said once per image)").count(), 1, "{log}");
    assert!(log.contains("zeroes written instead"), "{log}");
}

#[test]
fn writes_redirected_to_an_overlay_by_vdk_exe_are_committed_or_discarded() {
    // The write filter seed: the base stays as it was while served; commit merges.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    run(Command::new("truncate").args(["-s", "32M", s(&base)]));
    qemu_io("raw", s(&base), &["write -P 0x11 0 4M"]);
    let overlay = d.join("changes.qcow2");
    for (round, pattern) in [(0, "0x22"), (1, "0x33")] {
        let (serving, port) = serve(
            d,
            &[
                &win(&base),
                "--filter",
                &format!("cow:overlay={}", win(&overlay)),
            ],
            "tcp",
            &[],
        );
        let uri = format!("nbd://127.0.0.1:{port}/base.raw");
        qemu_io(
            "raw",
            &uri,
            &[&format!("write -P {pattern} 1M 1M"), "flush"],
        );
        qemu_io(
            "raw",
            &uri,
            &["read -P 0x11 0 1M", &format!("read -P {pattern} 1M 1M")],
        );
        ctrl_c(serving, d);
        qemu_io("raw", s(&base), &["read -P 0x11 0 4M"]);
        if round == 0 {
            let out = ok(&mut wine().vdk(&["discard", &win(&overlay)]));
            assert!(out.contains("discard"), "{out}");
        }
    }
    // A snapshot chains a new overlay on top, recording the Windows path of the one below:
    // vdk.exe reads the chain through to the base.
    let top = d.join("top.qcow2");
    ok(&mut wine().vdk(&["snapshot", &win(&overlay), &win(&top)]));
    let flat = d.join("flat.raw");
    ok(&mut wine().vdk(&["convert", &win(&top), &win(&flat)]));
    qemu_io(
        "raw",
        s(&flat),
        &["read -P 0x11 0 1M", "read -P 0x33 1M 1M"],
    );
    std::fs::remove_file(&top).unwrap();
    let out = ok(&mut wine().vdk(&["commit", &win(&overlay)]));
    assert!(out.contains("commit"), "{out}");
    qemu_io(
        "raw",
        s(&base),
        &[
            "read -P 0x11 0 1M",
            "read -P 0x33 1M 1M",
            "read -P 0x11 2M 2M",
        ],
    );
}

#[test]
fn object_storage_disks_from_vdk_exe() {
    // vdk.exe's S3 client (HTTP over Windows sockets) against a real S3-protocol server.
    let s3 = common::s3::S3::moto();
    let url = s3.url("windisk");
    let cache = tempfile::tempdir().unwrap();
    ok(wine()
        .vdk(&["create", &url, "64M", "--chunk-size", "1M"])
        .envs(s3.env()));
    let (serving, port) = serve(
        cache.path(),
        &[&url, "--cache", &win(&cache.path().join("c"))],
        "tcp",
        &s3.env(),
    );
    let uri = format!("nbd://127.0.0.1:{port}/windisk");
    qemu_io("raw", &uri, &["write -P 0xa5 3M 5M", "flush"]);
    ctrl_c(serving, cache.path());
    // A fresh cache reads it back from the bucket (Linux's vdk, the same store).
    let copy = cache.path().join("copy.raw");
    run(Command::new(env!("CARGO_BIN_EXE_vdk"))
        .args(["convert", &url, s(&copy)])
        .envs(s3.env()));
    qemu_io("raw", s(&copy), &["read -P 0xa5 3M 5M", "read -P 0 8M 32M"]);
}

#[test]
fn direct_io_under_vdk_exe_bypasses_the_cache_and_keeps_every_byte() {
    // --direct: FILE_FLAG_NO_BUFFERING | FILE_FLAG_WRITE_THROUGH, aligned requests only.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("direct.raw");
    ok(&mut wine().vdk(&["create", &win(&image), "16M"]));
    let (serving, port) = serve(dir.path(), &[&win(&image), "--direct"], "tcp", &[]);
    let uri = format!("nbd://127.0.0.1:{port}/direct.raw");
    qemu_io(
        "raw",
        &uri,
        &[
            "write -P 0x77 4k 1M",
            "read -P 0x77 4k 1M",
            "read -P 0 0 4k",
        ],
    );
    ctrl_c(serving, dir.path());
    qemu_io(
        "raw",
        s(&image),
        &["read -P 0x77 4k 1M", "read -P 0 1052672 4k"],
    );
}

#[test]
fn iscsi_from_vdk_exe_gives_a_disk_and_a_cd_rom() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    ok(&mut wine().vdk(&["create", &win(&image), "32M"]));
    let iso = common::admin::iso_with_hello(dir.path());
    let (serving, port) = serve(dir.path(), &[&win(&image), &win(&iso)], "iscsi", &[]);
    need("iscsi-ls");
    let listed =
        stdout(Command::new("iscsi-ls").args(["-s", &format!("iscsi://127.0.0.1:{port}")]));
    let lun_of = |target: &str| {
        let at = listed
            .find(&format!("Target:iqn.2026-11.org.vdk:{target} "))
            .unwrap_or_else(|| panic!("no target {target}: {listed}"));
        listed[at..].lines().nth(1).unwrap_or("").to_owned()
    };
    assert!(
        lun_of("disk.raw").contains("Type:DIRECT_ACCESS"),
        "{listed}"
    );
    assert!(lun_of("disc.iso").contains("Type:MMC"), "{listed}");
    // INQUIRY through libiscsi's own tool: vdk's vendor and a disk.
    need("iscsi-inq");
    let inq = stdout(Command::new("iscsi-inq").arg(format!(
        "iscsi://127.0.0.1:{port}/iqn.2026-11.org.vdk:disk.raw/0"
    )));
    assert!(
        inq.contains("VDK") && inq.contains("DIRECT_ACCESS"),
        "{inq}"
    );
    // The CD-ROM reads as the ISO, byte for byte.
    let disc = format!("iscsi://127.0.0.1:{port}/iqn.2026-11.org.vdk:disc.iso/0");
    let read_back = dir.path().join("read-back.iso");
    run(Command::new("qemu-img").args(["convert", "-O", "raw", &disc, s(&read_back)]));
    // The disk takes writes; Ctrl-C flushes them into the file.
    let lun = format!("iscsi://127.0.0.1:{port}/iqn.2026-11.org.vdk:disk.raw/0");
    qemu_io("raw", &lun, &["write -P 0x7e 1M 2M", "flush"]);
    ctrl_c(serving, dir.path());
    qemu_io("raw", s(&image), &["read -P 0x7e 1M 2M", "read -P 0 0 1M"]);
    // Compared once vdk.exe is gone: Wine makes its whole-file lock a POSIX lock, which
    // qemu-img takes as an image in use.
    same_raw(s(&iso), s(&read_back));
}

#[test]
fn iscsi_test_cu_passes_against_vdk_exe_as_against_vdk() {
    // The SCSI target over Windows sockets and files: every family of libiscsi's suite.
    let dir = tempfile::tempdir().unwrap();
    let lun = dir.path().join("lun.raw");
    common::sparse_file(&lun, 1 << 30);
    let (serving, port) = serve(dir.path(), &[&win(&lun)], "iscsi", &[]);
    common::iscsi_test_cu_all(&format!(
        "iscsi://127.0.0.1:{port}/iqn.2026-11.org.vdk:lun.raw/0"
    ));
    ctrl_c(serving, dir.path());
}

#[test]
fn tls_from_vdk_exe_serves_only_tls_clients() {
    let dir = tempfile::tempdir().unwrap();
    let certs = pki::make(&dir.path().join("pki"), "vdk test CA", "alice");
    let (serving, port) = serve(
        dir.path(),
        &[
            "--memory",
            "16M",
            "--tls",
            "require",
            "--tls-certificates",
            &win(&certs),
        ],
        "tcp",
        &[],
    );
    need("nbdsh");
    let tls = format!(
        "nbds://localhost:{port}/memory?tls-certificates={}",
        s(&certs)
    );
    let script = "import os\nh.set_uri_allow_local_file(True)\nh.connect_uri(os.environ['URI'])\n\
        h.pwrite(b'\\x42' * 65536, 4096)\nh.flush()\n\
        assert h.pread(65536, 4096) == b'\\x42' * 65536\nprint('round trip ok')\n";
    let out = stdout(
        Command::new("nbdsh")
            .args(["-c", script])
            .env("URI", &tls)
            .env("PATH", common::path_env()),
    );
    assert!(out.contains("round trip ok"), "{out}");
    let plain = Command::new("nbdinfo")
        .arg(format!("nbd://127.0.0.1:{port}/memory"))
        .output()
        .unwrap();
    assert!(
        !plain.status.success(),
        "a plain client was served: {}",
        text(&plain)
    );
    ctrl_c(serving, dir.path());
}

#[test]
fn image_commands_of_vdk_exe_work_on_windows_paths() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vdk = |args: &[&str]| ok(&mut wine().vdk(args));
    // Each format vdk.exe creates is what qemu-img sees.
    for (name, format) in [
        ("a.raw", "raw"),
        ("a.qcow2", "qcow2"),
        ("a.vhd", "vpc"),
        ("a.vhdx", "vhdx"),
    ] {
        vdk(&["create", &win(&d.join(name)), "48M"]);
        let info = qemu_json(&["info", "--output=json", s(&d.join(name))]);
        assert_eq!(info["format"], format, "{name}: {info}");
        assert!(
            info["virtual-size"].as_u64().unwrap() >= 48 << 20,
            "{name}: {info}"
        );
    }
    // vdk.exe info on what qemu-img wrote.
    let qcow2 = d.join("a.qcow2");
    write_pattern("qcow2", s(&qcow2));
    let info: serde_json::Value =
        serde_json::from_str(&vdk(&["info", "--json", &win(&qcow2)])).unwrap();
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], 48 << 20, "{info}");
    // The space a raw file takes, as the file system counts it (GetFileInformationByHandleEx).
    let raw = d.join("a.raw");
    qemu_io("raw", s(&raw), &["write -P 0x11 0 4M", "flush"]);
    let info: serde_json::Value =
        serde_json::from_str(&vdk(&["info", "--json", &win(&raw)])).unwrap();
    let blocks = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&raw).unwrap().blocks() * 512
    };
    assert_eq!(info["actual-size"], blocks, "{info}");
    // check, convert and compare, each read back by qemu-img.
    vdk(&["check", &win(&qcow2)]);
    let vhdx = d.join("b.vhdx");
    vdk(&["convert", &win(&qcow2), &win(&vhdx)]);
    run(Command::new("qemu-img").args(["check", s(&vhdx)]));
    run(Command::new("qemu-img").args(["compare", s(&qcow2), s(&vhdx)]));
    let same = out(&mut wine().vdk(&["compare", &win(&qcow2), &win(&vhdx)])).status;
    assert_eq!(same.code(), Some(0));
    // resize grows it; qemu-img sees the new size and the old data.
    vdk(&["resize", &win(&qcow2), "96M"]);
    let info = qemu_json(&["info", "--output=json", s(&qcow2)]);
    assert_eq!(info["virtual-size"], 96 << 20, "{info}");
    qemu_io(
        "qcow2",
        s(&qcow2),
        &["read -P 0x5a 0 1M", "read -P 0 90M 1M"],
    );
    run(Command::new("qemu-img").args(["check", s(&qcow2)]));
    // As qemu-img compare: the larger one's zeroes past the smaller's end are the same,
    // unless --strict.
    let grown = out(&mut wine().vdk(&["compare", &win(&qcow2), &win(&vhdx)])).status;
    assert_eq!(grown.code(), Some(0));
    let strict = out(&mut wine().vdk(&["compare", "--strict", &win(&qcow2), &win(&vhdx)])).status;
    assert_eq!(
        strict.code(),
        Some(1),
        "a 96M disk and a 48M one are the same with --strict"
    );
}

/// A control pipe of the test's own.
/// Whether a daemon started with `--listen tcp://127.0.0.1:PORT` is up: it makes its pipe
/// before it listens. (`vdk list` would not do: with no daemon it says "no disks open", and
/// a `vdk open` sent too early starts a second daemon of its own on that pipe.)
fn answers(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn pipe(tag: &str) -> String {
    format!(r"\\.\pipe\vdk-test-{tag}-{}", std::process::id())
}

/// `vdk.exe ARGS --socket PIPE --json`, parsed.
fn ask(pipe: &str, args: &[&str]) -> serde_json::Value {
    let out = ok(&mut wine().vdk(&[args, &["--socket", pipe, "--json"]].concat()));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn the_daemon_under_wine_opens_serves_ejects_and_closes_disks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pipe = pipe("disks");
    let (nbd, iscsi) = (free_port(), free_port());
    let log = std::fs::File::create(d.join("daemon.log")).unwrap();
    let mut daemon = Guard(Some(
        wine()
            .vdk(&["daemon", "--socket", &pipe])
            .args(["--listen", &format!("tcp://127.0.0.1:{nbd}")])
            .args(["--listen", &format!("iscsi://127.0.0.1:{iscsi}")])
            .stderr(log)
            .spawn()
            .unwrap(),
    ));
    let daemon_log = || std::fs::read_to_string(d.join("daemon.log")).unwrap_or_default();
    wait_for(60, "the daemon's pipe", || {
        assert!(daemon.try_wait().unwrap().is_none(), "{}", daemon_log());
        answers(nbd)
    });
    // A new image, created by the daemon, written over NBD.
    let image = d.join("data.img");
    let disk = ask(&pipe, &["open", &win(&image), "64M", "--attach", "none"]);
    let id = disk["id"].as_str().unwrap().to_owned();
    assert_eq!(disk["attach"], "none", "{disk}");
    let uri = disk["nbd"][0].as_str().unwrap().to_owned();
    assert!(
        uri.starts_with(&format!("nbd://127.0.0.1:{nbd}/")),
        "{disk}"
    );
    qemu_io("raw", &uri, &["write -P 0x5c 1M 2M", "flush"]);
    // An ISO as a CD-ROM LUN; a disc ejected and another put in.
    let iso = common::admin::iso_with_hello(d);
    let other = d.join("other.iso");
    std::fs::copy(&iso, &other).unwrap();
    // The same disc, but for its last sector (past the file system's data).
    let last = std::fs::metadata(&other).unwrap().len() - 2048;
    qemu_io("raw", s(&other), &[&format!("write -P 0x21 {last} 2k")]);
    let cd = ask(&pipe, &["open", &win(&iso), "--iscsi", "--attach", "none"]);
    let cd_id = cd["id"].as_str().unwrap().to_owned();
    let lun = cd["iscsi"][0].as_str().unwrap().to_owned();
    assert!(
        lun.starts_with(&format!("iscsi://127.0.0.1:{iscsi}/")),
        "{cd}"
    );
    let listed =
        stdout(Command::new("iscsi-ls").args(["-s", &format!("iscsi://127.0.0.1:{iscsi}")]));
    assert!(listed.contains("Type:MMC"), "{listed}");
    let list = ask(&pipe, &["list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    let ejected = ask(&pipe, &["eject", &cd_id]);
    assert_eq!(ejected["ejected"], true, "{ejected}");
    ask(&pipe, &["insert", &cd_id, &win(&other)]);
    let read_back = d.join("read-back.iso");
    run(Command::new("qemu-img").args(["convert", "-O", "raw", &lun, s(&read_back)]));
    // What Windows cannot do is refused in one line, and so is a login Wine cannot do (its
    // powershell.exe is a stand-in that answers nothing): no disk and no new image are left.
    for (args, said) in [
        (vec!["--attach", "fuse-loop"], "fuse-loop"),
        (vec!["--attach", "none", "--mkfs", "ntfs"], "block device"),
        (vec!["--mkfs", "ext4"], "Windows formats ntfs"),
        (vec!["--mount", "/mnt/x"], "drive letter"),
        (vec![], "no disk number came back"),
    ] {
        let out = out(&mut wine().vdk(
            &[
                &["open", &win(&d.join("x.img")), "16M", "--socket", &pipe][..],
                &args,
            ]
            .concat(),
        ));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(said),
            "{args:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!d.join("x.img").exists(), "{args:?} left its new image");
    }
    assert_eq!(ask(&pipe, &["list"]).as_array().map(Vec::len), Some(2));
    // A cow disk committed live: the base takes the writes while the disk stays open.
    let base = d.join("base.raw");
    run(Command::new("truncate").args(["-s", "16M", s(&base)]));
    let overlay = d.join("base-changes.qcow2");
    let cow = ask(
        &pipe,
        &[
            "open",
            &win(&base),
            "--filter",
            &format!("cow:overlay={}", win(&overlay)),
            "--attach",
            "none",
        ],
    );
    let cow_uri = cow["nbd"][0].as_str().unwrap().to_owned();
    qemu_io("raw", &cow_uri, &["write -P 0x6e 0 1M", "flush"]);
    let cow_id = cow["id"].as_str().unwrap().to_owned();
    ok(&mut wine().vdk(&["commit", &cow_id, "--socket", &pipe]));
    qemu_io(
        "raw",
        &cow_uri,
        &["read -P 0x6e 0 1M", "write -P 0x6f 1M 1M", "flush"],
    );
    ask(&pipe, &["close", &cow_id]);
    qemu_io("raw", s(&base), &["read -P 0x6e 0 1M", "read -P 0 1M 1M"]);
    // Closed, flushed, and the daemon stopped by request.
    ask(&pipe, &["close", &id]);
    ok(&mut wine().vdk(&["daemon", "--stop", "--socket", &pipe]));
    stopped_within(&mut daemon, 30, &d.join("daemon.log"));
    qemu_io("raw", s(&image), &["read -P 0x5c 1M 2M", "read -P 0 0 1M"]);
    same_raw(s(&other), s(&read_back));
}

#[test]
fn the_daemon_under_wine_reads_new_certificates_when_asked() {
    // Windows has no SIGHUP: `vdk daemon --reload` is the control request that does it.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let first = pki::make(&d.join("first"), "first CA", "alice");
    let second = pki::make(&d.join("second"), "second CA", "alice");
    let live = d.join("live");
    std::fs::create_dir_all(&live).unwrap();
    let install = |from: &Path| {
        for f in ["server-cert.pem", "server-key.pem", "ca-cert.pem"] {
            std::fs::copy(from.join(f), live.join(f)).unwrap();
        }
    };
    install(&first);
    let pipe = pipe("tls");
    let port = free_port();
    let mut daemon = Guard(Some(
        wine()
            .vdk(&["daemon", "--socket", &pipe, "--tls", "require"])
            .args(["--tls-certificates", &win(&live)])
            .args(["--listen", &format!("tcp://127.0.0.1:{port}")])
            .stderr(std::fs::File::create(d.join("daemon.log")).unwrap())
            .spawn()
            .unwrap(),
    ));
    wait_for(60, "the daemon's pipe", || {
        assert!(daemon.try_wait().unwrap().is_none());
        answers(port)
    });
    let disk = ask(
        &pipe,
        &["open", &win(&d.join("t.img")), "16M", "--attach", "none"],
    );
    let export = disk["id"].as_str().unwrap().to_owned();
    let info = |certs: &Path| {
        let uri = format!(
            "nbds://localhost:{port}/{export}?tls-certificates={}",
            s(certs)
        );
        let script =
            "import os\nh.set_uri_allow_local_file(True)\nh.connect_uri(os.environ['URI'])\n";
        Command::new("nbdsh")
            .args(["-c", script])
            .env("URI", uri)
            .env("PATH", common::path_env())
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(info(&first) && !info(&second));
    install(&second);
    let said = ok(&mut wine().vdk(&["daemon", "--reload", "--socket", &pipe]));
    assert!(said.contains("reloaded"), "{said}");
    assert!(info(&second) && !info(&first));
    // A broken key is refused, and the certificates in use stay.
    std::fs::write(live.join("server-key.pem"), "not a key").unwrap();
    let bad = out(&mut wine().vdk(&["daemon", "--reload", "--socket", &pipe]));
    assert!(!bad.status.success());
    assert!(text(&bad).contains("not reloaded"), "{}", text(&bad));
    assert!(info(&second));
    ok(&mut wine().vdk(&["daemon", "--stop", "--socket", &pipe]));
    stopped_within(&mut daemon, 30, &d.join("daemon.log"));
}

/// Waits for a `vdk daemon` under Wine, asked to stop, to end successfully. As with [`ok`]'s
/// commands, a SIGKILL by Wine as the process exits is taken as success once the daemon
/// logged that it stopped (every disk closed and flushed, the NBD server ended).
fn stopped_within(daemon: &mut std::process::Child, secs: u64, log: &Path) {
    let status = exit_within(daemon, secs);
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let Some(status) = status else {
        panic!("the daemon did not stop within {secs} s:\n{log}");
    };
    let killed = std::os::unix::process::ExitStatusExt::signal(&status) == Some(9);
    if killed && log.contains("daemon stopped") {
        eprintln!("note: Wine killed the daemon with SIGKILL after it stopped; taken as done");
        return;
    }
    assert!(status.success(), "the daemon ended with {status}:\n{log}");
}

/// Removes the vdk service from the Wine prefix when dropped, so that a failed test leaves
/// no service that starts with every Wine session.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = out(&mut wine().vdk(&["daemon", "--uninstall-service"]));
    }
}

#[test]
fn the_daemon_runs_as_a_windows_service_and_a_service_stop_closes_its_disks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Wine ends its services when the last ordinary program of the session exits: one stays
    // running for the test (Windows keeps services running regardless).
    let (_keeper, _) = serve(d, &["--memory", "1M"], "tcp", &[]);
    let port = free_port();
    let sc = |args: &[&str]| {
        let mut c = Command::new(&wine().loader);
        c.arg("sc").args(args);
        c.env("WINEPREFIX", &wine().prefix)
            .env("WINEDEBUG", "-all")
            .env("WINEDLLOVERRIDES", "bcryptprimitives=n,b");
        out(&mut c)
    };
    // Its state as `sc query` says it.
    let state = || text(&sc(&["query", "vdk"]));
    let said = ok(&mut wine().vdk(&[
        "daemon",
        "--install-service",
        "--listen",
        &format!("tcp://127.0.0.1:{port}"),
    ]));
    let _installed = Installed;
    assert!(said.contains("installed the vdk service"), "{said}");
    assert!(state().contains("WIN32_OWN_PROCESS"), "{}", state());
    // (A new Wine session may have started it already: it starts at boot, and Wine's service
    // manager counts a session's start as one. Either way its pipe must come.)
    let started = sc(&["start", "vdk"]);
    let pipe = r"\\.\pipe\vdk";
    let service_up = || {
        out(&mut wine().vdk(&["list", "--socket", pipe]))
            .status
            .success()
            && TcpStream::connect(("127.0.0.1", port)).is_ok()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !service_up() {
        assert!(
            std::time::Instant::now() < deadline,
            "the service did not come up: sc start said {}; sc query says {}",
            text(&started),
            state()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let image = d.join("service.img");
    let disk = ask(pipe, &["open", &win(&image), "16M", "--attach", "none"]);
    let uri = disk["nbd"][0].as_str().unwrap().to_owned();
    qemu_io("raw", &uri, &["write -P 0x4b 0 2M"]);
    // A service stop closes the disk (flushing it) before the daemon exits.
    sc(&["stop", "vdk"]);
    wait_for(60, "the service to stop", || state().contains("STOPPED"));
    qemu_io("raw", s(&image), &["read -P 0x4b 0 2M"]);
    let said = ok(&mut wine().vdk(&["daemon", "--uninstall-service"]));
    assert!(said.contains("removed"), "{said}");
    let gone = out(&mut wine().vdk(&["daemon", "--uninstall-service"]));
    assert!(
        text(&gone).contains("no vdk service is installed"),
        "{}",
        text(&gone)
    );
}

#[test]
fn vdk_exe_open_starts_its_daemon_and_ctrl_c_would_not_reach_it() {
    // The daemon `vdk open` starts lives on in the background (its own process group, no
    // console) on the default NBD port, until `vdk daemon --stop`.
    let dir = tempfile::tempdir().unwrap();
    let pipe = pipe("auto");
    let image = dir.path().join("auto.img");
    let disk = ask(&pipe, &["open", &win(&image), "16M", "--attach", "none"]);
    let uri = disk["nbd"][0].as_str().unwrap().to_owned();
    assert!(uri.starts_with("nbd://127.0.0.1:10809/"), "{disk}");
    qemu_io("raw", &uri, &["write -P 0x3d 0 1M", "flush"]);
    let list = ask(&pipe, &["list"]);
    assert_eq!(list[0]["id"], disk["id"], "{list}");
    ok(&mut wine().vdk(&["daemon", "--stop", "--socket", &pipe]));
    // Stopped: the disk was closed and flushed, nothing answers on the pipe.
    qemu_io("raw", s(&image), &["read -P 0x3d 0 1M"]);
    let gone = out(&mut wine().vdk(&["list", "--socket", &pipe]));
    assert!(gone.status.success(), "{}", text(&gone));
    assert!(String::from_utf8_lossy(&gone.stdout).contains("no disks open"));
    // The FUSE file systems are Linux's: not a command there at all.
    let fs = out(&mut wine().vdk(&["fs", "list"]));
    assert!(!fs.status.success());
    assert!(
        String::from_utf8_lossy(&fs.stderr).contains("unrecognized subcommand"),
        "{}",
        text(&fs)
    );
}
