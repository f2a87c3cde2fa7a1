//! Rules for a restored PersistentVolumeClaim in a VM Operator namespace.

use serde_json::Value;

use super::shape::{self, ShapeError};
use super::{CleanupOptions, Plan, RuleDoc};
use crate::patch::Change;

pub const R_VOLUME_HEALTH: &str = "pvc-volume-health";
pub const R_CNS_USED_BY: &str = "pvc-cns-used-by-vm";
pub const R_INSTANCE_STORAGE: &str = "pvc-instance-storage";
pub const R_VM_DISK_FROM_SNAPSHOT: &str = "pvc-vm-disk-from-snapshot";

/// On a PVC VM Operator made for one of a VM's own disks (AllDisksArePVCs).
pub const DISK_BACKING_ANNOTATION: &str = "cns.vmware.com.protected/disk-backing";

const VOLUME_HEALTH_PREFIX: &str = "volumehealth.storage.kubernetes.io/";
const CNS_USED_BY_PREFIX: &str = "cns.vmware.com/usedby-vm-";
pub const INSTANCE_STORAGE_LABEL: &str = "vmoperator.vmware.com/instance-storage-resource";

pub const RULES: &[RuleDoc] = &[
    RuleDoc {
        id: R_VOLUME_HEALTH,
        kind: "PersistentVolumeClaim",
        what: "remove annotations `volumehealth.storage.kubernetes.io/*` (`health`, `health-timestamp`)",
        why: "the health of the original volume, written by the CSI driver",
    },
    RuleDoc {
        id: R_CNS_USED_BY,
        kind: "PersistentVolumeClaim",
        what: "remove annotations `cns.vmware.com/usedby-vm-*`",
        why: "names the VMs the original volume was attached to",
    },
    RuleDoc {
        id: R_VM_DISK_FROM_SNAPSHOT,
        kind: "PersistentVolumeClaim",
        what: "deny a VM's own disk PVC (annotation `cns.vmware.com.protected/disk-backing`) restored from a VolumeSnapshot",
        why: "VM Operator clones that disk from the image and cannot adopt a PVC whose data source is a snapshot: every reconcile of the VM would fail. It recreates the PVC itself",
    },
    RuleDoc {
        id: R_INSTANCE_STORAGE,
        kind: "PersistentVolumeClaim",
        what: "deny PVCs labelled `vmoperator.vmware.com/instance-storage-resource`",
        why: "VM Operator recreates instance storage for its VM; non-privileged creates are rejected anyway",
    },
];

pub fn plan(object: &Value, options: &CleanupOptions) -> Result<Plan, ShapeError> {
    let root = shape::root(object)?;
    let meta = shape::meta(root)?;
    let mut plan = Plan::default();
    if let Some(labels) = meta.labels
        && labels.contains_key(INSTANCE_STORAGE_LABEL)
        && options.enabled(R_INSTANCE_STORAGE)
    {
        plan.denial = Some(format!(
            "is an instance-storage PVC (label {INSTANCE_STORAGE_LABEL}); VM Operator recreates it \
             for its VM. Exclude these PVCs from the restore, e.g. velero restore create \
             --from-backup <backup> --selector '!{INSTANCE_STORAGE_LABEL}', or label them \
             velero.io/exclude-from-backup=true before the backup"
        ));
        return Ok(plan);
    }
    if let Some(annotations) = meta.annotations
        && annotations.contains_key(DISK_BACKING_ANNOTATION)
        && options.enabled(R_VM_DISK_FROM_SNAPSHOT)
        && let Some(snapshot) = snapshot_source(root)?
    {
        plan.denial = Some(format!(
            "is one of a VirtualMachine's own disks (annotation {DISK_BACKING_ANNOTATION}), restored from \
             VolumeSnapshot {snapshot}. VM Operator clones this disk from the VM's image and cannot use snapshot data \
             as it: it would fail to reconcile the VM, because a PVC's data source cannot change. Leave this PVC to \
             VM Operator, which creates it for the restored VM: exclude it from the restore (label it \
             velero.io/exclude-from-backup=true before the backup, or restore with a --selector that leaves it out). \
             A Velero restore brings back PVC data, never a VM's image-cloned disks: those need VM Operator's own \
             (VADP) restore"
        ));
        return Ok(plan);
    }
    if let Some(annotations) = meta.annotations {
        for key in annotations.keys() {
            let rule = if key.starts_with(VOLUME_HEALTH_PREFIX) {
                Some((R_VOLUME_HEALTH, "health of the original volume"))
            } else if key.starts_with(CNS_USED_BY_PREFIX) {
                Some((R_CNS_USED_BY, "attachment of the original volume"))
            } else {
                None
            };
            if let Some((rule, reason)) = rule
                && options.enabled(rule)
            {
                plan.changes.push(Change::remove(
                    vec!["metadata".into(), "annotations".into(), key.clone()],
                    rule,
                    reason,
                ));
            }
        }
    }
    Ok(plan)
}

/// The VolumeSnapshot a PVC is restored from (`spec.dataSource` or
/// `spec.dataSourceRef` of kind VolumeSnapshot), as Velero's CSI restore sets it.
fn snapshot_source(root: &serde_json::Map<String, Value>) -> Result<Option<String>, ShapeError> {
    let Some(spec) = shape::map(root, "", "spec")? else {
        return Ok(None);
    };
    for key in ["dataSource", "dataSourceRef"] {
        let field = format!("spec.{key}");
        if let Some(source) = shape::map(spec, "spec", key)?
            && shape::string(source, &field, "kind")? == Some("VolumeSnapshot")
        {
            return Ok(Some(
                shape::string(source, &field, "name")?
                    .unwrap_or("(unnamed)")
                    .to_string(),
            ));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn removes_health_and_used_by() {
        let pvc = json!({"metadata": {"annotations": {
            "volumehealth.storage.kubernetes.io/health": "accessible",
            "volumehealth.storage.kubernetes.io/health-timestamp": "Mon",
            "cns.vmware.com/usedby-vm-1234": "vm1",
            "pv.kubernetes.io/bind-completed": "yes"}}});
        let plan = plan(&pvc, &CleanupOptions::default()).unwrap();
        assert_eq!(plan.changes.len(), 3);
        assert!(plan.denial.is_none());
    }

    #[test]
    fn denies_a_vm_disk_restored_from_a_snapshot_only() {
        let disk = |source: Value| {
            json!({"metadata": {"annotations": {DISK_BACKING_ANNOTATION: "FlatVer2",
                "volumehealth.storage.kubernetes.io/health": "accessible"}},
                "spec": {"dataSource": source}})
        };
        let from_snapshot = disk(
            json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "velero-disk-abc"}),
        );
        let denial = plan(&from_snapshot, &CleanupOptions::default())
            .unwrap()
            .denial
            .unwrap();
        assert!(
            denial.contains("VolumeSnapshot velero-disk-abc")
                && denial.contains("velero.io/exclude-from-backup"),
            "{denial}"
        );
        // Restored without a snapshot (the data source still names the VM): cleaned, not denied.
        let adopted = disk(
            json!({"apiGroup": "vmoperator.vmware.com", "kind": "VirtualMachine", "name": "web-1"}),
        );
        let plan_adopted = plan(&adopted, &CleanupOptions::default()).unwrap();
        assert!(plan_adopted.denial.is_none());
        assert_eq!(plan_adopted.changes.len(), 1);
        // A snapshot restore of an ordinary PVC is fine.
        let ordinary = json!({"spec": {"dataSource": {"kind": "VolumeSnapshot", "name": "s"}}});
        assert!(
            plan(&ordinary, &CleanupOptions::default())
                .unwrap()
                .denial
                .is_none()
        );
        let bad = json!({"metadata": {"annotations": {DISK_BACKING_ANNOTATION: ""}}, "spec": {"dataSource": {"kind": 7}}});
        assert!(plan(&bad, &CleanupOptions::default()).is_err());
    }

    #[test]
    fn denies_instance_storage() {
        let pvc = json!({"metadata": {"labels": {INSTANCE_STORAGE_LABEL: "true"}}});
        let plan = plan(&pvc, &CleanupOptions::default()).unwrap();
        assert!(
            plan.denial
                .unwrap()
                .contains("--selector '!vmoperator.vmware.com/instance-storage-resource'")
        );
    }
}
