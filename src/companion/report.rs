//! The per-restore report: what a finished Restore created, what the webhook
//! changed on it, which groups the companion started or pruned, and which VMs
//! still wait; as a table (`report`) and as Event messages on the Restore.
//! Pure, over the objects read ([`super::view`]).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::view::{COMPANION_DONE_ANNOTATION, Namespace, ObjectState, RestoreRef};
use crate::vmop::power::{
    APPLIED_RULES_ANNOTATION, POWER_HELD_ANNOTATION, POWER_STARTED_ANNOTATION,
    PRUNED_MEMBERS_ANNOTATION, PowerPolicy,
};

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
    /// The report as Events on the Restore: `(reason, subject, message)`.
    /// The subject tells apart lines of one reason (one `VMRestoreCleaned`
    /// per kind), so each becomes its own Event.
    pub fn event_lines(&self) -> Vec<(&'static str, String, String)> {
        let mut lines = Vec::new();
        for kind in &self.kinds {
            let rules: Vec<String> = kind
                .rules
                .iter()
                .map(|(rule, count)| format!("{rule} ×{count}"))
                .collect();
            lines.push((
                "VMRestoreCleaned",
                kind.kind.clone(),
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
                String::new(),
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
                String::new(),
                format!(
                    "members not restored, removed from spec.bootOrder so the others are placed: {}",
                    bounded_list(&groups, EVENT_MESSAGE_LIMIT)
                ),
            ));
        }
        if !self.left_powered_off.is_empty() {
            lines.push((
                "VMRestorePoweredOff",
                String::new(),
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
                String::new(),
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
    use serde_json::json;

    use super::super::view::fixtures::{group, restore};
    use super::*;
    use crate::vmop::{RESTORE_NAME_LABEL, REVIEWED_ANNOTATION};

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
            .map(|(reason, _, _)| *reason)
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
