//! The live VirtualMachineGroup source: a kube-rs reflector store of group
//! metadata. Every watch event bumps a counter on a `watch` channel, which is
//! what wakes a waiting review: waits never poll the API server. Before a
//! denial, one live GET confirms the group is really missing, because a
//! reflector can lag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::FutureExt;
use futures::StreamExt;
use futures::future::BoxFuture;
use kube::Client;
use kube::api::{Api, DynamicObject, PartialObjectMeta};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::facts::{GroupFacts, GroupPresence, appeared_when};
use crate::vmop;

type GroupMeta = PartialObjectMeta<DynamicObject>;

/// How often discovery is retried while the group API is absent or
/// discovery fails.
const DISCOVERY_RETRY: Duration = Duration::from_secs(30);

pub struct GroupCache {
    /// Key type of the store. Lookups must use the same value the writer used,
    /// whichever served version the watch reads.
    store_key: ApiResource,
    store: Store<GroupMeta>,
    changed: watch::Sender<u64>,
    synced: AtomicBool,
    /// Discovery answered that vmoperator.vmware.com serves no
    /// VirtualMachineGroup: nothing can name a group that cannot exist.
    api_absent: AtomicBool,
    /// The client and served API resource, once discovery found it. Set
    /// before `synced`, so a ready cache can always confirm a miss live.
    live: OnceLock<(Client, ApiResource)>,
}

fn store_key() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(vmop::GROUP, "v1alpha2", "VirtualMachineGroup"),
        "virtualmachinegroups",
    )
}

impl GroupCache {
    /// A cache fed by a reflector over the cluster's groups. The returned
    /// future runs the watch; it finds the served version by discovery. The
    /// cache is ready once the first list completed, or once discovery
    /// answered that the VirtualMachineGroup API is not served.
    pub fn live(client: Client) -> (Arc<GroupCache>, impl Future<Output = ()> + Send + 'static) {
        let writer = Writer::new(store_key());
        let cache = Arc::new(GroupCache {
            store_key: store_key(),
            store: writer.as_reader(),
            changed: watch::channel(0).0,
            synced: AtomicBool::new(false),
            api_absent: AtomicBool::new(false),
            live: OnceLock::new(),
        });
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
                        self.mark_api_absent("vmoperator.vmware.com serves no VirtualMachineGroup")
                    }
                },
                Err(kube::Error::Discovery(kube::error::DiscoveryError::MissingApiGroup(_))) => {
                    self.mark_api_absent("the vmoperator.vmware.com API group is not served")
                }
                // A transient failure proves nothing: stay unready.
                Err(err) => {
                    warn!(error = %err, "discovery of vmoperator.vmware.com failed; not ready until it succeeds")
                }
            }
            tokio::time::sleep(DISCOVERY_RETRY).await;
        };
        info!(version = %resource.version, "watching VirtualMachineGroups");
        self.api_absent.store(false, Ordering::SeqCst);
        let _ = self.live.set((client.clone(), resource.clone()));
        // An Api over PartialObjectMeta lists and watches metadata only.
        let api: Api<GroupMeta> = Api::all_with(client, &resource);
        let stream = reflector::reflector(
            writer,
            watcher::watcher(api, watcher::Config::default())
                .default_backoff()
                // Only names and annotations are read: managedFields are most
                // of a group's metadata, and the cache holds every group.
                .modify(|group| group.metadata.managed_fields = None),
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

    fn mark_api_absent(&self, why: &str) {
        if !self.api_absent.swap(true, Ordering::SeqCst) {
            warn!("{why}; VMs cannot name groups. Ready with an empty cache; discovery is retried");
        }
        self.synced.store(true, Ordering::SeqCst);
    }
}

fn store_contains(
    store: &Store<GroupMeta>,
    key: &ApiResource,
    namespace: &str,
    name: &str,
) -> bool {
    let key = ObjectRef::<GroupMeta>::new_with(name, key.clone()).within(namespace);
    store.get(&key).is_some()
}

impl GroupFacts for GroupCache {
    fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    fn len(&self) -> usize {
        self.store.len()
    }

    fn contains(&self, namespace: &str, name: &str) -> bool {
        store_contains(&self.store, &self.store_key, namespace, name)
    }

    fn appeared(&self, namespace: &str, name: &str) -> BoxFuture<'static, ()> {
        let (store, key) = (self.store.clone(), self.store_key.clone());
        let (namespace, name) = (namespace.to_string(), name.to_string());
        appeared_when(self.changed.subscribe(), move || {
            store_contains(&store, &key, &namespace, &name)
        })
    }

    fn confirm<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, GroupPresence> {
        async move {
            if self.contains(namespace, name) {
                return GroupPresence::Present;
            }
            let Some((client, resource)) = self.live.get() else {
                return if self.api_absent.load(Ordering::SeqCst) {
                    GroupPresence::Missing
                } else {
                    GroupPresence::Unknown(
                        "the VirtualMachineGroup API has not been discovered yet".into(),
                    )
                };
            };
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, resource);
            match api.get_metadata_opt(name).await {
                Ok(Some(_)) => GroupPresence::Present,
                Ok(None) => GroupPresence::Missing,
                Err(err) => GroupPresence::Unknown(err.to_string()),
            }
        }
        .boxed()
    }

    fn annotation(&self, namespace: &str, name: &str, key: &str) -> Option<String> {
        let reference =
            ObjectRef::<GroupMeta>::new_with(name, self.store_key.clone()).within(namespace);
        self.store
            .get(&reference)?
            .metadata
            .annotations
            .as_ref()?
            .get(key)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{Request, Response};
    use http_body_util::Full;

    /// A GroupCache on a fake API server whose `/apis` answers `status` with
    /// `body`; the runner is started, and stopped when the test ends.
    async fn cache_on(
        status: u16,
        body: &'static str,
    ) -> (Arc<GroupCache>, tokio::task::JoinHandle<()>) {
        let service = tower::service_fn(move |_request: Request<kube::client::Body>| async move {
            Ok::<_, std::convert::Infallible>(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Full::new(bytes::Bytes::from_static(body.as_bytes())))
                    .expect("response"),
            )
        });
        let (cache, runner) = GroupCache::live(Client::new(service, "default"));
        let handle = tokio::spawn(runner);
        // Discovery is one in-memory round trip; give it a moment.
        for _ in 0..50 {
            if cache.is_synced() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (cache, handle)
    }

    #[tokio::test]
    async fn ready_when_the_group_api_is_confirmed_absent() {
        let (cache, runner) = cache_on(
            200,
            r#"{"kind":"APIGroupList","apiVersion":"v1","groups":[]}"#,
        )
        .await;
        assert!(
            cache.is_synced(),
            "absent API: nothing can name a group, so ready"
        );
        assert_eq!(cache.confirm("ns", "g").await, GroupPresence::Missing);
        runner.abort();
    }

    #[tokio::test]
    async fn not_ready_while_discovery_fails() {
        let (cache, runner) = cache_on(
            500,
            r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"etcd down","reason":"InternalError","code":500}"#,
        )
        .await;
        assert!(
            !cache.is_synced(),
            "a transient failure proves nothing: stay unready"
        );
        // A miss cannot be confirmed yet, so it is not reported as missing.
        assert!(matches!(
            cache.confirm("ns", "g").await,
            GroupPresence::Unknown(_)
        ));
        runner.abort();
    }
}
