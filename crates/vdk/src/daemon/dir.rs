//! The daemon's own directory: made with the right mode, or taken only if it already is
//! exactly that.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context};

/// The mode of the daemon's directory: its user's alone, or with `--owner` searchable by
/// that user too, who may reach the sockets in it but not list or change it.
pub fn dir_mode(owner: bool) -> u32 {
    if owner {
        0o711
    } else {
        0o700
    }
}

/// Makes the daemon's directory `dir` with `mode`, or takes the one there only if it is a
/// directory (not a symbolic link) of the daemon's own user with exactly that mode. An existing
/// directory is never changed: one that is someone else's, or open wider (`/tmp`), or closed
/// to the user it must serve, is refused with what to do.
pub fn own_dir(dir: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let shown = dir.display();
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .mode(mode)
                .create(dir)
                .with_context(|| format!("cannot create {shown}"))?;
            // Made here: its mode is set whatever the umask took away.
            fs::set_permissions(dir, fs::Permissions::from_mode(mode))
                .with_context(|| format!("cannot set the mode of {shown}"))?;
            Ok(())
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot use {shown}"))),
        Ok(m) if m.file_type().is_symlink() => bail!(
            "{shown} is a symbolic link: the daemon keeps its socket in a directory of its own \
             (remove it, or give --socket in a new directory)"
        ),
        Ok(m) if !m.is_dir() => bail!("{shown} is not a directory"),
        Ok(m) if m.uid() != rustix::process::geteuid().as_raw() => bail!(
            "{shown} belongs to uid {}, not to this daemon's user (uid {}): give --socket in \
             a directory of your own, or a new one",
            m.uid(),
            rustix::process::geteuid().as_raw()
        ),
        Ok(m) if m.mode() & 0o7777 != mode => bail!(
            "{shown} has mode {:04o}, not the {mode:04o} the daemon needs (others must not reach \
             what is in it, {}): the daemon changes no directory it did not make; give \
             --socket in a new directory, or remove {shown}",
            m.mode() & 0o7777,
            if mode == 0o711 {
                "and the --owner user must reach its socket"
            } else {
                "nor enter it"
            }
        ),
        Ok(_) => Ok(()),
    }
}
