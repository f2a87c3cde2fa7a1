//! Property: applying the patch gives the object minus exactly the documented
//! removals, and nothing else differs; a second review changes nothing.
//!
//! The expected object comes from `model`, an independent, deliberately naive
//! restatement of the rule table in docs/rules.md.

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use velero_vm_restore_webhook::patch;
use velero_vm_restore_webhook::vmop::{self, ApiVersion, CleanupOptions, Kind};

const REMOVED_ANNOTATIONS: &[&str] = &[
    "virtualmachine.vmoperator.vmware.com/first-boot-done",
    "vmoperator.vmware.com/bootstrap-hash-configspec",
    "vmoperator.vmware.com/bootstrap-hash-customspec",
    "vmoperator.vmware.com/backup-version",
    "vsphere-cluster-module-group-uuid",
    "vmoperator.vmware.com/instance-storage-pvcs-bound",
    "vmoperator.vmware.com/instance-storage-selected-node",
    "vmoperator.vmware.com/instance-storage-selected-node-moid",
    "vmoperator.vmware.com/upgraded-to-feature-version",
    "vmoperator.vmware.com.protected/skip-validation",
    "vmoperator.vmware.com.protected/apply-power-state-time",
    "vmoperator.vmware.com/restored-vm",
    "vmoperator.vmware.com/failed-over-vm",
    "vmoperator.vmware.com/imported-vm",
    "vmoperator.vmware.com/cloud-init-instance-id",
    "poweron.check.vmoperator.vmware.com/backup",
    "delete.check.vmoperator.vmware.com/team",
    "mgmt.proxy.vmware.com/allowlist",
    "vmoperator.vmware.com/snapshot-revert-in-progress",
];
/// Look-alikes that must survive.
const KEPT_ANNOTATIONS: &[&str] = &[
    "vmoperator.vmware.com/created-at-build-version",
    "vmoperator.vmware.com/manager-id",
    "vmoperator.vmware.com/vmclass-hash",
    "vsphere-cluster-module-group",
    "vmoperator.vmware.com/bootstrap-hash",
    "example.com/first-boot-done",
    "check.vmoperator.vmware.com/backup",
    "mgmt.proxy.vmware.com",
    "vmoperator.vmware.com/snapshot-revert",
];
const PAUSED: &str = "vmoperator.vmware.com/paused";

fn removable_annotation(key: &str) -> bool {
    REMOVED_ANNOTATIONS.contains(&key)
        || key.starts_with("vmoperator.vmware.com/upgraded-to-")
        || key.starts_with("vmoperator.vmware.com.protected/")
        || key.starts_with("poweron.check.vmoperator.vmware.com/")
        || key.starts_with("delete.check.vmoperator.vmware.com/")
        || key.starts_with("mgmt.proxy.vmware.com/")
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|n| json!(n)),
        "[ -~]{0,12}".prop_map(Value::String),
    ]
}

fn unknown_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map("x-[a-z]{1,5}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn maybe_string() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some(String::new())),
        "[a-f0-9-]{1,12}".prop_map(Some)
    ]
}

fn interface() -> impl Strategy<Value = Value> {
    (
        maybe_string(),
        prop::option::of(prop::collection::vec("10\\.0\\.0\\.[0-9]{1,2}/24", 0..2)),
        maybe_string(),
        maybe_string(),
        prop::collection::btree_map("x-[a-z]{1,5}", unknown_value(), 0..2),
    )
        .prop_map(|(mac, addresses, gw4, gw6, extra)| {
            let mut m: Map<String, Value> = extra.into_iter().collect();
            m.insert("name".into(), json!("eth0"));
            if let Some(v) = mac {
                m.insert("macAddr".into(), json!(v));
            }
            if let Some(v) = addresses {
                m.insert("addresses".into(), json!(v));
            }
            if let Some(v) = gw4 {
                m.insert("gateway4".into(), json!(v));
            }
            if let Some(v) = gw6 {
                m.insert("gateway6".into(), json!(v));
            }
            Value::Object(m)
        })
}

/// A VM object (without a conversion annotation).
fn vm_body() -> impl Strategy<Value = Value> {
    let annotations = (
        prop::collection::btree_set(prop::sample::select(REMOVED_ANNOTATIONS), 0..6),
        prop::collection::btree_set(prop::sample::select(KEPT_ANNOTATIONS), 0..3),
        prop::collection::btree_map("x-[a-z]{1,6}\\.io/[a-z]{1,6}", "[ -~]{0,8}", 0..3),
    );
    let spec_fields = (
        maybe_string(),
        maybe_string(),
        maybe_string(),
        maybe_string(),
        prop::option::of(prop::sample::select(vec![
            "PoweredOn",
            "PoweredOff",
            "Suspended",
            "suspended",
            "poweredOn",
        ])),
        maybe_string(),
        prop::option::of(prop::collection::vec(interface(), 0..3)),
        prop::collection::btree_map("x-[a-z]{1,6}", unknown_value(), 0..3),
    );
    (annotations, any::<bool>(), spec_fields).prop_map(
        |((removed, kept, other), paused, (uuid, restart, snapshot, bios, power, instance_id, interfaces, extra))| {
            let mut annotations = Map::new();
            for key in removed.iter().chain(kept.iter()) {
                annotations.insert(key.to_string(), json!("v"));
            }
            for (key, value) in other {
                annotations.insert(key, json!(value));
            }
            let mut labels = Map::new();
            labels.insert("velero.io/restore-name".into(), json!("r1"));
            if paused {
                labels.insert(PAUSED.into(), json!("true"));
            }
            let mut spec: Map<String, Value> = extra.into_iter().collect();
            for (key, value) in [("instanceUUID", uuid), ("nextRestartTime", restart), ("currentSnapshotName", snapshot), ("biosUUID", bios)] {
                if let Some(value) = value {
                    spec.insert(key.into(), json!(value));
                }
            }
            if let Some(power) = power {
                spec.insert("powerState".into(), json!(power));
            }
            if let Some(id) = instance_id {
                spec.insert("bootstrap".into(), json!({"cloudInit": {"instanceID": id, "x-keep": 1}}));
            }
            if let Some(interfaces) = interfaces {
                spec.insert("network".into(), json!({"interfaces": interfaces, "x-keep": true}));
            }
            json!({
                "apiVersion": "vmoperator.vmware.com/v1alpha5",
                "kind": "VirtualMachine",
                "metadata": {"name": "vm", "namespace": "ns", "labels": labels, "annotations": annotations, "x-unknown-meta": 1},
                "spec": spec,
                "x-unknown-top": {"a": [1, 2]},
            })
        },
    )
}

fn vm_object() -> impl Strategy<Value = (Value, u8)> {
    (
        vm_body(),
        prop::option::of((vm_body(), unknown_value())),
        1u8..=6,
    )
        .prop_map(|(mut outer, copy, version)| {
            outer["apiVersion"] = json!(format!("vmoperator.vmware.com/v1alpha{version}"));
            if let Some((mut hub, status)) = copy {
                hub["status"] = json!({"uniqueID": "vm-1", "x": status});
                outer["metadata"]["annotations"]["vmoperator.vmware.com/conversion"] =
                    json!(hub.to_string());
            }
            (outer, version)
        })
}

/// The rule table (docs/rules.md), restated naively.
fn model(object: &Value, new_identity: bool, inside_copy: bool) -> Value {
    let mut out = object.clone();
    if let Some(annotations) = out
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        annotations.retain(|key, _| !removable_annotation(key));
        if !inside_copy
            && let Some(Value::String(text)) = annotations.get("vmoperator.vmware.com/conversion")
        {
            let copy: Value = serde_json::from_str(text).unwrap();
            let mut cleaned = model(&copy, new_identity, true);
            cleaned.as_object_mut().unwrap().remove("status");
            annotations.insert(
                "vmoperator.vmware.com/conversion".into(),
                json!(cleaned.to_string()),
            );
        }
    }
    if let Some(labels) = out
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        labels.remove(PAUSED);
    }
    let non_empty = |v: Option<&Value>| v.and_then(Value::as_str).is_some_and(|s| !s.is_empty());
    if let Some(spec) = out.get_mut("spec").and_then(Value::as_object_mut) {
        let mut doomed = vec!["instanceUUID", "nextRestartTime", "currentSnapshotName"];
        if new_identity {
            doomed.push("biosUUID");
        }
        for key in doomed {
            if non_empty(spec.get(key)) {
                spec.remove(key);
            }
        }
        match spec.get("powerState").and_then(Value::as_str) {
            Some("Suspended") => {
                spec.insert("powerState".into(), json!("PoweredOff"));
            }
            Some("suspended") => {
                spec.insert("powerState".into(), json!("poweredOff"));
            }
            _ => {}
        }
        if new_identity {
            if let Some(cloud_init) = spec
                .get_mut("bootstrap")
                .and_then(|b| b.get_mut("cloudInit"))
                .and_then(Value::as_object_mut)
                && non_empty(cloud_init.get("instanceID"))
            {
                cloud_init.remove("instanceID");
            }
            if let Some(interfaces) = spec
                .get_mut("network")
                .and_then(|n| n.get_mut("interfaces"))
                .and_then(Value::as_array_mut)
            {
                for interface in interfaces.iter_mut().filter_map(Value::as_object_mut) {
                    for key in ["macAddr", "gateway4", "gateway6"] {
                        if non_empty(interface.get(key)) {
                            interface.remove(key);
                        }
                    }
                    if interface
                        .get("addresses")
                        .and_then(Value::as_array)
                        .is_some_and(|a| !a.is_empty())
                    {
                        interface.remove("addresses");
                    }
                }
            }
        }
    }
    out
}

/// Parses the conversion annotation so that key order does not matter.
fn normalized(object: &Value) -> Value {
    let mut out = object.clone();
    if let Some(Value::String(text)) = out
        .pointer("/metadata/annotations/vmoperator.vmware.com~1conversion")
        .cloned()
    {
        out["metadata"]["annotations"]["vmoperator.vmware.com/conversion"] =
            serde_json::from_str(&text).unwrap();
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn patch_removes_exactly_the_documented_fields((object, version) in vm_object(), new_identity in any::<bool>()) {
        let options = CleanupOptions { new_identity, ..Default::default() };
        let kind = Kind::VirtualMachine(ApiVersion(version));
        let plan = vmop::plan(kind, &object, &options).unwrap();
        let patched = patch::apply(&object, &plan.changes).unwrap();
        prop_assert_eq!(normalized(&patched), normalized(&model(&object, new_identity, false)));

        // Idempotent: reviewing the patched object again changes nothing.
        let again = vmop::plan(kind, &patched, &options).unwrap();
        prop_assert!(patch::to_json_patch(&again.changes).0.is_empty());

        // One op per changed location, never two on the same path.
        let ops = patch::to_json_patch(&plan.changes);
        let mut paths: Vec<String> = ops.0.iter().map(|op| op.path().to_string()).collect();
        let total = paths.len();
        paths.sort();
        paths.dedup();
        prop_assert_eq!(paths.len(), total);
    }

    #[test]
    fn arbitrary_json_never_panics(object in hostile_object(), version in 1u8..=6) {
        // Reaches metadata and spec with the field names the rules read, but
        // with any shape and type; a rule either reports the field it cannot
        // read, or plans a patch that applies.
        prop_assert!(object.get("metadata").is_some() && object.get("spec").is_some());
        for kind in [Kind::VirtualMachine(ApiVersion(version)), Kind::VirtualMachineGroup(ApiVersion(version)), Kind::PersistentVolumeClaim] {
            match vmop::plan(kind, &object, &CleanupOptions { new_identity: true, ..Default::default() }) {
                Ok(plan) => {
                    let patched = patch::apply(&object, &plan.changes);
                    prop_assert!(patched.is_ok(), "{:?}: patch does not apply: {:?}", kind, patched.err());
                }
                Err(err) => prop_assert!(!err.to_string().is_empty()),
            }
        }
    }
}

/// Keys the rules look at, and a few they do not.
const HOSTILE_KEYS: &[&str] = &[
    "metadata",
    "spec",
    "annotations",
    "labels",
    "name",
    "instanceUUID",
    "biosUUID",
    "nextRestartTime",
    "currentSnapshotName",
    "powerState",
    "groupName",
    "bootstrap",
    "cloudInit",
    "instanceID",
    "network",
    "interfaces",
    "macAddr",
    "addresses",
    "gateway4",
    "nextForcePowerStateSyncTime",
    "status",
    "x-unknown",
    "virtualmachine.vmoperator.vmware.com/first-boot-done",
    "vmoperator.vmware.com/paused",
    "vmoperator.vmware.com.protected/apply-power-state-time",
    "volumehealth.storage.kubernetes.io/health",
    "vmoperator.vmware.com/instance-storage-resource",
];

fn hostile_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        leaf(),
        Just(json!("Suspended")),
        Just(json!("suspended")),
        Just(json!("2026-01-01T00:00:00Z")),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(prop::sample::select(HOSTILE_KEYS), inner, 0..6).prop_map(
                |m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            ),
        ]
    })
}

/// An object with `metadata` and `spec` always present, any shape below them,
/// and sometimes a conversion annotation holding another such object as text.
fn hostile_object() -> impl Strategy<Value = Value> {
    (hostile_value(), hostile_value(), hostile_value(), prop::option::of(hostile_value())).prop_map(
        |(mut metadata, spec, extra, copy)| {
            if let (Some(copy), Value::Object(meta)) = (copy, &mut metadata) {
                let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
                if let Value::Object(annotations) = annotations {
                    annotations.insert(
                        "vmoperator.vmware.com/conversion".into(),
                        Value::String(json!({"spec": copy, "status": {"uniqueID": "vm-1"}}).to_string()),
                    );
                }
            }
            json!({"apiVersion": "vmoperator.vmware.com/v1alpha5", "metadata": metadata, "spec": spec, "x-extra": extra})
        },
    )
}
