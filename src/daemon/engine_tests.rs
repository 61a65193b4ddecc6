//! The sync engine on an in-memory cluster ([`FakeCluster`]): real Git (a local repository),
//! real rendering and state files, no API server. Each behaviour runs in milliseconds; the
//! integration tests in `tests/it` hold the same rules against the real control plane.

use std::path::Path;
use std::sync::Arc;

use serde_json::json;

use super::node::Node;
use super::sync::{SyncContext, SyncError, SyncResult, Target};
use crate::apply::fake::FakeCluster;
use crate::apply::ObjectRef;
use crate::config::Config;
use crate::metrics::Metrics;

struct Engine {
    _dir: tempfile::TempDir,
    repo: git2::Repository,
    work: std::path::PathBuf,
    cluster: Arc<FakeCluster>,
    ctx: Arc<SyncContext>,
}

fn cm(name: &str, value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  v: \"{value}\"\n")
}

impl Engine {
    /// An engine whose apps (TOML `[[apps]]` bodies, `{repo}` replaced) read one local repo.
    fn new(apps: &[&str]) -> Engine {
        Self::with_cluster(apps, Arc::new(FakeCluster::default()))
    }

    fn with_cluster(apps: &[&str], cluster: Arc<FakeCluster>) -> Engine {
        Self::build(apps, cluster, |_| {})
    }

    /// An engine whose node `adjust` changes first (AppProjects a fleet would bring).
    fn build(apps: &[&str], cluster: Arc<FakeCluster>, adjust: impl FnOnce(&mut Node)) -> Engine {
        Self::build_with("", apps, cluster, adjust)
    }

    /// As [`Engine::build`], with `tables` (TOML tables such as `[gates]`) in the config.
    fn build_with(
        tables: &str,
        apps: &[&str],
        cluster: Arc<FakeCluster>,
        adjust: impl FnOnce(&mut Node),
    ) -> Engine {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("repo");
        let repo = git2::Repository::init(&work).unwrap();
        let url = format!("file://{}", work.display());
        let mut text = format!(
            "state_dir = \"{}\"\n[node]\nname = \"node-a\"\n{tables}\n",
            dir.path().join("state").display()
        );
        for app in apps {
            text.push_str(&format!("[[apps]]\n{}\n", app.replace("{repo}", &url)));
        }
        let config = Config::parse(&dir.path().join("config.toml"), &text).unwrap();
        let mut node = Node::assemble(config).unwrap();
        adjust(&mut node);
        let ctx = SyncContext::with_cluster(
            node,
            Arc::new(Metrics::default()),
            None,
            cluster.clone(),
            None,
        );
        Engine {
            _dir: dir,
            repo,
            work,
            cluster,
            ctx,
        }
    }

    fn write(&self, rel: &str, text: &str) {
        let path = self.work.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn remove(&self, rel: &str) {
        std::fs::remove_file(self.work.join(rel)).unwrap();
    }

    fn commit(&self) -> Target {
        let mut index = self.repo.index().unwrap();
        index
            .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
            .unwrap();
        index.update_all(["*"], None).unwrap();
        index.write().unwrap();
        let tree = self.repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("t", "t@example.com").unwrap();
        let parent = self.repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        let oid = self
            .repo
            .commit(Some("HEAD"), &sig, &sig, "c", &tree, &parents)
            .unwrap();
        Target {
            sha: oid.to_string(),
            tag: None,
            sources: Vec::new(),
        }
    }

    async fn sync(&self, app: &str, target: &Target) -> Result<SyncResult, SyncError> {
        let config = self.ctx.config.app(app).unwrap().clone();
        self.ctx.sync_app(&config, target, true).await
    }

    fn exists(&self, kind: &str, name: &str) -> bool {
        self.cluster.names(kind).iter().any(|n| n == name)
    }

    fn uid(&self, reference: &ObjectRef) -> serde_json::Value {
        self.cluster.live(reference).unwrap()["metadata"]["uid"].clone()
    }
}

fn cm_ref(ns: &str, name: &str) -> ObjectRef {
    ObjectRef {
        group: String::new(),
        version: "v1".into(),
        kind: "ConfigMap".into(),
        namespace: Some(ns.into()),
        name: name.into(),
    }
}

const PRUNING: &str = "name = \"web\"\nrepo = \"{repo}\"\npath = \"app\"\nnamespace = \"team\"\ncreate_namespace = true\nprune = true";

#[tokio::test]
async fn an_applied_revision_is_not_sent_again() {
    let e = Engine::new(&[PRUNING]);
    e.write("app/a.yaml", &cm("a", "1"));
    let rev = e.commit();
    e.sync("web", &rev).await.unwrap();
    let applies = e.cluster.count("apply");
    let app = e.ctx.config.app("web").unwrap().clone();
    let again = e.ctx.sync_app(&app, &rev, false).await.unwrap();
    assert!(matches!(again, SyncResult::Unchanged { .. }), "{again:?}");
    assert_eq!(e.cluster.count("apply"), applies);
}

#[tokio::test]
async fn prune_deletes_what_git_dropped_and_keeps_what_others_took() {
    let e = Engine::new(&[PRUNING]);
    for name in ["a", "b", "c"] {
        e.write(&format!("app/{name}.yaml"), &cm(name, "1"));
    }
    e.sync("web", &e.commit()).await.unwrap();
    // Someone else takes c over.
    let mut c = e.cluster.live(&cm_ref("team", "c")).unwrap();
    c["metadata"]["annotations"]["edgesync.io/app"] = json!("other");
    e.cluster.put(cm_ref("team", "c"), c);
    e.remove("app/b.yaml");
    e.remove("app/c.yaml");
    e.sync("web", &e.commit()).await.unwrap();
    assert!(!e.exists("ConfigMap", "b"));
    assert!(e.exists("ConfigMap", "c"));
    assert!(e.exists("ConfigMap", "a"));
    let state = e.ctx.store.load("web").unwrap();
    assert_eq!(state.inventory.len(), 1, "{:?}", state.inventory);
}

#[tokio::test]
async fn a_partial_apply_prunes_nothing() {
    let e = Engine::new(&[PRUNING]);
    e.write("app/a.yaml", &cm("a", "1"));
    e.write("app/b.yaml", &cm("b", "1"));
    e.sync("web", &e.commit()).await.unwrap();
    e.remove("app/a.yaml");
    e.write("app/bad.yaml", &cm("bad", "1"));
    e.cluster.refuse.lock().unwrap().insert("bad".into());
    let err = e.sync("web", &e.commit()).await.unwrap_err();
    assert!(err.to_string().contains("bad"), "{err}");
    assert!(e.exists("ConfigMap", "a"), "pruned after a partial apply");
    assert_eq!(e.cluster.count("delete"), 0);
}

#[tokio::test]
async fn an_empty_render_prunes_nothing() {
    let e = Engine::new(&[PRUNING]);
    e.write("app/a.yaml", &cm("a", "1"));
    e.sync("web", &e.commit()).await.unwrap();
    e.remove("app/a.yaml");
    e.write("app/README.md", "nothing here\n");
    let err = e.sync("web", &e.commit()).await.unwrap_err();
    assert!(err.to_string().contains("allow_empty"), "{err}");
    assert!(e.exists("ConfigMap", "a"));
}

#[tokio::test]
async fn an_api_version_bump_keeps_the_object() {
    let e = Engine::new(&[PRUNING]);
    let hpa = |v: &str| {
        format!("apiVersion: autoscaling/{v}\nkind: HorizontalPodAutoscaler\nmetadata:\n  name: web\nspec:\n  maxReplicas: 2\n")
    };
    e.write("app/hpa.yaml", &hpa("v1"));
    e.sync("web", &e.commit()).await.unwrap();
    let reference = ObjectRef {
        group: "autoscaling".into(),
        version: "v2".into(),
        kind: "HorizontalPodAutoscaler".into(),
        namespace: Some("team".into()),
        name: "web".into(),
    };
    let uid = e.uid(&reference);
    e.write("app/hpa.yaml", &hpa("v2"));
    e.sync("web", &e.commit()).await.unwrap();
    assert_eq!(e.uid(&reference), uid, "deleted and created again");
    assert_eq!(e.cluster.count("delete"), 0);
    let state = e.ctx.store.load("web").unwrap();
    let versions: Vec<&str> = state.inventory.iter().map(|o| o.version.as_str()).collect();
    assert_eq!(
        versions.iter().filter(|v| **v == "v2").count(),
        1,
        "{versions:?}"
    );
}

#[tokio::test]
async fn the_apps_namespace_stays_when_its_manifest_is_dropped() {
    let e = Engine::new(&[PRUNING]);
    e.write(
        "app/ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: team\n",
    );
    e.write("app/a.yaml", &cm("a", "1"));
    e.sync("web", &e.commit()).await.unwrap();
    e.remove("app/ns.yaml");
    e.sync("web", &e.commit()).await.unwrap();
    assert!(e.exists("Namespace", "team"));
    assert!(e.exists("ConfigMap", "a"));
}

#[tokio::test]
async fn two_apps_claiming_one_object_is_a_conflict() {
    let e = Engine::new(&[
        PRUNING,
        "name = \"copy\"\nrepo = \"{repo}\"\npath = \"app\"\nnamespace = \"team\"",
    ]);
    e.write("app/a.yaml", &cm("a", "1"));
    let rev = e.commit();
    e.sync("web", &rev).await.unwrap();
    let err = e.sync("copy", &rev).await.unwrap_err();
    assert!(matches!(err, SyncError::Conflict(_)), "{err}");
}

#[tokio::test]
async fn without_local_state_an_unreadable_inventory_applies_and_saves_nothing() {
    let e = Engine::new(&[PRUNING]);
    e.write("app/a.yaml", &cm("a", "1"));
    *e.cluster.inventory_unreadable.lock().unwrap() = true;
    let err = e.sync("web", &e.commit()).await.unwrap_err();
    assert!(matches!(err, SyncError::Inventory(_)), "{err}");
    assert_eq!(e.cluster.count("apply"), 0);
    assert_eq!(
        e.ctx.store.load("web").unwrap(),
        crate::state::AppState::default()
    );
}

#[tokio::test]
async fn what_another_node_runs_is_not_pruned() {
    let e = Engine::new(&[PRUNING]);
    e.write("app/a.yaml", &cm("a", "1"));
    e.write("app/b.yaml", &cm("b", "1"));
    e.sync("web", &e.commit()).await.unwrap();
    e.cluster
        .elsewhere
        .lock()
        .unwrap()
        .insert(cm_ref("team", "b"));
    e.remove("app/b.yaml");
    e.sync("web", &e.commit()).await.unwrap();
    assert!(e.exists("ConfigMap", "b"));
}

#[tokio::test]
async fn rollback_returns_to_the_healthy_render_and_prunes_what_only_the_bad_one_had() {
    let e = Engine::new(&[&format!("{PRUNING}\nrollback = \"auto\"")]);
    e.write("app/a.yaml", &cm("a", "good"));
    let good = e.commit();
    e.sync("web", &good).await.unwrap();
    e.ctx.remember_healthy("web", &good.sha).await;
    e.write("app/a.yaml", &cm("a", "bad"));
    e.write("app/extra.yaml", &cm("extra", "1"));
    let bad = e.commit();
    e.sync("web", &bad).await.unwrap();
    let app = e.ctx.config.app("web").unwrap().clone();
    // A rollback for a revision the app already left does nothing.
    e.ctx.rollback(&app, &good.sha, "stale").await.unwrap();
    assert!(e.exists("ConfigMap", "extra"));
    e.ctx.rollback(&app, &bad.sha, "Degraded").await.unwrap();
    let a = e.cluster.live(&cm_ref("team", "a")).unwrap();
    assert_eq!(a["data"]["v"], "good");
    assert!(!e.exists("ConfigMap", "extra"));
    let state = e.ctx.store.load("web").unwrap();
    assert_eq!(
        state.last_applied_revision.as_deref(),
        Some(good.sha.as_str())
    );
    assert_eq!(state.bad_revision.as_deref(), Some(bad.sha.as_str()));
    // The bad revision is held until a newer one.
    let held = e.ctx.sync_app(&app, &bad, false).await.unwrap();
    assert!(matches!(held, SyncResult::Waiting { .. }), "{held:?}");
}

#[tokio::test]
async fn a_departed_app_with_delete_on_removal_takes_only_its_own_objects() {
    let cluster = Arc::new(FakeCluster::default());
    let app = format!("{PRUNING}\ndelete_on_removal = true");
    let e = Engine::with_cluster(&[&app], cluster.clone());
    e.write("app/a.yaml", &cm("a", "1"));
    e.write("app/b.yaml", &cm("b", "1"));
    e.sync("web", &e.commit()).await.unwrap();
    let mut b = cluster.live(&cm_ref("team", "b")).unwrap();
    b["metadata"]["annotations"]["edgesync.io/app"] = json!("other");
    cluster.put(cm_ref("team", "b"), b);
    let ctx = departed(&e, cluster);
    super::removal::remove_departed(ctx.clone()).await;
    assert!(!e.exists("ConfigMap", "a"));
    assert!(e.exists("ConfigMap", "b"), "someone else's now");
    assert!(ctx.store.apps().is_empty(), "state archived");
}

/// The engine's state directory and cluster, with every app gone from the config.
fn departed(e: &Engine, cluster: Arc<FakeCluster>) -> Arc<SyncContext> {
    let state_dir = e.ctx.config.state_dir.clone();
    let config = Config::parse(
        Path::new("config.toml"),
        &format!(
            "state_dir = \"{}\"\n[node]\nname = \"node-a\"\n",
            state_dir.display()
        ),
    )
    .unwrap();
    SyncContext::with_cluster(
        Node::assemble(config).unwrap(),
        Arc::new(Metrics::default()),
        None,
        cluster,
        None,
    )
}

#[tokio::test]
async fn post_delete_hooks_run_after_a_cascading_removal_only() {
    let hook = || job("name: cleanup", "    helm.sh/hook: post-delete\n");
    // Without delete_on_removal the objects stay, and so does the cleanup: it is not run,
    // and the app's warnings said so at its sync.
    let cluster = Arc::new(FakeCluster::default());
    let e = Engine::with_cluster(&[PRUNING], cluster.clone());
    e.write("app/a.yaml", &cm("a", "1"));
    e.write("app/cleanup.yaml", &hook());
    e.sync("web", &e.commit()).await.unwrap();
    assert!(!e.exists("Job", "cleanup"), "not run at a sync");
    let doc = e.ctx.board.document();
    let warnings = doc
        .apps
        .iter()
        .find(|a| a.app == "web")
        .unwrap()
        .warnings
        .join("\n");
    assert!(
        warnings.contains("PostDelete hooks will not run"),
        "{warnings}"
    );
    let ctx = departed(&e, cluster);
    super::removal::remove_departed(ctx.clone()).await;
    assert!(e.exists("ConfigMap", "a"));
    assert!(!e.exists("Job", "cleanup"));
    assert!(ctx.store.apps().is_empty());

    // With it, the hook runs once the objects are gone; one that ran and failed is done.
    for refused in [false, true] {
        let cluster = Arc::new(FakeCluster::default());
        let app = format!("{PRUNING}\ndelete_on_removal = true");
        let e = Engine::with_cluster(&[&app], cluster.clone());
        e.write("app/a.yaml", &cm("a", "1"));
        e.write("app/cleanup.yaml", &hook());
        e.sync("web", &e.commit()).await.unwrap();
        assert!(!e.exists("Job", "cleanup"));
        if refused {
            cluster.refuse.lock().unwrap().insert("cleanup".into());
        }
        let ctx = departed(&e, cluster.clone());
        super::removal::remove_departed(ctx.clone()).await;
        assert!(!e.exists("ConfigMap", "a"));
        assert!(e.exists("Job", "cleanup"), "the hook ran");
        assert!(ctx.store.apps().is_empty(), "state archived");
    }

    // A hook that cannot be created keeps the app's state for the next try.
    let cluster = Arc::new(FakeCluster::default());
    let app = format!("{PRUNING}\ndelete_on_removal = true");
    let e = Engine::with_cluster(&[&app], cluster.clone());
    e.write("app/a.yaml", &cm("a", "1"));
    e.write(
        "app/note.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: note\n  annotations:\n    argocd.argoproj.io/hook: PostDelete\n",
    );
    e.sync("web", &e.commit()).await.unwrap();
    cluster.refuse.lock().unwrap().insert("note".into());
    let ctx = departed(&e, cluster.clone());
    super::removal::remove_departed(ctx.clone()).await;
    assert!(!e.exists("ConfigMap", "a"));
    assert_eq!(ctx.store.apps(), ["web"], "kept for the next try");
    cluster.refuse.lock().unwrap().clear();
    super::removal::remove_departed(ctx.clone()).await;
    assert!(e.exists("ConfigMap", "note"));
    assert!(ctx.store.apps().is_empty());
}

const DEPLOYMENT: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    spec:\n      containers: [{name: web, image: web:2}]\n";

#[tokio::test]
async fn a_rollout_past_its_health_timeout_is_rolled_back_by_the_health_monitor() {
    let e = Engine::new(&[&format!(
        "{PRUNING}\nrollback = \"auto\"\nhealth_timeout = \"60s\""
    )]);
    let app = e.ctx.config.app("web").unwrap().clone();
    let mut monitor = super::health::Monitor::new(&e.ctx);
    e.write("app/a.yaml", &cm("a", "good"));
    let good = e.commit();
    e.sync("web", &good).await.unwrap();
    let now = crate::state::unix_now();
    monitor.round(&e.ctx, None, now).await;
    let health = |e: &Engine| {
        let doc = e.ctx.board.document();
        doc.apps
            .iter()
            .find(|a| a.app == "web")
            .map(|a| a.health.clone())
    };
    assert_eq!(health(&e).as_deref(), Some("Healthy"));
    // A revision whose Deployment never rolls out (the fake cluster runs no controllers).
    e.write("app/deploy.yaml", DEPLOYMENT);
    let bad = e.commit();
    e.sync("web", &bad).await.unwrap();
    // Measured after the sync: slow machines (qemu) may take seconds between the two syncs.
    let now = crate::state::unix_now();
    let changing = monitor.round(&e.ctx, None, now).await;
    assert!(changing, "a rollout on its way is polled quickly");
    assert!(
        e.exists("Deployment", "web"),
        "within the timeout: no rollback"
    );
    let only: std::collections::HashSet<String> = ["other".to_string()].into();
    monitor.round(&e.ctx, Some(&only), now + 61).await;
    assert!(
        e.exists("Deployment", "web"),
        "rounds only rate the apps asked for"
    );
    monitor.round(&e.ctx, None, now + 61).await;
    assert!(!e.exists("Deployment", "web"), "rolled back and pruned");
    let state = e.ctx.store.load("web").unwrap();
    assert_eq!(
        state.last_applied_revision.as_deref(),
        Some(good.sha.as_str())
    );
    assert_eq!(state.bad_revision.as_deref(), Some(bad.sha.as_str()));
    let held = e.ctx.sync_app(&app, &bad, false).await.unwrap();
    assert!(matches!(held, SyncResult::Waiting { .. }), "{held:?}");
}

fn with_project(name: &str, spec: serde_json::Value) -> impl FnOnce(&mut Node) {
    let project = crate::policy::Project::from_spec(name, &spec);
    let name = name.to_string();
    move |node: &mut Node| {
        node.projects.insert(name, project);
    }
}

#[tokio::test]
async fn a_default_project_the_fleet_defines_restricts_its_apps() {
    let app = format!("{PRUNING}\nproject = \"default\"");
    let e = Engine::build(
        &[&app],
        Arc::new(FakeCluster::default()),
        with_project(
            "default",
            json!({"sourceRepos": ["*"], "destinations": [{"namespace": "team", "server": "*"}],
                   "namespaceResourceBlacklist": [{"group": "", "kind": "ConfigMap"}]}),
        ),
    );
    e.write("app/a.yaml", &cm("a", "1"));
    let err = e.sync("web", &e.commit()).await.unwrap_err();
    assert!(
        err.to_string().contains("namespaceResourceBlacklist"),
        "{err}"
    );
    assert!(!e.exists("ConfigMap", "a"));
}

#[tokio::test]
async fn a_sync_window_that_cannot_be_read_holds_every_sync() {
    let app = format!("{PRUNING}\nproject = \"edge\"");
    let e = Engine::build(
        &[&app],
        Arc::new(FakeCluster::default()),
        with_project(
            "edge",
            json!({"sourceRepos": ["*"], "destinations": [{"namespace": "*", "server": "*"}],
                   "syncWindows": [{"kind": "deny", "schedule": "0 25 * * *", "duration": "1h",
                                    "applications": ["web"], "manualSync": true}]}),
        ),
    );
    e.write("app/a.yaml", &cm("a", "1"));
    let target = e.commit();
    // Manual syncs too: the window that cannot be read might be the one that allows them.
    let held = e.sync("web", &target).await.unwrap();
    match held {
        SyncResult::Waiting { reason, .. } => {
            assert!(reason.contains("cannot be read"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(!e.exists("ConfigMap", "a"));
}

#[test]
fn a_crd_in_the_plan_gives_its_kinds_their_scope() {
    use crate::render::Object;
    let object = |text: &str| -> Object {
        let value: serde_json::Value = serde_saphyr::from_str(text).unwrap();
        assert!(value.is_object(), "{text}");
        Object {
            value: value.as_object().unwrap().clone(),
            origin: "crd.yaml#0".into(),
        }
    };
    let plan = crate::apply::Plan {
        objects: vec![object(
            "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: gadgets.example.com}\nspec: {group: example.com, scope: Cluster, names: {kind: Gadget, plural: gadgets}}\n",
        )],
        waves: vec![0],
        app: "web".into(),
        default_namespace: None,
        ignore_differences: Vec::new(),
        out_of_sync_only: false,
    hooks: Vec::new(),
    skipped: Vec::new(),
    warnings: Vec::new(),
    };
    assert_eq!(
        super::checks::plan_scope(&plan, "example.com", "Gadget"),
        Some(false)
    );
    assert_eq!(
        super::checks::plan_scope(&plan, "example.com", "Widget"),
        None
    );
}

#[tokio::test]
async fn a_kind_of_unknown_scope_must_pass_both_scopes_rules() {
    let cluster = Arc::new(FakeCluster::default());
    cluster
        .unknown_kinds
        .lock()
        .unwrap()
        .insert("Gadget".to_string());
    let app = format!("{PRUNING}\nproject = \"edge\"");
    // Namespaced kinds are all allowed; no cluster-scoped kind is.
    let e = Engine::build(
        &[&app],
        cluster,
        with_project(
            "edge",
            json!({"sourceRepos": ["*"], "destinations": [{"namespace": "*", "server": "*"}],
                   "clusterResourceWhitelist": [{"group": "", "kind": "Namespace"}]}),
        ),
    );
    e.write(
        "app/gadget.yaml",
        "apiVersion: example.com/v1\nkind: Gadget\nmetadata:\n  name: g\n",
    );
    let err = e.sync("web", &e.commit()).await.unwrap_err().to_string();
    assert!(
        err.contains("clusterResourceWhitelist") && err.contains("scope is not known"),
        "{err}"
    );
    assert!(!e.exists("Gadget", "g"));
}

#[tokio::test]
async fn drift_is_reported_without_self_heal_and_healed_with_it() {
    for self_heal in [false, true] {
        let app = format!("{PRUNING}\nself_heal = {self_heal}");
        let e = Engine::new(&[&app]);
        e.write("app/a.yaml", &cm("a", "git"));
        e.sync("web", &e.commit()).await.unwrap();
        let (tx, _rx) = tokio::sync::mpsc::channel(8);
        let mut drift = super::drift::Drift::new(e.ctx.clone(), tx);
        drift.load_all().await;
        let status = |e: &Engine| {
            let doc = e.ctx.board.document();
            let app = doc.apps.into_iter().find(|a| a.app == "web").unwrap();
            (app.sync.as_str().to_string(), app.message)
        };
        // Nothing differs yet.
        drift.check_app("web").await;
        assert_eq!(status(&e).0, "Synced", "{:?}", status(&e));
        // Someone edits the ConfigMap by hand.
        let mut live = e.cluster.live(&cm_ref("team", "a")).unwrap();
        live["data"]["v"] = json!("by hand");
        e.cluster.put(cm_ref("team", "a"), live);
        drift.check_app("web").await;
        let v = e.cluster.live(&cm_ref("team", "a")).unwrap()["data"]["v"].clone();
        if self_heal {
            assert_eq!(v, "git", "healed from the last applied render");
        } else {
            assert_eq!(v, "by hand", "left alone");
            let (sync, message) = status(&e);
            assert_eq!(sync, "OutOfSync");
            assert!(
                message.contains("ConfigMap") && message.contains("/data/v"),
                "{message}"
            );
        }
    }
}

/// The app's status as the board shows it: sync state and message.
fn shown(e: &Engine, app: &str) -> (String, String) {
    let doc = e.ctx.board.document();
    let status = doc.apps.iter().find(|a| a.app == app).unwrap();
    (status.sync.as_str().to_string(), status.message.clone())
}

#[tokio::test]
async fn a_first_render_with_no_objects_fails_instead_of_showing_synced() {
    let plain = "name = \"web\"\nrepo = \"{repo}\"\npath = \"app\"\nnamespace = \"team\"";
    let e = Engine::new(&[plain]);
    e.write("app/README.md", "the manifests are elsewhere\n");
    let err = e.sync("web", &e.commit()).await.unwrap_err();
    assert!(err.to_string().contains("no objects"), "{err}");
    assert_eq!(e.cluster.count("apply"), 0);
    let (sync, message) = shown(&e, "web");
    assert_eq!(sync, "Failed");
    assert!(message.contains("no objects"), "{message}");

    // Intended: allow_empty says so, and the sync succeeds with nothing to apply.
    let e = Engine::new(&[&format!("{plain}\nallow_empty = true")]);
    e.write("app/README.md", "nothing yet\n");
    e.sync("web", &e.commit()).await.unwrap();
}

#[tokio::test]
async fn sources_edgesync_cannot_render_fail_and_apply_nothing() {
    let e = Engine::new(&[PRUNING]);
    e.write("app/a.yaml", &cm("a", "1"));
    e.write(
        "app/main.jsonnet",
        "{ apiVersion: 'v1', kind: 'ConfigMap' }\n",
    );
    let err = e.sync("web", &e.commit()).await.unwrap_err();
    assert!(
        err.to_string().contains("Jsonnet") && err.to_string().contains("main.jsonnet"),
        "{err}"
    );
    assert!(!e.exists("ConfigMap", "a"), "part of the app was applied");
    assert_eq!(shown(&e, "web").0, "Failed");
    // Excluded on purpose, the rest renders.
    let e = Engine::new(&[&format!(
        "{PRUNING}\ndirectory = {{ exclude = \"*.jsonnet\" }}"
    )]);
    e.write("app/a.yaml", &cm("a", "1"));
    e.write("app/main.jsonnet", "{}\n");
    e.sync("web", &e.commit()).await.unwrap();
    assert!(e.exists("ConfigMap", "a"));

    // An Application naming a config management plugin.
    let e = Engine::build(&[PRUNING], Arc::new(FakeCluster::default()), |node| {
        node.config.apps[0].plugin = Some("argocd-vault-plugin".into());
    });
    e.write("app/a.yaml", &cm("a", "1"));
    let err = e.sync("web", &e.commit()).await.unwrap_err();
    assert!(err.to_string().contains("argocd-vault-plugin"), "{err}");
    assert!(!e.exists("ConfigMap", "a"));
}

#[tokio::test]
async fn a_failing_app_waiting_to_retry_still_shows_its_error() {
    let app = format!("{PRUNING}\nretry = {{ limit = 3, backoff = {{ duration = \"1h\" }} }}");
    let e = Engine::new(&[&app]);
    e.write("app/a.yaml", "kind: [broken\n");
    let target = e.commit();
    let app = e.ctx.config.app("web").unwrap().clone();
    e.ctx.sync_app(&app, &target, false).await.unwrap_err();
    let held = e.ctx.sync_app(&app, &target, false).await.unwrap();
    assert!(matches!(held, SyncResult::Waiting { .. }), "{held:?}");
    let (_, message) = shown(&e, "web");
    assert!(
        message.contains("invalid YAML") && message.contains("retry"),
        "{message}"
    );
}

#[tokio::test]
async fn the_created_namespace_carries_the_managed_namespace_metadata() {
    let app = format!(
        "{PRUNING}\nnamespace_metadata = {{ labels = {{ team = \"edge\" }}, annotations = {{ owner = \"ops\" }} }}"
    );
    let e = Engine::new(&[&app]);
    e.write("app/a.yaml", &cm("a", "1"));
    e.sync("web", &e.commit()).await.unwrap();
    let namespace = ObjectRef {
        group: String::new(),
        version: "v1".into(),
        kind: "Namespace".into(),
        namespace: None,
        name: "team".into(),
    };
    let live = e.cluster.live(&namespace).unwrap();
    assert_eq!(live["metadata"]["labels"]["team"], "edge", "{live}");
    assert_eq!(live["metadata"]["annotations"]["owner"], "ops", "{live}");
}

fn job(name: &str, annotations: &str) -> String {
    format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  {name}\n  annotations:\n{annotations}spec:\n  template:\n    spec:\n      restartPolicy: Never\n      containers: [{{name: m, image: busybox}}]\n"
    )
}

#[tokio::test]
async fn hooks_run_in_their_phase_and_are_not_the_apps_objects() {
    let e = Engine::new(&[PRUNING]);
    e.write("app/a.yaml", &cm("a", "1"));
    e.write(
        "app/migrate.yaml",
        &job("name: migrate", "    argocd.argoproj.io/hook: PreSync\n"),
    );
    e.write(
        "app/notify.yaml",
        &job(
            "generateName: notify-",
            "    argocd.argoproj.io/hook: PostSync\n    argocd.argoproj.io/hook-delete-policy: HookSucceeded\n",
        ),
    );
    e.write(
        "app/cleanup.yaml",
        &job("name: cleanup", "    argocd.argoproj.io/hook: SyncFail\n"),
    );
    e.sync("web", &e.commit()).await.unwrap();
    assert!(e.exists("ConfigMap", "a"));
    assert!(e.exists("Job", "migrate"), "the PreSync hook ran");
    assert!(
        !e.exists("Job", "cleanup"),
        "no SyncFail hook without a failure"
    );
    // The PostSync hook got a generated name, and went once it succeeded.
    assert_eq!(e.cluster.count("create"), 2);
    assert!(!e
        .cluster
        .names("Job")
        .iter()
        .any(|n| n.starts_with("notify-")));
    let state = e.ctx.store.load("web").unwrap();
    let owned: Vec<&str> = state.objects.iter().map(|o| o.kind.as_str()).collect();
    assert!(
        !owned.contains(&"Job"),
        "hooks are not the app's objects: {owned:?}"
    );

    // A failing PreSync hook stops the sync before anything is applied, and runs SyncFail.
    e.write("app/a.yaml", &cm("a", "2"));
    e.cluster.refuse.lock().unwrap().insert("migrate".into());
    let err = e.sync("web", &e.commit()).await.unwrap_err();
    assert!(err.to_string().contains("PreSync hook"), "{err}");
    assert!(e.exists("Job", "cleanup"), "the SyncFail hook ran");
    let live = e.cluster.live(&cm_ref("team", "a")).unwrap();
    assert_eq!(
        live["data"]["v"], "1",
        "nothing applied after a failed PreSync hook"
    );
}

#[tokio::test]
async fn helm_test_hooks_and_skipped_objects_are_not_applied() {
    let e = Engine::new(&[PRUNING]);
    e.write("app/a.yaml", &cm("a", "1"));
    e.write(
        "app/test.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: test\n  annotations:\n    helm.sh/hook: test\n",
    );
    e.write(
        "app/skip.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: skip\n  annotations:\n    argocd.argoproj.io/hook: Skip\n",
    );
    e.sync("web", &e.commit()).await.unwrap();
    assert!(e.exists("ConfigMap", "a"));
    assert!(!e.exists("ConfigMap", "test") && !e.exists("ConfigMap", "skip"));
}

#[tokio::test]
async fn a_render_emptied_down_to_its_hooks_prunes_nothing() {
    let e = Engine::new(&[PRUNING]);
    e.write("app/a.yaml", &cm("a", "1"));
    e.sync("web", &e.commit()).await.unwrap();
    e.remove("app/a.yaml");
    e.write(
        "app/migrate.yaml",
        &job("name: migrate", "    argocd.argoproj.io/hook: PreSync\n"),
    );
    let err = e.sync("web", &e.commit()).await.unwrap_err();
    assert!(err.to_string().contains("no objects"), "{err}");
    assert!(e.exists("ConfigMap", "a"));
    assert_eq!(e.cluster.count("create"), 0, "no hook ran");
}

#[tokio::test]
async fn a_failed_post_sync_hook_fails_the_sync_and_is_retried() {
    let e = Engine::new(&[PRUNING]);
    let app = e.ctx.config.app("web").unwrap().clone();
    e.write("app/a.yaml", &cm("a", "1"));
    e.write(
        "app/smoke.yaml",
        &job("name: smoke", "    argocd.argoproj.io/hook: PostSync\n"),
    );
    let target = e.commit();
    e.cluster.refuse.lock().unwrap().insert("smoke".into());
    let err = e.ctx.sync_app(&app, &target, false).await.unwrap_err();
    assert!(err.to_string().contains("PostSync hook"), "{err}");
    assert!(e.exists("ConfigMap", "a"), "applied before the hook ran");
    let doc = e.ctx.board.document();
    let status = doc.apps.iter().find(|a| a.app == "web").unwrap();
    assert!(status.last_error.is_some(), "{status:?}");
    // The same revision is not taken as done: it waits for its retry, then syncs again.
    let again = e.ctx.sync_app(&app, &target, false).await.unwrap();
    assert!(matches!(again, SyncResult::Waiting { .. }), "{again:?}");
    e.cluster.refuse.lock().unwrap().clear();
    e.ctx.retries.succeeded("web");
    let again = e.ctx.sync_app(&app, &target, false).await.unwrap();
    assert!(matches!(again, SyncResult::Applied { .. }), "{again:?}");
    let again = e.ctx.sync_app(&app, &target, false).await.unwrap();
    assert!(matches!(again, SyncResult::Unchanged { .. }), "{again:?}");
}

const HEALING: &str = "name = \"web\"\nrepo = \"{repo}\"\npath = \"app\"\nnamespace = \"team\"\ncreate_namespace = true\nprune = true\nself_heal = true";

/// What a running drift watch over every kind of the app would say: all watched.
fn watch_everything(e: &Engine) {
    for kind in ["ConfigMap", "Namespace"] {
        e.ctx.set_watched("", kind, None, true);
    }
}

async fn sync_new(e: &Engine, app: &str, target: &Target) -> SyncResult {
    let config = e.ctx.config.app(app).unwrap().clone();
    e.ctx.sync_app(&config, target, false).await.unwrap()
}

/// An engine whose one app `web` (configured by `app`) has applied one ConfigMap.
async fn applied_once(app: &str) -> Engine {
    let e = Engine::new(&[app]);
    e.write("app/a.yaml", &cm("a", "1"));
    e.sync("web", &e.commit()).await.unwrap();
    e
}

/// Commits a file outside `web`'s path, so its render stays the same, and syncs it.
async fn commit_elsewhere(e: &Engine) -> (Target, SyncResult) {
    e.write("other/b.yaml", &cm("b", "1"));
    let rev = e.commit();
    let result = sync_new(e, "web", &rev).await;
    (rev, result)
}

#[tokio::test]
async fn a_new_revision_with_the_same_render_is_recorded_without_an_apply() {
    let e = applied_once(HEALING).await;
    watch_everything(&e);
    let applies = e.cluster.count("apply");

    // A commit elsewhere in the repository: the same render, so nothing is sent.
    let (rev, result) = commit_elsewhere(&e).await;
    assert!(matches!(result, SyncResult::Unchanged { .. }), "{result:?}");
    assert_eq!(e.cluster.count("apply"), applies);
    let state = e.ctx.store.load("web").unwrap();
    assert_eq!(
        state.last_applied_revision.as_deref(),
        Some(rev.sha.as_str())
    );
    let render = e
        .ctx
        .store
        .load_render("web", crate::state::RenderKind::Applied)
        .unwrap()
        .unwrap();
    assert_eq!(
        render.revision, rev.sha,
        "the render is kept under the new revision"
    );
    let doc = e.ctx.board.document();
    let web = doc.apps.iter().find(|a| a.app == "web").unwrap();
    assert_eq!(web.revision.as_deref(), Some(rev.sha.as_str()));
    assert_eq!(web.sync, crate::report::status::SyncState::Synced);

    // A change of the app's own files is applied.
    e.write("app/a.yaml", &cm("a", "2"));
    let result = sync_new(&e, "web", &e.commit()).await;
    assert!(matches!(result, SyncResult::Applied { .. }), "{result:?}");
    assert!(e.cluster.count("apply") > applies);
}

/// An unchanged render's record (a render and a state, synced to disk) waits until no other
/// app's sync may still write to the cluster, so its fsyncs stay off that app's applies.
#[tokio::test]
async fn an_unchanged_render_is_recorded_after_the_other_apps_applies() {
    let e = applied_once(HEALING).await;
    watch_everything(&e);
    let other = e.ctx.applying();
    e.write("other/b.yaml", &cm("b", "1"));
    let rev = e.commit();
    let recorded = || e.ctx.store.load("web").unwrap().last_applied_revision;
    let (result, ()) = tokio::join!(sync_new(&e, "web", &rev), async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_ne!(
            recorded().as_deref(),
            Some(rev.sha.as_str()),
            "recorded during an apply"
        );
        drop(other);
    });
    assert!(matches!(result, SyncResult::Unchanged { .. }), "{result:?}");
    assert_eq!(recorded().as_deref(), Some(rev.sha.as_str()));
}

#[tokio::test]
async fn an_unchanged_render_is_applied_in_full_when_the_cluster_may_differ() {
    // Drift not yet checked: applied in full.
    let e = applied_once(HEALING).await;
    watch_everything(&e);
    e.ctx.set_drift_open("web", true);
    let (_, result) = commit_elsewhere(&e).await;
    assert!(matches!(result, SyncResult::Applied { .. }), "{result:?}");

    // A kind no running watch sees: applied in full.
    let e = applied_once(HEALING).await;
    e.ctx.set_watched("", "Namespace", None, true);
    let (_, result) = commit_elsewhere(&e).await;
    assert!(matches!(result, SyncResult::Applied { .. }), "{result:?}");

    // A manual sync always applies.
    let e = applied_once(HEALING).await;
    watch_everything(&e);
    e.write("other/b.yaml", &cm("b", "1"));
    let result = e.sync("web", &e.commit()).await.unwrap();
    assert!(matches!(result, SyncResult::Applied { .. }), "{result:?}");

    // Without self-heal, nothing keeps the objects as the render has them: applied in full,
    // as Argo CD syncs an app that is OutOfSync when a new revision comes.
    let e = applied_once(PRUNING).await;
    watch_everything(&e);
    let (_, result) = commit_elsewhere(&e).await;
    assert!(matches!(result, SyncResult::Applied { .. }), "{result:?}");
}

#[tokio::test]
async fn an_app_is_rated_from_its_apply_answers_until_another_writer_changes_it() {
    let e = applied_once(PRUNING).await;
    let mut monitor = super::health::Monitor::new(&e.ctx);
    let health = |e: &Engine| {
        let doc = e.ctx.board.document();
        let web = doc.apps.iter().find(|a| a.app == "web").cloned();
        web.map(|a| a.health)
    };
    let gets = e.cluster.count("get");
    monitor.round(&e.ctx, None, crate::state::unix_now()).await;
    assert_eq!(e.cluster.count("get"), gets, "rated from the answers");
    assert_eq!(health(&e).as_deref(), Some("Healthy"));

    // The answers count once: the next rating reads the objects.
    monitor.round(&e.ctx, None, crate::state::unix_now()).await;
    let read = e.cluster.count("get") - gets;
    assert!(read > 0, "read again");

    // Another writer changed an object after the apply: its answer is old news.
    e.write("app/a.yaml", &cm("a", "2"));
    e.sync("web", &e.commit()).await.unwrap();
    e.ctx.changed_by_others("web");
    let gets = e.cluster.count("get");
    monitor.round(&e.ctx, None, crate::state::unix_now()).await;
    assert_eq!(e.cluster.count("get") - gets, read, "every object read");
    assert_eq!(health(&e).as_deref(), Some("Healthy"));
}

/// A cluster at rest costs watch renewals, not GETs: a settled app whose every kind is watched
/// is never read again by the monitor's timer, however long it runs; once a watch is lost, the
/// timer reads it (until the watch has listed again).
#[tokio::test]
async fn a_settled_app_under_running_watches_is_never_read_by_the_timer() {
    let e = applied_once(PRUNING).await;
    watch_everything(&e);
    let mut monitor = super::health::Monitor::new(&e.ctx);
    // The apply's answers, then one read: settled.
    monitor.round(&e.ctx, None, crate::state::unix_now()).await;
    monitor.round(&e.ctx, None, crate::state::unix_now()).await;
    let gets = e.cluster.count("get");
    for _ in 0..50 {
        monitor.round(&e.ctx, None, crate::state::unix_now()).await;
    }
    assert_eq!(
        e.cluster.count("get"),
        gets,
        "read while watched and settled"
    );

    // A watch sees a change: rated again (a round of its own, not the timer's).
    e.ctx.object_changed("web");
    let only = e.ctx.take_health_dirty();
    monitor
        .round(&e.ctx, Some(&only), crate::state::unix_now())
        .await;
    let read = e.cluster.count("get") - gets;
    assert!(read > 0, "a change is read");

    // A watch lost: the timer reads the app again, every round.
    e.ctx.set_watched("", "ConfigMap", None, false);
    let gets = e.cluster.count("get");
    monitor.round(&e.ctx, None, crate::state::unix_now()).await;
    monitor.round(&e.ctx, None, crate::state::unix_now()).await;
    assert_eq!(
        e.cluster.count("get") - gets,
        2 * read,
        "read while unwatched"
    );
}

#[tokio::test]
async fn a_sync_of_one_app_leaves_the_drift_known_of_another() {
    let other = "name = \"other\"\nrepo = \"{repo}\"\npath = \"other\"\nnamespace = \"elsewhere\"\ncreate_namespace = true";
    let e = Engine::new(&[PRUNING, other]);
    e.write("app/a.yaml", &cm("a", "git"));
    e.write("other/b.yaml", &cm("b", "git"));
    let first = e.commit();
    e.sync("web", &first).await.unwrap();
    e.sync("other", &first).await.unwrap();
    let (tx, _rx) = tokio::sync::mpsc::channel(8);
    let mut drift = super::drift::Drift::new(e.ctx.clone(), tx);
    drift.load_all().await;
    e.ctx.take_resynced();

    // `other` drifts (no self-heal): known, and shown.
    let mut live = e.cluster.live(&cm_ref("elsewhere", "b")).unwrap();
    live["data"]["v"] = json!("by hand");
    e.cluster.put(cm_ref("elsewhere", "b"), live);
    drift.check_app("other").await;
    assert_eq!(shown(&e, "other").0, "OutOfSync");
    assert!(e.ctx.drift_open("other"));

    // `web` syncs a new revision: only its desired state is reloaded; `other`'s drift stays.
    e.write("app/a.yaml", &cm("a", "2"));
    e.sync("web", &e.commit()).await.unwrap();
    let resynced = e.ctx.take_resynced();
    assert_eq!(resynced, ["web".to_string()].into());
    drift.refresh(&resynced).await;
    assert!(e.ctx.drift_open("other"), "still known");
    assert_eq!(shown(&e, "other").0, "OutOfSync");
}

/// The hub's key in the gate tests (a fixed seed: no randomness needed).
fn hub_key() -> ssh_key::PrivateKey {
    ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[7; 32]))
}

const GATED: &str = "name = \"web\"\nrepo = \"{repo}\"\npath = \"app\"\nnamespace = \"team\"\ncreate_namespace = true\ngated = true";

fn gated_engine() -> Engine {
    let public = hub_key().public_key().to_openssh().unwrap();
    let tables =
        format!("[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\n[gates]\npublic_keys = [\"{public}\"]\n");
    Engine::build_with(&tables, &[GATED], Arc::new(FakeCluster::default()), |_| {})
}

/// A gate of `web` whose one stage (every node) may run `revision`, signed by `key`.
fn signed_gate(key: &ssh_key::PrivateKey, issued: u64, revision: &str) -> Vec<u8> {
    let mut gate = edgesync_proto::Gate::everyone("web", issued, revision);
    gate.sign(key).unwrap();
    serde_json::to_vec(&gate).unwrap()
}

async fn gated_run(e: &Engine, target: &Target) -> super::gates::Gated {
    let app = e.ctx.config.app("web").unwrap().clone();
    let repo = e.ctx.config.repository(&app.repo);
    e.ctx.gated(&repo, &app, target.clone()).await
}

/// A gated app keeps what runs until it hears a gate; then runs the older of its Git target
/// and its stage's revision; a gate that is unsigned, signed by another key, older than the
/// one held, or allows a revision off the branch moves nothing.
#[tokio::test]
async fn a_gated_app_runs_what_its_stage_allows_and_nothing_else() {
    use super::gates::Gated;
    let e = gated_engine();
    let gates = e.ctx.gates.as_ref().unwrap();
    e.write("app/a.yaml", &cm("a", "1"));
    let v1 = e.commit();
    e.write("app/a.yaml", &cm("a", "2"));
    let v2 = e.commit();

    // No gate heard: nothing new runs.
    assert!(matches!(gated_run(&e, &v2).await, Gated::Keep { .. }));

    // The stage allows v1 while Git is at v2: v1 runs, and the app says why.
    let gate = gates
        .taken("web", &signed_gate(&hub_key(), 10, &v1.sha))
        .unwrap();
    assert!(gate);
    match gated_run(&e, &v2).await {
        Gated::Run { target, held } => {
            assert_eq!(target.sha, v1.sha);
            assert!(held.unwrap().contains("held at"));
        }
        Gated::Keep { reason } => panic!("kept: {reason}"),
    }

    // Forged, untrusted, stale: refused, the gate held stays.
    let other = ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[9; 32]));
    let untrusted = gates.taken("web", &signed_gate(&other, 20, &v2.sha));
    assert!(untrusted.unwrap_err().contains("not a trusted hub key"));
    let mut forged: serde_json::Value =
        serde_json::from_slice(&signed_gate(&hub_key(), 20, &v1.sha)).unwrap();
    forged["stages"][0]["revision"] = v2.sha.clone().into();
    let forged = gates.taken("web", &serde_json::to_vec(&forged).unwrap());
    assert!(forged.unwrap_err().contains("does not match"));
    let stale = gates.taken("web", &signed_gate(&hub_key(), 5, &v2.sha));
    assert!(stale.unwrap_err().contains("stale"));
    assert!(gates.taken("web", b"not json").is_err());
    assert_eq!(gates.held("web").unwrap().issued, 10);

    // A revision the branch does not hold: refused, what runs stays.
    let gate = gates.taken("web", &signed_gate(&hub_key(), 30, &"1".repeat(40)));
    assert!(gate.unwrap());
    assert!(
        matches!(gated_run(&e, &v2).await, Gated::Keep { reason } if reason.contains("not on the tracked branch"))
    );

    // The stage opens at v2 (or past it): the Git target runs.
    assert!(gates
        .taken("web", &signed_gate(&hub_key(), 40, &v2.sha))
        .unwrap());
    match gated_run(&e, &v2).await {
        Gated::Run { target, held } => {
            assert_eq!(target.sha, v2.sha);
            assert!(held.is_none());
        }
        Gated::Keep { reason } => panic!("kept: {reason}"),
    }
    // Git behind the gate (not fetched yet): what Git has runs.
    match gated_run(&e, &v1).await {
        Gated::Run { target, .. } => assert_eq!(target.sha, v1.sha),
        Gated::Keep { reason } => panic!("kept: {reason}"),
    }

    // Kept across a restart: read back from the state directory, verified again.
    gates.save(&e.ctx.store, "web").unwrap();
    let again = super::gates::Gates::load(&e.ctx.config, &e.ctx.store, &e.ctx.metrics).unwrap();
    assert_eq!(again.held("web").unwrap().issued, 40);
}
