#!/usr/bin/env bash
# Runs every fuzz target (or the TARGETs named) for SECONDS (default 60) each, starting from
# the corpus in fuzz/corpus/TARGET; a crash stops the run and lands in fuzz/artifacts/TARGET/
# (turn it into a unit test). By hand, inputs that reach new code are added to the corpus:
#   scripts/fuzz.sh 3600 nbd_handshake
# With VDK_FUZZ_SCRATCH=1 (CI: scripts/test.sh) new inputs go to a temporary directory and
# the repository is left as it was.
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
scratch=""
build=()
if [ -n "${VDK_FUZZ_SCRATCH:-}" ]; then
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  # Short runs: an unoptimised build (same assertions and sanitizer) compiles in half the time.
  build=(--dev)
fi
# The fuzz crate's lock file is committed: a build must not rewrite it.
if ! (cd fuzz && cargo metadata --locked --format-version 1 >/dev/null 2>&1); then
  echo "fuzz/Cargo.lock is out of date: run (cd fuzz && cargo tree >/dev/null) and commit it" >&2
  exit 1
fi
cargo fuzz build "${build[@]}" # every target at once: each run then starts at once
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  dirs=("fuzz/corpus/$t")
  if [ -n "$scratch" ]; then
    mkdir -p "$scratch/$t"
    dirs=("$scratch/$t" "fuzz/corpus/$t") # libFuzzer writes new inputs to the first
  fi
  echo "== fuzzing $t for ${seconds}s"
  set +e
  cargo fuzz run "${build[@]}" "$t" "${dirs[@]}" -- -max_total_time="$seconds" -max_len=4096 2>&1 \
    | grep -E "^(==|INFO: seed corpus|Done|SUMMARY|artifact_prefix|Test unit written|thread .* panicked)"
  status=${PIPESTATUS[0]}
  set -e
  [ "$status" -eq 0 ] || { echo "fuzz target $t failed: see fuzz/artifacts/$t" >&2; exit 1; }
done
