//! The fleet source: Argo CD Applications read from a Git directory become apps of this
//! node. The set read last is kept in `state_dir/fleet.json`, so a node that cannot reach Git
//! at start still runs the apps it ran before. When the fleet commit moves, the daemon reloads.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::config::{AppConfig, Config, FleetConfig};
use crate::fleet::argo::{self, FleetObject};
use crate::render;
use crate::source::GitSource;

/// The apps one fleet commit yields.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FleetApps {
    pub revision: String,
    pub apps: Vec<AppConfig>,
}

fn saved_path(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("fleet.json")
}

/// Reads the fleet's Applications at its current commit. Returns the apps, and problems to
/// report (unreadable manifests, apps that cannot run yet, an unreachable repository: then
/// the last known set is used).
pub async fn load(config: &Config, fleet: &FleetConfig) -> (FleetApps, Vec<String>) {
    let source = GitSource::new(&config.state_dir);
    let repo = config.repository(&fleet.repo);
    let fleet = fleet.clone();
    let read = tokio::task::spawn_blocking(move || -> Result<(FleetApps, Vec<String>), String> {
        let refs = source.remote_refs(&repo).map_err(|e| e.to_string())?;
        let sha = refs.resolve(&fleet.revision).map_err(|e| e.to_string())?;
        let snapshot = source
            .snapshot(&repo, &fleet.revision, &sha)
            .map_err(|e| e.to_string())?;
        let manifests =
            render::render(&snapshot.root, Path::new(&fleet.path)).map_err(|e| e.to_string())?;
        let mut problems = Vec::new();
        let mut apps = Vec::new();
        for object in &manifests.objects {
            match argo::parse(object) {
                Ok(Some(parsed)) => {
                    for w in &parsed.warnings {
                        problems.push(format!("{}: {w}", object.origin));
                    }
                    if let FleetObject::Application(app) = parsed.object {
                        match app.to_app_config() {
                            Ok(cfg) => apps.push(cfg),
                            Err(why) => problems.push(format!(
                                "{}: app {} cannot run yet: {why}",
                                object.origin, app.name
                            )),
                        }
                    }
                }
                Ok(None) => problems.push(format!(
                    "{}: {} is not an Argo CD object; ignored",
                    object.origin,
                    object.display_name()
                )),
                Err(e) => problems.push(e.to_string()),
            }
        }
        Ok((
            FleetApps {
                revision: sha,
                apps,
            },
            problems,
        ))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let saved = saved_path(&config.state_dir);
    match read {
        Ok((apps, problems)) => {
            if let Err(e) = save(&saved, &apps) {
                tracing::warn!("cannot keep the fleet app set in {}: {e}", saved.display());
            }
            (apps, problems)
        }
        Err(e) => {
            let last = std::fs::read(&saved)
                .ok()
                .and_then(|b| serde_json::from_slice::<FleetApps>(&b).ok())
                .unwrap_or_default();
            let problem = format!(
                "cannot read the fleet ({e}); running the apps of fleet revision {:?}",
                last.revision
            );
            (last, vec![problem])
        }
    }
}

fn save(path: &Path, apps: &FleetApps) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(apps).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// Asks for a reload (through `changed`) once the fleet's commit is no longer `revision`.
pub async fn watch_fleet(
    config: Config,
    fleet: FleetConfig,
    revision: String,
    changed: mpsc::Sender<()>,
    mut shutdown: watch::Receiver<bool>,
) {
    let repo = config.repository(&fleet.repo);
    let every = repo.poll_interval.max(Duration::from_secs(1));
    let source = GitSource::new(&config.state_dir);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let (source, repo, wanted) = (source.clone(), repo.clone(), fleet.revision.clone());
        let now = tokio::task::spawn_blocking(move || {
            source
                .remote_refs(&repo)
                .and_then(|refs| refs.resolve(&wanted))
        })
        .await;
        if let Ok(Ok(sha)) = now {
            if sha != revision {
                tracing::info!(from = %revision, to = %sha, "fleet revision moved; reloading");
                let _ = changed.try_send(());
                return;
            }
        }
    }
}
