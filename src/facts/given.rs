//! Facts given by hand: the groups and references `review --group` and
//! `--exists` name, `serve --no-kube`, and the tests. Nothing here does I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{
    GroupFacts, GroupInfo, GroupLookup, RestoreFacts, RestoreInfo, RestoreLookup, TargetFacts,
    appeared_when,
};
use crate::vmop::RefKind;
use crate::vmop::targets::{
    ClassInstance, Collection, Image, Listing, StorageClass, StoragePolicy, StorageQuota,
    TargetView, storage_policy_object_name,
};

/// References given by hand (`review --exists`): a namespace has exactly
/// what it is given, and a check of a kind it is given nothing of does not
/// run (as in a live namespace without classes, storage quota, images or
/// networks).
pub struct StaticRefs {
    present: HashSet<(RefKind, String, String)>,
}

impl StaticRefs {
    /// `(kind, namespace, name)`; the namespace is ignored for cluster-scoped kinds.
    pub fn new(present: impl IntoIterator<Item = (RefKind, String, String)>) -> Arc<StaticRefs> {
        Arc::new(StaticRefs {
            present: present.into_iter().collect(),
        })
    }

    /// The names given for `kind` in `namespace` ("" for cluster-wide kinds).
    fn given<'a>(
        &'a self,
        kind: RefKind,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a str> + 'a {
        let mut names: Vec<&str> = self
            .present
            .iter()
            .filter(move |(given, ns, _)| *given == kind && ns == namespace)
            .map(|(_, _, name)| name.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        names.into_iter()
    }

    fn names(&self, kind: RefKind, namespace: &str) -> Listing<()> {
        Listing::listed(
            self.given(kind, namespace)
                .map(|name| (name.to_string(), ())),
        )
    }

    fn images(&self, kind: RefKind, namespace: &str) -> Listing<Image> {
        // Display names cannot be given by hand.
        Listing::listed(
            self.given(kind, namespace)
                .map(|name| (name.to_string(), Image::default())),
        )
    }

    /// The encryption storage classes, given by name: each stands for a
    /// class whose policy VM Operator records as encrypted.
    fn encryption(&self) -> (Listing<StorageClass>, Listing<StoragePolicy>) {
        let mut classes = Vec::new();
        let mut policies = Vec::new();
        for (index, name) in self.given(RefKind::EncryptionStorageClass, "").enumerate() {
            let policy_id = format!("{index:08x}-0000-0000-0000-{index:012x}");
            if let Some(object) = storage_policy_object_name(&policy_id) {
                policies.push((object, StoragePolicy { encrypted: true }));
            }
            classes.push((
                name.to_string(),
                StorageClass {
                    policy_id: Some(policy_id),
                },
            ));
        }
        (Listing::listed(classes), Listing::listed(policies))
    }
}

impl TargetFacts for StaticRefs {
    fn view<'a>(
        &'a self,
        namespace: &'a str,
        needed: &'a BTreeSet<Collection>,
    ) -> BoxFuture<'a, TargetView> {
        let mut view = TargetView::default();
        for collection in needed {
            match collection {
                Collection::Zones => view.zones = Some(self.names(RefKind::Zone, namespace)),
                Collection::AvailabilityZones => view.availability_zones = Some(Listing::NotServed),
                Collection::Classes => view.classes = Some(self.names(RefKind::Class, namespace)),
                Collection::ClassInstances => {
                    view.class_instances = Some(Listing::listed(
                        self.given(RefKind::ClassInstance, namespace).map(|name| {
                            (
                                name.to_string(),
                                ClassInstance {
                                    active: true,
                                    classes: None,
                                },
                            )
                        }),
                    ))
                }
                Collection::Images => view.images = Some(self.images(RefKind::Image, namespace)),
                Collection::ClusterImages => {
                    view.cluster_images = Some(self.images(RefKind::ClusterImage, ""))
                }
                Collection::ResourceQuotas => {
                    let classes: Vec<String> = self
                        .given(RefKind::StorageClass, namespace)
                        .map(str::to_string)
                        .collect();
                    view.resource_quotas = Some(Listing::listed(
                        (!classes.is_empty())
                            .then(|| ("given".to_string(), StorageQuota { classes })),
                    ))
                }
                Collection::StoragePolicyQuotas => view.policy_quotas = Some(Listing::NotServed),
                Collection::StorageClasses => view.storage_classes = Some(self.encryption().0),
                Collection::StoragePolicies => view.storage_policies = Some(self.encryption().1),
                Collection::Networks(kind) => {
                    let prefix = format!("{}/", kind.kind());
                    view.networks.insert(
                        *kind,
                        Listing::listed(
                            self.given(RefKind::Network, namespace)
                                .filter_map(|name| name.strip_prefix(&prefix))
                                .map(|name| (name.to_string(), ())),
                        ),
                    );
                }
            }
        }
        futures::future::ready(view).boxed()
    }
}

type GroupKey = (String, String);

type GroupSet = HashMap<GroupKey, BTreeMap<String, String>>;

/// Groups given by hand: `review --group`, `serve --no-kube --group`, tests.
pub struct StaticGroups {
    groups: Arc<Mutex<GroupSet>>,
    changed: watch::Sender<u64>,
}

impl StaticGroups {
    pub fn new<'a>(groups: impl IntoIterator<Item = (&'a str, &'a str)>) -> Arc<StaticGroups> {
        let set = groups
            .into_iter()
            .map(|(namespace, name)| ((namespace.to_string(), name.to_string()), BTreeMap::new()))
            .collect();
        Arc::new(StaticGroups {
            groups: Arc::new(Mutex::new(set)),
            changed: watch::channel(0).0,
        })
    }

    fn edit(&self, edit: impl FnOnce(&mut GroupSet)) {
        if let Ok(mut groups) = self.groups.lock() {
            edit(&mut groups);
        }
        self.changed.send_modify(|generation| *generation += 1);
    }

    pub fn insert(&self, namespace: &str, name: &str) {
        self.insert_annotated(namespace, name, BTreeMap::new());
    }

    /// Adds (or replaces) a group that carries `annotations`.
    pub fn insert_annotated(
        &self,
        namespace: &str,
        name: &str,
        annotations: BTreeMap<String, String>,
    ) {
        self.edit(|groups| {
            groups.insert((namespace.to_string(), name.to_string()), annotations);
        });
    }

    pub fn remove(&self, namespace: &str, name: &str) {
        self.edit(|groups| {
            groups.remove(&(namespace.to_string(), name.to_string()));
        });
    }
}

fn set_contains(groups: &Mutex<GroupSet>, namespace: &str, name: &str) -> bool {
    groups
        .lock()
        .map(|groups| groups.contains_key(&(namespace.to_string(), name.to_string())))
        .unwrap_or(false)
}

impl GroupFacts for StaticGroups {
    fn is_synced(&self) -> bool {
        true
    }

    fn len(&self) -> usize {
        self.groups.lock().map(|groups| groups.len()).unwrap_or(0)
    }

    fn get(&self, namespace: &str, name: &str) -> Option<GroupInfo> {
        let groups = self.groups.lock().ok()?;
        let annotations = groups.get(&(namespace.to_string(), name.to_string()))?;
        Some(GroupInfo {
            holds_power: annotations.contains_key(crate::vmop::power::POWER_HELD_ANNOTATION),
        })
    }

    fn appeared(&self, namespace: &str, name: &str) -> BoxFuture<'static, ()> {
        let groups = self.groups.clone();
        let (namespace, name) = (namespace.to_string(), name.to_string());
        appeared_when(self.changed.subscribe(), move || {
            set_contains(&groups, &namespace, &name)
        })
    }

    fn confirm<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, GroupLookup> {
        let lookup = match self.get(namespace, name) {
            Some(group) => GroupLookup::Found(group),
            None => GroupLookup::Missing,
        };
        futures::future::ready(lookup).boxed()
    }
}

/// A Restore source that gives the same answer to every lookup.
pub struct StaticRestores {
    namespace: String,
    answer: RestoreLookup,
}

impl StaticRestores {
    pub fn new(namespace: &str, answer: RestoreLookup) -> Arc<StaticRestores> {
        Arc::new(StaticRestores {
            namespace: namespace.to_string(),
            answer,
        })
    }

    /// Every lookup finds `restore`.
    pub fn found(restore: RestoreInfo) -> Arc<StaticRestores> {
        StaticRestores::new("velero", RestoreLookup::Found(restore))
    }

    /// No Restore exists (objects labelled by hand).
    pub fn none() -> Arc<StaticRestores> {
        StaticRestores::new("velero", RestoreLookup::NotFound)
    }
}

impl RestoreFacts for StaticRestores {
    fn is_synced(&self) -> bool {
        true
    }

    fn len(&self) -> usize {
        usize::from(matches!(self.answer, RestoreLookup::Found(_)))
    }

    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn lookup<'a>(&'a self, _label: &'a str) -> BoxFuture<'a, RestoreLookup> {
        futures::future::ready(self.answer.clone()).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::GroupPresence;
    use crate::vmop::ClusterRef;
    use crate::vmop::targets::{self, Checked};
    use std::time::Duration;

    /// How a review sees a reference against what is given: found, or
    /// nothing to compare with, is present.
    trait Given {
        async fn exists(&self, namespace: &str, reference: &ClusterRef) -> GroupPresence;
        async fn alternatives(&self, namespace: &str, kind: RefKind) -> Vec<String>;
    }

    impl Given for StaticRefs {
        async fn exists(&self, namespace: &str, reference: &ClusterRef) -> GroupPresence {
            let needed = targets::collections_for(reference.kind)
                .iter()
                .copied()
                .collect();
            let view = self.view(namespace, &needed).await;
            match targets::check(&view, reference) {
                Checked::Found | Checked::Unchecked => GroupPresence::Present,
                Checked::Missing => GroupPresence::Missing,
                Checked::Unknown(err) => GroupPresence::Unknown(err),
            }
        }

        async fn alternatives(&self, namespace: &str, kind: RefKind) -> Vec<String> {
            let needed = targets::collections_for(kind).iter().copied().collect();
            targets::alternatives(&self.view(namespace, &needed).await, kind)
        }
    }

    #[tokio::test]
    async fn classes_are_checked_only_in_a_namespace_given_some() {
        use crate::vmop::RefKind;
        let refs = StaticRefs::new([
            (RefKind::Class, "prod".to_string(), "small".to_string()),
            (RefKind::Class, "prod".to_string(), "large".to_string()),
        ]);
        let class = |name: &str| ClusterRef {
            kind: RefKind::Class,
            name: name.to_string(),
            owner: None,
        };
        assert_eq!(
            refs.exists("prod", &class("small")).await,
            GroupPresence::Present
        );
        assert_eq!(
            refs.exists("prod", &class("tiny")).await,
            GroupPresence::Missing
        );
        assert_eq!(
            refs.exists("dev", &class("tiny")).await,
            GroupPresence::Present
        );
        assert_eq!(
            refs.alternatives("prod", RefKind::Class).await,
            ["large", "small"]
        );
        assert!(refs.alternatives("dev", RefKind::Class).await.is_empty());
        // Storage classes the same way, apart from classes.
        let refs = StaticRefs::new([
            (
                RefKind::StorageClass,
                "prod".to_string(),
                "gold".to_string(),
            ),
            (RefKind::Class, "dev".to_string(), "small".to_string()),
        ]);
        let storage = |name: &str| ClusterRef {
            kind: RefKind::StorageClass,
            name: name.to_string(),
            owner: None,
        };
        assert_eq!(
            refs.exists("prod", &storage("gold")).await,
            GroupPresence::Present
        );
        assert_eq!(
            refs.exists("prod", &storage("silver")).await,
            GroupPresence::Missing
        );
        // A namespace given classes but no storage class: storage is not checked.
        assert_eq!(
            refs.exists("dev", &storage("silver")).await,
            GroupPresence::Present
        );
        assert_eq!(
            refs.alternatives("prod", RefKind::StorageClass).await,
            ["gold"]
        );
    }

    #[tokio::test]
    async fn encryption_storage_classes_are_given_cluster_wide_and_listed_where_assigned() {
        let given =
            |kind, namespace: &str, name: &str| (kind, namespace.to_string(), name.to_string());
        let refs = StaticRefs::new([
            given(RefKind::EncryptionStorageClass, "", "enc-gold"),
            given(RefKind::EncryptionStorageClass, "", "enc-silver"),
            given(RefKind::StorageClass, "prod", "enc-gold"),
            given(RefKind::StorageClass, "prod", "plain"),
        ]);
        let encrypted = |name: &str| ClusterRef {
            kind: RefKind::EncryptionStorageClass,
            name: name.to_string(),
            owner: Some("keys".into()),
        };
        assert_eq!(
            refs.exists("prod", &encrypted("enc-gold")).await,
            GroupPresence::Present
        );
        assert_eq!(
            refs.exists("dev", &encrypted("enc-silver")).await,
            GroupPresence::Present
        );
        assert_eq!(
            refs.exists("prod", &encrypted("plain")).await,
            GroupPresence::Missing
        );
        assert_eq!(
            refs.alternatives("prod", RefKind::EncryptionStorageClass)
                .await,
            ["enc-gold"]
        );
        assert_eq!(
            refs.alternatives("dev", RefKind::EncryptionStorageClass)
                .await,
            ["enc-gold", "enc-silver"]
        );
        // None given: not checked.
        let refs = StaticRefs::new([given(RefKind::StorageClass, "prod", "plain")]);
        assert_eq!(
            refs.exists("prod", &encrypted("plain")).await,
            GroupPresence::Present
        );
    }

    #[tokio::test]
    async fn image_names_resolve_to_given_images_in_the_namespace_or_the_cluster() {
        let refs = StaticRefs::new([
            (RefKind::Image, "prod".to_string(), "vmi-a".to_string()),
            (RefKind::ClusterImage, String::new(), "vmi-c".to_string()),
        ]);
        let image_name = |name: &str| ClusterRef {
            kind: RefKind::ImageName,
            name: name.to_string(),
            owner: None,
        };
        assert_eq!(
            refs.exists("prod", &image_name("vmi-a")).await,
            GroupPresence::Present
        );
        assert_eq!(
            refs.exists("dev", &image_name("vmi-c")).await,
            GroupPresence::Present
        );
        // vmi-a is prod's, not dev's.
        assert_eq!(
            refs.exists("dev", &image_name("vmi-a")).await,
            GroupPresence::Missing
        );
        assert_eq!(
            refs.alternatives("prod", RefKind::ImageName).await,
            ["vmi-a", "vmi-c"]
        );
        // No image given at all: image names are not checked.
        let none = StaticRefs::new([(RefKind::Class, "prod".to_string(), "small".to_string())]);
        assert_eq!(
            none.exists("prod", &image_name("vmi-x")).await,
            GroupPresence::Present
        );
    }

    #[tokio::test]
    async fn networks_match_by_kind_and_name_or_by_name_alone() {
        let refs = StaticRefs::new([(
            RefKind::Network,
            "prod".to_string(),
            "SubnetSet/site-b-subnets".to_string(),
        )]);
        let network = |name: &str| ClusterRef {
            kind: RefKind::Network,
            name: name.to_string(),
            owner: None,
        };
        for (namespace, name, expected) in [
            ("prod", "SubnetSet/site-b-subnets", GroupPresence::Present),
            ("prod", "site-b-subnets", GroupPresence::Present),
            ("prod", "Subnet/site-b-subnets", GroupPresence::Missing),
            ("prod", "SubnetSet/vm-default", GroupPresence::Missing),
            // A kind VM Operator does not attach to is not judged.
            ("prod", "Wire/x", GroupPresence::Present),
            // No network given in dev: not checked.
            ("dev", "SubnetSet/vm-default", GroupPresence::Present),
        ] {
            assert_eq!(
                refs.exists(namespace, &network(name)).await,
                expected,
                "{namespace} {name}"
            );
        }
        assert_eq!(
            refs.alternatives("prod", RefKind::Network).await,
            ["SubnetSet/site-b-subnets"]
        );
    }

    #[tokio::test]
    async fn static_groups_find_inserted_groups() {
        let groups = StaticGroups::new([("ns", "g1")]);
        assert!(groups.is_synced());
        assert!(groups.contains("ns", "g1"));
        assert!(!groups.contains("other", "g1"));
        assert_eq!(groups.confirm("ns", "g2").await, GroupLookup::Missing);
        groups.remove("ns", "g1");
        assert!(!groups.contains("ns", "g1"));
    }

    #[tokio::test(start_paused = true)]
    async fn appeared_wakes_on_insert_only() {
        let groups = StaticGroups::new([]);
        let waiter = tokio::spawn(groups.appeared("ns", "late"));
        tokio::time::sleep(Duration::from_secs(3)).await;
        groups.insert("ns", "other");
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        groups.insert("ns", "late");
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken by the insert")
            .unwrap();
    }
}
