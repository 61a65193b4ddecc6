//! Wiring: the long-running agent (`edgesync run`) and one-shot syncs (`edgesync sync`).
//! Each repository is polled by its own task; a failing app or repository never stops
//! the others.

mod sync;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{AppConfig, Config, RepositoryConfig};
pub use sync::{SyncContext, SyncError, SyncResult};

/// How long in-flight syncs may take to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let ctx = SyncContext::connect(config).await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for repo in ctx.config.repositories_in_use() {
        let apps: Vec<AppConfig> = ctx
            .config
            .apps
            .iter()
            .filter(|a| a.repo == repo.url)
            .cloned()
            .collect();
        tasks.spawn(poll_repository(
            ctx.clone(),
            repo,
            apps,
            shutdown_rx.clone(),
        ));
    }
    tracing::info!(
        node = %ctx.config.node.name,
        apps = ctx.config.apps.len(),
        "edgesync running"
    );
    notify_systemd(sd_notify::NotifyState::Ready);

    wait_for_shutdown_signal().await?;
    tracing::info!("shutting down");
    notify_systemd(sd_notify::NotifyState::Stopping);
    let _ = shutdown_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("syncs still running after {SHUTDOWN_GRACE:?}; stopping anyway");
        tasks.abort_all();
    }
    Ok(())
}

fn notify_systemd(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::debug!("sd_notify: {e}");
    }
}

async fn wait_for_shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

async fn poll_repository(
    ctx: Arc<SyncContext>,
    repo: RepositoryConfig,
    apps: Vec<AppConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut interval = tokio::time::interval(repo.poll_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        sync_repository(&ctx, &repo, &apps, &shutdown, false).await;
    }
}

/// Syncs every app of one repository once. Returns the number of apps that failed.
pub async fn sync_repository(
    ctx: &SyncContext,
    repo: &RepositoryConfig,
    apps: &[AppConfig],
    shutdown: &watch::Receiver<bool>,
    force: bool,
) -> usize {
    let refs = match ctx.remote_refs(repo).await {
        Ok(refs) => refs,
        Err(e) => {
            tracing::warn!(repo = %crate::source::redact(&repo.url), error = %e, kind = e.metric_label(),
                "cannot list remote refs; keeping the last applied state");
            return apps.len();
        }
    };
    let mut failed = 0;
    let mut in_use = Vec::new();
    for app in apps {
        if *shutdown.borrow() {
            break;
        }
        let result = match refs.resolve(&app.revision) {
            Ok(sha) => {
                in_use.push(sha.clone());
                ctx.sync_app(app, &sha, force).await
            }
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(SyncResult::Unchanged { revision }) => {
                tracing::debug!(app = %app.name, %revision, "up to date");
            }
            Ok(SyncResult::Applied { revision, objects }) => {
                tracing::info!(app = %app.name, %revision, objects, "synced");
            }
            Err(e) => {
                failed += 1;
                tracing::error!(app = %app.name, error = %e, kind = e.metric_label(), "sync failed");
            }
        }
    }
    ctx.retain_snapshots(&repo.url, in_use);
    failed
}

/// `edgesync sync [APP]`: applies the current revision of one app, or of all apps, once.
/// Returns the number of apps that failed.
pub async fn sync_once(config: Config, only: Option<&str>) -> anyhow::Result<usize> {
    if let Some(name) = only {
        if config.app(name).is_none() {
            anyhow::bail!("no app named {name:?} in {}", config.path.display());
        }
    }
    let ctx = SyncContext::connect(config).await?;
    let (_tx, shutdown) = watch::channel(false);
    let mut failed = 0;
    for repo in ctx.config.repositories_in_use() {
        let apps: Vec<AppConfig> = ctx
            .config
            .apps
            .iter()
            .filter(|a| a.repo == repo.url && only.is_none_or(|n| n == a.name))
            .cloned()
            .collect();
        if !apps.is_empty() {
            failed += sync_repository(&ctx, &repo, &apps, &shutdown, true).await;
        }
    }
    Ok(failed)
}
