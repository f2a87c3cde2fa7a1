//! The live [`RestoreFacts`]: the Restore objects of Velero's namespace, from
//! a reflector, with a live GET (and a short memory of misses) for a label
//! the cache does not know yet.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use kube::Client;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::watcher::{self, Event};
use tracing::{info, warn};

use super::restore::{RestoreInfo, label_value_for};
use super::{RestoreFacts, RestoreLookup};

/// `restores.velero.io`, the only version Velero serves.
pub(crate) fn restore_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("velero.io", "v1", "Restore"),
        "restores",
    )
}

/// The Restore objects of one Velero namespace, from a reflector.
pub struct RestoreCache {
    namespace: String,
    store: Store<DynamicObject>,
    synced: AtomicBool,
    client: Client,
    /// Labels a live GET recently found no Restore for: objects labelled by
    /// hand (or by a deleted Restore) should not cost a GET per create.
    recent_misses: Mutex<HashMap<String, Instant>>,
}

/// How long a confirmed miss is trusted; a Restore created meanwhile still
/// reaches the cache through the watch.
pub const MISS_TTL: Duration = Duration::from_secs(10);

impl RestoreCache {
    /// A reflector over `restores.velero.io` in `namespace`.
    pub fn live(
        client: Client,
        namespace: &str,
    ) -> (Arc<RestoreCache>, impl Future<Output = ()> + Send + 'static) {
        let writer: Writer<DynamicObject> = Writer::new(restore_resource());
        let cache = Arc::new(RestoreCache {
            namespace: namespace.to_string(),
            store: writer.as_reader(),
            synced: AtomicBool::new(false),
            client: client.clone(),
            recent_misses: Default::default(),
        });
        let runner = {
            let cache = cache.clone();
            async move {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client, &cache.namespace, &restore_resource());
                let stream = reflector::reflector(
                    writer,
                    watcher::watcher(api, watcher::Config::default())
                        .default_backoff()
                        .modify(|restore| restore.metadata.managed_fields = None),
                );
                futures::pin_mut!(stream);
                while let Some(event) = stream.next().await {
                    match event {
                        Ok(Event::InitDone) => {
                            cache.synced.store(true, Ordering::SeqCst);
                            info!(restores = cache.store.len(), namespace = %cache.namespace, "Velero Restore cache synced");
                        }
                        Ok(_) => {}
                        Err(err) => {
                            warn!(error = %err, namespace = %cache.namespace, "Velero Restore watch failed; retrying");
                            // Without Velero's CRDs the webhook still cleans
                            // objects; it just cannot see namespace mappings.
                            if is_not_found(&err) {
                                cache.synced.store(true, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_secs(30)).await;
                            }
                        }
                    }
                }
            }
        };
        (cache, runner)
    }

    fn cached(&self, label: &str) -> Option<RestoreInfo> {
        let key = ObjectRef::new_with(label, restore_resource()).within(&self.namespace);
        if let Some(object) = self.store.get(&key) {
            return Some(restore_info(&object));
        }
        self.store
            .state()
            .into_iter()
            .find(|object| {
                object
                    .metadata
                    .name
                    .as_deref()
                    .map(label_value_for)
                    .as_deref()
                    == Some(label)
            })
            .map(|object| restore_info(&object))
    }

    fn recently_missed(&self, label: &str) -> bool {
        self.recent_misses
            .lock()
            .map(|misses| misses.get(label).is_some_and(|at| at.elapsed() < MISS_TTL))
            .unwrap_or(false)
    }

    fn remember_miss(&self, label: &str) {
        if let Ok(mut misses) = self.recent_misses.lock() {
            misses.retain(|_, at| at.elapsed() < MISS_TTL);
            misses.insert(label.to_string(), Instant::now());
        }
    }
}

impl RestoreFacts for RestoreCache {
    fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    fn len(&self) -> usize {
        self.store.len()
    }

    fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The cache first, then one live GET (the cache can lag behind a
    /// just-created Restore). Confirmed misses are remembered for [`MISS_TTL`].
    fn lookup<'a>(&'a self, label: &'a str) -> BoxFuture<'a, RestoreLookup> {
        async move {
            if let Some(info) = self.cached(label) {
                return RestoreLookup::Found(info);
            }
            if self.recently_missed(label) {
                return RestoreLookup::NotFound;
            }
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &self.namespace, &restore_resource());
            match api.get_opt(label).await {
                Ok(Some(object)) => RestoreLookup::Found(restore_info(&object)),
                Ok(None) => {
                    self.remember_miss(label);
                    RestoreLookup::NotFound
                }
                Err(err) => RestoreLookup::Failed(err.to_string()),
            }
        }
        .boxed()
    }
}

fn restore_info(object: &DynamicObject) -> RestoreInfo {
    serde_json::to_value(object)
        .map(|value| RestoreInfo::from_object(&value))
        .unwrap_or_default()
}

fn is_not_found(err: &watcher::Error) -> bool {
    match err {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.code == 404,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A RestoreCache on a fake API server: 404 for every Restore except
    /// `forbidden`, which gets 403. The reflector is not started, so every
    /// lookup misses the cache and reaches the GET path.
    fn cache_on_fake_api() -> (Arc<RestoreCache>, Arc<std::sync::atomic::AtomicUsize>) {
        use axum::http::{Request, Response};
        use http_body_util::Full;
        let gets = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = gets.clone();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let forbidden = request.uri().path().ends_with("/forbidden");
                let (code, reason) = if forbidden {
                    (403, "Forbidden")
                } else {
                    (404, "NotFound")
                };
                let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": format!("restores.velero.io is {reason}"), "reason": reason, "code": code});
                Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(Full::new(bytes::Bytes::from(body.to_string())))
                        .expect("response"),
                )
            }
        });
        let (cache, _runner) = RestoreCache::live(Client::new(service, "default"), "velero");
        (cache, gets)
    }

    #[tokio::test]
    async fn confirmed_misses_are_cached_and_failures_are_not() {
        let (cache, gets) = cache_on_fake_api();
        assert_eq!(cache.lookup("gone").await, RestoreLookup::NotFound);
        assert_eq!(gets.load(Ordering::SeqCst), 1);
        // Within MISS_TTL the miss is answered without a GET.
        assert_eq!(cache.lookup("gone").await, RestoreLookup::NotFound);
        assert_eq!(gets.load(Ordering::SeqCst), 1);
        // Another label is looked up.
        assert_eq!(cache.lookup("other").await, RestoreLookup::NotFound);
        assert_eq!(gets.load(Ordering::SeqCst), 2);
        // A refusal is reported with the API server's words, and not cached.
        for expected_gets in [3, 4] {
            match cache.lookup("forbidden").await {
                RestoreLookup::Failed(message) => {
                    assert!(message.contains("Forbidden"), "{message}")
                }
                other => panic!("expected a failure, got {other:?}"),
            }
            assert_eq!(gets.load(Ordering::SeqCst), expected_gets);
        }
    }
}
