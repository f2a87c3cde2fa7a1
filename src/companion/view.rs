//! What the restore companion reads of a finished Velero Restore: the
//! Restore itself, and the groups and VMs of each namespace it restored into,
//! as plain values. Pure; the reads are in [`crate::companion`], and
//! [`super::plan`] and [`super::report`] work on these values.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;
use serde_json::Value;

use crate::facts::restore::label_value_for;
use crate::vmop::power::{POWER_HELD_ANNOTATION, PowerPolicy};
use crate::vmop::{RESTORE_NAME_LABEL, REVIEWED_ANNOTATION, marker_value};

/// Set by the companion on every group it handled for a Restore:
/// `<restore>/<restore UID>`.
pub const COMPANION_DONE_ANNOTATION: &str = "velero-vm-restore-webhook/companion-done-for-restore";

/// Velero's final Restore phases: nothing more is created after them.
pub const FINAL_PHASES: &[&str] = &["Completed", "PartiallyFailed", "Failed", "FailedValidation"];

/// A finished Velero Restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoreRef {
    pub name: String,
    pub uid: String,
    pub phase: String,
}

impl RestoreRef {
    /// The `velero.io/restore-name` label value of its objects.
    pub fn label(&self) -> String {
        label_value_for(&self.name)
    }

    /// The webhook's marker value for this Restore.
    pub fn marker(&self) -> String {
        marker_value(&self.label(), Some(&self.uid))
    }
}

/// A member of a group's boot order, with its place in the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub step: usize,
    pub index: usize,
    pub kind: String,
    pub name: String,
}

impl Member {
    pub fn describe(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }
}

/// A VM, group or PVC as read from the cluster, with what the companion and
/// the report need of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObjectState {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: String,
    pub labels: BTreeMap<String, String>,
    /// `None` when the object has no annotations map at all.
    pub annotations: Option<BTreeMap<String, String>>,
    pub group_name: Option<String>,
    pub power_state: Option<String>,
    pub members: Vec<Member>,
    /// `powerOnDelay` of each boot-order step, as written.
    pub delays: Vec<Option<String>>,
}

fn string_map(value: Option<&Value>) -> Option<BTreeMap<String, String>> {
    value.and_then(Value::as_object).map(|entries| {
        entries
            .iter()
            .filter_map(|(key, value)| Some((key.clone(), value.as_str()?.to_string())))
            .collect()
    })
}

fn text(value: &Value, pointer: &str) -> Option<String> {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .filter(|text| !text.is_empty())
        .map(str::to_string)
}

impl ObjectState {
    /// Reads an object leniently: a field of the wrong type counts as absent.
    pub fn from_value(kind: &str, object: &Value) -> ObjectState {
        let mut members = Vec::new();
        let mut delays = Vec::new();
        if let Some(steps) = object.pointer("/spec/bootOrder").and_then(Value::as_array) {
            for (step_index, step) in steps.iter().enumerate() {
                delays.push(text(step, "/powerOnDelay"));
                let listed = step.get("members").and_then(Value::as_array);
                for (index, member) in listed.into_iter().flatten().enumerate() {
                    let Some(name) = text(member, "/name") else {
                        continue;
                    };
                    members.push(Member {
                        step: step_index,
                        index,
                        // The CRD's default.
                        kind: text(member, "/kind").unwrap_or_else(|| "VirtualMachine".into()),
                        name,
                    });
                }
            }
        }
        ObjectState {
            kind: kind.to_string(),
            namespace: text(object, "/metadata/namespace").unwrap_or_default(),
            name: text(object, "/metadata/name").unwrap_or_default(),
            uid: text(object, "/metadata/uid").unwrap_or_default(),
            resource_version: text(object, "/metadata/resourceVersion").unwrap_or_default(),
            labels: string_map(object.pointer("/metadata/labels")).unwrap_or_default(),
            annotations: string_map(object.pointer("/metadata/annotations")),
            group_name: text(object, "/spec/groupName"),
            power_state: text(object, "/spec/powerState"),
            members,
            delays,
        }
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }

    pub fn label(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }

    /// Whether `restore` created this object: its restore label, and the
    /// webhook's marker (when set) with this Restore's UID.
    pub fn restored_by(&self, restore: &RestoreRef) -> bool {
        self.labels.get(RESTORE_NAME_LABEL) == Some(&restore.label())
            && self
                .annotation(REVIEWED_ANNOTATION)
                .is_none_or(|marker| marker == restore.marker())
    }

    pub(crate) fn held_for_boot_order(&self) -> bool {
        self.annotation(POWER_HELD_ANNOTATION) == Some(PowerPolicy::BootOrder.as_str())
    }
}

/// The groups and VMs of one namespace, by name.
#[derive(Debug, Clone, Default)]
pub struct Namespace {
    pub groups: HashMap<String, ObjectState>,
    pub vms: HashSet<String>,
}

impl Namespace {
    pub fn new<'a>(
        groups: impl IntoIterator<Item = ObjectState>,
        vms: impl IntoIterator<Item = &'a str>,
    ) -> Namespace {
        Namespace {
            groups: groups
                .into_iter()
                .map(|group| (group.name.clone(), group))
                .collect(),
            vms: vms.into_iter().map(str::to_string).collect(),
        }
    }

    pub(crate) fn has_member(&self, member: &Member) -> bool {
        match member.kind.as_str() {
            "VirtualMachineGroup" => self.groups.contains_key(&member.name),
            _ => self.vms.contains(&member.name),
        }
    }

    /// The groups above `group`, nearest first (a cycle ends the walk).
    pub(crate) fn ancestors<'a>(&'a self, group: &'a ObjectState) -> Vec<&'a ObjectState> {
        let mut seen = BTreeSet::from([group.name.as_str()]);
        let mut out = Vec::new();
        let mut next = group.group_name.as_deref();
        while let Some(name) = next {
            if !seen.insert(name) {
                break;
            }
            let Some(parent) = self.groups.get(name) else {
                break;
            };
            out.push(parent);
            next = parent.group_name.as_deref();
        }
        out
    }

    /// The group whose power push reaches `group`: the nearest ancestor with
    /// a power state, or one held to be started.
    pub fn powered_ancestor<'a>(&'a self, group: &'a ObjectState) -> Option<&'a ObjectState> {
        self.ancestors(group)
            .into_iter()
            .find(|ancestor| ancestor.power_state.is_some() || ancestor.held_for_boot_order())
    }
}

/// A Restore and groups shaped as the companion reads them, for the tests of
/// the plan and the report.
#[cfg(test)]
pub(crate) mod fixtures {
    use serde_json::{Value, json};

    use super::{ObjectState, RestoreRef};
    use crate::vmop::power::{POWER_HELD_ANNOTATION, RESTORED_POWER_STATE_ANNOTATION};
    use crate::vmop::{RESTORE_NAME_LABEL, REVIEWED_ANNOTATION};

    pub fn restore() -> RestoreRef {
        RestoreRef {
            name: "r1".into(),
            uid: "u1".into(),
            phase: "PartiallyFailed".into(),
        }
    }

    pub fn group(name: &str, parent: Option<&str>, held: bool, order: Value) -> ObjectState {
        let mut annotations = json!({REVIEWED_ANNOTATION: "r1/u1"});
        if held {
            annotations[POWER_HELD_ANNOTATION] = json!("boot-order");
            annotations[RESTORED_POWER_STATE_ANNOTATION] = json!("PoweredOn");
        }
        let mut spec = json!({"bootOrder": order});
        if let Some(parent) = parent {
            spec["groupName"] = json!(parent);
        }
        ObjectState::from_value(
            "VirtualMachineGroup",
            &json!({"metadata": {"name": name, "namespace": "prod", "resourceVersion": "7",
                "labels": {RESTORE_NAME_LABEL: "r1"}, "annotations": annotations}, "spec": spec}),
        )
    }
}
