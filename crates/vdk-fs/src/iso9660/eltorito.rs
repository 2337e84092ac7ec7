//! El Torito boot images (El Torito specification 1.0, 1995): the boot record volume
//! descriptor points at a catalog of 32-byte entries, each naming an image on the disc.

use super::volume::both32;

/// Boot system identifier of an El Torito boot record.
pub const ID: &[u8] = b"EL TORITO SPECIFICATION";

/// One bootable image of the catalog.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct BootImage {
    /// Platform id (0 x86, 0xef EFI, ...).
    pub platform: u8,
    /// Media type: 0 no emulation, 1-3 floppies of 1.2, 1.44 and 2.88 MB, 4 hard disk.
    pub media: u8,
    /// The first logical block (2048 bytes) of the image.
    pub lba: u32,
    /// Its length in bytes.
    pub size: u64,
}

impl BootImage {
    /// A file name for it: `boot-N-PLATFORM-MEDIA.img`, as 7-Zip and others show them.
    pub fn file_name(&self, n: usize) -> String {
        let platform = match self.platform {
            0 => "x86",
            1 => "ppc",
            2 => "mac",
            0xef => "efi",
            _ => "other",
        };
        let media = match self.media {
            0 => "noemul",
            1 => "floppy1200",
            2 => "floppy1440",
            3 => "floppy2880",
            4 => "harddisk",
            _ => "unknown",
        };
        format!("boot-{n}-{platform}-{media}.img")
    }
}

/// The catalog's block, from a boot record volume descriptor; None if it is not El Torito.
pub fn catalog_block(descriptor: &[u8; 2048]) -> Option<u32> {
    (&descriptor[7..7 + ID.len()] == ID).then(|| both32(&descriptor[0x47..]))
}

/// Floppy images are the size of their floppy; no-emulation images are as long as their
/// sector count (of 512 bytes) says; hard disk images as long as the partition in their MBR
/// (read by the caller; `hd_size`).
fn image_size(media: u8, sectors: u16, hd_size: Option<u64>) -> u64 {
    match media {
        1 => 1_228_800,
        2 => 1_474_560,
        3 => 2_949_120,
        4 => hd_size.unwrap_or(u64::from(sectors) * 512),
        _ => u64::from(sectors.max(1)) * 512,
    }
}

/// The images of a boot catalog (the first 2048 bytes of it). `hd_size` gives the size of a
/// hard disk emulation image starting at a block, from its partition table.
pub fn parse(catalog: &[u8], hd_size: &mut dyn FnMut(u32) -> Option<u64>) -> Vec<BootImage> {
    let mut out = Vec::new();
    // The validation entry: header id 1, key bytes 55 AA, words summing to zero.
    let Some(v) = catalog.get(..32) else {
        return out;
    };
    let sum = v.chunks_exact(2).fold(0u16, |s, w| {
        s.wrapping_add(u16::from_le_bytes([w[0], w[1]]))
    });
    if v[0] != 1 || v[30] != 0x55 || v[31] != 0xaa || sum != 0 {
        return out;
    }
    let mut platform = v[1];
    let mut entry = |e: &[u8], platform: u8| {
        // Bootable (88h) or not (00h); either is an image on the disc.
        if e[0] != 0x88 && e[0] != 0x00 {
            return;
        }
        let media = e[1] & 0x0f;
        let sectors = u16::from_le_bytes([e[6], e[7]]);
        let lba = both32(&e[8..]);
        if lba == 0 {
            return;
        }
        let hd = if media == 4 { hd_size(lba) } else { None };
        out.push(BootImage {
            platform,
            media,
            lba,
            size: image_size(media, sectors, hd),
        });
    };
    entry(&catalog[32..64], platform);
    // Section headers (90h, 91h for the last) and their entries follow.
    let mut at = 64;
    while at + 32 <= catalog.len() {
        let h = &catalog[at..at + 32];
        if h[0] != 0x90 && h[0] != 0x91 {
            break;
        }
        platform = h[1];
        let count = usize::from(u16::from_le_bytes([h[2], h[3]]));
        at += 32;
        for _ in 0..count {
            if at + 32 > catalog.len() {
                break;
            }
            let e = &catalog[at..at + 32];
            // Extension entries (44h) carry selection criteria, not images.
            if e[0] != 0x44 {
                entry(e, platform);
            }
            at += 32;
        }
        if h[0] == 0x91 {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validation(platform: u8) -> Vec<u8> {
        let mut v = vec![0u8; 32];
        v[0] = 1;
        v[1] = platform;
        v[30] = 0x55;
        v[31] = 0xaa;
        let sum = v.chunks_exact(2).fold(0u16, |s, w| {
            s.wrapping_add(u16::from_le_bytes([w[0], w[1]]))
        });
        v[28..30].copy_from_slice(&0u16.wrapping_sub(sum).to_le_bytes());
        v
    }

    fn default_entry(media: u8, sectors: u16, lba: u32) -> Vec<u8> {
        let mut e = vec![0u8; 32];
        e[0] = 0x88;
        e[1] = media;
        e[6..8].copy_from_slice(&sectors.to_le_bytes());
        e[8..12].copy_from_slice(&lba.to_le_bytes());
        e
    }

    #[test]
    fn a_catalog_lists_its_images() {
        let mut c = validation(0);
        c.extend(default_entry(0, 4, 40));
        let mut header = vec![0u8; 32];
        header[0] = 0x91;
        header[1] = 0xef;
        header[2] = 1;
        c.extend(header);
        c.extend(default_entry(0, 2880, 50));
        let images = parse(&c, &mut |_| None);
        assert_eq!(images.len(), 2);
        assert_eq!((images[0].lba, images[0].size), (40, 2048));
        assert_eq!(images[1].platform, 0xef);
        assert_eq!(images[1].file_name(1), "boot-1-efi-noemul.img");
    }

    #[test]
    fn a_bad_validation_entry_means_no_images() {
        let mut c = validation(0);
        c[31] = 0;
        c.extend(default_entry(2, 1, 40));
        assert!(parse(&c, &mut |_| None).is_empty());
        assert!(parse(&[1, 2, 3], &mut |_| None).is_empty());
    }
}
