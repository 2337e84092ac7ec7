//! Image formats: what a file holds, opened as a [`BlockDevice`].
//!
//! [`probe`] tells a format by its magic only; [`open`] opens an image in a named or probed
//! format, with its backing chain; [`info`] describes one; [`create`] makes a new one.
//! Formats ([`Format`]): raw (any file), [`qcow2`], [`vhd`] and [`vhdx`] (each read-write,
//! fixed or growing, with a backing chain for qcow2), and [`iso`] (read-only, a CD-ROM).
//! Metadata that does not hold together is a [`Corrupt`] error, whatever the format.
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]
#![forbid(unsafe_code)]

pub mod iso;
pub mod luks;
pub mod qcow2;
pub mod vhd;
pub mod vhdx;

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vdk_backends::{FileDisk, FileOptions};
use vdk_core::sys::FileExt;
use vdk_core::BlockDevice;

use qcow2::header::{Header, MAGIC};
use qcow2::{Qcow2, Qcow2Options};

/// A big-endian u32 at `at` (the caller has checked the bounds).
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A big-endian u64 at `at` (the caller has checked the bounds).
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Extents of a block format: `spots` are consecutive pieces of the guest range, each with
/// its offset in `file` if allocated. Unallocated pieces are holes, and so are the parts of
/// allocated ones that the file itself has as holes (never written).
pub(crate) fn mapped_extents(
    file: &File,
    offset: u64,
    spots: &[(u64, Option<u64>)],
) -> io::Result<vdk_core::Extents> {
    let mut e = vdk_core::Extents::new(offset);
    for (n, host) in spots {
        match host {
            None => e.push(*n, vdk_core::ExtentKind::Hole),
            Some(h) => {
                for (_, run) in vdk_backends::file_extents(file, *h, *n)?.iter() {
                    e.push(run.len, run.kind);
                }
            }
        }
    }
    Ok(e)
}

/// Calls `f(guest_offset, at, n)` for each piece of `[offset, offset + len)` that lies in one
/// block of `block` bytes (`at` is the piece's position in the request).
pub(crate) fn pieces(
    offset: u64,
    len: u64,
    block: u64,
    mut f: impl FnMut(u64, usize, usize) -> vdk_core::Result<()>,
) -> vdk_core::Result<()> {
    let mut pos = 0u64;
    while pos < len {
        let g = offset + pos;
        let n = (block - g % block).min(len - pos);
        // pos and n are within a request held in memory.
        #[allow(clippy::cast_possible_truncation)]
        f(g, pos as usize, n as usize)?;
        pos += n;
    }
    Ok(())
}

/// Zero writes for block formats that cannot free blocks (VHD, VHDX): unallocated blocks read
/// as zeroes already and are skipped; the rest get zero buffers. `piece` is a power of two no
/// larger than a block, so a piece never straddles two blocks.
pub(crate) fn zero_allocated(
    dev: &dyn BlockDevice,
    offset: u64,
    len: u64,
    piece: u64,
    fua: bool,
    allocated: impl Fn(u64) -> bool,
) -> vdk_core::Result<()> {
    let zeroes = vec![0u8; usize::try_from(piece).unwrap_or(1 << 20)];
    pieces(offset, len, piece, |pos, _, n| {
        if allocated(pos) {
            dev.write_at(&zeroes[..n], pos, false)?;
        }
        Ok(())
    })?;
    if fua {
        dev.flush()?;
    }
    Ok(())
}

/// How [`info`] and the `describe` functions open an image: read-only, taking no lock, so
/// that they can describe an image that is open for writing (by this process too).
pub(crate) const LOOK: FileOptions = FileOptions {
    read_only: true,
    direct: false,
    force_share: true,
};

/// Longest backing chain followed.
pub const MAX_CHAIN: usize = 16;

/// An image format.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Format {
    /// The bytes of the disk, as they are.
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
    /// An ISO 9660 CD/DVD image: read-only, 2048-byte blocks, a CD-ROM.
    Iso,
    /// Virtual PC / Hyper-V VHD, fixed or dynamic (qemu calls it vpc).
    Vhd,
    /// Hyper-V VHDX, fixed or dynamic.
    Vhdx,
    /// A LUKS1 or LUKS2 encrypted disk (qemu's `luks`), served as its plaintext.
    Luks,
}

impl Format {
    /// Every format, in the order help texts list them.
    pub const ALL: [Format; 6] = [
        Format::Raw,
        Format::Qcow2,
        Format::Vhd,
        Format::Vhdx,
        Format::Luks,
        Format::Iso,
    ];

    /// Its name, as `qemu-img` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Iso => "iso",
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
            Format::Luks => "luks",
        }
    }

    /// The format called `name`.
    pub fn from_name(name: &str) -> io::Result<Format> {
        match name {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "iso" => Ok(Format::Iso),
            "vhd" | "vpc" => Ok(Format::Vhd),
            "vhdx" => Ok(Format::Vhdx),
            "luks" => Ok(Format::Luks),
            other => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "unknown or unsupported image format {other:?} (vdk reads raw, qcow2, vhd, vhdx, luks and iso)"
                ),
            )),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The format an image's file name says it has (`.qcow2`, `.vhd`, `.vhdx`, `.iso`, and raw
/// for `.raw` and `.img`), if any. Names only suggest: [`probe`] reads what the file holds.
pub fn format_by_name(path: &Path) -> Option<Format> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "raw" | "img" => Some(Format::Raw),
        "qcow2" | "qcow" => Some(Format::Qcow2),
        "vhd" | "vpc" => Some(Format::Vhd),
        "vhdx" => Some(Format::Vhdx),
        "iso" => Some(Format::Iso),
        "luks" => Some(Format::Luks),
        _ => None,
    }
}

/// Refuses to write `path` as `probed` when its name says it is an image of another format
/// with a header (qcow2, VHD, VHDX): a header that is not there is a damaged image, or a
/// file that is not what its name says, and writing it as raw data would ruin it for good.
/// Naming the format (`--format raw`) says the user knows.
pub fn check_named(path: &Path, probed: Format) -> io::Result<()> {
    match format_by_name(path) {
        Some(named @ (Format::Qcow2 | Format::Vhd | Format::Vhdx | Format::Luks))
            if named != probed =>
        {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is named as a {named} image but holds {}; vdk will not write it \
                     (give --format {probed} if that is what it is)",
                    path.display(),
                    what_it_holds(probed)
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// What a probed format means, for messages about files that are not what they say.
pub fn what_it_holds(probed: Format) -> String {
    match probed {
        Format::Raw => "no image header (it reads as raw data)".to_owned(),
        other => format!("a {other} image"),
    }
}

/// The format of the image at `path`, told by its magic only: `QFI\xfb` at 0 is qcow2, an
/// ISO 9660 volume descriptor (`CD001` in sector 16) is iso, anything else is raw.
pub fn probe(path: &Path) -> io::Result<Format> {
    let f = File::open(path)?;
    let mut head = vec![0u8; iso::PROBE_LEN];
    let n = read_some(&f, &mut head, 0)?;
    head.truncate(n);
    let len = f.metadata()?.len();
    let mut tail = [0u8; 512];
    let tail_ok = len >= 512 && read_some(&f, &mut tail, len - 512)? == 512;
    Ok(if head.starts_with(&MAGIC) {
        Format::Qcow2
    } else if head.starts_with(luks::MAGIC) {
        Format::Luks
    } else if head.starts_with(vhdx::MAGIC) {
        Format::Vhdx
    } else if vhd::is_vhd(&head, if tail_ok { &tail } else { &[] }) {
        Format::Vhd
    } else if iso::is_iso(&head) {
        Format::Iso
    } else {
        Format::Raw
    })
}

fn read_some(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// The format; probed from the magic when `None`.
    pub format: Option<Format>,
    /// Refuse writes (backing files are always read-only).
    pub read_only: bool,
    /// Probe the format of backing files whose parent does not record it (off: refuse).
    pub probe_backing: bool,
    /// Take no image locks (with `read_only` only), as `qemu-img -U` does: read an image that
    /// another program has open for writing.
    pub force_share: bool,
    /// The passphrase of an encrypted (LUKS) image.
    pub key: Option<luks::Secret>,
    /// Keep a writable qcow2 image's dirty bitmaps ([`Image::bitmaps`]) instead of
    /// invalidating them: the caller marks them on every write and saves them.
    pub keep_bitmaps: bool,
}

/// An open image.
#[derive(Debug)]
pub struct Image {
    /// The disk.
    pub device: Arc<dyn BlockDevice>,
    /// Its format.
    pub format: Format,
    /// Where it keeps dirty bitmaps: a writable qcow2 image opened with
    /// [`OpenOptions::keep_bitmaps`].
    pub bitmaps: Option<Arc<dyn vdk_core::bitmap::BitmapStore>>,
}

/// An image whose metadata does not hold together: a header, table or log that is wrong,
/// or a file that is not in the format it was opened as. As an I/O error it is
/// `InvalidData`, with this inside (`io::Error::get_ref`).
#[derive(Debug, thiserror::Error)]
pub struct Corrupt {
    /// The format it was read as.
    pub format: Format,
    /// The image file, when the reader knows it.
    pub path: Option<PathBuf>,
    /// What is wrong.
    pub what: String,
}

impl fmt::Display for Corrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{}: {}", p.display(), self.what),
            None => write!(f, "corrupt {} image: {}", self.format, self.what),
        }
    }
}

impl From<Corrupt> for io::Error {
    fn from(c: Corrupt) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, c)
    }
}

impl From<Corrupt> for vdk_core::Error {
    fn from(c: Corrupt) -> vdk_core::Error {
        vdk_core::Error::Io(c.into())
    }
}

/// The error for the image `path` of `format` whose metadata is wrong in the way `what` says.
pub(crate) fn corrupt(format: Format, path: &Path, what: impl fmt::Display) -> io::Error {
    Corrupt {
        format,
        path: Some(path.to_owned()),
        what: what.to_string(),
    }
    .into()
}

/// Reads and checks the qcow2 header of `file`; returns it with the first cluster's bytes.
pub fn qcow2_header(path: &Path, file: &File) -> io::Result<(Header, Vec<u8>)> {
    let len = file.metadata()?.len();
    let mut first = vec![0u8; len.min(2 << 20) as usize];
    let n = read_some(file, &mut first, 0)?;
    first.truncate(n);
    let header = Header::parse(&first, len).map_err(|e| corrupt(Format::Qcow2, path, e))?;
    Ok((header, first))
}

/// Opens the image at `path`.
pub fn open(path: &Path, opts: &OpenOptions) -> io::Result<Image> {
    open_in_chain(path, opts, &mut Vec::new())
}

fn open_in_chain(path: &Path, opts: &OpenOptions, chain: &mut Vec<PathBuf>) -> io::Result<Image> {
    let OpenOptions {
        format,
        read_only,
        probe_backing,
        force_share,
        key: _,
        keep_bitmaps,
    } = opts.clone();
    let file_opts = FileOptions {
        read_only,
        force_share,
        ..FileOptions::default()
    };
    let canonical = fs::canonicalize(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    if chain.contains(&canonical) {
        return Err(corrupt(
            Format::Qcow2,
            path,
            "backing chain loops back to this image",
        ));
    }
    if chain.len() >= MAX_CHAIN {
        return Err(corrupt(
            Format::Qcow2,
            path,
            format!("backing chain longer than {MAX_CHAIN}"),
        ));
    }
    chain.push(canonical);
    let format = match format {
        Some(f) => f,
        None => {
            let probed = probe(path)?;
            if !read_only {
                check_named(path, probed)?;
            }
            probed
        }
    };
    let mut bitmaps = None;
    let device: Arc<dyn BlockDevice> = match format {
        Format::Raw => Arc::new(FileDisk::open(path, file_opts)?),
        Format::Iso => Arc::new(iso::IsoDisk::open(path, file_opts)?),
        Format::Vhd => Arc::new(vhd::Vhd::open(path, file_opts)?),
        Format::Vhdx => Arc::new(vhdx::Vhdx::open(path, file_opts)?),
        Format::Luks => Arc::new(
            luks::LuksDisk::open(path, file_opts, opts.key.as_ref())
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
        ),
        Format::Qcow2 => {
            let file = fs::OpenOptions::new()
                .read(true)
                .write(!read_only)
                .open(path)?;
            file_opts.lock(&file, path)?;
            let (header, first) = qcow2_header(path, &file)?;
            let backing = match header
                .backing_file(&first)
                .map_err(|e| corrupt(Format::Qcow2, path, e))?
            {
                None => None,
                Some(name) => {
                    let bpath = resolve_backing(path, &name);
                    let bformat = match &header.backing_format {
                        Some(f) => Some(Format::from_name(f)?),
                        None if probe_backing => None,
                        None => {
                            return Err(corrupt(
                                Format::Qcow2,
                                path,
                                format!(
                                    "the format of backing file {name:?} is not recorded; \
                                     vdk does not guess it unless asked to probe"
                                ),
                            ))
                        }
                    };
                    let bopts = OpenOptions {
                        format: bformat,
                        read_only: true,
                        keep_bitmaps: false,
                        ..opts.clone()
                    };
                    Some(open_in_chain(&bpath, &bopts, chain)?.device)
                }
            };
            let q = Arc::new(Qcow2::open(
                path,
                file,
                header,
                backing,
                &Qcow2Options {
                    read_only,
                    max_bytes: None,
                    key: opts.key.clone(),
                    keep_bitmaps: keep_bitmaps && !read_only,
                    tables_only: false,
                },
            )?);
            if keep_bitmaps && !read_only {
                bitmaps = Some(Arc::clone(&q) as Arc<dyn vdk_core::bitmap::BitmapStore>);
            }
            q
        }
    };
    Ok(Image {
        device,
        format,
        bitmaps,
    })
}

/// A backing file name is relative to the directory of the image that names it.
fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_owned();
    }
    image.parent().unwrap_or(Path::new(".")).join(p)
}

/// What `vdk info` shows of an image.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Bytes the file occupies on the host.
    pub disk_size: u64,
    /// qcow2 cluster size.
    pub cluster_size: Option<u64>,
    /// qcow2 version (2 or 3).
    pub version: Option<u32>,
    /// Refcount width in bits.
    pub refcount_bits: Option<u32>,
    /// Compression of compressed clusters.
    pub compression: Option<&'static str>,
    /// Backing file as recorded, and its format.
    pub backing_file: Option<String>,
    /// Format of the backing file, as recorded.
    pub backing_format: Option<String>,
    /// Marked dirty (refcounts need repair).
    pub dirty: bool,
    /// Marked corrupt.
    pub corrupt: bool,
    /// qcow2 lazy refcounts (a compatible feature): refcounts are repaired after a crash.
    pub lazy_refcounts: bool,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// Internal snapshots.
    pub snapshots: u32,
    /// Encryption method (0 none).
    pub encrypted: bool,
    /// External data file.
    pub data_file: Option<String>,
    /// The backing image, described the same way (with `--backing-chain`).
    pub backing: Option<Box<ImageInfo>>,
    /// An ISO image's volume identifier.
    pub volume_id: Option<String>,
    /// A VHD's kind: fixed or dynamic.
    pub subformat: Option<&'static str>,
    /// A LUKS image's header.
    pub luks: Option<luks::Summary>,
    /// A qcow2 image's encryption: `luks` (served), `aes` (legacy, refused).
    pub crypt: Option<&'static str>,
    /// qcow2: the persistent dirty bitmaps (when the bitmaps extension is valid).
    pub bitmaps: Vec<qcow2::bitmaps::Info>,
}

/// Describes the image at `path` (and its backing chain with `chain`).
pub fn info(path: &Path, format: Option<Format>, chain: bool) -> io::Result<ImageInfo> {
    info_in_chain(path, format, chain, 0)
}

fn info_in_chain(
    path: &Path,
    format: Option<Format>,
    chain: bool,
    depth: usize,
) -> io::Result<ImageInfo> {
    if depth > MAX_CHAIN {
        return Err(corrupt(
            Format::Qcow2,
            path,
            "backing chain too long (or a loop)",
        ));
    }
    let file = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let meta = file.metadata()?;
    let disk_size = vdk_core::sys::disk_usage(&file);
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    let mut info = ImageInfo {
        path: path.to_owned(),
        format,
        virtual_size: meta.len(),
        disk_size,
        cluster_size: None,
        version: None,
        refcount_bits: None,
        compression: None,
        backing_file: None,
        backing_format: None,
        dirty: false,
        corrupt: false,
        lazy_refcounts: false,
        extended_l2: false,
        snapshots: 0,
        encrypted: false,
        data_file: None,
        backing: None,
        volume_id: None,
        subformat: None,
        luks: None,
        crypt: None,
        bitmaps: Vec::new(),
    };
    if format == Format::Vhd {
        let (size, kind, block) = vhd::describe(path)?;
        info.virtual_size = size;
        info.subformat = Some(kind);
        info.cluster_size = block;
    }
    if format == Format::Vhdx {
        let (size, block) = vhdx::describe(path)?;
        info.virtual_size = size;
        info.cluster_size = Some(block);
    }
    if format == Format::Luks {
        let l = luks::summary(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        info.virtual_size = l.size;
        info.encrypted = true;
        info.luks = Some(l);
    }
    if format == Format::Iso {
        info.virtual_size -= info.virtual_size % u64::from(iso::SECTOR);
        info.volume_id = iso::volume_id(&file);
    }
    if format == Format::Qcow2 {
        let (h, first) = qcow2_header(path, &file)?;
        info.virtual_size = h.size;
        info.cluster_size = Some(h.cluster_size());
        info.version = Some(h.version);
        info.refcount_bits = Some(h.refcount_bits());
        info.compression = Some(match h.compression {
            qcow2::header::Compression::Zlib => "zlib",
            qcow2::header::Compression::Zstd => "zstd",
        });
        info.backing_file = h
            .backing_file(&first)
            .map_err(|e| corrupt(Format::Qcow2, path, e))?;
        info.backing_format = h.backing_format.clone();
        info.dirty = h.incompatible_features & qcow2::header::incompat::DIRTY != 0;
        info.corrupt = h.incompatible_features & qcow2::header::incompat::CORRUPT != 0;
        info.lazy_refcounts = h.compatible_features & 1 != 0;
        info.extended_l2 = h.extended_l2();
        info.snapshots = h.nb_snapshots;
        info.bitmaps = qcow2::bitmaps::list(&file, &h)
            .map_err(|e| corrupt(Format::Qcow2, path, format!("bitmaps: {e}")))?;
        info.encrypted = h.crypt_method != 0;
        info.crypt = match h.crypt_method {
            0 => None,
            1 => Some("aes"),
            _ => Some("luks"),
        };
        info.data_file = h.data_file.clone();
        if chain {
            if let Some(name) = &info.backing_file {
                let bformat = info
                    .backing_format
                    .as_deref()
                    .map(Format::from_name)
                    .transpose()?;
                let b = info_in_chain(&resolve_backing(path, name), bformat, true, depth + 1)?;
                info.backing = Some(Box::new(b));
            }
        }
    }
    Ok(info)
}

/// How to create an image.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// The format.
    pub format: Format,
    /// qcow2 cluster size.
    pub cluster_size: Option<u64>,
    /// Backing file (as it will be recorded) and its format.
    pub backing: Option<(String, Format)>,
    /// A fixed (fully allocated) image rather than a growing one (VHD).
    pub fixed: bool,
    /// Encrypt it (LUKS): the passphrase and the key slot's PBKDF2 time.
    pub encrypt: Option<luks::CreateOptions>,
}

/// Creates a new image of `size` bytes at `path` (which must not exist). If it fails, no file
/// is left behind.
pub fn create(path: &Path, size: u64, opts: &CreateOptions) -> io::Result<()> {
    if fs::symlink_metadata(path).is_ok() {
        // The caller names the path.
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "it exists already (a new image is made only where there is none)",
        ));
    }
    let made = create_new(path, size, opts);
    if let Err(e) = made {
        // Whatever part of the file was made is no image.
        let _ = fs::remove_file(path);
        return Err(match e.kind() {
            io::ErrorKind::FileTooLarge => io::Error::new(
                e.kind(),
                format!(
                    "{} ({size} bytes) is more than its file system allows in one file",
                    vdk_core::size::Human(size)
                ),
            ),
            _ => e,
        });
    }
    Ok(())
}

fn create_new(path: &Path, size: u64, opts: &CreateOptions) -> io::Result<()> {
    match opts.format {
        Format::Raw => {
            if opts.backing.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "raw images have no backing file",
                ));
            }
            FileDisk::create(path, size, FileOptions::default()).map(drop)
        }
        Format::Qcow2 => {
            let mut q = qcow2::create::CreateOptions::default();
            if let Some(cs) = opts.cluster_size {
                q.cluster_size = cs;
            }
            q.backing = opts
                .backing
                .as_ref()
                .map(|(n, f)| (n.clone(), f.name().to_owned()));
            q.encrypt.clone_from(&opts.encrypt);
            qcow2::create::create(path, size, &q).map(drop)
        }
        Format::Iso => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "vdk does not make ISO images: use xorriso or genisoimage",
        )),
        Format::Vhd => {
            if opts.backing.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "differencing VHDs are not supported: use qcow2 for a backing chain",
                ));
            }
            vhd::create(path, size, opts.fixed).map(drop)
        }
        Format::Luks => {
            let Some(enc) = &opts.encrypt else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a LUKS image needs a passphrase (--key-file FILE or --key-secret ENV)",
                ));
            };
            if opts.backing.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "LUKS images have no backing file",
                ));
            }
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)?;
            luks::create(&file, size, enc)
        }
        Format::Vhdx => {
            if opts.backing.is_some() || opts.fixed {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "vdk makes dynamic VHDX images only, without a parent",
                ));
            }
            vhdx::create(path, size)
        }
    }
}

/// `path`'s backing file named `name`, resolved as the image will resolve it.
pub fn backing_path(image: &Path, name: &str) -> PathBuf {
    resolve_backing(image, name)
}

/// Checks the consistency of the image at `path`; with `repair`, fixes refcounts. Raw images
/// have nothing to check. With `force_share` (not with `repair`) no lock is taken, so an
/// image open for writing elsewhere can be looked at.
pub fn check(
    path: &Path,
    format: Option<Format>,
    repair: bool,
    force_share: bool,
) -> io::Result<Option<qcow2::check::CheckReport>> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    match format {
        Format::Raw | Format::Iso | Format::Vhd | Format::Vhdx | Format::Luks => Ok(None),
        Format::Qcow2 => {
            let file = File::open(path)?;
            let lock = FileOptions {
                read_only: !repair,
                force_share,
                ..FileOptions::default()
            };
            lock.lock(&file, path)?;
            let (header, _) = qcow2_header(path, &file)?;
            qcow2::check::check(path, &header, repair).map(Some)
        }
    }
}

/// The internal snapshots of the qcow2 image at `path`, in table order (read without a lock,
/// as `qemu-img snapshot -l -U` does: the table changes only by a header switch). Other
/// formats have none to list and are refused with a message.
pub fn snapshots(
    path: &Path,
    format: Option<Format>,
) -> io::Result<Vec<qcow2::snapshot::Snapshot>> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    if format != Format::Qcow2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: a {} image has no internal snapshots (only qcow2 does)",
                path.display(),
                format.name()
            ),
        ));
    }
    let file = File::open(path)?;
    let (header, _) = qcow2_header(path, &file)?;
    let len = file.metadata()?.len();
    let table = qcow2::snapshot::read(&file, &header, len)
        .map_err(|e| corrupt(Format::Qcow2, path, e.to_string()))?;
    Ok(table.snapshots)
}

/// Creates, applies or deletes an internal snapshot of the qcow2 image at `path`, which must
/// not be open elsewhere (it is locked for writing, as `qemu-img snapshot` locks it). Returns
/// the disk's size before and after: applying a snapshot brings back the size it was taken at.
pub fn edit_snapshots(path: &Path, edit: &qcow2::snapshot::Edit) -> io::Result<(u64, u64)> {
    if probe(path)? != Format::Qcow2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: only qcow2 images have internal snapshots",
                path.display()
            ),
        ));
    }
    let q = qcow2_tables(path, |_| Ok(()))?;
    let before = q.size();
    q.edit_snapshots(edit)?;
    Ok((before, q.size()))
}

/// The qcow2 image at `path` opened for writing its tables (locked, as qemu-img locks it),
/// once `allow` has accepted its header. The backing chain is not needed to change tables,
/// nor an encrypted image's key (its data is not touched).
fn qcow2_tables(path: &Path, allow: impl FnOnce(&Header) -> io::Result<()>) -> io::Result<Qcow2> {
    let file = fs::OpenOptions::new().read(true).write(true).open(path)?;
    vdk_backends::lock_image(&file, path, false)?;
    let (header, _) = qcow2_header(path, &file)?;
    allow(&header)?;
    let opts = Qcow2Options {
        read_only: false,
        tables_only: true,
        ..Qcow2Options::default()
    };
    Qcow2::open(path, file, header, None, &opts)
}

/// Resizes the image at `path` to `new_size` bytes: grows it (qcow2: growing its L1 table if
/// needed; raw: extending the file), or with `shrink` makes it smaller (raw: cut; qcow2: only
/// when nothing is allocated past the new end). Other formats are refused.
pub fn resize(path: &Path, format: Option<Format>, new_size: u64, shrink: bool) -> io::Result<()> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    match format {
        Format::Raw => {
            let file = fs::OpenOptions::new().write(true).open(path)?;
            vdk_backends::lock_image(&file, path, false)?;
            if new_size < file.metadata()?.len() && !shrink {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "shrinking drops what lies past the new end: asked only with --shrink",
                ));
            }
            file.set_len(new_size)?;
            file.sync_all()
        }
        Format::Qcow2 => {
            let q = qcow2_tables(path, |h| {
                if new_size < h.size && !shrink {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "shrinking drops what lies past the new end: asked only with --shrink",
                    ));
                }
                Ok(())
            })?;
            q.resize(new_size).map_err(|e| match e {
                vdk_core::Error::Io(e) => e,
                other => io::Error::other(other),
            })
        }
        other => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("vdk does not resize {other} images"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An encrypted qcow2 image opened to change its tables, without its key, refuses every
    /// data request (its clusters would otherwise be read as if they were clear).
    #[test]
    fn a_keyless_encrypted_qcow2_refuses_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.qcow2");
        let opts = CreateOptions {
            format: Format::Qcow2,
            cluster_size: None,
            backing: None,
            fixed: false,
            encrypt: Some(luks::CreateOptions {
                secret: luks::Secret::new(b"pass".to_vec()),
                iter_time_ms: 1,
            }),
        };
        create(&path, 1 << 20, &opts).unwrap();
        let q = qcow2_tables(&path, |_| Ok(())).unwrap();
        let mut buf = [0u8; 512];
        for e in [
            q.read_at(&mut buf, 0).unwrap_err(),
            q.write_at(&buf, 0, false).unwrap_err(),
            q.write_zeroes(0, 512, true, false).unwrap_err(),
        ] {
            assert!(format!("{e:?}").contains("without its key"), "{e:?}");
        }
        q.resize(2 << 20).unwrap();
    }
}
