//! `edgesync-hub run --config FILE`: ingest from the broker, the fleet database, the pages and
//! the API. `edgesync-hub status [--url URL]`: the fleet summary in the terminal.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Deserialize;

use edgesync_hub::fleet::{self, Follower};
use edgesync_hub::gates::Driver;
use edgesync_hub::ingest::Topics;
use edgesync_hub::lease;
use edgesync_hub::mqtt::{self, Counts, IngestConfig};
use edgesync_hub::store::{Postgres, Sqlite, Store};
use edgesync_hub::web::{self, Web};

#[derive(Parser)]
#[command(
    name = "edgesync-hub",
    version,
    about = "The fleet upstream of edgesync"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the hub.
    Run {
        #[arg(long, default_value = "/etc/edgesync-hub/config.toml")]
        config: PathBuf,
    },
    /// Prints the fleet summary from a running hub.
    Status {
        #[arg(long, default_value = "http://127.0.0.1:8480")]
        url: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    mqtt: MqttSection,
    #[serde(default)]
    store: StoreSection,
    #[serde(default)]
    http: HttpSection,
    gates: Option<GatesSection>,
    fleet: Option<FleetSection>,
    /// Credentials of Git repositories (the fleet's and the apps'), as the agents'
    /// `[[repositories]]` take them.
    #[serde(default)]
    repositories: Vec<edgesync::config::RepositoryConfig>,
    signatures: Option<SignaturesSection>,
}

/// Keys one of which must have signed a fleet commit before the hub reads its policies and
/// Applications (as the agents' `[signatures]` with `fleet = true`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignaturesSection {
    #[serde(default)]
    gpg_keys: Vec<PathBuf>,
    #[serde(default)]
    ssh_keys: Vec<PathBuf>,
}

/// The fleet repository: its `RolloutPolicy` documents and the Applications whose branches
/// the hub follows (a new commit starts a rollout).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetSection {
    repo: String,
    #[serde(default = "default_revision")]
    revision: String,
    #[serde(default = "default_path")]
    path: String,
    /// How often the fleet's branch and the followed apps' branches are listed.
    #[serde(default = "default_poll")]
    poll: String,
    /// The Git cache (`<cache_dir>/git`).
    #[serde(default = "default_cache_dir")]
    cache_dir: PathBuf,
}

fn default_revision() -> String {
    "HEAD".into()
}

fn default_path() -> String {
    ".".into()
}

fn default_poll() -> String {
    "30s".into()
}

fn default_cache_dir() -> PathBuf {
    PathBuf::from("/var/lib/edgesync-hub")
}

/// Health-gated rollouts: the hub's signing key and its policies.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GatesSection {
    /// OpenSSH Ed25519 private key (`ssh-keygen -t ed25519`); agents trust its public half.
    key_file: PathBuf,
    #[serde(default = "default_gate_prefix")]
    prefix: String,
    /// `RolloutPolicy` files, when there is no `[fleet]` (which reads them from Git).
    #[serde(default)]
    policies: Vec<PathBuf>,
}

impl GatesSection {
    fn driver(&self) -> anyhow::Result<Driver> {
        let key = ssh_key::PrivateKey::read_openssh_file(&self.key_file)
            .with_context(|| format!("gates.key_file {}", self.key_file.display()))?;
        let mut policies = Vec::new();
        for path in &self.policies {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("gates.policies {}", path.display()))?;
            policies.push(edgesync_hub::policy::parse(
                &path.display().to_string(),
                &text,
            )?);
        }
        Ok(Driver::new(policies, key, &self.prefix))
    }
}

fn default_gate_prefix() -> String {
    "edgesync/gates".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MqttSection {
    host: String,
    #[serde(default = "default_port")]
    port: u16,
    #[serde(default = "default_client_id")]
    client_id: String,
    #[serde(default = "default_prefix")]
    status_prefix: String,
    /// Shared subscription group; replicas of one hub use the same.
    #[serde(default = "default_group")]
    group: String,
    /// TLS to the broker: the CA file's certificates (the system's when none is given) and a
    /// client certificate, as the agents' `[mqtt]` takes them.
    #[serde(default)]
    tls: bool,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    username: Option<String>,
    /// The password, read from this file (never written in the config).
    password_file: Option<PathBuf>,
    /// How long the broker keeps this replica's session (and its share of the group's
    /// messages) while it is away (docs/FLEET.md).
    #[serde(default = "default_session_expiry")]
    session_expiry: String,
}

fn default_session_expiry() -> String {
    "24h".into()
}

impl MqttSection {
    fn tls(&self) -> anyhow::Result<Option<rumqttc::TlsConfiguration>> {
        let files = [&self.ca_file, &self.cert_file, &self.key_file];
        if !self.tls {
            anyhow::ensure!(
                files.iter().all(|f| f.is_none()),
                "mqtt: ca_file, cert_file and key_file need tls = true"
            );
            return Ok(None);
        }
        anyhow::ensure!(
            self.cert_file.is_some() == self.key_file.is_some(),
            "mqtt: cert_file and key_file go together"
        );
        let client = self.cert_file.as_deref().zip(self.key_file.as_deref());
        let config = edgesync_proto::tls::client_config(self.ca_file.as_deref(), client)
            .context("mqtt TLS")?;
        Ok(Some(rumqttc::TlsConfiguration::Rustls(Arc::new(config))))
    }

    fn credentials(&self) -> anyhow::Result<Option<(String, String)>> {
        let Some(user) = &self.username else {
            anyhow::ensure!(
                self.password_file.is_none(),
                "mqtt.password_file needs mqtt.username"
            );
            return Ok(None);
        };
        let password = match &self.password_file {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("mqtt.password_file {}", path.display()))?
                .trim()
                .to_string(),
            None => String::new(),
        };
        Ok(Some((user.clone(), password)))
    }
}

/// SQLite at `path` by default; PostgreSQL when `url` is set (several replicas share it).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreSection {
    #[serde(default = "default_db")]
    path: PathBuf,
    url: Option<String>,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            path: default_db(),
            url: None,
        }
    }
}

fn default_db() -> PathBuf {
    "/var/lib/edgesync-hub/hub.db".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSection {
    #[serde(default = "default_listen")]
    listen: String,
    /// A file holding the bearer token `POST /api/v1/rollouts` needs; required when `listen`
    /// is not a loopback address.
    token_file: Option<PathBuf>,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: default_listen(),
            token_file: None,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8480".into()
}

impl HttpSection {
    /// The API token, if any; none is refused when the hub listens beyond loopback.
    fn token(&self) -> anyhow::Result<Option<String>> {
        let Some(path) = &self.token_file else {
            let loopback = self
                .listen
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| a.ip().is_loopback())
                || self.listen.starts_with("localhost:");
            anyhow::ensure!(
                loopback,
                "http.listen {} is not a loopback address: set http.token_file, or anyone who \
                 reaches the hub can start rollouts",
                self.listen
            );
            return Ok(None);
        };
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("http.token_file {}", path.display()))?
            .trim()
            .to_string();
        anyhow::ensure!(
            token.len() >= 16,
            "http.token_file {}: the token is shorter than 16 characters",
            path.display()
        );
        Ok(Some(token))
    }
}

fn default_port() -> u16 {
    1883
}
fn default_client_id() -> String {
    "edgesync-hub".into()
}
fn default_prefix() -> String {
    "edgesync/nodes/{node}".into()
}
fn default_group() -> String {
    "edgesync-hub".into()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "edgesync_hub=info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Run { config } => run(config).await,
        Command::Status { url } => status(&url).await,
    }
}

/// The config file, read and checked, and what it names opened: keys, tokens, policy files,
/// the database (blocking: the caller runs it off the async workers).
struct Loaded {
    config: Config,
    token: Option<String>,
    tls: Option<rumqttc::TlsConfiguration>,
    credentials: Option<(String, String)>,
    driver: Option<Driver>,
    follower: Option<(Follower, std::time::Duration)>,
    store: Store,
}

fn load(path: &std::path::Path) -> anyhow::Result<Loaded> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let config: Config = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let token = config.http.token()?;
    // Rollouts carry on where the last run (or the replica that led before) left them: the
    // lease's first renewal reads them back.
    let driver = match &config.gates {
        Some(gates) => Some(gates.driver()?.with_lease()),
        None => None,
    };
    let follower = match (&config.fleet, &config.gates) {
        (None, Some(gates)) if gates.policies.is_empty() => {
            anyhow::bail!("gates: policies are needed without [fleet] (which reads them from Git)")
        }
        (None, _) => {
            anyhow::ensure!(
                config.signatures.is_none(),
                "signatures: the keys check the fleet repository's commits, and there is no [fleet]"
            );
            None
        }
        (Some(_), None) => anyhow::bail!("fleet: needs [gates] (the key that signs the gates)"),
        (Some(_), Some(gates)) if !gates.policies.is_empty() => anyhow::bail!(
            "gates: policies and [fleet] together: with [fleet], the policies come from the fleet repository"
        ),
        (Some(fleet), Some(_)) => {
            let poll = humantime::parse_duration(&fleet.poll)
                .with_context(|| format!("fleet.poll {:?}", fleet.poll))?;
            anyhow::ensure!(!poll.is_zero(), "fleet.poll must be more than zero");
            let mut upstream = edgesync::fleet::upstream::Upstream::new(
                &fleet.cache_dir,
                config.repositories.clone(),
                &fleet.repo,
                &fleet.revision,
                &fleet.path,
            );
            if let Some(keys) = &config.signatures {
                upstream = upstream.require_signatures(&keys.gpg_keys, &keys.ssh_keys)?;
            }
            Some((Follower::new(upstream), poll))
        }
    };
    let store = match (&config.store.url, &config.store.path) {
        (Some(url), _) => Store::new(Box::new(Postgres::connect(url).context("store.url")?))?,
        (None, path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
            }
            let db = Sqlite::open(path).with_context(|| format!("{}", path.display()))?;
            Store::new(Box::new(db))?
        }
    };
    Ok(Loaded {
        token,
        tls: config.mqtt.tls()?,
        credentials: config.mqtt.credentials()?,
        driver,
        follower,
        store,
        config,
    })
}

async fn run(path: PathBuf) -> anyhow::Result<()> {
    let Loaded {
        config,
        token,
        tls,
        credentials,
        driver,
        follower,
        store,
    } = tokio::task::spawn_blocking(move || load(&path)).await??;
    let store = Arc::new(Mutex::new(store));
    let counts = Arc::new(Mutex::new(Counts::default()));
    let driver = driver.map(|d| Arc::new(Mutex::new(d)));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // Before the API answers: a replica that can lead rollouts does so from its first request.
    if let Some(driver) = &driver {
        lease::renew_now(&config.mqtt.client_id, &store, driver).await;
    }
    let leasing = driver.as_ref().map(|driver| {
        tokio::spawn(lease::run(
            config.mqtt.client_id.clone(),
            store.clone(),
            driver.clone(),
            stop.subscribe(),
        ))
    });
    let ingest_config = IngestConfig {
        tls,
        credentials,
        session_expiry: humantime::parse_duration(&config.mqtt.session_expiry)
            .with_context(|| format!("mqtt.session_expiry {:?}", config.mqtt.session_expiry))?,
        host: config.mqtt.host,
        port: config.mqtt.port,
        client_id: config.mqtt.client_id,
        topics: Topics::new(&config.mqtt.status_prefix),
        group: Some(config.mqtt.group),
    };
    let (client, events) = mqtt::client(&ingest_config);
    let ingest = tokio::spawn(mqtt::run(
        ingest_config,
        client.clone(),
        events,
        store.clone(),
        counts.clone(),
        driver.clone(),
        stopped,
    ));
    // An app without a rollout yet starts from what its nodes run: their retained documents
    // come in first.
    let first_after = std::time::Instant::now() + mqtt::REPLAY_SETTLES;
    let fleet_status = follower.as_ref().map(|(f, _)| f.status());
    let following = match (follower, &driver) {
        (Some((follower, poll)), Some(driver)) => Some(tokio::spawn(fleet::run(
            follower,
            poll,
            first_after,
            store.clone(),
            driver.clone(),
            counts.clone(),
            client.clone(),
            stop.subscribe(),
        ))),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(&config.http.listen)
        .await
        .with_context(|| format!("http.listen {}", config.http.listen))?;
    tracing::info!(listen = %config.http.listen, "edgesync-hub running");
    let web = Web {
        store,
        counts,
        driver,
        client: Some(client),
        token,
        fleet: fleet_status,
    };
    axum::serve(listener, web::router(web))
        .with_graceful_shutdown(stop_signal())
        .await?;
    let _ = stop.send(true);
    let _ = ingest.await;
    for task in [following, leasing].into_iter().flatten() {
        let _ = task.await;
    }
    Ok(())
}

/// SIGINT, or SIGTERM (systemd's stop): the hub stops taking messages and requests, and what
/// it took is in the store.
async fn stop_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("stopping");
}

async fn status(url: &str) -> anyhow::Result<()> {
    let api = format!("{}/api/v1/fleet", url.trim_end_matches('/'));
    let body = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let mut reply = ureq::get(&api)
            .call()
            .with_context(|| format!("cannot reach the hub at {api}"))?;
        Ok(reply.body_mut().read_to_string()?)
    })
    .await??;
    let fleet: serde_json::Value = serde_json::from_str(&body).context("the hub's answer")?;
    let nodes = fleet["nodes"].as_array().cloned().unwrap_or_default();
    let count = |s: &str| nodes.iter().filter(|n| n["state"] == s).count();
    println!(
        "{} nodes: {} online, {} offline, {} stale",
        nodes.len(),
        count("online"),
        count("offline"),
        count("stale")
    );
    println!(
        "{:<24} {:<14} {:<10} {:<12} {:>5}",
        "APP", "REVISION", "SYNC", "HEALTH", "NODES"
    );
    for app in fleet["apps"].as_array().cloned().unwrap_or_default() {
        let text = |k: &str| app[k].as_str().unwrap_or("-").to_string();
        println!(
            "{:<24} {:<14} {:<10} {:<12} {:>5}",
            text("app"),
            text("revision").chars().take(12).collect::<String>(),
            text("sync"),
            text("health"),
            app["nodes"].as_u64().unwrap_or_default()
        );
    }
    Ok(())
}
