#!/usr/bin/env bash
# Runs the cargo-fuzz target for a bounded time (default 60 s) from the seed
# corpus, and prints the totals. Installs cargo-fuzz from crates.io if needed.
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain
# accept them (no sanitizer: the target checks its own invariants).
set -euo pipefail
seconds=${1:-60}
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
log=$(mktemp)
start=$SECONDS
# Its own target dir: fuzz builds use different compiler flags.
target_dir="${CARGO_TARGET_DIR:-$PWD/target}/fuzz"
if ! RUSTC_BOOTSTRAP=1 cargo fuzz run review --sanitizer none --target-dir "$target_dir" "$corpus" seeds/review -- \
     -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
  tail -n 60 "$log"
  echo "fuzz: FAILED (crash artifacts in fuzz/artifacts/review)" >&2
  exit 1
fi
runs=$(grep -o 'Done [0-9]* runs' "$log" | grep -o '[0-9]*' || echo "?")
echo "fuzz: review target ran $runs inputs in ${seconds}s (wall $((SECONDS - start))s incl. build), 0 crashes"
