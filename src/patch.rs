//! The changes the rules decide on, and how they become one minimal JSON Patch.
//!
//! A [`Change`] names one exact location in the object. Rules only produce a
//! change for a location that exists, because the API server fails the whole
//! request on a `remove` of an absent path (and `failurePolicy` does not apply).

use std::borrow::Cow;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation};
use serde_json::Value;

/// What happens at a location.
#[derive(Debug, Clone, PartialEq)]
pub enum Edit {
    Remove,
    Replace(Value),
    Add(Value),
}

/// One change to a restored object.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// JSON Pointer tokens from the object's root, unescaped.
    pub tokens: Vec<String>,
    pub edit: Edit,
    /// Stable rule id, used as a metric label and in the rule table (docs/rules.md).
    pub rule: &'static str,
    /// Short reason a platform admin can act on; most are fixed text, a
    /// mapping names the entry it applied.
    pub reason: Cow<'static, str>,
    /// Set when the change is inside the hidden copy in the conversion annotation.
    pub in_conversion_copy: bool,
}

impl Change {
    fn new(
        tokens: Vec<String>,
        edit: Edit,
        rule: &'static str,
        reason: impl Into<Cow<'static, str>>,
    ) -> Self {
        Change {
            tokens,
            edit,
            rule,
            reason: reason.into(),
            in_conversion_copy: false,
        }
    }

    pub fn remove(
        tokens: Vec<String>,
        rule: &'static str,
        reason: impl Into<Cow<'static, str>>,
    ) -> Self {
        Change::new(tokens, Edit::Remove, rule, reason)
    }

    pub fn replace(
        tokens: Vec<String>,
        value: Value,
        rule: &'static str,
        reason: impl Into<Cow<'static, str>>,
    ) -> Self {
        Change::new(tokens, Edit::Replace(value), rule, reason)
    }

    pub fn add(
        tokens: Vec<String>,
        value: Value,
        rule: &'static str,
        reason: impl Into<Cow<'static, str>>,
    ) -> Self {
        Change::new(tokens, Edit::Add(value), rule, reason)
    }

    pub fn pointer(&self) -> PointerBuf {
        PointerBuf::from_tokens(self.tokens.iter().map(String::as_str))
    }

    /// A readable field path: `spec.network.interfaces[0].macAddr`,
    /// `metadata.annotations[vmoperator.vmware.com/backup-version]`.
    pub fn field(&self) -> String {
        let mut out = String::new();
        let mut in_map_keys = false;
        for (i, token) in self.tokens.iter().enumerate() {
            if in_map_keys {
                out.push('[');
                out.push_str(token);
                out.push(']');
                in_map_keys = false;
                continue;
            }
            if token.parse::<usize>().is_ok() && i > 0 {
                out.push('[');
                out.push_str(token);
                out.push(']');
            } else {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(token);
            }
            // Map keys with dots and slashes read better in brackets.
            in_map_keys = i == 1
                && self.tokens[0] == "metadata"
                && (token == "annotations" || token == "labels");
        }
        out
    }

    /// One line for logs and for the AdmissionResponse `warnings`.
    pub fn describe(&self) -> String {
        let copy = if self.in_conversion_copy {
            "in conversion copy: "
        } else {
            ""
        };
        match &self.edit {
            Edit::Remove => format!("{copy}removed {} ({})", self.field(), self.reason),
            // A long value (the conversion copy) would drown the line.
            Edit::Replace(Value::String(text)) if text.len() > 40 => {
                format!("{copy}rewrote {} ({})", self.field(), self.reason)
            }
            Edit::Replace(value) | Edit::Add(value) => {
                format!("{copy}set {} to {} ({})", self.field(), value, self.reason)
            }
        }
    }
}

/// Turns the changes into a JSON Patch: one op per change, in order. Changes
/// inside the conversion copy are reported only: the copy is patched as a
/// whole, by the `replace` of its annotation.
pub fn to_json_patch(changes: &[Change]) -> Patch {
    Patch(
        changes
            .iter()
            .filter(|change| !change.in_conversion_copy)
            .map(|change| match &change.edit {
                Edit::Remove => PatchOperation::Remove(RemoveOperation {
                    path: change.pointer(),
                }),
                Edit::Replace(value) => PatchOperation::Replace(ReplaceOperation {
                    path: change.pointer(),
                    value: value.clone(),
                }),
                Edit::Add(value) => PatchOperation::Add(AddOperation {
                    path: change.pointer(),
                    value: value.clone(),
                }),
            })
            .collect(),
    )
}

/// The most lines (log lines, `warnings` entries) one rule's changes get in
/// one review; past it, one line says how many more there were. A rule that
/// removes annotations by prefix meets as many as the object carries, and a
/// crafted object carries tens of thousands: the patch removes each, but the
/// lines stay few.
pub const LINES_PER_RULE: usize = 8;

/// One line of what a review changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Line<'a> {
    Change(&'a Change),
    /// The changes of `rule` past [`LINES_PER_RULE`], counted.
    More {
        rule: &'static str,
        count: usize,
    },
}

impl Line<'_> {
    pub fn text(&self) -> String {
        match self {
            Line::Change(change) => change.describe(),
            Line::More { rule, count } => {
                format!("and {count} more changes by rule {rule} (the patch holds every one)")
            }
        }
    }
}

/// One line per change, for logs and `warnings`, at most
/// [`LINES_PER_RULE`] per rule and then one that counts the rest.
pub fn described(changes: &[Change]) -> Vec<Line<'_>> {
    let mut lines = Vec::new();
    let mut per_rule: Vec<(&'static str, usize)> = Vec::new();
    for change in changes {
        let seen = match per_rule.iter_mut().find(|(rule, _)| *rule == change.rule) {
            Some((_, count)) => {
                *count += 1;
                *count
            }
            None => {
                per_rule.push((change.rule, 1));
                1
            }
        };
        if seen <= LINES_PER_RULE {
            lines.push(Line::Change(change));
        }
    }
    lines.extend(
        per_rule
            .into_iter()
            .filter(|(_, count)| *count > LINES_PER_RULE)
            .map(|(rule, count)| Line::More {
                rule,
                count: count - LINES_PER_RULE,
            }),
    );
    lines
}

/// Applies changes to a copy of `object`, the way the API server would.
pub fn apply(object: &Value, changes: &[Change]) -> Result<Value, json_patch::PatchError> {
    let mut patched = object.clone();
    json_patch::patch(&mut patched, &to_json_patch(changes))?;
    Ok(patched)
}

/// Warnings longer than this may be cut by clients; kubectl prints them whole.
pub const MAX_WARNING_CHARS: usize = 119;

/// Bounds a warning to [`MAX_WARNING_CHARS`] characters, cut at a word
/// boundary where there is one in the second half, with an ellipsis.
pub fn bounded_warning(text: &str) -> String {
    if text.chars().count() <= MAX_WARNING_CHARS {
        return text.to_string();
    }
    let kept: String = text.chars().take(MAX_WARNING_CHARS - 1).collect();
    let cut = match kept.rfind(' ') {
        Some(space) if space > kept.len() / 2 => kept[..space].trim_end_matches([',', ';', ':']),
        _ => kept.as_str(),
    };
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_rule_gets_a_bounded_number_of_lines_and_a_count_of_the_rest() {
        let mut changes: Vec<Change> = (0..10_000)
            .map(|i| {
                Change::remove(
                    vec![
                        "metadata".into(),
                        "annotations".into(),
                        format!("mgmt.proxy.vmware.com/{i}"),
                    ],
                    "vm-mgmt-proxy-annotations",
                    "why",
                )
            })
            .collect();
        changes.push(Change::remove(
            vec!["spec".into(), "instanceUUID".into()],
            "vm-instance-uuid",
            "identity",
        ));
        let lines: Vec<String> = described(&changes).iter().map(Line::text).collect();
        assert_eq!(lines.len(), LINES_PER_RULE + 2);
        assert!(lines.contains(&"removed spec.instanceUUID (identity)".to_string()));
        assert_eq!(
            lines.last().unwrap(),
            "and 9992 more changes by rule vm-mgmt-proxy-annotations (the patch holds every one)"
        );
        assert_eq!(
            to_json_patch(&changes).0.len(),
            10_001,
            "every change is in the patch"
        );
    }

    #[test]
    fn pointer_escapes_slash_and_tilde() {
        let change = Change::remove(
            vec!["metadata".into(), "annotations".into(), "a.b/c~d".into()],
            "r",
            "why",
        );
        assert_eq!(change.pointer().as_str(), "/metadata/annotations/a.b~1c~0d");
        assert_eq!(change.field(), "metadata.annotations[a.b/c~d]");
    }

    #[test]
    fn field_renders_array_indices() {
        let change = Change::remove(
            vec![
                "spec".into(),
                "network".into(),
                "interfaces".into(),
                "0".into(),
                "macAddr".into(),
            ],
            "r",
            "why",
        );
        assert_eq!(change.field(), "spec.network.interfaces[0].macAddr");
    }

    #[test]
    fn apply_removes_and_replaces() {
        let object = json!({"spec": {"a": 1, "b": "x"}});
        let changes = vec![
            Change::remove(vec!["spec".into(), "a".into()], "r", "why"),
            Change::replace(vec!["spec".into(), "b".into()], json!("y"), "r", "why"),
        ];
        assert_eq!(
            apply(&object, &changes).unwrap(),
            json!({"spec": {"b": "y"}})
        );
    }

    #[test]
    fn warnings_are_bounded() {
        let long = "x".repeat(300);
        let bounded = bounded_warning(&long);
        assert_eq!(bounded.chars().count(), MAX_WARNING_CHARS);
        assert!(bounded.ends_with('…'));
        assert_eq!(bounded_warning("short"), "short");
        // Words are not cut in half.
        let sentence = "removed metadata.annotations[velero-vm-restore-webhook/reviewed-for-restore] (keeps VM Operator's new defaults on reinvocation)";
        let bounded = bounded_warning(sentence);
        assert!(bounded.chars().count() <= MAX_WARNING_CHARS);
        assert!(
            bounded.ends_with("defaults on…")
                || bounded.ends_with("new…")
                || bounded.ends_with("defaults…"),
            "{bounded}"
        );
        let words_kept = bounded.trim_end_matches('…');
        assert!(sentence.starts_with(words_kept));
        assert_eq!(sentence.as_bytes().get(words_kept.len()), Some(&b' '));
    }
}
