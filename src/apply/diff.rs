//! Comparing what Git wants with what the cluster has. The wanted side is always the API
//! server's own answer to a server-side dry-run apply, so defaults and normalisation (`500m`
//! against `0.5`) never count as differences. Pure: JSON in, answers out.
//!
//! Argo CD's `ignoreDifferences` is honoured both ways: ignored fields are left out of the
//! comparison, and before an apply they take the live value (Argo CD's
//! `RespectIgnoreDifferences`), so edgesync neither reports nor overwrites them.

use serde_json::{Map, Value};

use crate::config::sync_policy::IgnoreDifference;
use crate::render::Object;

/// Metadata the API server maintains, which never counts as drift.
const VOLATILE_METADATA: [&str; 6] = [
    "managedFields",
    "resourceVersion",
    "generation",
    "uid",
    "creationTimestamp",
    "selfLink",
];

/// `object` without status and server-maintained metadata, and without `ignored` pointers.
pub(crate) fn normalize(object: &Value, ignored: &[String]) -> Value {
    let mut v = object.clone();
    if let Value::Object(map) = &mut v {
        map.remove("status");
        if let Some(Value::Object(meta)) = map.get_mut("metadata") {
            for key in VOLATILE_METADATA {
                meta.remove(key);
            }
            if meta
                .get("annotations")
                .is_some_and(|a| a.as_object().is_some_and(Map::is_empty))
            {
                meta.remove("annotations");
            }
        }
    }
    for pointer in ignored {
        remove_pointer(&mut v, pointer);
    }
    v
}

/// The JSON pointers ignored for `object` (from `rules`), and the fields `live` says the
/// listed field managers own.
pub(crate) fn ignored_pointers(
    rules: &[IgnoreDifference],
    object: &Object,
    namespace: Option<&str>,
    live: Option<&Value>,
) -> Vec<String> {
    let mut out = Vec::new();
    for rule in rules {
        if !rule.matches(object.group(), object.kind(), namespace, object.name()) {
            continue;
        }
        out.extend(rule.json_pointers.iter().cloned());
        if let Some(live) = live {
            out.extend(managed_by(live, &rule.managed_fields_managers));
        }
    }
    out
}

/// Pointers to the leaf fields that `managers` own in `live`'s managedFields. Only plain
/// field paths (`f:`) are followed; list items keyed by value are left out.
pub(crate) fn managed_by(live: &Value, managers: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let Some(entries) = live
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return out;
    };
    for entry in entries {
        let manager = entry.get("manager").and_then(Value::as_str).unwrap_or("");
        if !managers.iter().any(|m| m == manager) {
            continue;
        }
        if let Some(fields) = entry.get("fieldsV1") {
            walk_fields(fields, String::new(), &mut out);
        }
    }
    out.sort();
    out.dedup();
    out
}

fn walk_fields(fields: &Value, prefix: String, out: &mut Vec<String>) {
    let Some(map) = fields.as_object() else {
        return;
    };
    let children: Vec<(&String, &Value)> =
        map.iter().filter(|(k, _)| k.starts_with("f:")).collect();
    if children.is_empty() {
        if !prefix.is_empty()
            && !map
                .keys()
                .any(|k| k.starts_with("k:") || k.starts_with("v:") || k.starts_with("i:"))
        {
            out.push(prefix);
        }
        return;
    }
    for (key, child) in children {
        let name = key[2..].replace('~', "~0").replace('/', "~1");
        walk_fields(child, format!("{prefix}/{name}"), out);
    }
}

/// Sets every `ignored` field of `desired` to its value in `live`, or removes it when `live`
/// has none, so that applying `desired` leaves those fields as they are.
pub(crate) fn respect_ignored(desired: &mut Value, live: Option<&Value>, ignored: &[String]) {
    for pointer in ignored {
        match live.and_then(|l| l.pointer(pointer)) {
            Some(value) => set_pointer(desired, pointer, value.clone()),
            None => remove_pointer(desired, pointer),
        }
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn remove_pointer(v: &mut Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return;
    };
    let target = if parent.is_empty() {
        Some(v)
    } else {
        v.pointer_mut(parent)
    };
    match target {
        Some(Value::Object(map)) => {
            map.remove(&unescape(last));
        }
        Some(Value::Array(items)) => {
            if let Ok(i) = last.parse::<usize>() {
                if i < items.len() {
                    items.remove(i);
                }
            }
        }
        _ => {}
    }
}

fn set_pointer(v: &mut Value, pointer: &str, value: Value) {
    let mut current = v;
    let tokens: Vec<String> = pointer.split('/').skip(1).map(unescape).collect();
    for (i, token) in tokens.iter().enumerate() {
        let last = i + 1 == tokens.len();
        current = match current {
            Value::Object(map) => {
                if last {
                    map.insert(token.clone(), value);
                    return;
                }
                map.entry(token.clone())
                    .or_insert_with(|| Value::Object(Map::new()))
            }
            Value::Array(items) => match token.parse::<usize>() {
                Ok(i) if i < items.len() => {
                    if last {
                        items[i] = value;
                        return;
                    }
                    &mut items[i]
                }
                _ => return,
            },
            _ => return,
        };
    }
}

/// The first path at which `a` and `b` differ, `None` when they are equal.
pub(crate) fn first_difference(a: &Value, b: &Value) -> Option<String> {
    fn walk(a: &Value, b: &Value, path: &mut String) -> bool {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let len = path.len();
                    path.push('/');
                    path.push_str(k);
                    let differs = match (x.get(k), y.get(k)) {
                        (Some(p), Some(q)) => walk(p, q, path),
                        _ => true,
                    };
                    if differs {
                        return true;
                    }
                    path.truncate(len);
                }
                false
            }
            (Value::Array(x), Value::Array(y)) => {
                if x.len() != y.len() {
                    return true;
                }
                for (i, (p, q)) in x.iter().zip(y).enumerate() {
                    let len = path.len();
                    path.push_str(&format!("/{i}"));
                    if walk(p, q, path) {
                        return true;
                    }
                    path.truncate(len);
                }
                false
            }
            _ => a != b,
        }
    }
    let mut path = String::new();
    walk(a, b, &mut path).then(|| if path.is_empty() { "/".into() } else { path })
}

/// A unified diff of two objects as YAML, `None` when they are equal. `label` names them in
/// the header, like `kubectl diff` does.
pub(crate) fn unified_yaml_diff(
    label: &str,
    live: Option<&Value>,
    wanted: Option<&Value>,
) -> Option<String> {
    let yaml = |v: Option<&Value>| -> String {
        v.map(|v| serde_saphyr::to_string(v).unwrap_or_else(|e| format!("# cannot print: {e}\n")))
            .unwrap_or_default()
    };
    let (live, wanted) = mask_secret_values(live, wanted);
    let (old, new) = (yaml(live.as_ref()), yaml(wanted.as_ref()));
    if old == new {
        return None;
    }
    Some(
        similar::TextDiff::from_lines(&old, &new)
            .unified_diff()
            .context_radius(3)
            .header(&format!("live/{label}"), &format!("git/{label}"))
            .to_string(),
    )
}

/// Secret values never reach the diff, as with `kubectl diff`: each key of `data` and
/// `stringData` shows as `***`, or `*** (before)` / `*** (after)` where the value changed, and a
/// `last-applied-configuration` annotation (which holds them too) is masked alike.
fn mask_secret_values(
    live: Option<&Value>,
    wanted: Option<&Value>,
) -> (Option<Value>, Option<Value>) {
    let is_secret =
        |v: Option<&Value>| v.is_some_and(|v| v.get("kind") == Some(&Value::from("Secret")));
    let (mut live, mut wanted) = (live.cloned(), wanted.cloned());
    if !is_secret(live.as_ref()) && !is_secret(wanted.as_ref()) {
        return (live, wanted);
    }
    const LAST_APPLIED: &str =
        "/metadata/annotations/kubectl.kubernetes.io~1last-applied-configuration";
    for pointer in ["/data", "/stringData"] {
        let before = live.as_ref().and_then(|v| v.pointer(pointer)).cloned();
        let after = wanted.as_ref().and_then(|v| v.pointer(pointer)).cloned();
        let mask =
            |side: &mut Option<Value>, own: &Option<Value>, other: &Option<Value>, tag: &str| {
                let Some(Value::Object(values)) =
                    side.as_mut().and_then(|v| v.pointer_mut(pointer))
                else {
                    return;
                };
                for (key, value) in values.iter_mut() {
                    let same = own.as_ref().and_then(|o| o.get(key))
                        == other.as_ref().and_then(|o| o.get(key));
                    *value = Value::from(if same {
                        "***".to_string()
                    } else {
                        format!("*** ({tag})")
                    });
                }
            };
        mask(&mut live, &before, &after, "before");
        mask(&mut wanted, &after, &before, "after");
    }
    for side in [&mut live, &mut wanted] {
        if let Some(annotation) = side.as_mut().and_then(|v| v.pointer_mut(LAST_APPLIED)) {
            *annotation = Value::from("***");
        }
    }
    (live, wanted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secret_values_are_masked_in_diffs() {
        let secret = |password: &str, token: &str| {
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s",
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": format!("{{\"data\":{{\"password\":\"{password}\"}}}}")}},
                "data": {"password": password, "token": token}})
        };
        let live = secret("b2xkLXNlY3JldA==", "c2FtZQ==");
        let wanted = secret("bmV3LXNlY3JldA==", "c2FtZQ==");
        let diff = unified_yaml_diff("v1/Secret/ns/s", Some(&live), Some(&wanted)).unwrap();
        for value in ["b2xkLXNlY3JldA==", "bmV3LXNlY3JldA==", "c2FtZQ=="] {
            assert!(!diff.contains(value), "{diff}");
        }
        assert!(
            diff.contains("*** (before)") && diff.contains("*** (after)"),
            "{diff}"
        );
        // Equal secrets stay equal.
        assert!(unified_yaml_diff("x", Some(&live), Some(&live)).is_none());
        // A ConfigMap is shown as it is.
        let cm = json!({"kind": "ConfigMap", "data": {"a": "visible"}});
        let diff = unified_yaml_diff("x", None, Some(&cm)).unwrap();
        assert!(diff.contains("visible"), "{diff}");
    }

    #[test]
    fn normalized_objects_ignore_status_and_server_metadata() {
        let live = json!({"kind": "ConfigMap", "metadata": {"name": "c", "resourceVersion": "9", "uid": "u",
            "managedFields": [], "annotations": {}}, "data": {"a": "1"}, "status": {"x": 1}});
        let wanted = json!({"kind": "ConfigMap", "metadata": {"name": "c", "resourceVersion": "10"}, "data": {"a": "1"}});
        assert_eq!(
            first_difference(&normalize(&live, &[]), &normalize(&wanted, &[])),
            None
        );
        let edited = json!({"kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "2"}});
        assert_eq!(
            first_difference(&normalize(&edited, &[]), &normalize(&wanted, &[])).as_deref(),
            Some("/data/a")
        );
        let ignored = ["/data/a".to_string()];
        assert_eq!(
            first_difference(&normalize(&edited, &ignored), &normalize(&wanted, &ignored)),
            None
        );
    }

    #[test]
    fn ignored_fields_take_the_live_value_before_an_apply() {
        let live = json!({"spec": {"replicas": 7, "template": {}}});
        let mut desired = json!({"spec": {"replicas": 2}, "metadata": {"labels": {"a": "b"}}});
        respect_ignored(
            &mut desired,
            Some(&live),
            &[
                "/spec/replicas".to_string(),
                "/metadata/labels/a".to_string(),
            ],
        );
        assert_eq!(
            desired,
            json!({"spec": {"replicas": 7}, "metadata": {"labels": {}}})
        );
    }

    #[test]
    fn fields_of_other_managers_are_found_in_managed_fields() {
        let live = json!({"metadata": {"managedFields": [
            {"manager": "edgesync", "fieldsV1": {"f:spec": {"f:template": {}}}},
            {"manager": "kube-controller-manager", "fieldsV1": {"f:spec": {"f:replicas": {}},
                "f:metadata": {"f:annotations": {"f:a/b": {}}}}},
        ]}});
        assert_eq!(
            managed_by(&live, &["kube-controller-manager".to_string()]),
            ["/metadata/annotations/a~1b", "/spec/replicas"]
        );
    }

    #[test]
    fn yaml_diffs_name_both_sides() {
        let d = unified_yaml_diff(
            "v1/ConfigMap/ns/c",
            Some(&json!({"data": {"a": "1"}})),
            Some(&json!({"data": {"a": "2"}})),
        )
        .unwrap();
        assert!(
            d.contains("--- live/v1/ConfigMap/ns/c") && d.contains("+++ git/v1/ConfigMap/ns/c"),
            "{d}"
        );
        assert!(d.contains("-  a: '1'") || d.contains("-  a: \"1\""), "{d}");
        assert_eq!(
            unified_yaml_diff("x", Some(&json!({"a": 1})), Some(&json!({"a": 1}))),
            None
        );
    }
}
