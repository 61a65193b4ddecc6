//! One sync of one app through the pipeline: snapshot → render → plan → apply → state.
//! Shared by `edgesync run` and `edgesync sync`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use super::checks::{windows_of, ClaimKey};
use super::node::Node;
use super::retry;
pub(crate) use super::target::Target;
use crate::apply::hooks::HookPhase;
use crate::apply::{self, ApplyError, Cluster, KubeApplier, ObjectRef};
use crate::config::{AppConfig, Config};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::model::window::{self, Verdict};
use crate::policy::Denied;
use crate::render::RenderError;
use crate::report::publisher::StatusPublisher;
use crate::report::status::StatusBoard;
use crate::source::{ChartSource, GitSource, SourceError};
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
    #[error(transparent)]
    Hook(#[from] super::hooks::HookFailed),
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
            SyncError::Hook(_) => ErrorKind::Hook,
            SyncError::Inventory(_) => ErrorKind::Inventory,
            SyncError::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// How long a wave may take to become healthy when the app sets no `health_timeout`.
pub(super) const DEFAULT_WAVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// How long each sync wave may take to become healthy.
fn wave_timeout(app: &AppConfig) -> std::time::Duration {
    app.health_timeout.unwrap_or(DEFAULT_WAVE_TIMEOUT)
}

/// How long the namespace hooks run in may take to be created.
const NAMESPACE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

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

/// What one apply's answers showed of its objects' health ([`SyncContext::take_applied_health`]).
pub(super) struct AppliedHealth {
    began: Instant,
    objects: HashMap<ObjectRef, Health>,
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
    pub(super) health_dirty: std::sync::Mutex<HashSet<String>>,
    /// When a watch last saw someone else change (or delete) one of each app's objects.
    pub(super) changed_by_others: std::sync::Mutex<HashMap<String, Instant>>,
    /// Each app's object health as its last apply's answers showed it, and when that apply
    /// began: the health monitor's next rating uses it instead of a GET per object, unless a
    /// watch saw another writer change one of the app's objects since.
    pub(super) applied_health: std::sync::Mutex<HashMap<String, AppliedHealth>>,
    /// The kinds (group, kind, namespace) whose drift watch is listed and running: the health
    /// monitor needs no GETs for objects in them while nothing changes.
    pub(super) watched: std::sync::Mutex<HashSet<(String, String, Option<String>)>>,
    /// Apps with a change the drift watch has not checked yet, or drift it has not healed:
    /// such an app is applied in full even when its render did not change.
    pub(super) drift_open: std::sync::Mutex<HashSet<String>>,
    pub(crate) source: GitSource,
    pub(crate) charts: ChartSource,
    /// What the engine reads, applies and deletes through.
    pub(crate) cluster: Arc<dyn Cluster>,
    /// The real API server, for the drift watches and the status API.
    pub(crate) kube: Option<Arc<KubeApplier>>,
    pub(crate) store: StateStore,
    pub(crate) retries: retry::Retries,
    /// Counts finished sync attempts; the drift watcher reloads the desired state of the apps
    /// in `resynced` on each.
    pub(crate) synced: tokio::sync::watch::Sender<u64>,
    /// Apps synced or rolled back since the drift watcher last looked ([`Self::take_resynced`]).
    resynced: std::sync::Mutex<HashSet<String>>,
    /// One writer per app: sync, rollback, self-heal and removal each hold the app's lock
    /// while they change its objects or its state, so none undoes what another just did.
    pub(super) writers: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The cluster's version and APIs for Helm, and when they were read.
    pub(super) capabilities: tokio::sync::Mutex<Option<(Instant, Arc<apply::kube::Capabilities>)>>,
    /// Which app manages each object on this node (read from the states on first use).
    pub(super) claims: std::sync::Mutex<Option<HashMap<ClaimKey, Arc<str>>>>,
    /// The fleet hub's rollout gates, with `[gates]`.
    pub(crate) gates: Option<super::gates::Gates>,
    /// How many sync attempts may still write to the cluster ([`SyncContext::applying`]).
    pub(super) applies: tokio::sync::watch::Sender<usize>,
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

pub(super) async fn blocking<T: Send + 'static>(
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
        let (client, watches) =
            apply::connect(node.config.kubernetes.kubeconfig.as_deref()).await?;
        let kube = Arc::new(KubeApplier::new(client, metrics.clone()).with_watch_client(watches));
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
            fleet_problems,
        } = node;
        let store = StateStore::new(&config.state_dir);
        // The first read of each state: a damaged file is reported here, once, as it is
        // set aside.
        let board = Arc::new(StatusBoard::new(
            &config,
            &fleet_problems,
            metrics.clone(),
            publisher.map(crate::report::publisher::forward),
            |app| load_or_blank(&store, &metrics, app).unwrap_or_default(),
        ));
        let gates = super::gates::Gates::load(&config, &store, &metrics);
        Arc::new(SyncContext {
            gates,
            source: GitSource::new(&config.state_dir),
            charts: ChartSource::new(&config.state_dir),
            store,
            board,
            health_wake: tokio::sync::Notify::new(),
            health_dirty: Default::default(),
            changed_by_others: Default::default(),
            applied_health: Default::default(),
            watched: Default::default(),
            drift_open: Default::default(),
            cluster,
            kube,
            retries: Default::default(),
            synced: tokio::sync::watch::Sender::new(0),
            resynced: Default::default(),
            writers: Default::default(),
            claims: Default::default(),
            capabilities: Default::default(),
            applies: tokio::sync::watch::Sender::new(0),
            metrics,
            config,
            keyring,
            projects,
        })
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
    #[tracing::instrument(name = "sync", skip_all, fields(app = %app.name, revision = %crate::report::status::short_revision(Some(&target.revision()))))]
    pub(crate) async fn sync_app(
        &self,
        app: &AppConfig,
        target: &Target,
        force: bool,
    ) -> Result<SyncResult, SyncError> {
        let revision = target.revision();
        let sha = revision.as_str();
        let _writer = self.writer(&app.name).await;
        let state = self.load_state(&app.name)?;
        // Applied, and nothing failed since: a PostSync hook that failed after the apply
        // leaves the revision applied and the sync failed, to be retried as Argo CD does.
        if !force
            && state.last_applied_revision.as_deref() == Some(sha)
            && state.last_error.is_none()
        {
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
        let result = self.attempt(app, target, state, force).await;
        self.resynced(&app.name);
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

    /// A sync attempt or a rollback of `app` ended: its desired state may have changed.
    fn resynced(&self, app: &str) {
        self.resynced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(app.to_string());
        self.synced.send_modify(|n| *n += 1);
    }

    /// The apps synced or rolled back since the last call.
    pub(super) fn take_resynced(&self) -> HashSet<String> {
        std::mem::take(&mut *self.resynced.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Has `app` rated again soon: one of its objects changed.
    pub(crate) fn object_changed(&self, app: &str) {
        let mut dirty = self.health_dirty.lock().unwrap_or_else(|e| e.into_inner());
        dirty.insert(app.to_string());
        self.health_wake.notify_one();
    }

    /// A watch saw a writer other than edgesync change or delete one of `app`'s objects: the
    /// health its last apply answered with is no longer the news.
    pub(crate) fn changed_by_others(&self, app: &str) {
        let mut changed = self
            .changed_by_others
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        changed.insert(app.to_string(), Instant::now());
        drop(changed);
        self.object_changed(app);
    }

    /// Keeps the health of the objects an apply that began at `began` answered with.
    fn keep_applied_health(&self, app: &str, began: Instant, rated: Vec<(ObjectRef, Health)>) {
        let mut kept = self
            .applied_health
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        kept.insert(
            app.to_string(),
            AppliedHealth {
                began,
                objects: rated.into_iter().collect(),
            },
        );
    }

    /// The health `app`'s last apply answered with, once: `None` if a watch saw another writer
    /// change one of its objects since that apply began (then only a fresh read will do).
    pub(super) fn take_applied_health(&self, app: &str) -> Option<HashMap<ObjectRef, Health>> {
        let kept = self
            .applied_health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(app)?;
        let changed = self
            .changed_by_others
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(app)
            .copied();
        match changed {
            Some(at) if at >= kept.began => None,
            _ => Some(kept.objects),
        }
    }

    /// Records whether the drift watch of a kind in a namespace (`None`: cluster-wide) is
    /// listed and running.
    pub(super) fn set_watched(&self, group: &str, kind: &str, ns: Option<&str>, up: bool) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let scope = (group.to_string(), kind.to_string(), ns.map(str::to_string));
        if up {
            watched.insert(scope);
        } else {
            watched.remove(&scope);
        }
        self.metrics.set_drift_watches(watched.len());
    }

    /// Whether a running watch sees every change to each of `objects`.
    pub(super) fn all_watched<'a>(
        &self,
        objects: impl IntoIterator<Item = &'a apply::ObjectRef>,
    ) -> bool {
        let watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        objects.into_iter().all(|o| {
            // One watch per namespace, or one for the kind cluster-wide.
            let scope = (o.group.clone(), o.kind.clone(), o.namespace.clone());
            watched.contains(&scope) || watched.contains(&(scope.0, scope.1, None))
        })
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
        force: bool,
    ) -> Result<SyncResult, SyncError> {
        let revision = target.revision();
        let sha = revision.as_str();
        // Until it is known to send nothing, this attempt may write to the cluster.
        let applying = self.applying();
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
        tracing::debug!(
            ms = started.elapsed().as_millis(),
            "checked out, rendered and planned"
        );
        // A render with no objects is a broken generator, an emptied directory or a source
        // edgesync cannot render, far more often than intent (Argo CD's allowEmpty): it would
        // report Synced with nothing applied, and with prune on delete the whole app.
        // A render of hooks only is an app of hooks, unless the app had objects: then it is
        // an emptied render, and pruning would delete them all.
        let only_hooks = !plan.hooks.is_empty() && state.objects.is_empty();
        if !app.allow_empty && plan.rendered() == 0 && !only_hooks {
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
        let mut warnings = super::checks::hook_warnings(app, &plan);
        warnings.extend(plan.warnings.iter().cloned());
        if !force && self.render_unchanged(app, &state, &plan).await {
            drop(applying);
            return self.keep_render(app, state, sha, plan, warnings).await;
        }
        if let Err(e) = self.before_hooks(&plan).await {
            return self.failed(app, &mut state, e.into()).await;
        }
        if let Err(e) = self
            .run_hooks(&plan, HookPhase::PreSync, wave_timeout(app))
            .await
        {
            self.sync_failed_hooks(app, &plan).await;
            return self.failed(app, &mut state, e.into()).await;
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
            Err(e) => {
                self.sync_failed_hooks(app, &record.plan).await;
                return self.failed(app, &mut state, e.into()).await;
            }
        };
        for phase in [HookPhase::Sync, HookPhase::PostSync] {
            if let Err(e) = self.run_hooks(&record.plan, phase, wave_timeout(app)).await {
                // The objects are applied and recorded; the sync still failed, as in Argo CD.
                self.sync_failed_hooks(app, &record.plan).await;
                return self.failed(app, &mut state, e.into()).await;
            }
        }
        self.board.synced(&app.name, &state, None);
        self.save_inventory(app, &state).await;
        self.save_state(&app.name, &state).await?;
        warnings.extend(self.orphan_warnings(app, &state).await);
        self.board.warnings(&app.name, warnings);
        Ok(SyncResult::Applied {
            revision: sha.to_string(),
            objects: total,
        })
    }

    /// What hooks need in place before they run: the namespace `create_namespace` adds.
    async fn before_hooks(&self, plan: &apply::Plan) -> Result<(), ApplyError> {
        if plan.hooks.is_empty() {
            return Ok(());
        }
        let Some(namespace) = plan.namespace_first() else {
            return Ok(());
        };
        let outcome = self.cluster.apply(&namespace, NAMESPACE_TIMEOUT).await;
        outcome.into_result().map(|_| ()).map_err(|(_, e)| e)
    }

    /// A sync failed: its `SyncFail` hooks run; their own failure is only logged.
    async fn sync_failed_hooks(&self, app: &AppConfig, plan: &apply::Plan) {
        if let Err(e) = self
            .run_hooks(plan, HookPhase::SyncFail, wave_timeout(app))
            .await
        {
            self.metrics.error(crate::metrics::ErrorKind::Hook);
            tracing::warn!(app = %app.name, "{e}");
        }
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
        self.resynced(&app.name);
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
        let began = Instant::now();
        let mut outcome = self.cluster.apply(plan, wave_timeout(app)).await;
        tracing::debug!(ms = began.elapsed().as_millis(), "applied");
        self.keep_applied_health(&app.name, began, std::mem::take(&mut outcome.rated));
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

    /// Writes the app's state on a blocking thread (each write ends in fsyncs, which must
    /// not stall the async workers), then has the app rated: the health monitor reads which
    /// objects the app has from that state.
    pub(super) async fn save_state(&self, app: &str, state: &AppState) -> Result<(), SyncError> {
        let (store, name, state) = (self.store.clone(), app.to_string(), state.clone());
        blocking(move || Ok(store.save(&name, &state)?)).await?;
        self.object_changed(app);
        Ok(())
    }

    /// Writes a last-known-good render on a blocking thread (see [`Self::save_state`]).
    pub(super) async fn save_render(
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
    pub(super) async fn failed(
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
}
