//! `plan BACKUP`: what a restore of a Velero backup into this cluster would
//! do, before it runs. It fetches the backup through Velero's DownloadRequest
//! API (as `velero backup download` does), applies the restore's namespace
//! mapping and the mapping ConfigMaps of Velero's namespace, and reviews
//! every object as the webhook would, with the target's groups, zones, class
//! instances and images looked up live. It writes nothing but the
//! DownloadRequest, which it deletes.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, discovery};
use serde_json::{Value, json};

use super::review::{
    ReviewedItem, backup_input, backup_summary, map_namespace, parse_namespace_mappings,
    review_each,
};
use super::review_settings;
use crate::facts::given::{StaticGroups, StaticRestores};
use crate::facts::mapping_cache::{MappingCache, list_configmaps};
use crate::facts::targets::TargetCache;
use crate::facts::{RestoreInfo, TargetFacts};
use crate::metrics::{Component, Metrics};
use crate::settings::RuleArgs;
use crate::vmop;
use crate::webhook::review::Reviewer;

/// How long Velero may take to answer the DownloadRequest.
const DOWNLOAD_WAIT: Duration = Duration::from_secs(60);

/// Exit codes: 0 planned (denials included, unless --fail-on-deny); 1 an
/// object would be denied and --fail-on-deny was given; 2 the plan could not
/// be made (the message says why).
#[derive(clap::Args)]
pub struct PlanArgs {
    /// The Velero Backup to restore.
    backup: String,
    /// Velero's namespace (Backups, DownloadRequests, mapping ConfigMaps).
    #[arg(
        short = 'n',
        long = "namespace",
        env = "VMRW_VELERO_NAMESPACE",
        default_value = "velero"
    )]
    velero_namespace: String,
    /// VM Operator's namespace in the target (its StoragePolicy objects say
    /// which storage classes encrypt).
    #[arg(
        long = "vm-operator-namespace",
        env = "VMRW_VM_OPERATOR_NAMESPACE",
        default_value = "vmware-system-vmop"
    )]
    vm_operator_namespace: String,
    /// As `velero restore create --namespace-mappings`: SRC1:DST1,SRC2:DST2.
    #[arg(long = "namespace-mappings", value_name = "SRC:DST,...")]
    namespace_mappings: Option<String>,
    /// An annotation the Restore will carry, KEY=VALUE (repeatable), e.g.
    /// velero-vm-restore-webhook/mappings=site-b.
    #[arg(long = "restore-annotation", value_name = "KEY=VALUE")]
    restore_annotations: Vec<String>,
    /// `table` (per object and per namespace) or `json`.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = PlanOutput::Table)]
    output: PlanOutput,
    /// As `velero restore create --status-include-resources`: the resources
    /// whose backed-up status the restore will write (plan says what that
    /// would bring, and that the webhook keeps VM Operator's instead).
    #[arg(
        long = "status-include-resources",
        value_delimiter = ',',
        value_name = "RESOURCE,..."
    )]
    status_include_resources: Vec<String>,
    /// The Velero server that will run the restore, MAJOR.MINOR: from 1.16
    /// Velero also writes the status of an object annotated
    /// `velero.io/restore-status: "true"` (and not of one annotated
    /// `"false"`); 1.15 goes by --status-include-resources alone. Default:
    /// read from the image of Velero's Deployment (`velero` in --namespace),
    /// else 1.16.
    #[arg(long = "velero-version", value_name = "MAJOR.MINOR", value_parser = parse_velero_version)]
    velero_version: Option<(u32, u32)>,
    /// Exit 1 when any object would be denied.
    #[arg(long)]
    fail_on_deny: bool,
    /// How long the backup's download may take, end to end (e.g. 10m).
    #[arg(long, env = "VMRW_PLAN_DOWNLOAD_TIMEOUT", value_parser = crate::settings::humantime_duration, default_value = "10m")]
    download_timeout: Duration,
    /// The largest backup tarball downloaded (it is written to a temporary
    /// file, read as a stream, and removed); a larger one stops the plan.
    #[arg(long, env = "VMRW_PLAN_MAX_BACKUP_BYTES", default_value_t = 8 * 1024 * 1024 * 1024)]
    max_backup_bytes: u64,
    #[command(flatten)]
    rules: RuleArgs,
}

/// `1.15`, `1.16.2` or `v1.17.2` as (major, minor).
fn parse_velero_version(given: &str) -> Result<(u32, u32), String> {
    let mut parts = given.trim_start_matches('v').split('.');
    let mut number = |what: &str| -> Result<u32, String> {
        parts
            .next()
            .and_then(|part| part.parse().ok())
            .ok_or_else(|| {
                format!("{given:?} is not a Velero version such as 1.15 or 1.16.2 ({what})")
            })
    };
    Ok((number("major")?, number("minor")?))
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlanOutput {
    Table,
    Json,
}

pub async fn run(args: PlanArgs) -> ExitCode {
    match plan(&args).await {
        Ok(planned) => print(&args, &planned),
        Err(err) => {
            eprintln!("velero-vm-restore-webhook plan: {err}");
            ExitCode::from(2)
        }
    }
}

fn parse_annotations(values: &[String]) -> Result<BTreeMap<String, String>, String> {
    values
        .iter()
        .map(|value| match value.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
            _ => Err(format!("--restore-annotation {value:?} must be KEY=VALUE")),
        })
        .collect()
}

async fn plan(args: &PlanArgs) -> Result<Planned, String> {
    let namespace_mapping = parse_namespace_mappings(args.namespace_mappings.as_deref())?;
    let annotations = parse_annotations(&args.restore_annotations)?;
    let mut settings = review_settings(&args.rules)?;
    // Groups in the backup count as created before the VMs: nothing to wait for.
    settings.group_wait_timeout = Duration::ZERO;
    let metrics = Arc::new(Metrics::new());
    let client = crate::facts::api_requests::client(metrics.clone(), Component::Plan)
        .await
        .map_err(|err| {
            format!("cannot build a Kubernetes client from KUBECONFIG or ~/.kube/config: {err}")
        })?;
    // The Velero that will run the restore: its version, and whether the
    // webhook's update entry sends its writes (its identity).
    let mut velero = super::velero_check::check(&client, &args.velero_namespace).await;
    let velero_version = match (args.velero_version, velero.version) {
        (Some(given), _) => given,
        (None, Some(found)) => found,
        (None, None) => {
            velero.lines.push(
                "Velero's version unknown: status writes predicted as Velero 1.16+ makes them (give --velero-version)"
                    .into(),
            );
            (1, 16)
        }
    };
    let tarball = download(
        &client,
        &args.velero_namespace,
        &args.backup,
        &DownloadLimits {
            timeout: args.download_timeout,
            max_bytes: args.max_backup_bytes,
        },
    )
    .await?;
    let file = std::fs::File::open(tarball.path())
        .map_err(|err| format!("cannot read the downloaded backup: {err}"))?;
    let mut objects = super::input::backup_objects(std::io::BufReader::new(file))
        .map_err(|err| format!("backup {}: {err}", args.backup))?;
    drop(tarball);
    for (_, object) in &mut objects {
        map_namespace(object, &namespace_mapping);
    }
    let input = backup_input(objects, &format!("backup {}", args.backup))?;
    let mut groups: Vec<(String, String)> = input.backup_groups.clone();
    groups.extend(live_groups(&client, &input.backup_groups).await?);
    let static_groups =
        StaticGroups::new(groups.iter().map(|(ns, name)| (ns.as_str(), name.as_str())));
    let maps = list_configmaps(&client, &args.velero_namespace)
        .await
        .map_err(|err| format!("cannot list ConfigMaps in {}: {err}", args.velero_namespace))?;
    // Each kind is listed once per namespace (and cluster-scoped kinds once),
    // however many VMs name it.
    let refs = TargetCache::listing_only(client.clone(), &args.vm_operator_namespace)
        .await
        .map_err(|err| format!("API discovery failed: {err}"))?;
    let restore = RestoreInfo {
        name: format!("plan-of-{}", args.backup),
        namespace_mapping,
        annotations,
        ..Default::default()
    };
    let reviewer = Reviewer::new(
        static_groups.clone(),
        StaticRestores::found(restore),
        settings,
        None,
    )
    .with_refs(refs.clone())
    .with_mappings(MappingCache::given(&args.velero_namespace, maps));
    // What restoring each VM's or group's status would bring, from the
    // backup (Velero writes it after the create; the webhook keeps VM
    // Operator's).
    let status_restore = vmop::writes::StatusRestore {
        include: args.status_include_resources.clone(),
        reads_annotation: velero_version >= (1, 16),
    };
    let status_notes: BTreeMap<String, String> = input
        .items
        .iter()
        .filter_map(|item| {
            let gvk = item.review.pointer("/request/kind")?;
            let kind = vmop::Kind::classify(
                gvk.get("group")?.as_str()?,
                gvk.get("version")?.as_str()?,
                gvk.get("kind")?.as_str()?,
            )?;
            let note = vmop::writes::status_note(kind, &item.original, &status_restore)?;
            let label = format!(
                "{} {}/{}",
                kind.name(),
                item.original.pointer("/metadata/namespace")?.as_str()?,
                item.original.pointer("/metadata/name")?.as_str()?
            );
            Some((label, note))
        })
        .collect();
    let mut items = review_each(&reviewer, input.items, &static_groups, true).await?;
    for item in &mut items {
        if let Some(note) = status_notes.get(&item.label) {
            item.reviewed.verdict.notes.push(note.clone());
        }
    }
    let target_lists = refs
        .stats()
        .iter()
        .map(|cache| cache.live_reads)
        .sum::<u64>();
    Ok(Planned {
        velero: velero.lines,
        items,
        target_lists,
        api_requests: metrics.api_requests_sent(),
    })
}

/// What a plan found, and what it cost the API server.
struct Planned {
    /// What was found of Velero (version, identity), one line each.
    velero: Vec<String>,
    items: Vec<ReviewedItem>,
    /// Lists of what target namespaces have (one per kind and namespace).
    target_lists: u64,
    api_requests: u64,
}

/// The VirtualMachineGroups that exist now in the namespaces the backup's
/// groups go to (a restore skips those, and VMs may name them).
async fn live_groups(
    client: &Client,
    backup_groups: &[(String, String)],
) -> Result<Vec<(String, String)>, String> {
    let Ok(group) = discovery::group(client, vmop::GROUP).await else {
        return Ok(Vec::new());
    };
    let Some((resource, _)) = group.recommended_kind("VirtualMachineGroup") else {
        return Ok(Vec::new());
    };
    let mut namespaces: Vec<&str> = backup_groups.iter().map(|(ns, _)| ns.as_str()).collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    let mut out = Vec::new();
    for namespace in namespaces {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|err| format!("cannot list VirtualMachineGroups in {namespace}: {err}"))?;
        out.extend(
            list.items
                .into_iter()
                .filter_map(|group| Some((namespace.to_string(), group.metadata.name?))),
        );
    }
    Ok(out)
}

fn download_request_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("velero.io", "v1", "DownloadRequest"),
        "downloadrequests",
    )
}

/// Bounds on the backup's download.
struct DownloadLimits {
    timeout: Duration,
    max_bytes: u64,
}

/// A downloaded backup in a temporary file, removed when dropped.
struct Downloaded(std::path::PathBuf);

impl Downloaded {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Downloaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The backup's contents through a DownloadRequest (deleted afterwards),
/// written to a temporary file.
async fn download(
    client: &Client,
    namespace: &str,
    backup: &str,
    limits: &DownloadLimits,
) -> Result<Downloaded, String> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &download_request_resource());
    let suffix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis())
        .unwrap_or_default();
    let prefix: String = backup.chars().take(200).collect();
    let name = format!("{prefix}-vmrw-plan-{suffix}");
    let request: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "velero.io/v1", "kind": "DownloadRequest",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"target": {"kind": "BackupContents", "name": backup}}}))
    .map_err(|err| err.to_string())?;
    api.create(&PostParams::default(), &request)
        .await
        .map_err(|err| {
            format!(
                "cannot create a DownloadRequest in {namespace} (is Velero installed there?): {err}"
            )
        })?;
    let fetched = fetch_when_ready(&api, &name, backup, limits).await;
    if let Err(err) = api.delete(&name, &DeleteParams::default()).await {
        eprintln!(
            "velero-vm-restore-webhook plan: could not delete DownloadRequest {namespace}/{name}: {err}"
        );
    }
    fetched
}

/// Why a download failed, never with its URL: the presigned URL Velero
/// hands out is read access to the whole backup, Secrets included.
fn download_error(backup: &str, err: reqwest::Error) -> String {
    let what = if err.is_timeout() {
        "it did not finish within --download-timeout".to_string()
    } else {
        err.without_url().to_string()
    };
    format!("cannot download backup {backup}: {what}")
}

async fn fetch_when_ready(
    api: &Api<DynamicObject>,
    name: &str,
    backup: &str,
    limits: &DownloadLimits,
) -> Result<Downloaded, String> {
    let started = tokio::time::Instant::now();
    let url = loop {
        let request = api.get(name).await.map_err(|err| err.to_string())?;
        let status = request.data.get("status");
        if let Some(url) = status
            .and_then(|status| status.get("downloadURL"))
            .and_then(Value::as_str)
            .filter(|url| !url.is_empty())
        {
            break url.to_string();
        }
        if started.elapsed() > DOWNLOAD_WAIT {
            return Err(format!(
                "Velero did not answer DownloadRequest {name} within {}s: does Backup {backup} exist, and is Velero running?",
                DOWNLOAD_WAIT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // reqwest is built without a crypto provider; kube's ring is the one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .timeout(limits.timeout)
        .build()
        .map_err(|err| download_error(backup, err))?;
    let mut response = http
        .get(&url)
        .send()
        .await
        .map_err(|err| download_error(backup, err))?;
    if !response.status().is_success() {
        return Err(format!(
            "cannot download backup {backup}: the object store answered {}",
            response.status()
        ));
    }
    let path = std::env::temp_dir().join(format!(
        "vmrw-plan-{}-{}.tar.gz",
        std::process::id(),
        started.elapsed().as_nanos()
    ));
    let downloaded = Downloaded(path);
    let mut file = tokio::fs::File::create(downloaded.path())
        .await
        .map_err(|err| format!("cannot write the backup to a temporary file: {err}"))?;
    let mut written: u64 = 0;
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| download_error(backup, err))?
    {
        written += chunk.len() as u64;
        if written > limits.max_bytes {
            return Err(format!(
                "backup {backup} is larger than --max-backup-bytes ({} bytes)",
                limits.max_bytes
            ));
        }
        tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
            .await
            .map_err(|err| format!("cannot write the backup to a temporary file: {err}"))?;
    }
    tokio::io::AsyncWriteExt::flush(&mut file)
        .await
        .map_err(|err| format!("cannot write the backup to a temporary file: {err}"))?;
    Ok(downloaded)
}

fn fixes_json(fixes: &[crate::webhook::admission::MappingFix]) -> Vec<Value> {
    fixes
        .iter()
        .map(
            |fix| json!({"place": fix.place, "entry": fix.entry(), "old": fix.old, "new": fix.new}),
        )
        .collect()
}

fn print(args: &PlanArgs, planned: &Planned) -> ExitCode {
    let items = &planned.items;
    let denied = items
        .iter()
        .any(|item| item.reviewed.verdict.denial.is_some());
    match args.output {
        PlanOutput::Table => {
            let mut out: String = planned
                .velero
                .iter()
                .map(|line| format!("{line}\n"))
                .collect();
            out.extend(items.iter().map(ReviewedItem::summary));
            out.push_str(&backup_summary(items));
            out.push_str(&format!(
                "Checked against the live target: {} lists (each kind once per namespace), {} API requests in all.\n",
                planned.target_lists, planned.api_requests
            ));
            print!("{out}");
        }
        PlanOutput::Json => {
            let objects: Vec<Value> = items
                .iter()
                .map(|item| {
                    let verdict = &item.reviewed.verdict;
                    let outcome = if verdict.denial.is_some() {
                        "denied"
                    } else if verdict.changes.is_empty() {
                        "unchanged"
                    } else {
                        "changed"
                    };
                    json!({
                        "object": item.label, "kind": item.kind, "namespace": item.namespace,
                        "outcome": outcome, "denial": verdict.denial,
                        "changes": verdict.changes.iter().map(|change| json!({
                            "rule": change.rule, "change": change.describe()})).collect::<Vec<_>>(),
                        "warnings": verdict.notes,
                        "fixes": fixes_json(&verdict.fixes),
                    })
                })
                .collect();
            let mut all_fixes: Vec<_> = items
                .iter()
                .flat_map(|item| item.reviewed.verdict.fixes.iter().cloned())
                .collect();
            all_fixes.sort();
            all_fixes.dedup();
            let text = serde_json::to_string_pretty(&json!({
                "backup": args.backup, "velero": planned.velero, "objects": objects, "fixes": fixes_json(&all_fixes),
                "targetLists": planned.target_lists, "apiRequests": planned.api_requests}))
            .unwrap_or_default();
            println!("{text}");
        }
    }
    if denied && args.fail_on_deny {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn velero_versions_parse_as_major_and_minor() {
        assert_eq!(parse_velero_version("1.15"), Ok((1, 15)));
        assert_eq!(parse_velero_version("1.16.2"), Ok((1, 16)));
        assert_eq!(parse_velero_version("v1.17.2"), Ok((1, 17)));
        assert!(parse_velero_version("1").unwrap_err().contains("minor"));
        assert!(parse_velero_version("latest").is_err());
    }

    #[tokio::test]
    async fn a_failed_download_never_prints_the_presigned_url() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Port 9 (discard) on loopback: nothing listens, the connect fails.
        let url = "http://127.0.0.1:9/velero/backups/nightly.tar.gz?X-Amz-Credential=AKIA&X-Amz-Signature=deadbeef";
        let err = reqwest::Client::new().get(url).send().await.unwrap_err();
        assert!(
            err.to_string().contains("X-Amz-Signature"),
            "reqwest's own message names the URL"
        );
        let message = download_error("nightly", err);
        assert!(
            message.starts_with("cannot download backup nightly: "),
            "{message}"
        );
        for secret in ["X-Amz", "deadbeef", "AKIA", "127.0.0.1:9/velero"] {
            assert!(!message.contains(secret), "{message}");
        }
    }

    #[test]
    fn namespace_mappings_and_annotations_parse_as_velero_takes_them() {
        let mapped = parse_namespace_mappings(Some("prod:prod-b,dev:dev-b")).unwrap();
        assert_eq!(mapped["prod"], "prod-b");
        assert_eq!(mapped.len(), 2);
        assert!(parse_namespace_mappings(Some("prod")).is_err());
        assert!(parse_namespace_mappings(None).unwrap().is_empty());
        let annotations =
            parse_annotations(&["velero-vm-restore-webhook/mappings=site-b".into()]).unwrap();
        assert_eq!(annotations["velero-vm-restore-webhook/mappings"], "site-b");
        assert!(parse_annotations(&["=x".into()]).is_err());
    }
}
