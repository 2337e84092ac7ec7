//! `vdk daemon` as a Windows service: `--install-service` registers it with the service
//! control manager (started at boot, as LocalSystem, on the pipe `\\.\pipe\vdk`),
//! `--uninstall-service` stops and removes it, and `--service` is how the manager runs it.
//! A service stop (or the machine shutting down) asks the daemon to shut down over its own
//! pipe, as `vdk daemon --stop` does: every disk is closed and flushed first.
// The service entry point the windows-service macro writes is an `extern "system"` function
// with an unsafe block of the crate's; vdk itself writes none here.
#![allow(unsafe_code)]

use std::ffi::OsString;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tracing::{error, info};
use windows_service::service::{
    ServiceAccess, ServiceControl, ServiceControlAccept, ServiceErrorControl, ServiceExitCode,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
use windows_service::{define_windows_service, service_dispatcher};

use crate::control::{Client, Request};
use crate::paths::Paths;

/// The service's name.
pub const NAME: &str = "vdk";
/// The pipe the service listens on unless told otherwise.
pub const PIPE: &str = r"\\.\pipe\vdk";

/// What the service runs with, set before the dispatcher starts it.
static RUN: OnceLock<(crate::daemon::Config, Paths)> = OnceLock::new();

define_windows_service!(ffi_service_main, service_main);

/// Runs the daemon under the service control manager (`vdk daemon --service`).
pub fn run(config: crate::daemon::Config, paths: Paths) -> anyhow::Result<()> {
    let _ = RUN.set((config, paths));
    service_dispatcher::start(NAME, ffi_service_main)
        .context("not started by the service control manager (vdk daemon --service is for it)")
}

fn status(state: ServiceState, exit: u32) -> ServiceStatus {
    ServiceStatus {
        service_type: ServiceType::OWN_PROCESS,
        current_state: state,
        controls_accepted: if state == ServiceState::Running {
            ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
        } else {
            ServiceControlAccept::empty()
        },
        exit_code: ServiceExitCode::Win32(exit),
        checkpoint: 0,
        wait_hint: Duration::from_secs(if state == ServiceState::StopPending {
            60
        } else {
            0
        }),
        process_id: None,
    }
}

fn service_main(_arguments: Vec<OsString>) {
    let Some((config, paths)) = RUN.get() else {
        return;
    };
    let socket = paths.socket.clone();
    let handler = move |event| match event {
        ServiceControl::Stop | ServiceControl::Shutdown => {
            info!("service stop: closing every disk");
            // As `vdk daemon --stop`: the daemon's own shutdown, over its pipe.
            if let Err(e) = Client::connect(&socket)
                .and_then(|mut c| c.call::<serde_json::Value>(&Request::Shutdown))
            {
                error!(error = %e, "cannot ask the daemon to stop");
            }
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    };
    let handle = match service_control_handler::register(NAME, handler) {
        Ok(h) => h,
        Err(e) => {
            error!(error = %e, "cannot register with the service control manager");
            return;
        }
    };
    let _ = handle.set_service_status(status(ServiceState::Running, 0));
    let done = crate::daemon::run(config, paths);
    if let Err(e) = &done {
        error!(error = %e, "the daemon failed");
    }
    let _ = handle.set_service_status(status(ServiceState::Stopped, u32::from(done.is_err())));
}

/// Registers the service: `vdk daemon` with `args` (the options given with
/// `--install-service`, the pipe and log added if missing), started at boot.
pub fn install(args: &[OsString]) -> anyhow::Result<()> {
    let manager = ServiceManager::local_computer(
        None::<&str>,
        ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE,
    )
    .context("cannot reach the service control manager (run as Administrator)")?;
    let mut launch: Vec<OsString> = vec!["daemon".into(), "--service".into()];
    launch.extend(args.iter().cloned());
    let given = |name: &str| {
        args.iter().any(|a| {
            a.to_str()
                .is_some_and(|a| a == name || a.starts_with(&format!("{name}=")))
        })
    };
    if !given("--socket") {
        launch.extend(["--socket".into(), PIPE.into()]);
    }
    if !given("--log") {
        let dir = std::path::PathBuf::from(
            std::env::var_os("ProgramData").unwrap_or_else(|| r"C:\ProgramData".into()),
        )
        .join("vdk");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        launch.extend(["--log".into(), dir.join("daemon.log").into_os_string()]);
    }
    let info = ServiceInfo {
        name: NAME.into(),
        display_name: "vdk virtual disk daemon".into(),
        service_type: ServiceType::OWN_PROCESS,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: std::env::current_exe().context("cannot find the vdk executable")?,
        launch_arguments: launch,
        dependencies: Vec::new(),
        account_name: None,
        account_password: None,
    };
    let service = manager
        .create_service(&info, ServiceAccess::CHANGE_CONFIG)
        .context("cannot create the vdk service (is it installed already?)")?;
    let _ = service.set_description(
        "Serves vdk's disks (NBD, iSCSI) and answers vdk open/close/list on its named pipe",
    );
    Ok(())
}

/// Stops the service if it runs (its disks closed first), then removes it.
pub fn uninstall() -> anyhow::Result<()> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .context("cannot reach the service control manager (run as Administrator)")?;
    let service = manager
        .open_service(
            NAME,
            ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE,
        )
        .context("no vdk service is installed")?;
    if service.query_status()?.current_state != ServiceState::Stopped {
        service.stop().context("cannot stop the vdk service")?;
        let started = Instant::now();
        while service.query_status()?.current_state != ServiceState::Stopped {
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the vdk service is still running after 60s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    service.delete().context("cannot remove the vdk service")?;
    Ok(())
}
