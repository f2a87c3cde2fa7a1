//! Every rule at every API version, on the realistic fixtures in `examples/`.

mod common;

use std::collections::BTreeSet;

use serde_json::{Value, json};

use common::example;
use velero_vm_restore_webhook::patch::{self, Edit};
use velero_vm_restore_webhook::vmop::{self, ApiVersion, CleanupOptions, Kind};

fn plan_for(object: &Value, new_identity: bool) -> vmop::Plan {
    let version = ApiVersion::from_api_version(object["apiVersion"].as_str().unwrap()).unwrap();
    let kind = match object["kind"].as_str().unwrap() {
        "VirtualMachine" => Kind::VirtualMachine(version),
        "VirtualMachineGroup" => Kind::VirtualMachineGroup(version),
        other => panic!("unexpected kind {other}"),
    };
    vmop::plan(
        kind,
        object,
        &CleanupOptions {
            new_identity,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Pointers of the ops that reach the patch (not the report-only ones).
fn patch_paths(plan: &vmop::Plan) -> BTreeSet<String> {
    plan.changes
        .iter()
        .filter(|c| !c.in_conversion_copy)
        .map(|c| c.pointer().to_string())
        .collect()
}

fn copy_paths(plan: &vmop::Plan) -> BTreeSet<String> {
    plan.changes
        .iter()
        .filter(|c| c.in_conversion_copy)
        .map(|c| c.pointer().to_string())
        .collect()
}

const COMMON_ANNOTATIONS: &[&str] = &[
    "/metadata/annotations/virtualmachine.vmoperator.vmware.com~1first-boot-done",
    "/metadata/annotations/vmoperator.vmware.com~1bootstrap-hash-configspec",
    "/metadata/annotations/vmoperator.vmware.com~1backup-version",
    "/metadata/annotations/vsphere-cluster-module-group-uuid",
    "/metadata/annotations/vmoperator.vmware.com~1upgraded-to-build-version",
    "/metadata/annotations/vmoperator.vmware.com~1upgraded-to-schema-version",
    "/metadata/annotations/vmoperator.vmware.com.protected~1apply-power-state-time",
];
const CONVERSION: &str = "/metadata/annotations/vmoperator.vmware.com~1conversion";

fn expected(version: u8) -> BTreeSet<String> {
    let mut paths: BTreeSet<String> = COMMON_ANNOTATIONS.iter().map(|p| p.to_string()).collect();
    if version < 6 {
        paths.insert(CONVERSION.into());
    }
    match version {
        1 => {
            paths.insert("/spec/powerState".into());
        }
        2 => {}
        3 => {
            paths.insert("/spec/instanceUUID".into());
            paths.insert("/spec/nextRestartTime".into());
        }
        4 => {
            paths.insert("/spec/instanceUUID".into());
            paths.insert("/spec/powerState".into());
        }
        5 => {
            paths.insert("/spec/instanceUUID".into());
            paths.insert("/spec/currentSnapshotName".into());
            paths.insert("/metadata/labels/vmoperator.vmware.com~1paused".into());
        }
        6 => {
            paths.insert("/spec/instanceUUID".into());
            paths.insert("/spec/currentSnapshotName".into());
        }
        _ => unreachable!(),
    }
    paths
}

#[test]
fn every_version_gets_exactly_the_documented_changes() {
    for version in 1..=6u8 {
        let object = example(&format!("vm-v1alpha{version}.json"));
        let plan = plan_for(&object, false);
        assert_eq!(patch_paths(&plan), expected(version), "v1alpha{version}");
        assert_eq!(
            plan.group_name.as_deref(),
            Some("web-tier"),
            "v1alpha{version} group name"
        );
        if version < 6 {
            // The hub copy loses its identity, snapshot, controller state and status.
            assert_eq!(
                copy_paths(&plan),
                [
                    "/metadata/annotations/vmoperator.vmware.com~1backup-version",
                    "/spec/instanceUUID",
                    "/spec/currentSnapshotName",
                    "/status",
                ]
                .iter()
                .map(|p| p.to_string())
                .collect(),
                "v1alpha{version} conversion copy"
            );
        }
    }
}

#[test]
fn suspended_becomes_powered_off_in_each_spelling() {
    for (version, expected_value) in [(1u8, "poweredOff"), (4, "PoweredOff")] {
        let object = example(&format!("vm-v1alpha{version}.json"));
        let plan = plan_for(&object, false);
        let change = plan
            .changes
            .iter()
            .find(|c| c.pointer().as_str() == "/spec/powerState")
            .unwrap();
        assert_eq!(
            change.edit,
            Edit::Replace(json!(expected_value)),
            "v1alpha{version}"
        );
    }
}

#[test]
fn copies_also_lose_guest_identity() {
    for version in 3..=6u8 {
        let object = example(&format!("vm-v1alpha{version}.json"));
        let plan = plan_for(&object, true);
        let paths = patch_paths(&plan);
        for path in [
            "/spec/biosUUID",
            "/spec/bootstrap/cloudInit/instanceID",
            "/spec/network/interfaces/0/macAddr",
            "/spec/network/interfaces/0/addresses",
            "/spec/network/interfaces/0/gateway4",
        ] {
            assert!(paths.contains(path), "v1alpha{version} copy misses {path}");
        }
        if version < 6 {
            let copy = copy_paths(&plan);
            assert!(
                copy.contains("/spec/biosUUID"),
                "v1alpha{version} copy in annotation"
            );
            assert!(copy.contains("/spec/network/interfaces/0/macAddr"));
        }
    }
    // v1alpha2 has interfaces but no biosUUID.
    let plan = plan_for(&example("vm-v1alpha2.json"), true);
    assert!(patch_paths(&plan).contains("/spec/network/interfaces/0/macAddr"));
    assert!(!patch_paths(&plan).contains("/spec/biosUUID"));
}

#[test]
fn patched_fixtures_are_idempotent_and_keep_everything_else() {
    for version in 1..=6u8 {
        for new_identity in [false, true] {
            let object = example(&format!("vm-v1alpha{version}.json"));
            let plan = plan_for(&object, new_identity);
            let patched = patch::apply(&object, &plan.changes).unwrap();
            let again = plan_for(&patched, new_identity);
            assert!(
                patch::to_json_patch(&again.changes).0.is_empty(),
                "v1alpha{version}: second review still changes {:?}",
                again
                    .changes
                    .iter()
                    .map(|c| c.describe())
                    .collect::<Vec<_>>()
            );
            // Untouched neighbours.
            assert_eq!(patched["metadata"]["annotations"]["owner"], "team-web");
            assert_eq!(
                patched["metadata"]["finalizers"],
                object["metadata"]["finalizers"]
            );
            assert_eq!(patched["spec"]["className"], object["spec"]["className"]);
            assert_eq!(patched["spec"]["volumes"], object["spec"]["volumes"]);
        }
    }
}

#[test]
fn group_fixture() {
    let object = example("vmgroup-v1alpha5.json");
    let plan = plan_for(&object, false);
    assert_eq!(
        patch_paths(&plan),
        [
            "/metadata/annotations/vmoperator.vmware.com.protected~1apply-power-state-time",
            "/metadata/annotations/vmoperator.vmware.com.protected~1last-updated-power-state-time",
            "/spec/nextForcePowerStateSyncTime",
            // A child group's power comes from the top of its tree.
            "/spec/powerState",
        ]
        .iter()
        .map(|p| p.to_string())
        .collect()
    );
    assert_eq!(plan.group_name.as_deref(), Some("app"));
}

#[test]
fn pvc_fixtures() {
    let pvc = example("pvc.json");
    let plan = vmop::plan(
        Kind::PersistentVolumeClaim,
        &pvc,
        &CleanupOptions::default(),
    )
    .unwrap();
    let paths: BTreeSet<String> = plan.pointers().into_iter().collect();
    assert_eq!(
        paths,
        [
            "/metadata/annotations/volumehealth.storage.kubernetes.io~1health",
            "/metadata/annotations/volumehealth.storage.kubernetes.io~1health-timestamp",
            "/metadata/annotations/cns.vmware.com~1usedby-vm-4210a6a4",
        ]
        .iter()
        .map(|p| p.to_string())
        .collect()
    );
    let instance = example("pvc-instance-storage.json");
    let plan = vmop::plan(
        Kind::PersistentVolumeClaim,
        &instance,
        &CleanupOptions::default(),
    )
    .unwrap();
    assert!(plan.denial.is_some());
    assert!(plan.changes.is_empty());
}

/// The rules VM Operator's own webhooks need (issue 11), at every version,
/// on the object and inside the hub copy of its conversion annotation.
#[test]
fn vm_operator_refusals_are_removed_at_every_version() {
    let holds = json!({
        "poweron.check.vmoperator.vmware.com/backup": "hold",
        "delete.check.vmoperator.vmware.com/backup": "hold",
        "mgmt.proxy.vmware.com/allowlist": "10.0.0.0/8",
        "mgmt.proxy.vmware.com/watermark": "7",
        "vmoperator.vmware.com/snapshot-revert-in-progress": "",
        "check.vmoperator.vmware.com/look-alike": "kept",
    });
    let volumes = json!([
        {"name": "data", "persistentVolumeClaim": {"claimName": "web-1-data"}},
        {"name": "is-0", "persistentVolumeClaim": {"claimName": "web-1-is-0",
            "instanceVolumeClaim": {"storageClass": "wcpglobal-storage-profile", "size": "8Gi"}}},
        {"name": "logs", "persistentVolumeClaim": {"claimName": "web-1-logs"}},
        {"name": "is-1", "persistentVolumeClaim": {"claimName": "web-1-is-1",
            "instanceVolumeClaim": {"storageClass": "wcpglobal-storage-profile", "size": "8Gi"}}},
    ]);
    let add = |object: &mut Value| {
        let annotations = object["metadata"]["annotations"].as_object_mut().unwrap();
        for (key, value) in holds.as_object().unwrap() {
            annotations.insert(key.clone(), value.clone());
        }
        object["spec"]["volumes"] = volumes.clone();
    };
    for version in 1..=6u8 {
        let mut object = example(&format!("vm-v1alpha{version}.json"));
        add(&mut object);
        if version < 6 {
            edit_copy(&mut object, |copy| {
                copy["metadata"]
                    .as_object_mut()
                    .unwrap()
                    .entry("annotations")
                    .or_insert(json!({}));
                add(copy);
            });
        }
        let plan = plan_for(&object, false);
        let new_paths: Vec<String> = plan
            .changes
            .iter()
            .filter(|c| !c.in_conversion_copy)
            .map(|c| c.pointer().to_string())
            .filter(|p| {
                p.contains("check.vmoperator")
                    || p.contains("mgmt.proxy")
                    || p.contains("snapshot-revert")
                    || p.starts_with("/spec/volumes")
            })
            .collect();
        let mut sorted_annotations: Vec<&String> = new_paths
            .iter()
            .filter(|p| !p.starts_with("/spec/volumes"))
            .collect();
        sorted_annotations.sort();
        assert_eq!(
            sorted_annotations,
            vec![
                "/metadata/annotations/delete.check.vmoperator.vmware.com~1backup",
                "/metadata/annotations/mgmt.proxy.vmware.com~1allowlist",
                "/metadata/annotations/mgmt.proxy.vmware.com~1watermark",
                "/metadata/annotations/poweron.check.vmoperator.vmware.com~1backup",
                "/metadata/annotations/vmoperator.vmware.com~1snapshot-revert-in-progress",
            ],
            "v1alpha{version}"
        );
        // Highest index first, so each remove still means the entry it names.
        let volume_ops: Vec<&String> = new_paths
            .iter()
            .filter(|p| p.starts_with("/spec/volumes"))
            .collect();
        assert_eq!(
            volume_ops,
            vec!["/spec/volumes/3", "/spec/volumes/1"],
            "v1alpha{version}"
        );

        let patched = patch::apply(&object, &plan.changes).unwrap();
        let names: Vec<&str> = patched["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["data", "logs"], "v1alpha{version}");
        assert_eq!(
            patched["metadata"]["annotations"]["check.vmoperator.vmware.com/look-alike"],
            "kept"
        );
        if version < 6 {
            let copy = conversion_copy(&patched);
            let copy_names: Vec<&str> = copy["spec"]["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v["name"].as_str().unwrap())
                .collect();
            assert_eq!(copy_names, vec!["data", "logs"], "v1alpha{version} copy");
            let copy_annotations = copy["metadata"]["annotations"].as_object().unwrap();
            assert!(
                !copy_annotations
                    .keys()
                    .any(|k| k.contains("check.vmoperator.vmware.com/backup")
                        || k.starts_with("mgmt.proxy")
                        || k.contains("snapshot-revert")),
                "{copy_annotations:?}"
            );
        }
        // A second review changes nothing.
        assert!(
            plan_for(&patched, false).changes.is_empty(),
            "v1alpha{version} not idempotent"
        );
    }
}

/// Cluster-bound references, at every version: removed when the target
/// lacks them (here: every kind missing), on the object and in the hub copy.
#[test]
fn missing_references_are_removed_at_every_version() {
    use velero_vm_restore_webhook::vmop::RefKind;
    let add = |object: &mut Value| {
        object["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .insert("topology.kubernetes.io/zone".into(), json!("zone-a"));
        object["spec"]["class"] = json!({"apiVersion": "vmoperator.vmware.com/v1alpha5",
            "kind": "VirtualMachineClassInstance", "name": "best-effort-small-5f4a"});
        object["spec"]["image"] =
            json!({"kind": "VirtualMachineImage", "name": "vmi-0a0044d7c690bcbea"});
    };
    let all_missing = CleanupOptions {
        missing_refs: [RefKind::Zone, RefKind::ClassInstance, RefKind::Image].into(),
        ..Default::default()
    };
    for version in 1..=6u8 {
        let mut object = example(&format!("vm-v1alpha{version}.json"));
        add(&mut object);
        if version < 6 {
            edit_copy(&mut object, |copy| {
                let meta = copy["metadata"].as_object_mut().unwrap();
                meta.entry("labels").or_insert(json!({}));
                add(copy);
            });
        }
        let refs = vmop::vm::cluster_refs(&object, &Default::default()).unwrap();
        // Zone, class instance and image are removed when missing; the image
        // name, the class, the storage class and the network are checked
        // too, but a missing one denies (decide's tests).
        let kinds: Vec<RefKind> = refs.iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [
                RefKind::Zone,
                RefKind::ClassInstance,
                RefKind::Image,
                RefKind::ImageName,
                RefKind::Class,
                RefKind::StorageClass,
                RefKind::Network
            ],
            "v1alpha{version}: {refs:?}"
        );
        // v1alpha1 names the network only; later versions give its kind where set.
        assert!(
            refs[6].name == "primary" || refs[6].name.ends_with("/primary"),
            "v1alpha{version}: {refs:?}"
        );
        let version_kind = Kind::VirtualMachine(ApiVersion(version));
        let plan = vmop::plan(version_kind, &object, &all_missing).unwrap();
        let patched = patch::apply(&object, &plan.changes).unwrap();
        assert!(
            patched
                .pointer("/metadata/labels/topology.kubernetes.io~1zone")
                .is_none(),
            "v1alpha{version}"
        );
        assert!(
            patched.pointer("/spec/class").is_none() && patched.pointer("/spec/image").is_none(),
            "v1alpha{version}"
        );
        assert_eq!(
            patched["spec"]["imageName"], "vmi-0a0044d7c690bcbea",
            "imageName stays for VM Operator to resolve"
        );
        if version < 6 {
            let copy = conversion_copy(&patched);
            assert!(
                copy.pointer("/spec/class").is_none() && copy.pointer("/spec/image").is_none(),
                "v1alpha{version} copy"
            );
        }
        // Everything present: nothing of these changes.
        let kept = vmop::plan(version_kind, &object, &CleanupOptions::default()).unwrap();
        let kept = patch::apply(&object, &kept.changes).unwrap();
        assert_eq!(kept["spec"]["class"], object["spec"]["class"]);
        assert_eq!(
            kept["metadata"]["labels"]["topology.kubernetes.io/zone"],
            "zone-a"
        );
    }
}

/// The hub copy in an object's conversion annotation.
fn conversion_copy(object: &Value) -> Value {
    serde_json::from_str(
        object["metadata"]["annotations"]["vmoperator.vmware.com/conversion"]
            .as_str()
            .unwrap(),
    )
    .unwrap()
}

/// Edits the hub copy in an object's conversion annotation in place.
fn edit_copy(object: &mut Value, edit: impl FnOnce(&mut Value)) {
    let mut copy = conversion_copy(object);
    edit(&mut copy);
    object["metadata"]["annotations"]["vmoperator.vmware.com/conversion"] = json!(copy.to_string());
}
