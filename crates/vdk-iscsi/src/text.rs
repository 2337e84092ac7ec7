//! Text data of Login and Text PDUs (RFC 7143 6.1): `key=value` pairs, each ended by a NUL.
//!
//! Keys are at most 63 characters of letters, digits and `.-+@_`; values at most 255 bytes
//! (8192 for a few, such as CHAP challenges and SendTargets answers). A text may span several
//! PDUs (the C bit); [`TextBuffer`] gathers the pieces, with a bound, before [`parse`].

/// Longest key (RFC 7143 6.1).
pub const MAX_KEY: usize = 63;
/// Longest value the target accepts: the 8192 of the RFC's longest keys.
pub const MAX_VALUE: usize = 8192;
/// Most text bytes one login or text request may send over all its PDUs.
pub const MAX_TEXT: usize = 64 << 10;

/// Why text data was refused.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TextError {
    /// A pair has no `=`.
    #[error("key without a value")]
    NoValue,
    /// A key is empty, too long, or has characters keys may not have.
    #[error("malformed key")]
    BadKey,
    /// A value is too long or not UTF-8.
    #[error("malformed value for {0}")]
    BadValue(String),
    /// The same key twice in one negotiation.
    #[error("key {0} sent twice")]
    Duplicate(String),
    /// More text than the target takes.
    #[error("text longer than {MAX_TEXT} bytes")]
    TooLong,
}

/// Parses text data into pairs, in order. Trailing NULs (padding) are ignored; a last pair
/// without its NUL is taken as if it had one.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for item in data.split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let eq = item
            .iter()
            .position(|&b| b == b'=')
            .ok_or(TextError::NoValue)?;
        let (k, v) = (&item[..eq], &item[eq + 1..]);
        if k.is_empty()
            || k.len() > MAX_KEY
            || !k
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || b".-+@_".contains(&c))
        {
            return Err(TextError::BadKey);
        }
        let key = String::from_utf8_lossy(k).into_owned();
        if v.len() > MAX_VALUE {
            return Err(TextError::BadValue(key));
        }
        let value = match std::str::from_utf8(v) {
            Ok(s) => s.to_owned(),
            Err(_) => return Err(TextError::BadValue(key)),
        };
        if pairs.iter().any(|(k2, _)| *k2 == key) {
            return Err(TextError::Duplicate(key));
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// Encodes pairs as text data.
pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Gathers the text of a request sent over several PDUs.
#[derive(Debug, Default)]
pub struct TextBuffer {
    data: Vec<u8>,
}

impl TextBuffer {
    /// Adds one PDU's data segment. Fails once the total passes [`MAX_TEXT`].
    pub fn push(&mut self, data: &[u8]) -> Result<(), TextError> {
        if self.data.len() + data.len() > MAX_TEXT {
            return Err(TextError::TooLong);
        }
        self.data.extend_from_slice(data);
        Ok(())
    }

    /// Takes the text gathered so far, leaving the buffer empty.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip() {
        let pairs = vec![
            ("InitiatorName".to_owned(), "iqn.x:y".to_owned()),
            ("HeaderDigest".to_owned(), "None,CRC32C".to_owned()),
        ];
        assert_eq!(parse(&encode(&pairs)).unwrap(), pairs);
    }

    #[test]
    fn padding_and_a_missing_last_nul_are_accepted() {
        let p = parse(b"A=1\0B=2").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(parse(b"A=1\0\0\0\0").unwrap().len(), 1);
    }

    #[test]
    fn an_empty_value_is_a_value() {
        assert_eq!(parse(b"SendTargets=\0").unwrap()[0].1, "");
    }

    #[test]
    fn malformed_text_is_refused() {
        assert_eq!(parse(b"NoEquals\0"), Err(TextError::NoValue));
        assert_eq!(parse(b"=x\0"), Err(TextError::BadKey));
        assert_eq!(parse(b"Bad Key=x\0"), Err(TextError::BadKey));
        assert_eq!(parse(b"A=1\0A=2\0"), Err(TextError::Duplicate("A".into())));
        assert_eq!(parse(b"A=\xff\0"), Err(TextError::BadValue("A".into())));
    }

    #[test]
    fn the_buffer_is_bounded() {
        let mut b = TextBuffer::default();
        b.push(&vec![b'x'; MAX_TEXT]).unwrap();
        assert_eq!(b.push(b"y"), Err(TextError::TooLong));
    }
}
