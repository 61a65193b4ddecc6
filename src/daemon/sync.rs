//! One sync of one app through the pipeline: snapshot → render → plan → apply → state.
//! Shared by `edgesync run` and `edgesync sync`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use super::node::Node;
use super::retry;
use crate::apply::{self, ApplyError, Cluster, KubeApplier, ObjectRef};
use crate::config::{AppConfig, Config, RepositoryConfig, Substitute};
use crate::metrics::Metrics;
use crate::model::window::{self, Verdict, Window};
use crate::policy::{Denied, WindowSpecError};
use crate::render::{self, RenderError};
use crate::report::publisher::StatusPublisher;
use crate::report::status::StatusBoard;
use crate::source::{ChartIndex, ChartSource, GitSource, RemoteRefs, SourceError, TagRef};
use crate::state::{unix_now, AppState, RenderKind, RenderRecord, StateError, StateStore};

#[derive(Debug, thiserror::Error)]
pub(crate) enum SyncError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("refused by project policy: {0}")]
    Policy(#[from] Denied),
    #[error("revision refused: {0}")]
    Signature(#[from] crate::signature::VerifyError),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("the app has no local state and its inventory in the cluster cannot be read, so nothing is applied until it can: {0}")]
    Inventory(apply::kube::CallError),
    #[error("internal error: {0}")]
    Internal(#[source] tokio::task::JoinError),
}

impl SyncError {
    /// The API server or Git was away: retried without counting against the limit.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            SyncError::Apply(e) => e.is_transient(),
            SyncError::Source(SourceError::Git { .. }) => true,
            // A full disk is the node's own resource being away, not a rejection: retried
            // for as long as it takes, so the agent recovers by itself once space returns.
            SyncError::Source(SourceError::Cache { source, .. })
            | SyncError::State(StateError::Io { source, .. }) => is_disk_full(source),
            SyncError::Inventory(e) => e.transient,
            _ => false,
        }
    }
}

fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

impl SyncError {
    pub(crate) fn metric_label(&self) -> crate::metrics::ErrorKind {
        use crate::metrics::ErrorKind;
        match self {
            SyncError::Source(e) => e.metric_label(),
            SyncError::Render(e) => e.metric_label(),
            SyncError::Apply(e) => e.metric_label(),
            SyncError::State(e) => e.metric_label(),
            SyncError::Policy(_) => ErrorKind::Policy,
            SyncError::Signature(_) => ErrorKind::Signature,
            SyncError::Conflict(_) => ErrorKind::Conflict,
            SyncError::Inventory(_) => ErrorKind::Inventory,
            SyncError::Internal(_) => ErrorKind::Internal,
        }
    }
}

type ClaimKey = (String, String, Option<String>, String);

fn claim_key(group: &str, kind: &str, namespace: Option<&str>, name: &str) -> ClaimKey {
    (
        group.to_string(),
        kind.to_string(),
        namespace.map(str::to_string),
        name.to_string(),
    )
}

/// How long a wave may take to become healthy when the app sets no `health_timeout`.
const DEFAULT_WAVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// How long each sync wave may take to become healthy.
fn wave_timeout(app: &AppConfig) -> std::time::Duration {
    app.health_timeout.unwrap_or(DEFAULT_WAVE_TIMEOUT)
}

/// What an app syncs to: a commit SHA (for a chart, `<version>@sha256:<hex>`), and the
/// annotated tag the revision named, whose signature vouches for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) sha: String,
    pub(crate) tag: Option<TagRef>,
}

/// What a repository offers, read once per round.
pub(crate) enum Revisions {
    Git(RemoteRefs),
    /// A chart repository, with its index when it is an HTTP(S) one.
    Charts(Option<Arc<ChartIndex>>),
}

/// How often a held app looks at its sync windows again, at most.
const WINDOW_RECHECK: std::time::Duration = std::time::Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SyncResult {
    /// Not attempted now: a sync window is closed, or a failed attempt waits for its retry.
    Waiting {
        revision: String,
        reason: String,
        /// When to try again; `None` until something changes (a new revision).
        retry_in: Option<std::time::Duration>,
    },
    /// The revision was already applied; nothing was sent to the cluster.
    Unchanged {
        revision: String,
    },
    Applied {
        revision: String,
        objects: usize,
    },
}

/// Everything a sync needs, shared by all apps.
pub(crate) struct SyncContext {
    pub(crate) config: Config,
    /// The keys trusted to sign revisions.
    pub(crate) keyring: Arc<crate::signature::Keyring>,
    /// The fleet's AppProjects, by name.
    pub(crate) projects: BTreeMap<String, crate::policy::Project>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) board: Arc<StatusBoard>,
    /// Wakes the health monitor: after every apply, and when a watch sees an app's object
    /// change (the apps in `health_dirty`).
    pub(crate) health_wake: tokio::sync::Notify,
    health_dirty: std::sync::Mutex<HashSet<String>>,
    pub(crate) source: GitSource,
    pub(crate) charts: ChartSource,
    /// What the engine reads, applies and deletes through.
    pub(crate) cluster: Arc<dyn Cluster>,
    /// The real API server, for the drift watches and the status API.
    pub(crate) kube: Option<Arc<KubeApplier>>,
    pub(crate) store: StateStore,
    pub(crate) retries: retry::Retries,
    /// Counts finished sync attempts; the drift watcher reloads its desired state on each.
    pub(crate) synced: tokio::sync::watch::Sender<u64>,
    /// One writer per app: sync, rollback, self-heal and removal each hold the app's lock
    /// while they change its objects or its state, so none undoes what another just did.
    writers: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Which app manages each object on this node (read from the states on first use).
    claims: std::sync::Mutex<Option<HashMap<ClaimKey, String>>>,
}

/// A sync window that covers an app but cannot be read: it holds the app's syncs.
#[derive(Debug, thiserror::Error)]
#[error("sync window {index} cannot be read ({source})")]
pub(crate) struct UnreadableWindow {
    index: usize,
    source: WindowSpecError,
}

/// The sync windows that cover `app`, or why one of them cannot be read.
pub(crate) fn windows_of(
    projects: &BTreeMap<String, crate::policy::Project>,
    app: &AppConfig,
) -> Result<Vec<Window>, UnreadableWindow> {
    super::node::sync_windows(projects, app)
        .into_iter()
        .enumerate()
        .map(|(index, w)| {
            w.and_then(|w| Ok(Window::new(&w)?))
                .map_err(|source| UnreadableWindow { index, source })
        })
        .collect()
}

/// The scope a CustomResourceDefinition in `plan` gives `group`/`kind`: `Some(true)` for
/// namespaced, `None` when no CRD of the plan defines the kind.
pub(super) fn plan_scope(plan: &apply::Plan, group: &str, kind: &str) -> Option<bool> {
    let text = |spec: &serde_json::Value, pointer: &str| {
        spec.pointer(pointer)
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
    };
    plan.rendered_objects()
        .filter(|o| o.group() == "apiextensions.k8s.io" && o.kind() == "CustomResourceDefinition")
        .filter_map(|crd| crd.value.get("spec"))
        .find(|spec| {
            text(spec, "/group").as_deref() == Some(group)
                && text(spec, "/names/kind").as_deref() == Some(kind)
        })
        .and_then(|spec| text(spec, "/scope"))
        .map(|scope| scope != "Cluster")
}

/// Checks that `target` (reached from `revision` of `repo`) is signed by a key of `keyring`
/// that `allowed` names; `required_by` says who asks, for messages. Returns the signed
/// object's name and the signer. Blocking (Git I/O).
pub(crate) fn verify_revision(
    source: &GitSource,
    keyring: &crate::signature::Keyring,
    repo: &RepositoryConfig,
    revision: &str,
    target: &Target,
    required_by: &str,
    allowed: &[String],
) -> Result<(String, crate::signature::Signer), SyncError> {
    let signed = source.signed(repo, revision, &target.sha, target.tag.as_ref())?;
    let signer = keyring.verify(&signed, required_by, allowed)?;
    Ok((signed.object, signer))
}

/// The app's state; a damaged file (set aside by the store) is reported, counted, and the app
/// starts again from a blank state rather than staying stuck. Other errors (I/O) are returned.
fn load_or_blank(store: &StateStore, metrics: &Metrics, app: &str) -> Result<AppState, StateError> {
    match store.load(app) {
        Ok(state) => Ok(state),
        Err(e @ StateError::Corrupt { .. }) => {
            metrics.error(e.metric_label());
            tracing::error!(%app, error = %e, kind = e.metric_label().label(), "starting from blank state");
            Ok(AppState::default())
        }
        Err(e) => Err(e),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SyncError> + Send + 'static,
) -> Result<T, SyncError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(SyncError::Internal)?
}

impl SyncContext {
    /// `publisher` carries status upstream; `None` for one-shot syncs and nodes without MQTT.
    pub(crate) async fn connect(
        node: Node,
        metrics: Arc<Metrics>,
        publisher: Option<Arc<StatusPublisher>>,
    ) -> Result<Arc<SyncContext>, ApplyError> {
        let client = apply::connect(node.config.kubernetes.kubeconfig.as_deref()).await?;
        let kube = Arc::new(KubeApplier::new(client, metrics.clone()));
        Ok(Self::with_cluster(
            node,
            metrics,
            publisher,
            kube.clone(),
            Some(kube),
        ))
    }

    /// A context over any [`Cluster`]; `kube`, the real API server, is what the drift
    /// watches and the status API need besides (engine tests run without one).
    pub(crate) fn with_cluster(
        node: Node,
        metrics: Arc<Metrics>,
        publisher: Option<Arc<StatusPublisher>>,
        cluster: Arc<dyn Cluster>,
        kube: Option<Arc<KubeApplier>>,
    ) -> Arc<SyncContext> {
        let Node {
            config,
            keyring,
            projects,
        } = node;
        let store = StateStore::new(&config.state_dir);
        // The first read of each state: a damaged file is reported here, once, as it is
        // set aside.
        let board = Arc::new(StatusBoard::new(
            &config,
            metrics.clone(),
            publisher.map(crate::report::publisher::forward),
            |app| load_or_blank(&store, &metrics, app).unwrap_or_default(),
        ));
        Arc::new(SyncContext {
            source: GitSource::new(&config.state_dir),
            charts: ChartSource::new(&config.state_dir),
            store,
            board,
            health_wake: tokio::sync::Notify::new(),
            health_dirty: Default::default(),
            cluster,
            kube,
            retries: Default::default(),
            synced: tokio::sync::watch::Sender::new(0),
            writers: Default::default(),
            claims: Default::default(),
            metrics,
            config,
            keyring,
            projects,
        })
    }

    /// Reads what `repo` offers once, for resolving all its apps' revisions: a Git
    /// repository's refs, or a Helm repository's index.
    pub(crate) async fn remote_refs(
        &self,
        repo: &RepositoryConfig,
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
            blocking(move || Ok(Revisions::Git(source.remote_refs(&repo)?))).await
        };
        self.metrics.git_fetch(started.elapsed());
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
                Ok(Target { sha, tag: None })
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

    /// Loads the app's state. An unreadable file has been moved aside by the store; the app
    /// starts again from a blank state rather than staying stuck.
    fn load_state(&self, app: &str) -> Result<AppState, SyncError> {
        Ok(load_or_blank(&self.store, &self.metrics, app)?)
    }

    /// Syncs `app` to commit `sha`. Unless `force` is set (a manual sync), an already applied
    /// commit is a no-op and a failed one waits for its retry. Sync windows hold both kinds,
    /// except for windows that allow manual syncs. A failure is recorded in the app's state;
    /// the last applied revision and the inventory are never lost.
    #[tracing::instrument(name = "sync", skip_all, fields(app = %app.name, revision = %crate::report::status::short_revision(Some(&target.sha))))]
    pub(crate) async fn sync_app(
        &self,
        app: &AppConfig,
        target: &Target,
        force: bool,
    ) -> Result<SyncResult, SyncError> {
        let sha = target.sha.as_str();
        let _writer = self.writer(&app.name).await;
        let state = self.load_state(&app.name)?;
        if !force && state.last_applied_revision.as_deref() == Some(sha) {
            self.board.up_to_date(&app.name, sha);
            return Ok(SyncResult::Unchanged {
                revision: sha.to_string(),
            });
        }
        if !force && !app.automated {
            // Argo CD's manual sync policy: a new revision waits for `edgesync sync`.
            let reason = format!(
                "manual sync policy (no syncPolicy.automated): run `edgesync sync {}` to apply",
                app.name
            );
            self.board.waiting(&app.name, sha, &reason);
            self.board.out_of_sync(&app.name, &reason);
            return Ok(SyncResult::Waiting {
                revision: sha.to_string(),
                reason,
                retry_in: None,
            });
        }
        if let Some(hold) = self.hold(app, &state, sha, force) {
            self.board.waiting(&app.name, sha, &hold.reason);
            return Ok(SyncResult::Waiting {
                revision: sha.to_string(),
                reason: hold.reason,
                retry_in: hold.retry_in,
            });
        }
        let result = self.attempt(app, target, state).await;
        self.synced.send_modify(|n| *n += 1);
        match &result {
            Ok(_) => self.retries.succeeded(&app.name),
            Err(e) => {
                let (note, _) =
                    self.retries
                        .failed(app, sha, e.is_transient(), std::time::Instant::now());
                self.board.note(&app.name, &note);
            }
        }
        result
    }

    /// Has `app` rated again soon: one of its objects changed.
    pub(crate) fn object_changed(&self, app: &str) {
        let mut dirty = self.health_dirty.lock().unwrap_or_else(|e| e.into_inner());
        dirty.insert(app.to_string());
        self.health_wake.notify_one();
    }

    /// The apps whose objects changed since the last call.
    pub(crate) fn take_health_dirty(&self) -> HashSet<String> {
        let mut dirty = self.health_dirty.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *dirty)
    }

    fn writer_lock(&self, app: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut writers = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        writers.entry(app.to_string()).or_default().clone()
    }

    /// Waits until nothing else writes `app`, and holds it until the guard is dropped.
    pub(crate) async fn writer(&self, app: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.writer_lock(app).lock_owned().await
    }

    /// Holds `app` if nothing else writes it now.
    pub(crate) fn try_writer(&self, app: &str) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.writer_lock(app).try_lock_owned().ok()
    }

    /// Whether something (a sync, a rollback, a self-heal) is writing `app` now.
    pub(crate) fn is_syncing(&self, app: &str) -> bool {
        self.try_writer(app).is_none()
    }

    /// Why `app` must not be synced to `sha` now, if it must not: a sync window, or the
    /// backoff of its retries.
    fn hold(
        &self,
        app: &AppConfig,
        state: &AppState,
        sha: &str,
        manual: bool,
    ) -> Option<retry::Hold> {
        let windows = match windows_of(&self.projects, app) {
            Ok(windows) => windows,
            Err(e) => {
                // A window that cannot be read might be the deny window that should hold this
                // sync now, or the only allow window: it holds every sync, manual ones too,
                // until it is fixed.
                self.metrics.error(crate::metrics::ErrorKind::SyncWindow);
                tracing::warn!(app = %app.name, "syncs held: {e}");
                return Some(retry::Hold {
                    reason: format!("{e}; syncs are held until it is fixed"),
                    retry_in: Some(WINDOW_RECHECK),
                });
            }
        };
        let now = jiff::Timestamp::now();
        if let Verdict::Blocked { reason, until } = window::verdict(&windows, now, manual) {
            let retry_in = until
                .and_then(|u| u.duration_since(now).try_into().ok())
                .map(|d: std::time::Duration| d + std::time::Duration::from_secs(1))
                .unwrap_or(WINDOW_RECHECK);
            return Some(retry::Hold {
                reason: format!("sync window: {reason}"),
                retry_in: Some(retry_in.min(WINDOW_RECHECK)),
            });
        }
        if manual {
            self.retries.reset(&app.name);
            return None;
        }
        if state.bad_revision.as_deref() == Some(sha) {
            return Some(retry::Hold {
                reason: format!(
                    "revision {} went Degraded and was rolled back; waiting for a newer revision",
                    crate::report::status::short_revision(Some(sha))
                ),
                retry_in: None,
            });
        }
        self.retries.gate(&app.name, sha, std::time::Instant::now())
    }

    async fn attempt(
        &self,
        app: &AppConfig,
        target: &Target,
        mut state: AppState,
    ) -> Result<SyncResult, SyncError> {
        let sha = target.sha.as_str();
        if state == AppState::default() {
            // No local state (a new state directory, or a damaged file set aside): what the
            // app owns may still be known to the cluster. Until it has been read, nothing is
            // applied and nothing saved: carrying on with an empty inventory would overwrite
            // the cluster's copy and orphan every object the app had.
            match self
                .cluster
                .load_inventory(&app.name, &self.config.node.name)
                .await
            {
                Ok(Some((inventory, objects))) => {
                    tracing::info!(app = %app.name, objects = inventory.len(),
                        "inventory recovered from the cluster");
                    state.inventory = inventory;
                    state.objects = objects;
                }
                Ok(None) => {}
                Err(e) => {
                    let error = SyncError::Inventory(e);
                    self.board
                        .synced(&app.name, &state, Some(&error.to_string()));
                    return Err(error);
                }
            }
        }
        state.delete_on_removal = app.delete_on_removal;
        state.last_attempted_revision = Some(sha.to_string());
        state.last_attempt_at = Some(unix_now());
        self.board.syncing(&app.name, sha);

        let started = Instant::now();
        let plan = match self.render_and_plan(app, target).await {
            Ok(plan) => plan,
            Err(e) => return self.failed(app, &mut state, e).await,
        };
        // An empty render with prune on would delete the whole app: a broken generator or an
        // emptied directory, far more often than intent (Argo CD's allowEmpty).
        if app.prune && !app.allow_empty && plan.rendered() == 0 && !state.objects.is_empty() {
            return self
                .failed(app, &mut state, ApplyError::EmptyRender.into())
                .await;
        }
        if let Err(e) = self.check_policy(app, &plan).await {
            return self.failed(app, &mut state, e).await;
        }
        if let Err(e) = self.check_conflicts(app, &plan) {
            return self.failed(app, &mut state, e).await;
        }
        let record = RenderRecord {
            revision: sha.to_string(),
            saved_at: unix_now(),
            plan,
        };
        let applied = self.apply_and_record(app, &mut state, &record).await;
        self.metrics.sync_duration(&app.name, started.elapsed());
        let total = match applied {
            Ok(total) => total,
            Err(e) => return self.failed(app, &mut state, e.into()).await,
        };
        self.board.synced(&app.name, &state, None);
        self.save_inventory(app, &state).await;
        self.save_state(&app.name, &state).await?;
        self.warn_orphans(app, &state).await;
        Ok(SyncResult::Applied {
            revision: sha.to_string(),
            objects: total,
        })
    }

    /// Refuses a plan with an object another app of this node manages or is about to: two
    /// apps applying one object would overwrite each other on every sync. The app that has it
    /// keeps it; nothing of this app is applied until one of them lets go. Claims are taken
    /// under one lock, so two apps syncing at once cannot both pass.
    fn check_conflicts(&self, app: &AppConfig, plan: &apply::Plan) -> Result<(), SyncError> {
        let mut guard = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        let claims = guard.get_or_insert_with(|| {
            let mut claims = HashMap::new();
            for other in &self.config.apps {
                if let Ok(state) = self.store.load(&other.name) {
                    for o in &state.objects {
                        claims.insert(
                            claim_key(&o.group, &o.kind, o.namespace.as_deref(), &o.name),
                            other.name.clone(),
                        );
                    }
                }
            }
            claims
        });
        let mut mine = Vec::new();
        for object in plan.rendered_objects() {
            let ns = object.namespace().or(plan.default_namespace.as_deref());
            let key = claim_key(object.group(), object.kind(), ns, object.name());
            // Cluster-scoped objects are recorded without a namespace.
            let bare = claim_key(object.group(), object.kind(), None, object.name());
            let owner = [&key, &bare]
                .into_iter()
                .find_map(|k| claims.get(k).filter(|o| **o != app.name));
            if let Some(owner) = owner {
                return Err(SyncError::Conflict(format!(
                    "{} ({}) is already managed by app {owner}; two apps must not manage one object",
                    object.display_name(),
                    object.origin
                )));
            }
            mine.push(key);
        }
        claims.retain(|_, owner| *owner != app.name);
        for key in mine {
            claims.insert(key, app.name.clone());
        }
        Ok(())
    }

    /// The app's AppProject rules, for the whole plan, before anything is applied.
    async fn check_policy(&self, app: &AppConfig, plan: &apply::Plan) -> Result<(), SyncError> {
        let Some(name) = app.project.as_deref() else {
            return Ok(());
        };
        let project = match self.projects.get(name) {
            Some(project) => project,
            // Argo CD's `default` project allows everything unless the fleet defines it.
            None if name == "default" => return Ok(()),
            None => return Err(SyncError::Policy(Denied::Undefined(name.to_string()))),
        };
        project.check_source(&app.repo)?;
        if let Some(ns) = &app.namespace {
            project.check_destination(ns)?;
        }
        for object in plan.rendered_objects() {
            let refused = |unknown_scope: bool| {
                move |e: Denied| {
                    SyncError::Policy(Denied::Object {
                        object: object.display_name(),
                        origin: object.origin.clone(),
                        unknown_scope,
                        source: Box::new(e),
                    })
                }
            };
            // The scope from discovery, or from a CRD in this very plan; a kind whose scope
            // is not known (discovery failed, or nothing defines it) must pass the rules of
            // both scopes: policy fails closed.
            let scope = match self.cluster.is_namespaced(object).await {
                Some(namespaced) => Some(namespaced),
                None => plan_scope(plan, object.group(), object.kind()),
            };
            let scopes: &[bool] = match scope {
                Some(true) => &[true],
                Some(false) => &[false],
                None => &[true, false],
            };
            for &namespaced in scopes {
                project
                    .check_kind(object.group(), object.kind(), namespaced)
                    .map_err(refused(scope.is_none()))?;
            }
            if let (false, Some(ns)) = (scope == Some(false), object.namespace()) {
                project.check_destination(ns).map_err(refused(false))?;
            }
        }
        Ok(())
    }

    /// `rollback = "auto"`: the app went Degraded (`reason`) at a revision that was never
    /// Healthy. Re-applies the last Healthy render, prunes what only the bad revision had
    /// (with `prune`), and marks the bad revision so it is not synced again until a newer one
    /// arrives. Nothing happens without a Healthy render to go back to.
    /// `revision` is the one found Degraded: if a sync moved the app on meanwhile, nothing
    /// is rolled back.
    pub(crate) async fn rollback(
        &self,
        app: &AppConfig,
        revision: &str,
        reason: &str,
    ) -> Result<(), SyncError> {
        let _writer = self.writer(&app.name).await;
        let mut state = self.load_state(&app.name)?;
        let Some(bad) = state
            .last_applied_revision
            .clone()
            .filter(|r| r == revision && state.last_error.is_none())
        else {
            return Ok(());
        };
        let healthy = match self.store.load_render(&app.name, RenderKind::Healthy) {
            Ok(Some(record)) if record.revision != bad => record,
            Ok(_) => return Ok(()),
            Err(e) => {
                self.metrics.error(e.metric_label());
                tracing::error!(app = %app.name, error = %e, "no rollback: the Healthy render is unreadable");
                return Ok(());
            }
        };
        tracing::warn!(app = %app.name, bad = %bad, to = %healthy.revision, "rolling back: {reason}");
        state.bad_revision = Some(bad.clone());
        let result = match self.apply_and_record(app, &mut state, &healthy).await {
            Ok(_) => Ok(()),
            Err(e) => {
                state.last_error = Some(format!("rollback failed: {e}"));
                Err(SyncError::from(e))
            }
        };
        self.save_state(&app.name, &state).await?;
        self.save_inventory(app, &state).await;
        self.synced.send_modify(|n| *n += 1);
        self.metrics.sync(&app.name, "rolled_back");
        self.board
            .rolled_back(&app.name, &state, &bad, reason, result.as_ref().err());
        result
    }

    /// The one apply-and-record path of sync and rollback: applies `record`'s plan; a
    /// complete apply makes its objects the app's, prunes what only earlier revisions had
    /// (with `prune`), and records the revision as applied with its render kept as the
    /// last-known-good one. A partial apply never prunes and records nothing but the
    /// inventory (what was created must stay known); a failed prune leaves the revision
    /// unrecorded, so nothing downstream (drift, health, rollback) takes it for done.
    /// The caller saves the state. Returns how many objects the plan had.
    async fn apply_and_record(
        &self,
        app: &AppConfig,
        state: &mut AppState,
        record: &RenderRecord,
    ) -> Result<usize, ApplyError> {
        let plan = &record.plan;
        let outcome = self.cluster.apply(plan, wave_timeout(app)).await;
        self.object_changed(&app.name);
        let total = outcome.applied.len() + outcome.failures.len();
        let (applied, error) = match outcome.into_result() {
            Ok(applied) => (applied, None),
            Err((applied, error)) => (applied, Some(error)),
        };
        let owned = plan.owned(&applied);
        state.inventory = apply::merge_inventory(&state.inventory, &owned);
        if let Some(error) = error {
            return Err(error);
        }
        state.objects = owned.into_iter().collect();
        if app.prune {
            self.prune(app, state, plan).await?;
        }
        state.last_applied_revision = Some(record.revision.clone());
        state.last_applied_at = Some(unix_now());
        state.last_error = None;
        // The render before the state: once the state says a revision is applied, the
        // render that goes with it is in place.
        if let Err(e) = self
            .save_render(&app.name, RenderKind::Applied, record)
            .await
        {
            self.metrics.error(e.metric_label());
            tracing::warn!(app = %app.name, error = %e, "cannot keep the last-known-good render");
        }
        Ok(total)
    }

    /// Writes the app's state on a blocking thread: each write ends in fsyncs, which must
    /// not stall the async workers.
    async fn save_state(&self, app: &str, state: &AppState) -> Result<(), SyncError> {
        let (store, app, state) = (self.store.clone(), app.to_string(), state.clone());
        blocking(move || Ok(store.save(&app, &state)?)).await
    }

    /// Writes a last-known-good render on a blocking thread (see [`Self::save_state`]).
    async fn save_render(
        &self,
        app: &str,
        kind: RenderKind,
        record: &RenderRecord,
    ) -> Result<(), SyncError> {
        let (store, app, record) = (self.store.clone(), app.to_string(), record.clone());
        blocking(move || Ok(store.save_render(&app, kind, &record)?)).await
    }

    /// Keeps the applied render as the app's last Healthy one, once its revision is Healthy.
    pub(crate) async fn remember_healthy(&self, app: &str, revision: &str) {
        let current = self.store.load_render(app, RenderKind::Healthy);
        if matches!(&current, Ok(Some(r)) if r.revision == revision) {
            return;
        }
        match self.store.load_render(app, RenderKind::Applied) {
            Ok(Some(record)) if record.revision == revision => {
                if let Err(e) = self.save_render(app, RenderKind::Healthy, &record).await {
                    self.metrics.error(e.metric_label());
                    tracing::warn!(%app, error = %e, "cannot keep the Healthy render");
                }
            }
            Ok(_) => {}
            Err(e) => self.metrics.error(e.metric_label()),
        }
    }

    /// AppProject `orphanedResources.warn`: objects of the kinds the app applies, in its
    /// namespace, that no app manages and nothing owns, are reported (log and status), as Argo
    /// CD warns about them. Objects every namespace has (`kube-root-ca.crt`, the `default`
    /// ServiceAccount) and the project's `ignore` entries are left out.
    async fn warn_orphans(&self, app: &AppConfig, state: &AppState) {
        let Some(ignore) = app
            .project
            .as_deref()
            .and_then(|p| self.projects.get(p))
            .and_then(|p| p.orphans_warn.as_ref())
        else {
            return;
        };
        let Some(ns) = app.namespace.as_deref() else {
            return;
        };
        let mut kinds: Vec<&ObjectRef> = Vec::new();
        for o in state
            .objects
            .iter()
            .filter(|o| o.namespace.as_deref() == Some(ns))
        {
            if !kinds.iter().any(|k| k.group == o.group && k.kind == o.kind) {
                kinds.push(o);
            }
        }
        let mut orphans = Vec::new();
        for kind in kinds {
            let Ok(listed) = self.cluster.list_meta(kind, ns).await else {
                continue;
            };
            for (name, managed, owned) in listed {
                let system = matches!(
                    (kind.kind.as_str(), name.as_str()),
                    ("ConfigMap", "kube-root-ca.crt") | ("ServiceAccount", "default")
                );
                if managed
                    || owned
                    || system
                    || ignore
                        .iter()
                        .any(|i| i.matches(&kind.group, &kind.kind, &name))
                {
                    continue;
                }
                orphans.push(format!("{} {ns}/{name}", kind.kind));
            }
        }
        let warnings = if orphans.is_empty() {
            Vec::new()
        } else {
            tracing::warn!(app = %app.name, count = orphans.len(), "orphaned resources: {}", orphans.join(", "));
            vec![format!(
                "{} orphaned resources: {}",
                orphans.len(),
                orphans.join(", ")
            )]
        };
        self.board.warnings(&app.name, warnings);
    }

    /// Mirrors the app's inventory into the cluster, so a node whose state directory was lost
    /// still knows what the app owns. A failure is logged and counted; the local copy rules.
    async fn save_inventory(&self, app: &AppConfig, state: &AppState) {
        if let Err(e) = self
            .cluster
            .save_inventory(
                &app.name,
                &self.config.node.name,
                apply::InventoryRecord {
                    inventory: &state.inventory,
                    objects: &state.objects,
                    revision: state.last_applied_revision.as_deref(),
                },
            )
            .await
        {
            self.metrics.error(crate::metrics::ErrorKind::Inventory);
            tracing::warn!(app = %app.name, "cannot store the inventory in the cluster: {e}");
            self.board.note(
                &app.name,
                &format!("inventory not mirrored to the cluster: {e}"),
            );
        }
    }

    /// Records a failed attempt; the last applied revision and the inventory stay.
    async fn failed(
        &self,
        app: &AppConfig,
        state: &mut AppState,
        error: SyncError,
    ) -> Result<SyncResult, SyncError> {
        state.last_error = Some(error.to_string());
        self.board
            .synced(&app.name, state, state.last_error.as_deref());
        self.save_state(&app.name, state).await?;
        self.save_inventory(app, state).await;
        Err(error)
    }

    /// Deletes what the app applied before and its latest complete apply left out, unless it
    /// is someone else's now or opts out with `Prune=false`. The inventory forgets what is
    /// gone or no longer ours; what could not be deleted stays, to be tried again.
    async fn prune(
        &self,
        app: &AppConfig,
        state: &mut AppState,
        plan: &apply::Plan,
    ) -> Result<(), ApplyError> {
        let mut keep = plan.protected();
        keep.extend(state.objects.iter().cloned());
        let propagation = match app.sync_option("PrunePropagationPolicy") {
            Some("background") => "Background",
            Some("orphan") => "Orphan",
            _ => "Foreground",
        };
        let candidates = apply::prune_candidates(&state.inventory, &keep);
        let done = super::prune::delete_owned(
            &*self.cluster,
            &self.config.node.name,
            &app.name,
            candidates,
            propagation,
        )
        .await;
        for object in done.deleted.iter().chain(&done.forgotten) {
            state.inventory.remove(object);
        }
        let pruned: Vec<String> = done.deleted.iter().map(ToString::to_string).collect();
        let failures = done.failures;
        if !pruned.is_empty() {
            self.board
                .pruned(&app.name, state.last_attempted_revision.as_deref(), &pruned);
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(ApplyError::Prune { failures })
        }
    }

    /// The app's current target revision, rendered and planned (for `edgesync diff`).
    pub(crate) async fn target_plan(
        &self,
        app: &AppConfig,
    ) -> Result<(String, apply::Plan), SyncError> {
        let repo = self.config.repository(&app.repo);
        let revisions = self.remote_refs(&repo).await?;
        let target = self.resolve(&repo, &revisions, app).await?;
        let plan = self.render_and_plan(app, &target).await?;
        Ok((target.sha, plan))
    }

    /// Who requires the app's revision to be signed, and by which keys: its project, when
    /// that lists signatureKeys.
    fn required_signers(&self, app: &AppConfig) -> Option<(String, Vec<String>)> {
        let name = app.project.as_deref()?;
        self.projects.get(name)?.required_signers()
    }

    async fn render_and_plan(
        &self,
        app: &AppConfig,
        target: &Target,
    ) -> Result<apply::Plan, SyncError> {
        let source = self.source.clone();
        let repo = self.config.repository(&app.repo);
        let app = app.clone();
        let target = target.clone();
        let sha = target.sha.clone();
        let signers = self.required_signers(&app);
        let keyring = self.keyring.clone();
        let metrics = self.metrics.clone();
        let vars =
            (app.substitute != Substitute::Off).then(|| self.config.substitution_variables(&app));
        let helm = render::helm::HelmRequest {
            app: app.name.clone(),
            namespace: app.namespace.clone(),
            options: app.helm.clone().unwrap_or_default(),
            binary: self
                .config
                .helm
                .binary
                .clone()
                .unwrap_or_else(|| "helm".into()),
        };
        let charts = self.charts.clone();
        let remote_policy = app
            .project
            .as_deref()
            .and_then(|p| self.projects.get(p))
            .cloned()
            .map(|project| {
                render::RemotePolicy(Arc::new(move |repo: &str| Ok(project.check_source(repo)?)))
            });
        blocking(move || {
            if let Some((required_by, keys)) = &signers {
                if let Some(chart) = &app.chart {
                    return Err(crate::signature::VerifyError::NotGit {
                        object: format!("chart {chart} {sha}"),
                        required_by: required_by.clone(),
                    }
                    .into());
                }
                // Before the commit is checked out, let alone rendered.
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
            let (root, path) = if app.chart.is_some() {
                charts.unpacked(&repo.url, &sha)?
            } else {
                let started = Instant::now();
                let snapshot = source.snapshot(&repo, &app.revision, &sha)?;
                if snapshot.fetched {
                    metrics.git_fetch(started.elapsed());
                }
                (snapshot.root, app.path.clone().into())
            };
            let options = render::RenderOptions {
                kustomize_fallback: app.kustomize_fallback.as_deref(),
                helm: Some(helm),
                directory: app.directory.clone(),
                kustomize: app.kustomize.clone(),
                remote_policy,
            };
            let mut manifests = render::render_with(&root, &path, &options)?;
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
            plan.ignore_differences = app.ignore_differences.clone();
            plan.out_of_sync_only = app.sync_option("ApplyOutOfSyncOnly") == Some("true");
            Ok(plan)
        })
        .await
    }

    /// Removes snapshots of `repo` that no app needs any more. Charts are kept per digest,
    /// whichever repository they came from, so all chart apps count for them.
    pub(crate) fn retain_snapshots(&self, repo: &str, in_use: impl IntoIterator<Item = String>) {
        let charts = self.config.is_chart_repository(repo);
        let mut keep: HashSet<String> = in_use.into_iter().collect();
        let apps = self.config.apps.iter().filter(|a| {
            if charts {
                a.chart.is_some()
            } else {
                a.repo == repo
            }
        });
        for app in apps {
            if let Ok(state) = self.store.load(&app.name) {
                keep.extend(state.last_applied_revision);
            }
        }
        if charts {
            self.charts.retain(&keep);
        } else {
            self.source.retain(repo, &keep);
        }
    }
}
