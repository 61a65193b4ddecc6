//! The fleet repository, followed: the hub reads its `RolloutPolicy` documents and its
//! Applications' Git sources (`edgesync::fleet::upstream`, the agent's own Git and render code),
//! and every poll lists the branches of the apps it follows. A branch that moved starts a
//! rollout of its new commit ([`Driver::follow`]).
//!
//! An app is followed when its Application carries `edgesync.io/gated: "true"` or a policy
//! names it. A fleet commit is taken whole or not at all: one unreadable or ambiguous policy
//! keeps the policies and apps of the last commit taken, and the page says why.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgesync::fleet::upstream::{AppSource, FleetHead, FleetRead, Upstream};
use tokio::sync::watch;

use crate::gates::{Driver, Outgoing};
use crate::mqtt::Counts;
use crate::policy::Named;
use crate::store::Store;

/// What the page and the API show of the fleet repository.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub repository: String,
    /// The fleet commit whose policies and apps are in use.
    pub commit: Option<String>,
    /// When the last round ended (Unix seconds).
    pub checked_at: Option<u64>,
    /// Why the last round could not read the fleet, or refused its commit.
    pub error: Option<String>,
    /// What the commit in use holds that the hub does not follow.
    pub problems: Vec<String>,
    /// The apps followed, and the commit each branch was at.
    pub apps: BTreeMap<String, String>,
}

/// The fleet repository and what was last taken from it.
pub struct Follower {
    upstream: Upstream,
    taken: Option<(FleetRead, Vec<Named>)>,
    /// A fleet commit refused for what it holds: not read again until the branch moves.
    refused: Option<String>,
    status: Arc<Mutex<Status>>,
}

/// What a round found: the policies of a newly taken commit, and the followed apps' heads.
#[derive(Debug, Default)]
pub struct Round {
    pub policies: Option<Vec<Named>>,
    pub heads: Vec<(String, String)>,
}

impl Follower {
    pub fn new(upstream: Upstream) -> Follower {
        let status = Status {
            repository: upstream.describe(),
            ..Status::default()
        };
        Follower {
            upstream,
            taken: None,
            refused: None,
            status: Arc::new(Mutex::new(status)),
        }
    }

    pub fn status(&self) -> Arc<Mutex<Status>> {
        self.status.clone()
    }

    /// One round (blocking: Git). Errors are logged, counted and shown; what was taken
    /// before stays in use.
    pub fn round(&mut self, counts: &Mutex<Counts>, now: u64) -> Round {
        let mut round = Round::default();
        let mut error = None;
        match self.upstream.commit() {
            Err(e) => error = Some(e.to_string()),
            Ok(head) => {
                let commit = head.commit.clone();
                let known = self.taken.as_ref().map(|(r, _)| r.commit.as_str());
                if known != Some(commit.as_str()) && self.refused.as_deref() != Some(&commit) {
                    match self.take(&head) {
                        Ok(policies) => {
                            round.policies = Some(policies);
                            self.refused = None;
                            self.upstream.keep_only(&commit);
                        }
                        Err((e, content)) => {
                            if content {
                                self.refused = Some(commit.clone());
                            }
                            error = Some(e);
                        }
                    }
                } else if self.refused.as_deref() == Some(&commit) {
                    error = self
                        .status
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .error
                        .clone();
                }
            }
        }
        let mut heads = BTreeMap::new();
        if let Some((read, policies)) = &self.taken {
            let followed: Vec<&AppSource> = read
                .apps
                .iter()
                .filter(|a| a.gated || policies.iter().any(|p| p.names(&a.name)))
                .collect();
            let mut by_repo: BTreeMap<&str, Vec<&AppSource>> = BTreeMap::new();
            for app in followed {
                by_repo.entry(app.repo.as_str()).or_default().push(app);
            }
            for (repo, apps) in by_repo {
                let revisions: Vec<&str> = apps.iter().map(|a| a.revision.as_str()).collect();
                match self.upstream.heads(repo, &revisions) {
                    Ok(found) => {
                        for app in apps {
                            match found.get(&app.revision) {
                                Some(Ok(sha)) => {
                                    heads.insert(app.name.clone(), sha.clone());
                                }
                                Some(Err(e)) => {
                                    error.get_or_insert(format!("app {}: {e}", app.name));
                                }
                                None => {}
                            }
                        }
                    }
                    Err(e) => {
                        let names: Vec<&str> = apps.iter().map(|a| a.name.as_str()).collect();
                        error.get_or_insert(format!("apps {}: {e}", names.join(", ")));
                    }
                }
            }
        }
        if let Some(e) = &error {
            tracing::warn!(fleet = %self.upstream.describe(), "{e}");
            counts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .fleet_errors += 1;
        }
        round.heads = heads.iter().map(|(a, h)| (a.clone(), h.clone())).collect();
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.checked_at = Some(now);
        status.error = error;
        status.commit = self.taken.as_ref().map(|(r, _)| r.commit.clone());
        status.problems = self
            .taken
            .as_ref()
            .map(|(r, _)| r.problems.clone())
            .unwrap_or_default();
        status.apps = heads;
        round
    }

    /// Reads and takes the fleet commit `head` names; the error and whether it is the commit's content
    /// (not read again until the branch moves) rather than the way to it.
    fn take(&mut self, head: &FleetHead) -> Result<Vec<Named>, (String, bool)> {
        let commit = head.commit.as_str();
        let read = self
            .upstream
            .read(head)
            .map_err(|e| (e.to_string(), Upstream::refused(&e)))?;
        let policies = policies(&read).map_err(|e| {
            (
                format!(
                    "fleet commit {}: {e}; the policies of the last commit taken stay in use",
                    short(commit)
                ),
                true,
            )
        })?;
        for problem in &read.problems {
            tracing::warn!(commit = %short(commit), "{problem}");
        }
        tracing::info!(
            commit = %short(commit),
            policies = policies.len(),
            apps = read.apps.len(),
            "fleet repository read"
        );
        self.taken = Some((read, policies.clone()));
        Ok(policies)
    }
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// The commit's policies, all of them valid and none claiming an app another claims (nor two
/// defaults): which policy governs an app must never depend on the order files are read.
fn policies(read: &FleetRead) -> Result<Vec<Named>, String> {
    let mut all = Vec::new();
    let mut claimed: BTreeMap<String, String> = BTreeMap::new();
    let mut names = BTreeSet::new();
    for doc in &read.policies {
        let named =
            crate::policy::from_value(&doc.origin, &doc.value).map_err(|e| e.to_string())?;
        if !names.insert(named.name.clone()) {
            return Err(format!(
                "{}: RolloutPolicy {} is defined twice",
                doc.origin, named.name
            ));
        }
        for app in named.apps.clone().unwrap_or_else(|| vec![String::new()]) {
            if let Some(other) = claimed.insert(app.clone(), named.name.clone()) {
                let what = if app.is_empty() {
                    "the default".to_string()
                } else {
                    format!("app {app}")
                };
                return Err(format!(
                    "{}: RolloutPolicy {} claims {what}, as RolloutPolicy {other} does",
                    doc.origin, named.name
                ));
            }
        }
        all.push(named);
    }
    Ok(all)
}

/// Applies a round: new policies, then each moved branch. An app without a rollout yet waits
/// until `first_after` (the nodes' retained documents are still coming in: the hub starts
/// from what they run).
pub fn apply(
    store: &Mutex<Store>,
    driver: &Mutex<Driver>,
    round: Round,
    first_after: Instant,
    now: u64,
) -> Vec<Outgoing> {
    // The store before the driver, as ingest takes them.
    let mut db = store.lock().unwrap_or_else(|e| e.into_inner());
    let mut driver = driver.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(policies) = round.policies {
        driver.set_policies(policies);
    }
    let mut gates = Vec::new();
    for (app, head) in round.heads {
        let known = driver.saved(&app).is_some();
        if !known && Instant::now() < first_after {
            continue;
        }
        let views = if known {
            Vec::new()
        } else {
            match db.app_views(&app) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(%app, "cannot read the app's nodes: {e}");
                    continue;
                }
            }
        };
        match driver.follow(&app, &head, &views, now) {
            Ok(Some((gate, said))) => {
                if let Some((rollout, issued)) = driver.saved(&app) {
                    crate::mqtt::keep(&mut db, &rollout, issued, &said, now);
                }
                gates.push(gate);
            }
            Ok(None) => {}
            Err(e) => tracing::error!(%app, "{e}"),
        }
    }
    gates
}

/// Follows the fleet repository every `poll` until `shutdown`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    follower: Follower,
    poll: Duration,
    first_after: Instant,
    store: Arc<Mutex<Store>>,
    driver: Arc<Mutex<Driver>>,
    counts: Arc<Mutex<Counts>>,
    client: rumqttc::v5::AsyncClient,
    mut shutdown: watch::Receiver<bool>,
) {
    let follower = Arc::new(Mutex::new(follower));
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        let (follower, store, driver, counts) = (
            follower.clone(),
            store.clone(),
            driver.clone(),
            counts.clone(),
        );
        let gates = tokio::task::spawn_blocking(move || {
            let round = follower
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .round(&counts, crate::unix_now());
            apply(&store, &driver, round, first_after, crate::unix_now())
        })
        .await;
        match gates {
            Ok(gates) => {
                for gate in gates {
                    crate::mqtt::publish_gate(&client, gate).await;
                }
            }
            Err(e) => tracing::error!("following the fleet repository failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "apiVersion: edgesync.io/v1alpha1
kind: RolloutPolicy
metadata: {name: default}
spec:
  stages:
    - {name: canary, nodeSelector: {matchLabels: {ring: canary}}, bake: 1m}
    - {name: rest, share: 100%}
  failureBudget: {nodes: 0}
  onFailure: halt
";

    fn app(name: &str, url: &str, gated: bool) -> String {
        format!(
            "apiVersion: argoproj.io/v1alpha1
kind: Application
metadata:
  name: {name}
  namespace: argocd
  annotations: {{edgesync.io/gated: \"{gated}\"}}
spec:
  project: default
  source: {{repoURL: \"{url}\", targetRevision: main, path: app}}
  destination: {{server: https://kubernetes.default.svc, namespace: {name}}}
"
        )
    }

    struct Repo {
        dir: tempfile::TempDir,
    }

    impl Repo {
        fn new() -> Repo {
            let repo = Repo {
                dir: tempfile::tempdir().unwrap(),
            };
            repo.git(&["init", "-q", "-b", "main"]);
            repo
        }
        fn url(&self) -> String {
            format!("file://{}", self.dir.path().display())
        }
        fn git(&self, args: &[&str]) -> String {
            run(std::process::Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
                .args(args)
                .current_dir(self.dir.path()))
        }
        fn commit(&self, files: &[(&str, &str)]) -> String {
            self.commit_as(files, None)
        }
        /// Commits, signed with the SSH private key `key` if given.
        fn commit_as(&self, files: &[(&str, &str)], key: Option<&std::path::Path>) -> String {
            for (path, text) in files {
                let path = self.dir.path().join(path);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, text).unwrap();
            }
            self.git(&["add", "-A"]);
            match key {
                Some(key) => {
                    let signing = format!("user.signingkey={}", key.display());
                    self.git(&[
                        "-c",
                        "gpg.format=ssh",
                        "-c",
                        &signing,
                        "commit",
                        "-q",
                        "-S",
                        "-m",
                        "c",
                    ])
                }
                None => self.git(&["commit", "-q", "-m", "c"]),
            };
            self.git(&["rev-parse", "HEAD"])
        }
    }

    /// A new Ed25519 key pair in `dir`: the private key's path.
    fn ssh_key(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
        let private = dir.join(name);
        run(std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&private));
        private
    }

    /// Runs `command`, which must succeed: its standard output, trimmed.
    fn run(command: &mut std::process::Command) -> String {
        let out = command.output().unwrap();
        assert!(
            out.status.success(),
            "{:?}: {}",
            command,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[test]
    fn policies_and_followed_branches_come_from_the_fleet_commit() {
        let repo = Repo::new();
        let url = repo.url();
        let appset = "apiVersion: argoproj.io/v1alpha1\nkind: ApplicationSet\nmetadata: {name: per-node}\nspec: {generators: [], template: {}}\n";
        let first = repo.commit(&[
            ("fleet/policy.yaml", POLICY),
            ("fleet/web.yaml", &app("web", &url, true)),
            ("fleet/plain.yaml", &app("plain", &url, false)),
            ("fleet/set.yaml", appset),
            (
                "app/cm.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
            ),
        ]);
        let cache = tempfile::tempdir().unwrap();
        let upstream = Upstream::new(cache.path(), Vec::new(), &url, "main", "fleet");
        let mut follower = Follower::new(upstream);
        let counts = Mutex::new(Counts::default());
        let round = follower.round(&counts, 1);
        let policies = round.policies.expect("the policies of the first commit");
        assert_eq!(policies.len(), 1);
        // Only the gated app is followed; the ApplicationSet is said to be left alone.
        assert_eq!(round.heads, [("web".to_string(), first.clone())]);
        let status = follower.status().lock().unwrap().clone();
        assert_eq!(status.commit.as_deref(), Some(first.as_str()));
        assert!(status.error.is_none(), "{status:?}");
        assert!(
            status
                .problems
                .iter()
                .any(|p| p.contains("ApplicationSet per-node")),
            "{status:?}"
        );
        // Same commit: the policies are not handed over again; the branch is listed again.
        let again = follower.round(&counts, 2);
        assert!(again.policies.is_none());
        assert_eq!(again.heads.len(), 1);

        // A commit with a second default policy is refused whole: the apps and policies of the
        // first stay, the page says why, and it counts as an error.
        let second = repo.commit(&[
            (
                "fleet/other.yaml",
                &POLICY
                    .replace("name: default", "name: default2")
                    .replace("spec:\n", "spec:\n  apps: [web]\n"),
            ),
            ("fleet/dup.yaml", POLICY),
        ]);
        let refused = follower.round(&counts, 3);
        assert!(refused.policies.is_none());
        // The app's branch moved with the fleet's (one repository): followed from the first
        // commit's Application.
        assert_eq!(refused.heads, [("web".to_string(), second.clone())]);
        let status = follower.status().lock().unwrap().clone();
        assert_eq!(status.commit.as_deref(), Some(first.as_str()));
        let error = status.error.unwrap_or_default();
        assert!(
            error.contains("RolloutPolicy default is defined twice"),
            "{error}"
        );
        assert_eq!(counts.lock().unwrap().fleet_errors, 1);
        // Not read again while the branch stays there, but still said.
        follower.round(&counts, 4);
        assert!(follower.status().lock().unwrap().error.is_some());

        // Fixed: taken, the policy naming web now governs it.
        let third = repo.commit(&[("fleet/dup.yaml", "")]);
        let taken = follower.round(&counts, 5);
        let policies = taken.policies.expect("the fixed commit's policies");
        assert_eq!(policies.len(), 2);
        assert_eq!(taken.heads, [("web".to_string(), third)]);
    }

    #[test]
    fn with_signatures_only_a_commit_a_trusted_key_signed_is_read() {
        let keys = tempfile::tempdir().unwrap();
        let trusted = ssh_key(keys.path(), "trusted");
        let stranger = ssh_key(keys.path(), "stranger");
        let repo = Repo::new();
        let url = repo.url();
        repo.commit(&[
            ("fleet/policy.yaml", POLICY),
            ("fleet/web.yaml", &app("web", &url, true)),
        ]);
        let cache = tempfile::tempdir().unwrap();
        let upstream = Upstream::new(cache.path(), Vec::new(), &url, "main", "fleet")
            .require_signatures(&[], &[trusted.with_extension("pub")])
            .unwrap();
        let mut follower = Follower::new(upstream);
        let counts = Mutex::new(Counts::default());
        // Unsigned: refused, nothing taken, said.
        let round = follower.round(&counts, 1);
        assert!(round.policies.is_none() && round.heads.is_empty());
        let error = follower
            .status()
            .lock()
            .unwrap()
            .error
            .clone()
            .unwrap_or_default();
        assert!(
            error.contains("not signed") || error.contains("unsigned"),
            "{error}"
        );
        // Signed by a key the hub does not trust: refused too.
        repo.commit_as(&[("fleet/note.yaml", "")], Some(&stranger));
        let round = follower.round(&counts, 2);
        assert!(
            round.policies.is_none(),
            "{:?}",
            follower.status().lock().unwrap()
        );
        // Signed by the trusted key: read.
        let signed = repo.commit_as(&[("fleet/note.yaml", "# signed\n")], Some(&trusted));
        let round = follower.round(&counts, 3);
        assert_eq!(round.policies.map(|p| p.len()), Some(1));
        assert_eq!(round.heads, [("web".to_string(), signed)]);
        assert!(follower.status().lock().unwrap().error.is_none());
        assert_eq!(counts.lock().unwrap().fleet_errors, 2);
    }

    #[test]
    fn an_unreachable_fleet_keeps_what_was_taken_and_says_so() {
        let cache = tempfile::tempdir().unwrap();
        let gone = cache.path().join("nowhere");
        let upstream = Upstream::new(
            cache.path(),
            Vec::new(),
            &format!("file://{}", gone.display()),
            "main",
            ".",
        );
        let mut follower = Follower::new(upstream);
        let counts = Mutex::new(Counts::default());
        let round = follower.round(&counts, 1);
        assert!(round.policies.is_none() && round.heads.is_empty());
        assert!(follower.status().lock().unwrap().error.is_some());
        assert_eq!(counts.lock().unwrap().fleet_errors, 1);
    }
}
