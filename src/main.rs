//! The command line: `serve`, `review` and `rules`.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use tracing::{error, info, warn};

use velero_vm_restore_webhook::companion::{Companion, CompanionSettings};
use velero_vm_restore_webhook::deadline::Deadline;
use velero_vm_restore_webhook::facts::{
    GroupFacts, RefFacts, RestoreFacts, StaticGroups, StaticRefs, StaticRestores,
};
use velero_vm_restore_webhook::groups::GroupCache;
use velero_vm_restore_webhook::metrics::Metrics;
use velero_vm_restore_webhook::refs::LiveRefs;
use velero_vm_restore_webhook::restores::{RestoreCache, RestoreInfo};
use velero_vm_restore_webhook::review::{ReviewSettings, Reviewed, Reviewer};
use velero_vm_restore_webhook::settings::{GroupPolicy, LogFormat, RuleArgs, ServeArgs};
use velero_vm_restore_webhook::vmop::RefKind;
use velero_vm_restore_webhook::waits::WaitLimits;
use velero_vm_restore_webhook::{offline, server, telemetry, tls, vmop};

/// mimalloc rather than glibc's allocator: a review allocates and frees many
/// small strings and maps, and glibc's malloc and free were about a third of
/// a review in the profile; with mimalloc a review takes about 30 % less (the
/// README's "Performance" section has the figures). Built with `no_thp`: with
/// transparent huge pages its arenas doubled the idle RSS.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Cleans VM Operator objects restored by Velero, and admits VMs only after their group"
)]
struct Cli {
    /// Log filter: a level (info, debug) or EnvFilter directives. RUST_LOG
    /// wins. Default: info for `serve`, error for `review`.
    #[arg(long, global = true, env = "VMRW_LOG_LEVEL")]
    log_level: Option<String>,

    /// Log format.
    #[arg(long, global = true, env = "VMRW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve AdmissionReviews over HTTPS at POST /mutate.
    Serve(Box<ServeArgs>),
    /// Review objects offline (JSON, YAML, Lists, AdmissionReviews, or a Velero
    /// backup tarball) and print what a restore through the webhook would do.
    Review(ReviewArgs),
    /// Print the rules as a Markdown table (the README's table).
    Rules,
    /// Check an installed webhook (what `helm test` runs): a server-side
    /// dry-run create of a labelled VM must come back cleaned.
    Selftest(SelftestArgs),
    /// What a Velero Restore did to VM Operator objects, read from the
    /// cluster: objects cleaned per kind and rule, groups started in boot
    /// order, members pruned, VMs still waiting for a group.
    Report(ReportArgs),
}

#[derive(clap::Args)]
struct ReportArgs {
    /// The Velero Restore's name.
    restore: String,
    /// Velero's namespace.
    #[arg(
        short = 'n',
        long = "namespace",
        env = "VMRW_VELERO_NAMESPACE",
        default_value = "velero"
    )]
    velero_namespace: String,
    /// `table` or `json`.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = ReportOutput::Table)]
    output: ReportOutput,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ReportOutput {
    Table,
    Json,
}

#[derive(clap::Args)]
struct SelftestArgs {
    /// Namespace the dry-run VM is created in (nothing is stored).
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Name of the dry-run VM.
    #[arg(long, default_value = "velero-vm-restore-webhook-selftest")]
    name: String,
}

/// Exit codes: 0 reviewed (denials included, unless --fail-on-deny);
/// 1 an object was denied and --fail-on-deny was given; 2 unusable input.
#[derive(clap::Args)]
struct ReviewArgs {
    /// A VirtualMachineGroup that exists, as NAMESPACE/NAME (repeatable). The
    /// groups of a backup tarball count as existing.
    #[arg(long = "group", value_name = "NAMESPACE/NAME")]
    groups: Vec<String>,

    /// An object a VM may refer to that exists in the target, as
    /// zone/NAMESPACE/NAME, classinstance/NAMESPACE/NAME, image/NAMESPACE/NAME
    /// or clusterimage/NAME (repeatable). References not given count as
    /// missing and are removed, as they would be in a cluster without them.
    #[arg(long = "exists", value_name = "KIND/[NAMESPACE/]NAME")]
    exists: Vec<String>,

    /// Same as `-o json` (kept for scripts).
    #[arg(long, hide = true)]
    patched: bool,

    /// Review as a copy restored beside the original (as with a namespace
    /// mapping): also clear biosUUID, cloud-init instanceID, MACs, addresses.
    #[arg(long)]
    new_identity: bool,

    /// What to print on stdout; a summary of each object goes to stderr.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Response)]
    output: Output,

    /// Exit 1 when any object would be denied.
    #[arg(long)]
    fail_on_deny: bool,

    #[command(flatten)]
    rules: RuleArgs,

    /// JSON or YAML: an object, a List (`kubectl get ... -o yaml`), several
    /// documents, or an AdmissionReview; or a Velero backup tarball
    /// (`velero backup download`). `-` reads stdin.
    #[arg(default_value = "-")]
    input: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "error",
    };
    // Flushes the last log lines when main returns.
    let _log_writer = telemetry::init(
        cli.log_level.as_deref().unwrap_or(default_level),
        cli.log_format,
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(*args)),
        Command::Review(args) => runtime.block_on(review(args)),
        Command::Rules => {
            print!("{}", rules_table());
            ExitCode::SUCCESS
        }
        Command::Report(args) => runtime.block_on(report(args)),
        Command::Selftest(args) => runtime.block_on(async {
            match velero_vm_restore_webhook::selftest::run(&args.namespace, &args.name).await {
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
        }),
    }
}

async fn report(args: ReportArgs) -> ExitCode {
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(err) => {
            eprintln!(
                "velero-vm-restore-webhook report: cannot build a Kubernetes client from KUBECONFIG or ~/.kube/config: {err}"
            );
            return ExitCode::FAILURE;
        }
    };
    match velero_vm_restore_webhook::companion::report(
        &client,
        &args.velero_namespace,
        &args.restore,
    )
    .await
    {
        Ok(report) => {
            match args.output {
                ReportOutput::Table => print!("{}", report.to_table()),
                ReportOutput::Json => match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(err) => {
                        eprintln!("velero-vm-restore-webhook report: {err}");
                        return ExitCode::FAILURE;
                    }
                },
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("velero-vm-restore-webhook report: {err}");
            ExitCode::FAILURE
        }
    }
}

fn rules_table() -> String {
    let mut out = String::from("| rule id | object | change | why |\n|---|---|---|---|\n");
    for doc in vmop::rule_docs() {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            doc.id, doc.kind, doc.what, doc.why
        ));
    }
    out
}

fn review_settings(rules: &RuleArgs) -> Result<ReviewSettings, String> {
    Ok(ReviewSettings {
        group_policy: rules.group_policy,
        group_wait_timeout: rules.group_wait_timeout,
        timeout_margin: rules.timeout_margin,
        restore_unreadable: rules.restore_unreadable,
        disabled_rules: Arc::new(rules.disabled_rule_set()?),
        power_policy: rules.power_policy,
        wait_limits: WaitLimits::default(),
    })
}

/// `NAMESPACE/NAME` arguments of `--group`.
fn parse_groups(groups: &[String]) -> Result<Vec<(&str, &str)>, String> {
    groups
        .iter()
        .map(|group| match group.split_once('/') {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => {
                Ok((namespace, name))
            }
            _ => Err(format!("--group {group:?} must be NAMESPACE/NAME")),
        })
        .collect()
}

/// `--exists` arguments.
fn parse_exists(values: &[String]) -> Result<Vec<(RefKind, String, String)>, String> {
    values
        .iter()
        .map(|value| {
            let parts: Vec<&str> = value.split('/').collect();
            let kind = match parts.first().copied() {
                Some("zone") => RefKind::Zone,
                Some("classinstance") => RefKind::ClassInstance,
                Some("image") => RefKind::Image,
                Some("clusterimage") => RefKind::ClusterImage,
                _ => return Err(format!("--exists {value:?}: the kind must be zone, classinstance, image or clusterimage")),
            };
            match (kind, parts.as_slice()) {
                (RefKind::ClusterImage, [_, name]) if !name.is_empty() => Ok((kind, String::new(), name.to_string())),
                (RefKind::ClusterImage, _) => Err(format!("--exists {value:?} must be clusterimage/NAME")),
                (_, [_, namespace, name]) if !namespace.is_empty() && !name.is_empty() => {
                    Ok((kind, namespace.to_string(), name.to_string()))
                }
                _ => Err(format!("--exists {value:?} must be KIND/NAMESPACE/NAME")),
            }
        })
        .collect()
}

/// What a VM naming a missing group gets, for the startup log.
fn group_policy_summary(policy: GroupPolicy) -> &'static str {
    match policy {
        GroupPolicy::WaitThenDeny => "VMs naming a missing group wait for it, then are denied",
        GroupPolicy::Deny => "VMs naming a missing group are denied",
        GroupPolicy::AllowWithWarning => "VMs naming a missing group are admitted with a warning",
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
                }
            }
            Err(err) => {
                warn!(error = %err, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let mut settings = match review_settings(&args.rules) {
        Ok(settings) => settings,
        Err(err) => {
            error!("{err}");
            return ExitCode::from(2);
        }
    };
    // Waiting VMs hold review slots: keep at least half of the slots for
    // reviews that need no wait.
    let max_waits = (args.max_group_waits as usize).min(args.max_concurrent_reviews as usize / 2);
    if max_waits < args.max_group_waits as usize {
        warn!(
            max_group_waits = max_waits,
            "--max-group-waits lowered to half of --max-concurrent-reviews, so waits never hold every review slot"
        );
    }
    settings.wait_limits = WaitLimits {
        max_total: max_waits,
        max_per_namespace: args.max_group_waits_per_namespace as usize,
        miss_memory: args.group_miss_memory,
    };
    if settings.group_wait_timeout + settings.timeout_margin > Duration::from_secs(30) {
        warn!(
            group_wait_timeout = ?settings.group_wait_timeout,
            "the group wait plus margin exceeds 30s, the largest webhook timeoutSeconds; each wait is cut to the request's deadline anyway"
        );
    }
    let certificate = match tls::ReloadingCert::load(&args.tls_cert_file, &args.tls_key_file) {
        Ok(certificate) => certificate,
        Err(err) => {
            error!(error = %err, "cannot load the serving certificate");
            return ExitCode::FAILURE;
        }
    };
    let metrics = Arc::new(Metrics::new());
    let mut refs: Option<Arc<dyn RefFacts>> = None;
    let (groups, restores): (Arc<dyn GroupFacts>, Arc<dyn RestoreFacts>) = if args.no_kube {
        let listed = match parse_groups(&args.groups) {
            Ok(listed) => listed,
            Err(err) => {
                error!("{err}");
                return ExitCode::from(2);
            }
        };
        warn!(
            groups = ?args.groups,
            "--no-kube: only the groups given with --group exist and no Velero Restore is found; {}",
            group_policy_summary(settings.group_policy)
        );
        (
            StaticGroups::new(listed),
            StaticRestores::new(&args.velero_namespace, Default::default()),
        )
    } else {
        let client = match kube::Client::try_default().await {
            Ok(client) => client,
            Err(err) => {
                error!(
                    error = %err,
                    "cannot build a Kubernetes client from the in-cluster config or KUBECONFIG (~/.kube/config). \
                     To try the webhook without a cluster, run `serve --no-kube --group NAMESPACE/NAME ...`"
                );
                return ExitCode::FAILURE;
            }
        };
        refs = Some(Arc::new(LiveRefs::new(client.clone())));
        let (groups, group_runner) = GroupCache::live(client.clone());
        let (restores, restore_runner) = RestoreCache::live(client.clone(), &args.velero_namespace);
        tokio::spawn(group_runner);
        tokio::spawn(restore_runner);
        if args.companion.disabled {
            warn!(
                "--no-companion: held groups are not started, missing members are not pruned, and no report Events are written"
            );
        } else {
            let companion = Companion::new(
                client,
                CompanionSettings {
                    velero_namespace: args.velero_namespace.clone(),
                    prune_default: args.companion.prune_missing_members,
                    max_age: args.companion.max_age,
                    retry: args.companion.retry,
                    instance: std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".into()),
                },
                Some(metrics.clone()),
            );
            info!(
                prune_missing_members = args.companion.prune_missing_members,
                power_policy = settings.power_policy.as_str(),
                "restore companion on: acts on each Velero Restore once it has finished"
            );
            tokio::spawn(companion.run());
        }
        info!("{}", group_policy_summary(settings.group_policy));
        (groups, restores)
    };
    tokio::spawn(
        certificate
            .clone()
            .watch(args.tls_reload_interval, Some(metrics.clone())),
    );
    let mut reviewer = Reviewer::new(groups, restores, settings, Some(metrics.clone()));
    if let Some(refs) = refs {
        reviewer = reviewer.with_refs(refs);
    }
    let reviewer = Arc::new(reviewer);
    let bound = match server::bind(args.listen, args.metrics_listen).await {
        Ok(bound) => bound,
        Err(err) => {
            error!(error = %err, listen = %args.listen, metrics_listen = %args.metrics_listen, "cannot bind");
            return ExitCode::FAILURE;
        }
    };
    let limits = server::Limits::from(&args);
    match bound
        .run(reviewer, metrics, certificate, limits, shutdown_signal())
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!(error = %err, "server failed");
            ExitCode::FAILURE
        }
    }
}

/// A review as the server answers it: the patch in base64, as the admission
/// API documents it.
fn review_for_people(
    review: &kube::core::admission::AdmissionReview<kube::core::DynamicObject>,
) -> Value {
    serde_json::to_value(velero_vm_restore_webhook::admission::WireReview(review))
        .unwrap_or(Value::Null)
}

/// The label of an object for the summary, from the review request.
fn request_label(review: &Value) -> String {
    let request = &review["request"];
    let kind = request
        .pointer("/kind/kind")
        .and_then(Value::as_str)
        .unwrap_or("object");
    let name = request
        .pointer("/object/metadata/name")
        .or_else(|| request.get("name"))
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())
        .unwrap_or("(unnamed)");
    match request.get("namespace").and_then(Value::as_str) {
        Some(namespace) if !namespace.is_empty() => format!("{kind} {namespace}/{name}"),
        _ => format!("{kind} {name}"),
    }
}

/// One reviewed item, for the outputs and the summary.
struct ReviewedItem {
    label: String,
    kind: String,
    namespace: String,
    response: Value,
    patch: Option<Value>,
    patched: Option<Value>,
    reviewed: Reviewed,
}

impl ReviewedItem {
    fn summary(&self) -> String {
        let reviewed = &self.reviewed;
        let verdict = &reviewed.verdict;
        let mut out = String::new();
        if let Some(denial) = &verdict.denial {
            out.push_str(&format!("{}: DENIED: {denial}\n", self.label));
        } else if let Some(because) = reviewed.unchanged_because {
            out.push_str(&format!("{}: unchanged: {because}\n", self.label));
        } else if verdict.changes.is_empty() {
            out.push_str(&format!("{}: unchanged: nothing to clean\n", self.label));
        } else {
            let count = verdict.changes.len();
            out.push_str(&format!(
                "{}: {count} change{}\n",
                self.label,
                if count == 1 { "" } else { "s" }
            ));
            for change in &verdict.changes {
                out.push_str(&format!("  {}\n", change.describe()));
            }
        }
        for note in &verdict.notes {
            out.push_str(&format!("  warning: {note}\n"));
        }
        out
    }
}

/// What `review` prints on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    /// The AdmissionReview response, with the patch as base64 (as the API server gets it).
    Response,
    /// The objects as they would be created, as JSON (a List for several); denied ones are left out.
    Json,
    /// The same as YAML.
    Yaml,
    /// The decoded JSON Patch of each object.
    Patch,
    /// The summary only, on stdout.
    Summary,
}

fn read_input(input: &std::path::Path) -> Result<(Vec<u8>, String), String> {
    if input.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|err| format!("cannot read stdin: {err}"))?;
        Ok((bytes, "stdin".into()))
    } else {
        std::fs::read(input)
            .map(|bytes| (bytes, input.display().to_string()))
            .map_err(|err| format!("cannot read {}: {err}", input.display()))
    }
}

/// What `review` was given.
struct ReviewInput {
    items: Vec<offline::Item>,
    /// For a backup tarball, the groups it holds (a restore creates them
    /// before the VMs), as (namespace, name).
    backup_groups: Vec<(String, String)>,
    from_backup: bool,
}

fn review_items(bytes: &[u8], source: &str) -> Result<ReviewInput, String> {
    if offline::is_gzip(bytes) {
        let objects = offline::backup_objects(bytes).map_err(|err| err.to_string())?;
        let groups = objects
            .iter()
            .filter(|(_, object)| object["kind"] == "VirtualMachineGroup")
            .filter_map(|(_, object)| {
                Some((
                    object.pointer("/metadata/namespace")?.as_str()?.to_string(),
                    object.pointer("/metadata/name")?.as_str()?.to_string(),
                ))
            })
            .collect();
        let mut items = Vec::new();
        for (path, object) in objects {
            items.extend(
                offline::items(vec![object], &format!("{source}:{path}"))
                    .map_err(|err| err.to_string())?,
            );
        }
        return Ok(ReviewInput {
            items,
            backup_groups: groups,
            from_backup: true,
        });
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| format!("{source} is neither text nor a gzip tarball"))?;
    let documents = offline::parse_documents(text).map_err(|err| err.to_string())?;
    let items = offline::items(documents, source).map_err(|err| err.to_string())?;
    Ok(ReviewInput {
        items,
        backup_groups: Vec::new(),
        from_backup: false,
    })
}

/// Counts per namespace and kind for a backup: (objects, changed, denied).
fn backup_summary(items: &[ReviewedItem]) -> String {
    let mut by_namespace: std::collections::BTreeMap<
        &str,
        std::collections::BTreeMap<&str, (usize, usize, usize)>,
    > = Default::default();
    for item in items {
        let counts = by_namespace
            .entry(item.namespace.as_str())
            .or_default()
            .entry(item.kind.as_str())
            .or_default();
        counts.0 += 1;
        if item.reviewed.verdict.denial.is_some() {
            counts.2 += 1;
        } else if !item.reviewed.verdict.changes.is_empty() {
            counts.1 += 1;
        }
    }
    let mut out = format!(
        "What a restore of this backup would change ({} objects in {} namespaces):\n",
        items.len(),
        by_namespace.len()
    );
    for (namespace, kinds) in &by_namespace {
        let parts: Vec<String> = kinds
            .iter()
            .map(|(kind, (total, changed, denied))| {
                format!("{kind}: {total} ({changed} changed, {denied} denied)")
            })
            .collect();
        out.push_str(&format!("  namespace {namespace}: {}\n", parts.join(", ")));
    }
    let denied: Vec<&ReviewedItem> = items
        .iter()
        .filter(|item| item.reviewed.verdict.denial.is_some())
        .collect();
    if !denied.is_empty() {
        out.push_str("Denied (would not be restored):\n");
        for item in denied {
            out.push_str(&format!(
                "  {}: {}\n",
                item.label,
                item.reviewed.verdict.denial.as_deref().unwrap_or("")
            ));
        }
    }
    out
}

async fn review(args: ReviewArgs) -> ExitCode {
    let fail = |message: String| {
        eprintln!("velero-vm-restore-webhook review: {message}");
        ExitCode::from(2)
    };
    let output = if args.patched {
        Output::Json
    } else {
        args.output
    };
    let (bytes, source) = match read_input(&args.input) {
        Ok(read) => read,
        Err(err) => return fail(err),
    };
    let ReviewInput {
        mut items,
        backup_groups,
        from_backup,
    } = match review_items(&bytes, &source) {
        Ok(found) => found,
        Err(err) => return fail(err),
    };
    // A backup is restored groups first, so that VMs see whether their
    // group's power is held.
    if from_backup {
        items.sort_by_key(|item| {
            item.review
                .pointer("/request/kind/kind")
                .and_then(Value::as_str)
                != Some("VirtualMachineGroup")
        });
    }
    let mut settings = match review_settings(&args.rules) {
        Ok(settings) => settings,
        Err(err) => return fail(err),
    };
    // Offline there is nobody to create a group meanwhile: never wait.
    settings.group_wait_timeout = Duration::ZERO;
    let mut groups = match parse_groups(&args.groups) {
        Ok(groups) => groups,
        Err(err) => return fail(err),
    };
    groups.extend(
        backup_groups
            .iter()
            .map(|(namespace, name)| (namespace.as_str(), name.as_str())),
    );
    let restore = RestoreInfo {
        name: "review".into(),
        annotations: if args.new_identity {
            [(
                velero_vm_restore_webhook::restores::NEW_IDENTITY_ANNOTATION.to_string(),
                "true".to_string(),
            )]
            .into()
        } else {
            Default::default()
        },
        ..Default::default()
    };
    let exists = match parse_exists(&args.exists) {
        Ok(exists) => exists,
        Err(err) => return fail(err),
    };
    let static_groups = StaticGroups::new(groups);
    let reviewer = Reviewer::new(
        static_groups.clone(),
        StaticRestores::found(restore),
        settings,
        None,
    )
    .with_refs(StaticRefs::new(exists));

    let mut reviewed_items = Vec::new();
    for item in items {
        let body = match serde_json::to_vec(&item.review) {
            Ok(body) => body,
            Err(err) => return fail(err.to_string()),
        };
        let reviewed = match reviewer
            .review(&body, Deadline::after(Duration::from_secs(10)))
            .await
        {
            Ok(reviewed) => reviewed,
            Err(err) => return fail(format!("{}: {err}", item.source)),
        };
        let Some(response) = reviewed.review.response.as_ref() else {
            return fail(format!("{}: no response", item.source));
        };
        let patch: Option<json_patch::Patch> = match &response.patch {
            Some(bytes) => match serde_json::from_slice(bytes) {
                Ok(patch) => Some(patch),
                Err(err) => {
                    return fail(format!(
                        "{}: the patch is not a JSON Patch: {err}",
                        item.source
                    ));
                }
            },
            None => None,
        };
        // The patch never touches the restore label, so it applies to the
        // object as given (without the label `review` adds to a bare object).
        let patched = if response.allowed && !item.original.is_null() {
            let mut object = item.original.clone();
            if let Some(patch) = &patch
                && let Err(err) = json_patch::patch(&mut object, patch)
            {
                return fail(format!("{}: the patch does not apply: {err}", item.source));
            }
            Some(object)
        } else {
            None
        };
        // A backup's group as it would be created: its VMs read its annotations.
        if from_backup
            && let Some(group) = &patched
            && group["kind"] == "VirtualMachineGroup"
            && let (Some(namespace), Some(name)) = (
                group.pointer("/metadata/namespace").and_then(Value::as_str),
                group.pointer("/metadata/name").and_then(Value::as_str),
            )
        {
            let annotations = group
                .pointer("/metadata/annotations")
                .and_then(Value::as_object)
                .map(|map| {
                    map.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            static_groups.insert_annotated(namespace, name, annotations);
        }
        reviewed_items.push(ReviewedItem {
            label: reviewed
                .object_label
                .clone()
                .unwrap_or_else(|| request_label(&item.review)),
            kind: item
                .review
                .pointer("/request/kind/kind")
                .and_then(Value::as_str)
                .unwrap_or("object")
                .to_string(),
            namespace: item
                .review
                .pointer("/request/namespace")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            response: review_for_people(&reviewed.review),
            patch: patch.map(|patch| serde_json::to_value(patch).unwrap_or(Value::Null)),
            patched,
            reviewed,
        });
    }

    let mut summary: String = reviewed_items.iter().map(ReviewedItem::summary).collect();
    if from_backup {
        summary.push_str(&backup_summary(&reviewed_items));
    }
    let single = reviewed_items.len() == 1;
    // One object prints as itself; anything else (several, or none, as for a
    // DELETE) as a List that kubectl reads back.
    let many = |values: Vec<Value>| -> Value {
        if single && values.len() == 1 {
            values.into_iter().next().unwrap_or(Value::Null)
        } else {
            json!({"apiVersion": "v1", "kind": "List", "items": values})
        }
    };
    let printed = match output {
        Output::Summary => {
            print!("{summary}");
            None
        }
        Output::Response => Some(many(
            reviewed_items
                .iter()
                .map(|item| item.response.clone())
                .collect(),
        )),
        Output::Patch => Some(if single {
            reviewed_items[0].patch.clone().unwrap_or(json!([]))
        } else {
            Value::Array(
                reviewed_items
                    .iter()
                    .map(|item| json!({"object": item.label, "patch": item.patch.clone().unwrap_or(json!([]))}))
                    .collect(),
            )
        }),
        Output::Json | Output::Yaml => Some(many(
            reviewed_items
                .iter()
                .filter_map(|item| item.patched.clone())
                .collect(),
        )),
    };
    if output != Output::Summary {
        eprint!("{summary}");
    }
    if let Some(value) = printed {
        let text = if output == Output::Yaml {
            serde_yaml_ng::to_string(&value).map_err(|err| err.to_string())
        } else {
            serde_json::to_string_pretty(&value)
                .map(|text| text + "\n")
                .map_err(|err| err.to_string())
        };
        match text {
            Ok(text) => print!("{text}"),
            Err(err) => return fail(err),
        }
    }
    let denied = reviewed_items
        .iter()
        .any(|item| item.reviewed.verdict.denial.is_some());
    if denied && args.fail_on_deny {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
