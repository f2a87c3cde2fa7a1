//! Rules for a restored VirtualMachine, at every API version (v1alpha1–v1alpha6).
//!
//! Field locations (from VM Operator's CRDs):
//! - `spec.instanceUUID`, `spec.biosUUID`, `spec.bootstrap.cloudInit.instanceID`: v1alpha3+;
//!   at v1alpha1/2 they exist only in the conversion copy.
//! - `spec.groupName`, `spec.network.interfaces[]`: v1alpha2+; v1alpha1 keeps the group
//!   name in the conversion copy only.
//! - `spec.currentSnapshotName`: the hub version (v1alpha5 in VM Operator 1.10, v1alpha6 later).
//! - `spec.powerState`: every version; v1alpha1 spells the values `poweredOn`/`suspended`.
//!
//! Every rule acts on a field only when it is present, so the same code serves
//! every version, including the hub-version copy in the conversion annotation.

use serde_json::{Map, Value};

use super::mapping;
use super::power::{self, PowerPolicy};
use super::shape::{self, ShapeError};
use super::{
    AnnotationSet, ApiVersion, CONVERSION_ANNOTATION, CleanupOptions, ClusterRef, Plan, RefKind,
    RuleDoc,
};
use crate::patch::{self, Change};

pub const R_INSTANCE_UUID: &str = "vm-instance-uuid";
pub const R_FIRST_BOOT_DONE: &str = "vm-first-boot-done";
pub const R_NEXT_RESTART_TIME: &str = "vm-next-restart-time";
pub const R_CURRENT_SNAPSHOT: &str = "vm-current-snapshot-name";
pub const R_SUSPENDED: &str = "vm-suspended-power-state";
pub const R_POWER_HELD: &str = "vm-power-held";
pub const R_CONTROLLER_ANNOTATIONS: &str = "vm-controller-annotations";
pub const R_PROTECTED_ANNOTATIONS: &str = "vm-protected-annotations";
pub const R_PAUSED_LABEL: &str = "vm-paused-label";
pub const R_ORIGIN_MARKERS: &str = "vm-origin-markers";
pub const R_CHECK_ANNOTATIONS: &str = "vm-check-annotations";
pub const R_MGMT_PROXY: &str = "vm-mgmt-proxy-annotations";
pub const R_SNAPSHOT_REVERT: &str = "vm-snapshot-revert-annotation";
pub const R_INSTANCE_STORAGE_VOLUMES: &str = "vm-instance-storage-volumes";
pub const R_ZONE_LABEL: &str = "vm-zone-label";
pub const R_CLASS_INSTANCE: &str = "vm-class-instance";
pub const R_IMAGE_REF: &str = "vm-image-ref";

pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const R_CONVERSION_COPY: &str = "vm-conversion-copy";
pub const R_COPY_BIOS_UUID: &str = "vm-copy-bios-uuid";
pub const R_COPY_INSTANCE_ID: &str = "vm-copy-cloud-init-instance-id";
pub const R_COPY_NETWORK: &str = "vm-copy-network-identity";

pub const FIRST_BOOT_DONE: &str = "virtualmachine.vmoperator.vmware.com/first-boot-done";
pub const PAUSED_LABEL: &str = "vmoperator.vmware.com/paused";
const PROTECTED_PREFIX: &str = "vmoperator.vmware.com.protected/";
const UPGRADED_TO_PREFIX: &str = "vmoperator.vmware.com/upgraded-to-";
/// The original cluster's power-on and delete holds (`validateChecksAnnotation`).
const CHECK_PREFIXES: &[&str] = &[
    "poweron.check.vmoperator.vmware.com/",
    "delete.check.vmoperator.vmware.com/",
];
const MGMT_PROXY_PREFIX: &str = "mgmt.proxy.vmware.com/";
/// Set with an empty value and checked for presence: every reconcile stops
/// while it is there (`vmprovider_vm_snapshot.go`).
pub const SNAPSHOT_REVERT_ANNOTATION: &str = "vmoperator.vmware.com/snapshot-revert-in-progress";

/// Controller-owned annotations that silently change a new VM's behaviour.
const CONTROLLER_ANNOTATIONS: &[&str] = &[
    "vmoperator.vmware.com/bootstrap-hash-configspec",
    "vmoperator.vmware.com/bootstrap-hash-customspec",
    "vmoperator.vmware.com/backup-version",
    "vsphere-cluster-module-group-uuid",
    "vmoperator.vmware.com/instance-storage-pvcs-bound",
    "vmoperator.vmware.com/instance-storage-selected-node",
    "vmoperator.vmware.com/instance-storage-selected-node-moid",
];

/// Markers of how the original VM came to be; VM Operator rejects them on a
/// create by anyone but itself.
const ORIGIN_MARKERS: &[&str] = &[
    "vmoperator.vmware.com/restored-vm",
    "vmoperator.vmware.com/failed-over-vm",
    "vmoperator.vmware.com/imported-vm",
    "vmoperator.vmware.com/cloud-init-instance-id",
];

pub const RULES: &[RuleDoc] = &[
    RuleDoc {
        id: R_INSTANCE_UUID,
        kind: "VirtualMachine",
        what: "remove `spec.instanceUUID` (v1alpha3+; v1alpha1/2: in the conversion copy)",
        why: "VM Operator finds its vSphere VM by this UUID across the datacenter: the restored VM would adopt the original",
    },
    RuleDoc {
        id: R_FIRST_BOOT_DONE,
        kind: "VirtualMachine",
        what: "remove annotation `virtualmachine.vmoperator.vmware.com/first-boot-done`",
        why: "describes the original VM's first boot; rejected on create for non-privileged users",
    },
    RuleDoc {
        id: R_NEXT_RESTART_TIME,
        kind: "VirtualMachine",
        what: "remove a non-empty `spec.nextRestartTime`",
        why: "VM Operator rejects it on create for every user",
    },
    RuleDoc {
        id: R_CURRENT_SNAPSHOT,
        kind: "VirtualMachine",
        what: "remove a non-empty `spec.currentSnapshotName`",
        why: "VM Operator rejects it on create for every user; the snapshot belongs to the original VM",
    },
    RuleDoc {
        id: R_SUSPENDED,
        kind: "VirtualMachine",
        what: "`spec.powerState: Suspended` becomes `PoweredOff` (v1alpha1: `suspended` → `poweredOff`)",
        why: "VM Operator rejects creating a suspended VM",
    },
    RuleDoc {
        id: R_POWER_HELD,
        kind: "VirtualMachine",
        what: "power policy `boot-order`: a VM whose group has its power held is created `PoweredOff`; policy `off`: every VM. Annotations `velero-vm-restore-webhook/power-held` and `…/restored-power-state` record it",
        why: "the group's power push, once the companion sets it back, powers the VM on at its boot-order time; a VM created on would start as soon as it is deployed",
    },
    RuleDoc {
        id: R_CONTROLLER_ANNOTATIONS,
        kind: "VirtualMachine",
        what: "remove annotations `vmoperator.vmware.com/bootstrap-hash-{configspec,customspec}`, `backup-version`, `vsphere-cluster-module-group-uuid`, `instance-storage-{pvcs-bound,selected-node,selected-node-moid}`, `vmoperator.vmware.com/upgraded-to-*`",
        why: "controller state of the original VM: skipped guest customization, paused backups, stale cluster module and host, skipped backfill",
    },
    RuleDoc {
        id: R_PROTECTED_ANNOTATIONS,
        kind: "VirtualMachine",
        what: "remove annotations `vmoperator.vmware.com.protected/*`",
        why: "owned by VM Operator (skip-validation, apply-power-state-time, …)",
    },
    RuleDoc {
        id: R_PAUSED_LABEL,
        kind: "VirtualMachine",
        what: "remove label `vmoperator.vmware.com/paused`",
        why: "a paused VM is never reconciled; rejected on create for non-privileged users",
    },
    RuleDoc {
        id: R_ORIGIN_MARKERS,
        kind: "VirtualMachine",
        what: "remove annotations `vmoperator.vmware.com/{restored-vm,failed-over-vm,imported-vm,cloud-init-instance-id}`",
        why: "rejected on create for non-privileged users",
    },
    RuleDoc {
        id: R_CHECK_ANNOTATIONS,
        kind: "VirtualMachine",
        what: "remove annotations `poweron.check.vmoperator.vmware.com/*` and `delete.check.vmoperator.vmware.com/*`",
        why: "the original cluster's holds: delete checks are rejected on create, and a power-on check only a privileged user can remove keeps the VM off",
    },
    RuleDoc {
        id: R_MGMT_PROXY,
        kind: "VirtualMachine",
        what: "remove annotations `mgmt.proxy.vmware.com/*` (`allowlist`, `watermark`)",
        why: "rejected on create for non-admin users",
    },
    RuleDoc {
        id: R_SNAPSHOT_REVERT,
        kind: "VirtualMachine",
        what: "remove annotation `vmoperator.vmware.com/snapshot-revert-in-progress`, even when empty",
        why: "while present, VM Operator stops every reconcile of the VM",
    },
    RuleDoc {
        id: R_ZONE_LABEL,
        kind: "VirtualMachine",
        what: "remove label `topology.kubernetes.io/zone` when no such Zone (or AvailabilityZone) exists in the target",
        why: "rejected on create (the zone is not found); without it VM Operator places the VM in a zone of the target",
    },
    RuleDoc {
        id: R_CLASS_INSTANCE,
        kind: "VirtualMachine",
        what: "remove `spec.class` unless the target namespace has that VirtualMachineClassInstance, active and owned by the class `spec.className` names",
        why: "class instances are named per cluster, and Velero restores them without their owner; VM Operator refuses any other and picks the active instance of `spec.className` again",
    },
    RuleDoc {
        id: R_IMAGE_REF,
        kind: "VirtualMachine",
        what: "remove `spec.image` (when `spec.imageName` is set) when that VirtualMachineImage or ClusterVirtualMachineImage does not exist in the target",
        why: "image names hash the content-library item; VM Operator resolves `spec.imageName` again",
    },
    RuleDoc {
        id: R_INSTANCE_STORAGE_VOLUMES,
        kind: "VirtualMachine",
        what: "remove the entries of `spec.volumes` with `persistentVolumeClaim.instanceVolumeClaim`",
        why: "rejected on create (\"adding or modifying instance storage volume claim(s) is not allowed\"); VM Operator adds them again from the class",
    },
    RuleDoc {
        id: R_CONVERSION_COPY,
        kind: "VirtualMachine",
        what: "clean the hub-version copy in annotation `vmoperator.vmware.com/conversion` by the same rules, and drop its `status`",
        why: "VM Operator's conversion copies fields and the whole status (`status.uniqueID`, the vSphere MoID) back from it on create",
    },
    RuleDoc {
        id: R_COPY_BIOS_UUID,
        kind: "VirtualMachine (copy)",
        what: "remove `spec.biosUUID` when restoring a copy beside the original",
        why: "a duplicate BIOS UUID breaks CNS volume attachment",
    },
    RuleDoc {
        id: R_COPY_INSTANCE_ID,
        kind: "VirtualMachine (copy)",
        what: "remove `spec.bootstrap.cloudInit.instanceID` when restoring a copy",
        why: "cloud-init must see a new instance, not the original's",
    },
    RuleDoc {
        id: R_COPY_NETWORK,
        kind: "VirtualMachine (copy)",
        what: "remove `spec.network.interfaces[].{macAddr,addresses,gateway4,gateway6}` when restoring a copy",
        why: "MAC and static addresses collide with the original VM",
    },
];

fn tokens(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|part| part.to_string()).collect()
}

/// Which rule, if any, removes this annotation.
fn annotation_rule(key: &str) -> Option<(&'static str, &'static str)> {
    if key == FIRST_BOOT_DONE {
        Some((R_FIRST_BOOT_DONE, "original VM's first boot"))
    } else if CONTROLLER_ANNOTATIONS.contains(&key) || key.starts_with(UPGRADED_TO_PREFIX) {
        Some((
            R_CONTROLLER_ANNOTATIONS,
            "controller state of the original VM",
        ))
    } else if key.starts_with(PROTECTED_PREFIX) {
        Some((R_PROTECTED_ANNOTATIONS, "owned by VM Operator"))
    } else if ORIGIN_MARKERS.contains(&key) {
        Some((R_ORIGIN_MARKERS, "rejected on create"))
    } else if CHECK_PREFIXES.iter().any(|prefix| key.starts_with(prefix)) {
        Some((R_CHECK_ANNOTATIONS, "hold from the original cluster"))
    } else if key.starts_with(MGMT_PROXY_PREFIX) {
        Some((R_MGMT_PROXY, "rejected on create"))
    } else if key == SNAPSHOT_REVERT_ANNOTATION {
        Some((R_SNAPSHOT_REVERT, "stops every reconcile"))
    } else {
        None
    }
}

/// Rules on metadata and spec, shared by the object and its conversion copy.
fn object_changes(
    object: &Map<String, Value>,
    options: &CleanupOptions,
) -> Result<Vec<Change>, ShapeError> {
    let mut changes = Vec::new();
    let meta = shape::meta(object)?;
    if let Some(annotations) = meta.annotations {
        for key in annotations.keys() {
            if let Some((rule, reason)) = annotation_rule(key)
                && options.enabled(rule)
            {
                changes.push(Change::remove(
                    tokens(&["metadata", "annotations", key]),
                    rule,
                    reason,
                ));
            }
        }
    }
    if let Some(labels) = meta.labels
        && labels.contains_key(PAUSED_LABEL)
        && options.enabled(R_PAUSED_LABEL)
    {
        changes.push(Change::remove(
            tokens(&["metadata", "labels", PAUSED_LABEL]),
            R_PAUSED_LABEL,
            "a paused VM is never reconciled",
        ));
    }

    if let Some(labels) = meta.labels
        && let Some(zone) = labels.get(ZONE_LABEL)
    {
        let label = tokens(&["metadata", "labels", ZONE_LABEL]);
        // The zone checked is the mapped one: a mapping to a zone the target
        // lacks still ends in the removal.
        if options.missing_refs.contains(&RefKind::Zone) {
            if options.enabled(R_ZONE_LABEL) {
                changes.push(Change::remove(
                    label,
                    R_ZONE_LABEL,
                    "no such zone in the target",
                ));
            }
        } else if let Some(zone) = zone.as_str()
            && options.enabled(mapping::R_MAP_ZONE)
            && let Some(change) = mapping::zone_change(zone, &options.mappings, label)
        {
            changes.push(change);
        }
    }

    let Some(spec) = shape::map(object, "", "spec")? else {
        return Ok(changes);
    };
    mapping::vm_changes(
        spec,
        &options.mappings,
        |rule| options.enabled(rule),
        &mut changes,
    )?;
    for found in spec_refs(spec, &options.mappings)? {
        let (rule, key, reason) = match found.kind {
            RefKind::ClassInstance => (
                R_CLASS_INSTANCE,
                "class",
                "no active instance of this class by that name in the target",
            ),
            RefKind::Image | RefKind::ClusterImage => {
                (R_IMAGE_REF, "image", "no such image in the target")
            }
            RefKind::Zone
            | RefKind::Class
            | RefKind::StorageClass
            | RefKind::ImageName
            | RefKind::Network
            | RefKind::EncryptionStorageClass => continue,
        };
        if options.missing_refs.contains(&found.kind) && options.enabled(rule) {
            changes.push(Change::remove(tokens(&["spec", key]), rule, reason));
        }
    }
    if options.enabled(R_INSTANCE_STORAGE_VOLUMES) {
        instance_storage_volume_changes(spec, &mut changes)?;
    }
    let mut remove_if_set = |key: &str, rule: &'static str, reason: &'static str| {
        let value = shape::string(spec, "spec", key)?;
        if shape::is_set(value) && options.enabled(rule) {
            changes.push(Change::remove(tokens(&["spec", key]), rule, reason));
        }
        Ok::<(), ShapeError>(())
    };
    remove_if_set(
        R_INSTANCE_UUID_KEY,
        R_INSTANCE_UUID,
        "identity of the original vSphere VM",
    )?;
    remove_if_set("nextRestartTime", R_NEXT_RESTART_TIME, "rejected on create")?;
    remove_if_set(
        "currentSnapshotName",
        R_CURRENT_SNAPSHOT,
        "rejected on create",
    )?;
    if options.new_identity {
        remove_if_set("biosUUID", R_COPY_BIOS_UUID, "copy beside the original")?;
    }

    let suspended_to = match shape::string(spec, "spec", "powerState")? {
        Some("Suspended") => Some("PoweredOff"),
        Some("suspended") => Some("poweredOff"),
        _ => None,
    };
    if let Some(state) = shape::string(spec, "spec", "powerState")?
        && power::is_on(state)
        && power_hold(options).is_some()
    {
        changes.push(Change::replace(
            tokens(&["spec", "powerState"]),
            Value::String(power::off_like(state).to_string()),
            R_POWER_HELD,
            "held until its group is started in boot order",
        ));
    }
    if let Some(powered_off) = suspended_to
        && options.enabled(R_SUSPENDED)
    {
        changes.push(Change::replace(
            tokens(&["spec", "powerState"]),
            Value::String(powered_off.to_string()),
            R_SUSPENDED,
            "a suspended VM is rejected on create",
        ));
    }

    if options.new_identity {
        copy_identity_changes(spec, options, &mut changes)?;
    }
    Ok(changes)
}

const R_INSTANCE_UUID_KEY: &str = "instanceUUID";

/// `spec.class`, and `spec.image` when `spec.imageName` is also set; not
/// when a mapping renames the class or the image (the mapping removes them).
fn spec_refs(
    spec: &Map<String, Value>,
    mappings: &mapping::Mappings,
) -> Result<Vec<ClusterRef>, ShapeError> {
    let mut refs = Vec::new();
    let class_name = shape::string(spec, "spec", "className")?;
    let image_name = shape::string(spec, "spec", "imageName")?;
    let class_mapped = class_name.is_some_and(|class| mappings.class(class).is_some());
    let image_mapped = image_name.is_some_and(|image| mappings.image(image).is_some());
    if !class_mapped
        && let Some(class) = shape::map(spec, "spec", "class")?
        && let Some(name) = shape::string(class, "spec.class", "name")?.filter(|n| !n.is_empty())
    {
        refs.push(ClusterRef {
            kind: RefKind::ClassInstance,
            name: name.to_string(),
            owner: shape::string(spec, "spec", "className")?
                .filter(|class| !class.is_empty())
                .map(str::to_string),
        });
    }
    if !image_mapped
        && shape::is_set(image_name)
        && let Some(image) = shape::map(spec, "spec", "image")?
        && let Some(name) = shape::string(image, "spec.image", "name")?.filter(|n| !n.is_empty())
    {
        let kind = match shape::string(image, "spec.image", "kind")? {
            Some("ClusterVirtualMachineImage") => RefKind::ClusterImage,
            _ => RefKind::Image,
        };
        refs.push(ClusterRef {
            kind,
            name: name.to_string(),
            owner: None,
        });
    }
    Ok(refs)
}

/// The cluster-bound references a VM makes (its zone label, `spec.class`,
/// `spec.image`, `spec.imageName`, `spec.className`, `spec.storageClass`
/// and, with an encryption class, the storage class as an encryption one,
/// each interface's network),
/// after `mappings`, for the facts a review gathers before it decides.
pub fn cluster_refs(
    object: &Value,
    mappings: &mapping::Mappings,
) -> Result<Vec<ClusterRef>, ShapeError> {
    let root = shape::root(object)?;
    let mut refs = Vec::new();
    if let Some(zone) = shape::meta(root)?
        .labels
        .and_then(|labels| labels.get(ZONE_LABEL))
        .and_then(Value::as_str)
        .filter(|zone| !zone.is_empty())
    {
        refs.push(ClusterRef {
            kind: RefKind::Zone,
            name: mappings.zone(zone).unwrap_or(zone).to_string(),
            owner: None,
        });
    }
    if let Some(spec) = shape::map(root, "", "spec")? {
        refs.extend(spec_refs(spec, mappings)?);
        // The image VM Operator's mutator resolves first (before any
        // validation), after mapping.
        if let Some(image) = shape::string(spec, "spec", "imageName")?.filter(|i| !i.is_empty()) {
            refs.push(ClusterRef {
                kind: RefKind::ImageName,
                name: mappings.image(image).unwrap_or(image).to_string(),
                owner: None,
            });
        }
        // The class a VM will run with: after mapping.
        if let Some(class) = shape::string(spec, "spec", "className")?.filter(|c| !c.is_empty()) {
            refs.push(ClusterRef {
                kind: RefKind::Class,
                name: mappings.class(class).unwrap_or(class).to_string(),
                owner: None,
            });
        }
        if let Some(class) = shape::string(spec, "spec", "storageClass")?.filter(|c| !c.is_empty())
        {
            let target = mappings.storage_class(class).unwrap_or(class);
            refs.push(ClusterRef {
                kind: RefKind::StorageClass,
                name: target.to_string(),
                owner: None,
            });
            // VM Operator checks the pair only where the VM names an
            // encryption class (`validateCrypto`).
            if let Some(crypto) = shape::map(spec, "spec", "crypto")?
                && let Some(encryption_class) =
                    shape::string(crypto, "spec.crypto", "encryptionClassName")?
                        .filter(|name| !name.is_empty())
            {
                refs.push(ClusterRef {
                    kind: RefKind::EncryptionStorageClass,
                    name: target.to_string(),
                    owner: Some(encryption_class.to_string()),
                });
            }
        }
        for network in mapping::interface_networks(spec, mappings)? {
            refs.push(ClusterRef {
                kind: RefKind::Network,
                name: network.to_string(),
                owner: None,
            });
        }
    }
    Ok(refs)
}

/// The source of the mapping entry that turned the VM's field into
/// `reference`, when a mapping did: a denial must then say to change that
/// entry, as Velero maps from the name in the backup, never twice.
pub fn mapped_from(
    object: &Value,
    mappings: &mapping::Mappings,
    reference: &ClusterRef,
) -> Option<String> {
    let spec = shape::map(shape::root(object).ok()?, "", "spec").ok()??;
    // The field's value, when `target_of` maps it to the reference.
    let mapped =
        |key: &str, target_of: for<'m> fn(&'m mapping::Mappings, &str) -> Option<&'m str>| {
            shape::string(spec, "spec", key)
                .ok()
                .flatten()
                .filter(|source| target_of(mappings, source) == Some(reference.name.as_str()))
                .map(str::to_string)
        };
    match reference.kind {
        RefKind::StorageClass | RefKind::EncryptionStorageClass => {
            mapped("storageClass", mapping::Mappings::storage_class)
        }
        RefKind::Class => mapped("className", mapping::Mappings::class),
        RefKind::ImageName => mapped("imageName", mapping::Mappings::image),
        RefKind::Network => mapping::mapped_interface_networks(spec, mappings)
            .ok()?
            .into_iter()
            .find_map(|(target, source)| source.filter(|_| target.to_string() == reference.name))
            .map(|source| source.to_string()),
        RefKind::Zone | RefKind::ClassInstance | RefKind::Image | RefKind::ClusterImage => None,
    }
}

/// Removes instance-storage volumes, highest index first, so that each
/// `remove` still points at the entry it means once earlier ones are gone.
fn instance_storage_volume_changes(
    spec: &Map<String, Value>,
    changes: &mut Vec<Change>,
) -> Result<(), ShapeError> {
    let Some(volumes) = shape::array(spec, "spec", "volumes")? else {
        return Ok(());
    };
    let mut doomed = Vec::new();
    for (index, volume) in volumes.iter().enumerate() {
        let field = format!("spec.volumes[{index}]");
        let volume = volume.as_object().ok_or_else(|| ShapeError::WrongType {
            field: field.clone(),
            expected: "an object",
            found: shape::type_name(volume),
        })?;
        if let Some(claim) = shape::map(volume, &field, "persistentVolumeClaim")?
            && claim
                .get("instanceVolumeClaim")
                .is_some_and(|v| !v.is_null())
        {
            doomed.push(index);
        }
    }
    for index in doomed.into_iter().rev() {
        changes.push(Change::remove(
            tokens(&["spec", "volumes", &index.to_string()]),
            R_INSTANCE_STORAGE_VOLUMES,
            "instance storage; VM Operator adds it from the class",
        ));
    }
    Ok(())
}

/// Guest-visible identity a copy beside the original must not duplicate.
fn copy_identity_changes(
    spec: &Map<String, Value>,
    options: &CleanupOptions,
    changes: &mut Vec<Change>,
) -> Result<(), ShapeError> {
    if options.enabled(R_COPY_INSTANCE_ID)
        && let Some(bootstrap) = shape::map(spec, "spec", "bootstrap")?
        && let Some(cloud_init) = shape::map(bootstrap, "spec.bootstrap", "cloudInit")?
        && shape::is_set(shape::string(
            cloud_init,
            "spec.bootstrap.cloudInit",
            "instanceID",
        )?)
    {
        changes.push(Change::remove(
            tokens(&["spec", "bootstrap", "cloudInit", "instanceID"]),
            R_COPY_INSTANCE_ID,
            "copy beside the original",
        ));
    }
    if !options.enabled(R_COPY_NETWORK) {
        return Ok(());
    }
    let Some(network) = shape::map(spec, "spec", "network")? else {
        return Ok(());
    };
    let Some(interfaces) = shape::array(network, "spec.network", "interfaces")? else {
        return Ok(());
    };
    for (index, interface) in interfaces.iter().enumerate() {
        let field = format!("spec.network.interfaces[{index}]");
        let interface = interface.as_object().ok_or_else(|| ShapeError::WrongType {
            field: field.clone(),
            expected: "an object",
            found: shape::type_name(interface),
        })?;
        let index = index.to_string();
        for key in ["macAddr", "gateway4", "gateway6"] {
            if shape::is_set(shape::string(interface, &field, key)?) {
                changes.push(Change::remove(
                    tokens(&["spec", "network", "interfaces", &index, key]),
                    R_COPY_NETWORK,
                    "would collide with the original VM",
                ));
            }
        }
        if shape::array(interface, &field, "addresses")?.is_some_and(|list| !list.is_empty()) {
            changes.push(Change::remove(
                tokens(&["spec", "network", "interfaces", &index, "addresses"]),
                R_COPY_NETWORK,
                "would collide with the original VM",
            ));
        }
    }
    Ok(())
}

/// The conversion copy, parsed; `None` when the annotation is absent.
pub(crate) fn conversion_copy(object: &Map<String, Value>) -> Result<Option<Value>, ShapeError> {
    let meta = shape::meta(object)?;
    let Some(text) = meta
        .annotations
        .and_then(|annotations| annotations.get(CONVERSION_ANNOTATION))
        .and_then(Value::as_str)
    else {
        return Ok(None);
    };
    let copy: Value = serde_json::from_str(text).map_err(|err| ShapeError::BadConversionCopy {
        annotation: CONVERSION_ANNOTATION,
        detail: err.to_string(),
    })?;
    if !copy.is_object() {
        return Err(ShapeError::BadConversionCopy {
            annotation: CONVERSION_ANNOTATION,
            detail: format!("found {}", shape::type_name(&copy)),
        });
    }
    Ok(Some(copy))
}

/// The changes `clean` finds in the object and, unless `copy_rule` is turned
/// off, in the hub copy of its conversion annotation (the same rules).
pub(crate) fn with_conversion_copy(
    root: &Map<String, Value>,
    copy_rule: &'static str,
    options: &CleanupOptions,
    clean: impl Fn(&Map<String, Value>) -> Result<Vec<Change>, ShapeError>,
) -> Result<Vec<Change>, ShapeError> {
    let mut changes = clean(root)?;
    if options.enabled(copy_rule)
        && let Some(copy) = conversion_copy(root)?
    {
        clean_conversion_copy(&copy, copy_rule, &clean, &mut changes)?;
    }
    Ok(changes)
}

/// Cleans the conversion copy with `clean` and adds one `replace` of the
/// annotation, plus a report-only change per field cleaned inside the copy.
pub(crate) fn clean_conversion_copy(
    copy: &Value,
    rule: &'static str,
    clean: impl Fn(&Map<String, Value>) -> Result<Vec<Change>, ShapeError>,
    changes: &mut Vec<Change>,
) -> Result<(), ShapeError> {
    let copy_object = shape::root(copy)?;
    let mut inner = clean(copy_object)?;
    if copy_object.contains_key("status") {
        inner.push(Change::remove(
            tokens(&["status"]),
            rule,
            "status of the original object",
        ));
    }
    if inner.is_empty() {
        return Ok(());
    }
    let cleaned = patch::apply(copy, &inner).map_err(|err| ShapeError::BadConversionCopy {
        annotation: CONVERSION_ANNOTATION,
        detail: err.to_string(),
    })?;
    let text = serde_json::to_string(&cleaned).map_err(|err| ShapeError::BadConversionCopy {
        annotation: CONVERSION_ANNOTATION,
        detail: err.to_string(),
    })?;
    changes.push(Change::replace(
        tokens(&["metadata", "annotations", CONVERSION_ANNOTATION]),
        Value::String(text),
        rule,
        "hub copy cleaned by the same rules",
    ));
    changes.extend(inner.into_iter().map(|mut change| {
        change.in_conversion_copy = true;
        change
    }));
    Ok(())
}

/// The policy that holds a VM's power: `off` holds every VM, `boot-order`
/// those whose group is held.
fn power_hold(options: &CleanupOptions) -> Option<PowerPolicy> {
    if !options.enabled(R_POWER_HELD) {
        return None;
    }
    match options.power_policy {
        PowerPolicy::Off => Some(PowerPolicy::Off),
        PowerPolicy::BootOrder if options.named_group_holds_power => Some(PowerPolicy::BootOrder),
        _ => None,
    }
}

pub fn plan(
    object: &Value,
    version: ApiVersion,
    options: &CleanupOptions,
) -> Result<Plan, ShapeError> {
    let root = shape::root(object)?;
    let changes = with_conversion_copy(root, R_CONVERSION_COPY, options, |inner| {
        object_changes(inner, options)
    })?;
    let mut set_annotations = Vec::new();
    if let Some(policy) = power_hold(options)
        && let Some(spec) = shape::map(root, "", "spec")?
        && let Some(state) = shape::string(spec, "spec", "powerState")?
        && power::is_on(state)
    {
        set_annotations.push(AnnotationSet::new(
            power::POWER_HELD_ANNOTATION,
            policy.as_str(),
            R_POWER_HELD,
            "power policy of this restore",
        ));
        set_annotations.push(AnnotationSet::new(
            power::RESTORED_POWER_STATE_ANNOTATION,
            state,
            R_POWER_HELD,
            "the power state of the backup",
        ));
    }
    Ok(Plan {
        changes,
        group_name: group_name(object, version)?,
        denial: None,
        set_annotations,
    })
}

/// The VirtualMachineGroup a VM names (`spec.groupName`; at v1alpha1 only
/// the conversion copy holds it). Empty counts as none.
pub fn group_name(object: &Value, version: ApiVersion) -> Result<Option<String>, ShapeError> {
    let root = shape::root(object)?;
    let mut name = match shape::map(root, "", "spec")? {
        Some(spec) => shape::string(spec, "spec", "groupName")?.map(str::to_string),
        None => None,
    };
    if version == ApiVersion::V1ALPHA1
        && name.is_none()
        && let Some(copy) = conversion_copy(root)?
    {
        name = shape::map(shape::root(&copy)?, "", "spec")?
            .map(|spec| shape::string(spec, "conversion copy spec", "groupName"))
            .transpose()?
            .flatten()
            .map(str::to_string);
    }
    Ok(name.filter(|name| !name.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patch::Edit;
    use serde_json::json;

    fn opts(new_identity: bool) -> CleanupOptions {
        CleanupOptions {
            new_identity,
            ..Default::default()
        }
    }

    fn fields(plan: &Plan) -> Vec<String> {
        plan.changes.iter().map(|c| c.describe()).collect()
    }

    #[test]
    fn no_changes_for_a_clean_vm() {
        let vm = json!({"apiVersion": "vmoperator.vmware.com/v1alpha5", "kind": "VirtualMachine",
            "metadata": {"name": "a", "annotations": {"keep": "me"}},
            "spec": {"className": "small", "powerState": "PoweredOn"}});
        let plan = plan(&vm, ApiVersion(5), &opts(true)).unwrap();
        assert!(plan.changes.is_empty(), "{:?}", fields(&plan));
        assert_eq!(plan.group_name, None);
    }

    #[test]
    fn empty_strings_are_not_touched() {
        let vm = json!({"spec": {"instanceUUID": "", "nextRestartTime": ""}});
        assert!(
            plan(&vm, ApiVersion(5), &opts(false))
                .unwrap()
                .changes
                .is_empty()
        );
    }

    #[test]
    fn v1alpha1_group_name_comes_from_the_conversion_copy() {
        let copy = json!({"apiVersion": "vmoperator.vmware.com/v1alpha5", "kind": "VirtualMachine",
            "spec": {"groupName": "g1", "instanceUUID": "u-1"}, "status": {"uniqueID": "vm-42"}});
        let vm = json!({"apiVersion": "vmoperator.vmware.com/v1alpha1",
            "metadata": {"annotations": {CONVERSION_ANNOTATION: copy.to_string()}},
            "spec": {"powerState": "suspended"}});
        let plan = plan(&vm, ApiVersion::V1ALPHA1, &opts(false)).unwrap();
        assert_eq!(plan.group_name.as_deref(), Some("g1"));
        let described = fields(&plan);
        assert!(
            described
                .iter()
                .any(|d| d.starts_with("set spec.powerState to \"poweredOff\""))
        );
        assert!(described.iter().any(|d| d == "in conversion copy: removed spec.instanceUUID (identity of the original vSphere VM)"));
        assert!(
            described
                .iter()
                .any(|d| d.starts_with("in conversion copy: removed status"))
        );
        let replace = plan
            .changes
            .iter()
            .find(|c| !c.in_conversion_copy && c.rule == R_CONVERSION_COPY)
            .unwrap();
        let Edit::Replace(Value::String(text)) = &replace.edit else {
            panic!("conversion annotation must be replaced by a string")
        };
        let cleaned: Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            cleaned,
            json!({"apiVersion": "vmoperator.vmware.com/v1alpha5",
            "kind": "VirtualMachine", "spec": {"groupName": "g1"}})
        );
    }

    #[test]
    fn copy_identity_only_for_copies() {
        let vm = json!({"spec": {"biosUUID": "b", "bootstrap": {"cloudInit": {"instanceID": "i"}},
            "network": {"interfaces": [{"name": "eth0", "macAddr": "00:50:56:00:00:01",
                "addresses": ["10.0.0.5/24"], "gateway4": "10.0.0.1"}, {"name": "eth1"}]}}});
        assert!(
            plan(&vm, ApiVersion(5), &opts(false))
                .unwrap()
                .changes
                .is_empty()
        );
        let copy_plan = plan(&vm, ApiVersion(5), &opts(true)).unwrap();
        let paths = copy_plan.pointers();
        assert_eq!(
            paths,
            vec![
                "/spec/biosUUID",
                "/spec/bootstrap/cloudInit/instanceID",
                "/spec/network/interfaces/0/macAddr",
                "/spec/network/interfaces/0/gateway4",
                "/spec/network/interfaces/0/addresses",
            ]
        );
    }

    #[test]
    fn disabled_rules_are_skipped() {
        let vm = json!({"metadata": {"annotations": {FIRST_BOOT_DONE: "true"}},
            "spec": {"instanceUUID": "u"}});
        let options = CleanupOptions {
            new_identity: false,
            disabled_rules: std::sync::Arc::new([R_INSTANCE_UUID.to_string()].into()),
            ..Default::default()
        };
        let plan = plan(&vm, ApiVersion(5), &options).unwrap();
        assert_eq!(plan.changes.len(), 1);
        assert_eq!(plan.changes[0].rule, R_FIRST_BOOT_DONE);
    }

    #[test]
    fn malformed_fields_are_errors() {
        let vm = json!({"spec": {"instanceUUID": 7}});
        assert_eq!(
            plan(&vm, ApiVersion(5), &opts(false))
                .unwrap_err()
                .to_string(),
            "spec.instanceUUID must be a string, but is a number"
        );
        let vm = json!({"metadata": {"annotations": {CONVERSION_ANNOTATION: "{not json"}}});
        assert!(matches!(
            plan(&vm, ApiVersion(2), &opts(false)).unwrap_err(),
            ShapeError::BadConversionCopy { .. }
        ));
        let vm = json!({"spec": {"network": {"interfaces": ["eth0"]}}});
        assert_eq!(
            plan(&vm, ApiVersion(5), &opts(true))
                .unwrap_err()
                .to_string(),
            "spec.network.interfaces[0] must be an object, but is a string"
        );
    }
}
