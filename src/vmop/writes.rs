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
//!   backup: every field the create rules would clean (all of them, with
//!   the Restore's mappings) keeps the live object's value, also where the
//!   backup lacks it, and so do our own annotations, so no update puts the
//!   original's identity, the source Supervisor's names or a stale hold
//!   onto a live object.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::Value;

use crate::patch::{Change, Edit};
use crate::vmop::mapping::Mappings;
use crate::vmop::{
    CleanupOptions, Kind, OWN_ANNOTATION_PREFIX, RuleDoc, ShapeError, power::PowerPolicy,
};

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
        what: "on Velero's update of an object that exists (`--existing-resource-policy=update`), give each field a create rule would clean (every rule, whatever `--disable-rule` turns off, as for a copy, with the Restore's mappings) the live object's value, also where the backup lacks it; a field the live object lacks gets the mapped value, never the source's; every `velero-vm-restore-webhook/…` annotation takes the live object's value, present or absent. Only this rule's own switch turns it off",
        why: "the backup's identity, MACs, addresses, controller annotations, the source Supervisor's class, storage class, image, networks and zone, and our own annotations (a backed-up `power-held` would hold new VMs for good) must not land on a live object, nor its own identity be dropped",
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
/// updates it towards the backup. The create rules run, every one of them
/// on whatever `--disable-rule` says (the only switch here is
/// [`R_UPDATE_KEEPS_LIVE`]), as for a copy beside its original (so guest
/// identity counts too), with the Restore's `mappings` and holding nothing
/// back for boot order (an update is no restore of power), over both the
/// updated object and the live one. Every field they would clean in either
/// takes the live object's value: replaced where the update changes it,
/// put back where the update drops it. Where the live object has no such
/// field, it becomes what a restore's create would make of the backup's
/// (removed, or mapped). Our own annotations take the live object's values,
/// present or absent.
///
/// A field's place is its JSON Pointer in both objects: list entries
/// (interfaces) are matched by position, and nothing is ever added into a
/// list (a live entry the update drops stays dropped).
pub fn keep_live(
    kind: Kind,
    new: &Value,
    old: &Value,
    mappings: &Arc<Mappings>,
) -> Result<Vec<Change>, ShapeError> {
    let options = CleanupOptions {
        new_identity: true,
        disabled_rules: Arc::default(),
        missing_refs: Default::default(),
        power_policy: PowerPolicy::AsBackedUp,
        named_group_holds_power: false,
        mappings: mappings.clone(),
    };
    let updated = super::plan(kind, new, &options)?;
    let live = super::plan(kind, old, &options)?;
    // The updated object as a restore's create would make it: the value of
    // a field the live object lacks.
    let created = crate::patch::apply(new, &updated.changes).ok();
    let mut work = new.clone();
    let mut seen: BTreeSet<Vec<String>> = BTreeSet::new();
    let mut changes = Vec::new();
    for change in updated.changes.iter().filter(|change| kept(change)) {
        let tokens = unit(&change.tokens);
        if !seen.insert(tokens.clone()) {
            continue;
        }
        let pointer = pointer_of(&tokens);
        let (desired, reason) = match old.pointer(&pointer) {
            Some(live) => (
                Some(live),
                format!(
                    "kept the live value: Velero's update would bring the backup's ({})",
                    change.reason
                ),
            ),
            None => (
                created
                    .as_ref()
                    .and_then(|created| created.pointer(&pointer)),
                format!(
                    "the live object has none: as a restore would make it ({})",
                    change.reason
                ),
            ),
        };
        changes.extend(converge(&mut work, tokens, desired, reason));
    }
    for change in live.changes.iter().filter(|change| {
        kept(change)
            && !matches!(change.edit, Edit::Add(_))
            // Entries of a list are not put back (see above).
            && change.rule != super::vm::R_INSTANCE_STORAGE_VOLUMES
    }) {
        let tokens = unit(&change.tokens);
        if !seen.insert(tokens.clone()) {
            continue;
        }
        let desired = old.pointer(&pointer_of(&tokens));
        let reason = format!(
            "kept the live value: Velero's update would drop it ({})",
            change.reason
        );
        changes.extend(converge(&mut work, tokens, desired, reason));
    }
    let own = |object: &Value| -> BTreeSet<String> {
        object
            .pointer("/metadata/annotations")
            .and_then(Value::as_object)
            .map(|annotations| {
                annotations
                    .keys()
                    .filter(|key| key.starts_with(OWN_ANNOTATION_PREFIX))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    };
    for key in own(new).union(&own(old)) {
        let tokens = vec![
            "metadata".to_string(),
            "annotations".to_string(),
            key.clone(),
        ];
        let desired = old.pointer(&pointer_of(&tokens));
        changes.extend(converge(
            &mut work,
            tokens,
            desired,
            "ours: the live object's, never the backup's".to_string(),
        ));
    }
    Ok(changes)
}

/// Whether a create rule's change marks a field an update keeps: not the
/// report-only changes inside the conversion copy (its annotation is the
/// field), and not the power state (Velero's to update; a suspended VM is
/// refused on create only).
fn kept(change: &Change) -> bool {
    !change.in_conversion_copy && change.rule != super::vm::R_SUSPENDED
}

/// The field a change's location belongs to: an interface's network
/// reference is kept or mapped whole (its kind, name and apiVersion go
/// together).
fn unit(tokens: &[String]) -> Vec<String> {
    match tokens {
        [spec, network, interfaces, index, reference, _, ..]
            if spec == "spec"
                && network == "network"
                && interfaces == "interfaces"
                && reference == "network"
                && index.parse::<usize>().is_ok() =>
        {
            tokens[..5].to_vec()
        }
        _ => tokens.to_vec(),
    }
}

fn pointer_of(tokens: &[String]) -> String {
    json_patch::jsonptr::PointerBuf::from_tokens(tokens.iter().map(String::as_str)).to_string()
}

/// The change that gives `work` the `desired` value at `tokens` (absent:
/// none), applied to `work` so that the next one is decided against the
/// object as patched so far; none when it has it already, or when it could
/// only be added into a list or under a missing list.
fn converge(
    work: &mut Value,
    tokens: Vec<String>,
    desired: Option<&Value>,
    reason: String,
) -> Option<Change> {
    let current = work.pointer(&pointer_of(&tokens));
    let change = match (current, desired) {
        (Some(current), Some(desired)) if current == desired => return None,
        (None, None) => return None,
        (Some(_), Some(desired)) => {
            Change::replace(tokens, desired.clone(), R_UPDATE_KEEPS_LIVE, reason)
        }
        (Some(_), None) => Change::remove(tokens, R_UPDATE_KEEPS_LIVE, reason),
        (None, Some(desired)) => {
            // Under the deepest object that exists, with an object for each
            // missing level (never a list).
            let depth = (0..tokens.len())
                .rev()
                .find(|depth| work.pointer(&pointer_of(&tokens[..*depth])).is_some())?;
            if !work.pointer(&pointer_of(&tokens[..depth]))?.is_object()
                || tokens[depth + 1..]
                    .iter()
                    .any(|token| token.parse::<usize>().is_ok())
            {
                return None;
            }
            let value = tokens[depth + 1..]
                .iter()
                .rev()
                .fold(desired.clone(), |value, token| {
                    Value::Object([(token.clone(), value)].into_iter().collect())
                });
            Change::add(
                tokens[..=depth].to_vec(),
                value,
                R_UPDATE_KEEPS_LIVE,
                reason,
            )
        }
    };
    json_patch::patch(
        work,
        &crate::patch::to_json_patch(std::slice::from_ref(&change)),
    )
    .ok()?;
    Some(change)
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
            &Arc::default(),
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

    use crate::settings::{GroupPolicy, RestoreUnreadable};
    use crate::vmop::power::{APPLIED_RULES_ANNOTATION, POWER_HELD_ANNOTATION};
    use crate::vmop::{REVIEWED_ANNOTATION, mapping, vm};
    use crate::webhook::admission::Write;
    use crate::webhook::decide::{self, DecideSettings, Facts, Subject};

    /// Velero's update of `live` to `updated`, decided as the webhook does
    /// with `disabled` rules off and `facts`; the object as stored.
    fn update(
        kind: Kind,
        updated: &Value,
        live: &Value,
        disabled: &[&str],
        facts: &Facts,
    ) -> Value {
        let subject = Subject {
            kind,
            write: Write::Update,
            old_object: Some(live),
            restore_label: "r2",
            namespace: "prod",
            object: updated,
            object_label: "VirtualMachine prod/web-1",
            dry_run: false,
            received_at_unix: 1_800_000_000,
        };
        let settings = DecideSettings {
            group_policy: GroupPolicy::WaitThenDeny,
            restore_unreadable: RestoreUnreadable::Deny,
            disabled_rules: Arc::new(disabled.iter().map(|rule| rule.to_string()).collect()),
            power_policy: PowerPolicy::BootOrder,
            velero_namespace: "velero".into(),
        };
        let decision = decide::decide(&subject, facts, &settings);
        assert!(decision.verdict.denial.is_none(), "{decision:?}");
        crate::patch::apply(updated, &decision.verdict.changes).unwrap()
    }

    const VM: Kind = Kind::VirtualMachine(ApiVersion(5));

    fn live_vm() -> Value {
        json!({"apiVersion": "vmoperator.vmware.com/v1alpha5", "kind": "VirtualMachine",
            "metadata": {"name": "web-1", "labels": {"velero.io/restore-name": "r1"},
                "annotations": {"virtualmachine.vmoperator.vmware.com/first-boot-done": "true"}},
            "spec": {"instanceUUID": "u-live", "biosUUID": "b-live", "className": "medium",
                "bootstrap": {"cloudInit": {"instanceID": "b-live"}},
                "network": {"interfaces": [{"name": "eth0", "macAddr": "00:50:56:00:00:02",
                    "addresses": ["10.0.0.2/24"], "gateway4": "10.0.0.1"}]}}})
    }

    /// The identity fields of a VM, as `live_vm` has them.
    const IDENTITY: &[&str] = &[
        "/spec/instanceUUID",
        "/spec/biosUUID",
        "/spec/bootstrap/cloudInit/instanceID",
        "/spec/network/interfaces/0/macAddr",
        "/spec/network/interfaces/0/addresses",
        "/spec/network/interfaces/0/gateway4",
        "/metadata/annotations/virtualmachine.vmoperator.vmware.com~1first-boot-done",
    ];

    /// Issue 33, finding 4: the create rules' switches are not the update's.
    /// With `vm-copy-network-identity` off (the README's example), the
    /// backup's MACs and addresses were written over the live VM's; only
    /// `update-keeps-live` turns keeping the live values off.
    #[test]
    fn an_update_keeps_the_live_identity_whatever_create_rules_are_off() {
        let live = live_vm();
        let updated = json!({"apiVersion": "vmoperator.vmware.com/v1alpha5", "kind": "VirtualMachine",
            "metadata": {"name": "web-1", "labels": {"velero.io/restore-name": "r2"},
                "annotations": {"virtualmachine.vmoperator.vmware.com/first-boot-done": "false"}},
            "spec": {"instanceUUID": "u-orig", "biosUUID": "b-orig", "className": "medium",
                "bootstrap": {"cloudInit": {"instanceID": "b-orig"}},
                "network": {"interfaces": [{"name": "eth0", "macAddr": "00:50:56:00:00:01",
                    "addresses": ["10.0.0.1/24"], "gateway4": "10.0.0.254"}]}}});
        let every_identity_rule = [
            vm::R_INSTANCE_UUID,
            vm::R_COPY_BIOS_UUID,
            vm::R_COPY_INSTANCE_ID,
            vm::R_COPY_NETWORK,
            vm::R_FIRST_BOOT_DONE,
        ];
        let rows: &[(&[&str], bool)] = &[
            (&[], true),
            (&[vm::R_COPY_NETWORK], true),
            (&[vm::R_COPY_BIOS_UUID, vm::R_COPY_INSTANCE_ID], true),
            (&every_identity_rule, true),
            // The update's own switch.
            (&[R_UPDATE_KEEPS_LIVE], false),
        ];
        for (disabled, kept) in rows {
            let stored = update(VM, &updated, &live, disabled, &Facts::default());
            for pointer in IDENTITY {
                let expected = if *kept { &live } else { &updated };
                assert_eq!(
                    stored.pointer(pointer),
                    expected.pointer(pointer),
                    "{pointer} with {disabled:?} off: {stored}"
                );
            }
        }
    }

    /// Issue 33, finding 4: a live identity field the backup lacks is put
    /// back, not dropped by Velero's update (which patches towards the
    /// backup, removing what it lacks).
    #[test]
    fn an_update_keeps_a_live_field_the_backup_lacks() {
        let live = live_vm();
        let lacking = |pointers: &[&str]| {
            let mut updated = live.clone();
            updated["metadata"]["labels"]["velero.io/restore-name"] = json!("r2");
            for pointer in pointers {
                let (parent, key) = pointer.rsplit_once('/').unwrap();
                let key = key.replace("~1", "/");
                updated
                    .pointer_mut(parent)
                    .and_then(Value::as_object_mut)
                    .unwrap()
                    .remove(&key);
            }
            updated
        };
        let rows: Vec<(&str, Value)> = vec![
            ("one field", lacking(&["/spec/instanceUUID"])),
            ("every identity field", lacking(IDENTITY)),
            (
                "whole objects (annotations, bootstrap)",
                lacking(&["/metadata/annotations", "/spec/bootstrap", "/spec/biosUUID"]),
            ),
        ];
        for (row, updated) in rows {
            for disabled in [&[][..], &[vm::R_COPY_NETWORK, vm::R_INSTANCE_UUID][..]] {
                let stored = update(VM, &updated, &live, disabled, &Facts::default());
                for pointer in IDENTITY {
                    assert_eq!(
                        stored.pointer(pointer),
                        live.pointer(pointer),
                        "{row}, {disabled:?} off: {pointer} in {stored}"
                    );
                }
                // What is not cluster-bound stays Velero's.
                assert_eq!(stored["metadata"]["labels"]["velero.io/restore-name"], "r2");
            }
        }
    }

    fn mappings(velero: Value, ours: Value) -> Arc<mapping::Mappings> {
        let configmap = |name: &str, label: &str, data: Value| {
            mapping::ConfigMapData::from_value(&json!({
                "metadata": {"name": name, "namespace": "velero", "labels": {
                    mapping::PLUGIN_CONFIG_LABEL: "", label: mapping::RESTORE_ITEM_ACTION}},
                "data": data}))
        };
        let maps = [
            configmap("storage", mapping::CHANGE_STORAGE_CLASS_LABEL, velero),
            configmap("site-b", mapping::VM_MAPPINGS_LABEL, ours),
        ];
        Arc::new(mapping::select(&maps, "velero", None).unwrap())
    }

    /// Issue 33, finding 4: an update into another Supervisor put the
    /// source's class, storage class, network, zone and image back: the
    /// update had no mappings. A field the live object has keeps its value;
    /// one it lacks gets the mapped value, never the source's.
    #[test]
    fn an_update_keeps_the_live_targets_or_maps_the_sources() {
        let source = json!({"apiVersion": "vmoperator.vmware.com/v1alpha5", "kind": "VirtualMachine",
            "metadata": {"name": "web-1", "labels": {"velero.io/restore-name": "r2",
                "topology.kubernetes.io/zone": "zone-a"}},
            "spec": {"className": "small", "class": {"name": "small-instance-a"},
                "storageClass": "gold-a", "imageName": "vmi-a", "image": {"kind": "VirtualMachineImage", "name": "vmi-a"},
                "network": {"interfaces": [{"name": "eth0",
                    "network": {"apiVersion": "netoperator.vmware.com/v1alpha1", "kind": "Network", "name": "vds-a"}}]}}});
        let live = json!({"apiVersion": "vmoperator.vmware.com/v1alpha5", "kind": "VirtualMachine",
            "metadata": {"name": "web-1", "labels": {"velero.io/restore-name": "r1",
                "topology.kubernetes.io/zone": "az-live"}},
            "spec": {"className": "large", "class": {"name": "large-instance-b"},
                "storageClass": "gold-live", "imageName": "vmi-live", "image": {"kind": "VirtualMachineImage", "name": "vmi-live"},
                "network": {"interfaces": [{"name": "eth0",
                    "network": {"apiVersion": "crd.nsx.vmware.com/v1alpha1", "kind": "SubnetSet", "name": "live-subnets"}}]}}});
        let mapped = Facts {
            mappings: mappings(
                json!({"gold-a": "gold-b"}),
                json!({"classes": "small: medium", "images": "vmi-a: vmi-b", "zones": "zone-a: az-1",
                    "networks": "Network/vds-a: SubnetSet/site-b"}),
            ),
            ..Facts::default()
        };
        let mut bare_live = live.clone();
        bare_live["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove("topology.kubernetes.io/zone");
        for key in ["className", "class", "storageClass", "imageName", "image"] {
            bare_live["spec"].as_object_mut().unwrap().remove(key);
        }
        bare_live["spec"]["network"]["interfaces"][0]
            .as_object_mut()
            .unwrap()
            .remove("network");
        let zone = "/metadata/labels/topology.kubernetes.io~1zone";
        // (live object, field, what the update stores)
        let rows: Vec<(&Value, &str, Option<Value>)> = vec![
            (&live, "/spec/className", Some(json!("large"))),
            (
                &live,
                "/spec/class",
                Some(json!({"name": "large-instance-b"})),
            ),
            (&live, "/spec/storageClass", Some(json!("gold-live"))),
            (&live, "/spec/imageName", Some(json!("vmi-live"))),
            (&live, zone, Some(json!("az-live"))),
            (
                &live,
                "/spec/network/interfaces/0/network",
                Some(live["spec"]["network"]["interfaces"][0]["network"].clone()),
            ),
            (&bare_live, "/spec/className", Some(json!("medium"))),
            (&bare_live, "/spec/class", None),
            (&bare_live, "/spec/storageClass", Some(json!("gold-b"))),
            (&bare_live, "/spec/imageName", Some(json!("vmi-b"))),
            (&bare_live, "/spec/image", None),
            (&bare_live, zone, Some(json!("az-1"))),
            (
                &bare_live,
                "/spec/network/interfaces/0/network",
                Some(
                    json!({"apiVersion": "crd.nsx.vmware.com/v1alpha1", "kind": "SubnetSet", "name": "site-b"}),
                ),
            ),
        ];
        for (live, pointer, expected) in rows {
            // Turning the create rules' mappings off changes nothing here.
            for disabled in [&[][..], &[mapping::R_MAP_CLASS, mapping::R_MAP_NETWORK][..]] {
                let stored = update(VM, &source, live, disabled, &mapped);
                assert_eq!(
                    stored.pointer(pointer),
                    expected.as_ref(),
                    "{pointer} ({disabled:?} off) in {stored}"
                );
            }
        }
    }

    /// Issue 33, finding 5: our own annotations from a backup reached live
    /// objects through updates (a backed-up `power-held` on a live group
    /// made new VMs naming it start PoweredOff for good). On an update each
    /// takes the live object's value, present or absent.
    #[test]
    fn an_update_gives_our_annotations_the_live_objects_values() {
        let backed_up = json!({
            REVIEWED_ANNOTATION: "r0/uid-0",
            POWER_HELD_ANNOTATION: "boot-order",
            "velero-vm-restore-webhook/restored-power-state": "PoweredOn",
            APPLIED_RULES_ANNOTATION: "group-power-held",
            "velero-vm-restore-webhook/companion-done-for-restore": "r0/uid-0",
            "owner": "team-web",
        });
        let kinds = [
            (VM, json!({"powerState": "PoweredOn"})),
            (
                Kind::VirtualMachineGroup(ApiVersion(5)),
                json!({"powerState": "PoweredOn", "bootOrder": [{"members": [{"kind": "VirtualMachine", "name": "db"}]}]}),
            ),
            (
                Kind::PersistentVolumeClaim,
                json!({"storageClassName": "gold"}),
            ),
        ];
        let lives = [
            json!({REVIEWED_ANNOTATION: "r1/uid-1", APPLIED_RULES_ANNOTATION: "vm-instance-uuid", "owner": "team-db"}),
            json!({"owner": "team-db"}),
            Value::Null,
        ];
        for (kind, spec) in &kinds {
            for live_annotations in &lives {
                let object = |annotations: &Value| {
                    let mut object = json!({"metadata": {"name": "g",
                        "labels": {"velero.io/restore-name": "r2"}}, "spec": spec});
                    if !annotations.is_null() {
                        object["metadata"]["annotations"] = annotations.clone();
                    }
                    object
                };
                let (updated, live) = (object(&backed_up), object(live_annotations));
                // Whatever create rules are off.
                for disabled in [&[][..], &[crate::vmop::R_STALE_OWN][..]] {
                    let stored = update(*kind, &updated, &live, disabled, &Facts::default());
                    let ours = |object: &Value| -> Vec<(String, Value)> {
                        object["metadata"]["annotations"]
                            .as_object()
                            .into_iter()
                            .flatten()
                            .filter(|(key, _)| key.starts_with(OWN_ANNOTATION_PREFIX))
                            .map(|(key, value)| (key.clone(), value.clone()))
                            .collect()
                    };
                    assert_eq!(ours(&stored), ours(&live), "{kind:?}: {stored}");
                    // Not ours: Velero's to update.
                    assert_eq!(stored["metadata"]["annotations"]["owner"], "team-web");
                }
            }
        }
    }
}
