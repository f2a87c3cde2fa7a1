//! What a target namespace has that a restored VM can name, and VM
//! Operator's rules for resolving each reference against it: classes and
//! their active instances, images by name or display name, the storage
//! classes a namespace is assigned and those that encrypt, networks of each
//! provider's kind, zones. Pure: the facts layer reads the objects (from
//! watches, or a live list when a watch is broken) into a [`TargetView`],
//! and [`check`] and [`alternatives`] answer from it.
//!
//! The objects are kept as small projections (a name and a few fields), so
//! what a view holds grows with the number of objects, never with what a
//! user writes into their metadata.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::vmop::mapping::{self, NETWORK_KINDS};
use crate::vmop::{ClusterRef, RefKind};

/// The network kinds VM Operator attaches interfaces to, by provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NetworkKind {
    /// VDS (netoperator.vmware.com).
    Network,
    /// NSX-T (vmware.com).
    VirtualNetwork,
    /// NSX VPC (crd.nsx.vmware.com).
    Subnet,
    SubnetSet,
}

impl NetworkKind {
    pub const ALL: [NetworkKind; 4] = [
        NetworkKind::Network,
        NetworkKind::VirtualNetwork,
        NetworkKind::Subnet,
        NetworkKind::SubnetSet,
    ];

    pub fn kind(self) -> &'static str {
        NETWORK_KINDS[self as usize].0
    }

    /// The API group serving it.
    pub fn group(self) -> &'static str {
        let api_version = NETWORK_KINDS[self as usize].1;
        api_version.split_once('/').map_or("", |(group, _)| group)
    }
}

/// One kind of object references are checked against, read as one list (or
/// watch) of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Collection {
    Zones,
    AvailabilityZones,
    Classes,
    ClassInstances,
    Images,
    ClusterImages,
    ResourceQuotas,
    StoragePolicyQuotas,
    StorageClasses,
    /// VM Operator's StoragePolicy objects, in its own namespace only.
    StoragePolicies,
    Networks(NetworkKind),
}

const TOPOLOGY: &str = "topology.tanzu.vmware.com";

impl Collection {
    pub const ALL: [Collection; 14] = [
        Collection::Zones,
        Collection::AvailabilityZones,
        Collection::Classes,
        Collection::ClassInstances,
        Collection::Images,
        Collection::ClusterImages,
        Collection::ResourceQuotas,
        Collection::StoragePolicyQuotas,
        Collection::StorageClasses,
        Collection::StoragePolicies,
        Collection::Networks(NetworkKind::Network),
        Collection::Networks(NetworkKind::VirtualNetwork),
        Collection::Networks(NetworkKind::Subnet),
        Collection::Networks(NetworkKind::SubnetSet),
    ];

    /// The API group and kind of its objects.
    pub fn group_kind(self) -> (&'static str, &'static str) {
        match self {
            Collection::Zones => (TOPOLOGY, "Zone"),
            Collection::AvailabilityZones => (TOPOLOGY, "AvailabilityZone"),
            Collection::Classes => (super::GROUP, "VirtualMachineClass"),
            Collection::ClassInstances => (super::GROUP, "VirtualMachineClassInstance"),
            Collection::Images => (super::GROUP, "VirtualMachineImage"),
            Collection::ClusterImages => (super::GROUP, "ClusterVirtualMachineImage"),
            Collection::ResourceQuotas => ("", "ResourceQuota"),
            Collection::StoragePolicyQuotas => ("cns.vmware.com", "StoragePolicyQuota"),
            Collection::StorageClasses => ("storage.k8s.io", "StorageClass"),
            Collection::StoragePolicies => ("infra.vmware.com", "StoragePolicy"),
            Collection::Networks(kind) => (kind.group(), kind.kind()),
        }
    }

    /// Its objects belong to no namespace: one list serves every namespace.
    pub fn cluster_scoped(self) -> bool {
        matches!(
            self,
            Collection::AvailabilityZones | Collection::ClusterImages | Collection::StorageClasses
        )
    }

    /// A name and labels are all the checks read: the metadata-only API
    /// serves it, without specs and statuses.
    pub fn metadata_only(self) -> bool {
        matches!(
            self,
            Collection::Zones
                | Collection::AvailabilityZones
                | Collection::Classes
                | Collection::ClassInstances
                | Collection::Networks(_)
        )
    }

    /// `plural.group`-like name for logs and metrics: the kind and group.
    pub fn label(self) -> &'static str {
        match self {
            Collection::Zones => "zones.topology.tanzu.vmware.com",
            Collection::AvailabilityZones => "availabilityzones.topology.tanzu.vmware.com",
            Collection::Classes => "virtualmachineclasses.vmoperator.vmware.com",
            Collection::ClassInstances => "virtualmachineclassinstances.vmoperator.vmware.com",
            Collection::Images => "virtualmachineimages.vmoperator.vmware.com",
            Collection::ClusterImages => "clustervirtualmachineimages.vmoperator.vmware.com",
            Collection::ResourceQuotas => "resourcequotas",
            Collection::StoragePolicyQuotas => "storagepolicyquotas.cns.vmware.com",
            Collection::StorageClasses => "storageclasses.storage.k8s.io",
            Collection::StoragePolicies => "storagepolicies.infra.vmware.com",
            Collection::Networks(NetworkKind::Network) => "networks.netoperator.vmware.com",
            Collection::Networks(NetworkKind::VirtualNetwork) => "virtualnetworks.vmware.com",
            Collection::Networks(NetworkKind::Subnet) => "subnets.crd.nsx.vmware.com",
            Collection::Networks(NetworkKind::SubnetSet) => "subnetsets.crd.nsx.vmware.com",
        }
    }
}

/// The collections checking a reference of `kind` reads (its alternatives
/// included).
pub fn collections_for(kind: RefKind) -> &'static [Collection] {
    use Collection::*;
    use NetworkKind::*;
    match kind {
        RefKind::Zone => &[Zones, AvailabilityZones],
        RefKind::ClassInstance => &[ClassInstances],
        RefKind::Image => &[Images],
        RefKind::ClusterImage => &[ClusterImages],
        RefKind::ImageName => &[Images, ClusterImages],
        RefKind::Class => &[Classes, ClassInstances],
        RefKind::StorageClass => &[ResourceQuotas, StoragePolicyQuotas, StorageClasses],
        RefKind::EncryptionStorageClass => &[
            StoragePolicies,
            StorageClasses,
            ResourceQuotas,
            StoragePolicyQuotas,
        ],
        RefKind::Network => &[
            Networks(Network),
            Networks(VirtualNetwork),
            Networks(Subnet),
            Networks(SubnetSet),
        ],
    }
}

/// What the checks keep of a VirtualMachineClassInstance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassInstance {
    /// It carries VM Operator's `vmoperator.vmware.com/active` label.
    pub active: bool,
    /// The VirtualMachineClasses among its owners; `None` when not known
    /// (an instance given by hand): it counts as an instance of any class.
    pub classes: Option<Vec<String>>,
}

/// What the checks keep of a VirtualMachineImage or ClusterVirtualMachineImage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Image {
    /// `status.name`, the name an admin knows the image by.
    pub display_name: Option<String>,
}

/// What the checks keep of a ResourceQuota: the storage classes its keys
/// name (`<class>.storageclass.storage.k8s.io/…`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageQuota {
    pub classes: Vec<String>,
}

/// What the checks keep of a StoragePolicyQuota: the policy it assigns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyQuota {
    pub policy_id: Option<String>,
}

/// What the checks keep of a StorageClass: its vSphere storage policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageClass {
    pub policy_id: Option<String>,
}

/// What the checks keep of VM Operator's StoragePolicy object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoragePolicy {
    pub encrypted: bool,
}

/// The objects of one collection in one namespace (or the cluster), by name.
pub type Objects<P> = Arc<BTreeMap<String, P>>;

/// One collection as its source knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listing<P> {
    /// The API server does not serve this kind.
    NotServed,
    Listed(Objects<P>),
    /// It could not be read; the message says why.
    Unknown(String),
}

impl<P> Listing<P> {
    pub fn listed(objects: impl IntoIterator<Item = (String, P)>) -> Listing<P> {
        Listing::Listed(Arc::new(objects.into_iter().collect()))
    }
}

/// What one namespace has, of the collections a review asked for (`None`:
/// not asked, or not known).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetView {
    pub zones: Option<Listing<()>>,
    pub availability_zones: Option<Listing<()>>,
    pub classes: Option<Listing<()>>,
    pub class_instances: Option<Listing<ClassInstance>>,
    pub images: Option<Listing<Image>>,
    pub cluster_images: Option<Listing<Image>>,
    pub resource_quotas: Option<Listing<StorageQuota>>,
    pub policy_quotas: Option<Listing<PolicyQuota>>,
    pub storage_classes: Option<Listing<StorageClass>>,
    pub storage_policies: Option<Listing<StoragePolicy>>,
    pub networks: BTreeMap<NetworkKind, Listing<()>>,
}

impl TargetView {
    /// Takes every collection `newer` has, in place of what this view had
    /// of it (a confirmation read live over what a cache said).
    pub fn overlay(&mut self, newer: TargetView) {
        fn take<P>(mine: &mut Option<Listing<P>>, theirs: Option<Listing<P>>) {
            if theirs.is_some() {
                *mine = theirs;
            }
        }
        take(&mut self.zones, newer.zones);
        take(&mut self.availability_zones, newer.availability_zones);
        take(&mut self.classes, newer.classes);
        take(&mut self.class_instances, newer.class_instances);
        take(&mut self.images, newer.images);
        take(&mut self.cluster_images, newer.cluster_images);
        take(&mut self.resource_quotas, newer.resource_quotas);
        take(&mut self.policy_quotas, newer.policy_quotas);
        take(&mut self.storage_classes, newer.storage_classes);
        take(&mut self.storage_policies, newer.storage_policies);
        self.networks.extend(newer.networks);
    }

    /// This view with only the collections in `keep`.
    pub fn only(mut self, keep: &BTreeSet<Collection>) -> TargetView {
        use Collection::*;
        let keeps = |collection: Collection| keep.contains(&collection);
        if !keeps(Zones) {
            self.zones = None;
        }
        if !keeps(AvailabilityZones) {
            self.availability_zones = None;
        }
        if !keeps(Classes) {
            self.classes = None;
        }
        if !keeps(ClassInstances) {
            self.class_instances = None;
        }
        if !keeps(Images) {
            self.images = None;
        }
        if !keeps(ClusterImages) {
            self.cluster_images = None;
        }
        if !keeps(ResourceQuotas) {
            self.resource_quotas = None;
        }
        if !keeps(StoragePolicyQuotas) {
            self.policy_quotas = None;
        }
        if !keeps(StorageClasses) {
            self.storage_classes = None;
        }
        if !keeps(StoragePolicies) {
            self.storage_policies = None;
        }
        self.networks.retain(|kind, _| keeps(Networks(*kind)));
        self
    }

    /// Every collection unknown, for `reason`: what checks answer when the
    /// objects could not be read in time.
    pub fn unknown(reason: &str) -> TargetView {
        fn unknown<P>(reason: &str) -> Option<Listing<P>> {
            Some(Listing::Unknown(reason.to_string()))
        }
        TargetView {
            zones: unknown(reason),
            availability_zones: unknown(reason),
            classes: unknown(reason),
            class_instances: unknown(reason),
            images: unknown(reason),
            cluster_images: unknown(reason),
            resource_quotas: unknown(reason),
            policy_quotas: unknown(reason),
            storage_classes: unknown(reason),
            storage_policies: unknown(reason),
            networks: NetworkKind::ALL
                .into_iter()
                .map(|kind| (kind, Listing::Unknown(reason.to_string())))
                .collect(),
        }
    }
}

/// What one reference's check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    Found,
    /// The namespace has nothing of this kind to compare with (no classes,
    /// no storage quota, no images, no networks): VM Operator's own answer
    /// stands.
    Unchecked,
    Missing,
    Unknown(String),
}

/// The objects of a listing, `None` where the kind is not served (or was
/// not asked for), or why it could not be read.
fn objects<P>(listing: &Option<Listing<P>>) -> Result<Option<&Objects<P>>, String> {
    match listing {
        Some(Listing::Listed(objects)) => Ok(Some(objects)),
        Some(Listing::Unknown(err)) => Err(err.clone()),
        Some(Listing::NotServed) | None => Ok(None),
    }
}

/// A reference checked against what its namespace has: `None` is nothing to
/// compare with.
fn among<T>(listed: Result<Option<T>, String>, found: impl FnOnce(&T) -> bool) -> Checked {
    match listed {
        Ok(None) => Checked::Unchecked,
        Ok(Some(listed)) if found(&listed) => Checked::Found,
        Ok(Some(_)) => Checked::Missing,
        Err(err) => Checked::Unknown(err),
    }
}

/// An object reference (`spec.class`, `spec.image`, the zone label): found
/// or missing, never unchecked.
fn named<P>(listing: &Option<Listing<P>>, name: &str, qualifies: impl Fn(&P) -> bool) -> Checked {
    match objects(listing) {
        Ok(Some(objects)) if objects.get(name).is_some_and(qualifies) => Checked::Found,
        Ok(_) => Checked::Missing,
        Err(err) => Checked::Unknown(err),
    }
}

/// Whether `reference` resolves in `view`, as VM Operator resolves it.
pub fn check(view: &TargetView, reference: &ClusterRef) -> Checked {
    let name = reference.name.as_str();
    match reference.kind {
        // VM Operator 1.10 turns workload domain isolation on for every VM
        // that is not a Kubernetes node (GetContextWithWorkloadDomainIsolation):
        // the zone must be a Zone in the VM's namespace. Only a cluster that
        // does not serve Zones at all checks the cluster-wide AvailabilityZone.
        RefKind::Zone => match &view.zones {
            Some(Listing::NotServed) | None => named(&view.availability_zones, name, |_| true),
            zones => named(zones, name, |_| true),
        },
        // VM Operator admits only an active instance of the class the VM
        // names; Velero restores instances without their owner, so a
        // restored one never qualifies.
        RefKind::ClassInstance => named(&view.class_instances, name, |instance| {
            is_active_instance_of(instance, reference.owner.as_deref())
        }),
        RefKind::Image => named(&view.images, name, |_| true),
        RefKind::ClusterImage => named(&view.cluster_images, name, |_| true),
        RefKind::Network => among(namespace_networks(view), |networks| {
            mapping::network_found(networks, name)
        }),
        RefKind::ImageName => among(visible_images(view), |images| {
            image_name_resolves(images, name)
        }),
        RefKind::StorageClass => among(assigned_storage_classes(view), |classes| {
            classes.iter().any(|class| class == name)
        }),
        RefKind::Class => among(usable_classes(view), |classes| {
            classes.iter().any(|class| class == name)
        }),
        RefKind::EncryptionStorageClass => among(encrypted_storage_classes(view), |classes| {
            classes.iter().any(|class| class == name)
        }),
    }
}

/// What the namespace has instead, for a denial's message, sorted. Empty
/// when nobody knows.
pub fn alternatives(view: &TargetView, kind: RefKind) -> Vec<String> {
    match kind {
        RefKind::Class => {
            let mut names = usable_classes(view).ok().flatten().unwrap_or_default();
            names.sort();
            names
        }
        RefKind::Network => namespace_networks(view).ok().flatten().unwrap_or_default(),
        RefKind::ImageName => visible_images(view)
            .ok()
            .flatten()
            .map(image_alternatives)
            .unwrap_or_default(),
        RefKind::StorageClass => assigned_storage_classes(view)
            .ok()
            .flatten()
            .unwrap_or_default(),
        // The namespace's encryption storage classes (every one, where no
        // quota says which the namespace has).
        RefKind::EncryptionStorageClass => {
            let encrypted = encrypted_storage_classes(view)
                .ok()
                .flatten()
                .unwrap_or_default();
            match assigned_storage_classes(view) {
                Ok(Some(assigned)) => encrypted
                    .into_iter()
                    .filter(|class| assigned.contains(class))
                    .collect(),
                _ => encrypted,
            }
        }
        RefKind::Zone | RefKind::ClassInstance | RefKind::Image | RefKind::ClusterImage => {
            Vec::new()
        }
    }
}

/// The label VM Operator puts on the active instance of a class.
pub const ACTIVE_INSTANCE_LABEL: &str = "vmoperator.vmware.com/active";

fn is_active_instance_of(instance: &ClassInstance, class: Option<&str>) -> bool {
    let owned = match (class, &instance.classes) {
        (Some(class), Some(classes)) => classes.iter().any(|owner| owner == class),
        _ => true,
    };
    instance.active && owned
}

/// The classes of the namespace a VM can run with: each VirtualMachineClass
/// with an active instance, or every class where the namespace has no
/// instances (ImmutableClasses off). `None` when the namespace has no
/// classes, or the API is not served: nothing to check against.
fn usable_classes(view: &TargetView) -> Result<Option<Vec<String>>, String> {
    let Some(classes) = objects(&view.classes)?.filter(|classes| !classes.is_empty()) else {
        return Ok(None);
    };
    let instances = objects(&view.class_instances)?.filter(|instances| !instances.is_empty());
    Ok(Some(
        classes
            .keys()
            .filter(|class| {
                instances.is_none_or(|instances| {
                    instances
                        .values()
                        .any(|instance| is_active_instance_of(instance, Some(class)))
                })
            })
            .cloned()
            .collect(),
    ))
}

/// The storage classes assigned to the namespace, read both ways VM
/// Operator reads them (`IsStorageClassInNamespace`): a ResourceQuota key
/// `<class>.storageclass.storage.k8s.io/…`, or, on stretched Supervisors, a
/// StoragePolicyQuota naming the class's policy ID. VM Operator reads one or
/// the other by a feature switch this webhook cannot see, so either counts:
/// a class neither assigns is refused whichever is on. `None` when neither
/// names one: nothing to check against (not a Supervisor namespace).
fn assigned_storage_classes(view: &TargetView) -> Result<Option<Vec<String>>, String> {
    let mut classes: Vec<String> = objects(&view.resource_quotas)?
        .into_iter()
        .flat_map(|quotas| quotas.values())
        .flat_map(|quota| quota.classes.iter().cloned())
        .collect();
    let policies: Vec<&str> = objects(&view.policy_quotas)?
        .into_iter()
        .flat_map(|quotas| quotas.values())
        .filter_map(|quota| quota.policy_id.as_deref())
        .filter(|id| !id.is_empty())
        .collect();
    if !policies.is_empty() {
        classes.extend(storage_classes_by_policy(view, |id| {
            policies.contains(&id)
        })?);
    }
    classes.sort();
    classes.dedup();
    Ok((!classes.is_empty()).then_some(classes))
}

/// The names of the cluster's StorageClasses whose policy ID `wanted` accepts.
fn storage_classes_by_policy(
    view: &TargetView,
    wanted: impl Fn(&str) -> bool,
) -> Result<Vec<String>, String> {
    Ok(objects(&view.storage_classes)?
        .into_iter()
        .flat_map(|classes| classes.iter())
        .filter(|(_, class)| class.policy_id.as_deref().is_some_and(&wanted))
        .map(|(name, _)| name.clone())
        .collect())
}

/// The storage classes VM Operator takes for encryption ones
/// (`IsEncryptedStorageClass`): a class whose policy ID names a StoragePolicy
/// object in VM Operator's namespace with `status.encrypted`. `None` when
/// that namespace holds no StoragePolicy (Bring Your Own Key off, or the API
/// not served): nothing to check against, VM Operator's answer stands.
fn encrypted_storage_classes(view: &TargetView) -> Result<Option<Vec<String>>, String> {
    let Some(recorded) = objects(&view.storage_policies)?.filter(|policies| !policies.is_empty())
    else {
        return Ok(None);
    };
    let mut encrypted = storage_classes_by_policy(view, |id| {
        storage_policy_object_name(id)
            .is_some_and(|object| recorded.get(&object).is_some_and(|policy| policy.encrypted))
    })?;
    encrypted.sort();
    Ok(Some(encrypted))
}

/// The networks of the namespace, as `KIND/NAME`, of every kind VM Operator
/// attaches to that the API server serves. `None` when there are none:
/// nothing to check against.
fn namespace_networks(view: &TargetView) -> Result<Option<Vec<String>>, String> {
    let mut networks = Vec::new();
    for (kind, listing) in &view.networks {
        if let Listing::Unknown(err) = listing {
            return Err(err.clone());
        }
        if let Listing::Listed(objects) = listing {
            networks.extend(objects.keys().map(|name| format!("{}/{name}", kind.kind())));
        }
    }
    networks.sort();
    Ok((!networks.is_empty()).then_some(networks))
}

/// One image a namespace can name in `spec.imageName`.
#[derive(Debug, Clone, PartialEq)]
struct VisibleImage<'a> {
    name: &'a str,
    display_name: Option<&'a str>,
    /// A VirtualMachineImage in the namespace (else a ClusterVirtualMachineImage).
    namespaced: bool,
}

/// The images a VM in the namespace can name: each VirtualMachineImage there
/// and each ClusterVirtualMachineImage. `None` when there are none, or the
/// APIs are not served: nothing to check against.
fn visible_images(view: &TargetView) -> Result<Option<Vec<VisibleImage<'_>>>, String> {
    let mut images = Vec::new();
    for (listing, namespaced) in [(&view.images, true), (&view.cluster_images, false)] {
        images.extend(
            objects(listing)?
                .into_iter()
                .flat_map(|objects| objects.iter())
                .map(|(name, image)| VisibleImage {
                    name,
                    display_name: image.display_name.as_deref().filter(|n| !n.is_empty()),
                    namespaced,
                }),
        );
    }
    Ok((!images.is_empty()).then_some(images))
}

/// Whether `image_name` resolves among `images` the way VM Operator's
/// `ResolveImageName` resolves it. A display name that several images share
/// counts as resolving: VM Operator refuses it with its own message
/// ("multiple VM images exist"), which names the problem better than ours.
fn image_name_resolves(images: &[VisibleImage], image_name: &str) -> bool {
    if image_name.starts_with("vmi-") {
        return images.iter().any(|image| image.name == image_name);
    }
    images
        .iter()
        .any(|image| image.display_name == Some(image_name))
}

/// The images as a denial lists them: the name to map to, and the display
/// name an admin recognises. Namespace images first, as VM Operator looks there first.
fn image_alternatives(mut images: Vec<VisibleImage>) -> Vec<String> {
    images.sort_by(|a, b| (!a.namespaced, a.name).cmp(&(!b.namespaced, b.name)));
    images
        .into_iter()
        .map(|image| match image.display_name {
            Some(display) => format!("{} ({display})", image.name),
            None => image.name.to_string(),
        })
        .collect()
}

/// The StorageClass parameter holding its vSphere storage policy's ID.
pub const STORAGE_POLICY_ID_PARAMETER: &str = "storagePolicyID";

/// What joins a storage class's name to the resource in a quota key.
pub const STORAGE_QUOTA_INFIX: &str = ".storageclass.storage.k8s.io/";

/// The storage class a ResourceQuota key assigns, if it names one.
pub fn quota_key_storage_class(key: &str) -> Option<&str> {
    key.split_once(STORAGE_QUOTA_INFIX)
        .map(|(class, _)| class)
        .filter(|class| !class.is_empty())
}

/// The name of the StoragePolicy object VM Operator keeps for a policy ID
/// (`GetStoragePolicyObjectName`): `pol-` and two slices of the ID, lower
/// case without dashes. `None` for an ID that is not a UUID, for which VM
/// Operator keeps no object.
pub fn storage_policy_object_name(policy_id: &str) -> Option<String> {
    if !is_go_uuid(policy_id) {
        return None;
    }
    let compact = policy_id.to_lowercase().replace('-', "");
    Some(format!(
        "pol-{}-{}",
        compact.get(0..8)?,
        compact.get(16..32)?
    ))
}

/// Whether Go's `uuid.Parse` accepts `text`: 32 hex digits, or the 36-character
/// dashed form, bare, in braces or after `urn:uuid:`.
fn is_go_uuid(text: &str) -> bool {
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    let dashed = |s: &str| {
        s.len() == 36
            && s.bytes().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => b == b'-',
                _ => b.is_ascii_hexdigit(),
            })
    };
    match text.len() {
        32 => hex(text),
        36 => dashed(text),
        38 => text.starts_with('{') && text.ends_with('}') && dashed(&text[1..37]),
        45 => {
            text.get(..9)
                .is_some_and(|prefix| prefix.eq_ignore_ascii_case("urn:uuid:"))
                && dashed(&text[9..])
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(kind: RefKind, name: &str, owner: Option<&str>) -> ClusterRef {
        ClusterRef {
            kind,
            name: name.to_string(),
            owner: owner.map(str::to_string),
        }
    }

    fn names(names: &[&str]) -> Option<Listing<()>> {
        Some(Listing::listed(names.iter().map(|n| (n.to_string(), ()))))
    }

    fn instance(name: &str, class: &str, active: bool) -> (String, ClassInstance) {
        (
            name.to_string(),
            ClassInstance {
                active,
                classes: Some(vec![class.to_string()]),
            },
        )
    }

    #[test]
    fn a_policy_id_names_its_storage_policy_object_as_vm_operator_names_it() {
        for (id, expected) in [
            (
                "AA8B7C3E-1234-5678-9ABC-DEF012345678",
                Some("pol-aa8b7c3e-9abcdef012345678"),
            ),
            (
                "aa8b7c3e123456789abcdef012345678",
                Some("pol-aa8b7c3e-9abcdef012345678"),
            ),
            (
                "urn:uuid:aa8b7c3e-1234-5678-9abc-def012345678",
                Some("pol-urn:uuid-e123456789abcdef"),
            ),
            // Go keeps the braces through its slicing; so do we.
            (
                "{cc000000-0000-0000-0000-00000000000c}",
                Some("pol-{cc00000-0000000000000000"),
            ),
            ("pol-gold", None),
            ("aa8b7c3e-1234-5678-9abc-def01234567", None),
            ("aa8b7c3e_1234-5678-9abc-def012345678", None),
            ("", None),
        ] {
            assert_eq!(storage_policy_object_name(id).as_deref(), expected, "{id}");
        }
    }

    #[test]
    fn a_zone_is_the_namespaces_zone_where_zones_are_served_else_an_availability_zone() {
        let view = TargetView {
            zones: Some(Listing::NotServed),
            availability_zones: names(&["zone-a"]),
            ..Default::default()
        };
        assert_eq!(
            check(&view, &reference(RefKind::Zone, "zone-a", None)),
            Checked::Found
        );
        assert_eq!(
            check(&view, &reference(RefKind::Zone, "zone-b", None)),
            Checked::Missing
        );
        // Zones served: the namespace's Zone decides, whatever AZs exist.
        let view = TargetView {
            zones: names(&[]),
            ..view
        };
        assert_eq!(
            check(&view, &reference(RefKind::Zone, "zone-a", None)),
            Checked::Missing
        );
        // Neither served: the zone cannot resolve.
        let view = TargetView {
            zones: Some(Listing::NotServed),
            availability_zones: Some(Listing::NotServed),
            ..Default::default()
        };
        assert_eq!(
            check(&view, &reference(RefKind::Zone, "zone-a", None)),
            Checked::Missing
        );
    }

    #[test]
    fn a_class_counts_with_an_active_instance_and_only_where_classes_exist() {
        let prod = TargetView {
            classes: names(&["best-effort-small", "guaranteed-large"]),
            class_instances: Some(Listing::listed([
                instance("small", "best-effort-small", true),
                instance("large", "guaranteed-large", false),
            ])),
            ..Default::default()
        };
        let class = |name| reference(RefKind::Class, name, None);
        assert_eq!(check(&prod, &class("best-effort-small")), Checked::Found);
        assert_eq!(check(&prod, &class("guaranteed-large")), Checked::Missing);
        assert_eq!(check(&prod, &class("gone")), Checked::Missing);
        assert_eq!(alternatives(&prod, RefKind::Class), ["best-effort-small"]);
        // The instance: active, and of the VM's class.
        let instance_ref = |name, class| reference(RefKind::ClassInstance, name, Some(class));
        assert_eq!(
            check(&prod, &instance_ref("small", "best-effort-small")),
            Checked::Found
        );
        assert_eq!(
            check(&prod, &instance_ref("small", "guaranteed-large")),
            Checked::Missing
        );
        assert_eq!(
            check(&prod, &instance_ref("large", "guaranteed-large")),
            Checked::Missing
        );
        // No instances at all (ImmutableClasses off): every class counts.
        let flat = TargetView {
            classes: names(&["only"]),
            class_instances: Some(Listing::listed([])),
            ..Default::default()
        };
        assert_eq!(check(&flat, &class("only")), Checked::Found);
        assert_eq!(check(&flat, &class("gone")), Checked::Missing);
        // No classes, or the API not served: nothing to check against.
        for classes in [names(&[]), Some(Listing::NotServed)] {
            let bare = TargetView {
                classes,
                ..Default::default()
            };
            assert_eq!(check(&bare, &class("any")), Checked::Unchecked);
        }
        // A list that failed is unknown, not missing.
        let failed = TargetView {
            classes: Some(Listing::Unknown("forbidden".into())),
            ..Default::default()
        };
        assert_eq!(
            check(&failed, &class("any")),
            Checked::Unknown("forbidden".into())
        );
    }

    #[test]
    fn an_image_name_resolves_by_object_name_or_display_name_as_vm_operator_does() {
        let image = |name: &str, display: Option<&str>| {
            (
                name.to_string(),
                Image {
                    display_name: display.map(str::to_string),
                },
            )
        };
        let prod = TargetView {
            images: Some(Listing::listed([
                image("vmi-a", Some("ubuntu-22.04")),
                image("vmi-b", Some("photon")),
            ])),
            cluster_images: Some(Listing::listed([
                image("vmi-c", Some("ubuntu-22.04")),
                image("vmi-d", Some("centos")),
            ])),
            ..Default::default()
        };
        let image_name = |name| reference(RefKind::ImageName, name, None);
        for (name, expected) in [
            ("vmi-a", Checked::Found),
            ("vmi-d", Checked::Found),
            ("vmi-zz", Checked::Missing),
            ("photon", Checked::Found),
            ("centos", Checked::Found),
            ("windows", Checked::Missing),
            // Two images share it: VM Operator's own refusal names that.
            ("ubuntu-22.04", Checked::Found),
            // A `vmi-` name is never a display name.
            ("vmi-photon", Checked::Missing),
        ] {
            assert_eq!(check(&prod, &image_name(name)), expected, "{name}");
        }
        assert_eq!(
            alternatives(&prod, RefKind::ImageName),
            [
                "vmi-a (ubuntu-22.04)",
                "vmi-b (photon)",
                "vmi-c (ubuntu-22.04)",
                "vmi-d (centos)"
            ]
        );
        // The spec.image object itself.
        assert_eq!(
            check(&prod, &reference(RefKind::Image, "vmi-a", None)),
            Checked::Found
        );
        assert_eq!(
            check(&prod, &reference(RefKind::ClusterImage, "vmi-a", None)),
            Checked::Missing
        );
        // No images anywhere: nothing to compare with.
        let bare = TargetView {
            images: Some(Listing::NotServed),
            cluster_images: Some(Listing::listed([])),
            ..Default::default()
        };
        assert_eq!(check(&bare, &image_name("photon")), Checked::Unchecked);
    }

    fn storage_view() -> TargetView {
        let class = |name: &str, policy: Option<&str>| {
            (
                name.to_string(),
                StorageClass {
                    policy_id: policy.map(str::to_string),
                },
            )
        };
        TargetView {
            resource_quotas: Some(Listing::listed([(
                "quota".to_string(),
                StorageQuota {
                    classes: vec!["site-b-gold".into(), "site-b-encrypted".into()],
                },
            )])),
            policy_quotas: Some(Listing::NotServed),
            storage_classes: Some(Listing::listed([
                class("site-b-gold", Some("pol-gold")),
                class(
                    "site-b-encrypted",
                    Some("aa8b7c3e-1234-5678-9abc-def012345678"),
                ),
                class("site-b-clear", Some("bb8b7c3e-1234-5678-9abc-def012345678")),
                class(
                    "elsewhere-encrypted",
                    Some("AA8B7C3E-1234-5678-9ABC-DEF012345678"),
                ),
                class("local", None),
            ])),
            storage_policies: Some(Listing::listed([
                (
                    "pol-aa8b7c3e-9abcdef012345678".to_string(),
                    StoragePolicy { encrypted: true },
                ),
                (
                    "pol-bb8b7c3e-9abcdef012345678".to_string(),
                    StoragePolicy { encrypted: false },
                ),
            ])),
            ..Default::default()
        }
    }

    #[test]
    fn a_storage_class_counts_when_a_quota_of_the_namespace_names_it() {
        let view = storage_view();
        let storage = |name| reference(RefKind::StorageClass, name, None);
        assert_eq!(check(&view, &storage("site-b-gold")), Checked::Found);
        assert_eq!(
            check(&view, &storage("wcpglobal-storage-profile")),
            Checked::Missing
        );
        assert_eq!(
            alternatives(&view, RefKind::StorageClass),
            ["site-b-encrypted", "site-b-gold"]
        );
        // A stretched Supervisor's namespace: a StoragePolicyQuota names the
        // policy ID, and the storage classes with that ID are assigned.
        let stretched = TargetView {
            resource_quotas: Some(Listing::listed([])),
            policy_quotas: Some(Listing::listed([(
                "spq".to_string(),
                PolicyQuota {
                    policy_id: Some("pol-gold".into()),
                },
            )])),
            ..view.clone()
        };
        assert_eq!(check(&stretched, &storage("site-b-gold")), Checked::Found);
        assert_eq!(check(&stretched, &storage("local")), Checked::Missing);
        // No quota names a storage class: not a Supervisor namespace.
        let bare = TargetView {
            resource_quotas: Some(Listing::listed([])),
            ..view
        };
        assert_eq!(check(&bare, &storage("anything")), Checked::Unchecked);
    }

    #[test]
    fn an_encryption_class_needs_a_storage_class_whose_policy_vm_operator_records_as_encrypted() {
        let view = storage_view();
        let encrypted = |name| reference(RefKind::EncryptionStorageClass, name, Some("my-keys"));
        for (name, expected) in [
            ("site-b-encrypted", Checked::Found),
            ("elsewhere-encrypted", Checked::Found),
            // Its policy is recorded, not encrypted.
            ("site-b-clear", Checked::Missing),
            // Its policy ID is no UUID: VM Operator keeps no record of it.
            ("site-b-gold", Checked::Missing),
            ("local", Checked::Missing),
            ("no-such-class", Checked::Missing),
        ] {
            assert_eq!(check(&view, &encrypted(name)), expected, "{name}");
        }
        // Those assigned to the namespace; every one where no quota says.
        assert_eq!(
            alternatives(&view, RefKind::EncryptionStorageClass),
            ["site-b-encrypted"]
        );
        let unassigned = TargetView {
            resource_quotas: Some(Listing::listed([])),
            ..view.clone()
        };
        assert_eq!(
            alternatives(&unassigned, RefKind::EncryptionStorageClass),
            ["elsewhere-encrypted", "site-b-encrypted"]
        );
        // No StoragePolicy recorded (Bring Your Own Key off): unchecked.
        let off = TargetView {
            storage_policies: Some(Listing::listed([])),
            ..view
        };
        assert_eq!(check(&off, &encrypted("site-b-clear")), Checked::Unchecked);
    }

    #[test]
    fn a_network_counts_when_the_namespace_has_one_of_that_kind_and_name() {
        let view = TargetView {
            networks: [
                (
                    NetworkKind::SubnetSet,
                    Listing::listed([("site-b-subnets".to_string(), ())]),
                ),
                (
                    NetworkKind::Network,
                    Listing::listed([("vds-1".to_string(), ())]),
                ),
                (NetworkKind::VirtualNetwork, Listing::NotServed),
            ]
            .into(),
            ..Default::default()
        };
        let network = |name| reference(RefKind::Network, name, None);
        for (name, expected) in [
            ("SubnetSet/site-b-subnets", Checked::Found),
            ("Network/vds-1", Checked::Found),
            ("vds-1", Checked::Found),
            ("SubnetSet/vm-default", Checked::Missing),
            // Same name, another kind: a VDS backup on a VPC Supervisor.
            ("Network/site-b-subnets", Checked::Missing),
            ("VirtualNetwork/vds-1", Checked::Missing),
        ] {
            assert_eq!(check(&view, &network(name)), expected, "{name}");
        }
        assert_eq!(
            alternatives(&view, RefKind::Network),
            ["Network/vds-1", "SubnetSet/site-b-subnets"]
        );
        assert_eq!(
            check(&TargetView::default(), &network("SubnetSet/x")),
            Checked::Unchecked
        );
    }

    #[test]
    fn quota_keys_name_storage_classes() {
        assert_eq!(
            quota_key_storage_class("gold.storageclass.storage.k8s.io/requests.storage"),
            Some("gold")
        );
        assert_eq!(quota_key_storage_class("requests.storage"), None);
        assert_eq!(
            quota_key_storage_class(".storageclass.storage.k8s.io/requests.storage"),
            None
        );
    }
}
