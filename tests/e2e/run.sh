#!/usr/bin/env bash
# Runs the chart checks and the end-to-end scenarios with pytest. Installs
# what it needs: pytest and PyYAML (PyPI), openssl (Debian), the Go-built
# infrastructure (cached outside the repo) and the webhook's static binary.
#   tests/e2e/run.sh [pytest args]      e.g. -k chart
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
python3 -c 'import pytest, yaml' 2>/dev/null || python3 -m pip install --quiet 'pytest>=8' 'PyYAML>=6'
command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl >/dev/null; }
start=$SECONDS
bash "$here/scripts/build-tools.sh" >/dev/null
echo "e2e: tools ready in $((SECONDS - start))s (Velero ${VELERO_VERSION:-1.18.3})"
if [[ -z ${VMRW_E2E_BINARY:-} ]]; then
  start=$SECONDS
  VMRW_E2E_BINARY="$("$repo/scripts/build-static.sh" | tail -n1)"
  export VMRW_E2E_BINARY
  echo "e2e: webhook binary ready in $((SECONDS - start))s: $VMRW_E2E_BINARY"
fi
cd "$here"
# E2E_SCRIPT runs one script instead of the tests (make bench-latency).
if [[ -n ${E2E_SCRIPT:-} ]]; then exec python3 "$E2E_SCRIPT" "$@"; fi
exec python3 -m pytest -v -s -p no:cacheprovider "$@"
