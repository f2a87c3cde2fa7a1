//! Mappings for a restore into another Supervisor, or another namespace,
//! whose storage classes, VM classes, images, networks and zones have other
//! names. Pure: the ConfigMaps come in as plain values, the live watch is in
//! [`crate::facts`].
//!
//! Two ConfigMaps in Velero's namespace, found by label the way Velero finds
//! a plugin's configuration (`velero.io/plugin-config` plus
//! `<plugin>: RestoreItemAction`; more than one match is an error):
//! - Velero's own `velero.io/change-storage-class` ConfigMap (`old: new`),
//!   which Velero applies to PVCs, PVs and StatefulSets only; here it also
//!   maps a VM's `spec.storageClass`, so one mapping covers a VM and its PVCs.
//! - Ours, `velero-vm-restore-webhook/vm-mappings`, with one key per kind of
//!   reference, each a YAML map `old: new`: `classes`, `images`, `networks`
//!   (`KIND/NAME` or `NAME` on either side) and `zones`.
//!
//! A Restore annotation ([`MAPPINGS_ANNOTATION`]) names another ConfigMap of
//! ours for that restore. Malformed data is a [`MappingError`] that names the
//! ConfigMap and the key; a VM it would affect is denied, never restored
//! half-mapped.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::RuleDoc;
use super::shape::{self, ShapeError};
use crate::patch::Change;

/// Velero's label on every plugin configuration ConfigMap (any value).
pub const PLUGIN_CONFIG_LABEL: &str = "velero.io/plugin-config";
/// The value of the plugin label, as Velero's `PluginKindRestoreItemAction`.
pub const RESTORE_ITEM_ACTION: &str = "RestoreItemAction";
/// Velero's change-storage-class action's label key.
pub const CHANGE_STORAGE_CLASS_LABEL: &str = "velero.io/change-storage-class";
/// Our label key, the same way.
pub const VM_MAPPINGS_LABEL: &str = "velero-vm-restore-webhook/vm-mappings";
/// Restore annotation: the name of the ConfigMap of ours (in Velero's
/// namespace) to use for this restore instead of the labelled one.
pub const MAPPINGS_ANNOTATION: &str = "velero-vm-restore-webhook/mappings";

pub const R_MAP_STORAGE_CLASS: &str = "vm-map-storage-class";
pub const R_MAP_CLASS: &str = "vm-map-class";
pub const R_MAP_IMAGE: &str = "vm-map-image";
pub const R_MAP_NETWORK: &str = "vm-map-network";
pub const R_MAP_ZONE: &str = "vm-map-zone";

/// The mapping rules, for the rule table.
pub const RULES: &[RuleDoc] = &[
    RuleDoc {
        id: R_MAP_STORAGE_CLASS,
        kind: "VirtualMachine",
        what: "set `spec.storageClass` to its target in Velero's `velero.io/change-storage-class` ConfigMap",
        why: "Velero maps PVCs only; the VM would be denied in a target without the old class (`Storage policy … does not exist`)",
    },
    RuleDoc {
        id: R_MAP_CLASS,
        kind: "VirtualMachine",
        what: "set `spec.className` to its target in key `classes` of our mappings ConfigMap, and remove `spec.class` (the old class's instance)",
        why: "a VM naming a class the target lacks is admitted but never deployed",
    },
    RuleDoc {
        id: R_MAP_IMAGE,
        kind: "VirtualMachine",
        what: "set `spec.imageName` to its target in key `images`, and remove `spec.image`",
        why: "VM Operator denies a VM whose image name does not resolve in the target",
    },
    RuleDoc {
        id: R_MAP_NETWORK,
        kind: "VirtualMachine",
        what: "set `spec.network.interfaces[].network` (kind, name, apiVersion; v1alpha1: `networkName`) to its target in key `networks`",
        why: "a VM naming a network the target lacks never gets its NIC",
    },
    RuleDoc {
        id: R_MAP_ZONE,
        kind: "VirtualMachine",
        what: "set label `topology.kubernetes.io/zone` to its target in key `zones` (when that zone exists; otherwise `vm-zone-label` removes it)",
        why: "zones have other names on another Supervisor",
    },
];

/// The keys our ConfigMap may hold.
pub const KEY_CLASSES: &str = "classes";
pub const KEY_IMAGES: &str = "images";
pub const KEY_NETWORKS: &str = "networks";
pub const KEY_ZONES: &str = "zones";
const KEYS: &[&str] = &[KEY_CLASSES, KEY_IMAGES, KEY_NETWORKS, KEY_ZONES];

/// The network kinds a VM's interface may name, with the apiVersion each is
/// served at (VM Operator's network providers: VDS, NSX-T, NSX VPC).
pub const NETWORK_KINDS: &[(&str, &str)] = &[
    ("Network", "netoperator.vmware.com/v1alpha1"),
    ("VirtualNetwork", "vmware.com/v1alpha1"),
    ("Subnet", "crd.nsx.vmware.com/v1alpha1"),
    ("SubnetSet", "crd.nsx.vmware.com/v1alpha1"),
];

/// Whether `reference` (`KIND/NAME`, or `NAME` where the VM gives no kind)
/// is among `networks` (`KIND/NAME`). A kind VM Operator does not attach to
/// is not ours to judge: found.
pub fn network_found(networks: &[String], reference: &str) -> bool {
    match reference.split_once('/') {
        Some((kind, _)) if !NETWORK_KINDS.iter().any(|(k, _)| *k == kind) => true,
        Some(_) => networks.iter().any(|network| network == reference),
        None => networks.iter().any(|network| {
            network
                .split_once('/')
                .is_some_and(|(_, name)| name == reference)
        }),
    }
}

/// A ConfigMap as read from the cluster or a file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigMapData {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub data: BTreeMap<String, String>,
}

impl ConfigMapData {
    /// Reads a ConfigMap object; non-string data values count as absent
    /// (the API server refuses them anyway).
    pub fn from_value(object: &Value) -> ConfigMapData {
        let strings = |pointer: &str| -> BTreeMap<String, String> {
            object
                .pointer(pointer)
                .and_then(Value::as_object)
                .map(|entries| {
                    entries
                        .iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default()
        };
        let text = |pointer: &str| {
            object
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        ConfigMapData {
            namespace: text("/metadata/namespace"),
            name: text("/metadata/name"),
            labels: strings("/metadata/labels"),
            data: strings("/data"),
        }
    }

    fn is_plugin_config(&self, plugin_label: &str) -> bool {
        self.labels.contains_key(PLUGIN_CONFIG_LABEL)
            && self.labels.get(plugin_label).map(String::as_str) == Some(RESTORE_ITEM_ACTION)
    }
}

/// Why the mappings cannot be used; each names where to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("ConfigMap {namespace}/{name}, key {key}: {problem}")]
    Invalid {
        namespace: String,
        name: String,
        key: String,
        problem: String,
    },
    #[error(
        "more than one ConfigMap in namespace {namespace} is labelled {PLUGIN_CONFIG_LABEL} and {label}={RESTORE_ITEM_ACTION} ({names}); keep one"
    )]
    Ambiguous {
        namespace: String,
        label: &'static str,
        names: String,
    },
    #[error(
        "ConfigMap {namespace}/{name}, named by Restore annotation {MAPPINGS_ANNOTATION}, does not exist"
    )]
    NamedMissing { namespace: String, name: String },
}

/// A network as an interface names it: kind (when given) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NetworkName {
    pub kind: Option<String>,
    pub name: String,
}

impl std::fmt::Display for NetworkName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Some(kind) => write!(f, "{kind}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// One kind of mapping with where it came from, for messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table<K: Ord> {
    /// `ConfigMap velero/NAME key KEY`.
    pub source: String,
    pub entries: BTreeMap<K, String>,
}

/// What this restore maps. Empty when no ConfigMap is in effect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mappings {
    pub storage_classes: Table<String>,
    pub classes: Table<String>,
    pub images: Table<String>,
    pub zones: Table<String>,
    /// Source network → target network (the target's kind may be absent:
    /// the source's is kept).
    pub networks: BTreeMap<NetworkName, NetworkName>,
    pub networks_source: String,
}

impl Mappings {
    /// The mappings as they will be applied, for every question asked of
    /// them: an entry that maps a name to itself renames nothing, and the
    /// table of a turned-off `vm-map-*` rule maps nothing. The checks, the
    /// renames and the clean-up of `spec.class` and `spec.image` then agree
    /// on what is mapped.
    pub fn in_effect(&self, enabled: impl Fn(&str) -> bool) -> Mappings {
        let table = |table: &Table<String>, rule: &str| Table {
            source: table.source.clone(),
            entries: if enabled(rule) {
                table
                    .entries
                    .iter()
                    .filter(|(old, new)| old != new)
                    .map(|(old, new)| (old.clone(), new.clone()))
                    .collect()
            } else {
                BTreeMap::new()
            },
        };
        Mappings {
            storage_classes: table(&self.storage_classes, R_MAP_STORAGE_CLASS),
            classes: table(&self.classes, R_MAP_CLASS),
            images: table(&self.images, R_MAP_IMAGE),
            zones: table(&self.zones, R_MAP_ZONE),
            networks: if enabled(R_MAP_NETWORK) {
                self.networks
                    .iter()
                    .filter(|(old, new)| {
                        old.name != new.name || (new.kind.is_some() && new.kind != old.kind)
                    })
                    .map(|(old, new)| (old.clone(), new.clone()))
                    .collect()
            } else {
                BTreeMap::new()
            },
            networks_source: self.networks_source.clone(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.storage_classes.entries.is_empty()
            && self.classes.entries.is_empty()
            && self.images.entries.is_empty()
            && self.zones.entries.is_empty()
            && self.networks.is_empty()
    }

    pub fn zone(&self, zone: &str) -> Option<&str> {
        self.zones.entries.get(zone).map(String::as_str)
    }

    pub fn storage_class(&self, class: &str) -> Option<&str> {
        self.storage_classes.entries.get(class).map(String::as_str)
    }

    pub fn class(&self, class: &str) -> Option<&str> {
        self.classes.entries.get(class).map(String::as_str)
    }

    pub fn image(&self, image: &str) -> Option<&str> {
        self.images.entries.get(image).map(String::as_str)
    }

    /// The target of an interface's network: an entry for its kind and
    /// name, else one for its name alone.
    pub fn network(&self, kind: Option<&str>, name: &str) -> Option<&NetworkName> {
        self.network_entry(kind, name).map(|(_, target)| target)
    }

    /// The entry (source as written, target) that maps an interface's network.
    pub fn network_entry(
        &self,
        kind: Option<&str>,
        name: &str,
    ) -> Option<(&NetworkName, &NetworkName)> {
        let exact = kind.and_then(|kind| {
            self.networks.get_key_value(&NetworkName {
                kind: Some(kind.to_string()),
                name: name.to_string(),
            })
        });
        exact.or_else(|| {
            self.networks.get_key_value(&NetworkName {
                kind: None,
                name: name.to_string(),
            })
        })
    }
}

fn invalid(map: &ConfigMapData, key: &str, problem: impl Into<String>) -> MappingError {
    MappingError::Invalid {
        namespace: map.namespace.clone(),
        name: map.name.clone(),
        key: key.to_string(),
        problem: problem.into(),
    }
}

fn source(map: &ConfigMapData, key: &str) -> String {
    format!("ConfigMap {}/{} key {key}", map.namespace, map.name)
}

/// The single ConfigMap carrying `label`, if any.
fn labelled<'a>(
    maps: &'a [ConfigMapData],
    namespace: &str,
    label: &'static str,
) -> Result<Option<&'a ConfigMapData>, MappingError> {
    let found: Vec<&ConfigMapData> = maps
        .iter()
        .filter(|map| map.namespace == namespace && map.is_plugin_config(label))
        .collect();
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        many => Err(MappingError::Ambiguous {
            namespace: namespace.to_string(),
            label,
            names: many
                .iter()
                .map(|map| map.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// A name as Kubernetes takes it: not empty, no spaces or slashes.
fn check_name(map: &ConfigMapData, key: &str, what: &str, name: &str) -> Result<(), MappingError> {
    if name.is_empty() {
        return Err(invalid(map, key, format!("{what} is empty")));
    }
    if name.contains(char::is_whitespace) || name.contains('/') {
        return Err(invalid(map, key, format!("{what} {name:?} is not a name")));
    }
    Ok(())
}

/// `old: new` lines of one key, as a YAML map of strings.
fn yaml_table(map: &ConfigMapData, key: &str) -> Result<BTreeMap<String, String>, MappingError> {
    let Some(text) = map.data.get(key) else {
        return Ok(BTreeMap::new());
    };
    let parsed: Option<BTreeMap<String, Value>> = serde_yaml_ng::from_str(text)
        .map_err(|err| invalid(map, key, format!("not a YAML map of old: new ({err})")))?;
    let mut out = BTreeMap::new();
    for (old, new) in parsed.unwrap_or_default() {
        let new = match new {
            Value::String(new) => new,
            Value::Null => String::new(),
            other => {
                return Err(invalid(
                    map,
                    key,
                    format!("the target of {old:?} must be a name, found {other}"),
                ));
            }
        };
        out.insert(old, new);
    }
    Ok(out)
}

fn network_name(
    map: &ConfigMapData,
    key: &str,
    side: &str,
    text: &str,
) -> Result<NetworkName, MappingError> {
    let (kind, name) = match text.split_once('/') {
        Some((kind, name)) => (Some(kind), name),
        None => (None, text),
    };
    if let Some(kind) = kind
        && !NETWORK_KINDS.iter().any(|(known, _)| *known == kind)
    {
        let known: Vec<&str> = NETWORK_KINDS.iter().map(|(kind, _)| *kind).collect();
        return Err(invalid(
            map,
            key,
            format!(
                "{side} {text:?}: unknown network kind {kind:?} (known: {})",
                known.join(", ")
            ),
        ));
    }
    check_name(map, key, &format!("{side} {text:?}: the name"), name)?;
    Ok(NetworkName {
        kind: kind.map(str::to_string),
        name: name.to_string(),
    })
}

fn name_table(map: &ConfigMapData, key: &str) -> Result<Table<String>, MappingError> {
    let mut entries = BTreeMap::new();
    for (old, new) in yaml_table(map, key)? {
        check_name(map, key, "a source name", &old)?;
        check_name(map, key, &format!("the target of {old:?}"), &new)?;
        entries.insert(old, new);
    }
    Ok(Table {
        source: source(map, key),
        entries,
    })
}

/// The mappings in effect for a restore: Velero's change-storage-class
/// ConfigMap, and ours (the one `named` by the Restore's annotation, or the
/// labelled one), from the ConfigMaps of Velero's `namespace`.
pub fn select(
    maps: &[ConfigMapData],
    namespace: &str,
    named: Option<&str>,
) -> Result<Mappings, MappingError> {
    let mut mappings = Mappings::default();
    if let Some(velero) = labelled(maps, namespace, CHANGE_STORAGE_CLASS_LABEL)? {
        let mut entries = BTreeMap::new();
        for (old, new) in &velero.data {
            check_name(velero, old, "a source storage class", old)?;
            check_name(velero, old, "the target storage class", new)?;
            entries.insert(old.clone(), new.clone());
        }
        mappings.storage_classes = Table {
            source: format!("ConfigMap {}/{}", velero.namespace, velero.name),
            entries,
        };
    }
    let ours = match named.filter(|name| !name.is_empty()) {
        Some(name) => Some(
            maps.iter()
                .find(|map| map.namespace == namespace && map.name == name)
                .ok_or_else(|| MappingError::NamedMissing {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                })?,
        ),
        None => labelled(maps, namespace, VM_MAPPINGS_LABEL)?,
    };
    let Some(ours) = ours else {
        return Ok(mappings);
    };
    if let Some(unknown) = ours.data.keys().find(|key| !KEYS.contains(&key.as_str())) {
        return Err(invalid(
            ours,
            unknown,
            format!("unknown key (known: {})", KEYS.join(", ")),
        ));
    }
    mappings.classes = name_table(ours, KEY_CLASSES)?;
    mappings.images = name_table(ours, KEY_IMAGES)?;
    mappings.zones = name_table(ours, KEY_ZONES)?;
    for (old, new) in yaml_table(ours, KEY_NETWORKS)? {
        let old = network_name(ours, KEY_NETWORKS, "source", &old)?;
        let new = network_name(ours, KEY_NETWORKS, "target", &new)?;
        mappings.networks.insert(old, new);
    }
    mappings.networks_source = source(ours, KEY_NETWORKS);
    Ok(mappings)
}

fn tokens(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|part| part.to_string()).collect()
}

fn mapped(old: &str, new: &str, source: &str) -> String {
    format!("{old} -> {new}, {source}")
}

/// The renames of one VM (or its conversion copy) under `mappings`, each
/// gated by `enabled`: storage class, class, image, networks. The zone label
/// is mapped by the caller, which knows whether the mapped zone exists.
pub fn vm_changes(
    spec: &Map<String, Value>,
    mappings: &Mappings,
    enabled: impl Fn(&str) -> bool,
    changes: &mut Vec<Change>,
) -> Result<(), ShapeError> {
    let mut rename = |key: &str, table: &Table<String>, rule: &'static str| {
        if let Some(old) = shape::string(spec, "spec", key)?
            && let Some(new) = table.entries.get(old)
            && new != old
            && enabled(rule)
        {
            changes.push(Change::replace(
                tokens(&["spec", key]),
                Value::String(new.clone()),
                rule,
                mapped(old, new, &table.source),
            ));
            return Ok::<bool, ShapeError>(true);
        }
        Ok(false)
    };
    rename(
        "storageClass",
        &mappings.storage_classes,
        R_MAP_STORAGE_CLASS,
    )?;
    let class_mapped = rename("className", &mappings.classes, R_MAP_CLASS)?;
    let image_mapped = rename("imageName", &mappings.images, R_MAP_IMAGE)?;
    // The instance and image objects were the old class's and image's: VM
    // Operator picks the new class's active instance and resolves the new
    // image name again.
    if class_mapped && spec.contains_key("class") {
        changes.push(Change::remove(
            tokens(&["spec", "class"]),
            R_MAP_CLASS,
            "an instance of the old class; VM Operator picks the new class's",
        ));
    }
    if image_mapped && spec.contains_key("image") {
        changes.push(Change::remove(
            tokens(&["spec", "image"]),
            R_MAP_IMAGE,
            "the old image; VM Operator resolves the new imageName",
        ));
    }
    if enabled(R_MAP_NETWORK) {
        network_changes(spec, mappings, changes)?;
    }
    Ok(())
}

/// One interface's network reference: `spec.network.interfaces[index].network`
/// (v1alpha2+, `reference` set) or `spec.networkInterfaces[index].networkName`
/// (v1alpha1, name only).
struct InterfaceNetwork<'a> {
    index: usize,
    /// The `network` object (v1alpha2+), for the fields beside the name.
    reference: Option<&'a Map<String, Value>>,
    /// Its field path, for errors.
    field: String,
    kind: Option<&'a str>,
    name: &'a str,
}

/// Every interface of `spec` that names a network, at either shape.
fn interface_network_refs(
    spec: &Map<String, Value>,
) -> Result<Vec<InterfaceNetwork<'_>>, ShapeError> {
    let mut found = Vec::new();
    if let Some(network) = shape::map(spec, "spec", "network")?
        && let Some(interfaces) = shape::array(network, "spec.network", "interfaces")?
    {
        for (index, interface) in interfaces.iter().enumerate() {
            let field = format!("spec.network.interfaces[{index}]");
            let Some(interface) = interface.as_object() else {
                continue;
            };
            let Some(reference) = shape::map(interface, &field, "network")? else {
                continue;
            };
            let field = format!("{field}.network");
            let kind = shape::string(reference, &field, "kind")?;
            let Some(name) = shape::string(reference, &field, "name")? else {
                continue;
            };
            found.push(InterfaceNetwork {
                index,
                reference: Some(reference),
                field,
                kind,
                name,
            });
        }
    }
    if let Some(interfaces) = shape::array(spec, "spec", "networkInterfaces")? {
        for (index, interface) in interfaces.iter().enumerate() {
            let Some(interface) = interface.as_object() else {
                continue;
            };
            let field = format!("spec.networkInterfaces[{index}]");
            let Some(name) = shape::string(interface, &field, "networkName")? else {
                continue;
            };
            found.push(InterfaceNetwork {
                index,
                reference: None,
                field,
                kind: None,
                name,
            });
        }
    }
    Ok(found)
}

/// The network of each interface that names one, after `mappings`: the kind
/// where the VM (or the mapping) gives one. An interface with no network
/// name gets the namespace's default network from VM Operator: not listed.
pub fn interface_networks(
    spec: &Map<String, Value>,
    mappings: &Mappings,
) -> Result<Vec<NetworkName>, ShapeError> {
    let mut networks: Vec<NetworkName> = mapped_interface_networks(spec, mappings)?
        .into_iter()
        .map(|(target, _)| target)
        .collect();
    networks.sort();
    networks.dedup();
    Ok(networks)
}

/// Each interface's network after `mappings`, with the source of the entry
/// that mapped it (as the ConfigMap writes it), if one did.
pub fn mapped_interface_networks(
    spec: &Map<String, Value>,
    mappings: &Mappings,
) -> Result<Vec<(NetworkName, Option<NetworkName>)>, ShapeError> {
    let mut networks = Vec::new();
    for found in interface_network_refs(spec)? {
        if found.name.is_empty() {
            continue;
        }
        let kind = found.kind.filter(|k| !k.is_empty());
        networks.push(match mappings.network_entry(kind, found.name) {
            // v1alpha1 names the network only: so does its mapped target.
            Some((source, target)) if found.reference.is_none() => (
                NetworkName {
                    kind: None,
                    name: target.name.clone(),
                },
                Some(source.clone()),
            ),
            Some((source, target)) => (
                NetworkName {
                    kind: target.kind.clone().or(kind.map(str::to_string)),
                    name: target.name.clone(),
                },
                Some(source.clone()),
            ),
            None => (
                NetworkName {
                    kind: kind.map(str::to_string),
                    name: found.name.to_string(),
                },
                None,
            ),
        });
    }
    Ok(networks)
}

/// `spec.network.interfaces[].network` (v1alpha2+) and
/// `spec.networkInterfaces[].networkName` (v1alpha1, name only).
fn network_changes(
    spec: &Map<String, Value>,
    mappings: &Mappings,
    changes: &mut Vec<Change>,
) -> Result<(), ShapeError> {
    if mappings.networks.is_empty() {
        return Ok(());
    }
    let source = &mappings.networks_source;
    for found in interface_network_refs(spec)? {
        let (index, kind, name) = (found.index.to_string(), found.kind, found.name);
        let Some(reference) = found.reference else {
            // v1alpha1: the name alone.
            if let Some(target) = mappings.network(None, name)
                && target.name != name
            {
                changes.push(Change::replace(
                    tokens(&["spec", "networkInterfaces", &index, "networkName"]),
                    Value::String(target.name.clone()),
                    R_MAP_NETWORK,
                    mapped(name, &target.name, source),
                ));
            }
            continue;
        };
        let Some(target) = mappings.network(kind, name) else {
            continue;
        };
        let at = |key: &str| tokens(&["spec", "network", "interfaces", &index, "network", key]);
        let old = NetworkName {
            kind: kind.map(str::to_string),
            name: name.to_string(),
        };
        let reason = mapped(&old.to_string(), &target.to_string(), source);
        if target.name != name {
            changes.push(Change::replace(
                at("name"),
                Value::String(target.name.clone()),
                R_MAP_NETWORK,
                reason.clone(),
            ));
        }
        if let Some(new_kind) = &target.kind
            && Some(new_kind.as_str()) != kind
        {
            let value = Value::String(new_kind.clone());
            changes.push(if kind.is_some() {
                Change::replace(at("kind"), value, R_MAP_NETWORK, reason.clone())
            } else {
                Change::add(at("kind"), value, R_MAP_NETWORK, reason.clone())
            });
            // The apiVersion goes with the kind, where it is written.
            if shape::string(reference, &found.field, "apiVersion")?.is_some()
                && let Some((_, api_version)) =
                    NETWORK_KINDS.iter().find(|(known, _)| known == new_kind)
            {
                changes.push(Change::replace(
                    at("apiVersion"),
                    Value::String(api_version.to_string()),
                    R_MAP_NETWORK,
                    reason.clone(),
                ));
            }
        }
    }
    Ok(())
}

/// The zone label's change under `mappings`, when the mapped zone is to be
/// kept.
pub fn zone_change(zone: &str, mappings: &Mappings, label_tokens: Vec<String>) -> Option<Change> {
    let new = mappings.zone(zone)?;
    (new != zone).then(|| {
        Change::replace(
            label_tokens,
            Value::String(new.to_string()),
            R_MAP_ZONE,
            mapped(zone, new, &mappings.zones.source),
        )
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn configmap(name: &str, label: Option<&str>, data: Value) -> ConfigMapData {
        let mut labels = json!({});
        if let Some(label) = label {
            labels = json!({PLUGIN_CONFIG_LABEL: "", label: RESTORE_ITEM_ACTION});
        }
        ConfigMapData::from_value(&json!({
            "metadata": {"name": name, "namespace": "velero", "labels": labels},
            "data": data}))
    }

    fn ours(data: Value) -> ConfigMapData {
        configmap("vm-mappings", Some(VM_MAPPINGS_LABEL), data)
    }

    #[test]
    fn both_configmaps_are_read_by_label() {
        let maps = [
            configmap(
                "change-sc",
                Some(CHANGE_STORAGE_CLASS_LABEL),
                json!({"gold": "silver"}),
            ),
            ours(json!({
                "classes": "best-effort-small: guaranteed-small\n",
                "images": "ubuntu-22.04: ubuntu-2204-v2",
                "networks": "Network/vds-a: SubnetSet/vpc-a\nprimary: secondary\n",
                "zones": "zone-a: az-1"})),
            configmap("unrelated", None, json!({"gold": "bronze"})),
        ];
        let mappings = select(&maps, "velero", None).unwrap();
        assert_eq!(mappings.storage_classes.entries["gold"], "silver");
        assert_eq!(
            mappings.storage_classes.source,
            "ConfigMap velero/change-sc"
        );
        assert_eq!(
            mappings.class("best-effort-small"),
            Some("guaranteed-small")
        );
        assert_eq!(mappings.image("ubuntu-22.04"), Some("ubuntu-2204-v2"));
        assert_eq!(mappings.zone("zone-a"), Some("az-1"));
        assert_eq!(
            mappings
                .network(Some("Network"), "vds-a")
                .unwrap()
                .to_string(),
            "SubnetSet/vpc-a"
        );
        // A name-only entry matches any kind; a kind entry only its kind.
        assert_eq!(
            mappings
                .network(Some("Network"), "primary")
                .unwrap()
                .to_string(),
            "secondary"
        );
        assert!(mappings.network(Some("VirtualNetwork"), "vds-a").is_none());
        // Another namespace's ConfigMaps do not count.
        assert!(select(&maps, "other", None).unwrap().is_empty());
    }

    #[test]
    fn malformed_data_names_the_configmap_and_the_key() {
        let cases = [
            (
                json!({"classes": "small: ''"}),
                "key classes: the target of \"small\" is empty",
            ),
            (
                json!({"classes": "small:"}),
                "key classes: the target of \"small\" is empty",
            ),
            (
                json!({"networks": "Wire/a: b"}),
                "key networks: source \"Wire/a\": unknown network kind \"Wire\"",
            ),
            (
                json!({"clases": "a: b"}),
                "key clases: unknown key (known: classes, images, networks, zones)",
            ),
            (
                json!({"images": "[a, b]"}),
                "key images: not a YAML map of old: new",
            ),
            (
                json!({"zones": "a: {b: c}"}),
                "key zones: the target of \"a\" must be a name",
            ),
        ];
        for (data, expected) in cases {
            let err = select(&[ours(data.clone())], "velero", None).unwrap_err();
            let text = err.to_string();
            assert!(text.starts_with("ConfigMap velero/vm-mappings, "), "{text}");
            assert!(text.contains(expected), "{data}: {text}");
        }
        let velero = configmap(
            "change-sc",
            Some(CHANGE_STORAGE_CLASS_LABEL),
            json!({"gold": ""}),
        );
        assert_eq!(
            select(&[velero], "velero", None).unwrap_err().to_string(),
            "ConfigMap velero/change-sc, key gold: the target storage class is empty"
        );
    }

    #[test]
    fn two_labelled_configmaps_are_an_error_and_a_named_one_wins() {
        let first = ours(json!({"zones": "a: b"}));
        let mut second = ours(json!({"zones": "a: c"}));
        second.name = "vm-mappings-2".into();
        let err = select(&[first.clone(), second.clone()], "velero", None).unwrap_err();
        assert!(
            err.to_string()
                .contains("(vm-mappings, vm-mappings-2); keep one"),
            "{err}"
        );
        // The Restore's annotation names one: no ambiguity, even unlabelled.
        let mut named = configmap("dr-site-b", None, json!({"zones": "a: d"}));
        named.namespace = "velero".into();
        let mappings = select(&[first, second, named], "velero", Some("dr-site-b")).unwrap();
        assert_eq!(mappings.zone("a"), Some("d"));
        assert_eq!(
            select(&[], "velero", Some("gone")).unwrap_err().to_string(),
            "ConfigMap velero/gone, named by Restore annotation velero-vm-restore-webhook/mappings, does not exist"
        );
    }

    #[test]
    fn a_vm_is_renamed_field_by_field() {
        let maps = [
            configmap(
                "sc",
                Some(CHANGE_STORAGE_CLASS_LABEL),
                json!({"gold": "silver"}),
            ),
            ours(json!({
                "classes": "small: medium",
                "images": "ubuntu: ubuntu-v2",
                "networks": "Network/vds-a: SubnetSet/vpc-a\nVirtualNetwork/nsx-b: nsx-c"})),
        ];
        let mappings = select(&maps, "velero", None).unwrap();
        let spec = json!({
            "storageClass": "gold", "className": "small", "class": {"name": "small-inst"},
            "imageName": "ubuntu", "image": {"kind": "VirtualMachineImage", "name": "vmi-1"},
            "network": {"interfaces": [
                {"name": "eth0", "network": {"apiVersion": "netoperator.vmware.com/v1alpha1", "kind": "Network", "name": "vds-a"}},
                {"name": "eth1", "network": {"kind": "VirtualNetwork", "name": "nsx-b"}},
                {"name": "eth2", "network": {"name": "unmapped"}}]}});
        let mut changes = Vec::new();
        vm_changes(spec.as_object().unwrap(), &mappings, |_| true, &mut changes).unwrap();
        let described: Vec<String> = changes.iter().map(Change::describe).collect();
        assert_eq!(
            described,
            vec![
                "set spec.storageClass to \"silver\" (gold -> silver, ConfigMap velero/sc)",
                "set spec.className to \"medium\" (small -> medium, ConfigMap velero/vm-mappings key classes)",
                "set spec.imageName to \"ubuntu-v2\" (ubuntu -> ubuntu-v2, ConfigMap velero/vm-mappings key images)",
                "removed spec.class (an instance of the old class; VM Operator picks the new class's)",
                "removed spec.image (the old image; VM Operator resolves the new imageName)",
                "set spec.network.interfaces[0].network.name to \"vpc-a\" (Network/vds-a -> SubnetSet/vpc-a, ConfigMap velero/vm-mappings key networks)",
                "set spec.network.interfaces[0].network.kind to \"SubnetSet\" (Network/vds-a -> SubnetSet/vpc-a, ConfigMap velero/vm-mappings key networks)",
                "set spec.network.interfaces[0].network.apiVersion to \"crd.nsx.vmware.com/v1alpha1\" (Network/vds-a -> SubnetSet/vpc-a, ConfigMap velero/vm-mappings key networks)",
                "set spec.network.interfaces[1].network.name to \"nsx-c\" (VirtualNetwork/nsx-b -> nsx-c, ConfigMap velero/vm-mappings key networks)",
            ]
        );
        // Applied, the object has the new names and is renamed no further.
        let patched = crate::patch::apply(&json!({"spec": spec}), &changes).unwrap();
        let patched = &patched["spec"];
        assert_eq!(
            patched["network"]["interfaces"][0]["network"]["kind"],
            "SubnetSet"
        );
        assert_eq!(patched["storageClass"], "silver");
        assert!(patched.get("class").is_none() && patched.get("image").is_none());
        let mut again = Vec::new();
        let remapped = select(
            &[configmap(
                "sc",
                Some(CHANGE_STORAGE_CLASS_LABEL),
                json!({"silver": "silver"}),
            )],
            "velero",
            None,
        )
        .unwrap();
        vm_changes(
            patched.as_object().unwrap(),
            &remapped,
            |_| true,
            &mut again,
        )
        .unwrap();
        assert!(again.is_empty(), "{again:?}");
        // A turned-off rule leaves its field alone.
        let mut some = Vec::new();
        vm_changes(
            spec.as_object().unwrap(),
            &mappings,
            |rule| rule != R_MAP_NETWORK && rule != R_MAP_CLASS,
            &mut some,
        )
        .unwrap();
        assert!(
            some.iter()
                .all(|c| c.rule != R_MAP_NETWORK && c.rule != R_MAP_CLASS)
        );
        assert_eq!(some.len(), 3);
    }

    #[test]
    fn v1alpha1_networks_are_mapped_by_name() {
        let mappings = select(
            &[ours(json!({"networks": "old-net: new-net"}))],
            "velero",
            None,
        )
        .unwrap();
        let spec =
            json!({"networkInterfaces": [{"networkName": "old-net", "networkType": "nsx-t"}]});
        let mut changes = Vec::new();
        vm_changes(spec.as_object().unwrap(), &mappings, |_| true, &mut changes).unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].field(), "spec.networkInterfaces[0].networkName");
    }
}
