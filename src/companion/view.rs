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
        marker_value(&self.label(), Some(&self.uid), 0)
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
    /// VM Operator reports the VM as still being created (its
    /// `VirtualMachineCreated` condition is there and not `True`).
    pub creating: bool,
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
            creating: object
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|condition| {
                    condition.get("type").and_then(Value::as_str) == Some(CREATED_CONDITION)
                        && condition.get("status").and_then(Value::as_str) != Some("True")
                }),
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

/// VM Operator's condition on a VM that it has created in vCenter.
pub const CREATED_CONDITION: &str = "VirtualMachineCreated";

/// Where the annotations this binary writes start; the only ones the
/// companion and the report read.
pub const OUR_ANNOTATION_PREFIX: &str = "velero-vm-restore-webhook/";

/// At most this many of our annotations are kept of one object: more than
/// the binary writes, so a crafted object costs little.
const OUR_ANNOTATIONS_KEPT: usize = 32;

/// A map of which only some entries are kept while decoding: the rest are
/// skipped, never held.
#[derive(Debug, Clone, Default)]
pub struct KeptEntries(pub BTreeMap<String, String>);

/// The kept entries of a map; `None` for `null` (no map at all).
fn kept_entries<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
    keep: fn(&str) -> bool,
) -> Result<Option<KeptEntries>, D::Error> {
    struct Visitor(fn(&str) -> bool);
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Option<KeptEntries>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of strings")
        }
        fn visit_map<M: serde::de::MapAccess<'de>>(
            self,
            mut map: M,
        ) -> Result<Option<KeptEntries>, M::Error> {
            let mut kept = BTreeMap::new();
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if (self.0)(&key) && kept.len() < OUR_ANNOTATIONS_KEPT {
                    if let Some(value) = map.next_value::<Option<String>>()? {
                        kept.insert(key.into_owned(), value);
                    }
                } else {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            Ok(Some(KeptEntries(kept)))
        }
        fn visit_unit<E>(self) -> Result<Option<KeptEntries>, E> {
            Ok(None)
        }
    }
    deserializer.deserialize_any(Visitor(keep))
}

fn ours<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<KeptEntries>, D::Error> {
    kept_entries(deserializer, |key| key.starts_with(OUR_ANNOTATION_PREFIX))
}

fn restore_label<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<KeptEntries>, D::Error> {
    kept_entries(deserializer, |key| key == RESTORE_NAME_LABEL)
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetaWire {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default, deserialize_with = "restore_label")]
    labels: Option<KeptEntries>,
    #[serde(default, deserialize_with = "ours")]
    annotations: Option<KeptEntries>,
}

/// The spec fields the companion reads, kept as JSON so that a wrong type
/// counts as absent (as [`ObjectState::from_value`] reads them); every other
/// field is skipped while decoding.
#[derive(Debug, Clone, Default, serde::Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group_name: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    power_state: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot_order: Option<Value>,
}

/// A VM, group or PVC as the companion lists it: the metadata it reads
/// (only the restore label and our own annotations) and the spec fields of
/// [`SpecWire`]. What a user writes elsewhere is skipped while decoding.
/// One status condition, as far as the companion reads it.
#[derive(Debug, Clone, Default, serde::Deserialize, Serialize)]
pub struct ConditionWire {
    #[serde(default, rename = "type")]
    kind: Option<Value>,
    #[serde(default)]
    status: Option<Value>,
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct StatusWire {
    #[serde(default)]
    conditions: Option<Vec<ConditionWire>>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct ObjectWire {
    #[serde(default)]
    metadata: MetaWire,
    #[serde(default)]
    spec: Option<SpecWire>,
    #[serde(default)]
    status: Option<StatusWire>,
}

impl ObjectState {
    /// An object as listed.
    pub fn from_wire(kind: &str, wire: ObjectWire) -> ObjectState {
        let meta = wire.metadata;
        let mut metadata = serde_json::json!({
            "name": meta.name, "namespace": meta.namespace, "uid": meta.uid,
            "resourceVersion": meta.resource_version,
            "labels": meta.labels.map(|kept| kept.0).unwrap_or_default(),
        });
        if let Some(annotations) = meta.annotations {
            metadata["annotations"] = serde_json::to_value(annotations.0).unwrap_or_default();
        }
        let mut object = serde_json::json!({ "metadata": metadata });
        if let Some(spec) = wire.spec {
            object["spec"] = serde_json::to_value(spec).unwrap_or_default();
        }
        if let Some(conditions) = wire.status.and_then(|status| status.conditions) {
            let conditions: Vec<Value> = conditions
                .into_iter()
                .map(|condition| serde_json::json!({"type": condition.kind, "status": condition.status}))
                .collect();
            object["status"] = serde_json::json!({ "conditions": conditions });
        }
        ObjectState::from_value(kind, &object)
    }
}

/// The groups and VMs of one namespace, by name.
#[derive(Debug, Clone, Default)]
pub struct Namespace {
    pub groups: HashMap<String, ObjectState>,
    pub vms: HashSet<String>,
    /// The VMs VM Operator reports as still being created.
    pub creating: HashSet<String>,
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
            creating: HashSet::new(),
        }
    }

    /// The VMs of `group`'s tree that VM Operator is still creating: a
    /// member whose power-on time passes before it is created powers on
    /// late, and the boot order's gaps shrink.
    pub fn creating_under(&self, group: &ObjectState) -> Vec<String> {
        let mut seen = BTreeSet::from([group.name.as_str()]);
        let mut pending = vec![group];
        let mut creating = Vec::new();
        while let Some(next) = pending.pop() {
            for member in &next.members {
                match member.kind.as_str() {
                    "VirtualMachineGroup" => {
                        if seen.insert(member.name.as_str())
                            && let Some(child) = self.groups.get(&member.name)
                        {
                            pending.push(child);
                        }
                    }
                    _ if self.creating.contains(&member.name) => creating.push(member.name.clone()),
                    _ => {}
                }
            }
        }
        creating.sort();
        creating.dedup();
        creating
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_listed_object_keeps_only_the_restore_label_our_annotations_and_the_spec_read() {
        let mut annotations =
            json!({POWER_HELD_ANNOTATION: "boot-order", "theirs": "x".repeat(100_000)});
        for i in 0..100 {
            annotations[format!("{OUR_ANNOTATION_PREFIX}flood-{i}")] = json!("y");
        }
        let wire: ObjectWire = serde_json::from_value(json!({
            "metadata": {"name": "g", "namespace": "prod", "uid": "u", "resourceVersion": "7",
                "labels": {RESTORE_NAME_LABEL: "r1", "team": "web"}, "annotations": annotations,
                "managedFields": [{"manager": "x"}]},
            "spec": {"groupName": "app", "powerState": "PoweredOn",
                "bootOrder": [{"members": [{"name": "vm-a"}], "powerOnDelay": "5s"}],
                "somethingLarge": "z".repeat(100_000)},
            "status": {"members": []}}))
        .unwrap();
        let state = ObjectState::from_wire("VirtualMachineGroup", wire);
        assert_eq!(
            state.labels.keys().collect::<Vec<_>>(),
            [RESTORE_NAME_LABEL]
        );
        let kept = state.annotations.as_ref().unwrap();
        assert!(
            kept.keys()
                .all(|key| key.starts_with(OUR_ANNOTATION_PREFIX))
        );
        assert!(kept.len() <= OUR_ANNOTATIONS_KEPT);
        assert_eq!(state.group_name.as_deref(), Some("app"));
        assert_eq!(state.members.len(), 1);
        assert_eq!(state.delays, [Some("5s".to_string())]);
        assert_eq!(state.resource_version, "7");
        // A VM VM Operator is still creating.
        let creating: ObjectWire = serde_json::from_value(json!({"metadata": {"name": "vm-a"},
            "status": {"conditions": [{"type": CREATED_CONDITION, "status": "False", "reason": "x".repeat(1000)}]}}))
        .unwrap();
        assert!(ObjectState::from_wire("VirtualMachine", creating).creating);
        let created: ObjectWire = serde_json::from_value(json!({"metadata": {"name": "vm-b"},
            "status": {"conditions": [{"type": CREATED_CONDITION, "status": "True"}]}}))
        .unwrap();
        assert!(!ObjectState::from_wire("VirtualMachine", created).creating);
        // No annotations at all stays "no map" (a patch must create it).
        let bare: ObjectWire =
            serde_json::from_value(json!({"metadata": {"name": "v", "annotations": null}}))
                .unwrap();
        assert!(
            ObjectState::from_wire("VirtualMachine", bare)
                .annotations
                .is_none()
        );
    }
}

#[cfg(test)]
mod creating_tests {
    use super::fixtures::group;
    use super::*;
    use serde_json::json;

    #[test]
    fn the_members_still_being_created_are_found_down_the_tree() {
        let top = group(
            "top",
            None,
            true,
            json!([{"members": [{"name": "db-1"},
            {"kind": "VirtualMachineGroup", "name": "child"}]}]),
        );
        let child = group(
            "child",
            Some("top"),
            true,
            json!([{"members": [{"name": "web-1"}, {"name": "web-2"}]}]),
        );
        let mut view = Namespace::new([top.clone(), child], ["db-1", "web-1", "web-2"]);
        assert!(view.creating_under(&top).is_empty());
        view.creating = ["web-2".to_string(), "db-1".to_string()].into();
        assert_eq!(view.creating_under(&top), ["db-1", "web-2"]);
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
