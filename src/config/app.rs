//! The `[[apps]]` of the config (and the apps the fleet adds): their schema, and which of them
//! this node runs.

use std::collections::BTreeMap;

use std::time::Duration;

use serde::Deserialize;

use super::{options, sync_policy, validate, Config};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AppConfig {
    pub(crate) name: String,
    pub(crate) repo: String,
    /// Branch, tag or commit SHA. `HEAD` follows the remote's default branch. For a `chart`,
    /// the chart version or a semver constraint (`*` or `HEAD`: the latest release).
    #[serde(default = "super::default_revision")]
    pub(crate) revision: String,
    /// A chart in the Helm repository (`https://…` with an index.yaml) or OCI registry
    /// (`oci://host/path`) that `repo` names, instead of a path in a Git repository.
    #[serde(default)]
    pub(crate) chart: Option<String>,
    /// Directory inside the repository; `.` is the root.
    #[serde(default = "super::default_path")]
    pub(crate) path: String,
    /// Namespace for namespaced objects that name none.
    pub(crate) namespace: Option<String>,
    /// Create `namespace` if it does not exist (Argo CD's `CreateNamespace=true`). The
    /// namespace is not part of the app: it is never pruned.
    #[serde(default)]
    pub(crate) create_namespace: bool,
    /// Delete objects this app applied earlier that its render no longer contains (Argo CD's
    /// `prune`). Only after a fully successful apply, and only objects still marked as ours.
    #[serde(default)]
    pub(crate) prune: bool,
    /// Let a render with no objects prune everything (Argo CD's `allowEmpty`).
    #[serde(default)]
    pub(crate) allow_empty: bool,
    /// Run only on nodes whose labels match, e.g. `site in (plant-7,plant-8),!decommissioned`.
    pub(crate) node_selector: Option<String>,
    /// The Argo CD AppProject whose rules apply; `default` (or none) allows everything.
    #[serde(default)]
    pub(crate) project: Option<String>,
    /// Substitute `${VAR}` in the rendered objects (Flux's `postBuild.substitute`): `off`,
    /// `on` (unset variables become empty) or `strict` (unset variables are errors).
    #[serde(default)]
    pub(crate) substitute: Substitute,
    /// Variables for this app, over the top-level `[variables]` and the node's own.
    #[serde(default)]
    pub(crate) variables: BTreeMap<String, String>,
    /// A command that builds a kustomization the native engine does not support (helmCharts,
    /// KRM functions, remote resources), e.g. `kubectl kustomize` or `kustomize build`.
    #[serde(default)]
    pub(crate) kustomize_fallback: Option<String>,
    /// Helm options for an app whose path holds a chart (Argo CD's `source.helm`).
    #[serde(default)]
    pub(crate) helm: Option<options::HelmOptions>,
    /// Sync each new revision by itself (`true`, the default). `false`: only a manual
    /// `edgesync sync APP` applies it, and the app shows OutOfSync until then, as an Argo CD
    /// Application without `syncPolicy.automated`.
    #[serde(default = "super::default_true")]
    pub(crate) automated: bool,
    /// Re-apply at once when a managed object drifts or is deleted (Argo CD's `selfHeal`);
    /// otherwise drift is reported as OutOfSync.
    #[serde(default)]
    pub(crate) self_heal: bool,
    /// Argo CD's sync options: `CreateNamespace=true`, `PruneLast=true`,
    /// `PrunePropagationPolicy=foreground|background|orphan`, `ApplyOutOfSyncOnly=true`.
    #[serde(default)]
    pub(crate) sync_options: Vec<String>,
    /// Retry of failed syncs (Argo CD's `syncPolicy.retry`).
    #[serde(default)]
    pub(crate) retry: sync_policy::Retry,
    /// Fields left alone (Argo CD's `ignoreDifferences`).
    #[serde(default)]
    pub(crate) ignore_differences: Vec<sync_policy::IgnoreDifference>,
    /// When syncs may run (Argo CD's sync windows).
    #[serde(default)]
    pub(crate) sync_windows: Vec<sync_policy::SyncWindow>,
    /// How long an app may stay Progressing after a sync before it counts as Degraded.
    #[serde(default, with = "sync_policy::human::option")]
    pub(crate) health_timeout: Option<Duration>,
    /// `auto`: an app that goes Degraded after a new revision goes back to its last Healthy one.
    #[serde(default)]
    pub(crate) rollback: sync_policy::Rollback,
    /// Changes to the app's kustomization before it is built (Argo CD's `source.kustomize`).
    #[serde(default)]
    pub(crate) kustomize: options::Overrides,
    /// How a plain directory is read (Argo CD's `source.directory`): `recurse` (default
    /// `true`), `include` and `exclude` globs.
    #[serde(default)]
    pub(crate) directory: options::DirectoryOptions,
    /// Delete the app's objects when the app leaves this node (removed from the config or the
    /// fleet, or targeted elsewhere): Argo CD's `resources-finalizer.argocd.argoproj.io`.
    #[serde(default)]
    pub(crate) delete_on_removal: bool,
    /// The config management plugin (`[[plugins]]`) that renders the app's path (an
    /// Application's `spec.source.plugin.name`).
    #[serde(default)]
    pub(crate) plugin: Option<String>,
    /// Environment of the plugin's commands, each as `ARGOCD_ENV_<name>` (an Application's
    /// `spec.source.plugin.env`).
    #[serde(default)]
    pub(crate) plugin_env: BTreeMap<String, String>,
    /// Labels and annotations for the namespace `create_namespace` adds (Argo CD's
    /// `syncPolicy.managedNamespaceMetadata`).
    #[serde(default)]
    pub(crate) namespace_metadata: Option<options::NamespaceMetadata>,
    /// More sources of the app (an Argo CD Application's `spec.sources` after the first one
    /// that renders): each is rendered as the app's own source is, and the objects of all are
    /// applied as one app; a source with `ref` and no path gives files to `$ref/...` value files.
    #[serde(default)]
    pub(crate) sources: Vec<AppSource>,
    /// Follow the fleet hub's rollout gates (`[gates]`): run no newer revision than the gate
    /// of the app allows this node's stage, and keep what runs until a gate is heard (an
    /// Application's `edgesync.io/gated: "true"` annotation).
    #[serde(default)]
    pub(crate) gated: bool,
}

/// One more source of an app (`[[apps.sources]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AppSource {
    pub(crate) repo: String,
    #[serde(default = "super::default_revision")]
    pub(crate) revision: String,
    #[serde(default)]
    pub(crate) chart: Option<String>,
    /// The directory rendered; none for a source that only gives files to the others (`ref`).
    #[serde(default)]
    pub(crate) path: Option<String>,
    /// The name `$name/...` value files use for this source's checkout.
    #[serde(default, rename = "ref")]
    pub(crate) ref_name: Option<String>,
    #[serde(default)]
    pub(crate) helm: Option<options::HelmOptions>,
    #[serde(default)]
    pub(crate) kustomize: options::Overrides,
    #[serde(default)]
    pub(crate) directory: options::DirectoryOptions,
}

impl AppSource {
    /// Whether the source is rendered: it has a path or a chart (a `ref` source without them
    /// only gives files).
    pub(crate) fn renders(&self) -> bool {
        self.chart.is_some() || self.path.is_some() || self.ref_name.is_none()
    }
}

impl AppConfig {
    /// The value of one of the app's sync options.
    pub(crate) fn sync_option(&self, name: &str) -> Option<&str> {
        sync_policy::sync_option(&self.sync_options, name)
    }

    /// The app as it renders source `index` of [`AppConfig::sources`]: that source's repository,
    /// revision, path and renderer options, with the app's name, namespace and policies.
    pub(crate) fn with_source(&self, index: usize) -> Option<AppConfig> {
        let source = self.sources.get(index)?;
        Some(AppConfig {
            repo: source.repo.clone(),
            revision: source.revision.clone(),
            chart: source.chart.clone(),
            path: source.path.clone().unwrap_or_else(super::default_path),
            helm: source.helm.clone(),
            kustomize: source.kustomize.clone(),
            directory: source.directory.clone(),
            plugin: None,
            plugin_env: BTreeMap::new(),
            sources: Vec::new(),
            ..self.clone()
        })
    }

    /// Every repository the app reads: its own and those of its other sources.
    pub(crate) fn repositories(&self) -> impl Iterator<Item = (&str, &str)> {
        std::iter::once((self.repo.as_str(), self.revision.as_str())).chain(
            self.sources
                .iter()
                .map(|s| (s.repo.as_str(), s.revision.as_str())),
        )
    }

    /// `create_namespace`, or the sync option `CreateNamespace=true`.
    pub(crate) fn creates_namespace(&self) -> bool {
        self.create_namespace || self.sync_option("CreateNamespace") == Some("true")
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Substitute {
    #[default]
    Off,
    On,
    Strict,
}

/// An app that is not for this node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct SkippedApp {
    pub(crate) app: String,
    pub(crate) reason: String,
}

/// Splits apps into those whose selector matches the node's labels and those skipped.
pub(super) fn for_this_node(
    apps: Vec<AppConfig>,
    labels: &BTreeMap<String, String>,
) -> (Vec<AppConfig>, Vec<SkippedApp>) {
    let mut run = Vec::new();
    let mut skipped = Vec::new();
    for app in apps {
        // Validation has already parsed every selector.
        match app
            .node_selector
            .as_deref()
            .map(crate::model::selector::Selector::parse)
        {
            Some(Ok(selector)) if !selector.matches(labels) => skipped.push(SkippedApp {
                reason: format!("node_selector \"{selector}\" does not match this node's labels"),
                app: app.name,
            }),
            _ => run.push(app),
        }
    }
    (run, skipped)
}

impl Config {
    /// Adds apps read from the fleet repository, checked as `[[apps]]` entries are and
    /// targeted by their node selector. An app whose name the config already uses, or that
    /// fails a check, is left out; the returned problems say why.
    pub(crate) fn add_fleet_apps(&mut self, apps: Vec<AppConfig>) -> Vec<String> {
        let mut problems = Vec::new();
        let mut accepted = Vec::new();
        for app in apps {
            let taken = self
                .apps
                .iter()
                .chain(&accepted)
                .any(|a: &AppConfig| a.name == app.name)
                || self.skipped.iter().any(|s| s.app == app.name);
            let check = validate::check_app(&app)
                .err()
                .or_else(|| taken.then(|| validate::Invalid::NameTaken(app.name.clone())));
            match check {
                Some(why) => problems.push(format!("fleet app {}: {why}; left out", app.name)),
                None => accepted.push(app),
            }
        }
        let fallback = self
            .fleet
            .as_ref()
            .and_then(|f| f.kustomize_fallback.clone());
        for app in &mut accepted {
            app.kustomize_fallback = fallback.clone();
        }
        let (run, skipped) = for_this_node(accepted, &self.node.labels);
        self.apps.extend(run);
        self.skipped.extend(skipped);
        problems
    }
}
