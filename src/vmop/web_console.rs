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

/// What a restored one would do again.
const ACTS: &str = "a new console ticket would be issued for the backed-up public key";

pub const R_WEB_CONSOLE_REQUEST: &str = "webconsolerequest-deny";

pub const RULES: &[RuleDoc] = &[RuleDoc {
    id: R_WEB_CONSOLE_REQUEST,
    kind: "VirtualMachineWebConsoleRequest, WebConsoleRequest",
    what: "deny restored VirtualMachineWebConsoleRequests and WebConsoleRequests, naming the `--exclude-resources` value",
    why: "its ticket, proxy address and expiry lived in status: VM Operator would issue a new console ticket for the backed-up public key (a request lives 120 s; there is nothing to restore)",
}];

pub fn plan(object: &Value, options: &CleanupOptions) -> Result<Plan, ShapeError> {
    refused::deny(object, options, R_WEB_CONSOLE_REQUEST, ACTS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_naming_what_it_would_do_and_the_exclude_value_unless_the_rule_is_off() {
        refused::assert_refused(plan, R_WEB_CONSOLE_REQUEST, ACTS);
    }
}
