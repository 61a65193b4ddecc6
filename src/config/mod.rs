//! Loading and validation of `/etc/edgesync/config.toml`.
//!
//! Everything downstream takes a validated [`Config`]: names are safe to use as file names,
//! referenced files exist, and every app points at a known repository.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

mod app;
mod load;
pub(crate) mod options;
pub(crate) mod sync_policy;
mod validate;
pub(crate) use app::{AppConfig, AppSource, SkippedApp, Substitute};
pub(crate) use load::resolve_file;
#[cfg(test)]
use validate::check_repo_url;
pub(crate) use validate::{check_dns_label, is_scp_like, Invalid};

pub(crate) const DEFAULT_CONFIG_PATH: &str = "/etc/edgesync/config.toml";
pub(crate) const DEFAULT_STATE_DIR: &str = "/var/lib/edgesync";
pub(crate) const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(180);
pub(crate) const K3S_KUBECONFIG: &str = "/etc/rancher/k3s/k3s.yaml";

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {}", .source.to_string().trim_end())]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{path}: {}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    pub(crate) fn metric_label(&self) -> crate::metrics::ErrorKind {
        use crate::metrics::ErrorKind;
        match self {
            ConfigError::Read { .. } => ErrorKind::ConfigRead,
            ConfigError::Parse { .. } => ErrorKind::ConfigParse,
            ConfigError::Invalid { .. } => ErrorKind::ConfigInvalid,
        }
    }
}

/// One semantic problem in an otherwise well-formed file, located by key and line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub(crate) line: usize,
    pub(crate) key: String,
    pub(crate) message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.key, self.message)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) path: PathBuf,
    pub(crate) state_dir: PathBuf,
    pub(crate) max_concurrent_syncs: usize,
    pub(crate) node: NodeConfig,
    pub(crate) kubernetes: KubernetesConfig,
    pub(crate) mqtt: Option<MqttConfig>,
    pub(crate) webhook: Option<WebhookConfig>,
    pub(crate) http: HttpConfig,
    pub(crate) log: LogConfig,
    pub(crate) repositories: Vec<RepositoryConfig>,
    /// `[variables]`: values for `${VAR}` substitution in apps that turn it on.
    pub(crate) variables: BTreeMap<String, String>,
    /// `[helm]`: the helm binary charts are rendered with.
    pub(crate) helm: HelmConfig,
    /// Where Argo CD Applications for this node come from, if anywhere.
    pub(crate) fleet: Option<FleetConfig>,
    /// `[[plugins]]`: the config management plugins apps may name.
    pub(crate) plugins: Vec<options::PluginConfig>,
    /// `[signatures]`, its key files resolved against the config's directory; the daemon
    /// loads the keys.
    pub(crate) signatures: SignaturesConfig,
    /// The line of the `[signatures]` table, for problems with its key files.
    pub(crate) signatures_line: usize,
    /// `[gates]`: the fleet hub's rollout gates, for apps with `gated`.
    pub(crate) gates: Option<GatesConfig>,
    /// The apps this node runs.
    pub(crate) apps: Vec<AppConfig>,
    /// Apps whose `node_selector` does not match this node, and why.
    pub(crate) skipped: Vec<SkippedApp>,
}

/// A Git directory of Argo CD Application (and AppProject) manifests that adds apps.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FleetConfig {
    pub(crate) repo: String,
    #[serde(default = "default_revision")]
    pub(crate) revision: String,
    #[serde(default = "default_path")]
    pub(crate) path: String,
    /// The `kustomize_fallback` of every fleet app (an Application cannot name a command the
    /// node runs): builds kustomizations the native engine refuses, within what each app's
    /// AppProject allows it to fetch.
    #[serde(default)]
    pub(crate) kustomize_fallback: Option<String>,
}

/// Logging defaults; `--log-level`, `--log-format` and `RUST_LOG` override them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogConfig {
    /// A tracing filter: `info`, `debug`, `edgesync=debug,kube=warn`, ...
    pub(crate) level: Option<String>,
    pub(crate) format: Option<LogFormat>,
}

/// The local HTTP listener: metrics, health and the status API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpConfig {
    #[serde(default = "default_true")]
    pub(crate) enabled: bool,
    #[serde(default = "default_status_listen")]
    pub(crate) listen: std::net::SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: default_status_listen(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_status_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 9421))
}

pub(crate) const DEFAULT_MAX_CONCURRENT_SYNCS: usize = 4;
pub(crate) const DEFAULT_MQTT_TOPICS: [&str; 2] =
    ["edgesync/changes", "edgesync/nodes/{node}/sync"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MqttConfig {
    /// `mqtt://host[:1883]` or `mqtts://host[:8883]`.
    pub(crate) url: String,
    #[serde(default = "default_client_id")]
    pub(crate) client_id: String,
    pub(crate) username: Option<String>,
    pub(crate) password_file: Option<PathBuf>,
    /// Send the password over plain `mqtt://`, where anyone on the path can read it. Off:
    /// a password with `mqtt://` is refused at load.
    #[serde(default)]
    pub(crate) insecure_password: bool,
    /// CA bundle for `mqtts://`; the system roots when unset.
    pub(crate) ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub(crate) cert_file: Option<PathBuf>,
    pub(crate) key_file: Option<PathBuf>,
    /// Topic filters; `{node}` is replaced by the node name, and messages on such a topic
    /// are node-directed (no fetch jitter).
    #[serde(default = "default_topics")]
    pub(crate) topics: Vec<String>,
    #[serde(default = "default_keep_alive", with = "humantime_serde_compat")]
    pub(crate) keep_alive: Duration,
    /// Where status goes: `<prefix>/status`, `/apps/<app>`, `/events`, `/online`.
    #[serde(default = "default_status_prefix")]
    pub(crate) status_prefix: String,
    /// Store and forward: messages kept on disk while the broker is away, at most.
    #[serde(default = "default_queue_max_messages")]
    pub(crate) queue_max_messages: usize,
    #[serde(default = "default_queue_max_bytes")]
    pub(crate) queue_max_bytes: usize,
}

fn default_status_prefix() -> String {
    "edgesync/nodes/{node}".to_string()
}
fn default_queue_max_messages() -> usize {
    10_000
}
fn default_queue_max_bytes() -> usize {
    16 * 1024 * 1024
}

fn default_client_id() -> String {
    "edgesync-{node}".to_string()
}
fn default_topics() -> Vec<String> {
    DEFAULT_MQTT_TOPICS.iter().map(|t| t.to_string()).collect()
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WebhookConfig {
    #[serde(default = "default_listen")]
    pub(crate) listen: std::net::SocketAddr,
    pub(crate) github_secret_file: Option<PathBuf>,
    pub(crate) gitlab_token_file: Option<PathBuf>,
    pub(crate) gitea_secret_file: Option<PathBuf>,
    pub(crate) bitbucket_secret_file: Option<PathBuf>,
    pub(crate) generic_secret_file: Option<PathBuf>,
    /// Accept unsigned requests on endpoints without a secret. For lab setups only.
    #[serde(default)]
    pub(crate) insecure_no_secret: bool,
    #[serde(default = "default_max_body_bytes")]
    pub(crate) max_body_bytes: usize,
    /// Sustained requests per second accepted, across all endpoints.
    #[serde(default = "default_rate_limit")]
    pub(crate) rate_limit: f64,
    /// Requests accepted at once before `rate_limit` applies.
    #[serde(default = "default_rate_burst")]
    pub(crate) rate_burst: u32,
    /// How long delivery IDs are remembered to reject replays.
    #[serde(default = "default_replay_window", with = "humantime_serde_compat")]
    pub(crate) replay_window: Duration,
    /// Open connections at most, in all; more are closed at once.
    #[serde(default = "default_max_connections")]
    pub(crate) max_connections: usize,
    /// Open connections at most from one client address.
    #[serde(default = "default_max_connections_per_client")]
    pub(crate) max_connections_per_client: usize,
}

fn default_max_connections() -> usize {
    64
}
fn default_max_connections_per_client() -> usize {
    8
}

fn default_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([0, 0, 0, 0], 9420))
}
fn default_max_body_bytes() -> usize {
    1024 * 1024
}
fn default_rate_limit() -> f64 {
    10.0
}
fn default_rate_burst() -> u32 {
    20
}
fn default_replay_window() -> Duration {
    Duration::from_secs(3600)
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NodeConfig {
    /// Defaults to the hostname.
    #[serde(default)]
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KubernetesConfig {
    pub(crate) kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    pub(crate) url: String,
    pub(crate) token_file: Option<PathBuf>,
    pub(crate) username: Option<String>,
    pub(crate) password_file: Option<PathBuf>,
    pub(crate) ssh_key_file: Option<PathBuf>,
    pub(crate) known_hosts_file: Option<PathBuf>,
    #[serde(default = "default_poll_interval", with = "humantime_serde_compat")]
    pub(crate) poll_interval: Duration,
    /// Random delay, up to this, before a fetch caused by a broadcast event or a poll, so a
    /// fleet does not hit the Git server at once.
    #[serde(default, with = "humantime_serde_compat::or_zero")]
    pub(crate) fetch_jitter: Duration,
    /// For an `oci://` registry: speak plain HTTP instead of HTTPS (Helm's `--plain-http`).
    #[serde(default)]
    pub(crate) plain_http: bool,
}

impl RepositoryConfig {
    /// The entry of `repositories` for `url`, or anonymous defaults when it has none.
    pub fn of(repositories: &[RepositoryConfig], url: &str) -> Self {
        repositories
            .iter()
            .find(|r| r.url == url)
            .cloned()
            .unwrap_or_else(|| RepositoryConfig::anonymous(url))
    }

    /// A repository an app names without a `[[repositories]]` entry: public, default polling.
    pub(crate) fn anonymous(url: &str) -> Self {
        RepositoryConfig {
            url: url.to_string(),
            token_file: None,
            username: None,
            password_file: None,
            ssh_key_file: None,
            known_hosts_file: None,
            poll_interval: DEFAULT_POLL_INTERVAL,
            fetch_jitter: Duration::ZERO,
            plain_http: false,
        }
    }
}

/// `[signatures]`: the keys this node trusts to sign Git revisions. AppProjects with
/// `signatureKeys` pick among them; with `fleet`, the fleet repository must be signed too.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignaturesConfig {
    /// OpenPGP public keys, armored (`gpg --armor --export`) or binary, any number per file.
    #[serde(default)]
    pub(crate) gpg_keys: Vec<PathBuf>,
    /// OpenSSH public keys, one `authorized_keys` line each.
    #[serde(default)]
    pub(crate) ssh_keys: Vec<PathBuf>,
    /// Refuse a fleet revision that no trusted key signed.
    #[serde(default)]
    pub(crate) fleet: bool,
}

/// `[gates]`: the rollout gates of the fleet hub (`edgesync-hub`). The hub publishes one
/// retained, signed gate per app under `topic`; an app with `gated = true` runs no newer
/// revision than its gate allows this node's stage. Gates come over `[mqtt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GatesConfig {
    /// The hub's Ed25519 public keys, each an OpenSSH line (`ssh-ed25519 AAAA... hub`): a
    /// gate signed by any other key is refused.
    pub(crate) public_keys: Vec<String>,
    /// Where the hub publishes gates: `<topic>/<app>`.
    #[serde(default = "default_gates_topic")]
    pub(crate) topic: String,
}

fn default_gates_topic() -> String {
    "edgesync/gates".to_string()
}

/// One of `[gates] public_keys`: an OpenSSH Ed25519 public key line.
pub(crate) fn gate_key(line: &str) -> Result<ssh_key::PublicKey, String> {
    let key = ssh_key::PublicKey::from_openssh(line.trim())
        .map_err(|e| format!("not an OpenSSH public key line: {e}"))?;
    if key.algorithm() != ssh_key::Algorithm::Ed25519 {
        return Err(format!(
            "{} key: the hub signs gates with Ed25519 (ssh-ed25519)",
            key.algorithm()
        ));
    }
    Ok(key)
}

impl GatesConfig {
    /// The trusted keys (validated when the config was read: an unusable line is skipped).
    pub(crate) fn keys(&self) -> Vec<ssh_key::PublicKey> {
        self.public_keys
            .iter()
            .filter_map(|k| gate_key(k).ok())
            .collect()
    }

    /// The topic of `app`'s gate, and the filter for every app's.
    pub(crate) fn filter(&self) -> String {
        format!("{}/+", self.topic.trim_end_matches('/'))
    }
}

/// `[helm]`: how charts are rendered.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HelmConfig {
    /// The pinned helm binary; `helm` on PATH when unset.
    pub(crate) binary: Option<PathBuf>,
}

fn default_poll_interval() -> Duration {
    DEFAULT_POLL_INTERVAL
}
fn default_revision() -> String {
    "HEAD".to_string()
}
fn default_path() -> String {
    ".".to_string()
}

/// Durations written as humans do: `30s`, `3m`, `1h30m`.
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    fn parse<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::sync_policy::human::parse(&text).map_err(serde::de::Error::custom)
    }

    /// A duration greater than zero.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let parsed = parse(d)?;
        if parsed.is_zero() {
            return Err(serde::de::Error::custom(
                "duration must be greater than zero",
            ));
        }
        Ok(parsed)
    }

    /// A duration that may be zero (`"0s"`).
    pub(crate) mod or_zero {
        pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<std::time::Duration, D::Error> {
            super::parse(d)
        }
    }
}

/// How log lines are written (`[log] format`, `--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    /// Human-readable lines (or the journal under systemd).
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl Config {
    /// The variables `${VAR}` substitution uses for `app`: the node's own (`NODE_NAME`,
    /// `NODE_LABEL_<key>`), then `[variables]`, then the app's `variables`, later ones winning.
    pub(crate) fn substitution_variables(&self, app: &AppConfig) -> BTreeMap<String, String> {
        let mut vars = options::node_variables(&self.node.name, &self.node.labels);
        vars.extend(self.variables.clone());
        vars.extend(app.variables.clone());
        vars
    }
}

impl Config {
    /// The repository settings for `url`, or anonymous defaults when it has no entry.
    pub(crate) fn repository(&self, url: &str) -> RepositoryConfig {
        RepositoryConfig::of(&self.repositories, url)
    }

    /// Every repository the apps this node runs use, each once, configured or anonymous.
    pub(crate) fn repositories_in_use(&self) -> Vec<RepositoryConfig> {
        let mut seen = HashSet::new();
        self.apps
            .iter()
            .filter(|a| seen.insert(a.repo.clone()))
            .map(|a| self.repository(&a.repo))
            .collect()
    }

    /// Whether `url` is a Helm chart repository (or OCI registry) rather than a Git one.
    pub(crate) fn is_chart_repository(&self, url: &str) -> bool {
        crate::model::url::is_oci(url)
            || self.apps.iter().any(|a| {
                (a.repo == url && a.chart.is_some())
                    || a.sources.iter().any(|s| s.repo == url && s.chart.is_some())
            })
    }

    pub(crate) fn app(&self, name: &str) -> Option<&AppConfig> {
        self.apps.iter().find(|a| a.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::load::resolve_file_in;
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/tmp/edgesync-test/config.toml"), text)
    }

    #[test]
    fn node_names_cannot_carry_topic_syntax() {
        for bad in ["a/b", "plant+7", "x#", "two words"] {
            let err = parse(&format!("[node]\nname = \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("node.name") && err.contains("MQTT topics"),
                "{err}"
            );
        }
        // Host names with '_' are fine: the inventory ConfigMap name is sanitized.
        parse("[node]\nname = \"edge_box-7\"\n").unwrap();
    }

    #[test]
    fn fleet_apps_are_checked_targeted_and_get_the_fleets_fallback() {
        let mut cfg = parse(
            "[node]\nname = \"edge\"\nlabels = { site = \"plant-7\" }\n\n[fleet]\nrepo = \"https://git.example.com/fleet.git\"\nkustomize_fallback = \"kubectl kustomize\"\n\n[[apps]]\nname = \"local\"\nrepo = \"https://git.example.com/a.git\"\n",
        )
        .unwrap();
        let app = |name: &str, selector: Option<&str>| {
            let mut a = cfg.apps[0].clone();
            a.name = name.into();
            a.node_selector = selector.map(str::to_string);
            a
        };
        let (web, elsewhere, clash) = (
            app("web", None),
            app("far", Some("site=plant-9")),
            app("local", None),
        );
        let problems = cfg.add_fleet_apps(vec![web, elsewhere, clash]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("local"), "{problems:?}");
        let web = cfg.app("web").unwrap();
        assert_eq!(web.kustomize_fallback.as_deref(), Some("kubectl kustomize"));
        assert!(cfg.app("local").unwrap().kustomize_fallback.is_none());
        assert_eq!(cfg.skipped[0].app, "far");
        let empty = parse(
            "[fleet]\nrepo = \"https://git.example.com/fleet.git\"\nkustomize_fallback = \" \"\n",
        );
        assert!(empty
            .unwrap_err()
            .to_string()
            .contains("fleet.kustomize_fallback"));
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = parse(
            r#"
[[apps]]
name = "web"
repo = "https://git.example.com/fleet.git"
"#,
        )
        .unwrap();
        assert_eq!(cfg.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(cfg.apps[0].revision, "HEAD");
        assert_eq!(cfg.apps[0].path, ".");
        assert!(!cfg.node.name.is_empty());
        let repo = cfg.repository("https://git.example.com/fleet.git");
        assert_eq!(repo.poll_interval, DEFAULT_POLL_INTERVAL);
    }

    #[test]
    fn gates_name_their_problems() {
        let problems = |text: &str| match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems
                .into_iter()
                .map(|p| (p.key, p.message))
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f hub";
        let app =
            "[[apps]]\nname = \"web\"\nrepo = \"https://git.example.com/a.git\"\ngated = true\n";
        let ok = parse(&format!(
            "[mqtt]\nurl = \"mqtt://broker\"\n[gates]\npublic_keys = [\"{key}\"]\n{app}"
        ))
        .unwrap();
        let gates = ok.gates.as_ref().unwrap();
        assert_eq!(gates.keys().len(), 1);
        assert_eq!(gates.filter(), "edgesync/gates/+");
        assert!(ok.apps[0].gated);

        let p = problems(app);
        assert!(
            p.iter()
                .any(|(k, m)| k == "apps[0].gated" && m.contains("[gates]")),
            "{p:?}"
        );
        let p = problems(&format!("[gates]\npublic_keys = [\"{key}\"]\n"));
        assert!(
            p.iter().any(|(k, m)| k == "gates" && m.contains("[mqtt]")),
            "{p:?}"
        );
        let p = problems("[mqtt]\nurl = \"mqtt://b\"\n[gates]\npublic_keys = [\"ssh-rsa nonsense\"]\ntopic = \"a/#\"\n");
        assert!(p.iter().any(|(k, _)| k == "gates.public_keys[0]"), "{p:?}");
        assert!(p.iter().any(|(k, _)| k == "gates.topic"), "{p:?}");
        let p = problems("[mqtt]\nurl = \"mqtt://b\"\n[gates]\npublic_keys = []\n");
        assert!(p.iter().any(|(k, _)| k == "gates.public_keys"), "{p:?}");
    }

    #[test]
    fn signature_key_files_are_resolved_and_their_problems_named() {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/signatures");
        let cfg = parse(&format!(
            "[fleet]\nrepo = \"https://git.example.com/fleet.git\"\n\n[signatures]\ngpg_keys = [\"{fixtures}/alice.asc\"]\nssh_keys = [\"{fixtures}/deploy.pub\"]\nfleet = true\n"
        ))
        .unwrap();
        assert_eq!(cfg.signatures.gpg_keys.len(), 1);
        assert_eq!(cfg.signatures.ssh_keys.len(), 1);
        assert!(cfg.signatures.fleet);
        assert_eq!(cfg.signatures_line, 4);

        let problems = |text: &str| match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("{other:?}"),
        };
        let p = problems("\n[signatures]\nfleet = true\n");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.iter().all(|p| p.key == "signatures.fleet" && p.line == 2));
        let p = problems("[signatures]\nssh_keys = [\"/nonexistent/key.pub\"]\n");
        assert_eq!(p[0].key, "signatures.ssh_keys[0]");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse("state_dir = \"/x\"\n\n[node]\nnmae = \"edge\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("nmae"), "{err}");
    }

    #[test]
    fn wrong_type_names_line() {
        let err = parse("[[repositories]]\nurl = \"https://a/b.git\"\npoll_interval = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_duration_is_explained() {
        let err = parse("[[repositories]]\nurl = \"https://a/b.git\"\npoll_interval = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid duration"), "{err}");
    }

    #[test]
    fn duplicate_app_names_are_reported_with_line() {
        let text = r#"
[[apps]]
name = "web"
repo = "https://a/b.git"

[[apps]]
name = "web"
repo = "https://a/b.git"
"#;
        match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => {
                assert_eq!(problems.len(), 1);
                assert_eq!(problems[0].key, "apps[1].name");
                assert_eq!(problems[0].line, 6);
                assert!(problems[0].message.contains("duplicate"));
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn systemd_credentials_directory_is_expanded_and_required() {
        let base = Path::new("/etc/edgesync");
        let creds = Some(std::ffi::OsString::from(
            "/run/credentials/edgesync.service",
        ));
        assert_eq!(
            resolve_file_in(
                base,
                Path::new("${CREDENTIALS_DIRECTORY}/git-token"),
                creds.clone()
            ),
            Ok(PathBuf::from("/run/credentials/edgesync.service/git-token"))
        );
        assert_eq!(
            resolve_file_in(base, Path::new("$CREDENTIALS_DIRECTORY/kubeconfig"), creds),
            Ok(PathBuf::from(
                "/run/credentials/edgesync.service/kubeconfig"
            ))
        );
        assert_eq!(
            resolve_file_in(base, Path::new("token"), None),
            Ok(PathBuf::from("/etc/edgesync/token"))
        );
        let err = resolve_file_in(base, Path::new("${CREDENTIALS_DIRECTORY}/x"), None).unwrap_err();
        assert!(err.to_string().contains("LoadCredential="), "{err}");
    }

    #[test]
    fn a_file_of_the_packaged_directory_credential_is_found_by_its_own_name() {
        let dir = tempfile::tempdir().unwrap();
        let creds = Some(dir.path().as_os_str().to_owned());
        let resolve = |name: &str| {
            resolve_file_in(Path::new("/etc/edgesync"), Path::new(name), creds.clone()).unwrap()
        };
        // As systemd loads LoadCredential=edgesync:/etc/edgesync/credentials.
        std::fs::write(dir.path().join("edgesync_kubeconfig"), "k").unwrap();
        assert_eq!(
            resolve("${CREDENTIALS_DIRECTORY}/kubeconfig"),
            dir.path().join("edgesync_kubeconfig")
        );
        // A credential of that very name (by hand, or LoadCredential=kubeconfig:...) wins.
        std::fs::write(dir.path().join("kubeconfig"), "k").unwrap();
        assert_eq!(
            resolve("${CREDENTIALS_DIRECTORY}/kubeconfig"),
            dir.path().join("kubeconfig")
        );
        // Neither: the plain name, which the error then names.
        assert_eq!(
            resolve("${CREDENTIALS_DIRECTORY}/token"),
            dir.path().join("token")
        );
    }

    #[test]
    fn helm_binary_is_a_path_name_or_a_relative_path() {
        let c = parse("[helm]\nbinary = \"helm\"\n").unwrap();
        assert_eq!(c.helm.binary, Some(PathBuf::from("helm")));
        let c = parse("[helm]\nbinary = \"bin/helm\"\n").unwrap();
        assert_eq!(
            c.helm.binary,
            Some(PathBuf::from("/tmp/edgesync-test/bin/helm"))
        );
    }

    #[test]
    fn missing_kubeconfig_is_reported() {
        let err = parse("[kubernetes]\nkubeconfig = \"nope/kubeconfig\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("kubernetes.kubeconfig"), "{err}");
    }

    #[test]
    fn chart_apps_need_a_chart_repository_and_a_chart_name() {
        let ok = parse(
            "[[repositories]]\nurl = \"oci://registry.local/charts\"\nplain_http = true\n\n[[apps]]\nname = \"a\"\nrepo = \"oci://registry.local/charts\"\nchart = \"web\"\nrevision = \"^1.2\"\n\n[[apps]]\nname = \"b\"\nrepo = \"https://charts.example.com\"\nchart = \"web\"\n",
        )
        .unwrap();
        assert!(ok.is_chart_repository("oci://registry.local/charts"));
        assert!(ok.is_chart_repository("https://charts.example.com"));
        let err = parse("[[apps]]\nname = \"a\"\nrepo = \"oci://r/charts\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("apps[0].repo"), "{err}");
        let err = parse("[[apps]]\nname = \"a\"\nrepo = \"file:///srv/charts\"\nchart = \"web\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a chart repository"), "{err}");
        let err = parse("[[apps]]\nname = \"a\"\nrepo = \"https://c\"\nchart = \"../web\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("apps[0].chart"), "{err}");
    }

    #[test]
    fn missing_credential_file_is_reported() {
        let text = "[[repositories]]\nurl = \"https://a/b.git\"\ntoken_file = \"nope/token\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains("repositories[0].token_file"), "{err}");
        assert!(err.contains("does not exist"), "{err}");
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn an_mqtt_password_in_clear_needs_saying_so() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "secret").unwrap();
        let config = |url: &str, extra: &str| {
            let text = format!(
                "[mqtt]\nurl = \"{url}\"\nusername = \"edge\"\npassword_file = \"pw\"\n{extra}"
            );
            Config::parse(&dir.path().join("config.toml"), &text)
        };
        let err = config("mqtt://broker", "").unwrap_err().to_string();
        assert!(
            err.contains("mqtt.password_file") && err.contains("unencrypted"),
            "{err}"
        );
        assert!(!err.contains("secret"), "{err}");
        assert!(config("mqtt://broker", "insecure_password = true").is_ok());
        assert!(config("mqtts://broker", "").is_ok());
    }

    #[test]
    fn hostile_names_and_paths_are_refused() {
        let text = r#"
[[apps]]
name = "../../etc/passwd"
repo = "https://a/b.git"
path = "../outside"
namespace = "Not_A_Namespace"
"#;
        match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => {
                let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
                assert_eq!(keys, ["apps[0].name", "apps[0].path", "apps[0].namespace"]);
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn scp_like_urls_are_accepted() {
        assert!(is_scp_like("git@github.com:org/repo.git"));
        assert!(!is_scp_like("https://user@host/x"));
        assert!(check_repo_url("ftp://x").is_err());
    }

    #[test]
    fn apps_run_only_where_their_selector_matches() {
        let text = r#"
[node]
name = "edge-7"
labels = { site = "plant-7" }

[[apps]]
name = "everywhere"
repo = "https://a/b.git"

[[apps]]
name = "plant-7-only"
repo = "https://a/b.git"
node_selector = "site in (plant-7,plant-8)"

[[apps]]
name = "elsewhere"
repo = "https://a/b.git"
node_selector = "site=plant-9,kubernetes.io/hostname=edge-7"
"#;
        let cfg = parse(text).unwrap();
        let names: Vec<_> = cfg.apps.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["everywhere", "plant-7-only"]);
        assert_eq!(cfg.skipped.len(), 1);
        assert_eq!(cfg.skipped[0].app, "elsewhere");
        assert!(
            cfg.skipped[0].reason.contains("site=plant-9"),
            "{}",
            cfg.skipped[0].reason
        );
        assert_eq!(cfg.node.labels["kubernetes.io/hostname"], "edge-7");
        assert!(cfg.node.labels.contains_key("kubernetes.io/arch"));
    }

    #[test]
    fn a_bad_selector_names_key_and_line() {
        let err = parse(
            "[[apps]]\nname = \"a\"\nrepo = \"https://a/b.git\"\nnode_selector = \"site in (\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("apps[0].node_selector") && err.contains("line 1"),
            "{err}"
        );
    }
}
