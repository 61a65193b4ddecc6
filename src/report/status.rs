//! The node's status as documents: one per app and one for the node. The same documents are
//! served by the HTTP API (`/api/v1/status`) and published upstream over MQTT whenever they
//! change, with an event for each sync. Health comes from the health monitor
//! (`daemon::health`), `Unknown` until it has looked.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::{Config, SkippedApp};
use crate::metrics::{AppInfo, Metrics};
use crate::state::{unix_now, AppState};

pub(crate) const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum SyncState {
    /// The last applied revision is the one the app tracks.
    Synced,
    /// A newer revision exists and has not been applied yet.
    OutOfSync,
    Syncing,
    /// The last attempt failed; `last_error` says why.
    Failed,
    /// Nothing known yet (before the first round), or waiting for a window.
    Waiting,
}

impl SyncState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SyncState::Synced => "Synced",
            SyncState::OutOfSync => "OutOfSync",
            SyncState::Syncing => "Syncing",
            SyncState::Failed => "Failed",
            SyncState::Waiting => "Waiting",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AppStatus {
    pub(crate) app: String,
    pub(crate) repo: String,
    pub(crate) path: String,
    /// The commit applied last, completely.
    pub(crate) revision: Option<String>,
    /// The commit the app should be at, as last resolved.
    pub(crate) target_revision: Option<String>,
    pub(crate) sync: SyncState,
    pub(crate) health: String,
    /// Why the app has this health, whatever its sync state: the worst object and what is
    /// wrong with it (for `Unknown`, the error reading it).
    #[serde(default)]
    pub(crate) health_message: String,
    pub(crate) message: String,
    /// Objects in the app's inventory, by health.
    pub(crate) objects: BTreeMap<String, usize>,
    /// Unix seconds.
    pub(crate) last_sync_start: Option<u64>,
    pub(crate) last_sync_end: Option<u64>,
    pub(crate) last_error: Option<String>,
    /// Standing warnings from the last sync (orphaned resources).
    #[serde(default)]
    pub(crate) warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AppSummary {
    pub(crate) app: String,
    pub(crate) revision: Option<String>,
    pub(crate) sync: SyncState,
    pub(crate) health: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NodeStatus {
    pub(crate) schema_version: u32,
    pub(crate) node: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) agent_version: String,
    pub(crate) uptime_seconds: u64,
    pub(crate) timestamp: u64,
    pub(crate) apps: Vec<AppSummary>,
    /// Configured apps this node does not run, and why.
    #[serde(default)]
    pub(crate) skipped: Vec<SkippedApp>,
    /// What is wrong with the fleet: Applications left out (and why), an unreachable fleet
    /// repository. Empty without a fleet, or when all is well.
    #[serde(default)]
    pub(crate) fleet_problems: Vec<String>,
}

/// One recent event, as the status page and API show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EventRecord {
    pub(crate) timestamp: u64,
    pub(crate) app: String,
    pub(crate) event: String,
    pub(crate) revision: Option<String>,
    pub(crate) message: String,
}

/// What the board hands upstream, in the order it happened. The report's publisher writes it
/// to the outbox on a thread of its own ([`super::publisher::forward`]): the board is updated
/// from async tasks, and the outbox syncs files.
#[derive(Debug, Clone)]
pub(crate) enum Upstream {
    App(AppStatus),
    Node(NodeStatus),
    Event {
        app: String,
        event: String,
        revision: Option<String>,
        message: String,
    },
}

pub(crate) type UpstreamSender = std::sync::mpsc::Sender<Upstream>;

/// Events kept in memory for the page and the API (MQTT gets all of them).
const RECENT_EVENTS: usize = 50;

/// What `GET /api/v1/status` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StatusDocument {
    pub(crate) node: NodeStatus,
    pub(crate) apps: Vec<AppStatus>,
    /// The most recent events, newest first.
    #[serde(default)]
    pub(crate) events: Vec<EventRecord>,
}

/// The live status of every app, updated by the daemon around each sync.
pub(crate) struct StatusBoard {
    node: String,
    labels: BTreeMap<String, String>,
    skipped: Vec<SkippedApp>,
    fleet_problems: Vec<String>,
    started: Instant,
    apps: Mutex<BTreeMap<String, AppStatus>>,
    metrics: Arc<Metrics>,
    publisher: Option<UpstreamSender>,
    recent: Mutex<VecDeque<EventRecord>>,
}

const UNKNOWN: &str = "Unknown";

impl StatusBoard {
    /// Starts from what the state directory remembers, so a restarted agent reports its
    /// last known state at once. `states` yields each app's persisted state.
    pub(crate) fn new(
        config: &Config,
        fleet_problems: &[String],
        metrics: Arc<Metrics>,
        publisher: Option<UpstreamSender>,
        mut states: impl FnMut(&str) -> AppState,
    ) -> StatusBoard {
        let apps = config
            .apps
            .iter()
            .map(|a| {
                let state = states(&a.name);
                let mut status = AppStatus {
                    app: a.name.clone(),
                    repo: a.repo.clone(),
                    path: a.path.clone(),
                    revision: state.last_applied_revision.clone(),
                    target_revision: state.last_attempted_revision.clone(),
                    sync: SyncState::Waiting,
                    health: UNKNOWN.into(),
                    health_message: "not assessed yet".into(),
                    message: "waiting for the first round".into(),
                    objects: counts(&state),
                    last_sync_start: state.last_attempt_at,
                    last_sync_end: state.last_attempt_at,
                    last_error: state.last_error.clone(),
                    warnings: Vec::new(),
                };
                scrub(&mut status);
                (a.name.clone(), status)
            })
            .collect::<BTreeMap<_, _>>();
        let board = StatusBoard {
            node: config.node.name.clone(),
            labels: config.node.labels.clone(),
            skipped: config.skipped.clone(),
            fleet_problems: fleet_problems
                .iter()
                .map(|p| crate::model::url::redact_text(p))
                .collect(),
            started: Instant::now(),
            apps: Mutex::new(apps),
            metrics,
            publisher,
            recent: Mutex::new(VecDeque::new()),
        };
        let all: Vec<AppStatus> = board.lock().values().cloned().collect();
        for status in &all {
            board.publish_info(status);
            board.upstream(Upstream::App(status.clone()));
        }
        board.upstream(Upstream::Node(board.document().node));
        board
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, AppStatus>> {
        self.apps.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish_info(&self, s: &AppStatus) {
        self.metrics.app_info(AppInfo {
            app: s.app.clone(),
            repo: s.repo.clone(),
            revision: s.revision.clone().unwrap_or_default(),
            sync: s.sync.as_str().into(),
            health: s.health.clone(),
        });
    }

    /// Changes one app's status; publishes its document (and the node's) if it changed.
    fn update(&self, app: &str, change: impl FnOnce(&mut AppStatus)) {
        let changed = {
            let mut apps = self.lock();
            let Some(status) = apps.get_mut(app) else {
                return;
            };
            let before = status.clone();
            change(status);
            scrub(status);
            self.publish_info(status);
            (before != *status).then(|| status.clone())
        };
        if let Some(status) = changed {
            if self.publisher.is_some() {
                self.upstream(Upstream::App(status));
                self.upstream(Upstream::Node(self.document().node));
            }
        }
    }

    /// Publishes the node document again, unchanged but newly numbered and dated: at rest an
    /// agent sends nothing else, and the fleet hub must tell a live node at rest from one it
    /// has not heard of for too long (stale after three missed heartbeats).
    pub(crate) fn heartbeat(&self) {
        self.upstream(Upstream::Node(self.document().node));
    }

    fn upstream(&self, update: Upstream) {
        if let Some(p) = &self.publisher {
            // Gone only when the publisher's thread is: nothing left to publish to.
            let _ = p.send(update);
        }
    }

    fn event(&self, app: &str, event: &str, revision: Option<&str>, message: &str) {
        let message = &crate::model::url::redact_text(message);
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            recent.push_front(EventRecord {
                timestamp: unix_now(),
                app: app.to_string(),
                event: event.to_string(),
                revision: revision.map(str::to_string),
                message: message.to_string(),
            });
            recent.truncate(RECENT_EVENTS);
        }
        self.upstream(Upstream::Event {
            app: app.to_string(),
            event: event.to_string(),
            revision: revision.map(str::to_string),
            message: message.to_string(),
        });
    }

    pub(crate) fn syncing(&self, app: &str, target: &str) {
        self.event(app, "sync_started", Some(target), "");
        self.update(app, |s| {
            s.sync = SyncState::Syncing;
            s.target_revision = Some(target.to_string());
            s.last_sync_start = Some(unix_now());
            s.message = format!("applying {}", short(target));
        });
    }

    /// After a sync attempt, from the state it persisted.
    pub(crate) fn synced(&self, app: &str, state: &AppState, error: Option<&str>) {
        let target = state.last_attempted_revision.as_deref();
        match error {
            None => self.event(app, "sync_succeeded", target, ""),
            Some(e) => self.event(app, "sync_failed", target, &first_line(e)),
        }
        self.update(app, |s| {
            s.revision = state.last_applied_revision.clone();
            s.target_revision = state.last_attempted_revision.clone();
            s.last_sync_end = Some(unix_now());
            s.last_error = state.last_error.clone();
            s.objects = counts(state);
            match error {
                None => {
                    s.sync = SyncState::Synced;
                    s.message = format!(
                        "{} applied",
                        s.revision.as_deref().map(short).unwrap_or_default()
                    );
                }
                Some(e) => {
                    s.sync = SyncState::Failed;
                    s.message = first_line(e);
                }
            }
        });
    }

    /// The app is held at `target` by a sync window or a retry backoff.
    pub(crate) fn waiting(&self, app: &str, target: &str, reason: &str) {
        self.update(app, |s| {
            if s.revision.as_deref() != Some(target) {
                s.sync = SyncState::Waiting;
            }
            s.target_revision = Some(target.to_string());
            // A failing app waiting to retry still says why it fails.
            s.message = match &s.last_error {
                Some(error) => format!("{} ({})", first_line(error), first_line(reason)),
                None => first_line(reason),
            };
        });
    }

    /// Replaces the app's standing warnings (they stay until the next sync sets them again).
    pub(crate) fn warnings(&self, app: &str, warnings: Vec<String>) {
        self.update(app, |s| s.warnings = warnings);
    }

    /// Adds a note (retry plans) to the app's message.
    pub(crate) fn note(&self, app: &str, note: &str) {
        self.update(app, |s| s.message = format!("{} ({note})", s.message));
    }

    /// Live objects differ from Git and are not healed; `message` says which and how.
    pub(crate) fn out_of_sync(&self, app: &str, message: &str) {
        self.update(app, |s| {
            s.sync = SyncState::OutOfSync;
            s.message = first_line(message);
        });
    }

    /// The drift reported by [`out_of_sync`](Self::out_of_sync) is gone.
    pub(crate) fn in_sync(&self, app: &str) {
        self.update(app, |s| {
            if s.sync == SyncState::OutOfSync && s.last_error.is_none() {
                s.sync = SyncState::Synced;
                s.message = format!(
                    "{} applied",
                    s.revision.as_deref().map(short).unwrap_or_default()
                );
            }
        });
    }

    /// Drifted objects were re-applied from the last-known-good render.
    pub(crate) fn healed(&self, app: &str, objects: &[String]) {
        let revision = self.lock().get(app).and_then(|s| s.revision.clone());
        self.event(app, "self_healed", revision.as_deref(), &objects.join("; "));
        self.in_sync(app);
    }

    /// `rollback = "auto"` went back from `bad`, which went Degraded for `reason`.
    pub(crate) fn rolled_back(
        &self,
        app: &str,
        state: &AppState,
        bad: &str,
        reason: &str,
        error: Option<&impl std::fmt::Display>,
    ) {
        let message = match error {
            None => format!(
                "rolled back from {} to {}: {} went Degraded ({}); it stays marked bad until a newer revision",
                short(bad),
                state.last_applied_revision.as_deref().map(short).unwrap_or_default(),
                short(bad),
                first_line(reason)
            ),
            Some(e) => format!("rollback from {} failed: {}", short(bad), first_line(&e.to_string())),
        };
        let event = if error.is_none() {
            "rolled_back"
        } else {
            "rollback_failed"
        };
        self.event(app, event, Some(bad), &message);
        self.update(app, |s| {
            s.revision = state.last_applied_revision.clone();
            s.target_revision = Some(bad.to_string());
            s.last_error = state.last_error.clone();
            s.sync = if error.is_none() {
                SyncState::OutOfSync
            } else {
                SyncState::Failed
            };
            s.message = message.clone();
        });
    }

    /// Objects deleted because Git no longer has them.
    pub(crate) fn pruned(&self, app: &str, revision: Option<&str>, objects: &[String]) {
        self.event(app, "pruned", revision, &objects.join(", "));
    }

    /// A round found the app already at `revision`.
    pub(crate) fn up_to_date(&self, app: &str, revision: &str) {
        self.update(app, |s| {
            if s.revision.as_deref() == Some(revision) {
                s.sync = SyncState::Synced;
                s.target_revision = Some(revision.to_string());
                if s.last_error.is_none() {
                    s.message = format!("{} applied", short(revision));
                }
            }
        });
    }

    /// The app's health, the worst of its objects', with their counts by health.
    pub(crate) fn health(
        &self,
        app: &str,
        health: &crate::health::Health,
        counts: BTreeMap<String, usize>,
    ) {
        self.update(app, |s| {
            s.health = health.status.as_str().to_string();
            s.health_message = first_line(&health.message);
            s.objects = counts;
            if s.sync == SyncState::Synced {
                s.message = if health.message.is_empty() {
                    format!(
                        "{} applied",
                        s.revision.as_deref().map(short).unwrap_or_default()
                    )
                } else {
                    first_line(&health.message)
                };
            }
        });
    }

    /// The round could not reach Git or resolve the revision; what runs stays as it is.
    pub(crate) fn unreachable(&self, app: &str, error: &str) {
        self.update(app, |s| s.message = first_line(error));
    }

    pub(crate) fn document(&self) -> StatusDocument {
        let apps: Vec<AppStatus> = self.lock().values().cloned().collect();
        StatusDocument {
            node: NodeStatus {
                schema_version: SCHEMA_VERSION,
                node: self.node.clone(),
                labels: self.labels.clone(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
                uptime_seconds: self.started.elapsed().as_secs(),
                timestamp: unix_now(),
                apps: apps
                    .iter()
                    .map(|a| AppSummary {
                        app: a.app.clone(),
                        revision: a.revision.clone(),
                        sync: a.sync,
                        health: a.health.clone(),
                    })
                    .collect(),
                skipped: self.skipped.clone(),
                fleet_problems: self.fleet_problems.clone(),
            },
            apps,
            events: self
                .recent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect(),
        }
    }

    /// "5 apps: 4 healthy, 1 degraded; 1 failing to sync", for systemd's STATUS= line.
    pub(crate) fn summary(&self) -> String {
        let apps = self.lock();
        let mut by_health: BTreeMap<&str, usize> = BTreeMap::new();
        for s in apps.values() {
            *by_health.entry(s.health.as_str()).or_default() += 1;
        }
        let parts: Vec<String> = by_health
            .iter()
            .map(|(health, n)| format!("{n} {}", health.to_lowercase()))
            .collect();
        let failing = apps
            .values()
            .filter(|s| s.sync == SyncState::Failed)
            .count();
        let mut line = format!("{} apps: {}", apps.len(), parts.join(", "));
        if failing > 0 {
            line.push_str(&format!("; {failing} failing to sync"));
        }
        line
    }
}

fn counts(state: &AppState) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    if !state.inventory.is_empty() {
        counts.insert(UNKNOWN.to_string(), state.inventory.len());
    }
    counts
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// A revision as people read it: 12 characters, or `-` when there is none.
pub(crate) fn short_revision(revision: Option<&str>) -> &str {
    revision.map(short).unwrap_or("-")
}

/// "42s ago", "5m ago", "3h ago", "2d ago" or "never".
pub(crate) fn ago(now: u64, then: Option<u64>) -> String {
    let Some(then) = then else {
        return "never".into();
    };
    match now.saturating_sub(then) {
        s @ 0..=119 => format!("{s}s ago"),
        s @ 120..=7199 => format!("{}m ago", s / 60),
        s @ 7200..=172_799 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}

/// Credentials in URLs never leave the node: every text of an app's status passes here
/// (errors from libgit2, HTTP clients and helm may quote a URL with its user part).
fn scrub(status: &mut AppStatus) {
    let redact = crate::model::url::redact_text;
    status.repo = redact(&status.repo);
    status.message = redact(&status.message);
    status.health_message = redact(&status.health_message);
    if let Some(error) = &mut status.last_error {
        *error = redact(error);
    }
    for warning in &mut status.warnings {
        *warning = redact(warning);
    }
}

fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    line.chars().take(500).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn board() -> StatusBoard {
        let config = Config::parse(
            Path::new("/tmp/x/config.toml"),
            "[node]\nname = \"edge-1\"\n[[apps]]\nname = \"web\"\nrepo = \"https://bot:tok@git/x.git\"\n[[apps]]\nname = \"api\"\nrepo = \"https://git/x.git\"\n",
        )
        .unwrap();
        StatusBoard::new(&config, &[], Arc::new(Metrics::default()), None, |_| {
            AppState::default()
        })
    }

    #[test]
    fn a_sync_moves_through_syncing_to_synced_or_failed() {
        let b = board();
        assert_eq!(b.document().apps[1].sync, SyncState::Waiting);
        b.syncing("web", "0123456789abcdef");
        assert_eq!(b.document().apps[1].sync, SyncState::Syncing);
        let state = AppState {
            last_applied_revision: Some("0123456789abcdef".into()),
            last_attempted_revision: Some("0123456789abcdef".into()),
            ..Default::default()
        };
        b.synced("web", &state, None);
        let web = &b.document().apps[1];
        assert_eq!(web.sync, SyncState::Synced);
        assert_eq!(web.message, "0123456789ab applied");
        b.synced(
            "api",
            &AppState::default(),
            Some("deploy/x.yaml: invalid YAML\nmore"),
        );
        assert_eq!(b.document().apps[0].sync, SyncState::Failed);
        assert_eq!(b.document().apps[0].message, "deploy/x.yaml: invalid YAML");
        assert_eq!(b.summary(), "2 apps: 2 unknown; 1 failing to sync");

        // Health messages replace the sync message, and clear once healthy again.
        let progressing = crate::health::Health {
            status: crate::health::HealthStatus::Progressing,
            message: "Deployment web: 0 of 2 new replicas updated".into(),
        };
        b.health("web", &progressing, BTreeMap::new());
        assert_eq!(b.document().apps[1].message, progressing.message);
        let healthy = crate::health::Health {
            status: crate::health::HealthStatus::Healthy,
            message: String::new(),
        };
        b.health("web", &healthy, BTreeMap::new());
        assert_eq!(b.document().apps[1].message, "0123456789ab applied");
        assert_eq!(b.document().apps[1].health, "Healthy");
        assert_eq!(
            b.summary(),
            "2 apps: 1 healthy, 1 unknown; 1 failing to sync"
        );
    }

    #[test]
    fn a_heartbeat_sends_the_node_document_again() {
        let config = Config::parse(
            Path::new("/tmp/x/config.toml"),
            "[node]\nname = \"edge-1\"\n[[apps]]\nname = \"web\"\nrepo = \"https://git/x.git\"\n",
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let b = StatusBoard::new(&config, &[], Arc::new(Metrics::default()), Some(tx), |_| {
            AppState::default()
        });
        let at_start = rx.try_iter().count();
        assert!(at_start >= 2, "the app's and the node's documents at start");
        b.heartbeat();
        let sent: Vec<Upstream> = rx.try_iter().collect();
        assert!(
            matches!(sent.as_slice(), [Upstream::Node(n)] if n.node == "edge-1"),
            "{}",
            sent.len()
        );
    }

    #[test]
    fn documents_carry_no_secrets() {
        let text = serde_json::to_string(&board().document()).unwrap();
        assert!(!text.contains("tok@"), "{text}");
        assert!(text.contains("\"schema_version\":1"));
    }
}
