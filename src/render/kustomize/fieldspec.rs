//! Field specs: which field of which kinds a transformer touches, as kustomize's built-in
//! configuration lists them (`spec/template/metadata/labels` of Deployments, ...).

use serde_json::{Map, Value};

/// A field in objects of one kind (any kind when `kind` is empty), optionally limited to a group.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FieldSpec {
    pub(crate) group: Option<&'static str>,
    pub(crate) kind: &'static str,
    pub(crate) path: &'static str,
    /// Create the field (as an empty mapping) when it is missing.
    pub(crate) create: bool,
}

pub(crate) const fn fs(kind: &'static str, path: &'static str, create: bool) -> FieldSpec {
    FieldSpec {
        group: None,
        kind,
        path,
        create,
    }
}

pub(crate) const fn fsg(
    group: &'static str,
    kind: &'static str,
    path: &'static str,
    create: bool,
) -> FieldSpec {
    FieldSpec {
        group: Some(group),
        kind,
        path,
        create,
    }
}

impl FieldSpec {
    pub(crate) fn applies(&self, group: &str, kind: &str) -> bool {
        (self.kind.is_empty() || self.kind == kind) && self.group.is_none_or(|g| g == group)
    }
}

/// Calls `f` on every value at `path` below `obj`, walking into each element of the lists met on
/// the way. With `create`, missing mappings along the path (and the last field) are created.
pub(crate) fn visit(
    obj: &mut Map<String, Value>,
    path: &str,
    create: bool,
    f: &mut dyn FnMut(&mut Value),
) {
    let segments: Vec<&str> = path.split('/').collect();
    visit_map(obj, &segments, create, f);
}

fn visit_map(
    map: &mut Map<String, Value>,
    segments: &[&str],
    create: bool,
    f: &mut dyn FnMut(&mut Value),
) {
    let Some((first, rest)) = segments.split_first() else {
        return;
    };
    if !map.contains_key(*first) {
        if !create {
            return;
        }
        map.insert(first.to_string(), Value::Object(Map::new()));
    }
    let Some(value) = map.get_mut(*first) else {
        return;
    };
    if value.is_null() && create {
        *value = Value::Object(Map::new());
    }
    visit_value(value, rest, create, f);
}

fn visit_value(value: &mut Value, segments: &[&str], create: bool, f: &mut dyn FnMut(&mut Value)) {
    match value {
        Value::Array(items) => {
            for item in items {
                visit_value(item, segments, create, f);
            }
        }
        _ if segments.is_empty() => f(value),
        Value::Object(map) => visit_map(map, segments, create, f),
        _ => {}
    }
}
