//! Helm charts kept in the Git repository, rendered by the pinned helm that `tests/helm/build`
//! compiles from its Go module, and applied on the real control plane with Argo CD's options.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use k8s_openapi::api::core::v1::ConfigMap;

use crate::harness::charts::{ChartServer, Registry};
use crate::harness::cluster::repo_root;
use crate::harness::{eventually, Agent, AgentConfig, GitRepo, TestNamespace, WAIT};
use crate::skeleton::wait_available;

/// The pinned helm binary, built (or taken from the cache) once per test run.
pub fn helm() -> &'static PathBuf {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let out = std::process::Command::new(repo_root().join("tests/helm/build"))
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run tests/helm/build");
        assert!(out.status.success(), "tests/helm/build failed");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// The files of the test chart `web` at `version`, relative to the chart directory.
pub fn chart_files(version: &str, greeting: &str) -> Vec<(String, String)> {
    let files = [
        (
            "Chart.yaml",
            format!("apiVersion: v2\nname: web\nversion: {version}\nappVersion: \"1.27\"\n"),
        ),
        (
            "values.yaml",
            "replicas: 1\ngreeting: from-chart\ncolor: plain\nimage: nginx:1.27\n".to_string(),
        ),
        (
            "values-prod.yaml",
            format!("color: prod\ngreeting: {greeting}\n"),
        ),
        (
            "templates/configmap.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-config\ndata:\n  greeting: {{ .Values.greeting | quote }}\n  color: {{ .Values.color | quote }}\n  namespace: {{ .Release.Namespace | quote }}\n  version: {{ .Chart.Version | quote }}\n".to_string(),
        ),
        (
            "templates/deployment.yaml",
            r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}
spec:
  replicas: {{ .Values.replicas }}
  selector:
    matchLabels: {app: {{ .Release.Name }}}
  template:
    metadata:
      labels: {app: {{ .Release.Name }}}
    spec:
      containers:
        - name: web
          image: {{ .Values.image }}
"#
            .to_string(),
        ),
        (
            "templates/tests/test-connection.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {{ .Release.Name }}-test\n  annotations:\n    helm.sh/hook: test\nspec:\n  containers: [{name: t, image: busybox}]\n".to_string(),
        ),
    ];
    files.into_iter().map(|(p, c)| (p.to_string(), c)).collect()
}

pub fn write_chart(repo: &GitRepo) {
    for (path, content) in chart_files("0.1.0", "from-file") {
        repo.write(&format!("charts/web/{path}"), &content);
    }
}

/// Runs the pinned helm with throwaway config, cache and data directories.
pub fn run_helm(args: &[&str]) {
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(helm())
        .args(args)
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Packages the test chart at `version` into `dest` and returns the archive's path.
pub fn package_chart(dest: &Path, version: &str, greeting: &str) -> PathBuf {
    let src = tempfile::tempdir().unwrap();
    for (path, content) in chart_files(version, greeting) {
        let file = src.path().join("web").join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, content).unwrap();
    }
    std::fs::create_dir_all(dest).unwrap();
    run_helm(&[
        "package",
        src.path().join("web").to_str().unwrap(),
        "--destination",
        dest.to_str().unwrap(),
    ]);
    dest.join(format!("web-{version}.tgz"))
}

/// A chart repository served over HTTP (with basic auth when `credentials` is given) holding
/// the test chart at 0.1.0 under `dir`; the repository's URL.
async fn serve_chart(
    site: &Path,
    dir: &str,
    greeting: &str,
    credentials: Option<&str>,
) -> (ChartServer, String) {
    let charts = site.join(dir);
    package_chart(&charts, "0.1.0", greeting);
    run_helm(&["repo", "index", charts.to_str().unwrap()]);
    let server = ChartServer::start(site, credentials).await;
    let url = server.url(dir);
    (server, url)
}

/// A Git repository with the chart `umbrella`, which depends on `web` at `version` from the
/// chart repository at `dependency`, with `values`.
fn umbrella_repo(dependency: &str, version: &str, values: &str) -> GitRepo {
    let repo = GitRepo::new();
    repo.write(
        "umbrella/Chart.yaml",
        &format!(
            "apiVersion: v2\nname: umbrella\nversion: 1.0.0\ndependencies:\n  - name: web\n    version: {version}\n    repository: {dependency}\n"
        ),
    );
    repo.write("umbrella/values.yaml", values);
    repo
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

async fn wait_revision(config: &AgentConfig, app: &str, revision: &str) {
    eventually(&format!("{app} applied at {revision}"), WAIT, || async {
        (config.state(app)["last_applied_revision"] == revision).then_some(())
    })
    .await;
}

async fn config_data(ns: &TestNamespace, name: &str) -> std::collections::BTreeMap<String, String> {
    ns.api::<ConfigMap>().get(name).await.unwrap().data.unwrap()
}

#[tokio::test]
async fn chart_in_git_applies_with_release_name_value_files_values_and_parameters() {
    let ns = TestNamespace::reserve("helm").await;
    let repo = GitRepo::new();
    write_chart(&repo);
    let sha = repo.commit("chart");
    let url = repo.url();
    let config = AgentConfig::new()
        .section("helm", &format!("binary = \"{}\"", helm().display()))
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
        .app(&format!(
            "name = \"web\"\nrepo = \"{url}\"\npath = \"charts/web\"\nnamespace = \"{}\"\ncreate_namespace = true\nhelm = {{ release_name = \"edge\", value_files = [\"values-prod.yaml\"], values = \"greeting: inline\\n\", parameters = {{ replicas = \"2\" }} }}",
            ns.name
        ));
    let _agent = Agent::start(&config);
    config.wait_applied("web", &sha).await;

    let data = ns
        .api::<ConfigMap>()
        .get("edge-config")
        .await
        .unwrap()
        .data
        .unwrap();
    assert_eq!(
        data["greeting"], "inline",
        "inline values win over value files"
    );
    assert_eq!(
        data["color"], "prod",
        "value files win over the chart's values"
    );
    assert_eq!(data["namespace"], ns.name);
    // --set replicas=2 reaches the Deployment, which rolls out.
    wait_available(&ns, "edge").await;
    // helm test hooks are not applied.
    let state = config.state("web");
    let objects = state["objects"].to_string();
    assert!(!objects.contains("edge-test"), "{objects}");
}

#[tokio::test]
async fn chart_from_a_helm_repository_applies_and_follows_new_versions() {
    let ns = TestNamespace::reserve("helmrepo").await;
    let site = tempfile::tempdir().unwrap();
    let charts = site.path().join("stable");
    let first = package_chart(&charts, "0.1.0", "first");
    run_helm(&["repo", "index", charts.to_str().unwrap()]);
    let server = ChartServer::start(site.path(), Some("fleet:s3cret")).await;
    let url = server.url("stable");
    let config = AgentConfig::new().section("helm", &format!("binary = \"{}\"", helm().display()));
    let password = config.file("chart-password", "s3cret\n");
    let config = config
        .repository(&format!(
            "url = \"{url}\"\nusername = \"fleet\"\npassword_file = \"{}\"\npoll_interval = \"1s\"",
            password.display()
        ))
        .app(&format!(
            "name = \"web\"\nrepo = \"{url}\"\nchart = \"web\"\nrevision = \"0.1.x\"\nnamespace = \"{}\"\ncreate_namespace = true\nhelm = {{ release_name = \"edge\", value_files = [\"values-prod.yaml\"], parameters = {{ replicas = \"2\" }} }}",
            ns.name
        ));
    let _agent = Agent::start(&config);

    // The revision pins the version and the archive's digest.
    wait_revision(
        &config,
        "web",
        &format!("0.1.0@sha256:{}", sha256_hex(&first)),
    )
    .await;
    let data = config_data(&ns, "edge-config").await;
    assert_eq!(data["greeting"], "first", "a value file inside the chart");
    assert_eq!(data["version"], "0.1.0");
    wait_available(&ns, "edge").await;

    // A newer release that matches the constraint is picked up by the next poll, and one
    // outside it is not.
    package_chart(&charts, "0.2.0", "too-new");
    let second = package_chart(&charts, "0.1.1", "second");
    run_helm(&["repo", "index", charts.to_str().unwrap()]);
    wait_revision(
        &config,
        "web",
        &format!("0.1.1@sha256:{}", sha256_hex(&second)),
    )
    .await;
    assert_eq!(config_data(&ns, "edge-config").await["greeting"], "second");

    // Charts are cached by digest: polls read the index but download nothing more.
    let downloads = server.downloads();
    assert_eq!(downloads, 2, "one download per applied version");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(server.downloads(), downloads);
}

#[tokio::test]
async fn charts_from_an_oci_registry_apply_by_exact_version_and_by_constraint() {
    let ns = TestNamespace::reserve("helmoci").await;
    let registry = Registry::start().await;
    let packages = tempfile::tempdir().unwrap();
    let mut archives = Vec::new();
    for (version, greeting) in [
        ("0.1.0", "oci-first"),
        ("0.1.2", "oci-second"),
        ("1.0.0", "oci-major"),
    ] {
        let archive = package_chart(packages.path(), version, greeting);
        let oci = format!("oci://127.0.0.1:{}/charts", registry.port);
        run_helm(&["push", archive.to_str().unwrap(), &oci, "--plain-http"]);
        archives.push(archive);
    }
    let url = registry.url("charts");
    let config = AgentConfig::new()
        .section("helm", &format!("binary = \"{}\"", helm().display()))
        .repository(&format!("url = \"{url}\"\nplain_http = true\npoll_interval = \"1s\""))
        .app(&format!(
            "name = \"pinned\"\nrepo = \"{url}\"\nchart = \"web\"\nrevision = \"0.1.0\"\nnamespace = \"{}\"\ncreate_namespace = true\nhelm = {{ value_files = [\"values-prod.yaml\"] }}",
            ns.name
        ))
        .app(&format!(
            "name = \"ranged\"\nrepo = \"{url}\"\nchart = \"web\"\nrevision = \"~0.1\"\nnamespace = \"{}\"\ncreate_namespace = true\nhelm = {{ value_files = [\"values-prod.yaml\"] }}",
            ns.name
        ));
    let _agent = Agent::start(&config);
    wait_revision(
        &config,
        "pinned",
        &format!("0.1.0@sha256:{}", sha256_hex(&archives[0])),
    )
    .await;
    wait_revision(
        &config,
        "ranged",
        &format!("0.1.2@sha256:{}", sha256_hex(&archives[1])),
    )
    .await;
    assert_eq!(
        config_data(&ns, "pinned-config").await["greeting"],
        "oci-first"
    );
    assert_eq!(
        config_data(&ns, "ranged-config").await["greeting"],
        "oci-second"
    );
}

/// A chart that requires a recent Kubernetes and asks `.Capabilities` what the cluster serves
/// renders against the live cluster, as Argo CD renders it, not against helm's defaults.
#[tokio::test]
async fn charts_see_the_live_clusters_version_and_apis() {
    let ns = TestNamespace::reserve("helmcaps").await;
    let repo = GitRepo::new();
    repo.write(
        "charts/caps/Chart.yaml",
        "apiVersion: v2\nname: caps\nversion: 0.1.0\nkubeVersion: \">=1.25.0-0\"\n",
    );
    repo.write(
        "charts/caps/templates/configmap.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: caps\ndata:\n  version: {{ .Capabilities.KubeVersion.Version | quote }}\n  deployments: {{ .Capabilities.APIVersions.Has \"apps/v1/Deployment\" | quote }}\n  leases: {{ .Capabilities.APIVersions.Has \"coordination.k8s.io/v1\" | quote }}\n  imaginary: {{ .Capabilities.APIVersions.Has \"example.com/v9\" | quote }}\n",
    );
    let sha = repo.commit("a chart that asks the cluster");
    let url = repo.url();
    let config = AgentConfig::new()
        .section("helm", &format!("binary = \"{}\"", helm().display()))
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
        .app(&format!(
            "name = \"caps\"\nrepo = \"{url}\"\npath = \"charts/caps\"\nnamespace = \"{}\"\ncreate_namespace = true",
            ns.name
        ));
    let agent = Agent::start(&config);
    config.wait_applied("caps", &sha).await;
    let data = config_data(&ns, "caps").await;
    let server = crate::harness::cluster::cluster()
        .client()
        .await
        .apiserver_version()
        .await
        .unwrap();
    assert_eq!(data["version"], server.git_version, "{data:?}");
    assert_eq!(data["deployments"], "true");
    assert_eq!(data["leases"], "true");
    assert_eq!(data["imaginary"], "false");
    assert!(agent.stop().await.success());
}

/// An umbrella chart in Git whose dependency lives in a Helm repository (not vendored): built
/// as Argo CD builds it, applied, and rendered again from the kept dependencies when the
/// repository is gone.
#[tokio::test]
async fn chart_dependencies_are_built_from_their_repository_and_kept() {
    let ns = TestNamespace::reserve("helmdeps").await;
    let site = tempfile::tempdir().unwrap();
    let (server, charts_url) = serve_chart(site.path(), "stable", "from-dependency", None).await;
    let repo = umbrella_repo(&charts_url, "0.1.x", "web:\n  replicas: 1\n");
    let sha = repo.commit("umbrella chart");
    let url = repo.url();
    let config = AgentConfig::new()
        .section("helm", &format!("binary = \"{}\"", helm().display()))
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
        .app(&format!(
            "name = \"umbrella\"\nrepo = \"{url}\"\npath = \"umbrella\"\nnamespace = \"{}\"\ncreate_namespace = true\nhelm = {{ release_name = \"edge\" }}",
            ns.name
        ));
    let agent = Agent::start(&config);
    config.wait_applied("umbrella", &sha).await;
    let data = config_data(&ns, "edge-config").await;
    assert_eq!(
        data["greeting"], "from-chart",
        "the dependency's own values"
    );
    assert_eq!(data["version"], "0.1.0");
    assert!(agent.stop().await.success());
    // The checkout is as Git has it: nothing was built into it.
    assert!(!repo.path.join("umbrella/charts").exists());

    // A new commit renders with the kept dependency: nothing is downloaded again, so a node
    // whose chart repository is away renders too.
    let downloads = server.downloads();
    assert!(downloads >= 1);
    repo.write(
        "umbrella/values.yaml",
        "web:\n  replicas: 1\n  greeting: offline\n",
    );
    let offline = repo.commit("new values while the chart repository is away");
    let agent = Agent::start(&config);
    config.wait_applied("umbrella", &offline).await;
    assert_eq!(config_data(&ns, "edge-config").await["greeting"], "offline");
    assert_eq!(
        server.downloads(),
        downloads,
        "the dependency was fetched again"
    );
    assert!(agent.stop().await.success());
}

/// An Application with `spec.sources`, as users write one to keep a public chart's values in
/// their own Git repository: the chart from a Helm repository, its value files from a `ref`
/// source (`$values/...`), and plain manifests from a third source, applied as one app; a
/// commit to the values repository alone is a new revision of the app.
#[tokio::test]
async fn multi_source_application_renders_a_chart_with_values_from_git_and_more_manifests() {
    let ns = TestNamespace::reserve("multisrc").await;
    let site = tempfile::tempdir().unwrap();
    let (_server, chart_url) = serve_chart(site.path(), "stable", "from-the-chart", None).await;

    let values = GitRepo::new();
    values.write("env/prod.yaml", "greeting: from-git\ncolor: teal\n");
    values.write(
        "extra/settings.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  level: one\n",
    );
    values.commit("values and extra manifests");
    let values_url = values.url();

    let fleet = GitRepo::new();
    let fleet_url = fleet.url();
    fleet.write(
        "fleet/web.yaml",
        &format!(
            r#"apiVersion: argoproj.io/v1alpha1
kind: Application
metadata:
  name: web
  namespace: argocd
spec:
  project: default
  sources:
    - repoURL: {chart_url}
      chart: web
      targetRevision: 0.1.0
      helm:
        releaseName: edge
        ignoreMissingValueFiles: true
        valueFiles:
          - $values/env/prod.yaml
          - $values/env/not-there.yaml
    - repoURL: {values_url}
      targetRevision: main
      ref: values
    - repoURL: {values_url}
      targetRevision: main
      path: extra
  destination:
    server: https://kubernetes.default.svc
    namespace: {ns}
  syncPolicy:
    automated:
      prune: true
    syncOptions:
      - CreateNamespace=true
"#,
            ns = ns.name
        ),
    );
    fleet.commit("a multi-source app");
    let config = crate::fleet::fleet_config(&fleet_url, "1s")
        .section("helm", &format!("binary = \"{}\"", helm().display()))
        .repository(&format!("url = \"{chart_url}\"\npoll_interval = \"1s\""));
    let agent = Agent::start(&config);

    let data = eventually("the chart with values from Git", WAIT, || async {
        let data = ns.api::<ConfigMap>().get("edge-config").await.ok()?.data?;
        (data["greeting"] == "from-git").then_some(data)
    })
    .await;
    assert_eq!(data["color"], "teal");
    assert_eq!(data["version"], "0.1.0");
    // The third source's objects are applied in the same sync, maybe a moment later.
    let settings_level = |level: &'static str| {
        let ns = &ns;
        async move {
            eventually(&format!("settings at level {level}"), WAIT, || async {
                let data = ns.api::<ConfigMap>().get("settings").await.ok()?.data?;
                (data["level"] == level).then_some(())
            })
            .await
        }
    };
    settings_level("one").await;
    let revision = eventually("the app's state saved", WAIT, || async {
        config.state("web")["last_applied_revision"]
            .as_str()
            .map(str::to_string)
    })
    .await;
    assert_eq!(
        revision.split('+').count(),
        3,
        "the chart's and both Git sources' revisions: {revision}"
    );

    // The chart did not change: a commit to the values repository is picked up by itself.
    values.write("env/prod.yaml", "greeting: changed-in-git\ncolor: teal\n");
    values.write(
        "extra/settings.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  level: two\n",
    );
    values.commit("new values");
    eventually("the new values applied", WAIT, || async {
        let data = ns.api::<ConfigMap>().get("edge-config").await.ok()?.data?;
        (data["greeting"] == "changed-in-git").then_some(())
    })
    .await;
    settings_level("two").await;
    assert!(agent.stop().await.success());
}

/// A `$ref` value file that names no source fails the app with a message saying so: it is
/// not left out silently, and nothing shows Synced.
#[tokio::test]
async fn a_value_file_naming_an_unknown_ref_fails_the_app() {
    let ns = TestNamespace::reserve("multisrc-bad").await;
    let repo = GitRepo::new();
    write_chart(&repo);
    let url = repo.url();
    repo.write(
        "fleet/web.yaml",
        &format!(
            r#"apiVersion: argoproj.io/v1alpha1
kind: Application
metadata:
  name: web
spec:
  sources:
    - repoURL: {url}
      targetRevision: main
      path: charts/web
      helm:
        valueFiles: [$config/prod.yaml]
    - repoURL: {url}
      targetRevision: main
      ref: values
  destination:
    server: https://kubernetes.default.svc
    namespace: {ns}
  syncPolicy:
    automated: {{}}
    syncOptions: [CreateNamespace=true]
"#,
            ns = ns.name
        ),
    );
    repo.commit("a value file from no source");
    let config = crate::fleet::fleet_config(&url, "1s")
        .section("helm", &format!("binary = \"{}\"", helm().display()));
    let agent = Agent::start(&config);
    let error = eventually("the app failed", WAIT, || async {
        let doc = config.status().await;
        let app = doc["apps"]
            .as_array()?
            .iter()
            .find(|a| a["app"] == "web")?
            .clone();
        app["last_error"].as_str().map(str::to_string)
    })
    .await;
    assert!(error.contains("$config"), "{error}");
    assert!(config.state("web")["last_applied_revision"].is_null());
    assert!(agent.stop().await.success());
}

/// A chart whose dependency lives in a chart repository that needs credentials: the node's
/// `[[repositories]]` entry of that URL gives them to helm, and they never reach the log.
#[tokio::test]
async fn chart_dependencies_use_the_nodes_repository_credentials() {
    let ns = TestNamespace::reserve("helmdeps-auth").await;
    let site = tempfile::tempdir().unwrap();
    let (server, charts_url) = serve_chart(
        site.path(),
        "private",
        "from-a-private-repository",
        Some("fleet:dep-s3cret-9"),
    )
    .await;
    let repo = umbrella_repo(
        &charts_url,
        "0.1.0",
        "web:\n  replicas: 1\n  greeting: private\n",
    );
    let sha = repo.commit("umbrella chart with a private dependency");
    let url = repo.url();
    let config = AgentConfig::new().section("helm", &format!("binary = \"{}\"", helm().display()));
    let password = config.file("dependency-password", "dep-s3cret-9\n");
    let config = config
        .repository(&format!(
            "url = \"{charts_url}\"\nusername = \"fleet\"\npassword_file = \"{}\"",
            password.display()
        ))
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
        .app(&format!(
            "name = \"umbrella\"\nrepo = \"{url}\"\npath = \"umbrella\"\nnamespace = \"{}\"\ncreate_namespace = true\nhelm = {{ release_name = \"edge\" }}",
            ns.name
        ));
    let agent = Agent::start(&config);
    config.wait_applied("umbrella", &sha).await;
    assert_eq!(config_data(&ns, "edge-config").await["greeting"], "private");
    assert!(server.downloads() >= 1);
    let log = agent.log();
    assert!(!log.contains("dep-s3cret-9"), "{log}");
    assert!(agent.stop().await.success());
}
