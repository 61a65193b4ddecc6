//! The apply engine on the real control plane: sync waves, CRDs with their custom resources,
//! retries while the API server is away, sync windows, self-heal and rollback.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::DynamicObject;
use kube::core::{ApiResource, GroupVersionKind};

use crate::harness::cluster::cluster;
use crate::harness::proxy::ApiProxy;
use crate::harness::{eventually, Agent, AgentConfig, GitRepo, TestNamespace, WAIT};
use crate::skeleton::image_of;

/// A Deployment of one replica running `image`, in sync wave `wave`.
pub fn deployment(name: &str, image: &str, wave: i64) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  annotations:
    argocd.argoproj.io/sync-wave: "{wave}"
spec:
  replicas: 1
  progressDeadlineSeconds: 10
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
        - name: main
          image: {image}
"#
    )
}

pub fn configmap(name: &str, wave: i64, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  annotations:\n    argocd.argoproj.io/sync-wave: \"{wave}\"\ndata:\n  value: \"{value}\"\n"
    )
}

pub fn app_config(repo: &GitRepo, ns: &TestNamespace, extra: &str) -> AgentConfig {
    let url = repo.url();
    AgentConfig::new()
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
        .app(&format!(
            "name = \"app\"\nrepo = \"{url}\"\npath = \"deploy\"\nnamespace = \"{}\"\ncreate_namespace = true\n{extra}",
            ns.name
        ))
}

async fn available_since(ns: &TestNamespace, name: &str) -> Option<String> {
    let d = ns.api::<Deployment>().get_opt(name).await.ok()??;
    d.status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == "Available" && c.status == "True")
        .and_then(|c| c.last_transition_time)
        .map(|t| t.0.to_string())
}

#[tokio::test]
async fn sync_waves_apply_in_order_each_waiting_for_the_last_to_be_healthy() {
    let ns = TestNamespace::reserve("waves").await;
    let repo = GitRepo::new();
    repo.write("deploy/db.yaml", &deployment("db", "postgres:16", -1));
    repo.write("deploy/app.yaml", &configmap("app-settings", 1, "one"));
    let first = repo.commit("db first, then the app");
    let config = app_config(&repo, &ns, "health_timeout = \"20s\"");
    let _agent = Agent::start(&config);
    config.wait_applied("app", &first).await;
    // Wave 1 was created only once wave -1 was Available.
    let available = available_since(&ns, "db").await.expect("db Available");
    let cm = ns.api::<ConfigMap>().get("app-settings").await.unwrap();
    let created = cm.metadata.creation_timestamp.unwrap().0.to_string();
    assert!(
        created >= available,
        "ConfigMap {created} before db Available {available}"
    );

    // A first wave that never becomes healthy stops the sync before the next wave.
    repo.write(
        "deploy/db.yaml",
        &deployment("db", "example/imagepullbackoff:1", -1),
    );
    repo.write("deploy/app.yaml", &configmap("app-settings", 1, "two"));
    let second = repo.commit("a db that cannot start");
    let error = eventually("the wave to fail", WAIT, || async {
        let state = config.state("app");
        (state["last_attempted_revision"] == second.as_str())
            .then(|| state["last_error"].as_str().map(str::to_string))
            .flatten()
    })
    .await;
    assert!(error.contains("wave -1"), "{error}");
    assert!(
        error.contains("Deployment") && error.contains("db"),
        "{error}"
    );
    let cm = ns.api::<ConfigMap>().get("app-settings").await.unwrap();
    assert_eq!(cm.data.unwrap()["value"], "one", "wave 1 was not applied");
    assert_eq!(config.state("app")["last_applied_revision"], first.as_str());
}

#[tokio::test]
async fn a_crd_and_its_custom_resources_apply_in_one_sync() {
    let ns = TestNamespace::reserve("crd").await;
    let group = format!("{}.edgesync.test", ns.name);
    let repo = GitRepo::new();
    repo.write(
        "deploy/crd.yaml",
        &format!(
            r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.{group}
spec:
  group: {group}
  scope: Namespaced
  names: {{plural: gadgets, singular: gadget, kind: Gadget}}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {{type: integer}}
"#
        ),
    );
    // Listed before the CRD in the directory, and in the same commit.
    repo.write(
        "deploy/a-gadget.yaml",
        &format!("apiVersion: {group}/v1\nkind: Gadget\nmetadata:\n  name: g1\nspec:\n  size: 3\n"),
    );
    let sha = repo.commit("a CRD and a gadget");
    let config = app_config(&repo, &ns, "prune = true");
    let _agent = Agent::start(&config);
    config.wait_applied("app", &sha).await;
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(&group, "v1", "Gadget"),
        "gadgets",
    );
    let client = cluster().client().await;
    let api: kube::Api<DynamicObject> =
        kube::Api::namespaced_with(client.clone(), &ns.name, &resource);
    let gadget = api.get("g1").await.unwrap();
    assert_eq!(gadget.data["spec"]["size"], 3);
    // Clean up the cluster-wide CRD (and so the gadget).
    let crds: kube::Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        kube::Api::all(client);
    let _ = crds
        .delete(&format!("gadgets.{group}"), &Default::default())
        .await;
}

#[tokio::test]
async fn the_api_server_away_for_60_seconds_does_not_use_up_the_retry_limit() {
    let ns = TestNamespace::reserve("apidown").await;
    let proxy = ApiProxy::start(cluster().api_address()).await;
    let repo = GitRepo::new();
    repo.write("deploy/settings.yaml", &configmap("settings", 0, "before"));
    let first = repo.commit("before");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = proxy.kubeconfig(&cluster().kubeconfig, dir.path());
    // One retry only: were the failures while the API server is away counted, the app would
    // give up long before it comes back.
    let config = app_config(
        &repo,
        &ns,
        "retry = { limit = 1, backoff = { duration = \"1s\", factor = 2, max_duration = \"8s\" } }",
    )
    .kubeconfig(&kubeconfig.display().to_string());
    let _agent = Agent::start(&config);
    config.wait_applied("app", &first).await;

    proxy.cut();
    repo.write("deploy/settings.yaml", &configmap("settings", 0, "after"));
    repo.write("deploy/more.yaml", &configmap("more", 0, "new"));
    let second = repo.commit("after");
    eventually("a failed attempt", WAIT, || async {
        let state = config.state("app");
        (state["last_attempted_revision"] == second.as_str() && !state["last_error"].is_null())
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let status = config.status().await;
    let message = status["apps"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!message.contains("retry limit"), "{message}");
    proxy.restore().await;

    config.wait_applied("app", &second).await;
    let cm = ns.api::<ConfigMap>().get("settings").await.unwrap();
    assert_eq!(cm.data.unwrap()["value"], "after");
    assert!(ns
        .api::<ConfigMap>()
        .get_opt("more")
        .await
        .unwrap()
        .is_some());
}

/// `kubectl edit`: a merge patch by another field manager.
async fn edit_configmap(ns: &TestNamespace, name: &str, value: &str) {
    let params = kube::api::PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..Default::default()
    };
    let patch = serde_json::json!({"data": {"value": value}});
    ns.api::<ConfigMap>()
        .patch(name, &params, &kube::api::Patch::Merge(&patch))
        .await
        .unwrap();
}

async fn configmap_value(ns: &TestNamespace, name: &str) -> Option<String> {
    let cm = ns.api::<ConfigMap>().get_opt(name).await.ok()??;
    cm.data?.get("value").cloned()
}

#[tokio::test]
async fn self_heal_reverts_edits_and_deletions_and_without_it_drift_is_reported() {
    let ns = TestNamespace::reserve("selfheal").await;
    let repo = GitRepo::new();
    repo.write(
        "deploy/settings.yaml",
        &configmap("settings", 0, "from-git"),
    );
    repo.write("deploy/web.yaml", &deployment("web", "nginx:1.27", 0));
    repo.write("report/other.yaml", &configmap("other", 0, "from-git"));
    let sha = repo.commit("two apps");
    let url = repo.url();
    let config = app_config(&repo, &ns, "self_heal = true").app(&format!(
        "name = \"watched\"\nrepo = \"{url}\"\npath = \"report\"\nnamespace = \"{}\"\ncreate_namespace = true",
        ns.name
    ));
    let _agent = Agent::start(&config);
    config.wait_applied("app", &sha).await;
    config.wait_applied("watched", &sha).await;

    // An edit is reverted.
    edit_configmap(&ns, "settings", "edited").await;
    let started = std::time::Instant::now();
    eventually("the edit reverted", WAIT, || async {
        (configmap_value(&ns, "settings").await.as_deref() == Some("from-git")).then_some(())
    })
    .await;
    eprintln!("self-heal: edit reverted after {:?}", started.elapsed());

    // A deletion is undone.
    ns.api::<Deployment>()
        .delete("web", &Default::default())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    eventually("the Deployment recreated", WAIT, || async {
        let d = ns.api::<Deployment>().get_opt("web").await.ok()??;
        d.metadata.deletion_timestamp.is_none().then_some(())
    })
    .await;
    eprintln!("self-heal: deletion undone after {:?}", started.elapsed());

    // Without self_heal the edit stays, and the app says it is out of sync, naming the object.
    edit_configmap(&ns, "other", "edited").await;
    let message = eventually("watched reported OutOfSync", WAIT, || async {
        let status = config.status().await;
        let app = status["apps"]
            .as_array()?
            .iter()
            .find(|a| a["app"] == "watched")?
            .clone();
        (app["sync"] == "OutOfSync").then(|| app["message"].as_str().unwrap_or("").to_string())
    })
    .await;
    assert!(
        message.contains("ConfigMap") && message.contains("other"),
        "{message}"
    );
    assert!(message.contains("/data/value"), "{message}");
    assert_eq!(
        configmap_value(&ns, "other").await.as_deref(),
        Some("edited")
    );
    let metrics = crate::harness::http::metric(
        config.http_port,
        "edgesync_self_heal_total{app=\"app\",result=\"healed\"}",
    )
    .await;
    assert!(metrics >= 2.0, "{metrics} self-heals counted");
}

#[tokio::test]
async fn a_revision_that_goes_degraded_is_rolled_back_and_not_retried() {
    let ns = TestNamespace::reserve("rollback").await;
    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &deployment("web", "nginx:1.27", 0));
    repo.write("deploy/settings.yaml", &configmap("settings", 0, "good"));
    let good = repo.commit("good");
    let config = app_config(&repo, &ns, "rollback = \"auto\"\nprune = true");
    let _agent = Agent::start(&config);
    config.wait_applied("app", &good).await;
    eventually("the good revision Healthy", WAIT, || async {
        let status = config.status().await;
        (status["apps"][0]["health"] == "Healthy").then_some(())
    })
    .await;

    // The image cannot be pulled: the rollout stalls past its progress deadline (10 s), the
    // controller reports ProgressDeadlineExceeded and the app goes Degraded.
    repo.write(
        "deploy/web.yaml",
        &deployment("web", "example/imagepullbackoff:2", 0),
    );
    repo.write("deploy/settings.yaml", &configmap("settings", 0, "bad"));
    repo.write("deploy/extra.yaml", &configmap("extra", 0, "only-in-bad"));
    let bad = repo.commit("bad image");
    config.wait_applied("app", &bad).await;
    let state = eventually("the rollback", WAIT, || async {
        let state = config.state("app");
        (state["bad_revision"] == bad.as_str()).then_some(state)
    })
    .await;
    assert_eq!(state["last_applied_revision"], good.as_str());
    let web = ns.api::<Deployment>().get("web").await.unwrap();
    assert_eq!(image_of(&web), "nginx:1.27");
    assert_eq!(
        configmap_value(&ns, "settings").await.as_deref(),
        Some("good")
    );
    eventually("what only the bad revision had pruned", WAIT, || async {
        ns.api::<ConfigMap>()
            .get_opt("extra")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let status = eventually("Healthy again", WAIT, || async {
        let status = config.status().await;
        (status["apps"][0]["health"] == "Healthy").then_some(status)
    })
    .await;
    let message = status["apps"][0]["message"].as_str().unwrap().to_string();
    assert!(message.contains("rolled back"), "{message}");

    // Polls keep finding the bad revision in Git; it is not applied again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let web = ns.api::<Deployment>().get("web").await.unwrap();
    assert_eq!(image_of(&web), "nginx:1.27");
    assert_eq!(config.state("app")["last_applied_revision"], good.as_str());

    // A newer revision is synced as usual.
    repo.write("deploy/web.yaml", &deployment("web", "nginx:1.28", 0));
    let fixed = repo.commit("fixed");
    config.wait_applied("app", &fixed).await;
    let web = ns.api::<Deployment>().get("web").await.unwrap();
    assert_eq!(image_of(&web), "nginx:1.28");
}

#[tokio::test]
async fn a_deny_window_holds_the_sync_until_it_closes() {
    let ns = TestNamespace::reserve("window").await;
    let repo = GitRepo::new();
    repo.write("deploy/settings.yaml", &configmap("settings", 0, "v1"));
    let sha = repo.commit("v1");
    // A deny window that opened at the start of this minute and closes 15 s from now.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (minute, hour, second) = ((now / 60) % 60, (now / 3600) % 24, now % 60);
    let closes = now + 15;
    let config = app_config(
        &repo,
        &ns,
        &format!(
            "sync_windows = [{{ kind = \"deny\", schedule = \"{minute} {hour} * * *\", duration = \"{}s\", time_zone = \"UTC\" }}]",
            second + 15
        ),
    );
    let _agent = Agent::start(&config);
    let message = eventually("the app held by the window", WAIT, || async {
        let status = config.status().await;
        let app = &status["apps"][0];
        (app["sync"] == "Waiting" && app["message"].as_str()?.contains("deny window"))
            .then(|| app["message"].as_str().unwrap().to_string())
    })
    .await;
    assert!(
        message.contains(&format!("{minute} {hour} * * *")),
        "{message}"
    );
    assert!(ns
        .api::<ConfigMap>()
        .get_opt("settings")
        .await
        .unwrap()
        .is_none());

    let state = config.wait_applied("app", &sha).await;
    let applied_at = state["last_applied_at"].as_u64().unwrap();
    assert!(
        applied_at >= closes,
        "applied at {applied_at}, the window closed at {closes}"
    );
    assert_eq!(
        configmap_value(&ns, "settings").await.as_deref(),
        Some("v1")
    );
}

#[tokio::test]
async fn diff_shows_what_a_sync_would_change_from_a_server_side_dry_run() {
    let ns = TestNamespace::reserve("diff").await;
    let repo = GitRepo::new();
    repo.write("deploy/settings.yaml", &configmap("settings", 0, "v1"));
    repo.write("deploy/web.yaml", &deployment("web", "nginx:1.27", 0));
    repo.commit("v1");
    let config = app_config(&repo, &ns, "");
    let synced = config.command(&["sync", "app"]).await;
    assert!(
        synced.status.success(),
        "{}",
        String::from_utf8_lossy(&synced.stderr)
    );
    let same = config.command(&["diff", "app"]).await;
    assert_eq!(
        same.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&same.stdout)
    );

    edit_configmap(&ns, "settings", "edited").await;
    repo.write("deploy/added.yaml", &configmap("added", 0, "new"));
    repo.commit("v2");
    let out = config.command(&["diff", "app"]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let settings = format!("live/v1/ConfigMap/{}/settings", ns.name);
    assert!(text.contains(&settings), "{text}");
    assert!(
        text.contains("-  value: edited") && text.contains("+  value: v1"),
        "{text}"
    );
    assert!(
        text.contains(&format!("+++ git/v1/ConfigMap/{}/added", ns.name)),
        "{text}"
    );
    // Defaults the API server fills in are not differences.
    assert!(!text.contains("Deployment"), "{text}");
    // Nothing was changed by looking.
    assert_eq!(
        configmap_value(&ns, "settings").await.as_deref(),
        Some("edited")
    );
    assert!(ns
        .api::<ConfigMap>()
        .get_opt("added")
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn offline_restart_runs_on_the_last_known_good_render_and_a_damaged_one_prunes_nothing() {
    let ns = TestNamespace::reserve("offline").await;
    let repo = GitRepo::new();
    repo.write("deploy/settings.yaml", &configmap("settings", 0, "v1"));
    repo.write("deploy/web.yaml", &deployment("web", "nginx:1.27", 0));
    let sha = repo.commit("v1");
    let remote = crate::harness::Remote::serve(repo).await;
    let url = remote.url();
    let config = AgentConfig::new()
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
        .app(&format!(
            "name = \"app\"\nrepo = \"{url}\"\npath = \"deploy\"\nnamespace = \"{}\"\ncreate_namespace = true\nself_heal = true\nprune = true",
            ns.name
        ));
    let agent = Agent::start(&config);
    config.wait_applied("app", &sha).await;
    assert!(agent.stop().await.success());

    // A reboot with Git gone.
    drop(remote);
    let agent = Agent::start(&config);
    eventually("status from the persisted state", WAIT, || async {
        let status = config.status().await;
        let app = &status["apps"][0];
        (app["revision"] == sha.as_str() && app["health"] == "Healthy").then_some(())
    })
    .await;
    ns.api::<ConfigMap>()
        .delete("settings", &Default::default())
        .await
        .unwrap();
    eventually("self-heal without Git", WAIT, || async {
        configmap_value(&ns, "settings").await.filter(|v| v == "v1")
    })
    .await;
    assert!(agent.stop().await.success());

    // A damaged render is set aside and reported; nothing is pruned because of it.
    let render = config.dir().join("state/apps/app.applied.json");
    let text = std::fs::read_to_string(&render).unwrap();
    std::fs::write(&render, text.replace("nginx:1.27", "nginx:6.66")).unwrap();
    let agent = Agent::start(&config);
    eventually("the damaged render reported", WAIT, || async {
        let n = crate::harness::http::metric(
            config.http_port,
            "edgesync_errors_total{kind=\"state_corrupt\"}",
        )
        .await;
        (n >= 1.0).then_some(())
    })
    .await;
    let set_aside = std::fs::read_dir(config.dir().join("state/apps"))
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("app.applied.json.corrupt-")
        });
    assert!(set_aside, "the damaged file is kept aside");
    assert!(agent.log().contains("checksum"), "{}", agent.log());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        configmap_value(&ns, "settings").await.as_deref(),
        Some("v1")
    );
    let web = ns.api::<Deployment>().get("web").await.unwrap();
    assert_eq!(image_of(&web), "nginx:1.27");
}

#[tokio::test]
async fn two_apps_claiming_one_object_is_a_reported_conflict_not_a_tug_of_war() {
    let ns = TestNamespace::reserve("conflict").await;
    let repo = GitRepo::new();
    repo.write("one/shared.yaml", &configmap("shared", 0, "one"));
    repo.write("two/shared.yaml", &configmap("shared", 0, "two"));
    repo.write("two/own.yaml", &configmap("own", 0, "two"));
    let sha = repo.commit("two apps, one object");
    let url = repo.url();
    let app = |name: &str, path: &str| {
        format!(
            "name = \"{name}\"\nrepo = \"{url}\"\npath = \"{path}\"\nnamespace = \"{}\"\ncreate_namespace = true",
            ns.name
        )
    };
    let config = AgentConfig::new()
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
        .app(&app("one", "one"))
        .app(&app("two", "two"));
    let _agent = Agent::start(&config);
    let (winner, loser, error) = eventually("one app applied, the other refused", WAIT, || async {
        let one = config.state("one");
        let two = config.state("two");
        let done = |s: &serde_json::Value| s["last_applied_revision"] == sha.as_str();
        let failed = |s: &serde_json::Value| s["last_error"].as_str().map(str::to_string);
        match (done(&one), failed(&two), done(&two), failed(&one)) {
            (true, Some(e), _, _) => Some(("one", "two", e)),
            (_, _, true, Some(e)) => Some(("two", "one", e)),
            _ => None,
        }
    })
    .await;
    assert!(
        error.contains("conflict") && error.contains("ConfigMap"),
        "{error}"
    );
    assert!(error.contains(&format!("app {winner}")), "{error}");
    // Polls go on; the object stays with the winner and nothing of the loser was applied.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cm = ns.api::<ConfigMap>().get("shared").await.unwrap();
    assert_eq!(cm.metadata.annotations.unwrap()["edgesync.io/app"], winner);
    assert_eq!(cm.data.unwrap()["value"], winner);
    if loser == "two" {
        assert!(ns
            .api::<ConfigMap>()
            .get_opt("own")
            .await
            .unwrap()
            .is_none());
    }
    assert!(config.state(loser)["last_applied_revision"].is_null());
}

#[tokio::test]
async fn a_revision_whose_pods_cannot_be_scheduled_is_rolled_back() {
    let ns = TestNamespace::reserve("unschedulable").await;
    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &deployment("web", "nginx:1.27", 0));
    let good = repo.commit("good");
    let config = app_config(&repo, &ns, "rollback = \"auto\"");
    let _agent = Agent::start(&config);
    config.wait_applied("app", &good).await;
    eventually("the good revision Healthy", WAIT, || async {
        let status = config.status().await;
        (status["apps"][0]["health"] == "Healthy").then_some(())
    })
    .await;

    // No node has this label: the new pod stays Pending until the progress deadline (10 s).
    let unschedulable = deployment("web", "nginx:1.28", 0).replace(
        "    spec:\n      containers:",
        "    spec:\n      nodeSelector: {edgesync.io/nowhere: \"true\"}\n      containers:",
    );
    assert_ne!(unschedulable, deployment("web", "nginx:1.28", 0));
    repo.write("deploy/web.yaml", &unschedulable);
    let bad = repo.commit("unschedulable");
    config.wait_applied("app", &bad).await;

    let state = eventually("the rollback", WAIT, || async {
        let state = config.state("app");
        (state["bad_revision"] == bad.as_str()).then_some(state)
    })
    .await;
    assert_eq!(state["last_applied_revision"], good.as_str());
    let web = ns.api::<Deployment>().get("web").await.unwrap();
    assert_eq!(image_of(&web), "nginx:1.27");
}

/// GET and LIST requests edgesync made for objects in `namespace`, from the test API server's
/// audit log (`tests/cluster/up` audits reads).
fn reads_in(namespace: &str) -> usize {
    let log = cluster()
        .kubeconfig
        .parent()
        .expect("the control plane's directory")
        .join("logs/audit.log");
    let text = std::fs::read_to_string(&log)
        .unwrap_or_else(|e| panic!("{}: {e} (the test API server audits reads)", log.display()));
    let path = format!("/namespaces/{namespace}/");
    text.lines()
        .filter(|l| l.contains("\"userAgent\":\"edgesync/") && l.contains(&path))
        .filter(|l| l.contains("\"verb\":\"get\"") || l.contains("\"verb\":\"list\""))
        .count()
}

/// At rest, health comes from the watches: a settled app's objects are not read again (the
/// API server's audit log counts edgesync's reads), and a change to one of them is still rated
/// at once.
#[tokio::test]
async fn a_settled_app_is_not_polled_and_a_change_is_still_rated() {
    let ns = TestNamespace::reserve("idle").await;
    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &deployment("web", "nginx:1.27", 0));
    repo.write("deploy/settings.yaml", &configmap("settings", 0, "good"));
    let sha = repo.commit("good");
    let config = app_config(&repo, &ns, "");
    let _agent = Agent::start(&config);
    config.wait_applied("app", &sha).await;
    eventually("the app Healthy", WAIT, || async {
        let status = config.status().await;
        (status["apps"][0]["health"] == "Healthy").then_some(())
    })
    .await;
    // Once settled, a timer round (every 15 s for an app a watch does not cover) finds nothing
    // to read.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = reads_in(&ns.name);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let idle = reads_in(&ns.name) - before;
    assert_eq!(idle, 0, "{idle} reads of a settled app's objects in 20 s");

    // Someone breaks the Deployment: the watch sees it and the app is rated again.
    let patch = serde_json::json!({"spec": {"template": {"spec": {"containers": [
        {"name": "main", "image": "example/crashloop:1"}
    ]}}}});
    ns.api::<Deployment>()
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Strategic(&patch),
        )
        .await
        .unwrap();
    eventually("the change rated", WAIT, || async {
        let status = config.status().await;
        (status["apps"][0]["health"] != "Healthy").then_some(())
    })
    .await;
    assert!(reads_in(&ns.name) > before, "the change was read");
}

/// A kubeconfig for the test control plane that acts as `user` (impersonated by the admin),
/// with only the rights RBAC gives that user.
fn kubeconfig_as(config: &AgentConfig, user: &str) -> std::path::PathBuf {
    let mut kc = kube::config::Kubeconfig::read_from(&cluster().kubeconfig).unwrap();
    for named in &mut kc.auth_infos {
        if let Some(auth) = named.auth_info.as_mut() {
            auth.impersonate = Some(user.to_string());
        }
    }
    // JSON is YAML: the agent reads it as any kubeconfig.
    config.file("limited.kubeconfig", &serde_json::to_string(&kc).unwrap())
}

/// Apps in 16 namespaces or more share one cluster-wide watch per kind (one connection instead
/// of one per namespace); an agent that may not list the kind cluster-wide watches it per
/// namespace instead. Either way, an edit by hand is healed.
#[tokio::test]
async fn many_namespaces_share_one_watch_and_a_forbidden_one_falls_back_per_namespace() {
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::api::rbac::v1::RoleBinding;
    const APPS: usize = 16;
    for limited in [false, true] {
        let label = if limited { "narrow" } else { "wide" };
        let mut namespaces = Vec::new();
        for _ in 0..APPS {
            namespaces.push(TestNamespace::reserve(label).await);
        }
        let repo = GitRepo::new();
        repo.write(
            "deploy/settings.yaml",
            &configmap("settings", 0, "from-git"),
        );
        let sha = repo.commit("one ConfigMap");
        let url = repo.url();
        let mut config =
            AgentConfig::new().repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""));
        if limited {
            // Rights in the apps' namespaces only (which exist beforehand), and in the one
            // that holds the agent's inventories.
            let user = format!("edgesync-limited-{}", namespaces[0].name);
            let admin = cluster().client().await;
            let names = namespaces
                .iter()
                .map(|ns| ns.name.clone())
                .chain(["edgesync-system".to_string()]);
            for name in names {
                let namespace: Namespace = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name}
                }))
                .unwrap();
                match kube::Api::<Namespace>::all(admin.clone())
                    .create(&Default::default(), &namespace)
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.is_already_exists() => {}
                    Err(e) => panic!("namespace {name}: {e}"),
                }
                let binding: RoleBinding = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": user},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
                    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
                }))
                .unwrap();
                kube::Api::<RoleBinding>::namespaced(admin.clone(), &name)
                    .create(&Default::default(), &binding)
                    .await
                    .unwrap();
            }
            let path = kubeconfig_as(&config, &user);
            config = config.kubeconfig(&path.display().to_string());
        }
        let create = if limited {
            ""
        } else {
            "\ncreate_namespace = true"
        };
        for (i, ns) in namespaces.iter().enumerate() {
            config = config.app(&format!(
                "name = \"app{i}\"\nrepo = \"{url}\"\npath = \"deploy\"\nnamespace = \"{}\"\nself_heal = true{create}",
                ns.name
            ));
        }
        let agent = Agent::start(&config);
        for i in 0..APPS {
            config.wait_applied(&format!("app{i}"), &sha).await;
        }
        let watches = if limited { APPS } else { 1 };
        eventually(
            &format!("{watches} drift watches ({label})"),
            WAIT,
            || async {
                let n =
                    crate::harness::http::metric(config.http_port, "edgesync_drift_watches").await;
                (n == watches as f64).then_some(())
            },
        )
        .await;
        assert_eq!(
            agent.log().contains("may not watch this kind cluster-wide"),
            limited,
            "{}",
            agent.log()
        );

        let ns = &namespaces[APPS / 2];
        edit_configmap(ns, "settings", "edited").await;
        eventually(&format!("the edit reverted ({label})"), WAIT, || async {
            (configmap_value(ns, "settings").await.as_deref() == Some("from-git")).then_some(())
        })
        .await;
        assert!(agent.stop().await.success());
    }
}

/// A commit that leaves an app's render as it was sends the app nothing, as Argo CD leaves
/// such an app Synced without a sync operation: its revision moves on without a single write,
/// the drift watch still heals an edit, and a change to the app's own files is applied.
#[tokio::test]
async fn a_commit_that_leaves_the_render_alone_sends_the_app_nothing() {
    let ns = TestNamespace::reserve("same").await;
    let repo = GitRepo::new();
    repo.write(
        "deploy/settings.yaml",
        &configmap("settings", 0, "from-git"),
    );
    let sha = repo.commit("one ConfigMap");
    let config = app_config(&repo, &ns, "self_heal = true");
    let _agent = Agent::start(&config);
    config.wait_applied("app", &sha).await;
    let port = config.http_port;
    eventually("the drift watch running", WAIT, || async {
        let n = crate::harness::http::metric(port, "edgesync_drift_watches").await;
        (n == 1.0).then_some(())
    })
    .await;
    let patches = || {
        crate::harness::http::metric(
            port,
            "edgesync_apply_requests_total{verb=\"patch\",code=\"200\"}",
        )
    };
    let before = patches().await;
    assert!(before > 0.0, "the first sync's writes are counted");

    repo.write("README.md", "outside the app's path\n");
    let sha = repo.commit("outside the app");
    config.wait_applied("app", &sha).await;
    assert_eq!(patches().await, before, "a write for an unchanged render");

    edit_configmap(&ns, "settings", "edited").await;
    eventually("the edit reverted", WAIT, || async {
        (configmap_value(&ns, "settings").await.as_deref() == Some("from-git")).then_some(())
    })
    .await;

    repo.write("deploy/settings.yaml", &configmap("settings", 0, "changed"));
    let sha = repo.commit("the app's own file");
    config.wait_applied("app", &sha).await;
    assert_eq!(
        configmap_value(&ns, "settings").await.as_deref(),
        Some("changed")
    );
}

/// A watch cut off lists its kind again once the API server is back: the deletion made while
/// it was away is healed, the agent counts every kind as watched again, and the app at rest is
/// not read (no polling GETs) from then on.
#[tokio::test]
async fn watches_cut_off_list_again_and_the_app_at_rest_is_not_polled() {
    let ns = TestNamespace::reserve("relist").await;
    let proxy = ApiProxy::start(cluster().api_address()).await;
    let repo = GitRepo::new();
    repo.write(
        "deploy/settings.yaml",
        &configmap("settings", 0, "from-git"),
    );
    repo.write("deploy/other.yaml", &configmap("other", 0, "from-git"));
    let sha = repo.commit("two ConfigMaps");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = proxy.kubeconfig(&cluster().kubeconfig, dir.path());
    let config =
        app_config(&repo, &ns, "self_heal = true").kubeconfig(&kubeconfig.display().to_string());
    let _agent = Agent::start(&config);
    config.wait_applied("app", &sha).await;
    let port = config.http_port;
    let watches = || crate::harness::http::metric(port, "edgesync_drift_watches");
    // The ConfigMaps in the namespace (the Namespace the agent made is not the app's).
    eventually("the drift watch running", WAIT, || async {
        (watches().await == 1.0).then_some(())
    })
    .await;

    proxy.cut();
    eventually("the watch lost", WAIT, || async {
        (watches().await == 0.0).then_some(())
    })
    .await;
    ns.api::<ConfigMap>()
        .delete("settings", &Default::default())
        .await
        .unwrap();
    proxy.restore().await;
    eventually("the watch listed again", WAIT, || async {
        (watches().await == 1.0).then_some(())
    })
    .await;
    eventually("the deletion healed", WAIT, || async {
        (configmap_value(&ns, "settings").await.as_deref() == Some("from-git")).then_some(())
    })
    .await;
    eventually("the app Healthy", WAIT, || async {
        (config.status().await["apps"][0]["health"] == "Healthy").then_some(())
    })
    .await;

    // At rest: longer than the monitor's 15 s round for apps not under a running watch.
    let gets = || {
        crate::harness::http::metric(
            port,
            "edgesync_apply_requests_total{verb=\"get\",code=\"200\"}",
        )
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = gets().await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(
        gets().await,
        before,
        "GETs at rest after the watches came back"
    );
}
