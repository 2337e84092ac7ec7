//! `vdk list` and `vdk stats`: what the daemon has open, as tables for people (columns to
//! choose, no headers for scripts that cut) and JSON for programs.

use std::str::FromStr;

use clap::Args;
use vdk_core::size::Human;

use super::disks::{call, connect, disk_key, try_connect};
use super::out;
use crate::control::{DiskStatus, FsStatus, Request};

/// Widest line `vdk list` prints by default: long cells (paths, URIs) are shortened to fit.
const WIDTH: usize = 100;

/// A column of `vdk list`.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Column {
    Id,
    Image,
    Format,
    Size,
    Ro,
    Attach,
    Device,
    Mount,
    Export,
    Nbd,
    Iscsi,
    Filters,
    Reads,
    Writes,
    Read,
    Written,
    Errors,
    Latency,
}

/// Every column, in the order `-o help` lists them, with its header and what it shows.
const COLUMNS: &[(Column, &str, &str)] = &[
    (Column::Id, "ID", "the disk's id"),
    (Column::Image, "IMAGE", "the image file or URL"),
    (Column::Format, "FORMAT", "the image format"),
    (Column::Size, "SIZE", "virtual size"),
    (Column::Ro, "RO", "read-only"),
    (
        Column::Attach,
        "ATTACH",
        "how the kernel sees it: ublk, fuse-loop, iscsi or none",
    ),
    (Column::Device, "DEVICE", "its block device"),
    (Column::Mount, "MOUNT", "where its file system is mounted"),
    (Column::Export, "EXPORT", "the NBD export name"),
    (Column::Nbd, "NBD", "the first NBD URI"),
    (Column::Iscsi, "ISCSI", "the first iSCSI URL"),
    (Column::Filters, "FILTERS", "filters over the image"),
    (Column::Reads, "READS", "read requests"),
    (Column::Writes, "WRITES", "write requests"),
    (Column::Read, "READ", "bytes read"),
    (Column::Written, "WRITTEN", "bytes written"),
    (Column::Errors, "ERRORS", "failed requests"),
    (
        Column::Latency,
        "LATENCY",
        "mean read/write latency (with --filter stats)",
    ),
];

/// What `vdk list` shows without `-o`.
const DEFAULT: &[Column] = &[
    Column::Id,
    Column::Size,
    Column::Format,
    Column::Ro,
    Column::Device,
    Column::Mount,
    Column::Image,
];

impl Column {
    fn header(self) -> &'static str {
        COLUMNS.iter().find(|c| c.0 == self).map_or("?", |c| c.1)
    }

    /// Counts and sizes line up on the right.
    fn right(self) -> bool {
        matches!(
            self,
            Column::Size
                | Column::Reads
                | Column::Writes
                | Column::Read
                | Column::Written
                | Column::Errors
        )
    }

    /// Long cells of these columns may lose their start to fit the width.
    fn elidable(self) -> bool {
        matches!(
            self,
            Column::Image | Column::Mount | Column::Nbd | Column::Iscsi | Column::Filters
        )
    }

    fn cell(self, d: &DiskStatus) -> String {
        let dash = || "-".to_owned();
        let path = |p: &Option<std::path::PathBuf>| {
            p.as_ref().map_or_else(dash, |p| p.display().to_string())
        };
        match self {
            Column::Id => d.id.clone(),
            Column::Image if d.ejected => "(no disc)".into(),
            Column::Image => d.image.display().to_string(),
            Column::Format => d.format.clone(),
            Column::Size => Human(d.size).to_string(),
            Column::Ro => if d.read_only { "yes" } else { "no" }.into(),
            Column::Attach => d.attach.to_string(),
            Column::Device => path(&d.block_device),
            Column::Mount => path(&d.mount),
            Column::Export => d.export.clone(),
            Column::Nbd => d.nbd.first().cloned().unwrap_or_else(dash),
            Column::Iscsi => d.iscsi.first().cloned().unwrap_or_else(dash),
            Column::Filters if d.filters.is_empty() => dash(),
            Column::Filters => d.filters.join(" "),
            Column::Reads => d.stats.reads.to_string(),
            Column::Writes => d.stats.writes.to_string(),
            Column::Read => Human(d.stats.bytes_read).to_string(),
            Column::Written => Human(d.stats.bytes_written).to_string(),
            Column::Errors => d.stats.errors.to_string(),
            Column::Latency => d.latency.as_ref().map_or_else(dash, |l| {
                let mean = |op: &str| Micros(l.get(op).map_or(0, |s| s.mean_us));
                format!("{}/{}", mean("read"), mean("write"))
            }),
        }
    }
}

impl FromStr for Column {
    type Err = String;

    fn from_str(s: &str) -> Result<Column, String> {
        COLUMNS
            .iter()
            .find(|c| c.1.eq_ignore_ascii_case(s))
            .map(|c| c.0)
            .ok_or_else(|| format!("unknown column {s:?} (`vdk list -o help` lists them)"))
    }
}

/// The columns `-o` asks for: a list, or `+A,B` to add to the default ones.
fn columns(spec: Option<&str>) -> anyhow::Result<Vec<Column>> {
    let Some(spec) = spec else {
        return Ok(DEFAULT.to_vec());
    };
    let (mut cols, list) = match spec.strip_prefix('+') {
        Some(more) => (DEFAULT.to_vec(), more),
        None => (Vec::new(), spec),
    };
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let c: Column = name.parse().map_err(anyhow::Error::msg)?;
        if !cols.contains(&c) {
            cols.push(c);
        }
    }
    if cols.is_empty() {
        anyhow::bail!("-o names no column");
    }
    Ok(cols)
}

/// A time in microseconds, in the unit that reads best: `850 µs`, `12.5 ms`, `2.0 s`.
#[derive(Clone, Copy, Debug)]
struct Micros(u64);

impl std::fmt::Display for Micros {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Exact enough for display: one decimal shown.
        #[allow(clippy::cast_precision_loss)]
        let v = self.0 as f64;
        match self.0 {
            0..1_000 => write!(f, "{} µs", self.0),
            1_000..1_000_000 => write!(f, "{:.1} ms", v / 1e3),
            _ => write!(f, "{:.1} s", v / 1e6),
        }
    }
}

/// `s` cut to `width` characters by dropping its start: "…/images/disk.img".
fn elide(s: &str, width: usize) -> String {
    let n = s.chars().count();
    if n <= width || width == 0 {
        return s.to_owned();
    }
    let tail: String = s.chars().skip(n - (width - 1)).collect();
    format!("…{tail}")
}

/// Prints `rows` under `headers` (none with `headers: None`) in aligned columns, the cells of
/// `elidable` columns shortened, widest first, until a line fits `max` characters.
fn table(
    headers: Option<Vec<String>>,
    mut rows: Vec<Vec<String>>,
    right: &[bool],
    elidable: &[bool],
    max: Option<usize>,
) -> anyhow::Result<()> {
    let ncols = right.len();
    let width_of = |rows: &[Vec<String>], headers: &Option<Vec<String>>, c: usize| {
        rows.iter()
            .map(|r| r[c].chars().count())
            .chain(headers.iter().map(|h| h[c].chars().count()))
            .max()
            .unwrap_or(0)
    };
    let mut widths: Vec<usize> = (0..ncols).map(|c| width_of(&rows, &headers, c)).collect();
    if let Some(max) = max {
        // Two spaces between columns.
        let total = |w: &[usize]| w.iter().sum::<usize>() + 2 * w.len().saturating_sub(1);
        let floor = |c: usize| headers.as_ref().map_or(0, |h| h[c].chars().count()).max(8);
        loop {
            let over = total(&widths).saturating_sub(max);
            let widest = (0..ncols)
                .filter(|&c| elidable[c] && widths[c] > floor(c))
                .max_by_key(|&c| widths[c]);
            let (true, Some(c)) = (over > 0, widest) else {
                break;
            };
            let want = widths[c].saturating_sub(over).max(floor(c));
            for r in &mut rows {
                r[c] = elide(&r[c], want);
            }
            widths[c] = width_of(&rows, &headers, c);
        }
    }
    for r in headers.iter().chain(&rows) {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                let w = widths[c];
                if right[c] {
                    format!("{cell:>w$}")
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        crate::outln!("{}", cells.join("  ").trim_end())?;
    }
    Ok(())
}

/// `vdk list`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  vdk list                          id, size, format, device, mount point and image of each disk
  vdk list -o +NBD,ISCSI            the default columns and the disks' URIs
  vdk list -o ID,DEVICE --no-headers   for scripts (or --json)
  vdk list -o help                  every column")]
pub struct ListArgs {
    /// Print JSON (an array of disks) instead of a table.
    #[arg(long)]
    json: bool,
    /// Columns to show, comma-separated (`+COLS` adds to the default ones; `help` lists
    /// them all).
    #[arg(short = 'o', long = "output", value_name = "COLUMNS")]
    output: Option<String>,
    /// No header line (for scripts).
    #[arg(long, short = 'n')]
    no_headers: bool,
    /// Do not shorten long paths to fit 100 columns (columns chosen with -o are never
    /// shortened).
    #[arg(long)]
    wide: bool,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// `-o help`.
fn print_columns() -> anyhow::Result<()> {
    for (c, header, what) in COLUMNS {
        let default = if DEFAULT.contains(c) {
            " (default)"
        } else {
            ""
        };
        crate::outln!("{header:<8}  {what}{default}")?;
    }
    Ok(())
}

/// Runs `vdk list`.
pub fn list(args: ListArgs) -> anyhow::Result<()> {
    let paths = &args.socket.paths()?;
    if args.output.as_deref() == Some("help") {
        return print_columns();
    }
    let cols = columns(args.output.as_deref())?;
    let mut client = try_connect(paths)?;
    let disks: Vec<DiskStatus> = match &mut client {
        Some(c) => call(c, &Request::List)?,
        // No daemon: nothing is open.
        None => Vec::new(),
    };
    if args.json {
        return out::json(&disks);
    }
    // File systems and drives of `vdk fs`, under the disks (`vdk fs list` has them alone);
    // a CD-ROM's own browser is its disk's mount already.
    let mut filesystems: Vec<FsStatus> = match &mut client {
        // (None on Windows: no FUSE there.)
        Some(c) if cfg!(target_os = "linux") => call(c, &Request::FsList)?,
        _ => Vec::new(),
    };
    filesystems.retain(|f| !disks.iter().any(|d| d.mount.as_ref() == Some(&f.dir)));
    if disks.is_empty() && !args.no_headers {
        crate::outln!("no disks open")?;
    } else if !disks.is_empty() {
        let headers =
            (!args.no_headers).then(|| cols.iter().map(|c| c.header().to_owned()).collect());
        let rows = disks
            .iter()
            .map(|d| cols.iter().map(|c| c.cell(d)).collect())
            .collect();
        let right: Vec<bool> = cols.iter().map(|c| c.right()).collect();
        let elidable: Vec<bool> = cols.iter().map(|c| c.elidable()).collect();
        // The default columns fit 100 characters; columns asked for by name are shown whole.
        let fit = !args.wide && args.output.is_none();
        table(headers, rows, &right, &elidable, fit.then_some(WIDTH))?;
    }
    if !filesystems.is_empty() && !args.no_headers {
        crate::outln!("\nfile systems and drives (vdk fs):")?;
        print_filesystems(&filesystems, false)?;
    }
    Ok(())
}

/// The file systems of `vdk fs`, a line each.
pub fn print_filesystems(list: &[FsStatus], no_headers: bool) -> anyhow::Result<()> {
    let headers = (!no_headers).then(|| {
        ["DIR", "KIND", "SOURCE", "LABEL", "FROM"]
            .map(String::from)
            .to_vec()
    });
    let rows = list
        .iter()
        .map(|st| {
            let from = match (&st.cache, &st.disk) {
                (Some(c), _) => format!("cache {}", c.display()),
                (None, Some(d)) => format!("disk {d}, {} names", st.names),
                (None, None) => format!("{} names", st.names),
            };
            vec![
                st.dir.display().to_string(),
                st.kind.clone(),
                st.source.clone(),
                st.label.clone(),
                from,
            ]
        })
        .collect();
    table(
        headers,
        rows,
        &[false; 5],
        &[true, false, true, false, true],
        Some(WIDTH),
    )
}

/// `vdk fs list`.
#[derive(Debug, Args)]
pub struct FsListArgs {
    /// Print JSON (an array) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// No header line (for scripts).
    #[arg(long, short = 'n')]
    pub no_headers: bool,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// `vdk stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The disk: its id or its image file.
    disk: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// Runs `vdk stats`.
pub fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let paths = &args.socket.paths()?;
    let mut client = connect(paths, false)?;
    let req = Request::Stats(crate::control::DiskRequest {
        disk: disk_key(&args.disk)?,
    });
    let report: crate::control::StatsReport = call(&mut client, &req)?;
    if args.json {
        return out::json(&report);
    }
    crate::outln!("{}", report.id)?;
    print_stats(&report.ops)
}

/// Counters and latency of a stats filter's operations (`ops` as the control API gives
/// them), aligned, sizes and times in human units.
pub fn print_stats(ops: &crate::control::OpsReport) -> anyhow::Result<()> {
    let headers = [
        "OP",
        "COUNT",
        "BYTES",
        "ERRORS",
        "MEAN",
        "LATENCY (count per bucket)",
    ]
    .map(String::from)
    .to_vec();
    let rows = ops
        .iter()
        .map(|(op, s)| {
            let buckets: Vec<String> = s
                .latency_us_log2_buckets
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, n)| format!("<{}: {n}", Micros(1u64 << i.min(63))))
                .collect();
            vec![
                op.clone(),
                s.count.to_string(),
                Human(s.bytes).to_string(),
                s.errors.to_string(),
                Micros(s.mean_us).to_string(),
                if buckets.is_empty() {
                    "-".into()
                } else {
                    buckets.join(", ")
                },
            ]
        })
        .collect();
    table(
        Some(headers),
        rows,
        &[false, true, true, true, true, false],
        &[false; 6],
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plus_adds_columns_to_the_default_ones() {
        let cols = columns(Some("+nbd,ID")).unwrap();
        assert_eq!(cols[..DEFAULT.len()], *DEFAULT);
        assert_eq!(cols[DEFAULT.len()..], [Column::Nbd]);
    }

    #[test]
    fn an_unknown_column_is_named() {
        let e = columns(Some("ID,NOPE")).unwrap_err().to_string();
        assert!(e.contains("\"NOPE\""), "{e}");
    }

    #[test]
    fn elided_paths_keep_their_end() {
        assert_eq!(elide("/srv/images/disk.img", 10), "…/disk.img");
        assert_eq!(elide("short", 10), "short");
    }

    #[test]
    fn micros_pick_a_unit() {
        assert_eq!(Micros(850).to_string(), "850 µs");
        assert_eq!(Micros(12_500).to_string(), "12.5 ms");
        assert_eq!(Micros(2_000_000).to_string(), "2.0 s");
    }
}
