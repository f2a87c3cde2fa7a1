//! VirtualMachineWebConsoleRequest (v1alpha2 and later) and its v1alpha1 twin
//! WebConsoleRequest: VM Operator acquires a console ticket encrypted with
//! `spec.publicKey`, keeps it with its expiry (120 s) in status and deletes
//! the request once expired (controllers/virtualmachinewebconsolerequest,
//! v1.10.0). Every stop condition is status: a restored request would get a
//! new ticket for the backed-up key.

use serde_json::Value;

use super::refused;
use super::shape::ShapeError;
use super::{CleanupOptions, Plan, RuleDoc};

pub const R_WEB_CONSOLE_REQUEST: &str = "webconsolerequest-deny";

pub const RULES: &[RuleDoc] = &[RuleDoc {
    id: R_WEB_CONSOLE_REQUEST,
    kind: "VirtualMachineWebConsoleRequest, WebConsoleRequest",
    what: "deny restored VirtualMachineWebConsoleRequests and WebConsoleRequests, naming the `--exclude-resources` value",
    why: "its ticket, proxy address and expiry lived in status: VM Operator would issue a new console ticket for the backed-up public key (a request lives 120 s; there is nothing to restore)",
}];

pub fn plan(object: &Value, options: &CleanupOptions) -> Result<Plan, ShapeError> {
    refused::deny(
        object,
        options,
        R_WEB_CONSOLE_REQUEST,
        "a new console ticket would be issued for the backed-up public key",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn denied_naming_what_it_would_do_and_the_exclude_value_unless_the_rule_is_off() {
        let off = CleanupOptions {
            disabled_rules: std::sync::Arc::new([R_WEB_CONSOLE_REQUEST.to_string()].into()),
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
                        denial.contains(
                            "a new console ticket would be issued for the backed-up public key"
                        ),
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
