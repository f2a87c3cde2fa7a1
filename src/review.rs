//! One review from body to response: scope, the Restore's choices, the rules,
//! the group wait, logs and metrics. Shared by `serve` and `review`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview, Operation};
use serde_json::Value;
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use crate::admission::{self, ReviewError, Scope, Verdict};
use crate::groups::{GroupCache, GroupPresence};
use crate::metrics::{ChangeLabels, KindLabels, Metrics, ResultLabels, ReviewLabels};
use crate::restores::{RestoreCache, RestoreLookup};
use crate::settings::GroupPolicy;
use crate::vmop::{self, CleanupOptions, Kind};

#[derive(Debug, Clone)]
pub struct ReviewSettings {
    pub group_policy: GroupPolicy,
    pub group_wait_timeout: Duration,
    pub timeout_margin: Duration,
    pub disabled_rules: Arc<BTreeSet<String>>,
}

impl Default for ReviewSettings {
    fn default() -> Self {
        ReviewSettings {
            group_policy: GroupPolicy::WaitThenDeny,
            group_wait_timeout: Duration::from_secs(20),
            timeout_margin: Duration::from_secs(2),
            disabled_rules: Arc::default(),
        }
    }
}

pub struct Reviewer {
    pub groups: Arc<GroupCache>,
    pub restores: Arc<RestoreCache>,
    pub settings: ReviewSettings,
    pub metrics: Option<Arc<Metrics>>,
}

/// What one review produced, for the server's status code and metrics.
pub struct Reviewed {
    pub review: AdmissionReview<DynamicObject>,
    pub outcome: &'static str,
}

fn operation_name(operation: &Operation) -> &'static str {
    match operation {
        Operation::Create => "CREATE",
        Operation::Update => "UPDATE",
        Operation::Delete => "DELETE",
        Operation::Connect => "CONNECT",
    }
}

impl Reviewer {
    /// The group wait allowed for a request whose API server deadline is
    /// `api_timeout` (from `?timeout=`): under both bounds, with the margin.
    pub fn wait_bound(&self, api_timeout: Option<Duration>) -> Duration {
        let configured = self.settings.group_wait_timeout;
        match api_timeout {
            Some(deadline) => configured.min(deadline.saturating_sub(self.settings.timeout_margin)),
            None => configured,
        }
    }

    /// Reviews one request body. `Err` means the body was not a usable
    /// AdmissionReview; the caller answers 400 with [`admission::invalid`].
    pub async fn review(
        &self,
        body: &[u8],
        api_timeout: Option<Duration>,
    ) -> Result<Reviewed, ReviewError> {
        let span = info_span!(
            "review",
            uid = field::Empty,
            kind = field::Empty,
            operation = field::Empty,
            object = field::Empty,
            restore = field::Empty,
            dry_run = field::Empty,
            outcome = field::Empty,
            patched = field::Empty,
        );
        let start = tokio::time::Instant::now();
        let result = self
            .review_in_span(body, api_timeout)
            .instrument(span.clone())
            .await;
        let elapsed = start.elapsed();
        let _entered = span.enter();
        match &result {
            Ok((reviewed, kind, operation, patched)) => {
                span.record("outcome", reviewed.outcome);
                span.record("patched", *patched);
                if let Some(metrics) = &self.metrics {
                    metrics
                        .reviews
                        .get_or_create(&ReviewLabels {
                            kind: kind.to_string(),
                            operation: operation.to_string(),
                            outcome: reviewed.outcome.into(),
                            patched: patched.to_string(),
                        })
                        .inc();
                    metrics
                        .review_seconds
                        .get_or_create(&KindLabels {
                            kind: kind.to_string(),
                        })
                        .observe(elapsed.as_secs_f64());
                }
                debug!(elapsed_ms = elapsed.as_millis() as u64, "review answered");
            }
            Err(err) => {
                warn!(error = %err, "request could not be reviewed");
                if let Some(metrics) = &self.metrics {
                    metrics.count_unreviewable();
                }
            }
        }
        result.map(|(reviewed, ..)| reviewed)
    }

    async fn review_in_span(
        &self,
        body: &[u8],
        api_timeout: Option<Duration>,
    ) -> Result<(Reviewed, &'static str, &'static str, bool), ReviewError> {
        let input = admission::parse_review(body)?;
        let request = &input.request;
        let span = Span::current();
        let operation = operation_name(&request.operation);
        span.record("uid", request.uid.as_str());
        span.record("operation", operation);
        span.record("dry_run", request.dry_run);

        let (kind, restore) = match admission::scope(request, input.object.as_ref()) {
            Scope::Out(reason) => {
                debug!(kind = %request.kind.kind, reason, "allowed unchanged: out of scope");
                let review = admission::respond(request, &Verdict::default()).into_review();
                return Ok((
                    Reviewed {
                        review,
                        outcome: "allowed",
                    },
                    "other",
                    operation,
                    false,
                ));
            }
            Scope::In { kind, restore } => (kind, restore),
        };
        let object = input.object.as_ref().unwrap_or(&Value::Null);
        let object_label = admission::object_label(kind.name(), request, input.object.as_ref());
        span.record("kind", kind.name());
        span.record("object", object_label.as_str());
        span.record("restore", restore.as_str());

        let verdict = self
            .decide(request, kind, &restore, object, &object_label, api_timeout)
            .await;
        let patched = verdict.denial.is_none() && !verdict.changes.is_empty();
        let outcome = if verdict.denial.is_some() {
            "denied"
        } else {
            "allowed"
        };
        self.report(kind, &restore, &object_label, request.dry_run, &verdict);
        let review = admission::respond(request, &verdict).into_review();
        Ok((
            Reviewed { review, outcome },
            kind.name(),
            operation,
            patched,
        ))
    }

    async fn decide(
        &self,
        request: &AdmissionRequest<DynamicObject>,
        kind: Kind,
        restore: &str,
        object: &Value,
        object_label: &str,
        api_timeout: Option<Duration>,
    ) -> Verdict {
        let namespace = request.namespace.clone().unwrap_or_default();
        let mut verdict = Verdict::default();
        let mut options = CleanupOptions {
            new_identity: false,
            disabled_rules: self.settings.disabled_rules.clone(),
        };
        let mut policy = self.settings.group_policy;
        if let Kind::VirtualMachine(_) = kind {
            match self.restores.lookup(restore).await {
                RestoreLookup::Found(info) => {
                    let choice = info.identity_for(&namespace);
                    options.new_identity = choice.new_identity;
                    debug!(new_identity = choice.new_identity, because = %choice.because, "identity choice");
                    match info.group_policy() {
                        Some(Ok(chosen)) => policy = chosen,
                        Some(Err(message)) => verdict.notes.push(format!(
                            "Restore {restore}: {message}; using {}",
                            policy.as_str()
                        )),
                        None => {}
                    }
                }
                RestoreLookup::NotFound => verdict.notes.push(format!(
                    "Velero Restore {restore} not found in namespace {}: guest identity kept",
                    self.restores.namespace()
                )),
                RestoreLookup::Failed(err) => {
                    warn!(error = %err, "reading the Velero Restore failed");
                    verdict.notes.push(format!(
                        "could not read Velero Restore {restore}: guest identity kept"
                    ));
                }
            }
        }

        let plan = match vmop::plan(kind, object, &options) {
            Ok(plan) => plan,
            Err(err) => {
                verdict.denial = Some(format!(
                    "{object_label} cannot be reviewed: {err}. Fix the object in the backup (or with a Velero resource modifier) and restore again"
                ));
                return verdict;
            }
        };
        verdict.changes = plan.changes;
        if let Some(denial) = plan.denial {
            verdict.denial = Some(format!("{object_label} {denial}"));
            return verdict;
        }
        if options.enabled(vmop::R_REVIEWED_MARKER)
            && let Some(marker) = vmop::marker_change(object, restore)
        {
            verdict.changes.push(marker);
        }
        let Some(group) = plan.group_name else {
            return verdict;
        };
        match kind {
            Kind::VirtualMachine(_) => {
                self.check_group(
                    &namespace,
                    &group,
                    object_label,
                    request.dry_run,
                    policy,
                    api_timeout,
                    &mut verdict,
                )
                .await
            }
            Kind::VirtualMachineGroup(_) => {
                // Velero creates groups in name order: a child may precede its
                // parent, so a missing parent is only worth a warning.
                if self.groups.confirm(&namespace, &group).await != GroupPresence::Present {
                    verdict.notes.push(format!(
                        "parent VirtualMachineGroup {group} does not exist yet in {namespace}; restore it too"
                    ));
                }
            }
            Kind::PersistentVolumeClaim => {}
        }
        verdict
    }

    #[allow(clippy::too_many_arguments)]
    async fn check_group(
        &self,
        namespace: &str,
        group: &str,
        object_label: &str,
        dry_run: bool,
        policy: GroupPolicy,
        api_timeout: Option<Duration>,
        verdict: &mut Verdict,
    ) {
        // Dry runs and the deny policy never wait: nothing else is being
        // restored alongside them.
        let bound = if dry_run || policy != GroupPolicy::WaitThenDeny {
            Duration::ZERO
        } else {
            self.wait_bound(api_timeout)
        };
        if !bound.is_zero() && !self.groups.contains(namespace, group) {
            info!(
                group,
                bound_ms = bound.as_millis() as u64,
                "VM waits for its VirtualMachineGroup"
            );
        }
        let (cached, waited) = self.groups.wait_for(namespace, group, bound).await;
        let presence = if cached {
            GroupPresence::Present
        } else {
            self.groups.confirm(namespace, group).await
        };
        if let Some(metrics) = &self.metrics {
            let result = if presence == GroupPresence::Present {
                "found"
            } else {
                "missing"
            };
            metrics
                .group_wait_seconds
                .get_or_create(&ResultLabels {
                    result: result.into(),
                })
                .observe(waited.as_secs_f64());
        }
        if waited >= Duration::from_millis(1) {
            info!(
                group,
                waited_ms = waited.as_millis() as u64,
                found = (presence == GroupPresence::Present),
                "waited for VirtualMachineGroup"
            );
        }
        let missing_detail = match presence {
            GroupPresence::Present => return,
            GroupPresence::Missing => String::new(),
            GroupPresence::Unknown(err) => format!(" (and the live check failed: {err})"),
        };
        let waited_text = if bound.is_zero() {
            String::new()
        } else {
            format!(" after waiting {:.1}s", waited.as_secs_f64())
        };
        match policy {
            GroupPolicy::AllowWithWarning => verdict.notes.push(format!(
                "VirtualMachineGroup {group} does not exist in {namespace}: VM admitted, but it waits for its group"
            )),
            GroupPolicy::Deny | GroupPolicy::WaitThenDeny => {
                verdict.denial = Some(format!(
                    "{object_label} names VirtualMachineGroup {group:?} (spec.groupName), which does not exist in namespace {namespace}{waited_text}{missing_detail}. \
                     Restore the group first: include virtualmachinegroups.vmoperator.vmware.com in the restore and keep it before virtualmachines \
                     in --restore-resource-priorities, or create the group, then restore again (existing objects are skipped)"
                ));
            }
        }
    }

    /// One log line and one counter per change; one line per denial.
    fn report(
        &self,
        kind: Kind,
        restore: &str,
        object_label: &str,
        dry_run: bool,
        verdict: &Verdict,
    ) {
        if let Some(denial) = &verdict.denial {
            warn!(restore, object = object_label, dry_run, reason = %denial, "denied restored object");
            return;
        }
        for change in &verdict.changes {
            info!(
                restore,
                kind = kind.name(),
                object = object_label,
                path = %change.field(),
                rule = change.rule,
                dry_run,
                "{}",
                change.describe()
            );
            if let Some(metrics) = &self.metrics {
                metrics
                    .changes
                    .get_or_create(&ChangeLabels {
                        kind: kind.name().into(),
                        rule: change.rule.into(),
                    })
                    .inc();
            }
        }
        for note in &verdict.notes {
            warn!(restore, object = object_label, dry_run, "{note}");
        }
    }
}
