//! The ISO browser (`vdk fs mount`) against images made here by xorriso and genisoimage:
//! the mounted tree compared file by file (content, type, mode, owner, times, links, device
//! numbers) with the source tree and with what `xorriso -osirrox` extracts.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{need, need_root, run, Daemon};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every path under `root`, relative, sorted; `skip` names left out at the top.
fn walk(root: &Path, skip: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for e in fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name();
            if rel.as_os_str().is_empty() && skip.iter().any(|s| name == *s) {
                continue;
            }
            let p = rel.join(&name);
            if e.file_type().unwrap().is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Compares two trees entry by entry: names, types, contents, symlink targets, and with
/// `attrs` the modes, owners, modification times and device numbers too.
fn same_trees(a: &Path, b: &Path, skip: &[&str], attrs: bool) {
    let (la, lb) = (walk(a, skip), walk(b, skip));
    assert_eq!(la, lb, "the trees list different entries");
    for rel in &la {
        let (pa, pb) = (a.join(rel), b.join(rel));
        let (ma, mb) = (
            fs::symlink_metadata(&pa).unwrap(),
            fs::symlink_metadata(&pb).unwrap(),
        );
        let (ta, tb) = (ma.file_type(), mb.file_type());
        assert_eq!(
            (
                ta.is_dir(),
                ta.is_file(),
                ta.is_symlink(),
                ta.is_char_device(),
                ta.is_fifo()
            ),
            (
                tb.is_dir(),
                tb.is_file(),
                tb.is_symlink(),
                tb.is_char_device(),
                tb.is_fifo()
            ),
            "type of {}",
            rel.display()
        );
        if ta.is_file() {
            assert_eq!(ma.len(), mb.len(), "size of {}", rel.display());
            assert!(
                fs::read(&pa).unwrap() == fs::read(&pb).unwrap(),
                "content of {}",
                rel.display()
            );
        }
        if ta.is_symlink() {
            assert_eq!(fs::read_link(&pa).unwrap(), fs::read_link(&pb).unwrap());
        }
        if attrs {
            assert_eq!(ma.mode(), mb.mode(), "mode of {}", rel.display());
            assert_eq!(
                (ma.uid(), ma.gid()),
                (mb.uid(), mb.gid()),
                "owner of {}",
                rel.display()
            );
            if !ta.is_symlink() {
                assert_eq!(ma.mtime(), mb.mtime(), "mtime of {}", rel.display());
            }
            if ta.is_char_device() || ta.is_block_device() {
                assert_eq!(ma.rdev(), mb.rdev(), "device of {}", rel.display());
            }
        }
    }
}

/// A tree with what Rock Ridge keeps: deep directories, long and unicode names, symlinks,
/// hard links, modes, owners, times, and (as root) device nodes and a FIFO.
fn rich_tree(root: &Path) {
    fs::create_dir_all(root).unwrap();
    let mut deep = root.to_path_buf();
    for i in 0..12 {
        deep = deep.join(format!("level{i}"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("bottom.txt"), b"at the bottom\n").unwrap();
    fs::write(root.join("héllo wörld.txt"), "unicode and spaces\n").unwrap();
    fs::write(root.join("日本語のファイル名.txt"), "kanji\n").unwrap();
    fs::write(root.join("emoji 😀.bin"), common::pattern(70_000, 1)).unwrap();
    let long = "a-very-long-name-".repeat(11) + "end.txt";
    fs::write(root.join(&long), b"long").unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("data.bin"), common::pattern(1_234_567, 2)).unwrap();
    std::os::unix::fs::symlink("data.bin", root.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../nowhere/at/all", root.join("dangling")).unwrap();
    std::os::unix::fs::symlink("level0/level1", root.join("dir-link")).unwrap();
    fs::hard_link(root.join("data.bin"), root.join("hard-link.bin")).unwrap();
    fs::write(root.join("script.sh"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("script.sh"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(root.join("empty"), fs::Permissions::from_mode(0o600)).unwrap();
    run(Command::new("touch").args(["-d", "2001-02-03 04:05:06", s(&root.join("empty"))]));
    run(Command::new("chown").args(["1234:5678", s(&root.join("script.sh"))]));
    run(Command::new("mknod").args([s(&root.join("null-dev")), "c", "1", "3"]));
    run(Command::new("mkfifo").arg(root.join("pipe")));
}

fn xorriso_iso(tree: &Path, iso: &Path, extra: &[&str]) {
    need("xorriso");
    let mut args = vec!["-as", "mkisofs", "-quiet"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-V", "VDKFS", "-o", s(iso), s(tree)]);
    run(Command::new("xorriso").args(&args));
}

/// Extracts an image with xorriso's own reader (device files included).
fn xorriso_extract(iso: &Path, out: &Path) {
    run(Command::new("xorriso").args([
        "-osirrox",
        "on:device_files",
        "-indev",
        s(iso),
        "-extract",
        "/",
        s(out),
    ]));
}

fn mounted(d: &Daemon, source: &str, dir: &Path) -> serde_json::Value {
    d.json(&["fs", "mount", source, s(dir)])
}

#[test]
fn a_rock_ridge_image_reads_as_its_source_tree() {
    need_root();
    let d = Daemon::new();
    let tree = d.path("tree");
    rich_tree(&tree);
    let iso = d.path("rich.iso");
    xorriso_iso(
        &tree,
        &iso,
        &["-iso-level", "3", "-J", "-joliet-long", "-R", "--hardlinks"],
    );
    let mnt = d.path("mnt");
    let v = mounted(&d, s(&iso), &mnt);
    assert_eq!(v["names"], "rock-ridge");
    assert_eq!(v["label"], "VDKFS");
    same_trees(&tree, &mnt, &[], true);
    // Hard links share an inode and count each other.
    let (a, b) = (
        fs::metadata(mnt.join("data.bin")).unwrap(),
        fs::metadata(mnt.join("hard-link.bin")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
    // xorriso's own reading of the image agrees.
    let out = d.path("extracted");
    xorriso_extract(&iso, &out);
    same_trees(&out, &mnt, &[], false);
    // diff cannot compare a FIFO or a device with anything; same_trees did.
    run(Command::new("diff").args([
        "-r",
        "--no-dereference",
        "-x",
        "pipe",
        "-x",
        "null-dev",
        s(&out),
        s(&mnt),
    ]));
    // And xorriso compares the mount with the image it wrote: no differences.
    let cmp = Command::new("xorriso")
        .args(["-indev", s(&iso), "-compare_r", s(&mnt), "/"])
        .env("PATH", common::path_env())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&cmp.stderr).into_owned() + &String::from_utf8_lossy(&cmp.stdout);
    assert!(cmp.status.success(), "{text}");
    assert!(text.contains("Both file objects match"), "{text}");
    assert!(!text.contains("Differences detected"), "{text}");
}

#[test]
fn every_write_is_refused_with_erofs() {
    need_root();
    let d = Daemon::new();
    let tree = d.path("tree");
    fs::create_dir_all(tree.join("dir")).unwrap();
    fs::write(tree.join("file"), b"x").unwrap();
    let iso = d.path("ro.iso");
    xorriso_iso(&tree, &iso, &["-R"]);
    let mnt = d.path("mnt");
    mounted(&d, s(&iso), &mnt);
    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(30), "{what}: {e}"); // EROFS
    };
    erofs(fs::write(mnt.join("new"), b"x"), "create");
    erofs(
        fs::OpenOptions::new()
            .write(true)
            .open(mnt.join("file"))
            .map(drop),
        "open for writing",
    );
    erofs(fs::create_dir(mnt.join("newdir")), "mkdir");
    erofs(fs::remove_file(mnt.join("file")), "unlink");
    erofs(fs::remove_dir(mnt.join("dir")), "rmdir");
    erofs(fs::rename(mnt.join("file"), mnt.join("moved")), "rename");
    erofs(
        fs::set_permissions(mnt.join("file"), fs::Permissions::from_mode(0o777)),
        "chmod",
    );
    erofs(std::os::unix::fs::symlink("x", mnt.join("sym")), "symlink");
    erofs(fs::hard_link(mnt.join("file"), mnt.join("hl")), "link");
    assert_eq!(fs::read(mnt.join("file")).unwrap(), b"x");
}

#[test]
fn deep_directories_relocated_by_genisoimage_are_back_in_place() {
    need_root();
    need("genisoimage");
    let d = Daemon::new();
    let tree = d.path("tree");
    let mut p = tree.clone();
    for i in 1..=14 {
        p = p.join(format!("d{i}"));
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join(format!("f{i}.txt")), format!("level {i}\n")).unwrap();
    }
    let iso = d.path("deep.iso");
    run(Command::new("genisoimage").args(["-quiet", "-R", "-o", s(&iso), s(&tree)]));
    // genisoimage did relocate: its rr_moved is on the disc.
    let ls = common::stdout(Command::new("xorriso").args(["-indev", s(&iso), "-ls", "/"]));
    assert!(ls.contains("rr_moved"), "{ls}");
    let mnt = d.path("mnt");
    mounted(&d, s(&iso), &mnt);
    same_trees(&tree, &mnt, &[], false);
    assert!(
        !mnt.join("rr_moved").exists(),
        "the relocation directory is not shown"
    );
    let out = d.path("extracted");
    xorriso_extract(&iso, &out);
    same_trees(&out, &mnt, &["rr_moved"], false);
}

/// Rock Ridge symlink targets longer than one SL entry holds: genisoimage continues them over
/// several SL entries and into continuation areas (CE), where it writes an entry of more than
/// 255 bytes with its length byte wrapped; the mount reads each target back whole.
#[test]
fn long_symlink_targets_come_out_whole() {
    need_root();
    need("genisoimage");
    let d = Daemon::new();
    let tree = d.path("tree");
    fs::create_dir_all(&tree).unwrap();
    // (genisoimage 1.1.11 itself loops forever on some targets of this length, such as 20
    // components named "component-NN-xyz": these shapes are ones it writes.)
    let parts = |n: usize, first: char, width: usize| {
        (0..n)
            .map(|i| format!("{first}{i:02}{}", "x".repeat(width - 3)))
            .collect::<Vec<_>>()
            .join("/")
    };
    let many = parts(20, 'c', 16);
    let wide = format!("/{}/{}", "w".repeat(255), "v".repeat(200));
    let longest = parts(40, 'd', 24);
    let targets = [
        ("many", format!("../{many}")),
        ("wide", wide),
        ("longest", longest),
    ];
    assert!(targets[0].1.len() >= 300 && targets[2].1.len() > 900);
    for (name, target) in &targets {
        std::os::unix::fs::symlink(target, tree.join(name)).unwrap();
    }
    fs::write(tree.join("plain.txt"), b"beside them\n").unwrap();
    let iso = d.path("links.iso");
    // Bounded, should genisoimage loop as it can on long targets.
    run(Command::new("timeout").args([
        "120",
        "genisoimage",
        "-quiet",
        "-R",
        "-o",
        s(&iso),
        s(&tree),
    ]));
    let mnt = d.path("mnt");
    mounted(&d, s(&iso), &mnt);
    for (name, target) in &targets {
        let read = fs::read_link(mnt.join(name)).unwrap();
        assert_eq!(read.to_str().unwrap(), target, "{name}");
    }
    same_trees(&tree, &mnt, &[], false);
    // (xorriso 1.5.4's reader is no reference here: it cuts the first target short, where
    // genisoimage wrote its SL entry's length byte wrapped; vdk reads past that, susp.rs.)
    // xorriso's own images of the same links, continued its way, read whole too.
    let xiso = d.path("links-xorriso.iso");
    xorriso_iso(&tree, &xiso, &["-R"]);
    let xmnt = d.path("xmnt");
    mounted(&d, s(&xiso), &xmnt);
    same_trees(&tree, &xmnt, &[], false);
}

#[test]
fn a_file_over_4_gib_reads_whole_across_its_extents() {
    need_root();
    let d = Daemon::new();
    let tree = d.path("tree");
    fs::create_dir_all(&tree).unwrap();
    let big = tree.join("big.img");
    const SIZE: u64 = (4 << 30) + (300 << 20);
    let f = fs::File::create(&big).unwrap();
    f.set_len(SIZE).unwrap();
    // Markers at the start, across the 4 GiB extent boundary, and at the end.
    use std::os::unix::fs::FileExt;
    for (at, seed) in [(0u64, 1u8), ((4 << 30) - 1000, 2), (SIZE - 5000, 3)] {
        f.write_all_at(&common::pattern(3000, seed), at).unwrap();
    }
    drop(f);
    fs::write(tree.join("small.txt"), b"small\n").unwrap();
    let iso = d.path("big.iso");
    xorriso_iso(&tree, &iso, &["-iso-level", "3", "-R"]);
    // The image's zeroes need no disk space.
    run(Command::new("fallocate").args(["--dig-holes", s(&iso)]));
    let mnt = d.path("mnt");
    mounted(&d, s(&iso), &mnt);
    assert_eq!(fs::metadata(mnt.join("big.img")).unwrap().len(), SIZE);
    run(Command::new("cmp").args([s(&big), s(&mnt.join("big.img"))]));
    // Random reads at offsets past 4 GiB.
    let m = fs::File::open(mnt.join("big.img")).unwrap();
    let mut buf = vec![0u8; 3000];
    m.read_exact_at(&mut buf, (4 << 30) - 1000).unwrap();
    assert_eq!(buf, common::pattern(3000, 2));
    m.read_exact_at(&mut buf, SIZE - 5000).unwrap();
    assert_eq!(buf, common::pattern(3000, 3));
    assert_eq!(fs::read(mnt.join("small.txt")).unwrap(), b"small\n");
}

#[test]
fn el_torito_images_show_as_files() {
    need_root();
    let d = Daemon::new();
    let tree = d.path("tree");
    fs::create_dir_all(tree.join("boot")).unwrap();
    let bios = common::pattern(20 * 2048, 4);
    let efi = common::pattern(720 * 1024, 5);
    fs::write(tree.join("boot/bios.img"), &bios).unwrap();
    fs::write(tree.join("boot/efi.img"), &efi).unwrap();
    let iso = d.path("boot.iso");
    xorriso_iso(
        &tree,
        &iso,
        &[
            "-R",
            "-b",
            "boot/bios.img",
            "-no-emul-boot",
            "-boot-load-size",
            "4",
            "-c",
            "boot.cat",
            "-eltorito-alt-boot",
            "-e",
            "boot/efi.img",
            "-no-emul-boot",
        ],
    );
    let mnt = d.path("mnt");
    mounted(&d, s(&iso), &mnt);
    let boot = mnt.join("[BOOT]");
    let mut names: Vec<String> = fs::read_dir(&boot)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["boot-0-x86-noemul.img", "boot-1-efi-noemul.img"]);
    // The BIOS image is what its catalog entry loads: 4 sectors of 512 bytes.
    assert_eq!(fs::read(boot.join(&names[0])).unwrap(), &bios[..2048]);
    assert_eq!(fs::read(boot.join(&names[1])).unwrap(), efi);
    // The rest of the tree is the source tree, with the boot catalog xorriso added.
    assert!(mnt.join("boot.cat").is_file());
    same_trees(&tree, &mnt, &["[BOOT]", "boot.cat"], false);
}

#[test]
fn joliet_and_plain_iso9660_names() {
    need_root();
    let d = Daemon::new();
    let tree = d.path("tree");
    fs::create_dir_all(tree.join("Sub Dir")).unwrap();
    fs::write(tree.join("Mixed Case Ünïcode name.txt"), b"j").unwrap();
    fs::write(tree.join("Sub Dir/readme"), b"r").unwrap();
    // genisoimage, since xorriso always adds Rock Ridge.
    need("genisoimage");
    let genisoimage = |iso: &Path, extra: &[&str]| {
        let mut args = vec!["-quiet", "-V", "VDKFS", "-o", s(iso)];
        args.extend_from_slice(extra);
        args.push(s(&tree));
        run(Command::new("genisoimage").args(&args));
    };
    let joliet = d.path("joliet.iso");
    genisoimage(&joliet, &["-J", "-joliet-long"]);
    let mnt = d.path("j");
    let v = mounted(&d, s(&joliet), &mnt);
    assert_eq!(v["names"], "joliet");
    same_trees(&tree, &mnt, &[], false);
    let plain = d.path("plain.iso");
    genisoimage(&plain, &[]);
    let mnt = d.path("p");
    let v = mounted(&d, s(&plain), &mnt);
    assert_eq!(v["names"], "iso9660");
    let mut names: Vec<String> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    // ISO 9660 level 1 names, without their ";1".
    assert_eq!(names, ["MIXED_CA.TXT", "SUB_DIR"], "{names:?}");
    assert_eq!(fs::read(mnt.join("MIXED_CA.TXT")).unwrap(), b"j");
    assert_eq!(fs::read(mnt.join("SUB_DIR/README")).unwrap(), b"r");
}

#[test]
fn an_iso_inside_a_qcow2_image_or_an_open_disk_mounts_too() {
    need_root();
    need("qemu-img");
    let d = Daemon::new();
    let tree = d.path("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("inside.txt"), b"inside a qcow2\n").unwrap();
    let iso = d.path("disc.iso");
    xorriso_iso(&tree, &iso, &["-R"]);
    let qcow2 = d.path("disc.qcow2");
    run(Command::new("qemu-img").args(["convert", "-O", "qcow2", s(&iso), s(&qcow2)]));
    let m1 = d.path("m1");
    mounted(&d, s(&qcow2), &m1);
    same_trees(&tree, &m1, &[], false);
    // An open disk: its file system can be browsed while it stays open.
    let disk = d.open(&[s(&iso), "--attach", "none"]);
    let id = disk["id"].as_str().unwrap();
    let m2 = d.path("m2");
    let v = mounted(&d, id, &m2);
    assert_eq!(v["disk"], id);
    same_trees(&tree, &m2, &[], false);
    let list = d.json(&["fs", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    // A disk with a file system on it is not closed under it.
    let err = d.fails(&["close", id]);
    assert!(err.contains("vdk fs unmount"), "{err}");
    // A busy mount is refused; --force detaches it.
    let _cwd = fs::File::open(m2.join("inside.txt")).unwrap();
    let err = d.fails(&["fs", "unmount", s(&m2)]);
    assert!(err.contains("busy"), "{err}");
    d.ok(&["fs", "unmount", "--force", s(&m2)]);
    d.ok(&["close", id]);
    d.ok(&["fs", "unmount", s(&m1)]);
    assert!(!common::is_mounted(&m1));
}

#[test]
fn what_is_not_an_iso_is_refused_clearly() {
    need_root();
    let d = Daemon::new();
    let raw = d.path("zeros.img");
    common::sparse_file(&raw, 1 << 20);
    let err = d.fails(&["fs", "mount", s(&raw), s(&d.path("m"))]);
    assert!(err.contains("not an ISO 9660 image"), "{err}");
    // A real ISO cut short: its directories point past the end.
    let tree = d.path("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("x.bin"), common::pattern(400_000, 6)).unwrap();
    let iso = d.path("cut.iso");
    xorriso_iso(&tree, &iso, &["-R"]);
    let bytes = fs::read(&iso).unwrap();
    fs::write(&iso, &bytes[..18 * 2048]).unwrap();
    let err = d.fails(&["fs", "mount", s(&iso), s(&d.path("m"))]);
    assert!(err.contains("ISO 9660"), "{err}");
    let err = d.fails(&["fs", "mount", s(&d.path("missing.iso")), s(&d.path("m"))]);
    assert!(err.contains("missing.iso"), "{err}");
    // The daemon serves on.
    let v = d.request(r#"{"op":"fs_list"}"#);
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn zisofs_compressed_files_read_uncompressed() {
    need_root();
    let d = Daemon::new();
    let tree = d.path("tree");
    fs::create_dir_all(&tree).unwrap();
    let text: String = (0..60_000)
        .map(|i| format!("line {i} of compressible text\n"))
        .collect();
    fs::write(tree.join("text.txt"), &text).unwrap();
    fs::write(tree.join("random.bin"), common::pattern(200_000, 7)).unwrap();
    fs::write(tree.join("zeros.bin"), vec![0u8; 300_000]).unwrap();
    let iso = d.path("z.iso");
    need("xorriso");
    run(Command::new("xorriso").args([
        "-outdev",
        s(&iso),
        "-zisofs",
        "level=6:block_size=32k",
        "-map",
        s(&tree),
        "/",
        "-set_filter_r",
        "--zisofs",
        "/",
        "--",
    ]));
    // The image holds less than the files: they are compressed in it.
    assert!(fs::metadata(&iso).unwrap().len() < text.len() as u64);
    let mnt = d.path("mnt");
    mounted(&d, s(&iso), &mnt);
    same_trees(&tree, &mnt, &[], false);
    let out = d.path("extracted");
    xorriso_extract(&iso, &out);
    same_trees(&out, &mnt, &[], false);
}
