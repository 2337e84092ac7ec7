//! The NBD server options shared by `vdk serve` and `vdk daemon`: TLS and resource limits
//! (the connection limits apply to iSCSI portals too).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use vdk_nbd::{ServerConfig, Tls, TlsMode};

/// TLS and limits of an NBD server.
#[derive(Debug, Args)]
pub struct NbdArgs {
    /// NBD over TLS: off, on (clients choose) or require (nothing but STARTTLS until TLS is
    /// up).
    #[arg(long, value_name = "MODE", default_value = "off")]
    pub tls: String,
    /// The TLS certificates: server-cert.pem, server-key.pem and, for --tls-verify-peer,
    /// ca-cert.pem (nbdkit's and qemu's layout).
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// TLS clients must show a certificate signed by ca-cert.pem.
    #[arg(long)]
    pub tls_verify_peer: bool,
    /// TLS with pre-shared keys (USERNAME:HEXKEY lines): not available, see the error.
    #[arg(long, value_name = "FILE")]
    pub tls_psk: Option<PathBuf>,
    /// Most connections at once (NBD; and iSCSI, counted apart).
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_connections: usize,
    /// Most connections at once from one address (NBD; and iSCSI, counted apart).
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_connections_per_address: usize,
    /// Close NBD connections after this many seconds without a request (0: never).
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    pub idle_timeout: u64,
    /// Close an NBD connection whose request stops arriving half way, or whose client stops
    /// taking replies, for this many seconds.
    #[arg(long, default_value_t = 60, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub io_timeout: u64,
    /// TCP keep-alive: probe an idle connection after this many seconds; a client whose host
    /// vanished (no FIN, no RST: a half-open connection) is cut after about twice this.
    #[arg(long, default_value_t = 60, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub keepalive: u64,
    /// Longest an NBD handshake (TLS included) may take, in seconds.
    #[arg(long, default_value_t = 30, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub handshake_timeout: u64,
}

impl NbdArgs {
    /// The server configuration these options ask for.
    pub fn config(&self, threads: usize) -> anyhow::Result<ServerConfig> {
        Ok(ServerConfig {
            threads_per_connection: threads,
            handshake_timeout: Duration::from_secs(self.handshake_timeout),
            io_timeout: Duration::from_secs(self.io_timeout),
            keepalive: Duration::from_secs(self.keepalive),
            idle_timeout: (self.idle_timeout > 0).then(|| Duration::from_secs(self.idle_timeout)),
            max_connections: self.max_connections,
            max_connections_per_address: self.max_connections_per_address,
            tls: self.tls()?,
            ..Default::default()
        })
    }

    /// The TLS asked for, if any.
    fn tls(&self) -> anyhow::Result<Option<Arc<Tls>>> {
        let mode: TlsMode = self
            .tls
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--tls: {e}"))?;
        if self.tls_psk.is_some() {
            bail!(
                "--tls-psk: TLS with pre-shared keys is not available: vdk's TLS library \
                 (rustls) has no external PSK support; use X.509 certificates \
                 (--tls-certificates DIR)"
            );
        }
        if mode == TlsMode::Off {
            if self.tls_certificates.is_some() || self.tls_verify_peer {
                bail!("--tls-certificates and --tls-verify-peer need --tls on or --tls require");
            }
            return Ok(None);
        }
        let Some(dir) = &self.tls_certificates else {
            bail!("--tls {mode} needs --tls-certificates DIR (server-cert.pem, server-key.pem)");
        };
        let tls = Tls::new(mode, dir, self.tls_verify_peer).context("--tls-certificates")?;
        Ok(Some(Arc::new(tls)))
    }
}
