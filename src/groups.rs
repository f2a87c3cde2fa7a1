//! The VirtualMachineGroup cache and the wait for a group to appear.
//!
//! Lookups come from a kube-rs reflector store of group metadata. Every watch
//! event bumps a counter on a `watch` channel, which is what wakes a waiting
//! review: waits never poll the API server. Before a denial, one live GET
//! confirms the group is really missing, because a reflector can lag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use futures::StreamExt;
use kube::Client;
use kube::api::{Api, DynamicObject, ObjectMeta, PartialObjectMeta, TypeMeta};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::vmop;

type GroupMeta = PartialObjectMeta<DynamicObject>;

/// How a group lookup ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupPresence {
    Present,
    Missing,
    /// The live GET that should confirm a miss failed; the message says why.
    Unknown(String),
}

pub struct GroupCache {
    /// Key type of the store. Lookups must use the same value the writer used,
    /// whichever served version the watch reads.
    store_key: ApiResource,
    store: Store<GroupMeta>,
    /// Only in static mode (the `review` command and tests): feeds the store.
    manual_writer: Mutex<Option<Writer<GroupMeta>>>,
    changed: watch::Sender<u64>,
    synced: AtomicBool,
    /// The served API resource, once discovery found it.
    live: OnceLock<(Client, ApiResource)>,
}

fn store_key() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(vmop::GROUP, "v1alpha2", "VirtualMachineGroup"),
        "virtualmachinegroups",
    )
}

fn group_meta(namespace: &str, name: &str) -> GroupMeta {
    PartialObjectMeta {
        types: Some(TypeMeta {
            api_version: format!("{}/v1alpha2", vmop::GROUP),
            kind: "VirtualMachineGroup".into(),
        }),
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        _phantom: Default::default(),
    }
}

impl GroupCache {
    fn with_store(store: Store<GroupMeta>, manual_writer: Option<Writer<GroupMeta>>) -> GroupCache {
        GroupCache {
            store_key: store_key(),
            store,
            manual_writer: Mutex::new(manual_writer),
            changed: watch::channel(0).0,
            synced: AtomicBool::new(false),
            live: OnceLock::new(),
        }
    }

    /// A cache fed by hand: what `review --group` and the tests use. It is
    /// synced from the start.
    pub fn new_static<'a>(groups: impl IntoIterator<Item = (&'a str, &'a str)>) -> Arc<GroupCache> {
        let writer = Writer::new(store_key());
        let cache = GroupCache::with_store(writer.as_reader(), Some(writer));
        cache.apply(&Event::Init);
        cache.apply(&Event::InitDone);
        for (namespace, name) in groups {
            cache.insert(namespace, name);
        }
        Arc::new(cache)
    }

    fn apply(&self, event: &Event<GroupMeta>) {
        if let Ok(mut guard) = self.manual_writer.lock()
            && let Some(writer) = guard.as_mut()
        {
            writer.apply_watcher_event(event);
        }
        if matches!(event, Event::InitDone) {
            self.synced.store(true, Ordering::SeqCst);
        }
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// Adds a group to a static cache (tests feed the cache this way).
    pub fn insert(&self, namespace: &str, name: &str) {
        self.apply(&Event::Apply(group_meta(namespace, name)));
    }

    /// Removes a group from a static cache.
    pub fn remove(&self, namespace: &str, name: &str) {
        self.apply(&Event::Delete(group_meta(namespace, name)));
    }

    /// A cache fed by a reflector over the cluster's groups. The returned
    /// future runs the watch; it finds the served version by discovery and
    /// counts as synced (empty) while the VirtualMachineGroup API is absent.
    pub fn live(client: Client) -> (Arc<GroupCache>, impl Future<Output = ()> + Send + 'static) {
        let writer = Writer::new(store_key());
        let cache = Arc::new(GroupCache::with_store(writer.as_reader(), None));
        let runner = {
            let cache = cache.clone();
            async move { cache.run(client, writer).await }
        };
        (cache, runner)
    }

    async fn run(self: Arc<Self>, client: Client, writer: Writer<GroupMeta>) {
        let resource = loop {
            match kube::discovery::group(&client, vmop::GROUP).await {
                Ok(api_group) => match api_group.recommended_kind("VirtualMachineGroup") {
                    Some((resource, _)) => break resource,
                    None => {
                        warn!("the VirtualMachineGroup API is not served; VMs cannot name groups")
                    }
                },
                Err(err) => warn!(error = %err, "discovery of vmoperator.vmware.com failed"),
            }
            // Nothing can name a missing API: be ready, and look again later.
            self.synced.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(30)).await;
        };
        info!(version = %resource.version, "watching VirtualMachineGroups");
        let _ = self.live.set((client.clone(), resource.clone()));
        // An Api over PartialObjectMeta lists and watches metadata only.
        let api: Api<GroupMeta> = Api::all_with(client, &resource);
        let stream = reflector::reflector(
            writer,
            watcher::watcher(api, watcher::Config::default()).default_backoff(),
        );
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::InitDone) => {
                    self.synced.store(true, Ordering::SeqCst);
                    info!(
                        groups = self.store.len(),
                        "VirtualMachineGroup cache synced"
                    );
                }
                Ok(_) => {}
                Err(err) => warn!(error = %err, "VirtualMachineGroup watch failed; retrying"),
            }
            self.changed.send_modify(|generation| *generation += 1);
        }
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    pub fn len(&self) -> usize {
        self.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    pub fn contains(&self, namespace: &str, name: &str) -> bool {
        let key = ObjectRef::<GroupMeta>::new_with(name, self.store_key.clone()).within(namespace);
        self.store.get(&key).is_some()
    }

    /// Waits up to `bound` for the group to be in the cache. Returns whether
    /// it is there, and how long the wait took.
    pub async fn wait_for(&self, namespace: &str, name: &str, bound: Duration) -> (bool, Duration) {
        let start = Instant::now();
        let deadline = start + bound;
        let mut changes = self.changed.subscribe();
        loop {
            // Subscribed before the check: an event between the two still wakes us.
            changes.borrow_and_update();
            if self.contains(namespace, name) {
                return (true, start.elapsed());
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return (false, start.elapsed());
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return (self.contains(namespace, name), start.elapsed());
                }
            }
        }
    }

    /// One live GET, to confirm a miss before denying. A static cache answers
    /// from itself.
    pub async fn confirm(&self, namespace: &str, name: &str) -> GroupPresence {
        if self.contains(namespace, name) {
            return GroupPresence::Present;
        }
        let Some((client, resource)) = self.live.get() else {
            return GroupPresence::Missing;
        };
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, resource);
        match api.get_metadata_opt(name).await {
            Ok(Some(_)) => GroupPresence::Present,
            Ok(None) => GroupPresence::Missing,
            Err(err) => GroupPresence::Unknown(err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_cache_finds_inserted_groups() {
        let cache = GroupCache::new_static([("ns", "g1")]);
        assert!(cache.is_synced());
        assert!(cache.contains("ns", "g1"));
        assert!(!cache.contains("other", "g1"));
        assert_eq!(cache.confirm("ns", "g2").await, GroupPresence::Missing);
        cache.remove("ns", "g1");
        assert!(!cache.contains("ns", "g1"));
    }

    #[tokio::test(start_paused = true)]
    async fn wait_wakes_on_insert_and_times_out() {
        let cache = GroupCache::new_static([]);
        let waiter = {
            let cache = cache.clone();
            tokio::spawn(async move { cache.wait_for("ns", "late", Duration::from_secs(20)).await })
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        cache.insert("ns", "late");
        let (found, waited) = waiter.await.unwrap();
        assert!(found);
        assert!(waited >= Duration::from_secs(3) && waited < Duration::from_secs(20));

        let (found, waited) = cache.wait_for("ns", "never", Duration::from_secs(5)).await;
        assert!(!found);
        assert!(waited >= Duration::from_secs(5));
    }
}
