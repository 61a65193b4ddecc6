//! Wiring: the long-running agent (`edgesync run`) and one-shot syncs (`edgesync sync`).
//! Each repository has a worker fed by the poll timer and the triggers; a failing app or
//! repository never stops the others.

mod checks;
mod control;
mod dispatch;
mod drift;
#[cfg(test)]
mod engine_tests;
mod fleet;
mod gates;
mod health;
mod hooks;
pub(crate) mod node;
mod prune;
mod remote;
pub(crate) use remote::fetch_remote_inputs;
mod removal;
mod retry;
mod sync;
mod target;
mod unchanged;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use crate::config::{AppConfig, Config, RepositoryConfig};
use crate::metrics::Metrics;
use crate::report::publisher::StatusPublisher;
use crate::scheduler::AppSet;
use crate::trigger::EventSink;
pub(crate) use dispatch::{Dispatcher, RepoWorker};
pub(crate) use node::Node;
pub(crate) use sync::{SyncContext, SyncError, SyncResult};

/// How long in-flight syncs may take to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How often systemd's STATUS= line is refreshed (and the watchdog fed, at least).
const STATUS_EVERY: Duration = Duration::from_secs(10);
/// How often the node document goes upstream again while nothing changes (the fleet hub calls
/// a node stale after three missed).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(300);

/// Runs the agent until SIGTERM or SIGINT. SIGHUP, or a change to the config file, reloads
/// the config; a new config that does not validate is refused and the running one stays.
pub(crate) async fn run(node: Node) -> anyhow::Result<()> {
    let _lock = crate::state::StateLock::acquire(&node.config.state_dir)?;
    let metrics = Arc::new(Metrics::default());
    let mut signals = Signals::new()?;
    let (changed_tx, mut changed_rx) = mpsc::channel(1);
    // READY once the config is valid and the state directory ours: reading the fleet from Git
    // and rendering it can take long, and must not count against systemd's start timeout
    // (a slow or hostile fleet commit would otherwise make every node crash-loop).
    notify_systemd(sd_notify::NotifyState::Ready);
    notify_systemd(sd_notify::NotifyState::Status(
        "starting: reading the fleet",
    ));
    let watchdog = sd_notify::watchdog_enabled();
    let started = fed(
        watchdog,
        &mut signals,
        Agent::start(node.clone(), metrics.clone(), changed_tx.clone()),
    )
    .await;
    let Some(started) = started else {
        return stopped_while_starting();
    };
    let mut agent = started?;
    let mut current = node;
    // The watchdog is fed from this loop, so a wedged main loop lets systemd restart us.
    let every = watchdog
        .map(|d| d / 2)
        .unwrap_or(STATUS_EVERY)
        .min(STATUS_EVERY);
    let mut ticker = tokio::time::interval(every);
    let mut heartbeat = tokio::time::Instant::now();
    loop {
        let why = tokio::select! {
            signal = signals.next() => match signal {
                Signal::Terminate => break,
                Signal::Hangup => "SIGHUP",
            },
            _ = changed_rx.recv() => "config file changed",
            _ = ticker.tick() => {
                tell_systemd(&agent.board, watchdog.is_some());
                // From this loop too: a wedged agent stops its heartbeat.
                if heartbeat.elapsed() >= HEARTBEAT_EVERY {
                    agent.board.heartbeat();
                    heartbeat = tokio::time::Instant::now();
                }
                continue;
            }
        };
        // Editors write in several steps; let them finish.
        tokio::time::sleep(Duration::from_millis(300)).await;
        while changed_rx.try_recv().is_ok() {}
        let Some(new) = reload(&current, why, &metrics).await else {
            continue;
        };
        notify_systemd(sd_notify::NotifyState::Reloading);
        agent.stop().await;
        let started = fed(
            watchdog,
            &mut signals,
            Agent::start(new.clone(), metrics.clone(), changed_tx.clone()),
        )
        .await;
        let Some(started) = started else {
            return stopped_while_starting();
        };
        agent = match started {
            Ok(started) => {
                current = new;
                started
            }
            Err(e) => {
                metrics.error(crate::metrics::ErrorKind::ConfigStart);
                let error: &(dyn std::error::Error + 'static) = e.as_ref();
                tracing::error!(
                    "cannot start with the new config, keeping the running one: {}",
                    crate::model::error::chain(error)
                );
                let again = fed(
                    watchdog,
                    &mut signals,
                    Agent::start(current.clone(), metrics.clone(), changed_tx.clone()),
                )
                .await;
                let Some(again) = again else {
                    return stopped_while_starting();
                };
                again?
            }
        };
        notify_systemd(sd_notify::NotifyState::Ready);
    }
    tracing::info!("shutting down");
    notify_systemd(sd_notify::NotifyState::Stopping);
    agent.stop().await;
    // Checkouts of the last second are sealed now, not checked out again at the next start.
    let _ = tokio::task::spawn_blocking(crate::source::sealed::flush).await;
    Ok(())
}

/// The status line for systemd, and the watchdog's keep-alive when it watches.
fn tell_systemd(board: &crate::report::status::StatusBoard, watchdog: bool) {
    let summary = board.summary();
    let mut states = vec![sd_notify::NotifyState::Status(&summary)];
    if watchdog {
        states.push(sd_notify::NotifyState::Watchdog);
    }
    if let Err(e) = sd_notify::notify(&states) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// The config file read again (`why` says what asked), when it can replace `current`: it
/// validates, and if it removes apps, it reads the same twice. `None` keeps the running one.
async fn reload(current: &Node, why: &str, metrics: &Metrics) -> Option<Node> {
    let new = match Node::load(&current.config.path) {
        Ok(new) => new,
        Err(e) => {
            metrics.error(e.metric_label());
            tracing::error!("{why}: new config rejected, keeping the running one: {e}");
            return None;
        }
    };
    if let Err(unsettled) = confirm_removals(&current.config, &new.config).await {
        metrics.error(crate::metrics::ErrorKind::ConfigUnsettled);
        tracing::warn!("{unsettled}");
        return None;
    }
    tracing::info!("{why}: reloading config");
    Some(new)
}

/// How long a config that deletes apps' objects must stay the same before it is acted on.
const REMOVAL_SETTLE: Duration = Duration::from_secs(3);

/// Why a reloaded config that removes apps is not acted on yet.
#[derive(Debug, thiserror::Error)]
enum Unsettled {
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{path} changed again while it was being read; it would remove {apps} (delete_on_removal): waiting until it is complete")]
    Changing {
        path: std::path::PathBuf,
        apps: String,
    },
}

/// A new config that drops apps with `delete_on_removal` deletes their objects: it must read
/// the same twice, [`REMOVAL_SETTLE`] apart, so a file still being written (it parsed, but
/// apps are missing) never deletes anything. `Err` says why the reload waits.
async fn confirm_removals(current: &Config, new: &Config) -> Result<(), Unsettled> {
    let dropped: Vec<&str> = current
        .apps
        .iter()
        .filter(|a| a.delete_on_removal && new.app(&a.name).is_none())
        .map(|a| a.name.as_str())
        .collect();
    if dropped.is_empty() {
        return Ok(());
    }
    let path = new.path.clone();
    let read = || async {
        tokio::fs::read(&path)
            .await
            .map_err(|source| Unsettled::Read {
                path: path.clone(),
                source,
            })
    };
    let first = read().await?;
    tokio::time::sleep(REMOVAL_SETTLE).await;
    let again = read().await?;
    let settled = Config::load(&path)?;
    if first != again || settled.apps != new.apps {
        return Err(Unsettled::Changing {
            path: path.clone(),
            apps: dropped.join(", "),
        });
    }
    tracing::info!(apps = %dropped.join(", "), "the new config removes apps, and read the same twice");
    Ok(())
}

/// Runs `work` (starting an agent: reading the fleet, binding listeners) while feeding
/// systemd's watchdog and listening for SIGTERM, which the main loop cannot do meanwhile.
/// `None`: the process was told to stop first.
async fn fed<T>(
    watchdog: Option<Duration>,
    signals: &mut Signals,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(work);
    // Without a watchdog the ticker still runs, at the status pace, and feeds nothing.
    let mut ticker = tokio::time::interval(watchdog.map(|d| d / 2).unwrap_or(STATUS_EVERY));
    loop {
        tokio::select! {
            out = &mut work => return Some(out),
            _ = signals.terminated() => return None,
            _ = ticker.tick() => {
                if watchdog.is_some() {
                    notify_systemd(sd_notify::NotifyState::Watchdog);
                }
            }
        }
    }
}

fn stopped_while_starting() -> anyhow::Result<()> {
    tracing::info!("stopped while starting");
    notify_systemd(sd_notify::NotifyState::Stopping);
    Ok(())
}

/// One configuration's worth of running agent: repository workers, triggers, listeners.
struct Agent {
    board: Arc<crate::report::status::StatusBoard>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    _watches: Option<crate::trigger::watch::Watches>,
}

impl Agent {
    async fn start(
        mut node: Node,
        metrics: Arc<Metrics>,
        config_changed: mpsc::Sender<()>,
    ) -> anyhow::Result<Agent> {
        let fleet_load = with_fleet(&mut node, &metrics).await;
        // Bind listeners first: a port in use is a startup error, not a silent degradation.
        let listeners = Listeners::bind(&node.config).await?;
        let config = &node.config;
        let publisher = match &config.mqtt {
            Some(mqtt) => Some(StatusPublisher::open(
                &config.state_dir,
                &config.node.name,
                mqtt,
                metrics.clone(),
            )?),
            None => None,
        };
        let ctx = SyncContext::connect(node, metrics.clone(), publisher.clone()).await?;
        let kube_client = ctx
            .kube
            .as_ref()
            .map(|k| k.client().clone())
            .ok_or_else(|| anyhow::anyhow!("the agent runs against a real API server"))?;
        let dispatcher = Arc::new(Dispatcher::new(&ctx.config, metrics.clone()));
        let sink: Arc<dyn EventSink> = dispatcher.clone();
        let mut tasks = JoinSet::new();
        let (shutdown, shutdown_rx) = watch::channel(false);
        spawn_engine(
            &mut tasks,
            &ctx,
            &dispatcher,
            fleet_load,
            &config_changed,
            &shutdown_rx,
        );
        if let Some(mqtt) = ctx.config.mqtt.clone() {
            let outbound = publisher.map(|p| p as Arc<dyn crate::trigger::mqtt::Outbound>);
            let gates = gates::GateReceiver::new(ctx.clone(), sink.clone())
                .map(|g| Arc::new(g) as Arc<dyn crate::trigger::GateSink>);
            tasks.spawn(crate::trigger::mqtt::run(
                mqtt,
                ctx.config.node.name.clone(),
                sink.clone(),
                gates,
                outbound,
                metrics.clone(),
                shutdown_rx.clone(),
            ));
        }
        if let (Some(listener), Some(webhook)) = (listeners.webhook, ctx.config.webhook.clone()) {
            let server =
                crate::trigger::webhook::Server::new(webhook, sink.clone(), metrics.clone())?;
            tasks.spawn(server.serve(listener, shutdown_rx.clone()));
        }
        if let Some(listener) = listeners.http {
            tasks.spawn(crate::report::serve_http(
                listener,
                crate::report::Http {
                    metrics: metrics.clone(),
                    board: ctx.board.clone(),
                    client: kube_client,
                },
                shutdown_rx.clone(),
            ));
        }
        let watches = watch_files(&ctx, &dispatcher, sink, config_changed);
        tracing::info!(
            node = %ctx.config.node.name,
            apps = ctx.config.apps.len(),
            "edgesync running"
        );
        for s in &ctx.config.skipped {
            tracing::info!(app = %s.app, "not for this node: {}", s.reason);
        }
        Ok(Agent {
            board: ctx.board.clone(),
            shutdown,
            tasks,
            _watches: watches,
        })
    }

    /// Stops triggers and workers; in-flight syncs get [`SHUTDOWN_GRACE`] to finish.
    async fn stop(mut self) {
        self._watches = None;
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("syncs still running after {SHUTDOWN_GRACE:?}; stopping anyway");
            self.tasks.abort_all();
        }
    }
}

/// The agent's listeners, bound before anything starts.
struct Listeners {
    http: Option<tokio::net::TcpListener>,
    webhook: Option<tokio::net::TcpListener>,
}

impl Listeners {
    async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let http = match config.http.enabled {
            true => Some(bind(config.http.listen, "http").await?),
            false => None,
        };
        let webhook = match &config.webhook {
            Some(w) => Some(bind(w.listen, "webhook").await?),
            None => None,
        };
        Ok(Listeners { http, webhook })
    }
}

/// The engine's tasks: health, drift, removal of departed apps (only when the fleet was read
/// with certainty), the fleet watcher, the control socket and one worker per repository.
fn spawn_engine(
    tasks: &mut JoinSet<()>,
    ctx: &Arc<SyncContext>,
    dispatcher: &Dispatcher,
    fleet_load: FleetLoad,
    config_changed: &mpsc::Sender<()>,
    shutdown: &watch::Receiver<bool>,
) {
    tasks.spawn(health::monitor(ctx.clone(), shutdown.clone()));
    tasks.spawn(drift::run(ctx.clone(), shutdown.clone()));
    if fleet_load.certain {
        tasks.spawn(removal::remove_departed(ctx.clone()));
    }
    if let (Some(fleet), Some(revision)) = (ctx.config.fleet.clone(), fleet_load.revision) {
        tasks.spawn(fleet::watch_fleet(
            ctx.config.clone(),
            fleet,
            revision,
            fleet_load.read,
            config_changed.clone(),
            shutdown.clone(),
        ));
    }
    let permits = Arc::new(Semaphore::new(ctx.config.max_concurrent_syncs));
    tasks.spawn(control::serve(
        ctx.clone(),
        permits.clone(),
        shutdown.clone(),
    ));
    for worker in dispatcher.workers() {
        tasks.spawn(work_repository(
            ctx.clone(),
            worker.clone(),
            permits.clone(),
            shutdown.clone(),
        ));
    }
}

/// Watches the config file and the local (`file://`) repositories; without inotify, SIGHUP
/// and polling still work.
fn watch_files(
    ctx: &SyncContext,
    dispatcher: &Dispatcher,
    sink: Arc<dyn EventSink>,
    config_changed: mpsc::Sender<()>,
) -> Option<crate::trigger::watch::Watches> {
    let local_repos = dispatcher
        .workers()
        .filter_map(|w| {
            crate::trigger::watch::local_repo_dir(&w.repo.url).map(|d| (w.repo.url.clone(), d))
        })
        .collect();
    match crate::trigger::watch::watch(&ctx.config.path, local_repos, sink, config_changed) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!("cannot watch files ({e}); reload with SIGHUP");
            None
        }
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// SIGTERM or SIGINT.
    async fn terminated(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Terminate,
            _ = self.int.recv() => Signal::Terminate,
            _ = self.hup.recv() => Signal::Hangup,
        }
    }
}

enum Signal {
    Terminate,
    Hangup,
}

/// The app set is known for sure: no fleet, or a fleet read from Git just now.
struct FleetLoad {
    /// The fleet commit last looked at, when there is a fleet.
    revision: Option<String>,
    /// The other repositories the fleet's Applications were read from.
    read: Vec<fleet::Watched>,
    certain: bool,
}

/// Adds the fleet's apps and AppProjects to `node`, logging and counting what is wrong with
/// them.
async fn with_fleet(node: &mut Node, metrics: &Metrics) -> FleetLoad {
    let Some(fleet) = node.config.fleet.clone() else {
        return FleetLoad {
            revision: None,
            read: Vec::new(),
            certain: true,
        };
    };
    let (apps, mut problems) = fleet::load(node, &fleet).await;
    for (name, spec) in &apps.projects {
        let project = crate::policy::Project::from_spec(name, spec);
        problems.extend(project.warnings.iter().cloned());
        node.projects.insert(name.clone(), project);
    }
    let refused = node.config.add_fleet_apps(apps.apps);
    // Removal needs every Application of the commit read and accepted: one refused here
    // (a bad duration, a name in use) is still in the fleet and must not count as departed.
    let certain = apps.fresh && refused.is_empty();
    if !refused.is_empty() && apps.fresh {
        problems.push(
            "fleet apps were refused, so which apps left this node is unknown; nothing is removed this time".into(),
        );
    }
    problems.extend(refused);
    for problem in &problems {
        metrics.error(crate::metrics::ErrorKind::Fleet);
        tracing::warn!("fleet: {problem}");
    }
    node.fleet_problems = problems;
    tracing::info!(revision = %apps.revision, apps = node.config.apps.len(), "fleet loaded");
    FleetLoad {
        revision: Some(apps.seen.unwrap_or(apps.revision)),
        read: apps.read,
        certain,
    }
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for {what} on {addr}: {e}"))
}

fn notify_systemd(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// One repository's worker: a round at start, then whenever a poll or a trigger asks.
#[tracing::instrument(name = "repo", skip_all, fields(url = %crate::model::url::redact(&worker.repo.url)))]
async fn work_repository(
    ctx: Arc<SyncContext>,
    worker: Arc<RepoWorker>,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let interval = worker.repo.poll_interval;
    let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    worker.request(AppSet::All, Duration::ZERO);
    loop {
        let due = worker.due();
        let wait_due = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = worker.woken() => {}
            _ = poll.tick() => worker.request(AppSet::All, worker.jitter()),
            _ = wait_due => {
                if let Some(round) = worker.take_due() {
                    let apps = worker.select(&round.apps);
                    let done =
                        sync_repository(&ctx, &worker.repo, &apps, &shutdown, false, &permits)
                            .await;
                    for (app, delay) in done.follow_ups {
                        worker.request(AppSet::only([app]), delay);
                    }
                    release_freed_memory();
                }
            }
        }
    }
}

/// Gives memory a round freed back to the system, at most every 30 s. glibc keeps what each
/// thread freed in that thread's arena, so after a large round (hundreds of apps rendered and
/// applied at once) the agent stayed at its peak for good; `malloc_trim` releases the free
/// pages of every arena. musl's allocator returns memory by itself.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(30)) {
            return;
        }
        *last = Some(std::time::Instant::now());
        drop(last);
        // It walks every arena under its lock: not on the async workers.
        tokio::task::spawn_blocking(|| {
            extern "C" {
                fn malloc_trim(pad: usize) -> std::ffi::c_int;
            }
            // SAFETY: glibc's malloc_trim takes each arena's lock and only hands free pages
            // back to the kernel; it is safe to call from any thread at any time.
            unsafe {
                malloc_trim(0);
            }
        });
    }
}

/// Keeps glibc's malloc to [`MALLOC_ARENAS`] arenas, before any thread starts. By default
/// each thread that allocates while another holds the lock gets an arena of its own (up to 8
/// per core), and each keeps its own free memory: with 10 apps at rest, six arenas held 3.3 MiB
/// for about 1.8 MiB of live heap. Thread caches (tcache) still serve most small allocations
/// without taking an arena's lock. glibc's own `MALLOC_ARENA_MAX`, when set in the
/// environment, is left to decide.
pub(crate) fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        /// glibc's `M_ARENA_MAX` (malloc.h).
        const M_ARENA_MAX: std::ffi::c_int = -8;
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        // SAFETY: mallopt only sets a parameter of glibc's allocator; M_ARENA_MAX is one it
        // documents, and this runs on the main thread before the runtime starts others.
        unsafe {
            mallopt(M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

/// How many malloc arenas the agent's threads share (see [`limit_malloc_arenas`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_ARENAS: std::ffi::c_int = 2;

/// What a round of one repository left to do.
#[derive(Debug, Default)]
pub(crate) struct Round {
    /// Apps that failed.
    pub(crate) failed: usize,
    /// Apps held by a sync window, a retry backoff or a rolled-back revision.
    pub(crate) held: usize,
    /// Apps to look at again later: retries and closed sync windows.
    pub(crate) follow_ups: Vec<(String, Duration)>,
}

/// Syncs the given apps of one repository: one ls-remote (which fetches what the apps' branches
/// moved to), then the apps concurrently within `permits`.
pub(crate) async fn sync_repository(
    ctx: &Arc<SyncContext>,
    repo: &RepositoryConfig,
    apps: &[AppConfig],
    shutdown: &watch::Receiver<bool>,
    force: bool,
    permits: &Arc<Semaphore>,
) -> Round {
    ctx.metrics.round();
    let wanted = apps
        .iter()
        .filter(|a| a.chart.is_none())
        .map(|a| a.revision.clone())
        .collect();
    let refs = match ctx.remote_refs_fetching(repo, wanted).await {
        Ok(refs) => refs,
        Err(e) => {
            ctx.metrics.error(e.metric_label());
            tracing::warn!(repo = %crate::model::url::redact(&repo.url), error = %e, kind = e.metric_label().label(),
                "cannot list remote refs; keeping the last applied state");
            for app in apps {
                ctx.board.unreachable(&app.name, &e.to_string());
            }
            return Round {
                failed: apps.len(),
                held: 0,
                follow_ups: Vec::new(),
            };
        }
    };
    let mut failed = 0;
    let mut held = 0;
    let mut follow_ups = Vec::new();
    let mut in_use = Vec::new();
    let mut running = JoinSet::new();
    for app in apps {
        if *shutdown.borrow() {
            break;
        }
        let resolved = match ctx.resolve(repo, &refs, app).await {
            Ok(target) => ctx.resolve_sources(app, &refs, target).await,
            Err(e) => Err(e),
        };
        let target = match resolved {
            Ok(target) => target,
            Err(e) => {
                failed += 1;
                ctx.board.unreachable(&app.name, &e.to_string());
                report(ctx, app, Err(e));
                continue;
            }
        };
        let git_target = target.revision();
        let (target, stage_holds) = match ctx.gated(repo, app, target).await {
            gates::Gated::Run { target, held } => (target, held),
            gates::Gated::Keep { reason } => {
                // Until the hub's gate says otherwise, what runs stays; a new gate syncs again.
                held += 1;
                ctx.board.waiting(&app.name, &git_target, &reason);
                continue;
            }
        };
        // What runs (the Git target, or the older one its stage holds it at); a gated app
        // that keeps what runs needs only its last applied revision, kept anyway.
        in_use.extend(target.revision().split('+').map(str::to_string));
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (ctx, app) = (ctx.clone(), app.clone());
        running.spawn(async move {
            let result = ctx.sync_app(&app, &target, force).await;
            drop(permit);
            (app, result, stage_holds.map(|reason| (git_target, reason)))
        });
    }
    while let Some(joined) = running.join_next().await {
        match joined {
            Ok((app, result, gate_held)) => {
                let later = match &result {
                    Ok(SyncResult::Waiting { retry_in, .. }) => *retry_in,
                    Err(_) => ctx.retries.retry_in(&app.name, std::time::Instant::now()),
                    Ok(_) => None,
                };
                if let Some(delay) = later {
                    follow_ups.push((app.name.clone(), delay));
                }
                if result.is_err() {
                    failed += 1;
                }
                if matches!(result, Ok(SyncResult::Waiting { .. })) {
                    held += 1;
                }
                let applied = result.is_ok();
                report(ctx, &app, result);
                // Held back by its stage: the older revision runs, and the app says why.
                if let (true, Some((git_target, reason))) = (applied, gate_held) {
                    held += 1;
                    ctx.board.waiting(&app.name, &git_target, &reason);
                }
            }
            Err(e) => {
                failed += 1;
                tracing::error!("sync task failed: {e}");
            }
        }
    }
    ctx.retain_snapshots(&repo.url, in_use);
    Round {
        failed,
        held,
        follow_ups,
    }
}

fn report(ctx: &SyncContext, app: &AppConfig, result: Result<SyncResult, SyncError>) {
    match result {
        Ok(SyncResult::Unchanged { revision }) => {
            ctx.metrics.sync(&app.name, "unchanged");
            tracing::debug!(app = %app.name, %revision, "up to date");
        }
        Ok(SyncResult::Applied { revision, objects }) => {
            ctx.metrics.sync(&app.name, "applied");
            tracing::info!(app = %app.name, %revision, objects, "synced");
        }
        Ok(SyncResult::Waiting {
            revision,
            reason,
            retry_in,
        }) => {
            ctx.metrics.sync(&app.name, "waiting");
            tracing::info!(app = %app.name, %revision, retry_in = ?retry_in, "held: {reason}");
        }
        Err(e) => {
            ctx.metrics.sync(&app.name, "failed");
            ctx.metrics.error(e.metric_label());
            tracing::error!(app = %app.name, error = %e, kind = e.metric_label().label(), "sync failed");
        }
    }
}

/// What `edgesync diff` found.
pub(crate) struct DiffReport {
    pub(crate) text: String,
    pub(crate) differs: bool,
}

/// `edgesync diff APP`: the app's current revision (or, without Git, its last applied render)
/// against the cluster, object by object, from server-side dry runs.
pub(crate) async fn diff(mut node: Node, name: &str) -> anyhow::Result<DiffReport> {
    with_fleet(&mut node, &Metrics::default()).await;
    let app = node.config.app(name).cloned().ok_or_else(|| {
        anyhow::anyhow!("no app named {name:?} in {}", node.config.path.display())
    })?;
    let ctx = SyncContext::connect(node, Arc::new(Metrics::default()), None).await?;
    let mut report = DiffReport {
        text: String::new(),
        differs: false,
    };
    let plan = match ctx.target_plan(&app).await {
        Ok((revision, plan)) => {
            report.text.push_str(&format!("# {name} at {revision}\n"));
            plan
        }
        Err(e) => {
            let record = ctx
                .store
                .load_render(name, crate::state::RenderKind::Applied)?
                .ok_or_else(|| {
                    anyhow::anyhow!("{e}; and {name} has no applied render to compare")
                })?;
            report.text.push_str(&format!(
                "# {name}: {e}\n# comparing the last applied render, {}\n",
                record.revision
            ));
            record.plan
        }
    };
    let wanted = report.objects(&ctx, &plan).await;
    report.departed(&ctx, &app, &wanted).await;
    Ok(report)
}

impl DiffReport {
    /// Each object of `plan` against the cluster, by dry run; returns the objects' refs.
    async fn objects(
        &mut self,
        ctx: &SyncContext,
        plan: &crate::apply::Plan,
    ) -> std::collections::HashSet<crate::apply::ObjectRef> {
        use crate::apply::diff as d;
        let mut wanted_refs = std::collections::HashSet::new();
        for object in &plan.objects {
            let label = format!(
                "{}/{}/{}",
                object.api_version(),
                object.kind(),
                match object.namespace().or(plan.default_namespace.as_deref()) {
                    Some(ns) => format!("{ns}/{}", object.name()),
                    None => object.name().to_string(),
                }
            );
            match ctx.cluster.dry_run(object, plan).await {
                Ok((oref, wanted, live)) => {
                    let ignored = d::ignored_pointers(
                        &plan.ignore_differences,
                        object,
                        oref.namespace.as_deref(),
                        live.as_ref(),
                    );
                    let live = live.map(|l| d::normalize(&l, &ignored));
                    let wanted = d::normalize(&wanted, &ignored);
                    if let Some(diff) = d::unified_yaml_diff(&label, live.as_ref(), Some(&wanted)) {
                        self.differs = true;
                        self.text.push_str(&diff);
                    }
                    wanted_refs.insert(oref);
                }
                Err(failure) => {
                    self.differs = true;
                    self.text.push_str(&format!(
                        "# {label} ({}): {}\n",
                        object.origin, failure.message
                    ));
                }
            }
        }
        wanted_refs
    }

    /// Objects the app applied that are no longer wanted: pruned (shown as removed) or kept.
    async fn departed(
        &mut self,
        ctx: &SyncContext,
        app: &AppConfig,
        wanted: &std::collections::HashSet<crate::apply::ObjectRef>,
    ) {
        use crate::apply::diff as d;
        let state = ctx.store.load(&app.name).unwrap_or_default();
        for gone in state.objects.iter().filter(|o| !wanted.contains(*o)) {
            let Ok(Some(live)) = ctx.cluster.get(gone).await else {
                continue;
            };
            if crate::apply::keep_reason(&live, &app.name).is_some() {
                continue;
            }
            self.differs = true;
            if app.prune {
                let label = format!("{}/{}", gone.version, gone);
                if let Some(diff) =
                    d::unified_yaml_diff(&label, Some(&d::normalize(&live, &[])), None)
                {
                    self.text.push_str(&diff);
                }
            } else {
                self.text
                    .push_str(&format!("# {gone}: no longer in Git; kept, prune is off\n"));
            }
        }
    }
}

/// `edgesync sync [APP]`: applies the current revision of one app, or of all apps, once.
/// Returns the number of apps that failed, or that a sync window held.
pub(crate) async fn sync_once(mut node: Node, only: Option<&str>) -> anyhow::Result<usize> {
    let _lock = match crate::state::StateLock::acquire(&node.config.state_dir) {
        Ok(lock) => lock,
        // An agent runs on this state directory: it does the sync (its apps have one writer).
        Err(crate::state::StateError::Locked { path }) => {
            tracing::info!(state_dir = %path.display(), "an agent holds the state directory; asking it to sync");
            return Ok(control::ask_agent(&path, only).await?);
        }
        Err(e) => return Err(e.into()),
    };
    with_fleet(&mut node, &Metrics::default()).await;
    if let Some(name) = only {
        if node.config.app(name).is_none() {
            anyhow::bail!("no app named {name:?} in {}", node.config.path.display());
        }
    }
    let ctx = SyncContext::connect(node, Arc::new(Metrics::default()), None).await?;
    let permits = Arc::new(Semaphore::new(ctx.config.max_concurrent_syncs));
    let (_tx, shutdown) = watch::channel(false);
    Ok(manual_sync(&ctx, only, &shutdown, &permits).await)
}

/// A manual sync of `only` (or every app): applies each app's current revision even if it is
/// applied already, and whether or not the app syncs automatically. Returns the number of
/// apps that failed, or that a sync window held (a manual sync that did not happen).
async fn manual_sync(
    ctx: &Arc<SyncContext>,
    only: Option<&str>,
    shutdown: &watch::Receiver<bool>,
    permits: &Arc<Semaphore>,
) -> usize {
    let mut failed = 0;
    for repo in ctx.config.repositories_in_use() {
        let apps: Vec<AppConfig> = ctx
            .config
            .apps
            .iter()
            .filter(|a| a.repo == repo.url && only.is_none_or(|n| n == a.name))
            .cloned()
            .collect();
        if !apps.is_empty() {
            let round = sync_repository(ctx, &repo, &apps, shutdown, true, permits).await;
            failed += round.failed + round.held;
        }
    }
    failed
}
