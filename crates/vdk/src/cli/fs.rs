//! `vdk fs`: the ISO browser and the cloud drive, FUSE file systems the daemon runs (Linux
//! only: they are file systems of the Linux kernel's FUSE).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use vdk_core::size::Human;

use super::disks::{absolute, ask, call, disk_key, print_json, try_connect};
use crate::control::{FsMapRequest, FsMountRequest, FsStatus, FsUnmountRequest, Request};

/// `vdk fs`: file systems in user space, run by the daemon.
#[derive(Debug, clap::Subcommand)]
pub enum FsCommand {
    /// Mount the ISO 9660 file system (Joliet, Rock Ridge, El Torito) of an image (an ISO,
    /// or an ISO inside any image vdk reads) or of an open disk, read-only, on DIR.
    Mount(FsMountArgs),
    /// Unmount a file system mounted with `vdk fs mount`.
    Unmount(FsUnmountArgs),
    /// Map a cloud drive: the objects and prefixes under a bucket's prefix as the files and
    /// folders of DIR. Reads fetch what they need into the cache; a file written is uploaded
    /// when closed or synced.
    Map(FsMapArgs),
    /// Unmap a cloud drive (uploading what is not uploaded yet).
    Unmap(FsUnmountArgs),
    /// List the file systems mounted with `vdk fs mount` and the drives mapped with `vdk fs
    /// map`.
    List(super::list::FsListArgs),
}

/// `vdk fs map`.
#[derive(Debug, Args)]
pub struct FsMapArgs {
    /// The bucket and prefix: s3://BUCKET[/PREFIX], gs://, az://, file:///DIR.
    url: String,
    /// Where to mount it (created if missing).
    dir: PathBuf,
    /// A name for the drive (default: a new UUID), shown by `vdk fs list`.
    #[arg(long, value_name = "NAME")]
    label: Option<String>,
    /// The cache directory (default: drives/LABEL in the daemon's directory).
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Let every local user read the drive (files 0644, folders 0755). By default its files
    /// are yours alone (0600, 0700), whoever runs the daemon.
    #[arg(long)]
    allow_other: bool,
    #[command(flatten)]
    store: crate::cloud::StoreArgs,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// `vdk fs mount`.
#[derive(Debug, Args)]
pub struct FsMountArgs {
    /// An image file, or an open disk (its id or image).
    source: String,
    /// Where to mount it (created if missing).
    dir: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// `vdk fs unmount`.
#[derive(Debug, Args)]
pub struct FsUnmountArgs {
    /// The mount point.
    dir: PathBuf,
    /// Detach it even if busy (it goes when its last user lets go).
    #[arg(long)]
    force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// Runs `vdk fs ...`.
pub fn run(cmd: FsCommand) -> anyhow::Result<()> {
    match cmd {
        FsCommand::Mount(a) => {
            let req = Request::FsMount(FsMountRequest {
                source: disk_key(&a.source)?,
                dir: absolute(&a.dir)?,
            });
            let Some(st) = ask::<FsStatus>(&a.socket, true, &req, a.json)? else {
                return Ok(());
            };
            crate::outln!(
                "mounted {} ({}, {} names, label {:?}) on {}",
                st.source,
                Human(st.size),
                st.names,
                st.label,
                st.dir.display()
            )?;
        }
        FsCommand::Map(a) => {
            let req = Request::FsMap(FsMapRequest {
                url: a.url,
                dir: absolute(&a.dir)?,
                label: a.label,
                cache: a.cache.as_deref().map(absolute).transpose()?,
                endpoint: a.store.s3_endpoint,
                region: a.store.s3_region,
                env: Some(vdk_objstore::StoreEnv::current()),
                allow_other: a.allow_other,
            });
            let Some(st) = ask::<FsStatus>(&a.socket, true, &req, a.json)? else {
                return Ok(());
            };
            crate::outln!(
                "mapped {} on {} (label {}, cache {})",
                st.source,
                st.dir.display(),
                st.label,
                st.cache.as_deref().unwrap_or(Path::new("-")).display()
            )?;
        }
        FsCommand::Unmount(a) | FsCommand::Unmap(a) => {
            let paths = &a.socket.paths()?;
            let dir = absolute(&a.dir)?;
            let Some(mut client) = try_connect(paths)? else {
                // No daemon: a mount a dead one left can still be taken away.
                if crate::daemon::recover::is_stale_fuse(&dir) {
                    rustix::mount::unmount(&dir, rustix::mount::UnmountFlags::DETACH)
                        .with_context(|| format!("cannot detach {}", dir.display()))?;
                    return crate::outln!(
                        "detached {}: a stale mount (the vdk daemon that served it had died)",
                        dir.display()
                    );
                }
                bail!(
                    "no vdk daemon is running on {} (nothing is mounted by vdk)",
                    paths.socket.display()
                );
            };
            let req = Request::FsUnmount(FsUnmountRequest {
                dir: absolute(&a.dir)?,
                force: a.force,
            });
            let st: FsStatus = call(&mut client, &req)?;
            if a.json {
                return print_json(&st);
            }
            match st.kind.as_str() {
                "stale" => crate::outln!(
                    "detached {}: a stale mount (the vdk daemon that served it had died)",
                    st.dir.display()
                )?,
                "cloud-drive" => crate::outln!("unmapped {}", st.dir.display())?,
                _ => crate::outln!("unmounted {}", st.dir.display())?,
            }
        }
        FsCommand::List(a) => {
            let paths = &a.socket.paths()?;
            let list: Vec<FsStatus> = match try_connect(paths)? {
                Some(mut client) => call(&mut client, &Request::FsList)?,
                None => Vec::new(),
            };
            if a.json {
                return print_json(&list);
            }
            if list.is_empty() {
                if !a.no_headers {
                    crate::outln!("no file systems mounted")?;
                }
            } else {
                super::list::print_filesystems(&list, a.no_headers)?;
            }
        }
    }
    Ok(())
}
