//! LUKS images with the real tools on both sides: QEMU's `luks` driver (qemu-img, qemu-io
//! with `--object secret`) writes images vdk serves and reads images vdk makes and writes;
//! cryptsetup makes LUKS2 images (Argon2id and PBKDF2, 4096- and 512-byte sectors) that vdk
//! serves, and what vdk writes is checked by decrypting the file with the volume key
//! cryptsetup dumps (AES-XTS from Python's cryptography, not vdk's code). Wrong keys,
//! missing keys and damaged headers are one-line errors.

mod common;

use std::path::Path;
use std::process::Command;

use common::{need, run, stdout, Daemon, Vdk};

const PASS: &str = "correct horse";

/// QEMU's view of a LUKS image: `--object secret` from `pass` and the luks driver.
fn qemu_io_luks(image: &Path, pass: &Path, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.arg("--object")
        .arg(format!("secret,id=s0,file={}", pass.display()))
        .arg("--image-opts");
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(format!(
        "driver=luks,key-secret=s0,file.filename={}",
        image.display()
    ));
    let out = stdout(&mut c);
    assert!(!out.contains("failed"), "qemu-io {cmds:?}: {out}");
    out
}

fn qemu_io_nbd(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = stdout(c.arg(uri));
    assert!(!out.contains("failed"), "qemu-io {cmds:?}: {out}");
}

fn pass_file(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("pass");
    std::fs::write(&p, PASS).unwrap();
    p
}

#[test]
fn qemu_and_vdk_read_what_the_other_wrote_both_ways() {
    need("qemu-img");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let pass = pass_file(dir.path());
    // QEMU makes and writes an image; vdk serves it.
    let q = dir.path().join("qemu.luks");
    run(Command::new("qemu-img")
        .arg("create")
        .arg("-q")
        .arg("--object")
        .arg(format!("secret,id=s0,file={}", pass.display()))
        .args(["-f", "luks", "-o", "key-secret=s0,iter-time=10"])
        .arg(&q)
        .arg("16M"));
    qemu_io_luks(&q, &pass, &["write -P 0x5a 0 1M", "write -P 0xa5 5M 64k"]);
    let vdk = Vdk::serve(&[q.to_str().unwrap(), "--key-file", pass.to_str().unwrap()]);
    let uri = vdk.uri("");
    qemu_io_nbd(
        &uri,
        &[
            "read -P 0x5a 0 1M",
            "read -P 0xa5 5M 64k",
            "write -P 0x3c 8M 2M",
            "flush",
        ],
    );
    drop(vdk);
    qemu_io_luks(&q, &pass, &["read -P 0x3c 8M 2M", "read -P 0x5a 0 1M"]);

    // vdk makes one (from the environment), QEMU and cryptsetup open it.
    let v = dir.path().join("vdk.luks");
    let out = stdout(
        common::admin::vdk(&["create", v.to_str().unwrap(), "8M", "--encrypt", "luks"])
            .args(["--key-secret", "VDK_TEST_PASS", "--iter-time", "10"])
            .env("VDK_TEST_PASS", PASS),
    );
    assert!(out.contains("luks"), "{out}");
    let info = stdout(Command::new("qemu-img").arg("info").arg(&v));
    assert!(
        info.contains("file format: luks") && info.contains("encrypted: yes"),
        "{info}"
    );
    qemu_io_luks(&v, &pass, &["write -P 0x11 1M 1M", "read -P 0x11 1M 1M"]);
    if Command::new("cryptsetup").arg("--version").output().is_ok() {
        let dump = stdout(Command::new("cryptsetup").arg("luksDump").arg(&v));
        assert!(dump.contains("Version:       \t1"), "{dump}");
        assert!(dump.contains("xts-plain64"), "{dump}");
    }
    // vdk's info, without a key.
    let j: serde_json::Value = serde_json::from_str(&stdout(&mut common::admin::vdk(&[
        "info",
        v.to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    assert_eq!(j["format"], "luks");
    assert_eq!(j["virtual-size"], 8 << 20);
    assert_eq!(j["encrypted"], true);

    // convert adds and removes encryption; qemu-img compare agrees with each step.
    let plain = dir.path().join("plain.img");
    common::sparse_file(&plain, 8 << 20);
    std::fs::write(dir.path().join("bytes"), common::pattern(3 << 20, 9)).unwrap();
    run(Command::new("dd")
        .arg(format!("if={}", dir.path().join("bytes").display()))
        .arg(format!("of={}", plain.display()))
        .args(["bs=1M", "seek=2", "conv=notrunc", "status=none"]));
    let enc = dir.path().join("enc.luks");
    let p = pass.to_str().unwrap();
    run(&mut common::admin::vdk(&[
        "convert",
        plain.to_str().unwrap(),
        enc.to_str().unwrap(),
        "-O",
        "luks",
        "--key-file",
        p,
        "--iter-time",
        "10",
    ]));
    run(Command::new("qemu-img")
        .arg("compare")
        .arg("--object")
        .arg(format!("secret,id=s0,file={p}"))
        .arg("--image-opts")
        .arg(format!("driver=raw,file.filename={}", plain.display()))
        .arg(format!(
            "driver=luks,key-secret=s0,file.filename={}",
            enc.display()
        )));
    let back = dir.path().join("back.img");
    run(&mut common::admin::vdk(&[
        "convert",
        enc.to_str().unwrap(),
        back.to_str().unwrap(),
        "--key-file",
        p,
    ]));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&plain)
        .arg(&back));
}

#[test]
fn wrong_missing_keys_and_damaged_headers_are_one_line_errors() {
    need("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let pass = pass_file(dir.path());
    let v = dir.path().join("e.luks");
    run(&mut common::admin::vdk(&[
        "create",
        v.to_str().unwrap(),
        "4M",
        "--encrypt",
        "luks",
        "--key-file",
        pass.to_str().unwrap(),
        "--iter-time",
        "10",
    ]));
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "horse correct").unwrap();
    let serve = |extra: &[&str]| {
        let mut a = vec!["serve", v.to_str().unwrap(), "--listen"];
        let sock = format!("unix://{}", dir.path().join("s.sock").display());
        a.push(&sock);
        a.extend_from_slice(extra);
        common::admin::one_line_error(&mut common::admin::vdk(&a))
    };
    let e = serve(&["--key-file", wrong.to_str().unwrap()]);
    assert!(e.contains("opens no key slot"), "{e}");
    // check reads the header without a key, and with one checks that it opens a slot.
    let img = v.to_str().unwrap();
    let p = pass.to_str().unwrap();
    let out = stdout(&mut common::admin::vdk(&["check", img]));
    assert!(
        out.contains("No errors were found in the LUKS1 header"),
        "{out}"
    );
    let out = stdout(&mut common::admin::vdk(&["check", img, "--key-file", p]));
    assert!(out.contains("No errors were found on the image"), "{out}");
    let e = common::admin::one_line_error(&mut common::admin::vdk(&[
        "check",
        img,
        "--key-file",
        wrong.to_str().unwrap(),
    ]));
    assert!(e.contains("opens no key slot"), "{e}");
    let out = stdout(&mut common::admin::vdk(&[
        "compare",
        img,
        img,
        "--key-file",
        p,
    ]));
    assert!(out.contains("identical"), "{out}");
    let e = serve(&[]);
    assert!(e.contains("--key-file"), "{e}");
    let e = common::admin::one_line_error(&mut common::admin::vdk(&[
        "create",
        dir.path().join("n.luks").to_str().unwrap(),
        "4M",
        "--encrypt",
        "luks",
    ]));
    assert!(e.contains("needs a passphrase"), "{e}");
    // A truncated header.
    let good = std::fs::read(&v).unwrap();
    std::fs::write(&v, &good[..200]).unwrap();
    let e = serve(&["--key-file", pass.to_str().unwrap(), "-f", "luks"]);
    assert!(e.contains("no LUKS header"), "{e}");
    // A header naming a cipher vdk does not serve.
    let mut b = good.clone();
    b[8..11].copy_from_slice(b"twf");
    std::fs::write(&v, &b).unwrap();
    let e = serve(&["--key-file", pass.to_str().unwrap()]);
    assert!(e.contains("not supported"), "{e}");
}

/// The volume key of a LUKS image, as cryptsetup dumps it (hex).
fn volume_key(image: &Path, pass: &Path) -> String {
    let out = stdout(
        Command::new("cryptsetup")
            .args(["luksDump", "--dump-volume-key", "-q", "--key-file"])
            .arg(pass)
            .arg(image),
    );
    let at = out.find("MK dump:").expect("a key dump");
    out[at + 8..]
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(128)
        .collect()
}

/// Decrypts `len` bytes of the data of `image` at plaintext `offset` (sector-aligned), with
/// AES-XTS from Python's cryptography and the volume key `key`.
fn decrypt(image: &Path, key: &str, payload: u64, sector: u64, offset: u64, len: u64) -> Vec<u8> {
    let script = format!(
        r#"
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
key = bytes.fromhex("{key}")
out = b""
with open(sys.argv[1], "rb") as f:
    for n in range({first}, {end}):
        f.seek({payload} + n * {sector})
        c = Cipher(algorithms.AES(key), modes.XTS(n.to_bytes(16, "little"))).decryptor()
        out += c.update(f.read({sector})) + c.finalize()
sys.stdout.buffer.write(out)
"#,
        first = offset / sector,
        end = (offset + len) / sector,
    );
    let out = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .arg(image)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python3 (python3-cryptography): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn cryptsetup_luks2_images_serve_their_plaintext() {
    need("cryptsetup");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let pass = pass_file(dir.path());
    for (name, extra, sector) in [
        (
            "argon2id-4k.luks",
            &[
                "--pbkdf",
                "argon2id",
                "--pbkdf-memory",
                "64",
                "--pbkdf-parallel",
                "1",
            ][..],
            4096u64,
        ),
        (
            "pbkdf2-512.luks",
            &[
                "--pbkdf",
                "pbkdf2",
                "--hash",
                "sha512",
                "--sector-size",
                "512",
            ][..],
            512,
        ),
    ] {
        let image = dir.path().join(name);
        common::sparse_file(&image, 24 << 20);
        run(Command::new("cryptsetup")
            .args(["luksFormat", "-q", "--type", "luks2", "--iter-time", "10"])
            .args(extra)
            .arg("--key-file")
            .arg(&pass)
            .arg(&image));
        // The key from a file (the daemon reads it), or from the environment (the value
        // travels in the request).
        let d = Daemon::new();
        let key: [&str; 2] = if sector == 4096 {
            ["--key-file", pass.to_str().unwrap()]
        } else {
            ["--key-secret", "VDK_TEST_PASS"]
        };
        let opened = stdout(
            d.cmd(&[
                "open",
                image.to_str().unwrap(),
                "--attach",
                "none",
                "--json",
            ])
            .args(key)
            .env("VDK_TEST_PASS", PASS),
        );
        let v: serde_json::Value = serde_json::from_str(&opened).unwrap();
        assert!(!d.log().contains(PASS), "the passphrase is never logged");
        assert_eq!(v["format"], "luks", "{v}");
        assert_eq!(v["size"], 8 << 20, "{name}: 24 MiB less the 16 MiB header");
        let uri = v["nbd"][0].as_str().unwrap();
        qemu_io_nbd(uri, &["write -P 0x77 64k 128k", "flush"]);
        qemu_io_nbd(uri, &["read -P 0x77 64k 128k"]);
        d.ok(&["close", v["id"].as_str().unwrap()]);
        let key = volume_key(&image, &pass);
        let plain = decrypt(&image, &key, 16 << 20, sector, 64 << 10, 128 << 10);
        assert!(
            plain.len() == 128 << 10 && plain.iter().all(|b| *b == 0x77),
            "{name}: the file decrypts to what was written"
        );
    }
    // A damaged primary header: the secondary copy still opens; both damaged, a clear error.
    let image = dir.path().join("pbkdf2-512.luks");
    let mut b = std::fs::read(&image).unwrap();
    b[4096 + 10] ^= 0x20;
    std::fs::write(&image, &b).unwrap();
    let open = |d: &Daemon| {
        d.cmd(&["open", image.to_str().unwrap(), "--attach", "none"])
            .args(["--key-file", pass.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let d = Daemon::new();
    assert!(
        open(&d).status.success(),
        "opened from the secondary header"
    );
    d.ok(&["close", image.to_str().unwrap()]);
    b[16384 + 4096 + 10] ^= 0x20;
    std::fs::write(&image, &b).unwrap();
    let out = open(&d);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("checksum mismatch"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// qemu-io's image options for an encrypted qcow2 image with the secret `s0`.
fn qcow2_opts(image: &Path) -> String {
    format!(
        "driver=qcow2,encrypt.key-secret=s0,file.filename={}",
        image.display()
    )
}

/// qemu-io's `cmds` on the encrypted qcow2 `image` whose passphrase is in `pass`.
fn qemu_io_qcow2(image: &Path, pass: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.arg("--object")
        .arg(format!("secret,id=s0,file={}", pass.display()))
        .arg("--image-opts");
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = stdout(c.arg(qcow2_opts(image)));
    assert!(!out.contains("failed"), "qemu-io {cmds:?}: {out}");
}

/// `qemu-img create` of a 16 MiB qcow2 image at `image` encrypted with LUKS, its passphrase in
/// `pass` (a quick key slot).
fn qemu_makes_encrypted_qcow2(image: &Path, pass: &Path) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "--object"])
        .arg(format!("secret,id=s0,file={}", pass.display()))
        .args(["-f", "qcow2", "-o"])
        .arg("encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10")
        .arg(image)
        .arg("16M"));
}

/// `qemu-img check` (given the key) and `vdk check` (which needs none) find no error.
fn qcow2_checks(image: &Path, pass: &Path) {
    let out = stdout(
        Command::new("qemu-img")
            .args(["check", "--object"])
            .arg(format!("secret,id=s0,file={}", pass.display()))
            .arg("--image-opts")
            .arg(qcow2_opts(image)),
    );
    assert!(out.contains("No errors were found"), "{out}");
    let out = stdout(&mut common::admin::vdk(&["check", image.to_str().unwrap()]));
    assert!(out.contains("No errors were found"), "{out}");
}

/// `vdk serve IMAGE` without its key is a one-line error naming --key-file (its socket in
/// `dir`).
fn serving_needs_the_key(dir: &Path, image: &Path) {
    let sock = format!("unix://{}", dir.join("x.sock").display());
    let err = common::admin::one_line_error(&mut common::admin::vdk(&[
        "serve",
        image.to_str().unwrap(),
        "--listen",
        &sock,
    ]));
    assert!(err.contains("--key-file"), "{err}");
}

/// Internal snapshots and resizing change only an encrypted image's tables: vdk does both
/// without its key (qemu-img wants it only because it opens the whole image), and QEMU, given
/// the key, reads the data as each step left it. Data itself still needs the key.
#[test]
fn an_encrypted_qcow2_takes_snapshots_and_resizes_without_its_key() {
    need("qemu-img");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let pass = pass_file(dir.path());
    let q = dir.path().join("q.qcow2");
    let i = q.to_str().unwrap();
    qemu_makes_encrypted_qcow2(&q, &pass);
    qemu_io_qcow2(&q, &pass, &["write -P 0x5a 0 1M"]);
    let vdk_says = |args: &[&str]| stdout(&mut common::admin::vdk(args));
    assert!(vdk_says(&["snapshot", "-c", "before", i]).contains("taken"));
    qemu_io_qcow2(&q, &pass, &["write -P 0x5b 0 64k"]);
    assert!(vdk_says(&["resize", i, "32M"]).contains("to 32 MiB"));
    qcow2_checks(&q, &pass);
    qemu_io_qcow2(&q, &pass, &["read -P 0x5b 0 64k", "read -P 0 16M 16M"]);
    assert!(vdk_says(&["snapshot", "-a", "before", i]).contains("(16 MiB, was 32 MiB)"));
    qemu_io_qcow2(&q, &pass, &["read -P 0x5a 0 1M"]);
    assert!(vdk_says(&["snapshot", "-d", "before", i]).contains("deleted"));
    qcow2_checks(&q, &pass);
    qemu_io_qcow2(&q, &pass, &["read -P 0x5a 0 1M"]);
    // Serving it still needs the key.
    serving_needs_the_key(dir.path(), &q);
}

#[test]
fn qcow2_encrypted_with_luks_reads_and_writes_as_qemu_does() {
    need("qemu-img");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let pass = pass_file(dir.path());
    let secret = format!("secret,id=s0,file={}", pass.display());
    let qemu_io = |image: &Path, cmds: &[&str]| qemu_io_qcow2(image, &pass, cmds);
    let qemu_img_checks = |image: &Path| qcow2_checks(image, &pass);
    // QEMU makes and writes one; vdk serves it, with the same writes, zeroes and discards
    // going to a raw mirror.
    let q = dir.path().join("q.qcow2");
    qemu_makes_encrypted_qcow2(&q, &pass);
    qemu_io(&q, &["write -P 0x5a 0 1M", "write -P 0x66 3M 4k"]);
    let mirror = dir.path().join("mirror.img");
    common::sparse_file(&mirror, 16 << 20);
    qemu_io_nbd(
        &format!("file:{}", mirror.display()),
        &["write -P 0x5a 0 1M", "write -P 0x66 3M 4k"],
    );
    let ops = [
        "write -P 0x21 6M 100k",
        "write -P 0x22 8200k 4k",
        "write -P 0x23 65024 1536",
        "write -z 512k 64k",
        "discard 3M 64k",
        "write -P 0x24 131584 200k",
        "write -z 10M 1M",
        "write -P 0x25 15M 1M",
    ];
    {
        let vdk = Vdk::serve(&[q.to_str().unwrap(), "--key-file", pass.to_str().unwrap()]);
        qemu_io_nbd(&vdk.uri(""), &ops);
        qemu_io_nbd(&vdk.uri(""), &["read -P 0x21 6M 100k", "read -P 0 5M 64k"]);
    }
    qemu_io_nbd(&format!("file:{}", mirror.display()), &ops);
    run(Command::new("qemu-img")
        .args(["compare", "--object", &secret, "--image-opts"])
        .arg(format!("driver=raw,file.filename={}", mirror.display()))
        .arg(qcow2_opts(&q)));
    qemu_img_checks(&q);

    // vdk makes one (key from the environment); QEMU writes it; vdk reads it.
    let v = dir.path().join("v.qcow2");
    run(
        common::admin::vdk(&["create", v.to_str().unwrap(), "8M", "--encrypt", "luks"])
            .args(["--key-secret", "VDK_TEST_PASS", "--iter-time", "10"])
            .env("VDK_TEST_PASS", PASS),
    );
    let info = stdout(Command::new("qemu-img").arg("info").arg(&v));
    assert!(
        info.contains("encrypted: yes") && info.contains("format: luks"),
        "{info}"
    );
    let j: serde_json::Value = serde_json::from_str(&stdout(&mut common::admin::vdk(&[
        "info",
        v.to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    assert_eq!(
        j["format-specific"]["data"]["encrypt"]["format"], "luks",
        "{j}"
    );
    qemu_io(&v, &["write -P 0x77 1M 1M"]);
    let vdk = Vdk::serve(&[v.to_str().unwrap(), "--key-file", pass.to_str().unwrap()]);
    qemu_io_nbd(&vdk.uri(""), &["read -P 0x77 1M 1M", "read -P 0 0 1M"]);
    drop(vdk);
    qemu_img_checks(&v);
    // On disk the data is not in the clear.
    let raw = std::fs::read(&v).unwrap();
    assert!(
        !raw.windows(4096).any(|w| w.iter().all(|b| *b == 0x77)),
        "no 4 KiB of plaintext in the file"
    );

    // convert --encrypt makes one from a plain image, identical to it.
    let e = dir.path().join("e.qcow2");
    run(&mut common::admin::vdk(&[
        "convert",
        mirror.to_str().unwrap(),
        e.to_str().unwrap(),
        "--encrypt",
        "--key-file",
        pass.to_str().unwrap(),
        "--iter-time",
        "10",
    ]));
    run(Command::new("qemu-img")
        .args(["compare", "--object", &secret, "--image-opts"])
        .arg(format!("driver=raw,file.filename={}", mirror.display()))
        .arg(qcow2_opts(&e)));
    // Without the key: a one-line error.
    serving_needs_the_key(dir.path(), &e);
}

/// Runs `vdk ARGS` on a pseudo-terminal (util-linux's `script`), typing each of `typed` as a
/// line once vdk has had time to prompt; returns the exit status and what the terminal showed.
fn on_terminal(d: &Daemon, args: &[&str], typed: &[&str]) -> (bool, String) {
    use std::io::Write;
    let line = std::iter::once(env!("CARGO_BIN_EXE_vdk").to_owned())
        .chain(args.iter().map(|a| format!("'{a}'")))
        .collect::<Vec<_>>()
        .join(" ");
    let mut script = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("VDK_SOCKET", &d.socket)
        .env("PATH", common::path_env())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run script (bsdutils)");
    let mut input = script.stdin.take().unwrap();
    for t in typed {
        std::thread::sleep(std::time::Duration::from_millis(500));
        writeln!(input, "{t}").unwrap();
    }
    drop(input);
    let out = script.wait_with_output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success(), shown)
}

/// With no --key-file or --key-secret, a terminal is asked for the passphrase (echo off), as
/// cryptsetup asks: twice for a new image, once to open one; never when stdin is no terminal.
#[test]
fn a_passphrase_is_typed_at_a_prompt_on_a_terminal() {
    need("script");
    need("qemu-io");
    let d = Daemon::new();
    let img = d.path("typed.luks");
    let path = img.to_str().unwrap();
    let (ok, shown) = on_terminal(
        &d,
        &["create", "--encrypt", "luks", path, "16M"],
        &[PASS, "other"],
    );
    assert!(!ok && shown.contains("differ"), "{shown}");
    assert!(!img.exists());
    let (ok, shown) = on_terminal(
        &d,
        &["create", "--encrypt", "luks", path, "16M"],
        &[PASS, PASS],
    );
    assert!(ok && shown.contains("New passphrase:"), "{shown}");
    assert!(!shown.contains(PASS), "the passphrase was echoed: {shown}");
    // QEMU opens it with the passphrase typed.
    let pass = pass_file(d.dir.path());
    qemu_io_luks(&img, &pass, &["write -P 0x5c 0 64k"]);
    // A wrong one is refused; the right one opens it (compare, and a daemon disk).
    let (ok, shown) = on_terminal(&d, &["compare", path, path], &["wrong"]);
    assert!(!ok && shown.contains("wrong key"), "{shown}");
    let (ok, shown) = on_terminal(&d, &["compare", path, path], &[PASS]);
    assert!(ok && shown.contains("Passphrase for"), "{shown}");
    // Without a terminal nothing is asked: the usual one-line error.
    let e = d.fails(&["compare", path, path]);
    assert!(e.contains("--key-file"), "{e}");
    let (ok, shown) = on_terminal(&d, &["open", path, "--attach", "none", "--json"], &[PASS]);
    assert!(ok, "{shown}");
    let v: serde_json::Value = d.json(&["list"]);
    let uri = v[0]["nbd"][0].as_str().unwrap().to_owned();
    let back =
        stdout(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0x5c 0 64k"]));
    assert!(
        !back.contains("failed") && !back.contains("Pattern verification"),
        "{back}"
    );
}
