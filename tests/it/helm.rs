//! Helm charts kept in the Git repository, rendered by the pinned helm that `tests/helm/build`
//! compiles from its Go module, and applied on the real control plane with Argo CD's options.

use std::path::PathBuf;
use std::sync::OnceLock;

use k8s_openapi::api::core::v1::ConfigMap;

use crate::harness::cluster::repo_root;
use crate::harness::{Agent, AgentConfig, GitRepo, TestNamespace};
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

pub fn write_chart(repo: &GitRepo) {
    repo.write(
        "charts/web/Chart.yaml",
        "apiVersion: v2\nname: web\nversion: 0.1.0\nappVersion: \"1.27\"\n",
    );
    repo.write(
        "charts/web/values.yaml",
        "replicas: 1\ngreeting: from-chart\ncolor: plain\nimage: nginx:1.27\n",
    );
    repo.write(
        "charts/web/values-prod.yaml",
        "color: prod\ngreeting: from-file\n",
    );
    repo.write(
        "charts/web/templates/configmap.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-config\ndata:\n  greeting: {{ .Values.greeting | quote }}\n  color: {{ .Values.color | quote }}\n  namespace: {{ .Release.Namespace | quote }}\n",
    );
    repo.write(
        "charts/web/templates/deployment.yaml",
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
"#,
    );
    repo.write(
        "charts/web/templates/tests/test-connection.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {{ .Release.Name }}-test\n  annotations:\n    helm.sh/hook: test\nspec:\n  containers: [{name: t, image: busybox}]\n",
    );
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
