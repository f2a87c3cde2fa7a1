//! The live VirtualMachineGroup source: a cache of each group's name and
//! whether it holds its power ([`crate::vmop::power::POWER_HELD_ANNOTATION`]),
//! kept by a metadata-only watch ([`super::watched`]): nothing else of a
//! group is kept, so groups carrying large annotations cost no more memory
//! than any other. Every watch event wakes the reviews waiting for a group:
//! waits never poll the API server. Before a denial, one live GET confirms
//! the group is really missing, because a watch can lag; a group found that
//! way says itself whether it holds its power.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use kube::Client;
use kube::api::{Api, DynamicObject};
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::discovery::Discovery;
use super::watched::{Meta, Project, Served, Watched, wire_meta};
use crate::facts::{GroupFacts, GroupInfo, GroupLookup, appeared_when};
use crate::vmop;

/// The power-hold annotation, present or not.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PowerHeldWire {
    // `vmop::power::POWER_HELD_ANNOTATION` (serde needs the literal; a test
    // checks they agree).
    #[serde(default, rename = "velero-vm-restore-webhook/power-held")]
    held: Option<IgnoredAny>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GroupWire {
    metadata: Meta<IgnoredAny, PowerHeldWire>,
}

impl Project for GroupInfo {
    type Wire = GroupWire;
    wire_meta!();
    fn project(wire: GroupWire) -> GroupInfo {
        GroupInfo {
            holds_power: wire
                .metadata
                .annotations
                .is_some_and(|annotations| annotations.held.is_some()),
        }
    }
}

pub struct GroupCache {
    groups: Arc<Watched<GroupInfo>>,
    client: Client,
}

impl GroupCache {
    /// A cache of the cluster's groups; the runner keeps it current as
    /// `discovery` says whether (and at which version) groups are served.
    /// Ready once the first list completed, or once discovery answered that
    /// the VirtualMachineGroup API is not served (nothing can name a group
    /// then).
    pub fn live(
        client: Client,
        discovery: &mut Discovery,
    ) -> (Arc<GroupCache>, impl Future<Output = ()> + Send + 'static) {
        let served = discovery.subscribe(vmop::GROUP, "VirtualMachineGroup");
        let groups = Watched::new("virtualmachinegroups.vmoperator.vmware.com", true, None);
        let runner = groups.clone().run(client.clone(), served);
        (Arc::new(GroupCache { groups, client }), runner)
    }
}

impl GroupFacts for GroupCache {
    fn is_synced(&self) -> bool {
        self.groups.is_ready()
    }

    fn len(&self) -> usize {
        self.groups.len()
    }

    fn get(&self, namespace: &str, name: &str) -> Option<GroupInfo> {
        self.groups.get(namespace, name)
    }

    fn stats(&self) -> Vec<crate::facts::CacheStats> {
        vec![self.groups.stats()]
    }

    fn appeared(&self, namespace: &str, name: &str) -> BoxFuture<'static, ()> {
        let groups = self.groups.clone();
        let (namespace, name) = (namespace.to_string(), name.to_string());
        appeared_when(self.groups.subscribe(), move || {
            groups.get(&namespace, &name).is_some()
        })
    }

    fn confirm<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, GroupLookup> {
        async move {
            if let Some(group) = self.get(namespace, name) {
                return GroupLookup::Found(group);
            }
            let resource = match self.groups.served() {
                Served::Yes(resource) => resource,
                Served::No => return GroupLookup::Missing,
                Served::Unknown => {
                    return GroupLookup::Unknown(
                        "the VirtualMachineGroup API has not been discovered yet".into(),
                    );
                }
            };
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), namespace, &resource);
            match api.get_metadata_opt(name).await {
                Ok(Some(group)) => GroupLookup::Found(GroupInfo {
                    holds_power: group.metadata.annotations.is_some_and(|annotations| {
                        annotations.contains_key(vmop::power::POWER_HELD_ANNOTATION)
                    }),
                }),
                Ok(None) => GroupLookup::Missing,
                Err(err) => GroupLookup::Unknown(err.to_string()),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_projection_keeps_whether_the_group_holds_power_and_nothing_else() {
        let held: GroupWire = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "g", "namespace": "ns", "resourceVersion": "7",
                "annotations": {vmop::power::POWER_HELD_ANNOTATION: "boot-order",
                    "big": "x".repeat(10_000)},
                "labels": {"a": "b"}, "managedFields": [{"manager": "kubectl"}]}
        }))
        .unwrap();
        assert_eq!(GroupInfo::name(&held), "g");
        assert_eq!(GroupInfo::namespace(&held), Some("ns"));
        assert_eq!(GroupInfo::resource_version(&held), Some("7"));
        assert!(GroupInfo::project(held).holds_power);
        let plain: GroupWire = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "g", "annotations": {"other": "x"}}
        }))
        .unwrap();
        assert!(!GroupInfo::project(plain).holds_power);
    }
}
