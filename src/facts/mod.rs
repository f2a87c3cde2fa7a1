//! The facts a review needs from the cluster, behind small traits: does a
//! VirtualMachineGroup exist, what does the Velero Restore say, and what does
//! the target namespace have that a VM refers to. Each trait has a live
//! implementation over the API server ([`group_cache::GroupCache`],
//! [`restore_cache::RestoreCache`], [`targets::TargetCache`]), kept current by
//! watches ([`watched`], [`discovery`]) so that a warm review asks the API
//! server nothing, and one given by hand ([`given`]: the `review` command,
//! `serve --no-kube` and the tests), so the production types carry no test
//! seams.
//!
//! Callers bound every call with the request's [`crate::deadline::Deadline`]:
//! dropping a future cancels the live request behind it.
//!
//! Arrows: the webhook, the companion and the commands use this module; it
//! uses only [`crate::vmop`], [`crate::settings`] and [`crate::metrics`].
//! Inside it, every file uses this one (the traits) and [`restore`], never
//! the other way.

pub mod api_requests;
pub mod cache_health;
pub mod discovery;
pub mod given;
pub mod group_cache;
pub mod mapping_cache;
pub mod restore;
pub mod restore_cache;
pub mod targets;
pub mod watched;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::watch;

pub use restore::RestoreInfo;

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::vmop::mapping::{MappingError, Mappings};
use crate::vmop::targets::{Collection, TargetView};

/// How a live check of a group ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupPresence {
    Present,
    Missing,
    /// The live GET that should confirm a miss failed; the message says why.
    Unknown(String),
}

/// How a Restore lookup ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RestoreLookup {
    Found(RestoreInfo),
    #[default]
    NotFound,
    /// The API server could not be asked, or refused (RBAC); the message says why.
    Failed(String),
}

/// What the metrics report of one watched cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheStats {
    /// `plural.group` of the kind.
    pub resource: &'static str,
    pub objects: usize,
    pub ready: bool,
    /// Reads answered by a live list because the cache was not trusted.
    pub live_reads: u64,
    /// Lists and watches that failed.
    pub errors: u64,
    /// Live lists made to confirm a miss.
    pub confirmations: u64,
}

/// What a review needs to know of a VirtualMachineGroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupInfo {
    /// It holds its power until the restore ends (it carries
    /// [`crate::vmop::power::POWER_HELD_ANNOTATION`]).
    pub holds_power: bool,
}

/// How a check of a group ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupLookup {
    Found(GroupInfo),
    Missing,
    /// The live GET that should confirm a miss failed; the message says why.
    Unknown(String),
}

pub trait GroupFacts: Send + Sync {
    /// Whether the source can answer yet (readiness).
    fn is_synced(&self) -> bool;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The group, if it is known now (no I/O).
    fn get(&self, namespace: &str, name: &str) -> Option<GroupInfo>;
    fn contains(&self, namespace: &str, name: &str) -> bool {
        self.get(namespace, name).is_some()
    }
    /// Resolves once the group is known; never, if it never comes. Woken by
    /// changes, not by polling. `'static`, so concurrent waits can share it.
    fn appeared(&self, namespace: &str, name: &str) -> BoxFuture<'static, ()>;
    /// The group from the cache, or one live check of a miss (a cache can
    /// lag behind the API server): what is known of the group comes from
    /// whichever found it.
    fn confirm<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, GroupLookup>;
    /// The watched caches behind it, for the metrics.
    fn stats(&self) -> Vec<CacheStats> {
        Vec::new()
    }
}

pub trait RestoreFacts: Send + Sync {
    fn is_synced(&self) -> bool;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Velero's namespace, where Restores live (for messages).
    fn namespace(&self) -> &str;
    /// The Restore whose `velero.io/restore-name` label value is `label`.
    fn lookup<'a>(&'a self, label: &'a str) -> BoxFuture<'a, RestoreLookup>;
}

/// What a target namespace has that VMs refer to (zones, classes and their
/// instances, images, storage, networks): VM Operator refuses, or never
/// deploys, a VM naming what the namespace lacks. The rules that resolve a
/// reference against it are [`crate::vmop::targets`]'s.
pub trait TargetFacts: Send + Sync {
    /// Whether the source can answer yet (readiness).
    fn is_synced(&self) -> bool {
        true
    }

    /// The watched caches behind it, for the metrics.
    fn stats(&self) -> Vec<CacheStats> {
        Vec::new()
    }

    /// What `namespace` has of each collection in `needed`, each read once.
    /// The caller bounds the wait.
    fn view<'a>(
        &'a self,
        namespace: &'a str,
        needed: &'a BTreeSet<Collection>,
    ) -> BoxFuture<'a, TargetView>;

    /// What `namespace` has of each collection in `needed`, read live now,
    /// never from a cache: what confirms a miss before a VM is denied or a
    /// reference stripped (a watch can lag behind a create made a moment
    /// ago). By default the same as [`TargetFacts::view`], for sources that
    /// hold no cache. The caller bounds the wait.
    fn confirm_view<'a>(
        &'a self,
        namespace: &'a str,
        needed: &'a BTreeSet<Collection>,
    ) -> BoxFuture<'a, TargetView> {
        self.view(namespace, needed)
    }
}

/// The mappings of a restore into another Supervisor (Velero's
/// change-storage-class ConfigMap and ours), as read now (no I/O).
pub trait MappingFacts: Send + Sync {
    fn is_synced(&self) -> bool;
    /// The mappings `restore` selects (its annotation may name a ConfigMap),
    /// or why they cannot be used.
    fn for_restore(&self, restore: Option<&RestoreInfo>) -> Result<Arc<Mappings>, MappingError>;
}

/// A future that resolves once `known()` holds, re-checked on every change
/// published on `changes`. Subscribed before the first check, so a change
/// between the check and the wait still wakes it.
pub(crate) fn appeared_when(
    mut changes: watch::Receiver<u64>,
    known: impl Fn() -> bool + Send + 'static,
) -> BoxFuture<'static, ()> {
    async move {
        loop {
            changes.borrow_and_update();
            if known() {
                return;
            }
            if changes.changed().await.is_err() {
                // The source is gone: nothing can make the group appear.
                futures::future::pending::<()>().await;
            }
        }
    }
    .boxed()
}
