//! Fault injection on the real control plane: the agent is killed with SIGKILL at random
//! points (spread over the time a start and a full sync take) while an app of 50 objects syncs commits that add, change and remove objects (prune
//! on). After each restart the cluster must equal the target revision: nothing lost, nothing
//! wrongly pruned (deleted and created again), nothing left over, nothing stale, no inventory
//! entry twice. Short here (`EDGESYNC_CHAOS_KILLS`, 5 by default); `cargo bench --bench chaos`
//! runs 100 and prints the figures for docs/RELIABILITY.md.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;

use crate::harness::{Agent, AgentConfig, GitRepo, TestNamespace};

/// What the runs found; every count but `kills` must be 0.
#[derive(Debug, Default, Clone)]
pub struct ChaosReport {
    pub kills: usize,
    /// In the target revision, missing from the cluster.
    pub lost: usize,
    /// Present in every revision, but deleted and created again on the way.
    pub wrongly_pruned: usize,
    /// In the cluster with the app's annotation, not in the target revision.
    pub left_over: usize,
    /// In both, with other content than the target revision's.
    pub stale: usize,
    /// Inventory entries held twice.
    pub duplicated: usize,
    /// Kills that came before the sync had recorded the target revision: the ones that hit
    /// the sync itself rather than an idle agent.
    pub mid_sync: usize,
    /// Seconds from each restart to the target revision applied, for kills mid-sync.
    pub recoveries: Vec<f64>,
}

/// Objects that stay in every revision: their uids show whether anything deleted them.
const STABLE: usize = 10;
const OBJECTS: usize = 50;

fn cm(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  value: \"{value}\"\n"
    )
}

/// Kills the agent `kills` times, each at a random point of a sync, checking the cluster
/// after every restart. `seed` makes the commits and kill points reproducible.
pub async fn run(kills: usize, seed: u64) -> ChaosReport {
    let ns = TestNamespace::reserve("chaos").await;
    let repo = GitRepo::new();
    let mut rng = fastrand::Rng::with_seed(seed);
    // name -> value, as in Git now.
    let mut target: BTreeMap<String, String> = BTreeMap::new();
    let mut next = 0;
    for _ in 0..OBJECTS {
        target.insert(format!("cm-{next:04}"), "v0".into());
        next += 1;
    }
    for (name, value) in &target {
        repo.write(&format!("app/{name}.yaml"), &cm(name, value));
    }
    let first = repo.commit("50 objects");
    let config = AgentConfig::new()
        .repository(&format!("url = \"{}\"\npoll_interval = \"1s\"", repo.url()))
        .app(&format!(
            "name = \"app\"\nrepo = \"{}\"\npath = \"app\"\nnamespace = \"{}\"\ncreate_namespace = true\nprune = true",
            repo.url(),
            ns.name
        ));
    // How long a start and a sync of the whole app take: kills are spread over that span.
    let started = Instant::now();
    let agent = Agent::start(&config);
    config.wait_applied("app", &first).await;
    let span = started.elapsed().as_millis() as u64;
    drop(agent);
    let api = ns.api::<ConfigMap>();
    let stable_uids = uids(&api).await;

    let mut report = ChaosReport::default();
    for round in 1..=kills {
        // Change the app: drop a few objects, add a few, edit a few.
        let movable: Vec<String> = target.keys().skip(STABLE).cloned().collect();
        for _ in 0..rng.usize(1..=5) {
            if let Some(name) = movable.get(rng.usize(..movable.len().max(1))) {
                if target.remove(name).is_some() {
                    repo.remove(&format!("app/{name}.yaml"));
                }
            }
        }
        while target.len() < OBJECTS {
            target.insert(format!("cm-{next:04}"), format!("v{round}"));
            next += 1;
        }
        let names: Vec<String> = target.keys().cloned().collect();
        for _ in 0..rng.usize(1..=5) {
            let name = &names[rng.usize(..names.len())];
            target.insert(name.clone(), format!("v{round}"));
        }
        for (name, value) in &target {
            repo.write(&format!("app/{name}.yaml"), &cm(name, value));
        }
        let sha = repo.commit(&format!("round {round}"));

        // Start, kill at a random point of the sync, start again.
        let agent = Agent::start(&config);
        tokio::time::sleep(Duration::from_millis(rng.u64(0..=span))).await;
        drop(agent); // SIGKILL
        report.kills += 1;
        let hit = config.state("app")["last_applied_revision"] != sha.as_str();
        let restarted = Instant::now();
        let agent = Agent::start(&config);
        let state = config.wait_applied("app", &sha).await;
        if hit {
            report.mid_sync += 1;
            report.recoveries.push(restarted.elapsed().as_secs_f64());
        }
        drop(agent);

        let live = live(&api).await;
        for (name, value) in &target {
            match live.get(name) {
                None => report.lost += 1,
                Some(v) if v != value => report.stale += 1,
                Some(_) => {}
            }
        }
        report.left_over += live.keys().filter(|n| !target.contains_key(*n)).count();
        let inventory = state["inventory"].as_array().cloned().unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        report.duplicated += inventory
            .iter()
            .filter(|o| !seen.insert((o["kind"].to_string(), o["name"].to_string())))
            .count();
    }
    let now = uids(&api).await;
    report.wrongly_pruned = stable_uids
        .iter()
        .take(STABLE)
        .filter(|(name, uid)| now.get(*name) != Some(*uid))
        .count();
    report
}

/// The app's objects that exist and are not being deleted: name -> value.
async fn live(api: &kube::Api<ConfigMap>) -> BTreeMap<String, String> {
    let list = api.list(&Default::default()).await.expect("list");
    list.items
        .into_iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .filter(|c| {
            c.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key("edgesync.io/app"))
        })
        .filter_map(|c| {
            let value = c.data.as_ref()?.get("value")?.clone();
            Some((c.metadata.name?, value))
        })
        .collect()
}

async fn uids(api: &kube::Api<ConfigMap>) -> BTreeMap<String, String> {
    let list = api.list(&Default::default()).await.expect("list");
    list.items
        .into_iter()
        .filter_map(|c| Some((c.metadata.name?, c.metadata.uid?)))
        .collect()
}

/// What the outage run measured: seconds from the end of each outage until the revision
/// committed during it was applied.
#[derive(Debug, Default, Clone)]
pub struct OutageReport {
    pub api_server: Vec<f64>,
    pub git_server: Vec<f64>,
    /// Seconds from the broker's restart (with no memory of sessions or retained messages)
    /// until a new subscriber gets the app's retained document at the revision synced while
    /// the broker was away.
    pub broker: Vec<f64>,
    /// Whether any outage used up the app's retry budget (it must not).
    pub budget_spent: bool,
}

/// The backoff ceiling of the outage run's app: convergence after recovery is measured
/// against it (plus the 1 s poll).
pub const OUTAGE_CEILING: Duration = Duration::from_secs(4);

/// `rounds` times each: the API server taken away in the middle of a sync of 50 objects, the
/// Git server taken away with a commit waiting, and the MQTT broker killed (a commit must
/// still be synced meanwhile, and the status republished once it is back), each for `away`. The app has a retry limit
/// of 1: were the failures while away counted, it would give up before the outage ends.
pub async fn outages(rounds: usize, away: Duration, seed: u64) -> OutageReport {
    use crate::harness::cluster::cluster;
    use crate::harness::http_git::Remote;
    use crate::harness::mqtt::Broker;
    use crate::harness::proxy::ApiProxy;
    let mut broker = Broker::start(false);
    let ns = TestNamespace::reserve("outage").await;
    let mut rng = fastrand::Rng::with_seed(seed);
    let repo = GitRepo::new();
    let write_all = |repo: &GitRepo, value: &str| {
        for i in 0..OBJECTS {
            let name = format!("cm-{i:04}");
            repo.write(&format!("app/{name}.yaml"), &cm(&name, value));
        }
    };
    write_all(&repo, "v0");
    let first = repo.commit("v0");
    let remote = Remote::serve(repo).await;
    let git = ApiProxy::start(format!("127.0.0.1:{}", remote.server.port).parse().unwrap()).await;
    let api = ApiProxy::start(cluster().api_address()).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(&cluster().kubeconfig, dir.path());
    let url = format!("http://127.0.0.1:{}/fleet.git", git.port);
    let ceiling = OUTAGE_CEILING.as_secs();
    let config = AgentConfig::new()
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
        .app(&format!(
            "name = \"app\"\nrepo = \"{url}\"\npath = \"app\"\nnamespace = \"{}\"\ncreate_namespace = true\nprune = true\nretry = {{ limit = 1, backoff = {{ duration = \"1s\", factor = 2, max_duration = \"{ceiling}s\" }} }}",
            ns.name
        ))
        .section("mqtt", &broker.agent_section())
        .kubeconfig(&kubeconfig.display().to_string());
    let _agent = Agent::start(&config);
    config.wait_applied("app", &first).await;
    let document = format!("edgesync/nodes/{}/apps/app", config.node_name);
    let mut report = OutageReport::default();
    let mut version = 0;
    for round in 0..rounds {
        for git_away in [false, true] {
            version += 1;
            write_all(&remote.repo, &format!("v{version}"));
            let sha = remote.repo.commit(&format!("v{version}"));
            if git_away {
                git.cut();
                remote.push();
            } else {
                remote.push();
                // Somewhere in the sync: the poll finds the commit within 1 s.
                tokio::time::sleep(Duration::from_millis(rng.u64(200..1200))).await;
                api.cut();
            }
            tokio::time::sleep(away).await;
            let message = config.status().await["apps"][0]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            report.budget_spent |= message.contains("retry limit");
            let back = Instant::now();
            if git_away {
                git.restore().await;
            } else {
                api.restore().await;
            }
            config.wait_applied("app", &sha).await;
            let seconds = back.elapsed().as_secs_f64();
            if git_away {
                report.git_server.push(seconds);
            } else {
                report.api_server.push(seconds);
            }
        }
        // The broker away: syncing goes on without it, and the status is there again after.
        version += 1;
        broker.stop();
        let started = Instant::now();
        write_all(&remote.repo, &format!("v{version}"));
        let sha = remote.repo.commit(&format!("v{version}"));
        remote.push();
        config.wait_applied("app", &sha).await;
        tokio::time::sleep(away.saturating_sub(started.elapsed())).await;
        broker.restart();
        let back = Instant::now();
        let (mut sub, out) = broker.subscribe(&format!("chaos-{round}"), &document);
        let deadline = back + Duration::from_secs(60);
        loop {
            let seen = std::fs::read_to_string(&out).unwrap_or_default();
            if seen
                .lines()
                .any(|l| l.starts_with(&document) && l.contains(&format!("\"revision\":\"{sha}\"")))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no retained document at {sha} 60 s after the broker came back: {seen}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        report.broker.push(back.elapsed().as_secs_f64());
        let _ = sub.kill();
        let _ = sub.wait();
    }
    report
}

#[tokio::test]
async fn outages_of_the_api_server_git_and_the_broker_spend_no_retry_budget_and_converge() {
    let report = outages(1, Duration::from_secs(8), 3).await;
    assert!(!report.budget_spent, "{report:?}");
    assert_eq!(
        (
            report.api_server.len(),
            report.git_server.len(),
            report.broker.len()
        ),
        (1, 1, 1),
        "{report:?}"
    );
}

#[tokio::test]
async fn kill_9_at_random_points_never_loses_prunes_wrongly_or_leaves_over() {
    let kills = std::env::var("EDGESYNC_CHAOS_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(5);
    let report = run(kills, 7).await;
    assert_eq!(report.kills, kills);
    assert_eq!(
        (
            report.lost,
            report.wrongly_pruned,
            report.left_over,
            report.stale,
            report.duplicated
        ),
        (0, 0, 0, 0, 0),
        "{report:?}"
    );
}
