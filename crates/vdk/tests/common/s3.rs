//! Real S3-protocol servers on loopback for the object-store tests: `moto_server` (PyPI
//! `moto[server]`, keeps objects in memory) and `s3s-fs` (crates.io, keeps them in a
//! directory, so it can be stopped and started again with its objects).
//!
//! scripts/install-test-deps.sh installs both under /opt/vdk-test (root) or
//! ~/.local/share/vdk-test, or `$VDK_TEST_TOOLS`; a missing one fails the test saying so.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub const ACCESS_KEY: &str = "vdktest";
pub const SECRET_KEY: &str = "vdktestsecret";
pub const BUCKET: &str = "vdk";

/// Where the install script puts the servers.
pub fn tools_dir() -> PathBuf {
    if let Some(t) = std::env::var_os("VDK_TEST_TOOLS").filter(|t| !t.is_empty()) {
        return PathBuf::from(t);
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if root {
        PathBuf::from("/opt/vdk-test")
    } else {
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".local/share/vdk-test")
    }
}

fn tool(name: &str) -> PathBuf {
    let p = tools_dir().join("bin").join(name);
    assert!(
        p.exists(),
        "this test needs the S3 server `{name}` at {}: run scripts/install-test-deps.sh \
         (it installs moto[server] from PyPI and s3s-fs from crates.io)",
        p.display()
    );
    p
}

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Kind {
    Moto,
    S3sFs,
}

/// A running S3 server with one bucket, [`BUCKET`].
pub struct S3 {
    pub kind: Kind,
    pub port: u16,
    child: Option<Child>,
    /// s3s-fs's objects; moto's log.
    pub dir: TempDir,
}

impl S3 {
    /// moto_server.
    pub fn moto() -> S3 {
        S3::start_new(Kind::Moto)
    }

    /// s3s-fs.
    pub fn s3s_fs() -> S3 {
        S3::start_new(Kind::S3sFs)
    }

    fn start_new(kind: Kind) -> S3 {
        let mut s = S3 {
            kind,
            port: super::free_port(),
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        if kind == Kind::S3sFs {
            std::fs::create_dir_all(s.dir.path().join("data").join(BUCKET)).unwrap();
        }
        s.start();
        if kind == Kind::Moto {
            s.make_bucket();
        }
        s
    }

    /// Starts the server (again, on the same port and, for s3s-fs, the same objects).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "started twice");
        let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
        let port = self.port.to_string();
        let mut cmd = match self.kind {
            Kind::Moto => {
                let mut c = Command::new(tool("moto_server"));
                c.args(["-H", "127.0.0.1", "-p", &port]);
                c
            }
            Kind::S3sFs => {
                let mut c = Command::new(tool("s3s-fs"));
                c.args(["--host", "127.0.0.1", "--port", &port])
                    .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                    .arg(self.dir.path().join("data"));
                c
            }
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the S3 server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the S3 server did not start:\n{}",
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (SIGKILL: as a crash, or a network cut).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// An unsigned PUT of `body` at `path` (URL-encoded as needed), which moto takes (it
    /// checks no signatures): how tests put keys object_store would refuse.
    pub fn put_unsigned(&self, path: &str, body: &[u8]) {
        assert_eq!(self.kind, Kind::Moto, "only moto takes unsigned requests");
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "PUT {path}: {answer}");
    }

    fn make_bucket(&self) {
        self.put_unsigned(&format!("/{BUCKET}"), b"");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The URL of a disk in the bucket.
    pub fn url(&self, name: &str) -> String {
        format!("s3://{BUCKET}/{name}")
    }

    /// The environment a vdk process reaches the server with.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    /// For s3s-fs: the file holding object `key` of the bucket.
    pub fn object_file(&self, key: &str) -> PathBuf {
        self.dir.path().join("data").join(BUCKET).join(key)
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.stop();
    }
}
