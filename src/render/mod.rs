//! Render stage: turns a [`Snapshot`](crate::source::Snapshot)'s directory into [`Manifests`],
//! the plain Kubernetes objects to apply. Pure apart from reading files inside the checkout.
//!
//! A directory with a `kustomization.yaml` is built by the native Kustomize engine
//! ([`kustomize`]); any other directory is read as plain manifests.

pub(crate) mod directory;
pub(crate) mod helm;
mod helm_deps;
pub(crate) mod kustomize;
pub(crate) mod plugin;
pub(crate) mod process;
pub(crate) mod substitute;
pub(crate) mod yaml;

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

pub(crate) use directory::{render_directory, DirectoryOptions};
pub use yaml::parse_documents;
pub(crate) use yaml::to_yaml_stream;

/// Largest manifest file accepted; anything bigger is almost certainly not a manifest.
pub(crate) const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("path {path} does not exist in the repository")]
    PathNotFound { path: PathBuf },
    #[error("{path} resolves outside the repository checkout; refusing to read it")]
    OutsideCheckout { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is {size} bytes, more than the {max} byte limit for a manifest file")]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    /// Only the first line of the parser's message: the rest quotes the file around the
    /// error, which may be a Secret's values, so the parser's error is not kept as a source.
    #[error("{path}: invalid YAML: {message}")]
    Yaml { path: PathBuf, message: String },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: document {document}: {message}")]
    InvalidObject {
        path: PathBuf,
        document: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Kustomize { path: PathBuf, message: String },
    /// A source edgesync cannot render (Jsonnet, a config management plugin): the app fails
    /// rather than rendering what it can and showing Synced.
    #[error("{path}: {what} cannot be rendered by edgesync; the app is not synced")]
    Unsupported { path: PathBuf, what: String },
    /// The kustomization (built natively or by the fallback) would fetch what the app's project
    /// does not allow.
    #[error("{path}: the kustomization would fetch {entry}: {source}")]
    RemoteRefused {
        path: PathBuf,
        entry: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "{path}: {what} is not supported by edgesync's Kustomize engine; set the app's \
         kustomize_fallback (for example \"kubectl kustomize\") to build it with an external binary"
    )]
    KustomizeUnsupported { path: PathBuf, what: String },
    #[error("app {app}: chart {path}: {message}")]
    Helm {
        app: String,
        path: PathBuf,
        message: String,
    },
    #[error("{path}: the fallback `{command}` failed: {message}")]
    KustomizeFallback {
        path: PathBuf,
        command: String,
        message: String,
    },
    #[error("app {app}: chart {path}: {source}")]
    HelmPrepare {
        app: String,
        path: PathBuf,
        source: helm_deps::PrepareError,
    },
    #[error("{path}: the config management plugin {plugin}: {message}")]
    Plugin {
        plugin: String,
        path: PathBuf,
        message: String,
    },
    #[error("substitution in {object} ({origin}): {source}")]
    Substitution {
        object: String,
        origin: String,
        source: substitute::UnsetVariable,
    },
}

impl RenderError {
    pub(crate) fn metric_label(&self) -> crate::metrics::ErrorKind {
        use crate::metrics::ErrorKind;
        match self {
            RenderError::PathNotFound { .. } => ErrorKind::RenderPathNotFound,
            RenderError::OutsideCheckout { .. } => ErrorKind::RenderOutsideCheckout,
            RenderError::Io { .. } => ErrorKind::RenderIo,
            RenderError::TooLarge { .. } => ErrorKind::RenderTooLarge,
            RenderError::Yaml { .. } | RenderError::Json { .. } => ErrorKind::RenderParse,
            RenderError::InvalidObject { .. } => ErrorKind::RenderInvalidObject,
            RenderError::Kustomize { .. }
            | RenderError::KustomizeFallback { .. }
            | RenderError::RemoteRefused { .. } => ErrorKind::RenderKustomize,
            RenderError::KustomizeUnsupported { .. } | RenderError::Unsupported { .. } => {
                ErrorKind::RenderUnsupported
            }
            RenderError::Helm { .. } | RenderError::HelmPrepare { .. } => ErrorKind::RenderHelm,
            RenderError::Substitution { .. } => ErrorKind::RenderSubstitution,
            RenderError::Plugin { .. } => ErrorKind::RenderPlugin,
        }
    }
}

/// One Kubernetes object, with where it came from for error messages.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Object {
    pub(crate) value: Map<String, Value>,
    /// `path/in/repo.yaml#2`: file relative to the checkout and document index.
    pub(crate) origin: String,
}

impl Object {
    pub(crate) fn api_version(&self) -> &str {
        self.str_field("apiVersion")
    }
    pub(crate) fn kind(&self) -> &str {
        self.str_field("kind")
    }
    pub(crate) fn name(&self) -> &str {
        self.metadata_str("name").unwrap_or_default()
    }
    pub(crate) fn namespace(&self) -> Option<&str> {
        self.metadata_str("namespace").filter(|s| !s.is_empty())
    }
    /// API group, empty for the core group.
    pub(crate) fn group(&self) -> &str {
        self.api_version()
            .rsplit_once('/')
            .map(|(g, _)| g)
            .unwrap_or("")
    }
    pub(crate) fn version(&self) -> &str {
        let v = self.api_version();
        v.rsplit_once('/').map(|(_, v)| v).unwrap_or(v)
    }
    fn str_field(&self, key: &str) -> &str {
        self.value.get(key).and_then(Value::as_str).unwrap_or("")
    }
    fn metadata_str(&self, key: &str) -> Option<&str> {
        self.value.get("metadata")?.get(key)?.as_str()
    }
    /// The object's metadata, made a mapping first if it is missing or malformed.
    pub(crate) fn metadata_mut(&mut self) -> Option<&mut Map<String, Value>> {
        metadata_of(&mut self.value)
    }
    /// `Kind namespace/name` or `Kind name`, as used in messages.
    pub(crate) fn display_name(&self) -> String {
        match self.namespace() {
            Some(ns) => format!("{} {}/{}", self.kind(), ns, self.name()),
            None => format!("{} {}", self.kind(), self.name()),
        }
    }
}

/// The rendered objects of one app, in render order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Manifests {
    pub(crate) objects: Vec<Object>,
}

impl Manifests {
    /// How many objects the render holds.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

/// Renders `app_path` inside the checkout at `root`.
pub fn render(root: &Path, app_path: &Path) -> Result<Manifests, RenderError> {
    render_with(root, app_path, &RenderOptions::default())
}

/// What an app adds to a render.
#[derive(Debug, Default)]
pub(crate) struct RenderOptions<'a> {
    /// Builds kustomizations the native engine does not support (`kubectl kustomize`, ...).
    pub(crate) kustomize_fallback: Option<&'a str>,
    /// The app's Helm release, for a directory holding a chart; without it, the release is
    /// named after the directory and `helm` is looked up on PATH.
    pub(crate) helm: Option<helm::HelmRequest>,
    /// The app asks for Helm explicitly (Argo CD's `source.helm`): a directory holding both a
    /// chart and a kustomization is rendered as the chart. Otherwise the kustomization wins,
    /// as in Argo CD's source-type detection.
    pub(crate) explicit_helm: bool,
    /// How a plain directory is read.
    pub(crate) directory: directory::DirectoryOptions,
    /// Changes to the app's kustomization (Argo CD's `source.kustomize`).
    pub(crate) kustomize: kustomize::Overrides,
    /// Which remote sources the kustomize fallback may fetch (the AppProject's
    /// `sourceRepos`); `None`: any.
    pub(crate) remote_policy: Option<RemotePolicy>,
    /// The config management plugin that renders the path instead (`[[plugins]]`).
    pub(crate) plugin: Option<plugin::PluginRequest>,
    /// Local copies of the kustomization's remote bases and charts, fetched before the render.
    pub(crate) fetched: kustomize::remote::Fetched,
}

/// Whether a repository URL may be fetched (`Err` says why not).
pub(crate) type RemoteCheck =
    dyn Fn(&str) -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send + Sync;

/// Says whether a repository URL may be fetched, and why not.
#[derive(Clone)]
pub(crate) struct RemotePolicy(pub(crate) std::sync::Arc<RemoteCheck>);

impl std::fmt::Debug for RemotePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RemotePolicy")
    }
}

/// Renders `app_path`: a Helm chart (a `Chart.yaml`), a kustomization, or plain manifests.
pub(crate) fn render_with(
    root: &Path,
    app_path: &Path,
    options: &RenderOptions,
) -> Result<Manifests, RenderError> {
    let dir = directory::contained_path(root, app_path)?;
    let root = &root.canonicalize().map_err(|source| RenderError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    if let Some(request) = &options.plugin {
        return plugin::generate(root, &dir, request);
    }
    let kustomization = kustomize::kustomization_file(&dir).is_some();
    if helm::is_chart(&dir) && (options.explicit_helm || !kustomization) {
        let request = options.helm.clone().unwrap_or_else(|| helm::HelmRequest {
            app: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "release".into()),
            namespace: None,
            options: Default::default(),
            binary: "helm".into(),
            kube_version: None,
            api_versions: Vec::new(),
            dependency_cache: None,
            refs: Default::default(),
            credentials: Vec::new(),
            ..Default::default()
        });
        return helm::template(root, &dir, &request);
    }
    let overridden = !options.kustomize.is_empty();
    let rel = || dir.strip_prefix(root).unwrap_or(&dir).to_path_buf();
    if !kustomization {
        if overridden {
            return Err(RenderError::Kustomize {
                path: rel(),
                message: "the app sets kustomize options (source.kustomize) but the directory holds no kustomization".into(),
            });
        }
        return render_directory(root, &dir, &options.directory);
    }
    match (
        kustomize::build_with(
            root,
            &dir,
            &options.kustomize,
            &options.fetched,
            options.helm.as_ref(),
        ),
        options.kustomize_fallback,
    ) {
        (Err(RenderError::KustomizeUnsupported { .. }), Some(_)) if overridden => {
            Err(RenderError::Kustomize {
                path: rel(),
                message: "kustomize options (source.kustomize) need the native engine, which refuses this kustomization".into(),
            })
        }
        (Err(RenderError::KustomizeUnsupported { .. }), Some(command)) => {
            // The fallback fetches what the kustomization names: only what the app's project
            // allows, checked before it runs.
            if let Some(policy) = &options.remote_policy {
                for input in kustomize::remote::inputs(root, &dir)? {
                    (policy.0)(input.repository()).map_err(|source| {
                        RenderError::RemoteRefused {
                            path: rel(),
                            entry: input.entry(),
                            source,
                        }
                    })?;
                }
            }
            kustomize::external(root, &dir, command)
        }
        (result, _) => result,
    }
}

/// An object's metadata, made a mapping first if it is missing or malformed.
pub(crate) fn metadata_of(object: &mut Map<String, Value>) -> Option<&mut Map<String, Value>> {
    let meta = object
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    meta.as_object_mut()
}

/// Parses a YAML stream (a manifest file, or a tool's output) into checked objects, `List`
/// kinds expanded; `path` names it in errors and origins.
fn parse_objects(text: &str, path: &Path) -> Result<Vec<Object>, RenderError> {
    objects_of(parse_documents(text, path)?, path)
}

/// Checked objects of parsed documents, `List` kinds expanded.
fn objects_of(docs: Vec<Value>, path: &Path) -> Result<Vec<Object>, RenderError> {
    let mut objects = Vec::new();
    for (index, doc) in docs.into_iter().enumerate() {
        into_objects(doc, path, index, &mut objects)?;
    }
    Ok(objects)
}

/// Checks that a parsed document is a usable Kubernetes object and expands `List` kinds.
fn into_objects(
    value: Value,
    path: &Path,
    document: usize,
    out: &mut Vec<Object>,
) -> Result<(), RenderError> {
    let invalid = |message: String| RenderError::InvalidObject {
        path: path.to_path_buf(),
        document,
        message,
    };
    let map = match value {
        Value::Null => return Ok(()),
        Value::Object(map) => map,
        other => {
            return Err(invalid(format!(
                "expected a Kubernetes object (a mapping), found {}",
                kind_of(&other)
            )))
        }
    };
    let kind = map.get("kind").and_then(Value::as_str).unwrap_or_default();
    if is_list_kind(kind, &map) {
        let items = match map.get("items") {
            Some(Value::Array(items)) => items.clone(),
            Some(Value::Null) | None => Vec::new(),
            Some(_) => return Err(invalid(format!("{kind}.items must be a list"))),
        };
        for item in items {
            into_objects(item, path, document, out)?;
        }
        return Ok(());
    }
    for field in ["apiVersion", "kind"] {
        match map.get(field) {
            Some(Value::String(s)) if !s.is_empty() => {}
            _ => return Err(invalid(format!("missing or empty {field}"))),
        }
    }
    let name = map
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let meta = map.get("metadata");
    let generated = meta
        .and_then(|m| m.get("generateName"))
        .and_then(Value::as_str)
        .is_some_and(|g| !g.is_empty());
    let hook = meta
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_object)
        .is_some_and(|a| {
            a.contains_key("argocd.argoproj.io/hook") || a.contains_key("helm.sh/hook")
        });
    // A resource hook may be created under a generated name, as in Argo CD; anything else is
    // applied by name (server-side apply needs one).
    if name.is_empty() && !(generated && hook) {
        return Err(invalid(format!(
            "{kind} has no metadata.name (generateName works only for resource hooks, which are created rather than applied)"
        )));
    }
    out.push(Object {
        value: map,
        origin: format!("{}#{}", path.display(), document),
    });
    Ok(())
}

/// `kind: List` and the typed lists (`ConfigMapList`, ...) that `kubectl get -o yaml` writes.
fn is_list_kind(kind: &str, map: &Map<String, Value>) -> bool {
    kind == "List" || (kind.ends_with("List") && map.contains_key("items"))
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {

    /// Argo CD's source-type detection: a kustomization beside a Chart.yaml wins, unless the
    /// Application asks for Helm (`source.helm`).
    #[test]
    fn a_kustomization_beside_a_chart_is_built_unless_helm_is_asked_for() {
        use super::*;
        let tmp = tempfile::tempdir().unwrap();
        let app = tmp.path().join("app");
        std::fs::create_dir_all(app.join("templates")).unwrap();
        std::fs::write(
            app.join("Chart.yaml"),
            "apiVersion: v2\nname: web\nversion: 0.1.0\n",
        )
        .unwrap();
        std::fs::write(app.join("kustomization.yaml"), "resources:\n  - cm.yaml\n").unwrap();
        std::fs::write(
            app.join("cm.yaml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: from-kustomize\n",
        )
        .unwrap();
        let built = render_with(tmp.path(), Path::new("app"), &RenderOptions::default()).unwrap();
        assert_eq!(built.objects.len(), 1);
        assert_eq!(built.objects[0].name(), "from-kustomize");
        let helm = RenderOptions {
            explicit_helm: true,
            helm: Some(helm::HelmRequest {
                app: "web".into(),
                namespace: None,
                options: Default::default(),
                binary: "/nonexistent/helm".into(),
                kube_version: None,
                api_versions: Vec::new(),
                dependency_cache: None,
                refs: Default::default(),
                credentials: Vec::new(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = render_with(tmp.path(), Path::new("app"), &helm).unwrap_err();
        assert!(matches!(err, RenderError::Helm { .. }), "{err}");
    }

    #[test]
    fn the_kustomize_fallback_fetches_only_what_the_project_allows() {
        let tmp = tempfile::tempdir().unwrap();
        let app = tmp.path().join("app");
        std::fs::create_dir_all(&app).unwrap();
        std::fs::write(
            app.join("kustomization.yaml"),
            "resources:\n  - https://github.com/evil/repo//deploy?ref=v1\n",
        )
        .unwrap();
        let marker = tmp.path().join("ran");
        let script = tmp.path().join("fallback.sh");
        std::fs::write(
            &script,
            format!("#!/bin/sh\ntouch {}\necho 'apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: a}}'\n", marker.display()),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let command = script.display().to_string();
        let only_org = RemotePolicy(std::sync::Arc::new(|repo: &str| {
            if repo.starts_with("https://github.com/org/") {
                Ok(())
            } else {
                Err(format!("{repo} is not permitted (sourceRepos)").into())
            }
        }));
        let options = RenderOptions {
            kustomize_fallback: Some(&command),
            remote_policy: Some(only_org),
            ..Default::default()
        };
        let err = render_with(tmp.path(), Path::new("app"), &options)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("would fetch") && err.contains("https://github.com/evil/repo"),
            "{err}"
        );
        assert!(!marker.exists(), "the fallback ran");
        // Without a project, or with one that allows it, the fallback runs.
        let options = RenderOptions {
            kustomize_fallback: Some(&command),
            ..Default::default()
        };
        assert_eq!(
            render_with(tmp.path(), Path::new("app"), &options)
                .unwrap()
                .objects
                .len(),
            1
        );
        assert!(marker.exists());
    }

    use super::*;
    use serde_json::json;

    fn objects(v: Value) -> Result<Vec<Object>, RenderError> {
        let mut out = Vec::new();
        into_objects(v, Path::new("a.yaml"), 0, &mut out)?;
        Ok(out)
    }

    #[test]
    fn list_kinds_are_expanded() {
        let out = objects(json!({
            "apiVersion": "v1", "kind": "List",
            "items": [
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}},
                {"apiVersion": "v1", "kind": "ConfigMapList", "items": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}}
                ]}
            ]
        }))
        .unwrap();
        let names: Vec<_> = out.iter().map(Object::name).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn object_without_name_is_refused() {
        let err = objects(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.yaml: document 0"), "{err}");
        assert!(err.contains("metadata.name"), "{err}");
    }

    #[test]
    fn scalar_document_is_refused() {
        let err = objects(json!("hello")).unwrap_err().to_string();
        assert!(err.contains("found a string"), "{err}");
    }

    #[test]
    fn group_and_version_split() {
        let o = &objects(json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d", "namespace": "x"}}))
        .unwrap()[0];
        assert_eq!((o.group(), o.version()), ("apps", "v1"));
        assert_eq!(o.display_name(), "Deployment x/d");
        let core = &objects(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "s"}}))
        .unwrap()[0];
        assert_eq!((core.group(), core.version()), ("", "v1"));
    }
}
