//! Typed reads from untyped JSON, each failing with the field's path so that
//! a malformed object gets a clear error instead of a partial patch.

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("{field} must be {expected}, but is {found}")]
    WrongType {
        field: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error(
        "annotation {annotation} must hold VM Operator's conversion copy as a JSON object: {detail}"
    )]
    BadConversionCopy {
        annotation: &'static str,
        detail: String,
    },
}

pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong(field: &str, expected: &'static str, found: &Value) -> ShapeError {
    ShapeError::WrongType {
        field: field.to_string(),
        expected,
        found: type_name(found),
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// The object itself must be a JSON object.
pub fn root(value: &Value) -> Result<&Map<String, Value>, ShapeError> {
    value
        .as_object()
        .ok_or_else(|| wrong("the object", "an object", value))
}

/// `parent[key]` as a map; absent or null is `None`.
pub fn map<'a>(
    parent: &'a Map<String, Value>,
    parent_field: &str,
    key: &str,
) -> Result<Option<&'a Map<String, Value>>, ShapeError> {
    match parent.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(other) => Err(wrong(&join(parent_field, key), "an object", other)),
    }
}

/// `parent[key]` as a string; absent or null is `None`.
pub fn string<'a>(
    parent: &'a Map<String, Value>,
    parent_field: &str,
    key: &str,
) -> Result<Option<&'a str>, ShapeError> {
    match parent.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(other) => Err(wrong(&join(parent_field, key), "a string", other)),
    }
}

/// `parent[key]` as an array; absent or null is `None`.
pub fn array<'a>(
    parent: &'a Map<String, Value>,
    parent_field: &str,
    key: &str,
) -> Result<Option<&'a Vec<Value>>, ShapeError> {
    match parent.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(other) => Err(wrong(&join(parent_field, key), "an array", other)),
    }
}

/// `metadata.labels` or `metadata.annotations`: a map of strings.
pub fn string_map<'a>(
    metadata: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a Map<String, Value>>, ShapeError> {
    let field = join("metadata", key);
    let Some(entries) = map(metadata, "metadata", key)? else {
        return Ok(None);
    };
    for (name, value) in entries {
        if !value.is_string() {
            return Err(wrong(&format!("{field}[{name}]"), "a string", value));
        }
    }
    Ok(Some(entries))
}

/// Present and not the empty string.
pub fn is_set(value: Option<&str>) -> bool {
    value.is_some_and(|text| !text.is_empty())
}

/// The object's `metadata`, `labels` and `annotations`, all type-checked.
pub struct Meta<'a> {
    pub labels: Option<&'a Map<String, Value>>,
    pub annotations: Option<&'a Map<String, Value>>,
}

pub fn meta(object: &Map<String, Value>) -> Result<Meta<'_>, ShapeError> {
    let Some(metadata) = map(object, "", "metadata")? else {
        return Ok(Meta {
            labels: None,
            annotations: None,
        });
    };
    Ok(Meta {
        labels: string_map(metadata, "labels")?,
        annotations: string_map(metadata, "annotations")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wrong_types_name_the_field() {
        let object = json!({"metadata": {"annotations": {"a": 1}}});
        let err = meta(root(&object).unwrap()).err().unwrap();
        assert_eq!(
            err.to_string(),
            "metadata.annotations[a] must be a string, but is a number"
        );
        let object = json!({"metadata": {"labels": []}});
        let err = meta(root(&object).unwrap()).err().unwrap();
        assert_eq!(
            err.to_string(),
            "metadata.labels must be an object, but is an array"
        );
    }

    #[test]
    fn null_is_absent() {
        let object = json!({"metadata": {"labels": null}, "spec": null});
        let map_root = root(&object).unwrap();
        assert!(meta(map_root).unwrap().labels.is_none());
        assert!(map(map_root, "", "spec").unwrap().is_none());
    }
}
