//! Running an app's resource hooks in their phase, as Argo CD runs them: in wave order, each
//! created (an older one of the same name deleted first, `BeforeHookCreation`), Jobs and Pods
//! waited on until they finish, deleted afterwards as their policy says. A failed hook fails
//! the sync; the caller then runs the `SyncFail` hooks.

use std::time::{Duration, Instant};

use crate::apply::hooks::{DeletePolicy, Hook, HookPhase};
use crate::apply::{ObjectRef, Plan};
use crate::health::HealthStatus;

use super::sync::SyncContext;

/// How often a running hook is looked at.
const POLL: Duration = Duration::from_millis(500);

/// A hook that did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{phase:?} hook {hook} failed: {message}")]
pub(crate) struct HookFailed {
    pub(crate) phase: HookPhase,
    pub(crate) hook: String,
    pub(crate) message: String,
    /// Whether the hook was created (it ran, or still runs); `false` when creating it failed.
    pub(crate) ran: bool,
}

impl SyncContext {
    /// Runs the hooks of `phase` in `plan`, one after the other in wave order; stops at the
    /// first that fails. Each may take `timeout` to finish.
    pub(super) async fn run_hooks(
        &self,
        plan: &Plan,
        phase: HookPhase,
        timeout: Duration,
    ) -> Result<(), HookFailed> {
        for hook in plan.hooks.iter().filter(|h| h.phases.contains(&phase)) {
            let name = hook.object.display_name();
            tracing::info!(hook = %name, ?phase, "running hook");
            match self.run_hook(hook, plan, timeout).await {
                Ok(created) => {
                    if hook.deleted(DeletePolicy::HookSucceeded) {
                        self.delete_hook(&created, timeout).await;
                    }
                }
                Err((created, message)) => {
                    let ran = created.is_some();
                    if let (Some(created), true) = (created, hook.deleted(DeletePolicy::HookFailed))
                    {
                        self.delete_hook(&created, timeout).await;
                    }
                    return Err(HookFailed {
                        phase,
                        hook: name,
                        message,
                        ran,
                    });
                }
            }
        }
        Ok(())
    }

    /// Creates `hook` and, for a Job or Pod, waits until it finishes. `Err` carries what was
    /// created, if anything, and why it failed.
    async fn run_hook(
        &self,
        hook: &Hook,
        plan: &Plan,
        timeout: Duration,
    ) -> Result<ObjectRef, (Option<ObjectRef>, String)> {
        if !hook.object.name().is_empty() && hook.deleted(DeletePolicy::BeforeHookCreation) {
            let named = plan.reference(&hook.object);
            self.delete_hook(&named, timeout).await;
        }
        let created = self
            .cluster
            .create(&hook.object, plan)
            .await
            .map_err(|f| (None, f.message))?;
        if !hook.runs() {
            return Ok(created);
        }
        let started = Instant::now();
        loop {
            let live = self
                .cluster
                .get(&created)
                .await
                .map_err(|e| (Some(created.clone()), e.message))?;
            let Some(live) = live else {
                return Err((Some(created), "it was deleted while it ran".into()));
            };
            let health = crate::health::assess(&live);
            match health.status {
                HealthStatus::Healthy => return Ok(created),
                HealthStatus::Degraded => return Err((Some(created), health.message)),
                _ if started.elapsed() >= timeout => {
                    return Err((
                        Some(created),
                        format!("not finished after {timeout:?}: {}", health.message),
                    ))
                }
                _ => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Deletes a hook (and, for a Job, its Pods) and waits until it is gone, so one of the same
    /// name can be created again.
    async fn delete_hook(&self, hook: &ObjectRef, timeout: Duration) {
        let started = Instant::now();
        loop {
            match self.cluster.get(hook).await {
                Ok(None) => return,
                Ok(Some(live)) => {
                    if let Err(e) = self
                        .cluster
                        .delete_unchanged(hook, &live, "Background")
                        .await
                    {
                        tracing::warn!(hook = %hook, "cannot delete hook: {e}");
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(hook = %hook, "cannot read hook: {e}");
                    return;
                }
            }
            if started.elapsed() >= timeout {
                tracing::warn!(hook = %hook, "hook still there after {timeout:?}");
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}
