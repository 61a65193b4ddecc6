//! The scheduler's runtime side: one worker per repository, fed by triggers through the
//! [`Dispatcher`]. A worker runs one round at a time; requests made meanwhile coalesce into
//! one follow-up (see [`crate::scheduler::RepoQueue`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{AppConfig, Config, RepositoryConfig};
use crate::metrics::Metrics;
use crate::scheduler::{self, AppSet, Pending, RepoQueue};
use crate::trigger::{Event, EventSink, Refused};

pub(crate) struct RepoWorker {
    pub(crate) repo: RepositoryConfig,
    pub(crate) apps: Vec<AppConfig>,
    queue: Mutex<RepoQueue>,
    wake: Notify,
}

impl RepoWorker {
    fn queue(&self) -> MutexGuard<'_, RepoQueue> {
        // The queue holds no invariant a panicking holder could break; keep going.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn request(&self, apps: AppSet, delay: Duration) {
        self.queue().request(Instant::now().into_std(), apps, delay);
        self.wake.notify_one();
    }

    /// A fetch-jitter delay for broadcast events and polls.
    pub(crate) fn jitter(&self) -> Duration {
        scheduler::jitter(self.repo.fetch_jitter, fastrand::f64())
    }

    pub(crate) fn due(&self) -> Option<Instant> {
        self.queue().due().map(Instant::from_std)
    }

    pub(crate) fn take_due(&self) -> Option<Pending> {
        self.queue().take_due(Instant::now().into_std())
    }

    pub(crate) async fn woken(&self) {
        self.wake.notified().await
    }

    /// The apps of this repository that `apps` selects.
    pub(crate) fn select(&self, apps: &AppSet) -> Vec<AppConfig> {
        self.apps
            .iter()
            .filter(|a| apps.contains(&a.name))
            .cloned()
            .collect()
    }
}

/// Routes trigger events to repository workers.
pub(crate) struct Dispatcher {
    config: Config,
    workers: BTreeMap<String, Arc<RepoWorker>>,
    metrics: Arc<Metrics>,
}

impl Dispatcher {
    pub(crate) fn new(config: &Config, metrics: Arc<Metrics>) -> Dispatcher {
        let workers = config
            .repositories_in_use()
            .into_iter()
            .map(|repo| {
                let apps = config
                    .apps
                    .iter()
                    .filter(|a| a.repo == repo.url)
                    .cloned()
                    .collect();
                let worker = RepoWorker {
                    repo: repo.clone(),
                    apps,
                    queue: Mutex::new(RepoQueue::default()),
                    wake: Notify::new(),
                };
                (repo.url, Arc::new(worker))
            })
            .collect();
        Dispatcher {
            config: config.clone(),
            workers,
            metrics,
        }
    }

    pub(crate) fn workers(&self) -> impl Iterator<Item = &Arc<RepoWorker>> {
        self.workers.values()
    }
}

impl EventSink for Dispatcher {
    fn deliver(&self, event: Event) -> Result<(), Refused> {
        let source = event.source.label();
        let targets = scheduler::route(&event, &self.config).map_err(|e| {
            self.metrics.trigger(source, e.metric_label().label());
            tracing::warn!(source, "event dropped: {e}");
            Refused {
                reason: e.to_string(),
                label: e.metric_label().label(),
            }
        })?;
        for (url, apps) in targets {
            if let Some(worker) = self.workers.get(&url) {
                let delay = if event.directed {
                    Duration::ZERO
                } else {
                    worker.jitter()
                };
                tracing::debug!(source, repo = %crate::model::url::redact(&url), ?apps, ?delay, "sync requested");
                worker.request(apps, delay);
            }
        }
        self.metrics.trigger(source, "accepted");
        Ok(())
    }
}
