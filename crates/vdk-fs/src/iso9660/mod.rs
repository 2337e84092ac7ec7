//! A read-only ISO 9660 file system over any vdk disk (ECMA-119), with its extensions:
//! Joliet (UCS-2 names), Rock Ridge (POSIX names, modes, owners, times, symlinks, device
//! nodes, hard links, deep directories relocated and shown back in place), multi-extent
//! files over 4 GiB, zisofs-compressed files (shown uncompressed), and El Torito boot images,
//! shown as files of a `[BOOT]` directory.
//!
//! ```text
//!   sector 16..: volume descriptors ─► root directory record ─► directory extents
//!        │                                                        └─► records ─► SUSP/RRIP
//!        └─ boot record ─► boot catalog ─► boot images
//! ```
//!
//! Which tree is shown: Rock Ridge's if the primary volume has it, else Joliet's if there is
//! a Joliet volume, else the plain ISO 9660 one (names without their `;1` version). Nothing
//! here trusts the image: every length and block number is checked against the disk, and a
//! broken structure is an error for the directory or file that has it, never a panic.
//!
//! File data is read straight from the disk, extent by extent, with no staging.

mod eltorito;
mod record;
mod susp;
mod volume;
mod zisofs;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use vdk_core::sync;
use vdk_core::BlockDevice;

pub use eltorito::BootImage;
pub use volume::Time;

use record::flag;
use volume::{kind, Descriptor, FIRST_DESCRIPTOR, MAX_DESCRIPTORS, SECTOR};

/// Why an image could not be read as ISO 9660.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IsoError {
    /// There is no ISO 9660 primary volume descriptor.
    #[error("not an ISO 9660 image (no primary volume descriptor in sector 16)")]
    NotIso,
    /// A structure of the image is broken.
    #[error("malformed ISO 9660 image: bad {0}")]
    Malformed(&'static str),
    /// A block number or length points past the end of the disk.
    #[error("ISO 9660 structure past the end of the disk")]
    OutOfBounds,
    /// The disk failed.
    #[error("cannot read the disk")]
    Disk(#[from] vdk_core::Error),
}

impl IsoError {
    /// The errno a file system answers this with.
    pub fn errno(&self) -> i32 {
        match self {
            IsoError::Disk(e) => e.errno().raw(),
            _ => rustix::io::Errno::IO.raw_os_error(),
        }
    }
}

/// Longest directory extent read (a directory of some hundred thousand entries).
const MAX_DIRECTORY: u64 = 64 << 20;
/// Most directories whose entries are kept parsed.
const CACHED_DIRECTORIES: usize = 4096;
/// Most entries kept parsed across all cached directories (some 250 bytes each): what a crafted
/// image can make the daemon hold between listings. A directory larger than this is listed
/// each time it is asked for, never kept.
const CACHED_ENTRIES: usize = 256 * 1024;
/// Inode numbers of files with a Rock Ridge serial number: this plus the number, so that
/// hard links share one and no other inode can collide.
const RR_INO_BASE: u64 = 1 << 48;
/// The inode of the `[BOOT]` directory and the base of its files.
const BOOT_INO: u64 = 2;
const BOOT_FILE_INO: u64 = 3 << 40;
/// The root's inode number, as FUSE wants it.
pub const ROOT_INO: u64 = 1;
/// The name of the directory of El Torito images.
pub const BOOT_DIR: &str = "[BOOT]";

/// File types (the `S_IFMT` part of a mode).
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link, with its target.
    Symlink(Vec<u8>),
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A socket.
    Socket,
}

/// A piece of a file's data on the disk.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
struct Extent {
    /// Byte offset on the disk.
    at: u64,
    /// Length in bytes.
    len: u64,
}

/// A file, directory or other node of the image.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Node {
    /// Inode number, stable for the image.
    pub ino: u64,
    /// The parent directory's inode number (the root's is its own).
    pub parent: u64,
    /// The name shown.
    pub name: Vec<u8>,
    /// What it is.
    pub kind: Kind,
    /// Size in bytes (a symlink's is its target's length).
    pub size: u64,
    /// Permission bits (the low 12 bits of the mode).
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Hard links (1 when unknown, as for a directory without Rock Ridge).
    pub nlink: u32,
    /// Device number of a device node (Linux encoding).
    pub rdev: u32,
    /// Modification time.
    pub mtime: Time,
    /// Access time.
    pub atime: Time,
    /// Attribute change time.
    pub ctime: Time,
    /// Whether the data is stored zisofs-compressed (it reads uncompressed).
    pub zisofs: bool,
    zf: Option<zisofs::Zf>,
    extents: Vec<Extent>,
}

/// Which of the image's trees is shown.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Scheme {
    /// Rock Ridge on the primary volume; `skip` bytes start every system use area.
    RockRidge {
        /// The SP entry's `len_skp`.
        skip: u8,
    },
    /// The Joliet volume.
    Joliet,
    /// The primary volume's ISO 9660 names.
    Plain,
}

/// An ISO 9660 image on a disk.
#[derive(Debug)]
pub struct Iso {
    dev: Arc<dyn BlockDevice>,
    size: u64,
    /// The disk's own alignment for reads.
    align: u64,
    block: u64,
    label: String,
    scheme: Scheme,
    root: Arc<Node>,
    boot: Vec<BootImage>,
    dirs: Mutex<DirCache>,
}

/// Parsed directories, bounded in count and in entries.
#[derive(Debug, Default)]
struct DirCache {
    lists: HashMap<u64, Arc<Vec<Arc<Node>>>>,
    /// Entries held by `lists`.
    entries: usize,
}

impl DirCache {
    /// Keeps `list` for directory `ino`, dropping what was kept when a bound would be passed.
    fn keep(&mut self, ino: u64, list: &Arc<Vec<Arc<Node>>>) {
        if list.len() > CACHED_ENTRIES {
            return;
        }
        if self.lists.len() >= CACHED_DIRECTORIES || self.entries + list.len() > CACHED_ENTRIES {
            self.lists.clear();
            self.entries = 0;
        }
        if let Some(old) = self.lists.insert(ino, Arc::clone(list)) {
            self.entries -= old.len();
        }
        self.entries += list.len();
    }
}

impl Iso {
    /// Opens the image on `dev`.
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<Iso, IsoError> {
        let info = dev.info();
        let mut iso = Iso {
            size: info.size,
            align: u64::from(info.logical_block_size.max(1)),
            dev,
            block: SECTOR,
            label: String::new(),
            scheme: Scheme::Plain,
            root: Arc::new(placeholder_root()),
            boot: Vec::new(),
            dirs: Mutex::default(),
        };
        let mut primary = None;
        let mut joliet = None;
        let mut catalog = None;
        for n in FIRST_DESCRIPTOR..FIRST_DESCRIPTOR + MAX_DESCRIPTORS {
            let mut d = [0u8; 2048];
            if iso.read_raw(&mut d, n * SECTOR).is_err() {
                break;
            }
            if &d[1..6] != b"CD001" {
                break;
            }
            match d[0] {
                kind::PRIMARY if primary.is_none() => primary = Some(Descriptor::parse(&d)?),
                kind::SUPPLEMENTARY if joliet.is_none() => {
                    if let Ok(s) = Descriptor::parse(&d) {
                        if s.joliet.is_some() {
                            joliet = Some(s);
                        }
                    }
                }
                kind::BOOT if catalog.is_none() => catalog = eltorito::catalog_block(&d),
                kind::TERMINATOR => break,
                _ => {}
            }
        }
        let primary = primary.ok_or(IsoError::NotIso)?;
        iso.block = u64::from(primary.block_size);
        iso.label = primary.volume_id.clone();
        // Rock Ridge: an SP entry in the root's "." record (SUSP 5.3).
        let root_dot = iso.first_record(&primary.root)?;
        let su = susp::parse(&root_dot.1, 0, &mut |c| iso.continuation(c));
        let rock_ridge = su.sp_skip.filter(|&skip| {
            susp::parse(&root_dot.1, usize::from(skip), &mut |c| iso.continuation(c)).rock_ridge
        });
        let (scheme, root_record) = if let Some(skip) = rock_ridge {
            (Scheme::RockRidge { skip }, primary.root)
        } else if let Some(j) = &joliet {
            (Scheme::Joliet, j.root)
        } else {
            (Scheme::Plain, primary.root)
        };
        iso.scheme = scheme;
        let root = record::parse(&root_record)?;
        let mut node = placeholder_root();
        node.size = u64::from(root.size);
        node.extents = vec![iso.extent_of(&root)?];
        let t = volume::record_date(&root.date).unwrap_or((0, 0));
        (node.mtime, node.atime, node.ctime) = (t, t, t);
        if let Scheme::RockRidge { skip } = scheme {
            let su = susp::parse(&root_dot.1, usize::from(skip), &mut |c| iso.continuation(c));
            apply_rock_ridge(&mut node, &su);
            node.kind = Kind::Directory;
        }
        iso.root = Arc::new(node);
        if let Some(block) = catalog {
            iso.boot = iso.read_catalog(block);
        }
        Ok(iso)
    }

    /// The volume identifier.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Which tree is shown.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The El Torito boot images.
    pub fn boot_images(&self) -> &[BootImage] {
        &self.boot
    }

    /// The size of the image in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The root directory.
    pub fn root(&self) -> Arc<Node> {
        Arc::clone(&self.root)
    }

    /// Reads exactly `buf.len()` bytes at `offset` of the disk, aligning to what the disk
    /// takes.
    fn read_raw(&self, buf: &mut [u8], offset: u64) -> Result<(), IsoError> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(IsoError::OutOfBounds);
        }
        if self.align <= 1 || (offset.is_multiple_of(self.align) && len.is_multiple_of(self.align))
        {
            return Ok(self.dev.read_at(buf, offset)?);
        }
        let start = offset / self.align * self.align;
        let end = (offset + len).div_ceil(self.align) * self.align;
        let mut tmp = vec![0u8; usize::try_from(end - start).map_err(|_| IsoError::OutOfBounds)?];
        self.dev.read_at(&mut tmp, start)?;
        let from = usize::try_from(offset - start).map_err(|_| IsoError::OutOfBounds)?;
        buf.copy_from_slice(&tmp[from..from + buf.len()]);
        Ok(())
    }

    /// The extent a record names, checked against the disk.
    fn extent_of(&self, r: &record::Record<'_>) -> Result<Extent, IsoError> {
        let at = (u64::from(r.extent) + u64::from(r.ext_attr)) * self.block;
        let len = u64::from(r.size);
        if at.checked_add(len).is_none_or(|end| end > self.size) && len > 0 {
            return Err(IsoError::OutOfBounds);
        }
        Ok(Extent { at, len })
    }

    /// The first record (`.`) of the directory whose record is `dir`, and its system use area.
    fn first_record(&self, dir: &[u8; 34]) -> Result<(u32, Vec<u8>), IsoError> {
        let r = record::parse(dir)?;
        let e = self.extent_of(&r)?;
        let mut head = vec![0u8; usize::try_from(e.len.min(SECTOR)).unwrap_or(0)];
        if head.is_empty() {
            return Err(IsoError::Malformed("root directory"));
        }
        self.read_raw(&mut head, e.at)?;
        let dot = record::parse(&head)?;
        Ok((dot.size, dot.system_use.to_vec()))
    }

    /// Reads a SUSP continuation area.
    fn continuation(&self, (block, offset, len): susp::Continuation) -> Option<Vec<u8>> {
        let mut b = vec![0u8; usize::try_from(len).ok()?];
        let at = u64::from(block) * self.block + u64::from(offset);
        self.read_raw(&mut b, at).ok()?;
        Some(b)
    }

    fn read_catalog(&self, block: u32) -> Vec<BootImage> {
        let mut cat = [0u8; 2048];
        if self
            .read_raw(&mut cat, u64::from(block) * self.block)
            .is_err()
        {
            return Vec::new();
        }
        let mut hd_size = |lba: u32| {
            // A hard disk image ends where its first partition does (MBR at its start).
            let mut mbr = [0u8; 512];
            self.read_raw(&mut mbr, u64::from(lba) * self.block).ok()?;
            if mbr[510..512] != [0x55, 0xaa] {
                return None;
            }
            let p = &mbr[446..462];
            let start = u64::from(u32::from_le_bytes([p[8], p[9], p[10], p[11]]));
            let count = u64::from(u32::from_le_bytes([p[12], p[13], p[14], p[15]]));
            Some((start + count) * 512)
        };
        let mut images = eltorito::parse(&cat, &mut hd_size);
        // An image cannot run past the disk.
        for i in &mut images {
            let at = u64::from(i.lba) * self.block;
            i.size = i.size.min(self.size.saturating_sub(at));
        }
        images
    }

    /// The entries of a directory, without `.` and `..` (and, with Rock Ridge, without the
    /// relocated directories, which show where they belong).
    pub fn list(&self, dir: &Node) -> Result<Arc<Vec<Arc<Node>>>, IsoError> {
        if dir.ino == BOOT_INO {
            return Ok(Arc::new(self.boot_nodes()));
        }
        if dir.kind != Kind::Directory {
            return Err(IsoError::Malformed("directory"));
        }
        if let Some(l) = self.lock_dirs().lists.get(&dir.ino) {
            return Ok(Arc::clone(l));
        }
        let mut list = self.read_directory(dir)?;
        if dir.ino == ROOT_INO && matches!(self.scheme, Scheme::RockRidge { .. }) {
            // The directory deep directories were moved to (RRIP 4.1.5) holds nothing once
            // they show where they belong: it is not shown either.
            list.retain(|n| {
                let moved = n.kind == Kind::Directory
                    && (n.name.eq_ignore_ascii_case(b"rr_moved")
                        || n.name.eq_ignore_ascii_case(b".rr_moved"));
                !(moved && self.read_directory(n).is_ok_and(|l| l.is_empty()))
            });
        }
        if dir.ino == ROOT_INO
            && !self.boot.is_empty()
            && !list.iter().any(|n| n.name == BOOT_DIR.as_bytes())
        {
            let mut boot = placeholder_root();
            boot.ino = BOOT_INO;
            boot.parent = ROOT_INO;
            boot.name = BOOT_DIR.as_bytes().to_vec();
            (boot.mtime, boot.atime, boot.ctime) =
                (self.root.mtime, self.root.atime, self.root.ctime);
            list.push(Arc::new(boot));
        }
        let list = Arc::new(list);
        self.lock_dirs().keep(dir.ino, &list);
        Ok(list)
    }

    /// The `[BOOT]` directory itself, if the image has boot images.
    pub fn boot_dir(&self) -> Option<Arc<Node>> {
        if self.boot.is_empty() {
            return None;
        }
        self.list(&self.root)
            .ok()?
            .iter()
            .find(|n| n.ino == BOOT_INO)
            .cloned()
    }

    fn boot_nodes(&self) -> Vec<Arc<Node>> {
        self.boot
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut n = placeholder_root();
                n.ino = BOOT_FILE_INO + i as u64;
                n.parent = BOOT_INO;
                n.name = b.file_name(i).into_bytes();
                n.kind = Kind::File;
                n.perm = 0o444;
                n.size = b.size;
                n.nlink = 1;
                (n.mtime, n.atime, n.ctime) = (self.root.mtime, self.root.atime, self.root.ctime);
                n.extents = vec![Extent {
                    at: u64::from(b.lba) * self.block,
                    len: b.size,
                }];
                Arc::new(n)
            })
            .collect()
    }

    fn lock_dirs(&self) -> std::sync::MutexGuard<'_, DirCache> {
        sync::lock(&self.dirs)
    }

    fn read_directory(&self, dir: &Node) -> Result<Vec<Arc<Node>>, IsoError> {
        let Some(e) = dir.extents.first() else {
            return Ok(Vec::new());
        };
        if e.len > MAX_DIRECTORY {
            return Err(IsoError::Malformed("directory size"));
        }
        let mut bytes = vec![0u8; usize::try_from(e.len).map_err(|_| IsoError::OutOfBounds)?];
        self.read_raw(&mut bytes, e.at)?;
        let mut out = Unique::default();
        let mut pending: Option<Node> = None;
        for (offset, r) in record::records(&bytes) {
            let r = r?;
            if r.is_dot() || r.flags & flag::ASSOCIATED != 0 {
                continue;
            }
            let position = e.at + offset as u64;
            // Further extents of a multi-extent file (ECMA-119 6.5.1).
            if let Some(p) = pending.as_mut() {
                let ext = self.extent_of(&r)?;
                p.extents.push(ext);
                p.size += ext.len;
                if r.flags & flag::MULTI_EXTENT == 0 {
                    let done = pending.take().unwrap_or_else(placeholder_root);
                    out.push(done);
                }
                continue;
            }
            let Some(node) = self.node(dir, &r, position)? else {
                continue;
            };
            if r.flags & flag::MULTI_EXTENT != 0 && node.kind == Kind::File {
                pending = Some(node);
            } else {
                out.push(node);
            }
        }
        if let Some(p) = pending {
            // The last record still said more followed: keep what there is.
            out.push(p);
        }
        Ok(out.nodes)
    }

    /// The node of one record, or None for a record not shown (a relocated directory).
    fn node(
        &self,
        dir: &Node,
        r: &record::Record<'_>,
        position: u64,
    ) -> Result<Option<Node>, IsoError> {
        let t = volume::record_date(&r.date).unwrap_or((0, 0));
        let is_dir = r.flags & flag::DIRECTORY != 0;
        let mut n = Node {
            ino: position,
            parent: dir.ino,
            name: Vec::new(),
            kind: if is_dir { Kind::Directory } else { Kind::File },
            size: u64::from(r.size),
            perm: if is_dir { 0o555 } else { 0o444 },
            uid: 0,
            gid: 0,
            nlink: 1,
            rdev: 0,
            mtime: t,
            atime: t,
            ctime: t,
            zisofs: false,
            zf: None,
            extents: vec![self.extent_of(r)?],
        };
        match self.scheme {
            Scheme::RockRidge { skip } => {
                let su = susp::parse(r.system_use, usize::from(skip), &mut |c| {
                    self.continuation(c)
                });
                if su.relocated {
                    return Ok(None);
                }
                n.name = su
                    .name
                    .clone()
                    .unwrap_or_else(|| plain_name(r.name, is_dir));
                if let Some(target) = su.child_link {
                    // A placeholder for a deep directory: the directory is at `target`.
                    let at = u64::from(target) * self.block;
                    let mut head = [0u8; 2048];
                    self.read_raw(&mut head, at)?;
                    let dot = record::parse(&head)?;
                    n.kind = Kind::Directory;
                    n.extents = vec![self.extent_of(&dot)?];
                    n.size = u64::from(dot.size);
                    let real = susp::parse(dot.system_use, usize::from(skip), &mut |c| {
                        self.continuation(c)
                    });
                    apply_rock_ridge(&mut n, &real);
                }
                apply_rock_ridge(&mut n, &su);
                if su.child_link.is_some() {
                    n.kind = Kind::Directory;
                }
            }
            Scheme::Joliet => n.name = joliet_name(r.name, is_dir),
            Scheme::Plain => n.name = plain_name(r.name, is_dir),
        }
        if n.kind == Kind::Directory {
            // A directory is known by its extent, wherever its record is.
            n.ino = n.extents[0].at;
        } else {
            n.size = match (&n.kind, n.zf) {
                (Kind::Symlink(t), _) => t.len() as u64,
                (Kind::File, Some(zf)) => zf.size,
                (Kind::File, None) => n.size,
                _ => 0,
            };
        }
        if n.name.is_empty() || n.name.contains(&b'/') || n.name == b"." || n.name == b".." {
            return Ok(None);
        }
        Ok(Some(n))
    }

    /// Reads file data at `offset` into `buf`; returns the bytes read (short only at the end
    /// of the file). A zisofs file reads uncompressed.
    pub fn read(&self, file: &Node, offset: u64, buf: &mut [u8]) -> Result<usize, IsoError> {
        if offset >= file.size {
            return Ok(0);
        }
        let want = usize::try_from((file.size - offset).min(buf.len() as u64)).unwrap_or(buf.len());
        match &file.zf {
            Some(zf) => {
                let mut stored = |at: u64, b: &mut [u8]| match self.read_stored(file, at, b)? {
                    n if n == b.len() => Ok(()),
                    _ => Err(IsoError::Malformed("zisofs data")),
                };
                zisofs::read(zf, offset, &mut buf[..want], &mut stored)?;
                Ok(want)
            }
            None => self.read_stored(file, offset, &mut buf[..want]),
        }
    }

    /// Reads the bytes of a file as stored on the disc (its extents end to end).
    fn read_stored(&self, file: &Node, offset: u64, buf: &mut [u8]) -> Result<usize, IsoError> {
        let stored: u64 = file.extents.iter().map(|e| e.len).sum();
        if offset >= stored {
            return Ok(0);
        }
        let want = usize::try_from((stored - offset).min(buf.len() as u64)).unwrap_or(buf.len());
        let mut done = 0;
        let mut base = 0u64;
        for e in &file.extents {
            if done == want {
                break;
            }
            let pos = offset + done as u64;
            if pos >= base + e.len {
                base += e.len;
                continue;
            }
            let within = pos - base;
            let n = usize::try_from((e.len - within).min((want - done) as u64)).unwrap_or(0);
            self.read_raw(&mut buf[done..done + n], e.at + within)?;
            done += n;
            base += e.len;
        }
        Ok(done)
    }
}

/// A directory's entries as they are read, each name once (plain names of different
/// versions collapse to one: the first is kept). The names seen are hashed, so a directory of
/// a million entries costs a million lookups, not a million squared.
#[derive(Default)]
struct Unique {
    nodes: Vec<Arc<Node>>,
    seen: std::collections::HashSet<Vec<u8>>,
}

impl Unique {
    fn push(&mut self, n: Node) {
        if self.seen.insert(n.name.clone()) {
            self.nodes.push(Arc::new(n));
        }
    }
}

fn placeholder_root() -> Node {
    Node {
        ino: ROOT_INO,
        parent: ROOT_INO,
        name: Vec::new(),
        kind: Kind::Directory,
        size: 0,
        perm: 0o555,
        uid: 0,
        gid: 0,
        nlink: 1,
        rdev: 0,
        mtime: (0, 0),
        atime: (0, 0),
        ctime: (0, 0),
        zisofs: false,
        zf: None,
        extents: Vec::new(),
    }
}

/// Mode type bits (POSIX `S_IFMT`).
const S_IFMT: u32 = 0o170_000;

fn apply_rock_ridge(n: &mut Node, su: &susp::SystemUse) {
    if let Some(mode) = su.mode {
        n.perm = u16::try_from(mode & 0o7777).unwrap_or(0);
        n.kind = match mode & S_IFMT {
            0o040_000 => Kind::Directory,
            0o120_000 => Kind::Symlink(su.symlink.clone().unwrap_or_default()),
            0o020_000 => Kind::CharDevice,
            0o060_000 => Kind::BlockDevice,
            0o010_000 => Kind::Fifo,
            0o140_000 => Kind::Socket,
            _ => n.kind.clone(),
        };
    }
    if let (Some(t), Kind::File) = (&su.symlink, &n.kind) {
        n.kind = Kind::Symlink(t.clone());
    }
    if let Some(u) = su.uid {
        n.uid = u;
    }
    if let Some(g) = su.gid {
        n.gid = g;
    }
    if let Some(l) = su.nlink {
        n.nlink = l.max(1);
    }
    if let Some((high, low)) = su.rdev {
        // RRIP: a 32-bit dev_t is all in the low word; else major in high, minor in low.
        let (major, minor) = if high == 0 {
            (low >> 8, low & 0xff)
        } else {
            (high, low)
        };
        n.rdev = (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12);
    }
    if let Some(ino) = su.ino.filter(|i| *i != 0) {
        if !matches!(n.kind, Kind::Directory) {
            n.ino = RR_INO_BASE + u64::from(ino);
        }
    }
    n.mtime = su.mtime.unwrap_or(n.mtime);
    n.atime = su.atime.unwrap_or(n.atime);
    n.ctime = su.ctime.unwrap_or(n.ctime);
    if let (Some(zf), Kind::File) = (su.zf, &n.kind) {
        n.zisofs = true;
        n.zf = Some(zf);
    }
}

/// An ISO 9660 identifier without its `;version`, and without the `.` of a name that has no
/// extension.
fn plain_name(id: &[u8], is_dir: bool) -> Vec<u8> {
    let mut name = id.to_vec();
    if !is_dir {
        if let Some(p) = name.iter().rposition(|&b| b == b';') {
            name.truncate(p);
        }
        if name.last() == Some(&b'.') {
            name.pop();
        }
    }
    name
}

/// A Joliet identifier (UCS-2) as UTF-8, without its `;version`.
fn joliet_name(id: &[u8], is_dir: bool) -> Vec<u8> {
    let s = volume::ucs2(id);
    let s = if is_dir {
        s.as_str()
    } else {
        s.rsplit_once(';').map_or(s.as_str(), |(n, _)| n)
    };
    s.trim_end_matches(|c| c == '.' && !is_dir)
        .as_bytes()
        .to_vec()
}

#[cfg(test)]
mod tests;
