//! VirtualMachineGroupPublishRequest (v1alpha5): VM Operator publishes each VM of a group to a
//! content library through child VirtualMachinePublishRequests it labels with
//! the group request's UID (controllers/virtualmachinegrouppublishrequest,
//! v1.10.0). Its outcome is status; restored with a new UID it finds none of
//! its children and publishes again.

use serde_json::Value;

use super::refused;
use super::shape::ShapeError;
use super::{CleanupOptions, Plan, RuleDoc};

/// What a restored one would do again.
const ACTS: &str = "the group would be published again";

pub const R_GROUP_PUBLISH_REQUEST: &str = "vmgrouppublishrequest-deny";

pub const RULES: &[RuleDoc] = &[RuleDoc {
    id: R_GROUP_PUBLISH_REQUEST,
    kind: "VirtualMachineGroupPublishRequest",
    what: "deny restored VirtualMachineGroupPublishRequests, naming the `--exclude-resources` value",
    why: "its outcome (the children it made, what they published) lived in status: restored with a new UID it finds none of its children and publishes the group again once its group and library exist",
}];

pub fn plan(object: &Value, options: &CleanupOptions) -> Result<Plan, ShapeError> {
    refused::deny(object, options, R_GROUP_PUBLISH_REQUEST, ACTS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_naming_what_it_would_do_and_the_exclude_value_unless_the_rule_is_off() {
        refused::assert_refused(plan, R_GROUP_PUBLISH_REQUEST, ACTS);
    }
}
