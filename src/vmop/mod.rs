//! VM Operator knowledge: which fields of a restored object are bound to the
//! cluster (or to the original vSphere VM), where they live in each API
//! version, and what to do with them. Pure functions over `serde_json::Value`,
//! so that fields this crate does not model pass through untouched.

pub mod cns_register_volume;
pub mod group;
pub mod group_publish;
pub mod mapping;
pub mod power;
pub mod pvc;
pub mod refused;
pub mod shape;
pub mod targets;
pub mod vm;
pub mod web_console;
pub mod writes;

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::patch::Change;
pub use shape::ShapeError;

pub const GROUP: &str = "vmoperator.vmware.com";

/// The label Velero puts on every object it restores.
pub const RESTORE_NAME_LABEL: &str = "velero.io/restore-name";

/// VM Operator keeps the whole hub-version object here when an object is read
/// at an older API version; its conversion copies fields (and status) back.
pub const CONVERSION_ANNOTATION: &str = "vmoperator.vmware.com/conversion";

/// Set on restored VMs and groups the webhook admits (and on PVCs it
/// changed), to `<restore>/<restore UID>`. With `reinvocationPolicy:
/// IfNeeded` the API server calls the webhook again after VM Operator's own
/// mutating webhook has set fresh defaults (a new `instanceUUID`, `biosUUID`,
/// power-state time); the marker tells that second call the object was
/// already cleaned for this restore, so those new values stay. A later
/// restore of a backup of this object, even by a Restore re-created under
/// the same name, has another UID and is cleaned again. Without the
/// Restore's UID the marker carries when it was written and counts only
/// within the same admission (see [`marker_matches`]).
pub const REVIEWED_ANNOTATION: &str = "velero-vm-restore-webhook/reviewed-for-restore";
pub const R_REVIEWED_MARKER: &str = "reviewed-marker";
pub const R_APPLIED_RULES: &str = "applied-rules";

/// How long a marker written without the Restore's UID counts: the
/// reinvocation of the same create comes within the API server's webhook
/// timeouts (30 s each at most); a marker that came back from a backup is
/// older than this.
pub const UNREAD_MARKER_SECONDS: u64 = 120;

/// The marker's value: `<restore>/<uid>`, or, when the Restore object could
/// not be read (not found, labelled by hand), `<restore>/unread-at-<unix
/// seconds>`.
pub fn marker_value(restore_label: &str, uid: Option<&str>, now_unix: u64) -> String {
    match uid {
        Some(uid) => format!("{restore_label}/{uid}"),
        None => format!("{restore_label}/unread-at-{now_unix}"),
    }
}

/// Whether the object's marker says it was reviewed for this restore: it
/// equals `<restore>/<uid>` with the Restore's UID. A marker that came back
/// from a backup (another Restore's UID) never counts. Without the UID (the
/// Restore was not found or not read) only a marker written in this
/// admission counts: `<restore>/unread-at-<t>` with `t` at most
/// [`UNREAD_MARKER_SECONDS`] before `now_unix` (a little clock skew between
/// replicas allowed), so VM Operator's fresh defaults survive the
/// reinvocation, while a bare `<restore>` or an old one from a backup does
/// not count.
pub fn marker_matches(
    object: &serde_json::Value,
    restore_label: &str,
    uid: Option<&str>,
    now_unix: u64,
) -> bool {
    let Some(current) = object
        .pointer("/metadata/annotations")
        .and_then(|annotations| annotations.get(REVIEWED_ANNOTATION))
        .and_then(serde_json::Value::as_str)
    else {
        return false;
    };
    match uid {
        Some(uid) => current == marker_value(restore_label, Some(uid), now_unix),
        None => current
            .strip_prefix(restore_label)
            .and_then(|rest| rest.strip_prefix("/unread-at-"))
            .and_then(|at| at.parse::<u64>().ok())
            .is_some_and(|at| {
                at <= now_unix.saturating_add(5)
                    && now_unix.saturating_sub(at) <= UNREAD_MARKER_SECONDS
            }),
    }
}

/// What starts the annotations this binary writes.
pub const OWN_ANNOTATION_PREFIX: &str = "velero-vm-restore-webhook/";
pub const R_STALE_OWN: &str = "stale-own-annotations";

/// The change that sets the marker to `value`, if it is not set already.
pub fn marker_change(object: &serde_json::Value, value: &str) -> Option<Change> {
    annotation_changes(
        object,
        &[AnnotationSet::new(
            REVIEWED_ANNOTATION,
            value,
            R_REVIEWED_MARKER,
            "keeps VM Operator's new defaults on reinvocation",
        )],
    )
    .pop()
}

/// An annotation the review sets on the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationSet {
    pub key: String,
    pub value: String,
    pub rule: &'static str,
    pub reason: &'static str,
}

impl AnnotationSet {
    pub fn new(key: &str, value: &str, rule: &'static str, reason: &'static str) -> AnnotationSet {
        AnnotationSet {
            key: key.to_string(),
            value: value.to_string(),
            rule,
            reason,
        }
    }
}

/// The changes that set `sets` on the object's annotations, in order: one
/// change per annotation (so one log line each), the first one creating the
/// map when the object has none. An annotation already at its value is left.
pub fn annotation_changes(object: &serde_json::Value, sets: &[AnnotationSet]) -> Vec<Change> {
    use serde_json::Value;
    let Some(metadata) = object.get("metadata").and_then(Value::as_object) else {
        return Vec::new();
    };
    let existing = metadata.get("annotations").and_then(Value::as_object);
    let mut map_exists = existing.is_some();
    let mut changes = Vec::new();
    for set in sets {
        let path = vec!["metadata".into(), "annotations".into(), set.key.clone()];
        let value = Value::String(set.value.clone());
        match existing.and_then(|annotations| annotations.get(&set.key)) {
            Some(Value::String(current)) if *current == set.value => {}
            Some(_) => changes.push(Change::replace(path, value, set.rule, set.reason)),
            None if map_exists => changes.push(Change::add(path, value, set.rule, set.reason)),
            None => {
                map_exists = true;
                changes.push(Change::add(
                    vec!["metadata".into(), "annotations".into()],
                    serde_json::json!({ set.key.clone(): value }),
                    set.rule,
                    set.reason,
                ));
            }
        }
    }
    changes
}

/// The kinds this webhook knows how to clean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    VirtualMachine(ApiVersion),
    VirtualMachineGroup(ApiVersion),
    PersistentVolumeClaim,
    /// Denied whole: see [`refused`].
    VirtualMachineSnapshot,
    VirtualMachinePublishRequest,
    VirtualMachineGroupPublishRequest,
    /// VirtualMachineWebConsoleRequest, and v1alpha1's WebConsoleRequest.
    VirtualMachineWebConsoleRequest,
    /// cns.vmware.com's CnsRegisterVolume.
    CnsRegisterVolume,
}

impl Kind {
    /// Classifies a request's group, version and kind.
    pub fn classify(group: &str, version: &str, kind: &str) -> Option<Kind> {
        match (group, kind) {
            (GROUP, "VirtualMachine") => Some(Kind::VirtualMachine(ApiVersion::parse(version)?)),
            (GROUP, "VirtualMachineGroup") => {
                Some(Kind::VirtualMachineGroup(ApiVersion::parse(version)?))
            }
            ("", "PersistentVolumeClaim") if version == "v1" => Some(Kind::PersistentVolumeClaim),
            (GROUP, "VirtualMachineSnapshot") => Some(Kind::VirtualMachineSnapshot),
            (GROUP, "VirtualMachinePublishRequest") => Some(Kind::VirtualMachinePublishRequest),
            (GROUP, "VirtualMachineGroupPublishRequest") => {
                Some(Kind::VirtualMachineGroupPublishRequest)
            }
            (GROUP, "VirtualMachineWebConsoleRequest" | "WebConsoleRequest") => {
                Some(Kind::VirtualMachineWebConsoleRequest)
            }
            ("cns.vmware.com", "CnsRegisterVolume") => Some(Kind::CnsRegisterVolume),
            _ => None,
        }
    }

    /// Short label for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::VirtualMachine(_) => "VirtualMachine",
            Kind::VirtualMachineGroup(_) => "VirtualMachineGroup",
            Kind::PersistentVolumeClaim => "PersistentVolumeClaim",
            Kind::VirtualMachineSnapshot => "VirtualMachineSnapshot",
            Kind::VirtualMachinePublishRequest => "VirtualMachinePublishRequest",
            Kind::VirtualMachineGroupPublishRequest => "VirtualMachineGroupPublishRequest",
            Kind::VirtualMachineWebConsoleRequest => "VirtualMachineWebConsoleRequest",
            Kind::CnsRegisterVolume => "CnsRegisterVolume",
        }
    }
}

/// A `vmoperator.vmware.com` API version. Versions newer than this crate
/// knows are treated as the newest known one: every rule acts only on fields
/// that are present, so an unknown field is never touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiVersion(pub u8);

impl ApiVersion {
    pub const V1ALPHA1: ApiVersion = ApiVersion(1);
    pub const V1ALPHA2: ApiVersion = ApiVersion(2);
    pub const V1ALPHA3: ApiVersion = ApiVersion(3);
    pub const NEWEST_KNOWN: ApiVersion = ApiVersion(6);

    /// `v1alpha3` → 3. `v1beta1`/`v1` and later alphas map to the newest known.
    pub fn parse(version: &str) -> Option<ApiVersion> {
        if let Some(n) = version.strip_prefix("v1alpha") {
            let n: u8 = n.parse().ok()?;
            return (n >= 1).then_some(ApiVersion(n.min(Self::NEWEST_KNOWN.0)));
        }
        if version.starts_with("v1beta") || version == "v1" || version.starts_with("v2") {
            return Some(Self::NEWEST_KNOWN);
        }
        None
    }

    /// Parses the version from an object's `apiVersion` (`group/version`).
    pub fn from_api_version(api_version: &str) -> Option<ApiVersion> {
        let (group, version) = api_version.split_once('/')?;
        (group == GROUP)
            .then(|| ApiVersion::parse(version))
            .flatten()
    }
}

/// A reference from a VM to an object that is bound to its cluster: kept when
/// the object exists in the target, removed otherwise so that VM Operator
/// picks it again there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefKind {
    /// Label `topology.kubernetes.io/zone`: a Zone in the namespace, or an
    /// AvailabilityZone (`zones`/`availabilityzones.topology.tanzu.vmware.com`).
    Zone,
    /// `spec.class`: a VirtualMachineClassInstance in the namespace.
    ClassInstance,
    /// `spec.image` of kind VirtualMachineImage (when `spec.imageName` is set).
    Image,
    /// `spec.image` of kind ClusterVirtualMachineImage (when `spec.imageName` is set).
    ClusterImage,
    /// `spec.className`: a VirtualMachineClass in the namespace, with an
    /// active instance where the namespace has instances. VM Operator admits
    /// a VM naming a class the namespace lacks and never deploys it, so a
    /// missing class denies the VM instead of being removed.
    Class,
    /// `spec.storageClass`: a storage class assigned to the namespace (a
    /// ResourceQuota key `<class>.storageclass.storage.k8s.io/…`, as VM
    /// Operator checks). VM Operator refuses a VM with one the namespace
    /// lacks; a missing one denies the VM, naming the fix.
    StorageClass,
    /// `spec.imageName`, resolved as VM Operator's mutator resolves it: a
    /// `vmi-` name is a VirtualMachineImage in the namespace or a
    /// ClusterVirtualMachineImage of that name; any other is the display name
    /// (`status.name`) of one image in either scope. VM Operator refuses a VM
    /// whose image name resolves to nothing; a missing one denies the VM,
    /// naming the fix.
    ImageName,
    /// `spec.network.interfaces[].network` (v1alpha1:
    /// `spec.networkInterfaces[].networkName`): a network object in the
    /// namespace, named `KIND/NAME` (or `NAME` where the VM gives no kind).
    /// VM Operator admits a VM whose network is missing and its NIC never
    /// comes up, so a missing one denies the VM.
    Network,
    /// `spec.storageClass` (after mapping) of a VM with
    /// `spec.crypto.encryptionClassName` (in `owner`): an encryption storage
    /// class, one whose vSphere policy VM Operator records as encrypted (the
    /// StoragePolicy object in VM Operator's namespace). VM Operator refuses
    /// the VM otherwise ("requires spec.storageClass specify an encryption
    /// storage class"); a missing one denies the VM, naming the fix.
    EncryptionStorageClass,
}

impl RefKind {
    pub fn describe(&self) -> &'static str {
        match self {
            RefKind::Zone => "Zone",
            RefKind::ClassInstance => "VirtualMachineClassInstance",
            RefKind::Image => "VirtualMachineImage",
            RefKind::ClusterImage => "ClusterVirtualMachineImage",
            RefKind::Class => "VirtualMachineClass",
            RefKind::StorageClass => "StorageClass",
            RefKind::ImageName => "VM image name",
            RefKind::Network => "network",
            RefKind::EncryptionStorageClass => "encryption storage class",
        }
    }

    /// A missing reference of this kind denies the VM (there is nothing VM
    /// Operator could pick instead) rather than being removed.
    pub fn denies_when_missing(self) -> bool {
        matches!(
            self,
            RefKind::Class
                | RefKind::StorageClass
                | RefKind::ImageName
                | RefKind::Network
                | RefKind::EncryptionStorageClass
        )
    }
}

/// One cluster-bound reference a VM makes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClusterRef {
    pub kind: RefKind,
    pub name: String,
    /// For a class instance: the VirtualMachineClass it must be an active
    /// instance of (`spec.className`), as VM Operator checks. For an
    /// encryption storage class: the VM's encryption class.
    pub owner: Option<String>,
}

/// Choices that depend on the restore and the operator, not on the object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupOptions {
    /// The restore makes a copy beside the original (a namespace mapping, or
    /// the Restore's override annotation): also clear guest-visible identity.
    pub new_identity: bool,
    /// Rule ids the operator turned off (`--disable-rule`).
    pub disabled_rules: Arc<BTreeSet<String>>,
    /// References whose target does not exist in the target cluster: their
    /// fields are removed (also in the conversion copy).
    pub missing_refs: BTreeSet<RefKind>,
    /// This restore's power policy ([`power`]).
    pub power_policy: power::PowerPolicy,
    /// The group the object names (`spec.groupName`) has its power held.
    pub named_group_holds_power: bool,
    /// The renames this restore asks for ([`mapping`]).
    pub mappings: Arc<mapping::Mappings>,
}

impl CleanupOptions {
    pub fn enabled(&self, rule: &str) -> bool {
        !self.disabled_rules.contains(rule)
    }
}

/// What the rules decided for one object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub changes: Vec<Change>,
    /// The group a VM or child group names (`spec.groupName`).
    pub group_name: Option<String>,
    /// Set when the object must not be created; the message says what to do.
    pub denial: Option<String>,
    /// Annotations to set on the object (not in its conversion copy).
    pub set_annotations: Vec<AnnotationSet>,
}

impl Plan {
    /// The JSON Pointers of all changes, in order (tests and reports).
    pub fn pointers(&self) -> Vec<String> {
        self.changes
            .iter()
            .map(|c| c.pointer().to_string())
            .collect()
    }
}

/// Runs the rules for `kind` over `object`.
pub fn plan(
    kind: Kind,
    object: &serde_json::Value,
    options: &CleanupOptions,
) -> Result<Plan, ShapeError> {
    match kind {
        Kind::VirtualMachine(version) => vm::plan(object, version, options),
        Kind::VirtualMachineGroup(_) => group::plan(object, options),
        Kind::PersistentVolumeClaim => pvc::plan(object, options),
        Kind::VirtualMachineSnapshot | Kind::VirtualMachinePublishRequest => {
            refused::plan(kind, object, options)
        }
        Kind::VirtualMachineGroupPublishRequest => group_publish::plan(object, options),
        Kind::VirtualMachineWebConsoleRequest => web_console::plan(object, options),
        Kind::CnsRegisterVolume => cns_register_volume::plan(object, options),
    }
}

/// The group an object names, for the facts a review gathers before it
/// decides: a VM's group, or a child group's parent.
pub fn group_name(kind: Kind, object: &serde_json::Value) -> Result<Option<String>, ShapeError> {
    match kind {
        Kind::VirtualMachine(version) => vm::group_name(object, version),
        Kind::VirtualMachineGroup(_) => group::group_name(object),
        Kind::PersistentVolumeClaim
        | Kind::VirtualMachineSnapshot
        | Kind::VirtualMachinePublishRequest
        | Kind::VirtualMachineGroupPublishRequest
        | Kind::VirtualMachineWebConsoleRequest
        | Kind::CnsRegisterVolume => Ok(None),
    }
}

/// One documented rule: what the rule table (docs/rules.md) and `--disable-rule` name.
#[derive(Debug, Clone, Copy)]
pub struct RuleDoc {
    pub id: &'static str,
    pub kind: &'static str,
    pub what: &'static str,
    pub why: &'static str,
}

/// Every rule, in the order docs/rules.md lists them.
pub fn rule_docs() -> Vec<RuleDoc> {
    let mut docs = vm::RULES.to_vec();
    docs.extend_from_slice(mapping::RULES);
    docs.extend_from_slice(group::RULES);
    docs.extend_from_slice(pvc::RULES);
    docs.extend_from_slice(refused::RULES);
    docs.extend_from_slice(group_publish::RULES);
    docs.extend_from_slice(web_console::RULES);
    docs.extend_from_slice(cns_register_volume::RULES);
    docs.extend_from_slice(writes::RULES);
    docs.push(RuleDoc {
        id: R_APPLIED_RULES,
        kind: "all three",
        what: "set annotation `velero-vm-restore-webhook/applied-rules` to the ids of the rules that changed the object",
        why: "`kubectl get -o yaml` shows what was cleaned, and `report` counts it per restore",
    });
    docs.push(RuleDoc {
        id: R_STALE_OWN,
        kind: "all three",
        what: "on create, remove every `velero-vm-restore-webhook/…` annotation the object brought from the backup that this review does not set (an old marker, `applied-rules`, `power-held`, `restored-power-state`, the companion's); without the Restore's UID an `applied-rules` there is kept, with this review's rules added (it may be this review's own before a reinvocation). On Velero's updates, `update-keeps-live` gives them the live object's values",
        why: "a backup of restored objects holds them; a stale hold would wait for a companion that never releases it, and a stale `applied-rules` would count in the report as a change",
    });
    docs.push(RuleDoc {
        id: R_REVIEWED_MARKER,
        kind: "all three",
        what: "set annotation `velero-vm-restore-webhook/reviewed-for-restore: <restore>/<restore UID>` on admitted VMs and groups, and on PVCs it changed (`<restore>/unread-at-<unix seconds>` when the Restore was not read: it counts for 120 s, the reinvocation of the same create)",
        why: "on reinvocation (`IfNeeded`) the object is left alone, so VM Operator's fresh `instanceUUID`, `biosUUID` and power-state time survive; only a marker with the Restore's UID, or one written in this admission, proves that, as a backup may bring back any other",
    });
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(ApiVersion::parse("v1alpha1"), Some(ApiVersion(1)));
        assert_eq!(ApiVersion::parse("v1alpha6"), Some(ApiVersion(6)));
        assert_eq!(
            ApiVersion::parse("v1alpha9"),
            Some(ApiVersion::NEWEST_KNOWN)
        );
        assert_eq!(ApiVersion::parse("v1beta1"), Some(ApiVersion::NEWEST_KNOWN));
        assert_eq!(ApiVersion::parse("v1alpha0"), None);
        assert_eq!(ApiVersion::parse("banana"), None);
        assert_eq!(
            ApiVersion::from_api_version("vmoperator.vmware.com/v1alpha3"),
            Some(ApiVersion(3))
        );
        assert_eq!(ApiVersion::from_api_version("other.io/v1alpha3"), None);
    }

    #[test]
    fn classify_kinds() {
        assert_eq!(
            Kind::classify(GROUP, "v1alpha2", "VirtualMachine"),
            Some(Kind::VirtualMachine(ApiVersion(2)))
        );
        assert_eq!(
            Kind::classify("", "v1", "PersistentVolumeClaim"),
            Some(Kind::PersistentVolumeClaim)
        );
        assert_eq!(Kind::classify("", "v1", "Secret"), None);
        assert_eq!(
            Kind::classify(GROUP, "v1alpha2", "VirtualMachineClass"),
            None
        );
    }

    #[test]
    fn marker_is_added_replaced_or_left() {
        use serde_json::json;
        let bare = json!({"metadata": {"name": "a"}});
        let change = marker_change(&bare, "r1").unwrap();
        let patched = crate::patch::apply(&bare, &[change]).unwrap();
        assert_eq!(
            patched["metadata"]["annotations"][REVIEWED_ANNOTATION],
            "r1"
        );
        assert!(marker_change(&patched, "r1").is_none());
        let replaced =
            crate::patch::apply(&patched, &[marker_change(&patched, "r2").unwrap()]).unwrap();
        assert_eq!(
            replaced["metadata"]["annotations"][REVIEWED_ANNOTATION],
            "r2"
        );
        let with_other = json!({"metadata": {"annotations": {"x": "y"}}});
        let added =
            crate::patch::apply(&with_other, &[marker_change(&with_other, "r1").unwrap()]).unwrap();
        assert_eq!(
            added["metadata"]["annotations"],
            json!({"x": "y", REVIEWED_ANNOTATION: "r1"})
        );
    }

    /// Issue 33, finding 8: with the Restore's UID, only `<restore>/<uid>`
    /// counts. Without it, a bare `<restore>` (written by earlier versions,
    /// or come back from a backup of an object an earlier restore of the
    /// same name reviewed) never counts; only a marker written in this
    /// admission does (`unread-at-` a moment ago), so the reinvocation after
    /// VM Operator's webhook keeps its fresh `instanceUUID`.
    #[test]
    fn a_marker_counts_only_with_the_restores_uid_or_from_this_admission() {
        use serde_json::json;
        let now = 1_800_000_000;
        let at = |t: u64| format!("r1/unread-at-{t}");
        let rows: &[(Option<String>, Option<&str>, bool)] = &[
            (Some("r1/u1".into()), Some("u1"), true),
            (Some("r1/u0".into()), Some("u1"), false),
            (Some("r1".into()), Some("u1"), false),
            (Some("r1".into()), None, false),
            (Some("r1/u1".into()), None, false),
            (Some("r1/".into()), None, false),
            (Some("r2/u1".into()), Some("u1"), false),
            (Some(at(now - 3)), None, true),
            (Some(at(now + 2)), None, true),
            (Some(at(now - UNREAD_MARKER_SECONDS - 1)), None, false),
            (Some(at(now - 86_400)), None, false),
            (Some(at(now + 3600)), None, false),
            (Some(at(now)), Some("u1"), false),
            (Some(format!("r2/unread-at-{now}")), None, false),
            (Some("r1/unread-at-soon".into()), None, false),
            (None, Some("u1"), false),
            (None, None, false),
        ];
        for (marker, uid, counts) in rows {
            let mut object = json!({"metadata": {"name": "vm1", "annotations": {"x": "y"}}});
            if let Some(marker) = marker {
                object["metadata"]["annotations"][REVIEWED_ANNOTATION] = json!(marker);
            }
            assert_eq!(
                marker_matches(&object, "r1", *uid, now),
                *counts,
                "marker {marker:?}, Restore UID {uid:?}"
            );
        }
        assert_eq!(marker_value("r1", None, now), at(now));
        assert_eq!(marker_value("r1", Some("u1"), now), "r1/u1");
    }

    #[test]
    fn rule_ids_are_unique() {
        let docs = rule_docs();
        assert!(docs.iter().any(|d| d.id == R_REVIEWED_MARKER));
        let mut ids: Vec<_> = docs.iter().map(|d| d.id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), docs.len());
    }
}
