//! Input for the offline `review` command: JSON or YAML (several documents),
//! `kind: List` as `kubectl get -o json|yaml` prints, AdmissionReviews, bare
//! objects, and Velero backup tarballs (`velero backup download`). Each
//! object becomes the CREATE a restore would send.

use std::collections::BTreeMap;
use std::io::Read;

use serde_json::{Value, json};

use crate::vmop;
use crate::webhook::admission;

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("input is neither JSON nor YAML: {0}")]
    Syntax(String),
    #[error("{0}")]
    Shape(String),
    #[error("cannot read the backup tarball: {0}")]
    Tarball(String),
}

/// One object to review, and where it came from (for messages).
#[derive(Debug, Clone)]
pub struct Item {
    /// An AdmissionReview, ready to review.
    pub review: Value,
    /// The object as given (without the restore label a bare object gets).
    pub original: Value,
    pub source: String,
}

/// The resources of a Velero backup that this webhook reviews.
const BACKUP_RESOURCES: &[&str] = &[
    "virtualmachines.vmoperator.vmware.com",
    "virtualmachinegroups.vmoperator.vmware.com",
    "persistentvolumeclaims",
    "virtualmachinesnapshots.vmoperator.vmware.com",
    "virtualmachinepublishrequests.vmoperator.vmware.com",
    "virtualmachinegrouppublishrequests.vmoperator.vmware.com",
    "virtualmachinewebconsolerequests.vmoperator.vmware.com",
    "webconsolerequests.vmoperator.vmware.com",
    "cnsregistervolumes.cns.vmware.com",
];

/// Parses text holding JSON, or YAML with one or more documents.
pub fn parse_documents(text: &str) -> Result<Vec<Value>, InputError> {
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return Err(InputError::Shape("the input is empty".into()));
    }
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        return match serde_json::from_str::<Value>(text) {
            Ok(value) => Ok(vec![value]),
            Err(err) => Err(InputError::Syntax(format!("JSON: {err}"))),
        };
    }
    let mut documents = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value = <Value as serde::Deserialize>::deserialize(document)
            .map_err(|err| InputError::Syntax(format!("YAML: {err}")))?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    if documents.is_empty() {
        return Err(InputError::Shape("the input holds no document".into()));
    }
    Ok(documents)
}

/// Turns documents into review items: Lists are flattened, AdmissionReviews
/// kept, bare objects wrapped as the CREATE Velero would send.
pub fn items(documents: Vec<Value>, source: &str) -> Result<Vec<Item>, InputError> {
    let mut out = Vec::new();
    for (index, document) in documents.into_iter().enumerate() {
        let here = format!("{source} document {}", index + 1);
        let is_list = document
            .get("kind")
            .and_then(Value::as_str)
            .is_some_and(|kind| kind.ends_with("List"))
            && document.get("items").is_some_and(Value::is_array);
        if is_list {
            let Some(Value::Array(list)) = document.get("items").cloned() else {
                continue;
            };
            for (position, item) in list.into_iter().enumerate() {
                out.push(item_for(item, format!("{here} item {}", position + 1))?);
            }
        } else if let Value::Array(list) = document {
            for (position, item) in list.into_iter().enumerate() {
                out.push(item_for(item, format!("{here} item {}", position + 1))?);
            }
        } else {
            out.push(item_for(document, here)?);
        }
    }
    Ok(out)
}

fn item_for(value: Value, source: String) -> Result<Item, InputError> {
    if value.get("kind").and_then(Value::as_str) == Some("AdmissionReview") {
        let original = value
            .pointer("/request/object")
            .cloned()
            .unwrap_or(Value::Null);
        return Ok(Item {
            review: value,
            original,
            source,
        });
    }
    let original = value.clone();
    let review = wrap_object(value).map_err(|err| InputError::Shape(format!("{source}: {err}")))?;
    Ok(Item {
        review,
        original,
        source,
    })
}

/// Wraps a bare object as the CREATE Velero would send, with the restore
/// label added if it lacks one.
pub fn wrap_object(mut object: Value) -> Result<Value, String> {
    let text = |value: &Value, key: &str| {
        value
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let api_version = text(&object, "apiVersion");
    let kind = text(&object, "kind");
    if api_version.is_empty() || kind.is_empty() {
        return Err("the object needs apiVersion and kind".into());
    }
    let (group, version) = api_version
        .split_once('/')
        .unwrap_or(("", api_version.as_str()));
    let metadata = object
        .as_object_mut()
        .ok_or("the input must be an object")?
        .entry("metadata")
        .or_insert_with(|| json!({}));
    let metadata = metadata
        .as_object_mut()
        .ok_or("metadata must be an object")?;
    let name = metadata
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let namespace = metadata
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let labels = metadata.entry("labels").or_insert_with(|| json!({}));
    let labels = labels
        .as_object_mut()
        .ok_or("metadata.labels must be an object")?;
    labels
        .entry(vmop::RESTORE_NAME_LABEL)
        .or_insert_with(|| json!("review"));
    let resource = format!("{}s", kind.to_lowercase());
    Ok(json!({
        "apiVersion": admission::REVIEW_API_VERSION,
        "kind": "AdmissionReview",
        "request": {
            "uid": "review",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "name": name,
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "velero-vm-restore-webhook-review"},
            "object": object,
            "dryRun": true
        }
    }))
}

/// Whether the bytes are a gzip stream (a Velero backup tarball).
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// The VMs, groups and PVCs in a Velero backup tarball, as Velero would
/// restore them: at the preferred version when the backup holds several.
/// Reads the tarball as a stream: only the objects kept are held in memory.
pub fn backup_objects(tarball: impl Read) -> Result<Vec<(String, Value)>, InputError> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(tarball));
    // (resource, namespace, name) -> (is the preferred version, path, object)
    let mut found: BTreeMap<(String, String, String), (bool, String, Value)> = BTreeMap::new();
    let entries = archive
        .entries()
        .map_err(|err| InputError::Tarball(err.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|err| InputError::Tarball(err.to_string()))?;
        let path = entry
            .path()
            .map_err(|err| InputError::Tarball(err.to_string()))?
            .to_string_lossy()
            .into_owned();
        // resources/<resource>/[<version>-preferredversion/|<version>/]namespaces/<ns>/<name>.json
        let parts: Vec<&str> = path.trim_start_matches("./").split('/').collect();
        let Some(at) = parts.iter().position(|part| *part == "namespaces") else {
            continue;
        };
        if parts.first() != Some(&"resources") || parts.len() != at + 3 || at < 2 {
            continue;
        }
        let resource = parts[1];
        if !BACKUP_RESOURCES.contains(&resource) {
            continue;
        }
        let Some(name) = parts[at + 2].strip_suffix(".json") else {
            continue;
        };
        let preferred = at == 3 && parts[2].ends_with("-preferredversion");
        if at == 3 && !preferred {
            continue; // a non-preferred version: Velero restores the preferred one
        }
        let mut text = String::new();
        entry
            .read_to_string(&mut text)
            .map_err(|err| InputError::Tarball(format!("{path}: {err}")))?;
        let object: Value = serde_json::from_str(&text)
            .map_err(|err| InputError::Tarball(format!("{path}: {err}")))?;
        let key = (
            resource.to_string(),
            parts[at + 1].to_string(),
            name.to_string(),
        );
        let better = found
            .get(&key)
            .is_none_or(|(was_preferred, ..)| preferred && !was_preferred);
        if better {
            found.insert(key, (preferred, path, object));
        }
    }
    Ok(found
        .into_values()
        .map(|(_, path, object)| (path, object))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_lists_and_json_are_read() {
        let yaml = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: PersistentVolumeClaim\n  metadata: {name: a, namespace: n}\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: b}\n---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: c}\n";
        let items = items(parse_documents(yaml).unwrap(), "stdin").unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].review["request"]["namespace"], "n");
        assert_eq!(items[2].review["request"]["namespace"], "default");
        assert_eq!(items[0].source, "stdin document 1 item 1");
        let json = r#"{"apiVersion":"v1","kind":"PersistentVolumeClaim","metadata":{"name":"x"}}"#;
        assert_eq!(parse_documents(json).unwrap().len(), 1);
        assert!(matches!(
            parse_documents("{not json"),
            Err(InputError::Syntax(_))
        ));
        assert!(matches!(
            parse_documents("a: [b"),
            Err(InputError::Syntax(_))
        ));
        assert!(matches!(parse_documents("  \n"), Err(InputError::Shape(_))));
    }

    #[test]
    fn backup_tarball_prefers_the_preferred_version() {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        let mut add = |path: &str, body: &Value| {
            let bytes = serde_json::to_vec(body).unwrap();
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, path, bytes.as_slice())
                .unwrap();
        };
        let vm = |version: &str| json!({"apiVersion": format!("vmoperator.vmware.com/{version}"), "kind": "VirtualMachine", "metadata": {"name": "web-1", "namespace": "prod"}});
        add(
            "resources/virtualmachines.vmoperator.vmware.com/namespaces/prod/web-1.json",
            &vm("v1alpha5"),
        );
        add(
            "resources/virtualmachines.vmoperator.vmware.com/v1alpha3/namespaces/prod/web-1.json",
            &vm("v1alpha3"),
        );
        add(
            "resources/virtualmachines.vmoperator.vmware.com/v1alpha5-preferredversion/namespaces/prod/web-1.json",
            &vm("v1alpha5"),
        );
        add(
            "resources/secrets/namespaces/prod/s.json",
            &json!({"kind": "Secret"}),
        );
        add(
            "resources/persistentvolumeclaims/namespaces/prod/data.json",
            &json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim"}),
        );
        let bytes = builder.into_inner().unwrap().finish().unwrap();
        assert!(is_gzip(&bytes));
        let objects = backup_objects(&bytes[..]).unwrap();
        assert_eq!(objects.len(), 2, "{objects:?}");
        let (path, vm) = objects
            .iter()
            .find(|(_, o)| o["kind"] == "VirtualMachine")
            .unwrap();
        assert!(path.contains("-preferredversion"), "{path}");
        assert_eq!(vm["apiVersion"], "vmoperator.vmware.com/v1alpha5");
        assert!(matches!(
            backup_objects(&b"\x1f\x8bnot really"[..]),
            Err(InputError::Tarball(_))
        ));
    }
}
