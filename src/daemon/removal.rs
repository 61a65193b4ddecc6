//! Apps that left this node: removed from the config or the fleet, or targeted at other nodes.
//! Argo CD's finalizer semantics: with `delete_on_removal` (the Application carried
//! `resources-finalizer.argocd.argoproj.io`) the app's objects are deleted, except those
//! someone else took over or that say `Prune=false` / `Delete=false`; without it they stay
//! where they are. Either way the app's files move to `state_dir/apps/removed/`. A failed
//! delete keeps the app's state, so the next start or reload tries again.
//!
//! `PostDelete` hooks (Argo CD's, and Helm's `post-delete`) of the last applied render run
//! once the deleted objects are gone, as Argo CD runs them after a cascading delete. Without
//! `delete_on_removal` they do not run: a cleanup Job must not run against objects that stay
//! (an app that moved to another node keeps running there). A hook that could not be created,
//! or objects still on their way out, keep the app's state for the next try; a hook that ran
//! and failed is reported, and not run again.
//!
//! This only runs when the app set is known for sure: the fleet was read from Git just now
//! (a node that fell back to its saved fleet must never take an unreadable fleet for an
//! empty one).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::SyncContext;
use crate::apply::hooks::HookPhase;
use crate::apply::{self, ObjectRef};
use crate::state::RenderKind;

/// How often objects on their way out are looked at.
const POLL: Duration = Duration::from_millis(500);

pub(crate) async fn remove_departed(ctx: Arc<SyncContext>) {
    for app in ctx.store.apps() {
        if ctx.config.app(&app).is_some() {
            continue;
        }
        let _writer = ctx.writer(&app).await;
        let Ok(state) = ctx.store.load(&app) else {
            continue;
        };
        if state.delete_on_removal {
            let candidates = apply::prune_candidates(&state.inventory, &Default::default());
            let done = super::prune::delete_owned(
                &*ctx.cluster,
                &ctx.config.node.name,
                &app,
                candidates,
                "Foreground",
            )
            .await;
            for failure in &done.failures {
                tracing::warn!(%app, object = %failure.object, "cannot delete: {}", failure.message);
            }
            for object in &done.deleted {
                tracing::info!(%app, %object, "deleted: the app left this node");
            }
            let failed = done.failures.len() + done.changed.len();
            if failed > 0 {
                ctx.metrics.error(crate::metrics::ErrorKind::Removal);
                tracing::warn!(%app, failed, "removal incomplete; tried again at the next start");
                continue;
            }
            if !post_delete_hooks(&ctx, &app, &done.deleted).await {
                ctx.metrics.error(crate::metrics::ErrorKind::Removal);
                tracing::warn!(%app, "removal incomplete; tried again at the next start");
                continue;
            }
        } else {
            tracing::info!(%app, objects = state.objects.len(),
                "app left this node; its objects stay (no resources finalizer, delete_on_removal off)");
            let hooks = post_delete_hook_names(&ctx, &app);
            if !hooks.is_empty() {
                tracing::warn!(%app, hooks = %hooks.join(", "),
                    "PostDelete hooks not run: the app's objects stay (no resources finalizer)");
            }
        }
        if let Err(e) = ctx
            .cluster
            .delete_inventory(&app, &ctx.config.node.name)
            .await
        {
            tracing::warn!(%app, "cannot delete the inventory in the cluster: {e}");
        }
        let (store, name) = (ctx.store.clone(), app.clone());
        let archived = tokio::task::spawn_blocking(move || store.archive(&name)).await;
        if let Ok(Err(e)) = archived {
            ctx.metrics.error(e.metric_label());
            tracing::warn!(%app, error = %e, "cannot archive the app's state");
        }
    }
}

/// The `PostDelete` hooks of the app's last applied render (none if it cannot be read).
fn post_delete_plan(ctx: &SyncContext, app: &str) -> Option<apply::Plan> {
    match ctx.store.load_render(app, RenderKind::Applied) {
        Ok(Some(record))
            if record
                .plan
                .hooks
                .iter()
                .any(|h| h.phases.contains(&HookPhase::PostDelete)) =>
        {
            Some(record.plan)
        }
        Ok(_) => None,
        Err(e) => {
            ctx.metrics.error(e.metric_label());
            tracing::warn!(%app, error = %e, "cannot read the last render: PostDelete hooks unknown");
            None
        }
    }
}

fn post_delete_hook_names(ctx: &SyncContext, app: &str) -> Vec<String> {
    post_delete_plan(ctx, app)
        .map(|plan| {
            plan.hooks
                .iter()
                .filter(|h| h.phases.contains(&HookPhase::PostDelete))
                .map(|h| h.object.display_name())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs the app's `PostDelete` hooks once `deleted` are gone. `false`: not done, to be tried
/// again (objects still there, a hook that could not be created).
async fn post_delete_hooks(ctx: &SyncContext, app: &str, deleted: &[ObjectRef]) -> bool {
    let Some(plan) = post_delete_plan(ctx, app) else {
        return true;
    };
    let timeout = super::sync::DEFAULT_WAVE_TIMEOUT;
    let remaining = wait_gone(ctx, deleted, timeout).await;
    if !remaining.is_empty() {
        tracing::warn!(%app, objects = %remaining.join(", "),
            "PostDelete hooks wait: objects still on their way out after {timeout:?}");
        return false;
    }
    match ctx.run_hooks(&plan, HookPhase::PostDelete, timeout).await {
        Ok(()) => {
            tracing::info!(%app, "PostDelete hooks done");
            true
        }
        Err(e) => {
            ctx.metrics.error(crate::metrics::ErrorKind::Hook);
            tracing::warn!(%app, "{e}");
            // One that ran and failed is not run again (Argo CD takes a failed hook as done).
            e.ran
        }
    }
}

/// Waits up to `timeout` until none of `objects` exists; returns those still there (or that
/// could not be read).
async fn wait_gone(ctx: &SyncContext, objects: &[ObjectRef], timeout: Duration) -> Vec<String> {
    let started = Instant::now();
    loop {
        let mut remaining = Vec::new();
        for object in objects {
            match ctx.cluster.get(object).await {
                Ok(None) => {}
                Ok(Some(_)) => remaining.push(object.to_string()),
                Err(e) => remaining.push(format!("{object} ({})", e.message)),
            }
        }
        if remaining.is_empty() || started.elapsed() >= timeout {
            return remaining;
        }
        tokio::time::sleep(POLL).await;
    }
}
