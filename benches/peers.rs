//! edgesync side by side with its peers (issue 19), on one real control plane, one Git server
//! and the same events, in one run: Flux (source-, kustomize- and notification-controller,
//! built by `bench/peers/build`) and the loop a K3s admin would script (`git fetch` plus
//! `kubectl apply --server-side --prune` with an applyset, on a poll interval).
//!
//! Run with `bench/peers/run` (builds the peers, then `cargo bench --bench peers`). Under
//! `cargo test` it does nothing. Knobs (environment): `PEERS_DIR` (from `bench/peers/build`:
//! Flux and the JGit server), `PEERS_IDLE_SECS` (idle window per peer, default 300),
//! `PEERS_EVENTS` (pushes per peer, default 100; the kubectl loop gets a fifth), `PEERS_APPS`
//! (the large fleet, default 500 apps of 20 objects; 0 leaves it out), `PEERS_ONLY` (comma list
//! of `edgesync,flux,kubectl`),
//! `PEERS_LOGS` (a directory: edgesync's debug log and each idle window's audit log go there),
//! `EDGESYNC_BIN` (another build of the agent to run, for two builds side by side).
//!
//! Every peer runs alone while it is measured; the others are stopped. The clock for a push
//! starts at the webhook POST (edgesync's generic hook, Flux's `Receiver`; the kubectl loop has
//! none and finds the commit on its next poll) and stops when a watch opened by the benchmark
//! has seen every object of the app with the new revision label.

#[allow(dead_code, unused_imports)]
#[path = "../tests/it/harness/mod.rs"]
mod harness;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Seek};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, PartialObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, watcher};
use sha2::Sha256;

use harness::agent::free_port;
use harness::cluster::cluster;
use harness::http::request;
use harness::{Agent, AgentConfig, GitHttpServer, GitRepo};

const SMALL_OBJECTS: usize = 10;
const LARGE_OBJECTS: usize = 20;
const KUBECTL_INTERVAL_SECS: u64 = 10;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// --- the Git content ------------------------------------------------------------------------

/// `apps/app-NNN/configmaps.yaml` for `apps` apps of `objects` ConfigMaps, all at `rev`.
fn write_fleet(repo: &GitRepo, apps: usize, objects: usize, rev: usize) {
    for a in 0..apps {
        write_app(repo, a, objects, rev);
    }
}

fn write_app(repo: &GitRepo, app: usize, objects: usize, rev: usize) {
    let mut text = String::new();
    for j in 0..objects {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{j}\n  labels:\n    bench: peers\n    rev: v{rev}\ndata:\n  v: \"{rev}\"\n"
        ));
    }
    repo.write(&format!("apps/app-{app:03}/configmaps.yaml"), &text);
}

// --- what the cluster shows -----------------------------------------------------------------

#[derive(Clone)]
struct Seen {
    rev: String,
    version: String,
    uid: String,
}

/// One cluster-wide metadata watch of the benchmark's ConfigMaps: namespace -> name -> seen.
#[derive(Clone)]
struct Tracker {
    objects: Arc<Mutex<BTreeMap<String, HashMap<String, Seen>>>>,
    changed: Arc<tokio::sync::Notify>,
}

impl Tracker {
    async fn start(client: kube::Client) -> Tracker {
        let tracker = Tracker {
            objects: Arc::default(),
            changed: Arc::default(),
        };
        let api: Api<PartialObjectMeta<ConfigMap>> = Api::all(client);
        let config = watcher::Config::default().labels("bench=peers");
        let t = tracker.clone();
        tokio::spawn(async move {
            let mut stream = watcher(api, config).boxed();
            while let Some(event) = stream.next().await {
                let Ok(event) = event else { continue };
                let (meta, present) = match event {
                    watcher::Event::Apply(o) | watcher::Event::InitApply(o) => (o.metadata, true),
                    watcher::Event::Delete(o) => (o.metadata, false),
                    _ => continue,
                };
                let ns = meta.namespace.clone().unwrap_or_default();
                let name = meta.name.clone().unwrap_or_default();
                let mut objects = t.objects.lock().unwrap();
                let in_ns = objects.entry(ns).or_default();
                if present {
                    let rev = meta
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("rev").cloned())
                        .unwrap_or_default();
                    in_ns.insert(
                        name,
                        Seen {
                            rev,
                            version: meta.resource_version.unwrap_or_default(),
                            uid: meta.uid.unwrap_or_default(),
                        },
                    );
                } else {
                    in_ns.remove(&name);
                }
                drop(objects);
                t.changed.notify_waiters();
            }
        });
        tracker
    }

    /// Objects in namespaces starting with `prefix` whose `rev` label is `rev`.
    fn count(&self, prefix: &str, rev: &str) -> usize {
        let objects = self.objects.lock().unwrap();
        objects
            .range(prefix.to_string()..)
            .take_while(|(ns, _)| ns.starts_with(prefix))
            .map(|(_, in_ns)| in_ns.values().filter(|s| s.rev == rev).count())
            .sum()
    }

    fn get(&self, ns: &str, name: &str) -> Option<Seen> {
        let objects = self.objects.lock().unwrap();
        objects.get(ns).and_then(|m| m.get(name)).cloned()
    }

    /// Waits (checking after each change, at most every 2 ms) until `done` holds.
    async fn until(&self, what: &str, timeout: Duration, done: impl Fn(&Tracker) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if done(self) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}");
            let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), changed).await;
            // Spaces checks over a storm of events (10,000 objects at 500 apps) without
            // adding more than 2 ms to a push's figure (20 ms before 2026-12-01).
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

// --- processes ------------------------------------------------------------------------------

/// A process and every process below it, from /proc.
fn tree(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Some(ppid) = stat(pid).map(|f| f.ppid) {
                parents.push((pid, ppid));
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

struct Stat {
    ppid: u32,
    /// utime + stime + cutime + cstime, in clock ticks.
    cpu_ticks: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some(Stat {
        ppid: n(1) as u32,
        cpu_ticks: n(11) + n(12) + n(13) + n(14),
    })
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn ticks_per_second() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output();
    out.ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    if let Some(text) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// --- the peers ------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Edgesync,
    Flux,
    Kubectl,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Edgesync => "edgesync",
            Kind::Flux => "flux",
            Kind::Kubectl => "kubectl",
        }
    }
    fn prefix(self) -> &'static str {
        match self {
            Kind::Edgesync => "es",
            Kind::Flux => "fx",
            Kind::Kubectl => "kl",
        }
    }
    /// How its API requests are told apart in the audit log (user agent up to the first '/').
    fn agents(self) -> &'static [&'static str] {
        match self {
            Kind::Edgesync => &["edgesync"],
            Kind::Flux => &[
                "source-controller",
                "kustomize-controller",
                "notification-controller",
            ],
            Kind::Kubectl => &["kubectl"],
        }
    }
}

struct Fleet<'a> {
    /// `10` or `500`: part of every namespace and Flux object name.
    phase: String,
    apps: usize,
    url: String,
    work: &'a Path,
}

impl Fleet<'_> {
    fn namespace(&self, kind: Kind, app: usize) -> String {
        format!("{}-{}-{app:03}", kind.prefix(), self.phase)
    }
    fn prefix(&self, kind: Kind) -> String {
        format!("{}-{}-", kind.prefix(), self.phase)
    }
}

const HOOK_SECRET: &str = "bench-secret";

struct Running {
    kind: Kind,
    children: Vec<Child>,
    agent: Option<Agent>,
    /// The agent's config and state directory, removed when dropped.
    _config: Option<AgentConfig>,
    /// Where a push is announced: edgesync's hook port, or Flux's receiver URL path and port.
    hook: Option<(u16, String)>,
    kubeconfig: PathBuf,
    phase: String,
}

impl Running {
    fn roots(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.children.iter().map(|c| c.id()).collect();
        if let Some(agent) = &self.agent {
            pids.push(agent.pid());
        }
        pids
    }

    /// RSS summed over every process of the peer (a loop's children included).
    fn rss_kib(&self) -> u64 {
        self.roots().into_iter().flat_map(tree).map(rss_kib).sum()
    }

    /// CPU ticks used so far by the peer's processes and their reaped children.
    fn cpu_ticks(&self) -> u64 {
        self.roots()
            .into_iter()
            .flat_map(tree)
            .filter_map(stat)
            .map(|s| s.cpu_ticks)
            .sum()
    }

    async fn announce(&self, url: &str) {
        let Some((port, path)) = &self.hook else {
            return;
        };
        match self.kind {
            Kind::Edgesync => {
                let payload = format!(r#"{{"repo":"{url}","revision":"main"}}"#);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let mut mac = Hmac::<Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
                mac.update(format!("{now}.{payload}").as_bytes());
                let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
                static DELIVERY: std::sync::atomic::AtomicUsize =
                    std::sync::atomic::AtomicUsize::new(0);
                let id = DELIVERY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let headers = [
                    ("x-edgesync-delivery", format!("bench-{id}")),
                    ("x-edgesync-timestamp", now.to_string()),
                    ("x-edgesync-signature", signature),
                ];
                let reply = request(*port, "POST", path, &headers, payload.as_bytes()).await;
                assert_eq!(reply.status, 202, "{}", reply.body);
            }
            Kind::Flux => {
                let reply = request(*port, "POST", path, &[], b"{}").await;
                assert!((200..300).contains(&reply.status), "{}", reply.body);
            }
            Kind::Kubectl => {}
        }
    }

    /// edgesync only: stops the agent and starts it again on its state, `times` times; the
    /// time from start to `READY=1`, and the patches (applies) it sent within 5 s of it.
    async fn restarts(&mut self, times: usize) -> (String, usize) {
        let mut ready = Vec::new();
        let mut patches = 0;
        for i in 0..times {
            let (Some(agent), Some(config)) = (self.agent.take(), self._config.as_ref()) else {
                break;
            };
            keep_log(&self.phase, &agent);
            let _ = agent.stop().await;
            let socket_path = config.dir().join(format!("notify-{i}.sock"));
            let socket = tokio::net::UnixDatagram::bind(&socket_path).expect("notify socket");
            let audit = audit_offset();
            let t0 = Instant::now();
            let agent =
                Agent::start_with_env(config, &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())]);
            let mut buf = vec![0u8; 4096];
            loop {
                let n = tokio::time::timeout(Duration::from_secs(60), socket.recv(&mut buf))
                    .await
                    .expect("READY=1 within a minute")
                    .expect("notify socket");
                if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                    break;
                }
            }
            ready.push(t0.elapsed().as_secs_f64());
            tokio::time::sleep(Duration::from_secs(5)).await;
            patches += audit_since(audit, Kind::Edgesync.agents())
                .get("patch")
                .copied()
                .unwrap_or(0);
            self.agent = Some(agent);
        }
        (latencies(&mut ready), patches)
    }

    async fn stop(mut self) {
        if self.kind == Kind::Flux {
            // The controllers remove their finalizers; they must still run for the deletes.
            // Best effort: the next phase's objects have other names, so leftovers only
            // cost the next controllers a little work.
            for what in ["kustomizations", "gitrepositories", "receivers"] {
                let done = Command::new("kubectl")
                    .arg("--kubeconfig")
                    .arg(&self.kubeconfig)
                    .args(["delete", what, "-n", "flux-system", "-l"])
                    .arg(format!("bench-phase={}", self.phase))
                    .args(["--wait=true", "--timeout=180s"])
                    .stdout(Stdio::null())
                    .status();
                if !done.is_ok_and(|s| s.success()) {
                    eprintln!(
                        "flux: could not delete every {what} of phase {}",
                        self.phase
                    );
                }
            }
        }
        if let Some(agent) = self.agent.take() {
            keep_log(&self.phase, &agent);
            let _ = agent.stop().await;
        }
        for child in &mut self.children {
            // The loop's kubectl and git children die with its process group.
            let _ = rustix::process::kill_process_group(
                rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
                rustix::process::Signal::TERM,
            );
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// PEERS_LOGS=DIR keeps the agent's debug log for a look at where time goes: each run of the
/// agent in a phase (restarts included) is appended to `edgesync-PHASE.log`.
fn keep_log(phase: &str, agent: &Agent) {
    use std::io::Write;
    let Some(dir) = std::env::var_os("PEERS_LOGS") else {
        return;
    };
    let path = Path::new(&dir).join(format!("edgesync-{phase}.log"));
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = file.write_all(agent.log().as_bytes());
    }
}

async fn start_edgesync(fleet: &Fleet<'_>) -> Running {
    let hook_port = free_port();
    let mut config = AgentConfig::new()
        .section(
            "webhook",
            &format!("listen = \"127.0.0.1:{hook_port}\"\ngeneric_secret_file = \"hook.secret\"\nrate_limit = 1000.0\nrate_burst = 1000"),
        )
        .repository(&format!("url = \"{}\"", fleet.url));
    config.file("hook.secret", &format!("{HOOK_SECRET}\n"));
    for a in 0..fleet.apps {
        config.push_app(&format!(
            "name = \"app-{a:03}\"\nrepo = \"{}\"\nrevision = \"main\"\npath = \"apps/app-{a:03}\"\nnamespace = \"{}\"\nprune = true\nself_heal = true",
            fleet.url,
            fleet.namespace(Kind::Edgesync, a)
        ));
    }
    let agent = Agent::start(&config);
    Running {
        kind: Kind::Edgesync,
        children: Vec::new(),
        agent: Some(agent),
        _config: Some(config),
        hook: Some((hook_port, "/hooks/generic".into())),
        kubeconfig: cluster().kubeconfig.clone(),
        phase: fleet.phase.clone(),
    }
}

fn flux_kubeconfig(work: &Path, name: &str) -> PathBuf {
    let path = work.join(format!("{name}.kubeconfig"));
    std::fs::copy(&cluster().kubeconfig, &path).expect("copy kubeconfig");
    path
}

async fn start_flux(fleet: &Fleet<'_>, peers: &Path, kustomization_interval: &str) -> Running {
    let admin = cluster().kubeconfig.clone();
    let work = fleet.work.join(format!("flux-{}", fleet.phase));
    std::fs::create_dir_all(work.join("storage")).unwrap();
    let storage = free_port();
    let events = free_port();
    let receiver = free_port();
    let mut children = Vec::new();
    let controllers: [(&str, Vec<String>); 3] = [
        (
            "source-controller",
            vec![
                format!("--storage-path={}", work.join("storage").display()),
                format!("--storage-addr=127.0.0.1:{storage}"),
                format!("--storage-adv-addr=127.0.0.1:{storage}"),
                format!("--events-addr=http://127.0.0.1:{events}/"),
            ],
        ),
        (
            "kustomize-controller",
            vec![
                format!("--events-addr=http://127.0.0.1:{events}/"),
                "--no-remote-bases=true".into(),
            ],
        ),
        (
            "notification-controller",
            vec![
                format!("--events-addr=127.0.0.1:{events}"),
                format!("--receiverAddr=127.0.0.1:{receiver}"),
            ],
        ),
    ];
    for (name, args) in controllers {
        let log = std::fs::File::create(work.join(format!("{name}.log"))).unwrap();
        let child = Command::new(peers.join("bin").join(name))
            .env("KUBECONFIG", flux_kubeconfig(&work, name))
            .env("RUNTIME_NAMESPACE", "flux-system")
            .arg("--enable-leader-election=false")
            .arg(format!("--metrics-addr=127.0.0.1:{}", free_port()))
            .arg(format!("--health-addr=127.0.0.1:{}", free_port()))
            .arg("--log-level=info")
            .args(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        children.push(child);
    }
    let phase = &fleet.phase;
    let mut objects = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: receiver-{phase}\n  namespace: flux-system\nstringData:\n  token: {HOOK_SECRET}-{phase}\n---\n\
         apiVersion: source.toolkit.fluxcd.io/v1\nkind: GitRepository\nmetadata:\n  name: fleet-{phase}\n  namespace: flux-system\n  labels: {{bench-phase: \"{phase}\"}}\nspec:\n  interval: 1m\n  url: {}\n  ref:\n    branch: main\n---\n\
         apiVersion: notification.toolkit.fluxcd.io/v1\nkind: Receiver\nmetadata:\n  name: fleet-{phase}\n  namespace: flux-system\n  labels: {{bench-phase: \"{phase}\"}}\nspec:\n  type: generic\n  secretRef:\n    name: receiver-{phase}\n  resources:\n  - apiVersion: source.toolkit.fluxcd.io/v1\n    kind: GitRepository\n    name: fleet-{phase}\n",
        fleet.url
    );
    for a in 0..fleet.apps {
        objects.push_str(&format!(
            "---\napiVersion: kustomize.toolkit.fluxcd.io/v1\nkind: Kustomization\nmetadata:\n  name: app-{phase}-{a:03}\n  namespace: flux-system\n  labels: {{bench-phase: \"{phase}\"}}\nspec:\n  interval: {kustomization_interval}\n  path: ./apps/app-{a:03}\n  prune: true\n  targetNamespace: {}\n  sourceRef:\n    kind: GitRepository\n    name: fleet-{phase}\n",
            fleet.namespace(Kind::Flux, a)
        ));
    }
    kubectl(
        &admin,
        &["apply", "--server-side", "-f", "-"],
        Some(&objects),
    );
    // The receiver's path is in its status once notification-controller has reconciled it.
    let path = harness::eventually("the Flux receiver", Duration::from_secs(120), || {
        let admin = admin.clone();
        let phase = phase.clone();
        async move {
            let out = kubectl(
                &admin,
                &[
                    "get",
                    "receivers",
                    "-n",
                    "flux-system",
                    &format!("fleet-{phase}"),
                    "-o",
                    "jsonpath={.status.webhookPath}",
                ],
                None,
            );
            let out = out.trim().to_string();
            (!out.is_empty()).then_some(out)
        }
    })
    .await;
    Running {
        kind: Kind::Flux,
        children,
        agent: None,
        _config: None,
        hook: Some((receiver, path)),
        kubeconfig: admin,
        phase: phase.clone(),
    }
}

/// The script a K3s admin would write (bench/peers/kubectl-loop).
fn start_kubectl(fleet: &Fleet<'_>) -> Running {
    let work = fleet.work.join(format!("kubectl-{}", fleet.phase));
    std::fs::create_dir_all(&work).unwrap();
    let script = harness::cluster::repo_root().join("bench/peers/kubectl-loop");
    let log = std::fs::File::create(work.join("loop.log")).unwrap();
    let child = Command::new(script)
        .env("KUBECONFIG", &cluster().kubeconfig)
        .arg(&fleet.url)
        .arg(&work)
        .arg(fleet.prefix(Kind::Kubectl))
        .arg(KUBECTL_INTERVAL_SECS.to_string())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("start the kubectl loop");
    Running {
        kind: Kind::Kubectl,
        children: vec![child],
        agent: None,
        _config: None,
        hook: None,
        kubeconfig: cluster().kubeconfig.clone(),
        phase: fleet.phase.clone(),
    }
}

/// Waits until the kubectl loop of `fleet` ends its next round (a line in its log).
async fn round_ended(fleet: &Fleet<'_>) {
    let log = fleet
        .work
        .join(format!("kubectl-{}", fleet.phase))
        .join("loop.log");
    let rounds = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("round done"))
            .count()
    };
    let before = rounds();
    let t0 = Instant::now();
    while rounds() == before {
        assert!(
            t0.elapsed() < Duration::from_secs(3600),
            "the kubectl loop ended no round in an hour"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// --- the API server's audit log -------------------------------------------------------------

fn audit_log() -> PathBuf {
    cluster()
        .kubeconfig
        .parent()
        .unwrap()
        .join("logs/audit.log")
}

fn audit_offset() -> u64 {
    std::fs::metadata(audit_log()).map(|m| m.len()).unwrap_or(0)
}

/// Requests since `from` (a byte offset of the audit log) by verb, of the given user agents.
fn audit_since(from: u64, agents: &[&str]) -> BTreeMap<String, usize> {
    let mut file = std::fs::File::open(audit_log()).expect("audit log");
    file.seek(std::io::SeekFrom::Start(from)).unwrap();
    let mut counts = BTreeMap::new();
    for line in std::io::BufReader::new(file).lines() {
        let Ok(line) = line else { break };
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let agent = event["userAgent"].as_str().unwrap_or("");
        let agent = agent.split('/').next().unwrap_or("");
        if !agents.contains(&agent) {
            continue;
        }
        let verb = event["verb"].as_str().unwrap_or("").to_string();
        let stage = event["stage"].as_str().unwrap_or("");
        // A watch is counted when it starts; everything else when it completes.
        let counted = if verb == "watch" {
            stage == "ResponseStarted"
        } else {
            stage == "ResponseComplete"
        };
        if counted {
            *counts.entry(verb).or_insert(0) += 1;
        }
    }
    counts
}

// --- figures --------------------------------------------------------------------------------

#[derive(Default)]
struct Figures {
    rows: BTreeMap<(usize, &'static str), BTreeMap<&'static str, String>>,
}

/// `values` sorted, and a picker of the value at a fraction of the way through them.
fn sorted(values: &mut [f64]) -> impl Fn(f64) -> f64 + '_ {
    values.sort_by(f64::total_cmp);
    |p: f64| values[((values.len() - 1) as f64 * p).round() as usize]
}

fn summary(values: &mut [f64], unit: &str) -> String {
    if values.is_empty() {
        return "–".into();
    }
    let pick = sorted(values);
    format!(
        "{:.1} {unit} ({:.1}–{:.1})",
        pick(0.5),
        pick(0.0),
        pick(1.0)
    )
}

fn latencies(values: &mut [f64]) -> String {
    if values.is_empty() {
        return "–".into();
    }
    let n = values.len();
    let pick = sorted(values);
    format!(
        "p50 {} · p99 {} · min {} · max {} (n={n})",
        ms(pick(0.5)),
        ms(pick(0.99)),
        ms(pick(0.0)),
        ms(pick(1.0)),
    )
}

fn ms(seconds: f64) -> String {
    if seconds < 10.0 {
        format!("{:.0} ms", seconds * 1000.0)
    } else {
        format!("{seconds:.1} s")
    }
}

/// Idle: RSS every 5 s, CPU and API requests over the whole window, per hour.
async fn idle(peer: &Running, secs: u64, tick: f64) -> BTreeMap<&'static str, String> {
    let mut out = BTreeMap::new();
    let audit = audit_offset();
    let cpu0 = peer.cpu_ticks();
    let t0 = Instant::now();
    let mut rss = Vec::new();
    let mut trend = Vec::new();
    let mut cpu_per_min = Vec::new();
    let mut last = (Instant::now(), cpu0);
    // With PEERS_LOGS, every sample is also written as it is taken (seconds, RSS MiB, CPU
    // seconds so far), so a long soak leaves its figures even if it is stopped.
    let mut samples = std::env::var_os("PEERS_LOGS").and_then(|dir| {
        let name = format!("idle-{}-{}.tsv", peer.kind.name(), peer.phase);
        std::fs::File::create(Path::new(&dir).join(name)).ok()
    });
    while t0.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mib = peer.rss_kib() as f64 / 1024.0;
        rss.push(mib);
        trend.push((t0.elapsed().as_secs_f64() / 3600.0, mib));
        if let Some(file) = samples.as_mut() {
            use std::io::Write;
            let cpu = peer.cpu_ticks().saturating_sub(cpu0) as f64 / tick;
            let _ = writeln!(
                file,
                "{:.0}\t{mib:.2}\t{cpu:.2}",
                t0.elapsed().as_secs_f64()
            );
        }
        if last.0.elapsed() >= Duration::from_secs(60) {
            let now = peer.cpu_ticks();
            cpu_per_min.push((now.saturating_sub(last.1)) as f64 / tick);
            last = (Instant::now(), now);
        }
    }
    let hours = t0.elapsed().as_secs_f64() / 3600.0;
    let cpu = peer.cpu_ticks().saturating_sub(cpu0) as f64 / tick;
    let requests = audit_since(audit, peer.kind.agents());
    if let Some(dir) = std::env::var_os("PEERS_LOGS") {
        // The idle window's slice of the audit log, to see what each request was.
        if let Ok(text) = std::fs::read(audit_log()) {
            let name = format!("audit-{}-{}.log", peer.kind.name(), peer.phase);
            let slice = text.get(audit as usize..).unwrap_or_default();
            let _ = std::fs::write(Path::new(&dir).join(name), slice);
        }
    }
    let total: usize = requests.values().sum();
    out.insert("idle RSS", summary(&mut rss, "MiB"));
    out.insert("idle RSS trend", rss_trend(&trend));
    out.insert(
        "idle CPU s/h",
        format!(
            "{:.1} (per minute: {})",
            cpu / hours,
            summary(&mut cpu_per_min, "s")
        ),
    );
    out.insert(
        "idle API requests/h",
        format!(
            "{:.0} ({})",
            total as f64 / hours,
            requests
                .iter()
                .map(|(v, n)| format!("{v} {:.0}", *n as f64 / hours))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    out
}

/// The first and last RSS samples of an idle window and the least-squares slope through all
/// of them, in MiB per hour (flat is near 0; `PEERS_IDLE_SECS` sets how long it is watched).
fn rss_trend(samples: &[(f64, f64)]) -> String {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return "no samples".into();
    };
    let n = samples.len() as f64;
    let mean_t = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let mean_r = samples.iter().map(|s| s.1).sum::<f64>() / n;
    let cov: f64 = samples
        .iter()
        .map(|s| (s.0 - mean_t) * (s.1 - mean_r))
        .sum();
    let var: f64 = samples.iter().map(|s| (s.0 - mean_t).powi(2)).sum();
    let slope = if var > 0.0 { cov / var } else { 0.0 };
    format!(
        "{:.1} → {:.1} MiB over {:.0} min, slope {slope:+.2} MiB/h",
        first.1,
        last.1,
        last.0 * 60.0
    )
}

/// Commits what the caller wrote, pushes it to the served repository, tells the peer, and
/// returns the seconds until `applied` is done.
async fn push<F, Fut>(
    peer: &Running,
    fleet: &Fleet<'_>,
    repo: &GitRepo,
    bare: &Path,
    message: &str,
    applied: F,
) -> f64
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    repo.commit(message);
    repo.push_to(bare);
    let t0 = Instant::now();
    peer.announce(&fleet.url).await;
    applied().await;
    t0.elapsed().as_secs_f64()
}

async fn push_events(
    peer: &Running,
    fleet: &Fleet<'_>,
    repo: &GitRepo,
    bare: &Path,
    tracker: &Tracker,
    events: usize,
    rev: &mut usize,
) -> String {
    let ns = fleet.namespace(peer.kind, 0);
    let mut times = Vec::new();
    for _ in 0..events {
        *rev += 1;
        write_app(repo, 0, SMALL_OBJECTS, *rev);
        let want = format!("v{rev}");
        let took = push(peer, fleet, repo, bare, &format!("push {rev}"), || async {
            tracker
                .until("a push applied", Duration::from_secs(180), |t| {
                    t.count(&ns, &want) == SMALL_OBJECTS
                })
                .await
        })
        .await;
        times.push(took);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    latencies(&mut times)
}

async fn self_heal(
    peer: &Running,
    fleet: &Fleet<'_>,
    tracker: &Tracker,
    samples: usize,
    rev: usize,
) -> (String, String) {
    let ns = fleet.namespace(peer.kind, 0);
    let api: Api<ConfigMap> = Api::namespaced(cluster().client().await, &ns);
    let want = format!("v{rev}");
    let edit = PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..Default::default()
    };
    let (mut edits, mut deletes) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let patch = serde_json::json!({"metadata": {"labels": {"rev": format!("edited-{i}")}}});
        let t0 = Instant::now();
        let edited = api
            .patch("cm-0", &edit, &Patch::Merge(&patch))
            .await
            .expect("edit");
        let version = edited.metadata.resource_version.unwrap_or_default();
        tracker
            .until("an edit reverted", Duration::from_secs(900), |t| {
                // Resource versions are etcd revisions here: only a write after the edit counts.
                t.get(&ns, "cm-0").is_some_and(|s| {
                    s.rev == want && s.version.parse::<u64>().ok() > version.parse::<u64>().ok()
                })
            })
            .await;
        edits.push(t0.elapsed().as_secs_f64());
        let uid = tracker.get(&ns, "cm-1").map(|s| s.uid).unwrap_or_default();
        let t0 = Instant::now();
        api.delete("cm-1", &DeleteParams::default())
            .await
            .expect("delete");
        tracker
            .until("a deletion restored", Duration::from_secs(900), |t| {
                t.get(&ns, "cm-1")
                    .is_some_and(|s| s.rev == want && s.uid != uid)
            })
            .await;
        deletes.push(t0.elapsed().as_secs_f64());
    }
    (latencies(&mut edits), latencies(&mut deletes))
}

// --- the Git server -------------------------------------------------------------------------

/// Serves the bare repositories under a directory over smart HTTP: JGit's servlet in Jetty
/// (bench/peers/jgit, built by `bench/peers/build`), which answers each request in its own
/// process, where `git http-backend` starts a CGI program and `git upload-pack` per request
/// (about 25 ms of a push's 50 ms of Git work here). Without `PEERS_DIR` the test harness's
/// `git http-backend` serves instead, and the run says so.
enum GitServer {
    JGit { port: u16, child: Child },
    Cgi(GitHttpServer),
}

impl GitServer {
    async fn start(peers: &Path, root: &Path) -> GitServer {
        let dir = peers.join("git-server");
        if !dir.join("git-server-1.jar").exists() {
            eprintln!(
                "peers: Git server: git http-backend (CGI), as PEERS_DIR holds no JGit server; \
                 push figures are not comparable with a run of bench/peers/run"
            );
            return GitServer::Cgi(GitHttpServer::start(root, None).await);
        }
        let classpath = format!(
            "{}:{}/*",
            dir.join("git-server-1.jar").display(),
            dir.join("lib").display()
        );
        let mut child = Command::new("java")
            .args(["-Xmx256m", "-cp", &classpath, "edgesync.bench.GitServer"])
            .arg(root)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start the JGit server (java)");
        let stdout = child.stdout.take().unwrap();
        let port = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .unwrap();
            line.trim().parse::<u16>().expect("JGit server's port")
        })
        .await
        .unwrap();
        eprintln!("peers: Git server: JGit smart HTTP on port {port}");
        let server = GitServer::JGit { port, child };
        server.warm_up(root);
        server
    }

    /// Serves a scratch repository's pushes to a `git fetch` 100 times, so the first peer
    /// measured meets a Java server as warm (compiled) as the later ones do.
    fn warm_up(&self, root: &Path) {
        let repo = GitRepo::new();
        repo.write("warm", "0");
        repo.commit("warm 0");
        let bare = repo.bare_clone_into(root, "warm-up");
        let clone = tempfile::tempdir().unwrap();
        let dest = clone.path().join("warm-up");
        let ok = Command::new("git")
            .args(["clone", "-q", "--depth", "1", &self.url("warm-up")])
            .arg(&dest)
            .status()
            .unwrap();
        assert!(ok.success(), "clone from the JGit server");
        for i in 1..=100 {
            repo.write("warm", &i.to_string());
            repo.commit(&format!("warm {i}"));
            repo.push_to(&bare);
            let ok = Command::new("git")
                .args(["fetch", "-q", "origin"])
                .current_dir(&dest)
                .status()
                .unwrap();
            assert!(ok.success(), "fetch from the JGit server");
        }
    }

    fn url(&self, name: &str) -> String {
        match self {
            GitServer::JGit { port, .. } => format!("http://127.0.0.1:{port}/{name}.git"),
            GitServer::Cgi(server) => server.url(name),
        }
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        if let GitServer::JGit { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn create_namespaces(fleet: &Fleet<'_>, kind: Kind) {
    let api: Api<Namespace> = Api::all(cluster().client().await);
    let names: Vec<String> = (0..fleet.apps).map(|a| fleet.namespace(kind, a)).collect();
    futures::stream::iter(names)
        .for_each_concurrent(16, |name| {
            let api = api.clone();
            async move {
                let ns: Namespace =
                    serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))
                        .unwrap();
                match api.create(&PostParams::default(), &ns).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => panic!("namespace {name}: {e}"),
                }
            }
        })
        .await;
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // Flux and the JGit server come from the peers' builds; without them edgesync and the
    // kubectl loop run against `git http-backend`.
    let peers = PathBuf::from(std::env::var("PEERS_DIR").unwrap_or_default());
    let idle_secs = env_num("PEERS_IDLE_SECS", 300) as u64;
    let events = env_num("PEERS_EVENTS", 100);
    let large = env_num("PEERS_APPS", 500);
    let only = std::env::var("PEERS_ONLY").unwrap_or_else(|_| "edgesync,flux,kubectl".into());
    let kinds: Vec<Kind> = [Kind::Edgesync, Kind::Flux, Kind::Kubectl]
        .into_iter()
        .filter(|k| only.split(',').any(|o| o.trim() == k.name()))
        .collect();
    if let Some(bin) = std::env::var_os("EDGESYNC_BIN") {
        let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
        eprintln!(
            "peers: edgesync binary {} ({:.2} MiB)",
            PathBuf::from(bin).display(),
            size as f64 / 1048576.0
        );
    }
    // The agents run as the package runs them: a developer's RUST_BACKTRACE makes every error
    // capture a stack (a few hundred KiB of heap once one is printed).
    std::env::remove_var("RUST_BACKTRACE");
    // Every verb is audited, so requests can be counted per peer.
    std::env::set_var("EDGESYNC_CLUSTER_AUDIT", "all");
    let admin = cluster().kubeconfig.clone();
    let tick = ticks_per_second();
    let client = cluster().client().await;
    let tracker = Tracker::start(client).await;
    // Flux's CRDs and namespace, only when Flux runs (PEERS_DIR may be unset otherwise).
    if kinds.contains(&Kind::Flux) {
        assert!(
            peers.join("crds").exists(),
            "PEERS_DIR (run bench/peers/run, or bench/peers/build) is needed to run Flux"
        );
        kubectl(
            &admin,
            &[
                "apply",
                "--server-side",
                "-f",
                &peers.join("crds").display().to_string(),
            ],
            None,
        );
        kubectl(
            &admin,
            &["apply", "--server-side", "-f", "-"],
            Some("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: flux-system\n"),
        );
        eprintln!("peers: CRDs applied");
    }
    let work = tempfile::tempdir().unwrap();
    let served = tempfile::tempdir().unwrap();
    let git = GitServer::start(&peers, served.path()).await;
    let mut figures = Figures::default();

    // --- 10 apps of 10 objects: idle, pushes, self-heal --------------------------------
    let repo = GitRepo::new();
    write_fleet(&repo, 10, SMALL_OBJECTS, 0);
    repo.commit("fleet of 10");
    let bare = repo.bare_clone_into(served.path(), "small");
    let mut rev = 0;
    for &kind in &kinds {
        let fleet = Fleet {
            phase: "10".into(),
            apps: 10,
            url: git.url("small"),
            work: work.path(),
        };
        create_namespaces(&fleet, kind).await;
        // Every app at one revision, whatever the pushes for the last peer changed.
        rev += 1;
        write_fleet(&repo, 10, SMALL_OBJECTS, rev);
        repo.commit(&format!("fleet of 10 at {rev}"));
        repo.push_to(&bare);
        let want = format!("v{rev}");
        let t0 = Instant::now();
        let peer = match kind {
            Kind::Edgesync => start_edgesync(&fleet).await,
            Kind::Flux => start_flux(&fleet, &peers, "10m").await,
            Kind::Kubectl => start_kubectl(&fleet),
        };
        let prefix = fleet.prefix(kind);
        tracker
            .until("10 apps applied", Duration::from_secs(600), |t| {
                t.count(&prefix, &want) == 10 * SMALL_OBJECTS
            })
            .await;
        eprintln!("{}: 10 apps applied in {:?}", kind.name(), t0.elapsed());
        let row = figures.rows.entry((10, kind.name())).or_default();
        row.insert("first sync", ms(t0.elapsed().as_secs_f64()));
        // Settle (first reconciles, health rated, watches up), then idle.
        tokio::time::sleep(Duration::from_secs(45)).await;
        let idle_figures = idle(&peer, idle_secs, tick).await;
        eprintln!("{}: idle {:?}", kind.name(), idle_figures);
        row.extend(idle_figures);
        let n = if kind == Kind::Kubectl {
            (events / 5).max(1)
        } else {
            events
        };
        let pushes = push_events(&peer, &fleet, &repo, &bare, &tracker, n, &mut rev).await;
        eprintln!("{}: push to applied {pushes}", kind.name());
        row.insert("push to applied", pushes);
        let samples = if kind == Kind::Edgesync { 10 } else { 3 };
        if kind == Kind::Flux {
            // Flux corrects drift at the Kustomization's next interval: measured at 1m, the
            // shortest commonly configured (the 10m default would take ten times as long).
            kubectl(
                &admin,
                &[
                    "patch",
                    "kustomizations",
                    "-n",
                    "flux-system",
                    "app-10-000",
                    "--type=merge",
                    "-p",
                    r#"{"spec":{"interval":"1m"}}"#,
                ],
                None,
            );
            // Let the reconcile the patch itself causes pass before the first edit.
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        let (edit, delete) = self_heal(&peer, &fleet, &tracker, samples, rev).await;
        eprintln!("{}: self-heal edit {edit}, delete {delete}", kind.name());
        row.insert("self-heal edit", edit);
        row.insert("self-heal delete", delete);
        if kind == Kind::Edgesync {
            let mut peer = peer;
            let (ready, patches) = peer.restarts(5).await;
            eprintln!("edgesync: restart to READY=1 {ready}; patches after restarts: {patches}");
            row.insert("restart to READY=1", ready);
            row.insert("patches sent by 5 restarts", patches.to_string());
            peer.stop().await;
        } else {
            peer.stop().await;
        }
    }

    // PEERS_APPS=0 leaves the large fleet out (a long idle soak of the small one).
    if large > 0 {
        // --- 500 apps of 20 objects: first sync, idle memory, a commit touching all ---------
        let repo = GitRepo::new();
        write_fleet(&repo, large, LARGE_OBJECTS, 0);
        repo.commit("large fleet");
        let name = "large".to_string();
        let bare = repo.bare_clone_into(served.path(), &name);
        let mut rev = 0;
        for &kind in &kinds {
            let fleet = Fleet {
                phase: large.to_string(),
                apps: large,
                url: git.url(&name),
                work: work.path(),
            };
            create_namespaces(&fleet, kind).await;
            let prefix = fleet.prefix(kind);
            let total = large * LARGE_OBJECTS;
            let want = format!("v{rev}");
            let t0 = Instant::now();
            let peer = match kind {
                Kind::Edgesync => start_edgesync(&fleet).await,
                Kind::Flux => start_flux(&fleet, &peers, "10m").await,
                Kind::Kubectl => start_kubectl(&fleet),
            };
            tracker
                .until("the large fleet applied", Duration::from_secs(3600), |t| {
                    t.count(&prefix, &want) == total
                })
                .await;
            let first = t0.elapsed().as_secs_f64();
            eprintln!("{}: {large} apps applied in {first:.1} s", kind.name());
            let row = figures.rows.entry((large, kind.name())).or_default();
            row.insert("first sync", ms(first));
            tokio::time::sleep(Duration::from_secs(20)).await;
            let idle_figures = idle(&peer, (idle_secs / 2).max(30), tick).await;
            eprintln!("{}: idle {:?}", kind.name(), idle_figures);
            row.extend(idle_figures);
            rev += 1;
            write_fleet(&repo, large, LARGE_OBJECTS, rev);
            let want = format!("v{rev}");
            if kind == Kind::Kubectl {
                // A round over 500 apps takes about 14 minutes; a commit landing mid-round waits
                // for the next whole one (up to 28 minutes). It lands as a round ends instead: the
                // loop's best case, one interval plus one round.
                round_ended(&fleet).await;
            }
            let all = push(
                &peer,
                &fleet,
                &repo,
                &bare,
                &format!("touch all {rev}"),
                || async {
                    tracker
                        .until("a commit to all applied", Duration::from_secs(3600), |t| {
                            t.count(&prefix, &want) == total
                        })
                        .await
                },
            )
            .await;
            eprintln!("{}: commit to all applied in {all:.1} s", kind.name());
            row.insert("commit to all applied", ms(all));
            peer.stop().await;
        }
    }

    println!(
        "machine: {}; idle window {idle_secs} s (large fleet: half); kubectl loop every {KUBECTL_INTERVAL_SECS} s",
        harness::machine()
    );
    for ((apps, peer), row) in &figures.rows {
        println!("\n### {peer}, {apps} apps");
        for (what, value) in row {
            println!("- {what}: {value}");
        }
    }
}
