//! Per-app state persisted under `state_dir/apps/<app>.json`: the last applied revision, the
//! inventory of applied objects and the last error; and the app's last-known-good renders
//! (`<app>.applied.json`, `<app>.healthy.json`), each with a checksum.
//!
//! Writes are atomic (temporary file, fsync, rename, fsync of the directory), so a power cut
//! leaves either the old or the new state. A file that cannot be read is never overwritten:
//! it is moved aside so a human can look at it.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::apply::Inventory;

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub(crate) enum StateError {
    #[error("cannot access state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state directory {} is in use by another edgesync process (the running agent, or another `edgesync sync`); a manual sync cannot run beside the agent: wake the agent instead (its webhook, an MQTT message, or `systemctl reload edgesync`)", .path.display())]
    Locked { path: PathBuf },
    #[error("state file {path} is unreadable ({message}); moved aside to {quarantined}")]
    Corrupt {
        path: PathBuf,
        message: String,
        quarantined: PathBuf,
    },
}

impl StateError {
    pub(crate) fn metric_label(&self) -> crate::metrics::ErrorKind {
        use crate::metrics::ErrorKind;
        match self {
            StateError::Locked { .. } => ErrorKind::StateLocked,
            StateError::Io { .. } => ErrorKind::StateIo,
            StateError::Corrupt { .. } => ErrorKind::StateCorrupt,
        }
    }
}

/// One process per state directory: the agent, or a one-shot sync, holds this for as long
/// as it runs (an advisory lock on `state_dir/lock`, released when the process ends, even by
/// `kill -9`). Two processes writing one app's state and objects would undo each other.
#[derive(Debug)]
pub(crate) struct StateLock {
    _file: std::fs::File,
}

impl StateLock {
    pub(crate) fn acquire(state_dir: &Path) -> Result<StateLock, StateError> {
        let path = state_dir.join("lock");
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(StateLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(StateError::Locked {
                path: state_dir.to_path_buf(),
            }),
            Err(std::fs::TryLockError::Error(source)) => Err(io(source)),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct AppState {
    pub(crate) format: u32,
    /// Commit SHA whose render was applied completely.
    pub(crate) last_applied_revision: Option<String>,
    /// Unix seconds of that apply.
    pub(crate) last_applied_at: Option<u64>,
    /// Commit SHA of the most recent attempt, successful or not.
    pub(crate) last_attempted_revision: Option<String>,
    pub(crate) last_attempt_at: Option<u64>,
    /// Why the most recent attempt failed; `None` once an attempt succeeds.
    pub(crate) last_error: Option<String>,
    /// Objects applied for this app that may still exist in the cluster.
    pub(crate) inventory: Inventory,
    /// The objects of the last complete apply: what the app consists of now.
    pub(crate) objects: Inventory,
    /// A revision that went Degraded and was rolled back: not synced again until a newer
    /// revision arrives (or a manual sync asks for it).
    pub(crate) bad_revision: Option<String>,
    /// The app's `delete_on_removal` at its last sync: what to do once it leaves the node.
    pub(crate) delete_on_removal: bool,
}

pub(crate) use crate::model::unix_now;

/// Which persisted render: the last one applied completely, or the last one that was also
/// Healthy (what a rollback returns to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RenderKind {
    Applied,
    Healthy,
}

impl RenderKind {
    fn suffix(self) -> &'static str {
        match self {
            RenderKind::Applied => "applied",
            RenderKind::Healthy => "healthy",
        }
    }
}

/// A render as it was applied: enough to apply it again without Git (self-heal, rollback,
/// offline restarts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RenderRecord {
    pub(crate) revision: String,
    /// Unix seconds when it was saved.
    pub(crate) saved_at: u64,
    pub(crate) plan: crate::apply::Plan,
}

#[derive(Debug, Serialize, Deserialize)]
struct RenderHeader {
    format: u32,
    /// SHA-256 of the record's bytes, which follow the header line.
    sha256: String,
}

#[derive(Debug, Clone)]
pub(crate) struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub(crate) fn new(state_dir: &Path) -> Self {
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
    pub(crate) fn load(&self, app: &str) -> Result<AppState, StateError> {
        let path = self.path(app);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(AppState::default()),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        match serde_json::from_str::<AppState>(&text) {
            Ok(state) => Ok(state),
            Err(e) => Err(self.quarantine(path, e.to_string())?),
        }
    }

    pub(crate) fn save(&self, app: &str, state: &AppState) -> Result<(), StateError> {
        let path = self.path(app);
        let mut state = state.clone();
        state.format = FORMAT_VERSION;
        let mut text = serde_json::to_vec_pretty(&state).map_err(|e| StateError::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        text.push(b'\n');
        self.write_atomically(&path, &text)
    }

    /// Writes `bytes` to `path` through a synced temporary file and a rename, then syncs the
    /// directory: a power cut leaves the old file or the new one.
    fn write_atomically(&self, path: &Path, bytes: &[u8]) -> Result<(), StateError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { path, source }
        };
        let dir = path.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
        tmp.write_all(bytes).map_err(io(tmp.path()))?;
        tmp.as_file().sync_all().map_err(io(tmp.path()))?;
        tmp.persist(path).map_err(|e| StateError::Io {
            path: path.to_path_buf(),
            source: e.error,
        })?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        Ok(())
    }

    /// Where `app`'s rollout gate is kept: beside the apps' states, not among them.
    fn gate_path(&self, app: &str) -> PathBuf {
        self.dir.with_file_name("gates").join(format!("{app}.json"))
    }

    /// The rollout gate last taken for `app`, as the hub sent it (the caller verifies it
    /// again: the trusted keys may have changed since).
    pub(crate) fn load_gate(&self, app: &str) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.gate_path(app);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Keeps `app`'s newest rollout gate across restarts: a node that comes back while the
    /// broker is away still holds where the hub said.
    pub(crate) fn save_gate(&self, app: &str, gate: &[u8]) -> Result<(), StateError> {
        self.write_atomically(&self.gate_path(app), gate)
    }

    /// Apps with a state file.
    pub(crate) fn apps(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut apps: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let app = name.strip_suffix(".json")?;
                // Render files carry a header line, so they never parse as a state.
                let text = std::fs::read_to_string(e.path()).ok()?;
                serde_json::from_str::<AppState>(&text).ok()?;
                Some(app.to_string())
            })
            .collect();
        apps.sort();
        apps
    }

    /// Moves the app's files (state and renders) to `removed/`, named with the time, so a
    /// departed app stops being an app without anything being lost.
    pub(crate) fn archive(&self, app: &str) -> Result<(), StateError> {
        let dir = self.dir.join("removed");
        std::fs::create_dir_all(&dir).map_err(|source| StateError::Io {
            path: dir.clone(),
            source,
        })?;
        let now = unix_now();
        for path in [
            self.path(app),
            self.render_path(app, RenderKind::Applied),
            self.render_path(app, RenderKind::Healthy),
        ] {
            let Some(name) = path.file_name() else {
                continue;
            };
            let target = dir.join(format!("{now}-{}", name.to_string_lossy()));
            match std::fs::rename(&path, &target) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(StateError::Io { path, source }),
            }
        }
        Ok(())
    }

    fn render_path(&self, app: &str, kind: RenderKind) -> PathBuf {
        self.dir.join(format!("{app}.{}.json", kind.suffix()))
    }

    /// Persists a render: a header line with the checksum, then the record.
    pub(crate) fn save_render(
        &self,
        app: &str,
        kind: RenderKind,
        record: &RenderRecord,
    ) -> Result<(), StateError> {
        let path = self.render_path(app, kind);
        let body = serde_json::to_vec(record).map_err(|e| StateError::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        let header = RenderHeader {
            format: FORMAT_VERSION,
            sha256: hex::encode(Sha256::digest(&body)),
        };
        let mut bytes = serde_json::to_vec(&header).map_err(|e| StateError::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        bytes.push(b'\n');
        bytes.extend_from_slice(&body);
        bytes.push(b'\n');
        self.write_atomically(&path, &bytes)
    }

    /// The persisted render, `None` if there is none. A file whose checksum or format does not
    /// hold is moved aside and reported; it is never used.
    pub(crate) fn load_render(
        &self,
        app: &str,
        kind: RenderKind,
    ) -> Result<Option<RenderRecord>, StateError> {
        let path = self.render_path(app, kind);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let checked = (|| {
            let newline = bytes
                .iter()
                .position(|b| *b == b'\n')
                .ok_or("no header line")?;
            let header: RenderHeader = serde_json::from_slice(&bytes[..newline])
                .map_err(|e| format!("bad header: {e}"))?;
            if header.format != FORMAT_VERSION {
                return Err(format!("unknown format {}", header.format));
            }
            let body = bytes[newline + 1..]
                .strip_suffix(b"\n")
                .unwrap_or(&bytes[newline + 1..]);
            if hex::encode(Sha256::digest(body)) != header.sha256 {
                return Err("checksum mismatch".to_string());
            }
            serde_json::from_slice::<RenderRecord>(body).map_err(|e| format!("bad record: {e}"))
        })();
        match checked {
            Ok(record) => Ok(Some(record)),
            Err(message) => Err(self.quarantine(path, message)?),
        }
    }

    /// Moves an unreadable file aside, so it is neither used nor overwritten unseen.
    fn quarantine(&self, path: PathBuf, message: String) -> Result<StateError, StateError> {
        let quarantined = path.with_extension(format!("json.corrupt-{}", unix_now()));
        std::fs::rename(&path, &quarantined).map_err(|source| StateError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(StateError::Corrupt {
            path,
            message,
            quarantined,
        })
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

    fn record(revision: &str) -> RenderRecord {
        RenderRecord {
            revision: revision.into(),
            saved_at: 1,
            plan: crate::apply::Plan {
                app: "web".into(),
                default_namespace: Some("ns".into()),
                objects: vec![crate::render::Object {
                    value: serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}})
                        .as_object()
                        .unwrap()
                        .clone(),
                    origin: "a.yaml#0".into(),
                }],
                waves: vec![0],
                ignore_differences: Vec::new(),
                out_of_sync_only: false,
            hooks: Vec::new(),
            skipped: Vec::new(),
            warnings: Vec::new(),
            },
        }
    }

    #[test]
    fn renders_round_trip_and_a_damaged_one_is_set_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path());
        assert_eq!(store.load_render("web", RenderKind::Applied).unwrap(), None);
        store
            .save_render("web", RenderKind::Applied, &record("abc"))
            .unwrap();
        store
            .save_render("web", RenderKind::Healthy, &record("old"))
            .unwrap();
        assert_eq!(
            store.load_render("web", RenderKind::Applied).unwrap(),
            Some(record("abc"))
        );
        // One flipped byte in the record: the checksum catches it.
        let path = tmp.path().join("apps/web.applied.json");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("a.yaml#0", "b.yaml#0")).unwrap();
        let err = store.load_render("web", RenderKind::Applied).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        assert_eq!(store.load_render("web", RenderKind::Applied).unwrap(), None);
        assert_eq!(
            store
                .load_render("web", RenderKind::Healthy)
                .unwrap()
                .unwrap()
                .revision,
            "old"
        );
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
