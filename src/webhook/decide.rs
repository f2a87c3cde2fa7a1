//! The decision for one in-scope object, from the object and the facts
//! gathered for it. Pure: no I/O, no clock. `review` gathers the facts,
//! calls [`decide`], and renders the [`Decision`] once into the response,
//! the logs and the metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::facts::RestoreInfo;
use crate::facts::{GroupPresence, RestoreLookup};
use crate::settings::{GroupPolicy, RestoreUnreadable};
use crate::vmop::mapping::{MappingError, Mappings};
use crate::vmop::power::PowerPolicy;
use crate::vmop::{self, AnnotationSet, CleanupOptions, ClusterRef, Kind, RefKind};
use crate::webhook::admission::{Verdict, Write};
use crate::webhook::missing_refs::missing_references_message;
use crate::webhook::waits::NoWait;

/// The object under review, as the request names it.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub kind: Kind,
    /// Which of Velero's writes it is.
    pub write: Write,
    /// The object as stored, on an update.
    pub old_object: Option<&'a Value>,
    /// The `velero.io/restore-name` label value.
    pub restore_label: &'a str,
    pub namespace: &'a str,
    pub object: &'a Value,
    /// `Kind namespace/name`, for messages.
    pub object_label: &'a str,
    pub dry_run: bool,
    /// When the request came (seconds since the epoch): how old a marker
    /// written without the Restore's UID is.
    pub received_at_unix: u64,
}

/// What the Restore lookup gave, within the request's deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreFact {
    Lookup(RestoreLookup),
    /// The lookup did not finish before the request's deadline.
    DeadlineExceeded,
}

/// What is known about the group an object names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupFact {
    Present {
        waited: Duration,
    },
    Missing {
        waited: Duration,
        /// Why the VM did not wait, when it could have.
        not_waited: Option<NoWait>,
        /// The live check failed (or ran out of time): the group may exist.
        live_error: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Facts {
    pub restore: RestoreFact,
    /// The group the object names, and what is known about it.
    pub group: Option<(String, GroupFact)>,
    /// The cluster-bound objects a VM refers to, and whether each exists.
    pub refs: Vec<(ClusterRef, GroupPresence)>,
    /// The group the object names holds its power until the restore ends
    /// (it carries [`vmop::power::POWER_HELD_ANNOTATION`]).
    pub group_holds_power: bool,
    /// The renames the restore's ConfigMaps ask for (VMs only).
    pub mappings: Arc<Mappings>,
    /// The restore's ConfigMaps cannot be used: the VM is denied.
    pub mapping_error: Option<MappingError>,
    /// What the namespace has instead, for each kind of reference that is
    /// missing and denies the VM (for the denial).
    pub alternatives: BTreeMap<RefKind, Vec<String>>,
    /// The distinct cluster-bound references the VM names; above
    /// [`MAX_CHECKED_REFERENCES`] none is checked and the VM is denied.
    pub refs_named: usize,
}

/// The most distinct cluster-bound references (zone, class, image, storage
/// class, networks) one VM's review checks. A vSphere VM has at most ten
/// network interfaces, so a real VM names fewer than twenty; a crafted one
/// with thousands of interfaces is denied without its references being read.
pub const MAX_CHECKED_REFERENCES: usize = 32;

impl Default for RestoreFact {
    fn default() -> Self {
        RestoreFact::Lookup(RestoreLookup::NotFound)
    }
}

/// The settings `decide` reads.
#[derive(Debug, Clone)]
pub struct DecideSettings {
    pub group_policy: GroupPolicy,
    pub restore_unreadable: RestoreUnreadable,
    pub disabled_rules: Arc<BTreeSet<String>>,
    /// The power policy of restores whose Restore does not choose one.
    pub power_policy: PowerPolicy,
    /// The Velero namespace, for messages.
    pub velero_namespace: String,
}

/// Why an object was denied: the `reason` of logs, and the metrics outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// A field has the wrong type.
    MalformedObject,
    /// A rule refuses the object (e.g. an instance-storage PVC).
    Rule,
    /// The VM's group does not exist.
    GroupMissing,
    /// The Restore could not be read, and the VM might be a copy.
    RestoreUnreadable,
    /// The request's deadline came before the facts were in.
    Deadline,
    /// The restore's mapping ConfigMaps are malformed or ambiguous.
    MappingInvalid,
    /// The VM names a class the target namespace does not have.
    ReferenceMissing,
    /// The VM names more references than a review checks.
    TooManyReferences,
}

impl DenyReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            DenyReason::MalformedObject => "malformed_object",
            DenyReason::Rule => "rule",
            DenyReason::GroupMissing => "group_missing",
            DenyReason::RestoreUnreadable => "restore_unreadable",
            DenyReason::Deadline => "deadline",
            DenyReason::MappingInvalid => "mapping_invalid",
            DenyReason::ReferenceMissing => "reference_missing",
            DenyReason::TooManyReferences => "too_many_references",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub verdict: Verdict,
    pub deny_reason: Option<DenyReason>,
    /// Set when the object is left alone on purpose (a reinvocation).
    pub unchanged_because: Option<&'static str>,
}

impl Decision {
    fn deny(verdict: Verdict, reason: DenyReason, message: String) -> Decision {
        Decision {
            verdict: Verdict {
                denial: Some(message),
                ..verdict
            },
            deny_reason: Some(reason),
            unchanged_because: None,
        }
    }
}

/// The Restore's UID, when the lookup found it.
pub fn restore_uid(restore: &RestoreFact) -> Option<&str> {
    match restore {
        RestoreFact::Lookup(RestoreLookup::Found(info)) => info.uid.as_deref(),
        _ => None,
    }
}

/// Whether the object already carries this restore's marker: a reinvocation
/// after a later webhook (VM Operator's) changed it. Only with the Restore's
/// UID: a bare `<restore>` marker may come from a backup of an object an
/// earlier restore of the same name reviewed, so it never counts.
pub fn already_reviewed(subject: &Subject, restore: &RestoreFact) -> bool {
    vmop::marker_matches(
        subject.object,
        subject.restore_label,
        restore_uid(restore),
        subject.received_at_unix,
    )
}

/// A per-restore choice: the Restore's annotation (read by `chosen`), or
/// `default`. The note explains an annotation that could not be used.
fn restore_choice<T: Copy>(
    default: T,
    default_name: &str,
    restore: &RestoreFact,
    chosen: impl FnOnce(&RestoreInfo) -> Option<Result<T, String>>,
) -> (T, Option<String>) {
    let RestoreFact::Lookup(RestoreLookup::Found(info)) = restore else {
        return (default, None);
    };
    match chosen(info) {
        Some(Ok(chosen)) => (chosen, None),
        Some(Err(message)) => (
            default,
            Some(format!(
                "Restore {}: {message}; using {default_name}",
                info.name
            )),
        ),
        None => (default, None),
    }
}

/// The group policy for this restore.
pub fn group_policy(
    settings: &DecideSettings,
    restore: &RestoreFact,
) -> (GroupPolicy, Option<String>) {
    let default = settings.group_policy;
    restore_choice(
        default,
        default.as_str(),
        restore,
        RestoreInfo::group_policy,
    )
}

/// The power policy for this restore.
pub fn power_policy(
    settings: &DecideSettings,
    restore: &RestoreFact,
) -> (PowerPolicy, Option<String>) {
    let default = settings.power_policy;
    restore_choice(
        default,
        default.as_str(),
        restore,
        RestoreInfo::power_policy,
    )
}

/// Our own annotations the object brought from a backup that this review
/// does not set: removed, so none of them counts (a stale hold, a stale
/// `applied-rules`, the companion's marks of another Restore).
fn stale_own_annotations(object: &Value, set: &[vmop::AnnotationSet]) -> Vec<crate::patch::Change> {
    let Some(annotations) = object
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    else {
        return Vec::new();
    };
    annotations
        .keys()
        .filter(|key| key.starts_with(vmop::OWN_ANNOTATION_PREFIX))
        .filter(|key| !set.iter().any(|ours| ours.key == **key))
        .map(|key| {
            crate::patch::Change::remove(
                vec!["metadata".into(), "annotations".into(), key.clone()],
                vmop::R_STALE_OWN,
                "written by a review of the restore this object was backed up after; not this one's",
            )
        })
        .collect()
}

/// The denial of a VM whose Restore could not be read.
fn unreadable_message(subject: &Subject, why: &str, settings: &DecideSettings) -> String {
    format!(
        "{}: could not read Velero Restore {} in namespace {} ({why}), so it cannot tell \
         whether this VM is a copy beside its original (which must not keep its MACs, addresses and BIOS UUID). \
         Check that the webhook may get/list/watch restores.velero.io there and that the API server is healthy, \
         then restore again (existing objects are skipped); or set --restore-unreadable=keep-identity",
        subject.object_label, subject.restore_label, settings.velero_namespace
    )
}

/// Whether the VM is denied whatever its group: facts about the group then
/// need not be gathered (no wait for a VM that is refused anyway).
pub fn denied_before_group(
    subject: &Subject,
    facts_restore: &RestoreFact,
    settings: &DecideSettings,
) -> bool {
    matches!(subject.kind, Kind::VirtualMachine(_))
        && settings.restore_unreadable == RestoreUnreadable::Deny
        && matches!(
            facts_restore,
            RestoreFact::DeadlineExceeded | RestoreFact::Lookup(RestoreLookup::Failed(_))
        )
}

pub fn decide(subject: &Subject, facts: &Facts, settings: &DecideSettings) -> Decision {
    match subject.write {
        Write::Create => decide_create(subject, facts, settings),
        Write::StatusUpdate | Write::Update => decide_update(subject, facts, settings),
    }
}

/// Velero's write of the backed-up status, or its update of an object that
/// exists: what is stored stays where it is cluster-bound, whatever create
/// rules are turned off (only `update-keeps-live` and `status-restored`
/// turn this off); a field the live object lacks is mapped by the
/// Restore's mappings.
fn decide_update(subject: &Subject, facts: &Facts, settings: &DecideSettings) -> Decision {
    let Some(stored) = subject.old_object else {
        return Decision::deny(
            Verdict::default(),
            DenyReason::MalformedObject,
            format!(
                "{}: an update without the stored object (oldObject) cannot be reviewed",
                subject.object_label
            ),
        );
    };
    let changes = match subject.write {
        Write::StatusUpdate => Ok(vmop::writes::keep_status(
            subject.kind,
            subject.object,
            stored,
        )),
        _ => {
            if let Some(err) = &facts.mapping_error {
                return Decision::deny(
                    Verdict::default(),
                    DenyReason::MappingInvalid,
                    format!(
                        "{}: the mappings for Velero Restore {} cannot be used: {err}. \
                         Fix that ConfigMap (or remove it), then restore again",
                        subject.object_label, subject.restore_label
                    ),
                );
            }
            vmop::writes::keep_live(subject.kind, subject.object, stored, &facts.mappings)
        }
    };
    let enabled = |rule: &str| !settings.disabled_rules.contains(rule);
    match changes {
        Ok(changes) => Decision {
            verdict: Verdict {
                changes: changes
                    .into_iter()
                    .filter(|change| enabled(change.rule))
                    .collect(),
                ..Verdict::default()
            },
            deny_reason: None,
            unchanged_because: None,
        },
        Err(err) => Decision::deny(
            Verdict::default(),
            DenyReason::MalformedObject,
            format!(
                "{} cannot be reviewed: {err}. Fix the object in the backup (or with a Velero resource modifier) and restore again",
                subject.object_label
            ),
        ),
    }
}

fn decide_create(subject: &Subject, facts: &Facts, settings: &DecideSettings) -> Decision {
    let mut verdict = Verdict::default();
    // A Restore that cannot be read denies a VM before any marker is
    // looked at: without the Restore's UID, no marker proves a review.
    if denied_before_group(subject, &facts.restore, settings) {
        let (why, reason) = match &facts.restore {
            RestoreFact::Lookup(RestoreLookup::Failed(err)) => {
                (err.clone(), DenyReason::RestoreUnreadable)
            }
            _ => (
                "the lookup did not finish before the API server's deadline".to_string(),
                DenyReason::Deadline,
            ),
        };
        return Decision::deny(verdict, reason, unreadable_message(subject, &why, settings));
    }
    if already_reviewed(subject, &facts.restore) {
        return Decision {
            verdict,
            deny_reason: None,
            unchanged_because: Some("already reviewed for this restore (a reinvocation)"),
        };
    }
    let label = subject.object_label;
    let restore = subject.restore_label;
    let (power_policy, power_note) = power_policy(settings, &facts.restore);
    verdict.notes.extend(power_note);
    // Without the Restore, no companion releases a boot-order hold (it
    // finds held objects by the Restore's UID in the marker): nothing is
    // held for it. A review then cannot tell its own annotations of an
    // earlier call (a reinvocation) from a backup's, so it sets none that
    // the next call would remove as not its own.
    let restore_read = matches!(facts.restore, RestoreFact::Lookup(RestoreLookup::Found(_)));
    let power_policy = match power_policy {
        PowerPolicy::BootOrder if !restore_read => PowerPolicy::AsBackedUp,
        policy => policy,
    };
    let mut options = CleanupOptions {
        new_identity: false,
        disabled_rules: settings.disabled_rules.clone(),
        missing_refs: Default::default(),
        power_policy,
        named_group_holds_power: facts.group_holds_power,
        mappings: facts.mappings.clone(),
    };
    for (reference, presence) in &facts.refs {
        match presence {
            GroupPresence::Present => {}
            GroupPresence::Missing => {
                options.missing_refs.insert(reference.kind);
            }
            GroupPresence::Unknown(err) => verdict.notes.push(format!(
                "could not check {} {} in the target ({err}): kept",
                reference.kind.describe(),
                reference.name
            )),
        }
    }
    let (policy, policy_note) = group_policy(settings, &facts.restore);
    verdict.notes.extend(policy_note);

    if let Kind::VirtualMachine(_) = subject.kind {
        let unreadable = match &facts.restore {
            RestoreFact::Lookup(RestoreLookup::Found(info)) => {
                options.new_identity = info.identity_for(subject.namespace).new_identity;
                None
            }
            RestoreFact::Lookup(RestoreLookup::NotFound) => {
                verdict.notes.push(format!(
                    "Velero Restore {restore} not found in namespace {}: guest identity kept",
                    settings.velero_namespace
                ));
                None
            }
            RestoreFact::Lookup(RestoreLookup::Failed(err)) => {
                Some((err.clone(), DenyReason::RestoreUnreadable))
            }
            RestoreFact::DeadlineExceeded => Some((
                "the lookup did not finish before the API server's deadline".to_string(),
                DenyReason::Deadline,
            )),
        };
        if let Some((why, reason)) = unreadable {
            match settings.restore_unreadable {
                RestoreUnreadable::Deny => {
                    return Decision::deny(
                        verdict,
                        reason,
                        unreadable_message(subject, &why, settings),
                    );
                }
                RestoreUnreadable::KeepIdentity => verdict.notes.push(format!(
                    "could not read Velero Restore {restore}: guest identity kept"
                )),
            }
        }
        if facts.refs_named > MAX_CHECKED_REFERENCES {
            return Decision::deny(
                verdict,
                DenyReason::TooManyReferences,
                format!(
                    "{label} names {} distinct zones, classes, images, storage classes and networks; the webhook checks at most \
                     {MAX_CHECKED_REFERENCES} per VM (a vSphere VM has at most 10 network interfaces). Remove the extra \
                     interfaces from the backup (or with a Velero resource modifier), then restore again",
                    facts.refs_named
                ),
            );
        }
        let missing: Vec<&ClusterRef> = facts
            .refs
            .iter()
            .filter(|(reference, presence)| {
                reference.kind.denies_when_missing() && *presence == GroupPresence::Missing
            })
            .map(|(reference, _)| reference)
            .collect();
        if !missing.is_empty() {
            let (message, fixes) = missing_references_message(subject, &missing, facts, settings);
            let verdict = Verdict { fixes, ..verdict };
            return Decision::deny(verdict, DenyReason::ReferenceMissing, message);
        }
        if let Some(err) = &facts.mapping_error {
            return Decision::deny(
                verdict,
                DenyReason::MappingInvalid,
                format!(
                    "{label}: the mappings for Velero Restore {restore} cannot be used: {err}. \
                     Fix that ConfigMap (or remove it), then restore again (existing objects are skipped)"
                ),
            );
        }
    }

    let plan = match vmop::plan(subject.kind, subject.object, &options) {
        Ok(plan) => plan,
        Err(err) => {
            return Decision::deny(
                verdict,
                DenyReason::MalformedObject,
                format!(
                    "{label} cannot be reviewed: {err}. Fix the object in the backup (or with a Velero resource modifier) and restore again"
                ),
            );
        }
    };
    verdict.changes = plan.changes;
    let mut annotations = plan.set_annotations;
    if let Some(denial) = plan.denial {
        return Decision::deny(verdict, DenyReason::Rule, format!("{label} {denial}"));
    }

    if let Some((group, fact)) = &facts.group {
        match (subject.kind, fact) {
            (_, GroupFact::Present { .. }) => {}
            (Kind::VirtualMachine(_), GroupFact::Missing { waited, not_waited, live_error }) => {
                match policy {
                    GroupPolicy::AllowWithWarning => verdict.notes.push(format!(
                        "VirtualMachineGroup {group} does not exist in {}: VM admitted, but it waits for its group",
                        subject.namespace
                    )),
                    GroupPolicy::Deny | GroupPolicy::WaitThenDeny => {
                        let waited_text = if waited.is_zero() {
                            String::new()
                        } else {
                            format!(" after waiting {:.1}s", waited.as_secs_f64())
                        };
                        let not_waited_text = not_waited
                            .map(|why| format!(" ({})", why.describe()))
                            .unwrap_or_default();
                        let live_text = live_error
                            .as_ref()
                            .map(|err| format!(" (and the live check failed: {err})"))
                            .unwrap_or_default();
                        return Decision::deny(
                            verdict,
                            DenyReason::GroupMissing,
                            format!(
                                "{label} names VirtualMachineGroup {group:?} (spec.groupName), which does not exist in namespace {}{waited_text}{not_waited_text}{live_text}. \
                                 Restore the group first: include virtualmachinegroups.vmoperator.vmware.com in the restore and keep it before virtualmachines \
                                 in --restore-resource-priorities, or create the group, then restore again (existing objects are skipped)",
                                subject.namespace
                            ),
                        );
                    }
                }
            }
            // Velero creates groups in name order: a child may precede its
            // parent, so a missing parent is only worth a warning.
            (_, GroupFact::Missing { .. }) => verdict.notes.push(format!(
                "parent VirtualMachineGroup {group} does not exist yet in {}; restore it too",
                subject.namespace
            )),
        }
    }

    // Without the Restore, an `applied-rules` already there may be this
    // review's own from the call before a reinvocation: kept, with this
    // call's rules added, and the object counts as changed (a PVC keeps its
    // marker), so a second review changes nothing.
    let earlier_rules = (!restore_read)
        .then(|| {
            subject
                .object
                .pointer("/metadata/annotations")
                .and_then(|annotations| annotations.get(vmop::power::APPLIED_RULES_ANNOTATION))
                .and_then(Value::as_str)
        })
        .flatten();
    let changed = !verdict.changes.is_empty() || !annotations.is_empty() || earlier_rules.is_some();
    if changed && options.enabled(vmop::R_APPLIED_RULES) {
        let rules: BTreeSet<&str> = verdict
            .changes
            .iter()
            .map(|change| change.rule)
            .chain(annotations.iter().map(|set| set.rule))
            .chain(
                earlier_rules
                    .into_iter()
                    .flat_map(|rules| rules.split(','))
                    .map(str::trim)
                    .filter(|rule| !rule.is_empty()),
            )
            .collect();
        annotations.push(AnnotationSet::new(
            vmop::power::APPLIED_RULES_ANNOTATION,
            &rules.into_iter().collect::<Vec<_>>().join(","),
            vmop::R_APPLIED_RULES,
            "the rules that changed this object",
        ));
    }
    // The marker matters only where a later webhook re-invokes this one: VM
    // Operator mutates VMs and groups on create. A PVC gets it only when it
    // was changed, as a record of the review.
    let wants_marker = match subject.kind {
        Kind::VirtualMachine(_) | Kind::VirtualMachineGroup(_) => true,
        _ => changed,
    };
    if wants_marker && options.enabled(vmop::R_REVIEWED_MARKER) {
        annotations.push(AnnotationSet::new(
            vmop::REVIEWED_ANNOTATION,
            &vmop::marker_value(
                restore,
                restore_uid(&facts.restore),
                subject.received_at_unix,
            ),
            vmop::R_REVIEWED_MARKER,
            "keeps VM Operator's new defaults on reinvocation",
        ));
    }
    verdict
        .changes
        .extend(vmop::annotation_changes(subject.object, &annotations));
    if options.enabled(vmop::R_STALE_OWN) {
        // Without the Restore, policy `off`'s record of an object already
        // off (by the call before a reinvocation) stays: it holds nothing
        // anyone must release.
        let own_off_record = !restore_read
            && power_policy == PowerPolicy::Off
            && subject
                .object
                .pointer("/metadata/annotations")
                .and_then(|annotations| annotations.get(vmop::power::POWER_HELD_ANNOTATION))
                .and_then(Value::as_str)
                == Some(PowerPolicy::Off.as_str());
        let records = [
            vmop::power::POWER_HELD_ANNOTATION,
            vmop::power::RESTORED_POWER_STATE_ANNOTATION,
        ];
        verdict.changes.extend(
            stale_own_annotations(subject.object, &annotations)
                .into_iter()
                .filter(|change| !(own_off_record && records.contains(&change.tokens[2].as_str()))),
        );
    }
    Decision {
        verdict,
        deny_reason: None,
        unchanged_because: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// When the test requests come (seconds since the epoch).
    const TEST_NOW: u64 = 1_800_000_000;
    use crate::facts::RestoreInfo;
    use crate::vmop::{ApiVersion, REVIEWED_ANNOTATION};
    use crate::webhook::admission::MappingFix;
    use serde_json::json;

    fn settings() -> DecideSettings {
        DecideSettings {
            group_policy: GroupPolicy::WaitThenDeny,
            restore_unreadable: RestoreUnreadable::Deny,
            disabled_rules: Arc::default(),
            power_policy: PowerPolicy::BootOrder,
            velero_namespace: "velero".into(),
        }
    }

    fn subject(object: &Value) -> Subject<'_> {
        Subject {
            kind: Kind::VirtualMachine(ApiVersion(5)),
            write: Write::Create,
            old_object: None,
            restore_label: "r1",
            namespace: "prod",
            object,
            object_label: "VirtualMachine prod/vm1",
            dry_run: false,
            received_at_unix: TEST_NOW,
        }
    }

    fn found(uid: &str, mapping: Option<(&str, &str)>) -> RestoreFact {
        RestoreFact::Lookup(RestoreLookup::Found(RestoreInfo {
            name: "r1".into(),
            uid: Some(uid.into()),
            namespace_mapping: mapping
                .map(|(from, to)| [(from.to_string(), to.to_string())].into())
                .unwrap_or_default(),
            ..Default::default()
        }))
    }

    fn vm() -> Value {
        json!({"metadata": {"name": "vm1", "labels": {"velero.io/restore-name": "r1"}},
               "spec": {"instanceUUID": "u-1", "biosUUID": "b-1", "groupName": "g"}})
    }

    fn present() -> Option<(String, GroupFact)> {
        Some((
            "g".into(),
            GroupFact::Present {
                waited: Duration::ZERO,
            },
        ))
    }

    #[test]
    fn unreadable_restore_denies_a_vm_by_default_and_names_the_error() {
        let object = vm();
        for (restore, reason) in [
            (
                RestoreFact::Lookup(RestoreLookup::Failed(
                    "restores.velero.io \"r1\" is forbidden".into(),
                )),
                DenyReason::RestoreUnreadable,
            ),
            (RestoreFact::DeadlineExceeded, DenyReason::Deadline),
        ] {
            let facts = Facts {
                restore,
                group: present(),
                ..Default::default()
            };
            assert!(denied_before_group(
                &subject(&object),
                &facts.restore,
                &settings()
            ));
            let decision = decide(&subject(&object), &facts, &settings());
            assert_eq!(decision.deny_reason, Some(reason));
            let message = decision.verdict.denial.unwrap();
            assert!(message.contains("VirtualMachine prod/vm1"), "{message}");
            assert!(
                message.contains("get/list/watch restores.velero.io"),
                "{message}"
            );
            assert!(
                message.contains("--restore-unreadable=keep-identity"),
                "{message}"
            );
        }
        let facts = Facts {
            restore: RestoreFact::Lookup(RestoreLookup::Failed("forbidden".into())),
            group: present(),
            ..Default::default()
        };
        let keep = DecideSettings {
            restore_unreadable: RestoreUnreadable::KeepIdentity,
            ..settings()
        };
        let decision = decide(&subject(&object), &facts, &keep);
        assert!(decision.verdict.denial.is_none());
        assert!(
            decision
                .verdict
                .notes
                .iter()
                .any(|n| n.contains("guest identity kept"))
        );
    }

    #[test]
    fn marker_carries_the_restore_uid_and_a_recreated_restore_cleans_again() {
        let object = vm();
        let facts = Facts {
            restore: found("uid-1", None),
            group: present(),
            ..Default::default()
        };
        let decision = decide(&subject(&object), &facts, &settings());
        let patched = crate::patch::apply(&object, &decision.verdict.changes).unwrap();
        assert_eq!(
            patched["metadata"]["annotations"][REVIEWED_ANNOTATION],
            "r1/uid-1"
        );
        assert!(patched.pointer("/spec/instanceUUID").is_none());

        // Reinvocation by the same Restore: left alone.
        let mut reinvoked = patched.clone();
        reinvoked["spec"]["instanceUUID"] = json!("fresh-from-vm-operator");
        let again = decide(&subject(&reinvoked), &facts, &settings());
        assert!(again.unchanged_because.is_some());
        assert!(again.verdict.changes.is_empty());

        // Same name, new Restore (new UID), restoring a backup of that object.
        let recreated = Facts {
            restore: found("uid-2", None),
            group: present(),
            ..Default::default()
        };
        let cleaned = decide(&subject(&reinvoked), &recreated, &settings());
        assert!(cleaned.unchanged_because.is_none());
        assert!(
            cleaned
                .verdict
                .changes
                .iter()
                .any(|c| c.rule == vmop::vm::R_INSTANCE_UUID)
        );
    }

    /// Issue 25: our own annotations that come back from a backup never
    /// count. A backed-up marker naming a Restore of the same name is no
    /// proof of review when the Restore cannot be read (the VM is denied,
    /// not admitted with the original's identity), and on a create every
    /// stale one of ours is removed.
    #[test]
    fn our_annotations_from_a_backup_never_count() {
        use vmop::power::{APPLIED_RULES_ANNOTATION, POWER_HELD_ANNOTATION};
        let mut backed_up = vm();
        backed_up["metadata"]["annotations"] = json!({
            REVIEWED_ANNOTATION: "r1/uid-of-the-restore-it-was-backed-up-after",
            POWER_HELD_ANNOTATION: "boot-order",
            APPLIED_RULES_ANNOTATION: "vm-zone-label,vm-first-boot-done",
            "velero-vm-restore-webhook/companion-done-for-restore": "r1/old",
            "owner": "team-web",
        });
        for restore in [
            RestoreFact::Lookup(RestoreLookup::Failed("connection refused".into())),
            RestoreFact::DeadlineExceeded,
        ] {
            let facts = Facts {
                restore,
                group: present(),
                ..Default::default()
            };
            let decision = decide(&subject(&backed_up), &facts, &settings());
            assert!(decision.unchanged_because.is_none(), "{decision:?}");
            assert!(
                decision.verdict.denial.is_some(),
                "fails closed: {decision:?}"
            );
        }
        // Not found (labelled by hand): only our own bare marker counts.
        let not_found = Facts {
            restore: RestoreFact::Lookup(RestoreLookup::NotFound),
            group: present(),
            ..Default::default()
        };
        assert!(
            decide(&subject(&backed_up), &not_found, &settings())
                .unchanged_because
                .is_none()
        );
        // Found: cleaned, and what is ours from the backup removed.
        let facts = Facts {
            restore: found("uid-1", None),
            group: present(),
            ..Default::default()
        };
        let decision = decide(&subject(&backed_up), &facts, &settings());
        let patched = crate::patch::apply(&backed_up, &decision.verdict.changes).unwrap();
        let annotations = patched["metadata"]["annotations"].as_object().unwrap();
        assert_eq!(annotations[REVIEWED_ANNOTATION], "r1/uid-1");
        assert!(
            !annotations.contains_key(POWER_HELD_ANNOTATION),
            "{annotations:?}"
        );
        assert!(!annotations.contains_key("velero-vm-restore-webhook/companion-done-for-restore"));
        // This review's rules, not the backed-up review's.
        assert_eq!(annotations[APPLIED_RULES_ANNOTATION], "vm-instance-uuid");
        assert_eq!(annotations["owner"], "team-web");
        assert!(patched.pointer("/spec/instanceUUID").is_none());
    }

    /// Issue 33, finding 8: without the Restore's UID (not found, or not
    /// read with `--restore-unreadable=keep-identity`) a bare marker from a
    /// backup is no proof of review: the object is cleaned. So is a
    /// reinvocation's object, which no review can tell from a backup's: the
    /// second review of a cleaned object changes nothing (it holds no power,
    /// as no companion could release it, and keeps the `applied-rules` it
    /// finds), and after VM Operator's webhook only its fresh
    /// `instanceUUID` goes again.
    #[test]
    fn without_the_restores_uid_only_a_marker_of_this_admission_counts() {
        use vmop::power::{
            APPLIED_RULES_ANNOTATION, POWER_HELD_ANNOTATION, RESTORED_POWER_STATE_ANNOTATION,
        };
        let ours = json!({
            REVIEWED_ANNOTATION: "r1",
            POWER_HELD_ANNOTATION: "boot-order",
            RESTORED_POWER_STATE_ANNOTATION: "PoweredOn",
            APPLIED_RULES_ANNOTATION: "vm-zone-label",
            "owner": "team-web",
        });
        let mut vm = vm();
        vm["metadata"]["annotations"] = ours.clone();
        vm["spec"]["powerState"] = json!("PoweredOn");
        let step = |name: &str| json!({"members": [{"kind": "VirtualMachine", "name": name}]});
        let mut group = json!({"metadata": {"name": "g", "labels": {"velero.io/restore-name": "r1"},
                "annotations": ours.clone()},
            "spec": {"powerState": "PoweredOn", "bootOrder": [step("db"), step("web")]}});
        group["metadata"]["annotations"]["vmoperator.vmware.com.protected/apply-power-state-time"] =
            json!("2025-01-01T00:00:00Z");
        let mut pvc = json!({"metadata": {"name": "p", "labels": {"velero.io/restore-name": "r1"},
            "annotations": ours.clone()}});
        pvc["metadata"]["annotations"]["volumehealth.storage.kubernetes.io/health"] =
            json!("accessible");
        let unread = [
            RestoreFact::Lookup(RestoreLookup::NotFound),
            RestoreFact::Lookup(RestoreLookup::Failed("connection refused".into())),
            RestoreFact::DeadlineExceeded,
        ];
        let kinds = [
            (
                Kind::VirtualMachine(ApiVersion(5)),
                &vm,
                "/spec/instanceUUID",
            ),
            (
                Kind::VirtualMachineGroup(ApiVersion(5)),
                &group,
                "/metadata/annotations/vmoperator.vmware.com.protected~1apply-power-state-time",
            ),
            (
                Kind::PersistentVolumeClaim,
                &pvc,
                "/metadata/annotations/volumehealth.storage.kubernetes.io~1health",
            ),
        ];
        for (restore, policy) in unread.into_iter().flat_map(|restore| {
            [PowerPolicy::BootOrder, PowerPolicy::Off].map(|p| (restore.clone(), p))
        }) {
            let keep = DecideSettings {
                restore_unreadable: RestoreUnreadable::KeepIdentity,
                power_policy: policy,
                ..settings()
            };
            for (kind, object, cleaned) in kinds {
                let facts = Facts {
                    restore: restore.clone(),
                    group: present(),
                    group_holds_power: true,
                    ..Default::default()
                };
                let review = |object: &Value| {
                    let subject = Subject {
                        kind,
                        ..subject(object)
                    };
                    let decision = decide(&subject, &facts, &keep);
                    assert!(decision.verdict.denial.is_none(), "{decision:?}");
                    let patched = crate::patch::apply(object, &decision.verdict.changes)
                        .unwrap_or_else(|err| panic!("{kind:?}, {restore:?}: {err}"));
                    (
                        decision.verdict.changes,
                        patched,
                        decision.unchanged_because,
                    )
                };
                let (_, first, unchanged) = review(object);
                assert!(unchanged.is_none(), "a bare marker is no proof");
                assert!(
                    first.pointer(cleaned).is_none(),
                    "{kind:?}, {restore:?}: {first}"
                );
                let written = format!("r1/unread-at-{TEST_NOW}");
                assert_eq!(
                    annotation(&first, REVIEWED_ANNOTATION),
                    Some(written.as_str())
                );
                match (policy, kind) {
                    (PowerPolicy::Off, Kind::VirtualMachine(_) | Kind::VirtualMachineGroup(_)) => {
                        // Every VM and group is off, as the operator asked.
                        assert_eq!(annotation(&first, POWER_HELD_ANNOTATION), Some("off"));
                        assert_eq!(
                            annotation(&first, RESTORED_POWER_STATE_ANNOTATION),
                            Some("PoweredOn")
                        );
                        assert_ne!(first["spec"]["powerState"], "PoweredOn", "{first}");
                    }
                    _ => {
                        // Nothing held for boot order: no companion would
                        // release it.
                        assert_eq!(annotation(&first, POWER_HELD_ANNOTATION), None, "{first}");
                        assert_eq!(annotation(&first, RESTORED_POWER_STATE_ANNOTATION), None);
                        assert_eq!(first["spec"]["powerState"], object["spec"]["powerState"]);
                    }
                }
                assert_eq!(annotation(&first, "owner"), Some("team-web"));
                // The reinvocation after VM Operator's webhook, in the same
                // admission: the marker written a moment ago counts, so
                // VM Operator's fresh instanceUUID stays.
                let mut defaulted = first.clone();
                if let Kind::VirtualMachine(_) = kind {
                    defaulted["spec"]["instanceUUID"] = json!("fresh-from-vm-operator");
                }
                let (again, second, unchanged) = review(&defaulted);
                assert!(again.is_empty(), "{kind:?}, {restore:?}: {again:?}");
                assert!(unchanged.is_some());
                assert_eq!(second, defaulted);
                // The same marker come back from a backup a day later is no
                // proof: the object is cleaned again, idempotently.
                let mut backed_up = first.clone();
                backed_up["metadata"]["annotations"][REVIEWED_ANNOTATION] =
                    json!(format!("r1/unread-at-{}", TEST_NOW - 86_400));
                let (_, cleaned_again, unchanged) = review(&backed_up);
                assert!(unchanged.is_none());
                assert_eq!(cleaned_again, first, "{kind:?}, {restore:?}");
            }
        }
    }

    #[test]
    fn missing_group_denial_says_why_it_did_not_wait() {
        let object = vm();
        let facts = Facts {
            restore: found("uid-1", None),
            group: Some((
                "g".into(),
                GroupFact::Missing {
                    waited: Duration::ZERO,
                    not_waited: Some(NoWait::RecentMiss {
                        ago: Duration::from_secs(4),
                    }),
                    live_error: None,
                },
            )),
            ..Default::default()
        };
        let decision = decide(&subject(&object), &facts, &settings());
        assert_eq!(decision.deny_reason, Some(DenyReason::GroupMissing));
        let message = decision.verdict.denial.unwrap();
        assert!(
            message.contains("names VirtualMachineGroup \"g\""),
            "{message}"
        );
        assert!(message.contains("ran out 4s ago"), "{message}");
        assert!(
            decision
                .verdict
                .changes
                .iter()
                .all(|c| c.rule != vmop::R_REVIEWED_MARKER)
        );
    }

    #[test]
    fn references_missing_in_the_target_are_removed_and_unknown_ones_kept() {
        use crate::vmop::RefKind;
        let copy = json!({"apiVersion": "vmoperator.vmware.com/v1alpha5", "kind": "VirtualMachine",
            "metadata": {"labels": {"topology.kubernetes.io/zone": "zone-a"}},
            "spec": {"class": {"kind": "VirtualMachineClassInstance", "name": "small-x1"},
                     "imageName": "ubuntu", "image": {"kind": "VirtualMachineImage", "name": "vmi-1"}}});
        let object = json!({"metadata": {"name": "vm1", "labels": {"velero.io/restore-name": "r1", "topology.kubernetes.io/zone": "zone-a"},
                "annotations": {"vmoperator.vmware.com/conversion": copy.to_string()}},
            "spec": {"class": {"kind": "VirtualMachineClassInstance", "name": "small-x1"},
                     "imageName": "ubuntu", "image": {"kind": "ClusterVirtualMachineImage", "name": "vmi-1"}}});
        let refs = crate::vmop::vm::cluster_refs(&object, &Default::default()).unwrap();
        assert_eq!(
            refs.iter().map(|r| r.kind).collect::<Vec<_>>(),
            vec![
                RefKind::Zone,
                RefKind::ClassInstance,
                RefKind::ClusterImage,
                RefKind::ImageName
            ]
        );
        let facts = Facts {
            restore: found("uid-1", None),
            refs: vec![
                (refs[0].clone(), GroupPresence::Missing),
                (refs[1].clone(), GroupPresence::Present),
                (refs[2].clone(), GroupPresence::Unknown("forbidden".into())),
            ],
            ..Default::default()
        };
        let decision = decide(&subject(&object), &facts, &settings());
        let patched = crate::patch::apply(&object, &decision.verdict.changes).unwrap();
        assert!(
            patched
                .pointer("/metadata/labels/topology.kubernetes.io~1zone")
                .is_none()
        );
        assert_eq!(patched["spec"]["class"]["name"], "small-x1");
        assert_eq!(patched["spec"]["image"]["name"], "vmi-1", "unknown: kept");
        assert!(
            decision
                .verdict
                .notes
                .iter()
                .any(|n| n.contains("could not check ClusterVirtualMachineImage vmi-1"))
        );
        // The hub copy loses the zone label too.
        let cleaned: Value = serde_json::from_str(
            patched["metadata"]["annotations"]["vmoperator.vmware.com/conversion"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert!(
            cleaned
                .pointer("/metadata/labels/topology.kubernetes.io~1zone")
                .is_none()
        );
        assert_eq!(cleaned["spec"]["class"]["name"], "small-x1");
    }

    fn mappings(data: Value) -> Result<Arc<Mappings>, MappingError> {
        use crate::vmop::mapping::{self, ConfigMapData};
        let map = ConfigMapData::from_value(&json!({
            "metadata": {"name": "site-b", "namespace": "velero", "labels": {
                mapping::PLUGIN_CONFIG_LABEL: "", mapping::VM_MAPPINGS_LABEL: mapping::RESTORE_ITEM_ACTION}},
            "data": data}));
        mapping::select(&[map], "velero", None).map(Arc::new)
    }

    #[test]
    fn a_malformed_mapping_denies_the_vm_naming_the_configmap_and_the_key() {
        let object = vm();
        let facts = Facts {
            restore: found("u1", None),
            group: present(),
            mapping_error: mappings(json!({"classes": "small: ''"})).err(),
            ..Facts::default()
        };
        let decision = decide(&subject(&object), &facts, &settings());
        assert_eq!(decision.deny_reason, Some(DenyReason::MappingInvalid));
        let message = decision.verdict.denial.unwrap();
        assert!(
            message.starts_with("VirtualMachine prod/vm1: the mappings for Velero Restore r1 cannot be used: ConfigMap velero/site-b, key classes: the target of \"small\" is empty."),
            "{message}"
        );
        assert!(
            message.contains("Fix that ConfigMap (or remove it), then restore again"),
            "{message}"
        );
    }

    #[test]
    fn a_zone_is_mapped_when_the_target_has_it_and_removed_when_not() {
        let mut object = vm();
        object["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("zone-a");
        object["spec"]["className"] = json!("small");
        object["spec"]["class"] = json!({"name": "small-instance"});
        let selected =
            mappings(json!({"zones": "zone-a: az-1", "classes": "small: medium"})).unwrap();
        // The references checked are the mapped zone and the mapped class;
        // the class instance is not checked at all: the mapping removes it.
        let refs = crate::vmop::vm::cluster_refs(&object, &selected).unwrap();
        let checked: Vec<_> = refs.iter().map(|r| (r.kind, r.name.as_str())).collect();
        assert_eq!(
            checked,
            [
                (crate::vmop::RefKind::Zone, "az-1"),
                (crate::vmop::RefKind::Class, "medium")
            ]
        );
        let mut facts = Facts {
            restore: found("u1", None),
            group: present(),
            mappings: selected,
            refs: vec![(refs[0].clone(), GroupPresence::Present)],
            ..Facts::default()
        };
        let patched = apply(&subject(&object), &facts);
        assert_eq!(
            patched["metadata"]["labels"]["topology.kubernetes.io/zone"],
            "az-1"
        );
        assert_eq!(patched["spec"]["className"], "medium");
        assert!(patched["spec"].get("class").is_none());
        let rules = patched["metadata"]["annotations"]
            [crate::vmop::power::APPLIED_RULES_ANNOTATION]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            rules.contains("vm-map-zone") && rules.contains("vm-map-class"),
            "{rules}"
        );

        facts.refs = vec![(refs[0].clone(), GroupPresence::Missing)];
        let patched = apply(&subject(&object), &facts);
        assert!(
            patched["metadata"]["labels"]
                .get("topology.kubernetes.io/zone")
                .is_none()
        );
    }

    #[test]
    fn a_class_the_namespace_lacks_denies_the_vm_with_what_it_has_and_the_entry_to_add() {
        use crate::vmop::RefKind;
        let mut object = vm();
        object["spec"]["className"] = json!("best-effort-small");
        let class = ClusterRef {
            kind: RefKind::Class,
            name: "best-effort-small".into(),
            owner: None,
        };
        let mut facts = Facts {
            restore: found("u1", None),
            group: present(),
            refs: vec![(class.clone(), GroupPresence::Missing)],
            alternatives: [(
                RefKind::Class,
                vec!["site-b-large".into(), "site-b-small".into()],
            )]
            .into(),
            ..Facts::default()
        };
        let decision = decide(&subject(&object), &facts, &settings());
        assert_eq!(decision.deny_reason, Some(DenyReason::ReferenceMissing));
        let message = decision.verdict.denial.unwrap();
        assert_eq!(
            message,
            "VirtualMachine prod/vm1: spec.className \"best-effort-small\" names no VirtualMachineClass with an active \
             instance in namespace prod, so VM Operator would admit the VM and never deploy it. The namespace has: \
             site-b-large, site-b-small. Map the class: add `best-effort-small: site-b-large` under key classes of a \
             ConfigMap in namespace velero labelled velero.io/plugin-config=\"\" and \
             velero-vm-restore-webhook/vm-mappings=RestoreItemAction, then restore again (existing objects are skipped)"
        );
        // With a mappings ConfigMap in effect, the message names it.
        facts.mappings = mappings(json!({"zones": "a: b"})).unwrap();
        let message = decide(&subject(&object), &facts, &settings())
            .verdict
            .denial
            .unwrap();
        assert!(
            message.contains("under key classes of ConfigMap velero/site-b, then"),
            "{message}"
        );
        // Present, or unknown (kept, with a warning): admitted.
        facts.refs = vec![(class.clone(), GroupPresence::Present)];
        assert!(
            decide(&subject(&object), &facts, &settings())
                .verdict
                .denial
                .is_none()
        );
        facts.refs = vec![(class, GroupPresence::Unknown("timeout".into()))];
        let decision = decide(&subject(&object), &facts, &settings());
        assert!(decision.verdict.denial.is_none());
        assert!(
            decision
                .verdict
                .notes
                .iter()
                .any(|note| note.contains("could not check VirtualMachineClass"))
        );
    }

    #[test]
    fn a_storage_class_the_namespace_lacks_denies_the_vm_naming_velero_s_configmap() {
        use crate::vmop::RefKind;
        let mut object = vm();
        object["spec"]["storageClass"] = json!("wcpglobal-storage-profile");
        object["spec"]["className"] = json!("best-effort-small");
        let storage = ClusterRef {
            kind: RefKind::StorageClass,
            name: "wcpglobal-storage-profile".into(),
            owner: None,
        };
        let class = ClusterRef {
            kind: RefKind::Class,
            name: "best-effort-small".into(),
            owner: None,
        };
        let mut facts = Facts {
            restore: found("u1", None),
            group: present(),
            refs: vec![
                (class.clone(), GroupPresence::Present),
                (storage.clone(), GroupPresence::Missing),
            ],
            alternatives: [(
                RefKind::StorageClass,
                vec!["site-b-gold".into(), "site-b-silver".into()],
            )]
            .into(),
            ..Facts::default()
        };
        let decision = decide(&subject(&object), &facts, &settings());
        assert_eq!(decision.deny_reason, Some(DenyReason::ReferenceMissing));
        assert_eq!(
            decision.verdict.denial.unwrap(),
            "VirtualMachine prod/vm1: spec.storageClass \"wcpglobal-storage-profile\" is not assigned to namespace prod \
             (no ResourceQuota or StoragePolicyQuota there assigns it), so VM Operator would refuse the VM (\"Storage policy is not associated \
             with the namespace\"). The namespace has: site-b-gold, site-b-silver. Map the storage class: add \
             `wcpglobal-storage-profile: site-b-gold` to Velero's change-storage-class ConfigMap (in namespace velero, \
             labelled velero.io/plugin-config=\"\" and velero.io/change-storage-class=RestoreItemAction), which maps the \
             VM's PVCs too, then restore again (existing objects are skipped)"
        );
        // Every missing reference that denies is named, each with its own
        // alternatives and entry, so one attempt shows every fix.
        facts.refs = vec![
            (class.clone(), GroupPresence::Missing),
            (storage.clone(), GroupPresence::Missing),
        ];
        facts
            .alternatives
            .insert(RefKind::Class, vec!["site-b-small".into()]);
        let message = decide(&subject(&object), &facts, &settings())
            .verdict
            .denial
            .unwrap();
        assert!(
            message.starts_with("VirtualMachine prod/vm1: spec.className \"best-effort-small\""),
            "{message}"
        );
        assert!(
            message.contains(
                "add `best-effort-small: site-b-small` under key classes of a ConfigMap in namespace velero \
                 labelled velero.io/plugin-config=\"\" and velero-vm-restore-webhook/vm-mappings=RestoreItemAction; \
                 and spec.storageClass \"wcpglobal-storage-profile\""
            ),
            "{message}"
        );
        assert!(
            message.ends_with(
                "add `wcpglobal-storage-profile: site-b-gold` to Velero's change-storage-class ConfigMap (in namespace \
                 velero, labelled velero.io/plugin-config=\"\" and velero.io/change-storage-class=RestoreItemAction), \
                 which maps the VM's PVCs too, then restore again (existing objects are skipped)"
            ),
            "{message}"
        );
        assert_eq!(message.matches("restore again").count(), 1, "{message}");
        // Assigned, or not checkable: admitted, the class unchanged.
        facts.refs = vec![(storage.clone(), GroupPresence::Present)];
        let patched = apply(&subject(&object), &facts);
        assert_eq!(patched["spec"]["storageClass"], "wcpglobal-storage-profile");
        facts.refs = vec![(storage, GroupPresence::Unknown("forbidden".into()))];
        assert!(
            decide(&subject(&object), &facts, &settings())
                .verdict
                .denial
                .is_none()
        );
    }

    /// Velero's change-storage-class ConfigMap with `data`, and ours with `ours`.
    fn storage_mappings(data: Value, ours: Value) -> Arc<Mappings> {
        use crate::vmop::mapping::{self, ConfigMapData};
        let velero = ConfigMapData::from_value(&json!({
            "metadata": {"name": "change-storage-class", "namespace": "velero", "labels": {
                mapping::PLUGIN_CONFIG_LABEL: "", mapping::CHANGE_STORAGE_CLASS_LABEL: mapping::RESTORE_ITEM_ACTION}},
            "data": data}));
        let our = ConfigMapData::from_value(&json!({
            "metadata": {"name": "site-b", "namespace": "velero", "labels": {
                mapping::PLUGIN_CONFIG_LABEL: "", mapping::VM_MAPPINGS_LABEL: mapping::RESTORE_ITEM_ACTION}},
            "data": ours}));
        Arc::new(mapping::select(&[velero, our], "velero", None).unwrap())
    }

    #[test]
    fn an_encryption_class_with_a_storage_class_that_does_not_encrypt_denies_the_vm_with_the_encrypted_ones()
     {
        use crate::vmop::RefKind;
        let mut object = vm();
        object["spec"]["storageClass"] = json!("gold");
        object["spec"]["crypto"] = json!({"encryptionClassName": "my-keys"});
        // An admin mapped the class to one that does not encrypt.
        let mapped = storage_mappings(json!({"gold": "site-b-plain"}), json!({}));
        let refs = crate::vmop::vm::cluster_refs(&object, &mapped).unwrap();
        let encryption = ClusterRef {
            kind: RefKind::EncryptionStorageClass,
            name: "site-b-plain".into(),
            owner: Some("my-keys".into()),
        };
        assert!(refs.contains(&encryption), "{refs:?}");
        let storage = ClusterRef {
            kind: RefKind::StorageClass,
            name: "site-b-plain".into(),
            owner: None,
        };
        let mut facts = Facts {
            restore: found("u1", None),
            group: present(),
            refs: vec![
                (storage.clone(), GroupPresence::Present),
                (encryption.clone(), GroupPresence::Missing),
            ],
            alternatives: [
                (
                    RefKind::EncryptionStorageClass,
                    vec!["site-b-encrypted".into()],
                ),
                (
                    RefKind::StorageClass,
                    vec!["site-b-encrypted".into(), "site-b-plain".into()],
                ),
            ]
            .into(),
            mappings: mapped,
            ..Facts::default()
        };
        let decision = decide(&subject(&object), &facts, &settings());
        assert_eq!(decision.deny_reason, Some(DenyReason::ReferenceMissing));
        assert_eq!(
            decision.verdict.denial.unwrap(),
            "VirtualMachine prod/vm1: spec.crypto.encryptionClassName \"my-keys\" needs an encryption storage class, and \
             spec.storageClass \"site-b-plain\" is not one (VM Operator does not record its storage policy as encrypted), so VM \
             Operator would refuse the VM (\"requires spec.storageClass specify an encryption storage class\"). Encryption storage \
             classes of namespace prod: site-b-encrypted. Map the storage class: change `gold: site-b-plain` to \
             `gold: site-b-encrypted` in ConfigMap velero/change-storage-class, which maps the VM's PVCs too, then restore \
             again (existing objects are skipped)"
        );
        // The entry to put in place is the one Velero reads: from the backup's name.
        assert_eq!(
            decision.verdict.fixes,
            vec![MappingFix {
                place: "ConfigMap velero/change-storage-class".into(),
                old: "gold".into(),
                new: "site-b-encrypted".into()
            }]
        );
        // A storage class the namespace also lacks is one clause, listing
        // only the encryption storage classes.
        facts.refs[0].1 = GroupPresence::Missing;
        let decision = decide(&subject(&object), &facts, &settings());
        let message = decision.verdict.denial.unwrap();
        assert!(
            message.contains(
                "The namespace's encryption storage classes (spec.crypto.encryptionClassName \"my-keys\" needs one): \
                 site-b-encrypted. Map the storage class: change `gold: site-b-plain` to `gold: site-b-encrypted`"
            ),
            "{message}"
        );
        assert!(
            !message.contains("needs an encryption storage class, and"),
            "{message}"
        );
        assert_eq!(decision.verdict.fixes.len(), 1);
        // The same where the class encrypts but is not the namespace's.
        facts.refs[1].1 = GroupPresence::Present;
        let message = decide(&subject(&object), &facts, &settings())
            .verdict
            .denial
            .unwrap();
        assert!(
            message.contains("The namespace's encryption storage classes (spec.crypto.encryptionClassName \"my-keys\" needs one): \
                 site-b-encrypted."),
            "{message}"
        );
        // An encryption storage class: admitted, unchanged but for the mapping.
        facts.refs = vec![
            (storage, GroupPresence::Present),
            (encryption, GroupPresence::Present),
        ];
        let patched = apply(&subject(&object), &facts);
        assert_eq!(patched["spec"]["storageClass"], "site-b-plain");
        assert_eq!(patched["spec"]["crypto"]["encryptionClassName"], "my-keys");
        // No encryption class: no encryption reference.
        object["spec"].as_object_mut().unwrap().remove("crypto");
        let refs = crate::vmop::vm::cluster_refs(&object, &facts.mappings).unwrap();
        assert!(
            refs.iter()
                .all(|reference| reference.kind != RefKind::EncryptionStorageClass),
            "{refs:?}"
        );
    }

    #[test]
    fn a_mapping_to_a_missing_target_is_fixed_by_changing_that_entry() {
        use crate::vmop::RefKind;
        let mut object = vm();
        object["spec"]["className"] = json!("small");
        object["spec"]["network"] = json!({"interfaces": [{"name": "eth0",
            "network": {"apiVersion": "netoperator.vmware.com/v1alpha1", "kind": "Network", "name": "vds-a"}}]});
        let mapped = storage_mappings(
            json!({}),
            json!({"classes": "small: medium", "networks": "Network/vds-a: SubnetSet/typo"}),
        );
        let refs = crate::vmop::vm::cluster_refs(&object, &mapped).unwrap();
        let missing: Vec<(ClusterRef, GroupPresence)> = refs
            .into_iter()
            .filter(|reference| matches!(reference.kind, RefKind::Class | RefKind::Network))
            .map(|reference| (reference, GroupPresence::Missing))
            .collect();
        assert_eq!(missing.len(), 2, "{missing:?}");
        let facts = Facts {
            restore: found("u1", None),
            group: present(),
            refs: missing,
            alternatives: [
                (RefKind::Class, vec!["site-b-small".into()]),
                (RefKind::Network, vec!["SubnetSet/site-b".into()]),
            ]
            .into(),
            mappings: mapped,
            ..Facts::default()
        };
        let decision = decide(&subject(&object), &facts, &settings());
        let message = decision.verdict.denial.unwrap();
        assert!(
            message.contains(
                "Map the class: change `small: medium` to `small: site-b-small` under key classes of ConfigMap velero/site-b"
            ),
            "{message}"
        );
        assert!(
            message.contains(
                "Map the network: change `Network/vds-a: SubnetSet/typo` to `Network/vds-a: SubnetSet/site-b` under key \
                 networks of ConfigMap velero/site-b"
            ),
            "{message}"
        );
        let olds: Vec<&str> = decision
            .verdict
            .fixes
            .iter()
            .map(|fix| fix.old.as_str())
            .collect();
        assert_eq!(olds, ["small", "Network/vds-a"]);
    }

    #[test]
    fn an_image_name_that_resolves_to_nothing_denies_the_vm_listing_what_the_namespace_can_use() {
        use crate::vmop::RefKind;
        let mut object = vm();
        object["spec"]["imageName"] = json!("vmi-0a0044d7c690bcbea");
        let image = ClusterRef {
            kind: RefKind::ImageName,
            name: "vmi-0a0044d7c690bcbea".into(),
            owner: None,
        };
        let mut facts = Facts {
            restore: found("u1", None),
            group: present(),
            refs: vec![(image.clone(), GroupPresence::Missing)],
            alternatives: [(
                RefKind::ImageName,
                vec![
                    "vmi-5b1e000000000000b (ubuntu-22.04)".into(),
                    "vmi-77".into(),
                ],
            )]
            .into(),
            ..Facts::default()
        };
        let decision = decide(&subject(&object), &facts, &settings());
        assert_eq!(decision.deny_reason, Some(DenyReason::ReferenceMissing));
        // The entry, for plan's summary: mapped to the name, not the display name.
        assert_eq!(
            decision.verdict.fixes,
            [MappingFix {
                place: "key images of a ConfigMap in namespace velero labelled velero.io/plugin-config=\"\" and \
                        velero-vm-restore-webhook/vm-mappings=RestoreItemAction"
                    .into(),
                old: "vmi-0a0044d7c690bcbea".into(),
                new: "vmi-5b1e000000000000b".into(),
            }]
        );
        assert_eq!(
            decision.verdict.denial.unwrap(),
            "VirtualMachine prod/vm1: spec.imageName \"vmi-0a0044d7c690bcbea\" resolves to no VirtualMachineImage in \
             namespace prod and no ClusterVirtualMachineImage, so VM Operator would refuse the VM (\"no VM image \
             exists\"). The namespace can use: vmi-5b1e000000000000b (ubuntu-22.04), vmi-77. Map the image: add \
             `vmi-0a0044d7c690bcbea: vmi-5b1e000000000000b` under key images of a ConfigMap in namespace velero \
             labelled velero.io/plugin-config=\"\" and velero-vm-restore-webhook/vm-mappings=RestoreItemAction, then \
             restore again (existing objects are skipped)"
        );
        // A long list is cut, saying how many more there are.
        facts.alternatives = [(
            RefKind::ImageName,
            (0..13).map(|i| format!("vmi-{i:02}")).collect(),
        )]
        .into();
        let message = decide(&subject(&object), &facts, &settings())
            .verdict
            .denial
            .unwrap();
        assert!(message.contains("vmi-09 and 3 more."), "{message}");
        assert!(!message.contains("vmi-10"), "{message}");
        // Resolves: admitted, the name unchanged.
        facts.refs = vec![(image, GroupPresence::Present)];
        let patched = apply(&subject(&object), &facts);
        assert_eq!(patched["spec"]["imageName"], "vmi-0a0044d7c690bcbea");
    }

    #[test]
    fn a_network_the_namespace_lacks_denies_the_vm_with_the_networks_entry() {
        use crate::vmop::RefKind;
        let object = vm();
        let network = ClusterRef {
            kind: RefKind::Network,
            name: "SubnetSet/vm-default".into(),
            owner: None,
        };
        let facts = Facts {
            restore: found("u1", None),
            group: present(),
            refs: vec![(network, GroupPresence::Missing)],
            alternatives: [(RefKind::Network, vec!["SubnetSet/site-b-subnets".into()])].into(),
            ..Facts::default()
        };
        let decision = decide(&subject(&object), &facts, &settings());
        assert_eq!(decision.deny_reason, Some(DenyReason::ReferenceMissing));
        assert_eq!(
            decision.verdict.denial.unwrap(),
            "VirtualMachine prod/vm1: an interface's network \"SubnetSet/vm-default\" (spec.network.interfaces[].network) \
             is not in namespace prod, so VM Operator would admit the VM and its interface would never come up \
             (\"network interface is not ready\"). The namespace has: SubnetSet/site-b-subnets. Map the network: add \
             `SubnetSet/vm-default: SubnetSet/site-b-subnets` under key networks of a ConfigMap in namespace velero \
             labelled velero.io/plugin-config=\"\" and velero-vm-restore-webhook/vm-mappings=RestoreItemAction, then \
             restore again (existing objects are skipped)"
        );
        assert_eq!(
            decision.verdict.fixes[0].entry(),
            "SubnetSet/vm-default: SubnetSet/site-b-subnets"
        );
    }

    #[test]
    fn pvc_gets_the_marker_only_when_changed() {
        let unchanged =
            json!({"metadata": {"name": "p", "labels": {"velero.io/restore-name": "r1"}}});
        let changed = json!({"metadata": {"name": "p", "labels": {"velero.io/restore-name": "r1"},
            "annotations": {"volumehealth.storage.kubernetes.io/health": "accessible"}}});
        let facts = Facts {
            restore: found("uid-1", None),
            group: None,
            ..Default::default()
        };
        // Changed: the removal, the applied-rules record and the marker.
        for (object, changes) in [(&unchanged, 0), (&changed, 3)] {
            let subject = Subject {
                kind: Kind::PersistentVolumeClaim,
                ..subject(object)
            };
            let decision = decide(&subject, &facts, &settings());
            assert_eq!(
                decision.verdict.changes.len(),
                changes,
                "{:?}",
                decision.verdict.changes
            );
        }
        let subject = Subject {
            kind: Kind::PersistentVolumeClaim,
            ..subject(&changed)
        };
        let patched = apply(&subject, &facts);
        assert_eq!(
            patched["metadata"]["annotations"][vmop::power::APPLIED_RULES_ANNOTATION],
            "pvc-volume-health"
        );
    }

    fn apply(subject: &Subject, facts: &Facts) -> Value {
        let decision = decide(subject, facts, &settings());
        assert!(decision.verdict.denial.is_none(), "{decision:?}");
        crate::patch::apply(subject.object, &decision.verdict.changes).unwrap()
    }

    fn annotation<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
        object["metadata"]["annotations"][key].as_str()
    }

    fn with_power_policy(policy: &str) -> RestoreFact {
        RestoreFact::Lookup(RestoreLookup::Found(RestoreInfo {
            name: "r1".into(),
            uid: Some("uid-1".into()),
            annotations: [(
                crate::facts::restore::POWER_POLICY_ANNOTATION.to_string(),
                policy.to_string(),
            )]
            .into(),
            ..Default::default()
        }))
    }

    #[test]
    fn groups_with_a_boot_sequence_and_children_are_held() {
        use vmop::power::{POWER_HELD_ANNOTATION, RESTORED_POWER_STATE_ANNOTATION};
        let step = |name: &str, delay: Option<&str>| {
            let mut step = json!({"members": [{"kind": "VirtualMachine", "name": name}]});
            if let Some(delay) = delay {
                step["powerOnDelay"] = json!(delay);
            }
            step
        };
        let group = |order: Vec<Value>, parent: Option<&str>| {
            let mut spec = json!({"powerState": "PoweredOn", "bootOrder": order});
            if let Some(parent) = parent {
                spec["groupName"] = json!(parent);
            }
            json!({"metadata": {"name": "g", "annotations": {"a": "b"}}, "spec": spec})
        };
        let cases = [
            (group(vec![step("db", None), step("web", None)], None), true),
            (group(vec![step("db", Some("30s"))], None), true),
            (group(vec![step("db", Some("0s"))], None), false),
            (group(vec![step("db", None)], Some("parent")), true),
        ];
        for (object, held) in cases {
            let subject = Subject {
                kind: Kind::VirtualMachineGroup(vmop::ApiVersion(5)),
                ..subject(&object)
            };
            let facts = Facts {
                restore: found("uid-1", None),
                ..Default::default()
            };
            let patched = apply(&subject, &facts);
            assert_eq!(
                patched["spec"].get("powerState").is_none(),
                held,
                "{object}"
            );
            assert_eq!(
                annotation(&patched, POWER_HELD_ANNOTATION),
                held.then_some("boot-order")
            );
            assert_eq!(
                annotation(&patched, RESTORED_POWER_STATE_ANNOTATION),
                held.then_some("PoweredOn")
            );
            assert_eq!(annotation(&patched, "a"), Some("b"));
            // The Restore can ask for the backup's power state.
            let as_backed_up = Facts {
                restore: with_power_policy("as-backed-up"),
                ..Default::default()
            };
            let patched = apply(&subject, &as_backed_up);
            assert_eq!(patched["spec"]["powerState"], "PoweredOn");
            assert_eq!(annotation(&patched, POWER_HELD_ANNOTATION), None);
        }
        // A child without a power state of its own, under a held parent, is
        // marked held so that its VMs are created off.
        let child = json!({"metadata": {"name": "c"}, "spec": {"groupName": "g"}});
        let subject = Subject {
            kind: Kind::VirtualMachineGroup(vmop::ApiVersion(5)),
            ..subject(&child)
        };
        for (holds, expected) in [(true, Some("boot-order")), (false, None)] {
            let facts = Facts {
                restore: found("uid-1", None),
                group: Some((
                    "g".into(),
                    GroupFact::Present {
                        waited: Duration::ZERO,
                    },
                )),
                group_holds_power: holds,
                ..Default::default()
            };
            let patched = apply(&subject, &facts);
            assert_eq!(annotation(&patched, POWER_HELD_ANNOTATION), expected);
            assert_eq!(annotation(&patched, RESTORED_POWER_STATE_ANNOTATION), None);
        }
    }

    #[test]
    fn vms_are_created_off_when_their_group_holds_power_or_the_policy_is_off() {
        use vmop::power::{POWER_HELD_ANNOTATION, RESTORED_POWER_STATE_ANNOTATION};
        let on = json!({"metadata": {"name": "vm1"},
            "spec": {"groupName": "g", "powerState": "PoweredOn"}});
        let v1alpha1 = json!({"metadata": {"name": "vm1"}, "spec": {"powerState": "poweredOn"}});
        let cases = [
            (
                &on,
                5,
                found("uid-1", None),
                true,
                Some(("PoweredOff", "boot-order")),
            ),
            (&on, 5, found("uid-1", None), false, None),
            (&on, 5, with_power_policy("as-backed-up"), true, None),
            (
                &on,
                5,
                with_power_policy("off"),
                false,
                Some(("PoweredOff", "off")),
            ),
            (
                &v1alpha1,
                1,
                with_power_policy("off"),
                false,
                Some(("poweredOff", "off")),
            ),
        ];
        for (object, version, restore, holds, expected) in cases {
            let subject = Subject {
                kind: Kind::VirtualMachine(vmop::ApiVersion(version)),
                ..subject(object)
            };
            let facts = Facts {
                restore,
                group: present(),
                group_holds_power: holds,
                ..Default::default()
            };
            let patched = apply(&subject, &facts);
            let held = annotation(&patched, POWER_HELD_ANNOTATION);
            match expected {
                Some((state, policy)) => {
                    assert_eq!(patched["spec"]["powerState"], state);
                    assert_eq!(held, Some(policy));
                    assert_eq!(
                        annotation(&patched, RESTORED_POWER_STATE_ANNOTATION),
                        object["spec"]["powerState"].as_str()
                    );
                    let rules = annotation(&patched, vmop::power::APPLIED_RULES_ANNOTATION);
                    assert!(rules.unwrap().contains("vm-power-held"), "{rules:?}");
                }
                None => {
                    assert_eq!(patched["spec"]["powerState"], object["spec"]["powerState"]);
                    assert_eq!(held, None);
                }
            }
        }
        // An unknown policy falls back to the default, with a note.
        let facts = Facts {
            restore: with_power_policy("sometimes"),
            group: present(),
            group_holds_power: true,
            ..Default::default()
        };
        let decision = decide(&subject(&on), &facts, &settings());
        assert!(
            decision
                .verdict
                .notes
                .iter()
                .any(|n| n.contains("sometimes")),
            "{:?}",
            decision.verdict.notes
        );
    }
}
