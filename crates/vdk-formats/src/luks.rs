//! LUKS: encrypted disks as cryptsetup writes them (LUKS1 and LUKS2) and as QEMU does
//! (`qemu-img create -f luks`, LUKS1), served as their plaintext.
//!
//! The header names the key derivation (PBKDF2 with SHA-1, SHA-256 or SHA-512; Argon2i or
//! Argon2id in LUKS2), the anti-forensic split of the key material and the cipher, which vdk
//! takes as AES-XTS with plain64 IVs (`aes-xts-plain64`, by far the common choice; others are
//! refused by name). A passphrase opens a key slot: the slot's key is derived from it, the
//! slot's material decrypted and merged into the volume key, and the volume key checked
//! against the header's digest. Data sectors are then AES-XTS with the sector number (plus
//! the segment's `iv_tweak`) as the tweak. Every step is a RustCrypto crate; this module only
//! lays the bytes out.
//!
//! Secrets (passphrases, derived keys, the volume key) live in zeroised buffers and are
//! never logged; the AES key schedules are zeroised on drop.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use aes::cipher::KeyInit;
use aes::{Aes128, Aes256};
use base64::Engine as _;
use sha2::Digest as _;
use vdk_backends::{FileDisk, FileOptions};
use vdk_core::{check_range, BlockDevice, DiskInfo, Error, Result};
use xts_mode::{get_tweak_default, Xts128};
use zeroize::Zeroizing;

/// The magic of both versions.
pub const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// LUKS1's header, key slots included.
const LUKS1_HEADER: usize = 592;
/// LUKS2's binary header.
const LUKS2_BIN: usize = 4096;
/// Largest LUKS2 header (binary and JSON) read.
const LUKS2_MAX_HEADER: u64 = 4 << 20;
/// Sector of the key material, whatever the data's sector size.
const SECTOR: usize = 512;
/// The same, as the header's fields hold it.
const SECTOR_U32: u32 = 512;
/// Most AF stripes taken (cryptsetup and QEMU write 4000).
const MAX_STRIPES: u32 = 1 << 16;
/// Most memory an Argon2 key slot may ask (cryptsetup's limit: 4 GiB).
const MAX_ARGON2_KIB: u32 = 4 << 20;
/// Most Argon2 lanes (cryptsetup's limit).
const MAX_ARGON2_LANES: u32 = 16;
/// A LUKS1 key slot in use.
const SLOT_ACTIVE: u32 = 0x00ac_71f3;
/// A LUKS1 key slot not in use.
const SLOT_INACTIVE: u32 = 0x0000_dead;

/// A passphrase: read from a file or the environment, zeroised when dropped, never shown.
#[derive(Clone)]
pub struct Secret(Arc<Zeroizing<Vec<u8>>>);

impl Secret {
    /// The bytes given.
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(Arc::new(Zeroizing::new(bytes)))
    }

    /// All of a file, byte for byte, as cryptsetup's `--key-file` and QEMU's `secret,file=`
    /// read it (a trailing newline is part of the passphrase: `printf`, not `echo`).
    pub fn from_file(path: &Path) -> io::Result<Secret> {
        let bytes = std::fs::read(path)
            .map_err(|e| io::Error::new(e.kind(), format!("key file {}: {e}", path.display())))?;
        Ok(Secret::new(bytes))
    }

    /// The value of the environment variable `name`.
    pub fn from_env(name: &str) -> io::Result<Secret> {
        let v = std::env::var_os(name).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("--key-secret {name}: no such environment variable"),
            )
        })?;
        Ok(Secret::new(v.into_encoded_bytes()))
    }

    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A hash named by a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hash {
    Sha1,
    Sha256,
    Sha512,
}

impl Hash {
    fn parse(name: &str) -> std::result::Result<Hash, String> {
        match name.to_ascii_lowercase().as_str() {
            "sha1" => Ok(Hash::Sha1),
            "sha256" => Ok(Hash::Sha256),
            "sha512" => Ok(Hash::Sha512),
            other => Err(format!(
                "hash {other:?} is not supported (sha1, sha256, sha512)"
            )),
        }
    }

    fn pbkdf2(self, pass: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        match self {
            Hash::Sha1 => pbkdf2::pbkdf2_hmac::<sha1::Sha1>(pass, salt, rounds, out),
            Hash::Sha256 => pbkdf2::pbkdf2_hmac::<sha2::Sha256>(pass, salt, rounds, out),
            Hash::Sha512 => pbkdf2::pbkdf2_hmac::<sha2::Sha512>(pass, salt, rounds, out),
        }
    }

    /// `H(prefix || data)`.
    fn digest(self, prefix: &[u8], data: &[u8]) -> Vec<u8> {
        fn one<D: sha2::Digest>(prefix: &[u8], data: &[u8]) -> Vec<u8> {
            let mut h = D::new();
            h.update(prefix);
            h.update(data);
            h.finalize().to_vec()
        }
        match self {
            Hash::Sha1 => one::<sha1::Sha1>(prefix, data),
            Hash::Sha256 => one::<sha2::Sha256>(prefix, data),
            Hash::Sha512 => one::<sha2::Sha512>(prefix, data),
        }
    }

    fn len(self) -> usize {
        match self {
            Hash::Sha1 => 20,
            Hash::Sha256 => 32,
            Hash::Sha512 => 64,
        }
    }
}

/// How a key slot's key is derived from the passphrase.
#[derive(Clone, Debug)]
enum Kdf {
    Pbkdf2 {
        hash: Hash,
        iterations: u32,
        salt: Vec<u8>,
    },
    Argon2 {
        id: bool,
        time: u32,
        memory_kib: u32,
        lanes: u32,
        salt: Vec<u8>,
    },
}

impl Kdf {
    fn derive(&self, pass: &[u8], out: &mut [u8]) -> io::Result<()> {
        match self {
            Kdf::Pbkdf2 {
                hash,
                iterations,
                salt,
            } => {
                hash.pbkdf2(pass, salt, *iterations, out);
                Ok(())
            }
            Kdf::Argon2 {
                id,
                time,
                memory_kib,
                lanes,
                salt,
            } => {
                let params = argon2::Params::new(*memory_kib, *time, *lanes, Some(out.len()))
                    .map_err(|e| bad(format!("argon2 parameters: {e}")))?;
                let alg = if *id {
                    argon2::Algorithm::Argon2id
                } else {
                    argon2::Algorithm::Argon2i
                };
                argon2::Argon2::new(alg, argon2::Version::V0x13, params)
                    .hash_password_into(pass, salt, out)
                    .map_err(|e| bad(format!("argon2: {e}")))
            }
        }
    }
}

/// One key slot: where its material is and how to open it.
#[derive(Clone, Debug)]
struct Slot {
    name: String,
    kdf: Kdf,
    /// Byte offset of the material in the file.
    offset: u64,
    stripes: u32,
    af_hash: Hash,
    /// Bytes of the key that decrypts the material (the volume key's size in LUKS1).
    key_bytes: usize,
}

/// The check of a candidate volume key.
#[derive(Clone, Debug)]
struct KeyDigest {
    hash: Hash,
    iterations: u32,
    salt: Vec<u8>,
    digest: Vec<u8>,
}

/// A LUKS header, read.
#[derive(Clone, Debug)]
pub struct Header {
    /// 1 or 2.
    pub version: u16,
    /// The cipher, as the header names it (`aes-xts-plain64`).
    pub cipher: String,
    /// Bytes of the volume key.
    pub key_bytes: usize,
    /// Where the data starts in the file.
    pub payload_offset: u64,
    /// Bytes of data, or `None` for "up to the end of the file".
    pub payload_size: Option<u64>,
    /// Data sector size: 512, or up to 4096 in LUKS2.
    pub sector_size: u32,
    /// Added to every data sector's number for its IV.
    iv_tweak: u64,
    /// Slots in use.
    slots: Vec<Slot>,
    digest: KeyDigest,
    /// The header's UUID.
    pub uuid: String,
    /// Where the header is in its file (0, or inside a qcow2 image): key slot offsets are
    /// from here.
    base: u64,
}

fn bad(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A NUL-padded string field.
fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Checks that the cipher is one vdk serves; returns the key size it takes.
fn check_cipher(cipher: &str, key_bytes: usize) -> io::Result<()> {
    if cipher != "aes-xts-plain64" {
        return Err(bad(format!(
            "cipher {cipher:?} is not supported (aes-xts-plain64 only)"
        )));
    }
    if key_bytes != 32 && key_bytes != 64 {
        return Err(bad(format!(
            "an aes-xts key of {key_bytes} bytes (32 or 64 expected)"
        )));
    }
    Ok(())
}

impl Header {
    /// Reads the header at the start of `file`.
    pub fn read(file: &File) -> io::Result<Header> {
        Header::read_at(file, 0)
    }

    /// Reads the header at `base` in `file` (a qcow2 image's embedded one).
    pub fn read_at(file: &File, base: u64) -> io::Result<Header> {
        let mut head = vec![0u8; LUKS2_BIN];
        let n = crate::read_some(file, &mut head, base)?;
        if n < LUKS1_HEADER || !head.starts_with(MAGIC) {
            return Err(bad("no LUKS header (magic, or too short)"));
        }
        let mut h = match u16::from_be_bytes([head[6], head[7]]) {
            1 => Header::luks1(&head),
            2 => Header::luks2(file, base, &head[..n]),
            v => Err(bad(format!("LUKS version {v} (1 and 2 are known)"))),
        }?;
        h.base = base;
        Ok(h)
    }

    fn luks1(h: &[u8]) -> io::Result<Header> {
        let cipher = format!("{}-{}", text(&h[8..40]), text(&h[40..72]));
        let hash = Hash::parse(&text(&h[72..104])).map_err(bad)?;
        let key_bytes = be32(h, 108) as usize;
        check_cipher(&cipher, key_bytes)?;
        let payload_offset = u64::from(be32(h, 104)) * SECTOR as u64;
        let digest = KeyDigest {
            hash,
            iterations: be32(h, 164),
            salt: h[132..164].to_vec(),
            digest: h[112..132].to_vec(),
        };
        if digest.iterations == 0 {
            return Err(bad("the volume key digest has 0 iterations"));
        }
        let mut slots = Vec::new();
        for i in 0..8 {
            let s = &h[208 + i * 48..208 + (i + 1) * 48];
            match be32(s, 0) {
                SLOT_INACTIVE => continue,
                SLOT_ACTIVE => {}
                other => return Err(bad(format!("key slot {i}: state {other:#x}"))),
            }
            let iterations = be32(s, 4);
            let stripes = be32(s, 44);
            if iterations == 0 || stripes == 0 || stripes > MAX_STRIPES {
                return Err(bad(format!(
                    "key slot {i}: {iterations} iterations, {stripes} stripes"
                )));
            }
            slots.push(Slot {
                name: i.to_string(),
                kdf: Kdf::Pbkdf2 {
                    hash,
                    iterations,
                    salt: s[8..40].to_vec(),
                },
                offset: u64::from(be32(s, 40)) * SECTOR as u64,
                stripes,
                af_hash: hash,
                key_bytes,
            });
        }
        Ok(Header {
            version: 1,
            cipher,
            key_bytes,
            payload_offset,
            payload_size: None,
            sector_size: SECTOR_U32,
            iv_tweak: 0,
            slots,
            digest,
            uuid: text(&h[168..208]),
            base: 0,
        })
    }

    fn luks2(file: &File, base: u64, bin: &[u8]) -> io::Result<Header> {
        if bin.len() < LUKS2_BIN {
            return Err(bad("a LUKS2 header shorter than 4096 bytes"));
        }
        let hdr_size = be64(bin, 8);
        if !(LUKS2_BIN as u64 + 4096..=LUKS2_MAX_HEADER).contains(&hdr_size) {
            return Err(bad(format!("LUKS2 header size {hdr_size}")));
        }
        // The primary header, or if its checksum fails the secondary one right after it.
        let mut why = String::new();
        for at in [0, hdr_size] {
            match Header::luks2_area(file, base + at, hdr_size) {
                Ok(h) => return Ok(h),
                Err(e) if at == 0 => why = e.to_string(),
                Err(e) => return Err(bad(format!("LUKS2 header: {why}; its secondary copy: {e}"))),
            }
        }
        unreachable!("the loop returns")
    }

    fn luks2_area(file: &File, at: u64, hdr_size: u64) -> io::Result<Header> {
        let len = usize::try_from(hdr_size).map_err(|_| bad("header size"))?;
        let mut area = Zeroizing::new(vec![0u8; len]);
        if crate::read_some(file, &mut area, at)? != len {
            return Err(bad("the file ends inside the header"));
        }
        if !area.starts_with(MAGIC) && !area.starts_with(b"SKUL\xba\xbe") {
            return Err(bad("no magic"));
        }
        if be64(&area, 8) != hdr_size {
            return Err(bad("its size differs from the primary header's"));
        }
        let alg = text(&area[72..104]);
        if alg != "sha256" {
            return Err(bad(format!("checksum {alg:?} (sha256 expected)")));
        }
        let stored = area[448..480].to_vec();
        area[448..512].fill(0);
        if sha2::Sha256::digest(&area[..]).as_slice() != stored {
            return Err(bad("checksum mismatch (damaged or tampered with)"));
        }
        let json_end = area[LUKS2_BIN..]
            .iter()
            .position(|&b| b == 0)
            .map_or(len, |p| LUKS2_BIN + p);
        let json: serde_json::Value = serde_json::from_slice(&area[LUKS2_BIN..json_end])
            .map_err(|e| bad(format!("its JSON: {e}")))?;
        let mut h = luks2_json(&json).map_err(|e| bad(format!("its JSON: {e}")))?;
        h.uuid = text(&area[168..208]);
        Ok(h)
    }

    /// The size of the plaintext disk in a file of `file_len` bytes.
    pub fn disk_size(&self, file_len: u64) -> u64 {
        let sector = u64::from(self.sector_size);
        let size = self
            .payload_size
            .unwrap_or_else(|| file_len.saturating_sub(self.payload_offset));
        size / sector * sector
    }

    /// The volume key `secret` opens, or a clear error.
    fn unlock(&self, file: &File, secret: &Secret) -> io::Result<Zeroizing<Vec<u8>>> {
        if self.slots.is_empty() {
            return Err(bad("no key slot is in use: nothing can open it"));
        }
        for slot in &self.slots {
            let mut key = Zeroizing::new(vec![0u8; slot.key_bytes]);
            slot.kdf.derive(secret.bytes(), &mut key)?;
            let len = self
                .key_bytes
                .checked_mul(slot.stripes as usize)
                .ok_or_else(|| bad("key slot too large"))?;
            let mut material = Zeroizing::new(vec![0u8; len.div_ceil(SECTOR) * SECTOR]);
            if crate::read_some(file, &mut material, self.base + slot.offset)? != material.len() {
                return Err(bad(format!(
                    "key slot {}: the file ends inside its material",
                    slot.name
                )));
            }
            let xts = Xts::new(&key)?;
            xts.decrypt(&mut material, SECTOR, 0);
            let candidate = af_merge(&material[..len], self.key_bytes, slot.af_hash);
            if self.digest_matches(&candidate) {
                tracing::debug!(slot = %slot.name, "LUKS key slot opened");
                return Ok(candidate);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the passphrase opens no key slot (wrong key?)",
        ))
    }

    fn digest_matches(&self, key: &[u8]) -> bool {
        let d = &self.digest;
        let mut out = Zeroizing::new(vec![0u8; d.digest.len()]);
        d.hash.pbkdf2(key, &d.salt, d.iterations, &mut out);
        // Not secret-dependent timing worth guarding: the digest is public in the header.
        *out == d.digest
    }
}

/// A LUKS2 header's JSON, as far as vdk serves it.
fn luks2_json(j: &serde_json::Value) -> std::result::Result<Header, String> {
    let num = |v: &serde_json::Value, what: &str| -> std::result::Result<u64, String> {
        match v {
            serde_json::Value::String(s) => s.parse().map_err(|_| format!("{what} {s:?}")),
            serde_json::Value::Number(n) => n.as_u64().ok_or_else(|| format!("{what} {n}")),
            _ => Err(format!("{what} missing")),
        }
    };
    let small = |v: &serde_json::Value, what: &str| -> std::result::Result<u32, String> {
        u32::try_from(num(v, what)?).map_err(|_| format!("{what} too large"))
    };
    let b64 = |v: &serde_json::Value, what: &str| -> std::result::Result<Vec<u8>, String> {
        let s = v.as_str().ok_or_else(|| format!("{what} missing"))?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| format!("{what}: {e}"))
    };
    if let Some(req) = j["config"]["requirements"]["mandatory"].as_array() {
        if !req.is_empty() {
            return Err(format!(
                "it requires {req:?} (a reencryption in progress?), which vdk does not do"
            ));
        }
    }
    let segments = j["segments"].as_object().ok_or("no segments")?;
    if segments.len() != 1 {
        return Err(format!(
            "{} segments (one expected; a reencryption in progress?)",
            segments.len()
        ));
    }
    let (seg_name, seg) = segments.iter().next().ok_or("no segment")?;
    if seg["type"] != "crypt" {
        return Err(format!("segment type {}", seg["type"]));
    }
    let cipher = seg["encryption"]
        .as_str()
        .ok_or("no encryption")?
        .to_owned();
    let sector_size = small(&seg["sector_size"], "sector_size")?;
    if !(512..=4096).contains(&sector_size) || !sector_size.is_power_of_two() {
        return Err(format!("sector size {sector_size}"));
    }
    let payload_offset = num(&seg["offset"], "segment offset")?;
    let payload_size = match seg["size"].as_str() {
        Some("dynamic") => None,
        _ => Some(num(&seg["size"], "segment size")?),
    };
    let iv_tweak = num(&seg["iv_tweak"], "iv_tweak").unwrap_or(0);
    // The digest that covers the segment, and the key slots it covers.
    let digests = j["digests"].as_object().ok_or("no digests")?;
    let (_, d) = digests
        .iter()
        .find(|(_, d)| {
            d["segments"]
                .as_array()
                .is_some_and(|s| s.iter().any(|x| x == seg_name.as_str()))
        })
        .ok_or("no digest covers the segment")?;
    if d["type"] != "pbkdf2" {
        return Err(format!("digest type {}", d["type"]));
    }
    let digest = KeyDigest {
        hash: Hash::parse(d["hash"].as_str().unwrap_or(""))?,
        iterations: small(&d["iterations"], "digest iterations")?,
        salt: b64(&d["salt"], "digest salt")?,
        digest: b64(&d["digest"], "digest")?,
    };
    if digest.iterations == 0 || digest.digest.is_empty() {
        return Err("an empty digest".into());
    }
    let covered: Vec<&str> = d["keyslots"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
        .unwrap_or_default();
    let mut key_bytes = None;
    let mut slots = Vec::new();
    for (name, k) in j["keyslots"].as_object().ok_or("no keyslots")? {
        if !covered.contains(&name.as_str()) || k["type"] != "luks2" {
            continue;
        }
        let area = &k["area"];
        if area["type"] != "raw" {
            return Err(format!("key slot {name}: area type {}", area["type"]));
        }
        let area_cipher = area["encryption"].as_str().unwrap_or("");
        let area_key = small(&area["key_size"], "area key_size")? as usize;
        check_cipher(area_cipher, area_key).map_err(|e| format!("key slot {name}: {e}"))?;
        let af = &k["af"];
        if af["type"] != "luks1" {
            return Err(format!("key slot {name}: af type {}", af["type"]));
        }
        let stripes = small(&af["stripes"], "stripes")?;
        if stripes == 0 || stripes > MAX_STRIPES {
            return Err(format!("key slot {name}: {stripes} stripes"));
        }
        let kdf = &k["kdf"];
        let salt = b64(&kdf["salt"], "kdf salt")?;
        let kdf = match kdf["type"].as_str().unwrap_or("") {
            "pbkdf2" => Kdf::Pbkdf2 {
                hash: Hash::parse(kdf["hash"].as_str().unwrap_or(""))?,
                iterations: small(&kdf["iterations"], "iterations")?.max(1),
                salt,
            },
            t @ ("argon2i" | "argon2id") => {
                let memory_kib = small(&kdf["memory"], "argon2 memory")?;
                let lanes = small(&kdf["cpus"], "argon2 cpus")?;
                // cryptsetup's own limits: a header asking more is not one it wrote.
                if memory_kib > MAX_ARGON2_KIB || lanes > MAX_ARGON2_LANES {
                    return Err(format!(
                        "key slot {name}: argon2 with {memory_kib} KiB and {lanes} lanes \
                         (at most 4 GiB and 16)"
                    ));
                }
                Kdf::Argon2 {
                    id: t == "argon2id",
                    time: small(&kdf["time"], "argon2 time")?,
                    memory_kib,
                    lanes,
                    salt,
                }
            }
            t => return Err(format!("key slot {name}: kdf {t:?}")),
        };
        let size = small(&k["key_size"], "key_size")? as usize;
        key_bytes.get_or_insert(size);
        slots.push(Slot {
            name: name.clone(),
            kdf,
            offset: num(&area["offset"], "area offset")?,
            stripes,
            af_hash: Hash::parse(af["hash"].as_str().unwrap_or(""))?,
            key_bytes: area_key,
        });
    }
    let key_bytes = key_bytes.ok_or("no key slot opens the segment")?;
    check_cipher(&cipher, key_bytes).map_err(|e| e.to_string())?;
    Ok(Header {
        version: 2,
        cipher,
        key_bytes,
        payload_offset,
        payload_size,
        sector_size,
        iv_tweak,
        slots,
        digest,
        uuid: String::new(),
        base: 0,
    })
}

/// LUKS's anti-forensic merge: the stripes folded with the hash's diffusion into the key.
fn af_merge(material: &[u8], key_bytes: usize, hash: Hash) -> Zeroizing<Vec<u8>> {
    let mut d = Zeroizing::new(vec![0u8; key_bytes]);
    let stripes = material.len() / key_bytes;
    for (i, stripe) in material.chunks_exact(key_bytes).enumerate() {
        for (a, b) in d.iter_mut().zip(stripe) {
            *a ^= b;
        }
        if i + 1 < stripes {
            diffuse(&mut d, hash);
        }
    }
    d
}

/// The diffusion step: each hash-sized piece replaced by the hash of its index and itself.
fn diffuse(buf: &mut [u8], hash: Hash) {
    for (i, piece) in buf.chunks_mut(hash.len()).enumerate() {
        let index = u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes();
        let h = Zeroizing::new(hash.digest(&index, piece));
        let n = piece.len();
        piece.copy_from_slice(&h[..n]);
    }
}

/// The inverse of [`af_merge`]: `stripes` stripes, all random but the last, which makes
/// them fold into `key`.
fn af_split(key: &[u8], stripes: u32, hash: Hash) -> io::Result<Zeroizing<Vec<u8>>> {
    let n = key.len();
    let mut out = Zeroizing::new(vec![0u8; n * stripes as usize]);
    let (random, last) = out.split_at_mut(n * (stripes as usize - 1));
    getrandom::getrandom(random).map_err(io::Error::other)?;
    let mut d = Zeroizing::new(vec![0u8; n]);
    for stripe in random.chunks_exact(n) {
        for (a, b) in d.iter_mut().zip(stripe) {
            *a ^= b;
        }
        diffuse(&mut d, hash);
    }
    for ((o, a), b) in last.iter_mut().zip(d.iter()).zip(key) {
        *o = a ^ b;
    }
    Ok(out)
}

/// AES-XTS with 128- or 256-bit AES (a 32- or 64-byte key).
enum Xts {
    Aes128(Box<Xts128<Aes128>>),
    Aes256(Box<Xts128<Aes256>>),
}

impl Xts {
    fn new(key: &[u8]) -> io::Result<Xts> {
        let half = key.len() / 2;
        let (a, b) = key.split_at(half);
        let wrong = |_| bad("AES-XTS key of the wrong size");
        Ok(match key.len() {
            32 => Xts::Aes128(Box::new(Xts128::new(
                Aes128::new_from_slice(a).map_err(wrong)?,
                Aes128::new_from_slice(b).map_err(wrong)?,
            ))),
            64 => Xts::Aes256(Box::new(Xts128::new(
                Aes256::new_from_slice(a).map_err(wrong)?,
                Aes256::new_from_slice(b).map_err(wrong)?,
            ))),
            n => return Err(bad(format!("an AES-XTS key of {n} bytes"))),
        })
    }

    /// Decrypts whole `sector`-sized sectors, the first numbered `first` (plain64 IVs).
    fn decrypt(&self, buf: &mut [u8], sector: usize, first: u64) {
        match self {
            Xts::Aes128(x) => {
                x.decrypt_area(buf, sector, u128::from(first), get_tweak_default);
            }
            Xts::Aes256(x) => {
                x.decrypt_area(buf, sector, u128::from(first), get_tweak_default);
            }
        }
    }

    fn encrypt(&self, buf: &mut [u8], sector: usize, first: u64) {
        match self {
            Xts::Aes128(x) => {
                x.encrypt_area(buf, sector, u128::from(first), get_tweak_default);
            }
            Xts::Aes256(x) => {
                x.encrypt_area(buf, sector, u128::from(first), get_tweak_default);
            }
        }
    }
}

/// A LUKS image's plaintext disk.
pub struct LuksDisk {
    file: FileDisk,
    header: Header,
    xts: Xts,
    size: u64,
}

impl fmt::Debug for LuksDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LuksDisk")
            .field("version", &self.header.version)
            .field("cipher", &self.header.cipher)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl LuksDisk {
    /// Opens the LUKS image at `path` with the passphrase `secret`.
    pub fn open(path: &Path, opts: FileOptions, secret: Option<&Secret>) -> io::Result<LuksDisk> {
        let file = FileDisk::open(path, opts)?;
        // The header and key slots are read through a buffered handle of their own: the
        // disk's may be O_DIRECT (--cache none), which takes only aligned reads.
        let raw = File::open(path)?;
        let header = Header::read(&raw)?;
        let Some(secret) = secret else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "it is encrypted (LUKS): give its passphrase with --key-file FILE or \
                 --key-secret ENV",
            ));
        };
        let key = header.unlock(&raw, secret)?;
        let xts = Xts::new(&key)?;
        let size = header.disk_size(file.info().size);
        if header.payload_offset.saturating_add(size) > file.info().size {
            return Err(bad(format!(
                "the data ({size} bytes at {}) lies past the end of the file",
                header.payload_offset
            )));
        }
        Ok(LuksDisk {
            file,
            header,
            xts,
            size,
        })
    }

    fn sector(&self) -> u64 {
        u64::from(self.header.sector_size)
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.size, offset, len)?;
        let s = self.sector();
        if !offset.is_multiple_of(s) || !len.is_multiple_of(s) {
            return Err(Error::Misaligned {
                offset,
                len,
                block_size: self.header.sector_size,
            });
        }
        Ok(())
    }

    fn first(&self, offset: u64) -> u64 {
        offset / self.sector() + self.header.iv_tweak
    }
}

impl BlockDevice for LuksDisk {
    fn info(&self) -> DiskInfo {
        let mut info = self.file.info();
        info.size = self.size;
        info.logical_block_size = self.header.sector_size;
        info.physical_block_size = info.physical_block_size.max(self.header.sector_size);
        // A hole in the file would read as random plaintext: no trims, no map.
        info.caps.trim = false;
        info.caps.fast_zero = false;
        info.caps.extents = false;
        info
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.file
            .read_at(buf, self.header.payload_offset + offset)?;
        self.xts
            .decrypt(buf, self.header.sector_size as usize, self.first(offset));
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        let mut sealed = buf.to_vec();
        self.xts.encrypt(
            &mut sealed,
            self.header.sector_size as usize,
            self.first(offset),
        );
        self.file
            .write_at(&sealed, self.header.payload_offset + offset, fua)
    }

    fn flush(&self) -> Result<()> {
        self.file.flush()
    }
}

/// How a new LUKS image is made.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Its passphrase (key slot 0).
    pub secret: Secret,
    /// Milliseconds of PBKDF2 the key slot costs to open (cryptsetup and QEMU: 2000).
    pub iter_time_ms: u32,
}

/// Fewest PBKDF2 iterations written, whatever the machine's speed.
const MIN_ITERATIONS: u32 = 1000;

/// PBKDF2-SHA256 iterations that take `ms` milliseconds here.
fn iterations_for(ms: u32) -> u32 {
    let probe = 20_000u32;
    let t = std::time::Instant::now();
    let mut out = [0u8; 32];
    Hash::Sha256.pbkdf2(b"probe", b"salt", probe, &mut out);
    let took = t.elapsed().as_secs_f64().max(1e-6);
    let per_ms = f64::from(probe) / (took * 1000.0);
    // Far below u32::MAX for any sane time; clamped anyway.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = (per_ms * f64::from(ms)).min(f64::from(u32::MAX)) as u32;
    n.max(MIN_ITERATIONS)
}

/// Sectors of a LUKS1 header as vdk writes it: the data (or, in a qcow2 image, the end of
/// the embedded header) at 2 MiB.
const PAYLOAD_SECTORS: u32 = 4096;
/// Bytes of a LUKS1 header as vdk writes it, key slots included.
pub const LUKS1_HEADER_BYTES: u64 = PAYLOAD_SECTORS as u64 * SECTOR as u64;

/// Writes a LUKS1 header for a disk of `size` bytes (aes-xts-plain64 with a 512-bit key,
/// sha256, 4000 stripes, data at 2 MiB, as cryptsetup lays LUKS1 out) into the new, empty
/// `file`, and sizes the file. QEMU and cryptsetup open what it makes.
pub fn create(file: &File, size: u64, opts: &CreateOptions) -> io::Result<()> {
    if !size.is_multiple_of(u64::from(SECTOR_U32)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a LUKS disk's size must be a multiple of 512",
        ));
    }
    file.set_len(LUKS1_HEADER_BYTES + size)?;
    write_luks1(file, 0, opts)?;
    file.sync_all()
}

/// Writes a new LUKS1 header (and key slot 0's material) of [`LUKS1_HEADER_BYTES`] at
/// `base` in `file`: a whole raw LUKS image's, or a qcow2 image's embedded one.
pub(crate) fn write_luks1(file: &File, base: u64, opts: &CreateOptions) -> io::Result<()> {
    use vdk_core::sys::FileExt;
    const KEY_BYTES: usize = 64;
    const KEY_BYTES_U32: u32 = 64;
    const STRIPES: u32 = 4000;
    let hash = Hash::Sha256;
    let mut key = Zeroizing::new(vec![0u8; KEY_BYTES]);
    getrandom::getrandom(&mut key).map_err(io::Error::other)?;
    let random = |n: usize| -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        getrandom::getrandom(&mut v).map_err(io::Error::other)?;
        Ok(v)
    };
    let slot_iterations = iterations_for(opts.iter_time_ms);
    let digest_iterations = (slot_iterations / 8).max(MIN_ITERATIONS);
    let digest_salt = random(32)?;
    let mut digest = [0u8; 20];
    hash.pbkdf2(&key, &digest_salt, digest_iterations, &mut digest);
    // Key material: 4000 stripes of 64 bytes, in 512-byte sectors, each slot 4 KiB aligned.
    let material_sectors = (KEY_BYTES_U32 * STRIPES).div_ceil(SECTOR_U32);
    let slot_sectors = material_sectors.div_ceil(8) * 8;
    let uuid = {
        let mut u = random(16)?;
        u[6] = (u[6] & 0x0f) | 0x40;
        u[8] = (u[8] & 0x3f) | 0x80;
        let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        )
    };
    let mut h = vec![0u8; LUKS1_HEADER];
    h[0..6].copy_from_slice(MAGIC);
    h[6..8].copy_from_slice(&1u16.to_be_bytes());
    h[8..11].copy_from_slice(b"aes");
    h[40..51].copy_from_slice(b"xts-plain64");
    h[72..78].copy_from_slice(b"sha256");
    h[104..108].copy_from_slice(&PAYLOAD_SECTORS.to_be_bytes());
    h[108..112].copy_from_slice(&KEY_BYTES_U32.to_be_bytes());
    h[112..132].copy_from_slice(&digest);
    h[132..164].copy_from_slice(&digest_salt);
    h[164..168].copy_from_slice(&digest_iterations.to_be_bytes());
    h[168..168 + uuid.len()].copy_from_slice(uuid.as_bytes());
    let slot_salt = random(32)?;
    for i in 0..8u32 {
        let s = &mut h[208 + i as usize * 48..208 + (i as usize + 1) * 48];
        let active = if i == 0 { SLOT_ACTIVE } else { SLOT_INACTIVE };
        s[0..4].copy_from_slice(&active.to_be_bytes());
        if i == 0 {
            s[4..8].copy_from_slice(&slot_iterations.to_be_bytes());
            s[8..40].copy_from_slice(&slot_salt);
        }
        s[40..44].copy_from_slice(&(8 + i * slot_sectors).to_be_bytes());
        s[44..48].copy_from_slice(&STRIPES.to_be_bytes());
    }
    if 8 + 8 * slot_sectors > PAYLOAD_SECTORS {
        return Err(io::Error::other("LUKS key slots overlap the data"));
    }
    // Slot 0's material: the volume key split, encrypted with the passphrase's key.
    let mut slot_key = Zeroizing::new(vec![0u8; KEY_BYTES]);
    hash.pbkdf2(
        opts.secret.bytes(),
        &slot_salt,
        slot_iterations,
        &mut slot_key,
    );
    let split = af_split(&key, STRIPES, hash)?;
    let mut material = Zeroizing::new(vec![0u8; material_sectors as usize * SECTOR]);
    material[..split.len()].copy_from_slice(&split);
    Xts::new(&slot_key)?.encrypt(&mut material, SECTOR, 0);
    file.write_all_at(&material, base + 8 * SECTOR as u64)?;
    file.write_all_at(&h, base)
}

/// AES-XTS over 512-byte sectors numbered by their byte offset in the file (what QEMU uses as
/// the IV of a LUKS-encrypted qcow2 image's data: the host offset).
pub struct SectorCipher(Xts);

impl fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SectorCipher(..)")
    }
}

impl SectorCipher {
    /// Encrypts `buf` (whole sectors) that goes at byte `offset`.
    pub fn encrypt(&self, buf: &mut [u8], offset: u64) {
        self.0.encrypt(buf, SECTOR, offset / SECTOR as u64);
    }

    /// Decrypts `buf` (whole sectors) read from byte `offset`.
    pub fn decrypt(&self, buf: &mut [u8], offset: u64) {
        self.0.decrypt(buf, SECTOR, offset / SECTOR as u64);
    }
}

/// Opens the LUKS header at `base` in `file` (a qcow2 image's) with `secret`: the cipher of
/// the image's data.
pub fn open_embedded(file: &File, base: u64, secret: &Secret) -> io::Result<SectorCipher> {
    let header = Header::read_at(file, base)?;
    if header.sector_size != SECTOR_U32 {
        return Err(bad(
            "an embedded LUKS header with sectors other than 512 bytes",
        ));
    }
    let key = header.unlock(file, secret)?;
    Ok(SectorCipher(Xts::new(&key)?))
}

/// What `vdk info` shows of a LUKS image (no key needed).
#[derive(Clone, Debug)]
pub struct Summary {
    /// 1 or 2.
    pub version: u16,
    /// `aes-xts-plain64`.
    pub cipher: String,
    /// Bits of the volume key.
    pub key_bits: usize,
    /// Key slots in use, by name.
    pub slots: Vec<String>,
    /// The plaintext disk's size.
    pub size: u64,
    /// Where the data starts.
    pub payload_offset: u64,
    /// The data's sector size.
    pub sector_size: u32,
    /// The header's UUID.
    pub uuid: String,
}

/// Reads the header of the LUKS image `path`.
pub fn summary(path: &Path) -> io::Result<Summary> {
    let f = File::open(path)?;
    let h = Header::read(&f)?;
    Ok(Summary {
        version: h.version,
        cipher: h.cipher.clone(),
        key_bits: h.key_bytes * 8,
        slots: h.slots.iter().map(|s| s.name.clone()).collect(),
        size: h.disk_size(f.metadata()?.len()),
        payload_offset: h.payload_offset,
        sector_size: h.sector_size,
        uuid: h.uuid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn af_split_and_merge_are_inverse() {
        let key: Vec<u8> = (0..64).collect();
        for hash in [Hash::Sha1, Hash::Sha256, Hash::Sha512] {
            let split = af_split(&key, 17, hash).unwrap();
            assert_eq!(*af_merge(&split, 64, hash), key, "{hash:?}");
        }
    }

    #[test]
    fn a_made_image_opens_with_its_passphrase_only_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.luks");
        let f = File::create_new(&path).unwrap();
        let opts = CreateOptions {
            secret: Secret::new(b"right".to_vec()),
            iter_time_ms: 10,
        };
        create(&f, 1 << 20, &opts).unwrap();
        let wrong = LuksDisk::open(
            &path,
            FileOptions::default(),
            Some(&Secret::new(b"wrong".to_vec())),
        )
        .unwrap_err();
        assert_eq!(wrong.kind(), io::ErrorKind::InvalidInput);
        assert!(wrong.to_string().contains("wrong key"), "{wrong}");
        let none = LuksDisk::open(&path, FileOptions::default(), None).unwrap_err();
        assert!(none.to_string().contains("--key-file"), "{none}");
        let d = LuksDisk::open(&path, FileOptions::default(), Some(&opts.secret)).unwrap();
        assert_eq!(d.info().size, 1 << 20);
        d.write_at(&[7u8; 4096], 8192, false).unwrap();
        let mut back = [0u8; 4096];
        d.read_at(&mut back, 8192).unwrap();
        assert_eq!(back, [7u8; 4096]);
        // On disk it is not the plaintext.
        let raw = std::fs::read(&path).unwrap();
        let at = 2 << 20;
        assert_ne!(&raw[at + 8192..at + 8192 + 4096], &[7u8; 4096][..]);
        assert!(matches!(
            d.write_at(&[1; 100], 0, false),
            Err(Error::Misaligned { .. })
        ));
        let s = summary(&path).unwrap();
        assert_eq!((s.version, s.key_bits, s.size), (1, 512, 1 << 20));
        assert_eq!(s.slots, ["0"]);
    }

    #[test]
    fn damaged_headers_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.luks");
        let f = File::create_new(&path).unwrap();
        let secret = Secret::new(b"k".to_vec());
        create(
            &f,
            1 << 20,
            &CreateOptions {
                secret: secret.clone(),
                iter_time_ms: 1,
            },
        )
        .unwrap();
        let good = std::fs::read(&path).unwrap();
        for (at, byte, want) in [
            (7, 9, "version 9"),
            (8, b'x', "not supported"),
            (72, b'm', "hash"),
            (208, 0x55, "state"),
        ] {
            let mut b = good.clone();
            b[at] = byte;
            std::fs::write(&path, &b).unwrap();
            let e = LuksDisk::open(&path, FileOptions::default(), Some(&secret)).unwrap_err();
            assert!(e.to_string().contains(want), "byte {at}: {e}");
        }
        // Key material changed: the passphrase no longer opens it.
        let mut b = good.clone();
        b[8 * 512 + 100] ^= 1;
        std::fs::write(&path, &b).unwrap();
        let e = LuksDisk::open(&path, FileOptions::default(), Some(&secret)).unwrap_err();
        assert!(e.to_string().contains("opens no key slot"), "{e}");
        std::fs::write(&path, &good[..300]).unwrap();
        let e = LuksDisk::open(&path, FileOptions::default(), Some(&secret)).unwrap_err();
        assert!(e.to_string().contains("no LUKS header"), "{e}");
    }
}
