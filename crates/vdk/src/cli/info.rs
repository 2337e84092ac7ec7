//! `vdk info`: what an image is, as `qemu-img info` says it. The JSON has qemu-img's layout
//! and key names (`virtual-size`, `format-specific` with `type` and `data`, an array for
//! `--backing-chain`), and leaves out what does not apply instead of writing `null`, so that
//! scripts written for qemu-img read it; vdk adds `format-specific` data of its own where qemu
//! has none (a VHD's subformat, an ISO's volume id).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::{json, Map, Value};
use vdk_core::size::Human;
use vdk_formats::{Format, ImageInfo};

use crate::cloud::StoreArgs;

/// How a command prints its result.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, ValueEnum)]
pub enum Output {
    /// Text for people.
    #[default]
    Human,
    /// JSON for programs.
    Json,
}

/// `--output` and its `--json` shorthand, for commands that describe something.
#[derive(Clone, Copy, Debug, Args)]
pub struct OutputArgs {
    /// Output format, as qemu-img's --output.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = Output::Human)]
    output: Output,
    /// Print JSON (the same as --output=json).
    #[arg(long)]
    json: bool,
}

impl OutputArgs {
    /// Whether JSON was asked for.
    pub fn json(self) -> bool {
        self.json || self.output == Output::Json
    }
}

/// `vdk info`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  vdk info disk.qcow2
  vdk info --output=json --backing-chain overlay.qcow2   an array, top image first
  vdk info -U disk.qcow2                 an image a running vdk (or qemu) has open for writing
  vdk info s3://bucket/disks/web")]
pub struct InfoArgs {
    /// The image, or an object-store disk's URL.
    file: PathBuf,
    /// Its format (raw, qcow2, vhd, vhdx, luks, iso); probed from its magic if not given.
    #[arg(long, short = 'f')]
    format: Option<String>,
    /// Describe the backing images too.
    #[arg(long)]
    backing_chain: bool,
    /// Read the image even if a program has it open for writing (its metadata may be
    /// changing meanwhile), as qemu-img's -U.
    #[arg(short = 'U', long)]
    force_share: bool,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    store: StoreArgs,
}

/// Runs `vdk info`.
pub fn info(args: InfoArgs, paths: &crate::paths::Paths) -> anyhow::Result<()> {
    if let Some(url) = args.file.to_str().filter(|f| crate::cloud::is_url(f)) {
        return info_cloud(url, &args);
    }
    let format = args.format.as_deref().map(Format::from_name).transpose()?;
    if !args.force_share {
        match vdk_backends::check_not_written(&args.file) {
            Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => {
                return Err(super::name_holder(
                    e.into(),
                    &args.file,
                    paths,
                    "; add -U to read it anyway (what is being written may show half done)",
                ));
            }
            // Anything else (no such file, not readable) is for vdk_formats::info to say.
            _ => {}
        }
    }
    let info = vdk_formats::info(Path::new(&args.file), format, args.backing_chain)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    if args.output.json() {
        let v = if args.backing_chain {
            Value::Array(chain(&info).into_iter().map(to_json).collect())
        } else {
            to_json(&info)
        };
        return super::out::json(&v);
    }
    let mut text = String::new();
    for (n, i) in chain(&info).into_iter().enumerate() {
        if n > 0 {
            text.push('\n');
        }
        describe(&mut text, i);
    }
    super::out::write(format_args!("{text}"))
}

/// The image and, when they were read, its backing images, top first.
fn chain(top: &ImageInfo) -> Vec<&ImageInfo> {
    std::iter::successors(Some(top), |i| i.backing.as_deref()).collect()
}

/// The backing file's path as the image resolves it (relative to the image's directory).
fn full_backing(i: &ImageInfo) -> Option<PathBuf> {
    let name = i.backing_file.as_deref()?;
    Some(vdk_formats::backing_path(&i.path, name))
}

/// One image as qemu-img's JSON describes it (without qemu's `children`, its own block
/// graph).
pub fn to_json(i: &ImageInfo) -> Value {
    let mut m = Map::new();
    m.insert("virtual-size".into(), json!(i.virtual_size));
    m.insert("filename".into(), json!(i.path));
    if let Some(cs) = i.cluster_size {
        m.insert("cluster-size".into(), json!(cs));
    }
    m.insert("format".into(), json!(i.format.name()));
    m.insert("actual-size".into(), json!(i.disk_size));
    if let Some(fs) = format_specific(i) {
        m.insert("format-specific".into(), fs);
    }
    if i.encrypted {
        m.insert("encrypted".into(), json!(true));
    }
    if let Some(b) = &i.backing_file {
        if let Some(full) = full_backing(i) {
            m.insert("full-backing-filename".into(), json!(full));
        }
        m.insert("backing-filename".into(), json!(b));
        if let Some(f) = &i.backing_format {
            m.insert("backing-filename-format".into(), json!(f));
        }
    }
    m.insert("dirty-flag".into(), json!(i.dirty));
    Value::Object(m)
}

/// qemu-img's `format-specific`: `type` and `data`.
fn format_specific(i: &ImageInfo) -> Option<Value> {
    let mut d = Map::new();
    match i.format {
        Format::Qcow2 => {
            let v3 = i.version.is_some_and(|v| v >= 3);
            d.insert("compat".into(), json!(if v3 { "1.1" } else { "0.10" }));
            if let Some(c) = i.compression {
                d.insert("compression-type".into(), json!(c));
            }
            if v3 {
                d.insert("lazy-refcounts".into(), json!(i.lazy_refcounts));
            }
            if let Some(r) = i.refcount_bits {
                d.insert("refcount-bits".into(), json!(r));
            }
            if v3 {
                d.insert("corrupt".into(), json!(i.corrupt));
                d.insert("extended-l2".into(), json!(i.extended_l2));
            }
            if let Some(f) = &i.data_file {
                d.insert("data-file".into(), json!(f));
            }
            if let Some(c) = i.crypt {
                d.insert("encrypt".into(), json!({ "format": c }));
            }
            if !i.bitmaps.is_empty() {
                let list: Vec<Value> = i
                    .bitmaps
                    .iter()
                    .map(
                        |b| json!({"flags": b.flags, "name": b.name, "granularity": b.granularity}),
                    )
                    .collect();
                d.insert("bitmaps".into(), json!(list));
            }
        }
        Format::Vhd => {
            d.insert("subformat".into(), json!(i.subformat?));
        }
        Format::Iso => {
            d.insert("volume-id".into(), json!(i.volume_id.as_deref()?));
        }
        Format::Luks => {
            let l = i.luks.as_ref()?;
            d.insert(
                "cipher-alg".into(),
                json!(format!("aes-{}", l.key_bits / 2)),
            );
            d.insert("cipher-mode".into(), json!("xts"));
            d.insert("ivgen-alg".into(), json!("plain64"));
            d.insert("payload-offset".into(), json!(l.payload_offset));
            d.insert("uuid".into(), json!(l.uuid));
            d.insert("version".into(), json!(l.version));
            d.insert("sector-size".into(), json!(l.sector_size));
            d.insert("active-slots".into(), json!(l.slots));
        }
        Format::Raw | Format::Vhdx => return None,
    }
    Some(json!({ "type": i.format.name(), "data": d }))
}

/// One image as qemu-img's text describes it.
fn describe(out: &mut String, i: &ImageInfo) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "image: {}", i.path.display());
    let _ = writeln!(out, "file format: {}", i.format);
    let _ = writeln!(
        out,
        "virtual size: {} ({} bytes)",
        Human(i.virtual_size),
        i.virtual_size
    );
    let _ = writeln!(out, "disk size: {}", Human(i.disk_size));
    if let Some(cs) = i.cluster_size {
        let _ = writeln!(out, "cluster_size: {cs}");
    }
    if let Some(k) = i.subformat {
        let _ = writeln!(out, "subformat: {k}");
    }
    if let Some(v) = &i.volume_id {
        let _ = writeln!(out, "volume id: {v}");
    }
    if let Some(b) = &i.backing_file {
        let _ = writeln!(out, "backing file: {b}");
        if let Some(f) = &i.backing_format {
            let _ = writeln!(out, "backing file format: {f}");
        }
    }
    if i.snapshots > 0 {
        let _ = writeln!(
            out,
            "internal snapshots: {} (listed by qemu-img snapshot -l)",
            i.snapshots
        );
    }
    if let Some(v) = i.version {
        let _ = writeln!(out, "Format specific information:");
        let _ = writeln!(out, "    compat: {}", if v >= 3 { "1.1" } else { "0.10" });
        if let Some(c) = i.compression {
            let _ = writeln!(out, "    compression type: {c}");
        }
        if v >= 3 {
            let _ = writeln!(out, "    lazy refcounts: {}", i.lazy_refcounts);
        }
        if let Some(r) = i.refcount_bits {
            let _ = writeln!(out, "    refcount bits: {r}");
        }
        if v >= 3 {
            let _ = writeln!(out, "    corrupt: {}", i.corrupt);
            let _ = writeln!(out, "    extended l2: {}", i.extended_l2);
        }
        if i.dirty {
            let _ = writeln!(out, "    dirty: true (closed uncleanly)");
        }
        if !i.bitmaps.is_empty() {
            let _ = writeln!(out, "    bitmaps:");
            for b in &i.bitmaps {
                let flags = if b.flags.is_empty() {
                    "none".to_owned()
                } else {
                    b.flags.join(", ")
                };
                let _ = writeln!(
                    out,
                    "        {}: granularity {}, flags {flags}",
                    b.name, b.granularity
                );
            }
        }
        match i.crypt {
            Some("luks") => {
                let _ = writeln!(out, "    encrypt:\n        format: luks");
            }
            Some(other) => {
                let _ = writeln!(out, "    encrypted: yes ({other}: not supported by vdk)");
            }
            None => {}
        }
        if let Some(d) = &i.data_file {
            let _ = writeln!(out, "    data file: {d} (not supported by vdk)");
        }
    }
}

/// `vdk info URL`: a disk in object storage.
fn info_cloud(url: &str, args: &InfoArgs) -> anyhow::Result<()> {
    let s = vdk_objstore::info(url, &args.store.store_options())
        .with_context(|| format!("cannot read {url}"))?;
    let m = &s.meta;
    let compression = match m.compression {
        vdk_objstore::Compression::None => "none",
        vdk_objstore::Compression::Zstd => "zstd",
    };
    let encryption = match m.encryption {
        vdk_objstore::Encryption::None => "none",
        vdk_objstore::Encryption::Aes256Gcm => "aes-256-gcm",
    };
    if args.output.json() {
        let mut data = json!({
            "version": m.version,
            "uuid": m.uuid,
            "chunk-size": m.chunk_size,
            "chunks": m.chunks(),
            "chunks-stored": s.stored_chunks,
            "compression": compression,
            "encryption": encryption,
        });
        if let Some(w) = &s.writer {
            data["writer"] = json!(w);
        }
        let v = json!({
            "virtual-size": m.size,
            "filename": url,
            "cluster-size": m.chunk_size,
            "format": "vdk-objstore",
            "actual-size": s.stored_bytes,
            "format-specific": { "type": "vdk-objstore", "data": data },
            "dirty-flag": false,
        });
        return super::out::json(&v);
    }
    crate::outln!(
        "image: {url}\n\
         file format: vdk-objstore (version {})\n\
         virtual size: {} ({} bytes)\n\
         disk size: {}\n\
         chunk size: {}\n\
         chunks stored: {} of {}\n\
         compression: {compression}\n\
         encryption: {encryption}\n\
         uuid: {}\n\
         writer: {}",
        m.version,
        Human(m.size),
        m.size,
        Human(s.stored_bytes),
        m.chunk_size,
        s.stored_chunks,
        m.chunks(),
        m.uuid,
        s.writer.as_deref().unwrap_or("none")
    )
}
