"""`plan` of a large backup against the live target (outside CI: `make
bench-plan`; env PLAN_VMS, PLAN_NAMESPACES, PLAN_RUNS): PLAN_VMS (1,000) VMs
in PLAN_NAMESPACES (10) namespaces, each VM naming a zone, a class instance,
an image, a class, a storage class and a network (and every other VM an
encryption class), with both mapping ConfigMaps in Velero's namespace,
restored into namespaces that have site B's storage quota, class with its
active instance, image and SubnetSet, and VM Operator's record of site B's
storage class as encrypted (a StoragePolicy, set by hand: no VM Operator
runs here), so every check runs and passes. Reports
each plan's wall time, its API requests and distinct reference lookups, and
the ratio to `velero backup download` of the same backup, measured in the
same run (the download is the part of a plan no tool can skip)."""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
import objects as o  # noqa: E402
from bench_scale import apply_in_batches  # noqa: E402
from harness import VELERO_NS  # noqa: E402

VMS = int(os.environ.get("PLAN_VMS", "1000"))
NAMESPACES = int(os.environ.get("PLAN_NAMESPACES", "10"))
RUNS = int(os.environ.get("PLAN_RUNS", "3"))


def main(cluster):
    per_namespace = VMS // NAMESPACES
    docs = []
    sources = [f"plan-src-{n}" for n in range(NAMESPACES)]
    for ns in sources:
        docs += [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}, o.resource_policy(ns, "web-policy"),
                 o.group(ns, "tier", [{"kind": "VirtualMachine", "name": f"vm-{i}"} for i in range(per_namespace)])]
        for i in range(per_namespace):
            vm = o.vm(ns, f"vm-{i}", "tier", i % 250, labels={"topology.kubernetes.io/zone": f"zone-{i % 3}"})
            vm["spec"]["class"] = {"apiVersion": o.V, "kind": "VirtualMachineClassInstance", "name": f"best-effort-small-{ns}"}
            vm["spec"]["image"] = {"kind": "VirtualMachineImage", "name": "vmi-0a0044d7c690bcbea"}
            vm["spec"]["network"]["interfaces"][0]["network"] = {
                "apiVersion": "crd.nsx.vmware.com/v1alpha1", "kind": "SubnetSet", "name": "vm-default"}
            if i % 2 == 0:
                vm["spec"]["crypto"] = {"encryptionClassName": "tenant-keys"}
            docs.append(vm)
    apply_in_batches(cluster, docs)
    # The targets: site B's Supervisor objects, so every check has something to check against.
    cluster.kubectl("apply", "--server-side", "-f", cluster.bin / "nsx-crds" / "crd.nsx.vmware.com_subnetsets.yaml")
    cluster.kubectl("wait", "--for=condition=Established", "crd/subnetsets.crd.nsx.vmware.com", "--timeout=60s")
    # Site B's storage class, recorded as encrypted the way VM Operator keeps
    # it: a StoragePolicy named from the policy ID, in VM Operator's namespace.
    cluster.kubectl("apply", "--server-side", "-f",
                    harness.vmop_config_dir() / "crd" / "external-crds" / "infra.vmware.com_storagepolicies.yaml")
    cluster.kubectl("wait", "--for=condition=Established", "crd/storagepolicies.infra.vmware.com", "--timeout=60s")
    cluster.apply([
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": harness.VMOP_NS}},
        {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "site-b-gold"},
         "provisioner": "csi.vsphere.vmware.com", "parameters": {"storagePolicyID": "ee6d5a82-1c88-45da-85d3-3d74b91a5bad"}},
        {"apiVersion": "infra.vmware.com/v1alpha1", "kind": "StoragePolicy",
         "metadata": {"name": "pol-ee6d5a82-85d33d74b91a5bad", "namespace": harness.VMOP_NS},
         "spec": {"id": "ee6d5a82-1c88-45da-85d3-3d74b91a5bad"}},
    ])
    cluster.kubectl("patch", "storagepolicy", "pol-ee6d5a82-85d33d74b91a5bad", "-n", harness.VMOP_NS,
                    "--subresource=status", "--type=merge", "-p", '{"status": {"encrypted": true}}')
    targets = []
    for ns in (source.replace("src", "dst") for source in sources):
        targets += [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
            {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": f"{ns}-storagequota", "namespace": ns},
             "spec": {"hard": {"site-b-gold.storageclass.storage.k8s.io/requests.storage": "1Ti"}}},
            {"apiVersion": o.V, "kind": "VirtualMachineClass", "metadata": {"name": "site-b-small", "namespace": ns},
             "spec": {"hardware": {"cpus": 2, "memory": "4Gi"}}},
            {"apiVersion": o.V, "kind": "VirtualMachineImage", "metadata": {"name": "vmi-5b1e000000000000b", "namespace": ns},
             "spec": {}},
            {"apiVersion": "crd.nsx.vmware.com/v1alpha1", "kind": "SubnetSet",
             "metadata": {"name": "site-b-subnets", "namespace": ns}, "spec": {}},
        ]
    cluster.apply(targets)
    for ns in (source.replace("src", "dst") for source in sources):
        uid = cluster.get_json("virtualmachineclass", "site-b-small", "-n", ns)["metadata"]["uid"]
        cluster.apply({"apiVersion": o.V, "kind": "VirtualMachineClassInstance",
                       "metadata": {"name": f"site-b-small-{ns}", "namespace": ns,
                                    "labels": {"vmoperator.vmware.com/active": ""},
                                    "ownerReferences": [{"apiVersion": o.V, "kind": "VirtualMachineClass",
                                                         "name": "site-b-small", "uid": uid}]}, "spec": {}})
    cluster.velero("backup", "create", "b-plan", "--include-namespaces", ",".join(sources),
                   "--snapshot-volumes=false", "--wait", timeout=1800)
    cluster.apply([
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "change-storage-class", "namespace": VELERO_NS,
                      "labels": {"velero.io/plugin-config": "", "velero.io/change-storage-class": "RestoreItemAction"}},
         "data": {"wcpglobal-storage-profile": "site-b-gold"}},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "vm-mappings", "namespace": VELERO_NS,
                      "labels": {"velero.io/plugin-config": "", "velero-vm-restore-webhook/vm-mappings": "RestoreItemAction"}},
         "data": {"classes": "best-effort-small: site-b-small\n", "zones": "zone-0: az-1\n",
                  "images": "vmi-0a0044d7c690bcbea: vmi-5b1e000000000000b\n",
                  "networks": "SubnetSet/vm-default: SubnetSet/site-b-subnets\n"}},
    ])
    mappings = ",".join(f"{ns}:{ns.replace('src', 'dst')}" for ns in sources)
    env = {**os.environ, "KUBECONFIG": str(cluster.admin_kubeconfig)}
    plans, downloads = [], []
    for run in range(RUNS):
        tarball = cluster.tmp / f"b-plan-{run}.tar.gz"
        started = time.time()
        cluster.velero("backup", "download", "b-plan", "-o", str(tarball))
        downloads.append(time.time() - started)
        started = time.time()
        result = harness.run([cluster.webhook_bin, "plan", "b-plan", "--namespace-mappings", mappings, "-o", "json"],
                             env=env, timeout=1800)
        plans.append(time.time() - started)
        planned = json.loads(result.stdout)
        vms = [entry for entry in planned["objects"] if entry["kind"] == "VirtualMachine"]
        assert len(vms) == per_namespace * NAMESPACES, len(vms)
        mapped = sum(any(c["rule"] == "vm-map-class" for c in entry["changes"]) for entry in vms)
        assert mapped == len(vms), mapped
        denied = [entry["denial"] for entry in vms if entry["outcome"] == "denied"]
        assert not denied, denied[:3]
        print(f"[plan] run {run + 1}: {plans[-1]:.2f} s (download alone {downloads[-1]:.2f} s), "
              f"{planned['apiRequests']} API requests, {planned['referenceLookups']} distinct references", flush=True)
    report = {"vms": per_namespace * NAMESPACES, "namespaces": NAMESPACES, "runs": RUNS,
              "plan_seconds": [round(s, 2) for s in plans], "download_seconds": [round(s, 2) for s in downloads],
              "median_ratio_to_download": round(statistics.median(p / d for p, d in zip(plans, downloads)), 2),
              "api_requests": planned["apiRequests"], "reference_lookups": planned["referenceLookups"]}
    print(json.dumps(report))


if __name__ == "__main__":
    cluster = harness.Cluster()
    try:
        cluster.start()
        main(cluster)
    finally:
        cluster.close()
