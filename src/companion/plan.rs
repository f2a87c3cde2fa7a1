//! What the restore companion does to each group once a Velero Restore has
//! finished, as a pure function over the objects it read ([`super::view`]).
//! The I/O (lists, patches, Events) is in [`crate::companion`].
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

use serde_json::{Value, json};

use super::view::{COMPANION_DONE_ANNOTATION, Member, Namespace, ObjectState, RestoreRef};
use crate::vmop::power::{
    POWER_HELD_ANNOTATION, POWER_STARTED_ANNOTATION, PRUNED_MEMBERS_ANNOTATION, PowerPolicy,
    RESTORED_POWER_STATE_ANNOTATION,
};

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

#[cfg(test)]
mod tests {
    use super::super::view::fixtures::{group, restore};
    use super::*;

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
}
