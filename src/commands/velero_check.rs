//! What `plan` reads of the Velero that will run the restore: its version
//! (from the image of its Deployment, so the status-write prediction follows
//! the Velero actually installed, not an assumption) and its identity (the
//! Deployment's ServiceAccount), checked against the webhook's update entries:
//! when their matchConditions would not send Velero's writes, the webhook
//! never sees Velero's status writes and updates, and a restored status keeps
//! the original's `uniqueID`.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Client;
use kube::api::{Api, ListParams};

/// The update entry of the chart's webhook configuration.
pub const UPDATES_WEBHOOK: &str = "updates.restore.velero-vm-restore-webhook.io";

/// What was found of Velero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VeleroFound {
    /// MAJOR.MINOR, from the image tag.
    pub version: Option<(u32, u32)>,
    pub image: Option<String>,
    /// `system:serviceaccount:NAMESPACE:NAME`.
    pub user: Option<String>,
    /// Lines for the admin: what was found, what is wrong and the fix.
    pub lines: Vec<String>,
    /// Velero's writes would skip the webhook.
    pub misses_webhook: bool,
}

/// `velero/velero:v1.15.2`, `registry/vmware/velero:v1.15.2_vmware.1` → (1, 15).
pub fn image_version(image: &str) -> Option<(u32, u32)> {
    let image = image.split('@').next()?;
    let tag = image.rsplit_once(':')?.1;
    if tag.contains('/') {
        // A registry's port, no tag.
        return None;
    }
    let tag = tag.trim_start_matches('v');
    let mut parts = tag.split(['.', '_', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The string literals of a CEL expression such as the chart's
/// (`(request.userInfo.username in ['a'] || … g in ['b']) &&
/// request.userInfo.username != 'c'`), each with whether it is excluded
/// (`!= '…'`).
fn literals(expression: &str) -> Vec<(&str, bool)> {
    let mut found = Vec::new();
    let mut rest = expression;
    while let Some(start) = rest.find('\'') {
        let excluded = rest[..start].trim_end().ends_with("!=");
        let Some(length) = rest[start + 1..].find('\'') else {
            break;
        };
        found.push((&rest[start + 1..start + 1 + length], excluded));
        rest = &rest[start + 1 + length + 1..];
    }
    found
}

/// Whether the chart's matchConditions `expression` sends a request made as
/// `user`, a member of `groups`: it names the user or one of the groups,
/// and does not exclude the user.
pub fn expression_admits(expression: &str, user: &str, groups: &[String]) -> bool {
    let literals = literals(expression);
    !literals
        .iter()
        .any(|(literal, excluded)| *excluded && *literal == user)
        && literals.iter().any(|(literal, excluded)| {
            !excluded && (*literal == user || groups.iter().any(|group| group == literal))
        })
}

/// Reads Velero's Deployment (`velero` in `namespace`) and the webhook's
/// configurations. Never fails: what cannot be read is a line that says so.
pub async fn check(client: &Client, namespace: &str) -> VeleroFound {
    let mut found = VeleroFound::default();
    let deployment = match Api::<Deployment>::namespaced(client.clone(), namespace)
        .get_opt("velero")
        .await
    {
        Ok(Some(deployment)) => deployment,
        Ok(None) => {
            found.lines.push(format!(
                "Velero: no Deployment velero in namespace {namespace}; its version and identity are not checked"
            ));
            return found;
        }
        Err(err) => {
            found.lines.push(format!(
                "Velero: cannot read Deployment {namespace}/velero ({err}); its version and identity are not checked"
            ));
            return found;
        }
    };
    let pod = deployment.spec.template.spec;
    let image = pod.as_ref().and_then(|pod| {
        pod.containers
            .iter()
            .find(|container| container.name == "velero")
            .or(pod.containers.first())
            .and_then(|container| container.image.clone())
    });
    found.version = image.as_deref().and_then(image_version);
    found.image = image.clone();
    let account = pod
        .as_ref()
        .and_then(|pod| pod.service_account_name.clone())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "default".to_string());
    let user = format!("system:serviceaccount:{namespace}:{account}");
    let groups = vec![
        "system:serviceaccounts".to_string(),
        format!("system:serviceaccounts:{namespace}"),
        "system:authenticated".to_string(),
    ];
    found.lines.push(format!(
        "Velero: image {}, version {}, runs as {user}",
        image.as_deref().unwrap_or("unknown"),
        found
            .version
            .map(|(major, minor)| format!("{major}.{minor}"))
            .unwrap_or_else(|| "unknown".into())
    ));
    found.user = Some(user.clone());
    let configurations = match Api::<MutatingWebhookConfiguration>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => list.items,
        Err(err) => {
            found.lines.push(format!(
                "Velero's identity: cannot list MutatingWebhookConfigurations ({err}); not checked"
            ));
            return found;
        }
    };
    let updates: Vec<_> = configurations
        .iter()
        .flat_map(|configuration| configuration.webhooks.iter().flatten())
        .filter(|webhook| webhook.name == UPDATES_WEBHOOK)
        .collect();
    if updates.is_empty() {
        found.lines.push(format!(
            "Velero's identity: no webhook entry {UPDATES_WEBHOOK}: Velero's status writes and updates are not reviewed \
             (webhook.velero.updates off, or Kubernetes before 1.28 without webhook.velero.withoutMatchConditions)"
        ));
        return found;
    }
    for webhook in updates {
        let expressions: Vec<&str> = webhook
            .match_conditions
            .iter()
            .flatten()
            .map(|condition| condition.expression.as_str())
            .collect();
        let sent = expressions
            .iter()
            .all(|expression| expression_admits(expression, &user, &groups));
        if sent {
            found.lines.push(format!(
                "Velero's identity: {user} is sent to the webhook's {UPDATES_WEBHOOK} entry"
            ));
        } else {
            found.misses_webhook = true;
            found.lines.push(format!(
                "WARNING: Velero runs as {user}, which the webhook's {UPDATES_WEBHOOK} entry does not send \
                 ({}): Velero's status writes and updates skip the webhook, and a restored status keeps the original's \
                 uniqueID. Fix: helm upgrade … --set-json 'webhook.velero.groups=[\"system:serviceaccounts:{namespace}\"]'",
                expressions.join(" && ")
            ));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_the_image_tag() {
        assert_eq!(image_version("velero/velero:v1.15.2"), Some((1, 15)));
        assert_eq!(image_version("velero/velero:v1.18.3"), Some((1, 18)));
        assert_eq!(
            image_version("registry.local:5000/vmware/velero:v1.15.2_vmware.1"),
            Some((1, 15))
        );
        assert_eq!(
            image_version("velero/velero:v1.16.2@sha256:0123abcd"),
            Some((1, 16))
        );
        assert_eq!(image_version("registry.local:5000/velero/velero"), None);
        assert_eq!(image_version("velero/velero:latest"), None);
        assert_eq!(image_version("velero/velero"), None);
    }

    /// Issue 33, finding 3: the old default sent only
    /// `system:serviceaccount:velero:velero`; Velero's Helm chart runs as
    /// `velero-server`, which it did not send. The group default sends both.
    #[test]
    fn the_old_default_misses_velero_server_and_the_group_default_sends_it() {
        let groups = vec![
            "system:serviceaccounts".to_string(),
            "system:serviceaccounts:velero".to_string(),
        ];
        let old = "request.userInfo.username in ['system:serviceaccount:velero:velero']";
        let new = "(has(request.userInfo.groups) && request.userInfo.groups.exists(g, g in ['system:serviceaccounts:velero']))";
        let server = "system:serviceaccount:velero:velero-server";
        assert!(!expression_admits(old, server, &groups));
        assert!(expression_admits(
            old,
            "system:serviceaccount:velero:velero",
            &groups
        ));
        assert!(expression_admits(new, server, &groups));
        assert!(!expression_admits(
            new,
            "system:serviceaccount:backup:velero",
            &["system:serviceaccounts:backup".to_string()]
        ));
        // The webhook's own account, excluded, is never taken for Velero.
        let own = "system:serviceaccount:velero:vm-restore-velero-vm-restore-webhook";
        let chart = format!("({new}) && request.userInfo.username != '{own}'");
        assert!(expression_admits(&chart, server, &groups));
        assert!(!expression_admits(&chart, own, &groups));
    }
}
