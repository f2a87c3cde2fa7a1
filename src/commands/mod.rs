//! One module per subcommand; `main.rs` parses the command line and calls
//! the module's `run`. The helpers here are shared by `serve` and `review`,
//! which build the same [`Reviewer`](crate::webhook::review::Reviewer)
//! settings from the same rule flags.

pub mod input;
pub mod plan;
pub mod report;
pub mod review;
pub mod rules;
pub mod selftest;
pub mod serve;

use std::sync::Arc;

use crate::settings::RuleArgs;
use crate::webhook::admission::VeleroIdentity;
use crate::webhook::review::ReviewSettings;
use crate::webhook::waits::WaitLimits;

pub fn review_settings(rules: &RuleArgs) -> Result<ReviewSettings, String> {
    Ok(ReviewSettings {
        group_policy: rules.group_policy,
        group_wait_timeout: rules.group_wait_timeout,
        timeout_margin: rules.timeout_margin,
        restore_unreadable: rules.restore_unreadable,
        disabled_rules: Arc::new(rules.disabled_rule_set()?),
        power_policy: rules.power_policy,
        wait_limits: WaitLimits::default(),
        velero: Arc::new(VeleroIdentity::of_namespace("velero")),
    })
}

/// `NAMESPACE/NAME` arguments of `--group`.
pub fn parse_groups(groups: &[String]) -> Result<Vec<(&str, &str)>, String> {
    groups
        .iter()
        .map(|group| match group.split_once('/') {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => {
                Ok((namespace, name))
            }
            _ => Err(format!("--group {group:?} must be NAMESPACE/NAME")),
        })
        .collect()
}
