"""The one-node cluster mode: the control plane of harness.Cluster, plus
containerd, runc and the CNI bridge (Debian), kubelet, kube-scheduler and
kube-proxy (built from the Go module proxy at kube-apiserver's version), and
the images written by images.py. Velero is installed with `velero install`,
the webhook with `helm install`: both run as pods.

Everything a run makes is recorded and removed at the end, so a second run
on the same machine starts clean: each process by its PID, every container
and shim, the pod network namespaces, the CNI bridge, the iptables rules
(restored from a snapshot taken before), the kubepods cgroups and the mounts
under the run's directory. `leftovers()` lists what would be left; the tests
assert it is empty after a run (test_cluster.py) and the harness refuses to
start on top of one.

NetworkPolicy is enforced by kube-router's network policy controller
(iptables and ipset, built from the Go module proxy), run as a host process
beside kubelet: its dataplane is the host's iptables and ipset programs,
which a scratch image written by images.py cannot carry.

Stand-ins: vCenter and VM Operator's vSphere side, as in harness.py; the
distroless base of the webhook image (images.py).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import yaml

import images
from harness import REPO, VELERO_NS, VELERO_VERSION, WEBHOOK_NS, Cluster, Openssl, free_port, kubeconfig, log, run, wait_until

NODE = "e2e-node"
BRIDGE = "vmrwe2e0"
POD_CIDR = "10.244.7.0/24"
SERVICE_CIDR = "10.96.0.0/24"
CNI_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
WEBHOOK_IMAGE = "e2e.local/velero-vm-restore-webhook:e2e"
# The Velero under test (VELERO_VERSION), as `velero install --image` names it.
VELERO_IMAGE = f"e2e.local/velero:v{VELERO_VERSION}"
PLUGIN_IMAGE = "e2e.local/velero-plugin-for-aws:e2e"
PAUSE_IMAGE = "e2e.local/pause:e2e"
PROBE_IMAGE = "e2e.local/probe:e2e"
CERT_MANAGER_MODULE = "github.com/cert-manager/cert-manager@v1.21.2"
CERT_MANAGER_NS = "cert-manager"
CERT_MANAGER_IMAGES = {part: f"e2e.local/cert-manager-{part}:e2e" for part in ("controller", "webhook", "cainjector")}
IPTABLES = ("iptables", "ip6tables")
IPTABLES_TABLES = ("filter", "nat", "mangle", "raw")
RELEASE = "vmrw"
FULLNAME = "vmrw-velero-vm-restore-webhook"
DEBIAN_PACKAGES = {"containerd": "containerd", "runc": "runc", "iptables": "iptables", "ip": "iproute2", "ipset": "ipset"}
# kube-router's ipsets (its network policy controller's names).
IPSET_PREFIXES = ("KUBE-", "kube-router-", "inet6:KUBE-", "inet6:kube-router-")


def host_ip() -> str:
    """The address pods reach the host (API server, S3) at: the source of the default route."""
    out = run(["ip", "-4", "route", "get", "1.1.1.1"]).stdout
    return re.search(r"\bsrc (\S+)", out).group(1)


def cni_bin_dir() -> str:
    for directory in CNI_DIRS:
        if Path(directory, "bridge").exists():
            return directory
    raise RuntimeError("the CNI plugins are missing (Debian: containernetworking-plugins)")


def ensure_packages() -> None:
    """containerd, runc, the CNI plugins and iptables from Debian, when missing."""
    missing = [pkg for cmd, pkg in DEBIAN_PACKAGES.items() if shutil.which(cmd) is None]
    if not any(Path(d, "bridge").exists() for d in CNI_DIRS):
        missing.append("containernetworking-plugins")
    if missing:
        log(f"installing {' '.join(missing)} from Debian")
        run(["apt-get", "update", "-qq"], timeout=600)
        run(["apt-get", "install", "-y", "-qq", *missing], timeout=900,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


# -- what a run leaves behind ------------------------------------------------------
def _netns() -> set[str]:
    try:
        return {n for n in os.listdir("/var/run/netns")}
    except FileNotFoundError:
        return set()


def _kubepods_cgroups() -> list[Path]:
    return sorted(p for p in Path("/sys/fs/cgroup").glob("*/kubepods*") if p.is_dir())


def _our_processes() -> list[int]:
    """PIDs of any kubelet, containerd, shim or kube-proxy this mode started
    (their command lines name the run's directory prefix or our socket)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "vmrw-node-" in cmdline and any(t in cmdline for t in ("kubelet", "containerd", "kube-proxy", "kube-scheduler",
                                                                    "kube-router")):
            pids.append(int(proc.name))
    return pids


def leftovers() -> list[str]:
    """What a run of this mode would leave on the machine; empty when clean."""
    found = []
    if run(["ip", "link", "show", BRIDGE], check=False).returncode == 0:
        found.append(f"bridge {BRIDGE}")
    found += [f"netns {n}" for n in sorted(_netns()) if n.startswith("cni-")]
    found += [f"cgroup {p}" for p in _kubepods_cgroups()]
    found += [f"process {pid}" for pid in _our_processes()]
    for tool in IPTABLES:
        if shutil.which(tool):
            rules = run([f"{tool}-save"], check=False).stdout
            chains = sorted({m for m in re.findall(r"^:((?:KUBE|CNI)-\S+)", rules, re.M)})
            found += [f"{tool} chain {c}" for c in chains]
    found += [f"mount {m}" for m in _mounts_under("/tmp/vmrw-node-")]
    found += [f"ipset {name}" for name in _our_ipsets()]
    return found


def _our_ipsets() -> list[str]:
    if shutil.which("ipset") is None:
        return []
    names = run(["ipset", "list", "-n"], check=False).stdout.split()
    return sorted(n for n in names if n.startswith(IPSET_PREFIXES))


def _mounts_under(prefix: str) -> list[str]:
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target.startswith(prefix) or (prefix == "/tmp/vmrw-node-" and target.startswith("/run/containerd/io.containerd")):
            mounts.append(target)
    return mounts


class NodeCluster(Cluster):
    """A one-node cluster. Use as a context manager."""

    def __init__(self, chart_values: tuple = ()):
        """`chart_values`: extra `helm install` arguments (the benchmark's no-op route)."""
        self.chart_values = list(chart_values)
        ensure_packages()
        stale = leftovers()
        if stale:
            raise RuntimeError("a previous cluster-mode run left these behind (remove them first):\n  " + "\n  ".join(stale))
        super().__init__()
        # The run directory's name is what leftovers() and _our_processes() look for.
        fresh = Path(f"/tmp/vmrw-node-{os.getpid()}-{int(time.time())}")
        self.tmp.rename(fresh)
        self.tmp = fresh
        # This run's tool links (harness.tools_dir) moved with the directory.
        self.bin = fresh / "bin"
        self.kubectl_bin = self.bin / "kubectl"
        self.velero_bin = self.bin / self.velero_bin.name
        self.host_ip = host_ip()
        self.cni_bin = cni_bin_dir()
        self.netns_before = _netns()
        self.run_containerd_existed = Path("/run/containerd").exists()
        self.var_lib_cni_existed = Path("/var/lib/cni").exists()
        self.iptables_before = {tool: run([f"{tool}-save"], check=False).stdout for tool in IPTABLES if shutil.which(tool)}
        self.sysctls_before = {}

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        started = time.time()
        self.set_sysctl("net/ipv4/ip_forward", "1")
        self.set_sysctl("net/bridge/bridge-nf-call-iptables", "1")
        self.start_cluster_control_plane()
        self.start_containerd()
        self.import_images()
        self.start_kubelet()
        self.start_kube_proxy()
        self.start_network_policy_enforcer()
        self.start_object_store_for_pods()
        self.install_crds()
        self.velero_install()
        self.helm_install(*self.chart_values)
        log(f"one-node cluster ready in {time.time() - started:.1f}s (temp dir {self.tmp})")

    def set_sysctl(self, key: str, value: str) -> None:
        path = Path("/proc/sys") / key
        self.sysctls_before[key] = path.read_text().strip()
        path.write_text(value)

    def close(self) -> None:
        if self.closed:
            return
        # Pods first: kubelet's containers outlive kubelet and containerd (their shims are their own sessions).
        for name in ("kube-router", "kube-proxy", "kubelet"):
            if name in self.processes:
                self.processes.pop(name).stop()
        if "containerd" in self.processes and self.processes["containerd"].alive():
            self.remove_all_containers()
        for process in reversed(list(self.processes.values())):
            process.stop()
        self.processes.clear()
        self.clean_host()
        super().close()

    def remove_all_containers(self) -> None:
        ctr = ["ctr", "--address", str(self.containerd_sock), "-n", "k8s.io"]
        tasks = run([*ctr, "tasks", "ls", "-q"], check=False).stdout.split()
        for task in tasks:
            run([*ctr, "tasks", "kill", "-s", "SIGKILL", task], check=False)
        deadline = time.time() + 20
        for task in tasks:
            while time.time() < deadline and run([*ctr, "tasks", "delete", task], check=False).returncode != 0:
                time.sleep(0.2)
        for container in run([*ctr, "containers", "ls", "-q"], check=False).stdout.split():
            run([*ctr, "containers", "rm", container], check=False)

    def clean_host(self) -> None:
        for pid in _our_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        for name in sorted(_netns() - self.netns_before):
            run(["ip", "netns", "delete", name], check=False)
        run(["ip", "link", "delete", BRIDGE], check=False)
        for link in run(["ip", "-o", "link", "show", "master", BRIDGE], check=False).stdout.splitlines():
            run(["ip", "link", "delete", link.split(":")[1].strip().split("@")[0]], check=False)
        for tool, saved in self.iptables_before.items():
            self.restore_iptables(tool, saved)
        # After the rules that referenced them are gone.
        for name in _our_ipsets():
            run(["ipset", "destroy", name], check=False)
        for target in sorted(_mounts_under(str(self.tmp)), key=len, reverse=True):
            run(["umount", "-l", target], check=False)
        for cgroup in sorted(_kubepods_cgroups()):
            for directory in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [cgroup]:
                try:
                    directory.rmdir()
                except OSError:
                    pass
        if not self.run_containerd_existed:
            for target in sorted(_mounts_under("/run/containerd"), key=len, reverse=True):
                run(["umount", "-l", target], check=False)
            shutil.rmtree("/run/containerd", ignore_errors=True)
        if not self.var_lib_cni_existed:
            shutil.rmtree("/var/lib/cni", ignore_errors=True)
        for key, value in self.sysctls_before.items():
            try:
                (Path("/proc/sys") / key).write_text(value)
            except OSError:
                pass

    @staticmethod
    def restore_iptables(tool: str, saved: str) -> None:
        """Puts each table back as it was: tables the snapshot lacks are
        emptied of what kube-proxy and CNI added."""
        present = set(re.findall(r"^\*(\S+)", saved, re.M))
        text = saved
        for table in IPTABLES_TABLES:
            if table not in present:
                current = run([f"{tool}-save", "-t", table], check=False).stdout
                if not current.strip():
                    continue
                builtins = re.findall(r"^:([A-Z]+) ", current, re.M)
                text += f"*{table}\n" + "".join(f":{c} ACCEPT [0:0]\n" for c in builtins) + "COMMIT\n"
        if text.strip():
            run([f"{tool}-restore"], input=text, check=False)

    # -- control plane ----------------------------------------------------------------
    def start_cluster_control_plane(self) -> None:
        """As harness.Cluster's, with what pods and kubelet need: the API server
        on the host's address (pods reach it through the kubernetes Service),
        its certificate naming that Service's IP, Node authorization, the
        scheduler, and the controllers a Deployment, a drain and Velero use."""
        pki = self.tmp / "pki"
        run([REPO / "certs" / "gen-certs.sh", "--out", pki / "apiserver", "--service", "kubernetes", "--namespace", "default",
             "--days", "2", "--ip", "10.96.0.1", "--ip", self.host_ip])
        self.server_ca = pki / "apiserver" / "ca.crt"
        self.clients = Openssl(pki / "clients")
        run(["openssl", "genrsa", "-out", pki / "sa.key", "2048"])
        run(["openssl", "rsa", "-in", pki / "sa.key", "-pubout", "-out", pki / "sa.pub"])
        etcd_port, peer_port = free_port(), free_port()
        self.spawn("etcd", [self.bin / "etcd", "--name", "e2e", "--data-dir", self.tmp / "etcd",
                            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                            "--initial-cluster", f"e2e=http://127.0.0.1:{peer_port}",
                            "--unsafe-no-fsync", "--log-level", "warn"])
        self.api_port = free_port()
        self.api_host = self.host_ip
        self.server = f"https://{self.host_ip}:{self.api_port}"
        kubelet_client_crt, kubelet_client_key = self.clients.client("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                                                                      "system:masters")
        self.spawn("kube-apiserver", [
            self.bin / "kube-apiserver", f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--bind-address={self.host_ip}", f"--advertise-address={self.host_ip}", f"--secure-port={self.api_port}",
            f"--tls-cert-file={pki / 'apiserver' / 'tls.crt'}", f"--tls-private-key-file={pki / 'apiserver' / 'tls.key'}",
            f"--client-ca-file={self.clients.ca_crt}",
            f"--kubelet-client-certificate={kubelet_client_crt}", f"--kubelet-client-key={kubelet_client_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--authorization-mode=Node,RBAC",
            # Webhook Services resolve to their endpoints: the API server reaches the pods without kube-proxy.
            "--enable-aggregator-routing=true", "--kubelet-preferred-address-types=InternalIP",
            "--enable-priority-and-fairness=false", "--v=1"])
        admin_crt, admin_key = self.clients.client("admin", "e2e-admin", "system:masters")
        self.admin_kubeconfig = kubeconfig(self.tmp / "admin.kubeconfig", self.server, self.server_ca, admin_crt, admin_key)
        wait_until(lambda: self.kubectl("get", "--raw", "/readyz", check=False).returncode == 0, 90, "kube-apiserver readyz",
                   process=self.processes["kube-apiserver"])
        self.spawn("kube-controller-manager", [
            self.bin / "kube-controller-manager", f"--kubeconfig={self.admin_kubeconfig}",
            f"--authentication-kubeconfig={self.admin_kubeconfig}", f"--authorization-kubeconfig={self.admin_kubeconfig}",
            "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller,-persistentvolume-expander",
            f"--root-ca-file={self.server_ca}", f"--service-account-private-key-file={pki / 'sa.key'}",
            "--use-service-account-credentials=false", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--v=1"])
        self.spawn("kube-scheduler", [
            self.bin / "kube-scheduler", f"--kubeconfig={self.admin_kubeconfig}",
            f"--authentication-kubeconfig={self.admin_kubeconfig}", f"--authorization-kubeconfig={self.admin_kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--v=1"])
        log(f"control plane up at {self.server}")

    # -- the node -------------------------------------------------------------------------
    def start_containerd(self) -> None:
        root = self.tmp / "containerd"
        (root / "net.d").mkdir(parents=True)
        self.containerd_sock = root / "containerd.sock"
        (root / "net.d" / "10-vmrw-e2e.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "vmrw-e2e",
            "plugins": [{"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": True, "hairpinMode": True,
                         "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                                  "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(root / "ipam")}},
                        {"type": "portmap", "capabilities": {"portMappings": True}}]}))
        config = f"""version = 2
root = "{root / 'root'}"
state = "{root / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{self.containerd_sock}"
[ttrpc]
  address = "{root / 'containerd.sock.ttrpc'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # The machine lacks CAP_SYS_RESOURCE: without this, runc fails to lower
  # oom_score_adj and every sandbox fails to start.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{self.cni_bin}"
    conf_dir = "{root / 'net.d'}"
"""
        (root / "config.toml").write_text(config)
        self.spawn("containerd", ["containerd", "--config", root / "config.toml", "--log-level", "warn"])
        wait_until(lambda: run(["ctr", "--address", self.containerd_sock, "version"], check=False).returncode == 0, 60,
                   "containerd", process=self.processes["containerd"])

    def import_images(self) -> None:
        out = self.tmp / "images"
        out.mkdir()
        self.webhook_image = images.webhook_image(REPO / "Dockerfile", REPO, self.webhook_bin, WEBHOOK_IMAGE)
        velero_user = "65532:65532"
        built = [
            self.webhook_image,
            images.single_binary_image(PAUSE_IMAGE, self.bin / "pause", "/pause", entrypoint=["/pause"], user="65535:65535"),
            images.single_binary_image(PROBE_IMAGE, self.bin / "probe", "/probe", entrypoint=["/probe"], user="65534:65534"),
            images.single_binary_image(VELERO_IMAGE, self.velero_bin, "/velero", entrypoint=["/velero"], user=velero_user),
            images.single_binary_image(PLUGIN_IMAGE, self.bin / "velero-plugin-for-aws", "/plugins/velero-plugin-for-aws",
                                       entrypoint=["cp", "/plugins/velero-plugin-for-aws", "/target/."], user="65532:65532",
                                       extra=[images.Entry("/bin", None), images.Entry("/bin/cp", (self.bin / "cp").read_bytes())]),
        ]
        for image in built:
            archive = images.write_oci_archive(image, out / (image.name.split("/")[-1].replace(":", "_") + ".tar"))
            run(["ctr", "--address", self.containerd_sock, "-n", "k8s.io", "images", "import", "--no-unpack", archive], timeout=300)
        log(f"imported {', '.join(i.name for i in built)}")

    def start_kubelet(self) -> None:
        root = self.tmp / "kubelet"
        root.mkdir()
        crt, key = self.clients.client("kubelet", f"system:node:{NODE}", "system:nodes")
        node_kubeconfig = kubeconfig(self.tmp / "kubelet.kubeconfig", self.server, self.server_ca, crt, key)
        self.kubelet_port = free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": self.host_ip, "port": self.kubelet_port, "readOnlyPort": 0, "healthzPort": 0,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.clients.ca_crt)}},
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
            # Without CAP_SYS_RESOURCE kubelet cannot lower its own score.
            "oomScoreAdj": 0,
            "containerRuntimeEndpoint": f"unix://{self.containerd_sock}",
            "imageServiceEndpoint": f"unix://{self.containerd_sock}",
            "clusterDomain": "cluster.local", "resolvConf": "/etc/resolv.conf",
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "syncFrequency": "10s", "nodeStatusUpdateFrequency": "5s", "serializeImagePulls": False,
            "localStorageCapacityIsolation": False, "protectKernelDefaults": False,
            "makeIPTablesUtilChains": False,
        }
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        self.spawn("kubelet", [self.bin / "kubelet", f"--config={root / 'config.yaml'}", f"--kubeconfig={node_kubeconfig}",
                               f"--root-dir={root / 'root'}", f"--cert-dir={root / 'pki'}", f"--hostname-override={NODE}",
                               f"--node-ip={self.host_ip}", "--v=1"])

        def ready():
            node = self.get_json("node", NODE)
            return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])

        wait_until(ready, 120, f"node {NODE} Ready", interval=1, process=self.processes["kubelet"])
        log(f"node {NODE} Ready (kubelet on {self.host_ip}:{self.kubelet_port})")

    def start_kube_proxy(self) -> None:
        root = self.tmp / "kube-proxy"
        root.mkdir()
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "iptables", "clusterCIDR": POD_CIDR, "hostnameOverride": NODE,
            "clientConnection": {"kubeconfig": str(self.admin_kubeconfig)},
            "bindAddress": "127.0.0.1", "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            # Leaves the machine's conntrack sysctls alone.
            "conntrack": {"maxPerCore": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        self.spawn("kube-proxy", [self.bin / "kube-proxy", f"--config={root / 'config.yaml'}", "--v=1"])

        def service_routed():
            return "KUBE-SVC-" in run(["iptables-save", "-t", "nat"], check=False).stdout

        wait_until(service_routed, 60, "kube-proxy's Service rules", interval=1, process=self.processes["kube-proxy"])

    def start_network_policy_enforcer(self) -> None:
        """kube-router's network policy controller only (no routing, no
        service proxy: the bridge and kube-proxy do those), as a host
        process beside kubelet. Its rules: the filter table's KUBE-ROUTER-*
        chains, a KUBE-POD-FW-* chain per pod a policy selects, KUBE-NWPLCY-*
        chains and KUBE-SRC-/KUBE-DST- ipsets; all removed by clean_host.
        It admits whatever the node itself sends to its pods (`-m addrtype
        --src-type LOCAL`: kubelet's probes), so the API server, a process on
        this host, is admitted by that rule, not by the chart's ipBlock."""
        self.spawn("kube-router", [self.bin / "kube-router", f"--kubeconfig={self.admin_kubeconfig}",
                                   "--run-firewall=true", "--run-router=false", "--run-service-proxy=false",
                                   "--enable-cni=false", f"--hostname-override={NODE}",
                                   f"--service-cluster-ip-range={SERVICE_CIDR}", "--health-port=0", "--v=1"])

        def chains_installed():
            return ":KUBE-ROUTER-FORWARD" in run(["iptables-save", "-t", "filter"], check=False).stdout

        wait_until(chains_installed, 60, "kube-router's network policy chains", interval=1, process=self.processes["kube-router"])
        log("NetworkPolicy enforced by kube-router's network policy controller")

    # -- cert-manager (the certManager scenarios) -------------------------------------
    def install_cert_manager(self) -> dict:
        """cert-manager v1.21.2 as its own Helm chart installs it (the chart
        in the module, CRDs included), with images of the controller, webhook
        and CA injector built from the module (tools/certmanager) in place of
        quay.io's. startupapicheck is off (no image of it); instead this
        waits, as it does, until a dry-run Certificate passes cert-manager's
        webhook, which needs the CA injector to have filled that webhook's
        caBundle. Returns timings."""
        started = time.time()
        out = self.tmp / "images"
        out.mkdir(exist_ok=True)
        for part, name in CERT_MANAGER_IMAGES.items():
            image = images.single_binary_image(name, self.bin / f"cert-manager-{part}", f"/cert-manager-{part}",
                                               entrypoint=[f"/cert-manager-{part}"], user="65532:65532")
            archive = images.write_oci_archive(image, out / f"cert-manager-{part}.tar")
            run(["ctr", "--address", self.containerd_sock, "-n", "k8s.io", "images", "import", "--no-unpack", archive], timeout=300)
        imported = time.time() - started
        module = json.loads(run(["go", "mod", "download", "-json", CERT_MANAGER_MODULE],
                                env={**os.environ, "GOFLAGS": "-mod=mod"}).stdout)["Dir"]
        chart = Path(module) / "deploy" / "charts" / "cert-manager"
        values = ["--set", "crds.enabled=true", "--set", "startupapicheck.enabled=false"]
        for part, name in CERT_MANAGER_IMAGES.items():
            repository, tag = name.rsplit(":", 1)
            prefix = "" if part == "controller" else f"{part}."
            values += ["--set", f"{prefix}image.repository={repository}", "--set", f"{prefix}image.tag={tag}"]
        self.helm("install", "cert-manager", chart, "--namespace", CERT_MANAGER_NS, "--create-namespace", *values,
                  "--wait", "--timeout", "180s", timeout=300)
        probe = {"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
                 "metadata": {"name": "startup-check", "namespace": CERT_MANAGER_NS},
                 "spec": {"secretName": "startup-check", "dnsNames": ["startup.check"],
                          "issuerRef": {"name": "startup-check", "kind": "Issuer"}}}
        last = {}

        def answered():
            result = self.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(probe), check=False)
            last["error"] = result.stderr.strip()
            return result.returncode == 0

        def logs():
            return {part: self.kubectl("logs", "-n", CERT_MANAGER_NS, "-l", f"app.kubernetes.io/component={part}",
                                       "--tail=15", check=False).stdout for part in ("controller", "webhook", "cainjector")}

        try:
            wait_until(answered, 90, "cert-manager's webhook to answer (its caBundle injected)", interval=2)
        except TimeoutError as err:
            # cert-manager's own start-up race (seen once in CI, 2026-12-08):
            # the API server kept distrusting the webhook's certificate for
            # 2 minutes ("signed by unknown authority"), as if cainjector had
            # injected a CA the webhook no longer serves. This is cert-manager
            # setting itself up, not the chart under test: its webhook and
            # cainjector start again once, and the wait starts over.
            log(f"{err}; last answer: {last.get('error')}; restarting cert-manager's webhook and cainjector once")
            first = logs()
            self.kubectl("delete", "pod", "-n", CERT_MANAGER_NS, "-l", "app.kubernetes.io/component in (webhook,cainjector)",
                         "--wait=true", "--timeout=120s", timeout=180)
            try:
                wait_until(answered, 120, "cert-manager's webhook to answer after a restart", interval=2)
            except TimeoutError as again:
                raise TimeoutError(f"{again}; last answer: {last.get('error')}; logs before the restart: "
                                   f"{json.dumps(first, indent=1)}; after: {json.dumps(logs(), indent=1)}") from None
        log(f"cert-manager installed from its chart in {time.time() - started:.1f}s (images {imported:.1f}s)")
        return {"images_seconds": round(imported, 1), "install_seconds": round(time.time() - started, 1)}

    # -- Velero and the chart, installed as an admin does ------------------------------
    def start_object_store_for_pods(self) -> None:
        self.s3_port = free_port()
        self.spawn("s3server", [self.bin / "s3server", "--listen", f"{self.host_ip}:{self.s3_port}", "--buckets", "velero",
                                 "--allow-non-loopback"])
        wait_until(lambda: socket.create_connection((self.host_ip, self.s3_port), timeout=1).close() is None, 30, "S3 server")

    def velero_install(self) -> None:
        credentials = self.tmp / "velero-credentials"
        credentials.write_text("[default]\naws_access_key_id = e2e\naws_secret_access_key = e2e-secret-key\n")
        self.velero_env = {**os.environ, "VELERO_NAMESPACE": VELERO_NS, "KUBECONFIG": str(self.admin_kubeconfig)}
        self.velero("install", "--provider", "aws", "--image", VELERO_IMAGE, "--plugins", PLUGIN_IMAGE,
                    "--bucket", "velero", "--secret-file", credentials, "--use-volume-snapshots=false",
                    "--backup-location-config",
                    f"region=us-east-1,s3ForcePathStyle=true,s3Url=http://{self.host_ip}:{self.s3_port},checksumAlgorithm=",
                    "--pod-annotations", "e2e=cluster-mode", "--wait", timeout=300)

        def available():
            bsl = self.get_json("backupstoragelocation", "default", "-n", VELERO_NS)
            return bsl.get("status", {}).get("phase") == "Available"

        wait_until(available, 180, "Velero's backup storage location to be Available", interval=2)
        log("Velero installed as a pod (velero install), backup storage location Available")

    def helm(self, *args, check=True, timeout=300) -> subprocess.CompletedProcess:
        return run([self.bin / "helm", "--kubeconfig", self.admin_kubeconfig, *args], check=check, timeout=timeout)

    def image_values(self) -> list[str]:
        registry, rest = WEBHOOK_IMAGE.split("/", 1)
        repository, tag = rest.split(":")
        return ["--set", f"image.registry={registry}", "--set", f"image.repository={repository}", "--set", f"image.tag={tag}"]

    def helm_install(self, *extra) -> None:
        """The chart with its default values, only the image changed."""
        self.install_output = self.helm("install", RELEASE, REPO / "charts" / "velero-vm-restore-webhook", "--namespace",
                                        WEBHOOK_NS, "--create-namespace", *self.image_values(), *extra, "--wait",
                                        "--timeout", "180s").stdout
        log("chart installed (helm install --wait)")

    def webhook_pods(self) -> list[dict]:
        """The Deployment's pods (not `helm test`'s, which shares their labels)."""
        pods = self.get_json("pods", "-n", WEBHOOK_NS, "-l", "app.kubernetes.io/name=velero-vm-restore-webhook")["items"]
        return [p for p in pods if any(o["kind"] == "ReplicaSet" for o in p["metadata"].get("ownerReferences", []))]

    def ca_bundle(self) -> bytes:
        mwc = self.get_json("mutatingwebhookconfiguration", FULLNAME)
        return base64.b64decode(mwc["webhooks"][0]["clientConfig"]["caBundle"])

    # -- what the pods say (test_restore.py's scenarios read these) ------------------------
    def webhook_log(self, name: str | None = None) -> list[dict]:
        """The JSON log lines of every webhook pod now running (or of the pod `name`)."""
        entries = []
        pods = [name] if name else [p["metadata"]["name"] for p in self.webhook_pods()]
        for pod in pods:
            for line in self.kubectl("logs", "-n", WEBHOOK_NS, pod, check=False).stdout.splitlines():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return entries

    def pod_metrics(self, pod: dict, timeout: float = 3) -> str:
        import urllib.request
        with urllib.request.urlopen(f"http://{pod['status']['podIP']}:9090/metrics", timeout=timeout) as response:
            return response.read().decode()

    def metrics(self) -> str:
        """Every counter and gauge summed over the running webhook pods, in the exposition format."""
        totals: dict[str, float] = {}
        for pod in self.webhook_pods():
            if not pod["status"].get("podIP"):
                continue
            for line in self.pod_metrics(pod).splitlines():
                if line.startswith("#") or " " not in line:
                    continue
                series, value = line.rsplit(" ", 1)
                try:
                    totals[series] = totals.get(series, 0) + float(value)
                except ValueError:
                    pass
        return "\n".join(f"{series} {int(v) if v == int(v) else v}" for series, v in totals.items()) + "\n"
