//! The live [`TargetFacts`]: one cache per collection a check reads (VM
//! classes and their instances, images in namespaces and cluster-wide,
//! ResourceQuotas, StoragePolicyQuotas, StorageClasses, VM Operator's
//! StoragePolicies, networks of each provider's kind, zones), each kept
//! current by a watch ([`super::watched`]) of only what the checks read.
//! What a reference resolves to is VM Operator's rule, in
//! [`crate::vmop::targets`]; this module only reads the objects.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use kube::Client;
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::discovery::Discovery;
use super::watched::{Meta, Project, Served, Watched, wire_meta};
use super::{CacheStats, TargetFacts};
use crate::vmop::targets::{
    ClassInstance, Collection, Image, Listing, PolicyQuota, StorageClass, StoragePolicy,
    StorageQuota, TargetView, quota_key_storage_class,
};

/// At most this many classes are kept per ResourceQuota, owners per
/// instance: more than any real object has, so a crafted one costs little.
const KEPT_PER_OBJECT: usize = 64;
/// A longer display name is not kept (no image is named like that).
const LONGEST_DISPLAY_NAME: usize = 1024;

/// The `vmoperator.vmware.com/active` label, present or not.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ActiveLabel {
    #[serde(default, rename = "vmoperator.vmware.com/active")]
    active: Option<IgnoredAny>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OwnerWire {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    name: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InstanceWire {
    metadata: Meta<ActiveLabel, IgnoredAny, Vec<OwnerWire>>,
}

impl Project for ClassInstance {
    type Wire = InstanceWire;
    wire_meta!();
    fn project(wire: InstanceWire) -> ClassInstance {
        let meta = wire.metadata;
        ClassInstance {
            active: meta.labels.is_some_and(|labels| labels.active.is_some()),
            classes: Some(
                meta.owner_references
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|owner| owner.kind == "VirtualMachineClass")
                    .map(|owner| owner.name)
                    .take(KEPT_PER_OBJECT)
                    .collect(),
            ),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ImageStatusWire {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ImageWire {
    metadata: Meta,
    #[serde(default)]
    status: Option<ImageStatusWire>,
}

impl Project for Image {
    type Wire = ImageWire;
    wire_meta!();
    fn project(wire: ImageWire) -> Image {
        Image {
            display_name: wire
                .status
                .and_then(|status| status.name)
                .filter(|name| !name.is_empty() && name.len() <= LONGEST_DISPLAY_NAME),
        }
    }
}

/// The storage classes a ResourceQuota's `spec.hard` keys name; the
/// quantities are skipped.
#[derive(Debug, Clone, Default)]
pub struct QuotaClassesWire(Vec<String>);

impl<'de> Deserialize<'de> for QuotaClassesWire {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = QuotaClassesWire;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of resource names to quantities")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                let mut classes = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<IgnoredAny>()?;
                    if let Some(class) = quota_key_storage_class(&key)
                        && classes.len() < KEPT_PER_OBJECT
                        && !classes.iter().any(|known| known == class)
                    {
                        classes.push(class.to_string());
                    }
                }
                Ok(QuotaClassesWire(classes))
            }
        }
        deserializer.deserialize_map(Keys)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct QuotaSpecWire {
    #[serde(default)]
    hard: Option<QuotaClassesWire>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct QuotaWire {
    metadata: Meta,
    #[serde(default)]
    spec: Option<QuotaSpecWire>,
}

impl Project for StorageQuota {
    type Wire = QuotaWire;
    wire_meta!();
    fn project(wire: QuotaWire) -> StorageQuota {
        StorageQuota {
            classes: wire
                .spec
                .and_then(|spec| spec.hard)
                .map(|hard| hard.0)
                .unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct PolicyQuotaSpecWire {
    #[serde(default, rename = "storagePolicyId")]
    storage_policy_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PolicyQuotaWire {
    metadata: Meta,
    #[serde(default)]
    spec: Option<PolicyQuotaSpecWire>,
}

impl Project for PolicyQuota {
    type Wire = PolicyQuotaWire;
    wire_meta!();
    fn project(wire: PolicyQuotaWire) -> PolicyQuota {
        PolicyQuota {
            policy_id: wire.spec.and_then(|spec| spec.storage_policy_id),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct StorageClassParametersWire {
    #[serde(default, rename = "storagePolicyID")]
    storage_policy_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StorageClassWire {
    metadata: Meta,
    #[serde(default)]
    parameters: Option<StorageClassParametersWire>,
}

impl Project for StorageClass {
    type Wire = StorageClassWire;
    wire_meta!();
    fn project(wire: StorageClassWire) -> StorageClass {
        StorageClass {
            policy_id: wire.parameters.and_then(|p| p.storage_policy_id),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct StoragePolicyStatusWire {
    #[serde(default)]
    encrypted: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StoragePolicyWire {
    metadata: Meta,
    #[serde(default)]
    status: Option<StoragePolicyStatusWire>,
}

impl Project for StoragePolicy {
    type Wire = StoragePolicyWire;
    wire_meta!();
    fn project(wire: StoragePolicyWire) -> StoragePolicy {
        StoragePolicy {
            encrypted: wire
                .status
                .and_then(|status| status.encrypted)
                .unwrap_or(false),
        }
    }
}

/// Puts one collection's listing into a view.
type Put<P> = Box<dyn Fn(&mut TargetView, Listing<P>) + Send + Sync>;

/// The cache of one collection, whatever its projection.
trait CollectionCache: Send + Sync {
    fn stats(&self) -> CacheStats;
    /// What `namespace` has of the collection, into `view`: from the cache,
    /// or, with `fresh`, listed live now ([`Watched::confirm`]).
    fn read_into<'a>(
        &'a self,
        client: &'a Client,
        view: &'a mut TargetView,
        namespace: &'a str,
        fresh: bool,
    ) -> BoxFuture<'a, ()>;
}

struct Slot<P> {
    collection: Collection,
    watched: Arc<Watched<P>>,
    /// The one namespace it is read in (VM Operator's, for StoragePolicies).
    namespace: Option<String>,
    put: Put<P>,
}

impl<P: Project> CollectionCache for Slot<P> {
    fn stats(&self) -> CacheStats {
        self.watched.stats()
    }

    fn read_into<'a>(
        &'a self,
        client: &'a Client,
        view: &'a mut TargetView,
        namespace: &'a str,
        fresh: bool,
    ) -> BoxFuture<'a, ()> {
        async move {
            let scope = self.scope(namespace);
            let listing = if fresh {
                self.watched.confirm(client, scope).await
            } else {
                self.watched.read(client, scope).await
            };
            (self.put)(view, listing);
        }
        .boxed()
    }
}

impl<P> Slot<P> {
    /// Where the collection is read for a VM in `namespace`: cluster-scoped
    /// kinds are kept under "", StoragePolicies in VM Operator's namespace.
    fn scope<'a>(&'a self, namespace: &'a str) -> &'a str {
        match &self.namespace {
            Some(fixed) => fixed.as_str(),
            None if self.collection.cluster_scoped() => "",
            None => namespace,
        }
    }
}

/// Makes the cache of a collection, given its projection type.
trait Maker {
    fn slot<P: Project>(
        &mut self,
        collection: Collection,
        namespace: Option<&str>,
        put: Put<P>,
    ) -> Box<dyn CollectionCache>;
}

/// The cache of `collection`, with its projection and its place in a view.
fn slot(
    collection: Collection,
    vm_operator_namespace: &str,
    maker: &mut impl Maker,
) -> Box<dyn CollectionCache> {
    match collection {
        Collection::Zones => maker.slot::<()>(collection, None, Box::new(|v, l| v.zones = Some(l))),
        Collection::AvailabilityZones => maker.slot::<()>(
            collection,
            None,
            Box::new(|v, l| v.availability_zones = Some(l)),
        ),
        Collection::Classes => {
            maker.slot::<()>(collection, None, Box::new(|v, l| v.classes = Some(l)))
        }
        Collection::ClassInstances => maker.slot::<ClassInstance>(
            collection,
            None,
            Box::new(|v, l| v.class_instances = Some(l)),
        ),
        Collection::Images => {
            maker.slot::<Image>(collection, None, Box::new(|v, l| v.images = Some(l)))
        }
        Collection::ClusterImages => maker.slot::<Image>(
            collection,
            None,
            Box::new(|v, l| v.cluster_images = Some(l)),
        ),
        Collection::ResourceQuotas => maker.slot::<StorageQuota>(
            collection,
            None,
            Box::new(|v, l| v.resource_quotas = Some(l)),
        ),
        Collection::StoragePolicyQuotas => {
            maker.slot::<PolicyQuota>(collection, None, Box::new(|v, l| v.policy_quotas = Some(l)))
        }
        Collection::StorageClasses => maker.slot::<StorageClass>(
            collection,
            None,
            Box::new(|v, l| v.storage_classes = Some(l)),
        ),
        Collection::StoragePolicies => maker.slot::<StoragePolicy>(
            collection,
            Some(vm_operator_namespace),
            Box::new(|v, l| v.storage_policies = Some(l)),
        ),
        Collection::Networks(kind) => maker.slot::<()>(
            collection,
            None,
            Box::new(move |v, l| {
                v.networks.insert(kind, l);
            }),
        ),
    }
}

/// A cache per collection.
pub struct TargetCache {
    client: Client,
    caches: Vec<(Collection, Box<dyn CollectionCache>)>,
}

impl TargetCache {
    fn build(client: Client, vm_operator_namespace: &str, maker: &mut impl Maker) -> TargetCache {
        TargetCache {
            client,
            caches: Collection::ALL
                .into_iter()
                .map(|collection| (collection, slot(collection, vm_operator_namespace, maker)))
                .collect(),
        }
    }

    /// A watched cache of every collection; the runner keeps them current as
    /// `discovery` says what is served (spawn discovery's runner too). Ready
    /// once each has listed once or is known not to be served.
    pub fn live(
        client: Client,
        vm_operator_namespace: &str,
        discovery: &mut Discovery,
    ) -> (Arc<TargetCache>, impl Future<Output = ()> + Send + 'static) {
        struct Live<'d> {
            client: Client,
            discovery: &'d mut Discovery,
            runners: Vec<BoxFuture<'static, ()>>,
        }
        impl Maker for Live<'_> {
            fn slot<P: Project>(
                &mut self,
                collection: Collection,
                namespace: Option<&str>,
                put: Put<P>,
            ) -> Box<dyn CollectionCache> {
                let (group, kind) = collection.group_kind();
                let served = self.discovery.subscribe(group, kind);
                let watched =
                    Watched::<P>::new(collection.label(), collection.metadata_only(), namespace);
                self.runners
                    .push(watched.clone().run(self.client.clone(), served).boxed());
                Box::new(Slot {
                    collection,
                    watched,
                    namespace: namespace.map(str::to_string),
                    put,
                })
            }
        }
        let mut live = Live {
            client: client.clone(),
            discovery,
            runners: Vec::new(),
        };
        let cache = Arc::new(TargetCache::build(client, vm_operator_namespace, &mut live));
        let runners = live.runners;
        (cache, async move {
            futures::future::join_all(runners).await;
        })
    }

    /// A source that lists live, once per collection and namespace, for a
    /// one-shot command (`plan`); discovery runs once first.
    pub async fn listing_only(
        client: Client,
        vm_operator_namespace: &str,
    ) -> Result<Arc<TargetCache>, kube::Error> {
        struct Listed {
            served: Vec<(Collection, tokio::sync::watch::Receiver<Served>)>,
        }
        impl Maker for Listed {
            fn slot<P: Project>(
                &mut self,
                collection: Collection,
                namespace: Option<&str>,
                put: Put<P>,
            ) -> Box<dyn CollectionCache> {
                let served = self
                    .served
                    .iter()
                    .find(|(known, _)| *known == collection)
                    .map(|(_, served)| served.borrow().clone())
                    .unwrap_or_default();
                Box::new(Slot {
                    collection,
                    watched: Watched::<P>::listing_only(
                        collection.label(),
                        collection.metadata_only(),
                        served,
                    ),
                    namespace: namespace.map(str::to_string),
                    put,
                })
            }
        }
        let mut discovery = Discovery::new();
        let served = Collection::ALL
            .into_iter()
            .map(|collection| {
                let (group, kind) = collection.group_kind();
                (collection, discovery.subscribe(group, kind))
            })
            .collect();
        discovery.discover(&client).await?;
        let mut listed = Listed { served };
        Ok(Arc::new(TargetCache::build(
            client,
            vm_operator_namespace,
            &mut listed,
        )))
    }
}

impl TargetFacts for TargetCache {
    fn is_synced(&self) -> bool {
        self.caches.iter().all(|(_, cache)| cache.stats().ready)
    }

    fn stats(&self) -> Vec<CacheStats> {
        self.caches.iter().map(|(_, cache)| cache.stats()).collect()
    }

    fn view<'a>(
        &'a self,
        namespace: &'a str,
        needed: &'a BTreeSet<Collection>,
    ) -> BoxFuture<'a, TargetView> {
        self.read_view(namespace, needed, false)
    }

    fn confirm_view<'a>(
        &'a self,
        namespace: &'a str,
        needed: &'a BTreeSet<Collection>,
    ) -> BoxFuture<'a, TargetView> {
        self.read_view(namespace, needed, true)
    }
}

impl TargetCache {
    /// Each collection in `needed`, read once (live now, with `fresh`).
    fn read_view<'a>(
        &'a self,
        namespace: &'a str,
        needed: &'a BTreeSet<Collection>,
        fresh: bool,
    ) -> BoxFuture<'a, TargetView> {
        async move {
            let mut view = TargetView::default();
            for (collection, cache) in &self.caches {
                if needed.contains(collection) {
                    cache
                        .read_into(&self.client, &mut view, namespace, fresh)
                        .await;
                }
            }
            view
        }
        .boxed()
    }
}
