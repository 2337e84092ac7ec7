//! The conventions of qemu-img, losetup and systemd that vdk keeps: `info --json` keys,
//! `--force-share`, `compare`, `resize`, `list` columns, completions and manual pages, the
//! daemon's log and readiness, and object storage reached through the daemon. Each test drives
//! the real binary.
#![allow(clippy::cast_possible_truncation)] // test sizes are small

mod common;

use std::fs;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{need, need_root, run, sparse_file, stdout, Daemon};

use common::admin::*;

// ---- Conventions ----

#[test]
fn info_json_has_qemu_img_s_keys() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    qemu_qcow2(&p("base.qcow2"), "64M");
    run(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&p("top.qcow2")),
    ]));
    run(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        s(&p("v2.qcow2")),
        "16M",
    ]));
    run(Command::new("qemu-img").args(["create", "-q", "-f", "raw", s(&p("r.img")), "16M"]));
    run(Command::new("qemu-img").args(["create", "-q", "-f", "vpc", s(&p("d.vhd")), "16M"]));
    run(Command::new("qemu-img").args(["create", "-q", "-f", "vhdx", s(&p("d.vhdx")), "16M"]));
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "children")
            .cloned()
            .collect();
        k.sort();
        k
    };
    let data_keys = |v: &serde_json::Value| keys(&v["format-specific"]["data"]);
    for name in ["top.qcow2", "v2.qcow2", "r.img", "d.vhd", "d.vhdx"] {
        let q = qemu_json(&["info", "--output=json", s(&p(name))]);
        let v: serde_json::Value =
            serde_json::from_str(&stdout(&mut vdk(&["info", "--output=json", s(&p(name))])))
                .unwrap();
        if name.ends_with(".qcow2") || name.ends_with(".img") {
            assert_eq!(keys(&v), keys(&q), "{name}:\nvdk  {v}\nqemu {q}");
        } else {
            // vdk adds format-specific data where qemu has none (a VHD's subformat).
            let vk = keys(&v);
            assert!(keys(&q).iter().all(|k| vk.contains(k)), "{name}: {v} {q}");
        }
        if name.ends_with(".qcow2") {
            assert_eq!(data_keys(&v), data_keys(&q), "{name}");
            assert_eq!(v["format-specific"]["type"], "qcow2");
        }
        for k in [
            "virtual-size",
            "cluster-size",
            "backing-filename",
            "dirty-flag",
        ] {
            assert_eq!(v[k], q[k], "{name}: {k}");
        }
    }
    let chain =
        |cmd: &mut Command| -> serde_json::Value { serde_json::from_str(&stdout(cmd)).unwrap() };
    let v = chain(&mut vdk(&[
        "info",
        "--output=json",
        "--backing-chain",
        s(&p("top.qcow2")),
    ]));
    let q = qemu_json(&[
        "info",
        "--output=json",
        "--backing-chain",
        s(&p("top.qcow2")),
    ]);
    assert_eq!(v.as_array().unwrap().len(), q.as_array().unwrap().len());
    for (a, b) in v.as_array().unwrap().iter().zip(q.as_array().unwrap()) {
        assert_eq!(keys(a), keys(b));
        assert_eq!(a["filename"], b["filename"]);
    }
    // --json is --output=json.
    let j = chain(&mut vdk(&["info", "--json", s(&p("r.img"))]));
    assert_eq!(j["format"], "raw");
}

#[test]
fn force_share_reads_an_image_a_daemon_has_open() {
    let d = Daemon::new();
    let img = d.path("live.qcow2");
    qemu_qcow2(&img, "16M");
    let v = d.open(&[s(&img), "--attach", "none"]);
    let uri = v["nbd"][0].as_str().unwrap().to_owned();
    qemu_io("raw", &uri, &["write -P 0x61 2M 1M", "flush"]);
    for args in [
        vec!["info", s(&img)],
        vec!["check", s(&img)],
        vec!["convert", s(&img), "copy.img"],
    ] {
        let err = one_line_error(d.cmd(&args).current_dir(d.dir.path()));
        assert!(err.contains("-U"), "{args:?}: {err}");
    }
    d.ok(&["info", "-U", s(&img)]);
    d.ok(&["check", "-U", s(&img)]);
    let copy = d.path("copy.img");
    d.ok(&["convert", "-U", s(&img), s(&copy)]);
    let out = d.ok(&["compare", "-U", s(&img), s(&copy)]);
    assert!(out.contains("identical"), "{out}");
}

#[test]
fn compare_tells_the_same_disk_from_another() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("a.qcow2");
    let r = dir.path().join("a.img");
    qemu_qcow2(&q, "8M");
    qemu_io("qcow2", s(&q), &["write -P 1 1M 64k"]);
    run(Command::new("qemu-img").args(["convert", "-O", "raw", s(&q), s(&r)]));
    let same = vdk(&["compare", s(&q), s(&r)]).output().unwrap();
    assert_eq!(same.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&same.stdout).contains("identical"));
    qemu_io("raw", s(&r), &["write -P 2 3145731 1"]);
    let differ = vdk(&["compare", s(&q), s(&r)]).output().unwrap();
    assert_eq!(differ.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&differ.stdout).contains("mismatch at offset 3145731"),
        "{}",
        String::from_utf8_lossy(&differ.stdout)
    );
    // Zeroes past the smaller one's end: the same disk, unless strict.
    let big = dir.path().join("big.img");
    run(Command::new("qemu-img").args(["convert", "-O", "raw", s(&q), s(&big)]));
    run(Command::new("qemu-img").args(["resize", "-q", "-f", "raw", s(&big), "16M"]));
    assert_eq!(
        vdk(&["compare", s(&q), s(&big)]).status().unwrap().code(),
        Some(0)
    );
    assert_eq!(
        vdk(&["compare", "-s", s(&q), s(&big)])
            .status()
            .unwrap()
            .code(),
        Some(1)
    );
    let missing = vdk(&["compare", s(&q), "/nonexistent.img"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn resize_shrinks_only_when_asked_and_only_what_is_unused() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("r.img");
    sparse_file(&raw, 8 * MIB);
    one_line_error(&mut vdk(&["resize", s(&raw), "4M"]));
    stdout(&mut vdk(&["resize", s(&raw), "4M", "--shrink"]));
    assert_eq!(fs::metadata(&raw).unwrap().len(), 4 * MIB);
    stdout(&mut vdk(&["resize", s(&raw), "-1M", "--shrink"]));
    assert_eq!(fs::metadata(&raw).unwrap().len(), 3 * MIB);
    // qcow2: only what nothing was written to goes.
    let q = dir.path().join("q.qcow2");
    qemu_qcow2(&q, "8M");
    qemu_io("qcow2", s(&q), &["write 1M 64k"]);
    stdout(&mut vdk(&["resize", s(&q), "4M", "--shrink"]));
    let info = qemu_json(&["info", "--output=json", s(&q)]);
    assert_eq!(info["virtual-size"], 4 * MIB);
    run(Command::new("qemu-img").args(["check", s(&q)]));
    qemu_io("qcow2", s(&q), &["read -P 0xcd 1M 64k"]);
    qemu_io("qcow2", s(&q), &["write 3M 64k"]);
    let err = one_line_error(&mut vdk(&["resize", s(&q), "2M", "--shrink"]));
    assert!(err.contains("allocated"), "{err}");
}

#[test]
fn list_fits_a_terminal_and_scripts_can_choose_its_columns() {
    let d = Daemon::new();
    let deep = d.path("a-directory-with-a-long-name/another-one-that-is-long-too/and-more");
    fs::create_dir_all(&deep).unwrap();
    let img = deep.join("an-image-whose-name-is-long-as-well.img");
    let v = d.open(&[s(&img), "16M", "--attach", "none"]);
    let id = v["id"].as_str().unwrap();
    let table = d.ok(&["list"]);
    assert!(
        table.lines().all(|l| l.chars().count() <= 100),
        "wider than 100 columns:\n{table}"
    );
    assert!(table.contains(id) && table.contains("…"), "{table}");
    let wide = d.ok(&["list", "--wide"]);
    assert!(wide.contains(s(&img)), "{wide}");
    let cut = d.ok(&["list", "-o", "ID,SIZE", "--no-headers"]);
    assert_eq!(
        cut.split_whitespace().collect::<Vec<_>>(),
        [id, "16", "MiB"]
    );
    let more = d.ok(&["list", "-o", "+NBD"]);
    assert!(more.lines().next().unwrap().ends_with("NBD"), "{more}");
    assert!(d.ok(&["list", "-o", "help"]).contains("WRITTEN"));
    let err = d.fails(&["list", "-o", "ID,NOPE"]);
    assert!(err.contains("\"NOPE\""), "{err}");
}

#[test]
fn serve_with_a_stats_filter_prints_its_figures_at_exit() {
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let (mut child, uri) = serve_on(
        dir.path(),
        "memory",
        vdk(&["serve", "--memory", "8M", "--filter", "stats"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    qemu_io("raw", &uri, &["write 0 1M", "read 0 64k"]);
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let out = child.take().wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("export \"memory\""), "{text}");
    let write = text.lines().find(|l| l.starts_with("write")).unwrap_or("");
    assert!(write.contains("1 MiB"), "{text}");
}

#[test]
fn completions_and_manual_pages_render() {
    need("bash");
    let script = stdout(&mut vdk(&["completions", "bash"]));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vdk.bash");
    fs::write(&file, &script).unwrap();
    run(Command::new("bash").arg("-n").arg(&file));
    assert!(script.contains("compare") && script.contains("--no-create"));
    for shell in ["zsh", "fish"] {
        assert!(stdout(&mut vdk(&["completions", shell])).contains("vdk"));
    }
    need("man");
    for page in [vec![], vec!["open"], vec!["fs", "map"]] {
        let mut args = vec!["man"];
        args.extend(&page);
        let roff = stdout(&mut vdk(&args));
        let roff_file = dir.path().join("page.1");
        fs::write(&roff_file, roff).unwrap();
        let text = stdout(
            Command::new("man")
                .arg("-l")
                .arg(&roff_file)
                .env("MANWIDTH", "100"),
        );
        let title = ["vdk"]
            .iter()
            .chain(&page)
            .copied()
            .collect::<Vec<_>>()
            .join("-");
        assert!(text.contains("NAME") && text.contains(&title), "{text}");
    }
    let err = one_line_error(&mut vdk(&["man", "nosuch"]));
    assert!(err.contains("nosuch"), "{err}");
}

#[test]
fn help_shows_every_filter_and_format_and_daemon_options_only_where_used() {
    let help = |args: &[&str]| stdout(&mut vdk(args));
    for cmd in ["serve", "open"] {
        let text = help(&[cmd, "--help"]);
        for f in vdk_filters::FILTERS {
            assert!(text.contains(f), "`vdk {cmd} --help` misses filter {f}");
        }
    }
    for cmd in ["serve", "open", "info", "check"] {
        let text = help(&[cmd, "--help"]);
        for f in vdk_formats::Format::ALL {
            assert!(
                text.contains(f.name()),
                "`vdk {cmd} --help` misses format {f}"
            );
        }
    }
    for cmd in ["create", "convert"] {
        let text = help(&[cmd, "--help"]);
        for f in ["raw", "qcow2", "vhd", "vhdx"] {
            assert!(text.contains(f), "`vdk {cmd} --help` misses format {f}");
        }
    }
    assert!(help(&["fs", "--help"]).contains("map"));
    let top = help(&["--help"]);
    for cmd in ["compare", "completions", "man"] {
        assert!(top.contains(cmd), "{cmd}");
    }
    for cmd in ["create", "info", "convert", "check", "serve", "compare"] {
        assert!(
            !help(&[cmd, "--help"]).contains("--socket"),
            "`vdk {cmd}` talks to no daemon"
        );
    }
    for cmd in ["open", "close", "list", "daemon", "commit"] {
        assert!(help(&[cmd, "--help"]).contains("--socket"), "{cmd}");
    }
}

#[test]
fn the_auto_started_daemon_logs_to_a_bounded_file() {
    let d = Daemon::new();
    d.open(&[s(&d.path("a.img")), "8M", "--attach", "none"]);
    let cmdline = fs::read(format!("/proc/{}/cmdline", d.pid())).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let at = args.iter().position(|a| a == "--log").expect("--log");
    assert_eq!(args[at + 1], s(&d.path("run/daemon.log")));
    assert!(d.log_has("daemon ready"));
}

#[test]
fn the_daemon_tells_systemd_it_is_ready_and_the_unit_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let socket = dir.path().join("run/control.sock");
    let mut child = Guard(Some(
        vdk(&["daemon", "--socket", s(&socket)])
            .env("NOTIFY_SOCKET", &notify)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let mut buf = [0u8; 256];
    let n = listener.recv(&mut buf).expect("a notification");
    assert_eq!(&buf[..n], b"READY=1\n");
    assert!(
        UnixStream::connect(&socket).is_ok(),
        "ready before answering"
    );
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let n = listener.recv(&mut buf).expect("a notification");
    assert_eq!(&buf[..n], b"STOPPING=1\n");
    assert!(child.wait().unwrap().success());
    // The unit file, with this build's binary and its manual pages, passes systemd's check.
    need("systemd-analyze");
    let unit =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/vdk.service"))
            .unwrap()
            .replace("/usr/local/bin/vdk", env!("CARGO_BIN_EXE_vdk"));
    let unit_file = dir.path().join("vdk.service");
    fs::write(&unit_file, unit).unwrap();
    let man1 = dir.path().join("man/man1");
    fs::create_dir_all(&man1).unwrap();
    fs::write(man1.join("vdk.1"), stdout(&mut vdk(&["man"]))).unwrap();
    fs::write(
        man1.join("vdk-daemon.1"),
        stdout(&mut vdk(&["man", "daemon"])),
    )
    .unwrap();
    run(Command::new("systemd-analyze")
        .args(["verify", s(&unit_file)])
        .env("MANPATH", dir.path().join("man")));
}

// ---- Object storage through the daemon ----

#[test]
fn a_daemon_reaches_a_bucket_with_the_clients_settings_and_errors_are_one_line() {
    let s3 = common::s3::S3::moto();
    let d = Daemon::new();
    // A daemon that has no store settings of its own.
    d.start(&[]);
    let url = s3.url("through-daemon");
    let open = |args: &[&str]| -> serde_json::Value {
        let mut a = vec!["open"];
        a.extend_from_slice(args);
        a.push("--json");
        serde_json::from_str(&stdout(d.cmd(&a).envs(s3.env()))).unwrap()
    };
    let v = open(&[&url, "16M", "--attach", "none"]);
    let uri = v["nbd"][0].as_str().unwrap().to_owned();
    qemu_io("raw", &uri, &["write -P 0x42 0 1M", "flush"]);
    run(&mut d.cmd(&["close", v["id"].as_str().unwrap()]));
    assert!(
        !d.log().contains(common::s3::SECRET_KEY),
        "the secret is in the log"
    );
    // The bucket's own errors, in a line.
    let err = one_line_error(
        d.cmd(&["open", "s3://nosuchbucket/d", "8M", "--attach", "none"])
            .envs(s3.env()),
    );
    assert!(err.contains("bucket nosuchbucket does not exist"), "{err}");
    // Nothing listens: said at once, not after a minute of retries.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let endpoint = format!("http://127.0.0.1:{port}");
    let src = d.path("src.img");
    sparse_file(&src, MIB);
    for args in [
        vec!["create", "s3://vdk/x", "8M"],
        vec!["info", "s3://vdk/x"],
        vec!["convert", s(&src), "s3://vdk/y"],
    ] {
        let start = Instant::now();
        let err = one_line_error(vdk(&args).envs(s3.env()).env("AWS_ENDPOINT_URL", &endpoint));
        assert!(
            err.contains(&format!("cannot reach {endpoint}: connection refused")),
            "{args:?}: {err}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{args:?} took long"
        );
    }
}

#[test]
fn a_new_bucket_disk_is_formatted_and_mounted_as_a_file_is() {
    need_root();
    need("mkfs.ext4");
    let s3 = common::s3::S3::moto();
    let d = Daemon::new();
    let url = s3.url("fresh");
    let mnt = d.path("mnt");
    stdout(vdk(&["create", &url, "64M"]).envs(s3.env()));
    let v: serde_json::Value = serde_json::from_str(&stdout(
        d.cmd(&["open", &url, "--mkfs", "ext4", "--mount", s(&mnt), "--json"])
            .envs(s3.env()),
    ))
    .unwrap();
    fs::write(mnt.join("f"), "in the bucket").unwrap();
    d.ok(&["close", v["id"].as_str().unwrap()]);
    let err = one_line_error(
        d.cmd(&["open", &url, "--mkfs", "ext4", "--mount", s(&mnt)])
            .envs(s3.env()),
    );
    assert!(
        err.contains("file system (ext4)") && err.contains("--force"),
        "{err}"
    );
}

#[test]
fn serve_and_convert_leave_no_cache_behind() {
    let s3 = common::s3::S3::moto();
    let dir = tempfile::tempdir().unwrap();
    let cache_home = dir.path().join("cache");
    let url = s3.url("cached");
    let img = dir.path().join("src.img");
    fs::write(&img, vec![5u8; 2 * MIB as usize]).unwrap();
    stdout(
        vdk(&["convert", "-q", s(&img), &url])
            .envs(s3.env())
            .env("XDG_CACHE_HOME", &cache_home),
    );
    let caches = || -> Vec<String> {
        fs::read_dir(cache_home.join("vdk/objstore"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(caches().is_empty(), "convert left {:?}", caches());
    let (mut child, uri) = serve_on(
        dir.path(),
        "cached",
        vdk(&["serve", &url])
            .envs(s3.env())
            .env("XDG_CACHE_HOME", &cache_home)
            .stderr(Stdio::null()),
    );
    qemu_io("raw", &uri, &["read -P 5 0 2M", "write -P 6 0 1M", "flush"]);
    assert!(!caches().is_empty(), "serve keeps its cache while it runs");
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    assert!(child.wait().unwrap().success());
    assert!(caches().is_empty(), "serve left {:?}", caches());
}
