//! What an app syncs to: the revision a repository offers for it (Git refs or a chart
//! repository's index), resolved to a commit or a digest-pinned chart, then rendered and
//! planned.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::checks::verify_revision;
use super::sync::{blocking, SyncContext, SyncError};
use crate::apply;
use crate::config::{AppConfig, Config, RepositoryConfig, Substitute};
use crate::render;
use crate::source::{ChartIndex, RemoteRefs, SourceError, TagRef};

/// What an app syncs to: a commit SHA (for a chart, `<version>@sha256:<hex>`), and the
/// annotated tag the revision named, whose signature vouches for it; for an app with more
/// sources, theirs too, in the order of [`AppConfig::sources`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) sha: String,
    pub(crate) tag: Option<TagRef>,
    pub(crate) sources: Vec<Target>,
}

impl Target {
    /// The revision the app's state records: the commit of its own source, followed by those
    /// of its other sources (`<sha>+<sha>...`), so a new commit of any source is a new
    /// revision.
    pub(crate) fn revision(&self) -> String {
        std::iter::once(self.sha.as_str())
            .chain(self.sources.iter().map(|s| s.sha.as_str()))
            .collect::<Vec<_>>()
            .join("+")
    }
}

/// What a repository offers, read once per round.
pub(crate) enum Revisions {
    Git(RemoteRefs),
    /// A chart repository, with its index when it is an HTTP(S) one.
    Charts(Option<Arc<ChartIndex>>),
}

/// How `app` renders a chart: its values, with the node's pinned helm binary.
pub(super) fn helm_request(config: &Config, app: &AppConfig) -> render::helm::HelmRequest {
    render::helm::HelmRequest {
        app: app.name.clone(),
        namespace: app.namespace.clone(),
        options: app.helm.clone().unwrap_or_default(),
        binary: config.helm.binary.clone().unwrap_or_else(|| "helm".into()),
        kube_version: None,
        api_versions: Vec::new(),
        dependency_cache: Some(config.state_dir.join("chart-dependencies")),
        refs: Default::default(),
        credentials: Vec::new(),
        ..Default::default()
    }
}

/// The logins of the node's chart repositories (HTTP(S) and OCI ones with credentials), for
/// the dependencies charts name. Reads the secret files (blocking). One that cannot be read is
/// left out, with a warning: the dependency build then fails on that repository, saying so.
pub(super) fn chart_logins(
    repositories: &[RepositoryConfig],
) -> Vec<render::helm::RepositoryLogin> {
    let mut logins = Vec::new();
    for repo in repositories {
        if !["https://", "http://", "oci://"]
            .iter()
            .any(|p| repo.url.starts_with(p))
        {
            continue;
        }
        match crate::source::credentials(repo) {
            Ok(Some((username, password))) => logins.push(render::helm::RepositoryLogin {
                url: repo.url.clone(),
                username,
                password,
            }),
            Ok(None) => {}
            Err(e) => tracing::warn!("chart dependencies: {e}"),
        }
    }
    logins
}

/// How `app`'s path is rendered: its Helm, Kustomize and directory options, as its sync
/// renders it (an app-of-apps' children are read the same way).
pub(super) fn render_options(
    app: &AppConfig,
    helm: render::helm::HelmRequest,
) -> render::RenderOptions<'_> {
    render::RenderOptions {
        explicit_helm: app.helm.is_some(),
        kustomize_fallback: app.kustomize_fallback.as_deref(),
        helm: Some(helm),
        directory: app.directory.clone(),
        kustomize: app.kustomize.clone(),
        remote_policy: None,
        plugin: None,
        fetched: Default::default(),
    }
}

/// The plugin run of an app that names a config management plugin: the node's
/// `[[plugins]]` entry of that name, with the app's variables as Argo CD sets them. An app
/// naming a plugin this node does not have fails saying so.
pub(super) fn plugin_request(
    config: &Config,
    app: &AppConfig,
    revision: &str,
) -> Result<Option<render::plugin::PluginRequest>, render::RenderError> {
    let Some(name) = &app.plugin else {
        return Ok(None);
    };
    let Some(plugin) = config.plugins.iter().find(|p| &p.name == name) else {
        return Err(render::RenderError::Unsupported {
            path: app.path.clone().into(),
            what: format!(
                "the config management plugin {name} (no [[plugins]] entry of that name on this node)"
            ),
        });
    };
    let mut env = vec![
        ("ARGOCD_APP_NAME".to_string(), app.name.clone()),
        (
            "ARGOCD_APP_NAMESPACE".to_string(),
            app.namespace.clone().unwrap_or_default(),
        ),
        ("ARGOCD_APP_REVISION".to_string(), revision.to_string()),
        (
            "ARGOCD_APP_REVISION_SHORT".to_string(),
            revision.chars().take(7).collect(),
        ),
        (
            "ARGOCD_APP_SOURCE_REPO_URL".to_string(),
            crate::model::url::redact(&app.repo),
        ),
        (
            "ARGOCD_APP_SOURCE_TARGET_REVISION".to_string(),
            app.revision.clone(),
        ),
    ];
    env.extend(
        app.plugin_env
            .iter()
            .map(|(k, v)| (format!("ARGOCD_ENV_{k}"), v.clone())),
    );
    Ok(Some(render::plugin::PluginRequest {
        plugin: plugin.clone(),
        env,
    }))
}

/// Adds the objects of one more source of `app`: an object an earlier source produced too is
/// replaced, as in Argo CD (the last source wins), and the replacement is logged.
pub(super) fn combine(app: &str, manifests: &mut render::Manifests, more: render::Manifests) {
    for object in more.objects {
        let same = |o: &render::Object| {
            o.group() == object.group()
                && o.kind() == object.kind()
                && o.namespace() == object.namespace()
                && o.name() == object.name()
        };
        if let Some(earlier) = manifests.objects.iter_mut().find(|o| same(o)) {
            tracing::warn!(app, object = %object.display_name(), first = %earlier.origin,
                last = %object.origin, "two sources produce the same object; the last one is applied");
            *earlier = object;
        } else {
            manifests.objects.push(object);
        }
    }
}

/// How long the cluster's capabilities are used before discovery is read again (a CRD an app
/// installs shows up to charts after this long at most).
const CAPABILITIES_FOR: std::time::Duration = std::time::Duration::from_secs(300);

impl SyncContext {
    /// Reads what `repo` offers once, for resolving all its apps' revisions: a Git
    /// repository's refs, or a Helm repository's index.
    pub(crate) async fn remote_refs(
        &self,
        repo: &RepositoryConfig,
    ) -> Result<Revisions, SyncError> {
        self.remote_refs_fetching(repo, Vec::new()).await
    }

    /// [`Self::remote_refs`], fetching the new commits of the branches in `wanted` on the
    /// listing's connection ([`crate::source::GitSource::remote_refs_fetching`]).
    pub(crate) async fn remote_refs_fetching(
        &self,
        repo: &RepositoryConfig,
        wanted: Vec<String>,
    ) -> Result<Revisions, SyncError> {
        let started = Instant::now();
        let repo = repo.clone();
        let revisions = if self.config.is_chart_repository(&repo.url) {
            if crate::model::url::is_oci(&repo.url) {
                return Ok(Revisions::Charts(None));
            }
            let charts = self.charts.clone();
            blocking(move || Ok(Revisions::Charts(Some(Arc::new(charts.index(&repo)?))))).await
        } else {
            let source = self.source.clone();
            blocking(move || Ok(Revisions::Git(source.remote_refs_fetching(&repo, &wanted)?))).await
        };
        self.metrics.git_fetch(started.elapsed());
        tracing::debug!(ms = started.elapsed().as_millis(), "remote refs listed");
        revisions
    }

    /// The revision `app` should be at: a commit SHA, or for a chart `<version>@sha256:<hex>`
    /// (the chart is then in the cache).
    pub(crate) async fn resolve(
        &self,
        repo: &RepositoryConfig,
        revisions: &Revisions,
        app: &AppConfig,
    ) -> Result<Target, SyncError> {
        match (revisions, &app.chart) {
            (Revisions::Git(refs), None) => Ok(Target {
                sha: refs.resolve(&app.revision)?,
                tag: refs.annotated_tag(&app.revision),
                sources: Vec::new(),
            }),
            (Revisions::Charts(index), Some(chart)) => {
                let (charts, repo, index, chart) =
                    (self.charts.clone(), repo.clone(), index.clone(), chart.clone());
                // Argo CD's default targetRevision, HEAD, means the latest chart release.
                let constraint = match app.revision.as_str() {
                    "HEAD" => String::new(),
                    other => other.to_string(),
                };
                let sha = blocking(move || {
                    Ok(charts.pull(&repo, index.as_deref(), &chart, &constraint)?)
                })
                .await?;
                Ok(Target {
                    sha,
                    tag: None,
                    sources: Vec::new(),
                })
            }
            (Revisions::Git(_), Some(_)) | (Revisions::Charts(_), None) => {
                Err(SyncError::Source(SourceError::Chart {
                    url: crate::model::url::redact(&repo.url),
                    source: crate::source::ChartError::Unusable(format!(
                        "apps {} use this repository both as a Git repository and as a chart repository; an app on a chart repository needs `chart`, and other apps cannot use it",
                        self.config.apps.iter().filter(|a| a.repo == repo.url).map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ")
                    )),
                }))
            }
        }
    }

    /// The revisions of the app's other sources (`sources`) added to `target`: each
    /// repository read once (`own`, what the app's own repository offers, is not read again).
    pub(crate) async fn resolve_sources(
        &self,
        app: &AppConfig,
        own: &Revisions,
        mut target: Target,
    ) -> Result<Target, SyncError> {
        let mut read: Vec<(String, Revisions)> = Vec::new();
        for index in 0..app.sources.len() {
            let Some(source) = app.with_source(index) else {
                continue;
            };
            let repo = self.config.repository(&source.repo);
            if source.repo != app.repo && !read.iter().any(|(url, _)| *url == source.repo) {
                read.push((source.repo.clone(), self.remote_refs(&repo).await?));
            }
            let revisions = read
                .iter()
                .find(|(url, _)| *url == source.repo)
                .map_or(own, |(_, revisions)| revisions);
            target
                .sources
                .push(self.resolve(&repo, revisions, &source).await?);
        }
        Ok(target)
    }

    /// The app's current target revision, rendered and planned (for `edgesync diff`).
    pub(crate) async fn target_plan(
        &self,
        app: &AppConfig,
    ) -> Result<(String, apply::Plan), SyncError> {
        let repo = self.config.repository(&app.repo);
        let revisions = self.remote_refs(&repo).await?;
        let target = self.resolve(&repo, &revisions, app).await?;
        let target = self.resolve_sources(app, &revisions, target).await?;
        let plan = self.render_and_plan(app, &target).await?;
        Ok((target.revision(), plan))
    }

    /// What a kustomize fallback may fetch for `app`: what its project's `sourceRepos` allow.
    fn remote_policy(&self, app: &AppConfig) -> Option<render::RemotePolicy> {
        let project = app
            .project
            .as_deref()
            .and_then(|p| self.projects.get(p))?
            .clone();
        Some(render::RemotePolicy(Arc::new(move |repo: &str| {
            Ok(project.check_source(repo)?)
        })))
    }

    /// Renders every source of `app` at `target` (its own, then its other sources in order;
    /// `ref` sources without a path only give files) and plans the objects as one app.
    pub(super) async fn render_and_plan(
        &self,
        app: &AppConfig,
        target: &Target,
    ) -> Result<apply::Plan, SyncError> {
        let mut sources = vec![(app.clone(), self.checkout(app, target).await?)];
        let mut refs = std::collections::BTreeMap::new();
        for (index, source_target) in target.sources.iter().enumerate() {
            let (Some(spec), Some(source)) = (app.sources.get(index), app.with_source(index))
            else {
                continue;
            };
            let (root, path) = self.checkout(&source, source_target).await?;
            if let Some(name) = &spec.ref_name {
                refs.insert(name.clone(), root.clone());
            }
            if spec.renders() {
                sources.push((source, (root, path)));
            }
        }
        let charts = sources
            .iter()
            .any(|(_, (root, path))| render::helm::is_chart(&root.join(path)));
        let mut inflates = false;
        for (_, (root, path)) in &sources {
            if let Some(file) = render::kustomize::kustomization_file(&root.join(path)) {
                let text = tokio::fs::read_to_string(&file).await.unwrap_or_default();
                inflates |= text.to_ascii_lowercase().contains("helmcharts");
            }
        }
        let capabilities = if charts || inflates {
            self.capabilities().await
        } else {
            None
        };
        let mut renders = Vec::new();
        let plugin = plugin_request(&self.config, app, &target.sha)?;
        for (source, checkout) in sources {
            let mut helm = helm_request(&self.config, &source);
            if let Some(capabilities) = &capabilities {
                helm.kube_version = capabilities.kube_version.clone();
                helm.api_versions = capabilities.api_versions.clone();
            }
            helm.refs = refs.clone();
            let remote_policy = self.remote_policy(&source);
            // Only the app's own source (the first) may name a plugin.
            let plugin = if renders.is_empty() {
                plugin.clone()
            } else {
                None
            };
            renders.push((source, checkout, helm, remote_policy, plugin));
        }
        let app = app.clone();
        let vars =
            (app.substitute != Substitute::Off).then(|| self.config.substitution_variables(&app));
        // Only charts (an app's, or a kustomization's helmCharts) name dependencies that need
        // the repositories' credentials.
        let logins = (charts || inflates).then(|| self.config.repositories.clone());
        let repositories = self.config.repositories.clone();
        let app_repos: HashSet<String> = self
            .config
            .apps
            .iter()
            .flat_map(|a| a.repositories().map(|(url, _)| url.to_string()))
            .collect();
        let (git, chart_cache) = (self.source.clone(), self.charts.clone());
        let state_dir = self.config.state_dir.clone();
        blocking(move || {
            let logins = logins.as_deref().map(chart_logins).unwrap_or_default();
            let mut manifests = render::Manifests::default();
            let mut warnings = Vec::new();
            for (source, (root, path), mut helm, remote_policy, plugin) in renders {
                helm.credentials = logins.clone();
                let fetched = if plugin.is_none() {
                    let fetcher = super::remote::Fetcher {
                        git: &git,
                        charts: &chart_cache,
                        repositories: &repositories,
                        app_repos: &app_repos,
                        state_dir: &state_dir,
                        policy: remote_policy.as_ref(),
                    };
                    let (fetched, more) = fetcher.fetch(&root, &path)?;
                    warnings.extend(more);
                    fetched
                } else {
                    Default::default()
                };
                let options = render::RenderOptions {
                    remote_policy,
                    plugin,
                    fetched,
                    ..render_options(&source, helm)
                };
                let rendered = render::render_with(&root, &path, &options)?;
                combine(&app.name, &mut manifests, rendered);
            }
            if let Some(vars) = vars {
                let mode = match app.substitute {
                    Substitute::Strict => render::substitute::Mode::Strict,
                    _ => render::substitute::Mode::Lenient,
                };
                render::substitute::substitute(&mut manifests.objects, &vars, mode)?;
            }
            let mut plan = apply::plan(
                &app.name,
                app.namespace.as_deref(),
                app.creates_namespace(),
                manifests,
            )?;
            if let Some(metadata) = &app.namespace_metadata {
                plan.label_created_namespace(metadata);
            }
            plan.ignore_differences = app.ignore_differences.clone();
            plan.out_of_sync_only = app.sync_option("ApplyOutOfSyncOnly") == Some("true");
            plan.warnings = warnings;
            Ok(plan)
        })
        .await
    }

    /// The app's source at `target`, checked out (or its chart unpacked): the root and the
    /// app's path inside it. A revision that must be signed is verified before anything is
    /// checked out.
    async fn checkout(
        &self,
        app: &AppConfig,
        target: &Target,
    ) -> Result<(PathBuf, PathBuf), SyncError> {
        let source = self.source.clone();
        let repo = self.config.repository(&app.repo);
        let app = app.clone();
        let target = target.clone();
        let sha = target.sha.clone();
        let signers = self.required_signers(&app);
        let keyring = self.keyring.clone();
        let metrics = self.metrics.clone();
        let charts = self.charts.clone();
        blocking(move || {
            if let Some((required_by, keys)) = &signers {
                if let Some(chart) = &app.chart {
                    return Err(crate::signature::VerifyError::NotGit {
                        object: format!("chart {chart} {sha}"),
                        required_by: required_by.clone(),
                    }
                    .into());
                }
                let (object, signer) = verify_revision(
                    &source,
                    &keyring,
                    &repo,
                    &app.revision,
                    &target,
                    required_by,
                    keys,
                )?;
                tracing::info!(app = %app.name, %object, signer = %signer.0, "signature verified");
            }
            if app.chart.is_some() {
                return Ok(charts.unpacked(&repo.url, &sha)?);
            }
            let started = Instant::now();
            let snapshot = source.snapshot(&repo, &app.revision, &sha)?;
            if snapshot.fetched {
                metrics.git_fetch(started.elapsed());
            }
            tracing::debug!(app = %app.name, fetched = snapshot.fetched,
                ms = started.elapsed().as_millis(), "checkout ready");
            Ok((snapshot.root, app.path.clone().into()))
        })
        .await
    }

    /// The cluster's `.Capabilities` for Helm, read from discovery at most every
    /// [`CAPABILITIES_FOR`]; without an API server (engine tests), or when discovery fails and
    /// nothing was read before, helm's defaults.
    async fn capabilities(&self) -> Option<Arc<apply::kube::Capabilities>> {
        let kube = self.kube.as_ref()?;
        let mut cached = self.capabilities.lock().await;
        if let Some((at, capabilities)) = cached.as_ref() {
            if at.elapsed() < CAPABILITIES_FOR {
                return Some(capabilities.clone());
            }
        }
        match kube.capabilities().await {
            Ok(capabilities) => {
                let capabilities = Arc::new(capabilities);
                *cached = Some((Instant::now(), capabilities.clone()));
                Some(capabilities)
            }
            Err(e) => {
                tracing::warn!("cannot read the cluster's version and APIs for helm: {e}");
                cached.as_ref().map(|(_, c)| c.clone())
            }
        }
    }

    /// Removes snapshots of `repo` that no app needs any more. Charts are kept per digest,
    /// whichever repository they came from, so all chart apps count for them.
    pub(crate) fn retain_snapshots(&self, repo: &str, in_use: impl IntoIterator<Item = String>) {
        let charts = self.config.is_chart_repository(repo);
        let mut keep: HashSet<String> = in_use.into_iter().collect();
        let apps = self.config.apps.iter().filter(|a| {
            if charts {
                a.chart.is_some() || a.sources.iter().any(|s| s.chart.is_some())
            } else {
                a.repositories().any(|(url, _)| url == repo)
            }
        });
        for app in apps {
            if let Ok(state) = self.store.load(&app.name) {
                // An app with several sources records `<sha>+<sha>...`.
                if let Some(revision) = state.last_applied_revision {
                    keep.extend(revision.split('+').map(str::to_string));
                }
            }
        }
        // Remote bases and charts of kustomizations, pinned for offline renders.
        keep.extend(super::remote::pinned(&self.config.state_dir));
        if charts {
            self.charts.retain(&keep);
        } else {
            self.source.retain(repo, &keep);
        }
    }
}
