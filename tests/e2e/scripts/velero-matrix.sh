#!/usr/bin/env bash
# `make e2e-velero-matrix`: the end-to-end scenarios marked velero_matrix
# (tests/e2e/conftest.py) on each older Velero, one environment per version,
# built and run as with VELERO_VERSION=<version> tests/e2e/run.sh. CI runs the
# whole suite on 1.18.3 (`make test`). Prints, per version, what ran and
# passed and how long it took (cold builds included), then one closing line.
# A version passes only if every selected scenario ran and passed: a skipped
# one counts against it.
#   VELERO_MATRIX="1.15.2 1.16.2 1.17.2"   the versions (each pinned by a tools module)
#   VELERO_MATRIX_SELECT="-m velero_matrix"  the pytest selection
#   tests/e2e/scripts/velero-matrix.sh [more pytest args]
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
versions=${VELERO_MATRIX:-1.15.2 1.16.2 1.17.2}
read -r -a select <<<"${VELERO_MATRIX_SELECT:--m velero_matrix}"
out=$(mktemp -d "${TMPDIR:-/tmp}/vmrw-velero-matrix.XXXXXX")
summary=()
total_passed=0 total_failed=0 status=0
matrix_start=$SECONDS
for version in $versions; do
  echo "=== Velero $version: tests/e2e/run.sh ${select[*]} $* (log: $out/$version.log)"
  start=$SECONDS
  # The one-node cluster mode (test_cluster.py) is not part of the matrix.
  VELERO_VERSION=$version "$here/run.sh" --ignore=test_cluster.py "${select[@]}" \
    --junitxml="$out/$version.xml" "$@" 2>&1 | tee "$out/$version.log"
  rc=${PIPESTATUS[0]}
  seconds=$((SECONDS - start))
  line=$(python3 - "$out/$version.xml" "$version" "$rc" "$seconds" <<'PY'
import sys
import xml.etree.ElementTree as ET
path, version, rc, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
results = {"passed": [], "failed": [], "skipped": []}
try:
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}.py::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            results["failed"].append(name)
        elif case.find("skipped") is not None:
            results["skipped"].append(name)
        else:
            results["passed"].append(name)
except (OSError, ET.ParseError) as err:
    results["failed"].append(f"(no results: {err})")
ok = rc == 0 and results["passed"] and not results["failed"] and not results["skipped"]
counts = ", ".join(f"{len(v)} {k}" for k, v in results.items())
print(f"Velero {version}: {'PASS' if ok else 'FAIL'}, {counts} in {seconds}s (pytest exit {rc})")
for kind in ("passed", "failed", "skipped"):
    for name in results[kind]:
        print(f"    {kind:7} {name}")
print(f"#counts {len(results['passed'])} {len(results['failed']) + len(results['skipped'])} {1 if ok else 0}")
PY
)
  counts=$(grep '^#counts' <<<"$line")
  read -r _ passed failed ok <<<"$counts"
  total_passed=$((total_passed + passed)); total_failed=$((total_failed + failed))
  [[ $ok == 1 ]] || status=1
  summary+=("$(grep -v '^#counts' <<<"$line")")
done
echo
echo "=== Velero matrix (${versions}), ${select[*]}: $((SECONDS - matrix_start))s in all; logs and JUnit XML in $out"
printf '%s\n' "${summary[@]}"
echo "velero-matrix: $total_passed passed, $total_failed failed"
exit $status
