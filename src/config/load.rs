//! Reading the config file: TOML into the schema, validated, paths resolved.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::app::for_this_node;
use super::*;

/// The file as written, with spans kept where semantic checks need to point at a line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) state_dir: Option<PathBuf>,
    pub(super) max_concurrent_syncs: Option<Spanned<usize>>,
    #[serde(default)]
    pub(super) node: NodeConfig,
    pub(super) kubernetes: Option<Spanned<KubernetesConfig>>,
    pub(super) mqtt: Option<Spanned<MqttConfig>>,
    pub(super) webhook: Option<Spanned<WebhookConfig>>,
    #[serde(default)]
    pub(super) http: HttpConfig,
    #[serde(default)]
    pub(super) log: LogConfig,
    pub(super) fleet: Option<Spanned<FleetConfig>>,
    pub(super) signatures: Option<Spanned<SignaturesConfig>>,
    pub(super) gates: Option<Spanned<GatesConfig>>,
    pub(super) variables: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    pub(super) helm: HelmConfig,
    #[serde(default)]
    pub(super) repositories: Vec<Spanned<RepositoryConfig>>,
    #[serde(default)]
    pub(super) apps: Vec<Spanned<AppConfig>>,
    #[serde(default)]
    pub(super) plugins: Vec<Spanned<options::PluginConfig>>,
}

/// The variable systemd sets for a unit with `LoadCredential=`.
pub(crate) const CREDENTIALS_VAR: &str = "CREDENTIALS_DIRECTORY";

/// The credential ID the packaged unit loads `/etc/edgesync/credentials` under
/// (`LoadCredential=edgesync:/etc/edgesync/credentials`). systemd names each file of a
/// directory credential `<ID>_<file>`, so `kubeconfig` there is `edgesync_kubeconfig` in
/// `$CREDENTIALS_DIRECTORY`.
pub(crate) const CREDENTIAL_ID: &str = "edgesync";

/// Resolves a file path from the config: relative paths are relative to the config file's
/// directory, and a leading `${CREDENTIALS_DIRECTORY}` is the directory where systemd put the
/// unit's credentials (`LoadCredential=`), so secrets can stay readable by root only.
/// `${CREDENTIALS_DIRECTORY}/NAME` is the credential `NAME` when there is one, and else the
/// file `NAME` of the packaged unit's directory credential ([`CREDENTIAL_ID`]`_NAME`), so one
/// config works under the unit and by hand with `CREDENTIALS_DIRECTORY=/etc/edgesync/credentials`.
pub(crate) fn resolve_file(base: &Path, path: &Path) -> Result<PathBuf, Invalid> {
    resolve_file_in(base, path, std::env::var_os(CREDENTIALS_VAR))
}

pub(super) fn resolve_file_in(
    base: &Path,
    path: &Path,
    credentials: Option<std::ffi::OsString>,
) -> Result<PathBuf, Invalid> {
    let text = path.to_string_lossy();
    for prefix in ["${CREDENTIALS_DIRECTORY}", "$CREDENTIALS_DIRECTORY"] {
        if let Some(rest) = text.strip_prefix(prefix) {
            let dir =
                credentials.ok_or_else(|| Invalid::NoCredentialsDirectory(text.to_string()))?;
            let dir = PathBuf::from(dir);
            let name = rest.trim_start_matches('/');
            let plain = dir.join(name);
            let loaded = dir.join(format!("{CREDENTIAL_ID}_{}", name.replace('/', "_")));
            if !plain.exists() && loaded.exists() {
                return Ok(loaded);
            }
            return Ok(plain);
        }
    }
    Ok(base.join(path))
}

impl Config {
    pub(crate) fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    pub(crate) fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let problems = validate::validate(&raw, text, base);
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            });
        }
        let node = this_node(raw.node);
        // Validation has checked every file path, so `resolve_file` cannot fail here.
        let resolve = |p: &PathBuf| resolve_file(base, p).unwrap_or_else(|_| base.join(p));
        let repositories = raw
            .repositories
            .into_iter()
            .map(|r| resolve_repository(r.into_inner(), &resolve))
            .collect();
        let mqtt = raw
            .mqtt
            .map(|m| resolve_mqtt(m.into_inner(), &node.name, &resolve));
        let webhook = raw
            .webhook
            .map(|w| resolve_webhook(w.into_inner(), &resolve));
        let signatures_line = raw
            .signatures
            .as_ref()
            .map_or(0, |s| validate::line_at(text, s.span().start));
        let signatures = raw.signatures.map(Spanned::into_inner).unwrap_or_default();
        let files = |list: &[PathBuf]| list.iter().map(resolve).collect::<Vec<_>>();
        let signatures = SignaturesConfig {
            gpg_keys: files(&signatures.gpg_keys),
            ssh_keys: files(&signatures.ssh_keys),
            fleet: signatures.fleet,
        };
        let (apps, skipped) = for_this_node(
            raw.apps.into_iter().map(Spanned::into_inner).collect(),
            &node.labels,
        );
        Ok(Config {
            path: path.to_path_buf(),
            state_dir: raw
                .state_dir
                .map(|p| base.join(p))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            max_concurrent_syncs: raw
                .max_concurrent_syncs
                .map(Spanned::into_inner)
                .unwrap_or(DEFAULT_MAX_CONCURRENT_SYNCS),
            node,
            kubernetes: KubernetesConfig {
                kubeconfig: raw
                    .kubernetes
                    .as_ref()
                    .and_then(|k| k.get_ref().kubeconfig.as_ref())
                    .map(resolve),
            },
            mqtt,
            webhook,
            http: raw.http,
            log: raw.log,
            repositories,
            variables: raw.variables.map(Spanned::into_inner).unwrap_or_default(),
            helm: HelmConfig {
                // A bare name (`helm`) is looked up on PATH; a path is relative to the config.
                binary: raw.helm.binary.as_ref().map(|b| {
                    if b.components().count() > 1 {
                        resolve(b)
                    } else {
                        b.clone()
                    }
                }),
            },
            fleet: raw.fleet.map(Spanned::into_inner),
            plugins: raw.plugins.into_iter().map(Spanned::into_inner).collect(),
            signatures,
            signatures_line,
            gates: raw.gates.map(Spanned::into_inner),
            apps,
            skipped,
        })
    }
}

/// The node: its name (the host name when unset) and its labels with the node's facts.
fn this_node(mut node: NodeConfig) -> NodeConfig {
    if node.name.is_empty() {
        node.name = hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "edgesync".to_string());
    }
    node.labels = crate::model::node::node_labels(&node.name, &node.labels);
    node
}

type Resolve<'a> = dyn Fn(&PathBuf) -> PathBuf + 'a;

fn resolve_repository(mut r: RepositoryConfig, resolve: &Resolve) -> RepositoryConfig {
    r.token_file = r.token_file.as_ref().map(resolve);
    r.password_file = r.password_file.as_ref().map(resolve);
    r.ssh_key_file = r.ssh_key_file.as_ref().map(resolve);
    r.known_hosts_file = r.known_hosts_file.as_ref().map(resolve);
    r
}

/// The `[mqtt]` files resolved, and `{node}` in the client ID replaced.
fn resolve_mqtt(mut m: MqttConfig, node: &str, resolve: &Resolve) -> MqttConfig {
    m.password_file = m.password_file.as_ref().map(resolve);
    m.ca_file = m.ca_file.as_ref().map(resolve);
    m.cert_file = m.cert_file.as_ref().map(resolve);
    m.key_file = m.key_file.as_ref().map(resolve);
    m.client_id = m.client_id.replace("{node}", node);
    m
}

fn resolve_webhook(mut w: WebhookConfig, resolve: &Resolve) -> WebhookConfig {
    for file in [
        &mut w.github_secret_file,
        &mut w.gitlab_token_file,
        &mut w.gitea_secret_file,
        &mut w.bitbucket_secret_file,
        &mut w.generic_secret_file,
    ] {
        *file = file.as_ref().map(resolve);
    }
    w
}
