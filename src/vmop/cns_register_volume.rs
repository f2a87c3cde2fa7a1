//! CnsRegisterVolume (cns.vmware.com/v1alpha1): VM Operator makes one per
//! disk of a VM that is not a PVC yet, naming the VM's VMDK
//! (`spec.diskURLPath`), and deletes it once the CSI driver has registered
//! the disk (status; pkg/vmconfig/volumes/unmanaged/register, v1.10.0). One
//! caught in a backup would register the original VM's disk in the restored
//! namespace; VM Operator makes again the ones a restored VM still needs.

use serde_json::Value;

use super::refused;
use super::shape::ShapeError;
use super::{CleanupOptions, Plan, RuleDoc};

/// What a restored one would do again.
const ACTS: &str = "the original VM's disk would be registered in this namespace";

pub const R_CNS_REGISTER_VOLUME: &str = "cnsregistervolume-deny";

pub const RULES: &[RuleDoc] = &[RuleDoc {
    id: R_CNS_REGISTER_VOLUME,
    kind: "CnsRegisterVolume",
    what: "deny restored CnsRegisterVolumes, naming the `--exclude-resources` value",
    why: "it names the original VM's disk (spec.diskURLPath) and its outcome lived in status: it would register the original's disk in the restored namespace; VM Operator makes the ones a restored VM still needs",
}];

pub fn plan(object: &Value, options: &CleanupOptions) -> Result<Plan, ShapeError> {
    refused::deny(object, options, R_CNS_REGISTER_VOLUME, ACTS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_naming_what_it_would_do_and_the_exclude_value_unless_the_rule_is_off() {
        refused::assert_refused(plan, R_CNS_REGISTER_VOLUME, ACTS);
    }
}
