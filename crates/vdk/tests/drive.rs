//! The cloud drive (`vdk fs map`) against real S3-protocol servers on loopback (moto_server
//! and s3s-fs, installed by scripts/install-test-deps.sh): a tree copied in comes back from
//! an empty cache, big files are read in ranges, rename/delete/mkdir/rmdir act on the objects,
//! and pjdfstest's results are the ones recorded in docs/pjdfstest-drive.md.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::s3::{BUCKET, S3};
use common::{is_mounted, need, need_root, pattern, run, stdout, Daemon};

const MIB: u64 = 1 << 20;

/// `vdk ARGS --json` against the daemon, reaching the server.
fn vdk_json(d: &Daemon, s3: &S3, args: &[&str]) -> serde_json::Value {
    let mut c = d.cmd(args);
    c.envs(s3.env()).arg("--json");
    serde_json::from_str(&stdout(&mut c)).expect("JSON")
}

fn map(d: &Daemon, s3: &S3, url: &str, dir: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["fs", "map", url, dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let st = vdk_json(d, s3, &args);
    assert!(is_mounted(dir), "{st}");
    st
}

fn unmap(d: &Daemon, s3: &S3, dir: &Path) {
    vdk_json(d, s3, &["fs", "unmap", dir.to_str().unwrap()]);
    assert!(!is_mounted(dir));
}

/// A tree with nested, empty and oddly named folders, small files and one large enough for a
/// multipart upload.
fn make_tree(root: &Path) {
    let dirs = [
        "a/b/c",
        "empty",
        "with space/ünïcødé ñame",
        "日本語/deep/er",
    ];
    for d in dirs {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let files: [(&str, usize); 7] = [
        ("a/small", 3000),
        ("a/b/c/zero-length", 0),
        ("a/b/big", (20 * MIB) as usize),
        ("with space/file with spaces.txt", 17),
        ("with space/ünïcødé ñame/ça va?.bin", 70_000),
        ("日本語/deep/er/ファイル", 4096),
        ("top #1 & [x]", 5),
    ];
    for (i, (name, len)) in files.iter().enumerate() {
        std::fs::write(root.join(name), pattern(*len, i as u8 + 1)).unwrap();
    }
}

fn diff(a: &Path, b: &Path) {
    let out = Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(a)
        .arg(b)
        .output()
        .expect("run diff");
    assert!(
        out.status.success(),
        "{} and {} differ:\n{}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_tree_copied_in_comes_back_identical_from_an_empty_cache() {
    need_root();
    need("diff");
    for s3 in [S3::moto(), S3::s3s_fs()] {
        let d = Daemon::new();
        let src = d.path("src");
        make_tree(&src);
        let url = format!("s3://{BUCKET}/drive");
        let m1 = d.path("m1");
        let st = map(&d, &s3, &url, &m1, &[]);
        // No label given: a UUID, and the cache under the daemon's directory.
        let label = st["label"].as_str().unwrap().to_owned();
        assert_eq!(label.len(), 36, "{st}");
        assert_eq!(label.matches('-').count(), 4, "{st}");
        let cache = PathBuf::from(st["cache"].as_str().unwrap());
        assert!(cache.ends_with(format!("drives/{label}")), "{st}");
        assert!(cache.starts_with(d.dir.path()), "{st}");
        run(Command::new("cp").arg("-r").arg(src.join(".")).arg(&m1));
        diff(&src, &m1);
        // Listed by `vdk fs list` and `vdk list`.
        let list = vdk_json(&d, &s3, &["fs", "list"]);
        assert_eq!(list[0]["kind"], "cloud-drive", "{list}");
        assert_eq!(list[0]["label"], label.as_str(), "{list}");
        let table = stdout(d.cmd(&["list"]).envs(s3.env()));
        assert!(table.contains(&url) && table.contains(&label), "{table}");
        unmap(&d, &s3, &m1);
        if s3.kind == common::s3::Kind::S3sFs {
            // The objects are the files, under their own names.
            let obj = s3.object_file("drive/with space/ünïcødé ñame/ça va?.bin");
            assert_eq!(std::fs::read(&obj).unwrap(), pattern(70_000, 5));
            assert!(s3.object_file("drive/empty/.vdkdir").exists());
        }
        // Again, labelled, with an empty cache of its own.
        let m2 = d.path("m2");
        let c2 = d.path("cache2");
        let st = map(
            &d,
            &s3,
            &url,
            &m2,
            &["--label", "again", "--cache", c2.to_str().unwrap()],
        );
        assert_eq!(st["label"], "again");
        assert_eq!(
            std::fs::read_dir(c2.join("files")).unwrap().count(),
            0,
            "the cache starts empty"
        );
        diff(&src, &m2);
        // A second drive with the same label is refused.
        let err = d.fails(&[
            "fs",
            "map",
            &url,
            d.path("m3").to_str().unwrap(),
            "--label",
            "again",
        ]);
        assert!(err.contains("label"), "{err}");

        // Renames, deletes, folders, appends and truncation, as a user does them.
        std::fs::rename(m2.join("a"), m2.join("a renamed")).unwrap();
        std::fs::rename(src.join("a"), src.join("a renamed")).unwrap();
        std::fs::rename(m2.join("top #1 & [x]"), m2.join("日本語/moved")).unwrap();
        std::fs::rename(src.join("top #1 & [x]"), src.join("日本語/moved")).unwrap();
        let e = std::fs::remove_dir(m2.join("with space")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(39), "rmdir of a full folder: {e}"); // ENOTEMPTY
        std::fs::remove_file(m2.join("with space/file with spaces.txt")).unwrap();
        std::fs::remove_file(src.join("with space/file with spaces.txt")).unwrap();
        std::fs::remove_dir(m2.join("empty")).unwrap();
        std::fs::remove_dir(src.join("empty")).unwrap();
        std::fs::create_dir(m2.join("new folder")).unwrap();
        std::fs::create_dir(src.join("new folder")).unwrap();
        for root in [&m2, &src] {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(root.join("a renamed/small"))
                .unwrap();
            f.write_all(b"appended").unwrap();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(root.join("a renamed/b/big"))
                .unwrap();
            f.set_len(9 * MIB + 5).unwrap();
            f.write_all_at(b"patched", 3 * MIB).unwrap();
            f.sync_all().unwrap();
        }
        diff(&src, &m2);
        unmap(&d, &s3, &m2);
        let m4 = d.path("m4");
        map(&d, &s3, &url, &m4, &["--label", "third"]);
        diff(&src, &m4);
        unmap(&d, &s3, &m4);
    }
}

#[test]
fn a_file_over_a_gibibyte_is_read_in_ranges_at_random_offsets() {
    need_root();
    let s3 = S3::s3s_fs();
    let d = Daemon::new();
    let url = format!("s3://{BUCKET}/big");
    let m1 = d.path("m1");
    map(&d, &s3, &url, &m1, &["--label", "writer"]);
    let size = 1100 * MIB + 12345;
    let offsets: Vec<u64> = (0..40u64)
        .map(|i| (i * 2_654_435_761 * 4099) % (size - 65536))
        .collect();
    {
        let f = std::fs::File::create(m1.join("huge.img")).unwrap();
        f.set_len(size).unwrap();
        for (i, off) in offsets.iter().enumerate() {
            f.write_all_at(&pattern(4096, i as u8), *off).unwrap();
        }
        f.write_all_at(b"the end", size - 7).unwrap();
    }
    unmap(&d, &s3, &m1);
    assert_eq!(
        std::fs::metadata(s3.object_file("big/huge.img"))
            .unwrap()
            .len(),
        size
    );
    let m2 = d.path("m2");
    let c2 = d.path("c2");
    map(
        &d,
        &s3,
        &url,
        &m2,
        &["--label", "reader", "--cache", c2.to_str().unwrap()],
    );
    let f = std::fs::File::open(m2.join("huge.img")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    // In another order than written, each checked with the bytes around it.
    for (i, off) in offsets.iter().enumerate().rev() {
        let mut buf = vec![0; 4096];
        f.read_exact_at(&mut buf, *off).unwrap();
        let later_overlap = offsets
            .iter()
            .enumerate()
            .any(|(j, o)| j > i && o.abs_diff(*off) < 4096);
        if !later_overlap {
            assert!(buf == pattern(4096, i as u8), "bytes at {off}");
        }
    }
    let mut end = [0; 7];
    f.read_exact_at(&mut end, size - 7).unwrap();
    assert_eq!(&end, b"the end");
    drop(f);
    // Only what was read came down: the cache holds far less than the file.
    let du = stdout(Command::new("du").args(["-s", "--block-size=1M"]).arg(&c2));
    let cached: u64 = du.split_whitespace().next().unwrap().parse().unwrap();
    assert!(cached < 300, "{cached} MiB cached for 41 reads of 4 KiB");
    unmap(&d, &s3, &m2);
}

/// The names of the failing tests in pjdfstest's output.
fn failures(out: &str) -> BTreeSet<String> {
    out.lines()
        .filter(|l| l.trim_end().ends_with("FAILED"))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The failures docs/pjdfstest-drive.md explains, one per line in its `expected` block.
fn expected_failures() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/pjdfstest-drive.md"),
    )
    .expect("docs/pjdfstest-drive.md");
    let block = doc
        .split("```expected\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("an ```expected block in docs/pjdfstest-drive.md");
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn pjdfstest_fails_only_where_the_readme_says_the_drive_is_not_posix() {
    need_root();
    let tool = common::s3::tools_dir().join("bin/pjdfstest");
    assert!(
        tool.exists(),
        "pjdfstest is missing: run scripts/install-test-deps.sh (cargo install pjdfstest)"
    );
    // moto: s3s-fs keeps objects as files, and names of 255 bytes plus its own suffixes are
    // more than its file system takes (it answers 500 to those uploads).
    let s3 = S3::moto();
    let d = Daemon::new();
    let m = d.path("m");
    map(
        &d,
        &s3,
        &format!("s3://{BUCKET}/pjd"),
        &m,
        // The suite runs as other users too: the drive must be theirs to reach.
        &["--label", "pjd", "--allow-other"],
    );
    let conf = d.path("pjdfstest.toml");
    std::fs::write(
        &conf,
        "[features]\n[settings]\nnaptime = 0.001\nallow_remount = false\n\
         [dummy_auth]\nentries = [[\"nobody\", \"nogroup\"], [\"tests\", \"tests\"]]\n",
    )
    .unwrap();
    let work = m.join("work");
    std::fs::create_dir(&work).unwrap();
    let out = Command::new(&tool)
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(&work)
        .output()
        .expect("run pjdfstest");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let summary = text
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or_else(|| panic!("pjdfstest printed no summary:\n{text}"));
    let got = failures(&text);
    let want = expected_failures();
    let new: Vec<_> = got.difference(&want).collect();
    let fixed: Vec<_> = want.difference(&got).collect();
    assert!(
        new.is_empty(),
        "{summary}\nfailing and not explained in docs/pjdfstest-drive.md: {new:#?}"
    );
    if !fixed.is_empty() {
        eprintln!("explained in docs/pjdfstest-drive.md but passing now: {fixed:#?}");
    }
    // The suite ran: most of what the drive claims passed.
    assert!(got.len() + 100 < 398, "{summary}");
    unmap(&d, &s3, &m);
}

#[test]
fn keys_no_file_system_can_show_hide_nothing_else() {
    need_root();
    let s3 = S3::moto();
    let d = Daemon::new();
    let put = |key: &str| s3.put_unsigned(&format!("/{BUCKET}/odd/{key}"), b"hi");
    put("good.txt");
    put("a/%2E%2E/b"); // a/../b
    put("a/fine");
    put("x//y"); // an empty segment
    put("ctl%01name"); // a control character
    put(&"n".repeat(300)); // longer than a name may be
    put("sub/file");
    put("sub"); // an object beside the folder of its name
    put("z%20(object)"); // a name the drive keeps for itself
    let mnt = d.path("mnt");
    map(&d, &s3, &s3.url("odd"), &mnt, &[]);
    let names = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let top = names(&mnt);
    let want: BTreeSet<String> = ["a", "good.txt", "sub", "sub (object)", "x"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(top, want);
    // The folder holding `..` lists what else it holds; the one with `//` lists empty.
    assert_eq!(names(&mnt.join("a")), BTreeSet::from(["fine".to_owned()]));
    assert!(names(&mnt.join("x")).is_empty());
    assert_eq!(std::fs::read(mnt.join("sub (object)")).unwrap(), b"hi");
    assert_eq!(std::fs::read(mnt.join("sub/file")).unwrap(), b"hi");
    // Names the drive keeps for itself cannot be made.
    assert!(std::fs::write(mnt.join("new (object)"), b"x").is_err());
    unmap(&d, &s3, &mnt);
    let log = d.log();
    for key in [
        "odd/a/../",
        "odd/x//",
        "u{1}name",
        "z (object)",
        "nnnnnnnnnn",
    ] {
        assert!(log.contains(key), "{key} is not in the log:\n{log}");
    }
    assert_eq!(
        log.matches("odd/a/../").count(),
        1,
        "said once, though listed twice:\n{log}"
    );
}
