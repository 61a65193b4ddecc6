//! Apply stage: orders rendered objects into a [`Plan`], server-side applies it and records
//! what was applied as the app's [`Inventory`].
//!
//! Ordering and inventory bookkeeping are pure and live here; talking to the API server is
//! confined to [`kube`](self::kube).

pub(crate) mod adopt;
pub(crate) mod cluster;
pub(crate) mod diff;
#[cfg(test)]
pub(crate) mod fake;
pub(crate) mod hooks;
pub(crate) mod kube;

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::render::{Manifests, Object};

pub(crate) use self::cluster::Cluster;
pub(crate) use self::kube::{connect, watch_config, KubeApplier};

/// Field manager for server-side apply, and the key of edgesync's tracking annotation.
pub(crate) const FIELD_MANAGER: &str = "edgesync";
pub(crate) const APP_ANNOTATION: &str = "edgesync.io/app";
/// Argo CD's per-object sync options; `Prune=false` keeps an object from being pruned.
pub(crate) const SYNC_OPTIONS_ANNOTATION: &str = "argocd.argoproj.io/sync-options";
/// The origin of the Namespace `create_namespace` adds: not part of the app.
pub(crate) const CREATED_NAMESPACE: &str = "create_namespace";

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error("cannot load kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: ::kube::config::KubeconfigError,
    },
    #[error("no Kubernetes credentials in the pod: {0}")]
    InCluster(#[source] ::kube::config::InClusterError),
    #[error("no Kubernetes credentials: set kubernetes.kubeconfig, $KUBECONFIG, run in a pod, or install k3s ({k3s}): {0}", k3s = crate::config::K3S_KUBECONFIG)]
    NoCredentials(#[source] ::kube::config::KubeconfigError),
    #[error("cannot create Kubernetes client: {0}")]
    Client(#[source] ::kube::Error),
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
    #[error("the render has no objects: nothing is applied or pruned (set allow_empty = true, Argo CD's syncPolicy.automated.allowEmpty, if an empty app is intended)")]
    EmptyRender,
    #[error("prune failed for {} objects: {}", .failures.len(), .failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Prune { failures: Vec<ObjectFailure> },
    #[error("{object} ({origin}): {message}")]
    BadAnnotation {
        object: String,
        origin: String,
        message: String,
    },
}

impl ApplyError {
    pub(crate) fn metric_label(&self) -> crate::metrics::ErrorKind {
        use crate::metrics::ErrorKind;
        match self {
            ApplyError::Kubeconfig { .. }
            | ApplyError::InCluster(_)
            | ApplyError::NoCredentials(_) => ErrorKind::KubeConfig,
            ApplyError::Client(_) => ErrorKind::KubeClient,
            ApplyError::Duplicate { .. } => ErrorKind::ApplyDuplicate,
            ApplyError::Objects { .. } => ErrorKind::ApplyFailed,
            ApplyError::EmptyRender => ErrorKind::ApplyEmptyRender,
            ApplyError::Prune { .. } => ErrorKind::PruneFailed,
            ApplyError::BadAnnotation { .. } => ErrorKind::BadAnnotation,
        }
    }

    /// Whether the failure is the API server's being away (unreachable, 5xx, 429), which
    /// does not count against an app's retry limit.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            ApplyError::Objects { failures, .. } | ApplyError::Prune { failures } => {
                !failures.is_empty() && failures.iter().all(|f| f.transient)
            }
            _ => false,
        }
    }
}

/// One object the API server refused, with its message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ObjectFailure {
    pub(crate) object: ObjectRef,
    pub(crate) message: String,
    /// The API server could not be reached, or answered 5xx or 429.
    #[serde(default)]
    pub(crate) transient: bool,
}

impl fmt::Display for ObjectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// Identifies one object in the cluster.
///
/// Identity is group, kind, namespace and name: the API version is only how the object was
/// last read or written. An object moved from `autoscaling/v1` to `autoscaling/v2` is the same
/// object, so equality, ordering and hashing leave the version out (an inventory never holds
/// one object twice, and an object in the plan is never a prune candidate at another version).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ObjectRef {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) group: String,
    /// The version the object was last applied at: used to address it, not to identify it.
    pub(crate) version: String,
    pub(crate) kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) namespace: Option<String>,
    pub(crate) name: String,
}

impl ObjectRef {
    fn identity(&self) -> (&str, &str, Option<&str>, &str) {
        (
            &self.group,
            &self.kind,
            self.namespace.as_deref(),
            &self.name,
        )
    }
}

impl PartialEq for ObjectRef {
    fn eq(&self, other: &Self) -> bool {
        self.identity() == other.identity()
    }
}

impl Eq for ObjectRef {}

impl std::hash::Hash for ObjectRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.identity().hash(state)
    }
}

impl PartialOrd for ObjectRef {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ObjectRef {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.identity().cmp(&other.identity())
    }
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
pub(crate) type Inventory = BTreeSet<ObjectRef>;

/// Argo CD's sync wave annotation: lower waves are applied, and healthy, before higher ones.
pub(crate) const SYNC_WAVE_ANNOTATION: &str = "argocd.argoproj.io/sync-wave";

/// Within a wave, namespaces and CRDs are applied one by one before anything else (and CRDs
/// waited on until Established); the other objects follow concurrently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    Namespaces,
    CustomResourceDefinitions,
    Resources,
}

impl Phase {
    pub(crate) fn of(object: &Object) -> Phase {
        match (object.group(), object.kind()) {
            ("", "Namespace") => Phase::Namespaces,
            ("apiextensions.k8s.io", "CustomResourceDefinition") => {
                Phase::CustomResourceDefinitions
            }
            _ => Phase::Resources,
        }
    }
}

/// Argo CD's kind order within a wave (Helm's install order); other kinds come after these.
const KIND_ORDER: [&str; 34] = [
    "Namespace",
    "NetworkPolicy",
    "ResourceQuota",
    "LimitRange",
    "PodSecurityPolicy",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "SecretList",
    "ConfigMap",
    "StorageClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleList",
    "ClusterRoleBinding",
    "ClusterRoleBindingList",
    "Role",
    "RoleList",
    "RoleBinding",
    "RoleBindingList",
    "Service",
    "DaemonSet",
    "Pod",
    "ReplicationController",
    "ReplicaSet",
    "Deployment",
    "HorizontalPodAutoscaler",
    "StatefulSet",
    "Job",
    "CronJob",
    "Ingress",
    "APIService",
];

fn kind_rank(kind: &str) -> usize {
    KIND_ORDER
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(KIND_ORDER.len())
}

/// The object's sync wave (0 without the annotation).
pub(crate) fn sync_wave(object: &Object) -> Result<i64, ApplyError> {
    let value = object
        .value
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(SYNC_WAVE_ANNOTATION));
    match value {
        None => Ok(0),
        Some(Value::String(text)) => text.trim().parse().map_err(|_| ApplyError::BadAnnotation {
            object: object.display_name(),
            origin: object.origin.clone(),
            message: format!("{SYNC_WAVE_ANNOTATION} {text:?} is not an integer"),
        }),
        Some(other) => Err(ApplyError::BadAnnotation {
            object: object.display_name(),
            origin: object.origin.clone(),
            message: format!("{SYNC_WAVE_ANNOTATION} must be a string, not {other}"),
        }),
    }
}

/// What the inventory ConfigMap keeps of an app: everything it owns, what its last complete
/// apply consisted of, and that apply's revision.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InventoryRecord<'a> {
    pub(crate) inventory: &'a Inventory,
    pub(crate) objects: &'a Inventory,
    pub(crate) revision: Option<&'a str>,
}

/// An app's objects in application order, tagged with the app that owns them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Plan {
    pub(crate) app: String,
    /// Namespace for namespaced objects that name none.
    pub(crate) default_namespace: Option<String>,
    pub(crate) objects: Vec<Object>,
    /// The wave of each object, in the same order; never decreasing.
    pub(crate) waves: Vec<i64>,
    /// Fields left as they are live (the app's `ignore_differences`).
    #[serde(default)]
    pub(crate) ignore_differences: Vec<crate::config::sync_policy::IgnoreDifference>,
    /// Argo CD's `ApplyOutOfSyncOnly=true`: objects a dry run finds unchanged are not sent.
    #[serde(default)]
    pub(crate) out_of_sync_only: bool,
    /// Resource hooks, in wave order: run in their phases, never part of `objects`.
    #[serde(default)]
    pub(crate) hooks: Vec<hooks::Hook>,
    /// Objects of the render that are not applied at all, and why (`Skip`, Helm tests).
    #[serde(default)]
    pub(crate) skipped: Vec<String>,
    /// What the render wants the operator to know (a remote base built from its pin).
    #[serde(default)]
    pub(crate) warnings: Vec<String>,
}

impl Plan {
    /// Where `object` of this plan lives, by name, before its scope is known: in its
    /// namespace or the app's (a cluster-scoped kind loses it once discovery says so).
    pub(crate) fn reference(&self, object: &Object) -> ObjectRef {
        ObjectRef {
            group: object.group().to_string(),
            version: object.version().to_string(),
            kind: object.kind().to_string(),
            namespace: object
                .namespace()
                .or(self.default_namespace.as_deref())
                .map(str::to_string),
            name: object.name().to_string(),
        }
    }

    /// The objects grouped by wave, lowest first: `(wave, objects)`.
    pub(crate) fn by_wave(&self) -> Vec<(i64, &[Object])> {
        let mut out: Vec<(i64, &[Object])> = Vec::new();
        let mut start = 0;
        for i in 1..=self.objects.len() {
            if i == self.objects.len() || self.waves[i] != self.waves[start] {
                out.push((self.waves[start], &self.objects[start..i]));
                start = i;
            }
        }
        out
    }

    /// The objects that came from the render (not the namespace `create_namespace` adds).
    pub(crate) fn rendered_objects(&self) -> impl Iterator<Item = &Object> {
        self.objects
            .iter()
            .filter(|o| o.origin != CREATED_NAMESPACE)
    }

    pub(crate) fn rendered(&self) -> usize {
        self.rendered_objects().count()
    }

    /// What of `applied` the app owns: everything but the namespace `create_namespace` added,
    /// which is never the app's to prune.
    pub(crate) fn owned(&self, applied: &[ObjectRef]) -> Vec<ObjectRef> {
        let created = self.created_namespace();
        applied
            .iter()
            .filter(|o| Some(*o) != created.as_ref())
            .cloned()
            .collect()
    }

    /// What no prune may delete while this plan is the app's: every object in it (whatever
    /// its version, and whether or not its kind turns out namespaced), and every namespace it
    /// puts objects in, the app's own namespace above all, even when the app stopped defining
    /// it.
    pub(crate) fn protected(&self) -> BTreeSet<ObjectRef> {
        let mut keep = BTreeSet::new();
        let namespace = |name: &str| ObjectRef {
            group: String::new(),
            version: "v1".into(),
            kind: "Namespace".into(),
            namespace: None,
            name: name.to_string(),
        };
        if let Some(ns) = &self.default_namespace {
            keep.insert(namespace(ns));
        }
        for o in &self.objects {
            let ns = o.namespace().or(self.default_namespace.as_deref());
            for scope in [ns, None] {
                keep.insert(ObjectRef {
                    group: o.group().to_string(),
                    version: o.version().to_string(),
                    kind: o.kind().to_string(),
                    namespace: scope.map(str::to_string),
                    name: o.name().to_string(),
                });
            }
            if let Some(ns) = o.namespace() {
                keep.insert(namespace(ns));
            }
        }
        keep
    }

    /// A plan of only the namespace `create_namespace` adds, which exists before any hook
    /// runs (as Argo CD creates it first); `None` without one.
    pub(crate) fn namespace_first(&self) -> Option<Plan> {
        let namespace = self
            .objects
            .iter()
            .find(|o| o.origin == CREATED_NAMESPACE)?;
        Some(Plan {
            objects: vec![namespace.clone()],
            waves: vec![0],
            hooks: Vec::new(),
            skipped: Vec::new(),
            ..self.clone()
        })
    }

    /// The namespace `create_namespace` added, if any: applied, but not owned by the app.
    pub(crate) fn created_namespace(&self) -> Option<ObjectRef> {
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

/// What a prune may delete: inventory objects that `keep` (the current plan's
/// [`Plan::protected`] and what it applied) does not hold, in deletion order (workloads
/// first, CRDs after them, namespaces last).
pub(crate) fn prune_candidates(
    inventory: &Inventory,
    keep: &BTreeSet<ObjectRef>,
) -> Vec<ObjectRef> {
    let mut candidates: Vec<ObjectRef> = inventory
        .iter()
        .filter(|o| !keep.contains(o))
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
pub(crate) fn keep_reason(live: &Value, app: &str) -> Option<String> {
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
    for keep in ["Prune=false", "Delete=false"] {
        if options
            .split(',')
            .any(|o| o.trim().eq_ignore_ascii_case(keep))
        {
            return Some(format!("has sync option {keep}"));
        }
    }
    None
}

impl Plan {
    /// Gives the namespace `create_namespace` added these labels and annotations (Argo CD's
    /// `managedNamespaceMetadata`); nothing when the app defines its namespace itself.
    pub(crate) fn label_created_namespace(
        &mut self,
        metadata: &crate::config::options::NamespaceMetadata,
    ) {
        let Some(created) = self
            .objects
            .iter_mut()
            .find(|o| o.origin == CREATED_NAMESPACE)
        else {
            return;
        };
        let Some(Value::Object(meta)) = created.value.get_mut("metadata") else {
            return;
        };
        for (key, map) in [
            ("labels", &metadata.labels),
            ("annotations", &metadata.annotations),
        ] {
            if !map.is_empty() {
                let values = map
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect();
                meta.insert(key.into(), Value::Object(values));
            }
        }
    }
}

/// Marks `object` as the app's ([`APP_ANNOTATION`]).
fn annotate(object: &mut Object, app: &str) {
    let Some(meta) = object.metadata_mut() else {
        return;
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

/// Orders `manifests` for application and refuses duplicates. When `create_namespace` is set
/// and the app does not define its namespace itself, a Namespace object is added first.
pub(crate) fn plan(
    app: &str,
    default_namespace: Option<&str>,
    create_namespace: bool,
    manifests: Manifests,
) -> Result<Plan, ApplyError> {
    let mut objects = Vec::new();
    let mut hooks = Vec::new();
    let mut skipped = Vec::new();
    for object in manifests.objects {
        match hooks::role(&object, sync_wave(&object)?)? {
            hooks::Role::Resource => objects.push(object),
            hooks::Role::Hook(hook) => hooks.push(hook),
            hooks::Role::Skipped(why) => skipped.push(format!("{}: {why}", object.display_name())),
        }
    }
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
    let waves = objects
        .iter()
        .map(sync_wave)
        .collect::<Result<Vec<i64>, _>>()?;
    let mut order: Vec<(i64, Object)> = waves.into_iter().zip(objects).collect();
    // Argo CD's order: wave, kind, name. The namespace create_namespace adds goes first.
    order.sort_by(|(wa, a), (wb, b)| {
        let created = |o: &Object| o.origin != CREATED_NAMESPACE;
        (created(a), *wa, kind_rank(a.kind()), a.name()).cmp(&(
            created(b),
            *wb,
            kind_rank(b.kind()),
            b.name(),
        ))
    });
    if let Some(min) = order.iter().map(|(w, _)| *w).min() {
        for (w, o) in &mut order {
            if o.origin == CREATED_NAMESPACE {
                *w = min;
            }
        }
    }
    // A namespace, or a CRD, in a later wave than something that needs it moves up to it.
    hoist(
        &mut order,
        default_namespace,
        |o| (Phase::of(o) == Phase::Namespaces).then(|| format!("ns/{}", o.name())),
        |o, default_ns| o.namespace().or(default_ns).map(|ns| format!("ns/{ns}")),
    );
    hoist(&mut order, default_namespace, crd_key, |o, _| {
        Some(format!("gk/{}/{}", o.group(), o.kind()))
    });
    let (waves, mut objects): (Vec<i64>, Vec<Object>) = order.into_iter().unzip();
    for object in &mut objects {
        annotate(object, app);
    }
    for hook in &mut hooks {
        annotate(&mut hook.object, app);
    }
    hooks.sort_by(|a, b| {
        (a.wave, kind_rank(a.object.kind()), a.object.name()).cmp(&(
            b.wave,
            kind_rank(b.object.kind()),
            b.object.name(),
        ))
    });
    Ok(Plan {
        app: app.to_string(),
        default_namespace: default_namespace.map(str::to_string),
        objects,
        waves,
        hooks,
        skipped,
        ignore_differences: Vec::new(),
        out_of_sync_only: false,
        warnings: Vec::new(),
    })
}

/// `gk/<group>/<kind>` of the custom resources a CRD defines.
fn crd_key(o: &Object) -> Option<String> {
    if Phase::of(o) != Phase::CustomResourceDefinitions {
        return None;
    }
    let spec = o.value.get("spec")?;
    let group = spec.get("group")?.as_str()?;
    let kind = spec.get("names")?.get("kind")?.as_str()?;
    Some(format!("gk/{group}/{kind}"))
}

/// Moves each dependency (`provides` gives its key) in front of the first object that needs
/// it (`needs`), into that object's wave, as Argo CD does for namespaces and CRDs.
fn hoist(
    order: &mut Vec<(i64, Object)>,
    default_ns: Option<&str>,
    provides: impl Fn(&Object) -> Option<String>,
    needs: impl Fn(&Object, Option<&str>) -> Option<String>,
) {
    let mut first_need: std::collections::HashMap<String, usize> = Default::default();
    let mut i = 0;
    while i < order.len() {
        if let Some(key) = provides(&order[i].1) {
            if let Some(&at) = first_need.get(&key) {
                let (_, object) = order.remove(i);
                let wave = order[at].0;
                order.insert(at, (wave, object));
                for index in first_need.values_mut() {
                    if *index >= at {
                        *index += 1;
                    }
                }
            }
        } else if let Some(key) = needs(&order[i].1, default_ns) {
            first_need.entry(key).or_insert(i);
        }
        i += 1;
    }
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
/// An object applied at a new version replaces its old entry, so it is addressed at the version
/// that is served now.
pub(crate) fn merge_inventory(previous: &Inventory, applied: &[ObjectRef]) -> Inventory {
    let mut merged = previous.clone();
    for object in applied {
        merged.replace(object.clone());
    }
    merged
}

/// The result of applying one plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Outcome {
    pub(crate) applied: Vec<ObjectRef>,
    pub(crate) failures: Vec<ObjectFailure>,
    /// The health of each applied object, as the API server's answer to the apply showed it.
    pub(crate) rated: Vec<(ObjectRef, crate::health::Health)>,
}

impl Outcome {
    pub(crate) fn into_result(self) -> Result<Vec<ObjectRef>, (Vec<ObjectRef>, ApplyError)> {
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

    fn with_wave(mut o: Object, wave: &str) -> Object {
        o.metadata_mut()
            .unwrap()
            .insert("annotations".into(), json!({SYNC_WAVE_ANNOTATION: wave}));
        o
    }

    fn names(p: &Plan) -> Vec<(i64, String)> {
        p.waves
            .iter()
            .zip(&p.objects)
            .map(|(w, o)| (*w, format!("{}/{}", o.kind(), o.name())))
            .collect()
    }

    #[test]
    fn argo_cds_kind_order_then_name_with_custom_kinds_last() {
        let m = manifests(vec![
            obj("apps/v1", "Deployment", "d", "a#0"),
            obj("example.com/v1", "Widget", "w", "a#1"),
            obj(
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                "widgets.example.com",
                "a#2",
            ),
            obj("v1", "ConfigMap", "c2", "a#3"),
            obj("v1", "ConfigMap", "c1", "a#4"),
            obj("v1", "Namespace", "ns", "a#5"),
            obj("v1", "Service", "s", "a#6"),
        ]);
        let p = plan("app", Some("ns"), false, m).unwrap();
        let kinds: Vec<_> = p
            .objects
            .iter()
            .map(|o| format!("{}/{}", o.kind(), o.name()))
            .collect();
        assert_eq!(
            kinds,
            [
                "Namespace/ns",
                "ConfigMap/c1",
                "ConfigMap/c2",
                "CustomResourceDefinition/widgets.example.com",
                "Service/s",
                "Deployment/d",
                "Widget/w",
            ]
        );
        assert_eq!(p.by_wave().len(), 1);
    }

    #[test]
    fn waves_order_first_and_namespaces_and_crds_move_up_to_what_needs_them() {
        let mut crd = obj(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            "widgets.example.com",
            "a#0",
        );
        crd.value.insert(
            "spec".into(),
            json!({"group": "example.com", "names": {"kind": "Widget"}}),
        );
        let mut widget = obj("example.com/v1", "Widget", "w", "a#1");
        widget
            .value
            .insert("metadata".into(), json!({"name": "w", "namespace": "team"}));
        let m = manifests(vec![
            with_wave(obj("v1", "ConfigMap", "late", "a#2"), "5"),
            with_wave(crd, "3"),
            with_wave(obj("v1", "Namespace", "team", "a#3"), "2"),
            with_wave(widget, "-1"),
            obj("v1", "ConfigMap", "zero", "a#4"),
        ]);
        let p = plan("app", None, false, m).unwrap();
        assert_eq!(
            names(&p),
            [
                (-1, "Namespace/team".to_string()),
                (
                    -1,
                    "CustomResourceDefinition/widgets.example.com".to_string()
                ),
                (-1, "Widget/w".to_string()),
                (0, "ConfigMap/zero".to_string()),
                (5, "ConfigMap/late".to_string()),
            ]
        );
        let waves: Vec<i64> = p.by_wave().iter().map(|(w, _)| *w).collect();
        assert_eq!(waves, [-1, 0, 5]);
    }

    #[test]
    fn a_bad_wave_is_an_error_naming_the_object() {
        let m = manifests(vec![with_wave(
            obj("v1", "ConfigMap", "c", "x.yaml#0"),
            "soon",
        )]);
        let err = plan("app", None, false, m).unwrap_err().to_string();
        assert!(
            err.contains("ConfigMap") && err.contains("x.yaml#0") && err.contains("soon"),
            "{err}"
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
        let keep = [r("ConfigMap", "a")].into_iter().collect();
        let candidates = prune_candidates(&inventory, &keep);
        assert_eq!(candidates, [r("ConfigMap", "b"), r("Namespace", "old")]);
    }

    fn oref(api_version: &str, kind: &str, ns: Option<&str>, name: &str) -> ObjectRef {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        ObjectRef {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            namespace: ns.map(str::to_string),
            name: name.into(),
        }
    }

    #[test]
    fn an_api_version_bump_is_the_same_object_and_never_a_prune_candidate() {
        let v1 = oref(
            "autoscaling/v1",
            "HorizontalPodAutoscaler",
            Some("ns"),
            "web",
        );
        let v2 = oref(
            "autoscaling/v2",
            "HorizontalPodAutoscaler",
            Some("ns"),
            "web",
        );
        assert_eq!(v1, v2);
        let inventory: Inventory = [v1.clone()].into_iter().collect();
        let mut hpa = obj(
            "autoscaling/v2",
            "HorizontalPodAutoscaler",
            "web",
            "hpa.yaml#0",
        );
        hpa.value["metadata"]["namespace"] = json!("ns");
        let p = plan("app", Some("ns"), false, manifests(vec![hpa])).unwrap();
        assert!(prune_candidates(&inventory, &p.protected()).is_empty());
        // The inventory now addresses the object at the version applied last.
        let merged = merge_inventory(&inventory, &[v2]);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged.iter().next().unwrap().version, "v2");
    }

    #[test]
    fn the_apps_namespace_is_never_pruned_while_the_app_uses_it() {
        // The app defined its Namespace, then dropped the manifest with create_namespace on.
        let inventory: Inventory = [
            oref("v1", "Namespace", None, "team"),
            oref("v1", "Namespace", None, "other"),
            oref("v1", "ConfigMap", Some("team"), "c"),
        ]
        .into_iter()
        .collect();
        let p = plan(
            "a",
            Some("team"),
            true,
            manifests(vec![obj("v1", "ConfigMap", "c", "x#0")]),
        )
        .unwrap();
        assert_eq!(
            prune_candidates(&inventory, &p.protected()),
            [oref("v1", "Namespace", None, "other")]
        );
        // Without create_namespace too: the namespace the app's objects live in stays.
        let p = plan(
            "a",
            Some("team"),
            false,
            manifests(vec![obj("v1", "ConfigMap", "c", "x#0")]),
        )
        .unwrap();
        assert!(
            !prune_candidates(&inventory, &p.protected()).contains(&oref(
                "v1",
                "Namespace",
                None,
                "team"
            ))
        );
    }

    #[test]
    fn cluster_scoped_objects_of_the_plan_are_protected_too() {
        let inventory: Inventory = [oref(
            "rbac.authorization.k8s.io/v1",
            "ClusterRole",
            None,
            "r",
        )]
        .into_iter()
        .collect();
        let p = plan(
            "a",
            Some("team"),
            false,
            manifests(vec![obj(
                "rbac.authorization.k8s.io/v1",
                "ClusterRole",
                "r",
                "x#0",
            )]),
        )
        .unwrap();
        assert!(prune_candidates(&inventory, &p.protected()).is_empty());
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
