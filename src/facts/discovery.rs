//! Which of the kinds the caches watch the cluster serves, and at which
//! version: learned from discovery once, and again whenever a
//! CustomResourceDefinition is added or removed (a metadata-only watch of
//! CRDs), with a slow periodic re-check in case that watch is not allowed.
//! A kind that is not served (NSX SubnetSets on a VDS Supervisor) is never
//! asked for per review: its cache answers "not served" from memory.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::core::{ApiResource, GroupVersionKind};
use tokio::sync::watch;
use tracing::{info, warn};

use super::watched::{Served, Watched};

/// Discovery is repeated this often even without a CRD change.
const RECHECK: Duration = Duration::from_secs(600);
/// After a CRD change, wait this long for more before asking again.
const SETTLE: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_secs(5);

/// Kinds served by every Kubernetes API server, never discovered.
fn built_in(group: &str, kind: &str) -> Option<ApiResource> {
    let (version, plural) = match (group, kind) {
        ("", "ResourceQuota") => ("v1", "resourcequotas"),
        ("", "ConfigMap") => ("v1", "configmaps"),
        ("storage.k8s.io", "StorageClass") => ("v1", "storageclasses"),
        ("apiextensions.k8s.io", "CustomResourceDefinition") => ("v1", "customresourcedefinitions"),
        _ => return None,
    };
    Some(ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, kind),
        plural,
    ))
}

/// The served state of each kind asked for, published to the caches.
pub struct Discovery {
    kinds: BTreeMap<(&'static str, &'static str), watch::Sender<Served>>,
}

impl Default for Discovery {
    fn default() -> Self {
        Self::new()
    }
}

impl Discovery {
    pub fn new() -> Discovery {
        Discovery {
            kinds: BTreeMap::new(),
        }
    }

    /// The served state of `group`/`kind`, as it changes.
    pub fn subscribe(
        &mut self,
        group: &'static str,
        kind: &'static str,
    ) -> watch::Receiver<Served> {
        self.kinds
            .entry((group, kind))
            .or_insert_with(|| {
                watch::channel(match built_in(group, kind) {
                    Some(resource) => Served::Yes(resource),
                    None => Served::Unknown,
                })
                .0
            })
            .subscribe()
    }

    /// One round of discovery; publishes what changed. `Err` when discovery
    /// itself failed (nothing is published then).
    pub async fn discover(&self, client: &Client) -> Result<(), kube::Error> {
        let groups: BTreeSet<&str> = self
            .kinds
            .keys()
            .filter(|(group, kind)| built_in(group, kind).is_none())
            .map(|(group, _)| *group)
            .collect();
        if groups.is_empty() {
            return Ok(());
        }
        let groups: Vec<&str> = groups.into_iter().collect();
        // Aggregated discovery is one request for every group (Kubernetes
        // 1.26+); older API servers answer one request per group.
        let discovered = match kube::discovery::Discovery::new(client.clone())
            .filter(&groups)
            .run_aggregated()
            .await
        {
            Ok(discovered) => discovered,
            Err(_) => {
                kube::discovery::Discovery::new(client.clone())
                    .filter(&groups)
                    .run()
                    .await?
            }
        };
        for ((group, kind), sender) in &self.kinds {
            if built_in(group, kind).is_some() {
                continue;
            }
            let now = match discovered
                .get(group)
                .and_then(|api_group| api_group.recommended_kind(kind))
            {
                Some((resource, _)) => Served::Yes(resource),
                None => Served::No,
            };
            sender.send_if_modified(|served| {
                if *served == now {
                    return false;
                }
                match &now {
                    Served::Yes(resource) => {
                        info!(group, kind, version = %resource.version, "served")
                    }
                    Served::No => info!(group, kind, "not served by this cluster"),
                    Served::Unknown => {}
                }
                *served = now.clone();
                true
            });
        }
        Ok(())
    }

    /// Discovers now, then again on every change `crds` reports (after it
    /// settles) and every ten minutes. Retries a failed round every few
    /// seconds; until one succeeds, the kinds stay unknown and the caches
    /// not ready.
    pub async fn run(self, client: Client, crds: Option<Arc<Watched<()>>>) {
        let mut changes = crds.as_ref().map(|crds| crds.subscribe());
        loop {
            match self.discover(&client).await {
                Ok(()) => {}
                Err(err) => {
                    warn!(error = %err, "API discovery failed; retrying");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            }
            match &mut changes {
                Some(changes) => {
                    changes.borrow_and_update();
                    tokio::select! {
                        changed = changes.changed() => {
                            if changed.is_err() {
                                tokio::time::sleep(RECHECK).await;
                            } else {
                                tokio::time::sleep(SETTLE).await;
                            }
                        }
                        _ = tokio::time::sleep(RECHECK) => {}
                    }
                }
                None => tokio::time::sleep(RECHECK).await,
            }
        }
    }
}
