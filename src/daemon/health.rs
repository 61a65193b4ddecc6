//! Keeps each app's health current: reads the live objects of its last complete apply and
//! rates them with [`crate::health`]. Polls quickly while anything is on its way (Progressing
//! or Missing) and slowly when all is settled. Watches replace polling with the apply engine.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::SyncContext;
use crate::health::{self, Health, HealthStatus};

const SETTLED_EVERY: Duration = Duration::from_secs(15);
const CHANGING_EVERY: Duration = Duration::from_secs(2);

pub async fn monitor(ctx: Arc<SyncContext>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let mut changing = false;
        for app in &ctx.config.apps {
            let Ok(state) = ctx.store.load(&app.name) else {
                continue;
            };
            if state.objects.is_empty() {
                continue;
            }
            let mut healths = Vec::new();
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for object in &state.objects {
                let h = match ctx.applier.get(object).await {
                    Ok(Some(live)) => health::assess(&live),
                    Ok(None) => Health {
                        status: HealthStatus::Missing,
                        message: format!("{object} does not exist"),
                    },
                    Err(e) => Health {
                        status: HealthStatus::Unknown,
                        message: format!("{object}: {e}"),
                    },
                };
                *counts.entry(h.status.as_str().to_string()).or_default() += 1;
                let message = if h.message.is_empty() {
                    String::new()
                } else {
                    format!("{object}: {}", h.message)
                };
                healths.push(Health {
                    status: h.status,
                    message,
                });
            }
            let app_health = health::worst(healths);
            changing |= matches!(
                app_health.status,
                HealthStatus::Progressing | HealthStatus::Missing | HealthStatus::Unknown
            );
            ctx.board.health(&app.name, &app_health, counts);
        }
        let every = if changing {
            CHANGING_EVERY
        } else {
            SETTLED_EVERY
        };
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = ctx.applied.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}
