#!/usr/bin/env bash
# `make demo`: scenario 2 with a short human report; leaves nothing running.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install --quiet 'PyYAML>=6'
export VMRW_E2E_BINARY=${VMRW_E2E_BINARY:-$("$repo/scripts/build-static.sh" | tail -n1)}
exec python3 "$here/demo.py"
