//! Apply stage: orders rendered objects into a [`Plan`], server-side applies it and records
//! what was applied as the app's [`Inventory`].
//!
//! Ordering and inventory bookkeeping are pure and live here; talking to the API server is
//! confined to [`kube`](self::kube).

pub mod kube;

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::render::{Manifests, Object};

pub use self::kube::{connect, KubeApplier};

/// Field manager for server-side apply, and the key of edgesync's tracking annotation.
pub const FIELD_MANAGER: &str = "edgesync";
pub const APP_ANNOTATION: &str = "edgesync.io/app";
/// Argo CD's per-object sync options; `Prune=false` keeps an object from being pruned.
pub const SYNC_OPTIONS_ANNOTATION: &str = "argocd.argoproj.io/sync-options";
/// The origin of the Namespace `create_namespace` adds: not part of the app.
const CREATED_NAMESPACE: &str = "create_namespace";

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot load kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("no Kubernetes credentials: {0}")]
    NoCredentials(String),
    #[error("cannot create Kubernetes client: {0}")]
    Client(String),
    #[error("{first} and {second} both define {object}")]
    Duplicate {
        object: String,
        first: String,
        second: String,
    },
    #[error("{} of {} objects failed: {}", .failures.len(), .total, .failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Objects {
        failures: Vec<ObjectFailure>,
        total: usize,
    },
    #[error("the render has no objects; refusing to prune the whole app (set allow_empty = true if that is intended)")]
    EmptyRender,
    #[error("prune failed for {} objects: {}", .failures.len(), .failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Prune { failures: Vec<ObjectFailure> },
}

impl ApplyError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ApplyError::Kubeconfig { .. } | ApplyError::NoCredentials(_) => "kube_config",
            ApplyError::Client(_) => "kube_client",
            ApplyError::Duplicate { .. } => "apply_duplicate",
            ApplyError::Objects { .. } => "apply_failed",
            ApplyError::EmptyRender => "apply_empty_render",
            ApplyError::Prune { .. } => "prune_failed",
        }
    }
}

/// One object the API server refused, with its message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectFailure {
    pub object: ObjectRef,
    pub message: String,
}

impl fmt::Display for ObjectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// Identifies one object in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    pub version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// The objects an app has applied and that may still exist: what a prune may delete.
pub type Inventory = BTreeSet<ObjectRef>;

/// Order of application: namespaces must exist before what lives in them, and CRDs must be
/// established before their custom resources can be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Namespaces,
    CustomResourceDefinitions,
    Resources,
}

impl Phase {
    pub fn of(object: &Object) -> Phase {
        match (object.group(), object.kind()) {
            ("", "Namespace") => Phase::Namespaces,
            ("apiextensions.k8s.io", "CustomResourceDefinition") => {
                Phase::CustomResourceDefinitions
            }
            _ => Phase::Resources,
        }
    }
}

/// An app's objects in application order, tagged with the app that owns them.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub app: String,
    /// Namespace for namespaced objects that name none.
    pub default_namespace: Option<String>,
    pub objects: Vec<Object>,
}

impl Plan {
    /// The objects that came from the render (not the namespace `create_namespace` adds).
    pub fn rendered_objects(&self) -> impl Iterator<Item = &Object> {
        self.objects
            .iter()
            .filter(|o| o.origin != CREATED_NAMESPACE)
    }

    pub fn rendered(&self) -> usize {
        self.rendered_objects().count()
    }

    /// The namespace `create_namespace` added, if any: applied, but not owned by the app.
    pub fn created_namespace(&self) -> Option<ObjectRef> {
        self.objects
            .iter()
            .find(|o| o.origin == CREATED_NAMESPACE)
            .map(|o| ObjectRef {
                group: String::new(),
                version: "v1".into(),
                kind: "Namespace".into(),
                namespace: None,
                name: o.name().to_string(),
            })
    }
}

/// What a prune may delete: inventory objects the latest complete apply did not include,
/// in deletion order (workloads first, CRDs after them, namespaces last).
pub fn prune_candidates(inventory: &Inventory, applied: &[ObjectRef]) -> Vec<ObjectRef> {
    let applied: BTreeSet<&ObjectRef> = applied.iter().collect();
    let mut candidates: Vec<ObjectRef> = inventory
        .iter()
        .filter(|o| !applied.contains(o))
        .cloned()
        .collect();
    let rank = |o: &ObjectRef| match (o.group.as_str(), o.kind.as_str()) {
        ("", "Namespace") => 2,
        ("apiextensions.k8s.io", "CustomResourceDefinition") => 1,
        _ => 0,
    };
    candidates.sort_by_key(|o| rank(o));
    candidates
}

/// Why a live object must not be pruned, if it must not: someone else owns it now, or it
/// opts out with Argo CD's `Prune=false`.
pub fn keep_reason(live: &Value, app: &str) -> Option<String> {
    let annotations = live.pointer("/metadata/annotations");
    let owner = annotations
        .and_then(|a| a.get(APP_ANNOTATION))
        .and_then(Value::as_str);
    if owner != Some(app) {
        return Some(match owner {
            Some(other) => format!("now belongs to app {other:?}"),
            None => "no longer carries the edgesync.io/app annotation".into(),
        });
    }
    let options = annotations
        .and_then(|a| a.get(SYNC_OPTIONS_ANNOTATION))
        .and_then(Value::as_str)
        .unwrap_or_default();
    if options
        .split(',')
        .any(|o| o.trim().eq_ignore_ascii_case("Prune=false"))
    {
        return Some("has sync option Prune=false".into());
    }
    None
}

/// Orders `manifests` for application and refuses duplicates. When `create_namespace` is set
/// and the app does not define its namespace itself, a Namespace object is added first.
pub fn plan(
    app: &str,
    default_namespace: Option<&str>,
    create_namespace: bool,
    manifests: Manifests,
) -> Result<Plan, ApplyError> {
    let mut objects = manifests.objects;
    check_duplicates(&objects, default_namespace)?;
    if let (true, Some(ns)) = (create_namespace, default_namespace) {
        let defined = objects
            .iter()
            .any(|o| Phase::of(o) == Phase::Namespaces && o.name() == ns);
        if !defined {
            let value = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            if let Value::Object(value) = value {
                objects.push(Object {
                    value,
                    origin: CREATED_NAMESPACE.into(),
                });
            }
        }
    }
    // A stable sort keeps render order within each phase.
    objects.sort_by_key(Phase::of);
    for object in &mut objects {
        let Some(meta) = object.metadata_mut() else {
            continue;
        };
        let annotations = meta
            .entry("annotations")
            .or_insert_with(|| Value::Object(Default::default()));
        if !annotations.is_object() {
            *annotations = Value::Object(Default::default());
        }
        if let Value::Object(a) = annotations {
            a.insert(APP_ANNOTATION.into(), Value::String(app.into()));
        }
    }
    Ok(Plan {
        app: app.to_string(),
        default_namespace: default_namespace.map(str::to_string),
        objects,
    })
}

fn check_duplicates(objects: &[Object], default_ns: Option<&str>) -> Result<(), ApplyError> {
    let mut seen = std::collections::HashMap::new();
    for o in objects {
        let key = (
            o.group().to_string(),
            o.kind().to_string(),
            o.namespace().or(default_ns).map(str::to_string),
            o.name().to_string(),
        );
        if let Some(first) = seen.insert(key, o.origin.clone()) {
            return Err(ApplyError::Duplicate {
                object: o.display_name(),
                first,
                second: o.origin.clone(),
            });
        }
    }
    Ok(())
}

/// The inventory after a sync: everything previously applied that may still exist plus what
/// was applied now. Nothing is forgotten until a prune has actually deleted it.
pub fn merge_inventory(previous: &Inventory, applied: &[ObjectRef]) -> Inventory {
    previous.iter().chain(applied).cloned().collect()
}

/// The result of applying one plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub applied: Vec<ObjectRef>,
    pub failures: Vec<ObjectFailure>,
}

impl Outcome {
    pub fn into_result(self) -> Result<Vec<ObjectRef>, (Vec<ObjectRef>, ApplyError)> {
        if self.failures.is_empty() {
            Ok(self.applied)
        } else {
            let total = self.applied.len() + self.failures.len();
            Err((
                self.applied,
                ApplyError::Objects {
                    failures: self.failures,
                    total,
                },
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(api_version: &str, kind: &str, name: &str, origin: &str) -> Object {
        let value = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name}});
        Object {
            value: value.as_object().unwrap().clone(),
            origin: origin.into(),
        }
    }

    fn manifests(objects: Vec<Object>) -> Manifests {
        Manifests { objects }
    }

    #[test]
    fn namespaces_then_crds_then_the_rest_in_render_order() {
        let m = manifests(vec![
            obj("apps/v1", "Deployment", "d", "a#0"),
            obj("example.com/v1", "Widget", "w", "a#1"),
            obj(
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                "widgets.example.com",
                "a#2",
            ),
            obj("v1", "ConfigMap", "c", "a#3"),
            obj("v1", "Namespace", "ns", "a#4"),
        ]);
        let p = plan("app", Some("ns"), false, m).unwrap();
        let kinds: Vec<_> = p.objects.iter().map(|o| o.kind()).collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "CustomResourceDefinition",
                "Deployment",
                "Widget",
                "ConfigMap"
            ]
        );
    }

    #[test]
    fn every_object_carries_the_app_annotation() {
        let p = plan(
            "web",
            None,
            false,
            manifests(vec![obj("v1", "ConfigMap", "c", "a#0")]),
        )
        .unwrap();
        assert_eq!(
            p.objects[0].value["metadata"]["annotations"][APP_ANNOTATION],
            json!("web")
        );
    }

    #[test]
    fn create_namespace_adds_it_once() {
        let p = plan(
            "a",
            Some("team"),
            true,
            manifests(vec![obj("v1", "ConfigMap", "c", "x#0")]),
        )
        .unwrap();
        assert_eq!(p.objects[0].kind(), "Namespace");
        assert_eq!(p.objects[0].name(), "team");
        let p = plan(
            "a",
            Some("team"),
            true,
            manifests(vec![obj("v1", "Namespace", "team", "x#0")]),
        )
        .unwrap();
        assert_eq!(p.objects.len(), 1);
    }

    #[test]
    fn duplicates_name_both_origins() {
        let err = plan(
            "a",
            Some("ns"),
            false,
            manifests(vec![
                obj("v1", "ConfigMap", "c", "one.yaml#0"),
                obj("v1", "ConfigMap", "c", "two.yaml#3"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("one.yaml#0") && err.contains("two.yaml#3"),
            "{err}"
        );
    }

    #[test]
    fn prune_candidates_are_what_the_apply_left_out_namespaces_last() {
        let r = |kind: &str, name: &str| ObjectRef {
            group: String::new(),
            version: "v1".into(),
            kind: kind.into(),
            namespace: (kind != "Namespace").then(|| "ns".to_string()),
            name: name.into(),
        };
        let inventory: Inventory = [
            r("Namespace", "old"),
            r("ConfigMap", "a"),
            r("ConfigMap", "b"),
        ]
        .into_iter()
        .collect();
        let candidates = prune_candidates(&inventory, &[r("ConfigMap", "a")]);
        assert_eq!(candidates, [r("ConfigMap", "b"), r("Namespace", "old")]);
    }

    #[test]
    fn only_our_objects_without_prune_false_may_be_pruned() {
        let live = |annotations: Value| json!({"metadata": {"annotations": annotations}});
        assert_eq!(
            keep_reason(&live(json!({APP_ANNOTATION: "web"})), "web"),
            None
        );
        assert!(keep_reason(&live(json!({APP_ANNOTATION: "other"})), "web")
            .unwrap()
            .contains("other"));
        assert!(keep_reason(&json!({"metadata": {}}), "web").is_some());
        let opted_out = live(
            json!({APP_ANNOTATION: "web", SYNC_OPTIONS_ANNOTATION: "ServerSideApply=true, Prune=false"}),
        );
        assert!(keep_reason(&opted_out, "web")
            .unwrap()
            .contains("Prune=false"));
    }

    #[test]
    fn the_created_namespace_is_not_rendered_content() {
        let p = plan(
            "a",
            Some("team"),
            true,
            manifests(vec![obj("v1", "ConfigMap", "c", "x#0")]),
        )
        .unwrap();
        assert_eq!(p.rendered(), 1);
        assert_eq!(p.created_namespace().unwrap().name, "team");
    }

    #[test]
    fn inventory_only_grows_without_prune() {
        let r = |name: &str| ObjectRef {
            group: String::new(),
            version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: Some("ns".into()),
            name: name.into(),
        };
        let previous: Inventory = [r("a"), r("b")].into_iter().collect();
        let merged = merge_inventory(&previous, &[r("b"), r("c")]);
        assert_eq!(merged.len(), 3);
    }
}
