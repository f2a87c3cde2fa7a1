//! Says when a watched cache cannot list its kind for long: a 403 (the
//! ClusterRole lacks the kind), or a CRD whose conversion webhook is
//! broken. The replica stays ready (reviews read that kind live, see
//! [`crate::webhook::review::REFS_READY_GRACE`]); this makes the cause
//! visible where admins look: one warning log line and one Warning Event on
//! the webhook's own Pod per kind, and the `cache_ready` metric at 0. When
//! the kind lists again, one line says so.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Event as CoreEvent;
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio::time::Instant;
use tracing::{info, warn};

use super::CacheStats;

/// How often the caches are looked at.
const CHECK_EVERY: Duration = Duration::from_secs(15);
/// How long a kind may fail to list before it is reported (its retries back
/// off to 30 s, so a passing fault is over by then).
pub const REPORT_AFTER: Duration = Duration::from_secs(60);
/// The Event's reason.
pub const REASON: &str = "KindNotListable";

/// The webhook's own Pod, where the Event goes: its name is the hostname,
/// its namespace `VMRW_POD_NAMESPACE` (the chart sets it from the downward
/// API). Without them, only the log line is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl PodRef {
    pub fn from_env() -> Option<PodRef> {
        let namespace = std::env::var("VMRW_POD_NAMESPACE").ok()?;
        let name = std::env::var("HOSTNAME").ok()?;
        (!namespace.is_empty() && !name.is_empty()).then_some(PodRef { namespace, name })
    }
}

/// Which kinds fail to list, since when, and which were reported (pure).
#[derive(Debug, Default)]
pub struct Unlistable {
    failing_since: BTreeMap<&'static str, Instant>,
    reported: BTreeSet<&'static str>,
}

/// What changed at one look.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Failing for [`REPORT_AFTER`] now, not reported before: (kind, errors).
    pub newly_unlistable: Vec<(&'static str, u64)>,
    /// Reported before, listed now.
    pub listing_again: Vec<&'static str>,
}

impl Unlistable {
    pub fn look(&mut self, caches: &[CacheStats], now: Instant) -> Changes {
        let mut changes = Changes::default();
        for cache in caches {
            if !cache.ready && cache.errors > 0 {
                let since = *self.failing_since.entry(cache.resource).or_insert(now);
                if now.saturating_duration_since(since) >= REPORT_AFTER
                    && self.reported.insert(cache.resource)
                {
                    changes
                        .newly_unlistable
                        .push((cache.resource, cache.errors));
                }
            } else {
                self.failing_since.remove(cache.resource);
                if self.reported.remove(cache.resource) {
                    changes.listing_again.push(cache.resource);
                }
            }
        }
        changes
    }
}

/// The message of the log line and the Event.
pub fn message(resource: &str, errors: u64) -> String {
    format!(
        "cannot list {resource} ({errors} failed lists or watches so far): VMs that name one are checked by a live read \
         each, and this replica stays ready. Grant the webhook's ClusterRole list and watch on it, or fix the kind's \
         CRD (its conversion webhook), see the webhook's log for the error"
    )
}

/// Looks at the caches every [`CHECK_EVERY`], for ever.
pub async fn report_unlistable(
    client: Client,
    caches: impl Fn() -> Vec<CacheStats> + Send + 'static,
    pod: Option<PodRef>,
) {
    let mut unlistable = Unlistable::default();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tick.tick().await;
        let changes = unlistable.look(&caches(), Instant::now());
        for resource in changes.listing_again {
            info!(
                resource,
                "the kind lists again; reviews read it from the cache"
            );
        }
        for (resource, errors) in changes.newly_unlistable {
            let message = message(resource, errors);
            warn!(resource, errors, "{message}");
            if let Some(pod) = &pod
                && let Err(err) = create_event(&client, pod, &message).await
            {
                warn!(resource, error = %err, "could not write the Event on the webhook's Pod");
            }
        }
    }
}

async fn create_event(client: &Client, pod: &PodRef, message: &str) -> Result<(), kube::Error> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let event: CoreEvent = serde_json::from_value(json!({
        "metadata": {"generateName": format!("{}.vmrw-", pod.name), "namespace": pod.namespace},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": pod.namespace, "name": pod.name},
        "reason": REASON,
        "message": message,
        "type": "Warning",
        "count": 1,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "source": {"component": env!("CARGO_PKG_NAME")},
        "reportingComponent": env!("CARGO_PKG_NAME"),
        "reportingInstance": pod.name,
    }))
    .map_err(kube::Error::SerdeError)?;
    Api::<CoreEvent>::namespaced(client.clone(), &pod.namespace)
        .create(&PostParams::default(), &event)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(resource: &'static str, ready: bool, errors: u64) -> CacheStats {
        CacheStats {
            resource,
            objects: 0,
            ready,
            live_reads: 0,
            errors,
            confirmations: 0,
        }
    }

    #[test]
    fn a_kind_failing_for_a_minute_is_reported_once_and_its_recovery_said() {
        let start = Instant::now();
        let mut unlistable = Unlistable::default();
        let failing = [cache("zones", false, 3), cache("images", true, 1)];
        assert_eq!(unlistable.look(&failing, start), Changes::default());
        assert_eq!(
            unlistable.look(&failing, start + REPORT_AFTER - Duration::from_secs(1)),
            Changes::default(),
            "a passing fault is not reported"
        );
        assert_eq!(
            unlistable
                .look(&failing, start + REPORT_AFTER)
                .newly_unlistable,
            vec![("zones", 3)]
        );
        assert_eq!(
            unlistable.look(&failing, start + REPORT_AFTER * 2),
            Changes::default(),
            "once"
        );
        let listed = [cache("zones", true, 3)];
        assert_eq!(
            unlistable
                .look(&listed, start + REPORT_AFTER * 3)
                .listing_again,
            vec!["zones"]
        );
        // Not yet listed once, but never failed either (discovery pending):
        // nothing to say.
        let pending = [cache("zones", false, 0)];
        assert_eq!(
            unlistable.look(&pending, start + REPORT_AFTER * 9),
            Changes::default()
        );
    }

    #[test]
    fn the_message_names_the_kind_and_the_fix() {
        let text = message("zones.topology.tanzu.vmware.com", 7);
        assert!(text.contains("zones.topology.tanzu.vmware.com"));
        assert!(text.contains("list and watch"));
        assert!(text.contains("stays ready"));
    }
}
