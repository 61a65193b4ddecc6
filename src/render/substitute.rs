//! Per-node substitution after rendering, following Flux's `postBuild.substitute`: `${VAR}`,
//! `${VAR:-default}` and `${VAR:=default}` in the rendered objects become the node's values
//! (`NODE_NAME`, `NODE_LABEL_<key>`, variables from the config); `$${VAR}` stays a literal
//! `${VAR}`. One pass: a substituted value is never scanned again. An object labelled or
//! annotated `kustomize.toolkit.fluxcd.io/substitute: disabled` is left alone, as in Flux.
//!
//! Unlike Flux, which substitutes in the YAML text, this works on string values, so a value can
//! never change an object's structure; a field that is only a reference (`replicas: ${N}`)
//! takes the type YAML gives the result, as it would in Flux.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{Object, RenderError};

/// How substitution treats a variable that is not set and has no default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// It becomes empty, as in Flux by default.
    Lenient,
    /// It is an error naming the object and the variable (Flux's strict mode).
    Strict,
}

const DISABLE_KEY: &str = "kustomize.toolkit.fluxcd.io/substitute";

pub(crate) use crate::config::options::valid_name;

/// Substitutes in every object that does not opt out.
pub(crate) fn substitute(
    objects: &mut [Object],
    vars: &BTreeMap<String, String>,
    mode: Mode,
) -> Result<(), RenderError> {
    for object in objects.iter_mut() {
        if disabled(object) {
            continue;
        }
        let mut result = Ok(());
        for (key, value) in object.value.iter_mut() {
            if key == "apiVersion" || key == "kind" {
                continue;
            }
            walk(value, vars, mode, &mut result);
        }
        result.map_err(|source| RenderError::Substitution {
            object: object.display_name(),
            origin: object.origin.clone(),
            source,
        })?;
    }
    Ok(())
}

fn disabled(object: &Object) -> bool {
    ["labels", "annotations"].iter().any(|field| {
        object
            .value
            .get("metadata")
            .and_then(|m| m.get(field))
            .and_then(|m| m.get(DISABLE_KEY))
            .and_then(Value::as_str)
            == Some("disabled")
    })
}

fn walk(
    value: &mut Value,
    vars: &BTreeMap<String, String>,
    mode: Mode,
    result: &mut Result<(), UnsetVariable>,
) {
    match value {
        Value::String(s) if s.contains('$') => match expand(s, vars, mode) {
            Ok(Some(new)) => *value = typed(new),
            Ok(None) => {}
            Err(e) => {
                if result.is_ok() {
                    *result = Err(e);
                }
            }
        },
        Value::Object(m) => {
            for child in m.values_mut() {
                walk(child, vars, mode, result);
            }
        }
        Value::Array(items) => {
            for child in items {
                walk(child, vars, mode, result);
            }
        }
        _ => {}
    }
}

/// A whole value that YAML reads as a number, boolean or null takes that type, as it would
/// after Flux's substitution in the YAML text.
fn typed(text: String) -> Value {
    if text.is_empty() || text.contains(['\n', ':', '#', '{', '[', '"', '\'']) {
        return Value::String(text);
    }
    match super::parse_documents(&text, std::path::Path::new("substitution")) {
        Ok(docs) => match docs.as_slice() {
            [v @ (Value::Number(_) | Value::Bool(_))] => v.clone(),
            [Value::Null] if text == "null" || text == "~" => Value::Null,
            _ => Value::String(text),
        },
        Err(_) => Value::String(text),
    }
}

/// Expands the references in `s`; `None` when there were none.
/// A `${VAR}` in strict mode with no value and no default.
#[derive(Debug, thiserror::Error)]
#[error("variable {0} is not set and has no default")]
pub struct UnsetVariable(String);

fn expand(
    s: &str,
    vars: &BTreeMap<String, String>,
    mode: Mode,
) -> Result<Option<String>, UnsetVariable> {
    let mut out = String::with_capacity(s.len());
    let mut changed = false;
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(escaped) = after.strip_prefix("$${") {
            // `$${VAR}` is the literal `${VAR}`.
            out.push_str("${");
            rest = escaped;
            changed = true;
            continue;
        }
        let Some(body_start) = after.strip_prefix("${") else {
            out.push('$');
            rest = &after[1..];
            continue;
        };
        let Some(end) = body_start.find('}') else {
            out.push_str(after);
            rest = "";
            break;
        };
        let body = &body_start[..end];
        rest = &body_start[end + 1..];
        let (name, default) = match body.find(":-").or_else(|| body.find(":=")) {
            Some(p) => (&body[..p], Some(&body[p + 2..])),
            None => (body, None),
        };
        if !valid_name(name) {
            // Not a variable reference (`${1}`, `${a.b}`): kept as written.
            out.push_str("${");
            out.push_str(body);
            out.push('}');
            continue;
        }
        changed = true;
        match (vars.get(name), default) {
            (Some(v), _) => out.push_str(v),
            (None, Some(d)) => out.push_str(d),
            (None, None) if mode == Mode::Strict => return Err(UnsetVariable(name.to_string())),
            (None, None) => {}
        }
    }
    out.push_str(rest);
    Ok(changed.then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::options::node_variables;
    use serde_json::json;

    fn vars() -> BTreeMap<String, String> {
        let mut labels = BTreeMap::new();
        labels.insert(
            "topology.kubernetes.io/zone".to_string(),
            "hall-2".to_string(),
        );
        let mut v = node_variables("edge-01", &labels);
        v.insert("REPLICAS".into(), "3".into());
        v.insert("TRICKY".into(), "${NODE_NAME}".into());
        v
    }

    fn object(value: Value) -> Object {
        Object {
            value: value.as_object().cloned().unwrap(),
            origin: "app/x.yaml#0".into(),
        }
    }

    #[test]
    fn references_defaults_escapes_and_types() {
        let mut objects = vec![object(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web-${NODE_NAME}", "labels": {"zone": "${NODE_LABEL_topology_kubernetes_io_zone}"}},
            "spec": {"replicas": "${REPLICAS}", "paused": "${PAUSED:-false}",
                     "note": "$${NODE_NAME} and ${MISSING:=fallback} and $5 and ${a.b}",
                     "twice": "${TRICKY}"}
        }))];
        substitute(&mut objects, &vars(), Mode::Strict).unwrap();
        let v = &objects[0].value;
        assert_eq!(v["metadata"]["name"], "web-edge-01");
        assert_eq!(v["metadata"]["labels"]["zone"], "hall-2");
        assert_eq!(v["spec"]["replicas"], json!(3));
        assert_eq!(v["spec"]["paused"], json!(false));
        assert_eq!(
            v["spec"]["note"],
            "${NODE_NAME} and fallback and $5 and ${a.b}"
        );
        // A value is substituted once, never scanned again.
        assert_eq!(v["spec"]["twice"], "${NODE_NAME}");
    }

    #[test]
    fn strict_mode_names_the_variable_and_opt_out_is_respected() {
        let mut objects = vec![object(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c"}, "data": {"a": "${NOPE}"}}))];
        let err = substitute(&mut objects, &vars(), Mode::Strict)
            .unwrap_err()
            .to_string();
        assert!(err.contains("NOPE") && err.contains("ConfigMap c"), "{err}");
        substitute(&mut objects, &vars(), Mode::Lenient).unwrap();
        assert_eq!(objects[0].value["data"]["a"], "");

        let mut skipped = vec![object(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "annotations": {DISABLE_KEY: "disabled"}},
            "data": {"a": "${NOPE}"}}))];
        substitute(&mut skipped, &vars(), Mode::Strict).unwrap();
        assert_eq!(skipped[0].value["data"]["a"], "${NOPE}");
    }

    #[test]
    fn a_value_cannot_change_the_structure() {
        let mut v = vars();
        v.insert("EVIL".into(), "x\nkind: Secret".into());
        let mut objects = vec![object(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c"}, "data": {"a": "${EVIL}"}}))];
        substitute(&mut objects, &v, Mode::Strict).unwrap();
        assert_eq!(objects[0].value["kind"], "ConfigMap");
        assert_eq!(objects[0].value["data"]["a"], "x\nkind: Secret");
    }
}
