//! The fleet simulator (issue 20): the `edgesync-hub` binary with SQLite or PostgreSQL (Debian's,
//! started here on a free port) on one real Mosquitto,
//! and N simulated agents speaking the agents' status and gate protocol (retained node and app
//! documents, numbered events, the online flag; signed gates followed by stage), multiplexed
//! over a few MQTT connections so that 10,000 nodes fit one machine. For each store and fleet
//! size it prints the ingest rate, the hub's memory and CPU at rest, a three-stage rollout's
//! time and the time from a spent failure budget to the halt.
//!
//! `cargo bench -p edgesync-hub --bench fleet`. Knobs: `FLEET_NODES` (sizes, default
//! `1000,10000`), `FLEET_STORES` (default `sqlite,postgresql`), `FLEET_IDLE_SECS` (the window
//! at rest, default 60), `FLEET_BAKE_SECS` (each
//! stage's bake, default 5), `FLEET_CONNECTIONS` (default 16). A simulated node answers a gate
//! at once; a real agent fetches, renders and applies first (issue 19's figures).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgesync_proto::Gate;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

#[path = "../tests/support/mod.rs"]
mod support;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn unix_now() -> u64 {
    edgesync_hub::unix_now()
}

/// The hub as a process of its own, so its memory and CPU are its own.
struct Hub {
    child: Child,
    port: u16,
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TOKEN: &str = "fleet-bench-token-0123456789";

impl Hub {
    /// `store`: the `[store]` section's body.
    fn start(dir: &Path, broker: u16, bake: u64, store: &str) -> Hub {
        let key = ssh_key::PrivateKey::random(&mut rand_core::OsRng, ssh_key::Algorithm::Ed25519)
            .expect("key");
        let key_file = dir.join("hub-key");
        key.write_openssh_file(&key_file, ssh_key::LineEnding::LF)
            .expect("key file");
        let policy = dir.join("policy.yaml");
        std::fs::write(
            &policy,
            format!(
                "apiVersion: edgesync.io/v1alpha1\nkind: RolloutPolicy\nmetadata: {{name: default}}\nspec:\n  stages:\n    - {{name: canary, share: 1%, bake: {bake}s}}\n    - {{name: tenth, share: 9%, bake: {bake}s}}\n    - {{name: rest, share: 90%}}\n  failureBudget: {{share: 10%}}\n  onFailure: halt\n"
            ),
        )
        .expect("policy");
        let token = dir.join("token");
        std::fs::write(&token, TOKEN).expect("token");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let config = dir.join("hub.toml");
        std::fs::write(
            &config,
            format!(
                "[mqtt]\nhost = \"127.0.0.1\"\nport = {broker}\nclient_id = \"hub-bench\"\n\n[store]\n{store}\n\n[http]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"{}\"\n\n[gates]\nkey_file = \"{}\"\npolicies = [\"{}\"]\n",
                token.display(),
                key_file.display(),
                policy.display()
            ),
        )
        .expect("config");
        let child = Command::new(env!("CARGO_BIN_EXE_edgesync-hub"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "edgesync_hub=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("hub.log")).expect("log"))
            .spawn()
            .expect("edgesync-hub");
        let hub = Hub { child, port };
        let t0 = Instant::now();
        while hub.get("/api/v1/fleet").is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the hub never listened"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        hub
    }

    fn get(&self, path: &str) -> Option<String> {
        let mut reply = ureq::get(&format!("http://127.0.0.1:{}{path}", self.port))
            .call()
            .ok()?;
        reply.body_mut().read_to_string().ok()
    }

    fn rollout(&self, revision: &str, previous: &str) {
        let body = serde_json::json!({"app": "web", "revision": revision, "previous": previous});
        let reply = ureq::post(&format!("http://127.0.0.1:{}/api/v1/rollouts", self.port))
            .header("authorization", &format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .send(body.to_string());
        if let Err(e) = reply {
            panic!("POST /api/v1/rollouts: {e}");
        }
    }

    /// Messages the hub has taken from the broker (stored, duplicate, stale, refused).
    fn ingested(&self) -> u64 {
        let text = self.get("/metrics").unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with("edgesync_hub_messages{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    fn phase(&self) -> String {
        let list: serde_json::Value = self
            .get("/api/v1/rollouts")
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        list.as_array()
            .and_then(|l| l.iter().find(|r| r["app"] == "web"))
            .map(|r| format!("{} {}", r["phase"], r["revision"]))
            .unwrap_or_default()
    }

    /// Resident memory in KiB and CPU seconds so far, from /proc.
    fn usage(&self) -> (u64, f64) {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis: utime and stime are 14th and 15th.
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = fields
            .get(11..13)
            .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
            .unwrap_or_default();
        (rss, ticks as f64 / 100.0)
    }
}

/// The simulated fleet: node names, their revision of app `web`, and the connections they
/// publish over.
struct Fleet {
    names: Vec<String>,
    clients: Vec<AsyncClient>,
    /// Per node: the next number of its documents and of its events.
    seq: Mutex<Vec<u64>>,
    /// What each node runs, and the revision that goes Degraded.
    running: Mutex<(Vec<String>, Option<String>)>,
}

impl Fleet {
    async fn connect(port: u16, nodes: usize, connections: usize) -> Arc<Fleet> {
        let mut clients = Vec::new();
        for i in 0..connections {
            let mut options = MqttOptions::new(format!("sim-{i}"), "127.0.0.1", port);
            options.set_keep_alive(Duration::from_secs(60));
            let (client, mut events) = AsyncClient::new(options, 1024);
            tokio::spawn(async move { while events.poll().await.is_ok() {} });
            clients.push(client);
        }
        Arc::new(Fleet {
            names: (0..nodes).map(|i| format!("sim-{i:05}")).collect(),
            clients,
            seq: Mutex::new(vec![1; nodes]),
            running: Mutex::new((vec!["r0".to_string(); nodes], None)),
        })
    }

    fn next_seq(&self, i: usize) -> u64 {
        let mut seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        let n = seq[i];
        seq[i] += 1;
        n
    }

    fn health(&self, revision: &str) -> &'static str {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.1.as_deref() == Some(revision) {
            "Degraded"
        } else {
            "Healthy"
        }
    }

    /// Node `i` says everything an agent says at start: online, its node document, its app
    /// document and an event. Four messages.
    async fn introduce(&self, i: usize) {
        let node = &self.names[i];
        let client = &self.clients[i % self.clients.len()];
        let prefix = format!("edgesync/nodes/{node}");
        let revision = self.revision(i);
        let health = self.health(&revision);
        let (seq, now) = (self.next_seq(i), unix_now());
        let status = serde_json::json!({"schema_version": 1, "node": node, "seq": seq,
            "timestamp": now, "labels": {"site": format!("site-{}", i % 50)},
            "apps": [{"app": "web", "revision": revision, "sync": "Synced", "health": health}]});
        let q = QoS::AtLeastOnce;
        let _ = client
            .publish(format!("{prefix}/online"), q, true, "true")
            .await;
        let _ = client
            .publish(format!("{prefix}/status"), q, true, status.to_string())
            .await;
        self.report(i).await;
        let event = serde_json::json!({"schema_version": 1, "node": node, "seq": 1,
            "timestamp": now, "app": "web", "event": "sync_succeeded", "revision": revision,
            "message": "applied 20 objects"});
        let _ = client
            .publish(format!("{prefix}/events"), q, false, event.to_string())
            .await;
    }

    fn revision(&self, i: usize) -> String {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).0[i].clone()
    }

    /// Node `i`'s app document, at what it runs.
    async fn report(&self, i: usize) {
        let node = &self.names[i];
        let revision = self.revision(i);
        let health = self.health(&revision);
        let doc = serde_json::json!({"schema_version": 1, "node": node, "seq": self.next_seq(i),
            "timestamp": unix_now(), "app": "web", "revision": revision,
            "target_revision": revision, "sync": "Synced", "health": health});
        let _ = self.clients[i % self.clients.len()]
            .publish(
                format!("edgesync/nodes/{node}/apps/web"),
                QoS::AtLeastOnce,
                true,
                doc.to_string(),
            )
            .await;
    }

    /// Follows the hub's gates: each node runs what its stage allows and reports it.
    async fn follow_gates(self: Arc<Fleet>, port: u16) {
        let (client, mut events) =
            AsyncClient::new(MqttOptions::new("sim-gates", "127.0.0.1", port), 64);
        let _ = client
            .subscribe("edgesync/gates/web", QoS::AtLeastOnce)
            .await;
        let labels = BTreeMap::new();
        while let Ok(event) = events.poll().await {
            let Event::Incoming(Packet::Publish(p)) = event else {
                continue;
            };
            let Ok(gate) = Gate::parse(&p.payload) else {
                continue;
            };
            let moved: Vec<usize> = {
                let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
                (0..self.names.len())
                    .filter(|&i| {
                        let Some(stage) = gate.stage_for(&self.names[i], &labels) else {
                            return false;
                        };
                        let changed = running.0[i] != stage.revision;
                        running.0[i] = stage.revision.clone();
                        changed
                    })
                    .collect()
            };
            for i in moved {
                self.report(i).await;
            }
        }
    }
}

/// Waits on a blocking thread (the hub is asked over HTTP) until `done`, asking every `every_ms`;
/// panics with `what` after `limit_secs`.
async fn until_hub(
    hub: &Arc<Hub>,
    what: &'static str,
    limit_secs: u64,
    every_ms: u64,
    done: impl Fn(&Hub) -> bool + Send + 'static,
) {
    let hub = hub.clone();
    tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        while !done(&hub) {
            assert!(t.elapsed() < Duration::from_secs(limit_secs), "{what}");
            std::thread::sleep(Duration::from_millis(every_ms));
        }
    })
    .await
    .expect(what);
}

/// Median of samples.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or_default()
}

async fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if done() {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < limit, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn size(nodes: usize, store: &Store) {
    let idle = env_or("FLEET_IDLE_SECS", 60u64);
    let bake = env_or("FLEET_BAKE_SECS", 5u64);
    let connections = env_or("FLEET_CONNECTIONS", 16usize).max(1);
    let broker = support::broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let section = match store {
        Store::Sqlite => format!("path = \"{}\"", dir.path().join("hub.db").display()),
        Store::Postgres(server) => {
            let name = format!("fleet{nodes}");
            format!(
                "url = \"{}\"",
                tokio::task::block_in_place(|| server.database(&name))
            )
        }
    };
    let hub = Arc::new(tokio::task::block_in_place(|| {
        Hub::start(dir.path(), broker.port, bake, &section)
    }));
    let store = store.name();
    let (rss_empty, _) = hub.usage();
    let fleet = Fleet::connect(broker.port, nodes, connections).await;

    // The hub subscribes once connected: a probe until it has taken one message (retained
    // documents are not replayed to shared subscriptions).
    let probe = Instant::now();
    loop {
        let _ = fleet.clients[0]
            .publish(
                "edgesync/nodes/probe/online",
                QoS::AtLeastOnce,
                false,
                "true",
            )
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let h = hub.clone();
        if tokio::task::block_in_place(|| h.ingested()) > 0 {
            break;
        }
        assert!(
            probe.elapsed() < Duration::from_secs(30),
            "the hub never subscribed"
        );
    }
    let base = tokio::task::block_in_place(|| hub.ingested());

    // Ingest: every node introduces itself (4 messages each), all at once.
    let t0 = Instant::now();
    for i in 0..nodes {
        fleet.introduce(i).await;
    }
    let sent = 4 * nodes as u64;
    // Each scrape reads the whole fleet from the store: not too often.
    let ingested = move |h: &Hub| h.ingested() >= base + sent;
    until_hub(&hub, "ingest never ended", 1800, 1000, ingested).await;
    let took = t0.elapsed();
    let rate = sent as f64 / took.as_secs_f64();
    println!(
        "{store}, {nodes} nodes: ingest {sent} messages in {:.1} s: {rate:.0} messages/s",
        took.as_secs_f64()
    );

    // At rest: memory and CPU sampled each second.
    let (_, cpu0) = hub.usage();
    let mut rss = Vec::new();
    for _ in 0..idle {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push(hub.usage().0 as f64 / 1024.0);
    }
    let (_, cpu1) = hub.usage();
    let per_hour = (cpu1 - cpu0) * 3600.0 / idle.max(1) as f64;
    println!(
        "{store}, {nodes} nodes: hub RSS at rest {:.1} MiB median ({:.1}–{:.1}; {:.1} MiB before any node), CPU {per_hour:.1} s per hour at rest",
        median(rss.clone()),
        rss.iter().copied().fold(f64::INFINITY, f64::min),
        rss.iter().copied().fold(0.0, f64::max),
        rss_empty as f64 / 1024.0
    );
    // A three-stage rollout (1%, 9%, 90%; each bakes `bake` seconds): from the request to
    // the hub calling it complete.
    tokio::spawn(fleet.clone().follow_gates(broker.port));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at = |revision: &str| {
        let r = fleet.running.lock().unwrap_or_else(|e| e.into_inner());
        r.0.iter().filter(|x| *x == revision).count()
    };
    let h = hub.clone();
    tokio::task::block_in_place(|| h.rollout("r1", "r0"));
    let t0 = Instant::now();
    let first_stage = wait("the canaries on r1", Duration::from_secs(60), || {
        at("r1") > 0
    })
    .await;
    let complete = |h: &Hub| h.phase().starts_with("\"Complete\"");
    until_hub(&hub, "rollout never complete", 600, 100, complete).await;
    let complete = t0.elapsed();
    assert_eq!(at("r1"), nodes, "every node runs r1");
    println!(
        "{store}, {nodes} nodes: three-stage rollout (bake {bake} s each) complete in {:.1} s ({:.1} s of it baking); first nodes moved after {} ms",
        complete.as_secs_f64(),
        (2 * bake) as f64,
        first_stage.as_millis()
    );

    // A bad revision: the canaries go Degraded at once; from their reports to the halt.
    fleet.running.lock().unwrap_or_else(|e| e.into_inner()).1 = Some("r2".into());
    let h = hub.clone();
    tokio::task::block_in_place(|| h.rollout("r2", "r1"));
    wait("the canaries on r2", Duration::from_secs(60), || {
        at("r2") > 0
    })
    .await;
    let t0 = Instant::now();
    let halted = |h: &Hub| h.phase().starts_with("\"Halted");
    until_hub(&hub, "never halted", 120, 20, halted).await;
    let halted = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bad = at("r2");
    println!(
        "{store}, {nodes} nodes: {bad} canaries Degraded at r2 (budget 10%), halted {} ms after they moved; {} nodes never left r1",
        halted.as_millis(),
        nodes - bad
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else is read from the command line.
    let sizes: Vec<usize> = std::env::var("FLEET_NODES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!(
        "fleet simulator: {} ({} cores)",
        chrono_free_date(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let stores: Vec<String> = std::env::var("FLEET_STORES")
        .unwrap_or_else(|_| "sqlite,postgresql".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    for name in stores {
        let store = match name.as_str() {
            "sqlite" => Store::Sqlite,
            "postgresql" => Store::Postgres(tokio::task::block_in_place(support::postgres::server)),
            other => panic!("FLEET_STORES: {other:?} is neither sqlite nor postgresql"),
        };
        for nodes in &sizes {
            size(*nodes, &store).await;
        }
    }
}

/// The hub's database in a run.
enum Store {
    Sqlite,
    /// One server for the run, a database per fleet size.
    Postgres(support::postgres::Server),
}

impl Store {
    fn name(&self) -> &'static str {
        match self {
            Store::Sqlite => "SQLite",
            Store::Postgres(_) => "PostgreSQL",
        }
    }
}

/// The date, from `date -u` (no date crate for one line).
fn chrono_free_date() -> String {
    Command::new("date")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
