//! The facts a review needs from the cluster, behind small traits: does a
//! VirtualMachineGroup exist, what does the Velero Restore say, and do the
//! objects a VM refers to exist in the target. Each trait has a live
//! implementation over the API server ([`group_cache::GroupCache`],
//! [`restore_cache::RestoreCache`], [`live_refs::LiveRefs`]) and one given by
//! hand ([`given`]: the `review` command, `serve --no-kube` and the tests), so
//! the production types carry no test seams.
//!
//! Callers bound every call with the request's [`crate::deadline::Deadline`]:
//! dropping a future cancels the live GET behind it.
//!
//! Arrows: the webhook, the companion and the commands use this module; it
//! uses only [`crate::vmop`] and [`crate::settings`]. Inside it, every file
//! uses this one (the traits) and [`restore`], never the other way.

pub mod given;
pub mod group_cache;
pub mod live_refs;
pub mod mapping_cache;
pub mod restore;
pub mod restore_cache;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::watch;

pub use restore::RestoreInfo;

use std::sync::Arc;

use crate::vmop::mapping::{MappingError, Mappings};
use crate::vmop::{ClusterRef, RefKind};

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

pub trait GroupFacts: Send + Sync {
    /// Whether the source can answer yet (readiness).
    fn is_synced(&self) -> bool;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether the group is known now (no I/O).
    fn contains(&self, namespace: &str, name: &str) -> bool;
    /// Resolves once the group is known; never, if it never comes. Woken by
    /// changes, not by polling. `'static`, so concurrent waits can share it.
    fn appeared(&self, namespace: &str, name: &str) -> BoxFuture<'static, ()>;
    /// One live check of a miss: a cache can lag behind the API server.
    fn confirm<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, GroupPresence>;
    /// An annotation of a known group (no I/O): whether its power is held.
    fn annotation(&self, namespace: &str, name: &str, key: &str) -> Option<String>;
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

/// Whether the objects a VM refers to exist in the target cluster (zones,
/// class instances, images): VM Operator refuses a VM naming a missing one.
pub trait RefFacts: Send + Sync {
    fn exists<'a>(
        &'a self,
        namespace: &'a str,
        reference: &'a ClusterRef,
    ) -> BoxFuture<'a, GroupPresence>;

    /// What the namespace has instead, for a denial's message (only asked
    /// for a reference that is missing). Empty when nobody knows.
    fn alternatives<'a>(
        &'a self,
        _namespace: &'a str,
        _kind: RefKind,
    ) -> BoxFuture<'a, Vec<String>> {
        futures::future::ready(Vec::new()).boxed()
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
