"""The Helm chart: lint, render every certificate mode, check the fields that
matter, and have a real API server validate the rendered objects."""

import base64
import json
import re
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
    hooks = {h["name"]: h for h in mwc["webhooks"]}
    assert set(hooks) == {"restore.velero-vm-restore-webhook.io", "pvc.restore.velero-vm-restore-webhook.io",
                          "updates.restore.velero-vm-restore-webhook.io", "pvc-updates.restore.velero-vm-restore-webhook.io",
                          "cns.restore.velero-vm-restore-webhook.io"}
    hook, pvc_hook = hooks["restore.velero-vm-restore-webhook.io"], hooks["pvc.restore.velero-vm-restore-webhook.io"]
    updates, pvc_updates = hooks["updates.restore.velero-vm-restore-webhook.io"], hooks["pvc-updates.restore.velero-vm-restore-webhook.io"]
    cns = hooks["cns.restore.velero-vm-restore-webhook.io"]
    assert cns["rules"] == [{"apiGroups": ["cns.vmware.com"], "apiVersions": ["v1alpha1"], "operations": ["CREATE"],
                             "resources": ["cnsregistervolumes"], "scope": "Namespaced"}]
    assert cns["failurePolicy"] == "Fail" and cns["reinvocationPolicy"] == "Never"
    for each in (hook, pvc_hook, updates, pvc_updates, cns):
        assert each["sideEffects"] == "None"
        assert each["admissionReviewVersions"] == ["v1"]
        assert each["matchPolicy"] == "Equivalent"
        assert each["objectSelector"] == {"matchExpressions": [{"key": "velero.io/restore-name", "operator": "Exists"}]}
        (expr,) = each["namespaceSelector"]["matchExpressions"]
        assert expr["operator"] == "NotIn" and set(expr["values"]) == {"vmrw-system", "kube-system"}
        assert each["clientConfig"] == hook["clientConfig"]
    # VMs and groups are re-invoked after VM Operator's webhook; PVCs are not,
    # and an outage does not block unrelated PVC restores.
    assert hook["reinvocationPolicy"] == "IfNeeded" and hook["failurePolicy"] == "Fail"
    assert pvc_hook["reinvocationPolicy"] == "Never" and pvc_hook["failurePolicy"] == "Ignore"
    deployment = by_kind(docs, "Deployment")[0]
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    wait = int(env["VMRW_GROUP_WAIT_TIMEOUT"].rstrip("s")) + int(env["VMRW_TIMEOUT_MARGIN"].rstrip("s"))
    assert wait < hook["timeoutSeconds"] <= 30
    (vmop,) = hook["rules"]
    assert vmop["apiGroups"] == ["vmoperator.vmware.com"]
    assert vmop["resources"] == ["virtualmachines", "virtualmachinegroups", "virtualmachinesnapshots", "virtualmachinepublishrequests",
                                 "virtualmachinegrouppublishrequests", "virtualmachinewebconsolerequests", "webconsolerequests"]
    assert vmop["operations"] == ["CREATE"]
    assert vmop["apiVersions"] == ["v1alpha1", "v1alpha2", "v1alpha3", "v1alpha4", "v1alpha5", "v1alpha6"]
    (pvc_rule,) = pvc_hook["rules"]
    assert pvc_rule["resources"] == ["persistentvolumeclaims"] and pvc_rule["operations"] == ["CREATE"]
    # Velero's updates and status writes, sent from Velero's identity only:
    # VM Operator's own status writes never reach the webhook.
    # Velero's namespace's ServiceAccounts, but not the webhook's own (its
    # companion patches restored groups; installed in Velero's namespace it
    # is in that group).
    velero_only = [{"name": "velero-only", "expression":
                    "((has(request.userInfo.groups) && request.userInfo.groups.exists(g, g in ['system:serviceaccounts:velero']))) "
                    "&& request.userInfo.username != 'system:serviceaccount:vmrw-system:vmrw-velero-vm-restore-webhook'"}]
    for each, failure in ((updates, "Fail"), (pvc_updates, "Ignore")):
        assert each["matchConditions"] == velero_only, each
        assert each["failurePolicy"] == failure and each["reinvocationPolicy"] == "Never"
        (rule,) = each["rules"]
        assert rule["operations"] == ["UPDATE"], rule
    assert updates["rules"][0]["resources"] == ["virtualmachines", "virtualmachines/status",
                                                "virtualmachinegroups", "virtualmachinegroups/status"]
    assert pvc_updates["rules"][0]["resources"] == ["persistentvolumeclaims"]
    assert env["VMRW_VELERO_USERS"] == ""
    assert env["VMRW_VELERO_GROUPS"] == "system:serviceaccounts:velero"
    assert env["VMRW_NOT_VELERO_USERS"] == "system:serviceaccount:vmrw-system:vmrw-velero-vm-restore-webhook"
    for doc in docs:
        assert doc["metadata"]["labels"]["velero.io/exclude-from-backup"] == "true", doc["kind"]
    if mode == "certManager":
        assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "vmrw-system/vmrw-velero-vm-restore-webhook-serving"
        assert "caBundle" not in hook["clientConfig"]
        # A self-signed root, a CA Certificate, a CA Issuer, and the serving
        # certificate issued by that CA: renewing it keeps the CA.
        issuers = {d["metadata"]["name"]: d for d in by_kind(docs, "Issuer")}
        certs = {d["metadata"]["name"]: d for d in by_kind(docs, "Certificate")}
        ca_cert = certs["vmrw-velero-vm-restore-webhook-ca"]["spec"]
        assert ca_cert["isCA"] is True and ca_cert["issuerRef"]["name"] == "vmrw-velero-vm-restore-webhook-selfsigned"
        assert issuers["vmrw-velero-vm-restore-webhook-selfsigned"]["spec"] == {"selfSigned": {}}
        assert issuers["vmrw-velero-vm-restore-webhook-ca"]["spec"] == {"ca": {"secretName": ca_cert["secretName"]}}
        serving = certs["vmrw-velero-vm-restore-webhook-serving"]["spec"]
        assert serving["issuerRef"] == {"name": "vmrw-velero-vm-restore-webhook-ca", "kind": "Issuer"}
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
    # kubelet waits for the drain delay and the in-flight reviews, and more.
    env = {e["name"]: e.get("value") for e in container["env"]}
    drain, finish = int(env["VMRW_SHUTDOWN_DRAIN_DELAY"].rstrip("s")), int(env["VMRW_SHUTDOWN_TIMEOUT"].rstrip("s"))
    assert drain >= 5
    assert pod["terminationGracePeriodSeconds"] > drain + finish


def test_chart_network_policy(helm):
    """On by default. Without a cluster (`helm template`) no API server
    address is found: the webhook port is left open to any source (failurePolicy
    Fail: availability first) and says so; given sources close it to them.
    The metrics port admits the release's namespace unless metricsFrom says
    otherwise. What the lookup finds against a real API server is checked in
    test_helm_upgrade_keeps_the_ca; the enforcement in test_cluster.py."""
    (policy,) = by_kind(render(helm), "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "velero-vm-restore-webhook"
    webhook_rule, metrics_rule = policy["spec"]["ingress"]
    assert webhook_rule == {"ports": [{"port": 8443, "protocol": "TCP"}]}, "open to any source"
    assert policy["metadata"]["annotations"]["velero-vm-restore-webhook/webhook-port-sources"] == "any-source"
    assert metrics_rule == {"ports": [{"port": 9090, "protocol": "TCP"}], "from": [{"podSelector": {}}]}

    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    (policy,) = by_kind(render(helm, "--set", "networkPolicy.apiServer.cidrs={10.0.0.0/28,fd00::1/128}",
                               "--set", "networkPolicy.webhookFrom[0].ipBlock.cidr=192.0.2.10/32",
                               "--set-json", f"networkPolicy.metricsFrom=[{json.dumps(prometheus)}]"), "NetworkPolicy")
    webhook_rule, metrics_rule = policy["spec"]["ingress"]
    assert webhook_rule["from"] == [{"ipBlock": {"cidr": "10.0.0.0/28"}}, {"ipBlock": {"cidr": "fd00::1/128"}},
                                    {"ipBlock": {"cidr": "192.0.2.10/32"}}]
    assert policy["metadata"]["annotations"]["velero-vm-restore-webhook/webhook-port-sources"] == "api-server"
    assert metrics_rule["from"] == [prometheus]
    # Metrics off: only the webhook port's rule.
    (policy,) = by_kind(render(helm, "--set", "metrics.enabled=false"), "NetworkPolicy")
    assert [r["ports"][0]["port"] for r in policy["spec"]["ingress"]] == [8443]
    assert not by_kind(render(helm, "--set", "networkPolicy.enabled=false"), "NetworkPolicy")
    # The same addresses go to the server, which does not cap them per source;
    # none found or given: no variable.
    def api_server_env(*values):
        deployment = by_kind(render(helm, *values), "Deployment")[0]
        env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        return env.get("VMRW_API_SERVER_CIDRS")
    assert api_server_env() is None
    given = ("--set", "networkPolicy.apiServer.cidrs={10.0.0.0/28,fd00::1/128}")
    assert api_server_env(*given) == "10.0.0.0/28,fd00::1/128"
    assert api_server_env(*given, "--set", "networkPolicy.enabled=false") == "10.0.0.0/28,fd00::1/128"
    bad = render(helm, "--set", "networkPolicy.apiServer.cidrs={not-a-cidr}", check=False)
    assert bad.returncode != 0 and "cidrs" in bad.stderr, bad.stderr


def test_chart_alert_rules_name_metrics_the_binary_serves(helm, cluster):
    """The PrometheusRule (off by default) alerts on the certificate's end,
    reload errors, denials and slow reviews, each through a metric the
    running binary serves (read off its /metrics)."""
    assert not by_kind(render(helm), "PrometheusRule")
    (rule,) = by_kind(render(helm, "--set", "metrics.prometheusRule.enabled=true"), "PrometheusRule")
    alerts = {r["alert"]: r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == {"VeleroVMRestoreWebhookCertificateEndsSoon", "VeleroVMRestoreWebhookCertificateReloadFailing",
                           "VeleroVMRestoreWebhookDenials", "VeleroVMRestoreWebhookSlowReviews"}, alerts
    served = cluster.metrics()
    for alert, expr in alerts.items():
        for name in re.findall(r"velero_vm_restore_webhook_\w+", expr):
            family = re.sub(r"_(total|bucket)$", "", name)
            assert f"# TYPE {family} " in served, f"{alert} reads {name}, which /metrics does not serve"
        assert 'job="vmrw-velero-vm-restore-webhook"' in expr, expr


def test_chart_defaults_fit_the_memory_limit(helm):
    """The worst case the server can hold stays under the memory limit: the
    byte budget of bodies in progress, each costing up to ~13x once parsed
    (measured by `make bench-faults` with mimalloc; 16 here for headroom),
    plus 32 MiB of base and caches."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    server = values["server"]
    limit = values["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    assert server["maxBodyBytes"] <= server["maxBufferedBytes"]
    worst = server["maxBufferedBytes"] * 16 + 32 * 2**20
    assert worst < int(limit[:-2]) * 2**20, (worst, limit)
    assert server["maxGroupWaits"] <= server["maxConcurrentReviews"] // 2
    deployment = by_kind(render(helm), "Deployment")[0]
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["VMRW_MAX_BUFFERED_BYTES"] == str(server["maxBufferedBytes"])


def test_chart_env_is_accepted_by_the_binary(helm, tmp_path):
    """The Deployment's environment, as rendered, starts the real binary (Helm
    reads numbers as floats: `quote` alone renders 8388608 as 8.388608e+06,
    which the server refuses). Files and ports are swapped for local ones;
    --no-kube because there is no cluster here."""
    import os
    import signal
    import socket
    import time
    import urllib.request
    for values in ([], ["--set", "server.maxBodyBytes=3145728", "--set", "server.maxBufferedBytes=33554432"],
                   ["--set", "companion.enabled=false", "--set", "companion.pruneMissingMembers=false",
                    "--set", "server.powerPolicy=off"]):
        deployment = by_kind(render(helm, *values), "Deployment")[0]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        certs = tmp_path / "certs"
        harness.run([harness.REPO / "certs" / "gen-certs.sh", "--out", certs])
        ports = []
        for _ in range(2):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                ports.append(sock.getsockname()[1])
        env.update({"VMRW_TLS_CERT_FILE": str(certs / "tls.crt"), "VMRW_TLS_KEY_FILE": str(certs / "tls.key"),
                    "VMRW_LISTEN": f"127.0.0.1:{ports[0]}", "VMRW_METRICS_LISTEN": f"127.0.0.1:{ports[1]}",
                    "VMRW_NO_KUBE": "true"})
        process = subprocess.Popen([str(harness.webhook_binary()), *container["args"]],
                                   env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 20
            while True:
                assert process.poll() is None, f"the binary refused the chart's env: {process.stderr.read()}"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/readyz", timeout=1) as response:
                        assert response.status == 200
                        break
                except OSError:
                    assert time.time() < deadline, "never ready"
                    time.sleep(0.1)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def test_chart_refuses_unknown_rule_ids(helm):
    result = render(helm, "--set", "server.disabledRules={vm-nope}", check=False)
    assert result.returncode != 0 and "disabledRules" in result.stderr, result.stderr
    assert render(helm, "--set", "server.disabledRules={vm-copy-bios-uuid}", check=False).returncode == 0


def test_helm_upgrade_keeps_the_ca(helm, cluster):
    """A real `helm install` and `helm upgrade` against the e2e API server:
    the upgrade reuses the CA (lookup), so pods serving the old certificate
    stay trusted. Installed with no VM resources and failurePolicy Ignore in
    its own namespace, and uninstalled, so the other scenarios never see it."""
    release, namespace = "upgrade-check", "vmrw-upgrade"
    base = [str(helm), "--kubeconfig", str(cluster.admin_kubeconfig)]
    args = [release, str(CHART), "--namespace", namespace, "--set", "webhook.resources={persistentvolumeclaims}",
            "--set", "webhook.pvcFailurePolicy=Ignore", "--set", "webhook.excludeNamespaces={" + ",".join(
                ["kube-system", "prod", "prod-copy", "dryrun", "order", "latency", "mapped"]) + "}"]

    def secret_and_bundle():
        secret = cluster.get_json("secret", f"{release}-velero-vm-restore-webhook-tls", "-n", namespace)
        mwc = cluster.get_json("mutatingwebhookconfiguration", f"{release}-velero-vm-restore-webhook")
        return secret, {h["clientConfig"]["caBundle"] for h in mwc["webhooks"]}

    try:
        installed = harness.run([*base, "install", *args, "--create-namespace"]).stdout
        secret, bundles = secret_and_bundle()
        assert bundles == {secret["data"]["ca.crt"]}
        # The NetworkPolicy's webhook port admits what `lookup` found: the
        # API server's advertised address (its `kubernetes` EndpointSlice).
        # This API server advertises 127.0.0.1, which it never publishes
        # (loopback): nothing is found, and the port is left open and NOTES
        # says so. test_cluster.py's API server publishes the host's address.
        policy = cluster.get_json("networkpolicy", f"{release}-velero-vm-restore-webhook", "-n", namespace)
        found = cluster.kubectl("get", "endpointslice", "kubernetes", "-n", "default", "-o", "json", check=False)
        advertised = [f"{a}/32" for e in json.loads(found.stdout)["endpoints"] for a in e["addresses"]] \
            if found.returncode == 0 else []
        if advertised:
            assert policy["spec"]["ingress"][0]["from"] == [{"ipBlock": {"cidr": c}} for c in advertised]
            assert f"{advertised[0]}  (its advertised address" in installed, installed
        else:
            assert "from" not in policy["spec"]["ingress"][0], policy
            assert "OPEN TO ANY SOURCE" in installed, installed
        # Without the lookup and with nothing given: open, and NOTES.txt says so.
        unlooked = harness.run([*base, "upgrade", *args, "--set", "networkPolicy.apiServer.lookup=false"]).stdout
        assert "OPEN TO ANY SOURCE" in unlooked, unlooked
        policy = cluster.get_json("networkpolicy", f"{release}-velero-vm-restore-webhook", "-n", namespace)
        assert "from" not in policy["spec"]["ingress"][0]
        harness.run([*base, "upgrade", *args, "--set", "server.logLevel=debug"])
        upgraded, upgraded_bundles = secret_and_bundle()
        assert upgraded["data"] == secret["data"], "helm upgrade made a new CA or certificate"
        assert upgraded_bundles == bundles
        # A CA near its end is renewed: with renewBeforeDays beyond the
        # validity, the upgrade makes a new pair.
        harness.run([*base, "upgrade", *args, "--set", "certificates.helm.renewBeforeDays=10000"])
        renewed, renewed_bundles = secret_and_bundle()
        assert renewed["data"]["ca.crt"] != secret["data"]["ca.crt"]
        assert renewed_bundles == {renewed["data"]["ca.crt"]}
    finally:
        harness.run([*base, "uninstall", release, "--namespace", namespace], check=False)


def test_chart_leaves_velero_updates_out_without_match_conditions(helm):
    """Before Kubernetes 1.28 there are no matchConditions: VM Operator's own
    updates of restored objects would depend on the webhook, so the update
    entries are left out unless asked for."""
    def names(*args):
        (mwc,) = by_kind(render(helm, *args), "MutatingWebhookConfiguration")
        return {h["name"]: h for h in mwc["webhooks"]}
    assert set(names("--kube-version", "1.27.0")) == {"restore.velero-vm-restore-webhook.io", "pvc.restore.velero-vm-restore-webhook.io",
                                                      "cns.restore.velero-vm-restore-webhook.io"}
    hooks = names("--kube-version", "1.27.0", "--set", "webhook.velero.withoutMatchConditions=true")
    assert "matchConditions" not in hooks["updates.restore.velero-vm-restore-webhook.io"]
    # Issue 33, finding 3: by default every ServiceAccount of Velero's
    # namespace is Velero (`velero` from `velero install`, `velero-server`
    # from Velero's chart); users given are added.
    expression = lambda hooks: hooks["updates.restore.velero-vm-restore-webhook.io"]["matchConditions"][0]["expression"]  # noqa: E731
    own = " && request.userInfo.username != 'system:serviceaccount:vmrw-system:vmrw-velero-vm-restore-webhook'"
    assert expression(names()) == \
        "((has(request.userInfo.groups) && request.userInfo.groups.exists(g, g in ['system:serviceaccounts:velero'])))" + own
    hooks = names("--set-json", 'webhook.velero.users=["system:serviceaccount:backup:velero-server","ops"]',
                  "--set-json", 'webhook.velero.groups=["system:serviceaccounts:backup"]')
    assert expression(hooks) == \
        "(request.userInfo.username in ['system:serviceaccount:backup:velero-server', 'ops'] || " \
        "(has(request.userInfo.groups) && request.userInfo.groups.exists(g, g in ['system:serviceaccounts:backup'])))" + own
    assert "updates.restore.velero-vm-restore-webhook.io" not in names("--set", "webhook.velero.updates=false")


def test_chart_rbac_is_minimal(helm):
    """The webhook reads only; the restore companion may also patch groups
    and create Events, and only while it is enabled."""
    def rules_of(*values):
        # The server's RBAC; `helm test`'s own hook objects are checked apart.
        docs = [d for d in render(helm, *values) if "helm.sh/hook" not in d["metadata"].get("annotations", {})]
        rules = [(d["kind"], r) for d in docs if d["kind"] in ("ClusterRole", "Role") for r in d["rules"]]
        return docs, sorted((kind, tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["verbs"])) for kind, r in rules)

    read_only = [
        ("ClusterRole", ("topology.tanzu.vmware.com",), ("zones", "availabilityzones"), ("list", "watch")),
        ("ClusterRole", ("vmoperator.vmware.com",), ("virtualmachinegroups",), ("get", "list", "watch")),
        ("ClusterRole", ("vmoperator.vmware.com",), ("virtualmachineclasses", "virtualmachineclassinstances",
                                                     "virtualmachineimages", "clustervirtualmachineimages"),
         ("list", "watch")),
        ("ClusterRole", ("netoperator.vmware.com",), ("networks",), ("list", "watch")),
        ("ClusterRole", ("vmware.com",), ("virtualnetworks",), ("list", "watch")),
        ("ClusterRole", ("crd.nsx.vmware.com",), ("subnets", "subnetsets"), ("list", "watch")),
        ("ClusterRole", ("",), ("resourcequotas",), ("list", "watch")),
        ("ClusterRole", ("cns.vmware.com",), ("storagepolicyquotas",), ("list", "watch")),
        ("ClusterRole", ("storage.k8s.io",), ("storageclasses",), ("list", "watch")),
        ("ClusterRole", ("infra.vmware.com",), ("storagepolicies",), ("list", "watch")),
        ("ClusterRole", ("apiextensions.k8s.io",), ("customresourcedefinitions",), ("list", "watch")),
        ("Role", ("velero.io",), ("restores",), ("get", "list", "watch")),
        # The mapping ConfigMaps, in Velero's namespace only.
        ("Role", ("",), ("configmaps",), ("get", "list", "watch")),
    ]
    docs, rules = rules_of()
    assert rules == sorted(read_only + [
        ("ClusterRole", ("",), ("events",), ("create",)),
        ("ClusterRole", ("",), ("persistentvolumeclaims",), ("get", "list")),
        ("ClusterRole", ("vmoperator.vmware.com",), ("virtualmachinegroups",), ("patch",)),
        ("ClusterRole", ("vmoperator.vmware.com",), ("virtualmachines",), ("get", "list")),
    ]), rules
    role = by_kind(docs, "Role")[0]
    assert role["metadata"]["namespace"] == "velero"
    _, rules = rules_of("--set", "companion.enabled=false")
    assert rules == sorted(read_only), rules


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
    # .dockerignore lets in exactly what the Dockerfile copies, and no target/.
    ignore = [line for line in (harness.REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore[1:] if line.startswith("!")}
    copied = set()
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied.update(part.rstrip("/") for part in line.split()[1:-1])
    copied = {c.removeprefix("./") for c in copied}
    assert copied <= allowed, (copied, allowed)
    assert not any(a.startswith("target") for a in allowed)
    assert (harness.REPO / "LICENSE").read_text().lstrip().startswith("Apache License")
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
