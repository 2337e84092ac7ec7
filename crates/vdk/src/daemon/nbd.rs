//! The daemon's NBD front end: one server on the daemon's listeners, and an export of it for
//! each open disk (with a disc in it, for a CD-ROM disk).

use std::sync::Arc;

use super::tracked::Tracked;
use vdk_nbd::{Export, Rule, Server};

use crate::control::{ApiError, ErrorKind};

/// Stands for the export name in the NBD URI templates.
const EXPORT_PLACEHOLDER: &str = "{export}";

/// The NBD server of the daemon and the URI of each of its listeners.
#[derive(Debug)]
pub struct NbdFront {
    server: Arc<Server>,
    /// One per listener, with [`EXPORT_PLACEHOLDER`] for the export name.
    uris: Vec<String>,
}

/// One export, as a disk asks for it.
#[derive(Debug)]
pub struct ExportSpec<'a> {
    /// Its name.
    pub name: &'a str,
    /// Refuse writes.
    pub read_only: bool,
    /// Who may see and open it.
    pub allow: &'a [Rule],
    /// What clients listing exports see.
    pub description: String,
}

impl NbdFront {
    /// The front end of `server`, which listens on `listeners`.
    pub fn new(server: Arc<Server>, listeners: &[vdk_nbd::Listener]) -> NbdFront {
        let uris = listeners
            .iter()
            .map(|l| l.export_uri(EXPORT_PLACEHOLDER))
            .collect();
        NbdFront { server, uris }
    }

    /// Client connections open now.
    pub fn connections(&self) -> usize {
        self.server.connections()
    }

    /// Offers `device` as the export `spec` describes, its dirty bitmaps as metadata
    /// contexts.
    pub fn export(&self, spec: ExportSpec<'_>, device: &Arc<Tracked>) -> Result<(), ApiError> {
        let mut export = Export::new(spec.name.to_owned(), device.clone());
        export.bitmaps = Some(Arc::clone(device.bitmaps()));
        export.read_only = spec.read_only;
        export.allow = spec.allow.to_vec();
        export.description = spec.description;
        self.server
            .add_export(export)
            .map_err(|e| ApiError::new(ErrorKind::AlreadyOpen, format!("NBD export: {e}")))
    }

    /// Withdraws the export `name`, ending its connections (what they sent is answered).
    pub fn withdraw(&self, name: &str) {
        self.server.remove_export(name);
    }

    /// The URIs of the export `name`, one per listener.
    pub fn uris(&self, name: &str) -> Vec<String> {
        self.uris
            .iter()
            .map(|u| u.replace(EXPORT_PLACEHOLDER, name))
            .collect()
    }

    /// Opens connections to this server from inside the daemon, for the kernel's NBD client
    /// (each a socket pair, the server on one end).
    #[cfg(target_os = "linux")]
    pub fn connector(&self) -> vdk_attach::nbd::Connect {
        let server = Arc::clone(&self.server);
        Arc::new(move || {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
            // Plain even on a `--tls require` daemon: the pair never leaves this process.
            server.spawn_own_connection(theirs);
            Ok(ours)
        })
    }

    /// Stops the server: connections finish what they have read, every export is flushed.
    pub fn stop(&self) {
        self.server.shutdown_handle().shutdown();
    }
}
