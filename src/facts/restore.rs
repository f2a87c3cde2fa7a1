//! What the webhook reads from the Velero Restore a create belongs to: its
//! namespace mapping (is this VM a copy beside the original?) and the
//! per-restore override annotations. Pure data; the live source is
//! [`super::restore_cache::RestoreCache`].

use std::collections::BTreeMap;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::settings::GroupPolicy;
use crate::vmop::power::PowerPolicy;

/// Restore annotation: `"true"` clears guest identity even without a
/// namespace mapping; `"false"` keeps it even with one.
pub const NEW_IDENTITY_ANNOTATION: &str = "velero-vm-restore-webhook/new-identity";
/// Restore annotation: the group policy for this restore's VMs.
pub const GROUP_POLICY_ANNOTATION: &str = "velero-vm-restore-webhook/group-policy";

/// Restore annotation: the power policy for this restore's VMs and groups
/// (`boot-order`, `off`, `as-backed-up`).
pub const POWER_POLICY_ANNOTATION: &str = "velero-vm-restore-webhook/power-policy";
/// Restore annotation: `"false"` stops the companion from pruning missing
/// members from this restore's groups.
pub const PRUNE_ANNOTATION: &str = "velero-vm-restore-webhook/prune-missing-members";

/// What the webhook needs from a Velero Restore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreInfo {
    pub name: String,
    /// The Restore's UID: the reviewed marker carries it, so a Restore deleted
    /// and created again under the same name still cleans its objects.
    pub uid: Option<String>,
    /// Source namespace → target namespace.
    pub namespace_mapping: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// The identity decision for one VM, with the reason a log line can give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityChoice {
    pub new_identity: bool,
    pub because: String,
}

impl RestoreInfo {
    pub fn from_object(object: &Value) -> RestoreInfo {
        let strings = |value: Option<&Value>| -> BTreeMap<String, String> {
            value
                .and_then(Value::as_object)
                .map(|entries| {
                    entries
                        .iter()
                        .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                        .collect()
                })
                .unwrap_or_default()
        };
        RestoreInfo {
            name: object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            uid: object
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .filter(|uid| !uid.is_empty())
                .map(str::to_string),
            namespace_mapping: strings(object.pointer("/spec/namespaceMapping")),
            annotations: strings(object.pointer("/metadata/annotations")),
        }
    }

    /// Whether a VM created in `namespace` by this restore is a copy.
    pub fn identity_for(&self, namespace: &str) -> IdentityChoice {
        match self
            .annotations
            .get(NEW_IDENTITY_ANNOTATION)
            .map(String::as_str)
        {
            Some("true") => IdentityChoice {
                new_identity: true,
                because: format!("Restore annotation {NEW_IDENTITY_ANNOTATION}=true"),
            },
            Some("false") => IdentityChoice {
                new_identity: false,
                because: format!("Restore annotation {NEW_IDENTITY_ANNOTATION}=false"),
            },
            _ => {
                let source = self
                    .namespace_mapping
                    .iter()
                    .find(|(_, target)| target.as_str() == namespace)
                    .map(|(source, _)| source.clone());
                match source {
                    Some(source) => IdentityChoice {
                        new_identity: true,
                        because: format!("namespace mapping {source}->{namespace}"),
                    },
                    None => IdentityChoice {
                        new_identity: false,
                        because: "no namespace mapping to this namespace".into(),
                    },
                }
            }
        }
    }

    pub fn power_policy(&self) -> Option<Result<PowerPolicy, String>> {
        self.annotations
            .get(POWER_POLICY_ANNOTATION)
            .map(|value| PowerPolicy::parse(value))
    }

    /// The Restore's pruning choice: `Some(false)` for `"false"`,
    /// `Some(true)` for `"true"`, otherwise none (the default applies).
    pub fn prune_missing_members(&self) -> Option<bool> {
        match self.annotations.get(PRUNE_ANNOTATION).map(String::as_str) {
            Some("false") => Some(false),
            Some("true") => Some(true),
            _ => None,
        }
    }

    pub fn group_policy(&self) -> Option<Result<GroupPolicy, String>> {
        self.annotations
            .get(GROUP_POLICY_ANNOTATION)
            .map(|value| GroupPolicy::parse(value))
    }
}

/// Velero's `label.GetValidName`: names over 63 characters are cut to 57 and
/// suffixed with 6 hex characters of their SHA-256, so the label on a
/// restored object may not be the Restore's name.
pub fn label_value_for(name: &str) -> String {
    const MAX: usize = 63;
    if name.len() <= MAX {
        return name.to_string();
    }
    let digest = Sha256::digest(name.as_bytes());
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    let keep = MAX - 6;
    let prefix = name.get(..keep).unwrap_or(name);
    format!("{prefix}{}", &hex[..6])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pruning_follows_the_restore_annotation_or_the_default() {
        let with = |value: &str| RestoreInfo {
            annotations: [(PRUNE_ANNOTATION.to_string(), value.to_string())].into(),
            ..Default::default()
        };
        assert_eq!(with("false").prune_missing_members(), Some(false));
        assert_eq!(with("true").prune_missing_members(), Some(true));
        assert_eq!(with("maybe").prune_missing_members(), None);
        assert_eq!(RestoreInfo::default().prune_missing_members(), None);
    }

    #[test]
    fn long_names_match_velero() {
        // Outputs of Velero v1.18.3's own label.GetValidName, run once in Go.
        let known = [
            ("short", "short"),
            (&*"x".repeat(63), &*"x".repeat(63)),
            (
                &*"x".repeat(64),
                "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx7ce100",
            ),
            (
                &*"a".repeat(70),
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa6bd5e5",
            ),
            (
                "restore-of-the-production-namespace-with-all-virtual-machines-2026-11-26",
                "restore-of-the-production-namespace-with-all-virtual-mach02fe07",
            ),
        ];
        for (name, expected) in known {
            assert_eq!(label_value_for(name), expected, "{name}");
        }
    }

    #[test]
    fn identity_follows_mapping_and_annotation() {
        let restore = RestoreInfo::from_object(&json!({
            "metadata": {"name": "r1"},
            "spec": {"namespaceMapping": {"prod": "prod-copy"}}}));
        assert!(restore.identity_for("prod-copy").new_identity);
        assert!(!restore.identity_for("prod").new_identity);

        let forced = RestoreInfo::from_object(&json!({
            "metadata": {"name": "r2", "annotations": {NEW_IDENTITY_ANNOTATION: "true"}}}));
        assert!(forced.identity_for("prod").new_identity);
        let kept = RestoreInfo::from_object(&json!({
            "metadata": {"name": "r3", "annotations": {NEW_IDENTITY_ANNOTATION: "false"}},
            "spec": {"namespaceMapping": {"prod": "prod-copy"}}}));
        assert!(!kept.identity_for("prod-copy").new_identity);
    }
}
