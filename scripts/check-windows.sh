#!/usr/bin/env bash
# The crates that must stay portable (the disk interface, backends, formats, filters, SCSI,
# the NBD server, the iSCSI target, object storage) compile for Windows: what differs between
# systems lives in their sys modules (vdk-core, vdk-backends and vdk-nbd src/sys), and this
# keeps it there. Clippy with -D warnings on the libraries, not a link: the TLS library
# (aws-lc) has C in it, compiled by mingw.
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
  -p vdk-nbd -p vdk-objstore \
  -- -D warnings
