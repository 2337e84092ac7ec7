//! TLS 1.3 records sealed out of place: the plaintext is read where it lies (the disk's
//! pages, a reply's buffer) and the ciphertext written straight into the send buffer, in one
//! pass, with AWS-LC's AEAD (the library rustls's default crypto provider is built on; its
//! safe Rust API only seals in place, which needs the plaintext copied into the record
//! first). Only the record framing of RFC 8446 5.2 is done here: the nonce (the traffic IV
//! XORed with the sequence number), the header as additional data, the inner content type
//! after the plaintext.
#![allow(unsafe_code)]

use std::io;
use std::ptr::NonNull;

use aws_lc_sys as ffi;
use rustls::ConnectionTrafficSecrets;

use super::record::{HEADER, MAX_PLAIN};

/// A TLS 1.3 sending key.
pub(super) struct Seal13 {
    ctx: NonNull<ffi::EVP_AEAD_CTX>,
    iv: [u8; 12],
    tag_len: usize,
}

// SAFETY: the context is immutable once made (sealing takes it `const`) and freed only by
// `drop`; AWS-LC's AEAD contexts may be used from any thread.
unsafe impl Send for Seal13 {}

impl Seal13 {
    /// The key of `secrets`, or `None` for a suite this does not seal (then rustls's own
    /// encrypter does).
    pub(super) fn new(secrets: &ConnectionTrafficSecrets) -> Option<Seal13> {
        // SAFETY: these return pointers to static algorithm descriptions.
        let (aead, key, iv) = unsafe {
            match secrets {
                ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                    (ffi::EVP_aead_aes_128_gcm(), key, iv)
                }
                ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                    (ffi::EVP_aead_aes_256_gcm(), key, iv)
                }
                ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                    (ffi::EVP_aead_chacha20_poly1305(), key, iv)
                }
                _ => return None,
            }
        };
        let iv: [u8; 12] = iv.as_ref().try_into().ok()?;
        let key = key.as_ref();
        // SAFETY: `aead` is a valid algorithm.
        let tag_len = unsafe { ffi::EVP_AEAD_max_tag_len(aead) };
        // SAFETY: `key` is readable for its length; the context returned (or null) is owned
        // by the Seal13 and freed in `drop`.
        let ctx = unsafe { ffi::EVP_AEAD_CTX_new(aead, key.as_ptr(), key.len(), tag_len) };
        NonNull::new(ctx).map(|ctx| Seal13 { ctx, iv, tag_len })
    }

    /// Appends to `out` the record that carries `plain` (at most 2^14 bytes) as content type
    /// `typ`, sealed as record number `seq`.
    pub(super) fn seal(
        &self,
        out: &mut Vec<u8>,
        typ: u8,
        plain: &[u8],
        seq: u64,
    ) -> io::Result<()> {
        assert!(
            plain.len() <= MAX_PLAIN,
            "a record's plaintext is at most 2^14 bytes"
        );
        let body = plain.len() + 1 + self.tag_len;
        let len = u16::try_from(body).expect("a record body fits 16 bits");
        let [hi, lo] = len.to_be_bytes();
        // Outer type application_data, legacy version TLS 1.2 (RFC 8446 5.2).
        let header = [23, 3, 3, hi, lo];
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        out.reserve(HEADER + body);
        out.extend_from_slice(&header);
        let start = out.len();
        let spare = out.spare_capacity_mut();
        debug_assert!(spare.len() >= body);
        let dst = spare.as_mut_ptr().cast::<u8>();
        let mut tag_out = 0usize;
        // SAFETY: `dst` has room for `body` bytes (reserved above): the ciphertext of
        // `plain.len()` bytes, then the sealed content type and the tag (1 + tag_len). `plain`
        // cannot overlap `out` (a shared and an exclusive borrow); nonce, type and header
        // are readable for the lengths given.
        let ok = unsafe {
            ffi::EVP_AEAD_CTX_seal_scatter(
                self.ctx.as_ptr(),
                dst,
                dst.add(plain.len()),
                &mut tag_out,
                1 + self.tag_len,
                nonce.as_ptr(),
                nonce.len(),
                plain.as_ptr(),
                plain.len(),
                &typ,
                1,
                header.as_ptr(),
                header.len(),
            )
        };
        if ok != 1 || tag_out != 1 + self.tag_len {
            out.truncate(start - HEADER);
            return Err(io::Error::other("tls: sealing a record failed"));
        }
        // SAFETY: the seal above wrote all `body` bytes after `start`.
        unsafe { out.set_len(start + body) };
        Ok(())
    }
}

impl Drop for Seal13 {
    fn drop(&mut self) {
        // SAFETY: the context came from EVP_AEAD_CTX_new and is freed once, here.
        unsafe { ffi::EVP_AEAD_CTX_free(self.ctx.as_ptr()) }
    }
}
