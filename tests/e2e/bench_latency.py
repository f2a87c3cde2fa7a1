"""Create latency through the real kube-apiserver, three ways, interleaved:
no webhook; the same binary's no-op route (`serve --no-kube
--bench-noop-route`: reads the body and allows the request) registered
exactly like ours; its `noop-patch` route, the same with a fixed one-label
patch (what any patch costs the API server); and ours. Labelled VM creates, in rounds, over several
runs. Two more ways isolate parts of ours: `ours-marker-only` sends VMs with
nothing to clean, so that our answer is a one-operation patch, and
`ours-known-restore` labels VMs with a Restore that exists, so that every
lookup is a cache hit (`ours` names a Restore that does not exist, which costs
a live GET whenever the remembered miss has expired). Outside CI: `make
bench-latency` (env LATENCY_CREATES per mode and run, LATENCY_RUNS,
LATENCY_ROUND, LATENCY_MODES)."""

import copy
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from harness import free_port, p99, wait_until  # noqa: E402
from test_restore import create_latencies  # noqa: E402

CREATES = int(os.environ.get("LATENCY_CREATES", "500"))
RUNS = int(os.environ.get("LATENCY_RUNS", "3"))
ROUND = int(os.environ.get("LATENCY_ROUND", "50"))
MODES = os.environ.get("LATENCY_MODES", "none,noop,noop-patch,ours,ours-marker-only,ours-known-restore").split(",")


if __name__ == "__main__":
    cluster = harness.Cluster()
    try:
        ours = cluster.start_with_webhook()
        noop_port = free_port()
        cluster.spawn("noop-webhook", [cluster.webhook_bin, "--log-level", "error", "serve", "--no-kube", "--bench-noop-route",
                                       "--tls-cert-file", cluster.webhook_certs / "tls.crt",
                                       "--tls-key-file", cluster.webhook_certs / "tls.key",
                                       "--listen", f"127.0.0.1:{noop_port}", "--metrics-listen", f"127.0.0.1:{free_port()}"])
        import socket
        wait_until(lambda: socket.create_connection(("127.0.0.1", noop_port), timeout=1).close() is None, 30, "no-op webhook")
        noop = copy.deepcopy(ours)
        noop["metadata"] = {"name": "vmrw-noop"}
        for hook in noop["webhooks"]:
            hook["clientConfig"]["url"] = f"https://127.0.0.1:{noop_port}/noop"
        # The same with a fixed one-label patch: what any patch costs the API server.
        noop_patch = copy.deepcopy(noop)
        noop_patch["metadata"] = {"name": "vmrw-noop-patch"}
        for hook in noop_patch["webhooks"]:
            hook["clientConfig"]["url"] = f"https://127.0.0.1:{noop_port}/noop-patch"
        ns = "latency"
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        # The Restore `ours-known-restore` names exists: its lookups hit the cache.
        cluster.apply({"apiVersion": "velero.io/v1", "kind": "Restore",
                       "metadata": {"name": "latency-known", "namespace": harness.VELERO_NS}, "spec": {"backupName": "none"}})

        def use(mode):
            for config in (ours, noop, noop_patch):
                cluster.kubectl("delete", "mutatingwebhookconfiguration", config["metadata"]["name"], "--ignore-not-found")
            if mode.startswith("ours"):
                cluster.apply(ours)
            elif mode == "noop":
                cluster.apply(noop)
            elif mode == "noop-patch":
                cluster.apply(noop_patch)
            time.sleep(1.5)  # the API server's webhook informer picks the change up

        use("ours")
        create_latencies(cluster, ns, 20, "warmup")
        results = {run: {mode: [] for mode in MODES} for run in range(RUNS)}
        started = time.time()
        for run in range(RUNS):
            for round_index in range(CREATES // ROUND):
                for mode in MODES:
                    use(mode)
                    latencies, failures = create_latencies(
                        cluster, ns, ROUND, f"r{run}-{round_index}-{mode}", clean=mode == "ours-marker-only",
                        restore="latency-known" if mode == "ours-known-restore" else "latency")
                    assert not failures, failures
                    results[run][mode] += latencies
        # The webhook was really in the path in "ours" only.
        probe = cluster.get_json("virtualmachine", "r0-0-ours-0", "-n", ns)
        assert "instanceUUID" not in probe["spec"], "our webhook was not in the path"
        if "noop" in MODES:
            assert "instanceUUID" in cluster.get_json("virtualmachine", "r0-0-noop-0", "-n", ns)["spec"]
        if "noop-patch" in MODES:
            patched = cluster.get_json("virtualmachine", "r0-0-noop-patch-0", "-n", ns)
            assert patched["metadata"]["labels"].get("vmrw-bench-noop") == "patched", "the no-op patch was not applied"
            assert "instanceUUID" in patched["spec"]
        print(f"\ncreate latency through kube-apiserver, {CREATES} creates per mode per run, {RUNS} runs, "
              f"interleaved in rounds of {ROUND} ({time.time() - started:.0f}s)")
        print(f"{'run':>3} {'mode':>16} {'median ms':>10} {'p99 ms':>8}")
        summary = []
        for run in range(RUNS):
            stats = {mode: (statistics.median(results[run][mode]) * 1000, p99(results[run][mode]) * 1000) for mode in MODES}
            for mode in MODES:
                print(f"{run:>3} {mode:>16} {stats[mode][0]:>10.3f} {stats[mode][1]:>8.3f}")
            ratios = {}
            baselines = ["none", "noop", "noop-patch"]
            for mode in MODES:
                # Each way against the ways below it: none < noop < noop-patch < ours.
                below = baselines[:baselines.index(mode)] if mode in baselines else baselines
                for base in below:
                    if base in stats:
                        ratios[f"{mode}/{base} median"] = stats[mode][0] / stats[base][0]
                        ratios[f"{mode}/{base} p99"] = stats[mode][1] / stats[base][1]
            summary.append(ratios)
            print("    " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
        print(json.dumps({"runs": summary}))
    finally:
        cluster.close()
