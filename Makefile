# velero-vm-restore-webhook
#   make build      release binary (target/release)
#   make static     the static binary the container ships (scripts/build-static.sh)
#   make test       everything CI runs: lint, unit + integration, fuzz (bounded), chart and e2e
#   make test-fast  unit + integration tests only
#   make bench / bench-faults / bench-cluster / fuzz-long   benchmarks and long runs, outside CI
#   make e2e-cluster  the one-node cluster scenarios alone
#   make e2e-vcenter  the restores deployed by VM Operator's vSphere provider into vcsim, alone
#   make e2e-velero-matrix  selected e2e scenarios on Velero 1.15.2, 1.16.2, 1.17.2 (CI: the whole suite on 1.18.3)
#   make container / push   honour REGISTRY, IMAGE and VERSION
SHELL := /bin/bash
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
REGISTRY ?= registry.example.com/platform
IMAGE ?= $(REGISTRY)/velero-vm-restore-webhook:$(VERSION)
REVISION ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
CONTAINER_TOOL ?= docker
FUZZ_SECONDS ?= 60
E2E_PYTEST_ARGS ?=

.PHONY: build static test test-fast lint fuzz fuzz-long bench bench-faults bench-latency bench-peers bench-scale bench-plan bench-cluster profile e2e e2e-cluster e2e-vcenter e2e-velero-matrix chart-test demo helm container push clean

build:
	cargo build --release --locked --bin velero-vm-restore-webhook

static:
	scripts/build-static.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings

test-fast:
	cargo test --locked --all-targets

fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)

# A 30-minute fuzz run (outside CI); prints the input count.
fuzz-long:
	scripts/fuzz.sh 1800

bench:
	cargo bench --locked --bench rules
	cargo bench --locked --bench load

# Certificate rotation, SIGTERM drain with two replicas, an attacker holding
# group waits, worst-case memory: the release binary on loopback.
# Create latency through the real kube-apiserver: no webhook, the no-op route
# registered like ours, and ours, interleaved (outside CI; a few minutes).
bench-latency: static
	E2E_SCRIPT=bench_latency.py tests/e2e/run.sh

# Side by side with Kyverno (built from the Go module proxy on first use, about
# 5 minutes): create latency through the same kube-apiserver, interleaved.
bench-peers: static
	E2E_SCRIPT=bench_peers.py tests/e2e/run.sh

# 10,000 groups in the cache, the group wait's wake-up, a 1,000-VM Velero
# restore with and without the webhook (outside CI; several minutes).
bench-scale: static
	E2E_SCRIPT=bench_scale.py tests/e2e/run.sh

# `plan` of a 1,000-VM backup in 10 namespaces against the live target: time,
# API requests, and the ratio to `velero backup download` (outside CI).
bench-plan: static
	E2E_SCRIPT=bench_plan.py tests/e2e/run.sh

# The one-node cluster (kubelet, containerd, Velero and the chart as pods):
# a 1,000-VM restore with the webhook, without it and through its no-op route;
# creates through the chart's Service six ways (no webhook, the no-op route,
# the no-op route with a patch of ours' size, ours, ours without its change
# lines, ours without warnings) with each component's CPU, and creates while
# crafted VMs arrive from another namespace (outside CI; 5 runs of each, about
# 25 min; env RESTORE_RUNS, LATENCY_RUNS, ATTACKERS, BENCH_PARTS: see
# bench_cluster.py).
bench-cluster: static
	E2E_SCRIPT=bench_cluster.py tests/e2e/run.sh

# Only the one-node cluster scenarios (test_cluster.py; also part of `make test`).
e2e-cluster: static
	tests/e2e/run.sh test_cluster.py $(E2E_PYTEST_ARGS)

# Only the vCenter scenarios (test_vcenter.py): restores deployed by VM
# Operator's own VirtualMachine controller and vSphere provider into vcsim,
# govmomi's vCenter simulator (the stand-in for vCenter).
e2e-vcenter: static
	tests/e2e/run.sh test_vcenter.py $(E2E_PYTEST_ARGS)

# The scenarios marked velero_matrix (tests/e2e/conftest.py: restore, order,
# copies, boot order, report, VM Operator's admission, plan and
# change-storage-class, status restores) on each older Velero, one environment
# per version (VELERO_MATRIX, default 1.15.2 1.16.2 1.17.2); prints what ran
# and passed per version. Outside CI, which runs the whole suite on 1.18.3.
# One version alone: VELERO_VERSION=1.15.2 tests/e2e/run.sh -m velero_matrix
e2e-velero-matrix: static
	tests/e2e/scripts/velero-matrix.sh $(E2E_PYTEST_ARGS)

# perf profile of one whole review (outside CI); PROFILE="logging off" for the other one.
profile:
	scripts/profile.sh "$(or $(PROFILE),logging as deployed)"

bench-faults:
	cargo bench --locked --bench faults

# Chart checks and end-to-end scenarios (real etcd, kube-apiserver, Velero, S3).
e2e: static
	tests/e2e/run.sh $(E2E_PYTEST_ARGS)

chart-test:
	tests/e2e/run.sh -k chart $(E2E_PYTEST_ARGS)

demo: static
	tests/e2e/demo.sh

# helm v3.19.0 built from the Go module proxy (no download of release
# binaries); prints where it is.
helm:
	@dir=$$(tests/e2e/scripts/build-tools.sh helm | tail -n1) && echo "helm is at $$dir/helm"

test: lint test-fast fuzz e2e

container:
	$(CONTAINER_TOOL) build --build-arg VERSION=$(VERSION) --build-arg REVISION=$(REVISION) -t $(IMAGE) .

push: container
	$(CONTAINER_TOOL) push $(IMAGE)

clean:
	cargo clean
