//! CHAP authentication as iSCSI uses it (RFC 7143 12.1.3, RFC 1994): the response to a
//! challenge is MD5(identifier || secret || challenge), with binary values written `0x` + hex
//! or `0b` + base64.

use md5::{Digest, Md5};

/// The CHAP algorithm number of MD5 (CHAP_A=5).
pub const ALGORITHM_MD5: &str = "5";

/// Length of the challenges the target sends. RFC 7143 asks for at least as long as the
/// response (16 bytes); more costs nothing.
pub const CHALLENGE_LEN: usize = 32;

/// Shortest secret accepted without a warning (RFC 7143 12.1.3: 96 bits for secrets not
/// chosen at random).
pub const MIN_SECRET: usize = 12;

/// A CHAP name and secret.
#[derive(Clone, Eq, PartialEq)]
pub struct Credentials {
    /// CHAP_N.
    pub user: String,
    /// The shared secret.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("secret", &"<hidden>")
            .finish()
    }
}

impl Credentials {
    /// Parses `user:secret`, the one-line form of a CHAP credentials file.
    pub fn parse(line: &str) -> Option<Credentials> {
        let (user, secret) = line.trim_end_matches(['\r', '\n']).split_once(':')?;
        if user.is_empty() || secret.is_empty() {
            return None;
        }
        Some(Credentials {
            user: user.to_owned(),
            secret: secret.as_bytes().to_vec(),
        })
    }
}

/// The CHAP response for `id`, `secret` and `challenge`.
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// A fresh identifier and challenge from the system's random source.
pub fn challenge() -> std::io::Result<(u8, Vec<u8>)> {
    let mut b = vec![0u8; CHALLENGE_LEN + 1];
    getrandom::fill(&mut b).map_err(std::io::Error::other)?;
    let id = b[CHALLENGE_LEN];
    b.truncate(CHALLENGE_LEN);
    Ok((id, b))
}

/// `0x` followed by the bytes in hex.
pub fn encode_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// Decodes a binary value: `0x`/`0X` + hex digits, or `0b`/`0B` + base64. None if malformed
/// or empty.
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    let (kind, body) = (v.get(..2)?, v.get(2..)?);
    let out = match kind {
        "0x" | "0X" => {
            // An odd count of digits has an implied leading zero.
            let padded;
            let digits = if body.len() % 2 == 1 {
                padded = format!("0{body}");
                padded.as_str()
            } else {
                body
            };
            let bytes = digits.as_bytes();
            let mut out = Vec::with_capacity(bytes.len() / 2);
            for pair in bytes.chunks(2) {
                let hex = std::str::from_utf8(pair).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
            }
            out
        }
        "0b" | "0B" => base64(body)?,
        _ => return None,
    };
    (!out.is_empty()).then_some(out)
}

fn base64(s: &str) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    }
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        acc = (acc << 6) | sextet(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
        }
    }
    Some(out)
}

/// Whether two byte strings are equal, in time that does not depend on where they differ.
pub fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_is_md5_of_id_secret_challenge() {
        // MD5 of the bytes 01 'secret' 02 03, computed independently (Python hashlib).
        let r = response(1, b"secret", &[2, 3]);
        assert_eq!(encode_hex(&r), "0xf506c24f35d1c70e450edb8fdf933478");
    }

    #[test]
    fn binary_values_decode() {
        assert_eq!(decode_binary("0x0a1B"), Some(vec![0x0a, 0x1b]));
        assert_eq!(decode_binary("0xabc"), Some(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("0bAQI="), Some(vec![1, 2]));
        assert_eq!(decode_binary("0x"), None);
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("12"), None);
    }

    #[test]
    fn credentials_parse_user_colon_secret() {
        let c = Credentials::parse("alice:s3cr3t:with:colons\n").unwrap();
        assert_eq!(c.user, "alice");
        assert_eq!(c.secret, b"s3cr3t:with:colons");
        assert!(Credentials::parse("nocolon").is_none());
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }
}
