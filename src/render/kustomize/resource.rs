//! Resources as kustomize tracks them: the object, where it came from, the names it had before
//! (so references can follow a rename), and how a generator made it.

use super::error::KustomizeError;
use serde_json::{Map, Value};

/// How a generated ConfigMap or Secret meets one of the same name from a base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Behavior {
    Create,
    Merge,
    Replace,
}

#[derive(Debug, Clone)]
pub(crate) struct Res {
    pub(crate) obj: Map<String, Value>,
    pub(crate) origin: String,
    /// Earlier (namespace, name) pairs, oldest first; the current one is not included.
    pub(crate) history: Vec<(String, String)>,
    /// Set for objects made by a generator that still need their hash suffix.
    pub(crate) needs_hash: bool,
    pub(crate) behavior: Option<Behavior>,
    /// Prefixes and suffixes applied so far, innermost first.
    pub(crate) prefixes: Vec<String>,
    pub(crate) suffixes: Vec<String>,
    /// The built-in generator that made it (`ConfigMapGenerator`, ...), for its origin.
    pub(crate) generator: Option<&'static str>,
    /// The transformers that ran over it: the kustomization file (relative to the checkout)
    /// and the built-in transformer's kind, in order (`buildMetadata: [transformerAnnotations]`).
    pub(crate) transformations: Vec<(String, &'static str)>,
}

impl Res {
    pub(crate) fn new(obj: Map<String, Value>, origin: String) -> Res {
        Res {
            obj,
            origin,
            history: Vec::new(),
            needs_hash: false,
            behavior: None,
            prefixes: Vec::new(),
            suffixes: Vec::new(),
            generator: None,
            transformations: Vec::new(),
        }
    }

    /// Reads the object as kustomize's JSON round trip leaves it: whole floats are integers
    /// (`1.0` is `1`), and annotation values are strings (`true` is `"true"`).
    pub(crate) fn normalize_as_kustomize(&mut self) {
        for value in self.obj.values_mut() {
            whole_floats_as_integers(value);
        }
        let Some(annotations) = self
            .metadata_mut()
            .and_then(|m| m.get_mut("annotations"))
            .and_then(Value::as_object_mut)
        else {
            return;
        };
        for value in annotations.values_mut() {
            match value {
                Value::Bool(b) => *value = Value::String(b.to_string()),
                Value::Number(n) => *value = Value::String(n.to_string()),
                _ => {}
            }
        }
    }

    pub(crate) fn str(&self, key: &str) -> &str {
        self.obj.get(key).and_then(Value::as_str).unwrap_or("")
    }
    pub(crate) fn kind(&self) -> &str {
        self.str("kind")
    }
    pub(crate) fn api_version(&self) -> &str {
        self.str("apiVersion")
    }
    pub(crate) fn group(&self) -> &str {
        self.api_version().rsplit_once('/').map_or("", |(g, _)| g)
    }
    pub(crate) fn version(&self) -> &str {
        let v = self.api_version();
        v.rsplit_once('/').map_or(v, |(_, v)| v)
    }
    fn meta(&self, key: &str) -> &str {
        self.obj
            .get("metadata")
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .unwrap_or("")
    }
    pub(crate) fn name(&self) -> &str {
        self.meta("name")
    }
    pub(crate) fn namespace(&self) -> &str {
        self.meta("namespace")
    }
    /// The object's metadata, made a mapping first if it is missing or malformed.
    pub(crate) fn metadata_mut(&mut self) -> Option<&mut Map<String, Value>> {
        crate::render::metadata_of(&mut self.obj)
    }

    /// Renames the object, remembering the old name for references.
    pub(crate) fn set_name(&mut self, name: String) {
        self.remember();
        if let Some(meta) = self.metadata_mut() {
            meta.insert("name".into(), Value::String(name));
        }
    }

    pub(crate) fn set_namespace(&mut self, ns: &str) {
        if self.namespace() == ns {
            return;
        }
        self.remember();
        if let Some(meta) = self.metadata_mut() {
            meta.insert("namespace".into(), Value::String(ns.to_string()));
        }
    }

    fn remember(&mut self) {
        let current = (self.namespace().to_string(), self.name().to_string());
        if self.history.last() != Some(&current) {
            self.history.push(current);
        }
    }

    /// Every name this object has had, oldest first, the current one last.
    pub(crate) fn all_names(&self) -> impl Iterator<Item = (&str, &str)> {
        self.history
            .iter()
            .map(|(ns, n)| (ns.as_str(), n.as_str()))
            .chain(std::iter::once((self.namespace(), self.name())))
    }

    /// `Kind.version.group/name.namespace`, as kustomize prints ids in its errors.
    pub(crate) fn id(&self) -> String {
        let group = if self.group().is_empty() {
            "[noGrp]"
        } else {
            self.group()
        };
        let ns = if self.namespace().is_empty() {
            "[noNs]"
        } else {
            self.namespace()
        };
        format!(
            "{}.{}.{}/{}.{}",
            self.kind(),
            self.version(),
            group,
            self.name(),
            ns
        )
    }

    /// kustomize's id equality: group, version, kind, name, and namespace with `default` and
    /// no namespace alike.
    fn same_id(&self, other: &Res) -> bool {
        // The name first: it tells most objects apart, and this runs for every pair.
        self.name() == other.name() && self.id_key() == other.id_key()
    }

    fn id_key(&self) -> (&str, &str, &str, &str, &str) {
        let ns = match self.namespace() {
            "default" => "",
            other => other,
        };
        (self.group(), self.version(), self.kind(), self.name(), ns)
    }
}

/// Resources in the order kustomize accumulated them, with the field specs of the
/// `configurations` of every kustomization they came through.
#[derive(Debug, Default)]
pub(crate) struct ResMap {
    items: Vec<Res>,
    pub(crate) config: super::fieldspec::TransformerConfig,
}

impl ResMap {
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// Adds a resource; the same group, kind, namespace and name twice is an error, as in
    /// kustomize ("may not add resource with an already registered id").
    pub(crate) fn append(&mut self, res: Res) -> Result<(), KustomizeError> {
        if let Some(existing) = self.items.iter().find(|r| r.same_id(&res)) {
            return Err(KustomizeError::DuplicateId {
                id: res.id(),
                first: existing.origin.clone(),
                second: res.origin.clone(),
            });
        }
        self.items.push(res);
        Ok(())
    }

    /// The id of an object that is in the map twice (after a transformer moved it), if any.
    pub(crate) fn duplicate_id(&self) -> Option<String> {
        let mut seen = std::collections::HashSet::new();
        self.items
            .iter()
            .find(|r| !seen.insert(r.id_key()))
            .map(Res::id)
    }

    pub(crate) fn append_all(&mut self, other: ResMap) -> Result<(), KustomizeError> {
        self.config.merge(&other.config);
        for r in other.items {
            self.append(r)?;
        }
        Ok(())
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Res> {
        self.items.iter()
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Res> {
        self.items.iter_mut()
    }

    pub(crate) fn get_mut(&mut self, index: usize) -> Option<&mut Res> {
        self.items.get_mut(index)
    }

    pub(crate) fn position(&self, f: impl Fn(&Res) -> bool) -> Option<usize> {
        self.items.iter().position(f)
    }

    pub(crate) fn remove(&mut self, index: usize) -> Res {
        self.items.remove(index)
    }

    pub(crate) fn into_iter(self) -> impl Iterator<Item = Res> {
        self.items.into_iter()
    }

    /// kustomize's default ("legacy") output order: a fixed list of kinds first (Namespace,
    /// CRDs, RBAC, ConfigMaps, Services, workloads, ...), webhook configurations last, all
    /// other kinds in between; ties by group, version and kind, then namespace and name.
    pub(crate) fn sort_legacy(&mut self) {
        self.sort_legacy_with(&ORDER_FIRST, &ORDER_LAST);
    }

    /// The legacy order with other lists of kinds first and last (`sortOptions`).
    pub(crate) fn sort_legacy_with<S: AsRef<str>>(&mut self, first: &[S], last: &[S]) {
        self.items.sort_by_cached_key(|r| {
            (
                kind_rank(r.kind(), first, last),
                gvk_string(r),
                ns_for_sort(r.namespace()),
                r.name().to_string(),
            )
        });
    }
}

const ORDER_FIRST: [&str; 22] = [
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
];
const ORDER_LAST: [&str; 2] = [
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
];

fn kind_rank<S: AsRef<str>>(kind: &str, first: &[S], last: &[S]) -> i64 {
    // The lists come from a kustomization: their lengths fit an i64 long before memory ends.
    let rank = |i: usize| i64::try_from(i).unwrap_or(i64::MAX);
    if let Some(i) = first.iter().position(|k| k.as_ref() == kind) {
        return rank(i).saturating_sub(rank(first.len()));
    }
    if let Some(i) = last.iter().position(|k| k.as_ref() == kind) {
        return rank(i).saturating_add(1);
    }
    0
}

/// kustomize's Gvk string: `group_version_kind`, `~G`/`~V` standing in for empty parts, so
/// the core group sorts after named groups.
fn gvk_string(r: &Res) -> String {
    let or = |s: &str, empty: &str| {
        if s.is_empty() {
            empty.to_string()
        } else {
            s.to_string()
        }
    };
    format!(
        "{}_{}_{}",
        or(r.group(), "~G"),
        or(r.version(), "~V"),
        or(r.kind(), "~K")
    )
}

fn ns_for_sort(ns: &str) -> String {
    if ns.is_empty() {
        "~X".to_string()
    } else {
        ns.to_string()
    }
}

/// Kinds that are not namespaced, among the built-in APIs; anything else (custom resources
/// included) is treated as namespaced, as kustomize does without an OpenAPI schema.
pub(crate) fn is_cluster_scoped(kind: &str) -> bool {
    matches!(
        kind,
        "Namespace"
            | "Node"
            | "PersistentVolume"
            | "ClusterRole"
            | "ClusterRoleBinding"
            | "CustomResourceDefinition"
            | "StorageClass"
            | "PriorityClass"
            | "ValidatingWebhookConfiguration"
            | "MutatingWebhookConfiguration"
            | "ValidatingAdmissionPolicy"
            | "ValidatingAdmissionPolicyBinding"
            | "MutatingAdmissionPolicy"
            | "MutatingAdmissionPolicyBinding"
            | "APIService"
            | "CSIDriver"
            | "CSINode"
            | "VolumeAttachment"
            | "RuntimeClass"
            | "IngressClass"
            | "PodSecurityPolicy"
            | "CertificateSigningRequest"
            | "ComponentStatus"
            | "FlowSchema"
            | "PriorityLevelConfiguration"
            | "StorageVersionMigration"
            | "SelfSubjectReview"
            | "TokenReview"
            | "SubjectAccessReview"
            | "SelfSubjectAccessReview"
            | "SelfSubjectRulesReview"
            | "ClusterTrustBundle"
            | "DeviceClass"
            | "IPAddress"
            | "ServiceCIDR"
            | "VolumeAttributesClass"
    )
}

/// Go prints a float64 without a fraction as an integer: `1.0` comes out of kustomize as `1`.
fn whole_floats_as_integers(value: &mut Value) {
    match value {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64() {
                // Within ±2^53 every whole float is exactly an i64.
                if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                    *value = Value::from(f as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_floats_as_integers),
        Value::Object(map) => map.values_mut().for_each(whole_floats_as_integers),
        _ => {}
    }
}
