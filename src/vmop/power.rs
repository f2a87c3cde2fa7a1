//! Power on restore: which restored groups and VMs have their power state
//! held back, so that the companion can start each group tree once every
//! member exists, in boot order (see docs/restores.md, "Boot order after a
//! restore").
//!
//! VM Operator gives each member of a group an apply time: the group's power
//! base (stamped when `spec.powerState` is set) plus the cumulative
//! `powerOnDelay` of its boot-order step. A group restored with its power
//! state gets its base at create, long before its members are deployed, so
//! they power on as each one finishes. Holding the power state until the
//! restore ends gives the members a base that is still ahead of them.

use serde_json::{Map, Value};

use super::shape::{self, ShapeError};

/// On held groups and VMs: the policy that held them (`boot-order` or `off`).
pub const POWER_HELD_ANNOTATION: &str = "velero-vm-restore-webhook/power-held";
/// On held groups and VMs: the `spec.powerState` the backup had.
pub const RESTORED_POWER_STATE_ANNOTATION: &str = "velero-vm-restore-webhook/restored-power-state";
/// Set by the companion on a group it started: `<restore>/<restore UID>`.
pub const POWER_STARTED_ANNOTATION: &str = "velero-vm-restore-webhook/power-started-for-restore";
/// Set by the companion on a group it pruned: the members it dropped.
pub const PRUNED_MEMBERS_ANNOTATION: &str = "velero-vm-restore-webhook/pruned-members";
/// On every object the webhook changed: the rule ids it applied.
pub const APPLIED_RULES_ANNOTATION: &str = "velero-vm-restore-webhook/applied-rules";

/// What happens to the power state of restored groups and VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PowerPolicy {
    /// Hold group trees with a boot order (and their VMs) until the restore
    /// ends; the companion then starts each tree's top group once.
    #[default]
    BootOrder,
    /// Leave every restored VM and group PoweredOff for the admin to start.
    Off,
    /// Create everything with the power state of the backup.
    AsBackedUp,
}

impl PowerPolicy {
    pub const ALL: [PowerPolicy; 3] = [
        PowerPolicy::BootOrder,
        PowerPolicy::Off,
        PowerPolicy::AsBackedUp,
    ];

    pub fn parse(value: &str) -> Result<PowerPolicy, String> {
        PowerPolicy::ALL
            .into_iter()
            .find(|policy| policy.as_str().eq_ignore_ascii_case(value.trim()))
            .ok_or_else(|| {
                format!("unknown power policy {value:?} (use boot-order, off or as-backed-up)")
            })
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            PowerPolicy::BootOrder => "boot-order",
            PowerPolicy::Off => "off",
            PowerPolicy::AsBackedUp => "as-backed-up",
        }
    }
}

/// A VM power state meaning "on", in either spelling (v1alpha1 is lower case).
pub fn is_on(state: &str) -> bool {
    matches!(state, "PoweredOn" | "poweredOn")
}

/// "PoweredOff" in the spelling of `like`.
pub fn off_like(like: &str) -> &'static str {
    if like.starts_with('p') {
        "poweredOff"
    } else {
        "PoweredOff"
    }
}

/// One step of a group's `spec.bootOrder`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootStep {
    pub members: Vec<(String, String)>,
    /// `powerOnDelay` as written (a Go duration such as `45s`), if any.
    pub delay: Option<String>,
}

/// Whether a Go duration string is zero (`0s`, `0`, `0m0s`, empty).
pub fn is_zero_duration(text: &str) -> bool {
    text.chars()
        .filter(|c| c.is_ascii_digit() || *c == '.')
        .all(|c| c == '0' || c == '.')
}

/// The group's boot order, read leniently: entries that are not objects are
/// skipped, as VM Operator's schema would never store them.
pub fn boot_order(spec: &Map<String, Value>) -> Result<Vec<BootStep>, ShapeError> {
    let Some(steps) = shape::array(spec, "spec", "bootOrder")? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(steps.len());
    for step in steps.iter().filter_map(Value::as_object) {
        let members = step
            .get("members")
            .and_then(Value::as_array)
            .map(|members| {
                members
                    .iter()
                    .filter_map(|member| {
                        let kind = member.get("kind")?.as_str()?;
                        let name = member.get("name")?.as_str()?;
                        Some((kind.to_string(), name.to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let delay = step
            .get("powerOnDelay")
            .and_then(Value::as_str)
            .map(str::to_string);
        out.push(BootStep { members, delay });
    }
    Ok(out)
}

/// Whether a boot order spreads power-on over time: more than one step, or
/// any delay.
pub fn has_sequence(steps: &[BootStep]) -> bool {
    steps.len() > 1
        || steps
            .iter()
            .any(|step| step.delay.as_deref().is_some_and(|d| !is_zero_duration(d)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn policies_parse_and_print() {
        for policy in PowerPolicy::ALL {
            assert_eq!(PowerPolicy::parse(policy.as_str()).unwrap(), policy);
        }
        assert_eq!(PowerPolicy::parse(" OFF ").unwrap(), PowerPolicy::Off);
        assert!(
            PowerPolicy::parse("later")
                .unwrap_err()
                .contains("boot-order")
        );
    }

    #[test]
    fn zero_durations() {
        for zero in ["0s", "0", "0m0s", "", "0.0s"] {
            assert!(is_zero_duration(zero), "{zero}");
        }
        for some in ["45s", "1m0s", "0.5s", "10ms"] {
            assert!(!is_zero_duration(some), "{some}");
        }
    }

    #[test]
    fn sequences() {
        let spec = |order: Value| json!({ "bootOrder": order });
        let read = |value: Value| boot_order(value.as_object().unwrap()).unwrap();
        let one = read(spec(
            json!([{"members": [{"kind": "VirtualMachine", "name": "a"}]}]),
        ));
        assert!(!has_sequence(&one));
        assert_eq!(one[0].members, vec![("VirtualMachine".into(), "a".into())]);
        let delayed = read(spec(json!([{"members": [], "powerOnDelay": "10s"}])));
        assert!(has_sequence(&delayed));
        let zero_delay = read(spec(json!([{"members": [], "powerOnDelay": "0s"}])));
        assert!(!has_sequence(&zero_delay));
        let two = read(spec(json!([{"members": []}, {"members": []}])));
        assert!(has_sequence(&two));
        assert!(boot_order(json!({"bootOrder": "x"}).as_object().unwrap()).is_err());
    }
}
