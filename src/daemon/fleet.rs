//! The fleet source: Argo CD Applications read from a Git directory become apps of this
//! node. The set read last is kept in `state_dir/fleet.json`, so a node that cannot reach Git
//! at start still runs the apps it ran before. When the fleet commit moves, the daemon reloads.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::config::{AppConfig, Config, FleetConfig};
use crate::fleet::appset;
use crate::fleet::argo::{self, FleetObject};
use crate::fleet::upstream;
use crate::render;
use crate::source::GitSource;

use super::node::Node;

/// The apps one fleet commit yields.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct FleetApps {
    pub(crate) revision: String,
    pub(crate) apps: Vec<AppConfig>,
    /// AppProjects: name and spec.
    #[serde(default)]
    pub(crate) projects: Vec<(String, serde_json::Value)>,
    /// Read from Git just now, not the saved set.
    #[serde(skip)]
    pub(crate) fresh: bool,
    /// The commit the fleet was at when it was last looked at, even if that commit could not
    /// be read or was refused: the fleet is looked at again once it moves on from there.
    #[serde(skip)]
    pub(crate) seen: Option<String>,
    /// The other repositories the Applications were read from (app-of-apps sources, git
    /// generators), at the commits read: the fleet is read again once one of them moves.
    #[serde(skip)]
    pub(crate) read: Vec<Watched>,
}

/// A repository at a branch or tag, and the commit it was at when read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Watched {
    pub(crate) repo: String,
    pub(crate) revision: String,
    pub(crate) sha: String,
}

fn saved_path(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("fleet.json")
}

/// Reads the fleet's Applications at its current commit. Returns the apps, and problems to
/// report (unreadable manifests, apps that cannot run yet, an unreachable repository: then
/// the last known set is used).
pub(crate) async fn load(node: &Node, fleet: &FleetConfig) -> (FleetApps, Vec<String>) {
    let config = &node.config;
    let source = GitSource::new(&config.state_dir);
    let repo = config.repository(&fleet.repo);
    let fleet = fleet.clone();
    let config_for_children = config.clone();
    let keyring = node.keyring.clone();
    let read = tokio::task::spawn_blocking(move || {
        read_fleet(&source, &repo, &fleet, &config_for_children, &keyring)
    })
    .await
    .map_err(|e| (e.to_string(), None))
    .and_then(|r| r);
    let saved = saved_path(&config.state_dir);
    match read {
        Ok((apps, problems)) => {
            if let Err(e) = save(&saved, &apps) {
                tracing::warn!("cannot keep the fleet app set in {}: {e}", saved.display());
            }
            (apps, problems)
        }
        Err((e, seen)) => {
            let mut last = std::fs::read(&saved)
                .ok()
                .and_then(|b| serde_json::from_slice::<FleetApps>(&b).ok())
                .unwrap_or_default();
            last.seen = seen;
            let problem = format!(
                "cannot read the fleet ({e}); running the apps of fleet revision {:?}",
                last.revision
            );
            (last, vec![problem])
        }
    }
}

/// Why the fleet could not be read, and the commit it was reading when it got that far.
type Failure = (String, Option<String>);

/// Reads the fleet's Applications at the current commit of its branch (blocking: Git I/O),
/// verifying the commit's signature first when `[signatures] fleet` asks for it.
fn read_fleet(
    source: &GitSource,
    repo: &crate::config::RepositoryConfig,
    fleet: &FleetConfig,
    config: &Config,
    keyring: &crate::signature::Keyring,
) -> Result<(FleetApps, Vec<String>), Failure> {
    let unseen = |e: crate::source::SourceError| (e.to_string(), None);
    let refs = source.remote_refs(repo).map_err(unseen)?;
    let target = super::sync::Target {
        sha: refs.resolve(&fleet.revision).map_err(unseen)?,
        tag: refs.annotated_tag(&fleet.revision),
        sources: Vec::new(),
    };
    let seen = |e: &dyn std::fmt::Display| (e.to_string(), Some(target.sha.clone()));
    if config.signatures.fleet {
        let (object, signer) = super::checks::verify_revision(
            source,
            keyring,
            repo,
            &fleet.revision,
            &target,
            "[signatures] fleet",
            &keyring.key_ids(),
        )
        .map_err(|e| seen(&e))?;
        tracing::info!(%object, signer = %signer.0, "fleet signature verified");
    }
    let snapshot = source
        .snapshot(repo, &fleet.revision, &target.sha)
        .map_err(|e| seen(&e))?;
    let manifests = render::render(&snapshot.root, Path::new(&fleet.path)).map_err(|e| seen(&e))?;
    let mut expander = Expander {
        config,
        keyring,
        source,
        apps: Vec::new(),
        projects: Vec::new(),
        problems: Vec::new(),
        uncertain: false,
        read: std::cell::RefCell::new(Vec::new()),
    };
    let root = format!(
        "{}@{}:{}",
        crate::trigger::repo_key(&fleet.repo),
        fleet.revision,
        fleet.path.trim_matches('/')
    );
    expander.objects(&manifests.objects, &[root]);
    if expander.uncertain {
        expander.problems.push(
            "not every Application of the fleet could be read and accepted (see the other problems), so which apps left this node is unknown; nothing is removed this time".into(),
        );
    }
    Ok((
        FleetApps {
            revision: target.sha.clone(),
            apps: expander.apps,
            projects: expander.projects,
            fresh: !expander.uncertain,
            read: expander
                .read
                .into_inner()
                .into_iter()
                .filter(|w| {
                    crate::trigger::repo_key(&w.repo) != crate::trigger::repo_key(&fleet.repo)
                        || w.revision != fleet.revision
                })
                .collect(),
            seen: Some(target.sha),
        },
        expander.problems,
    ))
}

/// Turns rendered Argo CD objects into apps. An Application whose own path renders more
/// Applications is an app-of-apps: its children are read, recursively, and the parent itself
/// is not run (this node has no Argo CD to hand Applications to).
struct Expander<'a> {
    config: &'a Config,
    keyring: &'a crate::signature::Keyring,
    source: &'a GitSource,
    apps: Vec<AppConfig>,
    projects: Vec<(String, serde_json::Value)>,
    problems: Vec<String>,
    uncertain: bool,
    /// Every repository read beyond the fleet's own commit (behind `&self` for the
    /// generators' checkouts).
    read: std::cell::RefCell<Vec<Watched>>,
}

impl Expander<'_> {
    /// `chain` is the path of app-of-apps that led here, for cycle detection.
    fn objects(&mut self, objects: &[crate::render::Object], chain: &[String]) {
        // AppProjects first: an app-of-apps' project decides whether its children may be read.
        let (projects, others): (Vec<_>, Vec<_>) =
            objects.iter().partition(|o| o.kind() == "AppProject");
        for object in projects.into_iter().chain(others) {
            if object.group() == argo::GROUP && object.kind() == "ApplicationSet" {
                self.application_set(object, chain);
                continue;
            }
            match argo::parse(object) {
                Ok(Some(parsed)) => {
                    for w in &parsed.warnings {
                        self.problems.push(format!("{}: {w}", object.origin));
                    }
                    match parsed.object {
                        FleetObject::Application(app) => match app.to_app_config() {
                            Ok(cfg) => self.application(cfg, chain),
                            Err(why) => {
                                // The app is still in the fleet: it must not count as gone.
                                self.uncertain = true;
                                self.problems.push(format!(
                                    "{}: app {} cannot run yet: {why}",
                                    object.origin, app.name
                                ))
                            }
                        },
                        FleetObject::AppProject(project) => {
                            self.projects.push((project.name, project.spec));
                        }
                    }
                }
                // The fleet hub's rollout policies live beside the Applications.
                Ok(None) if upstream::is_policy(object) => {}
                Ok(None) => self.problems.push(format!(
                    "{}: {} is not an Argo CD object; ignored",
                    object.origin,
                    object.display_name()
                )),
                Err(e) => {
                    // An Application we cannot read may be one this node runs.
                    self.uncertain = true;
                    self.problems.push(e.to_string())
                }
            }
        }
    }

    /// The Applications an ApplicationSet generates for this node, read as if they were in the
    /// fleet. One that cannot be expanded is a problem, and the set of apps is then uncertain
    /// (nothing is removed for it).
    fn application_set(&mut self, object: &crate::render::Object, chain: &[String]) {
        let node = appset::Node {
            name: &self.config.node.name,
            labels: &self.config.node.labels,
        };
        match appset::expand(object, &*self, &node) {
            Ok((apps, warnings)) => {
                for w in warnings {
                    self.problems.push(format!("{}: {w}", object.origin));
                }
                tracing::debug!(
                    set = object.name(),
                    apps = apps.len(),
                    "ApplicationSet expanded"
                );
                self.objects(&apps, chain);
            }
            Err(e) => {
                self.uncertain = true;
                self.problems.push(format!(
                    "{}: ApplicationSet {} generates nothing: {e}",
                    object.origin,
                    object.name()
                ));
            }
        }
    }

    fn application(&mut self, app: AppConfig, chain: &[String]) {
        let key = format!(
            "{}@{}:{}",
            crate::trigger::repo_key(&app.repo),
            app.revision,
            app.path.trim_matches('/')
        );
        if chain.iter().any(|c| c == &key) {
            self.problems.push(format!(
                "app {} closes a cycle of app-of-apps ({} -> {key}); left out",
                app.name,
                chain.join(" -> ")
            ));
            return;
        }
        // What the app's path holds decides whether it is an app-of-apps. If it cannot be
        // read now, it is an ordinary app, and its sync reports the problem.
        let rendered = self.render(&app);
        // An app that could not be read might be an app-of-apps whose children are then
        // unknown: the set is not certain enough to remove anything for.
        self.uncertain |= rendered.is_none();
        let children = rendered.filter(|(objects, _)| {
            objects
                .iter()
                .any(|o| o.group() == argo::GROUP && o.kind() == "Application")
        });
        match children {
            Some((objects, read)) => {
                // Its children change with these repositories: they are watched.
                for w in read {
                    self.note_read(w);
                }
                let others = objects.iter().filter(|o| o.group() != argo::GROUP).count();
                if others > 0 {
                    self.problems.push(format!(
                        "app-of-apps {}: {others} objects that are not Applications are ignored",
                        app.name
                    ));
                }
                let mut chain = chain.to_vec();
                chain.push(key);
                self.objects(&objects, &chain);
            }
            None => self.apps.push(app),
        }
    }

    /// What the app renders, every source of it (as its sync renders them, `$ref` value files
    /// included), or `None` if that cannot be read now. Sources from chart repositories are
    /// never apps of apps and are left out.
    /// Also returns the repositories read, at their commits.
    fn render(&self, app: &AppConfig) -> Option<(Vec<crate::render::Object>, Vec<Watched>)> {
        let mut sources: Vec<(AppConfig, (std::path::PathBuf, String))> = Vec::new();
        let mut refs = std::collections::BTreeMap::new();
        if app.chart.is_none() {
            sources.push((app.clone(), self.checkout_source(app)?));
        }
        for (index, spec) in app.sources.iter().enumerate() {
            let Some(source) = app.with_source(index).filter(|s| s.chart.is_none()) else {
                continue;
            };
            let checkout = self.checkout_source(&source)?;
            if let Some(name) = &spec.ref_name {
                refs.insert(name.clone(), checkout.0.clone());
            }
            if spec.renders() {
                sources.push((source, checkout));
            }
        }
        let read: Vec<Watched> = sources
            .iter()
            .map(|(source, (_, sha))| Watched {
                repo: source.repo.clone(),
                revision: source.revision.clone(),
                sha: sha.clone(),
            })
            .collect();
        let mut manifests = render::Manifests::default();
        for (position, (source, (root, sha))) in sources.into_iter().enumerate() {
            // With the parent's own options: an app-of-apps that is a chart gets its release
            // name, values and parameters, and the node's helm.
            let mut helm = super::target::helm_request(self.config, &source);
            if render::helm::is_chart(&root.join(&source.path)) {
                helm.credentials = super::target::chart_logins(&self.config.repositories);
            }
            helm.refs = refs.clone();
            // Only the app's own source may name a plugin.
            let plugin = if position == 0 && app.chart.is_none() {
                super::target::plugin_request(self.config, app, &sha).ok()?
            } else {
                None
            };
            let options = render::RenderOptions {
                plugin,
                ..super::target::render_options(&source, helm)
            };
            let rendered = render::render_with(&root, Path::new(&source.path), &options).ok()?;
            super::target::combine(&app.name, &mut manifests, rendered);
        }
        Some((manifests.objects, read))
    }

    /// One Git source of an app checked out at its revision: the root and the commit.
    /// Children of an app whose project requires signatures are read only from signed
    /// revisions; otherwise the app stays an ordinary app, and its sync reports the refusal.
    fn checkout_source(&self, app: &AppConfig) -> Option<(std::path::PathBuf, String)> {
        let repo = self.config.repository(&app.repo);
        let refs = self.source.remote_refs(&repo).ok()?;
        let sha = refs.resolve(&app.revision).ok()?;
        let project = app.project.as_deref().and_then(|name| {
            let (_, spec) = self.projects.iter().rev().find(|(n, _)| n == name)?;
            Some(crate::policy::Project::from_spec(name, spec))
        });
        if let Some((required_by, keys)) = project.and_then(|p| p.required_signers()) {
            let target = super::sync::Target {
                sha: sha.clone(),
                tag: refs.annotated_tag(&app.revision),
                sources: Vec::new(),
            };
            super::checks::verify_revision(
                self.source,
                self.keyring,
                &repo,
                &app.revision,
                &target,
                &required_by,
                &keys,
            )
            .ok()?;
        }
        let snapshot = self.source.snapshot(&repo, &app.revision, &sha).ok()?;
        Some((snapshot.root, sha))
    }

    fn note_read(&self, watched: Watched) {
        let mut read = self.read.borrow_mut();
        if !read.contains(&watched) {
            read.push(watched);
        }
    }
}

/// A git generator's checkout: the repository at the revision, verified as the fleet is
/// when `[signatures] fleet` asks for it.
impl appset::Checkouts for Expander<'_> {
    fn checkout(
        &self,
        url: &str,
        revision: &str,
    ) -> Result<std::path::PathBuf, appset::CheckoutError> {
        let repo = self.config.repository(url);
        let refs = self.source.remote_refs(&repo)?;
        let target = super::sync::Target {
            sha: refs.resolve(revision)?,
            tag: refs.annotated_tag(revision),
            sources: Vec::new(),
        };
        if self.config.signatures.fleet {
            super::checks::verify_revision(
                self.source,
                self.keyring,
                &repo,
                revision,
                &target,
                "[signatures] fleet",
                &self.keyring.key_ids(),
            )?;
        }
        self.note_read(Watched {
            repo: url.to_string(),
            revision: revision.to_string(),
            sha: target.sha.clone(),
        });
        let snapshot = self.source.snapshot(&repo, revision, &target.sha)?;
        Ok(snapshot.root)
    }
}

fn save(path: &Path, apps: &FleetApps) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(apps).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// Asks for a reload (through `changed`) once the fleet's commit is no longer `revision`, or
/// a repository the Applications were read from (`read`) moved, at the fleet repository's
/// poll interval.
pub(crate) async fn watch_fleet(
    config: Config,
    fleet: FleetConfig,
    revision: String,
    read: Vec<Watched>,
    changed: mpsc::Sender<()>,
    mut shutdown: watch::Receiver<bool>,
) {
    let every = config
        .repository(&fleet.repo)
        .poll_interval
        .max(Duration::from_secs(1));
    let mut watched = vec![Watched {
        repo: fleet.repo.clone(),
        revision: fleet.revision.clone(),
        sha: revision,
    }];
    watched.extend(read);
    let source = GitSource::new(&config.state_dir);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        for w in &watched {
            let (source, repo, wanted) = (
                source.clone(),
                config.repository(&w.repo),
                w.revision.clone(),
            );
            let now = tokio::task::spawn_blocking(move || {
                source
                    .remote_refs(&repo)
                    .and_then(|refs| refs.resolve(&wanted))
            })
            .await;
            if let Ok(Ok(sha)) = now {
                if sha != w.sha {
                    if w.repo == fleet.repo && w.revision == fleet.revision {
                        tracing::info!(from = %w.sha, to = %sha, "fleet revision moved; reloading");
                    } else {
                        tracing::info!(repo = %crate::model::url::redact(&w.repo), from = %w.sha,
                            to = %sha, "a repository the fleet's Applications were read from moved; reloading");
                    }
                    let _ = changed.try_send(());
                    return;
                }
            }
        }
    }
}
