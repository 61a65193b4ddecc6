//! Per-app state persisted under `state_dir/apps/<app>.json`: the last applied revision, the
//! inventory of applied objects and the last error.
//!
//! Writes are atomic (temporary file, fsync, rename, fsync of the directory), so a power cut
//! leaves either the old or the new state. A file that cannot be read is never overwritten:
//! it is moved aside so a human can look at it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::apply::Inventory;

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot access state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is unreadable ({message}); moved aside to {quarantined}")]
    Corrupt {
        path: PathBuf,
        message: String,
        quarantined: PathBuf,
    },
}

impl StateError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            StateError::Io { .. } => "state_io",
            StateError::Corrupt { .. } => "state_corrupt",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AppState {
    pub format: u32,
    /// Commit SHA whose render was applied completely.
    pub last_applied_revision: Option<String>,
    /// Unix seconds of that apply.
    pub last_applied_at: Option<u64>,
    /// Commit SHA of the most recent attempt, successful or not.
    pub last_attempted_revision: Option<String>,
    pub last_attempt_at: Option<u64>,
    /// Why the most recent attempt failed; `None` once an attempt succeeds.
    pub last_error: Option<String>,
    /// Objects applied for this app that may still exist in the cluster.
    pub inventory: Inventory,
    /// The objects of the last complete apply: what the app consists of now.
    pub objects: Inventory,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(state_dir: &Path) -> Self {
        StateStore {
            dir: state_dir.join("apps"),
        }
    }

    /// App names are validated as DNS names by the config, so they are safe file names.
    fn path(&self, app: &str) -> PathBuf {
        self.dir.join(format!("{app}.json"))
    }

    /// The app's state; the default state if the app has never been synced. An unreadable
    /// file is quarantined and reported, and the caller continues from a blank state.
    pub fn load(&self, app: &str) -> Result<AppState, StateError> {
        let path = self.path(app);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(AppState::default()),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        match serde_json::from_str::<AppState>(&text) {
            Ok(state) => Ok(state),
            Err(e) => {
                let quarantined = path.with_extension(format!("json.corrupt-{}", unix_now()));
                std::fs::rename(&path, &quarantined).map_err(|source| StateError::Io {
                    path: path.clone(),
                    source,
                })?;
                Err(StateError::Corrupt {
                    path,
                    message: e.to_string(),
                    quarantined,
                })
            }
        }
    }

    pub fn save(&self, app: &str, state: &AppState) -> Result<(), StateError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let path = self.path(app);
        let mut state = state.clone();
        state.format = FORMAT_VERSION;
        let mut text = serde_json::to_vec_pretty(&state).map_err(|e| StateError::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        text.push(b'\n');
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(io(&self.dir))?;
        tmp.write_all(&text).map_err(io(tmp.path()))?;
        tmp.as_file().sync_all().map_err(io(tmp.path()))?;
        tmp.persist(&path).map_err(|e| StateError::Io {
            path: path.clone(),
            source: e.error,
        })?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::ObjectRef;

    #[test]
    fn missing_state_is_blank() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path());
        assert_eq!(store.load("web").unwrap(), AppState::default());
    }

    #[test]
    fn save_then_load_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path());
        let mut state = AppState {
            last_applied_revision: Some("abc".into()),
            ..Default::default()
        };
        state.inventory.insert(ObjectRef {
            group: "apps".into(),
            version: "v1".into(),
            kind: "Deployment".into(),
            namespace: Some("ns".into()),
            name: "web".into(),
        });
        store.save("web", &state).unwrap();
        let loaded = store.load("web").unwrap();
        assert_eq!(loaded.last_applied_revision.as_deref(), Some("abc"));
        assert_eq!(loaded.inventory, state.inventory);
        assert_eq!(loaded.format, FORMAT_VERSION);
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path().join("apps"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["web.json"]);
    }

    #[test]
    fn corrupt_state_is_quarantined_not_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path());
        std::fs::create_dir_all(tmp.path().join("apps")).unwrap();
        std::fs::write(tmp.path().join("apps/web.json"), "{ not json").unwrap();
        let err = store.load("web").unwrap_err();
        let StateError::Corrupt { quarantined, .. } = &err else {
            panic!("expected Corrupt, got {err:?}");
        };
        assert_eq!(std::fs::read_to_string(quarantined).unwrap(), "{ not json");
        assert!(err.to_string().contains("apps/web.json"));
        assert_eq!(store.load("web").unwrap(), AppState::default());
    }
}
