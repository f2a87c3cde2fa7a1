"""The objects the scenarios restore, at VM Operator v1alpha5 (the newest
version the VM Operator module on the Go proxy, v1.10.0, serves)."""

V = "vmoperator.vmware.com/v1alpha5"

# What the webhook must remove from each kind, as JSON pointers.
VM_REMOVED = [
    "/spec/instanceUUID",
    "/metadata/annotations/virtualmachine.vmoperator.vmware.com~1first-boot-done",
    "/metadata/annotations/vmoperator.vmware.com~1bootstrap-hash-configspec",
]
VM_COPY_REMOVED = [
    "/spec/biosUUID",
    "/spec/bootstrap/cloudInit/instanceID",
    "/spec/network/interfaces/0/macAddr",
    "/spec/network/interfaces/0/addresses",
    "/spec/network/interfaces/0/gateway4",
]
PVC_REMOVED = [
    "/metadata/annotations/volumehealth.storage.kubernetes.io~1health",
    "/metadata/annotations/volumehealth.storage.kubernetes.io~1health-timestamp",
]


def secret(ns, name):
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
            "type": "Opaque", "stringData": {"user-data": "#cloud-config\nhostname: " + name}}


def pvc(ns, name, health=False):
    annotations = {"team": "web"}
    if health:
        annotations.update({"volumehealth.storage.kubernetes.io/health": "accessible",
                            "volumehealth.storage.kubernetes.io/health-timestamp": "Tue Nov 25 21:00:00 UTC 2026"})
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}},
                     "storageClassName": "wcpglobal-storage-profile"}}


def resource_policy(ns, name):
    return {"apiVersion": V, "kind": "VirtualMachineSetResourcePolicy", "metadata": {"name": name, "namespace": ns},
            "spec": {"resourcePool": {"name": name}, "folder": name}}


def group(ns, name, members, parent=None):
    spec = {"bootOrder": [{"members": members}], "powerState": "PoweredOn"}
    if parent:
        spec["groupName"] = parent
    return {"apiVersion": V, "kind": "VirtualMachineGroup", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def vm(ns, name, group_name, index, labels=None):
    spec = {
        "className": "best-effort-small", "imageName": "vmi-0a0044d7c690bcbea",
        "storageClass": "wcpglobal-storage-profile", "powerState": "PoweredOn",
        "instanceUUID": f"4210a6a4-7e7c-4f42-9a2b-64a1b6a6f2{index:02d}",
        "biosUUID": f"4210b2e5-3c1d-7a8b-2d4f-9e0c1a2b3c{index:02d}",
        "bootstrap": {"cloudInit": {"instanceID": f"iid-{name}", "rawCloudConfig": {"name": f"{name}-cloud-init", "key": "user-data"}}},
        "network": {"interfaces": [{"name": "eth0", "macAddr": f"00:50:56:9a:4b:{index:02x}",
                                    "addresses": [f"192.168.10.{20 + index}/24"], "gateway4": "192.168.10.1",
                                    "nameservers": ["192.168.10.2"]}]},
        "reserved": {"resourcePolicyName": "web-policy"},
    }
    if group_name:
        spec["groupName"] = group_name
    return {"apiVersion": V, "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": "web", **(labels or {})},
                         "annotations": {"virtualmachine.vmoperator.vmware.com/first-boot-done": "true",
                                         "vmoperator.vmware.com/bootstrap-hash-configspec": "6f1ed002ab5595859014ebf0951522d9",
                                         "owner": "team-web"}},
            "spec": spec}


def workload(ns):
    """Scenario 2's namespace: secrets, PVCs, a resource policy, a root group
    with a child group, and 3 VMs (web-1, web-2 in the child, db-1 in the root)."""
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        secret(ns, "web-1-cloud-init"), secret(ns, "web-2-cloud-init"),
        pvc(ns, "web-1-data", health=True), pvc(ns, "db-1-data"),
        resource_policy(ns, "web-policy"),
        group(ns, "app", [{"kind": "VirtualMachineGroup", "name": "web-tier"}, {"kind": "VirtualMachine", "name": "db-1"}]),
        group(ns, "web-tier", [{"kind": "VirtualMachine", "name": "web-1"}, {"kind": "VirtualMachine", "name": "web-2"}], parent="app"),
        vm(ns, "web-1", "web-tier", 1), vm(ns, "web-2", "web-tier", 2), vm(ns, "db-1", "app", 3),
    ]


SERVER_FIELDS = ["uid", "resourceVersion", "creationTimestamp", "generation", "managedFields", "selfLink"]


def comparable(obj):
    """An object without what the API server and Velero set on every create."""
    import copy
    out = copy.deepcopy(obj)
    meta = out.get("metadata", {})
    for field in SERVER_FIELDS:
        meta.pop(field, None)
    labels = meta.get("labels", {})
    for label in ("velero.io/restore-name", "velero.io/backup-name"):
        labels.pop(label, None)
    if not labels:
        meta.pop("labels", None)
    annotations = meta.get("annotations", {})
    annotations.pop("kubectl.kubernetes.io/last-applied-configuration", None)
    if not annotations:
        meta.pop("annotations", None)
    out.pop("status", None)
    return out


def remove_pointers(obj, pointers):
    import copy
    out = copy.deepcopy(obj)
    for pointer in pointers:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.lstrip("/").split("/")]
        node = out
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            del node[int(parts[-1])]
        else:
            del node[parts[-1]]
    return out


def diff(a, b, path=""):
    """Field-by-field differences, as readable lines."""
    lines = []
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a:
                lines.append(f"+ {path}/{key} = {b[key]!r}")
            elif key not in b:
                lines.append(f"- {path}/{key} = {a[key]!r}")
            else:
                lines.extend(diff(a[key], b[key], f"{path}/{key}"))
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            lines.extend(diff(x, y, f"{path}/{i}"))
    elif a != b:
        lines.append(f"~ {path}: {a!r} -> {b!r}")
    return lines


def boot_group(ns, name, steps, power_state="PoweredOn", labels=None):
    """A group whose boot order has `steps`: [(members, powerOnDelay or None)]."""
    order = []
    for members, delay in steps:
        step = {"members": [{"kind": "VirtualMachine", "name": m} for m in members]}
        if delay:
            step["powerOnDelay"] = delay
        order.append(step)
    spec = {"bootOrder": order}
    if power_state:
        spec["powerState"] = power_state
    metadata = {"name": name, "namespace": ns}
    if labels:
        metadata["labels"] = labels
    return {"apiVersion": V, "kind": "VirtualMachineGroup", "metadata": metadata, "spec": spec}


def boot_workload(ns):
    """A three-step boot order with delays: db-1 and db-2 first, app-1 45s
    later, web-1 20s after that."""
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        boot_group(ns, "stack", [(["db-1", "db-2"], None), (["app-1"], "45s"), (["web-1"], "20s")]),
        vm(ns, "db-1", "stack", 31), vm(ns, "db-2", "stack", 32),
        vm(ns, "app-1", "stack", 33), vm(ns, "web-1", "stack", 34),
    ]


def supervisor(ns, zones=("zone-a",)):
    """What a Supervisor namespace has before any VM: a storage class assigned
    to it through a ResourceQuota, a VM class, a content-library image, and a
    Zone per vSphere Zone it spans (with the cluster-scoped AvailabilityZone)."""
    docs = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "wcpglobal-storage-profile"},
         "provisioner": "csi.vsphere.vmware.com", "parameters": {"storagePolicyID": "aa6d5a82-1c88-45da-85d3-3d74b91a5bad"}},
        {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": f"{ns}-storagequota", "namespace": ns},
         "spec": {"hard": {"wcpglobal-storage-profile.storageclass.storage.k8s.io/requests.storage": "9223372036854775807"}}},
        {"apiVersion": V, "kind": "VirtualMachineClass", "metadata": {"name": "best-effort-small", "namespace": ns},
         "spec": {"hardware": {"cpus": 2, "memory": "4Gi"}}},
        {"apiVersion": V, "kind": "VirtualMachineImage", "metadata": {"name": "vmi-0a0044d7c690bcbea", "namespace": ns},
         "spec": {"providerRef": {"apiVersion": "imageregistry.vmware.com/v1alpha1", "kind": "ContentLibraryItem",
                                  "name": "clitem-0a0044d7c690bcbea"}}},
    ]
    for zone in zones:
        docs.append({"apiVersion": "topology.tanzu.vmware.com/v1alpha1", "kind": "AvailabilityZone",
                     "metadata": {"name": zone}, "spec": {"clusterComputeResourceMoIDs": [f"domain-c{len(zone)}"]}})
        docs.append({"apiVersion": "topology.tanzu.vmware.com/v1alpha1", "kind": "Zone",
                     "metadata": {"name": zone, "namespace": ns},
                     "spec": {"availabilityZoneReference": {"apiVersion": "topology.tanzu.vmware.com/v1alpha1", "name": zone},
                              "managedVMs": {"folderMoID": "group-v1001", "poolMoIDs": ["resgroup-1001"]}}})
    return docs


def active_class_instance(ns, vm_class):
    """The active instance of `vm_class` (the VirtualMachineClass object read
    from `ns`) that VM Operator names in each VM's spec.class
    (ImmutableClasses); its name differs per namespace, as a hash does."""
    return {"apiVersion": V, "kind": "VirtualMachineClassInstance",
            "metadata": {"name": f"{vm_class['metadata']['name']}-{ns}", "namespace": ns,
                         "labels": {"vmoperator.vmware.com/active": ""},
                         "ownerReferences": [{"apiVersion": V, "kind": "VirtualMachineClass",
                                              "name": vm_class["metadata"]["name"], "uid": vm_class["metadata"]["uid"]}]},
            "spec": vm_class["spec"]}


def supervisor_vm(ns, name, group_name, index, zone="zone-a"):
    """A VM as a VPC Supervisor stores it: its interface on the namespace's
    SubnetSet, and the zone VM Operator placed it in."""
    out = vm(ns, name, group_name, index, labels={"topology.kubernetes.io/zone": zone})
    out["spec"]["network"]["interfaces"][0]["network"] = {
        "apiVersion": "crd.nsx.vmware.com/v1alpha1", "kind": "SubnetSet", "name": "vm-default"}
    return out
