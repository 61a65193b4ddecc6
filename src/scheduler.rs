//! Scheduler: coalesces trigger events per repository into sync rounds.
//!
//! Pure logic: time and randomness are passed in. Whatever number of events arrive, a
//! repository holds at most one pending round (the union of the apps asked for, due at the
//! earliest requested time). Events that arrive while a round runs make one follow-up round,
//! never more. Memory is bounded by the number of apps, not of events.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::trigger::{repo_key, Event};

/// Which apps of a repository a round syncs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AppSet {
    All,
    Only(BTreeSet<String>),
}

impl AppSet {
    pub(crate) fn only<I: IntoIterator<Item = S>, S: Into<String>>(apps: I) -> AppSet {
        AppSet::Only(apps.into_iter().map(Into::into).collect())
    }

    pub(crate) fn contains(&self, app: &str) -> bool {
        match self {
            AppSet::All => true,
            AppSet::Only(set) => set.contains(app),
        }
    }

    fn union(self, other: AppSet) -> AppSet {
        match (self, other) {
            (AppSet::Only(mut a), AppSet::Only(b)) => {
                a.extend(b);
                AppSet::Only(a)
            }
            _ => AppSet::All,
        }
    }
}

/// A round waiting to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pending {
    pub(crate) apps: AppSet,
    pub(crate) due: Instant,
}

/// The pending work of one repository.
#[derive(Debug, Default)]
pub(crate) struct RepoQueue {
    pending: Option<Pending>,
}

impl RepoQueue {
    /// Requests a round for `apps`, `delay` from `now` (the fetch jitter; zero for
    /// node-directed events). Merges with any pending round into the union of apps. A
    /// jittered request keeps the pending round's time, so a flood of broadcasts cannot pull it
    /// forward by drawing ever smaller delays; an immediate request runs it now.
    pub(crate) fn request(&mut self, now: Instant, apps: AppSet, delay: Duration) {
        let due = now + delay;
        self.pending = Some(match self.pending.take() {
            None => Pending { apps, due },
            Some(p) => Pending {
                apps: p.apps.union(apps),
                due: if delay.is_zero() {
                    p.due.min(due)
                } else {
                    p.due
                },
            },
        });
    }

    /// When the pending round is due, if there is one.
    pub(crate) fn due(&self) -> Option<Instant> {
        self.pending.as_ref().map(|p| p.due)
    }

    /// Takes the pending round if it is due at `now`.
    pub(crate) fn take_due(&mut self, now: Instant) -> Option<Pending> {
        match &self.pending {
            Some(p) if p.due <= now => self.pending.take(),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RouteError {
    #[error("no configured repository matches {0:?}")]
    UnknownRepository(String),
    #[error("no configured app named {0:?}")]
    UnknownApp(String),
    #[error("no app tracks branch {branch:?} of {repo}")]
    NoAppTracksBranch { repo: String, branch: String },
}

impl RouteError {
    pub(crate) fn metric_label(&self) -> crate::metrics::ErrorKind {
        use crate::metrics::ErrorKind;
        match self {
            RouteError::UnknownRepository(_) => ErrorKind::UnknownRepository,
            RouteError::UnknownApp(_) => ErrorKind::UnknownApp,
            RouteError::NoAppTracksBranch { .. } => ErrorKind::UntrackedBranch,
        }
    }
}

/// The branch an app's `revision` follows, if it names one (`main`, `refs/heads/main`).
fn tracked_branch(revision: &str) -> Option<&str> {
    if revision == "HEAD" || crate::model::url::is_commit_sha(revision) {
        return None;
    }
    if let Some(tag) = revision.strip_prefix("refs/") {
        return tag.strip_prefix("heads/");
    }
    Some(revision)
}

/// Maps an event onto configured repositories (by URL) and the apps to sync in each.
pub(crate) fn route(
    event: &Event,
    config: &Config,
) -> Result<BTreeMap<String, AppSet>, RouteError> {
    for name in &event.apps {
        if config.app(name).is_none() {
            return Err(RouteError::UnknownApp(name.clone()));
        }
    }
    let wanted: Vec<String> = event.repos.iter().map(|r| repo_key(r)).collect();
    let branch = event
        .branch
        .as_deref()
        .map(|b| b.strip_prefix("refs/heads/").unwrap_or(b));
    let mut targets: BTreeMap<String, AppSet> = BTreeMap::new();
    let mut repo_known = false;
    for app in &config.apps {
        // An app reads its own repository and those of its other sources: a push to any of
        // them is for the app (its worker is its own repository's).
        let read: Vec<&str> = app
            .repositories()
            .filter(|(url, _)| wanted.is_empty() || wanted.contains(&repo_key(url)))
            .map(|(_, revision)| revision)
            .collect();
        if read.is_empty() {
            continue;
        }
        repo_known = true;
        if !event.apps.is_empty() && !event.apps.contains(&app.name) {
            continue;
        }
        // HEAD and pinned SHAs/tags may be affected by any push: include them.
        let follows = read
            .iter()
            .any(|revision| match (branch, tracked_branch(revision)) {
                (Some(pushed), Some(tracked)) => pushed == tracked,
                _ => true,
            });
        if follows {
            let apps = targets
                .entry(app.repo.clone())
                .or_insert(AppSet::only(Vec::<String>::new()));
            if let AppSet::Only(set) = apps {
                set.insert(app.name.clone());
            }
        }
    }
    if let (Some(url), false) = (event.repos.first(), repo_known) {
        return Err(RouteError::UnknownRepository(url.clone()));
    }
    if targets.is_empty() {
        if let (Some(repo), Some(branch)) = (event.repos.first(), &event.branch) {
            return Err(RouteError::NoAppTracksBranch {
                repo: repo.clone(),
                branch: branch.clone(),
            });
        }
    }
    Ok(targets)
}

/// A delay drawn uniformly from `[0, window]`, from a random `unit` in `[0, 1)`.
pub(crate) fn jitter(window: Duration, unit: f64) -> Duration {
    window.mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_events_makes_one_round() {
        let t0 = Instant::now();
        let mut q = RepoQueue::default();
        for i in 0..1000 {
            q.request(t0, AppSet::only([format!("app{}", i % 3)]), Duration::ZERO);
        }
        let round = q.take_due(t0).unwrap();
        assert_eq!(round.apps, AppSet::only(["app0", "app1", "app2"]));
        assert!(q.take_due(t0).is_none());
    }

    #[test]
    fn events_during_a_round_make_exactly_one_follow_up() {
        let t0 = Instant::now();
        let mut q = RepoQueue::default();
        q.request(t0, AppSet::All, Duration::ZERO);
        let _running = q.take_due(t0).unwrap();
        for _ in 0..500 {
            q.request(t0, AppSet::only(["web"]), Duration::ZERO);
        }
        assert_eq!(q.take_due(t0).unwrap().apps, AppSet::only(["web"]));
        assert!(q.take_due(t0).is_none());
    }

    #[test]
    fn jittered_round_waits_and_a_directed_event_pulls_it_forward() {
        let t0 = Instant::now();
        let mut q = RepoQueue::default();
        q.request(t0, AppSet::only(["a"]), Duration::from_secs(20));
        assert!(q.take_due(t0 + Duration::from_secs(19)).is_none());
        q.request(
            t0 + Duration::from_secs(1),
            AppSet::only(["b"]),
            Duration::ZERO,
        );
        let round = q.take_due(t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(round.apps, AppSet::only(["a", "b"]));
    }

    #[test]
    fn later_jittered_requests_do_not_move_the_round() {
        let t0 = Instant::now();
        let mut q = RepoQueue::default();
        q.request(t0, AppSet::All, Duration::from_secs(10));
        for i in 1..100 {
            q.request(
                t0 + Duration::from_millis(i),
                AppSet::All,
                Duration::from_millis(1),
            );
        }
        assert_eq!(q.due(), Some(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn all_absorbs_subsets() {
        let t0 = Instant::now();
        let mut q = RepoQueue::default();
        q.request(t0, AppSet::only(["a"]), Duration::ZERO);
        q.request(t0, AppSet::All, Duration::ZERO);
        q.request(t0, AppSet::only(["b"]), Duration::ZERO);
        assert_eq!(q.take_due(t0).unwrap().apps, AppSet::All);
    }

    #[test]
    fn jitter_stays_in_its_window() {
        let w = Duration::from_secs(30);
        assert_eq!(jitter(w, 0.0), Duration::ZERO);
        assert_eq!(jitter(w, 0.5), Duration::from_secs(15));
        assert!(jitter(w, 0.999_999) <= w);
        assert_eq!(jitter(w, 7.0), w);
    }

    use crate::trigger::Source;
    use std::path::Path;

    fn config() -> Config {
        Config::parse(
            Path::new("/tmp/x/config.toml"),
            r#"
[[apps]]
name = "web"
repo = "https://git.example.com/fleet.git"
revision = "main"
[[apps]]
name = "api"
repo = "https://git.example.com/fleet.git"
revision = "release"
[[apps]]
name = "pinned"
repo = "https://git.example.com/fleet.git"
revision = "HEAD"
[[apps]]
name = "other"
repo = "https://git.example.com/other.git"
revision = "main"
"#,
        )
        .unwrap()
    }

    fn event(repo: Option<&str>, branch: Option<&str>, apps: &[&str]) -> Event {
        Event {
            source: Source::Mqtt,
            repos: repo.into_iter().map(Into::into).collect(),
            branch: branch.map(Into::into),
            apps: apps.iter().map(|s| s.to_string()).collect(),
            directed: false,
        }
    }

    #[test]
    fn push_to_a_branch_syncs_the_apps_tracking_it() {
        let t = route(
            &event(
                Some("git@git.example.com:fleet.git"),
                Some("refs/heads/main"),
                &[],
            ),
            &config(),
        )
        .unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(
            t["https://git.example.com/fleet.git"],
            AppSet::only(["pinned", "web"])
        );
    }

    #[test]
    fn a_push_to_another_source_of_an_app_syncs_it_through_its_own_repository() {
        let c = Config::parse(
            Path::new("/tmp/x/config.toml"),
            r#"
[[apps]]
name = "web"
repo = "https://charts.example.com/stable"
chart = "web"
[[apps.sources]]
repo = "https://git.example.com/values.git"
revision = "prod"
ref = "values"
"#,
        )
        .unwrap();
        let t = route(
            &event(
                Some("https://git.example.com/values.git"),
                Some("refs/heads/prod"),
                &[],
            ),
            &c,
        )
        .unwrap();
        assert_eq!(
            t["https://charts.example.com/stable"],
            AppSet::only(["web"])
        );
        assert!(route(
            &event(
                Some("https://git.example.com/values.git"),
                Some("refs/heads/dev"),
                &[]
            ),
            &c
        )
        .is_err());
        assert!(c.is_chart_repository("https://charts.example.com/stable"));
    }

    #[test]
    fn empty_event_refreshes_everything() {
        let t = route(&event(None, None, &[]), &config()).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            t["https://git.example.com/other.git"],
            AppSet::only(["other"])
        );
    }

    #[test]
    fn unknown_repository_and_app_are_refused() {
        let c = config();
        assert_eq!(
            route(
                &event(Some("https://evil.example.com/x.git"), None, &[]),
                &c
            ),
            Err(RouteError::UnknownRepository(
                "https://evil.example.com/x.git".into()
            ))
        );
        assert_eq!(
            route(&event(None, None, &["nope"]), &c),
            Err(RouteError::UnknownApp("nope".into()))
        );
        assert!(matches!(
            route(
                &event(
                    Some("https://git.example.com/other.git"),
                    Some("feature"),
                    &[]
                ),
                &c
            ),
            Err(RouteError::NoAppTracksBranch { .. })
        ));
    }

    #[test]
    fn named_apps_narrow_the_round() {
        let t = route(&event(None, None, &["api"]), &config()).unwrap();
        assert_eq!(
            t["https://git.example.com/fleet.git"],
            AppSet::only(["api"])
        );
    }
}
