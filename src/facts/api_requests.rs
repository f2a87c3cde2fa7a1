//! A Kubernetes client that counts its own requests by component, resource
//! and verb (`velero_vm_restore_webhook_api_requests_total`): the regression
//! guard for "a warm review asks the API server nothing" is this count, not a
//! timing.

use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{Method, Request};
use kube::Client;
use kube::client::ClientBuilder;
use tower::{Layer, Service};

use crate::metrics::{ApiRequestLabels, Component, Metrics};

/// The resources this crate asks for, as label values: a fixed set, so a
/// label never carries a free-form string. Anything else is `other`.
const KNOWN: &[&str] = &[
    "virtualmachinegroups.vmoperator.vmware.com",
    "virtualmachines.vmoperator.vmware.com",
    "virtualmachineclasses.vmoperator.vmware.com",
    "virtualmachineclassinstances.vmoperator.vmware.com",
    "virtualmachineimages.vmoperator.vmware.com",
    "clustervirtualmachineimages.vmoperator.vmware.com",
    "zones.topology.tanzu.vmware.com",
    "availabilityzones.topology.tanzu.vmware.com",
    "storagepolicyquotas.cns.vmware.com",
    "storageclasses.storage.k8s.io",
    "storagepolicies.infra.vmware.com",
    "networks.netoperator.vmware.com",
    "virtualnetworks.vmware.com",
    "subnets.crd.nsx.vmware.com",
    "subnetsets.crd.nsx.vmware.com",
    "restores.velero.io",
    "downloadrequests.velero.io",
    "customresourcedefinitions.apiextensions.k8s.io",
    "resourcequotas",
    "configmaps",
    "events",
    "persistentvolumeclaims",
    "namespaces",
];

/// The resource and verb of a request to the API server, from its method,
/// path and query.
pub fn classify(method: &Method, path: &str, query: Option<&str>) -> (&'static str, &'static str) {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/… or /apis/GROUP/VERSION/…
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return ("discovery", "get"),
    };
    // namespaces/NS/RESOURCE[/NAME[/SUB]] or RESOURCE[/NAME[/SUB]]
    let rest = match rest {
        ["namespaces", _namespace, resource, tail @ ..] => {
            let mut all = vec![*resource];
            all.extend_from_slice(tail);
            all
        }
        other => other.to_vec(),
    };
    let Some(plural) = rest.first() else {
        return ("discovery", "get");
    };
    let named = rest.len() > 1;
    let resource = if group.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{group}")
    };
    let resource = KNOWN
        .iter()
        .find(|known| **known == resource)
        .copied()
        .unwrap_or("other");
    let watching = query.is_some_and(|query| {
        query
            .split('&')
            .any(|pair| pair == "watch=true" || pair == "watch=1")
    });
    let verb = match *method {
        Method::GET if watching => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PATCH => "patch",
        Method::PUT => "update",
        Method::DELETE => "delete",
        _ => "other",
    };
    (resource, verb)
}

/// Counts each request it passes on.
#[derive(Clone)]
pub struct CountLayer {
    metrics: Arc<Metrics>,
    component: Component,
}

impl CountLayer {
    pub fn new(metrics: Arc<Metrics>, component: Component) -> CountLayer {
        CountLayer { metrics, component }
    }
}

impl<S> Layer<S> for CountLayer {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    layer: CountLayer,
}

impl<S, B> Service<Request<B>> for Counted<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (resource, verb) = classify(
            request.method(),
            request.uri().path(),
            request.uri().query(),
        );
        self.layer.metrics.api_request(&ApiRequestLabels {
            component: self.layer.component,
            resource,
            verb,
        });
        self.inner.call(request)
    }
}

/// A client from the in-cluster config or KUBECONFIG whose requests count
/// under `component`.
pub async fn client(metrics: Arc<Metrics>, component: Component) -> Result<Client, kube::Error> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    Ok(ClientBuilder::try_from(config)?
        .with_layer(&CountLayer::new(metrics, component))
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_named_by_resource_and_verb() {
        for (method, path, query, expected) in [
            (
                Method::GET,
                "/apis/vmoperator.vmware.com/v1alpha5/namespaces/prod/virtualmachineclasses",
                Some("limit=20"),
                ("virtualmachineclasses.vmoperator.vmware.com", "list"),
            ),
            (
                Method::GET,
                "/apis/vmoperator.vmware.com/v1alpha5/virtualmachinegroups",
                Some("watch=true&resourceVersion=5"),
                ("virtualmachinegroups.vmoperator.vmware.com", "watch"),
            ),
            (
                Method::GET,
                "/apis/vmoperator.vmware.com/v1alpha5/namespaces/prod/virtualmachinegroups/g",
                None,
                ("virtualmachinegroups.vmoperator.vmware.com", "get"),
            ),
            (
                Method::GET,
                "/api/v1/namespaces/prod/resourcequotas",
                None,
                ("resourcequotas", "list"),
            ),
            (
                Method::POST,
                "/api/v1/namespaces/velero/events",
                None,
                ("events", "create"),
            ),
            (
                Method::PATCH,
                "/apis/vmoperator.vmware.com/v1alpha5/namespaces/p/virtualmachinegroups/g",
                None,
                ("virtualmachinegroups.vmoperator.vmware.com", "patch"),
            ),
            (Method::GET, "/apis", None, ("discovery", "get")),
            (
                Method::GET,
                "/apis/vmoperator.vmware.com/v1alpha5",
                None,
                ("discovery", "get"),
            ),
            (
                Method::GET,
                "/apis/example.com/v1/widgets",
                None,
                ("other", "list"),
            ),
        ] {
            assert_eq!(classify(&method, path, query), expected, "{method} {path}");
        }
    }
}
