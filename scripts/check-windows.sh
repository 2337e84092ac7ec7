#!/usr/bin/env bash
# The crates that must stay portable (the disk interface, backends, formats, filters, SCSI
# and the iSCSI target) compile for Windows: what differs between systems lives in their
# sys modules (vdk-core/src/sys, vdk-backends/src/sys), and this keeps it there. Clippy
# with -D warnings on the libraries, not a build: no Windows linker is needed. (The NBD
# server and object stores need a C compiler for Windows for their TLS library: the Windows
# port adds them here.)
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-pc-windows-gnu
if ! rustup target list --installed | grep -qx "$target"; then
  rustup target add "$target"
fi
# A target directory of its own, so that it never invalidates the host build.
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}/windows-check \
  cargo clippy --locked --target "$target" \
  -p vdk-core -p vdk-backends -p vdk-formats -p vdk-filters -p vdk-scsi -p vdk-iscsi \
  -- -D warnings
