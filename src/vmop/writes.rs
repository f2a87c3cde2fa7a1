//! Velero's writes other than the create, and what the webhook makes of
//! them (pure):
//!
//! - the backed-up **status** of a VM or group, which Velero writes after the
//!   create when the Restore lists the kind in `restoreStatus`
//!   (`--status-include-resources`) or, from Velero 1.16, when the backed-up
//!   object carries `velero.io/restore-status: "true"`. A VM's status names
//!   the original vSphere VM (`uniqueID`, its managed object ID, is the first
//!   thing VM Operator's provider looks a VM up by; `instanceUUID`,
//!   `biosUUID`), and a group's its members and power: the status stays as
//!   VM Operator wrote it for the new object;
//! - the **update** of an object that already exists
//!   (`--existing-resource-policy=update`), which Velero patches towards the
//!   backup: every field the create rules would clean keeps the live
//!   object's value, so no update puts the original's identity onto a live
//!   object.

use serde_json::Value;

use crate::patch::{Change, Edit};
use crate::vmop::{CleanupOptions, Kind, RuleDoc, ShapeError, power::PowerPolicy};

pub const R_STATUS_RESTORED: &str = "status-restored";
pub const R_UPDATE_KEEPS_LIVE: &str = "update-keeps-live";

pub const RULES: &[RuleDoc] = &[
    RuleDoc {
        id: R_STATUS_RESTORED,
        kind: "VM, group (status)",
        what: "on Velero's write of the backed-up status, keep each `status` field as it is (VM Operator's own for the new object)",
        why: "a VM's status names the original vSphere VM (`uniqueID` is what VM Operator looks a VM up by first, so the restored object would adopt the original); a group's, the original's members and power",
    },
    RuleDoc {
        id: R_UPDATE_KEEPS_LIVE,
        kind: "VM, group, PVC (update)",
        what: "on Velero's update of an object that exists (`--existing-resource-policy=update`), give each field a create rule would clean the live object's value",
        why: "the backup's identity, MACs, addresses, controller annotations and our own annotations must not land on a live object",
    },
];

/// The annotation with which a backed-up object asks Velero (1.16+) to
/// restore its status, or not, whatever the Restore says.
pub const RESTORE_STATUS_ANNOTATION: &str = "velero.io/restore-status";

/// What a Restore asks of the status of the objects it creates: the
/// resources it lists (`--status-include-resources`, as `plural.group` or
/// `*`), and whether the Velero that runs it reads the
/// `velero.io/restore-status` annotation (1.16 and later; 1.15 ignores it).
#[derive(Debug, Clone, Default)]
pub struct StatusRestore {
    pub include: Vec<String>,
    pub reads_annotation: bool,
}

/// Whether Velero will write this backed-up object's status after its create,
/// and why: its `velero.io/restore-status` annotation (`"true"`/`"false"`,
/// where Velero reads it), else the Restore's `--status-include-resources`.
pub fn status_restored_by(
    object: &Value,
    resource: &str,
    restore: &StatusRestore,
) -> Option<&'static str> {
    let annotated = object
        .pointer("/metadata/annotations")
        .and_then(|annotations| annotations.get(RESTORE_STATUS_ANNOTATION))
        .and_then(Value::as_str)
        .filter(|_| restore.reads_annotation);
    let include = &restore.include;
    match annotated {
        Some("true") => Some("its velero.io/restore-status annotation (Velero 1.16+)"),
        Some("false") => None,
        _ => include
            .iter()
            .any(|included| included == "*" || included == resource)
            .then_some("--status-include-resources"),
    }
}

/// For `plan`: what restoring a VM's or group's backed-up status would have
/// brought, and that the webhook keeps VM Operator's instead.
pub fn status_note(kind: Kind, object: &Value, restore: &StatusRestore) -> Option<String> {
    let resource = match kind {
        Kind::VirtualMachine(_) => "virtualmachines.vmoperator.vmware.com",
        Kind::VirtualMachineGroup(_) => "virtualmachinegroups.vmoperator.vmware.com",
        _ => return None,
    };
    let status = object.get("status").and_then(Value::as_object)?;
    if status.is_empty() {
        return None;
    }
    let why = status_restored_by(object, resource, restore)?;
    let identity: Vec<String> = ["uniqueID", "instanceUUID", "biosUUID"]
        .iter()
        .filter_map(|key| Some(format!("{key} {}", status.get(*key)?.as_str()?)))
        .collect();
    let brought = if identity.is_empty() {
        format!("{} backed-up status fields", status.len())
    } else {
        format!("the original's status {}", identity.join(", "))
    };
    Some(format!(
        "Velero will write its backed-up status ({why}); the webhook keeps VM Operator's instead (rule {R_STATUS_RESTORED}), so {brought} never reach it"
    ))
}

/// A JSON Pointer token list for `status` and one key under it.
fn status_path(key: Option<&str>) -> Vec<String> {
    let mut tokens = vec!["status".to_string()];
    tokens.extend(key.map(str::to_string));
    tokens
}

/// The changes that leave a VM's or group's status as it is (`old`), when
/// Velero writes the backed-up status (`new`): one per top-level field that
/// Velero would add, change or drop.
pub fn keep_status(kind: Kind, new: &Value, old: &Value) -> Vec<Change> {
    let reason = match kind {
        Kind::VirtualMachineGroup(_) => {
            "the backed-up status describes the original group's members and power; VM Operator writes this one's"
        }
        _ => {
            "the backed-up status names the original vSphere VM (uniqueID, instanceUUID, biosUUID); VM Operator writes this one's"
        }
    };
    let (new_status, old_status) = (new.get("status"), old.get("status"));
    match (new_status, old_status) {
        (None, None) => Vec::new(),
        (Some(_), None) => vec![Change::remove(status_path(None), R_STATUS_RESTORED, reason)],
        (None, Some(old)) => vec![Change::add(
            status_path(None),
            old.clone(),
            R_STATUS_RESTORED,
            reason,
        )],
        (Some(Value::Object(new)), Some(Value::Object(old))) => {
            let mut changes = Vec::new();
            for (key, value) in new {
                match old.get(key) {
                    Some(kept) if kept == value => {}
                    Some(kept) => changes.push(Change::replace(
                        status_path(Some(key)),
                        kept.clone(),
                        R_STATUS_RESTORED,
                        reason,
                    )),
                    None => changes.push(Change::remove(
                        status_path(Some(key)),
                        R_STATUS_RESTORED,
                        reason,
                    )),
                }
            }
            for (key, kept) in old {
                if !new.contains_key(key) {
                    changes.push(Change::add(
                        status_path(Some(key)),
                        kept.clone(),
                        R_STATUS_RESTORED,
                        reason,
                    ));
                }
            }
            changes
        }
        (Some(new), Some(old)) if new == old => Vec::new(),
        (Some(_), Some(old)) => vec![Change::replace(
            status_path(None),
            old.clone(),
            R_STATUS_RESTORED,
            reason,
        )],
    }
}

/// The changes that keep a live object's cluster-bound fields when Velero
/// updates it towards the backup: the create rules run on the updated
/// object as for a copy beside its original (so guest identity counts too),
/// holding nothing back for boot order (an update is no restore of power);
/// every field they would clean takes the live object's value again, or
/// goes when the live object has none.
pub fn keep_live(
    kind: Kind,
    new: &Value,
    old: &Value,
    options: &CleanupOptions,
) -> Result<Vec<Change>, ShapeError> {
    let options = CleanupOptions {
        new_identity: true,
        power_policy: PowerPolicy::AsBackedUp,
        named_group_holds_power: false,
        missing_refs: Default::default(),
        mappings: Default::default(),
        ..options.clone()
    };
    let plan = super::plan(kind, new, &options)?;
    let mut changes = Vec::new();
    for change in plan.changes {
        // The copy inside the conversion annotation is cleaned by replacing
        // that annotation, which is itself a change here.
        if change.in_conversion_copy || matches!(change.edit, Edit::Add(_)) {
            continue;
        }
        let pointer = change.pointer();
        let reason = format!(
            "kept the live value: Velero's update would bring the backup's ({})",
            change.reason
        );
        let live = old.pointer(pointer.as_str());
        let updated = new.pointer(pointer.as_str());
        match (live, updated) {
            (Some(live), Some(updated)) if live == updated => {}
            (Some(live), Some(_)) => changes.push(Change::replace(
                change.tokens,
                live.clone(),
                R_UPDATE_KEEPS_LIVE,
                reason,
            )),
            (None, Some(_)) => {
                changes.push(Change::remove(change.tokens, R_UPDATE_KEEPS_LIVE, reason))
            }
            (_, None) => {}
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmop::ApiVersion;
    use serde_json::json;

    #[test]
    fn the_backed_up_status_never_replaces_vm_operators() {
        let backed_up = json!({"status": {"uniqueID": "vm-1041", "instanceUUID": "u-orig", "biosUUID": "b-orig",
            "powerState": "PoweredOn", "conditions": [{"type": "Ready", "status": "True"}]}});
        // Just created: VM Operator has written nothing yet.
        let fresh = json!({"metadata": {"name": "vm1"}});
        let changes = keep_status(Kind::VirtualMachine(ApiVersion(5)), &backed_up, &fresh);
        let patched = crate::patch::apply(&backed_up, &changes).unwrap();
        assert!(patched.get("status").is_none(), "{patched}");
        // VM Operator got there first: its fields stay, the original's go.
        let written =
            json!({"status": {"uniqueID": "vm-77", "powerState": "PoweredOff", "zone": "z"}});
        let changes = keep_status(Kind::VirtualMachine(ApiVersion(5)), &backed_up, &written);
        let patched = crate::patch::apply(&backed_up, &changes).unwrap();
        assert_eq!(patched["status"], written["status"]);
        assert!(
            changes
                .iter()
                .all(|change| change.rule == R_STATUS_RESTORED)
        );
        // Nothing to do when Velero writes what is there.
        assert!(keep_status(Kind::VirtualMachine(ApiVersion(5)), &written, &written).is_empty());
    }

    #[test]
    fn plan_says_when_velero_will_restore_a_status_and_what_it_held() {
        let restore = |include: &[&str], reads_annotation: bool| StatusRestore {
            include: include
                .iter()
                .map(|resource| resource.to_string())
                .collect(),
            reads_annotation,
        };
        let vm = json!({"metadata": {"name": "vm1"}, "status": {"uniqueID": "vm-1041", "powerState": "PoweredOn"}});
        let kind = Kind::VirtualMachine(ApiVersion(5));
        assert!(status_note(kind, &vm, &restore(&[], true)).is_none());
        let note = status_note(
            kind,
            &vm,
            &restore(&["virtualmachines.vmoperator.vmware.com"], true),
        )
        .unwrap();
        assert!(
            note.contains("--status-include-resources") && note.contains("uniqueID vm-1041"),
            "{note}"
        );
        assert!(status_note(kind, &vm, &restore(&["*"], true)).is_some());
        let mut annotated = vm.clone();
        annotated["metadata"]["annotations"] = json!({RESTORE_STATUS_ANNOTATION: "true"});
        assert!(
            status_note(kind, &annotated, &restore(&[], true))
                .unwrap()
                .contains("annotation")
        );
        // Velero 1.15 does not read the annotation.
        assert!(status_note(kind, &annotated, &restore(&[], false)).is_none());
        annotated["metadata"]["annotations"] = json!({RESTORE_STATUS_ANNOTATION: "false"});
        assert!(
            status_note(kind, &annotated, &restore(&["*"], true)).is_none(),
            "the annotation wins"
        );
        assert!(
            status_note(kind, &annotated, &restore(&["*"], false))
                .unwrap()
                .contains("--status-include-resources"),
            "Velero 1.15 writes the status of a kind the Restore lists, whatever the annotation"
        );
        assert!(status_note(Kind::PersistentVolumeClaim, &vm, &restore(&["*"], true)).is_none());
    }

    #[test]
    fn an_update_keeps_the_live_objects_identity_and_lets_the_rest_through() {
        let live = json!({"apiVersion": "vmoperator.vmware.com/v1alpha5", "kind": "VirtualMachine",
            "metadata": {"name": "web-1", "labels": {"app": "web"}, "annotations": {"owner": "a"}},
            "spec": {"instanceUUID": "u-live", "biosUUID": "b-live", "powerState": "PoweredOn",
                "bootstrap": {"cloudInit": {"instanceID": "b-live"}},
                "network": {"interfaces": [{"name": "eth0", "macAddr": "00:50:56:00:00:02"}]}}});
        // Velero's patch towards the backup: the original's identity, its
        // first-boot annotation, and a label and power state of its own.
        let updated = json!({"apiVersion": "vmoperator.vmware.com/v1alpha5", "kind": "VirtualMachine",
            "metadata": {"name": "web-1", "labels": {"app": "web", "velero.io/restore-name": "r2"},
                "annotations": {"owner": "b", "virtualmachine.vmoperator.vmware.com/first-boot-done": "true"}},
            "spec": {"instanceUUID": "u-orig", "biosUUID": "b-orig", "powerState": "PoweredOff",
                "bootstrap": {"cloudInit": {"instanceID": "b-orig"}},
                "network": {"interfaces": [{"name": "eth0", "macAddr": "00:50:56:00:00:01"}]}}});
        let changes = keep_live(
            Kind::VirtualMachine(ApiVersion(5)),
            &updated,
            &live,
            &CleanupOptions::default(),
        )
        .unwrap();
        let patched = crate::patch::apply(&updated, &changes).unwrap();
        for pointer in [
            "/spec/instanceUUID",
            "/spec/biosUUID",
            "/spec/bootstrap/cloudInit/instanceID",
            "/spec/network/interfaces/0/macAddr",
        ] {
            assert_eq!(patched.pointer(pointer), live.pointer(pointer), "{pointer}");
        }
        assert!(
            patched
                .pointer(
                    "/metadata/annotations/virtualmachine.vmoperator.vmware.com~1first-boot-done"
                )
                .is_none()
        );
        // What is not cluster-bound is Velero's to update.
        assert_eq!(patched["spec"]["powerState"], "PoweredOff");
        assert_eq!(patched["metadata"]["annotations"]["owner"], "b");
        assert!(
            changes
                .iter()
                .all(|change| change.rule == R_UPDATE_KEEPS_LIVE)
        );
    }
}
