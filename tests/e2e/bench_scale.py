"""Scale, against the real kube-apiserver and Velero (outside CI: `make
bench-scale`; env SCALE_GROUPS, SCALE_VMS, SCALE_WAKEUPS):
- the webhook's RSS with SCALE_GROUPS (10,000) VirtualMachineGroups in its cache;
- how soon a VM held for its group is admitted once the group is created
  (the group wait's wake-up, p50 and p99);
- a Velero restore of SCALE_VMS (1,000) VMs in 10 groups with the webhook
  against without it, as a ratio, and the webhook's peak RSS."""

import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
import objects as o  # noqa: E402
from harness import RESTORE_LABEL, VELERO_NS, p99, wait_until  # noqa: E402

GROUPS = int(os.environ.get("SCALE_GROUPS", "10000"))
VMS = int(os.environ.get("SCALE_VMS", "1000"))
WAKEUPS = int(os.environ.get("SCALE_WAKEUPS", "100"))


def rss_mib(cluster, field="VmRSS"):
    pid = cluster.processes["webhook"].proc.pid
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(field)


def apply_in_batches(cluster, docs, batch=500):
    for start in range(0, len(docs), batch):
        cluster.kubectl("apply", "--server-side", "-f", "-", timeout=600,
                        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs[start:start + batch]}))


def main(cluster):
    report = {}
    # 1. RSS with many groups in the cache.
    before = rss_mib(cluster)
    ns = "scale-groups"
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    started = time.time()
    apply_in_batches(cluster, [o.group(ns, f"g-{i}", [{"kind": "VirtualMachine", "name": f"vm-{i}"}]) for i in range(GROUPS)])

    def cached():
        metrics = cluster.metrics()
        line = next(line for line in metrics.splitlines() if line.startswith("velero_vm_restore_webhook_group_cache_objects"))
        return float(line.split()[-1]) >= GROUPS

    wait_until(cached, 300, f"{GROUPS} groups in the webhook's cache")
    report["groups"] = {"count": GROUPS, "rss_mib_before": round(before, 1), "rss_mib_after": round(rss_mib(cluster), 1),
                        "peak_rss_mib": round(rss_mib(cluster, "VmHWM"), 1), "created_in_s": round(time.time() - started, 1)}
    print(f"[scale] {json.dumps(report['groups'])}", flush=True)

    # 2. Wake-up: a VM held for its group, the group created meanwhile.
    ns = "scale-wakeup"
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    delays = []
    for i in range(WAKEUPS):
        vm = o.vm(ns, f"held-{i}", f"late-{i}", i % 250, labels={RESTORE_LABEL: "wakeup"})
        done = {}

        def create():
            cluster.kubectl("create", "-f", "-", input=json.dumps(vm))
            done["at"] = time.perf_counter()

        thread = threading.Thread(target=create)
        thread.start()
        wait_until(lambda: any(e.get("message") == "VM waits for its VirtualMachineGroup" and e.get("group") == f"late-{i}"
                               for e in cluster.webhook_log()), 30, "the webhook to hold the VM", interval=0.02)
        cluster.kubectl("create", "-f", "-", input=json.dumps(o.group(ns, f"late-{i}", [{"kind": "VirtualMachine", "name": f"held-{i}"}])))
        created = time.perf_counter()
        thread.join(60)
        delays.append(done["at"] - created)
    # The VM's create returns through kubectl (a process start, about the
    # same as the group's create): these are upper bounds of the wake-up.
    report["wakeup_ms"] = {"count": WAKEUPS, "p50": round(statistics.median(delays) * 1000, 1), "p99": round(p99(delays) * 1000, 1)}
    print(f"[scale] wake-up after the group's create returns: {json.dumps(report['wakeup_ms'])}", flush=True)

    # 3. A restore of many VMs, with the webhook and without.
    src = "scale-src"
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": src}}, o.resource_policy(src, "web-policy")]
    per_group = VMS // 10
    for g in range(10):
        docs.append(o.group(src, f"tier-{g}", [{"kind": "VirtualMachine", "name": f"vm-{g}-{i}"} for i in range(per_group)]))
        docs += [o.vm(src, f"vm-{g}-{i}", f"tier-{g}", i % 250) for i in range(per_group)]
    apply_in_batches(cluster, docs)
    cluster.velero("backup", "create", "b-scale", "--include-namespaces", src, "--snapshot-volumes=false", "--wait", timeout=1800)
    times = {}
    for mode in ("with", "without", "with-again"):
        if mode == "without":
            cluster.kubectl("delete", "mutatingwebhookconfiguration", cluster.mwc["metadata"]["name"])
        elif mode == "with-again":
            cluster.apply(cluster.mwc)
        time.sleep(2)
        target = f"scale-{mode}"
        started = time.time()
        restore = cluster.restore(f"r-scale-{mode}", "b-scale", "--namespace-mappings", f"{src}:{target}")
        times[mode] = time.time() - started
        assert restore["status"]["phase"] == "Completed", cluster.restore_describe(f"r-scale-{mode}")
        count = len(cluster.get_json("virtualmachines", "-n", target)["items"])
        assert count == per_group * 10, count
    report["restore"] = {"vms": per_group * 10, "groups": 10, "seconds_with": round(times["with"], 1),
                         "seconds_without": round(times["without"], 1), "seconds_with_again": round(times["with-again"], 1),
                         "ratio": round((times["with"] + times["with-again"]) / 2 / times["without"], 3),
                         "webhook_peak_rss_mib": round(rss_mib(cluster, "VmHWM"), 1)}
    print(f"[scale] restore: {json.dumps(report['restore'])}", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    cluster = harness.Cluster()
    try:
        cluster.start()
        main(cluster)
    finally:
        cluster.close()
