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
    let segments = split_path(path);
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    visit_map(obj, &segments, create, f);
}

/// A field spec path's steps: split at `/`, where `\/` is a slash inside a key (annotation
/// names such as `nginx.ingress.kubernetes.io\/auth-secret`).
fn split_path(path: &str) -> Vec<String> {
    let mut steps = vec![String::new()];
    let mut chars = path.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'/') => {
                chars.next();
                if let Some(s) = steps.last_mut() {
                    s.push('/');
                }
            }
            '/' => steps.push(String::new()),
            other => {
                if let Some(s) = steps.last_mut() {
                    s.push(other);
                }
            }
        }
    }
    steps
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

/// A field spec from a kustomization's `configurations` (or a `labels` entry's `fields`):
/// a path, in objects of a kind (any when unset), group and version, created when missing
/// with `create`.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CustomSpec {
    pub(crate) group: Option<String>,
    pub(crate) version: Option<String>,
    pub(crate) kind: Option<String>,
    pub(crate) path: String,
    #[serde(default)]
    pub(crate) create: bool,
}

impl CustomSpec {
    pub(crate) fn applies(&self, group: &str, version: &str, kind: &str) -> bool {
        self.kind.as_deref().is_none_or(|k| k == kind)
            && self.group.as_deref().is_none_or(|g| g == group)
            && self.version.as_deref().is_none_or(|v| v == version)
    }

    /// The path as [`visit`] reads it: kustomize writes list steps as `containers[]`.
    pub(crate) fn path(&self) -> String {
        self.path.replace("[]", "")
    }
}

/// One `nameReference` entry: fields of other objects that name an object of this kind.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct NameReference {
    pub(crate) kind: String,
    pub(crate) group: Option<String>,
    pub(crate) version: Option<String>,
    #[serde(default)]
    pub(crate) field_specs: Vec<CustomSpec>,
}

/// A kustomization's `configurations` files: field specs added to kustomize's built-in ones.
/// They reach the kustomization's own transformers and every kustomization that includes it.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct TransformerConfig {
    #[serde(default)]
    pub(crate) common_labels: Vec<CustomSpec>,
    #[serde(default)]
    pub(crate) common_annotations: Vec<CustomSpec>,
    #[serde(default)]
    pub(crate) images: Vec<CustomSpec>,
    #[serde(default)]
    pub(crate) var_reference: Vec<CustomSpec>,
    #[serde(default)]
    pub(crate) name_reference: Vec<NameReference>,
    // Field specs kustomize has and this engine refuses by name.
    #[serde(default)]
    pub(crate) name_prefix: Vec<CustomSpec>,
    #[serde(default)]
    pub(crate) name_suffix: Vec<CustomSpec>,
    #[serde(default)]
    pub(crate) namespace: Vec<CustomSpec>,
    #[serde(default)]
    pub(crate) template_labels: Vec<CustomSpec>,
    #[serde(default)]
    pub(crate) replicas: Vec<CustomSpec>,
}

impl TransformerConfig {
    /// Adds `other`'s field specs to these (each once).
    pub(crate) fn merge(&mut self, other: &TransformerConfig) {
        fn add<T: Clone + PartialEq>(to: &mut Vec<T>, from: &[T]) {
            for item in from {
                if !to.contains(item) {
                    to.push(item.clone());
                }
            }
        }
        add(&mut self.common_labels, &other.common_labels);
        add(&mut self.common_annotations, &other.common_annotations);
        add(&mut self.images, &other.images);
        add(&mut self.var_reference, &other.var_reference);
        add(&mut self.name_reference, &other.name_reference);
        add(&mut self.name_prefix, &other.name_prefix);
        add(&mut self.name_suffix, &other.name_suffix);
        add(&mut self.namespace, &other.namespace);
        add(&mut self.template_labels, &other.template_labels);
        add(&mut self.replicas, &other.replicas);
    }

    /// The first kind of field spec this engine does not apply, if any is set.
    pub(crate) fn unsupported(&self) -> Option<&'static str> {
        [
            (!self.name_prefix.is_empty(), "namePrefix"),
            (!self.name_suffix.is_empty(), "nameSuffix"),
            (!self.namespace.is_empty(), "namespace"),
            (!self.template_labels.is_empty(), "templateLabels"),
            (!self.replicas.is_empty(), "replicas"),
        ]
        .into_iter()
        .find(|(set, _)| *set)
        .map(|(_, name)| name)
    }
}

/// The field specs a kustomization's `crds` file implies, as kustomize reads it: a map of Go
/// type names to OpenAPI definitions (`{"Schema": {...}}`). Each definition that looks like a
/// Kubernetes type (it has `kind`, `apiVersion` and `metadata`) is a kind (the type name's last
/// dotted part); its properties, followed through `$ref`s, may carry
/// `x-kubernetes-annotation` (annotations go there), `x-kubernetes-label-selector` (labels go
/// there), `x-kubernetes-identity` (a prefix goes there) and
/// `x-kubernetes-object-ref-api-version`/`-kind`/`-name-key` (a name reference).
pub(crate) fn from_crd_schema(doc: &Value) -> Result<TransformerConfig, String> {
    let types = doc
        .as_object()
        .ok_or("the file is not a mapping of type names to definitions")?;
    let mut config = TransformerConfig::default();
    let mut budget = MAX_CRD_FIELDS;
    for (name, definition) in types {
        let properties = definition
            .get("Schema")
            .and_then(|s| s.get("properties"))
            .and_then(Value::as_object);
        let Some(properties) = properties else {
            continue;
        };
        if !["kind", "apiVersion", "metadata"]
            .iter()
            .all(|p| properties.contains_key(*p))
        {
            continue;
        }
        let kind = name.rsplit('.').next().unwrap_or(name).to_string();
        crd_properties(
            types,
            &kind,
            name,
            &mut Vec::new(),
            &mut config,
            &mut budget,
        );
        if budget == 0 {
            return Err(format!(
                "the definitions expand to more than {MAX_CRD_FIELDS} fields (types that refer to each other over and over)"
            ));
        }
    }
    Ok(config)
}

/// Fields a `crds` file may expand to: types that refer to each other can describe
/// exponentially many paths.
const MAX_CRD_FIELDS: usize = 100_000;

/// Adds the field specs of `type_name`'s properties, at `path` below an object of `kind`.
fn crd_properties(
    types: &Map<String, Value>,
    kind: &str,
    type_name: &str,
    path: &mut Vec<String>,
    config: &mut TransformerConfig,
    budget: &mut usize,
) {
    // A type that refers to itself would recurse for ever.
    if path.len() > 32 || *budget == 0 {
        return;
    }
    let Some(properties) = types
        .get(type_name)
        .and_then(|t| t.get("Schema"))
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
    else {
        return;
    };
    for (name, property) in properties {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let at = |extra: Option<&str>| {
            let mut steps = path.clone();
            steps.push(name.clone());
            steps.extend(extra.map(str::to_string));
            CustomSpec {
                kind: Some(kind.to_string()),
                path: steps.join("/"),
                ..CustomSpec::default()
            }
        };
        let has = |key: &str| property.get(key).is_some();
        if has("x-kubernetes-annotation") {
            config.common_annotations.push(at(None));
        }
        if has("x-kubernetes-label-selector") {
            config.common_labels.push(at(None));
        }
        if has("x-kubernetes-identity") {
            config.name_prefix.push(at(None));
        }
        let text = |key: &str| property.get(key).and_then(Value::as_str);
        if let (Some(version), Some(target)) = (
            text("x-kubernetes-object-ref-api-version"),
            text("x-kubernetes-object-ref-kind"),
        ) {
            let key = text("x-kubernetes-object-ref-name-key").unwrap_or("name");
            config.name_reference.push(NameReference {
                kind: target.to_string(),
                group: None,
                version: Some(version.to_string()),
                field_specs: vec![at(Some(key))],
            });
        }
        if let Some(reference) = text("$ref") {
            path.push(name.clone());
            crd_properties(types, kind, reference, path, config, budget);
            path.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_schemas_that_refer_to_themselves_are_bounded() {
        // Ten properties, each the type itself: 10^32 paths if nothing stopped it.
        let props: Map<String, Value> = (0..10)
            .map(|i| (format!("p{i}"), serde_json::json!({"$ref": "x.v1.Loop"})))
            .chain(
                ["kind", "apiVersion", "metadata"].map(|k| (k.to_string(), serde_json::json!({}))),
            )
            .collect();
        let doc = serde_json::json!({"x.v1.Loop": {"Schema": {"properties": props}}});
        let err = from_crd_schema(&doc).unwrap_err();
        assert!(err.contains("more than"), "{err}");
    }

    #[test]
    fn crd_schema_fields_become_field_specs() {
        let doc = serde_json::json!({
            "x.v1.Widget": {"Schema": {"properties": {
                "kind": {}, "apiVersion": {}, "metadata": {},
                "spec": {"$ref": "x.v1.Spec"}}}},
            "x.v1.Spec": {"Schema": {"properties": {
                "secretRef": {"x-kubernetes-object-ref-api-version": "v1",
                              "x-kubernetes-object-ref-kind": "Secret"},
                "selector": {"x-kubernetes-label-selector": ""}}}}
        });
        let config = from_crd_schema(&doc).unwrap();
        assert_eq!(config.name_reference[0].kind, "Secret");
        assert_eq!(
            config.name_reference[0].field_specs[0].path,
            "spec/secretRef/name"
        );
        assert_eq!(config.common_labels[0].path, "spec/selector");
        assert_eq!(config.common_labels[0].kind.as_deref(), Some("Widget"));
    }
}
