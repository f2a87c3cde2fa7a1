"""The Helm chart: lint, render every certificate mode, check the fields that
matter, and have a real API server validate the rendered objects."""

import base64
import json
import subprocess

import pytest
import yaml

import harness

CHART = harness.REPO / "charts" / "velero-vm-restore-webhook"
CA = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").decode()
MODES = {
    "default": [],
    "helm": ["--set", "certificates.mode=helm"],
    "certManager": ["--set", "certificates.mode=certManager"],
    "provided": ["--set", "certificates.mode=provided", "--set", "certificates.provided.secretName=my-tls",
                 "--set", f"certificates.provided.caBundle={CA}"],
}


@pytest.fixture(scope="module")
def helm():
    return harness.tools_dir() / "helm"


def render(helm, *args, check=True):
    result = subprocess.run([str(helm), "template", "vmrw", str(CHART), "--namespace", "vmrw-system", *args],
                            capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
        return [d for d in yaml.safe_load_all(result.stdout) if d]
    return result


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def test_chart_lint(helm):
    result = subprocess.run([str(helm), "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("mode", list(MODES))
def test_chart_renders_each_certificate_mode(helm, mode):
    docs = render(helm, *MODES[mode])
    (mwc,) = by_kind(docs, "MutatingWebhookConfiguration")
    assert mwc["metadata"]["name"] < "vmware-system-vmop-mutating-webhook-configuration"
    (hook,) = mwc["webhooks"]
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["matchPolicy"] == "Equivalent"
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["failurePolicy"] == "Fail"
    assert hook["objectSelector"] == {"matchExpressions": [{"key": "velero.io/restore-name", "operator": "Exists"}]}
    (expr,) = hook["namespaceSelector"]["matchExpressions"]
    assert expr["operator"] == "NotIn" and set(expr["values"]) == {"vmrw-system", "kube-system"}
    deployment = by_kind(docs, "Deployment")[0]
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    wait = int(env["VMRW_GROUP_WAIT_TIMEOUT"].rstrip("s")) + int(env["VMRW_TIMEOUT_MARGIN"].rstrip("s"))
    assert wait < hook["timeoutSeconds"] <= 30
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r for r in hook["rules"]}
    vmop = rules[(("vmoperator.vmware.com",), ("virtualmachines", "virtualmachinegroups"))]
    assert vmop["operations"] == ["CREATE"]
    assert vmop["apiVersions"] == ["v1alpha1", "v1alpha2", "v1alpha3", "v1alpha4", "v1alpha5", "v1alpha6"]
    assert rules[(("",), ("persistentvolumeclaims",))]["operations"] == ["CREATE"]
    for doc in docs:
        assert doc["metadata"]["labels"]["velero.io/exclude-from-backup"] == "true", doc["kind"]
    if mode == "certManager":
        assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "vmrw-system/vmrw-velero-vm-restore-webhook-serving"
        assert "caBundle" not in hook["clientConfig"]
        assert {d["kind"] for d in docs} >= {"Issuer", "Certificate"}
    elif mode == "provided":
        assert hook["clientConfig"]["caBundle"] == CA
        volume = deployment["spec"]["template"]["spec"]["volumes"][0]
        assert volume["secret"]["secretName"] == "my-tls"
        assert not by_kind(docs, "Secret")
    else:
        (secret,) = by_kind(docs, "Secret")
        assert secret["data"]["ca.crt"] == hook["clientConfig"]["caBundle"]


def test_chart_pod_security_and_availability(helm):
    docs = render(helm)
    deployment = by_kind(docs, "Deployment")[0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert deployment["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert by_kind(docs, "PodDisruptionBudget")[0]["spec"]["minAvailable"] == 1
    assert container["resources"]["requests"]


def test_chart_rbac_is_read_only_and_minimal(helm):
    # The server's RBAC; `helm test`'s own hook objects are checked apart.
    docs = [d for d in render(helm) if "helm.sh/hook" not in d["metadata"].get("annotations", {})]
    rules = [(d["kind"], r) for d in docs if d["kind"] in ("ClusterRole", "Role") for r in d["rules"]]
    assert sorted((kind, tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["verbs"])) for kind, r in rules) == [
        ("ClusterRole", ("vmoperator.vmware.com",), ("virtualmachinegroups",), ("get", "list", "watch")),
        ("Role", ("velero.io",), ("restores",), ("get", "list", "watch")),
    ]
    role = by_kind(docs, "Role")[0]
    assert role["metadata"]["namespace"] == "velero"


def test_chart_refuses_unsafe_values(helm):
    assert "must sort before" in render(helm, "--set", "fullnameOverride=zz-webhook", check=False).stderr
    assert "must be below webhook.timeoutSeconds" in render(helm, "--set", "server.groupWaitSeconds=24", check=False).stderr
    assert render(helm, "--set", "webhook.failurePolicy=Sometimes", check=False).returncode != 0
    assert "caBundle is required" in render(helm, "--set", "certificates.mode=provided",
                                            "--set", "certificates.provided.secretName=x", check=False).stderr


def test_chart_objects_pass_the_api_server_schema(helm, cluster):
    """kubectl apply --dry-run=server of every rendered object the API server
    knows (cert-manager and Prometheus Operator CRDs are not installed here)."""
    for mode, args in MODES.items():
        docs = render(helm, *args, "--set", "metrics.serviceMonitor.enabled=true")
        known = [d for d in docs if not d["apiVersion"].startswith(("cert-manager.io/", "monitoring.coreos.com/"))]
        # Pod admission looks the ServiceAccount up, which a dry run never creates.
        cluster.apply([d for d in known if d["kind"] == "ServiceAccount"])
        result = cluster.kubectl("apply", "--dry-run=server", "-f", "-",
                                 input="\n---\n".join(json.dumps(d) for d in known), check=False)
        assert result.returncode == 0, f"{mode}: {result.stderr}"
        assert len(result.stdout.strip().splitlines()) == len(known)


def test_dockerfile_builds_what_the_tests_run():
    """No Docker engine here: keep the Dockerfile in step with the build the
    e2e suite runs (scripts/build-static.sh) and with the Makefile's variables."""
    dockerfile = (harness.REPO / "Dockerfile").read_text()
    stages = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert len(stages) == 2 and stages[-1].startswith("gcr.io/distroless/static"), stages
    assert "RUN scripts/build-static.sh" in dockerfile
    assert "USER 65532:65532" in dockerfile
    assert "COPY --from=build /src/target/x86_64-unknown-linux-gnu/release/velero-vm-restore-webhook" in dockerfile
    script = (harness.REPO / "scripts" / "build-static.sh").read_text()
    assert "+crt-static" in script and "--target \"$target\"" in script and "target=x86_64-unknown-linux-gnu" in script
    assert "org.opencontainers.image.version" in dockerfile
    dry = subprocess.run(["make", "-n", "container", "push", "REGISTRY=reg.example/team", "VERSION=9.9.9"],
                         cwd=harness.REPO, capture_output=True, text=True, check=True).stdout
    assert "build --build-arg VERSION=9.9.9" in dry and "-t reg.example/team/velero-vm-restore-webhook:9.9.9 ." in dry, dry
    assert "push reg.example/team/velero-vm-restore-webhook:9.9.9" in dry, dry
    dry = subprocess.run(["make", "-n", "push", "IMAGE=other/img:tag"], cwd=harness.REPO, capture_output=True, text=True,
                         check=True).stdout
    assert "push other/img:tag" in dry, dry
