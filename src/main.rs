//! The command line: `serve`, `review` and `rules`.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use tracing::{error, info, warn};

use velero_vm_restore_webhook::deadline::Deadline;
use velero_vm_restore_webhook::facts::{GroupFacts, RestoreFacts, StaticGroups, StaticRestores};
use velero_vm_restore_webhook::groups::GroupCache;
use velero_vm_restore_webhook::metrics::Metrics;
use velero_vm_restore_webhook::restores::{RestoreCache, RestoreInfo};
use velero_vm_restore_webhook::review::{ReviewSettings, Reviewer};
use velero_vm_restore_webhook::settings::{GroupPolicy, LogFormat, RuleArgs, ServeArgs};
use velero_vm_restore_webhook::waits::WaitLimits;
use velero_vm_restore_webhook::{admission, server, telemetry, tls, vmop};

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
    /// Review one AdmissionReview or bare object offline and print the result.
    Review(ReviewArgs),
    /// Print the rules as a Markdown table (the README's table).
    Rules,
}

#[derive(clap::Args)]
struct ReviewArgs {
    /// A VirtualMachineGroup that exists, as NAMESPACE/NAME (repeatable).
    #[arg(long = "group", value_name = "NAMESPACE/NAME")]
    groups: Vec<String>,

    /// Print the patched object instead of the AdmissionReview response.
    #[arg(long)]
    patched: bool,

    /// Review as a copy restored beside the original (as with a namespace
    /// mapping): also clear biosUUID, cloud-init instanceID, MACs, addresses.
    #[arg(long)]
    new_identity: bool,

    #[command(flatten)]
    rules: RuleArgs,

    /// AdmissionReview or object, JSON or YAML-free JSON; `-` for stdin.
    #[arg(default_value = "-")]
    input: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "error",
    };
    telemetry::init(
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
        let (groups, group_runner) = GroupCache::live(client.clone());
        let (restores, restore_runner) = RestoreCache::live(client, &args.velero_namespace);
        tokio::spawn(group_runner);
        tokio::spawn(restore_runner);
        info!("{}", group_policy_summary(settings.group_policy));
        (groups, restores)
    };
    tokio::spawn(
        certificate
            .clone()
            .watch(args.tls_reload_interval, Some(metrics.clone())),
    );
    let reviewer = Arc::new(Reviewer::new(
        groups,
        restores,
        settings,
        Some(metrics.clone()),
    ));
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

/// Wraps a bare object as the CREATE Velero would send, with the restore
/// label added if it lacks one.
fn wrap_object(mut object: Value) -> Result<Value, String> {
    let text = |value: &Value, key: &str, default: &str| {
        value
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    let api_version = text(&object, "apiVersion", "");
    let kind = text(&object, "kind", "");
    if api_version.is_empty() || kind.is_empty() {
        return Err("the object needs apiVersion and kind".into());
    }
    let (group, version) = api_version
        .split_once('/')
        .unwrap_or(("", api_version.as_str()));
    let metadata = object
        .as_object_mut()
        .ok_or("the input must be a JSON object")?
        .entry("metadata")
        .or_insert_with(|| json!({}));
    let metadata = metadata
        .as_object_mut()
        .ok_or("metadata must be an object")?;
    let name = metadata
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let namespace = metadata
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let labels = metadata.entry("labels").or_insert_with(|| json!({}));
    let labels = labels
        .as_object_mut()
        .ok_or("metadata.labels must be an object")?;
    labels
        .entry(vmop::RESTORE_NAME_LABEL)
        .or_insert_with(|| json!("review"));
    let resource = format!("{}s", kind.to_lowercase());
    Ok(json!({
        "apiVersion": admission::REVIEW_API_VERSION,
        "kind": "AdmissionReview",
        "request": {
            "uid": "review",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "name": name,
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "velero-vm-restore-webhook-review"},
            "object": object,
            "dryRun": true
        }
    }))
}

async fn review(args: ReviewArgs) -> ExitCode {
    let fail = |message: String| {
        eprintln!("velero-vm-restore-webhook review: {message}");
        ExitCode::from(2)
    };
    let mut text = String::new();
    let read = if args.input.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text)
    } else {
        std::fs::read_to_string(&args.input).map(|read| {
            text = read;
            text.len()
        })
    };
    if let Err(err) = read {
        return fail(format!("cannot read {}: {err}", args.input.display()));
    }
    let input: Value = match serde_json::from_str(&text) {
        Ok(value) => value,
        Err(err) => return fail(format!("input is not JSON: {err}")),
    };
    let (body, original) = if input.get("kind").and_then(Value::as_str) == Some("AdmissionReview") {
        let original = input
            .pointer("/request/object")
            .cloned()
            .unwrap_or(Value::Null);
        (input, original)
    } else {
        let original = input.clone();
        match wrap_object(input) {
            Ok(body) => (body, original),
            Err(err) => return fail(err),
        }
    };
    let mut settings = match review_settings(&args.rules) {
        Ok(settings) => settings,
        Err(err) => return fail(err),
    };
    // Offline there is nobody to create a group meanwhile: never wait.
    settings.group_wait_timeout = Duration::ZERO;
    let groups = match parse_groups(&args.groups) {
        Ok(groups) => groups,
        Err(err) => return fail(err),
    };
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
    let reviewer = Reviewer::new(
        StaticGroups::new(groups),
        StaticRestores::found(restore),
        settings,
        None,
    );
    let bytes = match serde_json::to_vec(&body) {
        Ok(bytes) => bytes,
        Err(err) => return fail(err.to_string()),
    };
    let reviewed = match reviewer
        .review(&bytes, Deadline::after(Duration::from_secs(10)))
        .await
    {
        Ok(reviewed) => reviewed,
        Err(err) => return fail(err.to_string()),
    };
    let Some(response) = &reviewed.review.response else {
        return fail("no response".into());
    };
    for warning in response.warnings.iter().flatten() {
        eprintln!("Warning: {warning}");
    }
    if !args.patched {
        return match serde_json::to_string_pretty(&reviewed.review) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(err) => fail(err.to_string()),
        };
    }
    if !response.allowed {
        eprintln!("Denied: {}", response.result.message);
        return ExitCode::SUCCESS;
    }
    // The patch never touches the restore label, so it applies to the input
    // as given (without the label `review` adds to a bare object).
    let mut object = original;
    if let Some(patch_bytes) = &response.patch {
        let parsed: json_patch::Patch = match serde_json::from_slice(patch_bytes) {
            Ok(parsed) => parsed,
            Err(err) => return fail(format!("patch is not a JSON Patch: {err}")),
        };
        if let Err(err) = json_patch::patch(&mut object, &parsed) {
            return fail(format!("patch does not apply: {err}"));
        }
    }
    match serde_json::to_string_pretty(&object) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(err) => fail(err.to_string()),
    }
}
