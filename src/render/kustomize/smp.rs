//! Strategic merge patches, as kustomize applies them: maps merge, `null` deletes, lists of
//! built-in types merge by their patch merge key (containers by `name`, volume mounts by
//! `mountPath`, ...), other lists are replaced, and the `$patch`, `$retainKeys` and
//! `$deleteFromPrimitiveList` directives work as in `kubectl patch`.

use serde_json::{Map, Value};

/// What a patch asks of the object it applies to.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Patched,
    /// `$patch: delete` at the top: the object goes.
    Delete,
}

/// Applies `patch` to `target`.
pub fn apply(target: &mut Map<String, Value>, patch: &Map<String, Value>) -> Outcome {
    match directive(patch) {
        Some("delete") => return Outcome::Delete,
        Some("replace") => {
            *target = strip(patch);
            return Outcome::Patched;
        }
        _ => {}
    }
    merge_map(target, patch, "");
    for (k, v) in target.iter_mut() {
        normalize(v, k, "");
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

fn merge_map(target: &mut Map<String, Value>, patch: &Map<String, Value>, parent: &str) {
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
                _ => merge_map(t, p, key),
            },
            (Some(Value::Array(t)), Value::Array(p)) => merge_list(t, p, key, parent),
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
fn merge_key(field: &str, parent: &str) -> Option<&'static str> {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates"
        | "webhooks" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "volumeDevices" => Some("devicePath"),
        "hostAliases" => Some("ip"),
        "topologySpreadConstraints" => Some("topologyKey"),
        "ownerReferences" => Some("uid"),
        "conditions" => Some("type"),
        // Container ports merge by containerPort, Service ports by port.
        "ports" if parent == "spec" => Some("port"),
        "ports" => Some("containerPort"),
        _ => None,
    }
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
            if let Some(key) = merge_key(field, parent) {
                dedupe(items, key);
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

/// One element per key, at the place of its first occurrence, with the value of its last.
fn dedupe(items: &mut Vec<Value>, key: &str) {
    let mut out: Vec<Value> = Vec::with_capacity(items.len());
    for item in items.drain(..) {
        let id = item.as_object().and_then(|m| m.get(key)).cloned();
        let existing = id.as_ref().and_then(|id| {
            out.iter()
                .position(|o| o.as_object().and_then(|m| m.get(key)) == Some(id))
        });
        match existing {
            Some(i) => out[i] = item,
            None => out.push(item),
        }
    }
    *items = out;
}

fn merge_list(target: &mut Vec<Value>, patch: &[Value], field: &str, parent: &str) {
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
    let Some(key) = merge_key(field, parent) else {
        *target = patch.iter().map(strip_value).collect();
        return;
    };
    dedupe(target, key);
    // kustomize's order: the patch's elements in the patch's order (merged with their
    // counterparts), then the target's elements the patch does not name.
    let mut rest: Vec<Option<Value>> = std::mem::take(target).into_iter().map(Some).collect();
    let key_of = |v: &Value| v.as_object().and_then(|m| m.get(key)).cloned();
    let mut merged = Vec::new();
    for item in patch {
        let Some(p) = item.as_object() else {
            merged.push(item.clone());
            continue;
        };
        let Some(id) = p.get(key) else {
            merged.push(strip_value(item));
            continue;
        };
        let found = rest
            .iter_mut()
            .find(|slot| slot.as_ref().and_then(key_of).as_ref() == Some(id))
            .and_then(Option::take);
        match (found, directive(p)) {
            (_, Some("delete")) => {}
            (Some(_), Some("replace")) | (None, _) => merged.push(Value::Object(strip(p))),
            (Some(mut t), _) => {
                if let Value::Object(m) = &mut t {
                    merge_map(m, p, field);
                }
                merged.push(t);
            }
        }
    }
    merged.extend(rest.into_iter().flatten());
    *target = merged;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patched(target: Value, patch: Value) -> Value {
        let mut t = target.as_object().cloned().unwrap();
        apply(&mut t, patch.as_object().unwrap());
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
