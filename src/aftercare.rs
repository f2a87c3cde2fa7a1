//! What the restore companion does once a Velero Restore has finished, and
//! the per-restore report, as pure functions over the objects it read. The
//! I/O (lists, patches, Events) is in [`crate::companion`].
//!
//! For each group the Restore created (label `velero.io/restore-name`, and
//! the webhook's marker with the Restore's UID), one JSON Patch, guarded by a
//! `test` of the resourceVersion it was planned from:
//! - **prune**: remove `spec.bootOrder` members that do not exist in the
//!   namespace, which would otherwise keep VM Operator from ever placing
//!   the group's other members;
//! - **start**: on the top group of a tree held by power policy
//!   `boot-order`, set `spec.powerState` back from the annotation, so VM
//!   Operator stamps a fresh power base and powers the members on in boot
//!   order with their delays;
//! - **release**: a held group under a group with a power state gets its
//!   power from that group's push: only the hold annotations go;
//! - mark the group done for this Restore, so nothing is done twice.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;
use serde_json::{Value, json};

use crate::restores::label_value_for;
use crate::vmop::power::{
    APPLIED_RULES_ANNOTATION, POWER_HELD_ANNOTATION, POWER_STARTED_ANNOTATION,
    PRUNED_MEMBERS_ANNOTATION, PowerPolicy, RESTORED_POWER_STATE_ANNOTATION,
};
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

    fn held_for_boot_order(&self) -> bool {
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

    fn has_member(&self, member: &Member) -> bool {
        match member.kind.as_str() {
            "VirtualMachineGroup" => self.groups.contains_key(&member.name),
            _ => self.vms.contains(&member.name),
        }
    }

    /// The groups above `group`, nearest first (a cycle ends the walk).
    fn ancestors<'a>(&'a self, group: &'a ObjectState) -> Vec<&'a ObjectState> {
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

/// What the companion does to one group, as one guarded JSON Patch.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupPlan {
    pub namespace: String,
    pub name: String,
    pub patch: Vec<Value>,
    pub pruned: Vec<Member>,
    /// The power state set back on a top group.
    pub started: Option<String>,
    /// A held group whose power comes from the named ancestor's push.
    pub released_under: Option<String>,
}

/// A JSON Pointer to an annotation.
fn annotation_path(key: &str) -> String {
    format!(
        "/metadata/annotations/{}",
        key.replace('~', "~0").replace('/', "~1")
    )
}

/// The plan for one group restored by `restore`, or `None` when it was
/// already handled for this Restore.
pub fn plan_group(
    restore: &RestoreRef,
    prune: bool,
    group: &ObjectState,
    namespace: &Namespace,
) -> Option<GroupPlan> {
    let done = restore.marker();
    if group.annotation(COMPANION_DONE_ANNOTATION) == Some(done.as_str()) {
        return None;
    }
    let mut patch = vec![json!({
        "op": "test", "path": "/metadata/resourceVersion", "value": group.resource_version
    })];
    if group.annotations.is_none() {
        patch.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
    }
    let set = |patch: &mut Vec<Value>, key: &str, value: &str| {
        patch.push(json!({"op": "add", "path": annotation_path(key), "value": value}));
    };
    let remove = |patch: &mut Vec<Value>, key: &str| {
        if group.annotation(key).is_some() {
            patch.push(json!({"op": "remove", "path": annotation_path(key)}));
        }
    };

    let pruned: Vec<Member> = if prune {
        group
            .members
            .iter()
            .filter(|member| !namespace.has_member(member))
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    // Last first, so that earlier indexes stay valid.
    for member in pruned.iter().rev() {
        patch.push(json!({
            "op": "remove",
            "path": format!("/spec/bootOrder/{}/members/{}", member.step, member.index),
        }));
    }
    if !pruned.is_empty() {
        let names: Vec<String> = pruned.iter().map(Member::describe).collect();
        set(&mut patch, PRUNED_MEMBERS_ANNOTATION, &names.join(","));
    }

    let mut started = None;
    let mut released_under = None;
    if group.held_for_boot_order() {
        patch.push(json!({
            "op": "test", "path": annotation_path(POWER_HELD_ANNOTATION),
            "value": PowerPolicy::BootOrder.as_str(),
        }));
        match (
            namespace.powered_ancestor(group),
            group.annotation(RESTORED_POWER_STATE_ANNOTATION),
        ) {
            (None, Some(state)) if group.power_state.is_none() => {
                patch.push(json!({"op": "add", "path": "/spec/powerState", "value": state}));
                set(&mut patch, POWER_STARTED_ANNOTATION, &done);
                started = Some(state.to_string());
            }
            (ancestor, _) => {
                released_under = Some(
                    ancestor
                        .map(|ancestor| ancestor.name.clone())
                        .unwrap_or_default(),
                );
            }
        }
        remove(&mut patch, POWER_HELD_ANNOTATION);
        remove(&mut patch, RESTORED_POWER_STATE_ANNOTATION);
    }
    set(&mut patch, COMPANION_DONE_ANNOTATION, &done);
    Some(GroupPlan {
        namespace: group.namespace.clone(),
        name: group.name.clone(),
        patch,
        pruned,
        started,
        released_under,
    })
}

/// Per kind: how many objects the Restore created, how many the webhook
/// changed, and how often each rule applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KindReport {
    pub kind: String,
    pub restored: usize,
    pub changed: usize,
    pub rules: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StartedGroup {
    pub namespace: String,
    pub name: String,
    pub power_state: String,
    /// Each step: its members and its delay.
    pub boot_order: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrunedGroup {
    pub namespace: String,
    pub name: String,
    pub members: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WaitingVm {
    pub namespace: String,
    pub name: String,
    pub group: String,
    pub why: String,
}

/// What a Restore did to VM Operator objects, from the cluster's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub restore: String,
    pub uid: String,
    pub phase: String,
    pub kinds: Vec<KindReport>,
    pub started_in_boot_order: Vec<StartedGroup>,
    pub pruned: Vec<PrunedGroup>,
    /// Objects left PoweredOff by power policy `off`.
    pub left_powered_off: Vec<String>,
    pub waiting_for_group: Vec<WaitingVm>,
    /// Restored groups the companion has not handled (it is off, or not done yet).
    pub groups_not_handled: Vec<String>,
}

/// `restored`: the objects labelled with the Restore's name; `namespaces`:
/// every group and VM of their namespaces.
pub fn build_report(
    restore: &RestoreRef,
    restored: &[ObjectState],
    namespaces: &HashMap<String, Namespace>,
) -> Report {
    let marker = restore.marker();
    let mut kinds: BTreeMap<&str, KindReport> = BTreeMap::new();
    let mut report = Report {
        restore: restore.name.clone(),
        uid: restore.uid.clone(),
        phase: restore.phase.clone(),
        kinds: Vec::new(),
        started_in_boot_order: Vec::new(),
        pruned: Vec::new(),
        left_powered_off: Vec::new(),
        waiting_for_group: Vec::new(),
        groups_not_handled: Vec::new(),
    };
    let empty = Namespace::default();
    for object in restored.iter().filter(|object| object.restored_by(restore)) {
        let entry = kinds
            .entry(object.kind.as_str())
            .or_insert_with(|| KindReport {
                kind: object.kind.clone(),
                ..Default::default()
            });
        entry.restored += 1;
        if let Some(rules) = object.annotation(APPLIED_RULES_ANNOTATION) {
            entry.changed += 1;
            for rule in rules.split(',').filter(|rule| !rule.is_empty()) {
                *entry.rules.entry(rule.to_string()).or_default() += 1;
            }
        }
        if object.annotation(POWER_HELD_ANNOTATION) == Some(PowerPolicy::Off.as_str()) {
            report.left_powered_off.push(object.label());
        }
        let namespace = namespaces.get(&object.namespace).unwrap_or(&empty);
        match object.kind.as_str() {
            "VirtualMachineGroup" => {
                if object.annotation(POWER_STARTED_ANNOTATION) == Some(marker.as_str()) {
                    report.started_in_boot_order.push(StartedGroup {
                        namespace: object.namespace.clone(),
                        name: object.name.clone(),
                        power_state: object.power_state.clone().unwrap_or_default(),
                        boot_order: boot_order_lines(object),
                    });
                }
                if let Some(pruned) = object.annotation(PRUNED_MEMBERS_ANNOTATION) {
                    report.pruned.push(PrunedGroup {
                        namespace: object.namespace.clone(),
                        name: object.name.clone(),
                        members: pruned.split(',').map(str::to_string).collect(),
                    });
                }
                if object.annotation(COMPANION_DONE_ANNOTATION) != Some(marker.as_str()) {
                    report.groups_not_handled.push(object.label());
                }
            }
            "VirtualMachine" => {
                if let Some(why) = waiting_because(object, namespace) {
                    report.waiting_for_group.push(WaitingVm {
                        namespace: object.namespace.clone(),
                        name: object.name.clone(),
                        group: object.group_name.clone().unwrap_or_default(),
                        why,
                    });
                }
            }
            _ => {}
        }
    }
    report.kinds = kinds.into_values().collect();
    report
}

fn boot_order_lines(group: &ObjectState) -> Vec<String> {
    group
        .delays
        .iter()
        .enumerate()
        .map(|(step, delay)| {
            let members: Vec<String> = group
                .members
                .iter()
                .filter(|member| member.step == step)
                .map(|member| member.name.clone())
                .collect();
            format!(
                "{} after {}",
                if members.is_empty() {
                    "(none)".to_string()
                } else {
                    members.join(",")
                },
                delay.as_deref().unwrap_or("0s")
            )
        })
        .collect()
}

/// Why a restored VM still waits for its group, if it does.
fn waiting_because(vm: &ObjectState, namespace: &Namespace) -> Option<String> {
    let group_name = vm.group_name.as_deref()?;
    let Some(group) = namespace.groups.get(group_name) else {
        return Some(format!("VirtualMachineGroup {group_name} does not exist"));
    };
    if vm.annotation(POWER_HELD_ANNOTATION) != Some(PowerPolicy::BootOrder.as_str()) {
        return None;
    }
    // Held for boot order: waiting until the top of its group tree is started.
    let top = std::iter::once(group)
        .chain(namespace.ancestors(group))
        .find(|group| group.held_for_boot_order());
    top.map(|top| {
        format!(
            "power held until VirtualMachineGroup {} is started (after the Restore finishes)",
            top.name
        )
    })
}

/// At most `limit` bytes of `items` joined, with how many were left off.
fn bounded_list(items: &[String], limit: usize) -> String {
    let mut out = String::new();
    for (index, item) in items.iter().enumerate() {
        let piece = if out.is_empty() {
            item.clone()
        } else {
            format!(", {item}")
        };
        if out.len() + piece.len() > limit {
            out.push_str(&format!(" and {} more", items.len() - index));
            break;
        }
        out.push_str(&piece);
    }
    out
}

/// Longest Event message written; the rest is summarised.
const EVENT_MESSAGE_LIMIT: usize = 900;

impl Report {
    /// The report as Events on the Restore: `(reason, message)`.
    pub fn event_lines(&self) -> Vec<(&'static str, String)> {
        let mut lines = Vec::new();
        for kind in &self.kinds {
            let rules: Vec<String> = kind
                .rules
                .iter()
                .map(|(rule, count)| format!("{rule} ×{count}"))
                .collect();
            lines.push((
                "VMRestoreCleaned",
                format!(
                    "{}: {} of {} restored changed by velero-vm-restore-webhook{}",
                    kind.kind,
                    kind.changed,
                    kind.restored,
                    if rules.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", bounded_list(&rules, EVENT_MESSAGE_LIMIT))
                    }
                ),
            ));
        }
        if !self.started_in_boot_order.is_empty() {
            let groups: Vec<String> = self
                .started_in_boot_order
                .iter()
                .map(|group| {
                    format!(
                        "{}/{} {} [{}]",
                        group.namespace,
                        group.name,
                        group.power_state,
                        group.boot_order.join("; ")
                    )
                })
                .collect();
            lines.push((
                "VMRestoreBootOrder",
                format!(
                    "started in boot order: {}",
                    bounded_list(&groups, EVENT_MESSAGE_LIMIT)
                ),
            ));
        }
        if !self.pruned.is_empty() {
            let groups: Vec<String> = self
                .pruned
                .iter()
                .map(|group| {
                    format!(
                        "{}/{} dropped {}",
                        group.namespace,
                        group.name,
                        group.members.join(",")
                    )
                })
                .collect();
            lines.push((
                "VMRestorePrunedMembers",
                format!(
                    "members not restored, removed from spec.bootOrder so the others are placed: {}",
                    bounded_list(&groups, EVENT_MESSAGE_LIMIT)
                ),
            ));
        }
        if !self.left_powered_off.is_empty() {
            lines.push((
                "VMRestorePoweredOff",
                format!(
                    "power policy off: left PoweredOff for you to check and start (set spec.powerState): {}",
                    bounded_list(&self.left_powered_off, EVENT_MESSAGE_LIMIT)
                ),
            ));
        }
        if !self.waiting_for_group.is_empty() {
            let vms: Vec<String> = self
                .waiting_for_group
                .iter()
                .map(|vm| format!("{}/{} ({})", vm.namespace, vm.name, vm.why))
                .collect();
            lines.push((
                "VMRestoreWaitingForGroup",
                format!(
                    "VMs waiting for a group: {}",
                    bounded_list(&vms, EVENT_MESSAGE_LIMIT)
                ),
            ));
        }
        lines
    }

    /// The report as text, for `report` without `-o json`.
    pub fn to_table(&self) -> String {
        let mut out = format!(
            "Restore {} (uid {}), phase {}\n\n",
            self.restore, self.uid, self.phase
        );
        out.push_str(&format!(
            "{:<24} {:>8} {:>8}  RULES\n",
            "KIND", "RESTORED", "CHANGED"
        ));
        for kind in &self.kinds {
            let rules: Vec<String> = kind
                .rules
                .iter()
                .map(|(rule, count)| format!("{rule}={count}"))
                .collect();
            out.push_str(&format!(
                "{:<24} {:>8} {:>8}  {}\n",
                kind.kind,
                kind.restored,
                kind.changed,
                rules.join(" ")
            ));
        }
        let mut section = |title: &str, rows: Vec<String>| {
            out.push_str(&format!("\n{title}: "));
            if rows.is_empty() {
                out.push_str("none\n");
            } else {
                out.push('\n');
                for row in rows {
                    out.push_str(&format!("  {row}\n"));
                }
            }
        };
        section(
            "Started in boot order",
            self.started_in_boot_order
                .iter()
                .map(|group| {
                    format!(
                        "{}/{} {}: {}",
                        group.namespace,
                        group.name,
                        group.power_state,
                        group.boot_order.join("; ")
                    )
                })
                .collect(),
        );
        section(
            "Members pruned",
            self.pruned
                .iter()
                .map(|group| {
                    format!(
                        "{}/{}: {}",
                        group.namespace,
                        group.name,
                        group.members.join(", ")
                    )
                })
                .collect(),
        );
        section(
            "Left PoweredOff (policy off)",
            self.left_powered_off.clone(),
        );
        section(
            "VMs waiting for a group",
            self.waiting_for_group
                .iter()
                .map(|vm| format!("{}/{}: {}", vm.namespace, vm.name, vm.why))
                .collect(),
        );
        section(
            "Groups not handled by the companion yet",
            self.groups_not_handled.clone(),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restore() -> RestoreRef {
        RestoreRef {
            name: "r1".into(),
            uid: "u1".into(),
            phase: "PartiallyFailed".into(),
        }
    }

    fn group(name: &str, parent: Option<&str>, held: bool, order: Value) -> ObjectState {
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

    fn apply(group: &ObjectState, plan: &GroupPlan) -> Value {
        let mut object = json!({"metadata": {"name": group.name, "resourceVersion": group.resource_version,
            "annotations": group.annotations.clone().unwrap_or_default()},
            "spec": {"bootOrder": []}});
        // Rebuild the boot order from the members read.
        for delay in &group.delays {
            let mut step = json!({"members": []});
            if let Some(delay) = delay {
                step["powerOnDelay"] = json!(delay);
            }
            object["spec"]["bootOrder"]
                .as_array_mut()
                .unwrap()
                .push(step);
        }
        for member in &group.members {
            object["spec"]["bootOrder"][member.step]["members"]
                .as_array_mut()
                .unwrap()
                .push(json!({"kind": member.kind, "name": member.name}));
        }
        let patch: json_patch::Patch =
            serde_json::from_value(Value::Array(plan.patch.clone())).unwrap();
        json_patch::patch(&mut object, &patch).unwrap();
        object
    }

    #[test]
    fn a_held_top_group_is_started_and_missing_members_pruned_in_one_patch() {
        let app = group(
            "app",
            None,
            true,
            json!([{"members": [{"kind": "VirtualMachine", "name": "db-1"}, {"name": "db-2"}]},
                   {"members": [{"kind": "VirtualMachineGroup", "name": "web"}], "powerOnDelay": "45s"},
                   {"members": [{"kind": "VirtualMachine", "name": "gone"}], "powerOnDelay": "20s"}]),
        );
        let web = group(
            "web",
            Some("app"),
            true,
            json!([{"members": [{"name": "web-1"}]}]),
        );
        let namespace = Namespace::new([app.clone(), web.clone()], ["db-1", "db-2", "web-1"]);
        let plan = plan_group(&restore(), true, &app, &namespace).unwrap();
        assert_eq!(plan.started.as_deref(), Some("PoweredOn"));
        assert_eq!(
            plan.pruned.iter().map(Member::describe).collect::<Vec<_>>(),
            ["VirtualMachine/gone"]
        );
        let patched = apply(&app, &plan);
        assert_eq!(patched["spec"]["powerState"], "PoweredOn");
        assert_eq!(patched["spec"]["bootOrder"][2]["members"], json!([]));
        assert_eq!(
            patched["spec"]["bootOrder"][2]["powerOnDelay"], "20s",
            "the delay is kept"
        );
        assert_eq!(
            patched["spec"]["bootOrder"][0]["members"][1]["name"],
            "db-2"
        );
        let annotations = &patched["metadata"]["annotations"];
        assert_eq!(
            annotations[PRUNED_MEMBERS_ANNOTATION],
            "VirtualMachine/gone"
        );
        assert_eq!(annotations[POWER_STARTED_ANNOTATION], "r1/u1");
        assert_eq!(annotations[COMPANION_DONE_ANNOTATION], "r1/u1");
        assert!(annotations.get(POWER_HELD_ANNOTATION).is_none());
        assert!(annotations.get(RESTORED_POWER_STATE_ANNOTATION).is_none());

        // The child gets its power from the top's push: released, not started.
        let plan = plan_group(&restore(), true, &web, &namespace).unwrap();
        assert_eq!(plan.started, None);
        assert_eq!(plan.released_under.as_deref(), Some("app"));
        let patched = apply(&web, &plan);
        assert!(patched["spec"].get("powerState").is_none());
        assert!(
            patched["metadata"]["annotations"]
                .get(POWER_HELD_ANNOTATION)
                .is_none()
        );

        // Done once: a second pass over the patched group does nothing.
        let mut done = app.clone();
        done.annotations
            .as_mut()
            .unwrap()
            .insert(COMPANION_DONE_ANNOTATION.into(), "r1/u1".into());
        assert_eq!(plan_group(&restore(), true, &done, &namespace), None);
        // A later Restore of the same name (another UID) is handled again.
        let again = RestoreRef {
            uid: "u2".into(),
            ..restore()
        };
        assert!(plan_group(&again, true, &done, &namespace).is_some());
    }

    #[test]
    fn a_stale_patch_fails_its_test_and_pruning_can_be_turned_off() {
        let app = group("app", None, false, json!([{"members": [{"name": "gone"}]}]));
        let namespace = Namespace::new([app.clone()], []);
        let plan = plan_group(&restore(), false, &app, &namespace).unwrap();
        assert!(plan.pruned.is_empty());
        assert_eq!(
            apply(&app, &plan)["spec"]["bootOrder"][0]["members"][0]["name"],
            "gone"
        );
        let plan = plan_group(&restore(), true, &app, &namespace).unwrap();
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(plan.patch)).unwrap();
        let mut object = json!({"metadata": {"resourceVersion": "8", "annotations": {}},
            "spec": {"bootOrder": [{"members": [{"name": "gone"}]}]}});
        assert!(
            json_patch::patch(&mut object, &patch).is_err(),
            "guarded by the resourceVersion"
        );
    }

    #[test]
    fn a_held_child_without_a_powered_parent_is_started_itself() {
        // The parent has no power state and holds nothing: nobody pushes.
        let parent = group(
            "app",
            None,
            false,
            json!([{"members": [{"kind": "VirtualMachineGroup", "name": "web"}]}]),
        );
        let web = group(
            "web",
            Some("app"),
            true,
            json!([{"members": [{"name": "web-1"}]}]),
        );
        let namespace = Namespace::new([parent, web.clone()], ["web-1"]);
        let plan = plan_group(&restore(), true, &web, &namespace).unwrap();
        assert_eq!(plan.started.as_deref(), Some("PoweredOn"));
    }

    #[test]
    fn report_counts_rules_and_names_what_waits() {
        let mut app = group("app", None, false, json!([{"members": [{"name": "vm-a"}]}]));
        let annotations = app.annotations.as_mut().unwrap();
        annotations.insert(
            APPLIED_RULES_ANNOTATION.into(),
            "group-power-held,reviewed-marker".into(),
        );
        annotations.insert(POWER_STARTED_ANNOTATION.into(), "r1/u1".into());
        annotations.insert(
            PRUNED_MEMBERS_ANNOTATION.into(),
            "VirtualMachine/gone".into(),
        );
        annotations.insert(COMPANION_DONE_ANNOTATION.into(), "r1/u1".into());
        app.power_state = Some("PoweredOn".into());
        let vm = |name: &str, group: &str, rules: &str| {
            ObjectState::from_value(
                "VirtualMachine",
                &json!({"metadata": {"name": name, "namespace": "prod",
                    "labels": {RESTORE_NAME_LABEL: "r1"},
                    "annotations": {REVIEWED_ANNOTATION: "r1/u1", APPLIED_RULES_ANNOTATION: rules}},
                    "spec": {"groupName": group}}),
            )
        };
        let other_restore = ObjectState::from_value(
            "VirtualMachine",
            &json!({"metadata": {"name": "old", "namespace": "prod",
                "labels": {RESTORE_NAME_LABEL: "r1"}, "annotations": {REVIEWED_ANNOTATION: "r1/u0"}}}),
        );
        let restored = vec![
            app.clone(),
            vm("vm-a", "app", "vm-instance-uuid,reviewed-marker"),
            vm("vm-b", "missing", "vm-instance-uuid"),
            other_restore,
        ];
        let namespaces =
            HashMap::from([("prod".to_string(), Namespace::new([app], ["vm-a", "vm-b"]))]);
        let report = build_report(&restore(), &restored, &namespaces);
        let vms = report
            .kinds
            .iter()
            .find(|k| k.kind == "VirtualMachine")
            .unwrap();
        assert_eq!(
            (vms.restored, vms.changed),
            (2, 2),
            "the other Restore's VM is not counted"
        );
        assert_eq!(vms.rules["vm-instance-uuid"], 2);
        assert_eq!(
            report.started_in_boot_order[0].boot_order,
            ["vm-a after 0s"]
        );
        assert_eq!(report.pruned[0].members, ["VirtualMachine/gone"]);
        assert_eq!(report.waiting_for_group.len(), 1);
        assert!(
            report.waiting_for_group[0]
                .why
                .contains("missing does not exist")
        );
        assert!(report.groups_not_handled.is_empty());
        let reasons: Vec<&str> = report
            .event_lines()
            .iter()
            .map(|(reason, _)| *reason)
            .collect();
        assert_eq!(
            reasons,
            [
                "VMRestoreCleaned",
                "VMRestoreCleaned",
                "VMRestoreBootOrder",
                "VMRestorePrunedMembers",
                "VMRestoreWaitingForGroup"
            ]
        );
        let table = report.to_table();
        assert!(
            table.contains("prod/app PoweredOn: vm-a after 0s"),
            "{table}"
        );
    }

    #[test]
    fn long_lists_are_bounded() {
        let items: Vec<String> = (0..500).map(|i| format!("prod/vm-{i}")).collect();
        let text = bounded_list(&items, 100);
        assert!(text.len() < 130, "{text}");
        assert!(text.ends_with("more"), "{text}");
    }
}
