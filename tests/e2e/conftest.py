import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import harness  # noqa: E402

# `make e2e-velero-matrix` runs the scenarios marked velero_matrix on each
# older Velero (VELERO_VERSION); CI runs the whole suite on 1.18.3. A test
# joins the matrix with @pytest.mark.velero_matrix; a test whose name holds
# "status" (the status-restore scenarios) joins it without one. A scenario
# that needs an earlier one's objects needs that one marked too.
VELERO_MATRIX_NAME_PARTS = ("status",)


def pytest_configure(config):
    config.addinivalue_line("markers", "velero_matrix: run on every Velero version by `make e2e-velero-matrix`")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(part in item.name for part in VELERO_MATRIX_NAME_PARTS):
            item.add_marker(pytest.mark.velero_matrix)


@pytest.fixture(scope="session")
def cluster():
    with harness.Cluster() as env:
        yield env
