//! Where a disk lives: a URL turned into an object store and a prefix in it.
//!
//! - `s3://BUCKET/PREFIX`: endpoint, region and credentials from the `AWS_*` environment
//!   variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//!   `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, ...) or [`StoreOptions`]; an `http://`
//!   endpoint is allowed as given. Conditional puts (If-Match) carry the writer's lease.
//! - `gs://BUCKET/PREFIX`: `GOOGLE_*` variables (`GOOGLE_SERVICE_ACCOUNT`, ...).
//! - `az://CONTAINER/PREFIX`: `AZURE_*` variables (`AZURE_STORAGE_ACCOUNT_NAME`, ...).
//! - `file:///DIR`: a local directory; the lease is a lock on a file in it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};
use url::Url;

use crate::ObjError;

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
}

/// A parsed disk location.
#[derive(Clone, Debug)]
pub struct Location {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The disk's prefix in it.
    pub prefix: Path,
    /// The URL as given.
    pub url: String,
    /// For `file://`, the directory.
    pub local: Option<PathBuf>,
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
        let (store, prefix, local): (Arc<dyn ObjectStore>, Path, Option<PathBuf>) = match u.scheme()
        {
            "s3" | "s3a" => {
                if u.host_str().is_none_or(str::is_empty) {
                    return Err(bad(format!("{url:?}: give a bucket (s3://BUCKET/PREFIX)")));
                }
                let mut b = AmazonS3Builder::from_env()
                    .with_url(url)
                    .with_conditional_put(S3ConditionalPut::ETagMatch)
                    .with_retry(retry)
                    .with_client_options(client);
                let endpoint = opts
                    .endpoint
                    .clone()
                    .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
                    .or_else(|| std::env::var("AWS_ENDPOINT").ok());
                if let Some(e) = endpoint {
                    b = b.with_allow_http(e.starts_with("http://")).with_endpoint(e);
                }
                if let Some((id, secret)) = &opts.credentials {
                    b = b.with_access_key_id(id).with_secret_access_key(secret);
                }
                if let Some(r) = &opts.region {
                    b = b.with_region(r);
                } else if std::env::var_os("AWS_REGION").is_none()
                    && std::env::var_os("AWS_DEFAULT_REGION").is_none()
                {
                    b = b.with_region("us-east-1");
                }
                (Arc::new(b.build()?), prefix_of(&u)?, None)
            }
            "gs" => {
                let b = GoogleCloudStorageBuilder::from_env()
                    .with_url(url)
                    .with_retry(retry)
                    .with_client_options(client);
                (Arc::new(b.build()?), prefix_of(&u)?, None)
            }
            "az" | "abfs" | "abfss" => {
                let b = MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .with_retry(retry)
                    .with_client_options(client);
                (Arc::new(b.build()?), prefix_of(&u)?, None)
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
        })
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
