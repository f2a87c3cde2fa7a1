//! Restored objects that must not be created at all: they stand for work VM
//! Operator (or the CSI driver) did on the original (a snapshot taken, an
//! image published, a console ticket issued, a disk registered) and keep its
//! outcome in status, which Velero drops. Created again, they would act
//! again. Each kind has its file (its rule, its reason, its table test);
//! this one holds the denial they share and the two oldest kinds.

use serde_json::Value;

use super::shape::{self, ShapeError};
use super::{CleanupOptions, Kind, Plan, RuleDoc};

pub const R_SNAPSHOT: &str = "vmsnapshot-deny";
pub const R_PUBLISH_REQUEST: &str = "vmpublishrequest-deny";

pub const RULES: &[RuleDoc] = &[
    RuleDoc {
        id: R_SNAPSHOT,
        kind: "VirtualMachineSnapshot",
        what: "deny restored VirtualMachineSnapshots, naming the `--exclude-resources` value",
        why: "the snapshot's outcome lived in status, which Velero drops: VM Operator would take a new, meaningless snapshot",
    },
    RuleDoc {
        id: R_PUBLISH_REQUEST,
        kind: "VirtualMachinePublishRequest",
        what: "deny restored VirtualMachinePublishRequests, naming the `--exclude-resources` value",
        why: "the request's outcome lived in status: VM Operator would publish the image again (a group publish request's children are refused by VM Operator anyway: label without owner)",
    },
];

/// What to pass to `velero restore create --exclude-resources`: every kind
/// this webhook refuses whole, so one value serves whichever a backup holds.
pub const EXCLUDE_RESOURCES: &str = "virtualmachinesnapshots.vmoperator.vmware.com,\
virtualmachinepublishrequests.vmoperator.vmware.com,\
virtualmachinegrouppublishrequests.vmoperator.vmware.com,\
virtualmachinewebconsolerequests.vmoperator.vmware.com,\
webconsolerequests.vmoperator.vmware.com,\
cnsregistervolumes.cns.vmware.com";

pub fn plan(kind: Kind, object: &Value, options: &CleanupOptions) -> Result<Plan, ShapeError> {
    match kind {
        Kind::VirtualMachineSnapshot => deny(
            object,
            options,
            R_SNAPSHOT,
            "a new, meaningless snapshot would be taken",
        ),
        _ => deny(
            object,
            options,
            R_PUBLISH_REQUEST,
            "the image would be published again",
        ),
    }
}

/// The denial every refused kind answers with, unless its `rule` is off:
/// `acts` says what the restored object would do again.
pub fn deny(
    object: &Value,
    options: &CleanupOptions,
    rule: &'static str,
    acts: &str,
) -> Result<Plan, ShapeError> {
    shape::meta(shape::root(object)?)?;
    let mut plan = Plan::default();
    if options.enabled(rule) {
        plan.denial = Some(format!(
            "is restored, but its outcome was kept in status, which Velero does not restore: {acts}. \
             Exclude these objects from the restore: velero restore create ... --exclude-resources {EXCLUDE_RESOURCES}"
        ));
    }
    Ok(plan)
}

/// The table test every refused kind's file runs on its `plan`: denied
/// (naming what it would do and the exclude value) whatever the object
/// holds, not with its rule off; an object that is no object is an error.
#[cfg(test)]
pub(crate) fn assert_refused(
    plan: fn(&Value, &CleanupOptions) -> Result<Plan, ShapeError>,
    rule: &str,
    acts: &str,
) {
    use serde_json::json;
    let off = CleanupOptions {
        disabled_rules: std::sync::Arc::new([rule.to_string()].into()),
        ..Default::default()
    };
    let restored = json!({"metadata": {"name": "r", "namespace": "ns"}, "spec": {}});
    // (object, options, denied?)
    let cases = [
        (restored.clone(), CleanupOptions::default(), true),
        (
            json!({"metadata": {"name": "bare"}}),
            CleanupOptions::default(),
            true,
        ),
        (restored, off, false),
    ];
    for (object, options, denied) in cases {
        let plan = plan(&object, &options).expect("plan");
        assert!(plan.changes.is_empty());
        match plan.denial {
            Some(denial) => {
                assert!(denied, "{object}: {denial}");
                assert!(denial.contains(acts), "{denial}");
                assert!(
                    denial.contains(&format!("--exclude-resources {EXCLUDE_RESOURCES}")),
                    "{denial}"
                );
            }
            None => assert!(!denied, "{object} was not denied"),
        }
    }
    assert!(plan(&json!("text"), &CleanupOptions::default()).is_err());
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_kinds_are_denied_with_the_exclude_value() {
        for kind in [
            Kind::VirtualMachineSnapshot,
            Kind::VirtualMachinePublishRequest,
        ] {
            let denial = plan(
                kind,
                &json!({"metadata": {"name": "s"}}),
                &CleanupOptions::default(),
            )
            .unwrap()
            .denial
            .unwrap();
            assert!(
                denial.contains(&format!("--exclude-resources {EXCLUDE_RESOURCES}")),
                "{denial}"
            );
        }
        let off = CleanupOptions {
            disabled_rules: std::sync::Arc::new([R_SNAPSHOT.to_string()].into()),
            ..Default::default()
        };
        assert!(
            plan(Kind::VirtualMachineSnapshot, &json!({}), &off)
                .unwrap()
                .denial
                .is_none()
        );
    }

    #[test]
    fn the_exclude_value_names_each_refused_resource_once() {
        let resources: Vec<&str> = EXCLUDE_RESOURCES.split(',').collect();
        assert_eq!(resources.len(), 6, "{resources:?}");
        for resource in &resources {
            assert!(
                resource.contains('.') && !resource.contains(' '),
                "{resource}"
            );
            assert_eq!(
                resources.iter().filter(|r| *r == resource).count(),
                1,
                "{resource}"
            );
        }
    }
}
