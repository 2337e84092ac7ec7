//! `vdk compare`: whether two images hold the same disk, as `qemu-img compare` says it. Both
//! are read through their formats (and backing chains); ranges that both images have as
//! holes or zeroes are not read at all. Images of different sizes compare equal when what the
//! larger one has past the smaller's end reads as zeroes, unless `--strict`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use vdk_core::{BlockDevice, ExtentKind};
use vdk_formats::{Format, OpenOptions};

/// Bytes read from each image at a time.
const STEP: usize = 1 << 20;
/// Extent map looked up at a time.
const MAP_STEP: u64 = 1 << 30;

/// `vdk compare`.
#[derive(Debug, Args)]
#[command(after_help = "\
Exit status, as qemu-img compare: 0 the images hold the same data, 1 they differ, 2 an
error.

Examples:
  vdk compare disk.qcow2 disk.img        a qcow2 image and its raw copy
  vdk compare -U live.qcow2 backup.qcow2 an image a vdk daemon has open")]
pub struct CompareArgs {
    /// The first image.
    a: PathBuf,
    /// The second image.
    b: PathBuf,
    /// Format of the first image; probed if not given.
    #[arg(short = 'f', value_name = "FORMAT")]
    a_format: Option<String>,
    /// Format of the second image; probed if not given.
    #[arg(short = 'F', value_name = "FORMAT")]
    b_format: Option<String>,
    /// Images of different sizes differ, whatever lies past the smaller one's end.
    #[arg(short = 's', long)]
    strict: bool,
    /// Read images that a program has open for writing, as qemu-img's -U.
    #[arg(short = 'U', long)]
    force_share: bool,
    /// Print nothing; the exit status says it.
    #[arg(short = 'q', long)]
    quiet: bool,
    #[command(flatten)]
    key: super::KeyArgs,
}

/// What the comparison found.
#[derive(Debug, Eq, PartialEq)]
enum Outcome {
    Same,
    /// The first offset where they differ.
    Differ(u64),
    /// Sizes differ (strict mode).
    Sizes(u64, u64),
}

fn open(
    path: &Path,
    format: Option<&str>,
    force_share: bool,
    key: Option<vdk_formats::luks::Secret>,
) -> anyhow::Result<Arc<dyn BlockDevice>> {
    let format = format.map(Format::from_name).transpose()?;
    Ok(vdk_formats::open(
        path,
        &OpenOptions {
            format,
            read_only: true,
            force_share,
            key,
            ..OpenOptions::default()
        },
    )
    .with_context(|| format!("cannot open {}", path.display()))?
    .device)
}

/// Runs `vdk compare`; its exit status is qemu-img compare's.
pub fn run(args: CompareArgs, paths: &crate::paths::Paths) -> anyhow::Result<ExitCode> {
    let compared = (|| {
        let hint = "; add -U to compare it as it is now";
        // One passphrase opens whichever of them is encrypted (LUKS).
        let key = match args.key.secret(crate::cloud::Ask::IfEncrypted(&args.a))? {
            Some(k) => Some(k),
            None => args.key.secret(crate::cloud::Ask::IfEncrypted(&args.b))?,
        };
        let a = open(
            &args.a,
            args.a_format.as_deref(),
            args.force_share,
            key.clone(),
        )
        .map_err(|e| super::name_holder(e, &args.a, paths, hint))?;
        let b = open(&args.b, args.b_format.as_deref(), args.force_share, key)
            .map_err(|e| super::name_holder(e, &args.b, paths, hint))?;
        compare(&*a, &*b, args.strict)
    })();
    let outcome = match compared {
        Ok(o) => o,
        Err(e) => {
            // qemu-img compare says errors with status 2 (1 is "they differ").
            let msg = vdk::message::one_line(e.chain().map(ToString::to_string));
            super::out::error(&msg);
            return Ok(ExitCode::from(2));
        }
    };
    let (text, code) = match outcome {
        Outcome::Same => ("Images are identical.".to_owned(), 0),
        Outcome::Differ(at) => (format!("Content mismatch at offset {at}!"), 1),
        Outcome::Sizes(a, b) => (format!("Image size mismatch: {a} and {b} bytes"), 1),
    };
    if !args.quiet {
        crate::outln!("{text}")?;
    }
    Ok(ExitCode::from(code))
}

/// Compares `a` and `b`: their common part byte for byte (skipping what both have as holes
/// or zeroes), then the rest of the larger one against zeroes.
fn compare(a: &dyn BlockDevice, b: &dyn BlockDevice, strict: bool) -> anyhow::Result<Outcome> {
    let (sa, sb) = (a.info().size, b.info().size);
    if strict && sa != sb {
        return Ok(Outcome::Sizes(sa, sb));
    }
    let common = sa.min(sb);
    let mut ba = vec![0u8; STEP];
    let mut bb = vec![0u8; STEP];
    let mut at = 0;
    while at < common {
        let len = MAP_STEP.min(common - at);
        // Where both read as zeroes without being read: skipped.
        let ea = a.extents(at, len)?;
        let eb = b.extents(at, len)?;
        let zero_a = zero_runs(&ea);
        let zero_b = zero_runs(&eb);
        let mut p = at;
        while p < at + len {
            let n = (STEP as u64).min(at + len - p);
            if covered(&zero_a, p, n) && covered(&zero_b, p, n) {
                p += n;
                continue;
            }
            let n = usize::try_from(n).unwrap_or(STEP);
            a.read_at(&mut ba[..n], p)?;
            b.read_at(&mut bb[..n], p)?;
            if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
                return Ok(Outcome::Differ(p + i as u64));
            }
            p += n as u64;
        }
        at += len;
    }
    let (longer, size) = if sa > sb { (a, sa) } else { (b, sb) };
    Ok(
        match vdk_core::first_data_in(longer, common, size)
            .map_err(|e| anyhow::anyhow!("cannot read the disk: {e}"))?
        {
            Some(at) => Outcome::Differ(at),
            None => Outcome::Same,
        },
    )
}

/// The runs of `e` that read as zeroes (holes and zero extents), as (start, end).
fn zero_runs(e: &vdk_core::Extents) -> Vec<(u64, u64)> {
    e.iter()
        .filter(|(_, r)| r.kind != ExtentKind::Data)
        .map(|(off, r)| (off, off + r.len))
        .collect()
}

/// Whether `[at, at + n)` lies inside one of `runs`.
fn covered(runs: &[(u64, u64)], at: u64, n: u64) -> bool {
    runs.iter().any(|(s, e)| *s <= at && at + n <= *e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdk_backends::MemoryDisk;

    #[test]
    fn equal_disks_are_identical_and_a_changed_byte_is_found() {
        let a = MemoryDisk::new(4 << 20);
        let b = MemoryDisk::new(4 << 20);
        a.write_at(&[7; 4096], 1 << 20, false).unwrap();
        b.write_at(&[7; 4096], 1 << 20, false).unwrap();
        assert_eq!(compare(&a, &b, false).unwrap(), Outcome::Same);
        b.write_at(&[8], (1 << 20) + 100, false).unwrap();
        assert_eq!(
            compare(&a, &b, false).unwrap(),
            Outcome::Differ((1 << 20) + 100)
        );
    }

    #[test]
    fn a_longer_disk_with_zeroes_past_the_end_is_the_same_unless_strict() {
        let a = MemoryDisk::new(1 << 20);
        let b = MemoryDisk::new(2 << 20);
        assert_eq!(compare(&a, &b, false).unwrap(), Outcome::Same);
        assert_eq!(
            compare(&a, &b, true).unwrap(),
            Outcome::Sizes(1 << 20, 2 << 20)
        );
        b.write_at(&[1], (1 << 20) + 5, false).unwrap();
        assert_eq!(
            compare(&a, &b, false).unwrap(),
            Outcome::Differ((1 << 20) + 5)
        );
    }
}
