//! kustomize's built-in transformers that need no files: namespace, name prefix and suffix,
//! labels, annotations, replicas and images.

use super::error::KustomizeError;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::fieldspec::{fs, fsg, visit, CustomSpec, FieldSpec};
use super::resource::{is_cluster_scoped, ResMap};

/// Sets the namespace of every namespaced object, renames Namespace objects to it, and moves
/// the service references of APIServices (created when missing, as kustomize's field spec says)
/// and CRD conversion webhooks (when set) along. Webhook configurations' services and binding
/// subjects follow only the objects of the build they name (name references).
pub(crate) fn namespace(resmap: &mut ResMap, ns: &str) {
    for r in resmap.iter_mut() {
        let kind = r.kind().to_string();
        if kind == "Namespace" {
            if r.name() != ns {
                r.set_name(ns.to_string());
            }
            continue;
        }
        if !is_cluster_scoped(&kind) {
            r.set_namespace(ns);
        }
        let (path, create) = match (r.group(), kind.as_str()) {
            ("apiregistration.k8s.io", "APIService") => ("spec/service/namespace", true),
            ("apiextensions.k8s.io", "CustomResourceDefinition") => (
                "spec/conversion/webhook/clientConfig/service/namespace",
                false,
            ),
            _ => continue,
        };
        visit(&mut r.obj, path, create, &mut |field| {
            *field = Value::String(ns.to_string());
        });
    }
}

/// Adds `prefix` and `suffix` to every name, except the kinds kustomize leaves alone.
pub(crate) fn prefix_suffix(resmap: &mut ResMap, prefix: &str, suffix: &str) {
    if prefix.is_empty() && suffix.is_empty() {
        return;
    }
    for r in resmap.iter_mut() {
        if matches!(
            r.kind(),
            "CustomResourceDefinition" | "APIService" | "Namespace"
        ) {
            continue;
        }
        let name = format!("{prefix}{}{suffix}", r.name());
        r.set_name(name);
        if !prefix.is_empty() {
            r.prefixes.push(prefix.to_string());
        }
        if !suffix.is_empty() {
            r.suffixes.push(suffix.to_string());
        }
    }
}

/// One entry of `labels`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct LabelSet {
    #[serde(default)]
    pairs: BTreeMap<String, String>,
    #[serde(default)]
    include_selectors: bool,
    #[serde(default)]
    include_templates: bool,
    #[serde(default)]
    fields: Vec<CustomSpec>,
}

const WORKLOADS: [&str; 6] = [
    "ReplicationController",
    "Deployment",
    "ReplicaSet",
    "DaemonSet",
    "StatefulSet",
    "Job",
];

/// Pod templates' metadata, where labels and annotations reach running pods.
const TEMPLATE_LABELS: [FieldSpec; 9] = [
    fs(
        "ReplicationController",
        "spec/template/metadata/labels",
        true,
    ),
    fs("Deployment", "spec/template/metadata/labels", true),
    fs("ReplicaSet", "spec/template/metadata/labels", true),
    fs("DaemonSet", "spec/template/metadata/labels", true),
    fs("StatefulSet", "spec/template/metadata/labels", true),
    fs("Job", "spec/template/metadata/labels", true),
    fs("CronJob", "spec/jobTemplate/metadata/labels", true),
    fs(
        "CronJob",
        "spec/jobTemplate/spec/template/metadata/labels",
        true,
    ),
    fs(
        "StatefulSet",
        "spec/volumeClaimTemplates/metadata/labels",
        true,
    ),
];

/// Selectors that must keep matching the labelled pods.
const SELECTOR_LABELS: [FieldSpec; 31] = [
    fs("Service", "spec/selector", true),
    fs("ReplicationController", "spec/selector", true),
    fs("Deployment", "spec/selector/matchLabels", true),
    fs("ReplicaSet", "spec/selector/matchLabels", true),
    fs("DaemonSet", "spec/selector/matchLabels", true),
    fs("StatefulSet", "spec/selector/matchLabels", true),
    fs("Job", "spec/selector/matchLabels", false),
    fs(
        "CronJob",
        "spec/jobTemplate/spec/selector/matchLabels",
        false,
    ),
    fs("PodDisruptionBudget", "spec/selector/matchLabels", false),
    fs("NetworkPolicy", "spec/podSelector/matchLabels", false),
    fs(
        "NetworkPolicy",
        "spec/ingress/from/podSelector/matchLabels",
        false,
    ),
    fs(
        "NetworkPolicy",
        "spec/egress/to/podSelector/matchLabels",
        false,
    ),
    fsg("apps", "Deployment", AFFINITY_1, false),
    fsg("apps", "Deployment", AFFINITY_2, false),
    fsg("apps", "Deployment", ANTI_AFFINITY_1, false),
    fsg("apps", "Deployment", ANTI_AFFINITY_2, false),
    fsg("apps", "Deployment", TOPOLOGY, false),
    fsg("apps", "ReplicaSet", AFFINITY_1, false),
    fsg("apps", "ReplicaSet", AFFINITY_2, false),
    fsg("apps", "ReplicaSet", ANTI_AFFINITY_1, false),
    fsg("apps", "ReplicaSet", ANTI_AFFINITY_2, false),
    fsg("apps", "ReplicaSet", TOPOLOGY, false),
    fsg("apps", "DaemonSet", AFFINITY_1, false),
    fsg("apps", "DaemonSet", AFFINITY_2, false),
    fsg("apps", "DaemonSet", ANTI_AFFINITY_1, false),
    fsg("apps", "DaemonSet", ANTI_AFFINITY_2, false),
    fsg("apps", "StatefulSet", AFFINITY_1, false),
    fsg("apps", "StatefulSet", AFFINITY_2, false),
    fsg("apps", "StatefulSet", ANTI_AFFINITY_1, false),
    fsg("apps", "StatefulSet", ANTI_AFFINITY_2, false),
    fsg("apps", "StatefulSet", TOPOLOGY, false),
];

const AFFINITY_1: &str = "spec/template/spec/affinity/podAffinity/preferredDuringSchedulingIgnoredDuringExecution/podAffinityTerm/labelSelector/matchLabels";
const AFFINITY_2: &str = "spec/template/spec/affinity/podAffinity/requiredDuringSchedulingIgnoredDuringExecution/labelSelector/matchLabels";
const ANTI_AFFINITY_1: &str = "spec/template/spec/affinity/podAntiAffinity/preferredDuringSchedulingIgnoredDuringExecution/podAffinityTerm/labelSelector/matchLabels";
const ANTI_AFFINITY_2: &str = "spec/template/spec/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution/labelSelector/matchLabels";
const TOPOLOGY: &str = "spec/template/spec/topologySpreadConstraints/labelSelector/matchLabels";

/// `commonLabels` (metadata, templates and selectors) and `labels` (metadata, and templates or
/// selectors when asked).
pub(crate) fn labels(
    resmap: &mut ResMap,
    common: &BTreeMap<String, String>,
    sets: &[LabelSet],
) -> Result<(), KustomizeError> {
    // `configurations` field specs for commonLabels: with commonLabels, and with the
    // `labels` that reach selectors.
    let configured = resmap.config.common_labels.clone();
    if !common.is_empty() {
        let specs: Vec<FieldSpec> = std::iter::once(fs("", "metadata/labels", true))
            .chain(TEMPLATE_LABELS)
            .chain(SELECTOR_LABELS)
            .collect();
        add_pairs(resmap, common, &specs, &configured);
    }
    for set in sets {
        let mut specs = vec![fs("", "metadata/labels", true)];
        if set.include_templates || set.include_selectors {
            specs.extend(TEMPLATE_LABELS);
        }
        if set.include_selectors {
            specs.extend(SELECTOR_LABELS);
        }
        for f in &set.fields {
            if f.version.is_some() && f.kind.is_none() {
                return Err(KustomizeError::VersionWithoutKind {
                    path: f.path.clone(),
                });
            }
        }
        let mut custom = set.fields.clone();
        if set.include_selectors {
            custom.extend(configured.iter().cloned());
        }
        add_pairs(resmap, &set.pairs, &specs, &custom);
    }
    Ok(())
}

fn add_pairs(
    resmap: &mut ResMap,
    pairs: &BTreeMap<String, String>,
    specs: &[FieldSpec],
    custom: &[CustomSpec],
) {
    for r in resmap.iter_mut() {
        let (group, kind) = (r.group().to_string(), r.kind().to_string());
        let version = r.version().to_string();
        let mut paths: Vec<(String, bool)> = specs
            .iter()
            .filter(|s| s.applies(&group, &kind))
            .map(|s| (s.path.to_string(), s.create))
            .collect();
        for f in custom.iter().filter(|f| f.applies(&group, &version, &kind)) {
            let path = f.path();
            if !paths.iter().any(|(p, _)| *p == path) {
                paths.push((path, f.create));
            }
        }
        for (path, create) in paths {
            visit(&mut r.obj, &path, create, &mut |v| merge_strings(v, pairs));
        }
    }
}

fn merge_strings(target: &mut Value, pairs: &BTreeMap<String, String>) {
    if target.is_null() {
        *target = Value::Object(Map::new());
    }
    if let Some(m) = target.as_object_mut() {
        for (k, v) in pairs {
            m.insert(k.clone(), Value::String(v.clone()));
        }
    }
}

const TEMPLATE_ANNOTATIONS: [&str; 2] = [
    "spec/template/metadata/annotations",
    "spec/jobTemplate/spec/template/metadata/annotations",
];

/// `commonAnnotations`: metadata and pod templates.
pub(crate) fn annotations(resmap: &mut ResMap, common: &BTreeMap<String, String>) {
    if common.is_empty() {
        return;
    }
    let configured = resmap.config.common_annotations.clone();
    for r in resmap.iter_mut() {
        let kind = r.kind().to_string();
        let (group, version) = (r.group().to_string(), r.version().to_string());
        for f in configured
            .iter()
            .filter(|f| f.applies(&group, &version, &kind))
        {
            visit(&mut r.obj, &f.path(), f.create, &mut |v| {
                merge_strings(v, common)
            });
        }
        visit(&mut r.obj, "metadata/annotations", true, &mut |v| {
            merge_strings(v, common)
        });
        if WORKLOADS.contains(&kind.as_str()) {
            visit(&mut r.obj, TEMPLATE_ANNOTATIONS[0], true, &mut |v| {
                merge_strings(v, common)
            });
        } else if kind == "CronJob" {
            visit(
                &mut r.obj,
                "spec/jobTemplate/metadata/annotations",
                true,
                &mut |v| merge_strings(v, common),
            );
            visit(&mut r.obj, TEMPLATE_ANNOTATIONS[1], true, &mut |v| {
                merge_strings(v, common)
            });
        }
    }
}

/// One entry of `replicas`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Replica {
    name: String,
    count: i64,
}

const REPLICA_KINDS: [&str; 4] = [
    "Deployment",
    "ReplicationController",
    "ReplicaSet",
    "StatefulSet",
];

/// Sets `spec.replicas` of the workloads named (by any name they have had). A name that is no
/// workload's is an error, as in kustomize: the count would silently go nowhere.
pub(crate) fn replicas(resmap: &mut ResMap, replicas: &[Replica]) -> Result<(), String> {
    for rep in replicas {
        let mut found = false;
        for r in resmap.iter_mut() {
            if !REPLICA_KINDS.contains(&r.kind()) {
                continue;
            }
            if !r.all_names().any(|(_, n)| n == rep.name) {
                continue;
            }
            found = true;
            visit(&mut r.obj, "spec", true, &mut |spec| {
                if let Some(m) = spec.as_object_mut() {
                    m.insert("replicas".into(), Value::from(rep.count));
                }
            });
        }
        if !found {
            return Err(format!(
                "no {} named {} among the resources",
                REPLICA_KINDS.join(", "),
                rep.name
            ));
        }
    }
    Ok(())
}

/// A `ReplicaCountTransformer` configured with its own field specs: the count at each path
/// of the objects named (by any name they have had).
pub(crate) fn replicas_at(
    resmap: &mut ResMap,
    replica: &Replica,
    specs: &[CustomSpec],
) -> Result<(), String> {
    let mut found = false;
    for r in resmap.iter_mut() {
        if !r.all_names().any(|(_, n)| n == replica.name) {
            continue;
        }
        let (group, version, kind) = (
            r.group().to_string(),
            r.version().to_string(),
            r.kind().to_string(),
        );
        for f in specs.iter().filter(|f| f.applies(&group, &version, &kind)) {
            found = true;
            visit(&mut r.obj, &f.path(), f.create, &mut |v| {
                *v = Value::from(replica.count)
            });
        }
    }
    if found {
        Ok(())
    } else {
        Err(format!(
            "no object named {} matches the field specs",
            replica.name
        ))
    }
}

/// Labels or annotations at the given field specs only (a `LabelTransformer`'s or an
/// `AnnotationsTransformer`'s).
pub(crate) fn pairs_at(
    resmap: &mut ResMap,
    pairs: &BTreeMap<String, String>,
    specs: &[CustomSpec],
) {
    add_pairs(resmap, pairs, &[], specs);
}

/// A `NamespaceTransformer` configured with its own field specs: `metadata/namespace` of
/// namespaced objects (only where unset with `unset_only`), the name of Namespace objects, and
/// any other path set to the namespace.
pub(crate) fn namespace_at(resmap: &mut ResMap, ns: &str, specs: &[CustomSpec], unset_only: bool) {
    for r in resmap.iter_mut() {
        let (group, version, kind) = (
            r.group().to_string(),
            r.version().to_string(),
            r.kind().to_string(),
        );
        for f in specs.iter().filter(|f| f.applies(&group, &version, &kind)) {
            match (f.path().as_str(), kind.as_str()) {
                ("metadata/namespace", _) => {
                    if !is_cluster_scoped(&kind) && (!unset_only || r.namespace().is_empty()) {
                        r.set_namespace(ns);
                    }
                }
                ("metadata/name", "Namespace") => {
                    if r.name() != ns {
                        r.set_name(ns.to_string());
                    }
                }
                ("metadata/name", _) => {}
                (path, _) => visit(&mut r.obj, path, f.create, &mut |v| {
                    *v = Value::String(ns.to_string())
                }),
            }
        }
    }
}

/// One entry of `images`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Image {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
    digest: Option<String>,
}

impl Image {
    /// `kustomize edit set image` syntax, as Argo CD's `source.kustomize.images` writes it:
    /// `[name=]newName[:tag][@digest]`; without `name=`, the image keeps its name.
    pub(crate) fn from_edit_syntax(spec: &str) -> Result<Image, KustomizeError> {
        let (name, image) = match spec.split_once('=') {
            Some((name, image)) => (Some(name), image),
            None => (None, spec),
        };
        let (new_name, tag, digest) = split_image(image);
        if new_name.is_empty() {
            return Err(KustomizeError::NoImage {
                spec: spec.to_string(),
            });
        }
        let name = name.unwrap_or(new_name).to_string();
        Ok(Image {
            new_name: (new_name != name).then(|| new_name.to_string()),
            name,
            new_tag: tag.map(str::to_string),
            digest: digest.map(str::to_string),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

/// Rewrites container images: every `containers`, `initContainers` and `ephemeralContainers`
/// list anywhere in an object, as kustomize's image transformer does.
pub(crate) fn images(resmap: &mut ResMap, images: &[Image]) {
    if images.is_empty() {
        return;
    }
    let configured = resmap.config.images.clone();
    images_with(resmap, images, &configured);
}

/// Rewrites container images, and the image fields `specs` name.
pub(crate) fn images_with(resmap: &mut ResMap, images: &[Image], configured: &[CustomSpec]) {
    for r in resmap.iter_mut() {
        for value in r.obj.values_mut() {
            walk_containers(value, images);
        }
        // Image fields `configurations` names (custom resources).
        let kind = r.kind().to_string();
        let (group, version) = (r.group().to_string(), r.version().to_string());
        for f in configured
            .iter()
            .filter(|f| f.applies(&group, &version, &kind))
        {
            visit(&mut r.obj, &f.path(), false, &mut |v| {
                if let Value::String(image) = v {
                    if let Some(new) = rewrite_image(image, images) {
                        *image = new;
                    }
                }
            });
        }
    }
}

fn walk_containers(value: &mut Value, images: &[Image]) {
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                if matches!(
                    key.as_str(),
                    "containers" | "initContainers" | "ephemeralContainers"
                ) {
                    if let Value::Array(items) = child {
                        for item in items.iter_mut() {
                            if let Some(Value::String(image)) = item.get_mut("image") {
                                if let Some(new) = rewrite_image(image, images) {
                                    *image = new;
                                }
                            }
                        }
                    }
                }
                walk_containers(child, images);
            }
        }
        Value::Array(items) => {
            for item in items {
                walk_containers(item, images);
            }
        }
        _ => {}
    }
}

/// Splits `name[:tag][@digest]`; a `:` before the last `/` belongs to a registry port.
fn split_image(image: &str) -> (&str, Option<&str>, Option<&str>) {
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    let slash = rest.rfind('/').map_or(0, |i| i + 1);
    match rest[slash..].find(':') {
        Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..]), digest),
        None => (rest, None, digest),
    }
}

fn rewrite_image(image: &str, images: &[Image]) -> Option<String> {
    let (name, tag, digest) = split_image(image);
    let rule = images.iter().find(|i| i.name == name)?;
    let new_name = rule.new_name.as_deref().unwrap_or(name);
    let mut out = new_name.to_string();
    if let Some(d) = &rule.digest {
        out.push('@');
        out.push_str(d);
    } else if let Some(t) = &rule.new_tag {
        out.push(':');
        out.push_str(t);
    } else {
        if let Some(t) = tag {
            out.push(':');
            out.push_str(t);
        }
        if let Some(d) = digest {
            out.push('@');
            out.push_str(d);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn images_in_kustomize_edit_syntax() {
        let i = Image::from_edit_syntax("nginx=registry.local:5000/web/nginx:1.28").unwrap();
        assert_eq!(i.name, "nginx");
        assert_eq!(i.new_name.as_deref(), Some("registry.local:5000/web/nginx"));
        assert_eq!(i.new_tag.as_deref(), Some("1.28"));
        let i = Image::from_edit_syntax("nginx:1.29").unwrap();
        assert_eq!(
            (i.name.as_str(), i.new_name, i.new_tag.as_deref()),
            ("nginx", None, Some("1.29"))
        );
        let i = Image::from_edit_syntax("registry.local:5000/app@sha256:abc").unwrap();
        assert_eq!(i.name, "registry.local:5000/app");
        assert_eq!(i.new_tag, None);
        assert_eq!(i.digest.as_deref(), Some("sha256:abc"));
        assert!(Image::from_edit_syntax("x=").is_err());
    }

    use super::*;

    #[test]
    fn image_names_with_registry_ports_tags_and_digests() {
        assert_eq!(
            split_image("my.reg:5000/team/app:v1"),
            ("my.reg:5000/team/app", Some("v1"), None)
        );
        assert_eq!(
            split_image("nginx@sha256:abc"),
            ("nginx", None, Some("sha256:abc"))
        );
        assert_eq!(split_image("nginx"), ("nginx", None, None));
        let rules = vec![Image {
            name: "nginx".into(),
            new_name: None,
            new_tag: Some("2.0".into()),
            digest: None,
        }];
        assert_eq!(
            rewrite_image("nginx@sha256:abc", &rules).as_deref(),
            Some("nginx:2.0")
        );
        assert_eq!(rewrite_image("docker.io/nginx:1", &rules), None);
    }
}
