//! The fleet hub's rollout gates on a real agent: signed gates published retained on a real
//! Mosquitto, a repository served over smart HTTP (so the cache is shallow and a held revision
//! needs it deepened), the real control plane.

use k8s_openapi::api::core::v1::ConfigMap;

use crate::git_revisions::greeting_app;
use crate::harness::http::metric;
use crate::harness::mqtt::Broker;
use crate::harness::{eventually, Agent, AgentConfig, GitRepo, Remote, TestNamespace, WAIT};

fn key(seed: u8) -> ssh_key::PrivateKey {
    ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[seed; 32]))
}

/// The gate of app `greeting` letting every node run `revision`, signed by `signer`.
fn gate(signer: &ssh_key::PrivateKey, issued: u64, revision: &str) -> String {
    let mut gate = edgesync_proto::Gate::everyone("greeting", issued, revision);
    gate.sign(signer).unwrap();
    serde_json::to_string(&gate).unwrap()
}

async fn greeting(ns: &TestNamespace) -> Option<String> {
    let cm = ns.api::<ConfigMap>().get_opt("greeting").await.ok()??;
    cm.data?.get("text").cloned()
}

/// Waits until the app's status message contains `text`.
async fn says(config: &AgentConfig, text: &str) -> serde_json::Value {
    eventually(&format!("the app saying {text:?}"), WAIT, || async {
        let status = config.status().await;
        let app = status["apps"][0].clone();
        app["message"]
            .as_str()
            .is_some_and(|m| m.contains(text))
            .then_some(app)
    })
    .await
}

#[tokio::test]
async fn a_gated_app_follows_signed_gates_and_only_them() {
    let ns = TestNamespace::reserve("gates").await;
    let repo = GitRepo::new();
    let v1 = greeting_app(&repo, "one");
    let remote = Remote::serve(repo).await;
    let mut broker = Broker::start(false);
    let hub = key(7);
    let public = hub.public_key().to_openssh().unwrap();
    let url = remote.url();
    let config = AgentConfig::new()
        .section("mqtt", &broker.agent_section())
        .section("gates", &format!("public_keys = [\"{public}\"]"))
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
        .app(&format!(
            "name = \"greeting\"\nrepo = \"{url}\"\nrevision = \"main\"\npath = \"app\"\nnamespace = \"{}\"\ncreate_namespace = true\ngated = true",
            ns.name
        ));
    let topic = "edgesync/gates/greeting";

    // Before any gate, a gated app runs nothing.
    let agent = Agent::start(&config);
    says(&config, "no rollout gate heard").await;
    assert_eq!(greeting(&ns).await, None);

    // The hub lets everyone run v1: applied.
    broker.publish_retained(topic, &gate(&hub, 100, &v1));
    config.wait_applied("greeting", &v1).await;

    // Git moves to v2 while the gate still says v1: held at v1, and the app says why.
    let v2 = greeting_app(&remote.repo, "two");
    remote.push();
    let app = says(&config, "held at").await;
    assert_eq!(app["sync"], "Waiting", "{app}");
    assert_eq!(app["target_revision"], v2.as_str(), "{app}");
    assert_eq!(greeting(&ns).await.as_deref(), Some("one"));

    // Whoever can publish without the hub's key moves nothing: another key, a replayed gate.
    let errors = || metric(config.http_port, "edgesync_errors_total{kind=\"gate\"}");
    broker.publish_retained(topic, &gate(&key(9), 300, &v2));
    eventually("an untrusted gate refused", WAIT, || async {
        (errors().await >= 1.0).then_some(())
    })
    .await;
    assert!(
        agent.log().contains("not a trusted hub key"),
        "{}",
        agent.log()
    );
    broker.publish_retained(topic, &gate(&hub, 50, &v2));
    eventually("a stale gate refused", WAIT, || async {
        (errors().await >= 2.0).then_some(())
    })
    .await;
    assert_eq!(
        config.state("greeting")["last_applied_revision"],
        v1.as_str()
    );
    assert_eq!(greeting(&ns).await.as_deref(), Some("one"));

    // The hub opens the stage at v2: applied.
    broker.publish_retained(topic, &gate(&hub, 200, &v2));
    config.wait_applied("greeting", &v2).await;
    assert_eq!(greeting(&ns).await.as_deref(), Some("two"));
    assert!(
        !agent.log().contains("greeting-300"),
        "the untrusted gate was never taken"
    );

    // Back to v1 by the hub's word (a rollback): applied, Git still at v2.
    broker.publish_retained(topic, &gate(&hub, 400, &v1));
    config.wait_applied("greeting", &v1).await;
    says(&config, "held at").await;

    // A restart without the broker keeps where the hub said (the gate was kept on disk).
    assert!(agent.stop().await.success());
    broker.stop();
    let v3 = greeting_app(&remote.repo, "three");
    remote.push();
    let agent = Agent::start(&config);
    let app = says(&config, "held at").await;
    assert_eq!(app["target_revision"], v3.as_str(), "{app}");
    assert_eq!(
        config.state("greeting")["last_applied_revision"],
        v1.as_str()
    );
    assert_eq!(greeting(&ns).await.as_deref(), Some("one"));
    assert!(agent.stop().await.success());
}

/// `edgesync-hub run` in the background, killed when dropped.
struct Hub {
    child: std::process::Child,
    port: u16,
    log: std::path::PathBuf,
}

/// The hub's binary, built beside the agent's.
fn hub_bin() -> std::path::PathBuf {
    let bin = std::path::Path::new(crate::harness::agent::BIN).with_file_name("edgesync-hub");
    assert!(
        bin.exists(),
        "{} is not built: tests/run builds the whole workspace (cargo build -p edgesync-hub)",
        bin.display()
    );
    bin
}

/// The hub's API token in these tests (`[http] token_file`).
const TOKEN: &str = "e2e-token-0123456789abcdef";

impl Hub {
    /// Starts the hub with `policy` and the `[store]` section `store`; the same `dir` and
    /// `store` again are a restart.
    /// With `fleet` (a repository URL), the policies and the app's branch come from that
    /// fleet repository's `fleet/` directory instead of `policy` and the API.
    fn start(
        broker: &Broker,
        dir: &std::path::Path,
        key: &ssh_key::PrivateKey,
        policy: &str,
        store: &str,
        fleet: Option<&str>,
        replica: Option<&str>,
    ) -> Hub {
        let key_file = dir.join("hub-key");
        key.write_openssh_file(&key_file, ssh_key::LineEnding::LF)
            .unwrap();
        let policy_file = dir.join("policy.yaml");
        std::fs::write(&policy_file, policy).unwrap();
        let token_file = dir.join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        let port = crate::harness::agent::free_port();
        // Another replica: its own client id, and its own subscription group (a replica killed
        // while in the main group would keep its share of the messages queued).
        let mut mqtt = match replica {
            Some(id) => format!(
                "host = \"127.0.0.1\"\nport = {}\nclient_id = \"{id}\"\ngroup = \"{id}\"\n",
                broker.port
            ),
            None => format!(
                "host = \"127.0.0.1\"\nport = {}\nclient_id = \"hub-e2e\"\n",
                broker.port
            ),
        };
        if broker.tls {
            mqtt.push_str("tls = true\n");
            mqtt.push_str(&broker.tls_files());
        }
        let policies = match fleet {
            Some(url) => format!(
                "\n[fleet]\nrepo = \"{url}\"\nrevision = \"main\"\npath = \"fleet\"\npoll = \"1s\"\ncache_dir = \"{}\"\n",
                dir.join("cache").display()
            ),
            None => format!("policies = [\"{}\"]\n", policy_file.display()),
        };
        let config = dir.join("hub.toml");
        std::fs::write(
            &config,
            format!(
                "[mqtt]\n{mqtt}\n[store]\n{store}\n\n[http]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"{}\"\n\n[gates]\nkey_file = \"{}\"\n{policies}",
                token_file.display(),
                key_file.display(),
            ),
        )
        .unwrap();
        let log = dir.join(format!("hub-{port}.log"));
        let child = std::process::Command::new(hub_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(dir.join("hub.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start edgesync-hub");
        Hub { child, port, log }
    }

    async fn get(&self, path: &str) -> String {
        crate::harness::http::request(self.port, "GET", path, &[], b"")
            .await
            .body
    }

    /// Asks for a rollout of `web` with the token `bearer`; the answer's status.
    async fn ask(&self, revision: &str, previous: Option<&str>, bearer: &str) -> u16 {
        let body = serde_json::json!({"app": "web", "revision": revision, "previous": previous});
        crate::harness::http::request(
            self.port,
            "POST",
            "/api/v1/rollouts",
            &[
                ("content-type", "application/json".to_string()),
                ("authorization", format!("Bearer {bearer}")),
            ],
            body.to_string().as_bytes(),
        )
        .await
        .status
    }

    async fn rollout(&self, revision: &str, previous: Option<&str>) {
        let status = self.ask(revision, previous, TOKEN).await;
        assert_eq!(status, 202, "{}", self.log());
    }

    /// The rollout of `web`, as the hub's API lists it.
    async fn phase(&self) -> String {
        let list: serde_json::Value =
            serde_json::from_str(&self.get("/api/v1/rollouts").await).unwrap_or_default();
        list.as_array()
            .and_then(|l| l.iter().find(|r| r["app"] == "web"))
            .map(|r| format!("{} {}", r["phase"], r["revision"]))
            .unwrap_or_default()
    }

    async fn wait_phase(&self, what: &str, prefix: &str) {
        eventually(what, std::time::Duration::from_secs(120), || async {
            self.phase().await.starts_with(prefix).then_some(())
        })
        .await;
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const POLICY: &str = "apiVersion: edgesync.io/v1alpha1
kind: RolloutPolicy
metadata: {name: default}
spec:
  stages:
    - {name: canary, nodeSelector: {matchLabels: {ring: canary}}, bake: 2s}
    - {name: half, share: 50%, bake: 2s}
    - {name: rest, share: 50%}
  failureBudget: {nodes: 0}
  onFailure: halt
";

/// The Argo CD Application of `web` in the fleet repository, gated.
fn application(url: &str) -> String {
    format!(
        "apiVersion: argoproj.io/v1alpha1
kind: Application
metadata:
  name: web
  namespace: argocd
  annotations: {{edgesync.io/gated: \"true\"}}
spec:
  project: default
  source: {{repoURL: \"{url}\", targetRevision: main, path: app}}
  destination: {{server: https://kubernetes.default.svc, namespace: web}}
"
    )
}

/// Node names of this run for each non-canary stage: one in the first half of the buckets,
/// one in the second. `tag` keeps two tests' names apart.
fn node_names(tag: &str) -> (String, String) {
    let pid = std::process::id();
    let name = |i: u32| format!("e2e-{tag}-{pid}-{i}");
    let half = edgesync_proto::BUCKETS / 2;
    let first = (0..)
        .map(name)
        .find(|n| edgesync_proto::bucket(n) < half)
        .unwrap();
    let second = (0..)
        .map(name)
        .find(|n| edgesync_proto::bucket(n) >= half)
        .unwrap();
    (first, second)
}

/// Issue 20's whole loop on real parts: Mosquitto, the hub with SQLite, three real agents on
/// the test control plane. Its page is kept as `target/hub-page.png` (docs/hub-page.png).
/// Plain MQTT here, TLS in the PostgreSQL run. The policy and the app's Application live in a
/// fleet repository the hub follows: each push starts a rollout.
#[tokio::test]
async fn the_hub_on_sqlite_rolls_through_three_stages_halts_and_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("path = \"{}\"", dir.path().join("hub.db").display());
    three_stages_halt_and_rollback(dir.path(), &store, "sqlite", false).await;
}

/// The same on a real PostgreSQL (Debian's `postgresql`, started on a free port), the hub and
/// the agents reaching the broker over TLS with client certificates, and the rollouts asked
/// for through the hub's API (no fleet repository).
#[tokio::test]
async fn the_hub_on_postgresql_rolls_through_three_stages_halts_and_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let (server, url) = tokio::task::spawn_blocking(|| {
        let server = crate::harness::postgres::server();
        let url = server.database("hub");
        (server, url)
    })
    .await
    .unwrap();
    let store = format!("url = \"{url}\"");
    three_stages_halt_and_rollback(dir.path(), &store, "pg", true).await;
    drop(server);
}

/// A canary by label and one node in each half of the buckets. A good revision goes through
/// the three stages in order; a bad one (a Deployment whose image cannot be pulled, Degraded
/// after its progress deadline) halts in the first stage and the other nodes never run it;
/// the page shows it (read in headless Chromium). The hub restarts with a policy that rolls
/// back: the halted rollout is still there (saved in the store), and the next bad revision's
/// rollout rolls back, the canary returning to the good revision.
async fn three_stages_halt_and_rollback(dir: &std::path::Path, store: &str, tag: &str, tls: bool) {
    // One screenshot for the docs (docs/hub-page.png): the plain run's.
    let screenshot = !tls;
    // The plain run follows a fleet repository; the TLS run asks the API.
    let from_git = !tls;
    let repo = GitRepo::new();
    repo.write(
        "app/settings.yaml",
        &crate::apply::configmap("settings", 0, "v1"),
    );
    let v1 = repo.commit("v1");
    let remote = Remote::serve(repo).await;
    let url = remote.url();
    let fleet = if from_git {
        let repo = GitRepo::new();
        repo.write("fleet/policy.yaml", POLICY);
        repo.write("fleet/web.yaml", &application(&url));
        repo.commit("fleet");
        Some(Remote::serve(repo).await)
    } else {
        None
    };
    let fleet_url = fleet.as_ref().map(Remote::url);
    let broker = Broker::start(tls);
    let key = key(11);
    let hub = Hub::start(
        &broker,
        dir,
        &key,
        POLICY,
        store,
        fleet_url.as_deref(),
        None,
    );
    let public = key.public_key().to_openssh().unwrap();
    let (first, second) = node_names(tag);
    let nodes = [
        (
            format!("e2e-{tag}-{}-canary", std::process::id()),
            "labels = { ring = \"canary\" }",
        ),
        (first, ""),
        (second, ""),
    ];
    let mut agents = Vec::new();
    let mut configs = Vec::new();
    let mut namespaces = Vec::new();
    for (name, labels) in &nodes {
        let ns = TestNamespace::reserve("rollout").await;
        let mut config = AgentConfig::new()
            .node(labels)
            .section("mqtt", &broker.agent_section())
            .section("gates", &format!("public_keys = [\"{public}\"]"))
            .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
            .app(&format!(
                "name = \"web\"\nrepo = \"{url}\"\nrevision = \"main\"\npath = \"app\"\nnamespace = \"{}\"\ncreate_namespace = true\ngated = true",
                ns.name
            ));
        config.node_name = name.clone();
        agents.push(Agent::start(&config));
        configs.push(config);
        namespaces.push(ns);
    }
    let applied = |i: usize| {
        configs[i].state("web")["last_applied_revision"]
            .as_str()
            .map(str::to_string)
    };

    // The first rollout has no previous revision: every stage runs it. Without the token, or
    // with a wrong one, nothing starts.
    eventually("the hub listening", WAIT, || async {
        (!hub.get("/api/v1/fleet").await.is_empty()).then_some(())
    })
    .await;
    assert_eq!(hub.ask(&v1, None, "").await, 401);
    assert_eq!(hub.ask(&v1, None, "e2e-token-0123456789abcdeX").await, 401);
    if from_git {
        // Rollouts follow the branch: the API refuses to start one (and the hub starts the
        // first itself, from what the nodes run: nothing yet, so every stage runs v1).
        assert_eq!(hub.ask(&v1, None, TOKEN).await, 409);
    } else {
        assert_eq!(hub.phase().await, "");
        hub.rollout(&v1, None).await;
    }
    for config in &configs {
        config.wait_applied("web", &v1).await;
    }
    hub.wait_phase("the first rollout complete", "\"Complete\"")
        .await;
    // A second replica on the same database: the first holds the rollout lease, so this one
    // ingests only, says who steps rollouts, and refuses to start one.
    let other = tempfile::tempdir().unwrap();
    let replica = Hub::start(
        &broker,
        other.path(),
        &key,
        POLICY,
        store,
        fleet_url.as_deref(),
        Some("hub-e2e-2"),
    );
    eventually("the second replica naming the leader", WAIT, || async {
        replica
            .get("/")
            .await
            .contains("stepped by replica hub-e2e;")
            .then_some(())
    })
    .await;
    assert_eq!(
        replica.ask(&v1, None, TOKEN).await,
        409,
        "{}",
        replica.log()
    );
    assert!(hub
        .get("/")
        .await
        .contains("stepped by this replica (hub-e2e)"));
    drop(replica);

    // A good revision: the canary first, then each half after the stage before it baked.
    let v2 = repo_commit(
        &remote,
        "app/settings.yaml",
        &crate::apply::configmap("settings", 0, "v2"),
    );
    if !from_git {
        for config in &configs {
            says(config, "held at").await;
        }
        hub.rollout(&v2, Some(&v1)).await;
    }
    let order = std::cell::RefCell::new(Vec::new());
    eventually(
        "v2 on every node",
        std::time::Duration::from_secs(120),
        || async {
            let mut order = order.borrow_mut();
            for i in 0..3 {
                if applied(i).as_deref() == Some(v2.as_str()) && !order.contains(&i) {
                    order.push(i);
                }
            }
            (order.len() == 3).then_some(())
        },
    )
    .await;
    assert_eq!(
        order.into_inner(),
        [0, 1, 2],
        "stages out of order: {}",
        hub.log()
    );
    hub.wait_phase("the good rollout complete", "\"Complete\"")
        .await;

    // A bad revision: the canary runs it, goes Degraded, the rollout halts; the rest stay.
    let v3 = repo_commit(
        &remote,
        "app/web.yaml",
        &crate::apply::deployment("web", "example/imagepullbackoff:2", 0),
    );
    if !from_git {
        hub.rollout(&v3, Some(&v2)).await;
    }
    configs[0].wait_applied("web", &v3).await;
    hub.wait_phase("the rollout halted", "\"Halted").await;
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert_eq!(applied(1).as_deref(), Some(v2.as_str()));
    assert_eq!(applied(2).as_deref(), Some(v2.as_str()));
    says(&configs[1], "held at").await;
    assert!(hub.get("/api/v1/fleet").await.contains(&nodes[0].0));
    // The same from the terminal: every node online, the canary Degraded at the bad revision.
    let url = format!("http://127.0.0.1:{}", hub.port);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(hub_bin())
            .args(["status", "--url", &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && text.starts_with("3 nodes: 3 online, 0 offline, 0 stale"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("web ") && l.contains(&v3[..12]) && l.contains("Degraded")),
        "{text}"
    );

    // The page, as a browser shows it: the halted rollout first, the canary failing.
    let page = format!("http://127.0.0.1:{}/", hub.port);
    let profile = tempfile::tempdir().unwrap();
    let (page_url, profile_path) = (page.clone(), profile.path().to_path_buf());
    let dom = tokio::task::spawn_blocking(move || {
        crate::report::chromium(&["--dump-dom"], &page_url, &profile_path)
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout).to_string();
    let rollouts = dom
        .split("id=\"rollouts\"")
        .nth(1)
        .unwrap_or_else(|| panic!("no rollouts table:\n{dom}"));
    let first_row = rollouts.split("</tr>").nth(1).unwrap_or_default();
    assert!(
        first_row.contains("halted") && first_row.contains(&v3[..12]),
        "{dom}"
    );
    assert!(dom.contains(&nodes[0].0), "{dom}");
    if from_git {
        // The fleet repository in use: its commit, the app followed at the bad revision.
        assert!(dom.contains("id=\"repository\""), "{dom}");
        let repository: serde_json::Value =
            serde_json::from_str(&hub.get("/api/v1/repository").await).unwrap();
        assert_eq!(repository["apps"]["web"], v3.as_str(), "{repository}");
        assert!(repository["error"].is_null(), "{repository}");
    }
    if screenshot {
        let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/hub-page.png");
        let arg = format!("--screenshot={}", shot.display());
        let profile_path = profile.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            crate::report::chromium(&[&arg, "--window-size=1280,900"], &page, &profile_path)
        })
        .await
        .unwrap();
        let png = std::fs::read(&shot).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{} bytes",
            png.len()
        );
    }

    // The hub restarts, now with a policy that rolls back (pushed to the fleet repository in
    // the Git run): the halted rollout is still there.
    let rollback = POLICY.replace("onFailure: halt", "onFailure: rollback");
    if let Some(fleet) = &fleet {
        fleet.repo.write("fleet/policy.yaml", &rollback);
        fleet.repo.commit("rollback");
        fleet.push();
    }
    drop(hub);
    let hub = Hub::start(
        &broker,
        dir,
        &key,
        &rollback,
        store,
        fleet_url.as_deref(),
        None,
    );
    hub.wait_phase("the halted rollout after a restart", "\"Halted")
        .await;
    // A fix that fixes nothing: its canary goes Degraded, the rollout rolls back, and the
    // canary returns to the good revision (the gate the restarted hub signs is newer than the
    // last one: the agents take it).
    let v4 = repo_commit(
        &remote,
        "app/settings.yaml",
        &crate::apply::configmap("settings", 0, "v4"),
    );
    if !from_git {
        hub.rollout(&v4, Some(&v2)).await;
    }
    hub.wait_phase("the rollout rolled back", "\"RolledBack")
        .await;
    configs[0].wait_applied("web", &v2).await;
    assert_eq!(applied(1).as_deref(), Some(v2.as_str()));
    assert_eq!(applied(2).as_deref(), Some(v2.as_str()));
    // On the hub's timeline: each start, stage, halt and rollback.
    let timeline = hub.get("/api/v1/events?node=%40hub&app=web").await;
    for said in ["started", "stage half open", "halted", "rolled back"] {
        assert!(timeline.contains(said), "{said:?} not in {timeline}");
    }
    drop(agents);
}

/// Commits one file to the served repository and pushes it; the commit.
fn repo_commit(remote: &Remote, path: &str, text: &str) -> String {
    remote.repo.write(path, text);
    let sha = remote.repo.commit(path);
    remote.push();
    sha
}
