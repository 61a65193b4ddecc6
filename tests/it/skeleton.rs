//! The walking skeleton: commits in a Git repository become objects in the cluster.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use serde_json::Value;

use crate::harness::{eventually, Agent, AgentConfig, GitRepo, TestNamespace, WAIT};

/// A small web app: Deployment, Service and ConfigMap, as a user keeps them in Git.
pub fn write_web_app(repo: &GitRepo, image: &str, greeting: &str) {
    repo.write(
        "deploy/web/deployment.yaml",
        &format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {{app: web}}
spec:
  replicas: 2
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      containers:
        - name: web
          image: {image}
          ports: [{{containerPort: 8080, name: http}}]
"#
        ),
    );
    repo.write(
        "deploy/web/service.yaml",
        r#"apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
    - port: 80
      targetPort: http
"#,
    );
    repo.write(
        "deploy/web/configmap.yaml",
        &format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web-config\ndata:\n  greeting: {greeting}\n"
        ),
    );
}

pub fn web_app_config(repo_url: &str, ns: &str) -> AgentConfig {
    web_app_config_with(repo_url, ns, "poll_interval = \"1s\"")
}

/// The web app from `repo_url`; `repository_keys` are added to its `[[repositories]]` entry.
pub fn web_app_config_with(repo_url: &str, ns: &str, repository_keys: &str) -> AgentConfig {
    AgentConfig::new()
        .repository(&format!("url = \"{repo_url}\"\n{repository_keys}"))
        .app(&format!(
            "name = \"web\"\nrepo = \"{repo_url}\"\nrevision = \"main\"\npath = \"deploy/web\"\nnamespace = \"{ns}\"\ncreate_namespace = true"
        ))
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

pub async fn wait_available(ns: &TestNamespace, name: &str) -> Deployment {
    eventually(&format!("Deployment {name} Available"), WAIT, || async {
        let d = ns.api::<Deployment>().get_opt(name).await.ok()??;
        let available = d
            .status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .any(|c| c.type_ == "Available" && c.status == "True");
        let updated = d.status.as_ref()?.updated_replicas == Some(2);
        (available && updated).then_some(d)
    })
    .await
}

pub fn image_of(d: &Deployment) -> String {
    d.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .image
        .clone()
        .unwrap()
}

#[tokio::test]
async fn commit_with_deployment_service_and_configmap_is_applied_and_becomes_available() {
    let ns = TestNamespace::reserve("first-commit").await;
    let repo = GitRepo::new();
    write_web_app(&repo, "nginx:1.27", "hello");
    let sha = repo.commit("web app");
    let config = web_app_config(&repo.url(), &ns.name);
    let agent = Agent::start(&config);

    let state = config.wait_applied("web", &sha).await;
    let deployment = wait_available(&ns, "web").await;
    let service = ns.api::<Service>().get("web").await.unwrap();
    let cm = ns.api::<ConfigMap>().get("web-config").await.unwrap();
    assert_eq!(cm.data.unwrap()["greeting"], "hello");
    assert_eq!(service.spec.unwrap().ports.unwrap()[0].port, 80);

    // Applied server-side by edgesync, and tagged with the owning app.
    let managers: Vec<_> = deployment
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.operation.as_deref() == Some("Apply"))
        .filter_map(|m| m.manager)
        .collect();
    assert_eq!(managers, ["edgesync"]);
    assert_eq!(
        deployment.metadata.annotations.unwrap()["edgesync.io/app"],
        "web"
    );

    // The inventory records every object of the app; the namespace it created is not one.
    let mut inventory: Vec<String> = state["inventory"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["name"].as_str().unwrap()
            )
        })
        .collect();
    inventory.sort();
    assert_eq!(
        inventory,
        ["ConfigMap/web-config", "Deployment/web", "Service/web"]
    );
    assert!(agent.stop().await.success());
}

#[tokio::test]
async fn second_commit_changing_the_image_is_applied() {
    let ns = TestNamespace::reserve("image-change").await;
    let repo = GitRepo::new();
    write_web_app(&repo, "nginx:1.27", "hello");
    let first = repo.commit("web app");
    let config = web_app_config(&repo.url(), &ns.name);
    let agent = Agent::start(&config);
    config.wait_applied("web", &first).await;
    assert_eq!(image_of(&wait_available(&ns, "web").await), "nginx:1.27");

    write_web_app(&repo, "nginx:1.28", "hello");
    let second = repo.commit("bump nginx");
    config.wait_applied("web", &second).await;
    let deployment = eventually("new image rolled out", WAIT, || async {
        let d = wait_available(&ns, "web").await;
        let s = d.status.as_ref()?;
        // Complete: the controller saw the new spec and no old pod is left.
        let rolled = s.observed_generation == d.metadata.generation
            && s.replicas == Some(2)
            && s.updated_replicas == Some(2)
            && s.available_replicas == Some(2);
        (image_of(&d) == "nginx:1.28" && rolled).then_some(d)
    })
    .await;
    assert_eq!(deployment.status.unwrap().ready_replicas, Some(2));
    assert!(agent.stop().await.success());
}

#[tokio::test]
async fn invalid_yaml_fails_naming_the_file_and_keeps_previous_objects_and_state() {
    let ns = TestNamespace::reserve("invalid-yaml").await;
    let repo = GitRepo::new();
    write_web_app(&repo, "nginx:1.27", "hello");
    let good = repo.commit("web app");
    let config = web_app_config(&repo.url(), &ns.name);
    let agent = Agent::start(&config);
    let before = config.wait_applied("web", &good).await;

    // A commit that changes a valid object and adds a broken file: nothing may be applied.
    write_web_app(&repo, "nginx:1.28", "changed");
    repo.write(
        "deploy/web/broken.yaml",
        "kind: ConfigMap\nmetadata: [unclosed\n",
    );
    let bad = repo.commit("broken");
    let after = eventually("failed attempt recorded", WAIT, || async {
        let s = config.state("web");
        (str_at(&s, "/last_attempted_revision") == Some(bad.as_str())
            && s["last_error"].is_string())
        .then_some(s)
    })
    .await;
    let error = after["last_error"].as_str().unwrap();
    assert!(error.contains("deploy/web/broken.yaml"), "{error}");
    assert!(error.contains("invalid YAML"), "{error}");
    assert_eq!(
        str_at(&after, "/last_applied_revision"),
        Some(good.as_str())
    );
    assert_eq!(after["inventory"], before["inventory"]);
    let cm = ns.api::<ConfigMap>().get("web-config").await.unwrap();
    assert_eq!(cm.data.unwrap()["greeting"], "hello");
    assert_eq!(
        image_of(&ns.api::<Deployment>().get("web").await.unwrap()),
        "nginx:1.27"
    );
    assert!(agent.log().contains("deploy/web/broken.yaml"));

    // Fixing the file recovers without intervention.
    repo.remove("deploy/web/broken.yaml");
    let fixed = repo.commit("fix");
    let state = config.wait_applied("web", &fixed).await;
    assert!(state["last_error"].is_null());
    let cm = ns.api::<ConfigMap>().get("web-config").await.unwrap();
    assert_eq!(cm.data.unwrap()["greeting"], "changed");
    assert!(agent.stop().await.success());
}

#[tokio::test]
async fn restart_does_not_reapply_an_unchanged_revision() {
    let ns = TestNamespace::reserve("restart").await;
    let repo = GitRepo::new();
    write_web_app(&repo, "nginx:1.27", "hello");
    let sha = repo.commit("web app");
    let config = web_app_config(&repo.url(), &ns.name);
    let agent = Agent::start(&config);
    config.wait_applied("web", &sha).await;
    assert!(agent.stop().await.success(), "clean exit on SIGTERM");

    // Delete an object behind the agent's back: re-applying would bring it back.
    ns.api::<ConfigMap>()
        .delete("web-config", &Default::default())
        .await
        .unwrap();
    let state_before = config.state("web");

    let agent = Agent::start(&config);
    eventually("a poll after restart", WAIT, || async {
        let log = agent.log();
        (log.matches("up to date").count() >= 2).then_some(())
    })
    .await;
    assert!(ns
        .api::<ConfigMap>()
        .get_opt("web-config")
        .await
        .unwrap()
        .is_none());
    assert_eq!(config.state("web"), state_before);

    // A new revision after the restart is applied as usual.
    write_web_app(&repo, "nginx:1.27", "again");
    let next = repo.commit("new greeting");
    config.wait_applied("web", &next).await;
    let cm = ns.api::<ConfigMap>().get("web-config").await.unwrap();
    assert_eq!(cm.data.unwrap()["greeting"], "again");
    assert!(agent.stop().await.success());
}

#[tokio::test]
async fn failed_object_is_reported_by_kind_namespace_and_name_and_other_apps_still_sync() {
    let ns = TestNamespace::reserve("failed-object").await;
    let repo = GitRepo::new();
    repo.write(
        "bad/service.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: broken\nspec:\n  ports:\n    - port: 99999\n",
    );
    repo.write(
        "bad/configmap.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bad-app-config\n",
    );
    repo.write(
        "good/configmap.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: good-app-config\n",
    );
    repo.commit("two apps");
    let url = repo.url();
    let config = AgentConfig::new()
        .app(&format!(
            "name = \"bad\"\nrepo = \"{url}\"\npath = \"bad\"\nnamespace = \"{}\"\ncreate_namespace = true",
            ns.name
        ))
        .app(&format!(
            "name = \"good\"\nrepo = \"{url}\"\npath = \"good\"\nnamespace = \"{}\"\ncreate_namespace = true",
            ns.name
        ));
    let out = config.command(&["sync"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let expected = format!("Service {}/broken", ns.name);
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(
        stderr.contains("99999"),
        "API server message missing: {stderr}"
    );
    assert!(stderr.contains("1 app(s) failed"), "{stderr}");

    // The rest of the failing app and the other app were applied.
    let cms = ns.api::<ConfigMap>();
    assert!(cms.get_opt("bad-app-config").await.unwrap().is_some());
    assert!(cms.get_opt("good-app-config").await.unwrap().is_some());
    let bad = config.state("bad");
    assert!(bad["last_applied_revision"].is_null());
    assert!(bad["last_error"].as_str().unwrap().contains(&expected));
    assert!(config.state("good")["last_error"].is_null());
}

#[tokio::test]
async fn check_config_and_render_commands() {
    let config = AgentConfig::new().app("name = \"a\"\nrepo = \"https://example.invalid/x.git\"");
    let out = config.command(&["check-config"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = AgentConfig::new()
        .app("name = \"a\"\nrepo = \"https://example.invalid/x.git\"")
        .app("name = \"a\"\nrepo = \"https://example.invalid/x.git\"\nrevison = \"main\"");
    let out = bad.command(&["check-config"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("revison") && stderr.contains("line"),
        "{stderr}"
    );

    // The shipped example configurations, and the package's, are valid once the credentials
    // they name (a kubeconfig) are where systemd's LoadCredential= puts them.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(credentials.path().join("kubeconfig"), "").unwrap();
    let examples = std::fs::read_dir(root.join("config")).unwrap();
    let paths = examples
        .map(|e| e.unwrap().path())
        .chain([root.join("packaging/config.toml")]);
    for path in paths {
        let out = std::process::Command::new(crate::harness::agent::BIN)
            .arg("--config")
            .arg(&path)
            .arg("check-config")
            .env("CREDENTIALS_DIRECTORY", credentials.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {stderr}", path.display());
    }

    let repo = GitRepo::new();
    write_web_app(&repo, "nginx:1.27", "hi");
    let out = std::process::Command::new(crate::harness::agent::BIN)
        .arg("render")
        .arg(repo.path.join("deploy/web"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    let kinds: Vec<_> = yaml.lines().filter(|l| l.starts_with("kind:")).collect();
    assert_eq!(
        kinds,
        ["kind: ConfigMap", "kind: Deployment", "kind: Service"]
    );
}

#[tokio::test]
async fn fleet_command_reads_the_seed_argo_cd_manifests() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/argocd");
    let run = |path: &std::path::Path| {
        std::process::Command::new(crate::harness::agent::BIN)
            .arg("fleet")
            .arg(path)
            .output()
            .unwrap()
    };
    // The seed's customer-adapter writes `syncPolicy` twice: refused, naming key and line.
    let out = run(&fixtures);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("customer-adapter.yaml")
            && stderr.contains("duplicate mapping key: syncPolicy"),
        "{stderr}"
    );
    assert!(!stderr.contains("DuplicateKeyPolicy"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    for f in [
        "app-of-apps.yaml",
        "kafka.yaml",
        "blacklist.yaml",
        "dictamesh-project.yaml",
    ] {
        std::fs::copy(fixtures.join(f), dir.path().join(f)).unwrap();
    }
    let out = run(dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "app dictamesh-dev from https://github.com/dictamesh/dictamesh.git at develop"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "app kafka-dev from https://charts.bitnami.com/bitnami at 26.4.3 chart kafka into namespace"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("AppProject dictamesh"), "{stdout}");
    assert!(
        !stdout.contains("warning"),
        "the seeds need no warnings: {stdout}"
    );
}
