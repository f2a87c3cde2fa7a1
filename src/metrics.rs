//! Prometheus metrics, served on the plain-HTTP metrics port.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::fmt::Write as _;

/// A label value written from a fixed set: no free-form strings in labels.
macro_rules! label_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            pub fn as_str(&self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    };
}

label_enum! {
    /// How a request ended.
    Outcome {
        Allowed => "allowed",
        Denied => "denied",
        /// Answered (denied) because the request's deadline came first.
        Deadline => "deadline",
        /// The body was not a usable AdmissionReview (400).
        BadRequest => "bad_request",
        /// The body exceeded --max-body-bytes (413).
        TooLarge => "too_large",
        /// No review slot was free before the deadline (503).
        Overloaded => "overloaded",
    }
}

label_enum! {
    KindLabel {
        VirtualMachine => "VirtualMachine",
        VirtualMachineGroup => "VirtualMachineGroup",
        PersistentVolumeClaim => "PersistentVolumeClaim",
        VirtualMachineSnapshot => "VirtualMachineSnapshot",
        VirtualMachinePublishRequest => "VirtualMachinePublishRequest",
        VirtualMachineGroupPublishRequest => "VirtualMachineGroupPublishRequest",
        VirtualMachineWebConsoleRequest => "VirtualMachineWebConsoleRequest",
        CnsRegisterVolume => "CnsRegisterVolume",
        /// Out of scope, or not parsed far enough to know.
        Other => "other",
    }
}

label_enum! {
    OperationLabel {
        Create => "CREATE",
        Update => "UPDATE",
        Delete => "DELETE",
        Connect => "CONNECT",
        Unknown => "unknown",
    }
}

label_enum! {
    WaitResult {
        Found => "found",
        Missing => "missing",
    }
}

label_enum! {
    ReloadResult {
        Ok => "ok",
        Error => "error",
    }
}

label_enum! {
    /// What the restore companion did.
    CompanionAction {
        /// Set a held group's power state back (boot order).
        Started => "started",
        /// Removed missing members from a group's boot order.
        Pruned => "pruned",
        /// Removed the hold from a group powered by the top of its tree.
        Released => "released",
        /// Wrote a Restore's report Events.
        Reported => "reported",
        /// A step failed (an API error); it is tried again.
        Error => "error",
    }
}

label_enum! {
    /// A listening port.
    PortLabel {
        Https => "https",
        Metrics => "metrics",
    }
}

label_enum! {
    /// Why a connection was refused or closed early.
    ConnectionRefusal {
        /// Its source address already had its share of open connections:
        /// answered 503.
        PerSource => "per_source",
        /// The same, while the port was already answering as many refusals
        /// as it does at once: closed without an answer.
        PerSourceUnanswered => "per_source_unanswered",
        /// The TLS handshake failed or took too long.
        Handshake => "handshake",
        /// A request's head did not arrive in time.
        SlowHead => "slow_head",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub port: PortLabel,
    pub reason: ConnectionRefusal,
}

label_enum! {
    /// Which part of the binary sent an API request.
    Component {
        /// The webhook's caches and lookups (reviews, readiness).
        Webhook => "webhook",
        /// The restore companion.
        Companion => "companion",
        /// The `plan` command.
        Plan => "plan",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiRequestLabels {
    pub component: Component,
    /// `plural.group`, from a fixed set (`other` for anything else).
    pub resource: &'static str,
    /// get, list, watch, create, patch, update, delete.
    pub verb: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `plural.group` of a cached kind (a fixed set).
    pub resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CompanionLabels {
    pub action: CompanionAction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    pub kind: KindLabel,
    pub operation: OperationLabel,
    pub outcome: Outcome,
    pub patched: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: KindLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    pub kind: KindLabel,
    /// A rule id from the rule table (a fixed set).
    pub rule: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WaitLabels {
    pub result: WaitResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: ReloadResult,
}

/// A watched cache's counters, as it reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounters {
    pub live_reads: u64,
    pub errors: u64,
    pub confirmations: u64,
}

pub struct Metrics {
    registry: Registry,
    pub reviews: Family<ReviewLabels, Counter>,
    pub review_seconds: Family<KindLabels, Histogram>,
    pub changes: Family<ChangeLabels, Counter>,
    pub group_wait_seconds: Family<WaitLabels, Histogram>,
    pub group_waits_in_progress: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub group_cache_objects: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub restore_cache_objects: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub tls_reloads: Family<ReloadLabels, Counter<u64, AtomicU64>>,
    pub companion_actions: Family<CompanionLabels, Counter<u64, AtomicU64>>,
    pub api_requests: Family<ApiRequestLabels, Counter<u64, AtomicU64>>,
    pub cache_objects: Family<CacheLabels, Gauge<i64, std::sync::atomic::AtomicI64>>,
    pub cache_ready: Family<CacheLabels, Gauge<i64, std::sync::atomic::AtomicI64>>,
    pub cache_live_reads: Family<CacheLabels, Counter<u64, AtomicU64>>,
    pub cache_errors: Family<CacheLabels, Counter<u64, AtomicU64>>,
    pub cache_confirmations: Family<CacheLabels, Counter<u64, AtomicU64>>,
    api_requests_sent: AtomicU64,
    pub connections_refused: Family<ConnectionLabels, Counter<u64, AtomicU64>>,
    pub log_lines_dropped: Counter<u64, AtomicU64>,
    pub velero_unrecognised: Counter<u64, AtomicU64>,
    pub certificate_not_after: Gauge<i64, std::sync::atomic::AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("velero_vm_restore_webhook");
        let reviews = Family::<ReviewLabels, Counter>::default();
        registry.register(
            "reviews",
            "AdmissionReviews answered, by kind, operation, outcome (allowed, denied, deadline, bad_request, too_large, overloaded) and whether a patch was sent",
            reviews.clone(),
        );
        // The denials of the three kinds Velero restores are served at 0 from
        // the start: Prometheus's increase() misses the first denial of a
        // series that appears with it.
        for kind in [
            KindLabel::VirtualMachine,
            KindLabel::VirtualMachineGroup,
            KindLabel::PersistentVolumeClaim,
        ] {
            for outcome in [Outcome::Denied, Outcome::Deadline] {
                let _ = reviews.get_or_create(&ReviewLabels {
                    kind,
                    operation: OperationLabel::Create,
                    outcome,
                    patched: false,
                });
            }
        }
        let review_seconds = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0, 15.0,
                30.0,
            ])
        });
        for kind in [
            KindLabel::VirtualMachine,
            KindLabel::VirtualMachineGroup,
            KindLabel::PersistentVolumeClaim,
        ] {
            let _ = review_seconds.get_or_create(&KindLabels { kind });
        }
        registry.register(
            "review_duration_seconds",
            "Time from reading a review to answering it, group waits included",
            review_seconds.clone(),
        );
        let changes = Family::<ChangeLabels, Counter>::default();
        registry.register(
            "changes",
            "Fields removed or replaced in restored objects, by kind and rule (dry runs included)",
            changes.clone(),
        );
        let group_wait_seconds = Family::<WaitLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0])
        });
        registry.register(
            "group_wait_duration_seconds",
            "Time a VM's review waited for its VirtualMachineGroup, by result (found, missing)",
            group_wait_seconds.clone(),
        );
        let group_waits_in_progress = Gauge::default();
        registry.register(
            "group_waits_in_progress",
            "VMs waiting for their VirtualMachineGroup now",
            group_waits_in_progress.clone(),
        );
        let group_cache_objects = Gauge::default();
        registry.register(
            "group_cache_objects",
            "VirtualMachineGroups in the cache",
            group_cache_objects.clone(),
        );
        let restore_cache_objects = Gauge::default();
        registry.register(
            "restore_cache_objects",
            "Velero Restores in the cache",
            restore_cache_objects.clone(),
        );
        let tls_reloads = Family::<ReloadLabels, Counter<u64, AtomicU64>>::default();
        // Served at 0 from the start, so an alert on errors has a series.
        for result in [ReloadResult::Ok, ReloadResult::Error] {
            let _ = tls_reloads.get_or_create(&ReloadLabels { result });
        }
        registry.register(
            "tls_reloads",
            "Certificate reloads, by result (ok, error)",
            tls_reloads.clone(),
        );
        let companion_actions = Family::<CompanionLabels, Counter<u64, AtomicU64>>::default();
        registry.register(
            "companion_actions",
            "What the restore companion did after Restores finished, by action (started, pruned, released, reported, error)",
            companion_actions.clone(),
        );
        let api_requests = Family::<ApiRequestLabels, Counter<u64, AtomicU64>>::default();
        registry.register(
            "api_requests",
            "Requests this process sent to the Kubernetes API server, by component (webhook, companion, plan), resource and verb (watch includes each reconnect)",
            api_requests.clone(),
        );
        let cache_objects =
            Family::<CacheLabels, Gauge<i64, std::sync::atomic::AtomicI64>>::default();
        registry.register(
            "cache_objects",
            "Objects in each watched cache of what VMs refer to (classes, images, storage, networks, zones)",
            cache_objects.clone(),
        );
        let cache_ready =
            Family::<CacheLabels, Gauge<i64, std::sync::atomic::AtomicI64>>::default();
        registry.register(
            "cache_ready",
            "1 when a watched cache has listed once or its kind is not served (0: reviews read the kind live; readiness does not wait for it)",
            cache_ready.clone(),
        );
        let cache_live_reads = Family::<CacheLabels, Counter<u64, AtomicU64>>::default();
        registry.register(
            "cache_live_reads",
            "Reads a review answered with a live list because its cache's watch had broken (one per namespace and 5 s at most)",
            cache_live_reads.clone(),
        );
        let cache_errors = Family::<CacheLabels, Counter<u64, AtomicU64>>::default();
        registry.register(
            "cache_watch_errors",
            "Lists and watches of a cache that failed (each is retried with a backoff)",
            cache_errors.clone(),
        );
        let cache_confirmations = Family::<CacheLabels, Counter<u64, AtomicU64>>::default();
        registry.register(
            "cache_confirmations",
            "Live lists of one namespace made to confirm a miss before a VM is denied or a reference stripped (a watch can lag a create made a moment before)",
            cache_confirmations.clone(),
        );
        let connections_refused = Family::<ConnectionLabels, Counter<u64, AtomicU64>>::default();
        registry.register(
            "connections_refused",
            "Connections refused or closed early, by port (https, metrics) and reason (per_source: its address had its share open, answered 503; per_source_unanswered: the same, closed unanswered while the port answered as many refusals as it does at once; handshake; slow_head)",
            connections_refused.clone(),
        );
        let log_lines_dropped = Counter::<u64, AtomicU64>::default();
        registry.register(
            "log_lines_dropped",
            "Log lines (a review's lines count once) dropped because stderr could not keep up; the warnings in the responses still say what changed",
            log_lines_dropped.clone(),
        );
        let velero_unrecognised = Counter::<u64, AtomicU64>::default();
        registry.register(
            "velero_identity_unrecognised",
            "Labelled creates from a user the webhook does not take for Velero (--velero-user, --velero-group): if Velero runs as that user, its status writes and updates skip the webhook",
            velero_unrecognised.clone(),
        );
        let certificate_not_after = Gauge::default();
        registry.register(
            "serving_certificate_expiry_timestamp_seconds",
            "When the serving certificate loaded now ends, in Unix seconds (alert before it does)",
            certificate_not_after.clone(),
        );
        Metrics {
            certificate_not_after,
            log_lines_dropped,
            velero_unrecognised,
            connections_refused,
            api_requests_sent: AtomicU64::new(0),
            api_requests,
            cache_objects,
            cache_ready,
            cache_live_reads,
            cache_errors,
            cache_confirmations,
            companion_actions,
            registry,
            reviews,
            review_seconds,
            changes,
            group_wait_seconds,
            group_waits_in_progress,
            group_cache_objects,
            restore_cache_objects,
            tls_reloads,
        }
    }

    /// Counts a request that could not be reviewed at all (bad body, too
    /// large, too slow, overloaded).
    pub fn count_unreviewable(&self, outcome: Outcome) {
        self.reviews
            .get_or_create(&ReviewLabels {
                kind: KindLabel::Other,
                operation: OperationLabel::Unknown,
                outcome,
                patched: false,
            })
            .inc();
    }

    pub fn companion_action(&self, action: CompanionAction) {
        self.companion_actions
            .get_or_create(&CompanionLabels { action })
            .inc();
    }

    /// Counts one API request.
    pub fn api_request(&self, labels: &ApiRequestLabels) {
        self.api_requests.get_or_create(labels).inc();
        self.api_requests_sent
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn connection_refused(&self, port: PortLabel, reason: ConnectionRefusal) {
        self.connections_refused
            .get_or_create(&ConnectionLabels { port, reason })
            .inc();
    }

    /// Every API request counted so far.
    pub fn api_requests_sent(&self) -> u64 {
        self.api_requests_sent
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets a cache's figures, at scrape time: its objects, whether it is
    /// ready, and its live reads, errors and confirmations so far.
    pub fn set_cache(
        &self,
        resource: &'static str,
        objects: usize,
        ready: bool,
        counters: CacheCounters,
    ) {
        use std::sync::atomic::Ordering;
        let labels = CacheLabels { resource };
        self.cache_objects
            .get_or_create(&labels)
            .set(objects as i64);
        self.cache_ready
            .get_or_create(&labels)
            .set(i64::from(ready));
        for (family, value) in [
            (&self.cache_live_reads, counters.live_reads),
            (&self.cache_errors, counters.errors),
            (&self.cache_confirmations, counters.confirmations),
        ] {
            family
                .get_or_create(&labels)
                .inner()
                .store(value, Ordering::Relaxed);
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let metrics = Metrics::new();
        metrics
            .changes
            .get_or_create(&ChangeLabels {
                kind: KindLabel::VirtualMachine,
                rule: "vm-instance-uuid",
            })
            .inc();
        metrics.count_unreviewable(Outcome::TooLarge);
        let text = metrics.render();
        assert!(text.contains(
            "velero_vm_restore_webhook_reviews_total{kind=\"other\",operation=\"unknown\",outcome=\"too_large\",patched=\"false\"} 1"
        ), "{text}");
        assert!(text.contains(
            "velero_vm_restore_webhook_changes_total{kind=\"VirtualMachine\",rule=\"vm-instance-uuid\"} 1"
        ), "{text}");
    }
}
