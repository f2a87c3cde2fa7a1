"""The in-cluster webhook measured (outside CI: `make bench-cluster`; env
CLUSTER_VMS (1000), RESTORE_RUNS (5), LATENCY_CREATES per way and run
(300), LATENCY_RUNS (5), LATENCY_ROUND (50), ATTACKERS (2), BENCH_PARTS
(restore,latency,attack: which parts run)), on the one-node cluster of
test_cluster.py:
- a Velero restore, Velero running as a pod, of CLUSTER_VMS VMs in 10 groups
  through the chart's pods against the same restore without the webhook
  (its MutatingWebhookConfiguration removed) and through the pods' no-op
  route, RESTORE_RUNS interleaved runs of each: the ratio of medians and of
  means, and each run's ratio with over without and over the no-op route
  (spread);
- labelled VM creates as Velero (impersonating its ServiceAccount) through
  the chart's Service, interleaved in rounds, the six WAYS below (the chart
  installed with VMRW_BENCH_NOOP_ROUTE=true, the webhook's path switched):
  each run's medians, ours over the no-op route with a patch of ours' size,
  and the CPU seconds per 1,000 creates of the API server, etcd, containerd,
  its shims and the webhook's pods, per way;
- the same creates through ours while ATTACKERS callers in another namespace
  send, back to back, dry-run creates of a crafted VM whose interfaces name
  3,000 SubnetSets, each under a new restore name (issue 26, finding 1),
  interleaved in rounds with quiet ones: the ratio attacked over quiet."""

import copy
import http.client
import json
import os
import statistics
import ssl
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import node  # noqa: E402
import objects as o  # noqa: E402
from bench_scale import apply_in_batches  # noqa: E402
from harness import RESTORE_LABEL, p99  # noqa: E402
from test_restore import create_latencies  # noqa: E402
from test_vmop import requests_since, webhook_requests  # noqa: E402

VMS = int(os.environ.get("CLUSTER_VMS", "1000"))
CREATES = int(os.environ.get("LATENCY_CREATES", "300"))
RUNS = int(os.environ.get("LATENCY_RUNS", "5"))
RESTORE_RUNS = int(os.environ.get("RESTORE_RUNS", "5"))
ROUND = int(os.environ.get("LATENCY_ROUND", "50"))
ATTACKERS = int(os.environ.get("ATTACKERS", "2"))
PARTS = set(os.environ.get("BENCH_PARTS", "restore,latency,attack").split(","))


def attack(cluster, ns, attacking, stop, record):
    """One attacker: while `attacking` is set, dry-run creates of a crafted VM
    (3,000 SubnetSet interfaces, a new restore name each time, so each review
    also misses the Restore lookup) over one kept-alive connection; each
    answer's status goes to `record`."""
    ctx = ssl.create_default_context(cafile=str(cluster.server_ca))
    ctx.load_cert_chain(str(cluster.clients.dir / "admin.crt"), str(cluster.clients.dir / "admin.key"))
    conn = http.client.HTTPSConnection(cluster.api_host, cluster.api_port, context=ctx, timeout=60)
    vm = o.vm(ns, "crafted", None, 90)
    vm["spec"]["network"]["interfaces"] = [
        {"name": f"eth{i}", "network": {"apiVersion": "crd.nsx.vmware.com/v1alpha1", "kind": "SubnetSet", "name": f"missing-{i}"}}
        for i in range(3000)]
    path = f"/apis/vmoperator.vmware.com/v1alpha5/namespaces/{ns}/virtualmachines?dryRun=All"
    sent = 0
    while not stop.is_set():
        if not attacking.wait(0.1):
            continue
        sent += 1
        vm["metadata"]["labels"][RESTORE_LABEL] = f"crafted-{threading.get_ident()}-{sent}"
        try:
            conn.request("POST", path, json.dumps(vm), {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as err:
            status = type(err).__name__
            conn.close()
            conn = http.client.HTTPSConnection(cluster.api_host, cluster.api_port, context=ctx, timeout=60)
        record(status)
    conn.close()


def main(cluster):
    ours = cluster.get_json("mutatingwebhookconfiguration", node.FULLNAME)
    for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
        ours["metadata"].pop(key, None)
    noop = copy.deepcopy(ours)
    for hook in noop["webhooks"]:
        hook["clientConfig"]["service"]["path"] = "/noop"

    def use(mode, path=None):
        """No webhook, ours, or the no-op route; `path`: the webhook's path
        (a bench route of the same pods) instead."""
        cluster.kubectl("delete", "mutatingwebhookconfiguration", node.FULLNAME, "--ignore-not-found")
        if mode != "none":
            config = copy.deepcopy(ours if mode == "ours" else noop)
            if path:
                for hook in config["webhooks"]:
                    hook["clientConfig"]["service"]["path"] = path
            cluster.apply(config)
        time.sleep(1.5)  # the API server's webhook informer picks the change up

    report = {}
    if "restore" in PARTS:
        restore_part(cluster, use, report)
    if PARTS & {"latency", "attack"}:
        latency_part(cluster, use, report)
    print(json.dumps(report))


def restore_part(cluster, use, report):
    """1. A restore of many VMs with the webhook, without, and through the
    same pods' no-op route (the floor: what any webhook on the path costs)."""
    src = "scale-src"
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": src}}, o.resource_policy(src, "web-policy")]
    per_group = VMS // 10
    for g in range(10):
        docs.append(o.group(src, f"tier-{g}", [{"kind": "VirtualMachine", "name": f"vm-{g}-{i}"} for i in range(per_group)]))
        docs += [o.vm(src, f"vm-{g}-{i}", f"tier-{g}", i % 100) for i in range(per_group)]
    apply_in_batches(cluster, docs)
    cluster.velero("backup", "create", "b-scale", "--include-namespaces", src, "--snapshot-volumes=false", "--wait", timeout=1800)
    # Interleaved runs, the order rotating (with, without, noop; without,
    # noop, with; ...), so a cluster that slows as it fills weighs on all alike.
    order = ["with", "without", "noop"]
    times = {mode: [] for mode in order}
    api_requests = []
    for run in range(RESTORE_RUNS):
        for mode in order[run % 3:] + order[:run % 3]:
            use({"with": "ours", "without": "none", "noop": "noop"}[mode])
            target = f"scale-{mode}-{run}"
            requests_before = webhook_requests(cluster)
            started = time.time()
            restore = cluster.restore(f"r-{target}", "b-scale", "--namespace-mappings", f"{src}:{target}")
            times[mode].append(time.time() - started)
            if mode == "with":
                # The webhook's own requests to the API server during the
                # restore (both pods): a Restore GET or two, none per VM.
                api_requests.append({f"{resource} {verb}": n for (resource, verb), n
                                     in requests_since(requests_before, webhook_requests(cluster)).items()})
            if restore["status"]["phase"] != "Completed":
                # Velero marks a restore Failed when its pod restarts mid-run.
                pods = cluster.kubectl("get", "pods", "-n", node.VELERO_NS, "-o", "wide", check=False).stdout
                raise AssertionError(f"{cluster.restore_describe(f'r-{target}')}\n{pods}")
            vms = cluster.get_json("virtualmachines", "-n", target)["items"]
            assert len(vms) == per_group * 10, len(vms)
            cleaned = sum("instanceUUID" not in vm["spec"] for vm in vms)
            assert cleaned == (len(vms) if mode == "with" else 0), (mode, cleaned)
            print(f"[bench-cluster] restore {run} {mode}: {times[mode][-1]:.1f} s", flush=True)
            # Each restore into a cluster of the same size: the namespace goes
            # before the next one (with 15 namespaces of 1,000 VMs kept, one
            # restore ended Failed mid-way, as when Velero's server restarts).
            cluster.kubectl("delete", "namespace", target, "--wait=true", "--timeout=600s", timeout=660)
    pair_ratios = [with_s / without_s for with_s, without_s in zip(times["with"], times["without"])]
    report["restore"] = {"vms": per_group * 10, "groups": 10, "runs": RESTORE_RUNS,
                         "seconds_with": [round(t, 1) for t in times["with"]],
                         "seconds_without": [round(t, 1) for t in times["without"]],
                         "seconds_noop_route": [round(t, 1) for t in times["noop"]],
                         "noop_route_over_without_median": round(statistics.median(times["noop"]) / statistics.median(times["without"]), 3),
                         "with_over_noop_route_median": round(statistics.median(times["with"]) / statistics.median(times["noop"]), 3),
                         "ratio_of_medians": round(statistics.median(times["with"]) / statistics.median(times["without"]), 3),
                         "ratio_of_means": round(statistics.mean(times["with"]) / statistics.mean(times["without"]), 3),
                         "pair_ratios": [round(r, 3) for r in pair_ratios],
                         "pair_ratio_spread": [round(min(pair_ratios), 3), round(max(pair_ratios), 3)],
                         # Each run's with over the same run's no-op route.
                         "pair_ratios_over_noop_route": [round(w / n, 3) for w, n in zip(times["with"], times["noop"])],
                         "webhook_api_requests_per_restore": api_requests}
    print(f"[bench-cluster] restore: {json.dumps(report['restore'])}", flush=True)


def latency_part(cluster, use, report):
    """2. Create latency through the Service; 3. the same under attack."""
    ns = "latency"
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    use("ours")
    create_latencies(cluster, ns, 20, "warmup", as_user=VELERO_USER)
    if "latency" in PARTS:
        modes_part(cluster, use, report, ns)
    if "attack" in PARTS:
        attack_part(cluster, use, report, ns)


# The creates' ways, interleaved in rounds (issue 35): no webhook; the no-op
# route (reads the body, allows); the no-op route answering with a patch of
# ours' size (the fair floor for a create ours patches); ours as shipped;
# ours without its change lines (INFO), as with logs at `warn`; ours with the
# same patch but no `warnings`. Each way but `none` is the same pods, only
# the webhook's path switched.
WAYS = ["none", "noop", "noop-sized", "ours", "ours-quiet-changes", "ours-no-warnings"]
# Velero's identity (`velero install`'s ServiceAccount): the creates are
# Velero's as in a restore, so no create pays the unrecognised-user warning.
VELERO_USER = f"system:serviceaccount:{node.VELERO_NS}:velero"


def way_path(way, patch_bytes):
    return {"none": None, "noop": "/noop", "noop-sized": f"/noop-patch/{patch_bytes}", "ours": None,
            "ours-quiet-changes": "/bench/mutate-quiet-changes", "ours-no-warnings": "/bench/mutate-no-warnings"}[way]


def patch_ops(sent, stored, path=""):
    """The JSON Patch that turns `sent` into `stored` (objects compared key by
    key, anything else replaced whole): the size of what ours answered."""
    ops = []
    for key, value in sent.items():
        at = f"{path}/{key.replace('~', '~0').replace('/', '~1')}"
        if key not in stored:
            ops.append({"op": "remove", "path": at})
        elif isinstance(value, dict) and isinstance(stored[key], dict):
            ops += patch_ops(value, stored[key], at)
        elif value != stored[key]:
            ops.append({"op": "replace", "path": at, "value": stored[key]})
    for key, value in stored.items():
        if key not in sent:
            ops.append({"op": "add", "path": f"{path}/{key.replace('~', '~0').replace('/', '~1')}", "value": value})
    return ops


def ours_patch_bytes(cluster, use, ns):
    """The size of ours' patch for the bench's VM: the same VM created
    through the no-op route and through ours, the two stored objects
    compared (so the API server's defaults count in neither)."""
    for way in ("noop", "ours"):
        use("ours", way_path(way, 0))
        _, failures = create_latencies(cluster, ns, 1, f"size-{way}", as_user=VELERO_USER)
        assert not failures, failures
    # The names differ, and with them the cloud-init fields derived from them.
    sent = json.loads(json.dumps(cluster.get_json("virtualmachine", "size-noop-0", "-n", ns)).replace("size-noop-0", "size-ours-0"))
    stored = cluster.get_json("virtualmachine", "size-ours-0", "-n", ns)
    ops = []
    for part in ("labels", "annotations"):
        ops += patch_ops(sent["metadata"].get(part, {}), stored["metadata"].get(part, {}), f"/metadata/{part}")
    ops += patch_ops(sent["spec"], stored["spec"], "/spec")
    return len(json.dumps(ops, separators=(",", ":"))), ops


def component_cpu(cluster):
    """CPU seconds (user + system, all threads) so far of the API server,
    etcd, containerd, every containerd shim and the webhook's processes."""
    tick = os.sysconf("SC_CLK_TCK")
    pids = {"kube-apiserver": [cluster.processes["kube-apiserver"].proc.pid],
            "etcd": [cluster.processes["etcd"].proc.pid],
            "containerd": [cluster.processes["containerd"].proc.pid], "shims": [], "webhook pods": []}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ")
        except OSError:
            continue
        if b"containerd-shim" in cmdline:
            pids["shims"].append(int(entry))
        elif b"velero-vm-restore-webhook" in cmdline and b" serve" in cmdline:
            pids["webhook pods"].append(int(entry))
    seconds = {}
    for component, group in pids.items():
        total = 0
        for pid in group:
            try:
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        seconds[component] = total / tick
    return seconds


def modes_part(cluster, use, report, ns):
    """2. Labelled creates, as Velero, through each of WAYS."""
    size, ops = ours_patch_bytes(cluster, use, ns)
    print(f"[bench-cluster] ours' patch for the bench VM: {size} bytes, {len(ops)} operations: {json.dumps(ops)}", flush=True)
    results = {run: {way: [] for way in WAYS} for run in range(RUNS)}
    cpu = {way: {} for way in WAYS}
    for run in range(RUNS):
        for round_index in range(CREATES // ROUND):
            # The order rotates each round, so no way always follows another.
            shift = (run * (CREATES // ROUND) + round_index) % len(WAYS)
            for way in WAYS[shift:] + WAYS[:shift]:
                use("none" if way == "none" else "ours", way_path(way, size))
                before = component_cpu(cluster)
                latencies, failures = create_latencies(cluster, ns, ROUND, f"r{run}-{round_index}-{way}", as_user=VELERO_USER)
                after = component_cpu(cluster)
                assert not failures, failures
                results[run][way] += latencies
                for component, spent in after.items():
                    cpu[way][component] = cpu[way].get(component, 0) + spent - before.get(component, 0)
    first = {way: cluster.get_json("virtualmachine", f"r0-0-{way}-0", "-n", ns) for way in WAYS}
    for way in ("ours", "ours-quiet-changes", "ours-no-warnings"):
        assert "instanceUUID" not in first[way]["spec"], f"{way} was not in the path"
    for way in ("none", "noop", "noop-sized"):
        assert "instanceUUID" in first[way]["spec"], f"{way} changed a VM"
    assert "vmrw-bench-noop" in first["noop-sized"]["metadata"]["annotations"], "the sized no-op patch was not applied"
    use("ours")
    runs = []
    print(f"{'run':>3} {'way':>18} {'median ms':>10} {'p99 ms':>8}")
    for run in range(RUNS):
        stats = {way: (statistics.median(results[run][way]) * 1000, p99(results[run][way]) * 1000) for way in WAYS}
        for way in WAYS:
            print(f"{run:>3} {way:>18} {stats[way][0]:>10.3f} {stats[way][1]:>8.3f}")
        runs.append({"medians_ms": {way: round(stats[way][0], 3) for way in WAYS},
                     "ours - noop-sized ms": round(stats["ours"][0] - stats["noop-sized"][0], 3),
                     "ours - noop ms": round(stats["ours"][0] - stats["noop"][0], 3),
                     "ours/noop-sized median": round(stats["ours"][0] / stats["noop-sized"][0], 3),
                     "ours/noop median": round(stats["ours"][0] / stats["noop"][0], 3),
                     "noop/none median": round(stats["noop"][0] / stats["none"][0], 3)})
        print("    " + json.dumps(runs[-1]))
    over = [r["ours - noop-sized ms"] for r in runs]
    per_thousand = {way: {component: round(spent * 1000 / (RUNS * (CREATES // ROUND) * ROUND), 3)
                          for component, spent in cpu[way].items()} for way in WAYS}
    print(f"{'way':>18} " + " ".join(f"{c:>15}" for c in cpu["ours"]) + "   (CPU s per 1,000 creates)")
    for way in WAYS:
        print(f"{way:>18} " + " ".join(f"{per_thousand[way][c]:>15.3f}" for c in cpu["ours"]))
    report["latency"] = {"creates_per_way_per_run": CREATES, "runs": RUNS, "patch_bytes": size,
                         "ours_over_noop_sized_ms_median_of_runs": round(statistics.median(over), 3),
                         "ours_over_noop_sized_ms_spread": [min(over), max(over)],
                         "cpu_seconds_per_1000_creates": per_thousand, "per_run": runs}
    print(f"[bench-cluster] latency: {json.dumps(report['latency'])}", flush=True)


def attack_part(cluster, use, report, ns):
    """3. The same creates, quiet and while crafted VMs arrive from another
    namespace, interleaved in rounds, through ours and through the no-op
    route: how much of the slowdown is the webhook's, and how much the API
    server's (decoding and forwarding 300 KB bodies on the same 2 cores)."""
    bad_ns = "attacker"
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": bad_ns}})
    attacking, stop = threading.Event(), threading.Event()
    answers = {"ours": {}, "noop": {}}
    current = {"mode": "ours"}
    lock = threading.Lock()

    def attacker():
        def record(status):
            with lock:
                counts = answers[current["mode"]]
                counts[str(status)] = counts.get(str(status), 0) + 1
        attack(cluster, bad_ns, attacking, stop, record)

    attackers = [threading.Thread(target=attacker, daemon=True) for _ in range(ATTACKERS)]
    for thread in attackers:
        thread.start()
    phases = [("ours", "quiet"), ("ours", "attacked"), ("noop", "quiet"), ("noop", "attacked")]
    under = {run: {phase: [] for phase in phases} for run in range(RUNS)}
    requests = 0
    try:
        for run in range(RUNS):
            for round_index in range(CREATES // ROUND):
                for mode, load in phases:
                    if load == "quiet":
                        use(mode)
                        current["mode"] = mode
                    counted = mode == "ours" and load == "attacked"
                    before = webhook_requests(cluster) if counted else {}
                    if load == "attacked":
                        attacking.set()
                        time.sleep(0.5)  # the attackers' requests are in flight
                    latencies, failures = create_latencies(cluster, ns, ROUND, f"a{run}-{round_index}-{mode}-{load}")
                    attacking.clear()
                    time.sleep(0.3)  # the last crafted requests are answered
                    if counted:
                        requests += sum(requests_since(before, webhook_requests(cluster)).values())
                    assert not failures, failures
                    under[run][(mode, load)] += latencies
    finally:
        stop.set()
        for thread in attackers:
            thread.join(timeout=120)
        use("ours")
    answered = {}
    for mode, counts in answers.items():
        for status, n in counts.items():
            answered[f"{mode} {status}"] = n
    # Every crafted VM refused (by our webhook's denial, or, through the
    # no-op route, by the API server's validation), none lost to a timeout.
    assert answered and all(key.split()[1].startswith("4") for key in answered), answered
    attacked_runs = []
    for run in range(RUNS):
        med = {f"{m} {p}": statistics.median(under[run][(m, p)]) * 1000 for m, p in phases}
        high = {f"{m} {p}": p99(under[run][(m, p)]) * 1000 for m, p in phases}
        attacked_runs.append({"median_ms": {k: round(v, 2) for k, v in med.items()},
                              "p99_ms": {k: round(v, 2) for k, v in high.items()},
                              "ours attacked/quiet median": round(med["ours attacked"] / med["ours quiet"], 3),
                              "noop attacked/quiet median": round(med["noop attacked"] / med["noop quiet"], 3),
                              "attacked ours/noop median": round(med["ours attacked"] / med["noop attacked"], 3)})
        print("    " + json.dumps(attacked_runs[-1]), flush=True)
    report["under_attack"] = {"attackers": ATTACKERS, "crafted_creates_answered": answered,
                              "webhook_api_requests_while_attacked": requests, "runs": attacked_runs}
    print(f"[bench-cluster] under attack: {json.dumps(report['under_attack'])}", flush=True)


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
