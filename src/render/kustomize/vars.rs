//! The legacy `vars`: `$(NAME)` in container commands, args and env values, annotations and
//! Ingress hosts becomes a field of another object (by default its final name). Resolved once,
//! at the top, after names are final; an undefined `$(NAME)` stays as written, as in kustomize.

use super::error::KustomizeError;
use serde::Deserialize;
use serde_json::Value;

use super::fieldspec::visit;
use super::resource::ResMap;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Var {
    name: String,
    objref: ObjRef,
    fieldref: Option<FieldRef>,
}

/// kustomize's `Target`: `apiVersion`, or `group` and `version`, then kind and name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ObjRef {
    kind: String,
    name: String,
    api_version: Option<String>,
    #[serde(default)]
    group: String,
    #[serde(default)]
    version: String,
    namespace: Option<String>,
}

impl ObjRef {
    /// The group and version the object must have, exactly (kustomize compares ids with
    /// their group and version: a var without them only matches objects without them).
    fn group_version(&self) -> (&str, &str) {
        match self.api_version.as_deref() {
            Some(av) => match av.split_once('/') {
                Some((group, version)) => (group, version),
                None => ("", av),
            },
            None => (self.group.as_str(), self.version.as_str()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldRef {
    fieldpath: String,
}

const CONTAINER_FIELDS: [&str; 8] = [
    "containers/args",
    "containers/command",
    "containers/env/value",
    "containers/volumeMounts/mountPath",
    "initContainers/args",
    "initContainers/command",
    "initContainers/env/value",
    "initContainers/volumeMounts/mountPath",
];

/// Where `$(NAME)` is expanded, by kind: kustomize's `varReference` field specs.
fn reference_paths(kind: &str) -> Vec<String> {
    let mut paths = vec![
        "metadata/labels".to_string(),
        "metadata/annotations".to_string(),
    ];
    let pod_spec = match kind {
        "Pod" => Some("spec"),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some("spec/template/spec"),
        "CronJob" => Some("spec/jobTemplate/spec/template/spec"),
        _ => None,
    };
    if let Some(spec) = pod_spec {
        for f in CONTAINER_FIELDS {
            paths.push(format!("{spec}/{f}"));
        }
        if kind == "StatefulSet" {
            paths.push("spec/volumeClaimTemplates/spec/nfs/server".into());
        } else {
            paths.push(format!("{spec}/volumes/nfs/server"));
        }
        if let Some(template) = spec.strip_suffix("/spec") {
            paths.push(format!("{template}/metadata/annotations"));
        }
    }
    match kind {
        "Ingress" => {
            paths.push("spec/rules/host".into());
            paths.push("spec/tls/hosts".into());
            paths.push("spec/tls/secretName".into());
        }
        "Service" => {
            paths.push("spec/ports/port".into());
            paths.push("spec/ports/targetPort".into());
        }
        "PersistentVolume" => paths.push("spec/nfs/server".into()),
        _ => {}
    }
    paths
}

/// Adds the vars of one kustomization; a name defined twice differently is an error.
pub(crate) fn collect(all: &mut Vec<Var>, new: &[Var]) -> Result<(), KustomizeError> {
    for v in new {
        match all.iter().find(|a| a.name == v.name) {
            Some(existing) if existing == v => {}
            Some(_) => {
                return Err(KustomizeError::VarDefinedTwice {
                    name: v.name.clone(),
                })
            }
            None => all.push(v.clone()),
        }
    }
    Ok(())
}

/// Expands the vars everywhere kustomize does.
pub(crate) fn resolve(resmap: &mut ResMap, vars: &[Var]) -> Result<(), KustomizeError> {
    if vars.is_empty() {
        return Ok(());
    }
    let mut values = Vec::new();
    for v in vars {
        let found: Vec<_> = resmap
            .iter()
            .filter(|r| {
                r.kind() == v.objref.kind
                    && (r.group(), r.version()) == v.objref.group_version()
                    && r.all_names().any(|(_, n)| n == v.objref.name)
                    && v.objref
                        .namespace
                        .as_deref()
                        .is_none_or(|ns| r.all_names().any(|(n_ns, _)| n_ns == ns))
            })
            .collect();
        let r = match found.as_slice() {
            [one] => *one,
            [] => {
                return Err(KustomizeError::VarUnmatched {
                    name: v.name.clone(),
                    kind: v.objref.kind.clone(),
                    target: v.objref.name.clone(),
                })
            }
            _ => {
                return Err(KustomizeError::VarAmbiguous {
                    name: v.name.clone(),
                })
            }
        };
        let path = v
            .fieldref
            .as_ref()
            .map_or("metadata.name", |f| f.fieldpath.as_str());
        let value = field(&Value::Object(r.obj.clone()), path).ok_or_else(|| {
            KustomizeError::VarFieldMissing {
                name: v.name.clone(),
                path: path.to_string(),
                id: r.id(),
            }
        })?;
        values.push((format!("$({})", v.name), value));
    }
    let configured = resmap.config.var_reference.clone();
    for r in resmap.iter_mut() {
        let (group, version, kind) = (
            r.group().to_string(),
            r.version().to_string(),
            r.kind().to_string(),
        );
        let mut paths = reference_paths(&kind);
        for f in configured
            .iter()
            .filter(|f| f.applies(&group, &version, &kind))
        {
            let path = f.path();
            if !paths.contains(&path) {
                paths.push(path);
            }
        }
        for path in paths {
            // Annotations are strings; elsewhere a field that is only `$(NAME)` takes the
            // value as it is (a number stays a number), as kustomize does.
            let typed = !path.ends_with("annotations");
            visit(&mut r.obj, &path, false, &mut |v| expand(v, &values, typed));
        }
    }
    Ok(())
}

fn expand(v: &mut Value, values: &[(String, Value)], typed: bool) {
    match v {
        Value::String(s) => {
            if typed {
                if let Some((_, value)) = values.iter().find(|(p, _)| p == s) {
                    *v = value.clone();
                    return;
                }
            }
            for (pattern, value) in values {
                if s.contains(pattern.as_str()) {
                    *s = s.replace(pattern.as_str(), &text(value));
                }
            }
        }
        Value::Object(m) => {
            for child in m.values_mut() {
                expand(child, values, typed);
            }
        }
        Value::Array(items) => {
            for child in items {
                expand(child, values, typed);
            }
        }
        _ => {}
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Reads `a.b[0].c`: a string, number or boolean.
fn field(v: &Value, path: &str) -> Option<Value> {
    let mut cur = v;
    for part in path.split('.') {
        let (key, indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            cur = cur.get(key)?;
        }
        for index in indexes.split('[').filter(|s| !s.is_empty()) {
            cur = cur.get(index.trim_end_matches(']').parse::<usize>().ok()?)?;
        }
    }
    match cur {
        Value::String(_) | Value::Number(_) | Value::Bool(_) => Some(cur.clone()),
        _ => None,
    }
}
