"""End-to-end harness: a real etcd, kube-apiserver and kube-controller-manager,
the real VM Operator CRDs, this repo's webhook binary registered through the
chart's rendered MutatingWebhookConfiguration, a real Velero server and CLI,
and an S3-compatible object store. Everything binds 127.0.0.1 on free ports,
lives in one temp dir, and is killed and removed on exit, failure or signal.

Stand-ins (what cannot run here): vCenter. VM Operator's own webhooks,
conversion and VirtualMachineGroup controller (with its fake VM provider) run
from its Go module once `start_vm_operator` is called (test_vmop.py); before
that, objects are only stored by the API server. With
`start_vm_operator(provider="vsphere")` its VirtualMachine controllers and real
vSphere provider run too, against vcsim, govmomi's vCenter simulator, as the
stand-in for vCenter (vcenter.py, test_vcenter.py).
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
E2E = REPO / "tests" / "e2e"
VMOP_MODULE = "github.com/vmware-tanzu/vm-operator@v1.10.0"
VELERO_NS = "velero"
VMOP_NS = "vmware-system-vmop"
WEBHOOK_NS = "vmrw-system"
RESTORE_LABEL = "velero.io/restore-name"
# The Velero server and CLI the run builds and runs (build-tools.sh picks the
# tools module that pins it): 1.18.3 by default, what CI runs; `make
# e2e-velero-matrix` runs selected scenarios on the older ones.
VELERO_VERSION = os.environ.get("VELERO_VERSION", "1.18.3").strip().removeprefix("v")


def velero_at_least(version: str) -> bool:
    """Whether the Velero under test is `version` (e.g. "1.16") or newer."""
    have = tuple(int(p) for p in VELERO_VERSION.split("."))
    want = tuple(int(p) for p in version.split("."))
    return have[:len(want)] >= want


def log(message: str) -> None:
    print(f"[e2e] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def p99(values) -> float:
    """The 99th percentile of latencies, as every benchmark here reports it."""
    return sorted(values)[max(0, int(len(values) * 0.99) - 1)]


def run(cmd, *, check=True, env=None, input=None, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, env=env, input=input, timeout=timeout
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def tools_dir(own: Path | None = None) -> Path:
    """Builds (or finds cached) test infrastructure; prints build times.
    With `own`, links this run's tools there (see build-tools.sh's
    E2E_BIN_DIR) instead of returning the shared directory, whose links
    another worktree's build may point elsewhere meanwhile."""
    env = {**os.environ, "VELERO_VERSION": VELERO_VERSION, **({"E2E_BIN_DIR": str(own)} if own else {})}
    result = subprocess.run(["bash", str(E2E / "scripts" / "build-tools.sh")], stdout=subprocess.PIPE, text=True,
                            timeout=3600, env=env)
    if result.returncode != 0:
        raise RuntimeError("building the e2e tools failed")
    return Path(result.stdout.strip().splitlines()[-1])


def webhook_binary() -> Path:
    explicit = os.environ.get("VMRW_E2E_BINARY")
    if explicit:
        return Path(explicit)
    result = subprocess.run([str(REPO / "scripts" / "build-static.sh")], stdout=subprocess.PIPE, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError("building the webhook failed")
    return Path(result.stdout.strip().splitlines()[-1])


def vmop_crd_dir() -> Path:
    return vmop_config_dir() / "crd" / "bases"


def vmop_config_dir() -> Path:
    """VM Operator's own `config/` (CRDs, webhook configurations), from the module."""
    result = run(["go", "mod", "download", "-json", VMOP_MODULE], env={**os.environ, "GOFLAGS": "-mod=mod"})
    return Path(json.loads(result.stdout)["Dir"]) / "config"


# The CRDs VM Operator serves conversion for on a Supervisor
# (config/crd/kustomization.yaml's webhook_in_* patches).
VMOP_CONVERTED = ["virtualmachines", "virtualmachineclasses", "virtualmachineimages", "clustervirtualmachineimages",
                  "virtualmachinepublishrequests", "virtualmachineservices", "virtualmachinesetresourcepolicies"]


class Openssl:
    """A client CA and certificates signed by it (the API server's client auth)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_key, self.ca_crt = self.dir / "client-ca.key", self.dir / "client-ca.crt"
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-days", "2", "-subj", "/CN=e2e-client-ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign", "-keyout", self.ca_key, "-out", self.ca_crt])

    def client(self, name: str, cn: str, org: "str | tuple[str, ...] | list[str] | None") -> tuple[Path, Path]:
        """A client certificate: the API server takes CN as the user name and
        each O as one of its groups (`org`, one or several)."""
        key, csr, crt = self.dir / f"{name}.key", self.dir / f"{name}.csr", self.dir / f"{name}.crt"
        orgs = [org] if isinstance(org, str) else list(org or ())
        subject = f"/CN={cn}" + "".join(f"/O={o}" for o in orgs)
        run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-subj", subject, "-keyout", key, "-out", csr])
        # Extensions make it an X.509 v3 certificate, which rustls requires.
        ext = self.dir / f"{name}.ext"
        ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")
        run(["openssl", "x509", "-req", "-in", csr, "-CA", self.ca_crt, "-CAkey", self.ca_key,
             "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", crt])
        return crt, key


class Process:
    def __init__(self, name: str, cmd: list, log_path: Path, env=None):
        self.name, self.cmd, self.log_path = name, [str(c) for c in cmd], log_path
        self.log_file = open(log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=15) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=5)
        self.log_file.close()

    def tail(self, lines=40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ProcessDied(Exception):
    pass


def wait_until(predicate, timeout: float, what: str, interval: float = 0.25, process: "Process | None" = None):
    deadline = time.time() + timeout
    last_error = None
    while time.time() < deadline:
        if process is not None and not process.alive():
            raise ProcessDied(f"{process.name} exited while waiting for {what}:\n{process.tail()}")
        try:
            value = predicate()
            if value:
                return value
        except Exception as err:  # noqa: BLE001 - retried until the deadline
            last_error = err
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f": {last_error}" if last_error else ""))


def kubeconfig(path: Path, server: str, ca: Path, crt: Path, key: Path) -> Path:
    b64 = lambda p: base64.b64encode(Path(p).read_bytes()).decode()  # noqa: E731
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "e2e",
        "clusters": [{"name": "e2e", "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": "u", "user": {"client-certificate-data": b64(crt), "client-key-data": b64(key)}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "u"}}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def velero_client_version(binary: Path) -> str:
    """The version the Velero binary reports (`velero version --client-only`),
    checked against VELERO_VERSION and printed once per environment."""
    out = run([binary, "version", "--client-only"], timeout=60).stdout
    found = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.strip().startswith("Version:")]
    if found != [f"v{VELERO_VERSION}"]:
        raise RuntimeError(f"{binary} reports {found or out!r}, not v{VELERO_VERSION} (VELERO_VERSION)")
    log(f"Velero {VELERO_VERSION} ({binary}, `velero version --client-only`: {found[0]})")
    return found[0]


# Velero's controller manager (every version, 1.15.2 to 1.18.3) serves its
# metrics on a fixed :8080; no flag changes it.
VELERO_MANAGER_PORT = 8080


def wait_for_velero_manager_port(timeout: float = 600) -> None:
    """Waits until :8080 is free: a Velero server started while another
    harness's (another worktree's run on this host) holds it exits at once
    (`listen tcp :8080: bind: address already in use`)."""
    def free() -> bool:
        # Velero listens on every address (`:8080`); a dual-stack bind on ::
        # sees an IPv4 holder too. Hosts without IPv6 fall back to 0.0.0.0.
        family, address = (socket.AF_INET6, "::") if socket.has_ipv6 else (socket.AF_INET, "0.0.0.0")
        try:
            probe = socket.socket(family)
        except OSError:
            family, address = socket.AF_INET, "0.0.0.0"
            probe = socket.socket(family)
        with probe:
            # As Go's listeners do: connections in TIME_WAIT do not count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, VELERO_MANAGER_PORT))
                return True
            except OSError:
                return False

    if not free():
        log(f"waiting for :{VELERO_MANAGER_PORT}, held by another run's Velero")
        wait_until(free, timeout, f":{VELERO_MANAGER_PORT} (another run's Velero) to be free", interval=2)


class Cluster:
    """The whole environment. Use as a context manager."""

    # Every environment not yet closed, in this process: one that starts
    # beside another pauses the other's Velero (its controller manager serves
    # metrics on a fixed :8080).
    live: list["Cluster"] = []

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="vmrw-e2e-"))
        self.processes: dict[str, Process] = {}
        self.bin = tools_dir(self.tmp / "bin")
        self.webhook_bin = webhook_binary()
        self.kubectl_bin = self.bin / "kubectl"
        self.velero_bin = self.bin / f"velero-{VELERO_VERSION}"
        self.velero_version = velero_client_version(self.velero_bin)
        self.closed = False
        Cluster.live.append(self)
        atexit.register(self.close)
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)

            def handler(signum, frame, previous=previous):
                self.close()
                if callable(previous):
                    previous(signum, frame)
                raise SystemExit(128 + signum)

            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    # -- lifecycle -----------------------------------------------------------
    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self in Cluster.live:
            Cluster.live.remove(self)
        for process in reversed(list(self.processes.values())):
            process.stop()
        if os.environ.get("VMRW_E2E_KEEP"):
            log(f"keeping {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def spawn(self, name: str, cmd: list, env=None) -> Process:
        process = Process(name, cmd, self.tmp / f"{name}.log", env=env)
        self.processes[name] = process
        return process

    def start(self) -> None:
        started = time.time()
        self.start_with_webhook()
        self.start_object_store()
        self.start_velero()
        log(f"environment ready in {time.time() - started:.1f}s (temp dir {self.tmp})")

    def start_with_webhook(self) -> dict:
        """The control plane, the CRDs and our webhook registered (no object
        store, no Velero: what the benchmarks need). Returns the webhook
        configuration as registered."""
        self.start_control_plane()
        self.install_crds()
        self.start_webhook()
        return self.register_webhook()

    # -- control plane ---------------------------------------------------------
    def start_control_plane(self) -> None:
        pki = self.tmp / "pki"
        run([REPO / "certs" / "gen-certs.sh", "--out", pki / "apiserver", "--service", "kubernetes", "--namespace", "default", "--days", "2"])
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
        self.api_host = "127.0.0.1"
        self.server = f"https://127.0.0.1:{self.api_port}"
        admission_config = self.webhook_client_config(pki)
        self.spawn("kube-apiserver", [
            self.bin / "kube-apiserver", f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--admission-control-config-file={admission_config}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.api_port}",
            f"--tls-cert-file={pki / 'apiserver' / 'tls.crt'}", f"--tls-private-key-file={pki / 'apiserver' / 'tls.key'}",
            f"--client-ca-file={self.clients.ca_crt}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-cluster-ip-range=10.96.0.0/24", "--authorization-mode=RBAC",
            "--enable-priority-and-fairness=false", "--v=1"])
        admin_crt, admin_key = self.clients.client("admin", "e2e-admin", "system:masters")
        self.admin_kubeconfig = kubeconfig(self.tmp / "admin.kubeconfig", self.server, self.server_ca, admin_crt, admin_key)
        wait_until(lambda: self.kubectl("get", "--raw", "/readyz", check=False).returncode == 0, 90, "kube-apiserver readyz",
                   process=self.processes["kube-apiserver"])
        self.spawn("kube-controller-manager", [
            self.bin / "kube-controller-manager", f"--kubeconfig={self.admin_kubeconfig}",
            f"--authentication-kubeconfig={self.admin_kubeconfig}", f"--authorization-kubeconfig={self.admin_kubeconfig}",
            "--controllers=namespace,garbagecollector,pvc-protection", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--v=1"])
        log(f"control plane up at {self.server}")

    def webhook_client_config(self, pki: Path) -> Path:
        """An AdmissionConfiguration that has the API server present a client
        certificate to every admission webhook (kubeconfig user "*"), signed
        by a CA of its own: what an admin configures for the webhook's
        webhook.clientAuth. Webhooks that ask for none ignore it."""
        self.webhook_clients = Openssl(pki / "webhook-clients")
        crt, key = self.webhook_clients.client("apiserver-webhook-client", "kube-apiserver", None)
        users = pki / "webhook-clients.kubeconfig"
        users.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "users": [
            {"name": "*", "user": {"client-certificate": str(crt), "client-key": str(key)}}]}))
        plugin = {"apiVersion": "apiserver.config.k8s.io/v1", "kind": "WebhookAdmissionConfiguration",
                  "kubeConfigFile": str(users)}
        config = pki / "admission.yaml"
        config.write_text(yaml.safe_dump({"apiVersion": "apiserver.config.k8s.io/v1", "kind": "AdmissionConfiguration",
                                          "plugins": [{"name": name, "configuration": plugin}
                                                      for name in ("MutatingAdmissionWebhook", "ValidatingAdmissionWebhook")]}))
        return config

    def kubectl(self, *args, check=True, input=None, kubeconfig_path=None, timeout=120) -> subprocess.CompletedProcess:
        return run([self.kubectl_bin, f"--kubeconfig={kubeconfig_path or self.admin_kubeconfig}", *args],
                   check=check, input=input, timeout=timeout)

    def apply(self, objects, *, check=True) -> subprocess.CompletedProcess:
        docs = objects if isinstance(objects, list) else [objects]
        return self.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs), check=check)

    def create(self, obj, *, check=True) -> subprocess.CompletedProcess:
        return self.kubectl("create", "-f", "-", input=json.dumps(obj), check=check)

    def get_json(self, *args):
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def install_crds(self) -> None:
        crds = vmop_crd_dir()
        for name in ["virtualmachines", "virtualmachinegroups", "virtualmachinesetresourcepolicies",
                     "virtualmachinesnapshots", "virtualmachinepublishrequests", "virtualmachineclassinstances",
                     "virtualmachineimages", "clustervirtualmachineimages", "virtualmachineclasses",
                     "virtualmachinegrouppublishrequests", "virtualmachinewebconsolerequests", "webconsolerequests"]:
            self.kubectl("apply", "--server-side", "-f", crds / f"vmoperator.vmware.com_{name}.yaml")
        # The CSI driver's, as VM Operator's module carries it.
        self.kubectl("apply", "--server-side", "-f", crds.parent / "external-crds" / "cns.vmware.com_cnsregistervolumes.yaml")
        velero_crds = run([self.velero_bin, "install", "--crds-only", "--dry-run", "-o", "yaml"]).stdout
        self.kubectl("apply", "--server-side", "-f", "-", input=velero_crds)
        for crd in ["virtualmachines.vmoperator.vmware.com", "virtualmachinegroups.vmoperator.vmware.com",
                    "virtualmachinesetresourcepolicies.vmoperator.vmware.com", "virtualmachinesnapshots.vmoperator.vmware.com",
                    "virtualmachinepublishrequests.vmoperator.vmware.com", "virtualmachineclassinstances.vmoperator.vmware.com",
                    "virtualmachineimages.vmoperator.vmware.com", "clustervirtualmachineimages.vmoperator.vmware.com",
                    "virtualmachineclasses.vmoperator.vmware.com", "restores.velero.io", "backups.velero.io",
                    "virtualmachinegrouppublishrequests.vmoperator.vmware.com",
                    "virtualmachinewebconsolerequests.vmoperator.vmware.com", "webconsolerequests.vmoperator.vmware.com",
                    "cnsregistervolumes.cns.vmware.com"]:
            self.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        log(f"CRDs installed from {crds}")

    # -- the webhook -------------------------------------------------------------
    def render_chart(self, *extra_args) -> list[dict]:
        rendered = run([self.bin / "helm", "template", "vmrw", REPO / "charts" / "velero-vm-restore-webhook",
                        "--namespace", WEBHOOK_NS, "--skip-tests", "--set", "certificates.mode=provided",
                        "--set", "certificates.provided.secretName=vmrw-tls",
                        "--set", f"certificates.provided.caBundle={base64.b64encode(self.webhook_ca.read_bytes()).decode()}",
                        "--set", f"server.veleroNamespace={VELERO_NS}", *extra_args]).stdout
        return [d for d in yaml.safe_load_all(rendered) if d]

    def start_webhook(self, group_wait="6s", extra=()) -> None:
        if not hasattr(self, "webhook_certs"):
            self.webhook_certs = self.tmp / "webhook-certs"
            run([REPO / "certs" / "gen-certs.sh", "--out", self.webhook_certs, "--namespace", WEBHOOK_NS, "--days", "2"])
            self.webhook_ca = self.webhook_certs / "ca.crt"
            crt, key = self.clients.client("webhook", f"system:serviceaccount:{WEBHOOK_NS}:vmrw-velero-vm-restore-webhook",
                                           "system:serviceaccounts")
            self.webhook_kubeconfig = kubeconfig(self.tmp / "webhook.kubeconfig", self.server, self.server_ca, crt, key)
            self.webhook_port, self.webhook_metrics_port = free_port(), free_port()
        env = {**os.environ, "KUBECONFIG": str(self.webhook_kubeconfig), "HOSTNAME": "webhook"}
        self.spawn("webhook", [self.webhook_bin, "--log-format", "json", "serve",
                               "--tls-cert-file", self.webhook_certs / "tls.crt", "--tls-key-file", self.webhook_certs / "tls.key",
                               "--listen", f"127.0.0.1:{self.webhook_port}", "--metrics-listen", f"127.0.0.1:{self.webhook_metrics_port}",
                               "--velero-namespace", VELERO_NS, "--group-wait-timeout", group_wait, *extra], env=env)

    def start_replica(self, name: str, kubeconfig_path: Path | None = None, ports: dict | None = None) -> int:
        """A second webhook process, as a second pod would run: its own ports,
        the same identity and settings (or the identity of `kubeconfig_path`).
        Returns its metrics port; `ports`, if given, gets both ("port",
        "metrics")."""
        port, metrics_port = free_port(), free_port()
        if ports is not None:
            ports.update(port=port, metrics=metrics_port)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig_path or self.webhook_kubeconfig), "HOSTNAME": name}
        self.spawn(name, [self.webhook_bin, "--log-format", "json", "serve",
                          "--tls-cert-file", self.webhook_certs / "tls.crt", "--tls-key-file", self.webhook_certs / "tls.key",
                          "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
                          "--velero-namespace", VELERO_NS], env=env)
        return metrics_port

    def webhook_ready(self) -> bool:
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.webhook_metrics_port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.webhook_metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def register_webhook(self, failure_policy: str = "Fail") -> dict:
        """Applies the chart's RBAC and MutatingWebhookConfiguration, with only
        clientConfig swapped for a URL on loopback and our caBundle."""
        for ns in (WEBHOOK_NS, VELERO_NS):
            self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        docs = self.render_chart("--set", f"webhook.failurePolicy={failure_policy}")
        rbac = [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount")]
        self.apply(rbac)
        (mwc,) = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
        for hook in mwc["webhooks"]:
            ca_bundle = hook["clientConfig"]["caBundle"]
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{self.webhook_port}/mutate", "caBundle": ca_bundle}
        self.mwc = mwc
        wait_until(self.webhook_ready, 60, "webhook /readyz (caches synced with the chart's RBAC)",
                   process=self.processes["webhook"])
        self.apply(mwc)
        log(f"webhook registered as {mwc['metadata']['name']} (failurePolicy {failure_policy})")
        return mwc

    def restart_webhook(self, **kwargs) -> None:
        self.processes.pop("webhook").stop()
        self.start_webhook(**kwargs)
        wait_until(self.webhook_ready, 60, "webhook /readyz after restart")

    def webhook_log(self, name: str = "webhook") -> list[dict]:
        entries = []
        for line in (self.tmp / f"{name}.log").read_text(errors="replace").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return entries

    # -- VM Operator's own admission code -----------------------------------------
    def start_vm_operator(self, group_controller: bool = True, provider: str = "fake", privileged_users: str = "") -> None:
        """VM Operator v1.10.0's VirtualMachine and VirtualMachineGroup webhooks,
        its conversion webhook, (optionally) its group controller and, with
        Bring Your Own Key on, its StorageClass controller, built from the
        module (tools/vmop), registered as on a Supervisor: its own webhook
        configurations under their real names, and `conversion: Webhook` on
        the CRDs it converts. With provider "fake": VM Operator's fake VM
        provider (no vCenter), and whoever sets a StoragePolicy's
        status.encrypted plays vCenter's part. With provider "vsphere": its
        VirtualMachine controllers and real vSphere provider too, against the
        vCenter its provider ConfigMap names (vcsim, see vcenter.py);
        `privileged_users` is VM Operator's PRIVILEGED_USERS."""
        config = vmop_config_dir()
        crds = sorted((config / "crd" / "bases").glob("*.yaml")) + sorted((config / "crd" / "external-crds").glob("*.yaml"))
        # NSX Operator's SubnetSet and Subnet, generated from its API types
        # (build-tools.sh): the network kinds of a VPC Supervisor.
        crds += [self.bin / "nsx-crds" / f"crd.nsx.vmware.com_{name}.yaml" for name in ("subnetsets", "subnets")]
        for path in crds:
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", path)
        self.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        certs = self.tmp / "vmop-certs"
        run([REPO / "certs" / "gen-certs.sh", "--out", certs, "--namespace", "vmware-system-vmop",
             "--service", "vmware-system-vmop-webhook-service", "--days", "2"])
        self.vmop_port = free_port()
        # VM Operator's own namespace: its StorageClass controller records
        # each storage policy there, and its vSphere provider reads its
        # ConfigMap and credentials there.
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": VMOP_NS}})
        if provider == "vsphere":
            # As on a Supervisor with vSphere networking by name (VM Operator's
            # NAMED provider: a port group found by its name), namespaces'
            # folders and pools read from their Zone objects, and VM
            # Operator's own Deployment's 20 reconciles per controller. One
            # difference: every object is reconciled again every 3 s (30 min
            # on a Supervisor). After a step that changes only its backup in
            # ExtraConfig, which its vm-watcher ignores, VM Operator waits for
            # the next event; vcsim sends none, so without this a VM stops
            # short of powering on (see docs/testing.md). Log level 4 keeps
            # its "Found VM via MoID / instance UUID" lines.
            self.vmop_args = ["--provider", "vsphere", "--network-provider", "NAMED", "--workload-domain-isolation",
                              "--max-concurrent-reconciles", "20", "--sync-period", "3s", "--zap-log-level", "4"]
        else:
            self.vmop_args = ["--byok"]
        self.vmop_args += [f"--group-controller={'true' if group_controller else 'false'}"]
        self.vmop_certs = certs
        self.spawn_vm_operator(privileged_users)
        ca = base64.b64encode((certs / "ca.crt").read_bytes()).decode()
        self.vmop_configs = []
        for doc in yaml.safe_load_all((config / "webhook" / "manifests.yaml").read_text()):
            if not doc or doc.get("kind") not in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
                continue
            hooks = [h for h in doc["webhooks"]
                     if any(r in ("virtualmachines", "virtualmachinegroups") for rule in h["rules"] for r in rule["resources"])]
            for hook in hooks:
                path = hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {"url": f"https://127.0.0.1:{self.vmop_port}{path}", "caBundle": ca}
            doc["webhooks"] = hooks
            doc["metadata"] = {"name": "vmware-system-vmop-" + doc["metadata"]["name"]}
            self.vmop_configs.append(doc)
        self.apply(self.vmop_configs)
        for crd in VMOP_CONVERTED:
            patch = {"spec": {"conversion": {"strategy": "Webhook", "webhook": {
                "clientConfig": {"url": f"https://127.0.0.1:{self.vmop_port}/convert", "caBundle": ca},
                "conversionReviewVersions": ["v1", "v1beta1"]}}}}
            self.kubectl("patch", "crd", f"{crd}.vmoperator.vmware.com", "--type", "merge", "-p", json.dumps(patch))
        time.sleep(2)  # the API server's webhook informers pick the configurations up
        log(f"VM Operator's webhooks registered ({', '.join(d['metadata']['name'] for d in self.vmop_configs)})")

    def spawn_vm_operator(self, privileged_users: str = "") -> None:
        """Starts VM Operator's process (tools/vmop's vmop-host) on the port
        its webhook configurations name."""
        self.spawn("vmop-host", [self.bin / "vmop-host", "--cert-dir", self.vmop_certs, "--port", str(self.vmop_port),
                                 "--health-addr", f"127.0.0.1:{free_port()}", *self.vmop_args,
                                 f"--privileged-users={privileged_users}"],
                   env={**os.environ, "KUBECONFIG": str(self.admin_kubeconfig)})
        wait_until(lambda: socket.create_connection(("127.0.0.1", self.vmop_port), timeout=1).close() is None, 60,
                   "VM Operator's webhook server", process=self.processes["vmop-host"])

    def restart_vm_operator(self, privileged_users: str = "") -> None:
        """VM Operator restarted with another PRIVILEGED_USERS (it reads its
        configuration once, at start, as from its Deployment's environment)."""
        self.processes.pop("vmop-host").stop()
        self.spawn_vm_operator(privileged_users)
        time.sleep(2)  # its webhooks' caches

    # -- object store and Velero ---------------------------------------------------
    def start_object_store(self) -> None:
        self.s3_port = free_port()
        self.spawn("s3server", [self.bin / "s3server", "--listen", f"127.0.0.1:{self.s3_port}", "--buckets", "velero"])
        wait_until(lambda: socket.create_connection(("127.0.0.1", self.s3_port), timeout=1).close() is None, 30, "S3 server")

    def start_velero(self, extra=()) -> None:
        plugins = self.tmp / "velero-plugins"
        plugins.mkdir(exist_ok=True)
        target = plugins / "velero-plugin-for-aws"
        if not target.exists():
            shutil.copy(self.bin / "velero-plugin-for-aws", target)
        self.apply({"apiVersion": "velero.io/v1", "kind": "BackupStorageLocation",
                    "metadata": {"name": "default", "namespace": VELERO_NS},
                    "spec": {"provider": "aws", "default": True, "objectStorage": {"bucket": "velero"},
                             "config": {"region": "us-east-1", "s3ForcePathStyle": "true",
                                        "s3Url": f"http://127.0.0.1:{self.s3_port}", "checksumAlgorithm": ""}}})
        # Stand-in: the Deployment "velero" that `velero install` creates and
        # Velero normally runs as. Here the server is a local process, so the
        # Deployment exists as an API object only (0 replicas, no pods), with
        # the image of the version under test. Velero 1.16+ reads its image
        # when a restore starts (NewPodVolumeRestoreAction) and fails every
        # restore without it (`deployments.apps "velero" not found`); 1.15
        # does not read it. It is created for every version, as an install
        # would have it.
        self.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "velero", "namespace": VELERO_NS},
                    "spec": {"replicas": 0, "selector": {"matchLabels": {"component": "velero"}},
                             "template": {"metadata": {"labels": {"component": "velero"}},
                                          "spec": {"containers": [{"name": "velero",
                                                                   "image": f"velero/velero:v{VELERO_VERSION}"}]}}}})
        # Velero runs as its own ServiceAccount bound to cluster-admin, as
        # `velero install` sets it up: not system:masters, so not a privileged
        # user in VM Operator's sense. restart_velero(service_account=...)
        # runs it as another one (Velero's Helm chart names it velero-server).
        if not hasattr(self, "velero_kubeconfig"):
            self.velero_kubeconfig = self.service_account_kubeconfig(VELERO_NS, "velero", binding="velero")
            self.velero_default_kubeconfig = self.velero_kubeconfig
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "e2e", "AWS_SECRET_ACCESS_KEY": "e2e-secret-key",
               "VELERO_NAMESPACE": VELERO_NS, "KUBECONFIG": str(self.admin_kubeconfig)}
        self.velero_env = env
        wait_for_velero_manager_port()
        self.spawn("velero", [self.velero_bin, "server", "--kubeconfig", self.velero_kubeconfig,
                              "--namespace", VELERO_NS, "--plugin-dir", plugins,
                              "--metrics-address", f"127.0.0.1:{free_port()}",
                              "--profiler-address", f"127.0.0.1:{free_port()}",
                              "--log-level", "info", *extra], env=env)

        def available():
            bsl = self.get_json("backupstoragelocation", "default", "-n", VELERO_NS)
            return bsl.get("status", {}).get("phase") == "Available"

        # Velero 1.16.2+ refuses a restore at validation while the backup
        # storage location is not Available (1.15.2 has no such check), so
        # every version is started only once it is.
        wait_until(available, 120, "Velero's backup storage location to be Available", process=self.processes["velero"])
        log(f"Velero server {self.velero_server_version()} up, backup storage location Available")

    def velero_server_version(self) -> str:
        """The version the running server logged at start, checked against
        VELERO_VERSION."""
        process = self.processes["velero"]

        def logged():
            match = re.search(r"Starting Velero server (\S+) ", process.log_path.read_text(errors="replace"))
            return match and match.group(1)

        version = wait_until(logged, 30, "Velero's start line", process=process)
        if version != f"v{VELERO_VERSION}":
            raise RuntimeError(f"the Velero server reports {version}, not v{VELERO_VERSION} (VELERO_VERSION)")
        return version

    def service_account_kubeconfig(self, namespace: str, name: str, binding: str | None = None,
                                   cluster_role: str = "cluster-admin") -> Path:
        """A kubeconfig for ServiceAccount `name` in `namespace`, bound to
        `cluster_role` (ClusterRoleBinding `binding`, default
        e2e-NAMESPACE-NAME): a client certificate with the user name and the
        groups a token of that ServiceAccount authenticates as
        (system:serviceaccount:NAMESPACE:NAME in system:serviceaccounts and
        system:serviceaccounts:NAMESPACE)."""
        self.apply([{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}},
                    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                     "metadata": {"name": binding or f"e2e-{namespace}-{name}"},
                     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
                     "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]}])
        file = name if namespace == VELERO_NS else f"{namespace}-{name}"
        crt, key = self.clients.client(file, f"system:serviceaccount:{namespace}:{name}",
                                       ("system:serviceaccounts", f"system:serviceaccounts:{namespace}"))
        return kubeconfig(self.tmp / f"{file}.kubeconfig", self.server, self.server_ca, crt, key)

    def restart_velero(self, extra=(), service_account: str | None = None) -> None:
        """Velero's server restarted; with `service_account`, running as that
        ServiceAccount of Velero's namespace from now on ("velero" is the one
        it starts as)."""
        self.processes.pop("velero").stop()
        if service_account == "velero":
            self.velero_kubeconfig = self.velero_default_kubeconfig
        elif service_account:
            self.velero_kubeconfig = self.service_account_kubeconfig(VELERO_NS, service_account)
        self.start_velero(extra)

    def velero(self, *args, check=True, timeout=600) -> subprocess.CompletedProcess:
        return run([self.velero_bin, "--kubeconfig", self.admin_kubeconfig, "--namespace", VELERO_NS, *args],
                   check=check, env=self.velero_env, timeout=timeout)

    def backup(self, name: str, namespaces: str) -> dict:
        self.velero("backup", "create", name, "--include-namespaces", namespaces, "--snapshot-volumes=false", "--wait")
        backup = self.get_json("backup", name, "-n", VELERO_NS)
        assert backup["status"]["phase"] == "Completed", backup["status"]
        return backup

    def restore(self, name: str, backup: str, *extra) -> dict:
        self.velero("restore", "create", name, "--from-backup", backup, "--wait", *extra, check=False)
        return self.get_json("restore", name, "-n", VELERO_NS)

    def restore_events(self, name: str) -> list[dict]:
        """The Events on a Restore (the companion's report)."""
        items = self.get_json("events", "-n", VELERO_NS, "--field-selector",
                              f"involvedObject.kind=Restore,involvedObject.name={name}")["items"]
        return sorted(items, key=lambda e: e["reason"])

    def wait_for_companion(self, name: str, timeout: float = 60) -> list[dict]:
        """Waits until the companion has written the Restore's report."""
        wait_until(lambda: any(e["reason"] == "VMRestoreCleaned" for e in self.restore_events(name)), timeout,
                   f"the companion's report Events on Restore {name}")
        return self.restore_events(name)

    def restore_describe(self, name: str) -> str:
        return self.velero("restore", "describe", name, "--details", check=False).stdout

    def delete_namespace(self, name: str) -> None:
        self.kubectl("delete", "namespace", name, "--wait=false", check=False)
        wait_until(lambda: self.kubectl("get", "namespace", name, check=False).returncode != 0, 120,
                   f"namespace {name} to be deleted")


class SecondCluster(Cluster):
    """Another cluster beside a first one: its own etcd, kube-apiserver, CRDs,
    our webhook and Velero server, with a backup storage location on the
    first one's object store (bucket `velero`), as two Supervisors backing up
    to one bucket. Its Velero syncs the bucket's backups every 2 s."""

    def __init__(self, s3_port: int):
        super().__init__()
        self.shared_s3_port = s3_port

    def start_object_store(self) -> None:
        self.s3_port = self.shared_s3_port

    def start_velero(self, extra=()) -> None:
        super().start_velero(("--backup-sync-period", "2s", *extra))


class Watch:
    """Streams watch events of a resource from a given resourceVersion, to tell
    the order in which objects were created (etcd revisions are global)."""

    def __init__(self, cluster: Cluster, path: str):
        rv = json.loads(cluster.kubectl("get", "--raw", path).stdout)["metadata"]["resourceVersion"]
        self.events: list[dict] = []
        self.proc = subprocess.Popen(
            [str(cluster.kubectl_bin), f"--kubeconfig={cluster.admin_kubeconfig}", "get", "--raw",
             f"{path}?watch=1&resourceVersion={rv}&allowWatchBookmarks=false"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            line = line.strip()
            if line:
                self.events.append(json.loads(line))

    def added(self) -> list[dict]:
        return [e["object"] for e in self.events if e["type"] == "ADDED"]

    def of(self, namespace: str, name: str) -> list[tuple[str, dict]]:
        """Every event of one object, in order: (type, object)."""
        return [(e["type"], e["object"]) for e in list(self.events)
                if e["object"]["metadata"].get("namespace") == namespace and e["object"]["metadata"]["name"] == name]

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
