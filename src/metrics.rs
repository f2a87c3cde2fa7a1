//! Prometheus metrics, served on the plain-HTTP metrics port.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    pub kind: String,
    pub operation: String,
    /// allowed, denied or error.
    pub outcome: String,
    pub patched: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    pub kind: String,
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

pub struct Metrics {
    registry: Registry,
    pub reviews: Family<ReviewLabels, Counter>,
    pub review_seconds: Family<KindLabels, Histogram>,
    pub changes: Family<ChangeLabels, Counter>,
    pub group_wait_seconds: Family<ResultLabels, Histogram>,
    pub group_cache_objects: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub restore_cache_objects: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub tls_reloads: Family<ResultLabels, Counter<u64, AtomicU64>>,
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
            "AdmissionReviews answered, by kind, operation, outcome and whether a patch was sent",
            reviews.clone(),
        );
        let review_seconds = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0, 15.0,
                30.0,
            ])
        });
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
        let group_wait_seconds = Family::<ResultLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0])
        });
        registry.register(
            "group_wait_duration_seconds",
            "Time a VM's review waited for its VirtualMachineGroup, by result (found, missing)",
            group_wait_seconds.clone(),
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
        let tls_reloads = Family::<ResultLabels, Counter<u64, AtomicU64>>::default();
        registry.register(
            "tls_reloads",
            "Certificate reloads, by result (ok, error)",
            tls_reloads.clone(),
        );
        Metrics {
            registry,
            reviews,
            review_seconds,
            changes,
            group_wait_seconds,
            group_cache_objects,
            restore_cache_objects,
            tls_reloads,
        }
    }

    /// Counts a request that could not be reviewed at all (bad body, too
    /// large, too slow, overloaded).
    pub fn count_unreviewable(&self) {
        self.reviews
            .get_or_create(&ReviewLabels {
                kind: "unknown".into(),
                operation: "unknown".into(),
                outcome: "error".into(),
                patched: "false".into(),
            })
            .inc();
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
                kind: "VirtualMachine".into(),
                rule: "vm-instance-uuid".into(),
            })
            .inc();
        let text = metrics.render();
        assert!(text.contains(
            "velero_vm_restore_webhook_changes_total{kind=\"VirtualMachine\",rule=\"vm-instance-uuid\"} 1"
        ), "{text}");
    }
}
