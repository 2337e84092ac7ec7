//! What a local attacker tried against the daemon, the cloud drive and the object-store disk,
//! each as a test that fails if the hole opens again: an `--owner` user reaching root's files
//! through `file://` URLs and store settings, drives readable by every user, a daemon that
//! changes directories it did not make or follows links to write its log, one user changing
//! another's disks, object-store metadata that overflows. (The quadratic ISO listing and the
//! cloud-drive keys that hid whole folders have their tests beside their code and in
//! drive.rs.)
//!
//! As root, with the users `tests` (made by scripts/install-test-deps.sh) and `nobody`.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use common::{need_root, path_env, run, stdout, Daemon};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &Path, user: &str) {
    run(Command::new("chown").arg(user).arg(p));
}

/// `CMD ARGS` as `user` (its own uid, primary group, no other groups).
fn as_user(user: &str, cmd: &str, args: &[&str]) -> Output {
    common::as_user(user, cmd)
        .args(args)
        .output()
        .expect("run setpriv")
}

/// `vdk ARGS` as `user`, against the daemon `d`.
fn vdk_as(d: &Daemon, user: &str, args: &[&str]) -> Output {
    common::as_user(user, env!("CARGO_BIN_EXE_vdk"))
        .args(args)
        .env("VDK_SOCKET", &d.socket)
        .output()
        .expect("run setpriv")
}

/// A root daemon serving `user` too, in a temporary directory the user may search, and a
/// home there that is the user's.
fn owner_daemon(user: &str) -> (Daemon, std::path::PathBuf) {
    need_root();
    let d = Daemon::new();
    chmod(d.dir.path(), 0o711);
    d.start(&["--owner", user]);
    let home = d.path("home");
    fs::create_dir(&home).unwrap();
    chown(&home, user);
    (d, home)
}

/// A directory only root may enter, holding a secret.
fn root_only(d: &Daemon) -> std::path::PathBuf {
    let r = d.path("R");
    fs::create_dir(&r).unwrap();
    fs::write(r.join("secret.txt"), "root's secret").unwrap();
    chmod(&r, 0o700);
    r
}

#[test]
fn an_owner_reaches_no_root_only_directory_through_a_file_url() {
    let (d, home) = owner_daemon("tests");
    let r = root_only(&d);
    let mnt = home.join("m");
    let url = format!("file://{}", s(&r));
    let o = vdk_as(&d, "tests", &["fs", "map", &url, s(&mnt)]);
    assert!(!o.status.success(), "mapped {url} for tests: {}", text(&o));
    assert!(text(&o).contains(s(&r)), "{}", text(&o));
    assert!(!common::is_mounted(&mnt));
    let disk = format!("file://{}/d1", s(&r));
    let o = vdk_as(&d, "tests", &["open", &disk, "4M", "--attach", "none"]);
    assert!(!o.status.success(), "opened {disk} for tests: {}", text(&o));
    assert!(!r.join("d1").exists(), "root made a disk in R for tests");
    // Its own directory is fine.
    let mine = home.join("bucket");
    fs::create_dir(&mine).unwrap();
    chown(&mine, "tests");
    let o = vdk_as(
        &d,
        "tests",
        &[
            "open",
            &format!("file://{}/d2", s(&mine)),
            "4M",
            "--attach",
            "none",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn an_owner_names_no_root_only_file_or_local_endpoint_through_store_settings() {
    let (d, home) = owner_daemon("tests");
    let r = root_only(&d);
    let creds = r.join("secret.txt");
    let cases: [(&str, String, &str); 3] = [
        (
            "GOOGLE_APPLICATION_CREDENTIALS",
            s(&creds).to_owned(),
            "secret.txt",
        ),
        (
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "relative/token".to_owned(),
            "absolute path",
        ),
        (
            "AWS_ENDPOINT_URL",
            format!("file://{}", s(&r)),
            "http:// or https://",
        ),
    ];
    for (var, value, says) in cases {
        let o = common::as_user("tests", env!("CARGO_BIN_EXE_vdk"))
            .args(["fs", "map", "s3://bucket/p", s(&home.join("m"))])
            .env("VDK_SOCKET", &d.socket)
            .env(var, &value)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{var}={value}: {}", text(&o));
        assert!(text(&o).contains(says), "{var}: {}", text(&o));
    }
}

#[test]
fn a_drive_is_its_users_alone_unless_shared() {
    need_root();
    let d = Daemon::new();
    let bucket = d.path("bucket");
    fs::create_dir(&bucket).unwrap();
    fs::write(bucket.join("private.txt"), "root's data").unwrap();
    // Others must be able to reach the mount point for the test to mean anything.
    chmod(d.dir.path(), 0o755);
    let url = format!("file://{}", s(&bucket));
    let mnt = d.path("mnt");
    d.ok(&["fs", "map", &url, s(&mnt)]);
    let meta = fs::metadata(mnt.join("private.txt")).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    let o = as_user("nobody", "cat", &[s(&mnt.join("private.txt"))]);
    assert!(
        !o.status.success(),
        "nobody read root's drive: {}",
        text(&o)
    );
    d.ok(&["fs", "unmap", s(&mnt)]);
    // Shared on purpose: every user reads it.
    d.ok(&["fs", "map", &url, s(&mnt), "--allow-other"]);
    let o = as_user("nobody", "cat", &[s(&mnt.join("private.txt"))]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "root's data");
    d.ok(&["fs", "unmap", s(&mnt)]);
}

#[test]
fn an_owners_drive_is_the_owners_and_nobody_elses() {
    let (d, home) = owner_daemon("tests");
    chmod(&home, 0o755);
    let bucket = home.join("bucket");
    fs::create_dir(&bucket).unwrap();
    fs::write(bucket.join("f.txt"), "tests' data").unwrap();
    chown(&bucket, "tests");
    chown(&bucket.join("f.txt"), "tests");
    let mnt = home.join("mnt");
    let url = format!("file://{}", s(&bucket));
    let o = vdk_as(&d, "tests", &["fs", "map", &url, s(&mnt)]);
    assert!(o.status.success(), "{}", text(&o));
    let uid: u32 = stdout(Command::new("id").args(["-u", "tests"]))
        .trim()
        .parse()
        .unwrap();
    let meta = fs::metadata(mnt.join("f.txt")).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o600));
    let o = as_user("tests", "cat", &[s(&mnt.join("f.txt"))]);
    assert!(o.status.success(), "{}", text(&o));
    let o = as_user("nobody", "cat", &[s(&mnt.join("f.txt"))]);
    assert!(!o.status.success(), "nobody read tests' drive");
    let o = vdk_as(&d, "tests", &["fs", "unmap", s(&mnt)]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn an_owner_changes_only_what_it_opened() {
    let (d, home) = owner_daemon("tests");
    let roots = d.path("roots.img");
    let v = d.open(&[s(&roots), "8M", "--attach", "none"]);
    let id = v["id"].as_str().unwrap();
    let o = vdk_as(&d, "tests", &["list"]);
    assert!(
        !text(&o).contains(id),
        "tests sees root's disk: {}",
        text(&o)
    );
    for args in [vec!["close", id], vec!["stats", id]] {
        let o = vdk_as(&d, "tests", &args);
        assert!(
            !o.status.success() && text(&o).contains("opened by uid 0"),
            "{args:?}: {}",
            text(&o)
        );
    }
    // Its own disk, it closes.
    let mine = home.join("mine.img");
    let o = vdk_as(
        &d,
        "tests",
        &["open", s(&mine), "8M", "--attach", "none", "--json"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let theirs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let o = vdk_as(&d, "tests", &["close", theirs["id"].as_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    // Root manages everything.
    d.ok(&["close", id]);
}

#[test]
fn the_daemon_keeps_to_a_directory_of_its_own() {
    need_root();
    let base = tempfile::tempdir().unwrap();
    let daemon = |socket: &Path| -> Output {
        Command::new(env!("CARGO_BIN_EXE_vdk"))
            .args(["daemon", "--socket", s(socket)])
            .env("PATH", path_env())
            .output()
            .unwrap()
    };
    // /tmp (sticky, open to all): refused, and its mode is as it was.
    let tmp_mode = fs::metadata("/tmp").unwrap().mode();
    let o = daemon(Path::new("/tmp/vdk-attack-test.sock"));
    assert!(
        !o.status.success() && text(&o).contains("mode 1777"),
        "{}",
        text(&o)
    );
    assert_eq!(fs::metadata("/tmp").unwrap().mode(), tmp_mode);
    // A directory of root's open to others, one of another user's, a symbolic link.
    let wide = base.path().join("wide");
    fs::create_dir(&wide).unwrap();
    chmod(&wide, 0o755);
    let others = base.path().join("others");
    fs::create_dir(&others).unwrap();
    chmod(&others, 0o700);
    chown(&others, "nobody");
    let link = base.path().join("link");
    std::os::unix::fs::symlink(&wide, &link).unwrap();
    for (dir, says) in [
        (&wide, "mode 0755"),
        (&others, "belongs to uid 65534"),
        (&link, "symbolic link"),
    ] {
        let o = daemon(&dir.join("ctl.sock"));
        assert!(!o.status.success(), "{}: {}", dir.display(), text(&o));
        assert!(text(&o).contains(says), "{}: {}", dir.display(), text(&o));
    }
    assert_eq!(fs::metadata(&wide).unwrap().mode() & 0o7777, 0o755);
    assert_eq!(fs::metadata(&others).unwrap().mode() & 0o7777, 0o700);
    // Its log is not written through a link planted where it would be.
    let own = base.path().join("own");
    fs::create_dir(&own).unwrap();
    chmod(&own, 0o700);
    let target = base.path().join("target");
    fs::write(&target, "untouched").unwrap();
    std::os::unix::fs::symlink(&target, own.join("daemon.log")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_vdk"))
        .args(["daemon", "--socket", s(&own.join("ctl.sock")), "--log"])
        .arg(own.join("daemon.log"))
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    assert_eq!(fs::read_to_string(&target).unwrap(), "untouched");
    // A directory it makes is its own: 0700, or 0711 for a daemon serving another user.
    let d = Daemon::new();
    d.start(&[]);
    let m = fs::metadata(d.path("run")).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o700));
    let d = Daemon::new();
    chmod(d.dir.path(), 0o711);
    d.start(&["--owner", "tests"]);
    assert_eq!(fs::metadata(d.path("run")).unwrap().mode() & 0o7777, 0o711);
}

#[test]
fn object_store_metadata_that_overflows_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", s(&dir.path().join("disk")));
    stdout(Command::new(env!("CARGO_BIN_EXE_vdk")).args(["create", &url, "8M"]));
    let meta = dir.path().join("disk/vdk-disk.json");
    let text = fs::read_to_string(&meta).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let size = v["size"].as_u64().unwrap();
    fs::write(
        &meta,
        text.replace(&size.to_string(), &(u64::MAX - 511).to_string()),
    )
    .unwrap();
    for cmd in ["info", "serve"] {
        let o = Command::new(env!("CARGO_BIN_EXE_vdk"))
            .args([cmd, &url])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{cmd} took it: {err}");
        assert!(err.contains("2 EiB"), "{cmd}: {err}");
    }
}
