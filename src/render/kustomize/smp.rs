//! Strategic merge patches, as kustomize applies them: maps merge, `null` deletes, lists of
//! built-in types merge by their patch merge key (containers by `name`, volume mounts by
//! `mountPath`, ...), other lists are replaced, and the `$patch`, `$retainKeys` and
//! `$deleteFromPrimitiveList` directives work as in `kubectl patch`.

use serde_json::{Map, Value};

/// What a patch asks of the object it applies to.
#[derive(Debug, PartialEq)]
pub(crate) enum Outcome {
    Patched,
    /// `$patch: delete` at the top: the object goes.
    Delete,
}

/// API groups of kustomize's built-in schema (Kubernetes' own types).
const BUILTIN_GROUPS: [&str; 24] = [
    "",
    "admissionregistration.k8s.io",
    "apiextensions.k8s.io",
    "apiregistration.k8s.io",
    "apps",
    "authentication.k8s.io",
    "authorization.k8s.io",
    "autoscaling",
    "batch",
    "certificates.k8s.io",
    "coordination.k8s.io",
    "discovery.k8s.io",
    "events.k8s.io",
    "extensions",
    "flowcontrol.apiserver.k8s.io",
    "internal.apiserver.k8s.io",
    "networking.k8s.io",
    "node.k8s.io",
    "policy",
    "rbac.authorization.k8s.io",
    "resource.k8s.io",
    "scheduling.k8s.io",
    "storage.k8s.io",
    "storagemigration.k8s.io",
];

/// An OpenAPI (v2) schema from a kustomization's `openapi: {path: ...}`. As in kustomize, it
/// replaces the built-in one: its definitions say which lists merge, by which key
/// (`x-kubernetes-patch-strategy: merge`, `x-kubernetes-patch-merge-key`); the lists of types
/// it does not define are replaced.
#[derive(Debug)]
pub(crate) struct Schema {
    definitions: Map<String, Value>,
}

impl Schema {
    pub(crate) fn new(doc: Value) -> Result<Schema, String> {
        match doc {
            Value::Object(mut m) => match m.remove("definitions") {
                Some(Value::Object(definitions)) => Ok(Schema { definitions }),
                _ => Err("the schema has no `definitions` mapping".into()),
            },
            _ => Err("the schema is not a mapping".into()),
        }
    }

    /// The definition of the objects of this group, version and kind.
    fn root(&self, group: &str, version: &str, kind: &str) -> Option<&Value> {
        self.definitions.values().find(|d| {
            d.get("x-kubernetes-group-version-kind")
                .and_then(Value::as_array)
                .is_some_and(|gvks| {
                    gvks.iter().any(|g| {
                        let field = |k: &str| g.get(k).and_then(Value::as_str).unwrap_or("");
                        field("group") == group
                            && field("version") == version
                            && field("kind") == kind
                    })
                })
        })
    }

    /// `node` with its `$ref`s followed (a bounded number of times: a schema may loop).
    fn resolve<'a>(&'a self, mut node: &'a Value) -> &'a Value {
        for _ in 0..32 {
            let Some(name) = node
                .get("$ref")
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix("#/definitions/"))
            else {
                break;
            };
            match self.definitions.get(name) {
                Some(next) => node = next,
                None => break,
            }
        }
        node
    }
}

/// How the lists under a value merge.
#[derive(Clone, Copy)]
enum Lists<'a> {
    /// Kubernetes' own types: the built-in merge keys.
    Builtin,
    /// No schema (custom resources): every list is replaced.
    Replace,
    /// A schema from `openapi`, at the node of the current value (`None`: not described).
    Schema(&'a Schema, Option<&'a Value>),
}

impl<'a> Lists<'a> {
    fn field(self, key: &str) -> Lists<'a> {
        match self {
            Lists::Schema(schema, node) => Lists::Schema(
                schema,
                node.and_then(|n| schema.resolve(n).get("properties")?.get(key))
                    .map(|n| schema.resolve(n)),
            ),
            other => other,
        }
    }

    fn items(self) -> Lists<'a> {
        match self {
            Lists::Schema(schema, node) => Lists::Schema(
                schema,
                node.and_then(|n| schema.resolve(n).get("items"))
                    .map(|n| schema.resolve(n)),
            ),
            other => other,
        }
    }

    /// The merge keys of the list at this node, `None` when it is replaced.
    fn keys(self, field: &str, parent: &str) -> Option<Vec<&'a str>> {
        match self {
            Lists::Builtin => merge_key(field, parent).map(<[&str]>::to_vec),
            Lists::Replace => None,
            Lists::Schema(schema, node) => {
                let node = schema.resolve(node?);
                let strategy = node.get("x-kubernetes-patch-strategy")?.as_str()?;
                if !strategy.split(',').any(|s| s.trim() == "merge") {
                    return None;
                }
                Some(vec![node.get("x-kubernetes-patch-merge-key")?.as_str()?])
            }
        }
    }
}

/// Applies `patch` to `target`. Lists merge by key only in Kubernetes' own types: without a
/// schema (custom resources), kustomize replaces every list. With `schema` (from `openapi`),
/// only what it describes merges.
pub(crate) fn apply(
    target: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    schema: Option<&Schema>,
) -> Outcome {
    match directive(patch) {
        Some("delete") => return Outcome::Delete,
        Some("replace") => {
            *target = strip(patch);
            return Outcome::Patched;
        }
        _ => {}
    }
    let api_version = target
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
    let kind = target
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let lists = match schema {
        Some(schema) => Lists::Schema(schema, schema.root(group, version, &kind)),
        None if BUILTIN_GROUPS.contains(&group) => Lists::Builtin,
        None => Lists::Replace,
    };
    merge_map(target, patch, "", lists);
    if matches!(lists, Lists::Builtin) {
        for (k, v) in target.iter_mut() {
            normalize(v, k, "");
        }
    }
    Outcome::Patched
}

fn directive(m: &Map<String, Value>) -> Option<&str> {
    m.get("$patch").and_then(Value::as_str)
}

fn is_directive(key: &str) -> bool {
    key.starts_with('$')
}

/// A patch value as it lands where nothing was before: directives removed, nulls dropped.
fn strip(m: &Map<String, Value>) -> Map<String, Value> {
    m.iter()
        .filter(|(k, v)| !is_directive(k) && !v.is_null())
        .map(|(k, v)| (k.clone(), strip_value(v)))
        .collect()
}

fn strip_value(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(strip(m)),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .filter(|i| i.as_object().is_none_or(|m| directive(m).is_none()))
                .map(strip_value)
                .collect(),
        ),
        other => other.clone(),
    }
}

fn merge_map(
    target: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    parent: &str,
    lists: Lists,
) {
    for (key, pv) in patch {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(remove)) = (target.get_mut(field), pv) {
                list.retain(|v| !remove.contains(v));
            }
            continue;
        }
        if is_directive(key) {
            continue;
        }
        if pv.is_null() {
            target.remove(key);
            continue;
        }
        match (target.get_mut(key), pv) {
            (Some(Value::Object(t)), Value::Object(p)) => match directive(p) {
                Some("replace") => {
                    *t = strip(p);
                }
                Some("delete") => {
                    target.remove(key);
                }
                _ => merge_map(t, p, key, lists.field(key)),
            },
            (Some(Value::Array(t)), Value::Array(p)) => {
                merge_list(t, p, key, parent, lists.field(key))
            }
            _ => {
                if let Value::Object(p) = pv {
                    if directive(p) == Some("delete") {
                        target.remove(key);
                        continue;
                    }
                }
                target.insert(key.clone(), strip_value(pv));
            }
        }
    }
    if let Some(Value::Array(keep)) = patch.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        target.retain(|k, _| keep.contains(&k.as_str()));
    }
}

/// The merge key of a list field, from the built-in types kustomize knows, or `None` when the
/// list is replaced as a whole (lists of custom resources included: without a schema,
/// kustomize replaces them).
fn merge_key(field: &str, parent: &str) -> Option<&'static [&'static str]> {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates"
        | "webhooks" => Some(&["name"]),
        "volumeMounts" => Some(&["mountPath"]),
        "volumeDevices" => Some(&["devicePath"]),
        "hostAliases" => Some(&["ip"]),
        "topologySpreadConstraints" => Some(&["topologyKey", "whenUnsatisfiable"]),
        "ownerReferences" => Some(&["uid"]),
        "conditions" => Some(&["type"]),
        // Ports are keyed with their protocol (a missing protocol is its own value):
        // Service ports by port, container ports by containerPort.
        "ports" if parent == "spec" => Some(&["port", "protocol"]),
        "ports" => Some(&["containerPort", "protocol"]),
        _ => None,
    }
}

/// An element's identity under `keys`; `None` when it lacks the first key.
fn identity(v: &Value, keys: &[&str]) -> Option<Vec<Option<Value>>> {
    let m = v.as_object()?;
    m.get(*keys.first()?)?;
    Some(keys.iter().map(|k| m.get(*k).cloned()).collect())
}

/// kustomize walks the whole object when it applies a strategic merge patch, and a keyed
/// list comes out with one element per key (the last one wins) even where the patch does not
/// touch it. Does the same for the parts of `target` the patch leaves alone.
fn normalize(value: &mut Value, field: &str, parent: &str) {
    match value {
        Value::Object(m) => {
            for (k, v) in m.iter_mut() {
                normalize(v, k, field);
            }
        }
        Value::Array(items) => {
            if let Some(keys) = merge_key(field, parent) {
                let composite = is_composite(keys, items.iter());
                dedupe(items, if composite { keys } else { &keys[..1] }, composite);
            }
            for item in items.iter_mut() {
                if let Value::Object(m) = item {
                    for (k, v) in m.iter_mut() {
                        normalize(v, k, field);
                    }
                }
            }
        }
        _ => {}
    }
}

/// One element per key, with the value of its last occurrence, at the place of its first
/// (single keys) or its last (composite keys), as kustomize leaves them.
fn dedupe(items: &mut Vec<Value>, keys: &[&str], at_last: bool) {
    let mut out: Vec<Value> = Vec::with_capacity(items.len());
    for item in items.drain(..) {
        let id = identity(&item, keys);
        let existing = id.as_ref().and_then(|id| {
            out.iter()
                .position(|o| identity(o, keys).as_ref() == Some(id))
        });
        match existing {
            Some(i) if at_last => {
                out.remove(i);
                out.push(item);
            }
            Some(i) => out[i] = item,
            None => out.push(item),
        }
    }
    *items = out;
}

fn merge_list(target: &mut Vec<Value>, patch: &[Value], field: &str, parent: &str, lists: Lists) {
    // `- $patch: replace` in the patch list: the list becomes the patch's other elements.
    if patch
        .iter()
        .any(|i| i.as_object().and_then(directive) == Some("replace"))
    {
        *target = strip_value(&Value::Array(patch.to_vec()))
            .as_array()
            .cloned()
            .unwrap_or_default();
        return;
    }
    if field == "finalizers" {
        for item in patch {
            if !target.contains(item) {
                target.push(item.clone());
            }
        }
        return;
    }
    let Some(keys) = lists.keys(field, parent) else {
        *target = patch.iter().map(strip_value).collect();
        return;
    };
    let keys: &[&str] = &keys;
    // kustomize keys ports by their protocol too, but only where some element names one.
    let composite = is_composite(keys, target.iter().chain(patch));
    let keys = if composite { keys } else { &keys[..1] };
    dedupe(target, keys, composite);
    let original: Vec<Value> = if composite {
        target.clone()
    } else {
        Vec::new()
    };
    let mut slots: Vec<Option<Value>> = std::mem::take(target).into_iter().map(Some).collect();
    // Patch elements, merged with their counterparts; `Some(i)` when the target had one at i.
    let mut from_patch: Vec<(Value, Option<usize>)> = Vec::new();
    for item in patch {
        let Some(p) = item.as_object() else {
            from_patch.push((item.clone(), None));
            continue;
        };
        let Some(id) = identity(item, keys) else {
            from_patch.push((strip_value(item), None));
            continue;
        };
        let pos = slots
            .iter()
            .position(|slot| slot.as_ref().and_then(|t| identity(t, keys)).as_ref() == Some(&id));
        // kustomize drops a patch element that has no counterpart but shares its first key
        // with a target element where one of the two names a protocol and the other does not.
        if pos.is_none() && composite && half_protocol_twin(&original, p, keys) {
            continue;
        }
        let found = pos.and_then(|i| slots[i].take());
        match (found, directive(p)) {
            (_, Some("delete")) => {}
            (Some(_), Some("replace")) | (None, _) => {
                from_patch.push((Value::Object(strip(p)), pos))
            }
            (Some(mut t), _) => {
                if let Value::Object(m) = &mut t {
                    merge_map(m, p, field, lists.items());
                }
                from_patch.push((t, pos));
            }
        }
    }
    // The order kustomize gives (found by running it): with a single key, the patch's elements
    // in the patch's order, then the target's others in theirs; with a composite key (ports
    // with protocols), the patch's new elements first, then the target's in their places.
    let mut out: Vec<Value> = Vec::new();
    if composite {
        let mut merged_at: Vec<Option<Value>> = vec![None; slots.len()];
        for (v, pos) in from_patch {
            match pos {
                Some(i) => merged_at[i] = Some(v),
                None => out.push(v),
            }
        }
        for (slot, merged) in slots.into_iter().zip(merged_at) {
            out.extend(merged.or(slot));
        }
    } else {
        out.extend(from_patch.into_iter().map(|(v, _)| v));
        out.extend(slots.into_iter().flatten());
    }
    *target = out;
}

/// Whether some element of `target` has the first key of `patch` and differs from it only in
/// having, or lacking, a key `patch` lacks, or has.
fn half_protocol_twin(target: &[Value], patch: &Map<String, Value>, keys: &[&str]) -> bool {
    let Some((first, rest)) = keys.split_first() else {
        return false;
    };
    target.iter().filter_map(Value::as_object).any(|t| {
        t.get(*first).is_some()
            && t.get(*first) == patch.get(*first)
            && rest
                .iter()
                .any(|k| t.get(*k).is_some() != patch.get(*k).is_some())
    })
}

/// Whether elements are keyed by all of `keys` (some element carries a key beyond the first).
fn is_composite<'a>(keys: &[&str], mut items: impl Iterator<Item = &'a Value>) -> bool {
    keys.len() > 1 && items.any(|v| keys[1..].iter().any(|k| v.get(*k).is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patched(target: Value, patch: Value) -> Value {
        let mut t = target.as_object().cloned().unwrap();
        apply(&mut t, patch.as_object().unwrap(), None);
        Value::Object(t)
    }

    #[test]
    fn keyed_lists_merge_patch_elements_first_and_null_deletes() {
        let out = patched(
            json!({"spec": {"containers": [{"name": "a", "image": "x", "env": [{"name": "A", "value": "1"}]},
                                            {"name": "b", "image": "y"}]}}),
            json!({"spec": {"containers": [{"name": "a", "image": null, "env": [{"name": "B", "value": "2"}]},
                                            {"name": "c", "image": "z"},
                                            {"name": "b", "$patch": "delete"}]}}),
        );
        assert_eq!(
            out,
            json!({"spec": {"containers": [
                {"name": "a", "env": [{"name": "B", "value": "2"}, {"name": "A", "value": "1"}]},
                {"name": "c", "image": "z"}]}})
        );
    }

    #[test]
    fn lists_without_a_key_are_replaced_and_replace_directive_works() {
        let out = patched(
            json!({"spec": {"args": ["a", "b"], "selector": {"x": "1", "y": "2"}}}),
            json!({"spec": {"args": ["c"], "selector": {"$patch": "replace", "z": "3"}}}),
        );
        assert_eq!(
            out,
            json!({"spec": {"args": ["c"], "selector": {"z": "3"}}})
        );
    }
}
