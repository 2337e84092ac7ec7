//! Where a disk lives: a URL turned into an object store and a prefix in it.
//!
//! - `s3://BUCKET/PREFIX`: endpoint, region and credentials from the `AWS_*` environment
//!   variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//!   `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, ...) or [`StoreOptions`]; an `http://`
//!   endpoint is allowed as given. Conditional puts (If-Match) carry the writer's lease.
//! - `gs://BUCKET/PREFIX`: `GOOGLE_*` variables (`GOOGLE_SERVICE_ACCOUNT`, ...).
//! - `az://CONTAINER/PREFIX`: `AZURE_*` variables (`AZURE_STORAGE_ACCOUNT_NAME`, ...).
//! - `file:///DIR`: a local directory; the lease is a lock on a file in it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::list::PaginatedListStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};
use url::Url;

use crate::ObjError;

/// The variables a store's settings and credentials come from: `AWS_*` for S3, `GOOGLE_*`
/// for GCS, `AZURE_*` for Azure, as the cloud tools read them. A daemon gets a client's with
/// its request, so that it never needs (or uses) its own environment on a client's behalf.
/// Its `Debug` shows names only: values may be secrets.
#[derive(Clone, Default, Eq, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(transparent)]
pub struct StoreEnv(pub BTreeMap<String, String>);

/// Prefixes of the variables a [`StoreEnv`] carries.
const ENV_PREFIXES: &[&str] = &["AWS_", "GOOGLE_", "AZURE_"];

impl StoreEnv {
    /// The store variables of this process's environment.
    pub fn current() -> StoreEnv {
        StoreEnv(
            std::env::vars()
                .filter(|(k, _)| ENV_PREFIXES.iter().any(|p| k.starts_with(p)))
                .collect(),
        )
    }

    /// Whether it holds no variable.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for StoreEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Settings of the store beyond the URL; the environment fills in what is not set.
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    /// The S3 endpoint (`http://127.0.0.1:9000`, `https://s3.example.net`).
    pub endpoint: Option<String>,
    /// The S3 region.
    pub region: Option<String>,
    /// How long to keep retrying a failing request before it fails (default 60 s).
    pub retry_timeout: Option<Duration>,
    /// S3 access key id and secret (default: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
    pub credentials: Option<(String, String)>,
    /// Where the rest comes from: these variables, or (`None`) this process's environment.
    pub env: Option<StoreEnv>,
}

impl StoreOptions {
    /// The variable `name` of the environment these options read.
    fn var(&self, name: &str) -> Option<String> {
        match &self.env {
            Some(env) => env.0.get(name).cloned(),
            None => std::env::var(name).ok(),
        }
    }

    /// The variables of the environment these options read whose names start with `prefix`.
    fn vars(&self, prefix: &str) -> Vec<(String, String)> {
        match &self.env {
            Some(env) => env
                .0
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            None => std::env::vars()
                .filter(|(k, _)| k.starts_with(prefix))
                .collect(),
        }
    }
}

/// A store's page-by-page listing.
#[derive(Clone)]
pub struct Lister(pub Arc<dyn PaginatedListStore>);

impl std::fmt::Debug for Lister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lister")
    }
}

/// A parsed disk location.
#[derive(Clone, Debug)]
pub struct Location {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The same store's page-by-page listing, where it has one (S3, GCS, Azure): what lists
    /// a folder despite keys a path cannot hold.
    pub lister: Option<Lister>,
    /// The disk's prefix in it.
    pub prefix: Path,
    /// The URL as given.
    pub url: String,
    /// For `file://`, the directory.
    pub local: Option<PathBuf>,
    /// The endpoint given for the store (S3's `--s3-endpoint` or `AWS_ENDPOINT_URL`), which
    /// [`check_reachable`](Location::check_reachable) tries.
    pub endpoint: Option<String>,
}

const SCHEMES: &[&str] = &["s3", "s3a", "gs", "az", "abfs", "abfss", "file"];

/// Whether `s` names an object-store location rather than a local path.
pub fn is_url(s: &str) -> bool {
    s.split_once("://")
        .is_some_and(|(scheme, _)| SCHEMES.contains(&scheme))
}

fn bad(m: impl Into<String>) -> ObjError {
    ObjError::BadUrl(m.into())
}

impl Location {
    /// Parses `url`; `create_dir` makes a `file://` directory that does not exist yet.
    pub fn parse(url: &str, opts: &StoreOptions, create_dir: bool) -> Result<Location, ObjError> {
        let u = Url::parse(url).map_err(|e| bad(format!("{url:?} is not a URL: {e}")))?;
        let prefix_of = |u: &Url| {
            let p = u.path().trim_matches('/');
            let decoded = percent_decode(p);
            Path::parse(&decoded).map_err(|e| bad(format!("bad prefix in {url:?}: {e}")))
        };
        // Retried for the time, however many tries that takes, and tried at least every two
        // seconds: a store back after an outage is noticed soon.
        let retry = RetryConfig {
            retry_timeout: opts.retry_timeout.unwrap_or(Duration::from_secs(60)),
            max_retries: 10_000,
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
        };
        let client = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(Duration::from_secs(120));
        let mut given_endpoint = None;
        let mut lister: Option<Lister> = None;
        let (store, prefix, local): (Arc<dyn ObjectStore>, Path, Option<PathBuf>) = match u.scheme()
        {
            "s3" | "s3a" => {
                if u.host_str().is_none_or(str::is_empty) {
                    return Err(bad(format!("{url:?}: give a bucket (s3://BUCKET/PREFIX)")));
                }
                let mut b = AmazonS3Builder::new();
                for (k, v) in opts.vars("AWS_") {
                    if let Ok(key) = k.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                        b = b.with_config(key, v);
                    }
                }
                let mut b = b
                    .with_url(url)
                    .with_conditional_put(S3ConditionalPut::ETagMatch)
                    .with_retry(retry)
                    .with_client_options(client);
                let endpoint = opts
                    .endpoint
                    .clone()
                    .or_else(|| opts.var("AWS_ENDPOINT_URL"))
                    .or_else(|| opts.var("AWS_ENDPOINT"));
                if let Some(e) = endpoint {
                    given_endpoint = Some(e.clone());
                    b = b.with_allow_http(e.starts_with("http://")).with_endpoint(e);
                }
                if let Some((id, secret)) = &opts.credentials {
                    b = b.with_access_key_id(id).with_secret_access_key(secret);
                }
                if let Some(r) = &opts.region {
                    b = b.with_region(r);
                } else if opts.var("AWS_REGION").is_none()
                    && opts.var("AWS_DEFAULT_REGION").is_none()
                {
                    b = b.with_region("us-east-1");
                }
                let s3 = Arc::new(b.build()?);
                lister = Some(Lister(s3.clone()));
                (s3, prefix_of(&u)?, None)
            }
            "gs" => {
                let mut b = GoogleCloudStorageBuilder::new();
                for (k, v) in opts.vars("GOOGLE_") {
                    if let Ok(key) = k.to_ascii_lowercase().parse::<GoogleConfigKey>() {
                        b = b.with_config(key, v);
                    }
                }
                let b = b
                    .with_url(url)
                    .with_retry(retry)
                    .with_client_options(client);
                let built = Arc::new(b.build()?);
                lister = Some(Lister(built.clone()));
                (built, prefix_of(&u)?, None)
            }
            "az" | "abfs" | "abfss" => {
                let mut b = MicrosoftAzureBuilder::new();
                for (k, v) in opts.vars("AZURE_") {
                    if let Ok(key) = k.to_ascii_lowercase().parse::<AzureConfigKey>() {
                        b = b.with_config(key, v);
                    }
                }
                let b = b
                    .with_url(url)
                    .with_retry(retry)
                    .with_client_options(client);
                let built = Arc::new(b.build()?);
                lister = Some(Lister(built.clone()));
                (built, prefix_of(&u)?, None)
            }
            "file" => {
                let dir = u
                    .to_file_path()
                    .map_err(|()| bad(format!("{url:?}: give an absolute path (file:///DIR)")))?;
                if create_dir {
                    std::fs::create_dir_all(&dir)?;
                }
                if !dir.is_dir() {
                    return Err(ObjError::NotFound(url.to_owned()));
                }
                let fs = LocalFileSystem::new_with_prefix(&dir)?;
                (Arc::new(fs), Path::default(), Some(dir))
            }
            other => {
                return Err(bad(format!(
                    "{other}:// is not a store vdk reads (s3://, gs://, az://, file://)"
                )))
            }
        };
        Ok(Location {
            store,
            prefix,
            url: url.to_owned(),
            local,
            endpoint: given_endpoint,
            lister,
        })
    }

    /// Fails at once, naming the endpoint, when nothing answers a TCP connection there: the
    /// store's requests would otherwise be retried for a minute before a command could say
    /// anything. A store without a given endpoint (AWS itself, GCS, Azure) is not tried.
    pub fn check_reachable(&self) -> Result<(), ObjError> {
        let Some(endpoint) = &self.endpoint else {
            return Ok(());
        };
        let unreachable = |reason: String| ObjError::Unreachable {
            endpoint: endpoint.clone(),
            reason,
        };
        let u = Url::parse(endpoint).map_err(|e| unreachable(format!("not a URL: {e}")))?;
        let host = u
            .host_str()
            .ok_or_else(|| unreachable("no host in it".into()))?;
        let port = u.port_or_known_default().unwrap_or(443);
        let addrs = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .map_err(|e| unreachable(format!("cannot resolve {host}: {e}")))?;
        let mut last = None;
        for a in addrs {
            match std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(unreachable(last.map_or_else(
            || format!("{host} has no address"),
            |e| describe_io(&e),
        )))
    }

    /// The object `name` under the disk's prefix.
    pub fn key(&self, name: &str) -> Path {
        let mut p = self.prefix.clone();
        for part in name.split('/') {
            p = p.join(part);
        }
        p
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A connection error in a few words: "connection refused", "timed out".
fn describe_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::TimedOut => "no answer within 5 s".into(),
        _ => {
            let text = e.to_string();
            let text = text.split(" (os error").next().unwrap_or(&text);
            text.to_ascii_lowercase()
        }
    }
}

/// An object store's error in one line: what S3 said (its error code and message, not the
/// XML around them), or why it could not be reached, without request timings and retry
/// counts.
pub fn store_message(e: &object_store::Error) -> String {
    let text = e.to_string();
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let close = format!("</{name}>");
        let start = text.find(&open)? + open.len();
        let len = text[start..].find(&close)?;
        Some(text[start..start + len].to_owned())
    };
    if let Some(code) = tag("Code") {
        let message = tag("Message").unwrap_or_default();
        return match code.as_str() {
            "NoSuchBucket" => match tag("BucketName") {
                Some(b) => format!("bucket {b} does not exist"),
                None => "the bucket does not exist".into(),
            },
            "AccessDenied" => format!("access denied: {message}"),
            "InvalidAccessKeyId" | "SignatureDoesNotMatch" => {
                format!("the store refused the credentials ({code}: {message})")
            }
            _ if message.is_empty() => code,
            _ => format!("{code}: {message}"),
        };
    }
    if let Some(url) = text
        .split_whitespace()
        .find(|w| w.starts_with("http://") || w.starts_with("https://"))
    {
        let lower = text.to_ascii_lowercase();
        let why = [
            "connection refused",
            "timed out",
            "dns error",
            "connection reset",
        ]
        .into_iter()
        .find(|w| lower.contains(w));
        if let Some(why) = why {
            let origin = Url::parse(url)
                .map_or_else(|_| url.to_owned(), |u| u.origin().ascii_serialization());
            return format!("cannot reach {origin}: {why}");
        }
    }
    // The first line, without " in 4.2ms" and the retry report.
    let first = text.lines().next().unwrap_or(&text);
    let first = first.split(", after ").next().unwrap_or(first);
    match first.find(" in ") {
        Some(at) if first[at + 4..].starts_with(|c: char| c.is_ascii_digit()) => {
            let rest = &first[at + 4..];
            let tail = rest.find(" - ").map_or("", |i| &rest[i..]);
            format!("{}{tail}", &first[..at])
        }
        _ => first.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_paths() {
        assert!(is_url("s3://b/p"));
        assert!(is_url("file:///tmp/x"));
        assert!(!is_url("disk.qcow2"));
        assert!(!is_url("/tmp/s3://x"));
        assert!(!is_url("http://example.com/x"));
    }

    #[test]
    fn bad_urls_are_explained() {
        let o = StoreOptions::default();
        for (u, want) in [
            ("s3:///prefix", "bucket"),
            ("ftp://x/y", "not a store"),
            ("not a url", "not a URL"),
        ] {
            let e = Location::parse(u, &o, false).unwrap_err().to_string();
            assert!(e.contains(want), "{u}: {e}");
        }
    }

    #[test]
    fn keys_sit_under_the_prefix() {
        let o = StoreOptions {
            endpoint: Some("http://127.0.0.1:1".into()),
            ..StoreOptions::default()
        };
        let l = Location::parse("s3://bucket/disks/a%20b", &o, false).unwrap();
        assert_eq!(l.key("chunks/0001").as_ref(), "disks/a b/chunks/0001");
        let d = tempfile::tempdir().unwrap();
        let url = format!("file://{}/x", d.path().display());
        let l = Location::parse(&url, &o, true).unwrap();
        assert_eq!(l.key("vdk-disk.json").as_ref(), "vdk-disk.json");
        assert!(l.local.unwrap().is_dir());
    }
}
