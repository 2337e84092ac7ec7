#!/usr/bin/env bash
# vdk for Windows: the portable crates (the disk interface, backends, formats, filters, SCSI,
# the NBD server, the iSCSI target, object storage), the vdk binary and the examples compile
# for Windows with clippy's -D warnings. What differs between systems lives in sys modules
# (vdk-core, vdk-backends and vdk-nbd src/sys) and behind cfg in the binary, which leaves the
# daemon, fuse-loop and the FUSE file systems out there. The tests in
# crates/vdk/tests/windows.rs link vdk.exe (mingw also compiles the TLS library's C) and run
# it under Wine.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-pc-windows-gnu
if ! rustup target list --installed | grep -qx "$target"; then
  rustup target add "$target"
fi
if ! command -v x86_64-w64-mingw32-gcc >/dev/null; then
  echo "check-windows: x86_64-w64-mingw32-gcc is missing: run scripts/install-test-deps.sh (gcc-mingw-w64-x86-64)" >&2
  exit 1
fi
# A target directory of its own, so that it never invalidates the host build.
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}/windows-check \
  cargo clippy --locked --target "$target" \
  -p vdk-core -p vdk-backends -p vdk-formats -p vdk-filters -p vdk-scsi -p vdk-iscsi \
  -p vdk-nbd -p vdk-objstore -p vdk -p vdk-examples --lib --bins --examples \
  -- -D warnings
