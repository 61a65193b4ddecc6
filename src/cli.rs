//! The command line: `run`, `sync`, `render` and `check-config`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::report::status::{ago, short_revision, StatusDocument};
use crate::{daemon, render, telemetry};

/// edgesync: a pull-based GitOps agent for K3s edge nodes.
///
/// It fetches the Git repositories its node is assigned, renders the apps locally and
/// server-side applies them to the node's cluster.
#[derive(Debug, Parser)]
#[command(name = "edgesync", version, about, long_about)]
pub(crate) struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "EDGESYNC_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub(crate) config: PathBuf,
    /// Log filter, e.g. `info` or `edgesync=debug` [default: `[log] level`, else info].
    /// RUST_LOG overrides it.
    #[arg(long, global = true)]
    pub(crate) log_level: Option<String>,
    /// `text` (the journal under systemd) or `json` (one object per line on stderr)
    /// [default: `[log] format`, else text].
    #[arg(long, global = true, value_enum)]
    pub(crate) log_format: Option<telemetry::LogFormat>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the agent: poll every repository at its interval and sync apps whose revision
    /// changed. Stops cleanly on SIGTERM.
    Run,
    /// Sync one app (or every app) once and exit. Applies even if the revision is
    /// unchanged. Exits non-zero if anything failed.
    Sync {
        /// The app to sync; all apps if omitted.
        app: Option<String>,
    },
    /// Render a directory as the agent would and print the objects as one multi-document
    /// YAML stream.
    Render {
        /// Directory holding manifests or a kustomization.
        path: PathBuf,
        /// The checkout root that files may not leave (default: the enclosing Git work tree,
        /// or PATH itself outside one).
        #[arg(long)]
        root: Option<PathBuf>,
        /// Build kustomizations the native engine does not support with this command, as an
        /// app's `kustomize_fallback` does (e.g. "kubectl kustomize").
        #[arg(long)]
        kustomize_fallback: Option<String>,
        /// The helm binary for charts and a kustomization's `helmCharts` (default: `helm` on
        /// PATH).
        #[arg(long)]
        helm: Option<PathBuf>,
    },
    /// Show what syncing an app would change, as a unified diff of YAML between the live
    /// objects and the API server's answer to a server-side dry-run apply of the app's
    /// current revision (the last applied render if Git cannot be reached). Exits 1 when
    /// there are differences, 0 when there are none, like `kubectl diff`.
    Diff {
        /// The app to compare.
        app: String,
    },
    /// Validate the configuration file and exit non-zero if it is invalid.
    CheckConfig,
    /// Read a directory of Argo CD Application and AppProject manifests and show the apps
    /// they make, with a warning for every field edgesync ignores. Exits non-zero on errors.
    Fleet {
        /// Directory holding the manifests.
        path: PathBuf,
    },
    /// Show the running agent's apps: revision, sync state, health, last sync, message.
    /// Asks the agent's HTTP listener (`[http] listen`).
    Status {
        /// Print the raw status document as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli) {
        Ok(code) => code,
        Err(e) => {
            let error: &(dyn std::error::Error + 'static) = e.as_ref();
            eprintln!("error: {}", crate::model::error::chain(error));
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::CheckConfig => {
            let config = daemon::Node::load(&cli.config)?.config;
            println!(
                "{}: OK ({} repositories, {} apps, node {})",
                cli.config.display(),
                config.repositories_in_use().len(),
                config.apps.len(),
                config.node.name
            );
            for s in &config.skipped {
                println!("skipped on this node: {}: {}", s.app, s.reason);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let config = Config::load(&cli.config)?;
            let text = fetch_status(config.http.listen)?;
            if *json {
                println!("{text}");
            } else {
                let doc: StatusDocument = serde_json::from_str(&text)
                    .context("the agent's status is not a status document")?;
                print!("{}", status_table(&doc, crate::state::unix_now()));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Fleet { path } => Ok(if fleet_report(path)? {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
        Command::Render {
            path,
            root,
            kustomize_fallback,
            helm,
        } => {
            let options = RenderFlags {
                fallback: kustomize_fallback.as_deref(),
                helm: helm.as_deref(),
            };
            render_to_stdout(path, root.as_deref(), &options)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run => {
            let node = daemon::Node::load(&cli.config)?;
            init_logging(&cli, &node.config);
            run_to_end(daemon::run(node))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff { app } => {
            let node = daemon::Node::load(&cli.config)?;
            init_logging(&cli, &node.config);
            let report = run_to_end(daemon::diff(node, app))?;
            print!("{}", report.text);
            Ok(if report.differs {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Sync { app } => {
            let node = daemon::Node::load(&cli.config)?;
            init_logging(&cli, &node.config);
            let failed = run_to_end(daemon::sync_once(node, app.as_deref()))?;
            if failed > 0 {
                eprintln!(
                    "{failed} app(s) failed to sync or were held by a sync window (see the log)"
                );
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The command line wins over `[log]`, which wins over the defaults.
fn init_logging(cli: &Cli, config: &Config) {
    let level = cli
        .log_level
        .clone()
        .or_else(|| config.log.level.clone())
        .unwrap_or_else(|| "info".to_string());
    let format = cli
        .log_format
        .or(config.log.format)
        .unwrap_or(telemetry::LogFormat::Text);
    telemetry::init(&level, format);
}

/// Runs `future` on a small runtime. A Git call stuck in libgit2 (a silent server) cannot be
/// cancelled, so the runtime does not wait for blocking threads for more than a few seconds
/// once `future` is done.
fn run_to_end<T>(
    future: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    crate::daemon::limit_malloc_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(future);
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

/// The directory whose contents a render may read: the enclosing Git work tree, so
/// references to sibling directories work, or `path` itself outside Git.
fn render_root(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|dir| dir.join(".git").exists())
        .unwrap_or(path)
        .to_path_buf()
}

/// Prints what each Argo CD manifest under `path` becomes; false if any could not be read.
fn fleet_report(path: &Path) -> anyhow::Result<bool> {
    use crate::fleet::argo::{self, FleetObject};
    let manifests = render_path(path, None, &RenderFlags::default())?;
    let mut ok = true;
    for object in &manifests.objects {
        if object.group() == argo::GROUP && object.kind() == "ApplicationSet" {
            println!(
                "{}: ApplicationSet {}: expanded by each node (its generators read the node's name and labels, and Git)",
                object.origin,
                object.name()
            );
            continue;
        }
        if crate::fleet::upstream::is_policy(object) {
            println!(
                "{}: RolloutPolicy {}: read by edgesync-hub (stages rollouts); the nodes follow its gates",
                object.origin,
                object.name()
            );
            continue;
        }
        match argo::parse(object) {
            Ok(None) => println!(
                "{}: {} is not an Argo CD object; ignored",
                object.origin,
                object.display_name()
            ),
            Ok(Some(parsed)) => {
                match &parsed.object {
                    FleetObject::AppProject(p) => println!("{}: AppProject {}", object.origin, p.name),
                    FleetObject::Application(app) => match app.to_app_config() {
                        Ok(cfg) => println!(
                            "{}: app {} from {} at {} {} into namespace {} (project {}, prune {}, node selector {})",
                            object.origin,
                            cfg.name,
                            crate::model::url::redact(&cfg.repo),
                            cfg.revision,
                            match &cfg.chart {
                                Some(chart) => format!("chart {chart}"),
                                None => format!("path {}", cfg.path),
                            },
                            cfg.namespace.as_deref().unwrap_or("-"),
                            app.project,
                            cfg.prune,
                            cfg.node_selector.as_deref().unwrap_or("none")
                        ),
                        Err(why) => println!("{}: app {} cannot run yet: {why}", object.origin, app.name),
                    },
                }
                for warning in parsed.warnings {
                    println!("  warning: {warning}");
                }
            }
            Err(e) => {
                ok = false;
                eprintln!("error: {e}");
            }
        }
    }
    Ok(ok)
}

/// How `edgesync render` renders, from its flags.
#[derive(Default)]
struct RenderFlags<'a> {
    fallback: Option<&'a str>,
    helm: Option<&'a Path>,
}

/// Renders a directory given on the command line, inside its Git work tree. Remote bases,
/// files and charts its kustomization names are fetched into a temporary cache first.
fn render_path(
    path: &Path,
    root: Option<&Path>,
    flags: &RenderFlags,
) -> anyhow::Result<render::Manifests> {
    let path = path
        .canonicalize()
        .with_context(|| format!("cannot open {}", path.display()))?;
    let root = match root {
        Some(root) => root
            .canonicalize()
            .with_context(|| format!("cannot open {}", root.display()))?,
        None => render_root(&path),
    };
    anyhow::ensure!(
        path.starts_with(&root),
        "{} is not inside {}",
        path.display(),
        root.display()
    );
    let rel = path.strip_prefix(&root).unwrap_or(Path::new("."));
    // The remote bases and charts the kustomization names, in a temporary cache kept until
    // the render is done.
    let (fetched, warnings, _cache) = daemon::fetch_remote_inputs(&root, rel)?;
    for warning in warnings {
        eprintln!("warning: {warning}");
    }
    let helm = flags.helm.map(|binary| render::helm::HelmRequest {
        app: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "release".into()),
        binary: binary.to_path_buf(),
        ..Default::default()
    });
    let options = render::RenderOptions {
        kustomize_fallback: flags.fallback,
        helm,
        fetched,
        ..Default::default()
    };
    Ok(render::render_with(&root, rel, &options)?)
}

fn render_to_stdout(path: &Path, root: Option<&Path>, flags: &RenderFlags) -> anyhow::Result<()> {
    let manifests = render_path(path, root, flags)?;
    let yaml = render::to_yaml_stream(manifests.objects.iter().map(|o| &o.value))
        .context("cannot write YAML")?;
    print!("{yaml}");
    Ok(())
}

/// `GET /api/v1/status` from the local agent, over plain HTTP/1.1.
fn fetch_status(listen: std::net::SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut stream = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))
        .with_context(|| format!("is the agent running? cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /api/v1/status HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer from the agent")?;
    if !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!(
            "the agent answered {}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(body.to_string())
}

/// The table `edgesync status` prints.
fn status_table(doc: &StatusDocument, now: u64) -> String {
    let mut rows = vec![[
        "APP".to_string(),
        "REVISION".into(),
        "SYNC".into(),
        "HEALTH".into(),
        "LAST SYNC".into(),
        "MESSAGE".into(),
    ]];
    for a in &doc.apps {
        rows.push([
            a.app.clone(),
            short_revision(a.revision.as_deref()).to_string(),
            a.sync.as_str().into(),
            a.health.clone(),
            ago(now, a.last_sync_end),
            a.message.clone(),
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = format!(
        "node {} (edgesync {}, up {}s)\n",
        doc.node.node, doc.node.agent_version, doc.node.uptime_seconds
    );
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i == 5 {
                    cell.clone()
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    for s in &doc.node.skipped {
        out.push_str(&format!("skipped on this node: {}: {}\n", s.app, s.reason));
    }
    for problem in &doc.node.fleet_problems {
        out.push_str(&format!("fleet: {problem}\n"));
    }
    out
}
