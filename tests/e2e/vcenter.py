"""vcsim, govmomi's vCenter simulator: the e2e's STAND-IN FOR vCENTER, and
the Supervisor objects VM Operator's real vSphere provider needs to deploy
into it.

vcsim runs in-process in tools/vmop's `vcsim-e2e serve` (govmomi's
simulator, vapi/simulator and pbm/simulator packages, at the version VM
Operator v1.10.0 requires), seeded as a Supervisor's vCenter is: a cluster per
vSphere Zone, distributed port groups, storage policies in PBM, and content
libraries with images (OVAs that ship in VM Operator's module). VM Operator
itself is no stand-in: its VirtualMachine controllers and vSphere provider
(`vmop-host --provider=vsphere`) deploy, reconfigure, power and delete VMs in
vcsim through the same APIs they use against vCenter.

On the API server side this module creates, per namespace, what a Supervisor
creates: the namespace's folder and resource pools in vcsim, its Zone
objects naming them, the storage class's quota, a VM class and its active
instance, and the VirtualMachineImage of a library item (with the status VM
Operator's content library controller would give it, from the item in
vcsim). Cluster-wide: the provider ConfigMap and credentials Secret in
vmware-system-vmop, the StorageClasses with their PBM policy IDs, and the
AvailabilityZones.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import harness
from harness import VMOP_NS, log, wait_until

V = "vmoperator.vmware.com/v1alpha5"
TOPOLOGY = "topology.tanzu.vmware.com/v1alpha1"
ZONE_LABEL = "topology.kubernetes.io/zone"

# What vcsim holds, as a Supervisor's vCenter would: site A's zones and
# everything named for site B (another Supervisor's zone, network, storage
# policy and library), in one vCenter: see test_vcenter_5.
ZONES = ("zone-a", "zone-b", "az-1")
NETWORKS = ("site-a-net", "site-b-net")
POLICIES = ("wcpglobal-storage-profile", "site-b-gold")
IMAGES_DIR = Path("test") / "builder" / "testdata" / "images"
# Library/item -> the OVA from VM Operator's module it is uploaded from, and
# its guest OS: two different OVAs, so which one a VM was deployed from shows
# in vcsim as its disk's capacity (ttylinux: 30 MiB; the ESX appliance: 32 GiB).
ITEMS = {"site-a-images/ttylinux": ("ttylinux-pc_i486-16.1.ova", "otherLinuxGuest"),
         "site-b-images/esxvm": ("vmware/esx/esxvmovf-25262174.ova", "vmkernel8Guest")}
DISK_KB = {"site-a-images/ttylinux": 30 * 1024, "site-b-images/esxvm": 32 * 1024 * 1024}


class VCenter:
    """vcsim (the stand-in for vCenter) in its own process, started by and
    stopped with `cluster`."""

    def __init__(self, cluster: harness.Cluster):
        self.cluster = cluster
        self.env_file = cluster.tmp / "vcsim-env.json"
        self.bin = cluster.bin / "vcsim-e2e"

    def start(self) -> dict:
        images = harness.vmop_config_dir().parent / IMAGES_DIR
        args = [a for zone in ZONES for a in ("--zone", zone)]
        args += [a for net in NETWORKS for a in ("--network", net)]
        args += [a for policy in POLICIES for a in ("--policy", policy)]
        args += [a for item, (ova, _) in ITEMS.items() for a in ("--item", f"{item}={images / ova}")]
        process = self.cluster.spawn("vcsim", [self.bin, "serve", "--env", self.env_file, *args])
        wait_until(self.env_file.exists, 60, "vcsim (the stand-in for vCenter) to be seeded", process=process)
        self.env = json.loads(self.env_file.read_text())
        log(f"vcsim, the stand-in for vCenter, at {self.env['url']}: datacenter {self.env['datacenter']}, "
            f"zones {json.dumps(self.env['zones'])}, networks {json.dumps(self.env['networks'])}, "
            f"storage policies {json.dumps(self.env['storagePolicies'])}, "
            f"library items {json.dumps({k: (v['id'], v['source']) for k, v in self.env['items'].items()})}")
        return self.env

    def namespace(self, ns: str) -> dict:
        """The namespace's folder and, per zone, resource pool in vcsim
        (made if missing), as the Supervisor makes them."""
        return json.loads(harness.run([self.bin, "namespace", "--env", self.env_file, ns]).stdout)

    def inventory(self) -> dict:
        """Every VM vcsim holds, by MoID, and its VM events."""
        out = json.loads(harness.run([self.bin, "inventory", "--env", self.env_file]).stdout)
        return {"vms": {vm["moid"]: vm for vm in out["vms"]}, "events": out["events"]}

    def vms(self) -> dict:
        return self.inventory()["vms"]

    def item(self, name: str) -> dict:
        return self.env["items"][name]


def configure_vm_operator(cluster: harness.Cluster, vc: VCenter) -> None:
    """What VM Operator's vSphere provider reads to reach vCenter: its
    provider ConfigMap and the credentials Secret in its namespace (as the
    Supervisor writes them), and the network ConfigMap its bootstrap reads."""
    env = vc.env
    cluster.apply([
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": VMOP_NS}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "wcp-vmop-sa-vc-auth", "namespace": VMOP_NS},
         "stringData": {"username": env["username"], "password": env["password"]}},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "vsphere.provider.config.vmoperator.vmware.com", "namespace": VMOP_NS},
         "data": {"VcPNID": env["host"], "VcPort": env["port"], "VcCredsSecretName": "wcp-vmop-sa-vc-auth",
                  "Datacenter": env["datacenter"], "CAFilePath": env["caFile"], "InsecureSkipTLSVerify": "false",
                  "StorageClassRequired": "true"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "vmoperator-network-config", "namespace": VMOP_NS},
         "data": {"nameservers": "192.168.10.2"}},
    ])
    cluster.apply([{"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": name},
                    "provisioner": "csi.vsphere.vmware.com", "parameters": {"storagePolicyID": policy}}
                   for name, policy in env["storagePolicies"].items()])
    cluster.apply([{"apiVersion": TOPOLOGY, "kind": "AvailabilityZone", "metadata": {"name": zone},
                    "spec": {"clusterComputeResourceMoIDs": [z["cluster"]]}} for zone, z in env["zones"].items()])


class Site:
    """The names one Supervisor gives what a VM refers to."""

    def __init__(self, storage_class, vm_class, item, network, zones):
        self.storage_class, self.vm_class, self.item, self.network, self.zones = \
            storage_class, vm_class, item, network, zones


SITE_A = Site("wcpglobal-storage-profile", "best-effort-small", "site-a-images/ttylinux", "site-a-net", ("zone-a", "zone-b"))
SITE_B = Site("site-b-gold", "site-b-small", "site-b-images/esxvm", "site-b-net", ("az-1",))


def vmi_name(vc: VCenter, site: Site) -> str:
    return vc.item(site.item)["vmiName"]


def prepare_namespace(cluster: harness.Cluster, vc: VCenter, ns: str, site: Site = SITE_A) -> dict:
    """A Supervisor namespace of `site`, made as the Supervisor makes one, in
    vcsim and on the API server; waits until VM Operator admits a VM that
    uses it. Returns the namespace's folder and pools in vcsim."""
    placed = vc.namespace(ns)
    item = vc.item(site.item)
    vmi = item["vmiName"]
    docs = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": f"{ns}-storagequota", "namespace": ns},
         "spec": {"hard": {f"{site.storage_class}.storageclass.storage.k8s.io/requests.storage": "9223372036854775807"}}},
        # What the Supervisor's storage quota service keeps per namespace and
        # storage class, and VM Operator fills with its VMs' usage.
        {"apiVersion": "cns.vmware.com/v1alpha2", "kind": "StoragePolicyUsage",
         "metadata": {"name": f"{site.storage_class}-vm-usage", "namespace": ns},
         "spec": {"storagePolicyId": vc.env["storagePolicies"][site.storage_class], "storageClassName": site.storage_class,
                  "resourceApiGroup": "vmoperator.vmware.com", "resourceKind": "VirtualMachine",
                  "resourceExtensionName": "vmservice.cns.vsphere.vmware.com"}},
        # As wcpsvc writes a class: its hardware, and the configSpec VM
        # Operator deploys with (and names the class's instance by).
        {"apiVersion": V, "kind": "VirtualMachineClass", "metadata": {"name": site.vm_class, "namespace": ns},
         "spec": {"hardware": {"cpus": 1, "memory": "512Mi"},
                  "configSpec": {"_typeName": "VirtualMachineConfigSpec", "numCPUs": 1, "memoryMB": 512}}},
        {"apiVersion": V, "kind": "VirtualMachineImage", "metadata": {"name": vmi, "namespace": ns},
         "spec": {"providerRef": {"apiVersion": "imageregistry.vmware.com/v1alpha1", "kind": "ContentLibraryItem",
                                  "name": "clitem-" + vmi.removeprefix("vmi-")}}},
    ]
    for zone in site.zones:
        docs.append({"apiVersion": TOPOLOGY, "kind": "Zone", "metadata": {"name": zone, "namespace": ns},
                     "spec": {"availabilityZoneReference": {"apiVersion": TOPOLOGY, "name": zone},
                              "managedVMs": {"folderMoID": placed["folder"], "poolMoIDs": [placed["pools"][zone]]}}})
    cluster.apply(docs)
    # The image's status, as VM Operator's content library controller
    # writes it from the library item in vcsim.
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = {"status": {"name": item["name"], "type": "OVF", "providerItemID": item["id"],
                         "providerContentVersion": item["contentVersion"], "firmware": "bios",
                         "osInfo": {"type": ITEMS[site.item][1]},
                         "conditions": [{"type": "Ready", "status": "True", "reason": "True", "message": "",
                                         "lastTransitionTime": now}]}}
    cluster.kubectl("patch", "virtualmachineimage", vmi, "-n", ns, "--subresource=status", "--type=merge",
                    "-p", json.dumps(status))
    # VM Operator's class controller makes the class's active instance.
    instance = wait_until(lambda: active_instance(cluster, ns, site.vm_class), 60,
                          f"VM Operator's class controller to make {ns}/{site.vm_class}'s instance")
    probe = vm(ns, "probe", vc, site)
    text = json.dumps(probe)

    def admitted():
        result = cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=text, check=False)
        return result.returncode == 0 and json.loads(result.stdout)["spec"].get("class", {}).get("name") == instance

    wait_until(admitted, 30, f"VM Operator to see the Supervisor objects of {ns}")
    return placed


def active_instance(cluster: harness.Cluster, ns: str, vm_class: str) -> str | None:
    for item in cluster.get_json("virtualmachineclassinstances", "-n", ns)["items"]:
        owners = [o["name"] for o in item["metadata"].get("ownerReferences", [])]
        if vm_class in owners and "vmoperator.vmware.com/active" in item["metadata"].get("labels", {}):
            return item["metadata"]["name"]
    return None


def cloud_init(ns: str, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-cloud-init", "namespace": ns},
            "type": "Opaque", "stringData": {"user-data": f"#cloud-config\nhostname: {name}\n"}}


def vm(ns: str, name: str, vc: VCenter, site: Site = SITE_A, *, zone: str | None = None, group: str | None = None,
       policy: str | None = None, power: str = "PoweredOn") -> dict:
    """A VM as a user writes it on a Supervisor whose network provider finds
    port groups by name (VM Operator allows interfaces[].macAddr with NSX
    providers only: vCenter assigns the MAC); VM Operator's mutating webhook
    adds its UUIDs."""
    interface = {"name": "eth0", "network": {"name": site.network}}
    spec = {"className": site.vm_class, "imageName": vmi_name(vc, site), "storageClass": site.storage_class,
            "powerState": power, "network": {"interfaces": [interface]},
            "bootstrap": {"cloudInit": {"rawCloudConfig": {"name": f"{name}-cloud-init", "key": "user-data"}}}}
    if group:
        spec["groupName"] = group
    if policy:
        spec["reserved"] = {"resourcePolicyName": policy}
    return {"apiVersion": V, "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": ns, "labels": {ZONE_LABEL: zone or site.zones[0]}},
            "spec": spec}


def deployed(cluster: harness.Cluster, vc: VCenter, ns: str, names, *, powered_on: bool = True, timeout: float = 180) -> dict:
    """Waits until VM Operator reports each VM created in vcsim (its
    status.uniqueID, the VM's MoID, present there) and, when `powered_on`,
    vcsim has it powered on. Returns {name: (object, vcsim VM)}."""
    names = list(names)

    def ready():
        objects = {o["metadata"]["name"]: o for o in cluster.get_json("virtualmachines", "-n", ns)["items"]}
        vms = vc.vms()
        out = {}
        for name in names:
            obj = objects.get(name)
            moid = (obj or {}).get("status", {}).get("uniqueID")
            if not moid or moid not in vms:
                return None
            if powered_on and vms[moid]["powerState"] != "poweredOn":
                return None
            out[name] = (obj, vms[moid])
        return out

    return wait_until(ready, timeout, f"VM Operator to deploy {ns}/{{{','.join(names)}}} in vcsim"
                      + (" and power it on" if powered_on else ""), interval=1,
                      process=cluster.processes["vmop-host"])


def summary(vm: dict) -> dict:
    """What the scenarios print of a vcsim VM."""
    return {"moid": vm["moid"], "name": vm["name"], "instanceUUID": vm["instanceUUID"], "biosUUID": vm["biosUUID"],
            "power": vm["powerState"], "bootTime": vm["bootTime"], "macs": vm["macs"], "networks": vm["networks"],
            "pool": vm["resourcePool"], "folder": vm["folder"], "diskKB": vm["diskKB"],
            "managedBy": vm["extraConfig"].get("vmservice.namespacedName")}


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def vm_operator_log(cluster: harness.Cluster, needle: str) -> list[dict]:
    """VM Operator's log entries whose message contains `needle`."""
    entries = []
    for line in (cluster.tmp / "vmop-host.log").read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if needle in entry.get("msg", ""):
            entries.append(entry)
    return entries
