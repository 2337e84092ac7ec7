//! What `vdk serve` and `vdk daemon` set up the same way: the listeners `--listen` names, and
//! the signals (SIGHUP reloads the TLS certificates; SIGINT or SIGTERM stops, a second one
//! exits at once).

use std::net::TcpListener;
use std::sync::Arc;

use anyhow::Context;
use tracing::info;
use vdk_nbd::{Listener, Tls};

/// The `--listen` URIs, by protocol.
#[derive(Debug, Default)]
pub struct Listen {
    /// `tcp://HOST:PORT` and `unix:///PATH`: NBD.
    pub nbd: Vec<String>,
    /// `iscsi://HOST[:PORT]`: iSCSI portals.
    pub iscsi: Vec<String>,
    /// `vhost-user-blk:///PATH`: one vhost-user socket per export (the paths).
    pub vhost: Vec<String>,
}

/// The scheme of a vhost-user-blk export's socket.
pub const VHOST_SCHEME: &str = "vhost-user-blk://";

impl Listen {
    /// Sorts `uris` by protocol.
    pub fn split(uris: &[String]) -> Listen {
        let (vhost, rest): (Vec<String>, Vec<String>) = uris
            .iter()
            .cloned()
            .partition(|u| u.starts_with(VHOST_SCHEME));
        let (iscsi, nbd) = rest.into_iter().partition(|u| u.starts_with("iscsi://"));
        let vhost = vhost
            .iter()
            .map(|u| u[VHOST_SCHEME.len()..].to_owned())
            .collect();
        Listen { nbd, iscsi, vhost }
    }
}

/// Listens on every NBD URI; the first that fails is the error, with its URI.
pub fn bind_nbd(uris: &[String]) -> anyhow::Result<Vec<Listener>> {
    uris.iter()
        .map(|uri| match Listener::bind(uri) {
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                Err(anyhow::anyhow!("--listen: {e}"))
            }
            l => l.with_context(|| format!("cannot listen on {uri}")),
        })
        .collect()
}

/// Listens on every iSCSI portal; the first that fails is the error, with its URI.
pub fn bind_iscsi(uris: &[String]) -> anyhow::Result<Vec<TcpListener>> {
    uris.iter()
        .map(|u| vdk_iscsi::bind(u).with_context(|| format!("cannot listen on {u}")))
        .collect()
}

/// Handles SIGHUP (the TLS certificates of `tls` are read again, for new connections) and
/// SIGINT and SIGTERM: the first calls `stop`, a second exits at once. Closing the returned
/// handle ends the signal thread.
#[cfg(unix)]
pub fn on_signals(
    tls: Option<Arc<Tls>>,
    stop: impl FnOnce(i32) + Send + 'static,
) -> anyhow::Result<SignalHandler> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    use signal_hook::iterator::Signals;
    use std::thread;
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGHUP]).context("cannot install signal handlers")?;
    let handle = signals.handle();
    let mut stop = Some(stop);
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                use tracing::warn;
                if sig == SIGHUP {
                    reload(tls.as_deref());
                } else if let Some(stop) = stop.take() {
                    info!(signal = sig, "shutting down: finishing what is in flight");
                    stop(sig);
                } else {
                    warn!(signal = sig, "second signal: exiting without waiting");
                    std::process::exit(1);
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(SignalHandler(handle))
}

/// What [`on_signals`] installed.
#[cfg(unix)]
pub struct SignalHandler(signal_hook::iterator::Handle);

#[cfg(unix)]
impl SignalHandler {
    /// Ends the thread; signals are no longer handled.
    pub fn close(&self) {
        self.0.close();
    }
}

/// Handles Ctrl-C, Ctrl-Break and the console closing (SetConsoleCtrlHandler): the first
/// calls `stop`, a second exits at once. Windows has no SIGHUP: TLS certificates are read
/// when the server starts.
#[cfg(windows)]
pub fn on_signals(
    tls: Option<Arc<Tls>>,
    stop: impl FnOnce(i32) + Send + 'static,
) -> anyhow::Result<SignalHandler> {
    use std::sync::atomic::{AtomicBool, Ordering};
    drop(tls);
    let closed = Arc::new(AtomicBool::new(false));
    let done = Arc::clone(&closed);
    let mut stop = Some(stop);
    // The handler runs on a thread Windows starts for each event.
    ctrlc::set_handler(move || {
        if done.load(Ordering::SeqCst) {
            return;
        }
        if let Some(stop) = stop.take() {
            info!("Ctrl-C: shutting down, finishing what is in flight");
            stop(2);
        } else {
            tracing::warn!("second Ctrl-C: exiting without waiting");
            std::process::exit(1);
        }
    })
    .context("cannot install the Ctrl-C handler")?;
    Ok(SignalHandler(closed))
}

/// What [`on_signals`] installed.
#[cfg(windows)]
pub struct SignalHandler(Arc<std::sync::atomic::AtomicBool>);

#[cfg(windows)]
impl SignalHandler {
    /// From now on Ctrl-C is ignored (the process is ending anyway).
    pub fn close(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// SIGHUP: reads the TLS certificates again, and says how it went.
#[cfg(unix)]
fn reload(tls: Option<&Tls>) {
    use tracing::warn;
    match tls.map(Tls::reload) {
        None => info!("SIGHUP: nothing to reload (TLS is off)"),
        Some(Ok(())) => info!("SIGHUP: TLS certificates reloaded"),
        Some(Err(e)) => warn!(error = %e, "SIGHUP: TLS certificates not reloaded"),
    }
}
