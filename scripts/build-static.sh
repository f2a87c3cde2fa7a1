#!/usr/bin/env bash
# Builds the release binary exactly as the Dockerfile does: a statically
# linked glibc executable (crt-static), so the image can be distroless/static.
# Used by the Dockerfile, `make static` and the e2e suite, which therefore
# tests the very binary the image ships.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release --locked --target "$target" --bin velero-vm-restore-webhook
bin="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/$target/release/velero-vm-restore-webhook"
# A static executable has no program interpreter (no dynamic loader).
if readelf -l "$bin" | grep -q 'Requesting program interpreter'; then
  echo "build-static.sh: $bin is dynamically linked" >&2
  exit 1
fi
echo "$bin"
