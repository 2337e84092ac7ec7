//! An iSCSI target for vdk disks (RFC 7143).
//!
//! Each [`Target`] is an iSCSI name with logical units behind it, a [`vdk_scsi::Target`]: any
//! vdk disk as a SCSI disk, an ISO as a CD-ROM. The [`Server`] accepts initiators on TCP
//! portals, runs their logins (no authentication, or CHAP one-way or mutual; an initiator
//! allow-list), serves discovery (SendTargets) and normal sessions of one or more connections,
//! and carries SCSI commands with R2T, Data-Out and Data-In, task management, NOP and logout.
//!
//! ```text
//!   pdu/     bytes <-> typed PDUs, no I/O        text, params, login, chap: negotiation, no I/O
//!   wire     framing, padding, digests           server, session, conn: sockets and threads
//! ```
//!
//! ```no_run
//! use std::net::TcpListener;
//! use std::sync::Arc;
//! use vdk_backends::MemoryDisk;
//! use vdk_iscsi::{Server, ServerConfig, Target};
//! use vdk_scsi::{DeviceType, Identity, LogicalUnit};
//!
//! let luns = Arc::new(vdk_scsi::Target::new());
//! let disk = Arc::new(MemoryDisk::new(1 << 30));
//! let lu = LogicalUnit::new(DeviceType::Disk, Identity::from_name("ram", DeviceType::Disk), Some(disk));
//! luns.add(0, Arc::new(lu));
//! let server = Arc::new(Server::new(ServerConfig::default()));
//! server.add_target(Target { name: vdk_iscsi::iqn_for("ram"), alias: None, luns, auth: Default::default() })?;
//! server.serve(vec![TcpListener::bind("127.0.0.1:3260")?])?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// Tests build small buffers from constants; production code converts with checks.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

pub mod chap;
mod conn;
pub mod login;
pub mod params;
pub mod pdu;
mod server;
mod session;
pub mod text;
pub mod wire;

pub use login::Auth;
pub use server::{
    bind, iqn_for, target_uri, valid_name, Server, ServerConfig, ShutdownHandle, Target,
    TargetError, DEFAULT_PORT, IQN_PREFIX,
};
