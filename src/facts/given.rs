//! Facts given by hand: the groups and references `review --group` and
//! `--exists` name, `serve --no-kube`, and the tests. Nothing here does I/O.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{
    GroupFacts, GroupPresence, RefFacts, RestoreFacts, RestoreInfo, RestoreLookup, appeared_when,
};
use crate::vmop::{ClusterRef, RefKind};

/// References given by hand (`review --exists`); every other counts as missing.
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
}

impl StaticRefs {
    /// The names given for `kind` that a VM in `namespace` can use, sorted
    /// and once each: an image name resolves to an image given in the
    /// namespace (`image/NS/NAME`) or a cluster image (`clusterimage/NAME`);
    /// display names cannot be given by hand.
    fn visible(&self, namespace: &str, kind: RefKind) -> Vec<String> {
        let mut names: Vec<String> = self
            .present
            .iter()
            .filter(|(given, ns, _)| match kind {
                RefKind::ImageName => {
                    (*given == RefKind::Image && ns == namespace) || *given == RefKind::ClusterImage
                }
                // Encryption is a property of the class, cluster-wide.
                RefKind::EncryptionStorageClass => *given == kind,
                _ => *given == kind && ns == namespace,
            })
            .map(|(_, _, name)| name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

impl RefFacts for StaticRefs {
    fn exists<'a>(
        &'a self,
        namespace: &'a str,
        reference: &'a ClusterRef,
    ) -> BoxFuture<'a, GroupPresence> {
        let name = reference.name.as_str();
        let found = if reference.kind.denies_when_missing() {
            // Checked against what the namespace is given, and only where it
            // is given some: elsewhere there is nothing to compare with, as
            // in a live namespace without classes, storage quota, images or
            // networks.
            let has = self.visible(namespace, reference.kind);
            has.is_empty()
                || match reference.kind {
                    RefKind::Network => crate::vmop::mapping::network_found(&has, name),
                    _ => has.iter().any(|given| given == name),
                }
        } else {
            let namespace = match reference.kind {
                RefKind::ClusterImage => "",
                _ => namespace,
            };
            self.present
                .contains(&(reference.kind, namespace.to_string(), name.to_string()))
        };
        let presence = if found {
            GroupPresence::Present
        } else {
            GroupPresence::Missing
        };
        futures::future::ready(presence).boxed()
    }

    fn alternatives<'a>(&'a self, namespace: &'a str, kind: RefKind) -> BoxFuture<'a, Vec<String>> {
        let mut names = self.visible(namespace, kind);
        // The encryption storage classes the namespace has, where it is
        // given storage classes at all.
        if kind == RefKind::EncryptionStorageClass {
            let assigned = self.visible(namespace, RefKind::StorageClass);
            if !assigned.is_empty() {
                names.retain(|name| assigned.contains(name));
            }
        }
        futures::future::ready(names).boxed()
    }
}

/// Every reference exists: nothing is removed for it (the default of a
/// Reviewer that was given no reference source).
pub struct AllRefsExist;

impl RefFacts for AllRefsExist {
    fn exists<'a>(
        &'a self,
        _namespace: &'a str,
        _reference: &'a ClusterRef,
    ) -> BoxFuture<'a, GroupPresence> {
        futures::future::ready(GroupPresence::Present).boxed()
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

    fn contains(&self, namespace: &str, name: &str) -> bool {
        set_contains(&self.groups, namespace, name)
    }

    fn appeared(&self, namespace: &str, name: &str) -> BoxFuture<'static, ()> {
        let groups = self.groups.clone();
        let (namespace, name) = (namespace.to_string(), name.to_string());
        appeared_when(self.changed.subscribe(), move || {
            set_contains(&groups, &namespace, &name)
        })
    }

    fn confirm<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, GroupPresence> {
        let presence = if self.contains(namespace, name) {
            GroupPresence::Present
        } else {
            GroupPresence::Missing
        };
        futures::future::ready(presence).boxed()
    }

    fn annotation(&self, namespace: &str, name: &str, key: &str) -> Option<String> {
        let groups = self.groups.lock().ok()?;
        groups
            .get(&(namespace.to_string(), name.to_string()))?
            .get(key)
            .cloned()
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
    use std::time::Duration;

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
        assert_eq!(groups.confirm("ns", "g2").await, GroupPresence::Missing);
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
