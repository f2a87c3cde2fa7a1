//! Rules for a restored PersistentVolumeClaim in a VM Operator namespace.

use serde_json::Value;

use super::shape::{self, ShapeError};
use super::{CleanupOptions, Plan, RuleDoc};
use crate::patch::Change;

pub const R_VOLUME_HEALTH: &str = "pvc-volume-health";
pub const R_CNS_USED_BY: &str = "pvc-cns-used-by-vm";
pub const R_INSTANCE_STORAGE: &str = "pvc-instance-storage";

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
