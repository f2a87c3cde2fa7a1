"""The webhook the way admins run it: a one-node cluster (kubelet, containerd,
runc, a CNI bridge, kube-proxy, kube-scheduler, kube-router's NetworkPolicy
enforcer; node.py), Velero installed by `velero install` and the chart by
`helm install` with its default values (only the image changed), both as
pods. The API server reaches the webhook pods through the chart's Service;
the pods reach the API server through the `kubernetes` Service. The chart's
NetworkPolicy (on by default) is enforced in every scenario.

Run in file order; they share one cluster. Stand-ins: vCenter and VM
Operator's controllers (nothing reconciles VMs), the distroless base of the
webhook image (images.py)."""

from __future__ import annotations

import base64
import http.client
import json
import re
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

import images
import node
import objects as o
import test_restore as scenarios
from harness import REPO, RESTORE_LABEL, WEBHOOK_NS, log, run, wait_until

RESULTS: dict = {}
SELECTOR = "app.kubernetes.io/name=velero-vm-restore-webhook"


@pytest.fixture(scope="module")
def cluster():
    with node.NodeCluster() as env:
        yield env
    left = node.leftovers()
    assert left == [], f"the cluster mode left these behind: {left}"


# -- helpers ------------------------------------------------------------------------
def ready_pods(cluster) -> list[dict]:
    return [p for p in cluster.webhook_pods()
            if not p["metadata"].get("deletionTimestamp")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]


def wait_for_ready_replicas(cluster, count=2, timeout=120):
    def enough():
        pods = ready_pods(cluster)
        return pods if len(pods) == count else None

    return wait_until(enough, timeout, f"{count} ready webhook pods", interval=1)


def serving_serial(ip: str) -> str:
    """The serial of the certificate a pod presents in a TLS handshake."""
    pem = run(["openssl", "s_client", "-connect", f"{ip}:8443", "-servername", f"{node.FULLNAME}.{WEBHOOK_NS}.svc"],
              input="", check=False, timeout=20).stdout
    return run(["openssl", "x509", "-noout", "-serial"], input=pem).stdout.strip().split("=", 1)[1]


def secret_serial(cluster) -> str:
    secret = cluster.get_json("secret", f"{node.FULLNAME}-tls", "-n", WEBHOOK_NS)
    pem = base64.b64decode(secret["data"]["tls.crt"]).decode()
    return run(["openssl", "x509", "-noout", "-serial"], input=pem).stdout.strip().split("=", 1)[1]


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


class Load:
    """Labelled VM creates at a steady rate, through the API server, the
    chart's Service and the pods (failurePolicy Fail: a create the webhook
    does not answer fails). Counts creates sent, failed, and answered without
    the webhook's cleaning; samples each pod's review count."""

    def __init__(self, cluster, ns: str, rate: float = 10.0):
        self.cluster, self.ns, self.interval = cluster, ns, 1.0 / rate
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        self.sent = self.failed = self.uncleaned = 0
        self.failures: list[str] = []
        self.per_pod: dict[str, int] = {}
        # Review counters are per pod since its start: the load's share is the growth.
        self.baseline = {p["metadata"]["name"]: self._served(p) or 0 for p in cluster.webhook_pods() if p["status"].get("podIP")}
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._create, daemon=True),
                        threading.Thread(target=self._sample, daemon=True)]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _connection(self):
        ctx = ssl.create_default_context(cafile=str(self.cluster.server_ca))
        ctx.load_cert_chain(str(self.cluster.clients.dir / "admin.crt"), str(self.cluster.clients.dir / "admin.key"))
        return http.client.HTTPSConnection(self.cluster.host_ip, self.cluster.api_port, context=ctx, timeout=35)

    def _create(self):
        conn = self._connection()
        next_at = time.monotonic()
        while not self.stopping.is_set():
            vm = o.vm(self.ns, f"load-{self.sent}", None, self.sent % 100, labels={RESTORE_LABEL: "cluster-load"})
            self.sent += 1
            try:
                conn.request("POST", f"/apis/vmoperator.vmware.com/v1alpha5/namespaces/{self.ns}/virtualmachines",
                             json.dumps(vm), {"Content-Type": "application/json"})
                response = conn.getresponse()
                body = response.read()
                if response.status != 201:
                    self.failed += 1
                    self.failures.append(f"{response.status}: {body[:300]!r}")
                elif "instanceUUID" in json.loads(body)["spec"]:
                    self.uncleaned += 1
            except (OSError, http.client.HTTPException) as err:
                self.failed += 1
                self.failures.append(f"{type(err).__name__}: {err}")
                conn.close()
                conn = self._connection()
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        conn.close()

    def _sample(self):
        while not self.stopping.wait(1.0):
            try:
                pods = self.cluster.webhook_pods()
            except Exception:  # noqa: BLE001 - a sample missed is retried next second
                continue
            for pod in pods:
                if not pod["status"].get("podIP"):
                    continue
                served = self._served(pod)
                if served is not None:
                    name = pod["metadata"]["name"]
                    self.per_pod[name] = max(served - self.baseline.get(name, 0), self.per_pod.get(name, 0))

    def _served(self, pod: dict) -> int | None:
        try:
            text = self.cluster.pod_metrics(pod, timeout=1)
        except OSError:
            return None
        return int(metric(text, "velero_vm_restore_webhook_reviews_total", kind="VirtualMachine"))

    def summary(self) -> dict:
        return {"sent": self.sent, "failed": self.failed, "uncleaned": self.uncleaned,
                "reviews_per_pod": dict(sorted(self.per_pod.items())), "first_failures": self.failures[:5]}


def report(name: str, data: dict) -> None:
    RESULTS[name] = data
    log(f"{name}: {json.dumps(data)}")


# -- the image ------------------------------------------------------------------------
def test_cluster_image_is_the_dockerfiles_final_stage(tmp_path):
    """The image the cluster runs is read off the Dockerfile; an instruction
    the builder does not model fails here instead of drifting."""
    binary = tmp_path / "velero-vm-restore-webhook"
    binary.write_bytes(b"\x7fELF stand-in")
    image = images.webhook_image(REPO / "Dockerfile", REPO, binary, "e2e.local/x:1")
    assert image.user == "65532:65532"
    assert image.entrypoint == ["/velero-vm-restore-webhook"] and image.cmd == ["serve"]
    assert set(image.exposed_ports) == {"8443/tcp", "9090/tcp"}
    added = {e.path for e in image.layers[-1] if e.data is not None}
    assert added == {"/velero-vm-restore-webhook", "/licenses/LICENSE"}
    assert image.labels["org.opencontainers.image.title"] == "velero-vm-restore-webhook"
    # Negative controls: what the builder does not model is refused.
    text = (REPO / "Dockerfile").read_text()
    for extra in ("RUN mkdir /data\n", "COPY --chown=1:1 LICENSE /x\n", "ENV FOO=bar\n", "VOLUME /tmp\n"):
        drifted = tmp_path / "Dockerfile"
        drifted.write_text(text.replace("USER 65532:65532\n", extra + "USER 65532:65532\n"))
        with pytest.raises(ValueError):
            images.webhook_image(drifted, REPO, binary, "e2e.local/x:1")
    other_base = tmp_path / "Dockerfile.base"
    other_base.write_text(text.replace("gcr.io/distroless/static-debian12:nonroot", "debian:12"))
    with pytest.raises(ValueError):
        images.webhook_image(other_base, REPO, binary, "e2e.local/x:1")


# -- the installed chart ------------------------------------------------------------------
def test_cluster_two_replicas_ready_with_the_shipped_security_context(cluster):
    pods = wait_for_ready_replicas(cluster)
    assert len({p["spec"]["nodeName"] for p in pods}) == 1
    for pod in pods:
        (status,) = pod["status"]["containerStatuses"]
        assert status["restartCount"] == 0, pod["metadata"]["name"]
        assert status["image"] == node.WEBHOOK_IMAGE
        # What the kernel shows of the running process, not what the spec asks.
        pid = container_pid(cluster, status["containerID"])
        uids = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^Uid:\s+65532\s+65532\s+65532\s+65532$", uids, re.M), uids
        assert re.search(r"^Gid:\s+65532\s", uids, re.M), uids
        assert re.search(r"^CapEff:\s+0+$", uids, re.M), uids
        root = [line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines() if line.split()[4] == "/"]
        assert root and "ro" in root[0][5].split(","), root
        tls = [line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
               if line.split()[4] == "/etc/velero-vm-restore-webhook/tls"]
        assert tls and "ro" in tls[0][5].split(","), tls
    report("replicas", {"pods": [p["metadata"]["name"] for p in pods], "uid": 65532, "read_only_root": True})


def container_pid(cluster, container_id: str) -> int:
    cid = container_id.split("://", 1)[1]
    out = run(["ctr", "--address", cluster.containerd_sock, "-n", "k8s.io", "tasks", "ls"]).stdout
    for line in out.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == cid:
            return int(parts[1])
    raise AssertionError(f"no task for container {cid}:\n{out}")


def test_cluster_helm_test_passes_and_fails_without_the_webhook(cluster):
    passed = cluster.helm("test", node.RELEASE, "-n", WEBHOOK_NS, "--logs", check=False, timeout=180)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "PASS: a dry-run create" in passed.stdout
    # Negative control: without the MutatingWebhookConfiguration the same test fails.
    mwc = cluster.get_json("mutatingwebhookconfiguration", node.FULLNAME)
    cluster.kubectl("delete", "mutatingwebhookconfiguration", node.FULLNAME)
    try:
        failed = cluster.helm("test", node.RELEASE, "-n", WEBHOOK_NS, "--logs", check=False, timeout=180)
        assert failed.returncode != 0, failed.stdout
        assert "FAIL" in failed.stdout + failed.stderr, failed.stdout + failed.stderr
    finally:
        for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
            mwc["metadata"].pop(key, None)
        cluster.apply(mwc)
    time.sleep(2)  # the API server's webhook informer picks the configuration up again
    again = cluster.helm("test", node.RELEASE, "-n", WEBHOOK_NS, check=False, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    report("helm_test", {"installed": "passed", "without_mwc": "failed", "restored": "passed"})


# -- the NetworkPolicy, enforced ------------------------------------------------------------
class Probe:
    """A pod running the probe program (tools/probe): each round it tries
    every target once and logs a JSON line; `settle` waits for the rounds to
    show what a phase expects and counts a few more."""

    def __init__(self, cluster, ns: str, name: str, targets: list[str]):
        self.cluster, self.ns, self.name, self.targets = cluster, ns, name, targets
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        cluster.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app": "probe"}},
                       "spec": {"terminationGracePeriodSeconds": 1, "automountServiceAccountToken": False,
                                "containers": [{"name": "probe", "image": node.PROBE_IMAGE, "imagePullPolicy": "Never",
                                                "args": ["-interval", "500ms", "-timeout", "1500ms", *targets],
                                                "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False}}]}})

        def running():
            pod = cluster.get_json("pod", name, "-n", ns)
            return pod if pod["status"].get("phase") == "Running" and pod["status"].get("podIP") else None

        self.ip = wait_until(running, 90, f"probe pod {ns}/{name}", interval=1)["status"]["podIP"]

    def rounds(self) -> list[dict]:
        out = self.cluster.kubectl("logs", "-n", self.ns, self.name, check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    @staticmethod
    def port(target: str) -> str:
        return re.search(r":(\d+)/", target).group(1)

    def settle(self, expect: dict[str, bool], phase: str, count: int = 4, timeout: float = 90) -> dict:
        """Waits for a round where each port is admitted (True) or refused
        (False) as `expect` says, then requires the next `count` rounds to
        agree; returns their counts per port."""
        def matches(r):
            return all(t["admitted"] == expect[self.port(t["target"])] for t in r["tries"])

        start = max((r["round"] for r in self.rounds()), default=0)
        first = wait_until(lambda: next((r["round"] for r in self.rounds() if r["round"] > start and matches(r)), None), timeout,
                           f"{self.ns}/{self.name}: {phase}", interval=1)
        later = wait_until(lambda: [r for r in self.rounds() if r["round"] > first][:count]
                           if len([r for r in self.rounds() if r["round"] > first]) >= count else None, 60,
                           f"{count} more rounds of {self.ns}/{self.name}", interval=1)
        counts: dict = {}
        for r in later:
            for t in r["tries"]:
                c = counts.setdefault(self.port(t["target"]), {"admitted": 0, "refused": 0})
                c["admitted" if t["admitted"] else "refused"] += 1
        wrong = [r for r in later if not matches(r)]
        assert not wrong, f"{phase}: rounds after it settled disagree: {wrong[:2]}"
        return counts


def test_cluster_network_policy_is_enforced(cluster):
    """The chart's default NetworkPolicy under a real enforcer (kube-router):
    the webhook port admits the API server (labelled creates and `helm test`
    pass) and refuses a pod of another namespace on both ports, while a pod of
    the release's namespace reaches the metrics port; with the policy removed
    the same pod gets through; an ipBlock in networkPolicy.apiServer.cidrs
    is enforced (the kind of rule the lookup renders for the API server).

    What this cannot show: the API server runs on this host, and kube-router
    (like the CNI plugins that follow kubelet's needs) admits whatever the
    node itself sends to its pods, so its calls pass by that rule, not by the
    ipBlock of its address. The ipBlock the lookup rendered is checked as
    stored; that an ipBlock admits its address and nothing else is shown
    with the probe pod's own address."""
    pods = wait_for_ready_replicas(cluster)
    chart = REPO / "charts" / "velero-vm-restore-webhook"
    name = node.FULLNAME
    policy = cluster.get_json("networkpolicy", name, "-n", WEBHOOK_NS)
    advertised = [a for e in cluster.get_json("endpointslice", "kubernetes", "-n", "default")["endpoints"] for a in e["addresses"]]
    assert advertised == [cluster.host_ip], advertised
    webhook_rule, metrics_rule = policy["spec"]["ingress"]
    assert webhook_rule["from"] == [{"ipBlock": {"cidr": f"{cluster.host_ip}/32"}}], webhook_rule
    assert metrics_rule["from"] == [{"podSelector": {}}], metrics_rule
    assert f"{cluster.host_ip}/32  (its advertised address" in cluster.install_output, cluster.install_output
    # kube-router has a firewall chain for each webhook pod.
    rules = run(["iptables-save", "-t", "filter"]).stdout
    for pod in pods:
        assert re.search(rf"-A KUBE-ROUTER-FORWARD .*-d {re.escape(pod['status']['podIP'])}/32 .*-j KUBE-POD-FW-", rules), \
            f"no firewall chain for {pod['metadata']['name']}"

    targets = [t for p in pods for t in (f"https://{p['status']['podIP']}:8443/mutate",
                                         f"http://{p['status']['podIP']}:9090/metrics")]
    other = Probe(cluster, "netpol-other", "probe", targets)
    inside = Probe(cluster, WEBHOOK_NS, "probe", targets)
    results: dict = {"pods": len(pods), "api_server_ipblock": webhook_rule["from"][0]["ipBlock"]["cidr"]}
    try:
        results["policy_on_other_namespace"] = other.settle({"8443": False, "9090": False}, "policy on: refused on both ports")
        results["policy_on_release_namespace"] = inside.settle({"8443": False, "9090": True},
                                                               "policy on: metrics admitted, webhook port refused")
        # The API server still gets through: a labelled dry-run create and `helm test`.
        ns = "netpol-creates"
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        created = 0
        for i in range(5):
            vm = o.vm(ns, f"vm-{i}", None, i, labels={RESTORE_LABEL: "cluster-netpol"})
            out = cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(vm)).stdout
            assert "instanceUUID" not in json.loads(out)["spec"], "the webhook did not clean it"
            created += 1
        tested = cluster.helm("test", node.RELEASE, "-n", WEBHOOK_NS, check=False, timeout=180)
        assert tested.returncode == 0, tested.stdout + tested.stderr
        results["api_server"] = {"labelled_dry_run_creates_cleaned": created, "helm_test": "passed"}

        # Negative control: without the policy the same pod gets through on both ports.
        cluster.kubectl("delete", "networkpolicy", name, "-n", WEBHOOK_NS)
        results["policy_removed_other_namespace"] = other.settle({"8443": True, "9090": True}, "policy removed: admitted")

        # An ipBlock is enforced: the probe's own address as an API server
        # source, in the NetworkPolicy the chart renders for
        # networkPolicy.apiServer.cidrs. Only the policy is applied: a
        # `helm upgrade` would also roll the pods (they get the same list as
        # --api-server-cidr, issue 33), and the probe's targets are the pods'
        # addresses.
        rendered = cluster.helm("template", node.RELEASE, chart, "-n", WEBHOOK_NS, "--show-only",
                                "templates/networkpolicy.yaml", "--set",
                                f"networkPolicy.apiServer.cidrs={{{other.ip}/32,{cluster.host_ip}/32}}").stdout
        cluster.kubectl("apply", "-f", "-", input=rendered)
        restored = cluster.get_json("networkpolicy", name, "-n", WEBHOOK_NS)
        assert {"ipBlock": {"cidr": f"{other.ip}/32"}} in restored["spec"]["ingress"][0]["from"]
        results["ipblock_of_the_probe"] = other.settle({"8443": True, "9090": False},
                                                       "its address in apiServer.cidrs: webhook port admitted")
    finally:
        for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
            policy["metadata"].pop(key, None)
        policy["metadata"].get("annotations", {}).pop("kubectl.kubernetes.io/last-applied-configuration", None)
        cluster.kubectl("delete", "networkpolicy", name, "-n", WEBHOOK_NS, "--ignore-not-found")
        cluster.apply(policy)
    results["policy_back_other_namespace"] = other.settle({"8443": False, "9090": False}, "default policy back: refused")
    for probe in (other, inside):
        cluster.kubectl("delete", "pod", probe.name, "-n", probe.ns, "--wait=false")
    cluster.kubectl("delete", "namespace", "netpol-other", "netpol-creates", "--wait=false")
    report("network_policy", results)


def test_cluster_full_restore_with_velero_in_a_pod(cluster):
    """test_restore.py's full restore, with Velero as the Deployment `velero
    install` made and the API server calling our pods through the Service:
    the same exact diff of every restored object."""
    velero = cluster.get_json("deployment", "velero", "-n", "velero")
    assert velero["status"].get("readyReplicas") == 1
    assert velero["spec"]["template"]["spec"]["containers"][0]["image"] == node.VELERO_IMAGE
    scenarios.test_2_full_restore(cluster)
    report("full_restore", {"phase": scenarios.REPORT["phase"], "restore_seconds": round(scenarios.REPORT["restore_seconds"], 1),
                            "creation_order": scenarios.REPORT["creation_order"]})


def test_cluster_boot_order_with_the_companion_as_two_pods(cluster):
    """test_restore.py's boot-order restore with the companion running in
    both pods: the group is started exactly once (one flip of its power
    state, one StartedInBootOrder Event)."""
    assert len(ready_pods(cluster)) == 2
    scenarios.test_12_boot_order_is_kept_through_the_restore(cluster)
    finished = {e.get("instance") for e in cluster.webhook_log()
                if e.get("message") == "restore companion finished with this Restore" and e.get("restore") == "r-boot"}
    report("boot_order", {"events": scenarios.REPORT["boot_order_events"], "replicas_finished": len(finished)})


# -- availability under load -------------------------------------------------------------
def test_cluster_rolling_upgrade_under_load(cluster):
    before = {p["metadata"]["name"] for p in wait_for_ready_replicas(cluster)}
    with Load(cluster, "load-upgrade") as load:
        time.sleep(3)
        cluster.helm("upgrade", node.RELEASE, REPO / "charts" / "velero-vm-restore-webhook", "-n", WEBHOOK_NS,
                     "--reuse-values", "--set-string", "podAnnotations.e2e/rollout=1", "--wait", "--timeout", "180s", timeout=240)
        after = {p["metadata"]["name"] for p in wait_for_ready_replicas(cluster)}
        # The API server keeps one connection per endpoint it picked, so the
        # reviews move pod to pod rather than spread; under load until a new pod serves.
        wait_until(lambda: any(load.per_pod.get(name, 0) > 0 for name in after), 60, "a new pod to serve reviews", interval=1)
        time.sleep(2)
    summary = load.summary()
    report("rolling_upgrade", summary)
    assert before.isdisjoint(after), "helm upgrade did not roll the pods"
    assert summary["sent"] > 50
    assert summary["failed"] == 0, summary
    assert summary["uncleaned"] == 0, summary
    assert any(summary["reviews_per_pod"].get(name, 0) > 0 for name in before), summary


def test_cluster_certificate_renewal_under_load(cluster):
    pods = wait_for_ready_replicas(cluster)
    old = secret_serial(cluster)
    assert {serving_serial(p["status"]["podIP"]) for p in pods} == {old}
    with Load(cluster, "load-renewal") as load:
        time.sleep(3)
        # The CA has less than renewBeforeDays left: the upgrade makes a new CA and certificate.
        cluster.helm("upgrade", node.RELEASE, REPO / "charts" / "velero-vm-restore-webhook", "-n", WEBHOOK_NS,
                     "--reuse-values", "--set", "certificates.helm.renewBeforeDays=100000", timeout=240)
        new = secret_serial(cluster)
        assert new != old
        started = time.time()
        wait_until(lambda: {serving_serial(p["status"]["podIP"]) for p in pods} == {new}, 180,
                   "each pod to serve the renewed certificate", interval=2)
        reload_seconds = time.time() - started
        time.sleep(3)
    # Back to the default, which reuses the new pair.
    cluster.helm("upgrade", node.RELEASE, REPO / "charts" / "velero-vm-restore-webhook", "-n", WEBHOOK_NS,
                 "--reuse-values", "--set", "certificates.helm.renewBeforeDays=60", timeout=240)
    assert secret_serial(cluster) == new
    summary = load.summary()
    now = {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"] for p in cluster.webhook_pods()}
    report("certificate_renewal", {**summary, "old_serial": old, "new_serial": new,
                                   "seconds_until_both_pods_served_it": round(reload_seconds, 1)})
    assert now == {p["metadata"]["name"]: 0 for p in pods}, "the pods were restarted, not reloaded"
    assert summary["failed"] == 0, summary
    bundle = base64.b64decode(cluster.get_json("mutatingwebhookconfiguration", node.FULLNAME)["webhooks"][0]["clientConfig"]["caBundle"])
    assert bundle.count(b"BEGIN CERTIFICATE") == 2, "the renewal's caBundle keeps the CA it replaced"


def test_cluster_pod_deletion_and_drain_under_load(cluster):
    pods = wait_for_ready_replicas(cluster)
    with Load(cluster, "load-drain") as load:
        time.sleep(3)
        cluster.kubectl("delete", "pod", "-n", WEBHOOK_NS, pods[0]["metadata"]["name"], timeout=120)
        wait_for_ready_replicas(cluster)
        time.sleep(3)
        drain = cluster.kubectl("drain", node.NODE, f"--pod-selector={SELECTOR}", "--ignore-daemonsets",
                                "--delete-emptydir-data", "--timeout=25s", check=False, timeout=120)
        still_ready = ready_pods(cluster)
        time.sleep(3)
    summary = load.summary()
    cluster.kubectl("uncordon", node.NODE)
    wait_for_ready_replicas(cluster)
    report("drain", {**summary, "drain_exit": drain.returncode, "ready_after_drain": len(still_ready)})
    assert drain.returncode != 0, "the drain evicted the last ready replica"
    assert "disruption budget" in drain.stderr + drain.stdout, drain.stderr
    assert len(still_ready) == 1
    assert summary["failed"] == 0, summary


# -- faults -------------------------------------------------------------------------------
def test_cluster_sigkill_in_the_middle_of_a_review(cluster):
    """A VM whose group does not exist is held by the webhook (wait-then-deny);
    the pod holding it is killed with SIGKILL. The API server's failure policy
    (Fail) decides: the create fails with the webhook's name in the error, and
    nothing of the VM is stored. The container restarts; the create then succeeds."""
    pods = wait_for_ready_replicas(cluster)
    ns = "sigkill"
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    vm = o.vm(ns, "held-1", "late-group", 1, labels={RESTORE_LABEL: "cluster-sigkill"})
    manifest = cluster.tmp / "held-1.json"
    manifest.write_text(json.dumps(vm))
    create = subprocess.Popen([str(cluster.kubectl_bin), f"--kubeconfig={cluster.admin_kubeconfig}", "create", "-f", manifest],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def holding():
        for pod in pods:
            if metric(cluster.pod_metrics(pod), "velero_vm_restore_webhook_group_waits_in_progress") >= 1:
                return pod
        return None

    holder = wait_until(holding, 15, "a pod holding the VM's review")
    pid = container_pid(cluster, holder["status"]["containerStatuses"][0]["containerID"])
    run(["kill", "-KILL", str(pid)])
    out, err = create.communicate(timeout=60)
    assert create.returncode != 0, out
    assert "velero-vm-restore-webhook" in err or "vmrw" in err, err
    assert cluster.kubectl("get", "virtualmachine", "held-1", "-n", ns, check=False).returncode != 0, "half-applied"

    def restarted():
        pod = cluster.get_json("pod", holder["metadata"]["name"], "-n", WEBHOOK_NS)
        return pod["status"]["containerStatuses"][0]["restartCount"] == 1 and pod["status"]["containerStatuses"][0]["ready"]

    wait_until(restarted, 120, "the killed container to restart and be ready", interval=1)
    cluster.apply({**o.group(ns, "late-group", [{"kind": "VirtualMachine", "name": "held-1"}])})
    cluster.create(vm)
    stored = cluster.get_json("virtualmachine", "held-1", "-n", ns)
    assert "instanceUUID" not in stored["spec"]
    report("sigkill", {"killed_pod": holder["metadata"]["name"], "create_error": err.strip().splitlines()[-1][-220:],
                       "stored_after_failure": False, "restarts": 1})


def test_cluster_broken_certificate_in_the_secret(cluster):
    """A Secret holding a broken certificate: the pods keep serving the old
    one, count and log the failed reload, and creates keep succeeding."""
    pods = wait_for_ready_replicas(cluster)
    name = f"{node.FULLNAME}-tls"
    secret = cluster.get_json("secret", name, "-n", WEBHOOK_NS)
    good = secret["data"]["tls.crt"]
    serial = secret_serial(cluster)
    errors_before = sum(metric(cluster.pod_metrics(p), "velero_vm_restore_webhook_tls_reloads_total", result="error") for p in pods)
    broken = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n").decode()
    with Load(cluster, "load-broken-cert", rate=5) as load:
        cluster.kubectl("patch", "secret", name, "-n", WEBHOOK_NS, "--type", "merge", "-p", json.dumps({"data": {"tls.crt": broken}}))
        try:
            wait_until(lambda: all(metric(cluster.pod_metrics(p), "velero_vm_restore_webhook_tls_reloads_total", result="error") >= 1
                                   for p in pods), 180, "both pods to reject the broken certificate", interval=2)
            served = {serving_serial(p["status"]["podIP"]) for p in pods}
        finally:
            cluster.kubectl("patch", "secret", name, "-n", WEBHOOK_NS, "--type", "merge", "-p", json.dumps({"data": {"tls.crt": good}}))
    summary = load.summary()
    errors_after = sum(metric(cluster.pod_metrics(p), "velero_vm_restore_webhook_tls_reloads_total", result="error") for p in pods)
    logged = [e for p in pods for e in cluster.webhook_log(p["metadata"]["name"])
              if "certificate" in e.get("message", "").lower() and e.get("level") in ("WARN", "ERROR")]
    report("broken_certificate", {**summary, "reload_errors": errors_after - errors_before,
                                  "log": logged[0].get("message") if logged else None})
    assert served == {serial}
    assert errors_after > errors_before
    assert logged, "no log line says why the certificate was not reloaded"
    assert summary["failed"] == 0, summary


def test_cluster_api_server_unreachable_from_the_pods(cluster):
    """Pods lose the API server for 20 s (their packets to it are rejected).
    Readiness and the caches recover without a restart: a group created
    during the outage admits its VM right after."""
    pods = wait_for_ready_replicas(cluster)
    restarts = {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"] for p in pods}
    ns = "outage"
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    rule = ["INPUT", "-s", node.POD_CIDR, "-d", cluster.host_ip, "-p", "tcp", "--dport", str(cluster.api_port),
            "-j", "REJECT", "--reject-with", "tcp-reset"]
    run(["iptables", "-I", *rule])
    try:
        time.sleep(5)
        cluster.apply(o.group(ns, "after-outage", [{"kind": "VirtualMachine", "name": "vm-1"}]))
        time.sleep(15)
    finally:
        run(["iptables", "-D", *rule])
    recovered_at = time.time()
    vm = o.vm(ns, "vm-1", "after-outage", 1, labels={RESTORE_LABEL: "cluster-outage"})
    wait_until(lambda: cluster.create(vm, check=False).returncode == 0 or
               cluster.kubectl("get", "virtualmachine", "vm-1", "-n", ns, check=False).returncode == 0, 90,
               "the VM naming the group made during the outage to be admitted", interval=2)
    admitted_after = time.time() - recovered_at
    wait_for_ready_replicas(cluster)
    now = {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"] for p in cluster.webhook_pods()}
    report("api_unreachable", {"outage_seconds": 20, "admitted_seconds_after": round(admitted_after, 1), "restarts": now})
    assert now == restarts, "a pod was restarted"
    assert "instanceUUID" not in cluster.get_json("virtualmachine", "vm-1", "-n", ns)["spec"]


# -- certificates.mode=certManager, with a real cert-manager -----------------------------
def certificate_pem(cluster) -> bytes:
    secret = cluster.get_json("secret", f"{node.FULLNAME}-tls", "-n", WEBHOOK_NS)
    return base64.b64decode(secret["data"]["tls.crt"])


def serving_certificate(cluster) -> dict:
    return cluster.get_json("certificate", f"{node.FULLNAME}-serving", "-n", WEBHOOK_NS)


def test_cluster_cert_manager_issues_and_injects(cluster):
    """README's "Install alongside Velero", option 2: cert-manager (v1.21.2,
    its own chart; controller, webhook and CA injector built from the
    module) is installed, the chart is installed again with
    certificates.mode=certManager. cert-manager issues the serving
    certificate from the chart's CA Issuer, the CA injector writes the CA
    into the MutatingWebhookConfiguration (the chart renders no caBundle in
    this mode), both pods serve the issued certificate, and labelled creates
    pass through the webhook."""
    timings = cluster.install_cert_manager()
    cluster.helm("uninstall", node.RELEASE, "-n", WEBHOOK_NS, "--wait", "--timeout", "120s", timeout=180)
    wait_until(lambda: not cluster.webhook_pods(), 120, "the helm-mode pods to be gone", interval=1)
    started = time.time()
    cluster.install_output = cluster.helm(
        "install", node.RELEASE, REPO / "charts" / "velero-vm-restore-webhook", "--namespace", WEBHOOK_NS,
        *cluster.image_values(), "--set", "certificates.mode=certManager", "--wait", "--timeout", "180s", timeout=240).stdout
    installed_seconds = time.time() - started
    pods = wait_for_ready_replicas(cluster)

    certificate = serving_certificate(cluster)
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in certificate["status"]["conditions"]), certificate["status"]
    secret = cluster.get_json("secret", f"{node.FULLNAME}-tls", "-n", WEBHOOK_NS)
    assert secret["metadata"]["annotations"]["cert-manager.io/certificate-name"] == f"{node.FULLNAME}-serving"
    mwc = cluster.get_json("mutatingwebhookconfiguration", node.FULLNAME)
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{WEBHOOK_NS}/{node.FULLNAME}-serving"
    bundles = {h["clientConfig"].get("caBundle", "") for h in mwc["webhooks"]}
    assert bundles == {secret["data"]["ca.crt"]}, "the CA injector did not write the CA into every webhook"
    ca = cluster.tmp / "cm-ca.crt"
    ca.write_bytes(base64.b64decode(secret["data"]["ca.crt"]))
    verified = run(["openssl", "verify", "-CAfile", ca], input=certificate_pem(cluster).decode(), check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    serial = secret_serial(cluster)
    served = {serving_serial(p["status"]["podIP"]) for p in pods}
    assert served == {serial}, (served, serial)

    ns = "cm-creates"
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    for i in range(5):
        vm = o.vm(ns, f"vm-{i}", None, i, labels={RESTORE_LABEL: "cluster-cert-manager"})
        out = cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(vm)).stdout
        assert "instanceUUID" not in json.loads(out)["spec"], "the webhook did not clean it"
    tested = cluster.helm("test", node.RELEASE, "-n", WEBHOOK_NS, check=False, timeout=180)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    issuer = run(["openssl", "x509", "-noout", "-issuer"], input=certificate_pem(cluster).decode()).stdout.strip()
    report("cert_manager", {**timings, "chart_install_seconds": round(installed_seconds, 1), "serial": serial,
                            "issuer": issuer, "served_by_each_pod": True, "ca_injected": True,
                            "labelled_dry_run_creates_cleaned": 5, "helm_test": "passed"})


def test_cluster_cert_manager_renewal_under_load(cluster):
    """cert-manager re-issues the serving certificate while labelled creates
    run (10 a second): what `cmctl renew` does, the Certificate's Issuing
    condition set True. The Secret gets a new certificate from the same CA
    (the caBundle does not change), each pod serves it without a restart,
    and no create fails."""
    pods = wait_for_ready_replicas(cluster)
    restarts = {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"] for p in pods}
    old, revision = secret_serial(cluster), serving_certificate(cluster)["status"].get("revision", 0)
    bundle = cluster.get_json("mutatingwebhookconfiguration", node.FULLNAME)["webhooks"][0]["clientConfig"]["caBundle"]
    assert {serving_serial(p["status"]["podIP"]) for p in pods} == {old}
    with Load(cluster, "load-cm-renewal") as load:
        time.sleep(3)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        issuing = {"type": "Issuing", "status": "True", "reason": "ManuallyTriggered",
                   "message": "Certificate re-issuance manually triggered", "lastTransitionTime": now,
                   "observedGeneration": serving_certificate(cluster)["metadata"]["generation"]}
        cluster.kubectl("patch", "certificate", f"{node.FULLNAME}-serving", "-n", WEBHOOK_NS, "--subresource=status",
                        "--type=json", "-p", json.dumps([{"op": "add", "path": "/status/conditions/-", "value": issuing}]))
        triggered = time.time()
        wait_until(lambda: serving_certificate(cluster)["status"].get("revision", 0) > revision and secret_serial(cluster) != old,
                   120, "cert-manager to re-issue the serving certificate", interval=1)
        new = secret_serial(cluster)
        issued_seconds = time.time() - triggered
        wait_until(lambda: {serving_serial(p["status"]["podIP"]) for p in pods} == {new}, 180,
                   "each pod to serve the re-issued certificate", interval=2)
        served_seconds = time.time() - triggered
        time.sleep(3)
    summary = load.summary()
    now_restarts = {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"] for p in cluster.webhook_pods()}
    certificate = serving_certificate(cluster)
    report("cert_manager_renewal", {**summary, "old_serial": old, "new_serial": new,
                                    "revision": [revision, certificate["status"].get("revision")],
                                    "seconds_until_issued": round(issued_seconds, 1),
                                    "seconds_until_both_pods_served_it": round(served_seconds, 1)})
    assert new != old
    assert now_restarts == restarts, "the pods were restarted, not reloaded"
    assert summary["sent"] > 50, summary
    assert summary["failed"] == 0, summary
    assert summary["uncleaned"] == 0, summary
    assert cluster.get_json("mutatingwebhookconfiguration", node.FULLNAME)["webhooks"][0]["clientConfig"]["caBundle"] == bundle, \
        "the renewal changed the CA"
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in certificate["status"]["conditions"])
