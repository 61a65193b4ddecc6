//! The fleet source: Argo CD Applications in Git decide which apps this node runs.

use crate::git_revisions::greeting_app;
use crate::harness::{Agent, AgentConfig, GitRepo, TestNamespace};

/// An agent whose apps come from `fleet/` in the repository at `url`.
pub fn fleet_config(url: &str, poll_interval: &str) -> AgentConfig {
    AgentConfig::new()
        .section(
            "fleet",
            &format!("repo = \"{url}\"\nrevision = \"main\"\npath = \"fleet\""),
        )
        .repository(&format!(
            "url = \"{url}\"\npoll_interval = \"{poll_interval}\""
        ))
}

fn application(name: &str, url: &str, ns: &str, selector: Option<&str>) -> String {
    application_at(name, url, "app", ns, selector)
}

fn application_at(name: &str, url: &str, path: &str, ns: &str, selector: Option<&str>) -> String {
    let annotations = selector
        .map(|s| format!("  annotations:\n    edgesync.io/node-selector: \"{s}\"\n"))
        .unwrap_or_default();
    format!(
        r#"apiVersion: argoproj.io/v1alpha1
kind: Application
metadata:
  name: {name}
  namespace: argocd
{annotations}  finalizers:
    - resources-finalizer.argocd.argoproj.io
spec:
  project: default
  source:
    repoURL: {url}
    targetRevision: main
    path: {path}
  destination:
    server: https://kubernetes.default.svc
    namespace: {ns}-{name}
  syncPolicy:
    automated:
      prune: true
      selfHeal: true
    syncOptions:
      - CreateNamespace=true
"#
    )
}

#[tokio::test]
async fn applications_in_git_decide_what_this_node_runs() {
    let ns = TestNamespace::reserve("fleet").await;
    let repo = GitRepo::new();
    let url = repo.url();
    repo.write(
        "fleet/here.yaml",
        &application("here", &url, &ns.name, Some("site=plant-7")),
    );
    repo.write(
        "fleet/everywhere.yaml",
        &application("everywhere", &url, &ns.name, None),
    );
    repo.write(
        "fleet/there.yaml",
        &application("there", &url, &ns.name, Some("site in (plant-9)")),
    );
    let sha = greeting_app(&repo, "hello");
    let config = fleet_config(&url, "1s").node("labels = { site = \"plant-7\" }");
    let agent = Agent::start(&config);
    config.wait_applied("here", &sha).await;
    config.wait_applied("everywhere", &sha).await;
    assert!(config.state("there").is_null(), "targeted at another site");
    let doc = config.status().await;
    assert_eq!(doc["apps"].as_array().unwrap().len(), 2);
    assert_eq!(doc["node"]["skipped"][0]["app"], "there");

    // Retargeting in Git moves the app onto this node.
    repo.write(
        "fleet/there.yaml",
        &application("there", &url, &ns.name, Some("site in (plant-7,plant-9)")),
    );
    let retargeted = repo.commit("there runs at plant-7 too");
    config.wait_applied("there", &retargeted).await;
    assert!(agent.log().contains("fleet revision moved"));
    assert!(agent.stop().await.success());

    // Offline start: the fleet repository is gone, the node still knows its apps.
    let away = repo.path.with_extension("away");
    std::fs::rename(&repo.path, &away).unwrap();
    let agent = Agent::start(&config);
    let apps = crate::harness::eventually(
        "status with the last known fleet",
        crate::harness::WAIT,
        || async {
            let doc = config.status().await;
            let names: Vec<String> = doc["apps"]
                .as_array()?
                .iter()
                .filter_map(|a| a["app"].as_str().map(str::to_string))
                .collect();
            (names.len() == 3).then_some(names)
        },
    )
    .await;
    assert_eq!(apps, ["everywhere", "here", "there"]);
    assert!(
        agent.log().contains("cannot read the fleet"),
        "{}",
        agent.log()
    );
    assert!(agent.stop().await.success());
    std::fs::rename(&away, &repo.path).unwrap();
}

#[tokio::test]
async fn app_of_apps_yields_its_children_and_a_cycle_is_refused() {
    let ns = TestNamespace::reserve("app-of-apps").await;
    let repo = GitRepo::new();
    let url = repo.url();
    repo.write(
        "fleet/root.yaml",
        &application_at("root", &url, "children", &ns.name, None),
    );
    repo.write(
        "children/a.yaml",
        &application("child-a", &url, &ns.name, None),
    );
    repo.write(
        "children/b.yaml",
        &application("child-b", &url, &ns.name, Some("site=plant-9")),
    );
    repo.write(
        "children/c.yaml",
        &application("child-c", &url, &ns.name, Some("site=plant-7")),
    );
    // A child that includes its own parent again.
    repo.write(
        "children/back.yaml",
        &application_at("back", &url, "fleet", &ns.name, None),
    );
    let sha = greeting_app(&repo, "hello");
    let config = fleet_config(&url, "1h").node("labels = { site = \"plant-7\" }");
    let agent = Agent::start(&config);
    config.wait_applied("child-a", &sha).await;
    config.wait_applied("child-c", &sha).await;
    let doc = config.status().await;
    let running: Vec<&str> = doc["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["app"].as_str().unwrap())
        .collect();
    assert_eq!(
        running,
        ["child-a", "child-c"],
        "exactly the two right apps"
    );
    assert_eq!(doc["node"]["skipped"][0]["app"], "child-b");
    let log = agent.log();
    assert!(
        log.contains("app back closes a cycle of app-of-apps"),
        "{log}"
    );
    assert!(config.state("root").is_null() && config.state("back").is_null());
    assert!(agent.stop().await.success());
}

/// An app-of-apps with several sources: its children come from every source, as Argo CD
/// renders them, not from the first one only, and a commit to any of them is read.
#[tokio::test]
async fn a_multi_source_app_of_apps_reads_children_from_every_source() {
    let ns = TestNamespace::reserve("multi-parent").await;
    let (repo, more) = (GitRepo::new(), GitRepo::new());
    let (url, more_url) = (repo.url(), more.url());
    let parent = application_at("root", &url, "children", &ns.name, None).replace(
        &format!("  source:\n    repoURL: {url}\n    targetRevision: main\n    path: children\n"),
        &format!("  sources:\n    - repoURL: {url}\n      targetRevision: main\n      path: children\n    - repoURL: {more_url}\n      targetRevision: main\n      path: more\n"),
    );
    assert!(parent.contains("sources:"), "{parent}");
    repo.write("fleet/root.yaml", &parent);
    repo.write(
        "children/a.yaml",
        &application("child-a", &url, &ns.name, None),
    );
    more.write("more/d.yaml", &application("child-d", &url, &ns.name, None));
    more.commit("more children");
    let sha = greeting_app(&repo, "hello");
    let config = fleet_config(&url, "1s").repository(&format!("url = \"{more_url}\""));
    let agent = Agent::start(&config);
    config.wait_applied("child-a", &sha).await;
    config.wait_applied("child-d", &sha).await;
    assert!(config.state("root").is_null(), "the parent is not run");

    // A new child in the other source's repository: no fleet commit, still read.
    more.write("more/e.yaml", &application("child-e", &url, &ns.name, None));
    more.commit("one more child");
    config.wait_applied("child-e", &sha).await;
    let log = agent.log();
    assert!(
        log.contains("a repository the fleet's Applications were read from moved"),
        "{log}"
    );
    assert!(agent.stop().await.success());
}

async fn failed(config: &AgentConfig, app: &str) -> String {
    crate::harness::eventually(&format!("{app} refused"), crate::harness::WAIT, || async {
        config.state(app)["last_error"].as_str().map(str::to_string)
    })
    .await
}

fn restricted_app(name: &str, url: &str, path: &str, namespace: &str) -> String {
    format!(
        r#"apiVersion: argoproj.io/v1alpha1
kind: Application
metadata:
  name: {name}
spec:
  project: restricted
  source:
    repoURL: {url}
    targetRevision: main
    path: {path}
  destination:
    server: https://kubernetes.default.svc
    namespace: {namespace}
  syncPolicy:
    automated: {{}}
    syncOptions: [CreateNamespace=true]
"#
    )
}

#[tokio::test]
async fn project_rules_refuse_unlisted_cluster_kinds_and_foreign_namespaces_before_applying() {
    let ns = TestNamespace::reserve("policy").await;
    let repo = GitRepo::new();
    let url = repo.url();
    repo.write(
        "fleet/project.yaml",
        &format!(
            r#"apiVersion: argoproj.io/v1alpha1
kind: AppProject
metadata:
  name: restricted
spec:
  sourceRepos: ["*"]
  destinations:
    - namespace: "{ns}-*"
      server: https://kubernetes.default.svc
  namespaceResourceWhitelist:
    - group: "*"
      kind: "*"
"#,
            ns = ns.name
        ),
    );
    repo.write(
        "fleet/ok.yaml",
        &restricted_app("ok", &url, "app", &format!("{}-ok", ns.name)),
    );
    repo.write(
        "fleet/admin.yaml",
        &restricted_app("admin", &url, "admin", &format!("{}-admin", ns.name)),
    );
    repo.write(
        "fleet/outside.yaml",
        &restricted_app("outside", &url, "app", "elsewhere-policy"),
    );
    repo.write(
        "admin/role.yaml",
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: edgesync-test-policy\nrules: []\n",
    );
    repo.write(
        "admin/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: admin-config\n",
    );
    let sha = greeting_app(&repo, "hello");
    let config = fleet_config(&url, "1h");
    let agent = Agent::start(&config);
    config.wait_applied("ok", &sha).await;
    let admin = failed(&config, "admin").await;
    assert!(
        admin.contains("ClusterRole edgesync-test-policy")
            && admin.contains("clusterResourceWhitelist"),
        "{admin}"
    );
    let outside = failed(&config, "outside").await;
    assert!(
        outside.contains("destination namespace elsewhere-policy"),
        "{outside}"
    );

    // Nothing of a refused app was applied, not even its namespace.
    let client = crate::harness::cluster::cluster().client().await;
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
        kube::Api::all(client.clone());
    assert!(namespaces
        .get_opt(&format!("{}-admin", ns.name))
        .await
        .unwrap()
        .is_none());
    let roles: kube::Api<k8s_openapi::api::rbac::v1::ClusterRole> = kube::Api::all(client);
    assert!(roles
        .get_opt("edgesync-test-policy")
        .await
        .unwrap()
        .is_none());
    assert!(config.state("admin")["inventory"]
        .as_array()
        .is_none_or(|i| i.is_empty()));
    assert!(agent.stop().await.success());
}

#[tokio::test]
async fn removed_applications_take_their_objects_along_only_with_the_resources_finalizer() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let ns = TestNamespace::reserve("removal").await;
    let repo = GitRepo::new();
    let url = repo.url();
    repo.write(
        "fleet/cascade.yaml",
        &application("cascade", &url, &ns.name, None),
    );
    let orphan = application("orphan", &url, &ns.name, None).replace(
        "  finalizers:\n    - resources-finalizer.argocd.argoproj.io\n",
        "",
    );
    repo.write("fleet/orphan.yaml", &orphan);
    repo.write(
        "fleet/stays.yaml",
        &application("stays", &url, &ns.name, None),
    );
    let sha = greeting_app(&repo, "hello");
    let config = fleet_config(&url, "1s");
    let agent = Agent::start(&config);
    config.wait_applied("cascade", &sha).await;
    config.wait_applied("orphan", &sha).await;
    let client = crate::harness::cluster::cluster().client().await;
    let in_ns = |app: &str| {
        kube::Api::<ConfigMap>::namespaced(client.clone(), &format!("{}-{app}", ns.name))
    };

    repo.remove("fleet/cascade.yaml");
    repo.remove("fleet/orphan.yaml");
    repo.commit("both apps removed");
    let (cascade, orphan_api) = (in_ns("cascade"), in_ns("orphan"));
    crate::harness::eventually(
        "the finalizer's objects deleted",
        crate::harness::WAIT,
        || async {
            cascade
                .get_opt("greeting")
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;
    crate::harness::eventually("both apps forgotten", crate::harness::WAIT, || async {
        (config.state("cascade").is_null() && config.state("orphan").is_null()).then_some(())
    })
    .await;
    assert!(
        orphan_api.get_opt("greeting").await.unwrap().is_some(),
        "without the finalizer the objects stay"
    );
    let removed: Vec<String> = std::fs::read_dir(config.dir().join("state/apps/removed"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        removed.iter().any(|f| f.ends_with("-cascade.json")),
        "{removed:?}"
    );
    assert!(
        agent.log().contains("deleted: the app left this node"),
        "{}",
        agent.log()
    );
    assert!(!config.state("stays").is_null());
    for app in ["cascade", "orphan", "stays"] {
        let _ = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
            .delete(&format!("{}-{app}", ns.name), &Default::default())
            .await;
    }
}

#[tokio::test]
async fn argo_kustomize_and_directory_options_shape_what_is_applied() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::ConfigMap;
    let ns = TestNamespace::reserve("argoopts").await;
    let repo = GitRepo::new();
    let url = repo.url();
    repo.write(
        "kapp/kustomization.yaml",
        "resources: [web.yaml]\ncommonLabels: {tier: web}\nimages: [{name: nginx, newTag: \"1.26\"}]\n",
    );
    repo.write(
        "kapp/web.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: web, image: nginx:1.25}]\n",
    );
    repo.write(
        "flat/top.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: top\n",
    );
    repo.write(
        "flat/nested/deep.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: deep\n",
    );
    let app = |name: &str, path: &str, source_extra: &str| {
        format!(
            "apiVersion: argoproj.io/v1alpha1\nkind: Application\nmetadata:\n  name: {name}\nspec:\n  project: default\n  source:\n    repoURL: {url}\n    targetRevision: main\n    path: {path}\n{source_extra}  destination:\n    server: https://kubernetes.default.svc\n    namespace: {}\n  syncPolicy:\n    automated: {{}}\n    syncOptions: [CreateNamespace=true]\n",
            ns.name
        )
    };
    repo.write(
        "fleet/kapp.yaml",
        &app(
            "kapp",
            "kapp",
            "    kustomize:\n      namePrefix: edge-\n      images: [nginx=nginx:1.28]\n      commonLabels: {site: plant-7}\n",
        ),
    );
    repo.write("fleet/flat.yaml", &app("flat", "flat", ""));
    repo.write(
        "fleet/deep.yaml",
        &app(
            "deep",
            "flat/nested",
            "    directory:\n      recurse: true\n",
        ),
    );
    let sha = repo.commit("apps with source options");
    let config = fleet_config(&url, "1s");
    let _agent = Agent::start(&config);
    config.wait_applied("kapp", &sha).await;
    config.wait_applied("flat", &sha).await;
    let web = ns.api::<Deployment>().get("edge-web").await.unwrap();
    let labels = web.metadata.labels.unwrap();
    assert_eq!(
        (labels["tier"].as_str(), labels["site"].as_str()),
        ("web", "plant-7")
    );
    let image = web.spec.unwrap().template.spec.unwrap().containers[0]
        .image
        .clone();
    assert_eq!(
        image.as_deref(),
        Some("nginx:1.28"),
        "the Application's image wins"
    );
    // Argo CD reads a plain directory without its subdirectories unless told to.
    assert!(ns
        .api::<ConfigMap>()
        .get_opt("top")
        .await
        .unwrap()
        .is_some());
    config.wait_applied("deep", &sha).await;
    let state = config.state("flat").to_string();
    assert!(!state.contains("\"deep\""), "{state}");
}

#[tokio::test]
async fn a_project_with_orphaned_resources_warn_reports_unmanaged_objects() {
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
    let ns = TestNamespace::reserve("orphans").await;
    let repo = GitRepo::new();
    let url = repo.url();
    repo.write(
        "fleet/project.yaml",
        "apiVersion: argoproj.io/v1alpha1\nkind: AppProject\nmetadata:\n  name: restricted\nspec:\n  sourceRepos: [\"*\"]\n  destinations: [{namespace: \"*\", server: \"https://kubernetes.default.svc\"}]\n  orphanedResources:\n    warn: true\n    ignore: [{kind: ConfigMap, name: \"ignored-*\"}]\n",
    );
    let target = format!("{}-app", ns.name);
    repo.write(
        "fleet/app.yaml",
        &restricted_app("app", &url, "app", &target),
    );
    let sha = greeting_app(&repo, "hello");
    // Someone created objects in the app's namespace by hand.
    let client = crate::harness::cluster::cluster().client().await;
    let namespaces = kube::Api::<Namespace>::all(client.clone());
    let _ = namespaces
        .create(
            &Default::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": target}})).unwrap(),
        )
        .await;
    let cms = kube::Api::<ConfigMap>::namespaced(client.clone(), &target);
    for name in ["stray", "ignored-cache"] {
        cms.create(
            &Default::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap(),
        )
        .await
        .unwrap();
    }
    let config = fleet_config(&url, "1h");
    let agent = Agent::start(&config);
    config.wait_applied("app", &sha).await;
    let message =
        crate::harness::eventually("the orphan reported", crate::harness::WAIT, || async {
            let status = config.status().await;
            let message = status["apps"][0]["warnings"][0].as_str()?.to_string();
            message.contains("orphaned").then_some(message)
        })
        .await;
    assert!(
        message.contains(&format!("1 orphaned resources: ConfigMap {target}/stray")),
        "{message}"
    );
    assert!(agent.log().contains("orphaned resources"));
    let _ = namespaces.delete(&target, &Default::default()).await;
}

/// Sources edgesync cannot render fail loudly: a directory of Jsonnet, a config management
/// plugin, a path with no manifests. None shows Synced, nothing of them is applied, and
/// `edgesync status` says why.
#[tokio::test]
async fn sources_edgesync_cannot_render_fail_and_say_why() {
    let ns = TestNamespace::reserve("nosilent").await;
    let repo = GitRepo::new();
    let url = repo.url();
    repo.write(
        "jsonnet/app.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: beside-jsonnet\n",
    );
    repo.write(
        "jsonnet/main.jsonnet",
        "{ apiVersion: 'v1', kind: 'ConfigMap', metadata: { name: 'from-jsonnet' } }\n",
    );
    repo.write(
        "plugin/app.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: beside-plugin\n",
    );
    repo.write("docs/README.md", "the manifests moved\n");
    repo.write(
        "fleet/jsonnet.yaml",
        &application_at("jsonnet", &url, "jsonnet", &ns.name, None),
    );
    repo.write(
        "fleet/plugin.yaml",
        &application_at("plugin", &url, "plugin", &ns.name, None).replace(
            "    path: plugin\n",
            "    path: plugin\n    plugin:\n      name: argocd-vault-plugin\n",
        ),
    );
    repo.write(
        "fleet/empty.yaml",
        &application_at("empty", &url, "docs", &ns.name, None),
    );
    // Refused when read (a generator edgesync does not have): no app, so the node's fleet
    // problems say it.
    repo.write(
        "fleet/set.yaml",
        "apiVersion: argoproj.io/v1alpha1\nkind: ApplicationSet\nmetadata:\n  name: from-github\nspec:\n  generators:\n    - scmProvider: {github: {organization: x}}\n  template: {metadata: {name: '{{repository}}'}, spec: {}}\n",
    );
    repo.commit("four apps edgesync cannot render");
    let config = fleet_config(&url, "1s");
    let agent = Agent::start(&config);
    for (app, says) in [
        ("jsonnet", "Jsonnet"),
        ("plugin", "argocd-vault-plugin"),
        ("empty", "no objects"),
    ] {
        let error = failed(&config, app).await;
        assert!(error.contains(says), "{app}: {error}");
        assert!(
            config.state(app)["last_applied_revision"].is_null(),
            "{app}"
        );
    }
    let doc = config.status().await;
    for app in doc["apps"].as_array().unwrap() {
        assert_ne!(app["sync"], "Synced", "{app}");
    }
    let status = config.command(&["status"]).await;
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(
        table.contains("Jsonnet") && table.contains("argocd-vault-plugin"),
        "{table}"
    );
    assert!(
        table.contains("fleet: ") && table.contains("from-github") && table.contains("scmProvider"),
        "{table}"
    );
    let problems = doc["node"]["fleet_problems"].to_string();
    assert!(problems.contains("from-github"), "{problems}");
    for (app, name) in [("jsonnet", "beside-jsonnet"), ("plugin", "beside-plugin")] {
        let namespace = format!("{}-{app}", ns.name);
        assert!(
            !crate::safety::cm_exists(&namespace, name).await,
            "{name} was applied"
        );
    }
    assert!(agent.stop().await.success());
}

/// An app-of-apps that is itself a Helm chart (the pattern Argo CD's docs teach) is read with
/// its own Helm options and the node's helm: its values name the children.
#[tokio::test]
async fn an_app_of_apps_helm_chart_is_read_with_its_own_values() {
    let ns = TestNamespace::reserve("aoa-helm").await;
    let repo = GitRepo::new();
    let url = repo.url();
    repo.write(
        "apps/Chart.yaml",
        "apiVersion: v2\nname: apps\nversion: 0.1.0\n",
    );
    // No defaults: without the parent's values the chart renders no child at all.
    repo.write("apps/values.yaml", "children: []\n");
    repo.write(
        "apps/templates/children.yaml",
        &format!(
            r#"{{{{- range .Values.children }}}}
---
apiVersion: argoproj.io/v1alpha1
kind: Application
metadata:
  name: {{{{ $.Release.Name }}}}-{{{{ . }}}}
spec:
  project: default
  source:
    repoURL: {url}
    targetRevision: main
    path: app
  destination:
    server: {{{{ $.Values.server }}}}
    namespace: {}-{{{{ . }}}}
  syncPolicy:
    automated: {{}}
    syncOptions: [CreateNamespace=true]
{{{{- end }}}}
"#,
            ns.name
        ),
    );
    let parent = application_at("root", &url, "apps", &ns.name, None).replace(
        "    path: apps\n",
        "    path: apps\n    helm:\n      releaseName: edge\n      valuesObject:\n        children: [web]\n      parameters:\n        - name: server\n          value: https://kubernetes.default.svc\n",
    );
    repo.write("fleet/root.yaml", &parent);
    let sha = greeting_app(&repo, "hello");
    let config = fleet_config(&url, "1h").section(
        "helm",
        &format!("binary = \"{}\"", crate::helm::helm().display()),
    );
    let agent = Agent::start(&config);
    config.wait_applied("edge-web", &sha).await;
    assert!(
        config.state("root").is_null(),
        "the parent is not run itself"
    );
    assert!(agent.stop().await.success());
}

/// Taking over from Argo CD: an object its controller applied client-side is adopted in place
/// (same uid), and a field Git no longer has is removed rather than left owned by Argo CD.
#[tokio::test]
async fn objects_argo_cd_applied_are_taken_over_in_place() {
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
    let ns = TestNamespace::reserve("takeover").await;
    let client = crate::harness::cluster::cluster().client().await;
    let target = format!("{}-web", ns.name);
    let namespaces: kube::Api<Namespace> = kube::Api::all(client.clone());
    let by_argo = kube::api::PostParams {
        field_manager: Some("argocd-controller".into()),
        ..Default::default()
    };
    let namespace: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": target}})).unwrap();
    namespaces.create(&by_argo, &namespace).await.unwrap();
    let configmaps: kube::Api<ConfigMap> = kube::Api::namespaced(client, &target);
    let applied_by_argo: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "settings", "labels": {"app.kubernetes.io/instance": "web"}},
        "data": {"kept": "1", "dropped": "old"}
    }))
    .unwrap();
    let before = configmaps.create(&by_argo, &applied_by_argo).await.unwrap();

    let repo = GitRepo::new();
    let url = repo.url();
    repo.write(
        "app/settings.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  kept: \"1\"\n",
    );
    repo.write(
        "fleet/web.yaml",
        &application_at("web", &url, "app", &ns.name, None),
    );
    let sha = repo.commit("the app Argo CD ran");
    let config = fleet_config(&url, "1s");
    let agent = Agent::start(&config);
    config.wait_applied("web", &sha).await;
    let after = configmaps.get("settings").await.unwrap();
    assert_eq!(
        after.metadata.uid, before.metadata.uid,
        "adopted, not recreated"
    );
    let data = after.data.unwrap_or_default();
    assert_eq!(data.get("kept").map(String::as_str), Some("1"));
    assert!(
        !data.contains_key("dropped"),
        "a field Git dropped stayed: {data:?}"
    );
    let managers: Vec<String> = after
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        !managers.iter().any(|m| m == "argocd-controller"),
        "{managers:?}"
    );
    assert!(agent.stop().await.success());
}

/// A matrix ApplicationSet, as fleets publish them: this node (the `clusters` generator,
/// selected by its labels) times the directories under `apps/`, with Go templates. Each
/// directory becomes an app on the real control plane; a new directory becomes a new app; a
/// set whose selector does not match this node generates nothing.
#[tokio::test]
async fn matrix_application_set_over_directories_and_node_labels() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let ns = TestNamespace::reserve("appset").await;
    let repo = GitRepo::new();
    let url = repo.url();
    let settings = |name: &str, site: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}-settings\ndata:\n  site: \"{site}\"\n")
    };
    repo.write("apps/web/settings.yaml", &settings("web", "${SITE}"));
    repo.write("apps/api/settings.yaml", &settings("api", "any"));
    repo.write("apps/skip/settings.yaml", &settings("skip", "any"));
    let set = |name: &str, selector: &str| {
        format!(
            r#"apiVersion: argoproj.io/v1alpha1
kind: ApplicationSet
metadata:
  name: {name}
  namespace: argocd
spec:
  goTemplate: true
  goTemplateOptions: ["missingkey=error"]
  generators:
    - matrix:
        generators:
          - clusters:
              selector:
                matchLabels: {{site: {selector}}}
          - git:
              repoURL: {url}
              revision: main
              directories:
                - path: apps/*
                - path: apps/skip
                  exclude: true
  syncPolicy:
    preserveResourcesOnDeletion: true
  template:
    metadata:
      name: '{{{{.path.basename}}}}-{{{{index .metadata.labels "site"}}}}'
      finalizers: [resources-finalizer.argocd.argoproj.io]
    spec:
      project: default
      source:
        repoURL: {url}
        targetRevision: main
        path: '{{{{.path.path}}}}'
      destination:
        server: '{{{{.server}}}}'
        namespace: {ns}
      syncPolicy:
        automated: {{prune: true}}
        syncOptions: [CreateNamespace=true]
"#,
            ns = ns.name
        )
    };
    repo.write("fleet/here.yaml", &set("here", "plant-7"));
    repo.write("fleet/elsewhere.yaml", &set("elsewhere", "plant-9"));
    let sha = repo.commit("an ApplicationSet");
    let config = fleet_config(&url, "1s").node("labels = { site = \"plant-7\" }");
    let agent = Agent::start(&config);
    config.wait_applied("web-plant-7", &sha).await;
    config.wait_applied("api-plant-7", &sha).await;
    let api = ns.api::<ConfigMap>();
    assert!(api.get("web-settings").await.is_ok());
    assert!(api.get("api-settings").await.is_ok());
    assert!(
        api.get("skip-settings").await.is_err(),
        "excluded directory"
    );
    let doc = config.status().await;
    let mut apps: Vec<String> = doc["apps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["app"].as_str().map(str::to_string))
        .collect();
    apps.sort();
    assert_eq!(apps, ["api-plant-7", "web-plant-7"], "{doc}");

    // A new directory is a new app on the next fleet commit.
    repo.write("apps/cache/settings.yaml", &settings("cache", "any"));
    let sha = repo.commit("a new directory");
    config.wait_applied("cache-plant-7", &sha).await;
    assert!(api.get("cache-settings").await.is_ok());

    // The set does not delete an app's objects when it stops generating it
    // (preserveResourcesOnDeletion), even though the template asks for Argo CD's finalizer.
    repo.remove("apps/cache/settings.yaml");
    repo.commit("the cache directory is gone");
    crate::harness::eventually(
        "cache-plant-7 gone from this node",
        crate::harness::WAIT,
        || async {
            let doc = config.status().await;
            (!doc["apps"]
                .as_array()?
                .iter()
                .any(|a| a["app"] == "cache-plant-7"))
            .then_some(())
        },
    )
    .await;
    assert!(api.get("cache-settings").await.is_ok(), "objects preserved");
    assert!(agent.stop().await.success());
}

/// A config management plugin configured on the node renders an Application that names it,
/// with the Application's `plugin.env`; its commands have no network unless the plugin
/// allows it.
#[tokio::test]
async fn a_configured_plugin_renders_the_app_without_network_unless_allowed() {
    let ns = TestNamespace::reserve("plugin").await;
    let site = tempfile::tempdir().unwrap();
    let server = crate::harness::charts::ChartServer::start(site.path(), None).await;
    let repo = GitRepo::new();
    let url = repo.url();
    repo.write("app/values.env", "GREETING=hello\n");
    let plugin_app = |name: &str, plugin: &str| {
        application_at(name, &url, "app", &ns.name, None).replace(
            "    path: app\n",
            &format!("    path: app\n    plugin:\n      name: {plugin}\n      env:\n        - {{name: COLOR, value: teal}}\n"),
        )
    };
    repo.write("fleet/sealed.yaml", &plugin_app("sealed", "envgen"));
    repo.write("fleet/online.yaml", &plugin_app("online", "envgen-online"));
    let sha = repo.commit("two plugin apps");
    let script = format!(
        r#"set -e; . ./values.env; if bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' 2>/dev/null; then net=open; else net=blocked; fi; printf 'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: %s-generated\ndata:\n  greeting: %s\n  color: %s\n  net: %s\n' "$ARGOCD_APP_NAME" "$GREETING" "$ARGOCD_ENV_COLOR" "$net""#,
        port = server.port
    );
    let plugin = |name: &str, network: bool| {
        format!(
            "name = \"{name}\"\ninit = [\"sh\", \"-c\", \"test -f values.env\"]\ngenerate = [\"sh\", \"-c\", {script:?}]\ntimeout = \"20s\"\nnetwork = {network}"
        )
    };
    let config = fleet_config(&url, "1s")
        .section("[plugins]", &plugin("envgen", false))
        .section("[plugins]", &plugin("envgen-online", true));
    let agent = Agent::start(&config);
    config.wait_applied("sealed", &sha).await;
    config.wait_applied("online", &sha).await;
    let api = kube::Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(
        ns.client.clone(),
        &format!("{}-sealed", ns.name),
    );
    let data = api.get("sealed-generated").await.unwrap().data.unwrap();
    assert_eq!(data["greeting"], "hello");
    assert_eq!(data["color"], "teal");
    assert_eq!(data["net"], "blocked", "no network without network = true");
    let api = kube::Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(
        ns.client.clone(),
        &format!("{}-online", ns.name),
    );
    let data = api.get("online-generated").await.unwrap().data.unwrap();
    assert_eq!(data["net"], "open");
    assert!(agent.stop().await.success());
}
