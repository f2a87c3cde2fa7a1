"""What happens in "vCenter" after a Velero restore: VM Operator v1.10.0's own
VirtualMachine controllers and vSphere provider deploy the restored objects
into vcsim, govmomi's vCenter simulator, THE STAND-IN FOR vCENTER here
(vcenter.py). VM Operator's webhooks, conversion and group controller run as
in test_vmop.py; Velero restores as its own, non-privileged ServiceAccount,
through our webhook and its companion. Each scenario prints what vcsim
holds (MoIDs, UUIDs, MACs, power-on times) as `[e2e]` lines.

Own environment (API server, Velero, webhook, VM Operator, vcsim), so VM
Operator's real provider never sees the other files' objects; `make
e2e-vcenter` runs this file alone. What vcsim cannot show is in
docs/testing.md ("What vcsim cannot show")."""

import datetime
import json
import time

import pytest

import harness
import objects as o
import vcenter as vcs
from harness import VELERO_NS, log, wait_until
from vcenter import SITE_A, SITE_B

REPORT: dict = {}
BASE_TIME = "vmoperator.vmware.com.protected/last-updated-power-state-time"
# What the Supervisor makes in a namespace, never restored from a backup:
# the target's own (the restore would otherwise bring the source's).
SUPERVISOR_MADE = ",".join(["zones.topology.tanzu.vmware.com", "availabilityzones.topology.tanzu.vmware.com",
                            "resourcequotas", "storagepolicyusages.cns.vmware.com",
                            "virtualmachineclasses.vmoperator.vmware.com",
                            "virtualmachineclassinstances.vmoperator.vmware.com",
                            "virtualmachineimages.vmoperator.vmware.com"])
VELERO_USER = f"system:serviceaccount:{VELERO_NS}:velero"
# Boot order: how far a power-on in vcsim may be from its configured delay.
# VM Operator requeues a member for its apply time (to the millisecond) and
# powers it on in that reconcile; the slack covers that reconcile's vCenter
# calls and a first member still deploying when the group's power is set,
# on 2 shared cores.
BOOT_TOLERANCE_S = 3.0


@pytest.fixture(scope="module")
def vc():
    """An environment of its own: control plane, our webhook, Velero, vcsim
    and VM Operator with its vSphere provider. Another environment's Velero
    (the session's, under `make e2e`) rests meanwhile: Velero's metrics port
    is fixed."""
    others = [c for c in harness.Cluster.live if "velero" in c.processes]
    for other in others:
        other.processes.pop("velero").stop()
    try:
        with harness.Cluster() as cluster:
            center = vcs.VCenter(cluster)
            center.start()
            cluster.start_vm_operator(provider="vsphere")
            vcs.configure_vm_operator(cluster, center)
            cluster.vcsim = center
            yield cluster
    finally:
        for other in others:
            other.start_velero()


def source(cluster, ns, vms, extra=()):
    """Creates a namespace's workload as its users did (VM Operator fills
    in the UUIDs) and waits until VM Operator has deployed and powered it on
    in vcsim. `vms`: [(name, kwargs for vcenter.vm)]."""
    vc = cluster.vcsim
    placed = vcs.prepare_namespace(cluster, vc, ns)
    cluster.apply([vcs.cloud_init(ns, name) for name, _ in vms] + list(extra)
                  + [vcs.vm(ns, name, vc, **kwargs) for name, kwargs in vms])
    running = vcs.deployed(cluster, vc, ns, [name for name, _ in vms])
    return placed, running


def restore(cluster, name, backup, *extra):
    restored = cluster.restore(name, backup, "--exclude-resources", SUPERVISOR_MADE, *extra)
    details = cluster.restore_describe(name)
    assert restored["status"]["phase"] == "Completed", details
    assert restored["status"].get("errors", 0) == 0, details
    return restored


def figures(running):
    return {name: vcs.summary(vm) for name, (_, vm) in running.items()}


def test_vcenter_1_disaster_recovery_deploys_every_vm_anew(vc):
    """The namespace and its VMs are gone (deleted: VM Operator deleted the
    VMs in vcsim); the Supervisor makes the namespace again and Velero
    restores it. Every restored VM is deployed in vcsim from the image: a
    new MoID, a new instance UUID (VM Operator's, not the backup's), on the
    namespace's network, folder and zone pool, powered on."""
    ns = "dr"
    zones = {"web-1": "zone-a", "db-1": "zone-b"}
    placed, original = source(vc, ns, [(name, {"zone": zone}) for name, zone in zones.items()])
    before = figures(original)
    vc.backup("b-dr", ns)

    vc.delete_namespace(ns)
    left = vc.vcsim.vms()
    assert not [m for m in (v["moid"] for v in before.values()) if m in left], \
        f"VM Operator left the deleted namespace's VMs in vcsim: {json.dumps(before)}"
    placed = vcs.prepare_namespace(vc, vc.vcsim, ns)
    restore(vc, "r-dr", "b-dr")
    restored = vcs.deployed(vc, vc.vcsim, ns, before)
    after = figures(restored)
    REPORT["disaster_recovery"] = {"before": before, "after": after}
    log(f"vcsim (stand-in for vCenter) before the disaster: {json.dumps(before)}")
    log(f"vcsim after r-dr: {json.dumps(after)}")

    for name, (obj, vm) in restored.items():
        was = before[name]
        assert vm["moid"] != was["moid"], (name, vm["moid"])
        assert vm["instanceUUID"] != was["instanceUUID"], f"{name} deployed with the backup's instance UUID"
        assert vm["instanceUUID"] == obj["spec"]["instanceUUID"], "vcsim holds the instance UUID VM Operator gave it"
        assert vm["powerState"] == "poweredOn" and vm["bootTime"], vm
        assert vm["networks"] == [SITE_A.network], vm
        assert vm["folder"] == placed["folder"], vm
        zone = obj["metadata"]["labels"][vcs.ZONE_LABEL]
        assert zone == zones[name] and vm["resourcePool"] == placed["pools"][zone], (zone, vm)
        assert vm["diskKB"] == [vcs.DISK_KB[SITE_A.item]], f"deployed from site A's image (ttylinux): {vm['diskKB']}"
        assert vm["extraConfig"].get("vmservice.namespacedName") == f"{ns}/{name}", vm["extraConfig"]
    retire(vc, ns)


def settled(vc, moids, quiet=3.0, timeout=60):
    """Waits until vcsim has recorded no event for `moids` for `quiet`
    seconds (VM Operator reconfigures a VM right after powering it on), and
    returns the inventory then: a baseline to compare with."""
    def still():
        inventory = vc.vcsim.inventory()
        last = max((vcs.parse_time(e["time"]) for e in inventory["events"] if e["vm"] in moids), default=None)
        now = datetime.datetime.now(datetime.timezone.utc)
        return inventory if last is None or (now - last).total_seconds() >= quiet else None

    return wait_until(still, timeout, f"vcsim to record no more events for {sorted(moids)}", interval=1)


def deployed_for(inventory, ns):
    """The VMs VM Operator deployed for objects of `ns`, by name: at create
    it records the object in the VM's ExtraConfig (vmservice.namespacedName),
    and keeps that record when another object takes the VM over."""
    return {v["extraConfig"]["vmservice.namespacedName"].split("/", 1)[1]: m for m, v in inventory["vms"].items()
            if v["extraConfig"].get("vmservice.namespacedName", "").startswith(f"{ns}/")}


def retire(vc, *namespaces):
    """Deletes namespaces a scenario is done with, without waiting: VM
    Operator deletes their VMs in vcsim meanwhile, and reconciles fewer."""
    for ns in namespaces:
        vc.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


def events_since(inventory, moids, key):
    """The events vcsim recorded for `moids` after the event with `key`."""
    return [e for e in inventory["events"] if e["vm"] in moids and e["key"] > key]


def last_event_key(inventory):
    return max((e["key"] for e in inventory["events"]), default=0)


# What must not change on the original VM in vcsim.
UNTOUCHED = ("moid", "name", "instanceUUID", "biosUUID", "powerState", "bootTime", "changeVersion", "macs",
             "networks", "resourcePool", "folder", "extraConfig")


def untouched(vm):
    return {k: vm[k] for k in UNTOUCHED}


def test_vcenter_2_a_copy_beside_the_original_is_a_new_vm(vc):
    """A backup restored into another namespace of the same Supervisor
    (--namespace-mappings) while the original runs, in the same vCenter.
    The original vcsim VM is untouched (MoID, power, UUIDs, MAC, config
    version, no event); each copy is a different VM, with its own instance
    UUID, BIOS UUID and MAC (vcsim derives a generated MAC from the BIOS
    UUID), in the copy namespace's folder. Deleting a copy's object deletes
    that copy in vcsim and leaves the original running."""
    src, dst = "app", "app-copy"
    _, original = source(vc, src, [("web-1", {"zone": "zone-a"}), ("db-1", {"zone": "zone-b"})])
    vc.backup("b-app", src)
    originals = {name: vm["moid"] for name, (_, vm) in original.items()}
    baseline = settled(vc, set(originals.values()))
    before = {name: baseline["vms"][moid] for name, moid in originals.items()}
    mark = last_event_key(baseline)

    placed = vcs.prepare_namespace(vc, vc.vcsim, dst)
    restore(vc, "r-copy", "b-app", "--namespace-mappings", f"{src}:{dst}")
    copies = vcs.deployed(vc, vc.vcsim, dst, originals)
    after = settled(vc, set(originals.values()) | {vm["moid"] for _, vm in copies.values()})
    REPORT["copy"] = {"originals": {n: vcs.summary(v) for n, v in before.items()},
                      "copies": {n: vcs.summary(after["vms"][vm["moid"]]) for n, (_, vm) in copies.items()}}
    log(f"vcsim (stand-in for vCenter) originals in {src}: {json.dumps(REPORT['copy']['originals'])}")
    log(f"vcsim copies in {dst} after r-copy: {json.dumps(REPORT['copy']['copies'])}")

    touched = events_since(after, set(originals.values()), mark)
    assert not touched, f"vcsim recorded events on the originals during the restore: {touched}"
    for name, was in before.items():
        now = after["vms"].get(was["moid"])
        assert now is not None, f"original {src}/{name} ({was['moid']}) is gone from vcsim"
        assert untouched(now) == untouched(was), f"original {src}/{name} changed: {untouched(was)} -> {untouched(now)}"
        obj, copy = copies[name]
        assert copy["moid"] != was["moid"], f"{dst}/{name} took over the original {was['moid']}"
        for key in ("instanceUUID", "biosUUID", "macs"):
            assert copy[key] != was[key], f"{dst}/{name} {key} {copy[key]} is the original's"
        assert copy["instanceUUID"] == obj["spec"]["instanceUUID"] and copy["biosUUID"] == obj["spec"]["biosUUID"], \
            "vcsim holds the UUIDs VM Operator gave the copy"
        assert copy["folder"] == placed["folder"] and copy["extraConfig"]["vmservice.namespacedName"] == f"{dst}/{name}", copy
        assert copy["powerState"] == "poweredOn", copy

    web = copies["web-1"][1]["moid"]
    vc.kubectl("delete", "virtualmachine", "web-1", "-n", dst, "--timeout=120s")
    gone = wait_until(lambda: (lambda vms: vms if web not in vms else None)(vc.vcsim.vms()), 60,
                      f"VM Operator to delete the copy {web} in vcsim")
    assert before["web-1"]["moid"] in gone and gone[before["web-1"]["moid"]]["powerState"] == "poweredOn", \
        "deleting the copy's object left the original running"
    REPORT["copy"]["deleted"] = {"copy": web, "original_still": before["web-1"]["moid"]}
    log(f"vcsim after deleting {dst}/web-1: copy {web} gone, original {before['web-1']['moid']} still poweredOn")
    retire(vc, dst)


def test_vcenter_3_without_our_webhook_the_restore_takes_over_the_original(vc):
    """The negative control, on VM Operator's own code: the restore of
    test 2 WITHOUT our webhook, Velero's ServiceAccount in VM Operator's
    PRIVILEGED_USERS (so VM Operator accepts the backup's spec.instanceUUID).
    VM Operator finds the original by that instance UUID and adopts it: the
    restored object's status.uniqueID is the original's MoID and vcsim gets
    no new VM. Deleting the restored object deletes the ORIGINAL VM. This is
    the harm our cleanup prevents; the test fails if it does not happen."""
    src, dst = "app", "app-harm"
    originals = {o["metadata"]["name"]: o["status"]["uniqueID"]
                 for o in vc.get_json("virtualmachines", "-n", src)["items"]}
    inventory = settled(vc, set(originals.values()))
    before = {name: inventory["vms"][moid] for name, moid in originals.items()}
    mark = last_event_key(inventory)
    vcs.prepare_namespace(vc, vc.vcsim, dst)
    vc.kubectl("delete", "mutatingwebhookconfiguration", vc.mwc["metadata"]["name"])
    vc.restart_vm_operator(privileged_users=VELERO_USER)
    try:
        restored = vc.restore("r-harm", "b-app", "--exclude-resources", SUPERVISOR_MADE,
                              "--namespace-mappings", f"{src}:{dst}")
        assert restored["status"]["phase"] == "Completed", vc.restore_describe("r-harm")
        adopted = vcs.deployed(vc, vc.vcsim, dst, originals, powered_on=False)
        # Two objects now manage each original: no waiting for vcsim to
        # settle (each rewrites VM Operator's backup in the VM's ExtraConfig
        # that the other wrote, at every reconcile).
        inventory = vc.vcsim.inventory()
        fights = [e for e in events_since(inventory, set(originals.values()), mark) if e["type"] == "VmReconfiguredEvent"]
        REPORT["negative_control_reconfigures_of_originals"] = len(fights)
        REPORT["negative_control"] = {
            name: {"original": vcs.summary(before[name]), "restored_uniqueID": obj["status"]["uniqueID"],
                   "restored_instanceUUID": obj["spec"]["instanceUUID"],
                   "vcsim_now": vcs.summary(inventory["vms"][obj["status"]["uniqueID"]])}
            for name, (obj, _) in adopted.items()}
        log(f"vcsim (stand-in for vCenter) after r-harm WITHOUT our webhook: {json.dumps(REPORT['negative_control'])}; "
            f"{len(fights)} reconfigures of the originals since the restore began")
        for name, (obj, vm) in adopted.items():
            assert obj["spec"]["instanceUUID"] == before[name]["instanceUUID"], "the backup's instance UUID was kept"
            assert obj["status"]["uniqueID"] == before[name]["moid"], \
                f"{dst}/{name} did not adopt the original {before[name]['moid']}: {obj['status']['uniqueID']}"
        in_harm = deployed_for(inventory, dst)
        assert not in_harm, f"no VM was deployed for {dst} ({in_harm}): it took the originals over"

        vc.kubectl("delete", "virtualmachine", "web-1", "-n", dst, "--timeout=120s")
        victim = before["web-1"]["moid"]
        wait_until(lambda: victim not in vc.vcsim.vms(), 60,
                   f"VM Operator to delete {victim} for the restored object {dst}/web-1")
        removed = [e for e in vc.vcsim.inventory()["events"] if e["vm"] == victim and e["type"] == "VmRemovedEvent"]
        REPORT["negative_control_deleted"] = {"original": f"{src}/web-1", "moid": victim, "events": removed}
        log(f"vcsim after deleting {dst}/web-1: the ORIGINAL {src}/web-1 ({victim}) is deleted: {removed}")
        assert removed, f"vcsim recorded no removal of {victim}"
    finally:
        vc.restart_vm_operator()
        vc.apply(vc.mwc)
        wait_until(lambda: vc.kubectl("get", "mutatingwebhookconfiguration", vc.mwc["metadata"]["name"],
                                      check=False).returncode == 0, 30, "our webhook registered again")
        retire(vc, dst, src)


def power_ons(inventory, moid):
    """When vcsim powered `moid` on, each time (its VmPoweredOnEvents)."""
    return sorted(vcs.parse_time(e["time"]) for e in inventory["events"]
                  if e["vm"] == moid and e["type"] == "VmPoweredOnEvent")


def test_vcenter_4_a_restored_group_powers_on_in_boot_order(vc):
    """A group whose boot order is db-1 5 s after the group's power is set,
    then app-1 15 s later, then web-1 10 s after that, restored beside its
    source. Our webhook holds the group's power during the restore; its
    companion sets it back when the Restore has finished; VM Operator's group
    controller gives each member its apply time and its vSphere provider
    powers each on in vcsim then. vcsim's power-on times (VmPoweredOnEvent)
    come in that order, after the Restore finished, with gaps (and offsets
    from the group's power time) within BOOT_TOLERANCE_S of the configured
    delays. A member whose apply time passes while VM Operator is still
    creating it would power on when it is ready instead; so the companion
    starts the group only once VM Operator reports every member created
    (within --companion-start-wait), which the members' Created conditions,
    all before the group's power time, show."""
    src, dst = "boot-src", "boot-dst"
    steps = [(["db-1"], "5s"), (["app-1"], "15s"), (["web-1"], "10s")]
    group = o.boot_group(src, "stack", steps)
    zones = {"db-1": "zone-a", "app-1": "zone-b", "web-1": "zone-a"}
    source(vc, src, [(name, {"zone": zone, "group": "stack"}) for name, zone in zones.items()], extra=[group])
    vc.backup("b-boot", src)

    vcs.prepare_namespace(vc, vc.vcsim, dst)
    restore(vc, "r-boot", "b-boot", "--namespace-mappings", f"{src}:{dst}")
    completed = vcs.parse_time(vc.get_json("restore", "r-boot", "-n", VELERO_NS)["status"]["completionTimestamp"])
    vc.wait_for_companion("r-boot")
    restored = vcs.deployed(vc, vc.vcsim, dst, zones, timeout=120)
    inventory = vc.vcsim.inventory()
    group = vc.get_json("virtualmachinegroup", "stack", "-n", dst)
    base = vcs.parse_time(group["metadata"]["annotations"][BASE_TIME])
    first = {}
    for name, (_, vm) in restored.items():
        times = power_ons(inventory, vm["moid"])
        assert len(times) == 1, f"{dst}/{name} ({vm['moid']}) powered on {len(times)} times: {times}"
        first[name] = times[0]
    order = sorted(first, key=first.get)
    # When VM Operator had created each member in vcsim (its Created
    # condition, whole seconds), against the power base: a member still being
    # created when its apply time passes powers on when it is ready instead.
    created = {name: round((vcs.parse_time(condition(obj, "VirtualMachineCreated")["lastTransitionTime"]) - base)
                           .total_seconds(), 1) for name, (obj, _) in restored.items()}
    configured = {"db-1": 5.0, "app-1": 20.0, "web-1": 30.0}
    offsets = {name: round((first[name] - base).total_seconds(), 2) for name in order}
    gaps = {"db-1 -> app-1": round((first["app-1"] - first["db-1"]).total_seconds(), 2),
            "app-1 -> web-1": round((first["web-1"] - first["app-1"]).total_seconds(), 2)}
    REPORT["boot_order"] = {"restore_completed": str(completed), "power_base": str(base),
                            "vms": {n: {"moid": restored[n][1]["moid"], "poweredOn": str(first[n])} for n in order},
                            "offsets_from_base_s": offsets, "configured_s": configured, "gaps_s": gaps,
                            "created_from_base_s": created, "tolerance_s": BOOT_TOLERANCE_S}
    log(f"vcsim (stand-in for vCenter) power-ons after r-boot: {json.dumps(REPORT['boot_order'])}")

    assert order == ["db-1", "app-1", "web-1"], f"power-on order in vcsim: {order} ({first})"
    # The companion waited for VM Operator to create every member first.
    assert all(seconds <= 1.0 for seconds in created.values()), f"created after the power base: {created}"
    # RFC 3339 timestamps of the API server have whole seconds.
    assert min(first.values()) >= completed - datetime.timedelta(seconds=1), \
        f"a member powered on at {min(first.values())}, before the Restore finished at {completed}"
    for (step, gap), delay in zip(gaps.items(), (15.0, 10.0)):
        assert abs(gap - delay) <= BOOT_TOLERANCE_S, f"{step}: {gap}s in vcsim, configured {delay}s ±{BOOT_TOLERANCE_S}s"
    for name in order:
        assert abs(offsets[name] - configured[name]) <= BOOT_TOLERANCE_S, \
            f"{name} powered on {offsets[name]}s after the group's power was set, configured {configured[name]}s"
    retire(vc, src, dst)


def condition(obj, kind):
    return next(c for c in obj["status"]["conditions"] if c["type"] == kind)


SITE_B_STORAGE = {"wcpglobal-storage-profile": "site-b-gold"}


def site_b_mappings(vc):
    a, b = vcs.vmi_name(vc.vcsim, SITE_A), vcs.vmi_name(vc.vcsim, SITE_B)
    return {"classes": f"{SITE_A.vm_class}: {SITE_B.vm_class}\n", "images": f"{a}: {b}\n",
            "networks": f"{SITE_A.network}: {SITE_B.network}\n",
            "zones": "".join(f"{zone}: az-1\n" for zone in SITE_A.zones)}


def plugin_configmap(name, label, data):
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": VELERO_NS,
                         "labels": {"velero.io/plugin-config": "", label: "RestoreItemAction"}},
            "data": data}


def test_vcenter_5_into_another_supervisor_deploys_from_the_mapped_references(vc):
    """test 2's backup restored into a namespace of "another Supervisor":
    every name a VM refers to differs (storage class, VM class, image,
    network, zone), and so does what they stand for in vCenter (its own
    storage policy, library item, port group, and a zone on another cluster).
    One vcsim holds both sites: it is the vCenter objects that must differ,
    and that the mapping reaches them. With Velero's change-storage-class
    ConfigMap and ours, VM Operator deploys each VM from site B's library
    item (the ESX appliance OVA: a 32 GiB disk, where site A's ttylinux has
    30 MiB), on site B's port group, in site B's zone's resource pool and
    the namespace's folder."""
    ns = "site-b"
    placed = vcs.prepare_namespace(vc, vc.vcsim, ns, SITE_B)
    vc.apply([plugin_configmap("change-storage-class", "velero.io/change-storage-class", SITE_B_STORAGE),
              plugin_configmap("vm-mappings", "velero-vm-restore-webhook/vm-mappings", site_b_mappings(vc))])
    try:
        time.sleep(2)  # the webhook's ConfigMap watch
        restore(vc, "r-site-b", "b-app", "--namespace-mappings", f"app:{ns}")
        deployed = vcs.deployed(vc, vc.vcsim, ns, ["web-1", "db-1"])
    finally:
        vc.kubectl("delete", "configmap", "-n", VELERO_NS, "change-storage-class", "vm-mappings", "--ignore-not-found")
    item = vc.vcsim.item(SITE_B.item)
    figures_b = {}
    for name, (obj, vm) in deployed.items():
        figures_b[name] = {**vcs.summary(vm), "spec": {k: obj["spec"].get(k) for k in ("storageClass", "className", "imageName")},
                           "zone": obj["metadata"]["labels"].get(vcs.ZONE_LABEL)}
    # What VM Operator asked vCenter for, from its log line before each
    # deploy: the library item and the storage policy (which vcsim ignores).
    asked = {e["VirtualMachine"]["name"]: (e["itemID"], e["deploy"]["deployment_spec"].get("storage_profile_id"))
             for e in vcs.vm_operator_log(vc, "Deploying OVF Library Item")
             if e.get("VirtualMachine", {}).get("namespace") == ns}
    REPORT["site_b"] = {"item": item["id"], "deploy_requests": asked, "vms": figures_b}
    log(f"vcsim (stand-in for vCenter) after r-site-b: site B item {item['id']} ({item['source']}), "
        f"pool {placed['pools']['az-1']}, folder {placed['folder']}, VM Operator deployed {json.dumps(asked)}: "
        f"{json.dumps(figures_b)}")
    policy = vc.vcsim.env["storagePolicies"][SITE_B.storage_class]
    assert asked == {name: (item["id"], policy) for name in deployed}, f"VM Operator deployed {asked}"
    for name, (obj, vm) in deployed.items():
        assert obj["spec"]["imageName"] == item["vmiName"] and obj["metadata"]["labels"][vcs.ZONE_LABEL] == "az-1", obj["spec"]
        image = vc.get_json("virtualmachineimage", obj["spec"]["image"]["name"], "-n", ns)
        assert image["status"]["providerItemID"] == item["id"], image["status"]
        assert vm["diskKB"] == [vcs.DISK_KB[SITE_B.item]], \
            f"{ns}/{name} was not deployed from site B's item (its 32 GiB disk): {vm['diskKB']} KB"
        assert vm["networks"] == [SITE_B.network], vm
        assert vm["resourcePool"] == placed["pools"]["az-1"] and vm["folder"] == placed["folder"], vm
        assert obj["spec"]["storageClass"] == SITE_B.storage_class, obj["spec"]
    retire(vc, ns)


def test_vcenter_6_status_restored_by_velero_does_not_take_over_the_original(vc):
    """Velero restores a VM's status too when asked
    (--status-include-resources): right after the create it writes the
    backed-up status with UpdateStatus, status.uniqueID (the original's MoID,
    VM Operator's FIRST lookup key) included. Each copy must still be
    deployed as a new VM, and the originals left alone.

    Whether VM Operator sees that status depends on timing: its first
    reconcile of a restored VM (which carries VM Operator's finalizer already)
    usually deploys before the status write lands, and VM Operator then
    overwrites status.uniqueID with the new VM's. web-1 names a
    VirtualMachineSetResourcePolicy, which Velero restores AFTER the VMs
    (its default order sorts virtualmachines. before
    virtualmachinesetresourcepolicies.): VM Operator's first attempt waits for
    the policy, the status lands meanwhile, and its next attempt finds the
    ORIGINAL by that MoID. Any first attempt that does not finish before the
    status write (a busy controller, a missing prerequisite) does the same.
    On a webhook that sees only creates, web-1 takes the original over."""
    src, dst = "st-src", "st-copy"
    _, original = source(vc, src, [("web-1", {"zone": "zone-a", "policy": "web-policy"}), ("db-1", {"zone": "zone-b"})],
                         extra=[o.resource_policy(src, "web-policy")])
    vc.backup("b-st", src)
    moids = {name: vm["moid"] for name, (_, vm) in original.items()}
    baseline = settled(vc, set(moids.values()))
    before, mark = {n: baseline["vms"][m] for n, m in moids.items()}, last_event_key(baseline)

    vcs.prepare_namespace(vc, vc.vcsim, dst)
    restore(vc, "r-st", "b-st", "--namespace-mappings", f"{src}:{dst}",
            "--status-include-resources", "virtualmachines.vmoperator.vmware.com")
    # Until VM Operator has acted on both (each status.uniqueID names a VM in
    # vcsim that is powered on): a new VM, or the original it took over.
    copies = vcs.deployed(vc, vc.vcsim, dst, moids)
    taken = {name: obj["status"]["uniqueID"] for name, (obj, _) in copies.items() if obj["status"]["uniqueID"] == moids[name]}
    # The new VMs settle; an original taken over does not (two objects
    # rewrite VM Operator's backup in its ExtraConfig at every reconcile).
    new = {obj["status"]["uniqueID"] for obj, _ in copies.values()} - set(moids.values())
    after = settled(vc, new) if new else vc.vcsim.inventory()
    REPORT["status_restore"] = {
        name: {"original": vcs.summary(before[name]), "restored_uniqueID": obj["status"]["uniqueID"],
               "restored_vm": vcs.summary(after["vms"][obj["status"]["uniqueID"]]),
               "events_on_original": [(e["type"], e["time"]) for e in events_since(after, {moids[name]}, mark)]}
        for name, (obj, _) in copies.items()}
    in_copy = deployed_for(after, dst)
    REPORT["status_restore_vms_deployed_for_copy"] = in_copy
    log(f"vcsim (stand-in for vCenter) after r-st (status restored by Velero): {json.dumps(REPORT['status_restore'])}; "
        f"VMs deployed for {dst}: {in_copy}")
    assert not taken, f"restored VMs took over their originals through the restored status.uniqueID: {taken}"
    assert sorted(in_copy) == sorted(moids), f"each copy is a new VM deployed for {dst}: {in_copy}"
    for name, moid in moids.items():
        assert not events_since(after, {moid}, mark), f"the original {src}/{name} was reconfigured or powered"
        assert untouched(after["vms"][moid]) == untouched(before[name]), f"the original {src}/{name} is untouched"
