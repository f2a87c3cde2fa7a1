//! The live reference source. A zone, class instance or image reference is
//! one GET of metadata; a class, storage class, image name or network is
//! checked against what the VM's namespace has (one or a few lists, which
//! also give the alternatives a denial names). The caller bounds each by the
//! request's deadline. A resource the API server does not serve answers 404
//! as plain text, not a `NotFound` Status: the reference cannot resolve in
//! this cluster either, but for zones it tells which API to ask instead.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use kube::Client;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use tokio::time::Instant;

use crate::facts::{GroupPresence, RefFacts};
use crate::vmop::{self, ClusterRef, RefKind};

pub struct LiveRefs {
    client: Client,
    /// VM Operator's own namespace, where it records each storage policy
    /// (StoragePolicy objects) and whether it encrypts.
    vm_operator_namespace: String,
    /// References found lately, by `remembered_key`: a restore names the
    /// same class, image and zone in VM after VM, and each lookup is an API
    /// round trip (measured in a pod: about 80 ms a VM for five of them).
    /// Only finds are remembered: a reference that was missing is asked
    /// again, so one created meanwhile admits the next VM at once.
    found_lately: Mutex<HashMap<String, Instant>>,
}

/// How long a found reference is believed without asking again. One deleted
/// in that window is admitted, as it was before these checks existed; VM
/// Operator's own checks then decide.
pub const REMEMBER_FOUND: Duration = Duration::from_secs(10);
/// Bounds the memory of finds; past it, expired entries are dropped, then all.
const REMEMBERED_AT_MOST: usize = 4096;

fn remembered_key(namespace: &str, reference: &ClusterRef) -> String {
    format!(
        "{:?}\u{0}{namespace}\u{0}{}\u{0}{}",
        reference.kind,
        reference.name,
        reference.owner.as_deref().unwrap_or_default()
    )
}

/// What one reference's check found.
#[derive(Debug, PartialEq)]
enum Checked {
    Found,
    /// The namespace has nothing of this kind to compare with (no classes,
    /// no storage quota, no images, no networks): VM Operator's own answer
    /// stands.
    Unchecked,
    Missing,
    Unknown(String),
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

/// What one GET found.
#[derive(Debug, PartialEq)]
enum Lookup {
    Found(Box<kube::core::ObjectMeta>),
    /// The API is served and the object does not exist.
    Missing,
    /// The API server does not serve this resource at all.
    NotServed,
}

impl LiveRefs {
    pub fn new(client: Client, vm_operator_namespace: &str) -> LiveRefs {
        LiveRefs {
            client,
            vm_operator_namespace: vm_operator_namespace.to_string(),
            found_lately: Mutex::new(HashMap::new()),
        }
    }

    fn found_lately(&self, key: &str) -> bool {
        let found = self.found_lately.lock().unwrap_or_else(|e| e.into_inner());
        found
            .get(key)
            .is_some_and(|at| at.elapsed() < REMEMBER_FOUND)
    }

    fn remember_found(&self, key: String) {
        let mut found = self.found_lately.lock().unwrap_or_else(|e| e.into_inner());
        if found.len() >= REMEMBERED_AT_MOST {
            found.retain(|_, at| at.elapsed() < REMEMBER_FOUND);
            if found.len() >= REMEMBERED_AT_MOST {
                found.clear();
            }
        }
        found.insert(key, Instant::now());
    }

    async fn get(
        &self,
        resource: ApiResource,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Lookup, String> {
        let api: Api<DynamicObject> = match namespace {
            Some(namespace) => Api::namespaced_with(self.client.clone(), namespace, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        };
        match api.get_metadata_opt(name).await {
            Ok(Some(found)) => Ok(Lookup::Found(Box::new(found.metadata))),
            Ok(None) => Ok(Lookup::Missing),
            // A group nobody serves answers a plain-text "404 page not found"
            // (no NotFound Status).
            Err(kube::Error::Api(status)) if status.code == 404 && status.reason == "NotFound" => {
                Ok(Lookup::Missing)
            }
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(Lookup::NotServed),
            Err(err) => Err(err.to_string()),
        }
    }
}

impl LiveRefs {
    /// The classes of `namespace` a VM can run with: each VirtualMachineClass
    /// with an active instance, or every class where the namespace has no
    /// instances (ImmutableClasses off). `None` when the namespace has no
    /// classes, or the API is not served: nothing to check against.
    async fn usable_classes(&self, namespace: &str) -> Result<Option<Vec<String>>, String> {
        let Some(classes) = self
            .list_names(vmop_resource("VirtualMachineClass"), namespace)
            .await?
        else {
            return Ok(None);
        };
        if classes.is_empty() {
            return Ok(None);
        }
        let names = classes
            .iter()
            .filter_map(|meta| meta.name.clone())
            .collect::<Vec<_>>();
        let instances = self
            .list_names(vmop_resource("VirtualMachineClassInstance"), namespace)
            .await?
            .unwrap_or_default();
        if instances.is_empty() {
            return Ok(Some(names));
        }
        Ok(Some(
            names
                .into_iter()
                .filter(|class| {
                    instances
                        .iter()
                        .any(|meta| is_active_instance_of(meta, Some(class)))
                })
                .collect(),
        ))
    }

    /// The storage classes assigned to `namespace`, read both ways VM
    /// Operator reads them (`IsStorageClassInNamespace`): a ResourceQuota
    /// key `<class>.storageclass.storage.k8s.io/…`, or, on stretched
    /// Supervisors, a StoragePolicyQuota naming the class's policy ID. VM
    /// Operator reads one or the other by a feature switch this webhook cannot
    /// see, so either counts: a class neither assigns is refused whichever is
    /// on. `None` when neither names one: nothing to check against (not a
    /// Supervisor namespace).
    async fn assigned_storage_classes(
        &self,
        namespace: &str,
    ) -> Result<Option<Vec<String>>, String> {
        let api: Api<k8s_openapi::api::core::v1::ResourceQuota> =
            Api::namespaced(self.client.clone(), namespace);
        let quotas = api
            .list(&kube::api::ListParams::default())
            .await
            .map_err(|err| err.to_string())?;
        let mut classes = quotas
            .items
            .iter()
            .filter_map(|quota| quota.spec.as_ref()?.hard.as_ref())
            .flat_map(|hard| hard.keys())
            .filter_map(|key| {
                key.split_once(STORAGE_QUOTA_INFIX)
                    .map(|(class, _)| class.to_string())
            })
            .filter(|class| !class.is_empty())
            .collect::<Vec<_>>();
        classes.extend(self.policy_quota_classes(namespace).await?);
        classes.sort();
        classes.dedup();
        Ok((!classes.is_empty()).then_some(classes))
    }

    /// The storage classes whose policy ID (`parameters.storagePolicyID`) a
    /// StoragePolicyQuota of `namespace` names; none where StoragePolicyQuotas
    /// are not served or the namespace has none.
    async fn policy_quota_classes(&self, namespace: &str) -> Result<Vec<String>, String> {
        let quotas: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            namespace,
            &resource(
                "cns.vmware.com",
                "v1alpha2",
                "StoragePolicyQuota",
                "storagepolicyquotas",
            ),
        );
        let policies: Vec<String> = match quotas.list(&kube::api::ListParams::default()).await {
            Ok(list) => list
                .items
                .iter()
                .filter_map(|quota| quota.data.pointer("/spec/storagePolicyId")?.as_str())
                .filter(|id| !id.is_empty())
                .map(str::to_string)
                .collect(),
            Err(kube::Error::Api(status)) if status.code == 404 => Vec::new(),
            Err(err) => return Err(err.to_string()),
        };
        if policies.is_empty() {
            return Ok(Vec::new());
        }
        self.storage_classes_by_policy(|id| policies.iter().any(|policy| policy == id))
            .await
    }

    /// The names of the cluster's StorageClasses whose policy ID
    /// (`parameters.storagePolicyID`) `wanted` accepts.
    async fn storage_classes_by_policy(
        &self,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, String> {
        let storage_classes: Api<k8s_openapi::api::storage::v1::StorageClass> =
            Api::all(self.client.clone());
        let listed = storage_classes
            .list(&kube::api::ListParams::default())
            .await
            .map_err(|err| err.to_string())?;
        Ok(listed
            .items
            .into_iter()
            .filter(|class| {
                class
                    .parameters
                    .as_ref()
                    .and_then(|parameters| parameters.get(STORAGE_POLICY_ID_PARAMETER))
                    .is_some_and(|id| wanted(id))
            })
            .filter_map(|class| class.metadata.name)
            .collect())
    }

    /// The storage classes VM Operator takes for encryption ones
    /// (`IsEncryptedStorageClass`): a class whose policy ID
    /// (`parameters.storagePolicyID`) names a StoragePolicy object in VM
    /// Operator's namespace with `status.encrypted`. `None` when that
    /// namespace holds no StoragePolicy (Bring Your Own Key off, or the API
    /// not served): nothing to check against, VM Operator's answer stands.
    async fn encrypted_storage_classes(&self) -> Result<Option<Vec<String>>, String> {
        let policies: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &self.vm_operator_namespace,
            &resource(
                "infra.vmware.com",
                "v1alpha1",
                "StoragePolicy",
                "storagepolicies",
            ),
        );
        let recorded = match policies.list(&kube::api::ListParams::default()).await {
            Ok(list) => list.items,
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(None),
            Err(err) => return Err(err.to_string()),
        };
        if recorded.is_empty() {
            return Ok(None);
        }
        let encrypted_policies: Vec<String> = recorded
            .into_iter()
            .filter(|policy| {
                policy
                    .data
                    .pointer("/status/encrypted")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false)
            })
            .filter_map(|policy| policy.metadata.name)
            .collect();
        let mut encrypted = self
            .storage_classes_by_policy(|id| {
                storage_policy_object_name(id)
                    .is_some_and(|object| encrypted_policies.contains(&object))
            })
            .await?;
        encrypted.sort();
        Ok(Some(encrypted))
    }

    /// The images a VM in `namespace` can name: each VirtualMachineImage
    /// there and each ClusterVirtualMachineImage, with its display name
    /// (`status.name`). `None` when there are none, or the APIs are not
    /// served: nothing to check against.
    async fn visible_images(&self, namespace: &str) -> Result<Option<Vec<VisibleImage>>, String> {
        let mut images = Vec::new();
        for (kind, scope) in [
            ("VirtualMachineImage", Some(namespace)),
            ("ClusterVirtualMachineImage", None),
        ] {
            let resource = vmop_resource(kind);
            let api: Api<DynamicObject> = match scope {
                Some(namespace) => Api::namespaced_with(self.client.clone(), namespace, &resource),
                None => Api::all_with(self.client.clone(), &resource),
            };
            match api.list(&kube::api::ListParams::default()).await {
                Ok(list) => images.extend(list.items.into_iter().filter_map(|item| {
                    Some(VisibleImage {
                        name: item.metadata.name?,
                        display_name: item
                            .data
                            .pointer("/status/name")
                            .and_then(serde_json::Value::as_str)
                            .filter(|name| !name.is_empty())
                            .map(str::to_string),
                        namespaced: scope.is_some(),
                    })
                })),
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(err) => return Err(err.to_string()),
            }
        }
        Ok((!images.is_empty()).then_some(images))
    }

    /// The networks of `namespace`, as `KIND/NAME`, of every kind VM Operator
    /// attaches to (`NETWORK_KINDS`) that the API server serves. `None` when
    /// there are none: nothing to check against.
    async fn namespace_networks(&self, namespace: &str) -> Result<Option<Vec<String>>, String> {
        let mut networks = Vec::new();
        for (kind, api_version) in vmop::mapping::NETWORK_KINDS {
            let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
            let plural = format!("{}s", kind.to_lowercase());
            let listed = self
                .list_names(resource(group, version, kind, &plural), namespace)
                .await?;
            networks.extend(
                listed
                    .into_iter()
                    .flatten()
                    .filter_map(|meta| meta.name)
                    .map(|name| format!("{kind}/{name}")),
            );
        }
        networks.sort();
        Ok((!networks.is_empty()).then_some(networks))
    }

    /// The metadata of every object of `resource` in `namespace`; `None` when
    /// the API server does not serve the resource.
    async fn list_names(
        &self,
        resource: ApiResource,
        namespace: &str,
    ) -> Result<Option<Vec<kube::core::ObjectMeta>>, String> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &resource);
        match api.list_metadata(&kube::api::ListParams::default()).await {
            Ok(list) => Ok(Some(
                list.items.into_iter().map(|item| item.metadata).collect(),
            )),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
            Err(err) => Err(err.to_string()),
        }
    }
}

/// One image a namespace can name in `spec.imageName`.
#[derive(Debug, Clone, PartialEq)]
struct VisibleImage {
    name: String,
    display_name: Option<String>,
    /// A VirtualMachineImage in the namespace (else a ClusterVirtualMachineImage).
    namespaced: bool,
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
        .any(|image| image.display_name.as_deref() == Some(image_name))
}

/// The images as a denial lists them: the name to map to, and the display
/// name an admin recognises. Namespace images first, as VM Operator looks there first.
fn image_alternatives(mut images: Vec<VisibleImage>) -> Vec<String> {
    images.sort_by(|a, b| (!a.namespaced, &a.name).cmp(&(!b.namespaced, &b.name)));
    images
        .into_iter()
        .map(|image| match image.display_name {
            Some(display) => format!("{} ({display})", image.name),
            None => image.name,
        })
        .collect()
}

/// The StorageClass parameter holding its vSphere storage policy's ID.
const STORAGE_POLICY_ID_PARAMETER: &str = "storagePolicyID";

/// The name of the StoragePolicy object VM Operator keeps for a policy ID
/// (`GetStoragePolicyObjectName`): `pol-` and two slices of the ID, lower
/// case without dashes. `None` for an ID that is not a UUID, for which VM
/// Operator keeps no object.
fn storage_policy_object_name(policy_id: &str) -> Option<String> {
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

/// What joins a storage class's name to the resource in a quota key.
const STORAGE_QUOTA_INFIX: &str = ".storageclass.storage.k8s.io/";

/// The label VM Operator puts on the active instance of a class.
const ACTIVE_INSTANCE_LABEL: &str = "vmoperator.vmware.com/active";

fn is_active_instance_of(meta: &kube::core::ObjectMeta, class: Option<&str>) -> bool {
    let active = meta
        .labels
        .as_ref()
        .is_some_and(|labels| labels.contains_key(ACTIVE_INSTANCE_LABEL));
    let owned = match class {
        Some(class) => meta
            .owner_references
            .iter()
            .flatten()
            .any(|owner| owner.kind == "VirtualMachineClass" && owner.name == class),
        None => true,
    };
    active && owned
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// A vmoperator.vmware.com kind, at the version VM Operator 1.10 and later
/// all serve; its plural is the lowercased kind plus "s" (or "es" after an
/// "s": virtualmachineclasses).
fn vmop_resource(kind: &str) -> ApiResource {
    let lower = kind.to_lowercase();
    let plural = if lower.ends_with('s') {
        format!("{lower}es")
    } else {
        format!("{lower}s")
    };
    resource(vmop::GROUP, VMOP_VERSION, kind, &plural)
}

const TOPOLOGY: &str = "topology.tanzu.vmware.com";
/// The newest version VM Operator 1.10 and later all serve.
const VMOP_VERSION: &str = "v1alpha5";

impl RefFacts for LiveRefs {
    fn exists<'a>(
        &'a self,
        namespace: &'a str,
        reference: &'a ClusterRef,
    ) -> BoxFuture<'a, GroupPresence> {
        async move {
            let key = remembered_key(namespace, reference);
            if self.found_lately(&key) {
                return GroupPresence::Present;
            }
            match self.look_up(namespace, reference).await {
                Checked::Found => {
                    self.remember_found(key);
                    GroupPresence::Present
                }
                // Not remembered: what the namespace lacked (say, any image
                // at all) may be created before the next VM.
                Checked::Unchecked => GroupPresence::Present,
                Checked::Missing => GroupPresence::Missing,
                Checked::Unknown(err) => GroupPresence::Unknown(err),
            }
        }
        .boxed()
    }

    fn alternatives<'a>(&'a self, namespace: &'a str, kind: RefKind) -> BoxFuture<'a, Vec<String>> {
        async move {
            match kind {
                RefKind::Class => {
                    let mut names = self
                        .usable_classes(namespace)
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                    names.sort();
                    names
                }
                RefKind::Network => self
                    .namespace_networks(namespace)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
                RefKind::ImageName => self
                    .visible_images(namespace)
                    .await
                    .ok()
                    .flatten()
                    .map(image_alternatives)
                    .unwrap_or_default(),
                RefKind::StorageClass => self
                    .assigned_storage_classes(namespace)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
                // The namespace's encryption storage classes (every one, where
                // no quota says which the namespace has).
                RefKind::EncryptionStorageClass => {
                    let encrypted = self
                        .encrypted_storage_classes()
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                    match self.assigned_storage_classes(namespace).await {
                        Ok(Some(assigned)) => encrypted
                            .into_iter()
                            .filter(|class| assigned.contains(class))
                            .collect(),
                        _ => encrypted,
                    }
                }
                _ => Vec::new(),
            }
        }
        .boxed()
    }
}

impl LiveRefs {
    /// One reference asked of the API server.
    async fn look_up(&self, namespace: &str, reference: &ClusterRef) -> Checked {
        {
            let name = reference.name.as_str();
            let found = match reference.kind {
                // VM Operator 1.10 turns workload domain isolation on for
                // every VM that is not a Kubernetes node
                // (GetContextWithWorkloadDomainIsolation): the zone must be a
                // Zone in the VM's namespace. Only a cluster that does not
                // serve Zones at all checks the cluster-wide AvailabilityZone.
                RefKind::Zone => match self
                    .get(
                        resource(TOPOLOGY, "v1alpha1", "Zone", "zones"),
                        Some(namespace),
                        name,
                    )
                    .await
                {
                    Ok(Lookup::NotServed) => {
                        self.get(
                            resource(
                                TOPOLOGY,
                                "v1alpha1",
                                "AvailabilityZone",
                                "availabilityzones",
                            ),
                            None,
                            name,
                        )
                        .await
                    }
                    other => other,
                },
                // VM Operator admits only an active instance of the class
                // the VM names; Velero restores instances without their
                // owner, so a restored one never qualifies.
                RefKind::ClassInstance => self
                    .get(
                        vmop_resource("VirtualMachineClassInstance"),
                        Some(namespace),
                        name,
                    )
                    .await
                    .map(|found| match found {
                        Lookup::Found(meta)
                            if !is_active_instance_of(&meta, reference.owner.as_deref()) =>
                        {
                            Lookup::Missing
                        }
                        other => other,
                    }),
                RefKind::Image => {
                    self.get(vmop_resource("VirtualMachineImage"), Some(namespace), name)
                        .await
                }
                RefKind::ClusterImage => {
                    self.get(vmop_resource("ClusterVirtualMachineImage"), None, name)
                        .await
                }
                RefKind::Network => {
                    return among(self.namespace_networks(namespace).await, |networks| {
                        vmop::mapping::network_found(networks, name)
                    });
                }
                RefKind::ImageName => {
                    return among(self.visible_images(namespace).await, |images| {
                        image_name_resolves(images, name)
                    });
                }
                RefKind::StorageClass => {
                    return among(self.assigned_storage_classes(namespace).await, |classes| {
                        classes.iter().any(|class| class == name)
                    });
                }
                RefKind::Class => {
                    return among(self.usable_classes(namespace).await, |classes| {
                        classes.iter().any(|class| class == name)
                    });
                }
                RefKind::EncryptionStorageClass => {
                    return among(self.encrypted_storage_classes().await, |classes| {
                        classes.iter().any(|class| class == name)
                    });
                }
            };
            match found {
                Ok(Lookup::Found(_)) => Checked::Found,
                Ok(Lookup::Missing | Lookup::NotServed) => Checked::Missing,
                Err(err) => Checked::Unknown(err),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::http::{Request, Response};
    use http_body_util::Full;

    /// Object metadata as a list item; an active instance when `owner` names its class.
    fn json_meta(name: &str, owner: Option<&str>) -> serde_json::Value {
        let mut meta = serde_json::json!({"name": name});
        if let Some(owner) = owner {
            meta["labels"] = serde_json::json!({"vmoperator.vmware.com/active": ""});
            meta["ownerReferences"] = serde_json::json!([{"apiVersion": "vmoperator.vmware.com/v1alpha5",
                "kind": "VirtualMachineClass", "name": owner, "uid": "c-1"}]);
        }
        serde_json::json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": meta})
    }

    fn list(items: &[serde_json::Value]) -> String {
        serde_json::json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
            "metadata": {}, "items": items})
        .to_string()
    }

    /// A fake API server: in namespace `wdi` Zones are served (and none
    /// exists); elsewhere the Zone API is not served (plain-text 404) and the
    /// AvailabilityZone `zone-a` exists. The class instance `small` exists,
    /// images are forbidden, the rest 404 NotFound.
    fn refs_on_fake_api() -> LiveRefs {
        refs_on_counted_fake_api().0
    }

    /// The same, with the number of requests it has answered.
    fn refs_on_counted_fake_api() -> (LiveRefs, Arc<AtomicUsize>) {
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                let path = request.uri().path().to_string();
                let object = |name: &str| {
                    serde_json::json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                    "metadata": {"name": name}})
                .to_string()
                };
                let not_found =
                    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "not found", "reason": "NotFound", "code": 404})
                    .to_string();
                let (code, body, json) = if path.contains("/namespaces/wdi/zones/") {
                    (404, not_found, true)
                } else if path.ends_with("/availabilityzones/zone-a") {
                    (200, object("zone-a"), true)
                } else if path.contains("/topology.tanzu.vmware.com/") {
                    (404, "404 page not found".to_string(), false)
                } else if path.ends_with("/namespaces/prod/virtualmachineclasses") {
                    (
                        200,
                        list(&[
                            json_meta("best-effort-small", None),
                            json_meta("guaranteed-large", None),
                        ]),
                        true,
                    )
                } else if path.ends_with("/namespaces/prod/virtualmachineclassinstances") {
                    (
                        200,
                        list(&[json_meta("small", Some("best-effort-small"))]),
                        true,
                    )
                } else if path.ends_with("/namespaces/prod/resourcequotas") {
                    let quota = |name: &str, keys: &[&str]| {
                        let hard: serde_json::Map<String, serde_json::Value> = keys
                            .iter()
                            .map(|k| (k.to_string(), serde_json::json!("10Gi")))
                            .collect();
                        serde_json::json!({"metadata": {"name": name, "namespace": "prod"}, "spec": {"hard": hard}})
                    };
                    let list = serde_json::json!({"apiVersion": "v1", "kind": "ResourceQuotaList", "metadata": {},
                    "items": [
                        quota("prod-storagequota", &["site-b-gold.storageclass.storage.k8s.io/requests.storage",
                            "site-b-gold.storageclass.storage.k8s.io/persistentvolumeclaims"]),
                        quota("more", &["site-b-silver.storageclass.storage.k8s.io/requests.storage", "pods",
                            "site-b-encrypted.storageclass.storage.k8s.io/requests.storage"]),
                    ]});
                    (200, list.to_string(), true)
                } else if path.ends_with("/namespaces/stretch/storagepolicyquotas") {
                    let list = serde_json::json!({"apiVersion": "cns.vmware.com/v1alpha2",
                        "kind": "StoragePolicyQuotaList", "metadata": {}, "items": [
                            {"metadata": {"name": "gold-quota"}, "spec": {"storagePolicyId": "pol-gold"}}]});
                    (200, list.to_string(), true)
                } else if path.ends_with("/storage.k8s.io/v1/storageclasses") {
                    let class = |name: &str, policy: Option<&str>| {
                        let mut class = serde_json::json!({"metadata": {"name": name}, "provisioner": "csi.vsphere.vmware.com"});
                        if let Some(policy) = policy {
                            class["parameters"] = serde_json::json!({"storagePolicyID": policy});
                        }
                        class
                    };
                    let list = serde_json::json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClassList",
                        "metadata": {}, "items": [class("site-b-gold", Some("pol-gold")),
                            class("site-b-silver", Some("pol-silver")), class("local", None),
                            class("site-b-encrypted", Some("AA8B7C3E-1234-5678-9ABC-DEF012345678")),
                            class("elsewhere-encrypted", Some("{cc000000-0000-0000-0000-00000000000c}")),
                            class("site-b-clear", Some("bb000000-0000-0000-0000-000000000001"))]});
                    (200, list.to_string(), true)
                } else if path.ends_with(
                    "/infra.vmware.com/v1alpha1/namespaces/vmware-system-vmop/storagepolicies",
                ) {
                    // VM Operator's record of each policy (the controller
                    // names them); `status.encrypted` comes from vCenter.
                    let policy = |name: &str, encrypted: Option<bool>| {
                        let mut policy = serde_json::json!({"metadata": {"name": name, "namespace": "vmware-system-vmop"}});
                        if let Some(encrypted) = encrypted {
                            policy["status"] = serde_json::json!({"encrypted": encrypted});
                        }
                        policy
                    };
                    let list = serde_json::json!({"apiVersion": "infra.vmware.com/v1alpha1", "kind": "StoragePolicyList",
                        "metadata": {}, "items": [policy("pol-aa8b7c3e-9abcdef012345678", Some(true)),
                            policy("pol-{cc00000-0000000000000000", Some(true)),
                            policy("pol-bb000000-0000000000000001", Some(false)),
                            policy("pol-dd000000-0000000000000001", None)]});
                    (200, list.to_string(), true)
                } else if path.ends_with("/resourcequotas") {
                    let list = serde_json::json!({"apiVersion": "v1", "kind": "ResourceQuotaList", "metadata": {},
                    "items": [{"metadata": {"name": "compute"}, "spec": {"hard": {"pods": "10"}}}]});
                    (200, list.to_string(), true)
                } else if path.ends_with("/namespaces/flat/virtualmachineclasses") {
                    (200, list(&[json_meta("only", None)]), true)
                } else if path.ends_with("/namespaces/flat/virtualmachineclassinstances")
                    || path.ends_with("/namespaces/bare/virtualmachineclasses")
                {
                    (200, list(&[]), true)
                } else if path.ends_with("/virtualmachineclassinstances/small") {
                    let meta = serde_json::json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                    "metadata": {"name": "small", "namespace": "prod",
                        "labels": {"vmoperator.vmware.com/active": ""},
                        "ownerReferences": [{"apiVersion": "vmoperator.vmware.com/v1alpha5",
                            "kind": "VirtualMachineClass", "name": "best-effort-small", "uid": "c-1"}]}});
                    (200, meta.to_string(), true)
                } else if path.ends_with("/virtualmachineclassinstances/restored") {
                    // As Velero restores one: labels kept, owner references gone.
                    let meta = serde_json::json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                    "metadata": {"name": "restored", "namespace": "prod",
                        "labels": {"vmoperator.vmware.com/active": ""}}});
                    (200, meta.to_string(), true)
                } else if path.ends_with("/crd.nsx.vmware.com/v1alpha1/namespaces/prod/subnetsets")
                {
                    (200, list(&[json_meta("site-b-subnets", None)]), true)
                } else if path
                    .ends_with("/netoperator.vmware.com/v1alpha1/namespaces/prod/networks")
                {
                    (200, list(&[json_meta("vds-1", None)]), true)
                } else if path.ends_with("/namespaces/prod/virtualmachineimages")
                    || path.ends_with("/clustervirtualmachineimages")
                {
                    let image = |name: &str, display: &str| serde_json::json!({"metadata": {"name": name}, "status": {"name": display}});
                    let items = if path.contains("/namespaces/") {
                        vec![image("vmi-a", "ubuntu-22.04"), image("vmi-b", "photon")]
                    } else {
                        vec![image("vmi-c", "ubuntu-22.04"), image("vmi-d", "centos")]
                    };
                    let list = serde_json::json!({"apiVersion": "vmoperator.vmware.com/v1alpha5",
                        "kind": "VirtualMachineImageList", "metadata": {}, "items": items});
                    (200, list.to_string(), true)
                } else if path.contains("/virtualmachineimages/") {
                    (
                    403,
                    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "forbidden", "reason": "Forbidden", "code": 403})
                    .to_string(),
                    true,
                )
                } else {
                    (
                    404,
                    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "not found", "reason": "NotFound", "code": 404})
                    .to_string(),
                    true,
                )
                };
                let content_type = if json {
                    "application/json"
                } else {
                    "text/plain"
                };
                Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .status(code)
                        .header("content-type", content_type)
                        .body(Full::new(bytes::Bytes::from(body)))
                        .expect("response"),
                )
            }
        });
        (
            LiveRefs::new(Client::new(service, "default"), "vmware-system-vmop"),
            requests,
        )
    }

    #[tokio::test]
    async fn a_storage_class_counts_when_a_quota_of_the_namespace_names_it() {
        let refs = refs_on_fake_api();
        let storage = |name: &str| ClusterRef {
            kind: RefKind::StorageClass,
            name: name.to_string(),
            owner: None,
        };
        assert_eq!(
            refs.exists("prod", &storage("site-b-gold")).await,
            GroupPresence::Present
        );
        assert_eq!(
            refs.exists("prod", &storage("site-b-silver")).await,
            GroupPresence::Present
        );
        assert_eq!(
            refs.exists("prod", &storage("wcpglobal-storage-profile"))
                .await,
            GroupPresence::Missing
        );
        assert_eq!(
            refs.alternatives("prod", RefKind::StorageClass).await,
            ["site-b-encrypted", "site-b-gold", "site-b-silver"]
        );
        // No quota names a storage class: not a Supervisor namespace, nothing to check.
        assert_eq!(
            refs.exists("dev", &storage("anything")).await,
            GroupPresence::Present
        );
        // A stretched Supervisor's namespace: a StoragePolicyQuota names the
        // policy ID, and the storage classes with that ID are assigned.
        assert_eq!(
            refs.exists("stretch", &storage("site-b-gold")).await,
            GroupPresence::Present
        );
        assert_eq!(
            refs.exists("stretch", &storage("site-b-silver")).await,
            GroupPresence::Missing
        );
        assert_eq!(
            refs.alternatives("stretch", RefKind::StorageClass).await,
            ["site-b-gold"]
        );
        assert!(
            refs.alternatives("dev", RefKind::StorageClass)
                .await
                .is_empty()
        );
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

    #[tokio::test]
    async fn an_encryption_class_needs_a_storage_class_whose_policy_vm_operator_records_as_encrypted()
     {
        let refs = refs_on_fake_api();
        let encrypted = |name: &str| ClusterRef {
            kind: RefKind::EncryptionStorageClass,
            name: name.to_string(),
            owner: Some("my-keys".into()),
        };
        for (name, expected) in [
            ("site-b-encrypted", GroupPresence::Present),
            ("elsewhere-encrypted", GroupPresence::Present),
            // Its policy is recorded, not encrypted.
            ("site-b-clear", GroupPresence::Missing),
            // Its policy ID is no UUID: VM Operator keeps no record of it.
            ("site-b-gold", GroupPresence::Missing),
            ("local", GroupPresence::Missing),
            ("no-such-class", GroupPresence::Missing),
        ] {
            assert_eq!(
                refs.exists("prod", &encrypted(name)).await,
                expected,
                "{name}"
            );
        }
        // The encryption storage classes assigned to the namespace; every
        // one where no quota says which it has.
        assert_eq!(
            refs.alternatives("prod", RefKind::EncryptionStorageClass)
                .await,
            ["site-b-encrypted"]
        );
        assert_eq!(
            refs.alternatives("dev", RefKind::EncryptionStorageClass)
                .await,
            ["elsewhere-encrypted", "site-b-encrypted"]
        );
        // VM Operator's namespace holds no StoragePolicy (Bring Your Own Key
        // off): nothing to compare with, VM Operator's answer stands.
        let (other, _) = refs_on_counted_fake_api();
        let other = LiveRefs {
            vm_operator_namespace: "other-vmop".into(),
            ..other
        };
        assert_eq!(
            other.exists("prod", &encrypted("site-b-clear")).await,
            GroupPresence::Present
        );
    }

    #[tokio::test]
    async fn an_image_name_resolves_by_object_name_or_display_name_as_vm_operator_does() {
        let refs = refs_on_fake_api();
        let image_name = |name: &str| ClusterRef {
            kind: RefKind::ImageName,
            name: name.to_string(),
            owner: None,
        };
        for (namespace, name, expected) in [
            ("prod", "vmi-a", GroupPresence::Present),
            ("prod", "vmi-d", GroupPresence::Present),
            ("prod", "vmi-zz", GroupPresence::Missing),
            // Display names, in the namespace or the cluster.
            ("prod", "photon", GroupPresence::Present),
            ("prod", "centos", GroupPresence::Present),
            ("prod", "windows", GroupPresence::Missing),
            // Two images share it: VM Operator's own refusal names that.
            ("prod", "ubuntu-22.04", GroupPresence::Present),
            // A `vmi-` name is never a display name.
            ("prod", "vmi-photon", GroupPresence::Missing),
            // Another namespace sees only the cluster images.
            ("dev", "vmi-a", GroupPresence::Missing),
            ("dev", "vmi-c", GroupPresence::Present),
            ("dev", "photon", GroupPresence::Missing),
        ] {
            assert_eq!(
                refs.exists(namespace, &image_name(name)).await,
                expected,
                "{namespace}/{name}"
            );
        }
        assert_eq!(
            refs.alternatives("prod", RefKind::ImageName).await,
            [
                "vmi-a (ubuntu-22.04)",
                "vmi-b (photon)",
                "vmi-c (ubuntu-22.04)",
                "vmi-d (centos)"
            ]
        );
    }

    #[tokio::test]
    async fn a_network_counts_when_the_namespace_has_one_of_that_kind_and_name() {
        let refs = refs_on_fake_api();
        let network = |name: &str| ClusterRef {
            kind: RefKind::Network,
            name: name.to_string(),
            owner: None,
        };
        for (namespace, name, expected) in [
            ("prod", "SubnetSet/site-b-subnets", GroupPresence::Present),
            ("prod", "Network/vds-1", GroupPresence::Present),
            ("prod", "vds-1", GroupPresence::Present),
            ("prod", "SubnetSet/vm-default", GroupPresence::Missing),
            // Same name, another kind: a VDS backup on a VPC Supervisor.
            ("prod", "Network/site-b-subnets", GroupPresence::Missing),
            ("prod", "Subnet/site-b-subnets", GroupPresence::Missing),
            ("prod", "VirtualNetwork/vds-1", GroupPresence::Missing),
            // No networks in dev (nothing served there): not checked.
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
            ["Network/vds-1", "SubnetSet/site-b-subnets"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn finds_are_remembered_for_a_while_and_misses_asked_again() {
        let (refs, requests) = refs_on_counted_fake_api();
        let class = |name: &str| ClusterRef {
            kind: RefKind::Class,
            name: name.to_string(),
            owner: None,
        };
        let instance = ClusterRef {
            kind: RefKind::ClassInstance,
            name: "small".to_string(),
            owner: Some("best-effort-small".to_string()),
        };
        let asked = || requests.load(Ordering::SeqCst);
        assert_eq!(
            refs.exists("prod", &class("best-effort-small")).await,
            GroupPresence::Present
        );
        assert_eq!(refs.exists("prod", &instance).await, GroupPresence::Present);
        let first = asked();
        assert_eq!(
            first, 3,
            "two lists for the class, one GET for the instance"
        );
        for _ in 0..100 {
            assert_eq!(
                refs.exists("prod", &class("best-effort-small")).await,
                GroupPresence::Present
            );
            assert_eq!(refs.exists("prod", &instance).await, GroupPresence::Present);
        }
        assert_eq!(asked(), first, "found lately: no request");
        // Another namespace, owner or name is another reference.
        let other_owner = ClusterRef {
            owner: Some("guaranteed-large".to_string()),
            ..instance.clone()
        };
        assert_eq!(
            refs.exists("prod", &other_owner).await,
            GroupPresence::Missing
        );
        assert_eq!(
            refs.exists("flat", &class("best-effort-small")).await,
            GroupPresence::Missing
        );
        let after_others = asked();
        assert!(after_others > first);
        // A miss is asked again every time.
        assert_eq!(
            refs.exists("prod", &other_owner).await,
            GroupPresence::Missing
        );
        assert_eq!(asked(), after_others + 1);
        // Past the window, a find is asked again.
        tokio::time::advance(REMEMBER_FOUND + Duration::from_millis(1)).await;
        assert_eq!(refs.exists("prod", &instance).await, GroupPresence::Present);
        assert_eq!(asked(), after_others + 2);
        // Nothing to compare with (namespace `bare` has no classes): admitted
        // but not remembered, since a class created there meanwhile must
        // count for the next VM.
        let before = asked();
        for _ in 0..2 {
            assert_eq!(
                refs.exists("bare", &class("anything")).await,
                GroupPresence::Present
            );
        }
        assert_eq!(asked(), before + 2, "asked each time");
    }

    #[tokio::test]
    async fn absent_apis_and_objects_are_missing_and_refusals_unknown() {
        let refs = refs_on_fake_api();
        let reference = |kind, name: &str| ClusterRef {
            kind,
            name: name.to_string(),
            owner: None,
        };
        // No Zone API: the cluster-wide AvailabilityZone decides.
        assert_eq!(
            refs.exists("prod", &reference(RefKind::Zone, "zone-a"))
                .await,
            GroupPresence::Present
        );
        assert_eq!(
            refs.exists("prod", &reference(RefKind::Zone, "zone-b"))
                .await,
            GroupPresence::Missing
        );
        // Zones served: VM Operator needs the namespace's Zone, whatever
        // AvailabilityZones exist.
        assert_eq!(
            refs.exists("wdi", &reference(RefKind::Zone, "zone-a"))
                .await,
            GroupPresence::Missing
        );
        let instance = |name: &str, class: &str| ClusterRef {
            kind: RefKind::ClassInstance,
            name: name.to_string(),
            owner: Some(class.to_string()),
        };
        // An active instance of the VM's class.
        assert_eq!(
            refs.exists("prod", &instance("small", "best-effort-small"))
                .await,
            GroupPresence::Present
        );
        // Of another class, or without its owner: VM Operator refuses it.
        assert_eq!(
            refs.exists("prod", &instance("small", "guaranteed-large"))
                .await,
            GroupPresence::Missing
        );
        assert_eq!(
            refs.exists("prod", &instance("restored", "best-effort-small"))
                .await,
            GroupPresence::Missing
        );
        assert_eq!(
            refs.exists("prod", &reference(RefKind::ClassInstance, "large"))
                .await,
            GroupPresence::Missing
        );
        assert_eq!(
            refs.exists("prod", &reference(RefKind::ClusterImage, "vmi-1"))
                .await,
            GroupPresence::Missing
        );
        assert!(
            matches!(refs.exists("prod", &reference(RefKind::Image, "vmi-1")).await, GroupPresence::Unknown(message) if message.contains("forbidden"))
        );
    }

    #[tokio::test]
    async fn a_class_counts_with_an_active_instance_and_only_where_classes_exist() {
        let refs = refs_on_fake_api();
        let class = |name: &str| ClusterRef {
            kind: RefKind::Class,
            name: name.to_string(),
            owner: None,
        };
        // prod: two classes, only best-effort-small has an active instance.
        assert_eq!(
            refs.exists("prod", &class("best-effort-small")).await,
            GroupPresence::Present
        );
        assert_eq!(
            refs.exists("prod", &class("guaranteed-large")).await,
            GroupPresence::Missing
        );
        assert_eq!(
            refs.exists("prod", &class("gone")).await,
            GroupPresence::Missing
        );
        assert_eq!(
            refs.alternatives("prod", RefKind::Class).await,
            ["best-effort-small"]
        );
        // flat: no instances at all (ImmutableClasses off): every class counts.
        assert_eq!(
            refs.exists("flat", &class("only")).await,
            GroupPresence::Present
        );
        assert_eq!(
            refs.exists("flat", &class("gone")).await,
            GroupPresence::Missing
        );
        // bare: no classes, and elsewhere the list is not served: nothing to check against.
        assert_eq!(
            refs.exists("bare", &class("any")).await,
            GroupPresence::Present
        );
        assert_eq!(
            refs.exists("other", &class("any")).await,
            GroupPresence::Present
        );
    }
}
