//! `vdk serve`: NBD exports and iSCSI targets in the foreground.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use anyhow::{bail, Context};
use clap::Args;
use tracing::info;
use vdk_backends::{FileDisk, FileOptions, MemoryDisk, PatternDisk};
use vdk_core::size::{parse_size, Human};
use vdk_core::BlockDevice;
use vdk_formats::Format;
use vdk_nbd::{Export, Rule, Server};

use crate::front;

/// The NBD port, on loopback only unless told otherwise.
const DEFAULT_LISTEN: &str = "tcp://127.0.0.1:10809";

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  vdk serve disk.img                          the file as the default export, on port 10809
  vdk serve --memory 4G                       a 4 GiB RAM disk
  vdk serve --listen unix:///run/vdk.sock a.img b.img
  vdk serve --export data=data.img --export scratch=memory:1G --read-only
  vdk serve --listen iscsi://0.0.0.0 disk.img movie.iso
                                              iSCSI targets iqn.2026-11.org.vdk:disk.img (a disk)
                                              and ...:movie.iso (a CD-ROM), LUN 0 each
  vdk serve --listen vhost-user-blk:///run/vm1-disk.sock disk.qcow2
                                              a vhost-user-blk export for a VM (docs/vhost-user.md)
  vdk serve --tls require --tls-certificates /etc/vdk/pki --tls-verify-peer \\
            --listen tcp://0.0.0.0:10809 --allow cert:backup-host disk.img
                                              TLS only, clients with a certificate of the CA,
                                              and only the one named backup-host sees the disk
  vdk serve -s disk.img                       one client on stdin/stdout (inetd, nbdkit -s)

SIGHUP reads the TLS certificates again (for new connections).")]
pub struct ServeArgs {
    /// Images to export (raw, qcow2, vhd, vhdx, luks, iso; or s3://, gs://, az://, file:// URLs of
    /// disks in object storage), each under its file name; the first is also the default
    /// export (the empty name).
    images: Vec<PathBuf>,
    /// Export a sparse RAM disk of this size (e.g. 4G) under the name "memory".
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// Export IMAGE under NAME; IMAGE is a path, memory:SIZE (a sparse RAM disk) or
    /// pattern:SIZE (read-only test disk: each 8-byte word holds its offset). Repeatable.
    #[arg(long = "export", value_name = "NAME=IMAGE")]
    exports: Vec<String>,
    /// Refuse writes (files are opened read-only).
    #[arg(long)]
    read_only: bool,
    /// Where to listen: tcp://HOST:PORT or unix:///PATH for NBD, iscsi://HOST[:PORT] for
    /// iSCSI (port 3260 by default), vhost-user-blk:///PATH for a VM's virtio-blk disk (one
    /// socket per export, in order). Repeatable; several protocols at once are fine.
    #[arg(long, value_name = "URI")]
    listen: Vec<String>,
    /// iSCSI: initiators must log in with CHAP as the user:secret on the first line of FILE.
    #[arg(long, value_name = "FILE")]
    iscsi_chap: Option<PathBuf>,
    /// iSCSI: the target's own user:secret (first line of FILE), for initiators that ask for
    /// mutual CHAP.
    #[arg(long, value_name = "FILE", requires = "iscsi_chap")]
    iscsi_mutual_chap: Option<PathBuf>,
    /// iSCSI: only this initiator name may log in (repeatable; default: any).
    #[arg(long = "iscsi-initiator", value_name = "IQN")]
    iscsi_initiators: Vec<String>,
    /// Open files with O_DIRECT (requests must then be 4096-aligned; raw images only).
    #[arg(long)]
    direct: bool,
    /// Image format of the files (raw, qcow2, vhdx, vhd, luks, iso); probed from their first bytes
    /// if not given.
    #[arg(long, short = 'f', value_name = "FORMAT")]
    format: Option<String>,
    /// Probe the format of backing files whose parent does not record it (by default such
    /// an image is refused rather than guessed).
    #[arg(long)]
    probe_backing: bool,
    /// A filter on every export, NAME[:KEY=VALUE,...]: cow, cache, readonly, stats, error,
    /// delay, partition, rate, blocksize (docs/filters.md). Repeatable; applied in the order
    /// given (the first wraps the image).
    #[arg(long = "filter", value_name = "SPEC")]
    filters: Vec<String>,
    /// Most threads serving one connection, an NBD client's or a VM's (requests handled in
    /// parallel).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: u16,
    /// A description shown to clients that list exports.
    #[arg(long)]
    description: Option<String>,
    /// Serve one client on standard input and output, which must be a socket (inetd, or a
    /// client that starts the server: nbdkit -s, nbd-tester-client -I), then exit.
    #[arg(long, short = 's', conflicts_with = "listen")]
    single: bool,
    /// Only these NBD clients may see and open the exports: ADDR[/PREFIX], unix (Unix socket
    /// clients) or cert:NAME (a verified TLS certificate's common or DNS name). EXPORT=RULE
    /// limits one export. Repeatable; an export with no rule is open to every client.
    #[arg(long = "allow", value_name = "[EXPORT=]RULE")]
    allow: Vec<String>,
    #[command(flatten)]
    nbd: super::nbd_opts::NbdArgs,
    #[command(flatten)]
    cloud: crate::cloud::CloudArgs,
}

/// What one export serves.
enum Source {
    File(PathBuf),
    Cloud(String),
    Memory(u64),
    Pattern(u64),
}

fn parse_source(text: &str) -> anyhow::Result<Source> {
    if let Some(size) = text.strip_prefix("memory:") {
        return Ok(Source::Memory(parse_size(size)?));
    }
    if let Some(size) = text.strip_prefix("pattern:") {
        return Ok(Source::Pattern(parse_size(size)?));
    }
    if crate::cloud::is_url(text) {
        return Ok(Source::Cloud(text.to_owned()));
    }
    Ok(Source::File(PathBuf::from(text)))
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    )
}

/// Opens a source; an image file comes back with what a cow overlay records of it. With
/// `read_only` (a cow filter above, or --read-only) the file is opened read-only.
fn open(
    source: &Source,
    args: &ServeArgs,
    read_only: bool,
) -> anyhow::Result<(Arc<dyn BlockDevice>, Option<vdk_filters::cow::BaseFile>)> {
    match source {
        Source::Memory(size) => Ok((Arc::new(MemoryDisk::new(*size)), None)),
        Source::Pattern(size) => Ok((Arc::new(PatternDisk::new(*size)), None)),
        Source::Cloud(url) => {
            let disk = crate::cloud::open(url, &args.cloud.options()?, read_only, None)?;
            Ok((Arc::new(disk), None))
        }
        Source::File(path) => {
            let cannot_open = |e: std::io::Error| {
                let hint = match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        " (create one with `vdk create FILE SIZE`, or serve RAM with --memory)"
                    }
                    std::io::ErrorKind::PermissionDenied => " (try --read-only)",
                    _ => "",
                };
                anyhow::Error::new(e).context(format!("cannot open {}{hint}", path.display()))
            };
            let format = match args.format.as_deref() {
                Some(name) => Format::from_name(name)?,
                None => {
                    let probed = vdk_formats::probe(path).map_err(cannot_open)?;
                    if !read_only {
                        vdk_formats::check_named(path, probed)?;
                    }
                    probed
                }
            };
            if format != Format::Raw {
                if args.direct {
                    bail!(
                        "--direct applies to raw images; {} is {format}",
                        path.display()
                    );
                }
                let opts = vdk_formats::OpenOptions {
                    format: Some(format),
                    read_only,
                    probe_backing: args.probe_backing,
                    key: args
                        .cloud
                        .luks_secret(crate::cloud::Ask::IfEncrypted(path))?,
                    ..Default::default()
                };
                let device = vdk_formats::open(path, &opts).map_err(cannot_open)?.device;
                return Ok((device, Some(base_file(path, format)?)));
            }
            let opts = FileOptions {
                read_only,
                direct: args.direct,
                ..FileOptions::default()
            };
            let device = Arc::new(FileDisk::open(path, opts).map_err(cannot_open)?);
            Ok((device, Some(base_file(path, format)?)))
        }
    }
}

fn base_file(path: &Path, format: Format) -> anyhow::Result<vdk_filters::cow::BaseFile> {
    Ok(vdk_filters::cow::BaseFile {
        path: crate::paths::canonical(path)?,
        format,
    })
}

fn exports(args: &ServeArgs) -> anyhow::Result<Vec<(String, Source)>> {
    let mut list: Vec<(String, Source)> = Vec::new();
    for path in &args.images {
        let source = match path.to_str().filter(|p| crate::cloud::is_url(p)) {
            Some(url) => Source::Cloud(url.to_owned()),
            None => Source::File(path.clone()),
        };
        list.push((file_name(path), source));
    }
    if let Some(size) = &args.memory {
        list.push(("memory".into(), Source::Memory(parse_size(size)?)));
    }
    for spec in &args.exports {
        let Some((name, image)) = spec.split_once('=') else {
            bail!(
                "invalid --export {spec:?}: expected NAME=IMAGE, e.g. data=disk.img, \
                 ram=memory:1G or test=pattern:1G"
            );
        };
        if name.is_empty() || name.len() > 4096 {
            bail!("invalid --export {spec:?}: the name must be 1 to 4096 bytes");
        }
        list.push((
            name.into(),
            parse_source(image).with_context(|| format!("in --export {spec:?}"))?,
        ));
    }
    if list.is_empty() {
        bail!("nothing to serve: give an IMAGE, --memory SIZE or --export NAME=IMAGE");
    }
    for (i, (name, _)) in list.iter().enumerate() {
        if list[..i].iter().any(|(n, _)| n == name) {
            bail!("two exports are named {name:?}: name them with --export NAME=IMAGE");
        }
    }
    Ok(list)
}

/// Applies the `--allow` rules to the exports.
fn apply_allow(rules: &[String], exports: &mut [Export]) -> anyhow::Result<()> {
    for text in rules {
        let (name, rule) = match text.split_once('=') {
            Some((n, r)) => (Some(n), r),
            None => (None, text.as_str()),
        };
        let rule: Rule = rule
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--allow {text:?}: {e}"))?;
        if let Some(n) = name {
            if !exports.iter().any(|e| e.name == n) {
                bail!("--allow {text:?}: there is no export named {n:?}");
            }
        }
        for e in exports
            .iter_mut()
            .filter(|e| name.is_none_or(|n| e.name == n))
        {
            e.allow.push(rule.clone());
        }
    }
    Ok(())
}

/// Standard input as the one client's socket.
#[cfg(unix)]
fn stdin_stream() -> anyhow::Result<vdk_nbd::Stream> {
    use std::os::fd::AsFd;
    let fd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("standard input")?;
    let st = rustix::fs::fstat(&fd).context("standard input")?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Socket {
        bail!(
            "-s: standard input is not a socket; run vdk serve -s from inetd or from a client \
             that starts its server (nbdsh's connect_command, nbd-tester-client -I)"
        );
    }
    Ok(vdk_nbd::Stream::Unix(std::os::unix::net::UnixStream::from(
        fd,
    )))
}

/// Windows gives no socket as standard input.
#[cfg(not(unix))]
fn stdin_stream() -> anyhow::Result<vdk_nbd::Stream> {
    bail!("-s: a socket as standard input is a Unix way of starting servers; listen with --listen")
}

/// Runs `vdk serve`.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Parsed for each export: each gets filters of its own (a rate filter's limits are per
    // disk).
    let parse = || {
        args.filters
            .iter()
            .map(|f| vdk_filters::FilterSpec::parse(f))
            .collect::<Result<Vec<_>, _>>()
    };
    parse()?;
    let mut served = Vec::new();
    let mut stats = Vec::new();
    for (name, source) in exports(&args)? {
        let specs = parse()?;
        let read_only = args.read_only || vdk_filters::redirects_writes(&specs);
        let (device, base) = open(&source, &args, read_only)?;
        let chain = vdk_filters::apply_over(device, base, &specs)
            .with_context(|| format!("export {name:?}"))?;
        if let Some(s) = chain.stats {
            stats.push((name.clone(), s));
        }
        let device = chain.device;
        let mut export = Export::new(name, device);
        export.read_only = args.read_only;
        export.description = args.description.clone().unwrap_or_default();
        served.push(export);
    }
    apply_allow(&args.allow, &mut served)?;
    let config = args.nbd.config(usize::from(args.threads))?;
    let tls = config.tls.clone();
    if args.single {
        let server = Server::new(served, config);
        let done = server
            .serve_one(stdin_stream()?)
            .context("flush at the end failed");
        // Standard output is the client's socket: the figures go to the log.
        for (name, s) in &stats {
            let report = serde_json::to_string(&crate::control::stats_report(s))?;
            info!(export = %name, stats = %report, "stats filter");
        }
        return done;
    }
    let uris = if args.listen.is_empty() {
        vec![DEFAULT_LISTEN.to_string()]
    } else {
        args.listen.clone()
    };
    let listen = front::Listen::split(&uris);
    let vhost = start_vhost(&listen.vhost, &served, args.threads)?;
    let listeners = front::bind_nbd(&listen.nbd)?;
    let portals = front::bind_iscsi(&listen.iscsi)?;
    if portals.is_empty() && (args.iscsi_chap.is_some() || !args.iscsi_initiators.is_empty()) {
        bail!("--iscsi-chap and --iscsi-initiator need an iSCSI portal: --listen iscsi://HOST");
    }
    for e in &served {
        let info = e.device.info();
        let mode = if e.read_only || info.read_only {
            "read-only"
        } else {
            "read-write"
        };
        info!(export = %e.name, size = %Human(info.size), mode, "exporting");
    }
    for l in &listeners {
        info!(uri = %l.uri(), "listening");
    }
    let iscsi = if portals.is_empty() {
        None
    } else {
        let server = Arc::new(vdk_iscsi::Server::new(vdk_iscsi::ServerConfig {
            threads_per_connection: usize::from(args.threads),
            max_connections: args.nbd.max_connections,
            max_connections_per_address: args.nbd.max_connections_per_address,
            ..Default::default()
        }));
        let auth = super::iscsi_auth(
            args.iscsi_chap.as_deref(),
            args.iscsi_mutual_chap.as_deref(),
            &args.iscsi_initiators,
        )?;
        for e in &served {
            add_target(&server, e, &auth)?;
        }
        for p in &portals {
            let addr = p.local_addr()?;
            for t in server.targets() {
                info!(uri = %vdk_iscsi::target_uri(addr, &t.name, 0), "iSCSI target");
            }
        }
        Some(server)
    };
    let nbd = (!listeners.is_empty()).then(|| Server::new(served, config));
    let nbd_handle = nbd.as_ref().map(Server::shutdown_handle);
    let iscsi_handle = iscsi.as_ref().map(|s| s.shutdown_handle());
    let vhost_only = nbd.is_none() && iscsi.is_none();
    let (stopped_tx, stopped) = std::sync::mpsc::channel::<()>();
    let vhost_stop = Arc::clone(&vhost.exports);
    let signal_thread = front::on_signals(tls, move |_| {
        if let Some(h) = &nbd_handle {
            h.shutdown();
        }
        if let Some(h) = &iscsi_handle {
            h.shutdown();
        }
        vhost_stop.stop();
        let _ = stopped_tx.send(());
    })?;
    let result = thread::scope(|s| {
        let iscsi_run = iscsi
            .as_ref()
            .map(|server| s.spawn(move || server.serve(portals)));
        let nbd_result = nbd
            .as_ref()
            .map_or(Ok(()), |server| server.serve(listeners))
            .context("flush at shutdown failed");
        let iscsi_result = match iscsi_run.map(|h| h.join()) {
            None => Ok(()),
            Some(Ok(r)) => r.context("iSCSI flush at shutdown failed"),
            Some(Err(_)) => Err(anyhow::anyhow!("the iSCSI server thread panicked")),
        };
        if vhost_only {
            let _ = stopped.recv();
        }
        nbd_result.and(iscsi_result)
    });
    let result = result.and(vhost.finish());
    signal_thread.close();
    info!("stopped");
    // What the stats filters counted, for a run with --filter stats.
    for (name, s) in &stats {
        crate::outln!("export {name:?}:")?;
        super::list::print_stats(&crate::control::stats_report(s))?;
    }
    result
}

/// The vhost-user-blk exports `vdk serve` runs, stopped by the signal thread.
struct VhostExports {
    exports: Arc<VhostSet>,
    devices: Vec<(String, Arc<dyn BlockDevice>)>,
}

/// Stops every export at most once, from whichever thread comes first.
#[derive(Default)]
struct VhostSet(std::sync::Mutex<Vec<VhostExport>>);

#[cfg(target_os = "linux")]
type VhostExport = vdk_vhost::Export;
#[cfg(not(target_os = "linux"))]
type VhostExport = ();

impl VhostSet {
    fn stop(&self) {
        // Dropping an export stops it: the VM's connection ends, the socket goes.
        drop(std::mem::take(&mut *vdk_core::sync::lock(&self.0)));
    }
}

impl VhostExports {
    /// Stops the exports and flushes their disks.
    fn finish(self) -> anyhow::Result<()> {
        self.exports.stop();
        for (name, device) in &self.devices {
            device
                .flush()
                .with_context(|| format!("export {name:?}: flush at shutdown failed"))?;
        }
        Ok(())
    }
}

/// One vhost-user-blk socket per export, in the order given.
fn start_vhost(paths: &[String], served: &[Export], threads: u16) -> anyhow::Result<VhostExports> {
    #[cfg_attr(not(target_os = "linux"), allow(unused_mut))]
    let mut out = VhostExports {
        exports: Arc::default(),
        devices: Vec::new(),
    };
    if paths.is_empty() {
        return Ok(out);
    }
    if paths.len() != served.len() {
        bail!(
            "--listen vhost-user-blk: one socket per export: {} socket(s) for {} export(s)",
            paths.len(),
            served.len()
        );
    }
    if cfg!(not(target_os = "linux")) {
        let _ = threads;
        bail!("--listen vhost-user-blk: vhost-user is a Linux interface");
    }
    #[cfg(target_os = "linux")]
    for (path, e) in paths.iter().zip(served) {
        if !path.starts_with('/') {
            bail!(
                "--listen {}{path}: the socket's path must be absolute (vhost-user-blk:///PATH)",
                front::VHOST_SCHEME
            );
        }
        let config = vdk_vhost::Config {
            read_only: e.read_only,
            serial: e.name.clone(),
            threads,
            ..Default::default()
        };
        let export = vdk_vhost::Export::start(Path::new(path), Arc::clone(&e.device), config)
            .with_context(|| format!("cannot listen on {}{path}", front::VHOST_SCHEME))?;
        info!(socket = %path, export = %e.name, "vhost-user-blk");
        vdk_core::sync::lock(&out.exports.0).push(export);
        out.devices.push((e.name.clone(), Arc::clone(&e.device)));
    }
    Ok(out)
}

/// An export as an iSCSI target of its own, the disk as LUN 0 (a CD-ROM for an ISO).
fn add_target(
    server: &vdk_iscsi::Server,
    export: &Export,
    auth: &vdk_iscsi::Auth,
) -> anyhow::Result<()> {
    let device = if export.read_only {
        vdk_filters::apply(
            Arc::clone(&export.device),
            &[vdk_filters::FilterSpec::parse("readonly")?],
        )?
        .device
    } else {
        Arc::clone(&export.device)
    };
    let luns = Arc::new(vdk_scsi::Target::new());
    luns.add(
        0,
        Arc::new(vdk_scsi::LogicalUnit::for_device(&export.name, device)),
    );
    server
        .add_target(vdk_iscsi::Target {
            name: vdk_iscsi::iqn_for(&export.name),
            alias: Some(export.name.clone()),
            luns,
            auth: auth.clone(),
        })
        .with_context(|| format!("export {:?}", export.name))?;
    Ok(())
}
