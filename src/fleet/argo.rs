//! Argo CD `Application` and `AppProject` manifests (argoproj.io/v1alpha1), read as users
//! already write them. Pure: a rendered object in, a typed value and warnings out.
//!
//! Every field a manifest sets that edgesync does not act on yet is named in a warning, never
//! dropped silently. A destination other than the cluster the node runs is an error: a node
//! agent only ever applies to its own cluster.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use crate::config::{sync_policy, AppConfig, AppSource};
use crate::render::Object;

pub(crate) const GROUP: &str = "argoproj.io";
/// `metadata.annotations` key of an Application's node selector.
pub(crate) const NODE_SELECTOR_ANNOTATION: &str = "edgesync.io/node-selector";
/// `"true"`: the Application follows the fleet hub's rollout gates (`[gates]`).
pub(crate) const GATED_ANNOTATION: &str = "edgesync.io/gated";
const IN_CLUSTER: [&str; 2] = [
    "https://kubernetes.default.svc",
    "https://kubernetes.default.svc/",
];
const DELETE_FINALIZER: &str = "resources-finalizer.argocd.argoproj.io";

#[derive(Debug, thiserror::Error)]
#[error("{origin}: {kind} {name}: {source}")]
pub(crate) struct ArgoError {
    pub(crate) origin: String,
    pub(crate) kind: String,
    pub(crate) name: String,
    pub(crate) source: Box<SpecError>,
}

/// What makes an Argo CD object unusable, by the field at fault.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpecError {
    #[error("{0} is not an Argo CD kind edgesync reads")]
    Kind(String),
    #[error("{0} is missing")]
    Missing(String),
    #[error("{field} must be {expected}")]
    Type {
        field: String,
        expected: &'static str,
    },
    #[error("{field}: {source}")]
    Duration {
        field: String,
        source: crate::model::human::DurationError,
    },
    #[error("{field}: {source}")]
    Values {
        field: String,
        source: Box<serde_saphyr::SerializeError>,
    },
    #[error("{field} is not supported; {instead}")]
    Unsupported {
        field: String,
        instead: &'static str,
    },
    #[error(
        "spec.destination.{field} {value:?} is not supported on a node agent: edgesync applies to the cluster it runs on ({})",
        IN_CLUSTER[0]
    )]
    Destination { field: &'static str, value: String },
    #[error("spec.sources: no source renders anything (each is a `ref` without a path or chart)")]
    NothingToRender,
    #[error("{field}: {source}")]
    Invalid {
        field: String,
        source: crate::config::Invalid,
    },
}

/// One of an Application's sources (`spec.source`, or an entry of `spec.sources`), as an
/// app source of the config, and the config management plugin it names (or leaves to
/// discovery), which edgesync cannot run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Source {
    pub(crate) spec: AppSource,
    pub(crate) plugin: Option<String>,
    /// `plugin.env`: name and value.
    pub(crate) plugin_env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Automated {
    pub(crate) prune: bool,
    pub(crate) self_heal: bool,
    pub(crate) allow_empty: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Application {
    pub(crate) name: String,
    pub(crate) project: String,
    /// `spec.sources`, or `spec.source` alone.
    pub(crate) sources: Vec<Source>,
    pub(crate) namespace: Option<String>,
    /// `syncPolicy.automated`; `None` means manual sync only.
    pub(crate) automated: Option<Automated>,
    pub(crate) sync_options: Vec<String>,
    pub(crate) retry: Option<Value>,
    pub(crate) ignore_differences: Vec<Value>,
    /// The `resources-finalizer.argocd.argoproj.io` finalizer: removing the app deletes what it
    /// applied.
    pub(crate) delete_resources_on_removal: bool,
    pub(crate) node_selector: Option<String>,
    /// The `edgesync.io/gated` annotation is `"true"`: the app follows the hub's gates.
    pub(crate) gated: bool,
    /// `syncPolicy.managedNamespaceMetadata`.
    pub(crate) namespace_metadata: Option<crate::config::options::NamespaceMetadata>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AppProject {
    pub(crate) name: String,
    pub(crate) spec: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum FleetObject {
    Application(Box<Application>),
    AppProject(AppProject),
}

/// The parse of one object, with a warning for every field that is set but ignored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Parsed {
    pub(crate) object: FleetObject,
    pub(crate) warnings: Vec<String>,
}

/// Fields edgesync reads, or knowingly accepts, at each level.
const APPLICATION_SPEC: [&str; 7] = [
    "project",
    "source",
    "sources",
    "destination",
    "syncPolicy",
    "ignoreDifferences",
    "info",
];
const SOURCE: [&str; 9] = [
    "plugin",
    "repoURL",
    "path",
    "targetRevision",
    "chart",
    "helm",
    "kustomize",
    "directory",
    "ref",
];
const DESTINATION: [&str; 3] = ["server", "namespace", "name"];
const SYNC_POLICY: [&str; 4] = [
    "automated",
    "syncOptions",
    "retry",
    "managedNamespaceMetadata",
];
const AUTOMATED: [&str; 3] = ["prune", "selfHeal", "allowEmpty"];
const METADATA: [&str; 8] = [
    "name",
    "namespace",
    "labels",
    "annotations",
    "finalizers",
    "uid",
    "resourceVersion",
    "creationTimestamp",
];
const APP_PROJECT_SPEC: [&str; 13] = [
    "description",
    "sourceRepos",
    "destinations",
    "clusterResourceWhitelist",
    "clusterResourceBlacklist",
    "namespaceResourceWhitelist",
    "namespaceResourceBlacklist",
    "syncWindows",
    "orphanedResources",
    "signatureKeys",
    "roles",
    "sourceNamespaces",
    "permitOnlyProjectScopedClusters",
];

fn unknown(
    map: Option<&Map<String, Value>>,
    known: &[&str],
    path: &str,
    warnings: &mut Vec<String>,
) {
    for key in map.into_iter().flat_map(|m| m.keys()) {
        if !known.contains(&key.as_str()) {
            warnings.push(format!("{path}.{key} is not supported and is ignored"));
        }
    }
}

fn string(v: &Value, pointer: &str) -> Option<String> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .map(str::to_string)
}

fn flag(v: &Value, pointer: &str) -> bool {
    v.pointer(pointer).and_then(Value::as_bool).unwrap_or(false)
}

/// Reads an Argo CD object; anything else is `None`.
pub(crate) fn parse(object: &Object) -> Result<Option<Parsed>, ArgoError> {
    if object.group() != GROUP {
        return Ok(None);
    }
    let v = Value::Object(object.value.clone());
    let err = |source: SpecError| ArgoError {
        origin: object.origin.clone(),
        kind: object.kind().to_string(),
        name: object.name().to_string(),
        source: Box::new(source),
    };
    let mut warnings = Vec::new();
    unknown(
        v.get("metadata").and_then(Value::as_object),
        &METADATA,
        "metadata",
        &mut warnings,
    );
    match object.kind() {
        "Application" => {
            let app = application(&v, object.name(), &mut warnings).map_err(err)?;
            Ok(Some(Parsed {
                object: FleetObject::Application(Box::new(app)),
                warnings,
            }))
        }
        "AppProject" => {
            let spec = v.get("spec").cloned().unwrap_or(Value::Null);
            unknown(spec.as_object(), &APP_PROJECT_SPEC, "spec", &mut warnings);
            Ok(Some(Parsed {
                object: FleetObject::AppProject(AppProject {
                    name: object.name().to_string(),
                    spec,
                }),
                warnings,
            }))
        }
        other => Err(err(SpecError::Kind(other.to_string()))),
    }
}

fn application(
    v: &Value,
    name: &str,
    warnings: &mut Vec<String>,
) -> Result<Application, SpecError> {
    let spec = v.get("spec").and_then(Value::as_object);
    unknown(spec, &APPLICATION_SPEC, "spec", warnings);
    let sources = sources_of(v, warnings)?;
    let destination = v.pointer("/spec/destination");
    unknown(
        destination.and_then(Value::as_object),
        &DESTINATION,
        "spec.destination",
        warnings,
    );
    check_in_cluster(destination)?;
    let policy = v.pointer("/spec/syncPolicy");
    unknown(
        policy.and_then(Value::as_object),
        &SYNC_POLICY,
        "spec.syncPolicy",
        warnings,
    );
    let finalizers: BTreeSet<&str> = v
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    Ok(Application {
        name: name.to_string(),
        project: string(v, "/spec/project").unwrap_or_else(|| "default".into()),
        sources,
        namespace: destination.and_then(|d| string(d, "/namespace")),
        automated: automated_of(policy, warnings),
        namespace_metadata: policy
            .and_then(|p| p.get("managedNamespaceMetadata"))
            .map(|m| namespace_metadata(m, warnings)),
        sync_options: sync_options_of(policy, warnings),
        retry: policy.and_then(|p| p.get("retry")).cloned(),
        ignore_differences: v
            .pointer("/spec/ignoreDifferences")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        delete_resources_on_removal: finalizers.iter().any(|f| f.starts_with(DELETE_FINALIZER)),
        node_selector: string(
            v,
            &format!(
                "/metadata/annotations/{}",
                NODE_SELECTOR_ANNOTATION.replace('/', "~1")
            ),
        ),
        gated: string(
            v,
            &format!(
                "/metadata/annotations/{}",
                GATED_ANNOTATION.replace('/', "~1")
            ),
        )
        .is_some_and(|g| g == "true"),
    })
}

/// `spec.sources` (Argo CD then ignores `spec.source`), or `spec.source`.
fn sources_of(v: &Value, warnings: &mut Vec<String>) -> Result<Vec<Source>, SpecError> {
    let Some(list) = v.pointer("/spec/sources").filter(|s| !s.is_null()) else {
        let source = v
            .pointer("/spec/source")
            .ok_or_else(|| SpecError::Missing("spec.source".into()))?;
        return Ok(vec![source_of(source, "spec.source", warnings)?]);
    };
    let list = list.as_array().ok_or_else(|| SpecError::Type {
        field: "spec.sources".into(),
        expected: "a list",
    })?;
    if v.pointer("/spec/source").is_some_and(|s| !s.is_null()) {
        warnings.push("spec.source is ignored: spec.sources is set".into());
    }
    let mut sources = Vec::new();
    let mut refs = BTreeSet::new();
    for (i, source) in list.iter().enumerate() {
        let field = format!("spec.sources[{i}]");
        let source = source_of(source, &field, warnings)?;
        if let Some(name) = &source.spec.ref_name {
            if !refs.insert(name.clone()) {
                return Err(SpecError::Unsupported {
                    field: format!("{field}.ref {name:?}"),
                    instead: "another source has the same ref",
                });
            }
        }
        sources.push(source);
    }
    if !sources.iter().any(|s| s.spec.renders()) {
        return Err(SpecError::NothingToRender);
    }
    Ok(sources)
}

/// One source at `field`: a Git path (plain, Kustomize or a chart in Git), a chart of a Helm
/// repository, or (with `ref` and no path) files for the others' `$ref/...` value files.
fn source_of(source: &Value, field: &str, warnings: &mut Vec<String>) -> Result<Source, SpecError> {
    unknown(source.as_object(), &SOURCE, field, warnings);
    let repo_url =
        string(source, "/repoURL").ok_or_else(|| SpecError::Missing(format!("{field}.repoURL")))?;
    let chart = string(source, "/chart");
    let ref_name = string(source, "/ref");
    if let Some(name) = &ref_name {
        crate::config::check_dns_label(name).map_err(|source| SpecError::Invalid {
            field: format!("{field}.ref"),
            source,
        })?;
    }
    // Argo CD writes OCI registries without a scheme (`registry.example.com/charts`).
    let repo = if chart.is_some() && !repo_url.contains("://") {
        format!("oci://{repo_url}")
    } else {
        repo_url
    };
    let path = string(source, "/path");
    let spec = AppSource {
        repo,
        revision: string(source, "/targetRevision").unwrap_or_else(|| "HEAD".into()),
        path: match (&chart, path, &ref_name) {
            (Some(_), _, _) => None,
            (None, Some(path), _) => Some(path),
            // A single source without a path is the repository's root.
            (None, None, None) => Some(".".into()),
            (None, None, Some(_)) => None,
        },
        chart,
        ref_name,
        helm: helm_options(source.get("helm"), field, warnings)?,
        kustomize: kustomize_options(source.get("kustomize"), field, warnings)?,
        directory: directory_options(source.get("directory"), field, warnings),
    };
    let plugin = source.get("plugin").filter(|p| !p.is_null());
    if let Some(p) = plugin {
        unknown(
            p.as_object(),
            &["name", "env"],
            &format!("{field}.plugin"),
            warnings,
        );
    }
    let mut plugin_env = BTreeMap::new();
    for entry in plugin
        .and_then(|p| p.get("env"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = string(entry, "/name")
            .ok_or_else(|| SpecError::Missing(format!("{field}.plugin.env[].name")))?;
        plugin_env.insert(name, string(entry, "/value").unwrap_or_default());
    }
    Ok(Source {
        spec,
        plugin: plugin.map(|p| string(p, "/name").unwrap_or_else(|| "(found by discovery)".into())),
        plugin_env,
    })
}

/// A node agent applies to the cluster it runs on: `spec.destination` may only name it.
fn check_in_cluster(destination: Option<&Value>) -> Result<(), SpecError> {
    if let Some(server) = destination.and_then(|d| string(d, "/server")) {
        if !IN_CLUSTER.contains(&server.as_str()) {
            return Err(SpecError::Destination {
                field: "server",
                value: server,
            });
        }
    }
    if let Some(other) = destination
        .and_then(|d| string(d, "/name"))
        .filter(|n| n != "in-cluster")
    {
        return Err(SpecError::Destination {
            field: "name",
            value: other,
        });
    }
    Ok(())
}

/// `spec.syncPolicy.managedNamespaceMetadata`: labels and annotations for the namespace
/// `CreateNamespace=true` creates. A value that is not a string is reported and left out.
fn namespace_metadata(
    v: &Value,
    warnings: &mut Vec<String>,
) -> crate::config::options::NamespaceMetadata {
    unknown(
        v.as_object(),
        &["labels", "annotations"],
        "spec.syncPolicy.managedNamespaceMetadata",
        warnings,
    );
    let mut strings = |key: &str| -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (k, value) in v.get(key).and_then(Value::as_object).into_iter().flatten() {
            match value.as_str() {
                Some(text) => {
                    out.insert(k.clone(), text.to_string());
                }
                None => warnings.push(format!(
                    "spec.syncPolicy.managedNamespaceMetadata.{key}.{k} is not a string and is ignored"
                )),
            }
        }
        out
    };
    crate::config::options::NamespaceMetadata {
        labels: strings("labels"),
        annotations: strings("annotations"),
    }
}

/// `spec.syncPolicy.automated`, when the Application syncs automatically.
fn automated_of(policy: Option<&Value>, warnings: &mut Vec<String>) -> Option<Automated> {
    policy.and_then(|p| p.get("automated")).map(|a| {
        unknown(
            a.as_object(),
            &AUTOMATED,
            "spec.syncPolicy.automated",
            warnings,
        );
        Automated {
            prune: flag(a, "/prune"),
            self_heal: flag(a, "/selfHeal"),
            allow_empty: flag(a, "/allowEmpty"),
        }
    })
}

/// `spec.syncPolicy.syncOptions`; one edgesync does not know is reported and ignored.
fn sync_options_of(policy: Option<&Value>, warnings: &mut Vec<String>) -> Vec<String> {
    let sync_options: Vec<String> = policy
        .and_then(|p| p.get("syncOptions"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|o| o.as_str().map(str::to_string))
        .collect();
    for option in &sync_options {
        if let Err(why) = sync_policy::check_sync_option(option) {
            warnings.push(format!("spec.syncPolicy.syncOptions: {why}; ignored"));
        }
    }
    sync_options
}

impl Application {
    fn has_option(&self, option: &str) -> bool {
        self.sync_options
            .iter()
            .any(|o| o.trim().eq_ignore_ascii_case(option))
    }

    /// The app as edgesync runs it, or why it cannot run. The first source that renders is the
    /// app's own; the others follow it in `sources`, in the Application's order.
    pub(crate) fn to_app_config(&self) -> Result<AppConfig, SpecError> {
        let main = self
            .sources
            .iter()
            .position(|s| s.spec.renders())
            .ok_or(SpecError::NothingToRender)?;
        let own = &self.sources[main].spec;
        if let Some((i, _)) = self
            .sources
            .iter()
            .enumerate()
            .find(|(i, s)| *i != main && s.plugin.is_some())
        {
            return Err(SpecError::Unsupported {
                field: format!("spec.sources[{i}].plugin"),
                instead: "only the first source that renders may name a plugin",
            });
        }
        let sources = self
            .sources
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != main)
            .map(|(_, s)| s.spec.clone())
            .collect();
        let automated = self.automated.clone().unwrap_or_default();
        Ok(AppConfig {
            name: self.name.clone(),
            repo: own.repo.clone(),
            revision: own.revision.clone(),
            chart: own.chart.clone(),
            path: own.path.clone().unwrap_or_else(|| ".".into()),
            namespace: self.namespace.clone(),
            create_namespace: self.has_option("CreateNamespace=true"),
            prune: automated.prune,
            allow_empty: automated.allow_empty,
            node_selector: self.node_selector.clone(),
            project: Some(self.project.clone()),
            substitute: Default::default(),
            variables: Default::default(),
            kustomize_fallback: None,
            helm: own.helm.clone(),
            automated: self.automated.is_some(),
            self_heal: automated.self_heal,
            sync_options: self
                .sync_options
                .iter()
                .filter(|o| sync_policy::check_sync_option(o).is_ok())
                .cloned()
                .collect(),
            retry: match &self.retry {
                Some(retry) => retry_policy(retry)?,
                None => Default::default(),
            },
            ignore_differences: self
                .ignore_differences
                .iter()
                .map(ignore_difference)
                .collect::<Result<_, _>>()?,
            sync_windows: Vec::new(),
            health_timeout: None,
            rollback: Default::default(),
            delete_on_removal: self.delete_resources_on_removal,
            kustomize: own.kustomize.clone(),
            directory: own.directory.clone(),
            namespace_metadata: self.namespace_metadata.clone(),
            plugin: self.sources[main].plugin.clone(),
            plugin_env: self.sources[main].plugin_env.clone(),
            sources,
            gated: self.gated,
        })
    }
}

const KUSTOMIZE: [&str; 6] = [
    "namePrefix",
    "nameSuffix",
    "namespace",
    "commonLabels",
    "commonAnnotations",
    "images",
];
const DIRECTORY: [&str; 3] = ["recurse", "include", "exclude"];
const HELM: [&str; 7] = [
    "releaseName",
    "skipCrds",
    "values",
    "valuesObject",
    "valueFiles",
    "parameters",
    "ignoreMissingValueFiles",
];

/// `spec.source.kustomize`: the options Argo CD applies with `kustomize edit`.
fn kustomize_options(
    v: Option<&Value>,
    field: &str,
    warnings: &mut Vec<String>,
) -> Result<crate::render::kustomize::Overrides, SpecError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(Default::default());
    };
    let field = format!("{field}.kustomize");
    unknown(v.as_object(), &KUSTOMIZE, &field, warnings);
    let map = |key: &str| -> std::collections::BTreeMap<String, String> {
        v.get(key)
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                let text = v
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string());
                (k.clone(), text)
            })
            .collect()
    };
    let images: Vec<String> = v
        .get("images")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| i.as_str().map(str::to_string))
        .collect();
    for image in &images {
        if image.is_empty() {
            return Err(SpecError::Type {
                field: format!("{field}.images[]"),
                expected: "an image, not empty",
            });
        }
    }
    Ok(crate::render::kustomize::Overrides {
        name_prefix: string(v, "/namePrefix"),
        name_suffix: string(v, "/nameSuffix"),
        namespace: string(v, "/namespace"),
        common_labels: map("commonLabels"),
        common_annotations: map("commonAnnotations"),
        images,
    })
}

/// `spec.source.directory`: `recurse` (false unless set, as in Argo CD), `include`, `exclude`.
fn directory_options(
    v: Option<&Value>,
    field: &str,
    warnings: &mut Vec<String>,
) -> crate::render::DirectoryOptions {
    let v = v.filter(|v| !v.is_null());
    if let Some(v) = v {
        unknown(
            v.as_object(),
            &DIRECTORY,
            &format!("{field}.directory"),
            warnings,
        );
    }
    crate::render::DirectoryOptions {
        recurse: v.is_some_and(|v| flag(v, "/recurse")),
        include: v.and_then(|v| string(v, "/include")),
        exclude: v.and_then(|v| string(v, "/exclude")),
    }
}

/// `spec.syncPolicy.retry`: `limit` and `backoff` (`duration`, `factor`, `maxDuration`).
fn retry_policy(retry: &Value) -> Result<sync_policy::Retry, SpecError> {
    let mut out = sync_policy::Retry::default();
    if let Some(limit) = retry.get("limit") {
        out.limit = limit.as_i64().ok_or_else(|| SpecError::Type {
            field: "spec.syncPolicy.retry.limit".into(),
            expected: "an integer",
        })?;
    }
    let backoff = retry.get("backoff");
    let duration = |key: &str| -> Result<Option<std::time::Duration>, SpecError> {
        match backoff.and_then(|b| b.get(key)) {
            None => Ok(None),
            Some(v) => {
                let text = v
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string());
                // Argo CD takes a bare number as seconds.
                let text = if text.bytes().all(|b| b.is_ascii_digit()) {
                    format!("{text}s")
                } else {
                    text
                };
                crate::config::sync_policy::human::parse(&text)
                    .map(Some)
                    .map_err(|source| SpecError::Duration {
                        field: format!("spec.syncPolicy.retry.backoff.{key}"),
                        source,
                    })
            }
        }
    };
    if let Some(d) = duration("duration")? {
        out.backoff.duration = d;
    }
    if let Some(d) = duration("maxDuration")? {
        out.backoff.max_duration = d;
    }
    if let Some(factor) = backoff.and_then(|b| b.get("factor")) {
        out.backoff.factor = factor
            .as_u64()
            .and_then(|f| u32::try_from(f).ok())
            .filter(|f| *f >= 1)
            .ok_or_else(|| SpecError::Type {
                field: "spec.syncPolicy.retry.backoff.factor".into(),
                expected: "a positive integer",
            })?;
    }
    Ok(out)
}

/// One `spec.ignoreDifferences` entry.
fn ignore_difference(v: &Value) -> Result<sync_policy::IgnoreDifference, SpecError> {
    if v.get("jqPathExpressions").is_some() {
        return Err(SpecError::Unsupported {
            field: "spec.ignoreDifferences[].jqPathExpressions".into(),
            instead: "use jsonPointers",
        });
    }
    let strings = |key: &str| -> Vec<String> {
        v.get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    Ok(sync_policy::IgnoreDifference {
        group: string(v, "/group").unwrap_or_default(),
        kind: string(v, "/kind")
            .ok_or_else(|| SpecError::Missing("spec.ignoreDifferences[].kind".into()))?,
        name: string(v, "/name"),
        namespace: string(v, "/namespace"),
        json_pointers: strings("jsonPointers"),
        managed_fields_managers: strings("managedFieldsManagers"),
    })
}

/// Argo CD's `source.helm`: `releaseName`, `values` (text) or `valuesObject`, `valueFiles` and
/// `parameters` (`forceString` included; helm's `--set` reads the value as given).
fn helm_options(
    helm: Option<&Value>,
    field: &str,
    warnings: &mut Vec<String>,
) -> Result<Option<crate::render::helm::HelmOptions>, SpecError> {
    let Some(helm) = helm.filter(|h| !h.is_null()) else {
        return Ok(None);
    };
    let field = format!("{field}.helm");
    unknown(helm.as_object(), &HELM, &field, warnings);
    let mut options = crate::render::helm::HelmOptions {
        release_name: string(helm, "/releaseName"),
        values: string(helm, "/values"),
        ignore_missing_value_files: flag(helm, "/ignoreMissingValueFiles"),
        skip_crds: flag(helm, "/skipCrds"),
        ..Default::default()
    };
    if let Some(object) = helm.get("valuesObject").filter(|v| !v.is_null()) {
        let field = format!("{field}.valuesObject");
        let mapping = object.as_object().ok_or_else(|| SpecError::Type {
            field: field.clone(),
            expected: "a mapping",
        })?;
        let text =
            crate::render::to_yaml_stream([mapping]).map_err(|source| SpecError::Values {
                field,
                source: Box::new(source),
            })?;
        options.values = Some(text);
    }
    if let Some(files) = helm.get("valueFiles").and_then(Value::as_array) {
        for f in files {
            let f = f.as_str().ok_or_else(|| SpecError::Type {
                field: format!("{field}.valueFiles[]"),
                expected: "a string",
            })?;
            options.value_files.push(f.to_string());
        }
    }
    if let Some(params) = helm.get("parameters").and_then(Value::as_array) {
        for p in params {
            let name = string(p, "/name")
                .ok_or_else(|| SpecError::Missing(format!("{field}.parameters[].name")))?;
            let value = match p.get("value") {
                Some(Value::String(s)) => s.clone(),
                Some(other) if !other.is_null() => other.to_string(),
                _ => String::new(),
            };
            options.parameters.insert(name, value);
        }
    }
    Ok(Some(options))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::parse_documents;
    use std::path::Path;

    fn load(file: &str) -> Result<Vec<Parsed>, String> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/argocd")
            .join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let docs = parse_documents(&text, Path::new(file)).map_err(|e| e.to_string())?;
        docs.into_iter()
            .filter_map(|d| d.as_object().cloned())
            .map(|value| {
                let object = Object {
                    value,
                    origin: format!("{file}#0"),
                };
                parse(&object)
                    .map(|p| p.expect("an Argo CD object"))
                    .map_err(|e| e.to_string())
            })
            .collect()
    }

    fn app(parsed: &Parsed) -> &Application {
        match &parsed.object {
            FleetObject::Application(a) => a,
            other => panic!("not an Application: {other:?}"),
        }
    }

    #[test]
    fn seed_app_of_apps_loads_without_warnings() {
        let parsed = load("app-of-apps.yaml").unwrap();
        assert_eq!(parsed[0].warnings, Vec::<String>::new());
        let a = app(&parsed[0]);
        assert_eq!(a.project, "dictamesh");
        assert!(a.delete_resources_on_removal);
        let automated = a.automated.clone().unwrap();
        assert!(automated.prune && automated.self_heal && !automated.allow_empty);
        let cfg = a.to_app_config().unwrap();
        assert_eq!(
            (cfg.repo.as_str(), cfg.revision.as_str(), cfg.path.as_str()),
            (
                "https://github.com/dictamesh/dictamesh.git",
                "develop",
                "infrastructure/argocd/applications/dev"
            )
        );
        assert!(cfg.create_namespace && cfg.prune);
        assert_eq!(cfg.namespace.as_deref(), Some("argocd"));
    }

    #[test]
    fn seed_customer_adapter_has_two_sync_policies_which_is_a_yaml_error() {
        // The seed writes `syncPolicy` twice in one mapping. Go's YAML (kubectl, Argo CD)
        // refuses duplicate keys, and so do we, naming the key and the line.
        let err = load("customer-adapter.yaml").unwrap_err();
        assert!(err.contains("syncPolicy"), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn kustomize_and_directory_options_map_and_argo_does_not_recurse_by_default() {
        let manifest = |source_extra: &str| {
            let text = format!(
                "apiVersion: argoproj.io/v1alpha1\nkind: Application\nmetadata:\n  name: a\nspec:\n  project: default\n  source:\n    repoURL: https://git.example.com/r.git\n    path: p\n{source_extra}  destination:\n    server: https://kubernetes.default.svc\n    namespace: ns\n"
            );
            let doc =
                crate::render::parse_documents(&text, std::path::Path::new("a.yaml")).unwrap();
            let object = crate::render::Object {
                value: doc[0].as_object().unwrap().clone(),
                origin: "a.yaml#0".into(),
            };
            parse(&object).unwrap().unwrap()
        };
        let plain = manifest("");
        let cfg = app(&plain).to_app_config().unwrap();
        assert!(!cfg.directory.recurse);
        let k = manifest("    kustomize:\n      namePrefix: edge-\n      images: [nginx=nginx:1.28]\n      commonLabels: {team: edge}\n      replicas: []\n    directory:\n      recurse: true\n      exclude: 'skip/*'\n");
        assert_eq!(
            k.warnings,
            ["spec.source.kustomize.replicas is not supported and is ignored"]
        );
        let cfg = app(&k).to_app_config().unwrap();
        assert_eq!(cfg.kustomize.name_prefix.as_deref(), Some("edge-"));
        assert_eq!(cfg.kustomize.images, ["nginx=nginx:1.28"]);
        assert_eq!(cfg.kustomize.common_labels["team"], "edge");
        assert!(cfg.directory.recurse);
        assert_eq!(cfg.directory.exclude.as_deref(), Some("skip/*"));
    }

    #[test]
    fn seed_kafka_is_a_helm_chart_app() {
        let parsed = load("kafka.yaml").unwrap();
        assert_eq!(parsed[0].warnings, Vec::<String>::new());
        let [source] = app(&parsed[0]).sources.as_slice() else {
            panic!("one source");
        };
        let source = &source.spec;
        assert_eq!(source.chart.as_deref(), Some("kafka"));
        assert_eq!(source.revision, "26.4.3");
        let helm = source.helm.as_ref().unwrap();
        assert_eq!(helm.release_name.as_deref(), Some("kafka"));
        assert!(helm.values.as_deref().unwrap().contains("replicaCount: 1"));
        let config = app(&parsed[0]).to_app_config().unwrap();
        assert_eq!(config.repo, "https://charts.bitnami.com/bitnami");
        assert_eq!(config.chart.as_deref(), Some("kafka"));
        assert_eq!(config.revision, "26.4.3");
    }

    #[test]
    fn seed_blacklist_and_project_load() {
        let parsed = load("blacklist.yaml").unwrap();
        assert_eq!(parsed[0].warnings, Vec::<String>::new());
        let a = app(&parsed[0]);
        assert_eq!(
            a.sync_options,
            [
                "CreateNamespace=true",
                "PrunePropagationPolicy=foreground",
                "PruneLast=true"
            ]
        );
        assert_eq!(a.retry.as_ref().unwrap()["limit"], 5);
        let parsed = load("dictamesh-project.yaml").unwrap();
        assert_eq!(parsed[0].warnings, Vec::<String>::new());
        let FleetObject::AppProject(p) = &parsed[0].object else {
            panic!()
        };
        assert_eq!(p.spec["destinations"][0]["namespace"], "dictamesh-*");
    }

    fn application_object(spec: Value) -> Object {
        let value = serde_json::json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
            "metadata": {"name": "x", "annotations": {"edgesync.io/node-selector": "site=plant-7"}},
            "spec": spec});
        Object {
            value: value.as_object().unwrap().clone(),
            origin: "t.yaml#0".into(),
        }
    }

    #[test]
    fn the_gated_annotation_gates_the_app() {
        let mut object = application_object(serde_json::json!({
            "source": {"repoURL": "https://g/r.git", "path": "p"},
            "destination": {"server": "https://kubernetes.default.svc", "namespace": "web"}
        }));
        let plain = parse(&object).unwrap().unwrap();
        assert!(!app(&plain).to_app_config().unwrap().gated);
        object.value["metadata"]["annotations"]["edgesync.io/gated"] = "true".into();
        let gated = parse(&object).unwrap().unwrap();
        assert!(app(&gated).to_app_config().unwrap().gated);
    }

    #[test]
    fn managed_namespace_metadata_reaches_the_app() {
        let parsed = parse(&application_object(serde_json::json!({
            "source": {"repoURL": "https://g/r.git", "path": "p"},
            "destination": {"server": "https://kubernetes.default.svc", "namespace": "web"},
            "syncPolicy": {
                "syncOptions": ["CreateNamespace=true"],
                "managedNamespaceMetadata": {
                    "labels": {"team": "edge", "count": 3},
                    "annotations": {"owner": "ops"}
                }
            }
        })))
        .unwrap()
        .unwrap();
        assert_eq!(
            parsed.warnings,
            ["spec.syncPolicy.managedNamespaceMetadata.labels.count is not a string and is ignored"]
        );
        let config = app(&parsed).to_app_config().unwrap();
        assert!(config.creates_namespace());
        let metadata = config.namespace_metadata.unwrap();
        assert_eq!(metadata.labels["team"], "edge");
        assert_eq!(metadata.annotations["owner"], "ops");
    }

    #[test]
    fn unknown_fields_are_named_and_remote_clusters_refused() {
        let parsed = parse(&application_object(serde_json::json!({
            "source": {"repoURL": "https://g/r.git", "path": "p", "plugin": {}},
            "destination": {"server": "https://kubernetes.default.svc"},
            "revisionHistoryLimit": 3
        })))
        .unwrap()
        .unwrap();
        assert_eq!(
            parsed.warnings,
            ["spec.revisionHistoryLimit is not supported and is ignored"]
        );
        // A plugin is not ignored: the app carries it, and fails at render saying so.
        let config = app(&parsed).to_app_config().unwrap();
        assert_eq!(config.plugin.as_deref(), Some("(found by discovery)"));
        assert_eq!(app(&parsed).node_selector.as_deref(), Some("site=plant-7"));
        let err = parse(&application_object(serde_json::json!({
            "source": {"repoURL": "https://g/r.git"},
            "destination": {"server": "https://prod.example.com:6443"}
        })))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("not supported on a node agent") && err.contains("Application x"),
            "{err}"
        );
    }

    #[test]
    fn a_retry_duration_beyond_any_clock_is_refused_naming_the_key() {
        for (key, value) in [
            ("maxDuration", "300000000000y"),
            ("duration", "9999999999999999s"),
        ] {
            let parsed = parse(&application_object(serde_json::json!({
                "source": {"repoURL": "https://g/r.git", "path": "p"},
                "destination": {"server": "https://kubernetes.default.svc", "namespace": "n"},
                "syncPolicy": {"automated": {}, "retry": {"limit": 2, "backoff": {key: value}}}
            })))
            .unwrap()
            .unwrap();
            let err = app(&parsed).to_app_config().unwrap_err().to_string();
            assert!(
                err.contains(&format!("spec.syncPolicy.retry.backoff.{key}"))
                    && err.contains("longer"),
                "{err}"
            );
        }
    }

    #[test]
    fn sources_become_the_apps_own_source_and_its_other_sources() {
        let parsed = parse(&application_object(serde_json::json!({
            "sources": [
                {"repoURL": "https://g/values.git", "targetRevision": "main", "ref": "values"},
                {"repoURL": "registry.local/charts", "chart": "web", "targetRevision": "1.2.3",
                 "helm": {"valueFiles": ["$values/prod.yaml"], "ignoreMissingValueFiles": true}},
                {"repoURL": "https://g/extra.git", "path": "extra"}
            ],
            "source": {"repoURL": "https://g/ignored.git"},
            "destination": {"server": "https://kubernetes.default.svc", "namespace": "web"}
        })))
        .unwrap()
        .unwrap();
        assert_eq!(
            parsed.warnings,
            ["spec.source is ignored: spec.sources is set"]
        );
        let cfg = app(&parsed).to_app_config().unwrap();
        // The first source that renders is the app's own: the chart.
        assert_eq!(cfg.repo, "oci://registry.local/charts");
        assert_eq!(cfg.chart.as_deref(), Some("web"));
        let helm = cfg.helm.as_ref().unwrap();
        assert_eq!(helm.value_files, ["$values/prod.yaml"]);
        assert!(helm.ignore_missing_value_files);
        // The others keep their order: the ref source (no path: not rendered), then extra.
        assert_eq!(cfg.sources.len(), 2);
        assert_eq!(cfg.sources[0].ref_name.as_deref(), Some("values"));
        assert!(!cfg.sources[0].renders());
        assert_eq!(cfg.sources[1].path.as_deref(), Some("extra"));
        assert_eq!(cfg.sources[1].revision, "HEAD");
        assert!(cfg.sources[1].renders());
        let repos: Vec<&str> = cfg.repositories().map(|(url, _)| url).collect();
        assert_eq!(
            repos,
            [
                "oci://registry.local/charts",
                "https://g/values.git",
                "https://g/extra.git"
            ]
        );
    }

    #[test]
    fn sources_that_only_give_files_or_share_a_ref_are_refused() {
        for (sources, expected) in [
            (
                serde_json::json!([{"repoURL": "https://g/v.git", "ref": "values"}]),
                "no source renders",
            ),
            (
                serde_json::json!([
                    {"repoURL": "https://g/v.git", "ref": "values"},
                    {"repoURL": "https://g/w.git", "ref": "values", "path": "p"}
                ]),
                "same ref",
            ),
            (
                serde_json::json!([{"repoURL": "https://g/v.git", "ref": "Not A Label", "path": "p"}]),
                "spec.sources[0].ref",
            ),
        ] {
            let err = parse(&application_object(serde_json::json!({
                "sources": sources,
                "destination": {"server": "https://kubernetes.default.svc", "namespace": "web"}
            })))
            .unwrap_err()
            .to_string();
            assert!(err.contains(expected), "{err}");
        }
    }
}
