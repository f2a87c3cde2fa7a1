//! The [`MappingFacts`]: the ConfigMaps of Velero's namespace, watched live
//! (so an edit takes effect without a restart) or given by hand (`review
//! --mapping FILE`), and the mappings each restore selects from them,
//! remembered until a ConfigMap changes.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tracing::{info, warn};

use super::{MappingFacts, RestoreInfo};
use crate::vmop::mapping::{self, ConfigMapData, MappingError, Mappings};

type Selected = Result<Arc<Mappings>, MappingError>;

pub struct MappingCache {
    namespace: String,
    /// The ConfigMaps by name, and a generation bumped on every change.
    maps: Mutex<BTreeMap<String, ConfigMapData>>,
    generation: AtomicU64,
    synced: AtomicBool,
    /// Selections by the Restore's named ConfigMap, for one generation.
    selected: Mutex<(u64, HashMap<Option<String>, Selected>)>,
}

impl MappingCache {
    fn new(namespace: &str, maps: impl IntoIterator<Item = ConfigMapData>, synced: bool) -> Self {
        MappingCache {
            namespace: namespace.to_string(),
            maps: Mutex::new(
                maps.into_iter()
                    .map(|map| (map.name.clone(), map))
                    .collect(),
            ),
            generation: AtomicU64::new(0),
            synced: AtomicBool::new(synced),
            selected: Mutex::new((0, HashMap::new())),
        }
    }

    /// ConfigMaps given by hand; those of other namespaces are ignored, as
    /// Velero ignores them.
    pub fn given(namespace: &str, maps: impl IntoIterator<Item = ConfigMapData>) -> Arc<Self> {
        Arc::new(MappingCache::new(namespace, maps, true))
    }

    /// Watches the ConfigMaps of `namespace`; the runner must be spawned.
    pub fn live(
        client: Client,
        namespace: &str,
    ) -> (
        Arc<Self>,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let cache = Arc::new(MappingCache::new(namespace, [], false));
        let runner = {
            let cache = cache.clone();
            async move {
                let api: Api<ConfigMap> = Api::namespaced(client, &cache.namespace);
                let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
                futures::pin_mut!(stream);
                let mut pending = BTreeMap::new();
                while let Some(event) = stream.next().await {
                    match event {
                        Ok(Event::Init) => pending.clear(),
                        Ok(Event::InitApply(map)) => {
                            let data = data_of(&map);
                            pending.insert(data.name.clone(), data);
                        }
                        Ok(Event::InitDone) => {
                            cache.replace_all(std::mem::take(&mut pending));
                            cache.synced.store(true, Ordering::SeqCst);
                            info!(namespace = %cache.namespace, "ConfigMap cache for restore mappings synced");
                        }
                        Ok(Event::Apply(map)) => cache.upsert(data_of(&map)),
                        Ok(Event::Delete(map)) => cache.remove(&data_of(&map).name),
                        Err(err) => warn!(
                            error = %err,
                            namespace = %cache.namespace,
                            "ConfigMap watch for restore mappings failed; retrying (the webhook needs get/list/watch on configmaps there)"
                        ),
                    }
                }
            }
        };
        (cache, runner)
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn replace_all(&self, maps: BTreeMap<String, ConfigMapData>) {
        if let Ok(mut current) = self.maps.lock() {
            *current = maps;
        }
        self.changed();
    }

    fn upsert(&self, map: ConfigMapData) {
        if let Ok(mut current) = self.maps.lock() {
            current.insert(map.name.clone(), map);
        }
        self.changed();
    }

    fn remove(&self, name: &str) {
        if let Ok(mut current) = self.maps.lock() {
            current.remove(name);
        }
        self.changed();
    }

    fn select(&self, named: Option<&str>) -> Selected {
        let maps: Vec<ConfigMapData> = self
            .maps
            .lock()
            .map(|maps| maps.values().cloned().collect())
            .unwrap_or_default();
        mapping::select(&maps, &self.namespace, named).map(Arc::new)
    }
}

/// The ConfigMaps of `namespace`, read once (for `plan` and the companion).
pub async fn list_configmaps(
    client: &Client,
    namespace: &str,
) -> Result<Vec<ConfigMapData>, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let list = api.list(&kube::api::ListParams::default()).await?;
    Ok(list.items.iter().map(data_of).collect())
}

fn data_of(map: &ConfigMap) -> ConfigMapData {
    ConfigMapData {
        namespace: map.metadata.namespace.clone().unwrap_or_default(),
        name: map.metadata.name.clone().unwrap_or_default(),
        labels: map.metadata.labels.clone().unwrap_or_default(),
        data: map.data.clone().unwrap_or_default(),
    }
}

impl MappingFacts for MappingCache {
    fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    fn for_restore(&self, restore: Option<&RestoreInfo>) -> Selected {
        let named = restore
            .and_then(|restore| restore.annotations.get(mapping::MAPPINGS_ANNOTATION))
            .cloned();
        let generation = self.generation.load(Ordering::SeqCst);
        if let Ok(selected) = self.selected.lock()
            && selected.0 == generation
            && let Some(found) = selected.1.get(&named)
        {
            return found.clone();
        }
        let found = self.select(named.as_deref());
        if let Ok(mut selected) = self.selected.lock() {
            if selected.0 != generation {
                *selected = (generation, HashMap::new());
            }
            selected.1.insert(named, found.clone());
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ours(name: &str, zones: &str) -> ConfigMapData {
        ConfigMapData::from_value(&json!({
            "metadata": {"name": name, "namespace": "velero",
                "labels": {mapping::PLUGIN_CONFIG_LABEL: "", mapping::VM_MAPPINGS_LABEL: "RestoreItemAction"}},
            "data": {"zones": zones}}))
    }

    #[test]
    fn an_edit_takes_effect_at_once_and_a_restore_may_name_its_configmap() {
        let cache = MappingCache::given("velero", [ours("site-b", "a: b")]);
        assert_eq!(cache.for_restore(None).unwrap().zone("a"), Some("b"));
        cache.upsert(ours("site-b", "a: c"));
        assert_eq!(cache.for_restore(None).unwrap().zone("a"), Some("c"));
        // A second labelled ConfigMap makes the labelled choice ambiguous,
        // but a Restore that names one still gets it.
        cache.upsert(ours("site-c", "a: d"));
        assert!(cache.for_restore(None).is_err());
        let restore = RestoreInfo {
            annotations: [(
                mapping::MAPPINGS_ANNOTATION.to_string(),
                "site-c".to_string(),
            )]
            .into(),
            ..Default::default()
        };
        assert_eq!(
            cache.for_restore(Some(&restore)).unwrap().zone("a"),
            Some("d")
        );
        cache.remove("site-c");
        assert_eq!(cache.for_restore(None).unwrap().zone("a"), Some("c"));
        assert!(cache.for_restore(Some(&restore)).is_err());
    }
}
