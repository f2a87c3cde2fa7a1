//! VirtualMachineGroupPublishRequest (v1alpha5): VM Operator publishes each VM of a group to a
//! content library through child VirtualMachinePublishRequests it labels with
//! the group request's UID (controllers/virtualmachinegrouppublishrequest,
//! v1.10.0). Its outcome is status; restored with a new UID it finds none of
//! its children and publishes again.

use serde_json::Value;

use super::refused;
use super::shape::ShapeError;
use super::{CleanupOptions, Plan, RuleDoc};

pub const R_GROUP_PUBLISH_REQUEST: &str = "vmgrouppublishrequest-deny";

pub const RULES: &[RuleDoc] = &[RuleDoc {
    id: R_GROUP_PUBLISH_REQUEST,
    kind: "VirtualMachineGroupPublishRequest",
    what: "deny restored VirtualMachineGroupPublishRequests, naming the `--exclude-resources` value",
    why: "its outcome (the children it made, what they published) lived in status: restored with a new UID it finds none of its children and publishes the group again once its group and library exist",
}];

pub fn plan(object: &Value, options: &CleanupOptions) -> Result<Plan, ShapeError> {
    refused::deny(
        object,
        options,
        R_GROUP_PUBLISH_REQUEST,
        "the group would be published again",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn denied_naming_what_it_would_do_and_the_exclude_value_unless_the_rule_is_off() {
        let off = CleanupOptions {
            disabled_rules: std::sync::Arc::new([R_GROUP_PUBLISH_REQUEST.to_string()].into()),
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
                    assert!(
                        denial.contains("the group would be published again"),
                        "{denial}"
                    );
                    assert!(
                        denial.contains(&format!(
                            "--exclude-resources {}",
                            refused::EXCLUDE_RESOURCES
                        )),
                        "{denial}"
                    );
                }
                None => assert!(!denied, "{object} was not denied"),
            }
        }
    }

    #[test]
    fn an_object_that_is_no_object_is_an_error() {
        assert!(plan(&json!("text"), &CleanupOptions::default()).is_err());
    }
}
