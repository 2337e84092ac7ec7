//! The handshake and option haggling of one connection, over any `Read + Write` stream.
//!
//! ```text
//!  greeting -> [option -> reply]* -> GO / EXPORT_NAME -> transmission
//!                                 -> ABORT / EOF       -> closed
//! ```
//! State carried across options: whether structured replies were negotiated, which metadata
//! contexts were selected for which export, and whether TLS is up. Exports that the client may
//! not open ([`Export::allows`]) are invisible to it: not listed, and unknown by name.

use std::io::{self, Read, Write};
use std::sync::Arc;

use tracing::debug;
use vdk_core::bitmap::DirtyBitmap;

use crate::export::{Export, Peer};
use crate::proto::handshake::{
    self as hs, info, opt, parse_option, parse_option_header, rep, ClientOption, InfoRequest,
    MetaContextRequest, OptionError,
};
use crate::proto::{
    BASE_ALLOCATION, CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES,
    IHAVEOPT, NBDMAGIC,
};
use crate::tls::TlsMode;

/// The namespace and leaf of an export's dirty bitmaps: `qemu:dirty-bitmap:NAME`.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// A metadata context a connection selected; the n-th selected has id n (from 1).
#[derive(Clone, Debug)]
pub enum Context {
    /// base:allocation: holes and zeroes.
    Allocation,
    /// qemu:dirty-bitmap:NAME: what the bitmap marks dirty.
    DirtyBitmap(Arc<DirtyBitmap>),
}

/// Option data larger than this is skipped and answered NBD_REP_ERR_TOO_BIG.
const MAX_OPTION_DATA: u32 = 64 << 10;

/// Options one connection may send before it must choose an export.
const MAX_OPTIONS: usize = 1024;

/// What a successful negotiation leads to.
#[derive(Debug)]
pub struct Negotiated {
    /// The chosen export.
    pub export: Arc<Export>,
    /// Structured replies are in use.
    pub structured: bool,
    /// Extended headers are in use (then `structured` is too).
    pub extended: bool,
    /// The metadata contexts selected, in id order (the first has id 1).
    pub contexts: Vec<Context>,
    /// The transmission flags sent.
    pub flags: u16,
    /// The client asked for NBD_INFO_BLOCK_SIZE, so it keeps to the maximum sent. Clients
    /// that did not may send larger requests (nbd-server takes them), up to a hard limit.
    pub block_size_agreed: bool,
}

/// Why a connection ended during the handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client sent NBD_OPT_ABORT or closed the connection between options.
    #[error("client ended the handshake")]
    Ended,
    /// Reading or writing failed.
    #[error("handshake i/o: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol in a way that cannot be answered.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The client sent more options than any real client needs.
    #[error("too many options")]
    TooManyOptions,
}

/// Looks exports up by name.
pub trait Exports {
    /// The export called `name`; the empty name is the default export.
    fn find(&self, name: &str) -> Option<Arc<Export>>;
    /// All exports, for NBD_OPT_LIST.
    fn all(&self) -> Vec<Arc<Export>>;
}

impl Exports for Vec<Arc<Export>> {
    fn find(&self, name: &str) -> Option<Arc<Export>> {
        if name.is_empty() {
            return self.first().cloned();
        }
        self.iter().find(|e| e.name == name).cloned()
    }
    fn all(&self) -> Vec<Arc<Export>> {
        self.clone()
    }
}

/// What the handshake knows of the client, and how it turns TLS on.
pub struct Client<'a, S> {
    /// Who the client is, for export allow-lists; certificate names are added once TLS is up.
    pub peer: Peer,
    /// Whether STARTTLS is offered or required.
    pub tls: TlsMode,
    /// Called once STARTTLS is acknowledged: runs the TLS handshake on the stream, replaces
    /// the stream by the decrypted one, and returns the client certificate's names.
    pub start_tls: &'a mut dyn FnMut(&mut S) -> io::Result<Vec<String>>,
}

impl<S> std::fmt::Debug for Client<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.peer)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

struct State<'a, 'c, S> {
    stream: &'a mut S,
    exports: &'a dyn Exports,
    client: Client<'c, S>,
    /// TLS is up.
    secure: bool,
    no_zeroes: bool,
    structured: bool,
    /// Extended headers were negotiated (they imply structured replies).
    extended: bool,
    /// The export name the selected contexts were set for, and the contexts.
    meta: Option<(String, Vec<Context>)>,
    out: Vec<u8>,
}

/// Runs the handshake on `stream` until the client picks an export, with TLS off and every
/// export open to the client.
pub fn negotiate<S: Read + Write>(
    stream: &mut S,
    exports: &dyn Exports,
) -> Result<Negotiated, HandshakeError> {
    let mut no_tls = |_: &mut S| Err(io::Error::other("tls is off"));
    let client = Client {
        peer: Peer::default(),
        tls: TlsMode::Off,
        start_tls: &mut no_tls,
    };
    negotiate_client(stream, exports, client)
}

/// Runs the handshake on `stream` for `client` until it picks an export.
pub fn negotiate_client<S: Read + Write>(
    stream: &mut S,
    exports: &dyn Exports,
    client: Client<'_, S>,
) -> Result<Negotiated, HandshakeError> {
    let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting)?;
    let mut flags = [0u8; 4];
    stream.read_exact(&mut flags)?;
    let client_flags = u32::from_be_bytes(flags);
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(HandshakeError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let mut st = State {
        stream,
        exports,
        client,
        secure: false,
        no_zeroes: client_flags & CLIENT_NO_ZEROES != 0,
        structured: false,
        extended: false,
        meta: None,
        out: Vec::new(),
    };
    for _ in 0..MAX_OPTIONS {
        if let Some(done) = st.one_option()? {
            return Ok(done);
        }
    }
    Err(HandshakeError::TooManyOptions)
}

impl<S: Read + Write> State<'_, '_, S> {
    /// The export `name` if this client may open it.
    fn find(&self, name: &str) -> Option<Arc<Export>> {
        self.exports
            .find(name)
            .filter(|e| e.allows(&self.client.peer))
    }

    /// Whether TLS must come first (FORCEDTLS, and not yet up).
    fn tls_required(&self) -> bool {
        self.client.tls == TlsMode::Require && !self.secure
    }

    fn start_tls(&mut self, option: u32) -> Result<Option<Negotiated>, HandshakeError> {
        if self.client.tls == TlsMode::Off {
            return self.reply_error(option, rep::ERR_UNSUP, "tls is not enabled on this server");
        }
        if self.secure {
            return self.reply_error(option, rep::ERR_INVALID, "tls is already on");
        }
        self.reply(option, rep::ACK, &[])?;
        let names = (self.client.start_tls)(self.stream)?;
        debug!(?names, "tls is up");
        self.client.peer.cert_names = names;
        self.secure = true;
        // What was agreed in the clear is not trusted once encrypted (proto.md: the state
        // is as if the connection had just begun).
        self.structured = false;
        self.extended = false;
        self.meta = None;
        Ok(None)
    }

    fn one_option(&mut self) -> Result<Option<Negotiated>, HandshakeError> {
        let mut header = [0u8; 16];
        match self.stream.read_exact(&mut header) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(HandshakeError::Ended)
            }
            r => r?,
        }
        let h =
            parse_option_header(&header).map_err(|e| HandshakeError::Protocol(e.to_string()))?;
        if h.len > MAX_OPTION_DATA {
            io::copy(
                &mut (&mut *self.stream).take(u64::from(h.len)),
                &mut io::sink(),
            )?;
            return self.reply_error(h.option, rep::ERR_TOO_BIG, "option data too large");
        }
        let mut data = vec![0u8; h.len as usize];
        self.stream.read_exact(&mut data)?;
        let option = match parse_option(h.option, &data) {
            Ok(o) => o,
            Err(OptionError::Invalid(msg)) => {
                return self.reply_error(h.option, rep::ERR_INVALID, msg)
            }
            Err(e) => return Err(HandshakeError::Protocol(e.to_string())),
        };
        debug!(?option, "nbd option");
        if self.tls_required() {
            match option {
                ClientOption::Abort | ClientOption::StartTls => {}
                ClientOption::ExportName(_) => {
                    // No error reply exists for it: the connection can only close.
                    return Err(HandshakeError::Protocol(
                        "NBD_OPT_EXPORT_NAME before the required STARTTLS".into(),
                    ));
                }
                _ => return self.reply_error(h.option, rep::ERR_TLS_REQD, "tls is required"),
            }
        }
        match option {
            ClientOption::Abort => {
                // The client may already have gone; the ACK is a courtesy.
                let _ = self.reply(h.option, rep::ACK, &[]);
                Err(HandshakeError::Ended)
            }
            ClientOption::ExportName(_) if self.extended => {
                // It has no way to say the transmission is extended: proto.md forbids it.
                Err(HandshakeError::Protocol(
                    "NBD_OPT_EXPORT_NAME after extended headers were negotiated".into(),
                ))
            }
            ClientOption::ExportName(name) => self.export_name(&name).map(Some),
            ClientOption::List => {
                let peer = &self.client.peer;
                let visible: Vec<_> = self
                    .exports
                    .all()
                    .into_iter()
                    .filter(|e| e.allows(peer))
                    .collect();
                for e in visible {
                    let entry = hs::server_entry(&e.name, &e.description);
                    self.out_reply(h.option, rep::SERVER, &entry);
                }
                self.reply(h.option, rep::ACK, &[]).map(|()| None)
            }
            ClientOption::StartTls => self.start_tls(h.option),
            ClientOption::Info(req) => self.info(opt::INFO, &req).map(|_| None),
            ClientOption::Go(req) => self.info(opt::GO, &req),
            ClientOption::StructuredReply if self.extended => self.reply_error(
                h.option,
                rep::ERR_EXT_HEADER_REQD,
                "extended headers are on, which take the place of structured replies",
            ),
            ClientOption::StructuredReply if self.structured => {
                self.reply_error(h.option, rep::ERR_INVALID, "structured replies already on")
            }
            ClientOption::StructuredReply => {
                self.structured = true;
                self.reply(h.option, rep::ACK, &[]).map(|()| None)
            }
            ClientOption::ListMetaContext(req) => self.meta_context(h.option, &req, false),
            ClientOption::SetMetaContext(req) => self.meta_context(h.option, &req, true),
            ClientOption::ExtendedHeaders if self.extended => {
                self.reply_error(h.option, rep::ERR_INVALID, "extended headers already on")
            }
            ClientOption::ExtendedHeaders => {
                self.extended = true;
                self.structured = true;
                self.reply(h.option, rep::ACK, &[]).map(|()| None)
            }
            ClientOption::Unknown(_) => {
                self.reply_error(h.option, rep::ERR_UNSUP, "option not supported")
            }
        }
    }

    /// Queues a reply without sending it.
    fn out_reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        hs::option_reply(&mut self.out, option, kind, data);
    }

    /// Sends what is queued and this reply.
    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> Result<(), HandshakeError> {
        self.out_reply(option, kind, data);
        self.stream.write_all(&self.out)?;
        self.stream.flush()?;
        self.out.clear();
        Ok(())
    }

    fn reply_error(
        &mut self,
        option: u32,
        kind: u32,
        msg: &str,
    ) -> Result<Option<Negotiated>, HandshakeError> {
        debug!(option, msg, "nbd option refused");
        self.reply(option, kind, msg.as_bytes()).map(|()| None)
    }

    fn negotiated(&self, export: Arc<Export>) -> Negotiated {
        let info = export.device.info();
        let flags = export.transmission_flags(&info, self.structured);
        let contexts = match &self.meta {
            Some((name, contexts))
                if *name == export.name || (name.is_empty() && self.is_default(&export)) =>
            {
                contexts.clone()
            }
            _ => Vec::new(),
        };
        Negotiated {
            export,
            structured: self.structured,
            extended: self.extended,
            contexts,
            flags,
            block_size_agreed: false,
        }
    }

    fn is_default(&self, export: &Arc<Export>) -> bool {
        self.find("").is_some_and(|d| Arc::ptr_eq(&d, export))
    }

    fn export_name(&mut self, name: &str) -> Result<Negotiated, HandshakeError> {
        // NBD_OPT_EXPORT_NAME has no error reply: an unknown name can only close.
        let Some(export) = self.find(name) else {
            return Err(HandshakeError::Protocol(format!("unknown export {name:?}")));
        };
        let n = self.negotiated(export);
        let mut d = n.export.device.info().size.to_be_bytes().to_vec();
        d.extend_from_slice(&n.flags.to_be_bytes());
        if !self.no_zeroes {
            d.extend_from_slice(&[0u8; 124]);
        }
        self.stream.write_all(&d)?;
        Ok(n)
    }

    fn info(
        &mut self,
        option: u32,
        req: &InfoRequest,
    ) -> Result<Option<Negotiated>, HandshakeError> {
        let Some(export) = self.find(&req.name) else {
            let msg = format!("no export named {:?}", req.name);
            return self.reply_error(option, rep::ERR_UNKNOWN, &msg);
        };
        let mut n = self.negotiated(export);
        n.block_size_agreed = req.requests.contains(&info::BLOCK_SIZE);
        let dinfo = n.export.device.info();
        self.out_reply(option, rep::INFO, &hs::info_export(dinfo.size, n.flags));
        if req.requests.contains(&info::NAME) {
            self.out_reply(
                option,
                rep::INFO,
                &hs::info_string(info::NAME, &n.export.name),
            );
        }
        if req.requests.contains(&info::DESCRIPTION) && !n.export.description.is_empty() {
            let d = hs::info_string(info::DESCRIPTION, &n.export.description);
            self.out_reply(option, rep::INFO, &d);
        }
        // Sent whether asked or not: a client that cannot use it ignores it.
        let (min, preferred, max) = Export::block_sizes(&dinfo);
        self.out_reply(option, rep::INFO, &hs::info_block_size(min, preferred, max));
        self.reply(option, rep::ACK, &[])?;
        Ok((option == opt::GO).then_some(n))
    }

    fn meta_context(
        &mut self,
        option: u32,
        req: &MetaContextRequest,
        set: bool,
    ) -> Result<Option<Negotiated>, HandshakeError> {
        if !self.structured {
            return self.reply_error(
                option,
                rep::ERR_INVALID,
                "structured replies not negotiated",
            );
        }
        let Some(export) = self.find(&req.export) else {
            let msg = format!("no export named {:?}", req.export);
            return self.reply_error(option, rep::ERR_UNKNOWN, &msg);
        };
        // The export's contexts by name; a LIST query may also be a namespace ("base:") or a
        // namespace and leaf ("qemu:dirty-bitmap:"), SET takes whole names.
        let mut offered = vec![(BASE_ALLOCATION.to_owned(), Context::Allocation)];
        if let Some(bitmaps) = &export.bitmaps {
            // An inconsistent one (left in use by a crash) is not offered.
            for (name, b) in bitmaps
                .all()
                .into_iter()
                .filter(|(_, b)| !b.is_inconsistent())
            {
                offered.push((
                    format!("{DIRTY_BITMAP_PREFIX}{name}"),
                    Context::DirtyBitmap(b),
                ));
            }
        }
        let asked = |name: &str| {
            req.queries.iter().any(|q| {
                q == name
                    || (!set
                        && (q.ends_with(':') && name.starts_with(q.as_str())
                            || q == "qemu:" && name.starts_with(DIRTY_BITMAP_PREFIX)))
            })
        };
        let chosen: Vec<(String, Context)> = offered
            .into_iter()
            // LIST with no query lists everything; SET with none selects nothing.
            .filter(|(name, _)| (req.queries.is_empty() && !set) || asked(name))
            .collect();
        for (i, (name, _)) in chosen.iter().enumerate() {
            let id = if set {
                u32::try_from(i + 1).unwrap_or(u32::MAX)
            } else {
                0
            };
            self.out_reply(option, rep::META_CONTEXT, &hs::meta_context_entry(id, name));
        }
        if set {
            self.meta = (!chosen.is_empty()).then(|| {
                (
                    req.export.clone(),
                    chosen.into_iter().map(|(_, c)| c).collect(),
                )
            });
        }
        self.reply(option, rep::ACK, &[]).map(|()| None)
    }
}

#[cfg(test)]
mod tests;
