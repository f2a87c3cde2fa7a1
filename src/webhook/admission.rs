//! Review in, response out: parsing an AdmissionReview, deciding whether a
//! request is in scope, and building the response. Pure: no I/O, no clock.

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::Value;

use crate::patch::{self, Change};
use crate::vmop::{self, Kind};

pub const REVIEW_API_VERSION: &str = "admission.k8s.io/v1";

/// Why a body could not be reviewed. The message is sent back to the caller.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReviewError {
    #[error("request body is not JSON: {0}")]
    NotJson(String),
    #[error(
        "expected an AdmissionReview of apiVersion {REVIEW_API_VERSION}, got apiVersion {api_version:?} kind {kind:?}; set admissionReviewVersions: [v1]"
    )]
    WrongType { api_version: String, kind: String },
    #[error("the AdmissionReview has no request")]
    MissingRequest,
    #[error("the AdmissionReview request is malformed: {0}")]
    Malformed(String),
    #[error("request body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("request body was not received in time")]
    ReadTimeout,
    #[error("request body could not be read: {0}")]
    Body(String),
    #[error("too many reviews in flight; try again")]
    Overloaded,
}

/// A parsed request, with the object as raw JSON so that fields this crate
/// does not model stay exactly as the API server sent them.
pub struct ReviewInput {
    pub request: AdmissionRequest<DynamicObject>,
    pub object: Option<Value>,
    /// The object as stored, on an UPDATE.
    pub old_object: Option<Value>,
}

pub fn parse_review(body: &[u8]) -> Result<ReviewInput, ReviewError> {
    // One pass straight into the request for a well-formed review; anything
    // else goes the general way, which gives each fault its own message.
    if let Some(input) = parse_well_formed(body) {
        return Ok(input);
    }
    parse_any(body)
}

/// The request as the API server sends it, every field named: an unknown
/// one sends the body the general way. The small typed parts are taken as
/// JSON values and converted as the general way converts them, and
/// `oldObject` is kept as the object is, so that both ways check the same
/// text (skipping a value would not check its strings).
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WellFormedRequest {
    uid: String,
    kind: Value,
    resource: Value,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    request_kind: Option<Value>,
    #[serde(default)]
    request_resource: Option<Value>,
    #[serde(default)]
    request_sub_resource: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    operation: Operation,
    user_info: Value,
    #[serde(default)]
    object: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    old_object: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    options: Option<k8s_openapi::apimachinery::pkg::runtime::RawExtension>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WellFormedReview {
    api_version: String,
    kind: String,
    request: WellFormedRequest,
    /// Never sent by the API server; any response sends the body the
    /// general way, which checks its shape.
    #[serde(default)]
    response: Option<serde::de::IgnoredAny>,
}

/// `None` unless the body is an `admission.k8s.io/v1` AdmissionReview whose
/// request, and object if any, have the shapes [`parse_any`] accepts; then
/// the same input it would return.
fn parse_well_formed(body: &[u8]) -> Option<ReviewInput> {
    let review: WellFormedReview = serde_json::from_slice(body).ok()?;
    if review.api_version != REVIEW_API_VERSION
        || review.kind != "AdmissionReview"
        || review.response.is_some()
    {
        return None;
    }
    let wire = review.request;
    fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Option<T> {
        serde_json::from_value(value).ok()
    }
    let request = AdmissionRequest {
        types: kube::core::TypeMeta {
            api_version: review.api_version,
            kind: review.kind,
        },
        uid: wire.uid,
        kind: typed(wire.kind)?,
        resource: typed(wire.resource)?,
        sub_resource: wire.sub_resource,
        request_kind: match wire.request_kind {
            Some(kind) => Some(typed(kind)?),
            None => None,
        },
        request_resource: match wire.request_resource {
            Some(resource) => Some(typed(resource)?),
            None => None,
        },
        request_sub_resource: wire.request_sub_resource,
        name: wire.name,
        namespace: wire.namespace,
        operation: wire.operation,
        user_info: typed(wire.user_info)?,
        object: None,
        old_object: None,
        dry_run: wire.dry_run,
        options: wire.options,
    };
    Some(ReviewInput {
        request,
        object: wire.object.map(Value::Object),
        old_object: wire.old_object.map(Value::Object),
    })
}

/// For the fuzz target and tests: whether the one-pass parse, when it
/// accepts `body`, returns exactly what the general parse returns.
#[doc(hidden)]
pub fn one_pass_parse_agrees(body: &[u8]) -> Result<bool, String> {
    let Some(fast) = parse_well_formed(body) else {
        return Ok(false);
    };
    let general = parse_any(body)
        .map_err(|err| format!("the one pass accepted what the general way refuses: {err}"))?;
    let as_json = |input: &ReviewInput| {
        serde_json::to_value(&input.request).map(|request| (request, input.request.types.clone()))
    };
    let (fast_request, general_request) = (
        as_json(&fast).map_err(|err| err.to_string())?,
        as_json(&general).map_err(|err| err.to_string())?,
    );
    if fast_request != general_request
        || fast.object != general.object
        || fast.old_object != general.old_object
    {
        return Err(format!(
            "the two parses differ: {fast_request:?} {:?} / {general_request:?} {:?}",
            fast.object, general.object
        ));
    }
    Ok(true)
}

/// Any body: each way it can fall short gets its own error.
fn parse_any(body: &[u8]) -> Result<ReviewInput, ReviewError> {
    let mut value: Value =
        serde_json::from_slice(body).map_err(|err| ReviewError::NotJson(err.to_string()))?;
    let text = |key: &str| {
        value
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let (api_version, kind) = (text("apiVersion"), text("kind"));
    if api_version != REVIEW_API_VERSION || kind != "AdmissionReview" {
        return Err(ReviewError::WrongType { api_version, kind });
    }
    let request = match value.get_mut("request") {
        None | Some(Value::Null) => return Err(ReviewError::MissingRequest),
        Some(request) => request,
    };
    if !request.is_object() {
        return Err(ReviewError::Malformed("request must be an object".into()));
    }
    // The typed request only needs the envelope; the object is checked by the
    // rules with field-level messages, so keep serde from rejecting it first.
    let object = request
        .get_mut("object")
        .map(Value::take)
        .filter(|o| !o.is_null());
    let old_object = request
        .get_mut("oldObject")
        .map(Value::take)
        .filter(|o| !o.is_null());
    for (field, value) in [("object", &object), ("oldObject", &old_object)] {
        if let Some(value) = value
            && !value.is_object()
        {
            return Err(ReviewError::Malformed(format!(
                "request.{field} must be an object"
            )));
        }
    }
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_value(value).map_err(|err| ReviewError::Malformed(err.to_string()))?;
    let request: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| ReviewError::MissingRequest)?;
    Ok(ReviewInput {
        request,
        object,
        old_object,
    })
}

/// The AdmissionReview as it goes on the wire, with `response.patch` as the
/// base64 string the admission API documents: kube's type serializes the
/// patch bytes as a JSON array of numbers, about four times larger, which the
/// API server then parses on every create. Only the response is written (the
/// request is never echoed back).
pub struct WireReview<'a>(pub &'a AdmissionReview<DynamicObject>);

struct WireResponse<'a>(&'a AdmissionResponse);

impl serde::Serialize for WireReview<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let review = self.0;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("apiVersion", &review.types.api_version)?;
        map.serialize_entry("kind", &review.types.kind)?;
        if let Some(response) = &review.response {
            map.serialize_entry("response", &WireResponse(response))?;
        }
        map.end()
    }
}

impl serde::Serialize for WireResponse<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        use serde::ser::SerializeMap;
        let response = self.0;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("uid", &response.uid)?;
        map.serialize_entry("allowed", &response.allowed)?;
        map.serialize_entry("status", &response.result)?;
        if let Some(patch) = &response.patch {
            map.serialize_entry(
                "patch",
                &base64::engine::general_purpose::STANDARD.encode(patch),
            )?;
            map.serialize_entry("patchType", "JSONPatch")?;
        }
        if !response.audit_annotations.is_empty() {
            map.serialize_entry("auditAnnotations", &response.audit_annotations)?;
        }
        if let Some(warnings) = &response.warnings {
            map.serialize_entry("warnings", warnings)?;
        }
        map.end()
    }
}

/// Which write of Velero's a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// A restored object's create.
    Create,
    /// `--existing-resource-policy=update`: Velero patches an object that
    /// already exists towards the backup.
    Update,
    /// The backed-up status, written after the create (`restoreStatus`, or
    /// the object's `velero.io/restore-status` annotation).
    StatusUpdate,
}

/// Whether a request is one the webhook changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Allowed unchanged; the reason is logged at debug level.
    Out(&'static str),
    In {
        kind: Kind,
        restore: String,
        write: Write,
    },
}

/// The `velero.io/restore-name` label, if the object carries a non-empty one.
pub fn restore_label(object: &Value) -> Option<&str> {
    object
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .and_then(|labels| labels.get(vmop::RESTORE_NAME_LABEL))
        .and_then(Value::as_str)
        .filter(|value| !value.is_empty())
}

/// Who Velero is, as the API server names the requests it makes: any of
/// `users` (`request.userInfo.username`), or a member of any of `groups`
/// (`request.userInfo.groups`). The chart sends Velero's updates to the
/// webhook by the same test (matchConditions), so the two never disagree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VeleroIdentity {
    pub users: Vec<String>,
    pub groups: Vec<String>,
    /// Never Velero, even as a member of one of `groups`: the webhook's own
    /// ServiceAccount, whose companion patches restored groups (installed
    /// in Velero's namespace, it is in Velero's group).
    pub not_users: Vec<String>,
}

impl VeleroIdentity {
    /// Every ServiceAccount of Velero's namespace
    /// (`system:serviceaccounts:NAMESPACE`): Velero however it was
    /// installed (`velero install` names its ServiceAccount `velero`,
    /// Velero's Helm chart `velero-server`).
    pub fn namespace_group(velero_namespace: &str) -> String {
        format!("system:serviceaccounts:{velero_namespace}")
    }

    /// Velero's namespace's ServiceAccounts, and `users` besides.
    pub fn of_namespace(velero_namespace: &str) -> VeleroIdentity {
        VeleroIdentity {
            users: Vec::new(),
            groups: vec![Self::namespace_group(velero_namespace)],
            not_users: Vec::new(),
        }
    }

    /// Whether a request made as `user_info` is Velero's.
    pub fn matches(&self, user_info: &k8s_openapi::api::authentication::v1::UserInfo) -> bool {
        let username = user_info.username.as_deref().unwrap_or_default();
        if self.not_users.iter().any(|user| user == username) {
            return false;
        }
        self.users.iter().any(|user| user == username)
            || user_info
                .groups
                .iter()
                .flatten()
                .any(|group| self.groups.contains(group))
    }

    /// For messages: `users a, b; groups c`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.users.is_empty() {
            parts.push(format!("users {}", self.users.join(", ")));
        }
        if !self.groups.is_empty() {
            parts.push(format!("groups {}", self.groups.join(", ")));
        }
        if parts.is_empty() {
            "nobody".to_string()
        } else {
            parts.join("; ")
        }
    }
}

/// Whether the request is a write of Velero's the webhook changes: the
/// create of a labelled object; and, from Velero's identity only, the
/// update of one (an existing object patched towards the backup) or of a
/// VM's or group's status (the backed-up status). Anyone else's update is
/// not ours, whatever the API server sends.
pub fn scope(
    request: &AdmissionRequest<DynamicObject>,
    object: Option<&Value>,
    velero: &VeleroIdentity,
) -> Scope {
    let write = match (&request.operation, request.sub_resource.as_deref()) {
        (Operation::Create, None) => Write::Create,
        (Operation::Update, None) => Write::Update,
        (Operation::Update, Some("status")) => Write::StatusUpdate,
        (Operation::Create | Operation::Update, Some(_)) => return Scope::Out("a subresource"),
        _ => return Scope::Out("not a CREATE or UPDATE"),
    };
    if write != Write::Create && !velero.matches(&request.user_info) {
        return Scope::Out("an update by someone other than Velero");
    }
    let gvk = &request.kind;
    let Some(kind) = Kind::classify(&gvk.group, &gvk.version, &gvk.kind) else {
        return Scope::Out("a kind this webhook does not handle");
    };
    if write == Write::StatusUpdate
        && !matches!(kind, Kind::VirtualMachine(_) | Kind::VirtualMachineGroup(_))
    {
        return Scope::Out("the status of a kind whose status the webhook leaves alone");
    }
    if write == Write::Update
        && !matches!(
            kind,
            Kind::VirtualMachine(_) | Kind::VirtualMachineGroup(_) | Kind::PersistentVolumeClaim
        )
    {
        return Scope::Out("an update of a kind the webhook does not update");
    }
    let Some(object) = object else {
        return Scope::Out("no object");
    };
    // Checked here too, not only by the configuration's objectSelector.
    let Some(restore) = restore_label(object) else {
        return Scope::Out("not restored by Velero (no velero.io/restore-name label)");
    };
    Scope::In {
        kind,
        restore: restore.to_string(),
        write,
    }
}

/// What the review decided, before it becomes a response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdict {
    pub changes: Vec<Change>,
    pub denial: Option<String>,
    /// Warnings that are not changes (e.g. a missing parent group).
    pub notes: Vec<String>,
    /// The mapping entries that would admit a denied VM, one per missing
    /// reference (for `plan` and `review`, which gather them).
    pub fixes: Vec<MappingFix>,
}

/// One mapping entry that would admit a denied VM: `old: new` in `place`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MappingFix {
    /// Where the entry goes, as the denial names it (a ConfigMap, and the
    /// key within it where there is one).
    pub place: String,
    /// The name the VM has.
    pub old: String,
    /// The first of the target's alternatives (or a placeholder when it has
    /// none): any of those the denial lists will do.
    pub new: String,
}

impl MappingFix {
    pub fn entry(&self) -> String {
        format!("{}: {}", self.old, self.new)
    }
}

/// `Kind ns/name`, for messages.
pub fn object_label(
    kind: &str,
    request: &AdmissionRequest<DynamicObject>,
    object: Option<&Value>,
) -> String {
    let name = object
        .and_then(|o| o.pointer("/metadata/name"))
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())
        .unwrap_or(&request.name);
    let name = if name.is_empty() {
        object
            .and_then(|o| o.pointer("/metadata/generateName"))
            .and_then(Value::as_str)
            .map(|prefix| format!("{prefix}*"))
            .unwrap_or_else(|| "(unnamed)".into())
    } else {
        name.to_string()
    };
    match request.namespace.as_deref() {
        Some(namespace) if !namespace.is_empty() => format!("{kind} {namespace}/{name}"),
        _ => format!("{kind} {name}"),
    }
}

/// Builds the response: a denial, or an allow with the patch (if any) and
/// one warning per change.
pub fn respond(request: &AdmissionRequest<DynamicObject>, verdict: &Verdict) -> AdmissionResponse {
    let mut response = AdmissionResponse::from(request);
    let mut warnings: Vec<String> = verdict
        .notes
        .iter()
        .map(|n| patch::bounded_warning(n))
        .collect();
    if let Some(denial) = &verdict.denial {
        response = response.deny(denial);
        response.result.code = 403;
        response.result.reason = "Forbidden".into();
    } else {
        warnings.extend(
            patch::described(&verdict.changes)
                .iter()
                .map(|line| patch::bounded_warning(&line.text())),
        );
        let patch = patch::to_json_patch(&verdict.changes);
        if !patch.0.is_empty() {
            response = match response.with_patch(patch) {
                Ok(patched) => patched,
                // Never a partial patch: a patch that cannot be encoded denies.
                Err(err) => {
                    let mut denied = AdmissionResponse::from(request).deny(format!(
                        "velero-vm-restore-webhook could not encode its patch: {err}"
                    ));
                    denied.result.code = 500;
                    return denied;
                }
            };
        }
    }
    if !warnings.is_empty() {
        response.warnings = Some(warnings);
    }
    response
}

/// The response to a body that could not be reviewed at all.
pub fn invalid(err: &ReviewError) -> AdmissionReview<DynamicObject> {
    let mut response = AdmissionResponse::invalid(format!("velero-vm-restore-webhook: {err}"));
    response.result.code = 400;
    response.into_review()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn review(object: Value, operation: &str, kind: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "vmoperator.vmware.com", "version": "v1alpha5", "kind": kind},
                "resource": {"group": "vmoperator.vmware.com", "version": "v1alpha5", "resource": "virtualmachines"},
                "name": "vm1", "namespace": "ns", "operation": operation,
                "userInfo": {"username": "velero"}, "object": object, "dryRun": false
            }
        }))
        .unwrap()
    }

    #[test]
    fn the_one_pass_parse_returns_what_the_general_parse_returns() {
        let example = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/admission-review-vm.json"
        ))
        .expect("example");
        let base: Value = serde_json::from_slice(&example).expect("json");
        let with = |pointer: &str, value: Value| {
            let mut review = base.clone();
            let (parent, key) = pointer.rsplit_once('/').expect(pointer);
            let parent = if parent.is_empty() {
                &mut review
            } else {
                review.pointer_mut(parent).expect(pointer)
            };
            parent
                .as_object_mut()
                .expect(pointer)
                .insert(key.to_string(), value);
            serde_json::to_vec(&review).expect("encode")
        };
        let without = |key: &str| {
            let mut review = base.clone();
            review["request"]
                .as_object_mut()
                .expect("request")
                .remove(key);
            serde_json::to_vec(&review).expect("encode")
        };
        let lone_surrogate = |body: Vec<u8>| {
            let text = String::from_utf8(body).expect("utf-8");
            assert!(text.contains("\"placeholder\""));
            text.replace("\"placeholder\"", r#""\ud800""#).into_bytes()
        };
        // Taken by the one pass, with the same result.
        let well_formed = [
            example.clone(),
            with("/request/dryRun", json!(true)),
            with("/request/oldObject", json!({"spec": {"anything": [1, 2]}})),
            with("/request/object", Value::Null),
            with("/request/options", json!({"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"})),
            without("object"),
            without("namespace"),
            br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{"uid":"u","kind":{"group":"","version":"v1","kind":"PersistentVolumeClaim"},"resource":{"group":"","version":"v1","resource":"persistentvolumeclaims"},"operation":"CREATE","userInfo":{},"object":{"metadata":{"name":"a","name":"b"}}}}"#.to_vec(),
        ];
        // An oldObject that is no object is refused both ways, naming it.
        let bad_old = with("/request/oldObject", json!("not even an object"));
        assert_eq!(one_pass_parse_agrees(&bad_old), Ok(false));
        assert!(
            matches!(parse_review(&bad_old), Err(ReviewError::Malformed(m)) if m.contains("oldObject"))
        );
        for body in &well_formed {
            assert_eq!(
                one_pass_parse_agrees(body),
                Ok(true),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // Left to the general way, which names the fault if there is one.
        let faulty = [
            with("/request/unknownField", json!({"x": 1})),
            with("/apiVersion", json!("admission.k8s.io/v1beta1")),
            with("/request/object", json!("a string")),
            with("/request/object", json!([1])),
            with("/request", Value::Null),
            with("/request/operation", json!("PATCH")),
            with("/response", json!({"uid": "u", "allowed": true})),
            without("uid"),
            b"{".to_vec(),
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{}}"#.to_vec(),
            // Found by the fuzz target: a field the one pass used to skip,
            // holding a string the general parse refuses (a lone surrogate).
            lone_surrogate(with("/request/operatobject", json!("placeholder"))),
            lone_surrogate(with("/request/kind/extra", json!("placeholder"))),
            lone_surrogate(with("/request/userInfo/extra", json!({"x": ["placeholder"]}))),
            lone_surrogate(with("/request/oldObject", json!({"a": "placeholder"}))),
            lone_surrogate(with("/request/object/metadata/name", json!("placeholder"))),
        ];
        for body in &faulty {
            assert_eq!(
                one_pass_parse_agrees(body),
                Ok(false),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn parse_errors_are_clear() {
        assert!(matches!(parse_review(b"{"), Err(ReviewError::NotJson(_))));
        let err =
            parse_review(br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#)
                .err()
                .unwrap();
        assert!(err.to_string().contains("admission.k8s.io/v1beta1"));
        assert_eq!(
            parse_review(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#).err(),
            Some(ReviewError::MissingRequest)
        );
        let err = parse_review(
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":5}}"#,
        )
        .err()
        .unwrap();
        assert!(matches!(err, ReviewError::Malformed(_)), "{err}");
        let err = parse_review(&review(json!("not an object"), "CREATE", "VirtualMachine"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("request.object must be an object"));
    }

    #[test]
    fn scope_needs_create_known_kind_and_label() {
        let labelled =
            json!({"metadata": {"name": "vm1", "labels": {"velero.io/restore-name": "r1"}}});
        let input = parse_review(&review(labelled.clone(), "CREATE", "VirtualMachine")).unwrap();
        let velero = VeleroIdentity {
            users: vec!["velero".to_string()],
            ..Default::default()
        };
        assert!(
            matches!(scope(&input.request, input.object.as_ref(), &velero), Scope::In { restore, write: Write::Create, .. } if restore == "r1")
        );
        // Velero's update of an existing object, and of its status.
        let input = parse_review(&review(labelled.clone(), "UPDATE", "VirtualMachine")).unwrap();
        assert!(matches!(
            scope(&input.request, input.object.as_ref(), &velero),
            Scope::In {
                write: Write::Update,
                ..
            }
        ));
        let mut status = input.request.clone();
        status.sub_resource = Some("status".into());
        assert!(matches!(
            scope(&status, input.object.as_ref(), &velero),
            Scope::In {
                write: Write::StatusUpdate,
                ..
            }
        ));
        // Anyone else's update is not ours (VM Operator writes status all day).
        assert_eq!(
            scope(
                &status,
                input.object.as_ref(),
                &VeleroIdentity::of_namespace("velero")
            ),
            Scope::Out("an update by someone other than Velero")
        );
        let input = parse_review(&review(labelled.clone(), "DELETE", "VirtualMachine")).unwrap();
        assert_eq!(
            scope(&input.request, input.object.as_ref(), &velero),
            Scope::Out("not a CREATE or UPDATE")
        );
        let input = parse_review(&review(labelled, "CREATE", "VirtualMachineClass")).unwrap();
        assert!(matches!(
            scope(&input.request, input.object.as_ref(), &velero),
            Scope::Out(_)
        ));
        let unlabelled = json!({"metadata": {"name": "vm1", "labels": {"app": "x"}}});
        let input = parse_review(&review(unlabelled, "CREATE", "VirtualMachine")).unwrap();
        assert!(matches!(
            scope(&input.request, input.object.as_ref(), &velero),
            Scope::Out(_)
        ));
    }

    /// Issue 33, finding 3: Velero is recognised by its namespace's
    /// ServiceAccounts group, whatever its ServiceAccount is named (`velero`
    /// from `velero install`, `velero-server` from Velero's Helm chart);
    /// before, only `system:serviceaccount:velero:velero` was.
    #[test]
    fn velero_is_any_service_account_of_its_namespace_by_default() {
        let identity = VeleroIdentity::of_namespace("velero");
        let user = |name: &str, groups: &[&str]| k8s_openapi::api::authentication::v1::UserInfo {
            username: Some(name.to_string()),
            groups: Some(groups.iter().map(|g| g.to_string()).collect()),
            ..Default::default()
        };
        let accounts = [
            "system:serviceaccounts",
            "system:serviceaccounts:velero",
            "system:authenticated",
        ];
        assert!(identity.matches(&user("system:serviceaccount:velero:velero", &accounts)));
        assert!(identity.matches(&user(
            "system:serviceaccount:velero:velero-server",
            &accounts
        )));
        // Another namespace's account, or a person, is not Velero.
        assert!(!identity.matches(&user(
            "system:serviceaccount:prod:velero",
            &["system:serviceaccounts", "system:serviceaccounts:prod"]
        )));
        assert!(!identity.matches(&user("kubernetes-admin", &["system:masters"])));
        assert!(!identity.matches(&k8s_openapi::api::authentication::v1::UserInfo::default()));
        // Named users count besides.
        let named = VeleroIdentity {
            users: vec!["backup-operator".into()],
            ..identity.clone()
        };
        assert!(named.matches(&user("backup-operator", &[])));
        assert_eq!(
            named.describe(),
            "users backup-operator; groups system:serviceaccounts:velero"
        );
    }

    #[test]
    fn the_wire_form_has_a_base64_patch_and_the_same_other_fields() {
        use base64::Engine as _;
        let request = parse_review(&review(
            json!({"metadata": {"name": "a"}, "spec": {"instanceUUID": "u"}}),
            "CREATE",
            "VirtualMachine",
        ))
        .unwrap()
        .request;
        let verdict = Verdict {
            changes: vec![Change::remove(
                vec!["spec".into(), "instanceUUID".into()],
                "vm-instance-uuid",
                "why",
            )],
            ..Default::default()
        };
        let review = respond(&request, &verdict).into_review();
        let wire: Value = serde_json::to_value(WireReview(&review)).unwrap();
        let mut kube: Value = serde_json::to_value(&review).unwrap();
        let patch = wire["response"]["patch"].as_str().expect("a base64 string");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&decoded).unwrap(),
            json!([{"op": "remove", "path": "/spec/instanceUUID"}])
        );
        // Everything else is what kube's own serialization writes.
        kube["response"]["patch"] = json!(patch);
        assert_eq!(wire, kube);
        assert_eq!(wire["response"]["patchType"], "JSONPatch");
    }

    #[test]
    fn denial_has_no_patch() {
        let object =
            json!({"metadata": {"name": "vm1", "labels": {"velero.io/restore-name": "r1"}}});
        let input = parse_review(&review(object, "CREATE", "VirtualMachine")).unwrap();
        let verdict = Verdict {
            changes: vec![Change::remove(vec!["spec".into(), "x".into()], "r", "why")],
            denial: Some("no".into()),
            notes: vec![],
            fixes: vec![],
        };
        let response = respond(&input.request, &verdict);
        assert!(!response.allowed);
        assert!(response.patch.is_none());
        assert_eq!(response.result.message, "no");
        assert_eq!(response.uid, "u-1");
    }
}
