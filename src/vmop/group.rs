//! Rules for a restored VirtualMachineGroup (v1alpha2+).

use serde_json::{Map, Value};

use super::power::{self, PowerPolicy};
use super::shape::{self, ShapeError};
use super::vm::with_conversion_copy;
use super::{AnnotationSet, CleanupOptions, Plan, RuleDoc};
use crate::patch::Change;

pub const R_FORCE_SYNC: &str = "group-next-force-power-state-sync-time";
pub const R_POWER_TIME: &str = "group-power-time-annotations";
pub const R_CONVERSION_COPY: &str = "group-conversion-copy";
pub const R_POWER_HELD: &str = "group-power-held";

/// The group's power-push bookkeeping. VM Operator's mutating webhook sets a
/// fresh apply time when a group is created with a power state, so the
/// restored group pushes its power state to members it now has.
const POWER_TIME_ANNOTATIONS: &[&str] = &[
    "vmoperator.vmware.com.protected/apply-power-state-time",
    "vmoperator.vmware.com.protected/last-updated-power-state-time",
];

pub const RULES: &[RuleDoc] = &[
    RuleDoc {
        id: R_FORCE_SYNC,
        kind: "VirtualMachineGroup",
        what: "remove `spec.nextForcePowerStateSyncTime` unless it is empty or `now`",
        why: "any other value is denied on create",
    },
    RuleDoc {
        id: R_POWER_TIME,
        kind: "VirtualMachineGroup",
        what: "remove annotations `vmoperator.vmware.com.protected/{apply,last-updated}-power-state-time`",
        why: "the original group's power push times; VM Operator sets new ones",
    },
    RuleDoc {
        id: R_POWER_HELD,
        kind: "VirtualMachineGroup",
        what: "power policy `boot-order`: a group with `spec.powerState` and a boot order of several steps or a delay, or a child group, is created without it; policy `off`: every group. Annotations `velero-vm-restore-webhook/power-held` and `…/restored-power-state` record it",
        why: "VM Operator stamps the power base at create, long before the members exist, so they would power on as each is deployed, not in boot order. The companion sets the power state back on the top group of each tree once the Restore has finished",
    },
    RuleDoc {
        id: R_CONVERSION_COPY,
        kind: "VirtualMachineGroup",
        what: "clean the copy in annotation `vmoperator.vmware.com/conversion` by the same rules, and drop its `status`",
        why: "VM Operator's conversion copies fields and status back from it",
    },
];

fn object_changes(
    object: &Map<String, Value>,
    options: &CleanupOptions,
    hold_power: bool,
) -> Result<Vec<Change>, ShapeError> {
    let mut changes = Vec::new();
    let meta = shape::meta(object)?;
    if let Some(annotations) = meta.annotations
        && options.enabled(R_POWER_TIME)
    {
        for key in annotations.keys() {
            if POWER_TIME_ANNOTATIONS.contains(&key.as_str()) {
                changes.push(Change::remove(
                    vec!["metadata".into(), "annotations".into(), key.clone()],
                    R_POWER_TIME,
                    "power push time of the original group",
                ));
            }
        }
    }
    if let Some(spec) = shape::map(object, "", "spec")?
        && let Some(value) = shape::string(spec, "spec", "nextForcePowerStateSyncTime")?
        && !value.is_empty()
        && value != "now"
        && options.enabled(R_FORCE_SYNC)
    {
        changes.push(Change::remove(
            vec!["spec".into(), "nextForcePowerStateSyncTime".into()],
            R_FORCE_SYNC,
            "denied on create unless \"now\"",
        ));
    }
    if hold_power
        && let Some(spec) = shape::map(object, "", "spec")?
        && shape::is_set(shape::string(spec, "spec", "powerState")?)
    {
        changes.push(Change::remove(
            vec!["spec".into(), "powerState".into()],
            R_POWER_HELD,
            "held until the restore has finished, then set back by the companion",
        ));
    }
    Ok(changes)
}

/// The power policy that holds this group, and the power state it had.
fn power_hold(
    object: &Map<String, Value>,
    is_child: bool,
    options: &CleanupOptions,
) -> Result<Option<(PowerPolicy, Option<String>)>, ShapeError> {
    if !options.enabled(R_POWER_HELD) {
        return Ok(None);
    }
    let Some(spec) = shape::map(object, "", "spec")? else {
        return Ok(None);
    };
    let state = shape::string(spec, "spec", "powerState")?
        .filter(|state| !state.is_empty())
        .map(str::to_string);
    Ok(match (options.power_policy, state) {
        (PowerPolicy::Off, Some(state)) => Some((PowerPolicy::Off, Some(state))),
        // A child's members take their apply time from the top of the tree:
        // its own power state would stamp its own base at create.
        (PowerPolicy::BootOrder, Some(state))
            if is_child || power::has_sequence(&power::boot_order(spec)?) =>
        {
            Some((PowerPolicy::BootOrder, Some(state)))
        }
        // No power state of its own, under a held parent: its VMs are held too.
        (PowerPolicy::BootOrder, None) if is_child && options.named_group_holds_power => {
            Some((PowerPolicy::BootOrder, None))
        }
        _ => None,
    })
}

pub fn plan(object: &Value, options: &CleanupOptions) -> Result<Plan, ShapeError> {
    let root = shape::root(object)?;
    let parent = group_name(object)?;
    let hold = power_hold(root, parent.is_some(), options)?;
    let changes = with_conversion_copy(root, R_CONVERSION_COPY, options, |inner| {
        object_changes(inner, options, hold.is_some())
    })?;
    let mut set_annotations = Vec::new();
    if let Some((policy, state)) = hold {
        set_annotations.push(AnnotationSet::new(
            power::POWER_HELD_ANNOTATION,
            policy.as_str(),
            R_POWER_HELD,
            "power policy of this restore",
        ));
        if let Some(state) = state {
            set_annotations.push(AnnotationSet::new(
                power::RESTORED_POWER_STATE_ANNOTATION,
                &state,
                R_POWER_HELD,
                "the power state of the backup",
            ));
        }
    }
    Ok(Plan {
        changes,
        group_name: parent,
        denial: None,
        set_annotations,
    })
}

/// The parent group a child group names (`spec.groupName`); empty is none.
pub fn group_name(object: &Value) -> Result<Option<String>, ShapeError> {
    Ok(match shape::map(shape::root(object)?, "", "spec")? {
        Some(spec) => shape::string(spec, "spec", "groupName")?
            .filter(|name| !name.is_empty())
            .map(str::to_string),
        None => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn force_sync_kept_when_now_or_empty() {
        for keep in ["now", ""] {
            let group = json!({"spec": {"nextForcePowerStateSyncTime": keep}});
            assert!(
                plan(&group, &CleanupOptions::default())
                    .unwrap()
                    .changes
                    .is_empty()
            );
        }
        let group = json!({"spec": {"nextForcePowerStateSyncTime": "2026-01-01T00:00:00Z",
            "groupName": "parent"},
            "metadata": {"annotations": {
                "vmoperator.vmware.com.protected/apply-power-state-time": "2026-01-01T00:00:00Z",
                "other": "x"}}});
        let plan = plan(&group, &CleanupOptions::default()).unwrap();
        let paths = plan.pointers();
        assert_eq!(
            paths,
            vec![
                "/metadata/annotations/vmoperator.vmware.com.protected~1apply-power-state-time",
                "/spec/nextForcePowerStateSyncTime",
            ]
        );
        assert_eq!(plan.group_name.as_deref(), Some("parent"));
    }
}
