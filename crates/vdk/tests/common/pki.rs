//! Test certificates made with the `openssl` command: a CA, a server certificate for
//! localhost/127.0.0.1 and client certificates, laid out as nbdkit, libnbd and qemu read them
//! (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{need, run};

fn openssl(dir: &Path, args: &[&str]) {
    run(Command::new("openssl").args(args).current_dir(dir));
}

/// openssl's arguments for a new P-256 key, unencrypted.
const NEW_KEY: &[&str] = &[
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

/// A new P-256 key in `key` and a request for `subject` in `csr`.
fn request(dir: &Path, key: &str, csr: &str, subject: &str) {
    openssl(
        dir,
        &[
            &["req"],
            NEW_KEY,
            &["-keyout", key, "-out", csr, "-subj", subject],
        ]
        .concat(),
    );
}

/// Signs `csr` with the CA in `ca` into `out`, with the extensions in `ext`.
fn sign(dir: &Path, ca: &Path, csr: &str, out: &str, ext: &str) {
    std::fs::write(dir.join("ext.cnf"), ext).expect("write extensions");
    let ca_cert = ca.join("ca-cert.pem");
    let ca_key = ca.join("ca-key.pem");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca_cert.to_str().expect("utf-8 path"),
            "-CAkey",
            ca_key.to_str().expect("utf-8 path"),
            "-CAcreateserial",
            "-out",
            out,
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

/// Makes `dir` a full PKI: a CA named `ca_name`, a server certificate for localhost and
/// 127.0.0.1, and a client certificate with common name `client` (DNS name
/// `client.example`). Returns `dir`.
pub fn make(dir: &Path, ca_name: &str, client: &str) -> PathBuf {
    need("openssl");
    std::fs::create_dir_all(dir).expect("pki dir");
    openssl(
        dir,
        &[
            &["req", "-x509"],
            NEW_KEY,
            &[
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca-cert.pem",
                "-days",
                "2",
                "-subj",
                &format!("/CN={ca_name}"),
            ],
        ]
        .concat(),
    );
    request(dir, "server-key.pem", "server.csr", "/CN=localhost");
    sign(
        dir,
        dir,
        "server.csr",
        "server-cert.pem",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    );
    client_cert(dir, dir, client);
    dir.to_owned()
}

/// Writes `client-cert.pem` and `client-key.pem` into `out` for a client named `name`, signed
/// by the CA of `ca`, with that CA's certificate as `ca-cert.pem`.
pub fn client_cert(ca: &Path, out: &Path, name: &str) {
    std::fs::create_dir_all(out).expect("client dir");
    request(out, "client-key.pem", "client.csr", &format!("/CN={name}"));
    sign(
        out,
        ca,
        "client.csr",
        "client-cert.pem",
        &format!(
            "subjectAltName=DNS:{name}.example\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n"
        ),
    );
    if ca != out {
        std::fs::copy(ca.join("ca-cert.pem"), out.join("ca-cert.pem")).expect("copy ca");
    }
}

/// A directory that trusts the CA of `ca` and has no client certificate.
pub fn ca_only(ca: &Path, out: &Path) {
    std::fs::create_dir_all(out).expect("dir");
    std::fs::copy(ca.join("ca-cert.pem"), out.join("ca-cert.pem")).expect("copy ca");
}
