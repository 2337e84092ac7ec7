//! What changes names: mkdir, unlink, rmdir and rename, in the store and in the tables.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use vdk_core::sync::lock;

use super::{
    check_name, join, store_errno, Attr, Drive, Entry, Errno, FileState, Inner, Listing, MARKER,
};

impl Drive {
    /// `mkdir`: puts the directory's marker.
    pub fn mkdir(&self, parent: u64, name: &std::ffi::OsStr) -> Result<Attr, Errno> {
        let name = check_name(name)?;
        let dir = self.path_of(parent)?;
        let path = join(&dir, name);
        if self.with_listing(&dir, |l| l.contains_key(name))? {
            return Err(Errno::EEXIST);
        }
        let marker = self.key(&join(&path, MARKER))?;
        self.rt
            .block_on(self.store.put(&marker, PutPayload::new()))
            .map_err(|e| store_errno(&e))?;
        let e = Entry {
            dir: true,
            size: 0,
            mtime: SystemTime::now(),
            etag: None,
        };
        self.edit_listing(&dir, |l| {
            l.insert(name.to_owned(), e.clone());
        });
        lock(&self.inner).dirs.insert(
            path.clone(),
            Listing {
                at: Instant::now(),
                entries: BTreeMap::new(),
            },
        );
        let (ino, _) = self.remember(&path, true);
        self.touch_dir(&dir);
        Ok(self.attr_of(ino, &e, None))
    }

    /// Every object under a directory, from the store.
    fn objects_under(&self, path: &str) -> Result<Vec<Path>, Errno> {
        let key = self.key(path)?;
        self.rt
            .block_on(
                self.store
                    .list(Some(&key))
                    .map_ok(|m| m.location)
                    .try_collect::<Vec<_>>(),
            )
            .map_err(|e| store_errno(&e))
    }

    /// Whether a directory holds anything but its marker.
    fn dir_is_empty(&self, path: &str) -> Result<bool, Errno> {
        let marker = self.key(&join(path, MARKER))?;
        let remote = self.objects_under(path)?.into_iter().all(|k| k == marker);
        let local = lock(&self.inner)
            .dirs
            .get(path)
            .is_none_or(|l| l.entries.is_empty());
        Ok(remote && local)
    }

    /// Forgets the name `path` (and, for a directory, every name under it).
    fn unname(&self, path: &str) {
        forget(&mut lock(&self.inner), path);
    }

    /// `unlink`: deletes the object; open handles keep reading what they had.
    pub fn unlink(&self, parent: u64, name: &std::ffi::OsStr) -> Result<(), Errno> {
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        let dir = self.path_of(parent)?;
        let e = self
            .with_listing(&dir, |l| l.get(name).cloned())?
            .ok_or(Errno::ENOENT)?;
        if e.dir {
            return Err(Errno::EISDIR);
        }
        let path = join(&dir, name);
        // An open file keeps its contents: fetch what is missing before the object goes.
        let file = {
            let inner = lock(&self.inner);
            inner.by_path.get(&path).and_then(|&i| {
                let f = inner.nodes.get(&i)?.file.clone()?;
                Some((i, f))
            })
        };
        if let Some((ino, f)) = file.filter(|(_, f)| f.opens.load(Ordering::Acquire) > 0) {
            self.make_full(ino, &f)?;
        }
        self.delete(&self.key(&path)?)?;
        self.edit_listing(&dir, |l| {
            l.remove(name);
        });
        self.unname(&path);
        self.touch_dir(&dir);
        Ok(())
    }

    fn delete(&self, key: &Path) -> Result<(), Errno> {
        match self.rt.block_on(self.store.delete(key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_errno(&e)),
        }
    }

    /// `rmdir`: an empty directory's marker goes.
    pub fn rmdir(&self, parent: u64, name: &std::ffi::OsStr) -> Result<(), Errno> {
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        let dir = self.path_of(parent)?;
        let e = self
            .with_listing(&dir, |l| l.get(name).cloned())?
            .ok_or(Errno::ENOENT)?;
        if !e.dir {
            return Err(Errno::ENOTDIR);
        }
        let path = join(&dir, name);
        if !self.dir_is_empty(&path)? {
            return Err(Errno::ENOTEMPTY);
        }
        self.delete(&self.key(&join(&path, MARKER))?)?;
        self.edit_listing(&dir, |l| {
            l.remove(name);
        });
        self.unname(&path);
        self.touch_dir(&dir);
        Ok(())
    }

    /// `rename`: objects are copied and the old ones deleted (one by one, for a directory);
    /// a file with changes not uploaded yet moves here and is uploaded under its new name.
    pub fn rename(
        &self,
        parent: u64,
        name: &std::ffi::OsStr,
        newparent: u64,
        newname: &std::ffi::OsStr,
        noreplace: bool,
    ) -> Result<(), Errno> {
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        let newname = check_name(newname)?;
        let dir = self.path_of(parent)?;
        let newdir = self.path_of(newparent)?;
        let from = join(&dir, name);
        let to = join(&newdir, newname);
        if from == to {
            return Ok(());
        }
        if to.starts_with(&format!("{from}/")) {
            return Err(Errno::EINVAL);
        }
        let src = self
            .with_listing(&dir, |l| l.get(name).cloned())?
            .ok_or(Errno::ENOENT)?;
        let dst = self.with_listing(&newdir, |l| l.get(newname).cloned())?;
        if let Some(d) = &dst {
            if noreplace {
                return Err(Errno::EEXIST);
            }
            match (src.dir, d.dir) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !self.dir_is_empty(&to)? => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
        }
        if src.dir {
            self.rename_dir(&from, &to, dst.is_some())?;
        } else {
            self.rename_file(&from, &to)?;
        }
        self.edit_listing(&dir, |l| {
            l.remove(name);
        });
        let mut moved = src;
        moved.mtime = if moved.dir {
            moved.mtime
        } else {
            SystemTime::now()
        };
        self.edit_listing(&newdir, |l| {
            l.insert(newname.to_owned(), moved);
        });
        self.move_names(&from, &to);
        self.touch_dir(&dir);
        self.touch_dir(&newdir);
        Ok(())
    }

    fn pending_file(&self, path: &str) -> Option<Arc<FileState>> {
        let inner = lock(&self.inner);
        inner
            .by_path
            .get(path)
            .and_then(|i| inner.nodes.get(i))
            .and_then(|n| n.file.clone())
            .filter(|f| f.pending.load(Ordering::Acquire))
    }

    fn rename_file(&self, from: &str, to: &str) -> Result<(), Errno> {
        let (kf, kt) = (self.key(from)?, self.key(to)?);
        if let Some(f) = self.pending_file(from) {
            // The cache holds all of it; it goes up under the new name at close.
            if lock(&f.m).etag.is_some() {
                self.delete(&kf)?;
            }
            return self.delete(&kt);
        }
        match self.rt.block_on(self.store.rename(&kf, &kt)) {
            Ok(()) => Ok(()),
            Err(e) => Err(store_errno(&e)),
        }
    }

    fn rename_dir(&self, from: &str, to: &str, replace: bool) -> Result<(), Errno> {
        let (kf, kt) = (self.key(from)?, self.key(to)?);
        if replace {
            self.delete(&kt.clone().join(MARKER))?;
        }
        let objects = self.objects_under(from)?;
        let mut has_marker = false;
        for o in &objects {
            let rest: Vec<_> = o.prefix_match(&kf).into_iter().flatten().collect();
            let mut k = kt.clone();
            for p in &rest {
                k = k.join(p.clone());
            }
            if rest.len() == 1 && rest[0].as_ref() == MARKER {
                has_marker = true;
            }
            let rel: Vec<&str> = rest.iter().map(AsRef::as_ref).collect();
            let old_path = join(from, &rel.join("/"));
            if self.pending_file(&old_path).is_some() {
                // Uploaded under its new name at close.
                self.delete(o)?;
                continue;
            }
            self.rt
                .block_on(self.store.rename(o, &k))
                .map_err(|e| store_errno(&e))?;
        }
        if !has_marker {
            // A directory that was only a prefix keeps existing if it ends up empty.
            self.rt
                .block_on(self.store.put(&kt.clone().join(MARKER), PutPayload::new()))
                .map_err(|e| store_errno(&e))?;
        }
        Ok(())
    }

    /// Renames `from` (and every name under it) to `to` in the tables.
    fn move_names(&self, from: &str, to: &str) {
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        // What `to` named before is replaced.
        forget(inner, to);
        let moving: Vec<(String, u64)> = inner
            .by_path
            .iter()
            .filter(|(p, _)| at_or_under(p, from))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (p, ino) in moving {
            inner.by_path.remove(&p);
            let np = format!("{to}{}", &p[from.len()..]);
            if let Some(n) = inner.nodes.get_mut(&ino) {
                n.path = Some(np.clone());
            }
            inner.by_path.insert(np, ino);
        }
        let dirs: Vec<String> = inner
            .dirs
            .keys()
            .filter(|d| at_or_under(d, from))
            .cloned()
            .collect();
        for d in dirs {
            if let Some(l) = inner.dirs.remove(&d) {
                inner.dirs.insert(format!("{to}{}", &d[from.len()..]), l);
            }
        }
    }
}

/// Whether `path` is `top` or a name under it.
fn at_or_under(path: &str, top: &str) -> bool {
    path.strip_prefix(top)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Forgets the name `top` and every name under it; a node that nothing refers to any more
/// (no name, no lookups, no open file) goes too.
fn forget(inner: &mut Inner, top: &str) {
    let gone: Vec<String> = inner
        .by_path
        .keys()
        .filter(|p| at_or_under(p, top))
        .cloned()
        .collect();
    for p in gone {
        if let Some(ino) = inner.by_path.remove(&p) {
            if let Some(n) = inner.nodes.get_mut(&ino) {
                n.path = None;
                if n.lookups == 0 && n.file.is_none() {
                    inner.nodes.remove(&ino);
                }
            }
        }
    }
    inner.dirs.retain(|d, _| !at_or_under(d, top));
}
