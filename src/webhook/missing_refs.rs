//! The denial for a VM whose cluster-bound references the target namespace
//! lacks: one clause per missing reference, each naming what the namespace
//! has instead and the mapping entry that fixes it (a new one, or a change to
//! the entry that mapped it to the wrong target). Pure, called by
//! [`super::decide`].

use crate::vmop::{self, ClusterRef, RefKind};
use crate::webhook::admission::MappingFix;
use crate::webhook::decide::{DecideSettings, Facts, Subject};

/// What a denial lists of what the namespace has, per missing reference:
/// enough to pick from, and a message of bounded size whatever the
/// namespace holds.
pub const LISTED_AT_MOST: usize = 20;

/// One missing reference as a denial explains it: its name after mapping,
/// the source of the entry that mapped it there (if one did), and what the
/// namespace has instead.
struct MissingRef<'a> {
    name: &'a str,
    mapped_from: Option<&'a str>,
    has: &'a [String],
}

impl MissingRef<'_> {
    /// What the namespace has, or `none` where it has nothing of the kind.
    fn listed(&self, none: &str) -> String {
        match self.has.len() {
            0 => none.to_string(),
            count if count <= LISTED_AT_MOST => self.has.join(", "),
            count => format!(
                "{} and {} more (the first {LISTED_AT_MOST} listed)",
                self.has[..LISTED_AT_MOST].join(", "),
                count - LISTED_AT_MOST
            ),
        }
    }

    /// The first alternative, or a placeholder.
    fn example<'a>(&'a self, placeholder: &'a str) -> &'a str {
        self.has.first().map(String::as_str).unwrap_or(placeholder)
    }

    /// The entry to write, and what to do with it: add one, or change the
    /// entry that mapped the reference here (Velero maps from the backup's
    /// name, once, so an entry from the mapped name would never apply).
    /// `place` is a key of a ConfigMap (entries go "under" it) or a whole
    /// ConfigMap (entries go "to" it).
    fn advice(&self, new: &str, place: &str) -> (String, MappingFix) {
        let under_key = place.starts_with("key ");
        let (text, old) = match self.mapped_from {
            Some(source) => (
                format!(
                    "change `{source}: {}` to `{source}: {new}` {} {place}",
                    self.name,
                    if under_key { "under" } else { "in" }
                ),
                source,
            ),
            None => (
                format!(
                    "add `{}: {new}` {} {place}",
                    self.name,
                    if under_key { "under" } else { "to" }
                ),
                self.name,
            ),
        };
        let fix = MappingFix {
            place: place.to_string(),
            old: old.to_string(),
            new: new.to_string(),
        };
        (text, fix)
    }
}

/// A class the namespace lacks: what it has, and the mapping entry to add.
fn missing_class_clause(
    namespace: &str,
    missing: &MissingRef,
    facts: &Facts,
    settings: &DecideSettings,
) -> (String, MappingFix) {
    let class = missing.name;
    let listed = missing.listed("no class with an active instance");
    let (advice, fix) = missing.advice(
        missing.example("<class>"),
        &our_key(&facts.mappings.classes.source, "classes", settings),
    );
    let text = format!(
        "spec.className {class:?} names no VirtualMachineClass with an active instance in namespace {namespace}, \
         so VM Operator would admit the VM and never deploy it. The namespace has: {listed}. Map the class: {advice}"
    );
    (text, fix)
}

/// Where our mapping ConfigMap is looked for, for messages.
fn our_configmap(settings: &DecideSettings) -> String {
    format!(
        "a ConfigMap in namespace {} labelled {}=\"\" and {}={}",
        settings.velero_namespace,
        vmop::mapping::PLUGIN_CONFIG_LABEL,
        vmop::mapping::VM_MAPPINGS_LABEL,
        vmop::mapping::RESTORE_ITEM_ACTION
    )
}

/// Where an entry under `key` of our mapping ConfigMap goes: the ConfigMap
/// in effect (from `source`, `ConfigMap velero/NAME key KEY`), or where it is
/// looked for.
fn our_key(source: &str, key: &str, settings: &DecideSettings) -> String {
    let configmap = if source.is_empty() {
        our_configmap(settings)
    } else {
        source.replace(&format!(" key {key}"), "")
    };
    format!("key {key} of {configmap}")
}

/// Velero's own change-storage-class ConfigMap, as the mappings found it or
/// where Velero looks for it.
fn storage_class_configmap(facts: &Facts, settings: &DecideSettings) -> String {
    if facts.mappings.storage_classes.source.is_empty() {
        format!(
            "Velero's change-storage-class ConfigMap (in namespace {}, labelled {}=\"\" and {}={})",
            settings.velero_namespace,
            vmop::mapping::PLUGIN_CONFIG_LABEL,
            vmop::mapping::CHANGE_STORAGE_CLASS_LABEL,
            vmop::mapping::RESTORE_ITEM_ACTION
        )
    } else {
        facts.mappings.storage_classes.source.clone()
    }
}

/// A storage class the namespace is not assigned: what it has, and the entry
/// to add to Velero's own change-storage-class ConfigMap (which also maps the
/// VM's PVCs). `encryption_class` is the VM's, when it names one: only the
/// namespace's encryption storage classes are listed then.
fn missing_storage_class_clause(
    namespace: &str,
    missing: &MissingRef,
    encryption_class: Option<&str>,
    facts: &Facts,
    settings: &DecideSettings,
) -> (String, MappingFix) {
    let class = missing.name;
    let (listed, what) = match encryption_class {
        Some(encryption_class) => (
            missing.listed("no encryption storage class"),
            format!(
                "The namespace's encryption storage classes (spec.crypto.encryptionClassName {encryption_class:?} needs one)"
            ),
        ),
        None => (
            missing.listed("no storage class"),
            "The namespace has".to_string(),
        ),
    };
    let (advice, fix) = missing.advice(
        missing.example("<storage class>"),
        &storage_class_configmap(facts, settings),
    );
    let text = format!(
        "spec.storageClass {class:?} is not assigned to namespace {namespace} (no ResourceQuota or StoragePolicyQuota there assigns it), \
         so VM Operator would refuse the VM (\"Storage policy is not associated with the namespace\"). {what}: {listed}. \
         Map the storage class: {advice}, which maps the VM's PVCs too"
    );
    (text, fix)
}

/// A VM with an encryption class whose storage class does not encrypt: the
/// namespace's encryption storage classes, and the entry for Velero's own
/// change-storage-class ConfigMap (which also maps the VM's PVCs).
fn unencrypted_storage_class_clause(
    namespace: &str,
    missing: &MissingRef,
    encryption_class: &str,
    facts: &Facts,
    settings: &DecideSettings,
) -> (String, MappingFix) {
    let class = missing.name;
    let listed = missing.listed("none");
    let (advice, fix) = missing.advice(
        missing.example("<encryption storage class>"),
        &storage_class_configmap(facts, settings),
    );
    let text = format!(
        "spec.crypto.encryptionClassName {encryption_class:?} needs an encryption storage class, and spec.storageClass {class:?} \
         is not one (VM Operator does not record its storage policy as encrypted), so VM Operator would refuse the VM \
         (\"requires spec.storageClass specify an encryption storage class\"). Encryption storage classes of namespace {namespace}: {listed}. \
         Map the storage class: {advice}, which maps the VM's PVCs too"
    );
    (text, fix)
}

/// How many of the namespace's images a denial lists: a Supervisor can hold
/// hundreds of cluster images.
const IMAGES_LISTED: usize = 10;

/// An image name that resolves to no image the namespace can use: what it
/// can use instead, and the mapping entry to add.
fn missing_image_clause(
    namespace: &str,
    missing: &MissingRef,
    facts: &Facts,
    settings: &DecideSettings,
) -> (String, MappingFix) {
    let image = missing.name;
    let has = missing.has;
    let listed = if has.is_empty() {
        "no image".to_string()
    } else if has.len() > IMAGES_LISTED {
        format!(
            "{} and {} more",
            has[..IMAGES_LISTED].join(", "),
            has.len() - IMAGES_LISTED
        )
    } else {
        has.join(", ")
    };
    // Each alternative reads `name (display name)`; the entry maps to the name.
    let example = has
        .first()
        .and_then(|first| first.split(' ').next())
        .unwrap_or("<image>");
    let (advice, fix) = missing.advice(
        example,
        &our_key(&facts.mappings.images.source, "images", settings),
    );
    let text = format!(
        "spec.imageName {image:?} resolves to no VirtualMachineImage in namespace {namespace} and no \
         ClusterVirtualMachineImage, so VM Operator would refuse the VM (\"no VM image exists\"). The namespace can use: {listed}. \
         Map the image: {advice}"
    );
    (text, fix)
}

/// A network the namespace lacks: what it has, and the mapping entry to add.
fn missing_network_clause(
    namespace: &str,
    missing: &MissingRef,
    facts: &Facts,
    settings: &DecideSettings,
) -> (String, MappingFix) {
    let network = missing.name;
    let listed = missing.listed("no network");
    let (advice, fix) = missing.advice(
        missing.example("<KIND/NAME>"),
        &our_key(&facts.mappings.networks_source, "networks", settings),
    );
    let text = format!(
        "an interface's network {network:?} (spec.network.interfaces[].network) is not in namespace {namespace}, \
         so VM Operator would admit the VM and its interface would never come up (\"network interface is not ready\"). \
         The namespace has: {listed}. Map the network: {advice}"
    );
    (text, fix)
}

/// Every missing reference that denies the VM, each with what the namespace
/// has and the entry that fixes it, so one restore attempt shows them all.
pub(crate) fn missing_references_message(
    subject: &Subject,
    missing: &[&ClusterRef],
    facts: &Facts,
    settings: &DecideSettings,
) -> (String, Vec<MappingFix>) {
    let namespace = subject.namespace;
    let alternatives = |kind: RefKind| {
        facts
            .alternatives
            .get(&kind)
            .map(Vec::as_slice)
            .unwrap_or_default()
    };
    // A storage class the namespace lacks that must also encrypt is one
    // clause: the namespace's encryption storage classes are its fixes.
    let encryption_class = facts
        .refs
        .iter()
        .find(|(reference, _)| reference.kind == RefKind::EncryptionStorageClass)
        .and_then(|(reference, _)| reference.owner.as_deref());
    let storage_class_missing = missing
        .iter()
        .any(|reference| reference.kind == RefKind::StorageClass);
    let (clauses, fixes): (Vec<String>, Vec<MappingFix>) = missing
        .iter()
        .filter(|reference| {
            !(storage_class_missing && reference.kind == RefKind::EncryptionStorageClass)
        })
        .map(|reference| {
            let mapped_from = vmop::vm::mapped_from(subject.object, &facts.mappings, reference);
            let missing = MissingRef {
                name: reference.name.as_str(),
                mapped_from: mapped_from.as_deref(),
                has: alternatives(reference.kind),
            };
            match reference.kind {
                RefKind::StorageClass => match encryption_class {
                    Some(encryption_class) => missing_storage_class_clause(
                        namespace,
                        &MissingRef {
                            has: alternatives(RefKind::EncryptionStorageClass),
                            ..missing
                        },
                        Some(encryption_class),
                        facts,
                        settings,
                    ),
                    None => {
                        missing_storage_class_clause(namespace, &missing, None, facts, settings)
                    }
                },
                RefKind::EncryptionStorageClass => unencrypted_storage_class_clause(
                    namespace,
                    &missing,
                    reference.owner.as_deref().unwrap_or_default(),
                    facts,
                    settings,
                ),
                RefKind::ImageName => missing_image_clause(namespace, &missing, facts, settings),
                RefKind::Network => missing_network_clause(namespace, &missing, facts, settings),
                _ => missing_class_clause(namespace, &missing, facts, settings),
            }
        })
        .unzip();
    let message = format!(
        "{}: {}, then restore again (existing objects are skipped)",
        subject.object_label,
        clauses.join("; and ")
    );
    (message, fixes)
}
