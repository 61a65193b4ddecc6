//! Name references: when kustomize renames an object (prefix, suffix, hash, namespace), every
//! field that refers to it by name follows, as kustomize's name-reference table lists them:
//! ConfigMap and Secret refs in pod specs, ServiceAccounts in pods and RoleBinding subjects,
//! roleRefs, HPA scale targets, Services in Ingresses, PVCs, PriorityClasses, and so on.

use serde_json::{Map, Value};

use super::fieldspec::{visit, NameReference};
use super::resource::{is_cluster_scoped, Res, ResMap};

/// Where pod specs live, by kind.
const POD_SPECS: [(&str, &str); 9] = [
    ("Pod", "spec"),
    ("PodTemplate", "template/spec"),
    ("Deployment", "spec/template/spec"),
    ("ReplicaSet", "spec/template/spec"),
    ("DaemonSet", "spec/template/spec"),
    ("StatefulSet", "spec/template/spec"),
    ("Job", "spec/template/spec"),
    ("ReplicationController", "spec/template/spec"),
    ("CronJob", "spec/jobTemplate/spec/template/spec"),
];

/// Whether kustomize's table follows references to `target` in the pod spec of `referrer`:
/// ConfigMaps and Secrets not from ReplicationControllers, the others not from ReplicaSets or
/// PodTemplates.
fn follows_pod_spec(target: &str, referrer: &str) -> bool {
    match target {
        "ConfigMap" | "Secret" => referrer != "ReplicationController",
        _ => !matches!(referrer, "ReplicaSet" | "PodTemplate"),
    }
}

/// Ephemeral containers are not in kustomize's table.
const CONTAINER_LISTS: [&str; 2] = ["containers", "initContainers"];

/// Name fields inside a pod spec, by the kind they name.
fn pod_spec_fields(kind: &str) -> Vec<String> {
    let mut out = Vec::new();
    match kind {
        "ConfigMap" => {
            out.push("volumes/configMap/name".to_string());
            out.push("volumes/projected/sources/configMap/name".to_string());
            for c in CONTAINER_LISTS {
                out.push(format!("{c}/env/valueFrom/configMapKeyRef/name"));
                out.push(format!("{c}/envFrom/configMapRef/name"));
            }
        }
        "Secret" => {
            out.push("volumes/secret/secretName".to_string());
            out.push("volumes/projected/sources/secret/name".to_string());
            out.push("imagePullSecrets/name".to_string());
            for c in CONTAINER_LISTS {
                out.push(format!("{c}/env/valueFrom/secretKeyRef/name"));
                out.push(format!("{c}/envFrom/secretRef/name"));
            }
        }
        "ServiceAccount" => out.push("serviceAccountName".to_string()),
        "PersistentVolumeClaim" => out.push("volumes/persistentVolumeClaim/claimName".to_string()),
        "PriorityClass" => out.push("priorityClassName".to_string()),
        _ => {}
    }
    out
}

/// Other name fields, by the kind they name: (referrer kind, path).
fn other_fields(kind: &str) -> &'static [(&'static str, &'static str)] {
    match kind {
        "Secret" => &[
            ("ServiceAccount", "imagePullSecrets/name"),
            ("ServiceAccount", "secrets/name"),
            ("Ingress", "spec/tls/secretName"),
            // Of all the volume sources naming a Secret, kustomize follows only this one.
            ("PersistentVolume", "spec/azureFile/secretName"),
        ],
        "Service" => &[
            ("Ingress", "spec/rules/http/paths/backend/service/name"),
            ("Ingress", "spec/defaultBackend/service/name"),
            ("Ingress", "spec/rules/http/paths/backend/serviceName"),
            ("Ingress", "spec/backend/serviceName"),
            ("StatefulSet", "spec/serviceName"),
        ],
        "StorageClass" => &[
            ("PersistentVolumeClaim", "spec/storageClassName"),
            ("PersistentVolume", "spec/storageClassName"),
            (
                "StatefulSet",
                "spec/volumeClaimTemplates/spec/storageClassName",
            ),
        ],
        "PersistentVolume" => &[("PersistentVolumeClaim", "spec/volumeName")],
        "IngressClass" => &[("Ingress", "spec/ingressClassName")],
        _ => &[],
    }
}

const REFERENCED: [&str; 9] = [
    "ConfigMap",
    "Secret",
    "ServiceAccount",
    "PersistentVolumeClaim",
    "PriorityClass",
    "Service",
    "StorageClass",
    "PersistentVolume",
    "IngressClass",
];

/// A renamed object, as references see it.
struct Target {
    kind: String,
    namespace: String,
    name: String,
    names: Vec<(String, String)>,
    /// Prefixes and suffixes it got, to tell copies of one base apart.
    affixes: (Vec<String>, Vec<String>),
}

/// kustomize refuses a RoleBinding whose ServiceAccount subject names its namespace with
/// something that is not a string (`namespace:` left blank): it cannot tell which namespace
/// the references it follows live in.
pub(super) fn check_subject_namespaces(resmap: &ResMap) -> Result<(), String> {
    for r in resmap.iter() {
        if r.kind() != "RoleBinding" {
            continue;
        }
        let subjects = r.obj.get("subjects").and_then(Value::as_array);
        for s in subjects.into_iter().flatten() {
            let blank = s.get("kind").and_then(Value::as_str) == Some("ServiceAccount")
                && s.get("namespace").is_some_and(|ns| !ns.is_string());
            if blank {
                return Err(format!(
                    "Invalid Input: namespace is blank for resource RoleBinding {} (a ServiceAccount subject's namespace)",
                    r.name()
                ));
            }
        }
    }
    Ok(())
}

/// Points every reference at the current name of the object it named.
pub(crate) fn fix(resmap: &mut ResMap) {
    let targets: Vec<Target> = resmap
        .iter()
        .filter(|r| !r.history.is_empty())
        .map(|r| Target {
            kind: r.kind().to_string(),
            namespace: r.namespace().to_string(),
            name: r.name().to_string(),
            names: r
                .all_names()
                .map(|(ns, n)| (ns.to_string(), n.to_string()))
                .collect(),
            affixes: (r.prefixes.clone(), r.suffixes.clone()),
        })
        .collect();
    if targets.is_empty() {
        return;
    }
    let configured = resmap.config.name_reference.clone();
    for r in resmap.iter_mut() {
        fix_referrer(r, &targets);
        fix_configured(r, &targets, &configured);
    }
}

/// More of kustomize's name-reference table: (kind named, referrer group (empty: any),
/// referrer kind, path).
const MORE_REFERENCES: &[(&str, &str, &str, &str)] = &[
    ("ConfigMap", "", "Node", "spec/configSource/configMap"),
    ("ConfigMap", "", "Role", "rules/resourceNames"),
    ("ConfigMap", "", "ClusterRole", "rules/resourceNames"),
    (
        "ConfigMap",
        "",
        "Ingress",
        "metadata/annotations/nginx.ingress.kubernetes.io\\/fastcgi-params-configmap",
    ),
    ("Secret", "", "Role", "rules/resourceNames"),
    ("Secret", "", "ClusterRole", "rules/resourceNames"),
    (
        "Secret",
        "",
        "Ingress",
        "metadata/annotations/ingress.kubernetes.io\\/auth-secret",
    ),
    (
        "Secret",
        "",
        "Ingress",
        "metadata/annotations/nginx.ingress.kubernetes.io\\/auth-secret",
    ),
    (
        "Secret",
        "",
        "Ingress",
        "metadata/annotations/nginx.ingress.kubernetes.io\\/auth-tls-secret",
    ),
    ("Secret", "", "StorageClass", "parameters/secretName"),
    ("Secret", "", "StorageClass", "parameters/adminSecretName"),
    ("Secret", "", "StorageClass", "parameters/userSecretName"),
    ("Secret", "", "StorageClass", "parameters/secretRef"),
    (
        "Secret",
        "serving.knative.dev",
        "Service",
        "spec/template/spec/containers/env/valueFrom/secretKeyRef/name",
    ),
    ("PersistentVolume", "", "ClusterRole", "rules/resourceNames"),
    (
        "ValidatingAdmissionPolicy",
        "admissionregistration.k8s.io",
        "ValidatingAdmissionPolicyBinding",
        "spec/policyName",
    ),
];

/// The name references `configurations` adds, and the rest of kustomize's table: a field of
/// the referrer that holds the name of an object of the reference's kind (or a mapping with
/// that name under `name`).
fn fix_configured(r: &mut Res, targets: &[Target], configured: &[NameReference]) {
    let (group, version, kind) = (
        r.group().to_string(),
        r.version().to_string(),
        r.kind().to_string(),
    );
    let ns = r.namespace().to_string();
    let affixes = (r.prefixes.clone(), r.suffixes.clone());
    let follow_at = |obj: &mut Map<String, Value>, target_kind: &str, path: &str| {
        visit(obj, path, false, &mut |value| {
            let name = match value {
                Value::Object(map) => map.get_mut("name"),
                other => Some(other),
            };
            if let Some(Value::String(name)) = name {
                if let Some(t) = resolve(targets, target_kind, &ns, name, &affixes) {
                    *name = t.name.clone();
                }
            }
        });
    };
    for (target_kind, referrer_group, referrer_kind, path) in MORE_REFERENCES {
        if *referrer_kind == kind && (referrer_group.is_empty() || *referrer_group == group) {
            follow_at(&mut r.obj, target_kind, path);
        }
    }
    for reference in configured {
        for f in reference
            .field_specs
            .iter()
            .filter(|f| f.applies(&group, &version, &kind))
        {
            follow_at(&mut r.obj, &reference.kind, &f.path());
        }
    }
}

/// The new name for a reference to `kind` named `name` from namespace `ns`, if it was renamed.
/// When one base was included twice under different prefixes, the copy with the referrer's
/// own prefixes and suffixes wins.
fn resolve<'a>(
    targets: &'a [Target],
    kind: &str,
    ns: &str,
    name: &str,
    affixes: &(Vec<String>, Vec<String>),
) -> Option<&'a Target> {
    let mut candidates: Vec<&Target> = targets
        .iter()
        .filter(|t| t.kind == kind && t.names.iter().any(|(_, n)| n == name))
        .collect();
    if candidates.len() > 1 {
        let same: Vec<&Target> = candidates
            .iter()
            .copied()
            .filter(|t| &t.affixes == affixes)
            .collect();
        if !same.is_empty() {
            candidates = same;
        }
    }
    // A reference that already names an object by its current name stays.
    if candidates
        .iter()
        .any(|t| t.name == name && same_ns(&t.namespace, ns))
    {
        return None;
    }
    // More than one left (two bases with the same name, neither under the referrer's own
    // prefixes): kustomize cannot tell which, and leaves the reference as it is.
    let mut here = candidates
        .into_iter()
        .filter(|t| is_cluster_scoped(kind) || same_ns(&t.namespace, ns));
    match (here.next(), here.next()) {
        (Some(one), None) => Some(one),
        _ => None,
    }
}

fn fix_referrer(r: &mut Res, targets: &[Target]) {
    let kind = r.kind().to_string();
    let ns = r.namespace().to_string();
    let affixes = (r.prefixes.clone(), r.suffixes.clone());
    let rename = |value: &mut Value, target_kind: &str| {
        if let Value::String(name) = value {
            if let Some(t) = resolve(targets, target_kind, &ns, name, &affixes) {
                *name = t.name.clone();
            }
        }
    };
    for target_kind in REFERENCED {
        if let Some((_, prefix)) = POD_SPECS
            .iter()
            .find(|(k, _)| *k == kind && follows_pod_spec(target_kind, k))
        {
            for field in pod_spec_fields(target_kind) {
                let path = format!("{prefix}/{field}");
                visit(&mut r.obj, &path, false, &mut |v| rename(v, target_kind));
            }
        }
        for (referrer, path) in other_fields(target_kind) {
            if *referrer == kind {
                visit(&mut r.obj, path, false, &mut |v| rename(v, target_kind));
            }
        }
    }
    match kind.as_str() {
        "RoleBinding" | "ClusterRoleBinding" => {
            if let Some(Value::Object(role_ref)) = r.obj.get_mut("roleRef") {
                let k = role_ref.get("kind").and_then(Value::as_str).unwrap_or("");
                let k = k.to_string();
                let scope = if k == "Role" {
                    ns.clone()
                } else {
                    String::new()
                };
                if let Some(Value::String(name)) = role_ref.get_mut("name") {
                    if let Some(t) = resolve(targets, &k, &scope, name, &affixes) {
                        *name = t.name.clone();
                    }
                }
            }
            if let Some(Value::Array(subjects)) = r.obj.get_mut("subjects") {
                for s in subjects.iter_mut().filter_map(Value::as_object_mut) {
                    if s.get("kind").and_then(Value::as_str) != Some("ServiceAccount") {
                        continue;
                    }
                    let subject_ns = s
                        .get("namespace")
                        .and_then(Value::as_str)
                        .unwrap_or(&ns)
                        .to_string();
                    let Some(name) = s.get("name").and_then(Value::as_str) else {
                        continue;
                    };
                    let name = name.to_string();
                    follow(s, targets, "ServiceAccount", &name, Some(&subject_ns));
                }
            }
        }
        // Service references that carry their namespace: both follow the Service.
        "ValidatingWebhookConfiguration" | "MutatingWebhookConfiguration" | "APIService" => {
            let path = if kind == "APIService" {
                "spec/service"
            } else {
                "webhooks/clientConfig/service"
            };
            visit(&mut r.obj, path, false, &mut |service| {
                let Some(s) = service.as_object_mut() else {
                    return;
                };
                let Some(name) = s.get("name").and_then(Value::as_str).map(str::to_string) else {
                    return;
                };
                let ns = s
                    .get("namespace")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                follow(s, targets, "Service", &name, ns.as_deref());
            });
        }
        "HorizontalPodAutoscaler" => {
            if let Some(Value::Object(target)) = r
                .obj
                .get_mut("spec")
                .and_then(|s| s.get_mut("scaleTargetRef"))
            {
                let k = target
                    .get("kind")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                if let Some(Value::String(name)) = target.get_mut("name") {
                    if let Some(t) = resolve(targets, &k, &ns, name, &affixes) {
                        *name = t.name.clone();
                    }
                }
            }
        }
        _ => {}
    }
}

/// Points a `{name, namespace}` reference to a `kind` object at its current name and
/// namespace, if the build renamed or moved the object it names. Without a namespace the
/// reference matches any; `default` and no namespace are one.
fn follow(
    reference: &mut Map<String, Value>,
    targets: &[Target],
    kind: &str,
    name: &str,
    ns: Option<&str>,
) {
    let found = targets.iter().find(|t| {
        t.kind == kind
            && t.names
                .iter()
                .any(|(n_ns, n)| n == name && ns.is_none_or(|ns| same_ns(n_ns, ns)))
    });
    if let Some(t) = found {
        reference.insert("name".into(), Value::String(t.name.clone()));
        if reference.contains_key("namespace") || !t.namespace.is_empty() {
            reference.insert("namespace".into(), Value::String(t.namespace.clone()));
        }
    }
}

/// Namespaces as kustomize compares them: `default` and no namespace are one.
fn same_ns(a: &str, b: &str) -> bool {
    let norm = |n: &str| if n == "default" { "" } else { n }.to_string();
    norm(a) == norm(b)
}
