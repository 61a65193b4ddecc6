//! Per-app retry of failed syncs (Argo CD's `syncPolicy.retry`), with backon's exponential
//! backoff and jitter. Only real rejections count against `limit`; a sync that failed because
//! the API server was away (unreachable, 5xx, 429) or Git could not be fetched is retried
//! with the same backoff, up to its ceiling, for as long as it takes. A new revision starts
//! afresh. Kept in memory: a restart is a new first attempt.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::AppConfig;

struct RetryState {
    revision: String,
    /// Failed attempts that count against the limit.
    counted: u32,
    delays: backon::ExponentialBackoff,
    next_at: Instant,
    exhausted: bool,
}

#[derive(Default)]
pub(crate) struct Retries {
    apps: Mutex<HashMap<String, RetryState>>,
}

/// Why an attempt must wait, and for how long (`None`: until something changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hold {
    pub(crate) reason: String,
    pub(crate) retry_in: Option<Duration>,
}

impl Retries {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RetryState>> {
        self.apps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `app` may be attempted at `revision` now.
    pub(crate) fn gate(&self, app: &str, revision: &str, now: Instant) -> Option<Hold> {
        let mut apps = self.lock();
        let state = apps.get(app)?;
        if state.revision != revision {
            apps.remove(app);
            return None;
        }
        if state.exhausted {
            return Some(Hold {
                reason: format!(
                    "retry limit reached after {} failed attempts; waiting for a new revision or a manual sync",
                    state.counted
                ),
                retry_in: None,
            });
        }
        (state.next_at > now).then(|| Hold {
            reason: "waiting to retry".into(),
            retry_in: Some(state.next_at - now),
        })
    }

    /// Records a failed attempt. Returns a note for the status message and when to retry.
    pub(crate) fn failed(
        &self,
        app: &AppConfig,
        revision: &str,
        transient: bool,
        now: Instant,
    ) -> (String, Option<Duration>) {
        let mut apps = self.lock();
        let state = apps.entry(app.name.clone()).or_insert_with(|| RetryState {
            revision: revision.to_string(),
            counted: 0,
            delays: app.retry.delays(),
            next_at: now,
            exhausted: false,
        });
        if state.revision != revision {
            *state = RetryState {
                revision: revision.to_string(),
                counted: 0,
                delays: app.retry.delays(),
                next_at: now,
                exhausted: false,
            };
        }
        if !transient {
            state.counted += 1;
        }
        if app.retry.exhausted(state.counted) {
            state.exhausted = true;
            return (
                format!(
                    "retry limit {} reached; waiting for a new revision",
                    app.retry.limit
                ),
                None,
            );
        }
        let delay = state
            .delays
            .next()
            .unwrap_or(app.retry.backoff.max_duration);
        // Durations are bounded when read; saturate anyway rather than trust every caller.
        state.next_at = now
            .checked_add(delay)
            .unwrap_or(now + crate::config::sync_policy::human::MAX);
        let limit = if app.retry.limit < 0 {
            "unlimited".to_string()
        } else {
            app.retry.limit.to_string()
        };
        let what = if transient {
            "the API server is away; not counted".to_string()
        } else {
            format!("attempt {} of 1 + {limit}", state.counted)
        };
        (
            format!(
                "{what}; retrying in {}",
                humantime::format_duration(round(delay))
            ),
            Some(delay),
        )
    }

    /// When the app's next retry is due, if one is.
    pub(crate) fn retry_in(&self, app: &str, now: Instant) -> Option<Duration> {
        let apps = self.lock();
        let state = apps.get(app).filter(|s| !s.exhausted)?;
        Some(state.next_at.saturating_duration_since(now))
    }

    pub(crate) fn succeeded(&self, app: &str) {
        self.lock().remove(app);
    }

    /// Forgets the app's failures (a manual sync, or a config reload).
    pub(crate) fn reset(&self, app: &str) {
        self.succeeded(app)
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs().max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::sync_policy::{Backoff, Retry};

    fn app(limit: i64) -> AppConfig {
        let mut a: AppConfig = toml::from_str("name = \"a\"\nrepo = \"file:///r\"\n").unwrap();
        a.retry = Retry {
            limit,
            backoff: Backoff {
                duration: Duration::from_secs(1),
                factor: 2,
                max_duration: Duration::from_secs(4),
            },
        };
        a
    }

    #[test]
    fn real_rejections_use_up_the_limit_and_transient_ones_do_not() {
        let r = Retries::default();
        let a = app(2);
        let t0 = Instant::now();
        assert_eq!(r.gate("a", "rev1", t0), None);
        let (_, first) = r.failed(&a, "rev1", false, t0);
        let first = first.unwrap();
        assert!(first >= Duration::from_secs(1) && first <= Duration::from_secs(2));
        assert_eq!(r.gate("a", "rev1", t0).unwrap().reason, "waiting to retry");
        assert_eq!(r.gate("a", "rev1", t0 + first), None);
        // Any number of transient failures count nothing.
        for _ in 0..20 {
            let (note, delay) = r.failed(&a, "rev1", true, t0);
            assert!(note.contains("not counted"), "{note}");
            assert!(delay.unwrap() <= Duration::from_secs(8));
        }
        assert!(r.failed(&a, "rev1", false, t0).1.is_some());
        let (note, delay) = r.failed(&a, "rev1", false, t0);
        assert_eq!(delay, None);
        assert!(note.contains("limit 2"), "{note}");
        let hold = r.gate("a", "rev1", t0 + Duration::from_secs(3600)).unwrap();
        assert_eq!(hold.retry_in, None);
        // A new revision starts afresh.
        assert_eq!(r.gate("a", "rev2", t0), None);
        assert_eq!(r.gate("a", "rev1", t0), None);
    }

    #[test]
    fn unlimited_never_gives_up() {
        let r = Retries::default();
        let a = app(-1);
        let now = Instant::now();
        for _ in 0..100 {
            assert!(r.failed(&a, "rev", false, now).1.is_some());
        }
    }

    #[test]
    fn the_longest_backoff_does_not_overflow_the_clock() {
        let r = Retries::default();
        let mut a = app(-1);
        a.retry.backoff.duration = crate::config::sync_policy::human::MAX;
        a.retry.backoff.max_duration = crate::config::sync_policy::human::MAX;
        let now = Instant::now();
        for _ in 0..5 {
            let (_, delay) = r.failed(&a, "rev", false, now);
            assert!(delay.unwrap() <= crate::config::sync_policy::human::MAX * 2);
        }
        assert!(r.gate("a", "rev", now).is_some());
    }
}
