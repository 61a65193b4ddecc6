//! Apps that left this node: removed from the config or the fleet, or targeted at other nodes.
//! Argo CD's finalizer semantics: with `delete_on_removal` (the Application carried
//! `resources-finalizer.argocd.argoproj.io`) the app's objects are deleted, except those
//! someone else took over or that say `Prune=false` / `Delete=false`; without it they stay
//! where they are. Either way the app's files move to `state_dir/apps/removed/`. A failed
//! delete keeps the app's state, so the next start or reload tries again.
//!
//! This only runs when the app set is known for sure: the fleet was read from Git just now
//! (a node that fell back to its saved fleet must never take an unreadable fleet for an
//! empty one).

use std::sync::Arc;

use super::SyncContext;
use crate::apply;

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
        } else {
            tracing::info!(%app, objects = state.objects.len(),
                "app left this node; its objects stay (no resources finalizer, delete_on_removal off)");
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
