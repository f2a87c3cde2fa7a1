//! `review`: what a restore through the webhook would do to the objects
//! given (files, stdin, or a Velero backup tarball), offline: the same
//! [`Reviewer`] as the server, with facts given by hand.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};

use super::input as offline;
use super::{parse_groups, review_settings};
use crate::deadline::Deadline;
use std::sync::Arc;

use crate::facts::RestoreInfo;
use crate::facts::given::{StaticGroups, StaticRefs, StaticRestores};
use crate::facts::mapping_cache::MappingCache;
use crate::facts::restore::NEW_IDENTITY_ANNOTATION;
use crate::settings::RuleArgs;
use crate::vmop::RefKind;
use crate::vmop::mapping::ConfigMapData;
use crate::webhook::review::{Reviewed, Reviewer};

/// Exit codes: 0 reviewed (denials included, unless --fail-on-deny);
/// 1 an object was denied and --fail-on-deny was given; 2 unusable input.
#[derive(clap::Args)]
pub struct ReviewArgs {
    /// A VirtualMachineGroup that exists, as NAMESPACE/NAME (repeatable). The
    /// groups of a backup tarball count as existing.
    #[arg(long = "group", value_name = "NAMESPACE/NAME")]
    groups: Vec<String>,

    /// A YAML or JSON file of ConfigMaps, as for `kubectl apply` (repeatable):
    /// Velero's change-storage-class ConfigMap and ours (label
    /// `velero-vm-restore-webhook/vm-mappings: RestoreItemAction`), found by
    /// label as in the cluster. VMs are reviewed with their mappings.
    #[arg(long = "mapping", value_name = "FILE")]
    mappings: Vec<PathBuf>,

    /// As `velero restore create --namespace-mappings`: SRC1:DST1,SRC2:DST2.
    /// Objects are reviewed in their target namespace, and a VM restored
    /// into another namespace is a copy (as with --new-identity).
    #[arg(long = "namespace-mappings", value_name = "SRC:DST,...")]
    namespace_mappings: Option<String>,

    /// An object a VM may refer to that exists in the target, as
    /// zone/NAMESPACE/NAME, classinstance/NAMESPACE/NAME, image/NAMESPACE/NAME,
    /// clusterimage/NAME, class/NAMESPACE/NAME (a VirtualMachineClass with
    /// an active instance there), storageclass/NAMESPACE/NAME (a storage
    /// class assigned to the namespace), encryptedstorageclass/NAME (a
    /// storage class whose policy encrypts) or network/NAMESPACE/KIND/NAME
    /// (repeatable). References not given count as missing and are removed,
    /// as they would be in a cluster without them; image names, classes,
    /// storage classes, encryption storage classes and networks are checked
    /// only where some are given, and a VM naming another one is denied.
    #[arg(long = "exists", value_name = "KIND/[NAMESPACE/]NAME")]
    exists: Vec<String>,

    /// Same as `-o json` (kept for scripts).
    #[arg(long, hide = true)]
    patched: bool,

    /// Review as a copy restored beside the original (as with a namespace
    /// mapping): also clear biosUUID, cloud-init instanceID, MACs, addresses.
    #[arg(long)]
    new_identity: bool,

    /// What to print on stdout; a summary of each object goes to stderr.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Response)]
    output: Output,

    /// Exit 1 when any object would be denied.
    #[arg(long)]
    fail_on_deny: bool,

    #[command(flatten)]
    rules: RuleArgs,

    /// JSON or YAML: an object, a List (`kubectl get ... -o yaml`), several
    /// documents, or an AdmissionReview; or a Velero backup tarball
    /// (`velero backup download`). `-` reads stdin.
    #[arg(default_value = "-")]
    input: PathBuf,
}

/// The ConfigMaps of `--mapping` files, all taken as in Velero's namespace
/// (the one they name, else `velero`), as `kubectl apply -n` would put them.
fn mapping_files(files: &[PathBuf]) -> Result<Arc<MappingCache>, String> {
    let mut maps = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file)
            .map_err(|err| format!("--mapping {}: {err}", file.display()))?;
        let documents = offline::parse_documents(&text)
            .map_err(|err| format!("--mapping {}: {err}", file.display()))?;
        let objects = documents.into_iter().flat_map(|document| {
            match document.get("items").and_then(Value::as_array) {
                Some(items) if document["kind"] == "List" => items.clone(),
                _ => vec![document],
            }
        });
        for object in objects {
            if object["kind"] != "ConfigMap" {
                return Err(format!(
                    "--mapping {}: holds a {}, not a ConfigMap",
                    file.display(),
                    object["kind"].as_str().unwrap_or("document without a kind")
                ));
            }
            maps.push(ConfigMapData::from_value(&object));
        }
    }
    let namespace = maps
        .iter()
        .map(|map| map.namespace.clone())
        .find(|namespace| !namespace.is_empty())
        .unwrap_or_else(|| "velero".to_string());
    for map in &mut maps {
        map.namespace = namespace.clone();
    }
    Ok(MappingCache::given(&namespace, maps))
}

/// `--exists` arguments.
fn parse_exists(values: &[String]) -> Result<Vec<(RefKind, String, String)>, String> {
    values
        .iter()
        .map(|value| {
            let parts: Vec<&str> = value.split('/').collect();
            let kind = match parts.first().copied() {
                Some("zone") => RefKind::Zone,
                Some("classinstance") => RefKind::ClassInstance,
                Some("image") => RefKind::Image,
                Some("clusterimage") => RefKind::ClusterImage,
                Some("class") => RefKind::Class,
                Some("storageclass") => RefKind::StorageClass,
                Some("network") => RefKind::Network,
                Some("encryptedstorageclass") => RefKind::EncryptionStorageClass,
                _ => return Err(format!("--exists {value:?}: the kind must be zone, classinstance, class, storageclass, encryptedstorageclass, image, clusterimage or network")),
            };
            match (kind, parts.as_slice()) {
                (RefKind::Network, [_, namespace, kind, name])
                    if !namespace.is_empty() && !kind.is_empty() && !name.is_empty() =>
                {
                    Ok((RefKind::Network, namespace.to_string(), format!("{kind}/{name}")))
                }
                (RefKind::Network, _) => Err(format!("--exists {value:?} must be network/NAMESPACE/KIND/NAME")),
                (RefKind::ClusterImage, [_, name]) if !name.is_empty() => Ok((kind, String::new(), name.to_string())),
                (RefKind::ClusterImage, _) => Err(format!("--exists {value:?} must be clusterimage/NAME")),
                (RefKind::EncryptionStorageClass, [_, name]) if !name.is_empty() => {
                    Ok((kind, String::new(), name.to_string()))
                }
                (RefKind::EncryptionStorageClass, _) => {
                    Err(format!("--exists {value:?} must be encryptedstorageclass/NAME"))
                }
                (_, [_, namespace, name]) if !namespace.is_empty() && !name.is_empty() => {
                    Ok((kind, namespace.to_string(), name.to_string()))
                }
                _ => Err(format!("--exists {value:?} must be KIND/NAMESPACE/NAME")),
            }
        })
        .collect()
}

/// A review as the server answers it: the patch in base64, as the admission
/// API documents it.
fn review_for_people(
    review: &kube::core::admission::AdmissionReview<kube::core::DynamicObject>,
) -> Value {
    serde_json::to_value(crate::webhook::admission::WireReview(review)).unwrap_or(Value::Null)
}

/// The label of an object for the summary, from the review request.
fn request_label(review: &Value) -> String {
    let request = &review["request"];
    let kind = request
        .pointer("/kind/kind")
        .and_then(Value::as_str)
        .unwrap_or("object");
    let name = request
        .pointer("/object/metadata/name")
        .or_else(|| request.get("name"))
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())
        .unwrap_or("(unnamed)");
    match request.get("namespace").and_then(Value::as_str) {
        Some(namespace) if !namespace.is_empty() => format!("{kind} {namespace}/{name}"),
        _ => format!("{kind} {name}"),
    }
}

/// One reviewed item, for the outputs and the summary.
pub(crate) struct ReviewedItem {
    pub(crate) label: String,
    pub(crate) kind: String,
    pub(crate) namespace: String,
    response: Value,
    patch: Option<Value>,
    patched: Option<Value>,
    pub(crate) reviewed: Reviewed,
}

impl ReviewedItem {
    pub(crate) fn summary(&self) -> String {
        let reviewed = &self.reviewed;
        let verdict = &reviewed.verdict;
        let mut out = String::new();
        if let Some(denial) = &verdict.denial {
            out.push_str(&format!(
                "{}: DENIED: {}\n",
                self.label,
                without_label(&self.label, denial)
            ));
        } else if let Some(because) = reviewed.unchanged_because {
            out.push_str(&format!("{}: unchanged: {because}\n", self.label));
        } else if verdict.changes.is_empty() {
            out.push_str(&format!("{}: unchanged: nothing to clean\n", self.label));
        } else {
            let count = verdict.changes.len();
            out.push_str(&format!(
                "{}: {count} change{}\n",
                self.label,
                if count == 1 { "" } else { "s" }
            ));
            for change in &verdict.changes {
                out.push_str(&format!("  {}\n", change.describe()));
            }
        }
        for note in &verdict.notes {
            out.push_str(&format!("  warning: {note}\n"));
        }
        out
    }
}

/// What `review` prints on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    /// The AdmissionReview response, with the patch as base64 (as the API server gets it).
    Response,
    /// The objects as they would be created, as JSON (a List for several); denied ones are left out.
    Json,
    /// The same as YAML.
    Yaml,
    /// The decoded JSON Patch of each object.
    Patch,
    /// The summary only, on stdout.
    Summary,
}

fn read_input(input: &std::path::Path) -> Result<(Vec<u8>, String), String> {
    if input.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|err| format!("cannot read stdin: {err}"))?;
        Ok((bytes, "stdin".into()))
    } else {
        std::fs::read(input)
            .map(|bytes| (bytes, input.display().to_string()))
            .map_err(|err| format!("cannot read {}: {err}", input.display()))
    }
}

/// What `review` was given.
pub(crate) struct ReviewInput {
    pub(crate) items: Vec<offline::Item>,
    /// For a backup tarball, the groups it holds (a restore creates them
    /// before the VMs), as (namespace, name).
    pub(crate) backup_groups: Vec<(String, String)>,
    pub(crate) from_backup: bool,
}

/// `SRC:DST,...`, as `velero restore create --namespace-mappings` takes it.
pub(crate) fn parse_namespace_mappings(
    text: Option<&str>,
) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in text
        .unwrap_or_default()
        .split(',')
        .filter(|pair| !pair.is_empty())
    {
        match pair.split_once(':') {
            Some((source, target)) if !source.is_empty() && !target.is_empty() => {
                out.insert(source.to_string(), target.to_string());
            }
            _ => return Err(format!("--namespace-mappings {pair:?} must be SRC:DST")),
        }
    }
    Ok(out)
}

/// Moves `object` to its namespace's target under `mapping`, as a restore
/// with `--namespace-mappings` creates it.
pub(crate) fn map_namespace(object: &mut Value, mapping: &BTreeMap<String, String>) {
    if let Some(namespace) = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        && let Some(target) = mapping.get(namespace)
    {
        object["metadata"]["namespace"] = Value::String(target.clone());
    }
}

fn review_items(
    bytes: &[u8],
    source: &str,
    namespace_mapping: &BTreeMap<String, String>,
) -> Result<ReviewInput, String> {
    if offline::is_gzip(bytes) {
        let mut objects = offline::backup_objects(bytes).map_err(|err| err.to_string())?;
        for (_, object) in &mut objects {
            map_namespace(object, namespace_mapping);
        }
        return backup_input(objects, source);
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| format!("{source} is neither text nor a gzip tarball"))?;
    let mut documents = offline::parse_documents(text).map_err(|err| err.to_string())?;
    for document in &mut documents {
        map_namespace(document, namespace_mapping);
    }
    let items = offline::items(documents, source).map_err(|err| err.to_string())?;
    Ok(ReviewInput {
        items,
        backup_groups: Vec::new(),
        from_backup: false,
    })
}

/// The objects of a backup tarball as a restore creates them: groups first.
pub(crate) fn backup_input(
    objects: Vec<(String, Value)>,
    source: &str,
) -> Result<ReviewInput, String> {
    {
        let groups = objects
            .iter()
            .filter(|(_, object)| object["kind"] == "VirtualMachineGroup")
            .filter_map(|(_, object)| {
                Some((
                    object.pointer("/metadata/namespace")?.as_str()?.to_string(),
                    object.pointer("/metadata/name")?.as_str()?.to_string(),
                ))
            })
            .collect();
        let mut items = Vec::new();
        for (path, object) in objects {
            items.extend(
                offline::items(vec![object], &format!("{source}:{path}"))
                    .map_err(|err| err.to_string())?,
            );
        }
        // A backup is restored groups first, so that VMs see whether their
        // group's power is held.
        items.sort_by_key(|item| {
            item.review
                .pointer("/request/kind/kind")
                .and_then(Value::as_str)
                != Some("VirtualMachineGroup")
        });
        Ok(ReviewInput {
            items,
            backup_groups: groups,
            from_backup: true,
        })
    }
}

/// Counts per namespace and kind for a backup: (objects, changed, denied).
pub(crate) fn backup_summary(items: &[ReviewedItem]) -> String {
    let mut by_namespace: std::collections::BTreeMap<
        &str,
        std::collections::BTreeMap<&str, (usize, usize, usize)>,
    > = Default::default();
    for item in items {
        let counts = by_namespace
            .entry(item.namespace.as_str())
            .or_default()
            .entry(item.kind.as_str())
            .or_default();
        counts.0 += 1;
        if item.reviewed.verdict.denial.is_some() {
            counts.2 += 1;
        } else if !item.reviewed.verdict.changes.is_empty() {
            counts.1 += 1;
        }
    }
    let mut out = format!(
        "What a restore of this backup would change ({} objects in {} namespace{}):\n",
        items.len(),
        by_namespace.len(),
        if by_namespace.len() == 1 { "" } else { "s" }
    );
    for (namespace, kinds) in &by_namespace {
        let parts: Vec<String> = kinds
            .iter()
            .map(|(kind, (total, changed, denied))| {
                format!("{kind}: {total} ({changed} changed, {denied} denied)")
            })
            .collect();
        out.push_str(&format!("  namespace {namespace}: {}\n", parts.join(", ")));
    }
    let denied: Vec<&ReviewedItem> = items
        .iter()
        .filter(|item| item.reviewed.verdict.denial.is_some())
        .collect();
    if !denied.is_empty() {
        out.push_str("Denied (would not be restored):\n");
        for item in denied {
            out.push_str(&format!(
                "  {}: {}\n",
                item.label,
                without_label(
                    &item.label,
                    item.reviewed.verdict.denial.as_deref().unwrap_or("")
                )
            ));
        }
    }
    out.push_str(&fixes_summary(items));
    out
}

/// A denial as a summary prints it after the object's label: without the
/// label the message itself starts with (the API server's message needs it,
/// the summary line has it already).
fn without_label<'a>(label: &str, denial: &'a str) -> &'a str {
    denial
        .strip_prefix(label)
        .and_then(|rest| rest.strip_prefix(": "))
        .unwrap_or(denial)
}

/// The mapping entries that would admit the denied VMs, each once, by the
/// ConfigMap (and key) it goes in, with how many VMs it admits or helps.
pub(crate) fn fixes_summary(items: &[ReviewedItem]) -> String {
    let mut by_place: std::collections::BTreeMap<
        &str,
        std::collections::BTreeMap<String, std::collections::BTreeSet<&str>>,
    > = Default::default();
    for item in items {
        for fix in &item.reviewed.verdict.fixes {
            by_place
                .entry(fix.place.as_str())
                .or_default()
                .entry(fix.entry())
                .or_default()
                .insert(item.label.as_str());
        }
    }
    if by_place.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "Mapping entries that would admit them (the target's first choice; each denial lists the others), then restore again:\n",
    );
    for (place, entries) in by_place {
        out.push_str(&format!("  {place}:\n"));
        for (entry, vms) in entries {
            let count = vms.len();
            out.push_str(&format!(
                "    {entry}    ({count} VM{})\n",
                if count == 1 { "" } else { "s" }
            ));
        }
    }
    out
}

/// Reviews each item with `reviewer`, in order. For a backup, each group is
/// recorded as created (with its annotations) before the VMs after it are
/// reviewed, as a restore creates it.
pub(crate) async fn review_each(
    reviewer: &Reviewer,
    items: Vec<offline::Item>,
    static_groups: &StaticGroups,
    from_backup: bool,
) -> Result<Vec<ReviewedItem>, String> {
    let mut reviewed_items = Vec::new();
    for item in items {
        let body = match serde_json::to_vec(&item.review) {
            Ok(body) => body,
            Err(err) => return Err(err.to_string()),
        };
        let reviewed = match reviewer
            .review(&body, Deadline::after(Duration::from_secs(10)))
            .await
        {
            Ok(reviewed) => reviewed,
            Err(err) => return Err(format!("{}: {err}", item.source)),
        };
        let Some(response) = reviewed.review.response.as_ref() else {
            return Err(format!("{}: no response", item.source));
        };
        let patch: Option<json_patch::Patch> = match &response.patch {
            Some(bytes) => match serde_json::from_slice(bytes) {
                Ok(patch) => Some(patch),
                Err(err) => {
                    return Err(format!(
                        "{}: the patch is not a JSON Patch: {err}",
                        item.source
                    ));
                }
            },
            None => None,
        };
        // The patch never touches the restore label, so it applies to the
        // object as given (without the label `review` adds to a bare object).
        let patched = if response.allowed && !item.original.is_null() {
            let mut object = item.original.clone();
            if let Some(patch) = &patch
                && let Err(err) = json_patch::patch(&mut object, patch)
            {
                return Err(format!("{}: the patch does not apply: {err}", item.source));
            }
            Some(object)
        } else {
            None
        };
        // A backup's group as it would be created: its VMs read its annotations.
        if from_backup
            && let Some(group) = &patched
            && group["kind"] == "VirtualMachineGroup"
            && let (Some(namespace), Some(name)) = (
                group.pointer("/metadata/namespace").and_then(Value::as_str),
                group.pointer("/metadata/name").and_then(Value::as_str),
            )
        {
            let annotations = group
                .pointer("/metadata/annotations")
                .and_then(Value::as_object)
                .map(|map| {
                    map.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            static_groups.insert_annotated(namespace, name, annotations);
        }
        reviewed_items.push(ReviewedItem {
            label: reviewed
                .object_label
                .clone()
                .unwrap_or_else(|| request_label(&item.review)),
            kind: item
                .review
                .pointer("/request/kind/kind")
                .and_then(Value::as_str)
                .unwrap_or("object")
                .to_string(),
            namespace: item
                .review
                .pointer("/request/namespace")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            response: review_for_people(&reviewed.review),
            patch: patch.map(|patch| serde_json::to_value(patch).unwrap_or(Value::Null)),
            patched,
            reviewed,
        });
    }

    Ok(reviewed_items)
}

pub async fn run(args: ReviewArgs) -> ExitCode {
    let fail = |message: String| {
        eprintln!("velero-vm-restore-webhook review: {message}");
        ExitCode::from(2)
    };
    let output = if args.patched {
        Output::Json
    } else {
        args.output
    };
    let (bytes, source) = match read_input(&args.input) {
        Ok(read) => read,
        Err(err) => return fail(err),
    };
    let namespace_mapping = match parse_namespace_mappings(args.namespace_mappings.as_deref()) {
        Ok(mapping) => mapping,
        Err(err) => return fail(err),
    };
    let ReviewInput {
        items,
        backup_groups,
        from_backup,
    } = match review_items(&bytes, &source, &namespace_mapping) {
        Ok(found) => found,
        Err(err) => return fail(err),
    };
    let mut settings = match review_settings(&args.rules) {
        Ok(settings) => settings,
        Err(err) => return fail(err),
    };
    // Offline there is nobody to create a group meanwhile: never wait.
    settings.group_wait_timeout = Duration::ZERO;
    let mut groups = match parse_groups(&args.groups) {
        Ok(groups) => groups,
        Err(err) => return fail(err),
    };
    groups.extend(
        backup_groups
            .iter()
            .map(|(namespace, name)| (namespace.as_str(), name.as_str())),
    );
    let restore = RestoreInfo {
        name: "review".into(),
        namespace_mapping,
        annotations: if args.new_identity {
            [(NEW_IDENTITY_ANNOTATION.to_string(), "true".to_string())].into()
        } else {
            Default::default()
        },
        ..Default::default()
    };
    let exists = match parse_exists(&args.exists) {
        Ok(exists) => exists,
        Err(err) => return fail(err),
    };
    let static_groups = StaticGroups::new(groups);
    let reviewer = Reviewer::new(
        static_groups.clone(),
        StaticRestores::found(restore),
        settings,
        None,
    )
    .with_refs(StaticRefs::new(exists));
    let reviewer = if args.mappings.is_empty() {
        reviewer
    } else {
        match mapping_files(&args.mappings) {
            Ok(given) => reviewer.with_mappings(given),
            Err(err) => return fail(err),
        }
    };

    let reviewed_items = match review_each(&reviewer, items, &static_groups, from_backup).await {
        Ok(reviewed) => reviewed,
        Err(err) => return fail(err),
    };

    let mut summary: String = reviewed_items.iter().map(ReviewedItem::summary).collect();
    if from_backup {
        summary.push_str(&backup_summary(&reviewed_items));
    } else {
        summary.push_str(&fixes_summary(&reviewed_items));
    }
    let single = reviewed_items.len() == 1;
    // One object prints as itself; anything else (several, or none, as for a
    // DELETE) as a List that kubectl reads back.
    let many = |values: Vec<Value>| -> Value {
        if single && values.len() == 1 {
            values.into_iter().next().unwrap_or(Value::Null)
        } else {
            json!({"apiVersion": "v1", "kind": "List", "items": values})
        }
    };
    let printed = match output {
        Output::Summary => {
            print!("{summary}");
            None
        }
        Output::Response => Some(many(
            reviewed_items
                .iter()
                .map(|item| item.response.clone())
                .collect(),
        )),
        Output::Patch => Some(if single {
            reviewed_items[0].patch.clone().unwrap_or(json!([]))
        } else {
            Value::Array(
                reviewed_items
                    .iter()
                    .map(|item| json!({"object": item.label, "patch": item.patch.clone().unwrap_or(json!([]))}))
                    .collect(),
            )
        }),
        Output::Json | Output::Yaml => Some(many(
            reviewed_items
                .iter()
                .filter_map(|item| item.patched.clone())
                .collect(),
        )),
    };
    if output != Output::Summary {
        eprint!("{summary}");
    }
    if let Some(value) = printed {
        let text = if output == Output::Yaml {
            serde_yaml_ng::to_string(&value).map_err(|err| err.to_string())
        } else {
            serde_json::to_string_pretty(&value)
                .map(|text| text + "\n")
                .map_err(|err| err.to_string())
        };
        match text {
            Ok(text) => print!("{text}"),
            Err(err) => return fail(err),
        }
    }
    let denied = reviewed_items
        .iter()
        .any(|item| item.reviewed.verdict.denial.is_some());
    if denied && args.fail_on_deny {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
