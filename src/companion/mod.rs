//! The restore companion: a loop over Velero Restores that, once a Restore
//! has reached a final phase, prunes and starts the groups it restored and
//! writes the per-restore report as Events on the Restore. The decisions are
//! pure and live beside it: [`view`] (what was read), [`plan`] (what to do to
//! each group) and [`report`] (the per-restore report); this module only
//! reads, patches and records.
//!
//! Arrows: the `serve` and `report` commands use this module; it uses
//! [`crate::facts`] (the Restore), [`crate::vmop`] and [`crate::metrics`],
//! never the webhook path.
//!
//! Exactly once, with any number of replicas and across restarts, without a
//! Lease: every group patch carries a `test` of the resourceVersion it was
//! planned from and marks the group done for the Restore; a replica whose
//! patch lost the race reads the group again and finds it done. Events have
//! names derived from the Restore's UID, so a second create is refused.

pub mod plan;
pub mod report;
pub mod view;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Event as CoreEvent;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, discovery};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::facts::mapping_cache::list_configmaps;
use crate::facts::restore_cache::restore_resource;
use crate::facts::unrecognised::Unrecognised;
use crate::facts::watched::list_all;
use crate::facts::{MappingFacts, RestoreInfo};
use crate::metrics::{CompanionAction, Metrics};
use crate::vmop::mapping;
use crate::vmop::{self, RESTORE_NAME_LABEL};
use plan::{GroupPlan, plan_group};
use report::{Report, build_report};
use view::{FINAL_PHASES, Namespace, ObjectState, ObjectWire, RestoreRef};

/// The `component` of the Events the companion writes.
pub const COMPONENT: &str = "velero-vm-restore-webhook";
/// The Event on a Restore whose labelled creates came from a user the
/// webhook does not take for Velero.
pub const UNRECOGNISED_REASON: &str = "VeleroIdentityUnrecognised";

/// The Event reason on a Restore whose mapping ConfigMaps are malformed.
pub const MAPPING_INVALID_REASON: &str = "VMRestoreMappingInvalid";

/// The Event reason on a Failed Restore whose groups the companion left alone.
pub const FAILED_LEFT_REASON: &str = "VMRestoreFailedGroupsLeft";

#[derive(Debug, Error)]
pub enum CompanionError {
    #[error("Velero Restore {0} not found")]
    RestoreNotFound(String),
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}: {message}")]
    List { what: String, message: String },
    #[error(
        "Restore {restore}: VM Operator is still creating members of {groups}; their boot order starts once it has (or after --companion-start-wait)"
    )]
    MembersBeingCreated { restore: String, groups: String },
    #[error(
        "VirtualMachineGroup {namespace}/{name} kept changing under the companion; tried 3 times"
    )]
    KeptChanging { namespace: String, name: String },
}

fn api_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> CompanionError {
    let what = what.into();
    move |source| CompanionError::Api { what, source }
}

#[derive(Debug, Clone)]
pub struct CompanionSettings {
    pub velero_namespace: String,
    /// Prune missing members unless the Restore's annotation says otherwise.
    pub prune_default: bool,
    /// Restores finished longer ago are left alone.
    pub max_age: Duration,
    pub retry: Duration,
    /// `reportingInstance` of Events (the pod name).
    pub instance: String,
    /// How long after the Restore finished a held group waits for VM
    /// Operator to finish creating its members before it is started.
    pub start_wait: Duration,
}

/// The served VirtualMachine and VirtualMachineGroup resources, if any.
pub struct VmopResources {
    pub vm: ApiResource,
    pub group: ApiResource,
}

pub async fn discover(client: &Client) -> Result<Option<VmopResources>, CompanionError> {
    match discovery::group(client, vmop::GROUP).await {
        Ok(api_group) => Ok(api_group
            .recommended_kind("VirtualMachine")
            .zip(api_group.recommended_kind("VirtualMachineGroup"))
            .map(|((vm, _), (group, _))| VmopResources { vm, group })),
        Err(kube::Error::Discovery(kube::error::DiscoveryError::MissingApiGroup(_))) => Ok(None),
        Err(err) => Err(CompanionError::Api {
            what: "discovery of vmoperator.vmware.com".into(),
            source: err,
        }),
    }
}

/// What happened to one Restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Acted on and reported (by this replica or another).
    Done { groups: usize, events: usize },
    /// Not final, too old, or nothing of VM Operator's to do.
    Skipped(&'static str),
}

pub struct Companion {
    client: Client,
    settings: CompanionSettings,
    metrics: Option<Arc<Metrics>>,
    /// The webhook's watch of the mapping ConfigMaps, when it runs in this
    /// process: asked instead of listing them again for each Restore.
    mappings: Option<Arc<dyn MappingFacts>>,
    /// The users the webhook of this process saw make a restore's labelled
    /// creates that are not Velero by its settings: one Warning Event each.
    unrecognised: Option<Arc<Unrecognised>>,
    /// Whether each Restore's mappings could be used, as seen while it ran,
    /// by Restore UID (forgotten after `max_age`).
    while_running: Mutex<HashMap<String, (std::time::Instant, Option<String>)>>,
}

impl Companion {
    pub fn new(
        client: Client,
        settings: CompanionSettings,
        metrics: Option<Arc<Metrics>>,
    ) -> Arc<Companion> {
        Companion::with_mappings(client, settings, metrics, None, None)
    }

    /// The same, reading each Restore's mappings from `mappings` (the
    /// webhook's watch) while it is synced.
    pub fn with_mappings(
        client: Client,
        settings: CompanionSettings,
        metrics: Option<Arc<Metrics>>,
        mappings: Option<Arc<dyn MappingFacts>>,
        unrecognised: Option<Arc<Unrecognised>>,
    ) -> Arc<Companion> {
        Arc::new(Companion {
            client,
            settings,
            metrics,
            mappings,
            unrecognised,
            while_running: Mutex::default(),
        })
    }

    /// Watches Restores and handles each once it is final. Runs forever.
    pub async fn run(self: Arc<Self>) {
        let (queue, mut next) = mpsc::unbounded_channel::<String>();
        // Restore UIDs handled by this process (forgotten after max_age: a
        // Restore that old is skipped anyway), and names queued now.
        let handled: Arc<Mutex<HashMap<String, std::time::Instant>>> = Arc::default();
        let queued: Arc<Mutex<HashSet<String>>> = Arc::default();
        let worker = {
            let this = self.clone();
            let (handled, queued, queue) = (handled.clone(), queued.clone(), queue.clone());
            async move {
                while let Some(name) = next.recv().await {
                    if let Ok(mut queued) = queued.lock() {
                        queued.remove(&name);
                    }
                    match this.handle(&name).await {
                        Ok((uid, outcome)) => {
                            if let Ok(mut handled) = handled.lock() {
                                let max_age = this.settings.max_age;
                                handled.retain(|_, at| at.elapsed() < max_age);
                                handled.insert(uid, std::time::Instant::now());
                            }
                            if let Handled::Done { groups, events } = outcome {
                                info!(restore = %name, groups, events, "restore companion finished with this Restore");
                            }
                        }
                        Err(CompanionError::RestoreNotFound(_)) => {}
                        Err(waiting @ CompanionError::MembersBeingCreated { .. }) => {
                            info!(restore = %name, "{waiting}");
                            let (queue, retry) = (queue.clone(), this.settings.retry);
                            tokio::spawn(async move {
                                tokio::time::sleep(retry).await;
                                let _ = queue.send(name);
                            });
                        }
                        Err(err) => {
                            warn!(restore = %name, error = %err, retry_s = this.settings.retry.as_secs_f64(),
                                "restore companion failed; it tries again");
                            this.count(CompanionAction::Error);
                            let (queue, retry) = (queue.clone(), this.settings.retry);
                            tokio::spawn(async move {
                                tokio::time::sleep(retry).await;
                                let _ = queue.send(name);
                            });
                        }
                    }
                }
            }
        };
        tokio::spawn(worker);

        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &self.settings.velero_namespace,
            &restore_resource(),
        );
        let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            let restore = match event {
                Ok(Event::Apply(restore) | Event::InitApply(restore)) => restore,
                Ok(_) => continue,
                Err(err) => {
                    warn!(error = %err, "restore companion: watching Velero Restores failed; retrying");
                    continue;
                }
            };
            let value = serde_json::to_value(&restore).unwrap_or_default();
            let phase = value.pointer("/status/phase").and_then(Value::as_str);
            let uid = restore.metadata.uid.clone().unwrap_or_default();
            let Some(name) = restore.metadata.name.clone() else {
                continue;
            };
            if !phase.is_some_and(|phase| FINAL_PHASES.contains(&phase)) {
                // Still running: note whether its mappings can be used now,
                // while they are the ones it runs with.
                self.record_mappings(&uid, &value).await;
                continue;
            }
            if handled
                .lock()
                .map(|h| h.contains_key(&uid))
                .unwrap_or(false)
            {
                continue;
            }
            let newly_queued = queued
                .lock()
                .map(|mut queued| queued.insert(name.clone()))
                .unwrap_or(false);
            if newly_queued {
                let _ = queue.send(name);
            }
        }
    }

    fn count(&self, action: CompanionAction) {
        if let Some(metrics) = &self.metrics {
            metrics.companion_action(action);
        }
    }

    /// Handles one Restore by name: returns its UID and what was done.
    pub async fn handle(&self, name: &str) -> Result<(String, Handled), CompanionError> {
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &self.settings.velero_namespace,
            &restore_resource(),
        );
        let object = api
            .get_opt(name)
            .await
            .map_err(api_error(format!("reading Velero Restore {name}")))?
            .ok_or_else(|| CompanionError::RestoreNotFound(name.to_string()))?;
        let value = serde_json::to_value(&object).unwrap_or_default();
        let restore = restore_ref(&value);
        let uid = restore.uid.clone();
        if !FINAL_PHASES.contains(&restore.phase.as_str()) {
            return Ok((String::new(), Handled::Skipped("not finished")));
        }
        if restore.phase == "FailedValidation" {
            return Ok((
                uid,
                Handled::Skipped("failed validation: nothing was restored"),
            ));
        }
        if finished_long_ago(&value, self.settings.max_age) {
            return Ok((
                uid,
                Handled::Skipped("finished longer ago than --companion-max-age"),
            ));
        }
        let Some(resources) = discover(&self.client).await? else {
            return Ok((uid, Handled::Skipped("VM Operator's API is not served")));
        };
        let prune = RestoreInfo::from_object(&value)
            .prune_missing_members()
            .unwrap_or(self.settings.prune_default);
        // Velero gave up part-way: what is missing may come with the next
        // try, so nothing is pruned or started; the groups stay held and the
        // report says so.
        let failed = restore.phase == "Failed";

        let restored_groups: Vec<ObjectState> = list_labelled(
            &self.client,
            &resources.group,
            "VirtualMachineGroup",
            &restore,
        )
        .await?
        .into_iter()
        .filter(|group| group.restored_by(&restore))
        .collect();
        let namespaces: HashSet<&str> = restored_groups
            .iter()
            .map(|group| group.namespace.as_str())
            .collect();
        let mut acted = 0;
        let mut waiting: Vec<String> = Vec::new();
        let mut started_early: Vec<(ObjectState, Vec<String>)> = Vec::new();
        let namespaces = if failed { HashSet::new() } else { namespaces };
        let held = restored_groups.len();
        for namespace in namespaces {
            let mut view = read_namespace(&self.client, &resources, namespace).await?;
            let mut names: Vec<&str> = restored_groups
                .iter()
                .filter(|group| group.namespace == namespace)
                .map(|group| group.name.as_str())
                .collect();
            names.sort_unstable();
            for name in names {
                // A group about to be started whose members VM Operator is
                // still creating waits (within --companion-start-wait):
                // a member created after its power-on time boots late.
                if let Some(group) = view.groups.get(name)
                    && !failed
                    && group.held_for_boot_order()
                    && view.powered_ancestor(group).is_none()
                {
                    let creating = view.creating_under(group);
                    if !creating.is_empty() {
                        if finished_ago(&value).is_none_or(|ago| ago < self.settings.start_wait) {
                            waiting.push(format!("{namespace}/{name} ({})", creating.join(",")));
                            continue;
                        }
                        started_early.push((group.clone(), creating));
                    }
                }
                if self
                    .handle_group(&restore, prune, &resources, &mut view, name)
                    .await?
                {
                    acted += 1;
                }
            }
        }

        if !waiting.is_empty() {
            return Err(CompanionError::MembersBeingCreated {
                restore: restore.name.clone(),
                groups: waiting.join(", "),
            });
        }
        for (group, creating) in started_early {
            let message = format!(
                "started {}s after Velero Restore {} finished although VM Operator was still creating {}: \
                 they may power on later than the boot order's delays say",
                self.settings.start_wait.as_secs(),
                restore.name,
                creating.join(", ")
            );
            warn!(restore = %restore.name, object = %group.label(), members = %creating.join(","),
                "companion started a group whose members were still being created");
            let event = event_for(
                &EventTarget {
                    api_version: &resources.group.api_version,
                    kind: "VirtualMachineGroup",
                    namespace: &group.namespace,
                    name: &group.name,
                    uid: &group.uid,
                },
                &restore.uid,
                "StartedBeforeMembersCreated",
                "",
                &message,
                "Warning",
                &self.settings.instance,
            );
            self.create_event(event).await?;
        }
        let report = read_report(&self.client, &resources, &restore).await?;
        let mut events = 0;
        for (reason, subject, message) in report.event_lines() {
            let event = self.restore_event(&restore, reason, &subject, &message, "Normal");
            if self.create_event(event).await? {
                events += 1;
            }
        }
        if failed && held > 0 {
            let message = format!(
                "Velero Restore {} failed: its {held} VirtualMachineGroups were left as restored (none pruned, none \
                 started; held ones stay PoweredOff). Fix what failed and restore again (existing objects are \
                 skipped), or set spec.powerState on the top groups yourself",
                restore.name
            );
            let event = self.restore_event(&restore, FAILED_LEFT_REASON, "", &message, "Warning");
            if self.create_event(event).await? {
                events += 1;
            }
        }
        if let Some(problem) = self.mapping_problem(&restore.uid, &value).await {
            let message = format!(
                "the mappings for this restore cannot be used, so the webhook denied each of its VirtualMachines: {problem}"
            );
            let event =
                self.restore_event(&restore, MAPPING_INVALID_REASON, "", &message, "Warning");
            if self.create_event(event).await? {
                events += 1;
            }
        }
        let users = self
            .unrecognised
            .as_ref()
            .map(|seen| seen.take(&restore.name))
            .unwrap_or_default();
        for (index, user) in users.iter().enumerate() {
            let message = format!(
                "this restore's objects were created by {user}, which the webhook does not take for Velero \
                 (--velero-user, --velero-group): Velero's status writes and updates from {user} skip the webhook, \
                 so a restored status can keep the original's uniqueID. If Velero runs as {user}: helm upgrade … \
                 --set-json 'webhook.velero.users=[\"{user}\"]'"
            );
            let event =
                self.restore_event(&restore, UNRECOGNISED_REASON, user, &message, "Warning");
            match self.create_event(event).await {
                Ok(true) => events += 1,
                Ok(false) => {}
                Err(err) => {
                    // Kept for the retry of this Restore.
                    if let Some(seen) = &self.unrecognised {
                        seen.restore_users(&restore.name, &users[index..]);
                    }
                    return Err(err);
                }
            }
        }
        if events > 0 {
            self.count(CompanionAction::Reported);
        }
        Ok((
            uid,
            Handled::Done {
                groups: acted,
                events,
            },
        ))
    }

    /// An Event on the Restore itself.
    fn restore_event(
        &self,
        restore: &RestoreRef,
        reason: &str,
        subject: &str,
        message: &str,
        event_type: &str,
    ) -> CoreEvent {
        event_for(
            &EventTarget {
                api_version: "velero.io/v1",
                kind: "Restore",
                namespace: &self.settings.velero_namespace,
                name: &restore.name,
                uid: &restore.uid,
            },
            &restore.uid,
            reason,
            subject,
            message,
            event_type,
            &self.settings.instance,
        )
    }

    /// Why the restore's mapping ConfigMaps cannot be used, if they could
    /// not: as this replica saw them while the restore ran (recorded when it
    /// first saw the Restore unfinished), or, when it did not see that (it
    /// started later), as they are now, which the message says.
    async fn mapping_problem(&self, uid: &str, restore: &Value) -> Option<String> {
        if let Some(seen) = self.recorded_mappings(uid) {
            return seen;
        }
        self.current_mapping_problem(restore).await.map(|problem| {
            format!(
                "{problem} (as the ConfigMaps are now: this replica did not see the restore run)"
            )
        })
    }

    /// What the mappings were while the Restore ran, if recorded.
    fn recorded_mappings(&self, uid: &str) -> Option<Option<String>> {
        self.while_running
            .lock()
            .ok()?
            .get(uid)
            .map(|(_, problem)| problem.clone())
    }

    /// Records the mappings' state for a Restore seen unfinished, once.
    async fn record_mappings(&self, uid: &str, restore: &Value) {
        if uid.is_empty() || self.recorded_mappings(uid).is_some() {
            return;
        }
        let problem = self.current_mapping_problem(restore).await;
        if let Ok(mut seen) = self.while_running.lock() {
            let max_age = self.settings.max_age;
            seen.retain(|_, (at, _)| at.elapsed() < max_age);
            seen.insert(uid.to_string(), (std::time::Instant::now(), problem));
        }
    }

    /// Why the mapping ConfigMaps cannot be used now, if they cannot: the
    /// same selection the webhook makes, from its watch, or read again now.
    /// A failed read is logged, not reported.
    async fn current_mapping_problem(&self, restore: &Value) -> Option<String> {
        if let Some(mappings) = self.mappings.as_ref().filter(|m| m.is_synced()) {
            let info = RestoreInfo::from_object(restore);
            return mappings
                .for_restore(Some(&info))
                .err()
                .map(|err| err.to_string());
        }
        let maps = match list_configmaps(&self.client, &self.settings.velero_namespace).await {
            Ok(maps) => maps,
            Err(err) => {
                warn!(error = %err, namespace = %self.settings.velero_namespace,
                    "cannot list ConfigMaps to check the restore's mappings");
                return None;
            }
        };
        let info = RestoreInfo::from_object(restore);
        let named = info
            .annotations
            .get(mapping::MAPPINGS_ANNOTATION)
            .map(String::as_str);
        mapping::select(&maps, &self.settings.velero_namespace, named)
            .err()
            .map(|err| err.to_string())
    }

    /// Plans, patches and records one group; re-reads it when another writer
    /// got there first. Returns whether this replica changed it.
    async fn handle_group(
        &self,
        restore: &RestoreRef,
        prune: bool,
        resources: &VmopResources,
        view: &mut Namespace,
        name: &str,
    ) -> Result<bool, CompanionError> {
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            namespace_of(view, name),
            &resources.group,
        );
        let namespace = namespace_of(view, name).to_string();
        for _ in 0..3 {
            let Some(group) = view.groups.get(name).cloned() else {
                return Ok(false);
            };
            let Some(plan) = plan_group(restore, prune, &group, view) else {
                return Ok(false);
            };
            let patch: json_patch::Patch = serde_json::from_value(Value::Array(plan.patch.clone()))
                .map_err(|err| CompanionError::Api {
                    what: format!("building the patch of VirtualMachineGroup {namespace}/{name}"),
                    source: kube::Error::SerdeError(err),
                })?;
            match api
                .patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
                .await
            {
                Ok(_) => {
                    self.record(restore, &resources.group.api_version, &group, &plan)
                        .await?;
                    return Ok(true);
                }
                // The resourceVersion test failed, or the group went away:
                // read it again and plan from what is there now.
                Err(kube::Error::Api(status)) if [404, 409, 422].contains(&status.code) => {
                    match api.get_opt(name).await.map_err(api_error(format!(
                        "reading VirtualMachineGroup {namespace}/{name}"
                    )))? {
                        Some(fresh) => {
                            let value = serde_json::to_value(&fresh).unwrap_or_default();
                            let fresh = ObjectState::from_value("VirtualMachineGroup", &value);
                            if fresh.resource_version == group.resource_version {
                                // Not a race: the API server refused the change.
                                return Err(CompanionError::Api {
                                    what: format!(
                                        "patching VirtualMachineGroup {namespace}/{name}"
                                    ),
                                    source: kube::Error::Api(status),
                                });
                            }
                            view.groups.insert(name.to_string(), fresh);
                        }
                        None => {
                            view.groups.remove(name);
                            return Ok(false);
                        }
                    }
                }
                Err(err) => {
                    return Err(CompanionError::Api {
                        what: format!("patching VirtualMachineGroup {namespace}/{name}"),
                        source: err,
                    });
                }
            }
        }
        Err(CompanionError::KeptChanging {
            namespace,
            name: name.to_string(),
        })
    }

    /// One log line and one Event on the group per thing done.
    async fn record(
        &self,
        restore: &RestoreRef,
        api_version: &str,
        group: &ObjectState,
        plan: &GroupPlan,
    ) -> Result<(), CompanionError> {
        let target = EventTarget {
            api_version,
            kind: "VirtualMachineGroup",
            namespace: &group.namespace,
            name: &group.name,
            uid: &group.uid,
        };
        let object = group.label();
        let mut lines = Vec::new();
        if !plan.pruned.is_empty() {
            let members: Vec<String> = plan.pruned.iter().map(|m| m.describe()).collect();
            let message = format!(
                "Velero Restore {} finished without these members, so VM Operator could never place the group: removed from spec.bootOrder: {}",
                restore.name,
                members.join(", ")
            );
            info!(restore = %restore.name, object = %object, members = %members.join(","), "companion pruned members missing after the restore");
            self.count(CompanionAction::Pruned);
            lines.push(("MembersPruned", message, "Warning"));
        }
        if let Some(state) = &plan.started {
            let message = format!(
                "Velero Restore {} finished: set spec.powerState to {state}; VM Operator powers the members on in boot order from now",
                restore.name
            );
            info!(restore = %restore.name, object = %object, power_state = %state, "companion started the group in boot order");
            self.count(CompanionAction::Started);
            lines.push(("StartedInBootOrder", message, "Normal"));
        }
        if let Some(ancestor) = &plan.released_under {
            info!(restore = %restore.name, object = %object, top = %ancestor,
                "companion released the group's power hold: its power comes from the top of its tree");
            self.count(CompanionAction::Released);
        }
        for (reason, message, kind) in lines {
            let event = event_for(
                &target,
                &restore.uid,
                reason,
                "",
                &message,
                kind,
                &self.settings.instance,
            );
            self.create_event(event).await?;
        }
        Ok(())
    }

    /// Creates an Event; `false` when one of that name exists already.
    async fn create_event(&self, event: CoreEvent) -> Result<bool, CompanionError> {
        let namespace = event.metadata.namespace.clone().unwrap_or_default();
        let api: Api<CoreEvent> = Api::namespaced(self.client.clone(), &namespace);
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(err) => Err(CompanionError::Api {
                what: format!("creating an Event in {namespace}"),
                source: err,
            }),
        }
    }
}

fn namespace_of<'a>(view: &'a Namespace, name: &str) -> &'a str {
    view.groups
        .get(name)
        .map(|group| group.namespace.as_str())
        .unwrap_or_default()
}

pub fn restore_ref(value: &Value) -> RestoreRef {
    let text = |pointer: &str| {
        value
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    RestoreRef {
        name: text("/metadata/name"),
        uid: text("/metadata/uid"),
        phase: text("/status/phase"),
    }
}

/// How long ago the Restore finished, if it says.
fn finished_ago(value: &Value) -> Option<Duration> {
    let completed = value
        .pointer("/status/completionTimestamp")
        .and_then(Value::as_str)
        .and_then(|text| text.parse::<k8s_openapi::jiff::Timestamp>().ok())?;
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(completed);
    Some(Duration::from_secs(age.as_secs().max(0) as u64))
}

fn finished_long_ago(value: &Value, max_age: Duration) -> bool {
    let Some(completed) = value
        .pointer("/status/completionTimestamp")
        .and_then(Value::as_str)
        .and_then(|text| text.parse::<k8s_openapi::jiff::Timestamp>().ok())
    else {
        return false;
    };
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(completed);
    age.as_secs() > 0 && age.unsigned_abs() > max_age
}

/// The objects of `kind` the Restore labelled, as the companion reads them:
/// only the restore label, our own annotations and a few spec fields are
/// kept, one page at a time.
async fn list_labelled(
    client: &Client,
    resource: &ApiResource,
    kind: &str,
    restore: &RestoreRef,
) -> Result<Vec<ObjectState>, CompanionError> {
    let selector = format!("{RESTORE_NAME_LABEL}={}", restore.label());
    list_states(client, resource, kind, None, Some(&selector))
        .await
        .map_err(|message| CompanionError::List {
            what: format!("listing {kind}s of Restore {}", restore.name),
            message,
        })
}

/// Objects of `kind` as [`ObjectState`]s, decoded as [`ObjectWire`]s; a PVC
/// by its metadata, the others with the few spec fields read.
async fn list_states(
    client: &Client,
    resource: &ApiResource,
    kind: &str,
    namespace: Option<&str>,
    selector: Option<&str>,
) -> Result<Vec<ObjectState>, String> {
    let metadata_only = kind == "PersistentVolumeClaim";
    let listed: Vec<ObjectWire> =
        list_all(client, resource, namespace, selector, metadata_only).await?;
    Ok(listed
        .into_iter()
        .map(|wire| ObjectState::from_wire(kind, wire))
        .collect())
}

/// Every group, and the names of every VM, in one namespace.
async fn read_namespace(
    client: &Client,
    resources: &VmopResources,
    namespace: &str,
) -> Result<Namespace, CompanionError> {
    let groups = list_states(
        client,
        &resources.group,
        "VirtualMachineGroup",
        Some(namespace),
        None,
    )
    .await
    .map_err(|message| CompanionError::List {
        what: format!("listing VirtualMachineGroups in {namespace}"),
        message,
    })?;
    let vms = list_states(
        client,
        &resources.vm,
        "VirtualMachine",
        Some(namespace),
        None,
    )
    .await
    .map_err(|message| CompanionError::List {
        what: format!("listing VirtualMachines in {namespace}"),
        message,
    })?;
    let mut view = Namespace::new(groups, vms.iter().map(|vm| vm.name.as_str()));
    view.creating = vms
        .iter()
        .filter(|vm| vm.creating)
        .map(|vm| vm.name.clone())
        .collect();
    Ok(view)
}

/// The report of one Restore, read from the cluster.
pub async fn read_report(
    client: &Client,
    resources: &VmopResources,
    restore: &RestoreRef,
) -> Result<Report, CompanionError> {
    let mut restored = list_labelled(client, &resources.vm, "VirtualMachine", restore).await?;
    restored.extend(list_labelled(client, &resources.group, "VirtualMachineGroup", restore).await?);
    let pvc = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("", "v1", "PersistentVolumeClaim"),
        "persistentvolumeclaims",
    );
    restored.extend(list_labelled(client, &pvc, "PersistentVolumeClaim", restore).await?);
    let namespaces: HashSet<String> = restored
        .iter()
        .filter(|object| object.kind == "VirtualMachine")
        .map(|object| object.namespace.clone())
        .collect();
    let mut views = HashMap::new();
    for namespace in namespaces {
        let view = read_namespace(client, resources, &namespace).await?;
        views.insert(namespace, view);
    }
    Ok(build_report(restore, &restored, &views))
}

/// `report RESTORE`: the Restore's report, from the cluster.
pub async fn report(
    client: &Client,
    velero_namespace: &str,
    name: &str,
) -> Result<Report, CompanionError> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), velero_namespace, &restore_resource());
    let object = api
        .get_opt(name)
        .await
        .map_err(api_error(format!(
            "reading Velero Restore {name} in namespace {velero_namespace}"
        )))?
        .ok_or_else(|| CompanionError::RestoreNotFound(format!("{velero_namespace}/{name}")))?;
    let restore = restore_ref(&serde_json::to_value(&object).unwrap_or_default());
    match discover(client).await? {
        Some(resources) => read_report(client, &resources, &restore).await,
        None => Ok(build_report(&restore, &[], &HashMap::new())),
    }
}

struct EventTarget<'a> {
    api_version: &'a str,
    kind: &'a str,
    namespace: &'a str,
    name: &'a str,
    uid: &'a str,
}

/// An Event whose name follows from the target, the Restore's UID, the
/// reason and the subject (what tells apart lines of one reason, such as the
/// kind of a `VMRestoreCleaned` line; empty where a reason has one line): the
/// same fact is recorded once, whoever records it.
/// The start of an Event's name: the target's name cut to 200 characters
/// without a trailing `.` or `-` (a DNS subdomain cannot have `-.` or `..`,
/// and the API server refuses the Event otherwise).
fn event_name_prefix(name: &str) -> String {
    let cut: String = name.chars().take(200).collect();
    let trimmed = cut.trim_end_matches(['.', '-']);
    if trimmed.is_empty() {
        "object".to_string()
    } else {
        trimmed.to_string()
    }
}

fn event_for(
    target: &EventTarget,
    restore_uid: &str,
    reason: &str,
    subject: &str,
    message: &str,
    event_type: &str,
    instance: &str,
) -> CoreEvent {
    let mut key = format!(
        "{}/{}/{}/{restore_uid}/{reason}",
        target.kind, target.namespace, target.name
    );
    if !subject.is_empty() {
        key.push('/');
        key.push_str(subject);
    }
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let prefix = event_name_prefix(target.name);
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let mut involved = json!({
        "apiVersion": target.api_version, "kind": target.kind,
        "namespace": target.namespace, "name": target.name,
    });
    if !target.uid.is_empty() {
        involved["uid"] = json!(target.uid);
    }
    serde_json::from_value(json!({
        "metadata": {"name": format!("{prefix}.vmrw-{hex}"), "namespace": target.namespace},
        "involvedObject": involved,
        "reason": reason,
        "message": message,
        "type": event_type,
        "count": 1,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": instance,
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_depend_on_target_restore_reason_and_subject_only() {
        let target = EventTarget {
            api_version: "velero.io/v1",
            kind: "Restore",
            namespace: "velero",
            name: "r1",
            uid: "u1",
        };
        let cleaned = |uid, subject, message, instance| {
            event_for(
                &target,
                uid,
                "VMRestoreCleaned",
                subject,
                message,
                "Normal",
                instance,
            )
        };
        let a = cleaned("u1", "VirtualMachine", "one", "pod-a");
        let b = cleaned("u1", "VirtualMachine", "two", "pod-b");
        let c = cleaned("u2", "VirtualMachine", "one", "pod-a");
        // One Event per kind: the PVC line must not take the VM line's name.
        let d = cleaned("u1", "PersistentVolumeClaim", "one", "pod-a");
        assert_eq!(a.metadata.name, b.metadata.name);
        assert_ne!(a.metadata.name, c.metadata.name);
        assert_ne!(a.metadata.name, d.metadata.name);
        assert_eq!(a.involved_object.uid.as_deref(), Some("u1"));
        assert_eq!(a.reason.as_deref(), Some("VMRestoreCleaned"));
        assert!(a.first_timestamp.is_some(), "timestamps parse");
    }

    #[test]
    fn event_names_are_valid_whatever_the_target_s_name() {
        // A name whose 200th character is a dash, then a dot: cut there,
        // `name-.vmrw-…` or `name..vmrw-…` would be refused by the API server.
        for filler in ["-", "."] {
            let name = format!("{}{filler}{}", "a".repeat(199), "b".repeat(50));
            let target = EventTarget {
                api_version: "v1",
                kind: "VirtualMachineGroup",
                namespace: "prod",
                name: &name,
                uid: "u",
            };
            let event = event_for(&target, "r", "StartedInBootOrder", "", "m", "Normal", "pod");
            let event_name = event.metadata.name.unwrap();
            assert!(event_name.len() <= 253, "{event_name}");
            assert!(
                !event_name.contains("-.") && !event_name.contains(".."),
                "{event_name}"
            );
            assert!(event_name.starts_with(&"a".repeat(199)), "{event_name}");
        }
    }

    #[test]
    fn old_restores_are_left_alone() {
        let old = json!({"status": {"completionTimestamp": "2020-01-01T00:00:00Z"}});
        assert!(finished_long_ago(&old, Duration::from_secs(3600)));
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let recent = json!({"status": {"completionTimestamp": now}});
        assert!(!finished_long_ago(&recent, Duration::from_secs(3600)));
        assert!(!finished_long_ago(&json!({}), Duration::from_secs(1)));
    }
}
