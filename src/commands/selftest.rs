//! `selftest`, what `helm test` runs in the webhook's own image: a
//! server-side dry-run create of a labelled VirtualMachine, checked for the
//! webhook's cleanup, and Velero's identity (its Deployment's
//! ServiceAccount) checked against the webhook's update entry. Nothing is
//! stored.

use std::process::ExitCode;

use kube::Client;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::{Value, json};

use crate::vmop;

#[derive(clap::Args)]
pub struct SelftestArgs {
    /// Namespace the dry-run VM is created in (nothing is stored).
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Name of the dry-run VM.
    #[arg(long, default_value = "velero-vm-restore-webhook-selftest")]
    name: String,
    /// Velero's namespace, where its Deployment `velero` says which
    /// ServiceAccount Velero runs as.
    #[arg(long, env = "VMRW_VELERO_NAMESPACE", default_value = "velero")]
    velero_namespace: String,
}

/// Prints each check that passed, or `FAIL:` and the reason (exit 1).
pub async fn run(args: SelftestArgs) -> ExitCode {
    match check(&args.namespace, &args.name, &args.velero_namespace).await {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            println!("FAIL: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Why the self-test failed; each message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    #[error("cannot reach the API server: {0}")]
    Client(String),
    #[error("the VirtualMachine API (vmoperator.vmware.com) is not served: {0}")]
    NoVmApi(String),
    #[error("the dry-run create was refused: {0}")]
    Refused(String),
    #[error(
        "the webhook did not clean the VM: {0}; check that the MutatingWebhookConfiguration exists and the pods are ready"
    )]
    NotCleaned(String),
    #[error("{0}")]
    VeleroNotSent(String),
}

const TEST_UUID: &str = "4210a6a4-0000-0000-0000-000000000001";

/// Runs the check in `namespace`; returns the lines to print on success.
pub async fn check(
    namespace: &str,
    name: &str,
    velero_namespace: &str,
) -> Result<Vec<String>, SelfTestError> {
    let client = Client::try_default()
        .await
        .map_err(|err| SelfTestError::Client(err.to_string()))?;
    let group = kube::discovery::group(&client, vmop::GROUP)
        .await
        .map_err(|err| SelfTestError::NoVmApi(err.to_string()))?;
    let (resource, _) = group
        .recommended_kind("VirtualMachine")
        .ok_or_else(|| SelfTestError::NoVmApi("no VirtualMachine kind".into()))?;
    let vm: DynamicObject = serde_json::from_value(json!({
        "apiVersion": resource.api_version,
        "kind": "VirtualMachine",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {vmop::RESTORE_NAME_LABEL: "helm-test"},
            "annotations": {vmop::vm::FIRST_BOOT_DONE: "true"}
        },
        "spec": {"className": "best-effort-small", "imageName": "vmi-helm-test", "instanceUUID": TEST_UUID}
    }))
    .map_err(|err| SelfTestError::Refused(err.to_string()))?;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let created = api
        .create(&params, &vm)
        .await
        .map_err(|err| SelfTestError::Refused(err.to_string()))?;
    let created = serde_json::to_value(created).unwrap_or(Value::Null);
    if created
        .pointer("/spec/instanceUUID")
        .and_then(Value::as_str)
        == Some(TEST_UUID)
    {
        return Err(SelfTestError::NotCleaned(
            "spec.instanceUUID was kept".into(),
        ));
    }
    if created
        .pointer("/metadata/annotations")
        .and_then(|annotations| annotations.get(vmop::vm::FIRST_BOOT_DONE))
        .is_some()
    {
        return Err(SelfTestError::NotCleaned(format!(
            "annotation {} was kept",
            vmop::vm::FIRST_BOOT_DONE
        )));
    }
    let mut lines = vec![format!(
        "PASS: a dry-run create of VirtualMachine {namespace}/{name} ({}) labelled velero.io/restore-name lost spec.instanceUUID and {}",
        resource.api_version,
        vmop::vm::FIRST_BOOT_DONE
    )];
    // Velero's status writes and updates reach the webhook only from the
    // identity its update entry names: a Velero running as another account
    // would have its restored status keep the original's uniqueID.
    let velero = super::velero_check::check(&client, velero_namespace).await;
    if velero.misses_webhook {
        let problem = velero
            .lines
            .iter()
            .find(|line| line.starts_with("WARNING:"))
            .cloned()
            .unwrap_or_default();
        return Err(SelfTestError::VeleroNotSent(
            problem.trim_start_matches("WARNING: ").to_string(),
        ));
    }
    lines.extend(velero.lines.into_iter().map(|line| format!("NOTE: {line}")));
    Ok(lines)
}
