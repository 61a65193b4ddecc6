//! Keeps each app's health current: reads the live objects of its last complete apply and
//! rates them with [`crate::health`]. An app is rated again as soon as the drift watches
//! (metadata-only, one per kind and namespace) see one of its objects change, status
//! included, and right after every apply: from the objects the apply's answers carried (their
//! status included), without a GET, unless a watch saw another writer change one of the app's
//! objects since the apply began; besides, every app is rated every 2 s while
//! anything is on its way (Progressing, Missing, Unknown). A settled app whose every object
//! is under a running watch is not read again until a watch sees a change: a cluster at rest
//! costs watch renewals, not GETs. A watch that fails lists its kind again when it is back
//! (see `drift`), and until then its apps count as unwatched. A settled app
//! with an object no watch covers (a kind that cannot be watched, a watch down) is read every
//! 15 s. Full-object watches would save the GETs that follow a change but keep every watched
//! object in memory, which the RSS budget does not allow. An app Progressing for longer than its
//! `health_timeout` counts as Degraded. A revision seen Healthy has its render kept as the
//! app's last Healthy one; with `rollback = "auto"`, a revision that goes Degraded before it
//! was ever Healthy is rolled back to that render.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::SyncContext;
use crate::config::sync_policy::Rollback;
use crate::config::AppConfig;
use crate::health::{self, Health, HealthStatus};
use crate::state::{unix_now, RenderKind};

const SETTLED_EVERY: Duration = Duration::from_secs(15);
const CHANGING_EVERY: Duration = Duration::from_secs(2);

/// At least this long between two rounds woken by watch events, so a rollout's stream of
/// status updates is rated in batches.
const BATCH: Duration = Duration::from_millis(250);

pub(crate) async fn monitor(ctx: Arc<SyncContext>, mut shutdown: watch::Receiver<bool>) {
    let mut monitor = Monitor::new(&ctx);
    let mut next_full = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_full) => {
                let changing = monitor.round(&ctx, None, unix_now()).await;
                let every = if changing { CHANGING_EVERY } else { SETTLED_EVERY };
                next_full = tokio::time::Instant::now() + every;
            }
            _ = ctx.health_wake.notified() => {
                tokio::time::sleep(BATCH).await;
                let only = ctx.take_health_dirty();
                if monitor.round(&ctx, Some(&only), unix_now()).await {
                    next_full = next_full.min(tokio::time::Instant::now() + CHANGING_EVERY);
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Rates apps and acts on what it finds (keeps Healthy renders, rolls back).
pub(super) struct Monitor {
    /// The revision each app was last seen Healthy at (its Healthy render is kept).
    healthy: HashMap<String, String>,
    /// The apps last rated settled (neither Progressing, Missing nor Unknown).
    settled: HashSet<String>,
}

impl Monitor {
    pub(super) fn new(ctx: &SyncContext) -> Monitor {
        let mut healthy = HashMap::new();
        for app in &ctx.config.apps {
            if let Ok(Some(record)) = ctx.store.load_render(&app.name, RenderKind::Healthy) {
                healthy.insert(app.name.clone(), record.revision);
            }
        }
        Monitor {
            healthy,
            settled: HashSet::new(),
        }
    }

    /// Rates every app (or those in `only`, the ones the drift watches saw change) at `now`
    /// (Unix seconds). Returns whether any is still on its way somewhere.
    pub(super) async fn round(
        &mut self,
        ctx: &SyncContext,
        only: Option<&HashSet<String>>,
        now: u64,
    ) -> bool {
        let mut changing = false;
        for app in &ctx.config.apps {
            if only.is_some_and(|only| !only.contains(&app.name)) {
                continue;
            }
            changing |= self.rate_app(ctx, app, now, only.is_none()).await;
        }
        changing
    }

    async fn rate_app(
        &mut self,
        ctx: &SyncContext,
        app: &AppConfig,
        now: u64,
        timer: bool,
    ) -> bool {
        let Ok(state) = ctx.store.load(&app.name) else {
            return false;
        };
        if state.objects.is_empty() {
            return false;
        }
        // A timer round leaves a settled app alone while the watches would have told.
        if timer && self.settled.contains(&app.name) && ctx.all_watched(&state.objects) {
            return false;
        }
        // Taken only here, so a timer round that falls between an apply and the rating it
        // wakes leaves the answers to that rating.
        let mut answered = ctx.take_applied_health(&app.name).unwrap_or_default();
        let mut healths = Vec::new();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for object in &state.objects {
            // What the last apply answered, unless another writer changed the app's objects
            // since; a rating still on its way (Progressing) is read again in 2 s anyway.
            if let Some(h) = answered.remove(object) {
                *counts.entry(h.status.as_str().to_string()).or_default() += 1;
                healths.push(described(object, h));
                continue;
            }
            let h = match ctx.cluster.get(object).await {
                Ok(Some(live)) => health::assess(&live),
                Ok(None) => Health {
                    status: HealthStatus::Missing,
                    message: format!("{object} does not exist"),
                },
                Err(e) => {
                    // Unknown must say why, where an operator looks: log, metric, status.
                    ctx.metrics.error(crate::metrics::ErrorKind::HealthRead);
                    tracing::warn!(app = %app.name, %object, "cannot read for health: {e}");
                    Health {
                        status: HealthStatus::Unknown,
                        message: format!("cannot be read: {e}"),
                    }
                }
            };
            *counts.entry(h.status.as_str().to_string()).or_default() += 1;
            healths.push(described(object, h));
        }
        let app_health = rate(healths, app.health_timeout, state.last_applied_at, now);
        let changing = matches!(
            app_health.status,
            HealthStatus::Progressing | HealthStatus::Missing | HealthStatus::Unknown
        );
        ctx.board.health(&app.name, &app_health, counts);
        if changing {
            self.settled.remove(&app.name);
        } else {
            self.settled.insert(app.name.clone());
        }
        if ctx.is_syncing(&app.name) || state.last_error.is_some() {
            return changing;
        }
        let Some(revision) = state.last_applied_revision.as_deref() else {
            return changing;
        };
        let seen_healthy = self.healthy.get(&app.name).map(String::as_str) == Some(revision);
        match app_health.status {
            HealthStatus::Healthy if !seen_healthy => {
                ctx.remember_healthy(&app.name, revision).await;
                self.healthy.insert(app.name.clone(), revision.to_string());
            }
            HealthStatus::Degraded if app.rollback == Rollback::Auto && !seen_healthy => {
                if let Err(e) = ctx.rollback(app, revision, &app_health.message).await {
                    ctx.metrics.error(e.metric_label());
                    tracing::error!(app = %app.name, error = %e, "rollback failed");
                }
            }
            _ => {}
        }
        changing
    }
}

/// The app's health from its objects': the worst of them, except that Progressing for longer
/// than `timeout` since the sync (`applied_at`, Unix seconds) counts as Degraded, so a rollout
/// that never finishes is a failure (and can be rolled back).
/// `health` with its message naming `object`.
fn described(object: &crate::apply::ObjectRef, health: Health) -> Health {
    let message = if health.message.is_empty() {
        String::new()
    } else {
        format!("{object}: {}", health.message)
    };
    Health {
        status: health.status,
        message,
    }
}

fn rate(
    healths: Vec<Health>,
    timeout: Option<Duration>,
    applied_at: Option<u64>,
    now: u64,
) -> Health {
    let worst = health::worst(healths);
    match (worst.status, timeout, applied_at) {
        (HealthStatus::Progressing, Some(timeout), Some(at))
            if now.saturating_sub(at) > timeout.as_secs() =>
        {
            Health {
                status: HealthStatus::Degraded,
                message: format!(
                    "still Progressing {} after the sync (health_timeout): {}",
                    humantime::format_duration(timeout),
                    worst.message
                ),
            }
        }
        _ => worst,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(status: HealthStatus, message: &str) -> Health {
        Health {
            status,
            message: message.into(),
        }
    }

    #[test]
    fn progressing_past_the_health_timeout_is_degraded() {
        let rollout = || {
            vec![
                h(HealthStatus::Healthy, ""),
                h(
                    HealthStatus::Progressing,
                    "Deployment ns/web: 0 of 1 updated",
                ),
            ]
        };
        let timeout = Some(Duration::from_secs(60));
        let within = rate(rollout(), timeout, Some(1000), 1060);
        assert_eq!(within.status, HealthStatus::Progressing);
        let past = rate(rollout(), timeout, Some(1000), 1061);
        assert_eq!(past.status, HealthStatus::Degraded);
        assert!(
            past.message.contains("Deployment ns/web"),
            "{}",
            past.message
        );
        // Without a timeout a rollout may take as long as it takes.
        assert_eq!(
            rate(rollout(), None, Some(0), u64::MAX).status,
            HealthStatus::Progressing
        );
        // Unknown says why and is never turned into Degraded.
        let unknown = rate(
            vec![h(
                HealthStatus::Unknown,
                "ConfigMap ns/a: cannot be read: 403",
            )],
            timeout,
            Some(0),
            10_000,
        );
        assert_eq!(unknown.status, HealthStatus::Unknown);
        assert!(unknown.message.contains("403"));
    }
}
