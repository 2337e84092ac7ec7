//! One level of a bucket's folder, listed so that a key no file system can show does not hide
//! the rest.
//!
//! object_store turns every key of a listing page into a `Path`, and fails the whole page on
//! one it cannot represent (`a/../b`, `a/./b`, `a//b`, a control character). Listed here page
//! by page (`PaginatedListStore`), a page that fails is listed again from where the last good
//! page ended, one entry per request, until the entry that fails is found; its key (which the
//! error carries) is set aside and the listing goes on after it:
//!
//! ```text
//!   page 1 ok ──► page 2 fails ──► 1 entry ok, 1 entry ok, 1 entry fails: skip it ──► pages again
//! ```
//!
//! Stores without paginated listing (a local directory, memory) are listed whole.

use std::borrow::Cow;

use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path;
use object_store::{ListResult, ObjectStore};

/// What one level holds.
#[derive(Debug, Default)]
pub struct Level {
    /// The common prefixes (sub-folders).
    pub prefixes: Vec<Path>,
    /// The objects.
    pub objects: Vec<object_store::ObjectMeta>,
    /// Keys that could not be listed, as the store has them.
    pub skipped: Vec<String>,
}

/// Lists `prefix` (a folder's key, ending in `/`) one level deep.
pub async fn list_level(
    store: &dyn ObjectStore,
    lister: Option<&dyn PaginatedListStore>,
    prefix: &Path,
) -> Result<Level, object_store::Error> {
    let Some(lister) = lister else {
        let ListResult {
            common_prefixes,
            objects,
            ..
        } = store.list_with_delimiter(Some(prefix)).await?;
        return Ok(Level {
            prefixes: common_prefixes,
            objects,
            skipped: Vec::new(),
        });
    };
    let raw = if prefix.as_ref().is_empty() {
        String::new()
    } else {
        format!("{}/", prefix.as_ref())
    };
    let mut level = Level::default();
    let mut token: Option<String> = None;
    // Where the entries listed so far end: listing again from here misses none and repeats
    // none.
    let mut after: Option<String> = None;
    let mut careful = false;
    loop {
        let opts = PaginatedListOptions {
            offset: if token.is_none() { after.clone() } else { None },
            delimiter: Some(Cow::Borrowed("/")),
            max_keys: careful.then_some(1),
            page_token: token.clone(),
            ..PaginatedListOptions::default()
        };
        match lister.list_paginated(Some(&raw), opts).await {
            Ok(page) => {
                for p in &page.result.common_prefixes {
                    after = later(after, past_prefix(p.as_ref()));
                }
                for o in &page.result.objects {
                    after = later(after, o.location.as_ref().to_owned());
                }
                level.prefixes.extend(page.result.common_prefixes);
                level.objects.extend(page.result.objects);
                match page.page_token {
                    None => return Ok(level),
                    // One entry at a time goes by offsets; pages by the store's tokens.
                    Some(t) => token = (!careful).then_some(t),
                }
            }
            Err(object_store::Error::InvalidPath { source }) if !careful => {
                // Some entry of this page is the one: again from the page's start, singly.
                let _ = source;
                careful = true;
                token = None;
            }
            Err(object_store::Error::InvalidPath { source }) => {
                let Some(bad) = bad_key(&source) else {
                    return Err(object_store::Error::InvalidPath { source });
                };
                let next = if bad.ends_with('/') {
                    past_prefix(&bad)
                } else {
                    bad.clone()
                };
                if after.as_deref().is_some_and(|a| next.as_str() <= a) {
                    // No progress: the store does not list past it. Give up rather than loop.
                    return Err(object_store::Error::InvalidPath { source });
                }
                level.skipped.push(bad);
                after = Some(next);
                careful = false;
                token = None;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The key object_store refused, from its error.
fn bad_key(e: &object_store::path::Error) -> Option<String> {
    match e {
        object_store::path::Error::BadSegment { path, .. }
        | object_store::path::Error::EmptySegment { path } => Some(path.clone()),
        _ => None,
    }
}

/// A key after every key under the folder `prefix` (`a/b/` gives `a/b0`: `0` follows `/`).
fn past_prefix(prefix: &str) -> String {
    let stem = prefix.strip_suffix('/').unwrap_or(prefix);
    format!("{stem}0")
}

/// The later of two positions in key order.
fn later(a: Option<String>, b: String) -> Option<String> {
    match a {
        Some(a) if a >= b => Some(a),
        _ => Some(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_a_prefix_is_after_everything_under_it() {
        let p = past_prefix("a/../");
        assert!(p.as_str() > "a/../");
        assert!(p.as_str() > "a/../zzz/\u{10ffff}");
        assert!(p.as_str() < "a/..a");
    }
}
