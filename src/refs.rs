//! The live reference source: one GET of metadata per reference a restored
//! VM makes (zone, class instance, image), bounded by the request's deadline
//! by the caller. A resource the API server does not serve answers 404, the
//! same as a missing object: the reference cannot resolve in this cluster.

use futures::FutureExt;
use futures::future::BoxFuture;
use kube::Client;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};

use crate::facts::{GroupPresence, RefFacts};
use crate::vmop::{self, ClusterRef, RefKind};

pub struct LiveRefs {
    client: Client,
}

impl LiveRefs {
    pub fn new(client: Client) -> LiveRefs {
        LiveRefs { client }
    }

    async fn get(
        &self,
        resource: ApiResource,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<bool, String> {
        let api: Api<DynamicObject> = match namespace {
            Some(namespace) => Api::namespaced_with(self.client.clone(), namespace, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        };
        api.get_metadata_opt(name)
            .await
            .map(|found| found.is_some())
            .map_err(|err| err.to_string())
    }
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// A vmoperator.vmware.com kind, at the version VM Operator 1.10 and later
/// all serve; its plural is the lowercased kind plus "s".
fn vmop_resource(kind: &str) -> ApiResource {
    resource(
        vmop::GROUP,
        VMOP_VERSION,
        kind,
        &format!("{}s", kind.to_lowercase()),
    )
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
            let name = reference.name.as_str();
            let found = match reference.kind {
                // A Zone in the namespace (workload domain isolation), or a
                // cluster-wide AvailabilityZone of that name.
                RefKind::Zone => match self
                    .get(
                        resource(TOPOLOGY, "v1alpha1", "Zone", "zones"),
                        Some(namespace),
                        name,
                    )
                    .await
                {
                    Ok(true) => Ok(true),
                    _ => {
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
                },
                RefKind::ClassInstance => {
                    self.get(
                        vmop_resource("VirtualMachineClassInstance"),
                        Some(namespace),
                        name,
                    )
                    .await
                }
                RefKind::Image => {
                    self.get(vmop_resource("VirtualMachineImage"), Some(namespace), name)
                        .await
                }
                RefKind::ClusterImage => {
                    self.get(vmop_resource("ClusterVirtualMachineImage"), None, name)
                        .await
                }
            };
            match found {
                Ok(true) => GroupPresence::Present,
                Ok(false) => GroupPresence::Missing,
                Err(err) => GroupPresence::Unknown(err),
            }
        }
        .boxed()
    }
}
