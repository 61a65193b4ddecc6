//! A new revision whose render for an app is the one already applied: Argo CD leaves such an
//! app Synced at the new revision without a sync operation, and so does edgesync, but only
//! where it knows the cluster still holds that render (a drift watch sees every object and
//! heals it). A repository of 500 apps and a commit to one then costs one app's apply.

use super::sync::{blocking, SyncContext, SyncError, SyncResult};
use crate::apply::Plan;
use crate::config::AppConfig;
use crate::state::{unix_now, AppState, RenderKind, RenderRecord};

/// The longest an unchanged render's record waits for other apps' applies (waves can wait
/// minutes for health).
const RECORD_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A sync attempt that may write to the cluster ([`SyncContext::applying`]).
pub(super) struct Applying<'a>(&'a tokio::sync::watch::Sender<usize>);

impl Drop for Applying<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl SyncContext {
    /// Whether applying `plan` could change nothing: it equals the render applied last,
    /// completely (no error since, nothing left to prune), self-heal keeps the objects as
    /// that render has them, a running watch sees each of them, and no change is waiting for
    /// the drift check. When in doubt the app is applied in full.
    pub(super) async fn render_unchanged(
        &self,
        app: &AppConfig,
        state: &AppState,
        plan: &Plan,
    ) -> bool {
        if !app.self_heal || state.last_error.is_some() || state.inventory != state.objects {
            return false;
        }
        let Some(applied) = state.last_applied_revision.clone() else {
            return false;
        };
        if self.drift_open(&app.name) || !self.all_watched(&state.objects) {
            return false;
        }
        let (store, name) = (self.store.clone(), app.name.clone());
        let last = blocking(move || Ok(store.load_render(&name, RenderKind::Applied)?)).await;
        matches!(last, Ok(Some(record)) if record.revision == applied && record.plan == *plan)
    }

    /// Records `sha` as applied without sending anything: the render is kept under the new
    /// revision (the drift watch and rollback read it by revision); saving the state has the
    /// health monitor rate the app again, so the new revision is known Healthy before it can
    /// be a rollback's target.
    pub(super) async fn keep_render(
        &self,
        app: &AppConfig,
        mut state: AppState,
        sha: &str,
        plan: Plan,
        mut warnings: Vec<String>,
    ) -> Result<SyncResult, SyncError> {
        self.after_applies().await;
        let record = RenderRecord {
            revision: sha.to_string(),
            saved_at: unix_now(),
            plan,
        };
        // The render before the state, as after an apply: once the state names a revision,
        // its render is in place.
        if let Err(e) = self
            .save_render(&app.name, RenderKind::Applied, &record)
            .await
        {
            return self.failed(app, &mut state, e).await;
        }
        state.last_applied_revision = Some(sha.to_string());
        state.last_applied_at = Some(unix_now());
        state.last_error = None;
        tracing::info!(app = %app.name, revision = %sha,
            "render unchanged since the last apply: revision recorded, nothing applied");
        self.board.synced(&app.name, &state, None);
        // The inventory is what it was: its ConfigMap is not written again.
        self.save_state(&app.name, &state).await?;
        warnings.extend(self.orphan_warnings(app, &state).await);
        self.board.warnings(&app.name, warnings);
        Ok(SyncResult::Unchanged {
            revision: sha.to_string(),
        })
    }

    /// Counts a sync attempt that may write to the cluster until the guard is dropped.
    pub(super) fn applying(&self) -> Applying<'_> {
        self.applies.send_modify(|n| *n = n.saturating_add(1));
        Applying(&self.applies)
    }

    /// Waits (up to [`RECORD_WAIT`]) until no sync attempt may still write to the cluster. A
    /// push usually changes one app of a repository and leaves the others' renders as they
    /// were: their records (a render and a state, each written and synced) would otherwise
    /// land while the changed app's applies are in flight, and fsyncs beside etcd's slow every
    /// apply on a small node's one disk. The unchanged apps lose nothing by waiting: nothing
    /// is sent for them.
    async fn after_applies(&self) {
        let mut applies = self.applies.subscribe();
        let _ = tokio::time::timeout(RECORD_WAIT, applies.wait_for(|n| *n == 0)).await;
    }

    /// Whether the drift watch has a change of `app` to check, or drift it has not healed.
    pub(super) fn drift_open(&self, app: &str) -> bool {
        let open = self.drift_open.lock().unwrap_or_else(|e| e.into_inner());
        open.contains(app)
    }

    /// Records whether `app` has drift not checked or not healed (see [`Self::drift_open`]).
    pub(super) fn set_drift_open(&self, app: &str, is_open: bool) {
        let mut open = self.drift_open.lock().unwrap_or_else(|e| e.into_inner());
        if is_open {
            if !open.contains(app) {
                open.insert(app.to_string());
            }
        } else {
            open.remove(app);
        }
    }
}
