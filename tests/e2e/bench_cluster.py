"""The in-cluster webhook measured (outside CI: `make bench-cluster`; env
CLUSTER_VMS (1000), RESTORE_RUNS (3), LATENCY_CREATES per mode and run
(300), LATENCY_RUNS (3), LATENCY_ROUND (50)), on the one-node cluster of
test_cluster.py:
- a Velero restore, Velero running as a pod, of CLUSTER_VMS VMs in 10 groups
  through the chart's pods against the same restore without the webhook
  (its MutatingWebhookConfiguration removed), RESTORE_RUNS interleaved
  pairs: the ratio of medians and of means, and each pair's ratio (spread);
- labelled VM create latency through the chart's Service, interleaved in
  rounds: no webhook; the same pods' no-op route (`/noop`: reads the body and
  allows; the chart installed with VMRW_BENCH_NOOP_ROUTE=true and the
  webhook's path switched); ours (`/mutate`)."""

import copy
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import node  # noqa: E402
import objects as o  # noqa: E402
from bench_scale import apply_in_batches  # noqa: E402
from harness import p99  # noqa: E402
from test_restore import create_latencies  # noqa: E402

VMS = int(os.environ.get("CLUSTER_VMS", "1000"))
CREATES = int(os.environ.get("LATENCY_CREATES", "300"))
RUNS = int(os.environ.get("LATENCY_RUNS", "3"))
RESTORE_RUNS = int(os.environ.get("RESTORE_RUNS", "3"))
ROUND = int(os.environ.get("LATENCY_ROUND", "50"))
MODES = ["none", "noop", "ours"]


def webhook_api_requests(cluster) -> int:
    """The webhook's requests to the API server so far, summed over its pods
    (the component="webhook" series; the companion's are its own)."""
    total = 0.0
    for line in cluster.metrics().splitlines():
        if line.startswith("velero_vm_restore_webhook_api_requests_total{") and 'component="webhook"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def main(cluster):
    ours = cluster.get_json("mutatingwebhookconfiguration", node.FULLNAME)
    for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
        ours["metadata"].pop(key, None)
    noop = copy.deepcopy(ours)
    for hook in noop["webhooks"]:
        hook["clientConfig"]["service"]["path"] = "/noop"

    def use(mode):
        cluster.kubectl("delete", "mutatingwebhookconfiguration", node.FULLNAME, "--ignore-not-found")
        if mode != "none":
            cluster.apply(ours if mode == "ours" else noop)
        time.sleep(1.5)  # the API server's webhook informer picks the change up

    report = {}
    # 1. A restore of many VMs, with the webhook and without.
    src = "scale-src"
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": src}}, o.resource_policy(src, "web-policy")]
    per_group = VMS // 10
    for g in range(10):
        docs.append(o.group(src, f"tier-{g}", [{"kind": "VirtualMachine", "name": f"vm-{g}-{i}"} for i in range(per_group)]))
        docs += [o.vm(src, f"vm-{g}-{i}", f"tier-{g}", i % 100) for i in range(per_group)]
    apply_in_batches(cluster, docs)
    cluster.velero("backup", "create", "b-scale", "--include-namespaces", src, "--snapshot-volumes=false", "--wait", timeout=1800)
    # Interleaved pairs, the order alternating (with first, then without
    # first, ...), so a cluster that slows as it fills weighs on both alike.
    times = {"with": [], "without": []}
    api_requests = []
    for run in range(RESTORE_RUNS):
        for mode in (("with", "without") if run % 2 == 0 else ("without", "with")):
            use("none" if mode == "without" else "ours")
            target = f"scale-{mode}-{run}"
            requests_before = webhook_api_requests(cluster)
            started = time.time()
            restore = cluster.restore(f"r-{target}", "b-scale", "--namespace-mappings", f"{src}:{target}")
            times[mode].append(time.time() - started)
            if mode == "with":
                # The webhook's own requests to the API server during the
                # restore (both pods): a Restore GET or two, none per VM.
                api_requests.append(webhook_api_requests(cluster) - requests_before)
            assert restore["status"]["phase"] == "Completed", cluster.restore_describe(f"r-{target}")
            vms = cluster.get_json("virtualmachines", "-n", target)["items"]
            assert len(vms) == per_group * 10, len(vms)
            cleaned = sum("instanceUUID" not in vm["spec"] for vm in vms)
            assert cleaned == (0 if mode == "without" else len(vms)), (mode, cleaned)
            print(f"[bench-cluster] restore {run} {mode}: {times[mode][-1]:.1f} s", flush=True)
    pair_ratios = [with_s / without_s for with_s, without_s in zip(times["with"], times["without"])]
    report["restore"] = {"vms": per_group * 10, "groups": 10, "runs": RESTORE_RUNS,
                         "seconds_with": [round(t, 1) for t in times["with"]],
                         "seconds_without": [round(t, 1) for t in times["without"]],
                         "ratio_of_medians": round(statistics.median(times["with"]) / statistics.median(times["without"]), 3),
                         "ratio_of_means": round(statistics.mean(times["with"]) / statistics.mean(times["without"]), 3),
                         "pair_ratios": [round(r, 3) for r in pair_ratios],
                         "pair_ratio_spread": [round(min(pair_ratios), 3), round(max(pair_ratios), 3)],
                         "webhook_api_requests_per_restore": api_requests}
    print(f"[bench-cluster] restore: {json.dumps(report['restore'])}", flush=True)

    # 2. Create latency through the Service.
    ns = "latency"
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    use("ours")
    create_latencies(cluster, ns, 20, "warmup")
    results = {run: {mode: [] for mode in MODES} for run in range(RUNS)}
    for run in range(RUNS):
        for round_index in range(CREATES // ROUND):
            for mode in MODES:
                use(mode)
                latencies, failures = create_latencies(cluster, ns, ROUND, f"r{run}-{round_index}-{mode}")
                assert not failures, failures
                results[run][mode] += latencies
    assert "instanceUUID" not in cluster.get_json("virtualmachine", "r0-0-ours-0", "-n", ns)["spec"], "ours was not in the path"
    assert "instanceUUID" in cluster.get_json("virtualmachine", "r0-0-noop-0", "-n", ns)["spec"], "the no-op route changed a VM"
    use("ours")
    runs = []
    print(f"{'run':>3} {'mode':>6} {'median ms':>10} {'p99 ms':>8}")
    for run in range(RUNS):
        stats = {mode: (statistics.median(results[run][mode]) * 1000, p99(results[run][mode]) * 1000) for mode in MODES}
        for mode in MODES:
            print(f"{run:>3} {mode:>6} {stats[mode][0]:>10.3f} {stats[mode][1]:>8.3f}")
        runs.append({"ours/none median": round(stats["ours"][0] / stats["none"][0], 3),
                     "ours/noop median": round(stats["ours"][0] / stats["noop"][0], 3),
                     "ours/noop p99": round(stats["ours"][1] / stats["noop"][1], 3),
                     "noop/none median": round(stats["noop"][0] / stats["none"][0], 3),
                     "medians_ms": {m: round(stats[m][0], 2) for m in MODES}})
        print("    " + json.dumps(runs[-1]))
    report["latency"] = {"creates_per_mode_per_run": CREATES, "runs": runs}
    print(json.dumps(report))


if __name__ == "__main__":
    cluster = node.NodeCluster(chart_values=("--set", "server.extraEnv[0].name=VMRW_BENCH_NOOP_ROUTE",
                                             "--set-string", "server.extraEnv[0].value=true"))
    try:
        cluster.start()
        main(cluster)
    finally:
        cluster.close()
        left = node.leftovers()
        print(f"[bench-cluster] left behind: {left or 'nothing'}")
