//! The running node, assembled by the daemon: the config file as loaded (schema and
//! validation only, [`crate::config`]) together with what the later stages make of it — the
//! keys `[signatures]` names, loaded by [`crate::signature`], and the AppProjects the fleet
//! repository defines, read by [`crate::policy`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::config::sync_policy::SyncWindow;
use crate::config::{AppConfig, Config, ConfigError, Problem};
use crate::policy::{Project, WindowSpecError};
use crate::signature::Keyring;

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) config: Config,
    /// The keys trusted to sign revisions (`[signatures]`), loaded.
    pub(crate) keyring: Arc<Keyring>,
    /// AppProjects from the fleet repository, by name (empty until the fleet is read).
    pub(crate) projects: BTreeMap<String, Project>,
    /// What was wrong when the fleet was read: Applications left out and why, an unreachable
    /// repository. The status shows them.
    pub(crate) fleet_problems: Vec<String>,
}

impl Node {
    /// Reads the config file and the keys it names.
    pub(crate) fn load(path: &Path) -> Result<Node, ConfigError> {
        Node::assemble(Config::load(path)?)
    }

    /// Loads the keys `config` names. A key file without a usable key is a problem of the
    /// config, named by the `[signatures]` table's line, as any other.
    pub(crate) fn assemble(config: Config) -> Result<Node, ConfigError> {
        let keys = &config.signatures;
        let keyring =
            Keyring::load(&keys.gpg_keys, &keys.ssh_keys).map_err(|e| ConfigError::Invalid {
                path: config.path.clone(),
                problems: vec![Problem {
                    line: config.signatures_line,
                    key: "signatures".into(),
                    message: e.to_string(),
                }],
            })?;
        Ok(Node {
            config,
            keyring: Arc::new(keyring),
            projects: BTreeMap::new(),
            fleet_problems: Vec::new(),
        })
    }
}

/// The sync windows that hold `app`: its own and those of its AppProject in `projects`.
pub(crate) fn sync_windows(
    projects: &BTreeMap<String, Project>,
    app: &AppConfig,
) -> Vec<Result<SyncWindow, WindowSpecError>> {
    let mut windows: Vec<_> = app.sync_windows.iter().cloned().map(Ok).collect();
    if let Some(project) = app.project.as_deref().and_then(|p| projects.get(p)) {
        windows.extend(project.sync_windows(&app.name, app.namespace.as_deref()));
    }
    windows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assemble(text: &str) -> Result<Node, ConfigError> {
        Node::assemble(Config::parse(
            Path::new("/tmp/edgesync-test/config.toml"),
            text,
        )?)
    }

    #[test]
    fn signature_keys_are_loaded_and_their_problems_named() {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/signatures");
        let node = assemble(&format!(
            "[fleet]\nrepo = \"https://git.example.com/fleet.git\"\n\n[signatures]\ngpg_keys = [\"{fixtures}/alice.asc\"]\nssh_keys = [\"{fixtures}/deploy.pub\"]\nfleet = true\n"
        ))
        .unwrap();
        assert_eq!(node.keyring.key_ids().len(), 2);
        assert!(assemble("").unwrap().keyring.is_empty());

        // A file that exists but holds no usable key: named, with the table's line.
        let Err(ConfigError::Invalid { problems: p, .. }) = assemble(&format!(
            "\n\n[signatures]\ngpg_keys = [\"{fixtures}/deploy.pub\"]\n"
        )) else {
            panic!("a file without an OpenPGP key was accepted");
        };
        assert_eq!((p[0].key.as_str(), p[0].line), ("signatures", 3));
        assert!(p[0].message.contains("deploy.pub"), "{}", p[0].message);
    }
}
