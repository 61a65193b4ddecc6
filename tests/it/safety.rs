//! The destructive path on the real control plane: what must stay, stays. An apiVersion bump,
//! a dropped Namespace manifest, a refused fleet Application, an unreadable inventory and a
//! second process on one state directory each once deleted, or could delete, live objects.

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

use crate::harness::cluster::cluster;
use crate::harness::{eventually, Agent, AgentConfig, GitRepo, TestNamespace, WAIT};

fn cm(name: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  v: \"1\"\n")
}

/// The app's own Namespace manifest and a ConfigMap `settings`.
fn namespace_and_configmap(repo: &GitRepo, ns: &str) {
    repo.write(
        "app/ns.yaml",
        &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"),
    );
    repo.write("app/cm.yaml", &cm("settings"));
}

fn pruning_app(repo: &GitRepo, ns: &str) -> AgentConfig {
    AgentConfig::new().app(&format!(
        "name = \"app\"\nrepo = \"{}\"\npath = \"app\"\nnamespace = \"{ns}\"\ncreate_namespace = true\nprune = true",
        repo.url()
    ))
}

async fn sync(config: &AgentConfig) -> (bool, String) {
    let out = config.command(&["sync"]).await;
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Present and not being deleted.
pub(crate) async fn cm_exists(ns: &str, name: &str) -> bool {
    let api = kube::Api::<ConfigMap>::namespaced(cluster().client().await, ns);
    let live = api.get_opt(name).await.unwrap();
    live.is_some_and(|o| o.metadata.deletion_timestamp.is_none())
}

fn hpa(api_version: &str) -> String {
    let metrics = if api_version == "autoscaling/v1" {
        "  targetCPUUtilizationPercentage: 50\n"
    } else {
        "  metrics:\n    - type: Resource\n      resource:\n        name: cpu\n        target: {type: Utilization, averageUtilization: 50}\n"
    };
    format!(
        "apiVersion: {api_version}\nkind: HorizontalPodAutoscaler\nmetadata:\n  name: web\nspec:\n  scaleTargetRef: {{apiVersion: apps/v1, kind: Deployment, name: web}}\n  minReplicas: 1\n  maxReplicas: 2\n{metrics}"
    )
}

#[tokio::test]
async fn an_api_version_bump_keeps_the_object_it_moved() {
    let ns = TestNamespace::reserve("bump").await;
    let repo = GitRepo::new();
    repo.write("app/hpa.yaml", &hpa("autoscaling/v1"));
    repo.write("app/cm.yaml", &cm("settings"));
    repo.commit("hpa at v1");
    let config = pruning_app(&repo, &ns.name);
    let (ok, log) = sync(&config).await;
    assert!(ok, "{log}");
    let gvk = GroupVersionKind::gvk("autoscaling", "v2", "HorizontalPodAutoscaler");
    let api = kube::Api::<DynamicObject>::namespaced_with(
        ns.client.clone(),
        &ns.name,
        &ApiResource::from_gvk(&gvk),
    );
    let uid = api.get("web").await.unwrap().metadata.uid;

    repo.write("app/hpa.yaml", &hpa("autoscaling/v2"));
    repo.commit("hpa at v2");
    let (ok, log) = sync(&config).await;
    assert!(ok, "{log}");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let live = api
        .get_opt("web")
        .await
        .unwrap()
        .expect("the HPA was pruned");
    assert!(live.metadata.deletion_timestamp.is_none(), "being deleted");
    assert_eq!(live.metadata.uid, uid, "deleted and created again");
    let inventory = config.state("app")["inventory"].clone();
    let hpas: Vec<_> = inventory
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["kind"] == "HorizontalPodAutoscaler")
        .collect();
    assert_eq!(hpas.len(), 1, "{inventory}");
    assert_eq!(hpas[0]["version"], "v2", "{inventory}");
}

#[tokio::test]
async fn dropping_the_namespace_manifest_keeps_the_namespace_the_app_runs_in() {
    let ns = TestNamespace::reserve("dropns").await;
    let repo = GitRepo::new();
    namespace_and_configmap(&repo, &ns.name);
    repo.commit("with its Namespace");
    let config = pruning_app(&repo, &ns.name);
    let (ok, log) = sync(&config).await;
    assert!(ok, "{log}");
    assert!(config.state("app")["inventory"]
        .to_string()
        .contains("\"Namespace\""));

    repo.remove("app/ns.yaml");
    repo.commit("Namespace manifest dropped, create_namespace still on");
    let (ok, log) = sync(&config).await;
    assert!(ok, "{log}");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let namespaces = kube::Api::<Namespace>::all(ns.client.clone());
    let live = namespaces.get(&ns.name).await.unwrap();
    assert!(
        live.metadata.deletion_timestamp.is_none(),
        "the app's namespace is being deleted"
    );
    assert!(cm_exists(&ns.name, "settings").await);
}

#[tokio::test]
async fn without_local_state_an_unreadable_inventory_stops_the_sync_and_is_kept() {
    let ns = TestNamespace::reserve("inventory").await;
    let repo = GitRepo::new();
    repo.write("app/a.yaml", &cm("a"));
    repo.write("app/b.yaml", &cm("b"));
    repo.commit("a and b");
    let config = pruning_app(&repo, &ns.name);
    let (ok, log) = sync(&config).await;
    assert!(ok, "{log}");

    // The node loses its state directory, and the cluster's copy cannot be read.
    std::fs::remove_dir_all(config.dir().join("state")).unwrap();
    let inventories = kube::Api::<ConfigMap>::namespaced(ns.client.clone(), "edgesync-system");
    let name = format!("{}.app", config.node_name);
    let garbage = json!({"binaryData": {"inventory.json.gz": "bm90IGd6aXA="}});
    inventories
        .patch(&name, &PatchParams::default(), &Patch::Merge(&garbage))
        .await
        .unwrap();
    repo.remove("app/b.yaml");
    repo.write("app/c.yaml", &cm("c"));
    repo.commit("b dropped, c added");
    let (ok, log) = sync(&config).await;
    assert!(!ok, "synced on an unknown inventory: {log}");
    assert!(
        log.contains(&name) && log.contains("inventory"),
        "the error names the ConfigMap: {log}"
    );
    assert!(!cm_exists(&ns.name, "c").await, "nothing is applied");
    assert!(cm_exists(&ns.name, "b").await);
    let kept = inventories.get(&name).await.unwrap();
    assert_eq!(
        kept.binary_data.unwrap()["inventory.json.gz"].0,
        b"not gzip",
        "the cluster's copy was overwritten"
    );
}

/// One process per state directory: `edgesync sync` cannot take it while the agent runs, so
/// it asks the agent, which does the sync. That is how an Application without
/// `syncPolicy.automated` (synced only by hand, as in Argo CD) is synced on a running node.
#[tokio::test]
async fn one_process_per_state_directory_and_manual_syncs_go_through_the_agent() {
    let ns = TestNamespace::reserve("manual").await;
    let repo = GitRepo::new();
    let url = repo.url();
    repo.write(
        "fleet/manual.yaml",
        &format!(
            r#"apiVersion: argoproj.io/v1alpha1
kind: Application
metadata:
  name: manual
spec:
  source: {{repoURL: "{url}", targetRevision: main, path: app}}
  destination: {{server: "https://kubernetes.default.svc", namespace: {ns}}}
  syncPolicy:
    syncOptions: [CreateNamespace=true]
"#,
            ns = ns.name
        ),
    );
    repo.write("app/a.yaml", &cm("a"));
    let first = repo.commit("a manual app");
    let config = AgentConfig::new()
        .section(
            "fleet",
            &format!("repo = \"{url}\"\nrevision = \"main\"\npath = \"fleet\""),
        )
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""));
    let agent = Agent::start(&config);
    let out_of_sync = |sha: String| {
        let config = &config;
        async move {
            eventually("OutOfSync, saying how to sync it", WAIT, || async {
                let status = config.status().await;
                let app = status["apps"][0].clone();
                (app["sync"] == "OutOfSync"
                    && app["target_revision"] == sha.as_str()
                    && app["message"].as_str()?.contains("edgesync sync manual"))
                .then_some(())
            })
            .await
        }
    };
    out_of_sync(first.clone()).await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(
        !cm_exists(&ns.name, "a").await,
        "synced without being asked"
    );

    let out = config.command(&["sync", "manual"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", agent.log());
    assert!(cm_exists(&ns.name, "a").await);
    assert!(agent
        .log()
        .contains("manual sync asked for over the control socket"));
    assert_eq!(
        config.state("manual")["last_applied_revision"],
        first.as_str()
    );

    // The next commit waits for its own manual sync.
    repo.write("app/b.yaml", &cm("b"));
    let second = repo.commit("b");
    out_of_sync(second.clone()).await;
    assert!(!cm_exists(&ns.name, "b").await);
    let out = config.command(&["sync", "nope"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no app named"), "{stderr}");

    // Without the agent, the CLI holds the state directory and syncs by itself.
    assert!(agent.stop().await.success());
    let (ok, log) = sync(&config).await;
    assert!(ok, "the lock outlives the agent: {log}");
    assert!(cm_exists(&ns.name, "b").await);
}

#[tokio::test]
async fn a_plain_app_goes_healthy_in_the_status() {
    let ns = TestNamespace::reserve("plainhealth").await;
    let repo = GitRepo::new();
    namespace_and_configmap(&repo, &ns.name);
    let sha = repo.commit("a Namespace and a ConfigMap");
    let config = pruning_app(&repo, &ns.name);
    let _agent = Agent::start(&config);
    config.wait_applied("app", &sha).await;
    eventually("Healthy in the status API", WAIT, || async {
        let status = config.status().await;
        (status["apps"][0]["health"] == "Healthy").then_some(())
    })
    .await;

    // A kind the API server stops serving cannot be read: Unknown, saying why.
    let crd = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.health.example.com
spec:
  group: health.example.com
  scope: Namespaced
  names: {plural: gadgets, singular: gadget, kind: Gadget}
  versions:
    - name: v1
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"#;
    repo.write("app/crd.yaml", crd);
    repo.write(
        "app/gadget.yaml",
        "apiVersion: health.example.com/v1
kind: Gadget
metadata:
  name: g
",
    );
    let sha = repo.commit("a CRD and a Gadget");
    config.wait_applied("app", &sha).await;
    let crds = kube::Api::<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    >::all(ns.client.clone());
    crds.delete("gadgets.health.example.com", &Default::default())
        .await
        .unwrap();
    let app = eventually("Unknown, saying why", WAIT, || async {
        let status = config.status().await;
        let app = status["apps"][0].clone();
        (app["health"] == "Unknown").then_some(app)
    })
    .await;
    let why = app["health_message"].as_str().unwrap_or_default();
    assert!(
        why.contains("Gadget") && why.contains("cannot be read"),
        "{app}"
    );
}

/// A fleet Application switched to something this node refuses is still in the fleet: its
/// objects stay, and so does its state.
#[tokio::test]
async fn a_refused_fleet_application_is_not_a_departed_one() {
    let ns = TestNamespace::reserve("refusedapp").await;
    let repo = GitRepo::new();
    let url = repo.url();
    let app = |retry: &str| {
        format!(
            r#"apiVersion: argoproj.io/v1alpha1
kind: Application
metadata:
  name: web
  finalizers: [resources-finalizer.argocd.argoproj.io]
spec:
  source: {{repoURL: "{url}", targetRevision: main, path: app}}
  destination: {{server: "https://kubernetes.default.svc", namespace: {ns}}}
  syncPolicy:
    automated: {{prune: true}}
    syncOptions: [CreateNamespace=true]
{retry}"#,
            ns = ns.name
        )
    };
    repo.write("fleet/web.yaml", &app(""));
    repo.write("app/cm.yaml", &cm("greeting"));
    let sha = repo.commit("web");
    let config = AgentConfig::new()
        .section(
            "fleet",
            &format!("repo = \"{url}\"\nrevision = \"main\"\npath = \"fleet\""),
        )
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""));
    let agent = Agent::start(&config);
    config.wait_applied("web", &sha).await;

    repo.write(
        "fleet/web.yaml",
        &app("    retry:\n      backoff: {maxDuration: 300000000000y}\n"),
    );
    repo.commit("a retry duration no clock holds");
    eventually("the refusal reported", WAIT, || async {
        agent.log().contains("maxDuration").then_some(())
    })
    .await;
    // Several polls and reloads later, nothing was removed and the agent still runs.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert!(cm_exists(&ns.name, "greeting").await, "{}", agent.log());
    assert!(
        !config.state("web").is_null(),
        "the app's state was archived"
    );
    assert!(!agent.log().contains("deleted: the app left this node"));
    let log = agent.log();
    assert!(log.contains("nothing is removed this time"), "{log}");
}

/// An agent on each node of one cluster: what one node's app still runs, another node's prune
/// or removal leaves alone.
#[tokio::test]
async fn a_node_never_deletes_what_another_node_of_the_cluster_runs() {
    let ns = TestNamespace::reserve("twonodes").await;
    let repo = GitRepo::new();
    for dir in ["one", "two"] {
        repo.write(&format!("{dir}/a.yaml"), &cm("a"));
        repo.write(&format!("{dir}/b.yaml"), &cm("b"));
    }
    repo.commit("both nodes run a and b");
    let node = |path: &str| {
        AgentConfig::new().app(&format!(
            "name = \"app\"\nrepo = \"{}\"\npath = \"{path}\"\nnamespace = \"{}\"\ncreate_namespace = true\nprune = true\ndelete_on_removal = true",
            repo.url(),
            ns.name
        ))
    };
    let (first, second) = (node("one"), node("two"));
    for config in [&first, &second] {
        let (ok, log) = sync(config).await;
        assert!(ok, "{log}");
    }

    repo.remove("one/b.yaml");
    repo.commit("the first node's app drops b");
    let (ok, log) = sync(&first).await;
    assert!(ok, "{log}");
    assert!(
        cm_exists(&ns.name, "b").await,
        "pruned what the second node runs"
    );
    assert!(log.contains("an app of another node runs it"), "{log}");
    let inventory = first.state("app")["inventory"].to_string();
    assert!(!inventory.contains("\"b\""), "{inventory}");

    // Now the second node drops b too: its prune deletes it.
    repo.remove("two/b.yaml");
    repo.commit("the second node's app drops b");
    let (ok, log) = sync(&second).await;
    assert!(ok, "{log}");
    eventually("b pruned", WAIT, || async {
        (!cm_exists(&ns.name, "b").await).then_some(())
    })
    .await;
}

/// A small tmpfs, unmounted when dropped. Needs root (as `tests/run` has).
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs needs root");
        SmallFs { dir }
    }

    fn fill(&self) -> std::path::PathBuf {
        let filler = self.dir.path().join("filler");
        let _ = std::process::Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", filler.display()))
            .stderr(std::process::Stdio::null())
            .status();
        filler
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_state_directory_leaves_the_cluster_alone_is_reported_and_recovers() {
    let ns = TestNamespace::reserve("diskfull").await;
    let repo = GitRepo::new();
    repo.write("app/a.yaml", &cm("a"));
    repo.write("app/b.yaml", &cm("b"));
    let first = repo.commit("a and b");
    let fs = SmallFs::mount("16m");
    let state_dir = fs.dir.path().join("state");
    let url = repo.url();
    let config = AgentConfig::new()
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
        .app(&format!(
            "name = \"app\"\nrepo = \"{url}\"\npath = \"app\"\nnamespace = \"{}\"\ncreate_namespace = true\nprune = true\nretry = {{ limit = 2, backoff = {{ duration = \"1s\", max_duration = \"2s\" }} }}",
            ns.name
        ))
        .state_dir(&state_dir);
    let agent = Agent::start(&config);
    config.wait_applied("app", &first).await;

    let filler = fs.fill();
    repo.remove("app/b.yaml");
    repo.write("app/c.yaml", &cm("c"));
    let second = repo.commit("b dropped, c added");
    let app = eventually("the full disk reported", WAIT, || async {
        let status = config.status().await;
        let app = status["apps"][0].clone();
        app["message"]
            .as_str()
            .is_some_and(|m| m.contains("space"))
            .then_some(app)
    })
    .await;
    assert_ne!(app["sync"], "Synced", "{app}");
    assert!(
        cm_exists(&ns.name, "b").await,
        "pruned without a state to record it"
    );
    // Counted as what it is: the state or the Git cache (both on the full disk) not written.
    let mut written = 0.0;
    for kind in ["state_io", "git_cache"] {
        let series = format!("edgesync_errors_total{{kind=\"{kind}\"}}");
        written += crate::harness::http::metric(config.http_port, &series).await;
    }
    assert!(written >= 1.0, "the full disk was not counted");

    // Space returns: the agent carries on by itself, whatever the retry limit said meanwhile.
    std::fs::remove_file(filler).unwrap();
    config.wait_applied("app", &second).await;
    eventually("b pruned", WAIT, || async {
        (!cm_exists(&ns.name, "b").await).then_some(())
    })
    .await;
    assert!(cm_exists(&ns.name, "c").await);
    drop(agent);
}

/// A config file written in place over a slow link: the first half (which parses, without the
/// second app) sits on disk for seconds before the rest arrives. Reloads react to complete
/// files only, so the second app's objects are never deleted.
#[tokio::test]
async fn a_config_caught_half_written_removes_nothing() {
    use std::io::Write;
    let ns = TestNamespace::reserve("halfwritten").await;
    let repo = GitRepo::new();
    repo.write("one/a.yaml", &cm("a"));
    repo.write("two/b.yaml", &cm("b"));
    let sha = repo.commit("two apps");
    let url = repo.url();
    let app = |name: &str, path: &str| {
        format!(
            "name = \"{name}\"\nrepo = \"{url}\"\npath = \"{path}\"\nnamespace = \"{}\"\ncreate_namespace = true\ndelete_on_removal = true",
            ns.name
        )
    };
    let config = AgentConfig::new()
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
        .app(&app("first", "one"))
        .app(&app("second", "two"));
    let path = config.write();
    let agent = Agent::start(&config);
    config.wait_applied("first", &sha).await;
    config.wait_applied("second", &sha).await;

    let cms = kube::Api::<ConfigMap>::namespaced(ns.client.clone(), &ns.name);
    let uid = cms.get("b").await.unwrap().metadata.uid;
    let text = std::fs::read_to_string(&path).unwrap();
    let cut = text.rfind("[[apps]]").unwrap();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.write_all(&text.as_bytes()[..cut]).unwrap();
    file.flush().unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    file.write_all(&text.as_bytes()[cut..]).unwrap();
    drop(file);
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    // The same object: not deleted and applied again once the file was whole.
    let now = cms.get_opt("b").await.unwrap().map(|b| b.metadata.uid);
    assert_eq!(now, Some(uid), "{}", agent.log());
    assert!(
        !agent.log().contains("the app left this node"),
        "{}",
        agent.log()
    );
}

/// A power cut leaves files empty or short: the app's state, its last-known-good render and
/// a file of the checkout. Each is refused and reported; the agent reads the inventory back,
/// checks the snapshot out again, and deletes nothing (the objects keep their uids).
#[tokio::test]
async fn empty_and_truncated_files_after_a_power_cut_are_refused_and_nothing_is_deleted() {
    let ns = TestNamespace::reserve("powercut").await;
    let repo = GitRepo::new();
    repo.write("app/a.yaml", &cm("a"));
    repo.write("app/b.yaml", &cm("b"));
    let sha = repo.commit("a and b");
    let config = AgentConfig::new()
        .repository(&format!("url = \"{}\"\npoll_interval = \"1s\"", repo.url()))
        .app(&format!(
            "name = \"app\"\nrepo = \"{}\"\npath = \"app\"\nnamespace = \"{}\"\ncreate_namespace = true\nprune = true",
            repo.url(),
            ns.name
        ));
    let agent = Agent::start(&config);
    config.wait_applied("app", &sha).await;
    // Checkouts are sealed in the background, a second after the sync: a power cut after the
    // seal, so the damage below is found by it (one before it leaves the checkout unsealed,
    // and removed on start just the same: `source::sealed`'s unit test).
    let state = config.dir().join("state");
    let t0 = std::time::Instant::now();
    let snapshot = loop {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "the checkout was never sealed: {}",
            agent.log()
        );
        let sealed = std::fs::read_dir(state.join("git/snapshots"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.join("app/a.yaml").is_file() && p.join(".edgesync-seal").is_file());
        if let Some(dir) = sealed {
            break dir;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    drop(agent);
    let cms = kube::Api::<ConfigMap>::namespaced(ns.client.clone(), &ns.name);
    let uids = |names: [&'static str; 2]| {
        let cms = cms.clone();
        async move {
            let mut out = Vec::new();
            for name in names {
                out.push(cms.get(name).await.unwrap().metadata.uid);
            }
            out
        }
    };
    let before = uids(["a", "b"]).await;

    std::fs::write(state.join("apps/app.json"), "").unwrap();
    let render = state.join("apps/app.applied.json");
    let text = std::fs::read(&render).unwrap();
    std::fs::write(&render, &text[..text.len() / 2]).unwrap();
    std::fs::write(snapshot.join("app/a.yaml"), "").unwrap();

    let agent = Agent::start(&config);
    config.wait_applied("app", &sha).await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(uids(["a", "b"]).await, before, "{}", agent.log());
    let log = agent.log();
    assert!(log.contains("damaged snapshot removed"), "{log}");
    assert!(log.contains("starting from blank state"), "{log}");
    assert!(
        log.contains("inventory recovered from the cluster"),
        "{log}"
    );
    let quarantined = std::fs::read_dir(state.join("apps"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("corrupt"))
        .count();
    assert!(quarantined >= 1, "the damaged state was not set aside");
}

/// A fleet repository that accepts connections and never answers: the agent is READY and feeds
/// the watchdog while it waits for the fleet, and stops on SIGTERM meanwhile, so systemd
/// neither times its start out nor kills it as wedged.
#[tokio::test]
async fn a_fleet_that_never_answers_does_not_hold_ready_the_watchdog_or_stop() {
    let stuck = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = stuck.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = stuck.accept().await {
            open.push(socket);
        }
    });
    let url = format!("http://127.0.0.1:{port}/fleet.git");
    let config = AgentConfig::new().section(
        "fleet",
        &format!("repo = \"{url}\"\nrevision = \"main\"\npath = \"fleet\""),
    );
    let socket_path = config.dir().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let agent = Agent::start_with_env(
        &config,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen
        .iter()
        .filter(|m: &&String| m.contains("WATCHDOG=1"))
        .count()
        < 3
        || !seen.iter().any(|m| m.contains("READY=1"))
    {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no READY and watchdog while the fleet loads; got {seen:?}"))
            .unwrap();
        seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    assert!(!agent.log().contains("fleet loaded"), "{}", agent.log());
    assert!(agent.stop().await.success());
    held.abort();
}
