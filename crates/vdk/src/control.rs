//! The control API: JSON messages between `vdk` commands (or any script) and the daemon,
//! one request and one response per line over the control socket. docs/control-api.md is
//! the reference for users; this module is the definition, used by both sides: the daemon
//! parses a [`Request`] and answers a [`Reply`]; the [`Client`] sends a request and reads the
//! reply as the type that request returns (each variant of [`Request`] says which).

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Longest request line the daemon reads; anything longer is refused unread.
pub const MAX_REQUEST: usize = 64 << 10;

/// A request to the daemon, and (after the arrow) what it returns.
#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the daemon there, and which version is it? → [`VersionInfo`]
    Version,
    /// Open (or create) an image. → [`DiskStatus`]
    Open(Box<OpenRequest>),
    /// Close a disk. → [`DiskStatus`] (as it was)
    Close(CloseRequest),
    /// Every open disk (the caller's own, for a user the daemon serves). → `[DiskStatus]`
    List,
    /// Mount an open disk's file system. → [`DiskStatus`]
    Mount(MountRequest),
    /// Unmount an open disk's file system. → [`DiskStatus`]
    Unmount(CloseRequest),
    /// Close every disk and stop the daemon. → `{}`
    Shutdown,
    /// Read the NBD server's TLS certificates again, for new connections (SIGHUP does the
    /// same on Linux; Windows has no SIGHUP). → `{}`
    Reload,
    /// Latency histograms and counters of a disk's stats filter. → [`StatsReport`]
    Stats(DiskRequest),
    /// Change an open disk's filter settings while it is served (a rate filter's limits).
    /// → [`DiskStatus`]
    Set(SetRequest),
    /// Add, remove, clear or list an open disk's dirty bitmaps. → `[BitmapStatus]` (the
    /// disk's bitmaps after the change)
    Bitmap(BitmapRequest),
    /// Copy an open disk, as it is when this begins, into a new qcow2 image: all of it, or
    /// (`incremental`) what a dirty bitmap marks, on top of the previous backup.
    /// → [`BackupReport`]
    Backup(BackupRequest),
    /// Merge an open cow disk's overlay into its base. → [`CommitReport`]
    Commit(OverlayRequest),
    /// Empty an open cow disk's overlay. → [`CommitReport`]
    Discard(OverlayRequest),
    /// Start a new overlay on top of an open cow disk's overlay. → [`SnapshotReport`]
    Snapshot(SnapshotRequest),
    /// Take the disc out of an open CD-ROM disk. → [`DiskStatus`]
    Eject(CloseRequest),
    /// Put a new disc (an ISO image) in an open CD-ROM disk. → [`DiskStatus`]
    Insert(InsertRequest),
    /// Grow an open disk: its image, then every front end that shows it (the block
    /// device, iSCSI initiators, new NBD connections). → [`DiskStatus`]
    Resize(ResizeRequest),
    /// Mount the ISO 9660 file system of an image or an open disk. → [`FsStatus`]
    FsMount(FsMountRequest),
    /// Unmount a file system of `fs_mount` or `fs_map`. → [`FsStatus`]
    FsUnmount(FsUnmountRequest),
    /// The mounted file systems. → `[FsStatus]`
    FsList,
    /// Map a cloud drive: a bucket's objects as files. → [`FsStatus`]
    FsMap(FsMapRequest),
}

/// What the daemon answers a request with, one variant per kind of result; on the wire it is
/// the result object itself (`"result": {...}`), with no tag.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// `version`.
    Version(VersionInfo),
    /// `open`, `close`, `mount`, `unmount`, `eject`, `insert`, `resize`, `set`.
    Disk(Box<DiskStatus>),
    /// `list`.
    Disks(Vec<DiskStatus>),
    /// `stats`.
    Stats(StatsReport),
    /// `bitmap`.
    Bitmaps(Vec<BitmapStatus>),
    /// `backup`.
    Backup(BackupReport),
    /// `commit`, `discard`.
    Commit(CommitReport),
    /// `snapshot`.
    Snapshot(SnapshotReport),
    /// `fs_mount`, `fs_map`, `fs_unmount`.
    Fs(FsStatus),
    /// `fs_list`.
    Filesystems(Vec<FsStatus>),
    /// `shutdown`, `reload`: nothing to say.
    Done {},
}

/// The answer to `version`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct VersionInfo {
    /// vdk's version.
    pub version: String,
    /// The daemon's process id.
    pub pid: u32,
    /// What the daemon detached at start-up that a daemon before it, which died, had left
    /// mounted (one sentence each).
    #[serde(default)]
    pub recovered: Vec<String>,
}

/// The answer to `stats`: a stats filter's figures.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct StatsReport {
    /// The disk.
    pub id: String,
    /// Per operation (`read`, `write`, `flush`, ...).
    pub ops: OpsReport,
}

/// A stats filter's figures by operation name.
pub type OpsReport = std::collections::BTreeMap<String, OpReport>;

/// One operation's figures in a stats filter.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct OpReport {
    /// Requests.
    pub count: u64,
    /// Bytes moved (reads, writes) or affected (trims).
    pub bytes: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Mean latency, microseconds.
    pub mean_us: u64,
    /// Bucket i: requests whose latency was under 2^i microseconds (and at least 2^(i-1)).
    pub latency_us_log2_buckets: Vec<u64>,
}

/// The answer to `commit` and `discard`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct CommitReport {
    /// The disk.
    pub id: String,
    /// Bytes of data written into the base (0 for `discard`).
    pub data: u64,
    /// Bytes made to read as zeroes in the base (0 for `discard`).
    pub zeroed: u64,
}

/// The answer to `snapshot`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct SnapshotReport {
    /// The disk.
    pub id: String,
    /// The new overlay, which the disk now writes to.
    pub overlay: PathBuf,
    /// The overlay it wrote to before, now read only, under the new one.
    pub previous: PathBuf,
}

/// How the kernel sees a disk.
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attach {
    /// ublk when this kernel has it (`/dev/ublk-control`), else fuse-loop (needs root).
    /// A request's word only: the disk's status says which one it got.
    Auto,
    /// A ublk block device (`/dev/ublkbN`; needs root and the kernel's ublk_drv), which
    /// outlives a crash of the daemon: the next one takes it over.
    Ublk,
    /// A loop device over a file of the daemon's FUSE export (`/dev/loopN`; needs root).
    FuseLoop,
    /// The kernel's NBD client on connections to the daemon's own NBD server (`/dev/nbdN`;
    /// needs root and the kernel's nbd module); a restarted daemon reconnects it.
    Nbd,
    /// Windows: the disk served as an iSCSI LUN on loopback and Windows' own initiator logged
    /// in to it (a `\\.\PhysicalDriveN`; needs Administrator).
    Iscsi,
    /// No block device: NBD (and iSCSI, if asked) only.
    None,
}

impl Attach {
    /// Its name in requests and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Attach::Auto => "auto",
            Attach::Ublk => "ublk",
            Attach::FuseLoop => "fuse-loop",
            Attach::Nbd => "nbd",
            Attach::Iscsi => "iscsi",
            Attach::None => "none",
        }
    }
}

impl Attach {
    /// Whether the disk gets a Linux block device of vdk's own (ublk, nbd, fuse-loop).
    pub fn is_block_device(self) -> bool {
        matches!(self, Attach::Ublk | Attach::FuseLoop | Attach::Nbd)
    }
}

impl fmt::Display for Attach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Attach {
    type Err = String;
    fn from_str(s: &str) -> Result<Attach, String> {
        match s {
            "auto" => Ok(Attach::Auto),
            "ublk" => Ok(Attach::Ublk),
            "fuse-loop" => Ok(Attach::FuseLoop),
            "nbd" => Ok(Attach::Nbd),
            "iscsi" => Ok(Attach::Iscsi),
            "none" => Ok(Attach::None),
            _ if cfg!(windows) => Err(format!("unknown attach mode {s:?}: use iscsi or none")),
            _ => Err(format!(
                "unknown attach mode {s:?}: use auto, ublk, nbd, fuse-loop or none"
            )),
        }
    }
}

/// `fs_map`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FsMapRequest {
    /// The bucket and prefix: `s3://BUCKET/PREFIX`, `gs://`, `az://`, `file:///DIR`.
    pub url: String,
    /// Where to mount it (an absolute path; created if missing).
    pub dir: PathBuf,
    /// A name for it (default: a new UUID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The cache directory (absolute; default: `drives/LABEL` in the daemon's directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<PathBuf>,
    /// The S3 endpoint URL (default: `AWS_ENDPOINT_URL`, else AWS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The S3 region (default: `AWS_REGION`, else us-east-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The client's store variables, as in `open`'s `cloud.env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<vdk_objstore::StoreEnv>,
    /// Every local user may read the drive (files 0644, folders 0755); by default only the
    /// user whose request mapped it (0600, 0700).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_other: bool,
}

/// `fs_mount`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FsMountRequest {
    /// An open disk (id or image path), or an image file (an absolute path) of any format
    /// vdk reads, holding an ISO 9660 file system.
    pub source: String,
    /// Where to mount it (an absolute path; created if missing).
    pub dir: PathBuf,
}

/// `fs_unmount`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FsUnmountRequest {
    /// The mount point.
    pub dir: PathBuf,
    /// Detach it even if busy.
    #[serde(default)]
    pub force: bool,
}

/// A mounted file system, as `fs_mount` and `fs_list` report it.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct FsStatus {
    /// Where it is mounted.
    pub dir: PathBuf,
    /// Its type: `iso9660` or `cloud-drive`.
    pub kind: String,
    /// What it reads: an image file, or an open disk's image.
    pub source: String,
    /// The open disk it reads, if any.
    pub disk: Option<String>,
    /// The volume label, or the cloud drive's label.
    pub label: String,
    /// Which names it shows: `rock-ridge`, `joliet` or `iso9660`; `objects` for a drive.
    pub names: String,
    /// The size of the image in bytes (0 for a drive).
    pub size: u64,
    /// A cloud drive's cache directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<PathBuf>,
}

/// `insert`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InsertRequest {
    /// The disk's id, or its image's absolute path.
    pub disk: String,
    /// The new disc: an ISO image (an absolute path).
    pub image: PathBuf,
}

/// `resize`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    /// The disk's id, or its image's absolute path.
    pub disk: String,
    /// The new size in bytes: not less than the disk's size (a disk shrinks only closed).
    pub size: u64,
}

/// `snapshot`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The disk's id, or its image's or overlay's absolute path.
    pub disk: String,
    /// The new overlay (an absolute path; must not exist).
    pub new: PathBuf,
    /// Even while a file system on the disk is mounted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// `commit` and `discard`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OverlayRequest {
    /// The disk's id, or its image's or overlay's absolute path.
    pub disk: String,
    /// Even while a file system on the disk is mounted (it sees its disk change under it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// A request about one disk.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRequest {
    /// The disk's id, or its image's absolute path.
    pub disk: String,
}

/// `set`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SetRequest {
    /// The disk's id, or its image's absolute path.
    pub disk: String,
    /// Changes, applied in order: `rate:KEY=VALUE,...` (keys of the rate filter; `0` or
    /// `off` lifts a limit, keys not named keep their values) or `rate=BYTES_PER_SECOND`.
    pub settings: Vec<String>,
}

/// What `bitmap` does.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BitmapAction {
    /// Only answer the disk's bitmaps.
    #[default]
    List,
    /// Add a clean bitmap `name`: from now on the disk's writes, zeroes and trims mark it.
    Add,
    /// Remove the bitmap `name`.
    Remove,
    /// Make the bitmap `name` clean.
    Clear,
}

/// `bitmap`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BitmapRequest {
    /// The disk's id, or its image's absolute path.
    pub disk: String,
    /// What to do.
    #[serde(default)]
    pub action: BitmapAction,
    /// The bitmap (all but `list`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// With `add`: bytes per bit, a power of two from 512 (default 65536).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granularity: Option<u64>,
    /// With `add`: kept in the image (qcow2), across closes and restarts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub persistent: bool,
}

/// One dirty bitmap of a disk.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct BitmapStatus {
    /// Its name (the NBD meta context is `qemu:dirty-bitmap:NAME`).
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Bytes marked dirty.
    pub dirty: u64,
    /// Kept in the image (qcow2's bitmaps extension).
    #[serde(default)]
    pub persistent: bool,
    /// Found in use in the image when it was opened (it was not closed cleanly): it may
    /// have missed writes, marks nothing and cannot be backed up from; remove it.
    #[serde(default)]
    pub inconsistent: bool,
    /// The last backup made with it (`backup`), the base of the next incremental one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<PathBuf>,
}

/// `backup`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    /// The disk's id, or its image's absolute path.
    pub disk: String,
    /// The new qcow2 image (an absolute path where no file is).
    pub target: PathBuf,
    /// A dirty bitmap of the disk: a full backup clears it when it begins (it then marks
    /// what changes after the backup's moment); an incremental one copies what it marks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// Copy only what `bitmap` marks, into an image whose backing file is the previous
    /// backup.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub incremental: bool,
    /// With `incremental`: the previous backup (by default the last one made with the
    /// bitmap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<PathBuf>,
}

/// The answer to `backup`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct BackupReport {
    /// The disk.
    pub id: String,
    /// The image made.
    pub target: PathBuf,
    /// Its backing file (an incremental backup's previous one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<PathBuf>,
    /// Bytes looked at (all of the disk, or what the bitmap marked).
    pub scanned: u64,
    /// Bytes of data written into it (zeroes are recorded, not written).
    pub copied: u64,
}

/// `open`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OpenRequest {
    /// The image: an absolute path.
    pub path: PathBuf,
    /// Size in bytes of a new image (default 100 MiB); an existing one must have this size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Open read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Image format; probed when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// How the kernel sees the disk: `fuse-loop` or `none`; the default is fuse-loop for
    /// root and none for other users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<Attach>,
    /// Format the disk with this file system (ext4, xfs, vfat): a new image, or a blank one
    /// (all zeroes or unallocated); one that holds data only with `force`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mkfs: Option<String>,
    /// With `mkfs`: format even a disk that holds data (it is erased).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    /// Fail if the image does not exist instead of creating it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_create: bool,
    /// Mount the disk's file system here (an absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<PathBuf>,
    /// NBD export name; the disk's id when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_name: Option<String>,
    /// Who may see and open the NBD export: `ADDR[/PREFIX]`, `unix`, `cert:NAME` (any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Probe the format of backing files whose parent does not record it.
    #[serde(default)]
    pub probe_backing: bool,
    /// Filters over the image, in order, the first over the image: `NAME[:KEY=VALUE,...]`
    /// (cow, cache, readonly, stats, error, delay, partition, rate, blocksize; docs/filters.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<String>,
    /// Serve the disk as a LUN of an iSCSI target (a CD-ROM LUN for an ISO).
    #[serde(default)]
    pub iscsi: bool,
    /// The target's iSCSI name; by default one derived from the disk's id. Disks opened with
    /// the same name are LUNs of one target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iscsi_target: Option<String>,
    /// The LUN; by default the lowest free one of the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iscsi_lun: Option<u16>,
    /// Also serve the disk to a VM as a vhost-user-blk device on this Unix socket (an
    /// absolute path; a socket file already there is replaced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_user: Option<PathBuf>,
    /// For an object-store disk (`path` an `s3://`, `gs://`, `az://` or `file://` URL): how
    /// to reach it and cache it.
    #[serde(default, skip_serializing_if = "CloudOptions::is_default")]
    pub cloud: CloudOptions,
    /// A LUKS image's passphrase: a file the daemon reads (absolute; its caller must be able
    /// to read it), all of it, byte for byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// A LUKS image's passphrase itself (`vdk open --key-secret ENV` sends the variable's
    /// value); never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret: Option<Redacted>,
}

/// A string that is a secret: serialised as it is, shown as `..` in logs and debug output.
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Redacted(pub String);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("..")
    }
}

impl Drop for Redacted {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// How to reach and cache a disk in object storage. The store's settings and credentials come
/// from `env`, the `AWS_*`, `GOOGLE_*` and `AZURE_*` variables of the client (the `vdk`
/// command sends its own), or from the daemon's environment when it is absent.
#[derive(Clone, Debug, Default, Deserialize, Eq, PartialEq, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CloudOptions {
    /// The S3 endpoint URL (default: `AWS_ENDPOINT_URL`, else AWS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The S3 region (default: `AWS_REGION`, else us-east-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The cache directory (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<PathBuf>,
    /// The most bytes the cache holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_size: Option<u64>,
    /// The key file of an encrypted disk (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Drop chunks a stopped writer left in the cache instead of uploading them.
    #[serde(default)]
    pub discard_unflushed: bool,
    /// Seconds a chunk stays dirty before it is uploaded in the background (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writeback_delay: Option<u64>,
    /// The client's store variables (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`,
    /// `GOOGLE_APPLICATION_CREDENTIALS`, ...); the daemon's own environment when absent.
    /// Never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<vdk_objstore::StoreEnv>,
}

impl CloudOptions {
    /// Whether nothing is set.
    pub fn is_default(&self) -> bool {
        *self == CloudOptions::default()
    }
}

/// `close` and `unmount`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CloseRequest {
    /// The disk's id, or its image's absolute path.
    pub disk: String,
    /// Detach even if busy: whatever still uses it gets I/O errors.
    #[serde(default)]
    pub force: bool,
}

/// `mount`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MountRequest {
    /// The disk's id, or its image's absolute path.
    pub disk: String,
    /// Where to mount (an absolute path; created if missing).
    pub dir: PathBuf,
    /// Format first with this file system (ext4, xfs, vfat): only a blank disk, unless
    /// `force`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mkfs: Option<String>,
    /// With `mkfs`: format even a disk that holds data (it is erased).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// An open disk, as `open` and `list` report it.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct DiskStatus {
    /// Stable id, derived from the image's canonical path.
    pub id: String,
    /// The image's canonical path.
    pub image: PathBuf,
    /// Image format.
    pub format: String,
    /// Size in bytes.
    pub size: u64,
    /// Opened read-only.
    pub read_only: bool,
    /// How it is attached: `fuse-loop` or `none`.
    pub attach: Attach,
    /// The block device, if attached.
    pub block_device: Option<PathBuf>,
    /// Where its file system is mounted, if it is.
    pub mount: Option<PathBuf>,
    /// NBD export name.
    pub export: String,
    /// NBD URIs of the export, one per listener of the daemon (none while a CD-ROM disk has
    /// no disc).
    pub nbd: Vec<String>,
    /// iSCSI URLs of the disk's LUN, one per portal of the daemon (empty if not served over
    /// iSCSI).
    #[serde(default)]
    pub iscsi: Vec<String>,
    /// The vhost-user-blk socket a VM attaches the disk by, if served so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_user: Option<PathBuf>,
    /// Whether a VM is connected to that socket now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vhost_user_connected: bool,
    /// A CD-ROM disk whose disc is out (`vdk eject`, or an initiator's eject).
    #[serde(default)]
    pub ejected: bool,
    /// Filters over the image, in order.
    #[serde(default)]
    pub filters: Vec<String>,
    /// I/O counters since the disk was opened.
    pub stats: Counters,
    /// With a stats filter: per operation, counts, bytes, errors, mean latency and a log2
    /// latency histogram (as `vdk stats` shows them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<OpsReport>,
    /// Its dirty bitmaps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bitmaps: Vec<BitmapStatus>,
    /// The backup running now, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupProgress>,
}

/// How far a running backup is.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct BackupProgress {
    /// The image being made.
    pub target: PathBuf,
    /// Bytes to look at.
    pub total: u64,
    /// Bytes looked at so far.
    pub done: u64,
}

/// A stats filter's figures as `stats` and `list` answer them.
pub fn stats_report(stats: &vdk_filters::Stats) -> OpsReport {
    stats
        .snapshot()
        .into_iter()
        .map(|(kind, s)| {
            let report = OpReport {
                count: s.count,
                bytes: s.bytes,
                errors: s.errors,
                mean_us: s.total_us.checked_div(s.count).unwrap_or(0),
                latency_us_log2_buckets: s.buckets,
            };
            (kind.name().to_owned(), report)
        })
        .collect()
}

/// I/O counters of a disk.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize)]
pub struct Counters {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Flushes.
    pub flushes: u64,
    /// Trims and zero writes.
    pub trims: u64,
    /// Requests that failed.
    pub errors: u64,
}

/// What went wrong, for scripts to branch on.
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is not valid JSON, too long, or not a request.
    BadRequest,
    /// An argument is wrong (a size, a format, a path that is not a file).
    Invalid,
    /// No such disk or file.
    NotFound,
    /// The image is open already.
    AlreadyOpen,
    /// The disk is in use (a busy mount).
    Busy,
    /// Not allowed (file permissions, not root).
    Permission,
    /// Not supported by this build or this machine.
    Unsupported,
    /// A system call or a tool failed.
    Io,
}

/// An error answered by the daemon.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ApiError {
    /// Its kind.
    pub kind: ErrorKind,
    /// What to tell the user.
    pub message: String,
}

impl ApiError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            message: message.into(),
        }
    }

    /// An argument is wrong.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::Invalid, message)
    }

    /// An OS error, kind taken from the errno, message prefixed with `what`.
    pub fn io(what: impl fmt::Display, e: &io::Error) -> ApiError {
        let kind = match e.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => ErrorKind::Permission,
            io::ErrorKind::InvalidInput => ErrorKind::Invalid,
            io::ErrorKind::ResourceBusy => ErrorKind::Busy,
            io::ErrorKind::Unsupported => ErrorKind::Unsupported,
            _ => ErrorKind::Io,
        };
        ApiError::new(
            kind,
            crate::message::one_line([what.to_string(), e.to_string()]),
        )
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

/// The daemon's answer: `{"ok":true,"result":…}` or `{"ok":false,"error":{…}}`.
#[derive(Debug, Deserialize, Serialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// What it returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

impl Response {
    /// The answer to a request that succeeded with `reply`, or failed.
    pub fn of(done: Result<Reply, ApiError>) -> Response {
        match done {
            Ok(reply) => Response::ok(reply),
            Err(e) => Response::err(e),
        }
    }

    /// A success carrying `result`.
    pub fn ok(result: impl Serialize) -> Response {
        Response {
            ok: true,
            result: Some(serde_json::to_value(result).unwrap_or(serde_json::Value::Null)),
            error: None,
        }
    }

    /// A failure.
    pub fn err(e: ApiError) -> Response {
        Response {
            ok: false,
            result: None,
            error: Some(e),
        }
    }
}

/// Reads one line of at most [`MAX_REQUEST`] bytes. `Ok(None)` at end of stream.
pub fn read_line(r: &mut impl BufRead) -> io::Result<Option<Result<String, ApiError>>> {
    // Room for the longest line at once: a growing buffer would leave copies of a secret in
    // the line (a passphrase) where no one wipes them.
    let mut line = Vec::with_capacity(MAX_REQUEST + 1);
    let n = r
        .by_ref()
        .take(MAX_REQUEST as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') && line.len() > MAX_REQUEST {
        return Ok(Some(Err(ApiError::new(
            ErrorKind::BadRequest,
            format!("request longer than {MAX_REQUEST} bytes"),
        ))));
    }
    match String::from_utf8(line) {
        Ok(s) => Ok(Some(Ok(s))),
        Err(_) => Ok(Some(Err(ApiError::new(
            ErrorKind::BadRequest,
            "request is not UTF-8",
        )))),
    }
}

/// Parses a request line.
pub fn parse(line: &str) -> Result<Request, ApiError> {
    serde_json::from_str(line)
        .map_err(|e| ApiError::new(ErrorKind::BadRequest, format!("bad request: {e}")))
}

/// A connection to the daemon.
pub struct Client {
    reader: BufReader<Box<dyn Read + Send>>,
    writer: Box<dyn Write + Send>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the daemon's control socket at `path`.
    #[cfg(unix)]
    pub fn connect(path: &Path) -> io::Result<Client> {
        let writer = std::os::unix::net::UnixStream::connect(path)?;
        let reader: Box<dyn Read + Send> = Box::new(writer.try_clone()?);
        Ok(Client {
            reader: BufReader::new(reader),
            writer: Box::new(writer),
        })
    }

    /// Connects to the daemon's named pipe `path` (`\\.\pipe\NAME`).
    #[cfg(windows)]
    pub fn connect(path: &Path) -> io::Result<Client> {
        let writer = vdk_core::sys::connect_pipe(path)?;
        let reader: Box<dyn Read + Send> = Box::new(writer.try_clone()?);
        Ok(Client {
            reader: BufReader::new(reader),
            writer: Box::new(writer),
        })
    }

    /// Sends `req` and waits for the answer, read as `T`: the type the request returns
    /// ([`Request`] says which; `serde_json::Value` takes any).
    pub fn call<T: DeserializeOwned>(&mut self, req: &Request) -> io::Result<Result<T, ApiError>> {
        // Room for the longest request, so that no copy of a secret in it is left behind by
        // a growing buffer; wiped once sent.
        let mut line = zeroize::Zeroizing::new(Vec::with_capacity(MAX_REQUEST + 1));
        serde_json::to_writer(&mut *line, req)?;
        line.push(b'\n');
        // A daemon that refuses the caller outright (another user) answers at once and hangs
        // up: the request may then meet a closed socket, but the answer is there to read.
        let sent = self.writer.write_all(&line);
        let answer = match (read_line(&mut self.reader), sent) {
            (Ok(Some(answer)), _) => answer,
            (_, Err(e)) => return Err(e),
            (Err(e), Ok(())) => return Err(e),
            (Ok(None), Ok(())) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the daemon closed the connection without answering",
                ))
            }
        };
        let answer = answer.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let resp: Response = serde_json::from_str(&answer)?;
        Ok(match (resp.ok, resp.error) {
            (true, _) => {
                let result = resp.result.unwrap_or(serde_json::Value::Null);
                let typed = serde_json::from_value(result).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the daemon answered what this vdk cannot read: {e}"),
                    )
                })?;
                Ok(typed)
            }
            (false, Some(e)) => Err(e),
            (false, None) => Err(ApiError::new(ErrorKind::Io, "the daemon gave no reason")),
        })
    }
}
