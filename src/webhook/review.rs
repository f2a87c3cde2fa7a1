//! One review from body to response, shared by `serve` and `review`:
//! parse → scope → gather facts (each step bounded by the request's one
//! deadline) → [`decide`](crate::webhook::decide::decide) (pure) → render the decision
//! once into the response, the log lines and the metrics.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionReview, Operation};
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use crate::deadline::Deadline;
use crate::facts::{
    GroupFacts, GroupInfo, GroupLookup, GroupPresence, MappingFacts, RestoreFacts, TargetFacts,
};
use crate::metrics::{
    ChangeLabels, KindLabel, KindLabels, Metrics, OperationLabel, Outcome, ReviewLabels,
    WaitLabels, WaitResult,
};
use crate::settings::{GroupPolicy, RestoreUnreadable};
use crate::vmop::power::PowerPolicy;
use crate::vmop::targets::{self, Checked, Collection, TargetView};
use crate::vmop::{Kind, RefKind};
use crate::webhook::admission::{self, ReviewError, Scope, VeleroIdentity, Write};
use crate::webhook::decide::{
    self, DecideSettings, Decision, DenyReason, Facts, GroupFact, RestoreFact, Subject,
};
use crate::webhook::waits::{GroupWaits, WaitLimits, WaitOutcome};

/// The longest reading what the VM's namespace has may take (from the
/// caches it takes microseconds; this bounds the live reads made while a
/// cache's watch is broken).
const REF_CHECK_BOUND: Duration = Duration::from_secs(2);

/// How long readiness waits for the caches of what VMs refer to after the
/// server starts. Past it, a kind that has not listed (a 403, a CRD whose
/// conversion webhook is broken) is read live by the reviews that need it,
/// and the replica stays in the Service: one broken kind never takes every
/// replica out, which under `failurePolicy: Fail` would fail every labelled
/// create, even of VMs that never name that kind.
pub const REFS_READY_GRACE: Duration = Duration::from_secs(10);

/// Kept free after a group wait for the live GET that confirms a miss.
const CONFIRM_RESERVE: Duration = Duration::from_millis(750);

#[derive(Debug, Clone)]
pub struct ReviewSettings {
    pub group_policy: GroupPolicy,
    pub group_wait_timeout: Duration,
    pub timeout_margin: Duration,
    pub restore_unreadable: RestoreUnreadable,
    pub disabled_rules: Arc<BTreeSet<String>>,
    pub power_policy: PowerPolicy,
    pub wait_limits: WaitLimits,
    /// Who Velero is: only its updates are Velero's writes to review, and
    /// a labelled create from anyone else is warned about.
    pub velero: Arc<VeleroIdentity>,
}

impl Default for ReviewSettings {
    fn default() -> Self {
        ReviewSettings {
            group_policy: GroupPolicy::WaitThenDeny,
            group_wait_timeout: Duration::from_secs(20),
            timeout_margin: Duration::from_secs(2),
            restore_unreadable: RestoreUnreadable::Deny,
            disabled_rules: Arc::default(),
            power_policy: PowerPolicy::default(),
            wait_limits: WaitLimits::default(),
            velero: Arc::new(VeleroIdentity::of_namespace("velero")),
        }
    }
}

pub struct Reviewer {
    pub groups: Arc<dyn GroupFacts>,
    pub restores: Arc<dyn RestoreFacts>,
    pub settings: ReviewSettings,
    pub metrics: Option<Arc<Metrics>>,
    /// What target namespaces have that VMs name; none: nothing is checked.
    refs: Option<Arc<dyn TargetFacts>>,
    /// The restore's mappings; none: nothing is mapped.
    mappings: Option<Arc<dyn MappingFacts>>,
    /// Where labelled creates from a user that is not Velero are recorded,
    /// for the companion's Event on the Restore.
    unrecognised: Option<Arc<crate::facts::unrecognised::Unrecognised>>,
    waits: GroupWaits,
    /// Confirmations of a miss in flight, per namespace.
    confirm_shares: ConfirmShares,
    decide_settings: DecideSettings,
}

/// Confirmations in flight per namespace, at most
/// [`CONFIRMATIONS_PER_NAMESPACE`] each.
#[derive(Default)]
struct ConfirmShares {
    in_flight: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// Confirmations one namespace may have in flight at once.
pub const CONFIRMATIONS_PER_NAMESPACE: usize = 2;

/// One confirmation's share of its namespace, given back on drop.
struct ConfirmShare {
    in_flight: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    namespace: String,
}

impl ConfirmShares {
    fn take(&self, namespace: &str) -> Option<ConfirmShare> {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let count = in_flight.entry(namespace.to_string()).or_default();
        if *count >= CONFIRMATIONS_PER_NAMESPACE {
            return None;
        }
        *count += 1;
        Some(ConfirmShare {
            in_flight: self.in_flight.clone(),
            namespace: namespace.to_string(),
        })
    }
}

impl Drop for ConfirmShare {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = in_flight.get_mut(&self.namespace) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                in_flight.remove(&self.namespace);
            }
        }
    }
}

/// What one review produced: the response, and for the metrics and the
/// `review` command's summary, what was decided in full (the response's
/// warnings may be shortened for the API server).
pub struct Reviewed {
    pub review: AdmissionReview<DynamicObject>,
    pub outcome: Outcome,
    /// `Kind namespace/name` for in-scope objects.
    pub object_label: Option<String>,
    /// What was decided, in full (the `review` command describes it; the
    /// server does not, so nothing is formatted twice on its path).
    pub verdict: crate::webhook::admission::Verdict,
    /// Why the object was left alone, if it was (out of scope, a reinvocation).
    pub unchanged_because: Option<&'static str>,
}

fn operation_label(operation: &Operation) -> OperationLabel {
    match operation {
        Operation::Create => OperationLabel::Create,
        Operation::Update => OperationLabel::Update,
        Operation::Delete => OperationLabel::Delete,
        Operation::Connect => OperationLabel::Connect,
    }
}

fn kind_label(kind: Kind) -> KindLabel {
    match kind {
        Kind::VirtualMachine(_) => KindLabel::VirtualMachine,
        Kind::VirtualMachineGroup(_) => KindLabel::VirtualMachineGroup,
        Kind::PersistentVolumeClaim => KindLabel::PersistentVolumeClaim,
        Kind::VirtualMachineSnapshot => KindLabel::VirtualMachineSnapshot,
        Kind::VirtualMachinePublishRequest => KindLabel::VirtualMachinePublishRequest,
        Kind::VirtualMachineGroupPublishRequest => KindLabel::VirtualMachineGroupPublishRequest,
        Kind::VirtualMachineWebConsoleRequest => KindLabel::VirtualMachineWebConsoleRequest,
        Kind::CnsRegisterVolume => KindLabel::CnsRegisterVolume,
    }
}

impl Reviewer {
    pub fn new(
        groups: Arc<dyn GroupFacts>,
        restores: Arc<dyn RestoreFacts>,
        settings: ReviewSettings,
        metrics: Option<Arc<Metrics>>,
    ) -> Reviewer {
        let decide_settings = DecideSettings {
            group_policy: settings.group_policy,
            restore_unreadable: settings.restore_unreadable,
            disabled_rules: settings.disabled_rules.clone(),
            power_policy: settings.power_policy,
            velero_namespace: restores.namespace().to_string(),
        };
        Reviewer {
            refs: None,
            mappings: None,
            unrecognised: None,
            waits: GroupWaits::new(settings.wait_limits),
            confirm_shares: ConfirmShares::default(),
            groups,
            restores,
            settings,
            metrics,
            decide_settings,
        }
    }

    /// Checks the zones, classes, images, storage classes and networks VMs
    /// name against `refs` (by default none is checked).
    pub fn with_refs(mut self, refs: Arc<dyn TargetFacts>) -> Reviewer {
        self.refs = Some(refs);
        self
    }

    /// The watched caches behind the facts, for the metrics.
    pub fn cache_stats(&self) -> Vec<crate::facts::CacheStats> {
        let mut stats = self.groups.stats();
        if let Some(refs) = &self.refs {
            stats.extend(refs.stats());
        }
        stats
    }

    /// Whether the reference caches have listed once.
    pub fn refs_synced(&self) -> bool {
        self.refs.as_ref().is_none_or(|refs| refs.is_synced())
    }

    /// Readiness, `serving_for` after the server started: what every review
    /// needs (groups, Restores, mappings) has listed, and the reference
    /// caches have too or had their [`REFS_READY_GRACE`].
    pub fn is_ready(&self, serving_for: Duration) -> bool {
        self.groups.is_synced()
            && self.restores.is_synced()
            && self.mappings_synced()
            && (self.refs_synced() || serving_for >= REFS_READY_GRACE)
    }

    /// Maps VMs' storage classes, classes, images, networks and zones by
    /// the restore's ConfigMaps.
    pub fn with_mappings(mut self, mappings: Arc<dyn MappingFacts>) -> Reviewer {
        self.mappings = Some(mappings);
        self
    }

    /// Records labelled creates from users that are not Velero, per
    /// restore (dry runs aside), for the companion's Event on the Restore.
    pub fn with_unrecognised(
        mut self,
        unrecognised: Arc<crate::facts::unrecognised::Unrecognised>,
    ) -> Reviewer {
        self.unrecognised = Some(unrecognised);
        self
    }

    /// Whether the mapping ConfigMaps have been read (readiness).
    pub fn mappings_synced(&self) -> bool {
        self.mappings
            .as_ref()
            .is_none_or(|mappings| mappings.is_synced())
    }

    /// Group waits in progress now (for the metrics gauge).
    pub fn group_waits_in_progress(&self) -> usize {
        self.waits.in_progress()
    }

    /// Reviews one request body, answering by `deadline`. `Err` means the
    /// body was not a usable AdmissionReview; the caller answers 400 with
    /// [`admission::invalid`].
    pub async fn review(&self, body: &[u8], deadline: Deadline) -> Result<Reviewed, ReviewError> {
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
            .review_in_span(body, deadline)
            .instrument(span.clone())
            .await;
        let elapsed = start.elapsed();
        let _entered = span.enter();
        match &result {
            Ok((reviewed, kind, operation, patched)) => {
                span.record("outcome", reviewed.outcome.as_str());
                span.record("patched", *patched);
                if let Some(metrics) = &self.metrics {
                    metrics
                        .reviews
                        .get_or_create(&ReviewLabels {
                            kind: *kind,
                            operation: *operation,
                            outcome: reviewed.outcome,
                            patched: *patched,
                        })
                        .inc();
                    metrics
                        .review_seconds
                        .get_or_create(&KindLabels { kind: *kind })
                        .observe(elapsed.as_secs_f64());
                }
                debug!(elapsed_ms = elapsed.as_millis() as u64, "review answered");
            }
            Err(err) => {
                warn!(error = %err, "request could not be reviewed");
                if let Some(metrics) = &self.metrics {
                    metrics.count_unreviewable(Outcome::BadRequest);
                }
            }
        }
        result.map(|(reviewed, ..)| reviewed)
    }

    async fn review_in_span(
        &self,
        body: &[u8],
        deadline: Deadline,
    ) -> Result<(Reviewed, KindLabel, OperationLabel, bool), ReviewError> {
        let input = admission::parse_review(body)?;
        let request = &input.request;
        let span = Span::current();
        let operation = operation_label(&request.operation);
        span.record("uid", request.uid.as_str());
        span.record("operation", operation.as_str());
        span.record("dry_run", request.dry_run);

        let (kind, restore, write) =
            match admission::scope(request, input.object.as_ref(), &self.settings.velero) {
                Scope::Out(reason) => {
                    debug!(kind = %request.kind.kind, reason, "allowed unchanged: out of scope");
                    let review = admission::respond(request, &Default::default()).into_review();
                    let reviewed = Reviewed {
                        review,
                        outcome: Outcome::Allowed,
                        object_label: None,
                        verdict: Default::default(),
                        unchanged_because: Some(reason),
                    };
                    return Ok((reviewed, KindLabel::Other, operation, false));
                }
                Scope::In {
                    kind,
                    restore,
                    write,
                } => (kind, restore, write),
            };
        let object = input.object.as_ref().unwrap_or(&serde_json::Value::Null);
        // The kind as sent: v1alpha1's WebConsoleRequest is named so, though
        // it shares its rule with VirtualMachineWebConsoleRequest.
        let object_label =
            admission::object_label(&request.kind.kind, request, input.object.as_ref());
        span.record("kind", kind.name());
        span.record("object", object_label.as_str());
        span.record("restore", restore.as_str());

        let subject = Subject {
            kind,
            write,
            old_object: input.old_object.as_ref(),
            restore_label: &restore,
            namespace: request.namespace.as_deref().unwrap_or_default(),
            object,
            object_label: &object_label,
            dry_run: request.dry_run,
            received_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|since| since.as_secs())
                .unwrap_or_default(),
        };
        let facts = self.gather(&subject, deadline).await;
        let mut decision = decide::decide(&subject, &facts, &self.decide_settings);
        // Velero's identity is checked on every labelled create, where it
        // is known to be Velero's (or a person's trying a restore by hand):
        // its later status writes and updates reach the webhook only from
        // the identity the chart's matchConditions name.
        if write == Write::Create && !self.settings.velero.matches(&request.user_info) {
            decision
                .verdict
                .notes
                .push(unrecognised_velero(request, &self.settings.velero));
            if let Some(metrics) = &self.metrics {
                metrics.velero_unrecognised.inc();
            }
            // Only for a Restore that exists: a made-up restore name can
            // neither fill the record nor put an Event anywhere.
            if let Some(seen) = &self.unrecognised
                && !request.dry_run
                && matches!(
                    facts.restore,
                    RestoreFact::Lookup(crate::facts::RestoreLookup::Found(_))
                )
            {
                seen.record(
                    &restore,
                    request.user_info.username.as_deref().unwrap_or_default(),
                );
            }
        }
        let outcome = match decision.deny_reason {
            None => Outcome::Allowed,
            Some(DenyReason::Deadline) => Outcome::Deadline,
            Some(_) => Outcome::Denied,
        };
        let patched = decision.verdict.denial.is_none() && !decision.verdict.changes.is_empty();
        crate::telemetry::batch(|| self.report(&subject, &decision));
        let review = admission::respond(request, &decision.verdict).into_review();
        let reviewed = Reviewed {
            review,
            outcome,
            object_label: Some(object_label),
            verdict: decision.verdict,
            unchanged_because: decision.unchanged_because,
        };
        Ok((reviewed, kind_label(kind), operation, patched))
    }

    /// Everything `decide` needs from the cluster, each step bounded by the
    /// request's deadline.
    async fn gather(&self, subject: &Subject<'_>, deadline: Deadline) -> Facts {
        // Velero's status write is decided from the object and what is
        // stored; its update of an object that exists needs only the
        // Restore's mappings, for a VM.
        let wants_mappings =
            matches!(subject.kind, Kind::VirtualMachine(_)) && self.mappings.is_some();
        match subject.write {
            Write::Create => {}
            Write::Update if wants_mappings => {}
            Write::Update | Write::StatusUpdate => return Facts::default(),
        }
        let restore = match deadline
            .run(self.restores.lookup(subject.restore_label))
            .await
        {
            Ok(lookup) => RestoreFact::Lookup(lookup),
            Err(_) => RestoreFact::DeadlineExceeded,
        };
        if let RestoreFact::Lookup(crate::facts::RestoreLookup::Failed(err)) = &restore {
            warn!(restore = subject.restore_label, object = subject.object_label, error = %err,
                "reading the Velero Restore failed");
        }
        let mut facts = Facts {
            restore,
            ..Facts::default()
        };
        if subject.write == Write::Create
            && (decide::already_reviewed(subject, &facts.restore)
                || decide::denied_before_group(subject, &facts.restore, &self.decide_settings))
        {
            return facts;
        }
        if let Kind::VirtualMachine(_) = subject.kind
            && let Some(mappings) = &self.mappings
        {
            let restore = match &facts.restore {
                RestoreFact::Lookup(crate::facts::RestoreLookup::Found(info)) => Some(info),
                _ => None,
            };
            match mappings.for_restore(restore) {
                Ok(selected) => {
                    let disabled = &self.settings.disabled_rules;
                    // An update keeps the live values whatever create rules
                    // are off: every mapping counts there.
                    facts.mappings = Arc::new(selected.in_effect(|rule| {
                        subject.write == Write::Update || !disabled.contains(rule)
                    }));
                }
                Err(err) => {
                    warn!(restore = subject.restore_label, object = subject.object_label, error = %err,
                        "the restore's mappings cannot be used");
                    // `decide` denies the VM, naming the ConfigMap and key.
                    facts.mapping_error = Some(err);
                    return facts;
                }
            }
        }
        if subject.write == Write::Update {
            return facts;
        }
        if let Kind::VirtualMachine(_) = subject.kind
            && let Some(refs) = &self.refs
            && let Ok(references) = crate::vmop::vm::cluster_refs(subject.object, &facts.mappings)
        {
            facts.refs_named = references.len();
            if references.len() <= decide::MAX_CHECKED_REFERENCES {
                let mut view = self
                    .target_view(refs.as_ref(), subject.namespace, &references, deadline)
                    .await;
                self.confirm_misses(refs.as_ref(), subject, &references, &mut view, deadline)
                    .await;
                check_references(&mut facts, references, &view);
            }
        }
        // A malformed object is denied by `decide` with the field's name.
        let Ok(Some(group)) = crate::vmop::group_name(subject.kind, subject.object) else {
            return facts;
        };
        let (fact, found) = match subject.kind {
            Kind::VirtualMachine(_) => {
                let (policy, _) = decide::group_policy(&self.decide_settings, &facts.restore);
                self.vm_group_fact(subject, &group, policy, deadline).await
            }
            _ => {
                self.confirm(subject.namespace, &group, deadline, Duration::ZERO, None)
                    .await
            }
        };
        // From whichever found the group: the cache, or the live GET when
        // the cache had not seen it yet.
        facts.group_holds_power = found.is_some_and(|group| group.holds_power);
        facts.group = Some((group, fact));
        facts
    }

    /// What the VM's namespace has of every collection its references need,
    /// each read once, within a short share of the deadline (so a slow live
    /// read cannot leave the group check no time).
    async fn target_view(
        &self,
        refs: &dyn TargetFacts,
        namespace: &str,
        references: &[crate::vmop::ClusterRef],
        deadline: Deadline,
    ) -> TargetView {
        let needed: std::collections::BTreeSet<Collection> = references
            .iter()
            .flat_map(|reference| targets::collections_for(reference.kind).iter().copied())
            .collect();
        match deadline
            .min_after(REF_CHECK_BOUND)
            .run(refs.view(namespace, &needed))
            .await
        {
            Ok(view) => view,
            Err(_) => TargetView::unknown("reading it did not finish before the deadline"),
        }
    }

    /// A reference the view (a cache) says is missing is denied or stripped
    /// for it; a watch can lag behind a create made a moment ago (Velero
    /// creates images, then the VMs naming them). So before a miss counts,
    /// the collections it was looked up in are listed live in the VM's
    /// namespace, within the same short share of the deadline, and that
    /// answer replaces the cache's. A warm review that misses nothing reads
    /// nothing live.
    async fn confirm_misses(
        &self,
        refs: &dyn TargetFacts,
        subject: &Subject<'_>,
        references: &[crate::vmop::ClusterRef],
        view: &mut TargetView,
        deadline: Deadline,
    ) {
        // Only a miss that denies the VM or strips its zone is confirmed: a
        // stripped `spec.class` or `spec.image` is resolved again by VM
        // Operator from `spec.className` or `spec.imageName`, so a lagging
        // cache costs nothing there, and a copy into another namespace (whose
        // class instances always differ) stays free of requests.
        let missed: BTreeSet<Collection> = references
            .iter()
            .filter(|reference| {
                reference.kind.denies_when_missing() || reference.kind == RefKind::Zone
            })
            .filter(|reference| targets::check(view, reference) == Checked::Missing)
            .flat_map(|reference| targets::collections_for(reference.kind).iter().copied())
            .collect();
        if missed.is_empty() {
            return;
        }
        // One namespace's flood of VMs naming what does not exist cannot
        // take every confirmation (nor multiply lists): past its share, its
        // misses stay unknown, so nothing is denied or stripped for them and
        // VM Operator's own check stands. Velero creates one object at a
        // time, so a restore never needs more than one.
        let Some(_share) = self.confirm_shares.take(subject.namespace) else {
            view.overlay(
                TargetView::unknown(
                    "too many confirmations in flight in this namespace; not confirmed",
                )
                .only(&missed),
            );
            return;
        };
        debug!(
            object = subject.object_label,
            collections = missed.len(),
            "confirming a miss live"
        );
        let confirmed = match deadline
            .min_after(REF_CHECK_BOUND)
            .run(refs.confirm_view(subject.namespace, &missed))
            .await
        {
            Ok(confirmed) => confirmed,
            // Not confirmed in time: unknown, so nothing is denied or
            // stripped for it (VM Operator's own check stands).
            Err(_) => TargetView::unknown("confirming a miss did not finish before the deadline")
                .only(&missed),
        };
        view.overlay(confirmed);
    }

    async fn confirm(
        &self,
        namespace: &str,
        group: &str,
        deadline: Deadline,
        waited: Duration,
        not_waited: Option<crate::webhook::waits::NoWait>,
    ) -> (GroupFact, Option<GroupInfo>) {
        let lookup = deadline
            .run(self.groups.confirm(namespace, group))
            .await
            .unwrap_or_else(|_| {
                GroupLookup::Unknown("it did not finish before the API server's deadline".into())
            });
        match lookup {
            GroupLookup::Found(info) => (GroupFact::Present { waited }, Some(info)),
            GroupLookup::Missing => (
                GroupFact::Missing {
                    waited,
                    not_waited,
                    live_error: None,
                },
                None,
            ),
            GroupLookup::Unknown(err) => (
                GroupFact::Missing {
                    waited,
                    not_waited,
                    live_error: Some(err),
                },
                None,
            ),
        }
    }

    async fn vm_group_fact(
        &self,
        subject: &Subject<'_>,
        group: &str,
        policy: GroupPolicy,
        deadline: Deadline,
    ) -> (GroupFact, Option<GroupInfo>) {
        let namespace = subject.namespace;
        if let Some(found) = self.groups.get(namespace, group) {
            return (
                GroupFact::Present {
                    waited: Duration::ZERO,
                },
                Some(found),
            );
        }
        // Dry runs and the other policies never wait: nothing else is being
        // restored alongside them.
        let may_wait = !subject.dry_run && policy == GroupPolicy::WaitThenDeny;
        let reserve = CONFIRM_RESERVE.min(deadline.remaining() / 4);
        let until = deadline
            .min_after(self.settings.group_wait_timeout)
            .at()
            .min(deadline.at().checked_sub(reserve).unwrap_or(deadline.at()));
        let (waited, not_waited) = if !may_wait {
            (Duration::ZERO, None)
        } else if let Some(ago) = self.waits.recent_miss(namespace, group) {
            (
                Duration::ZERO,
                Some(crate::webhook::waits::NoWait::RecentMiss { ago }),
            )
        } else {
            info!(
                restore = subject.restore_label,
                object = subject.object_label,
                group,
                bound_ms = until
                    .saturating_duration_since(tokio::time::Instant::now())
                    .as_millis() as u64,
                "VM waits for its VirtualMachineGroup"
            );
            // The in-progress gauge is read from `self.waits` at each scrape:
            // its count survives a request cancelled mid-wait.
            let outcome = self
                .waits
                .wait(self.groups.as_ref(), namespace, group, until)
                .await;
            match outcome {
                WaitOutcome::Appeared { waited } => {
                    self.observe_wait(WaitResult::Found, waited);
                    info!(
                        restore = subject.restore_label,
                        object = subject.object_label,
                        group,
                        waited_ms = waited.as_millis() as u64,
                        found = true,
                        "waited for VirtualMachineGroup"
                    );
                    self.waits.forget_miss(namespace, group);
                    // The cache has it now; a live GET tells if it did not.
                    let found = match self.groups.get(namespace, group) {
                        Some(found) => Some(found),
                        None => {
                            self.confirm(namespace, group, deadline, waited, None)
                                .await
                                .1
                        }
                    };
                    return (GroupFact::Present { waited }, found);
                }
                WaitOutcome::TimedOut { waited } => (waited, None),
                WaitOutcome::NotWaited(why) => (Duration::ZERO, Some(why)),
            }
        };
        let (fact, info) = self
            .confirm(namespace, group, deadline, waited, not_waited)
            .await;
        let found = matches!(fact, GroupFact::Present { .. });
        if may_wait && not_waited.is_none() {
            self.observe_wait(
                if found {
                    WaitResult::Found
                } else {
                    WaitResult::Missing
                },
                waited,
            );
            info!(
                restore = subject.restore_label,
                object = subject.object_label,
                group,
                waited_ms = waited.as_millis() as u64,
                found,
                "waited for VirtualMachineGroup"
            );
        }
        match &fact {
            GroupFact::Present { .. } => self.waits.forget_miss(namespace, group),
            // Only a full wait that ran out, confirmed live, is remembered.
            GroupFact::Missing {
                live_error: None, ..
            } if may_wait && not_waited.is_none() => self.waits.remember_miss(namespace, group),
            GroupFact::Missing { .. } => {}
        }
        (fact, info)
    }

    fn observe_wait(&self, result: WaitResult, waited: Duration) {
        if let Some(metrics) = &self.metrics {
            metrics
                .group_wait_seconds
                .get_or_create(&WaitLabels { result })
                .observe(waited.as_secs_f64());
        }
    }

    /// One log line and one counter per change; one line per denial.
    fn report(&self, subject: &Subject<'_>, decision: &Decision) {
        let change_lines = !QUIET_CHANGES.try_with(|quiet| *quiet).unwrap_or(false);
        let (restore, object, dry_run) =
            (subject.restore_label, subject.object_label, subject.dry_run);
        let verdict = &decision.verdict;
        if let Some(because) = decision.unchanged_because {
            debug!(restore, object, because, "left unchanged");
            return;
        }
        if let Some(denial) = &verdict.denial {
            let reason = decision.deny_reason.map(|r| r.as_str()).unwrap_or("rule");
            warn!(restore, object, dry_run, deny_reason = reason, reason = %denial, "denied restored object");
            return;
        }
        let kind = kind_label(subject.kind);
        if let Some(metrics) = &self.metrics {
            for change in &verdict.changes {
                metrics
                    .changes
                    .get_or_create(&ChangeLabels {
                        kind,
                        rule: change.rule,
                    })
                    .inc();
            }
        }
        // As many lines as the response has warnings: a rule's changes past
        // the bound are one line that counts them.
        let lines = if change_lines {
            crate::patch::described(&verdict.changes)
        } else {
            Vec::new()
        };
        for line in lines {
            match line {
                crate::patch::Line::Change(change) => info!(
                    restore,
                    kind = kind.as_str(),
                    object,
                    path = %change.field(),
                    rule = change.rule,
                    dry_run,
                    "{}",
                    change.describe()
                ),
                crate::patch::Line::More { rule, count } => info!(
                    restore,
                    kind = kind.as_str(),
                    object,
                    rule,
                    dry_run,
                    more = count,
                    "{}",
                    line.text()
                ),
            }
        }
        for note in &verdict.notes {
            warn!(restore, object, dry_run, "{note}");
        }
    }
}

tokio::task_local! {
    /// Set by [`without_change_lines`]: the review logs no change lines.
    static QUIET_CHANGES: bool;
}

/// Runs a review whose change lines (INFO) are not logged, as with logs at
/// `warn`: the bench route that measures what the lines cost a create
/// (`/bench/mutate-quiet-changes`). Denials and notes are still logged.
pub async fn without_change_lines<T>(review: impl Future<Output = T>) -> T {
    QUIET_CHANGES.scope(true, review).await
}

/// The warning for a labelled create from a user the webhook does not take
/// for Velero.
fn unrecognised_velero(
    request: &kube::core::admission::AdmissionRequest<DynamicObject>,
    velero: &VeleroIdentity,
) -> String {
    let user = request
        .user_info
        .username
        .as_deref()
        .unwrap_or("an unnamed user");
    // The identity the webhook knows is in the log line, not the warning
    // (kubectl cuts long warnings).
    debug!(user, velero = %velero.describe(), "a labelled create from a user that is not Velero");
    format!(
        "{user}: not Velero as configured (webhook.velero); if Velero runs as it, its later writes skip the webhook"
    )
}

/// Each reference checked against what its namespace has, and, for the
/// kinds that deny a VM when missing, what the namespace has instead.
fn check_references(
    facts: &mut Facts,
    references: Vec<crate::vmop::ClusterRef>,
    view: &TargetView,
) {
    // A VM with an encryption class can only be fixed with an encryption
    // storage class: those are what a denial lists.
    let encrypted = references
        .iter()
        .any(|reference| reference.kind == RefKind::EncryptionStorageClass);
    for reference in references {
        let presence = match targets::check(view, &reference) {
            // Nothing to compare with: VM Operator's own answer stands.
            Checked::Found | Checked::Unchecked => GroupPresence::Present,
            Checked::Missing => GroupPresence::Missing,
            Checked::Unknown(err) => GroupPresence::Unknown(err),
        };
        let listed_kind = match reference.kind {
            RefKind::StorageClass if encrypted => RefKind::EncryptionStorageClass,
            kind => kind,
        };
        if reference.kind.denies_when_missing()
            && presence == GroupPresence::Missing
            && !facts.alternatives.contains_key(&listed_kind)
        {
            facts
                .alternatives
                .insert(listed_kind, targets::alternatives(view, listed_kind));
        }
        facts.refs.push((reference, presence));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::given::StaticRestores;
    use crate::facts::{GroupInfo, RestoreInfo, RestoreLookup};
    use serde_json::json;

    /// Reviews one AdmissionReview body, answering within `within`.
    async fn review_json(
        reviewer: &Reviewer,
        body: &serde_json::Value,
        within: Duration,
    ) -> Reviewed {
        reviewer
            .review(
                body.to_string().as_bytes(),
                Deadline::for_request(tokio::time::Instant::now(), None, within),
            )
            .await
            .expect("a well-formed AdmissionReview")
    }

    /// A group source whose cache has not seen the group yet; the live GET
    /// finds it, holding its power.
    struct LaggingGroups;

    impl GroupFacts for LaggingGroups {
        fn is_synced(&self) -> bool {
            true
        }
        fn len(&self) -> usize {
            0
        }
        fn get(&self, _namespace: &str, _name: &str) -> Option<GroupInfo> {
            None
        }
        fn appeared(
            &self,
            _namespace: &str,
            _name: &str,
        ) -> futures::future::BoxFuture<'static, ()> {
            Box::pin(futures::future::pending())
        }
        fn confirm<'a>(
            &'a self,
            _namespace: &'a str,
            _name: &'a str,
        ) -> futures::future::BoxFuture<'a, GroupLookup> {
            Box::pin(futures::future::ready(GroupLookup::Found(GroupInfo {
                holds_power: true,
            })))
        }
    }

    /// Finding 10 of the shared-safety review: a group found only by the live
    /// GET says itself whether it holds power, so its VM is held too (before,
    /// the cache, which had not seen the group, was asked and said no).
    #[tokio::test]
    async fn a_group_found_only_by_the_live_get_still_holds_its_vms() {
        let restores = StaticRestores::new(
            "velero",
            RestoreLookup::Found(RestoreInfo {
                name: "r1".into(),
                uid: Some("u1".into()),
                ..Default::default()
            }),
        );
        let settings = ReviewSettings {
            group_policy: GroupPolicy::Deny,
            ..ReviewSettings::default()
        };
        let reviewer = Reviewer::new(Arc::new(LaggingGroups), restores, settings, None);
        let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "u", "kind": {"group": "vmoperator.vmware.com", "version": "v1alpha5", "kind": "VirtualMachine"},
            "resource": {"group": "vmoperator.vmware.com", "version": "v1alpha5", "resource": "virtualmachines"},
            "namespace": "prod", "operation": "CREATE", "userInfo": {"username": "velero"},
            "object": {"apiVersion": "vmoperator.vmware.com/v1alpha5", "kind": "VirtualMachine",
                "metadata": {"name": "vm1", "namespace": "prod", "labels": {"velero.io/restore-name": "r1"}},
                "spec": {"groupName": "g", "powerState": "PoweredOn"}}}});
        let reviewed = review_json(&reviewer, &body, Duration::from_secs(1)).await;
        assert!(reviewed.verdict.denial.is_none(), "{:?}", reviewed.verdict);
        assert!(
            reviewed.verdict.changes.iter().any(|change| {
                change.field() == "spec.powerState" && change.describe().contains("PoweredOff")
            }),
            "{:?}",
            reviewed.verdict.changes
        );
    }

    /// A target whose cache lags: `cached` is what the watch has delivered,
    /// `live` what the API server holds; confirmations are counted.
    struct LaggingRefs {
        cached: Arc<crate::facts::given::StaticRefs>,
        live: Arc<crate::facts::given::StaticRefs>,
        confirmations: std::sync::atomic::AtomicUsize,
    }

    impl TargetFacts for LaggingRefs {
        fn view<'a>(
            &'a self,
            namespace: &'a str,
            needed: &'a BTreeSet<Collection>,
        ) -> futures::future::BoxFuture<'a, TargetView> {
            self.cached.view(namespace, needed)
        }
        fn confirm_view<'a>(
            &'a self,
            namespace: &'a str,
            needed: &'a BTreeSet<Collection>,
        ) -> futures::future::BoxFuture<'a, TargetView> {
            self.confirmations
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.live.view(namespace, needed)
        }
    }

    async fn review_with_refs(refs: Arc<LaggingRefs>, vm: serde_json::Value) -> Reviewed {
        let restores = StaticRestores::new(
            "velero",
            RestoreLookup::Found(RestoreInfo {
                name: "r1".into(),
                uid: Some("u1".into()),
                ..Default::default()
            }),
        );
        let reviewer = Reviewer::new(
            crate::facts::given::StaticGroups::new([]),
            restores,
            ReviewSettings::default(),
            None,
        )
        .with_refs(refs);
        let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "u", "kind": {"group": "vmoperator.vmware.com", "version": "v1alpha5", "kind": "VirtualMachine"},
            "resource": {"group": "vmoperator.vmware.com", "version": "v1alpha5", "resource": "virtualmachines"},
            "namespace": "prod", "operation": "CREATE", "userInfo": {"username": "velero"},
            "object": vm}});
        review_json(&reviewer, &body, Duration::from_secs(5)).await
    }

    fn refs(cached: &[(RefKind, &str)], live: &[(RefKind, &str)]) -> Arc<LaggingRefs> {
        let given = |names: &[(RefKind, &str)]| {
            crate::facts::given::StaticRefs::new(
                names
                    .iter()
                    .map(|(kind, name)| (*kind, "prod".to_string(), name.to_string())),
            )
        };
        Arc::new(LaggingRefs {
            cached: given(cached),
            live: given(live),
            confirmations: Default::default(),
        })
    }

    fn labelled_vm(spec: serde_json::Value, labels: serde_json::Value) -> serde_json::Value {
        let mut labels = labels;
        labels["velero.io/restore-name"] = json!("r1");
        json!({"apiVersion": "vmoperator.vmware.com/v1alpha5", "kind": "VirtualMachine",
            "metadata": {"name": "vm1", "namespace": "prod", "labels": labels}, "spec": spec})
    }

    /// Issue 33, finding 1: the cache has not seen a class created a moment
    /// before the VM; before, the VM was denied for it. The miss is now
    /// confirmed live, and the VM admitted. A class that is missing live too
    /// is still denied, and one the cache has costs no confirmation.
    #[tokio::test]
    async fn a_miss_in_the_cache_is_confirmed_live_before_it_denies() {
        let vm = labelled_vm(json!({"className": "small"}), json!({}));
        let lagging = refs(
            &[(RefKind::Class, "large")],
            &[(RefKind::Class, "large"), (RefKind::Class, "small")],
        );
        let reviewed = review_with_refs(lagging.clone(), vm.clone()).await;
        assert!(
            reviewed.verdict.denial.is_none(),
            "{:?}",
            reviewed.verdict.denial
        );
        assert_eq!(
            lagging
                .confirmations
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );

        let missing = refs(&[(RefKind::Class, "large")], &[(RefKind::Class, "large")]);
        let reviewed = review_with_refs(missing.clone(), vm.clone()).await;
        let denial = reviewed
            .verdict
            .denial
            .expect("a class missing live too is denied");
        assert!(denial.contains("small"), "{denial}");
        assert_eq!(
            missing
                .confirmations
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );

        let warm = refs(&[(RefKind::Class, "small")], &[]);
        let reviewed = review_with_refs(warm.clone(), vm).await;
        assert!(reviewed.verdict.denial.is_none());
        assert_eq!(
            warm.confirmations.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "a warm review reads nothing live"
        );
    }

    /// Issue 33, finding 1: a zone the cache has not seen is not stripped
    /// (before, the label was removed and VM Operator placed the VM in any
    /// zone); a zone missing live too still is.
    #[tokio::test]
    async fn a_zone_label_is_stripped_only_for_a_miss_confirmed_live() {
        let vm = labelled_vm(json!({}), json!({"topology.kubernetes.io/zone": "zone-a"}));
        let strips_zone = |reviewed: &Reviewed| {
            reviewed
                .verdict
                .changes
                .iter()
                .any(|change| change.rule == crate::vmop::vm::R_ZONE_LABEL)
        };
        let lagging = refs(
            &[(RefKind::Zone, "zone-b")],
            &[(RefKind::Zone, "zone-a"), (RefKind::Zone, "zone-b")],
        );
        let reviewed = review_with_refs(lagging.clone(), vm.clone()).await;
        assert!(!strips_zone(&reviewed), "{:?}", reviewed.verdict.changes);
        assert_eq!(
            lagging
                .confirmations
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        let missing = refs(&[(RefKind::Zone, "zone-b")], &[(RefKind::Zone, "zone-b")]);
        let reviewed = review_with_refs(missing, vm).await;
        assert!(strips_zone(&reviewed), "{:?}", reviewed.verdict.changes);
    }

    /// A target source one of whose kinds never lists.
    struct NeverSynced;

    impl TargetFacts for NeverSynced {
        fn is_synced(&self) -> bool {
            false
        }
        fn view<'a>(
            &'a self,
            _namespace: &'a str,
            _needed: &'a BTreeSet<Collection>,
        ) -> futures::future::BoxFuture<'a, TargetView> {
            Box::pin(futures::future::ready(TargetView::default()))
        }
    }

    /// Issue 33, finding 2: one reference kind that never lists keeps the
    /// replica unready only for the grace; before, for ever (and every
    /// replica with it).
    #[test]
    fn a_kind_that_never_lists_keeps_the_replica_unready_only_for_the_grace() {
        let reviewer = Reviewer::new(
            crate::facts::given::StaticGroups::new([]),
            StaticRestores::none(),
            ReviewSettings::default(),
            None,
        )
        .with_refs(Arc::new(NeverSynced));
        assert!(!reviewer.is_ready(Duration::ZERO));
        assert!(!reviewer.is_ready(REFS_READY_GRACE - Duration::from_millis(1)));
        assert!(reviewer.is_ready(REFS_READY_GRACE));
    }

    /// Issue 33, finding 3: a labelled create from a user the webhook does
    /// not take for Velero says so (its later writes would skip the
    /// webhook); one from any ServiceAccount of Velero's namespace does not.
    #[tokio::test]
    async fn a_labelled_create_from_someone_not_velero_is_warned_about() {
        let seen = Arc::new(crate::facts::unrecognised::Unrecognised::default());
        let reviewer = Reviewer::new(
            crate::facts::given::StaticGroups::new([]),
            StaticRestores::found(RestoreInfo {
                name: "r1".into(),
                uid: Some("u1".into()),
                ..Default::default()
            }),
            ReviewSettings::default(),
            None,
        )
        .with_unrecognised(seen.clone());
        let notes = |user: serde_json::Value| {
            let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
                "uid": "u", "kind": {"group": "", "version": "v1", "kind": "PersistentVolumeClaim"},
                "resource": {"group": "", "version": "v1", "resource": "persistentvolumeclaims"},
                "namespace": "prod", "operation": "CREATE", "userInfo": user,
                "object": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "metadata": {"name": "d", "namespace": "prod", "labels": {"velero.io/restore-name": "r1"}}}}});
            let reviewer = &reviewer;
            async move {
                review_json(reviewer, &body, Duration::from_secs(1))
                    .await
                    .verdict
                    .notes
            }
        };
        let server = notes(json!({"username": "system:serviceaccount:velero:velero-server",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:velero", "system:authenticated"]})).await;
        assert!(
            !server.iter().any(|note| note.contains("not Velero")),
            "{server:?}"
        );
        let admin =
            notes(json!({"username": "kubernetes-admin", "groups": ["system:masters"]})).await;
        assert!(
            admin
                .iter()
                .any(|note| note.starts_with("kubernetes-admin: not Velero as configured")),
            "{admin:?}"
        );
        assert!(
            admin.iter().all(|note| note.chars().count() < 120),
            "{admin:?}"
        );
        // For the companion's Event on the Restore: the user, once.
        assert_eq!(seen.take("r1"), ["kubernetes-admin"]);
    }

    /// Issue 33, finding 4: Velero's update of a VM is mapped by the
    /// mappings its Restore selects (before, the update gathered nothing
    /// and the source's class and network landed on the live VM where it
    /// had none of its own). A Restore naming no ConfigMap gets the
    /// labelled one; one naming another gets that one.
    #[tokio::test]
    async fn an_update_of_a_vm_is_mapped_by_its_restores_mappings() {
        use crate::facts::mapping_cache::MappingCache;
        use crate::vmop::mapping::{
            ConfigMapData, MAPPINGS_ANNOTATION, PLUGIN_CONFIG_LABEL, RESTORE_ITEM_ACTION,
            VM_MAPPINGS_LABEL,
        };
        let configmap = |name: &str, labelled: bool, classes: &str| {
            let labels = if labelled {
                json!({PLUGIN_CONFIG_LABEL: "", VM_MAPPINGS_LABEL: RESTORE_ITEM_ACTION})
            } else {
                json!({})
            };
            ConfigMapData::from_value(&json!({"metadata": {"name": name, "namespace": "velero",
                "labels": labels}, "data": {"classes": classes}}))
        };
        let maps = [
            configmap("site-b", true, "small: medium"),
            configmap("site-c", false, "small: large"),
        ];
        let rows = [(None, Some("medium")), (Some("site-c"), Some("large"))];
        for (named, expected) in rows {
            let restore = RestoreInfo {
                name: "r2".into(),
                uid: Some("u2".into()),
                annotations: named
                    .map(|name: &str| [(MAPPINGS_ANNOTATION.to_string(), name.to_string())].into())
                    .unwrap_or_default(),
                ..Default::default()
            };
            let reviewer = Reviewer::new(
                Arc::new(LaggingGroups),
                StaticRestores::new("velero", RestoreLookup::Found(restore)),
                ReviewSettings {
                    // A create rule turned off changes nothing on an update.
                    disabled_rules: Arc::new(["vm-map-class".to_string()].into()),
                    ..ReviewSettings::default()
                },
                None,
            )
            .with_mappings(MappingCache::given("velero", maps.clone()));
            let vm = |class: Option<&str>| {
                let mut vm = json!({"apiVersion": "vmoperator.vmware.com/v1alpha5", "kind": "VirtualMachine",
                    "metadata": {"name": "vm1", "namespace": "prod", "labels": {"velero.io/restore-name": "r2"}},
                    "spec": {"powerState": "PoweredOn"}});
                if let Some(class) = class {
                    vm["spec"]["className"] = json!(class);
                }
                vm
            };
            let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
                "uid": "u", "kind": {"group": "vmoperator.vmware.com", "version": "v1alpha5", "kind": "VirtualMachine"},
                "resource": {"group": "vmoperator.vmware.com", "version": "v1alpha5", "resource": "virtualmachines"},
                "namespace": "prod", "operation": "UPDATE",
                "userInfo": {"username": "system:serviceaccount:velero:velero", "groups": ["system:serviceaccounts", "system:serviceaccounts:velero"]},
                "object": vm(Some("small")), "oldObject": vm(None)}});
            let reviewed = review_json(&reviewer, &body, Duration::from_secs(1)).await;
            assert!(reviewed.verdict.denial.is_none(), "{:?}", reviewed.verdict);
            let stored =
                crate::patch::apply(&vm(Some("small")), &reviewed.verdict.changes).unwrap();
            assert_eq!(
                stored["spec"]["className"].as_str(),
                expected,
                "{named:?}: {:?}",
                reviewed.verdict.changes
            );
        }
    }

    /// The review of issue 33: one namespace has at most
    /// `CONFIRMATIONS_PER_NAMESPACE` confirmations in flight; a share comes
    /// back when its confirmation ends, and other namespaces are not
    /// affected.
    #[test]
    fn confirmations_are_shared_out_per_namespace() {
        let shares = ConfirmShares::default();
        let held: Vec<_> = (0..CONFIRMATIONS_PER_NAMESPACE)
            .map(|_| shares.take("flood").expect("a share"))
            .collect();
        assert!(shares.take("flood").is_none(), "past its share");
        assert!(
            shares.take("prod").is_some(),
            "another namespace still confirms"
        );
        drop(held);
        assert!(shares.take("flood").is_some());
        assert!(shares.in_flight.lock().unwrap().is_empty(), "nothing kept");
    }
}
