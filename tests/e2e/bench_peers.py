"""Side by side with a peer: Kyverno's admission controller (built from the Go
module proxy, version in tools/kyverno/go.mod) with the ClusterPolicy in
peers/kyverno-clusterpolicy.yaml, against our webhook as deployed (JSON logs
at INFO), on the same kube-apiserver, in the same run. Each way has its own
namespace, selected by a namespace label in its webhook configuration, so
the three ways (no webhook, ours, Kyverno) are interleaved round by round
without re-registering anything. Both answer for the same labelled VM
creates. Outside CI: `make bench-peers` (env PEERS_CREATES per way and run,
PEERS_RUNS, PEERS_ROUND)."""

import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from harness import free_port, log, p99, run, wait_until  # noqa: E402
from test_restore import create_latencies  # noqa: E402

CREATES = int(os.environ.get("PEERS_CREATES", "500"))
RUNS = int(os.environ.get("PEERS_RUNS", "3"))
ROUND = int(os.environ.get("PEERS_ROUND", "50"))
WAYS = ["none", "ours", "kyverno"]
KYVERNO_NS = "kyverno"
HERE = Path(__file__).resolve().parent


def kyverno_version() -> str:
    for line in (HERE / "tools" / "kyverno" / "go.mod").read_text().splitlines():
        if line.strip().startswith("require github.com/kyverno/kyverno "):
            return line.split()[-1]
    return "unknown"


def start_kyverno(cluster) -> None:
    """Kyverno's admission controller out of cluster (`--serverIP`): it makes
    its own CA and serving certificate, and registers its own webhook
    configurations once the policy is ready."""
    tools = Path(run(["bash", HERE / "scripts" / "build-tools.sh", "kyverno"]).stdout.strip().splitlines()[-1])
    # Kyverno's CRDs, from the module the binary was built from.
    download = run(["go", "mod", "download", "-json", f"github.com/kyverno/kyverno@{kyverno_version()}"],
                   timeout=600).stdout
    crd_root = Path(json.loads(download)["Dir"]) / "config" / "crds"
    for directory in ("kyverno", "policies.kyverno.io", "reports", "policyreport"):
        for crd in sorted((crd_root / directory).glob("*.yaml")):
            cluster.kubectl("apply", "--server-side", "-f", crd)
    cluster.kubectl("wait", "--for=condition=Established", "crd/clusterpolicies.kyverno.io", "--timeout=60s")
    selector = {"namespaceSelector": {"matchLabels": {"bench-peer": "kyverno"}},
                "objectSelector": {"matchExpressions": [{"key": harness.RESTORE_LABEL, "operator": "Exists"}]}}
    cluster.apply([
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": KYVERNO_NS}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kyverno", "namespace": KYVERNO_NS},
         "data": {"webhooks": json.dumps(selector)}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kyverno-metrics", "namespace": KYVERNO_NS}, "data": {}},
    ])
    port = free_port()
    env = {**os.environ, "KYVERNO_NAMESPACE": KYVERNO_NS, "KYVERNO_POD_NAME": "kyverno-bench",
           "KYVERNO_DEPLOYMENT": "kyverno", "KYVERNO_SVC": "kyverno-svc", "INIT_CONFIG": "kyverno",
           "METRICS_CONFIG": "kyverno-metrics", "KYVERNO_SERVICEACCOUNT_NAME": "kyverno-admission-controller"}
    cluster.spawn("kyverno", [
        tools / "kyverno", f"--kubeconfig={cluster.admin_kubeconfig}",
        f"--serverIP=127.0.0.1:{port}", "--webhookServerHost=127.0.0.1", f"--webhookServerPort={port}",
        "--admissionReports=false", "--omitEvents=PolicyApplied,PolicyViolation,PolicySkipped,PolicyError",
        "--disableMetrics=true", f"--metricsPort={free_port()}", "--profile=false", "--enableTracing=false",
        f"--controllerRuntimeMetricsAddress=127.0.0.1:{free_port()}",
        f"--backgroundServiceAccountName=system:serviceaccount:{KYVERNO_NS}:kyverno-background-controller",
        f"--reportsServiceAccountName=system:serviceaccount:{KYVERNO_NS}:kyverno-reports-controller",
        # The secrets its certificate controller keeps the CA and the pair in
        # (the Helm chart's names).
        f"--caSecretName=kyverno-svc.{KYVERNO_NS}.svc.kyverno-tls-ca",
        f"--tlsSecretName=kyverno-svc.{KYVERNO_NS}.svc.kyverno-tls-pair",
        "--loggingFormat=json", "--v=1"], env=env)
    policy = yaml.safe_load((HERE / "peers" / "kyverno-clusterpolicy.yaml").read_text())
    wait_until(lambda: cluster.apply(policy, check=False).returncode == 0, 120, "Kyverno accepts the ClusterPolicy",
               interval=1, process=cluster.processes["kyverno"])

    def policy_ready():
        status = cluster.get_json("clusterpolicy", policy["metadata"]["name"]).get("status", {})
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))

    wait_until(policy_ready, 120, "the ClusterPolicy Ready", interval=1, process=cluster.processes["kyverno"])

    def webhook_covers_vms():
        configs = cluster.get_json("mutatingwebhookconfigurations")["items"]
        return any(any("virtualmachines" in r.get("resources", []) for w in c.get("webhooks", []) for r in w.get("rules", []))
                   for c in configs if c["metadata"]["name"].startswith("kyverno-resource-mutating"))

    wait_until(webhook_covers_vms, 180, "Kyverno's resource webhook registered for VirtualMachines", interval=1,
               process=cluster.processes["kyverno"])
    log(f"Kyverno {kyverno_version()} serving on 127.0.0.1:{port}")


if __name__ == "__main__":
    cluster = harness.Cluster()
    try:
        ours = cluster.start_with_webhook()
        # Ours answers only in its namespace (the chart's selectors, plus a label).
        ours = copy.deepcopy(ours)
        for hook in ours["webhooks"]:
            hook["namespaceSelector"].setdefault("matchLabels", {})["bench-peer"] = "ours"
        cluster.apply(ours)
        start_kyverno(cluster)
        namespaces = {way: f"peer-{way}" for way in WAYS}
        for way, ns in namespaces.items():
            cluster.apply({"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": ns, "labels": {"bench-peer": way}}})
        # The Restore the VMs name exists, as during a real restore: our
        # lookups of it are cache hits.
        cluster.apply({"apiVersion": "velero.io/v1", "kind": "Restore",
                       "metadata": {"name": "peers", "namespace": harness.VELERO_NS}, "spec": {"backupName": "none"}})
        time.sleep(2)  # the API server's webhook informer sees the final configurations
        for way in WAYS:
            _, failures = create_latencies(cluster, namespaces[way], 20, "warmup", restore="peers")
            assert not failures, (way, failures)
        results = {run_index: {way: [] for way in WAYS} for run_index in range(RUNS)}
        started = time.time()
        for run_index in range(RUNS):
            for round_index in range(CREATES // ROUND):
                for way in WAYS:
                    latencies, failures = create_latencies(cluster, namespaces[way], ROUND, f"r{run_index}-{round_index}",
                                                           restore="peers")
                    assert not failures, (way, failures)
                    results[run_index][way] += latencies
        # Each way did its job on the same object: the same VM, three namespaces.
        for way in WAYS:
            probe = cluster.get_json("virtualmachine", "r0-0-0", "-n", namespaces[way])
            cleaned = "instanceUUID" not in probe["spec"] and \
                "virtualmachine.vmoperator.vmware.com/first-boot-done" not in probe["metadata"].get("annotations", {})
            assert cleaned == (way != "none"), f"{way}: cleaned={cleaned}: {json.dumps(probe)[:600]}"
        # What each left of the same VM, beside the original (names only).
        def leaves(obj):
            meta = obj["metadata"]
            return ({f"annotation {k}" for k in meta.get("annotations", {})} | {f"label {k}" for k in meta.get("labels", {})}
                    | {f"spec.{k}" for k in obj["spec"]})
        kept = {way: leaves(cluster.get_json("virtualmachine", "r0-0-0", "-n", namespaces[way])) for way in WAYS}
        print("\nthe same VM, created three ways; removed by each (compared with no webhook):")
        for way in ("ours", "kyverno"):
            print(f"  {way:>8} removed: {', '.join(sorted(kept['none'] - kept[way])) or '-'}")
            print(f"  {way:>8} added:   {', '.join(sorted(kept[way] - kept['none'])) or '-'}")
        print(f"\ncreate latency through kube-apiserver: none, ours, Kyverno {kyverno_version()}; "
              f"{CREATES} creates per way per run, {RUNS} runs, interleaved in rounds of {ROUND} "
              f"({time.time() - started:.0f}s)")
        print(f"{'run':>3} {'way':>8} {'median ms':>10} {'p99 ms':>8}")
        summary = []
        for run_index in range(RUNS):
            stats = {way: (statistics.median(results[run_index][way]) * 1000, p99(results[run_index][way]) * 1000)
                     for way in WAYS}
            for way in WAYS:
                print(f"{run_index:>3} {way:>8} {stats[way][0]:>10.3f} {stats[way][1]:>8.3f}")
            ratios = {
                "ours/none median": stats["ours"][0] / stats["none"][0],
                "kyverno/none median": stats["kyverno"][0] / stats["none"][0],
                "kyverno/ours median": stats["kyverno"][0] / stats["ours"][0],
                "kyverno/ours p99": stats["kyverno"][1] / stats["ours"][1],
            }
            summary.append({"stats_ms": stats, "ratios": ratios})
            print("    " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
        print(json.dumps({"kyverno": kyverno_version(), "runs": summary}))
    finally:
        cluster.close()
