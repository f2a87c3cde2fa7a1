#!/usr/bin/env bash
# Profiles one whole review (the criterion bench "review: body to response
# bytes", logging as deployed by default) with perf, and prints the top
# entries. Needs `perf` (Debian: linux-perf). Outside CI.
#   scripts/profile.sh ["logging off"|"logging as deployed"] [seconds]
set -euo pipefail
which=${1:-logging as deployed}
seconds=${2:-8}
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { apt-get update -qq && apt-get install -y -qq linux-perf >/dev/null; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/velero-vm-restore-webhook/target-profile}
# Symbols and line tables: the release profile strips them.
export CARGO_PROFILE_BENCH_STRIP=false CARGO_PROFILE_BENCH_DEBUG=line-tables-only
export CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
bench=$(cargo bench --locked --bench rules --no-run 2>&1 | sed -n 's/.*Executable benches\/rules.rs (\(.*\))/\1/p' | tail -n1)
data=$(mktemp)
trap 'rm -f "$data"' EXIT
perf record -F 4000 -g -o "$data" "$bench" --bench "$which" --profile-time "$seconds" >/dev/null 2>&1
perf report -i "$data" --no-children --sort symbol --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -n 30
