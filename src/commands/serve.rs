//! `serve`: the webhook's HTTPS server, its caches and, unless turned off,
//! the restore companion, wired together from the flags.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use super::{parse_groups, review_settings};
use crate::companion::{Companion, CompanionSettings};
use crate::facts::discovery::Discovery;
use crate::facts::given::{StaticGroups, StaticRestores};
use crate::facts::group_cache::GroupCache;
use crate::facts::mapping_cache::MappingCache;
use crate::facts::restore_cache::RestoreCache;
use crate::facts::targets::TargetCache;
use crate::facts::watched::Watched;
use crate::facts::{GroupFacts, MappingFacts, RestoreFacts, TargetFacts};
use crate::metrics::{Component, Metrics};
use crate::settings::{GroupPolicy, ServeArgs};
use crate::webhook::admission::VeleroIdentity;
use crate::webhook::review::Reviewer;
use crate::webhook::waits::WaitLimits;
use crate::webhook::{server, tls};

pub async fn run(args: ServeArgs) -> ExitCode {
    let mut settings = match review_settings(&args.rules) {
        Ok(settings) => settings,
        Err(err) => {
            error!("{err}");
            return ExitCode::from(2);
        }
    };
    settings.velero = Arc::new(velero_identity(&args));
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
    let metrics = Arc::new(Metrics::new());
    let certificate = match tls::ReloadingCert::load_with_client_ca(
        &args.tls_cert_file,
        &args.tls_key_file,
        args.client_ca_file.as_deref(),
    ) {
        Ok(certificate) => certificate,
        Err(err) => {
            error!(error = %err, "cannot load the serving certificate");
            return ExitCode::FAILURE;
        }
    };
    let mut refs: Option<Arc<dyn TargetFacts>> = None;
    let unrecognised = Arc::new(crate::facts::unrecognised::Unrecognised::default());
    let mut mappings: Option<Arc<dyn MappingFacts>> = None;
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
        let client = match crate::facts::api_requests::client(metrics.clone(), Component::Webhook)
            .await
        {
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
        // What VMs refer to, and the groups they name, are watched: a warm
        // review asks the API server nothing. Discovery says which kinds the
        // cluster serves, again whenever a CRD comes or goes.
        let mut discovery = Discovery::new();
        let (targets, target_runner) =
            TargetCache::live(client.clone(), &args.vm_operator_namespace, &mut discovery);
        tokio::spawn(crate::facts::cache_health::report_unlistable(
            client.clone(),
            {
                let targets = targets.clone();
                move || targets.stats()
            },
            crate::facts::cache_health::PodRef::from_env(),
        ));
        refs = Some(targets);
        let (groups, group_runner) = GroupCache::live(client.clone(), &mut discovery);
        let crds: Arc<Watched<()>> =
            Watched::new("customresourcedefinitions.apiextensions.k8s.io", true, None);
        tokio::spawn(crds.clone().run(
            client.clone(),
            discovery.subscribe("apiextensions.k8s.io", "CustomResourceDefinition"),
        ));
        tokio::spawn(target_runner);
        tokio::spawn(group_runner);
        tokio::spawn(discovery.run(client.clone(), Some(crds)));
        let (mapping_cache, mapping_runner) =
            MappingCache::live(client.clone(), &args.velero_namespace);
        tokio::spawn(mapping_runner);
        mappings = Some(mapping_cache);
        let (restores, restore_runner) = RestoreCache::live(client.clone(), &args.velero_namespace);
        tokio::spawn(restore_runner);
        if args.companion.disabled {
            warn!(
                "--no-companion: held groups are not started, missing members are not pruned, and no report Events are written"
            );
        } else {
            // Its own client, so its requests count apart from the webhook's.
            let companion_client =
                match crate::facts::api_requests::client(metrics.clone(), Component::Companion)
                    .await
                {
                    Ok(client) => client,
                    Err(err) => {
                        error!(error = %err, "cannot build the companion's Kubernetes client");
                        return ExitCode::FAILURE;
                    }
                };
            let companion = Companion::with_mappings(
                companion_client,
                CompanionSettings {
                    velero_namespace: args.velero_namespace.clone(),
                    prune_default: args.companion.prune_missing_members,
                    max_age: args.companion.max_age,
                    retry: args.companion.retry,
                    start_wait: args.companion.start_wait,
                    instance: std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".into()),
                },
                Some(metrics.clone()),
                mappings.clone(),
                Some(unrecognised.clone()),
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
    info!(velero = %settings.velero.describe(), "Velero's identity: its updates are reviewed");
    let mut reviewer = Reviewer::new(groups, restores, settings, Some(metrics.clone()))
        .with_unrecognised(unrecognised);
    if let Some(refs) = refs {
        reviewer = reviewer.with_refs(refs);
    }
    if let Some(mappings) = mappings {
        reviewer = reviewer.with_mappings(mappings);
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

/// Velero's identity from the flags: the users given, and the groups given
/// or else every ServiceAccount of Velero's namespace.
fn velero_identity(args: &ServeArgs) -> VeleroIdentity {
    let given = |names: &[String]| -> Vec<String> {
        names
            .iter()
            .map(|name| name.trim().to_string())
            .filter(|name| !name.is_empty())
            .collect()
    };
    let groups = given(&args.velero_groups);
    VeleroIdentity {
        users: given(&args.velero_users),
        groups: if groups.is_empty() {
            vec![VeleroIdentity::namespace_group(&args.velero_namespace)]
        } else {
            groups
        },
        not_users: given(&args.not_velero_users),
    }
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
