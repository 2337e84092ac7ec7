//! System Use Sharing Protocol entries (SUSP 1.12) and the Rock Ridge Interchange Protocol
//! entries in them (RRIP 1.12, IEEE P1282): POSIX names, modes, owners, links, times,
//! device numbers and the relocation of deep directories.
//!
//! Entries are `signature (2) | length (1) | version (1) | data`. A CE entry names a
//! continuation area elsewhere on the disc, read through the caller; continuations are
//! bounded, so a loop of CE entries ends.

use super::volume::{both32, long_date, record_date, Time};

/// Most continuation areas followed for one record.
const MAX_CONTINUATIONS: usize = 16;
/// Most bytes of one continuation area.
pub const MAX_CONTINUATION: u32 = 64 << 10;
/// Longest name or symlink target assembled from NM or SL entries.
const MAX_TEXT: usize = 64 << 10;

/// What the SUSP entries of one directory record say.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct SystemUse {
    /// SP: the area uses SUSP; its `len_skp` byte count (in the root's `.` record).
    pub sp_skip: Option<u8>,
    /// Some Rock Ridge entry was seen.
    pub rock_ridge: bool,
    /// NM: the POSIX name.
    pub name: Option<Vec<u8>>,
    /// NM with the CURRENT or PARENT flag: the entry is `.` or `..`.
    pub dot_name: bool,
    /// PX: file mode (type and permissions).
    pub mode: Option<u32>,
    /// PX: link count.
    pub nlink: Option<u32>,
    /// PX: owner.
    pub uid: Option<u32>,
    /// PX: group.
    pub gid: Option<u32>,
    /// PX (RRIP 1.12): file serial number; hard links share it.
    pub ino: Option<u32>,
    /// PN: device number (high, low).
    pub rdev: Option<(u32, u32)>,
    /// SL: the symbolic link's target.
    pub symlink: Option<Vec<u8>>,
    /// CL: this placeholder stands for a directory relocated to this block.
    pub child_link: Option<u32>,
    /// PL: the real parent of a relocated directory (in its `..`).
    pub parent_link: Option<u32>,
    /// RE: this directory is a relocated one, shown where its CL placeholder is.
    pub relocated: bool,
    /// TF: modification time.
    pub mtime: Option<Time>,
    /// TF: access time.
    pub atime: Option<Time>,
    /// TF: attribute change time.
    pub ctime: Option<Time>,
    /// TF: creation time.
    pub crtime: Option<Time>,
    /// ZF: the file's data is zisofs-compressed (algorithm `pz`).
    pub zf: Option<super::zisofs::Zf>,
}

/// Where a continuation area is: block, offset in it, length.
pub type Continuation = (u32, u32, u32);

/// Parses a system use area, reading continuation areas with `more`. `skip` bytes at the
/// start of the area are not SUSP (the SP entry's `len_skp`).
pub fn parse(
    area: &[u8],
    skip: usize,
    more: &mut dyn FnMut(Continuation) -> Option<Vec<u8>>,
) -> SystemUse {
    let mut su = SystemUse::default();
    let mut name_done = false;
    let mut link = LinkBuilder::default();
    let mut next = Some(area.get(skip..).unwrap_or(&[]).to_vec());
    let mut continuations = 0;
    while let Some(bytes) = next.take() {
        let mut at = 0;
        let mut ce = None;
        while at + 4 <= bytes.len() {
            let sig = [bytes[at], bytes[at + 1]];
            let len = entry_len(&bytes, at);
            if len < 4 || at + len > bytes.len() {
                break;
            }
            let data = &bytes[at + 4..at + len];
            match &sig {
                b"SP" if data.len() >= 3 && data[..2] == [0xbe, 0xef] => su.sp_skip = Some(data[2]),
                b"ST" => break,
                b"CE" if data.len() >= 24 => {
                    ce = Some((both32(data), both32(&data[8..]), both32(&data[16..])));
                }
                b"PX" if data.len() >= 32 => {
                    su.rock_ridge = true;
                    su.mode = Some(both32(data));
                    su.nlink = Some(both32(&data[8..]));
                    su.uid = Some(both32(&data[16..]));
                    su.gid = Some(both32(&data[24..]));
                    if data.len() >= 40 {
                        su.ino = Some(both32(&data[32..]));
                    }
                }
                b"PN" if data.len() >= 16 => {
                    su.rock_ridge = true;
                    su.rdev = Some((both32(data), both32(&data[8..])));
                }
                b"NM" if !data.is_empty() => {
                    su.rock_ridge = true;
                    let flags = data[0];
                    if flags & 0x06 != 0 {
                        su.dot_name = true;
                    } else if !name_done {
                        let name = su.name.get_or_insert_with(Vec::new);
                        if name.len() + data.len() <= MAX_TEXT {
                            name.extend_from_slice(&data[1..]);
                        }
                        // Without CONTINUE, the name is whole.
                        name_done = flags & 0x01 == 0;
                    }
                }
                b"SL" if !data.is_empty() => {
                    su.rock_ridge = true;
                    link.entry(data);
                }
                b"CL" if data.len() >= 8 => {
                    su.rock_ridge = true;
                    su.child_link = Some(both32(data));
                }
                b"PL" if data.len() >= 8 => {
                    su.rock_ridge = true;
                    su.parent_link = Some(both32(data));
                }
                b"RE" => {
                    su.rock_ridge = true;
                    su.relocated = true;
                }
                b"TF" if !data.is_empty() => {
                    su.rock_ridge = true;
                    times(data, &mut su);
                }
                b"ZF" => su.zf = super::zisofs::Zf::parse(data),
                b"RR" | b"ER" | b"ES" => su.rock_ridge |= &sig == b"RR",
                _ => {}
            }
            at += len;
        }
        if let Some(c) = ce {
            continuations += 1;
            if continuations <= MAX_CONTINUATIONS && c.2 <= MAX_CONTINUATION {
                next = more(c);
            }
        }
    }
    su.symlink = link.finish();
    su
}

/// The length of the entry at `at`. Its length byte, unless that is wrapped: genisoimage
/// 1.1.11 writes an SL entry of more than 255 bytes (a long symlink target continued into a
/// continuation area) with its length modulo 256, 268 as 12. When no entry (or the end of the
/// area, or padding) follows at the length the byte says, but one does 256 (or 512, ...)
/// bytes further, the entry is that long.
fn entry_len(bytes: &[u8], at: usize) -> usize {
    let declared = usize::from(bytes[at + 2]);
    // What may follow an entry: the area's end, zero padding, or another entry's header
    // (every SUSP and RRIP signature is two capital letters).
    let follows = |p: usize| match bytes.get(p..) {
        None => false,
        Some(rest) if rest.iter().all(|&b| b == 0) => true,
        Some(rest) => {
            rest.len() >= 4
                && rest[0].is_ascii_uppercase()
                && rest[1].is_ascii_uppercase()
                && rest[2] >= 4
        }
    };
    if declared < 4 || follows(at + declared) {
        return declared;
    }
    let mut len = declared + 256;
    while at + len <= bytes.len() {
        if follows(at + len) {
            return len;
        }
        len += 256;
    }
    declared
}

/// TF (RRIP 4.1.6): the times its flags announce, in a fixed order, each 7 or 17 bytes.
fn times(data: &[u8], su: &mut SystemUse) {
    let flags = data[0];
    let long = flags & 0x80 != 0;
    let width = if long { 17 } else { 7 };
    let mut at = 1;
    // Bits: creation, modify, access, attributes, backup, expiration, effective.
    for bit in 0..7 {
        if flags & (1 << bit) == 0 {
            continue;
        }
        let Some(b) = data.get(at..at + width) else {
            return;
        };
        at += width;
        let t = if long { long_date(b) } else { record_date(b) };
        match bit {
            0 => su.crtime = t,
            1 => su.mtime = t,
            2 => su.atime = t,
            3 => su.ctime = t,
            _ => {}
        }
    }
}

/// Builds a symlink target from SL entries (RRIP 4.1.3): component records of flags, length
/// and content; CONTINUE (1) joins a component to the next, CURRENT (2) is `.`, PARENT (4)
/// is `..`, ROOT (8) is the leading `/`.
#[derive(Debug, Default)]
struct LinkBuilder {
    target: Vec<u8>,
    seen: bool,
    /// The last component continues in the next one (no `/` between them).
    joined: bool,
    /// The entry's own flag said more SL entries follow.
    more: bool,
    done: bool,
}

impl LinkBuilder {
    fn entry(&mut self, data: &[u8]) {
        if self.done {
            return;
        }
        self.seen = true;
        let entry_continues = data[0] & 0x01 != 0;
        let mut at = 1;
        while at + 2 <= data.len() {
            let flags = data[at];
            let len = usize::from(data[at + 1]);
            let Some(content) = data.get(at + 2..at + 2 + len) else {
                break;
            };
            at += 2 + len;
            if self.target.len() + len + 4 > MAX_TEXT {
                break;
            }
            let needs_slash = !self.target.is_empty() && !self.joined && self.target != b"/";
            if needs_slash {
                self.target.push(b'/');
            }
            if flags & 0x08 != 0 {
                self.target.clear();
                self.target.push(b'/');
            } else if flags & 0x02 != 0 {
                self.target.push(b'.');
            } else if flags & 0x04 != 0 {
                self.target.extend_from_slice(b"..");
            } else {
                self.target.extend_from_slice(content);
            }
            self.joined = flags & 0x01 != 0;
        }
        self.more = entry_continues;
        if !self.more {
            self.done = true;
        }
    }

    fn finish(self) -> Option<Vec<u8>> {
        self.seen.then_some(self.target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(sig: &[u8; 2], data: &[u8]) -> Vec<u8> {
        let mut e = vec![sig[0], sig[1], u8::try_from(4 + data.len()).unwrap(), 1];
        e.extend_from_slice(data);
        e
    }

    fn both(v: u32) -> Vec<u8> {
        let mut b = v.to_le_bytes().to_vec();
        b.extend_from_slice(&v.to_be_bytes());
        b
    }

    fn none(_: Continuation) -> Option<Vec<u8>> {
        None
    }

    #[test]
    fn px_nm_and_tf_are_read() {
        let mut area = entry(
            b"PX",
            &[both(0o100644), both(2), both(1000), both(100), both(77)].concat(),
        );
        area.extend(entry(b"NM", b"\x01long-na"));
        area.extend(entry(b"NM", b"\x00me.txt"));
        area.extend(entry(
            b"TF",
            &[&[0x02u8][..], &[126, 1, 2, 3, 4, 5, 0]].concat(),
        ));
        let su = parse(&area, 0, &mut none);
        assert_eq!(su.mode, Some(0o100644));
        assert_eq!(
            (su.nlink, su.uid, su.gid, su.ino),
            (Some(2), Some(1000), Some(100), Some(77))
        );
        assert_eq!(su.name.as_deref(), Some(&b"long-name.txt"[..]));
        assert!(su.mtime.is_some());
        assert!(su.rock_ridge);
    }

    #[test]
    fn symlinks_join_their_components() {
        // /usr/../lib/lo + ng.so (the last component continues across two records).
        let data = [
            &[0u8][..],
            &[0x08, 0],
            &[0, 3],
            b"usr",
            &[0x04, 0],
            &[0, 3],
            b"lib",
            &[0x01, 2],
            b"lo",
            &[0, 5],
            b"ng.so",
        ]
        .concat();
        let su = parse(&entry(b"SL", &data), 0, &mut none);
        assert_eq!(su.symlink.as_deref(), Some(&b"/usr/../lib/long.so"[..]));
        let rel = [&[0u8][..], &[0x02, 0], &[0, 1], b"x"].concat();
        let su = parse(&entry(b"SL", &rel), 0, &mut none);
        assert_eq!(su.symlink.as_deref(), Some(&b"./x"[..]));
    }

    #[test]
    fn continuation_areas_are_followed_and_bounded() {
        let ce = entry(b"CE", &[both(40), both(0), both(200)].concat());
        let mut calls = 0;
        let mut more = |c: Continuation| {
            calls += 1;
            assert_eq!(c, (40, 0, 200));
            // Another CE to the same place: a loop that must end.
            let mut a = entry(b"NM", b"\x00n");
            a.extend(entry(b"CE", &[both(40), both(0), both(200)].concat()));
            Some(a)
        };
        let su = parse(&ce, 0, &mut more);
        assert_eq!(su.name.as_deref(), Some(&b"n"[..]));
        assert_eq!(calls, MAX_CONTINUATIONS);
    }

    #[test]
    fn an_sl_entry_with_its_length_byte_wrapped_reads_whole() {
        // As genisoimage writes a 300-byte target's tail into a continuation area: one SL
        // entry of 268 bytes whose length byte says 12, then a TF entry.
        let mut data = vec![0u8];
        let mut want = Vec::new();
        for i in 0..14 {
            let c = format!("c{i:02}{}", "x".repeat(13));
            data.extend([0, 16]);
            data.extend(c.as_bytes());
            want.push(c);
        }
        data.extend([0, 9]);
        data.extend(b"tail-part");
        want.push("tail-part".into());
        let whole = 4 + data.len();
        assert!(whole > 255);
        let mut sl = vec![b'S', b'L', (whole % 256) as u8, 1];
        sl.extend(&data);
        let mut tf = vec![0x02];
        tf.extend([126, 11, 2, 10, 20, 30, 0]);
        sl.extend(entry(b"TF", &tf));
        let su = parse(&sl, 0, &mut none);
        assert_eq!(su.symlink.unwrap(), want.join("/").into_bytes());
        assert!(su.mtime.is_some(), "the entry after it is read too");
    }

    #[test]
    fn truncated_entries_stop_parsing_without_panic() {
        let su = parse(&[b'P', b'X', 200, 1, 0, 0], 0, &mut none);
        assert_eq!(su, SystemUse::default());
        let su = parse(&entry(b"PX", &[1, 2, 3]), 0, &mut none);
        assert_eq!(su.mode, None);
        let su = parse(&entry(b"SL", &[0, 0, 200]), 0, &mut none);
        assert_eq!(su.symlink.as_deref(), Some(&b""[..]));
    }
}
