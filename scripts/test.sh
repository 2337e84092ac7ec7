#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, checks formatting and
# lints (warnings are errors) and that the portable crates compile for Windows, runs every
# test, then each fuzz target for 10 seconds.
# End-to-end tests drive vdk with nbdinfo, nbdsh, qemu-img, qemu-io, nbdcopy, fio, libiscsi,
# and (as root) nbdfuse + losetup + mkfs + mount.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh
# The suite must leave the tree as it found it (no state files, no lock file rewritten).
tree_before=$(git status --porcelain 2>/dev/null || true)
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
# The portable crates still compile for Windows (their platform calls stay in sys modules).
scripts/check-windows.sh
cargo test --workspace --all-targets --all-features --locked
cargo test --workspace --doc --all-features --locked
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
# Every fuzz target for a bounded time (scripts/fuzz.sh runs them longer by hand).
VDK_FUZZ_SCRATCH=1 scripts/fuzz.sh 10
tree_after=$(git status --porcelain 2>/dev/null || true)
if [ "$tree_before" != "$tree_after" ]; then
  echo "the test command changed the tree (git status --porcelain):" >&2
  diff <(echo "$tree_before") <(echo "$tree_after") >&2 || true
  exit 1
fi
