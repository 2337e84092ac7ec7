//! Option haggling: client options parsed into [`ClientOption`], server replies encoded.
//! proto.md sections "Option types", "Option reply types" and "Metadata querying".

use super::{Cursor, IHAVEOPT, MAX_STRING, REPLY_MAGIC};

/// Option numbers (NBD_OPT_*).
pub mod opt {
    /// Select an export and enter transmission, the old way.
    pub const EXPORT_NAME: u32 = 1;
    /// End the session.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Use 64-bit extended headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (NBD_REP_*).
pub mod rep {
    /// Done.
    pub const ACK: u32 = 1;
    /// One export of a LIST.
    pub const SERVER: u32 = 2;
    /// One piece of export information.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// The bit every error reply type has.
    pub const ERR: u32 = 1 << 31;
    /// The option is unknown or not supported.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// The server forbids this option now.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// The option is malformed.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// The option is not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR | 4;
    /// TLS is required first.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// The option's data is too large.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
    /// Extended headers were negotiated, which this option would contradict.
    pub const ERR_EXT_HEADER_REQD: u32 = ERR | 10;
}

/// Information types of INFO and GO (NBD_INFO_*).
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// The 16-byte header of a client option.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct OptionHeader {
    /// Option number.
    pub option: u32,
    /// Length of the option data that follows.
    pub len: u32,
}

/// A client option that is not what the protocol allows.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
pub enum OptionError {
    /// The option header does not start with IHAVEOPT: the client is not speaking NBD.
    #[error("bad option magic {0:#x}")]
    BadMagic(u64),
    /// The option data is malformed; the reply is NBD_REP_ERR_INVALID with this message.
    #[error("{0}")]
    Invalid(&'static str),
}

/// Export name and requested information of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct InfoRequest {
    /// Export name; empty for the default export.
    pub name: String,
    /// Requested NBD_INFO_* types, in the client's order.
    pub requests: Vec<u16>,
}

/// Export name and queries of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct MetaContextRequest {
    /// Export name.
    pub export: String,
    /// Queries, such as "base:allocation" or "base:".
    pub queries: Vec<String>,
}

/// One option sent by the client, parsed.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum ClientOption {
    /// NBD_OPT_ABORT.
    Abort,
    /// NBD_OPT_EXPORT_NAME.
    ExportName(String),
    /// NBD_OPT_EXTENDED_HEADERS.
    ExtendedHeaders,
    /// NBD_OPT_GO.
    Go(InfoRequest),
    /// NBD_OPT_INFO.
    Info(InfoRequest),
    /// NBD_OPT_LIST.
    List,
    /// NBD_OPT_LIST_META_CONTEXT.
    ListMetaContext(MetaContextRequest),
    /// NBD_OPT_SET_META_CONTEXT.
    SetMetaContext(MetaContextRequest),
    /// NBD_OPT_STARTTLS.
    StartTls,
    /// NBD_OPT_STRUCTURED_REPLY.
    StructuredReply,
    /// Any option this server does not know.
    Unknown(u32),
}

/// Parses the 16-byte option header.
pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader, OptionError> {
    let mut c = Cursor::new(b);
    let magic = c.u64().unwrap_or_default();
    if magic != IHAVEOPT {
        return Err(OptionError::BadMagic(magic));
    }
    let option = c.u32().unwrap_or_default();
    let len = c.u32().unwrap_or_default();
    Ok(OptionHeader { option, len })
}

fn string(bytes: &[u8]) -> Result<String, OptionError> {
    if bytes.len() > MAX_STRING {
        return Err(OptionError::Invalid("string longer than 4096 bytes"));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| OptionError::Invalid("string is not utf-8"))
}

/// A `u32` length and that many bytes of string.
fn prefixed_string(c: &mut Cursor<'_>) -> Result<String, OptionError> {
    const SHORT: OptionError = OptionError::Invalid("option data too short");
    let n = c.u32().ok_or(SHORT)? as usize;
    string(c.take(n).ok_or(SHORT)?)
}

fn no_data(data: &[u8], option: ClientOption) -> Result<ClientOption, OptionError> {
    if data.is_empty() {
        Ok(option)
    } else {
        Err(OptionError::Invalid("this option takes no data"))
    }
}

fn info_request(data: &[u8]) -> Result<InfoRequest, OptionError> {
    const SHORT: OptionError = OptionError::Invalid("option data too short");
    let mut c = Cursor::new(data);
    let name = prefixed_string(&mut c)?;
    let n = c.u16().ok_or(SHORT)?;
    let requests = (0..n)
        .map(|_| c.u16().ok_or(SHORT))
        .collect::<Result<Vec<_>, _>>()?;
    if !c.is_empty() {
        return Err(OptionError::Invalid(
            "trailing bytes after information requests",
        ));
    }
    Ok(InfoRequest { name, requests })
}

fn meta_context_request(data: &[u8]) -> Result<MetaContextRequest, OptionError> {
    const SHORT: OptionError = OptionError::Invalid("option data too short");
    let mut c = Cursor::new(data);
    let export = prefixed_string(&mut c)?;
    let n = c.u32().ok_or(SHORT)?;
    let mut queries = Vec::new();
    for _ in 0..n {
        // Each query needs at least its 4-byte length, so a huge count fails here, fast.
        queries.push(prefixed_string(&mut c)?);
    }
    if !c.is_empty() {
        return Err(OptionError::Invalid("trailing bytes after queries"));
    }
    Ok(MetaContextRequest { export, queries })
}

/// Parses an option's data. An error is to be answered with NBD_REP_ERR_INVALID.
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, OptionError> {
    match option {
        opt::EXPORT_NAME => Ok(ClientOption::ExportName(string(data)?)),
        opt::ABORT => no_data(data, ClientOption::Abort),
        opt::LIST => no_data(data, ClientOption::List),
        opt::STARTTLS => no_data(data, ClientOption::StartTls),
        opt::INFO => Ok(ClientOption::Info(info_request(data)?)),
        opt::GO => Ok(ClientOption::Go(info_request(data)?)),
        opt::STRUCTURED_REPLY => no_data(data, ClientOption::StructuredReply),
        opt::LIST_META_CONTEXT => Ok(ClientOption::ListMetaContext(meta_context_request(data)?)),
        opt::SET_META_CONTEXT => Ok(ClientOption::SetMetaContext(meta_context_request(data)?)),
        opt::EXTENDED_HEADERS => no_data(data, ClientOption::ExtendedHeaders),
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// Appends an option reply: magic, option, type, length, data.
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    // Reply data is built by the server from bounded strings: far below 4 GiB.
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
}

/// Data of NBD_INFO_EXPORT: type, size, transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = info::EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

/// Data of NBD_INFO_NAME or NBD_INFO_DESCRIPTION: type and string.
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut d = kind.to_be_bytes().to_vec();
    d.extend_from_slice(s.as_bytes());
    d
}

/// Data of NBD_INFO_BLOCK_SIZE: type, minimum, preferred, maximum.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, preferred, max] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    d
}

/// Data of NBD_REP_SERVER: name length, name, description.
pub fn server_entry(name: &str, description: &str) -> Vec<u8> {
    // Export names are at most 4096 bytes (checked where exports are made).
    let name_len = u32::try_from(name.len()).unwrap_or(u32::MAX);
    let mut d = name_len.to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(description.as_bytes());
    d
}

/// Data of NBD_REP_META_CONTEXT: context id and name.
pub fn meta_context_entry(id: u32, name: &str) -> Vec<u8> {
    let mut d = id.to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        infos
            .iter()
            .for_each(|i| d.extend_from_slice(&i.to_be_bytes()));
        d
    }

    #[test]
    fn go_with_name_and_block_size_request_parses() {
        let parsed = parse_option(opt::GO, &go_data("disk", &[info::BLOCK_SIZE])).unwrap();
        let want = InfoRequest {
            name: "disk".into(),
            requests: vec![info::BLOCK_SIZE],
        };
        assert_eq!(parsed, ClientOption::Go(want));
    }

    #[test]
    fn go_with_name_longer_than_data_is_invalid() {
        let mut d = go_data("disk", &[]);
        d[3] = 200;
        assert!(matches!(
            parse_option(opt::GO, &d),
            Err(OptionError::Invalid(_))
        ));
    }

    #[test]
    fn list_with_data_is_invalid() {
        assert!(parse_option(opt::LIST, &[0]).is_err());
    }

    #[test]
    fn meta_context_with_huge_query_count_fails_without_allocating() {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_option(opt::SET_META_CONTEXT, &d).is_err());
    }

    #[test]
    fn unknown_option_is_kept_by_number() {
        assert_eq!(
            parse_option(4242, b"xyz").unwrap(),
            ClientOption::Unknown(4242)
        );
    }

    #[test]
    fn option_header_with_wrong_magic_is_refused() {
        let b = [0u8; 16];
        assert_eq!(parse_option_header(&b), Err(OptionError::BadMagic(0)));
    }
}
