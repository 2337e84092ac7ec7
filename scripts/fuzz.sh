#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 60) each; crashes land in fuzz/artifacts/ and
# fail the run. CI (scripts/test.sh) runs each for a short while; run it longer by hand, e.g.
# scripts/fuzz.sh 3600 nbd_handshake. New inputs that reach new code join fuzz/corpus/.
# cargo-fuzz needs nightly features; on a stable toolchain RUSTC_BOOTSTRAP=1 allows them.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
# One build of every target first: each run then starts at once.
cargo fuzz build "${targets[@]:0:1}" >/dev/null 2>&1 || true
cargo fuzz build
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  echo "== fuzzing $t for ${seconds}s"
  cargo fuzz run "$t" "fuzz/corpus/$t" -- -max_total_time="$seconds" -max_len=4096
done
