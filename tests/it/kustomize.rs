//! The differential conformance suite: every fixture under `tests/fixtures/kustomize/` is built
//! by `kubectl kustomize` (the reference, kustomize v5) and by `edgesync render`; the objects
//! must be equal and in the same order, and a failure on one side must be a failure on the other.
//!
//! A fixture builds its own directory unless a `targets` file lists the directories to build,
//! one per line; `DIR error: TEXT` means both must fail and edgesync's error must name TEXT.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;

use crate::harness::agent::BIN;
use crate::harness::cluster::repo_root;
use crate::harness::{Agent, AgentConfig, GitRepo, TestNamespace};
use crate::skeleton::{wait_available, write_web_app};

struct Case {
    fixture: PathBuf,
    target: PathBuf,
    error: Option<String>,
}

fn cases() -> Vec<Case> {
    let dir = repo_root().join("tests/fixtures/kustomize");
    let mut fixtures: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/fixtures/kustomize")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    fixtures.sort();
    let mut cases = Vec::new();
    for fixture in fixtures {
        let targets =
            std::fs::read_to_string(fixture.join("targets")).unwrap_or_else(|_| ".\n".to_string());
        for line in targets.lines().filter(|l| !l.trim().is_empty()) {
            let (target, error) = match line.split_once(" error: ") {
                Some((t, e)) => (t, Some(e.trim().to_string())),
                None => (line.trim(), None),
            };
            cases.push(Case {
                target: fixture.join(target),
                fixture: fixture.clone(),
                error,
            });
        }
    }
    cases
}

fn documents(yaml: &str, who: &str) -> Result<Vec<Value>, String> {
    let docs = edgesync::render::parse_documents(yaml, Path::new(who))
        .map_err(|e| format!("{who} printed unparsable YAML: {e}"))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Compares one case; `Err` describes the difference. A fixture holding a file `enable-helm`
/// is built with the test helm on both sides (`kubectl kustomize --enable-helm`).
fn check(case: &Case) -> Result<(), String> {
    let mut reference = Command::new("kubectl");
    reference.arg("kustomize");
    let mut ours = Command::new(BIN);
    ours.arg("render").arg("--root").arg(&case.fixture);
    if case.fixture.join("enable-helm").exists() {
        let helm = crate::helm::helm();
        reference
            .arg("--enable-helm")
            .arg("--helm-command")
            .arg(helm);
        ours.arg("--helm").arg(helm);
    }
    let reference = reference
        .arg(&case.target)
        .output()
        .map_err(|e| format!("cannot run kubectl kustomize: {e}"))?;
    let ours = ours
        .arg(&case.target)
        .output()
        .map_err(|e| format!("cannot run edgesync render: {e}"))?;
    let our_err = String::from_utf8_lossy(&ours.stderr).to_string();
    let ref_err = String::from_utf8_lossy(&reference.stderr).to_string();
    match (reference.status.success(), ours.status.success()) {
        (true, true) => {
            if case.error.is_some() {
                return Err("both succeeded, but the fixture expects an error".into());
            }
            let want = documents(&String::from_utf8_lossy(&reference.stdout), "kubectl")?;
            let got = documents(&String::from_utf8_lossy(&ours.stdout), "edgesync")?;
            let ids = |docs: &[Value]| -> Vec<String> {
                docs.iter()
                    .map(|d| format!("{}/{}", d["kind"].as_str().unwrap_or("?"), d["metadata"]["name"].as_str().unwrap_or("?")))
                    .collect()
            };
            if ids(&want) != ids(&got) {
                return Err(format!(
                    "objects differ in identity or order\n  kubectl:  {:?}\n  edgesync: {:?}",
                    ids(&want),
                    ids(&got)
                ));
            }
            for (w, g) in want.iter().zip(&got) {
                if w != g {
                    return Err(format!(
                        "{} differs\n--- kubectl\n{}\n--- edgesync\n{}",
                        ids(std::slice::from_ref(w))[0],
                        serde_json::to_string_pretty(w).unwrap(),
                        serde_json::to_string_pretty(g).unwrap()
                    ));
                }
            }
            Ok(())
        }
        (false, false) => match &case.error {
            Some(text) if !our_err.contains(text.as_str()) => Err(format!(
                "both failed, but edgesync's error does not name {text:?}: {our_err}"
            )),
            Some(_) => Ok(()),
            None => Err(format!(
                "both failed, but the fixture expects success\n  kubectl: {ref_err}\n  edgesync: {our_err}"
            )),
        },
        (true, false) => Err(format!("only edgesync failed: {our_err}")),
        (false, true) => Err(format!("only kubectl kustomize failed: {ref_err}")),
    }
}

#[test]
fn every_fixture_builds_exactly_as_kubectl_kustomize() {
    let cases = cases();
    let fixtures: std::collections::BTreeSet<_> = cases.iter().map(|c| &c.fixture).collect();
    assert!(fixtures.len() >= 40, "only {} fixtures", fixtures.len());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case
            .target
            .strip_prefix(repo_root().join("tests/fixtures/kustomize"))
            .unwrap_or(&case.target)
            .display()
            .to_string();
        if let Err(why) = check(case) {
            failures.push(format!("== {name}: {why}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from kubectl kustomize:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// An app whose path holds a kustomization overlay syncs end to end on the real control plane:
/// the prefix, the generated ConfigMap's hashed name and the reference to it all arrive.
#[tokio::test]
async fn kustomize_overlay_app_applies_end_to_end() {
    let ns = TestNamespace::reserve("kustomize").await;
    let repo = GitRepo::new();
    write_web_app(&repo, "nginx:1.27", "from-base");
    repo.write(
        "deploy/web/kustomization.yaml",
        "resources: [deployment.yaml, service.yaml]\nconfigMapGenerator:\n  - name: web-config\n    literals: [greeting=from-generator]\n",
    );
    repo.write(
        "deploy/web/deployment.yaml",
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 1
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - name: web
          image: nginx:1.27
          env:
            - name: GREETING
              valueFrom:
                configMapKeyRef: {name: web-config, key: greeting}
"#,
    );
    repo.write(
        "deploy/overlays/edge/kustomization.yaml",
        &format!(
            "resources: [../../web]\nnamespace: {}\nnamePrefix: edge-\nreplicas:\n  - name: web\n    count: 2\nimages:\n  - name: nginx\n    newTag: \"1.27.1\"\n",
            ns.name
        ),
    );
    let sha = repo.commit("kustomize overlay");
    let url = repo.url();
    let config = AgentConfig::new()
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
        .app(&format!(
            "name = \"edge-web\"\nrepo = \"{url}\"\npath = \"deploy/overlays/edge\"\nnamespace = \"{}\"\ncreate_namespace = true",
            ns.name
        ));
    let _agent = Agent::start(&config);
    config.wait_applied("edge-web", &sha).await;

    // What kubectl kustomize makes of the same directory is exactly what was applied.
    let reference = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo.path.join("deploy/overlays/edge"))
        .output()
        .unwrap();
    assert!(reference.status.success());
    let docs = documents(&String::from_utf8_lossy(&reference.stdout), "kubectl").unwrap();
    let cm_name = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .and_then(|d| d["metadata"]["name"].as_str())
        .unwrap()
        .to_string();
    assert!(cm_name.starts_with("edge-web-config-"), "{cm_name}");

    let cm = ns.api::<ConfigMap>().get(&cm_name).await.unwrap();
    assert_eq!(cm.data.unwrap()["greeting"], "from-generator");
    let deployment = wait_available(&ns, "edge-web").await;
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some("nginx:1.27.1"));
    let env = &container.env.as_ref().unwrap()[0];
    let key_ref = env
        .value_from
        .as_ref()
        .unwrap()
        .config_map_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(key_ref.name, cm_name);
    assert!(ns
        .api::<Deployment>()
        .get_opt("web")
        .await
        .unwrap()
        .is_none());
}

/// Per-node substitution, end to end: the node's name and labels and the config's variables
/// reach the applied objects; a strict app with an unset variable fails naming it.
#[tokio::test]
async fn node_variables_are_substituted_after_rendering() {
    let ns = TestNamespace::reserve("substitute").await;
    let repo = GitRepo::new();
    repo.write(
        "node/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: node-info\ndata:\n  node: ${NODE_NAME}\n  site: ${NODE_LABEL_site}\n  region: ${REGION}\n  tier: ${TIER:-standard}\n  literal: $${NODE_NAME}\n",
    );
    repo.write(
        "strict/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: strict-info\ndata:\n  x: ${UNSET}\n",
    );
    let sha = repo.commit("templated config");
    let url = repo.url();
    let config = AgentConfig::new()
        .node("labels = { site = \"plant-7\" }")
        .section("variables", "REGION = \"eu-west\"")
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
        .app(&format!(
            "name = \"node-info\"\nrepo = \"{url}\"\npath = \"node\"\nnamespace = \"{0}\"\ncreate_namespace = true\nsubstitute = \"strict\"",
            ns.name
        ))
        .app(&format!(
            "name = \"strict-info\"\nrepo = \"{url}\"\npath = \"strict\"\nnamespace = \"{0}\"\ncreate_namespace = true\nsubstitute = \"strict\"",
            ns.name
        ));
    let _agent = Agent::start(&config);
    config.wait_applied("node-info", &sha).await;
    let data = ns
        .api::<ConfigMap>()
        .get("node-info")
        .await
        .unwrap()
        .data
        .unwrap();
    assert_eq!(data["node"], config.node_name);
    assert_eq!(data["site"], "plant-7");
    assert_eq!(data["region"], "eu-west");
    assert_eq!(data["tier"], "standard");
    assert_eq!(data["literal"], "${NODE_NAME}");

    let error = crate::harness::eventually("strict-info fails", crate::harness::WAIT, || async {
        let state = config.state("strict-info");
        state["last_error"].as_str().map(str::to_string)
    })
    .await;
    assert!(
        error.contains("UNSET") && error.contains("ConfigMap"),
        "{error}"
    );
    assert!(ns
        .api::<ConfigMap>()
        .get_opt("strict-info")
        .await
        .unwrap()
        .is_none());
}

/// What the native engine refuses is named, with the switch that hands it to an external
/// kustomize; with the switch, the external build is used.
#[test]
fn unsupported_kustomizations_fall_back_to_an_external_binary_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cms.yaml"),
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: z}\nspec: {alias: z}\n",
    )
    .unwrap();
    // A `crds` schema naming a field that takes the name prefix (`x-kubernetes-identity`):
    // the native engine refuses it.
    std::fs::write(
        dir.path().join("schema.json"),
        r#"{"example.com/v1.Widget": {"Schema": {"properties": {"apiVersion": {}, "kind": {}, "metadata": {}, "spec": {"$ref": "example.com/v1.WidgetSpec"}}}},
 "example.com/v1.WidgetSpec": {"Schema": {"properties": {"alias": {"x-kubernetes-identity": ""}}}}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "resources: [cms.yaml]\ncrds: [schema.json]\nnamePrefix: p-\n",
    )
    .unwrap();
    let render = |fallback: Option<&str>| {
        let mut cmd = Command::new(BIN);
        cmd.arg("render")
            .arg("--root")
            .arg(dir.path())
            .arg(dir.path());
        if let Some(f) = fallback {
            cmd.arg("--kustomize-fallback").arg(f);
        }
        cmd.output().unwrap()
    };
    let refused = render(None);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("x-kubernetes-identity") && stderr.contains("kustomize_fallback"),
        "{stderr}"
    );
    let built = render(Some("kubectl kustomize"));
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let docs = documents(&String::from_utf8_lossy(&built.stdout), "edgesync").unwrap();
    assert_eq!(docs[0]["metadata"]["name"], "p-z", "{docs:?}");
    assert_eq!(docs[0]["spec"]["alias"], "p-z", "{docs:?}");
}

/// A kustomization naming a remote Git base (served over smart HTTP) and a chart from a chart
/// repository (`helmCharts`) applies; once both servers are gone, a new commit of the app
/// still renders from the pinned base and the cached chart, and the app says so.
#[tokio::test]
async fn remote_bases_and_helm_charts_apply_and_render_offline_after_their_first_fetch() {
    let ns = TestNamespace::reserve("kremote").await;
    let base = GitRepo::new();
    base.write(
        "deploy/base/kustomization.yaml",
        "resources: [cm.yaml]\ncommonLabels: {from: base}\n",
    );
    base.write(
        "deploy/base/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: shared}\ndata: {origin: remote-base}\n",
    );
    base.commit("base");
    let base = crate::harness::Remote::serve(base).await;
    let site = tempfile::tempdir().unwrap();
    let charts = site.path().join("stable");
    crate::helm::package_chart(&charts, "0.1.0", "from-repo");
    crate::helm::run_helm(&["repo", "index", charts.to_str().unwrap()]);
    let chart_server = crate::harness::charts::ChartServer::start(site.path(), None).await;

    let app = GitRepo::new();
    let (base_url, charts_url) = (base.url(), chart_server.url("stable"));
    let kustomization = |label: &str| {
        format!(
            "namespace: {ns}\ncommonAnnotations: {{rev: {label}}}\nresources:\n  - {base_url}//deploy/base?ref=main\nhelmCharts:\n  - name: web\n    repo: {charts_url}\n    version: 0.1.x\n    releaseName: edge\n    skipTests: true\n    valuesInline: {{greeting: inline}}\n",
            ns = ns.name,
        )
    };
    app.write("app/kustomization.yaml", &kustomization("one"));
    let first = app.commit("first");
    let url = app.url();
    let config = AgentConfig::new()
        .section("helm", &format!("binary = \"{}\"", crate::helm::helm().display()))
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
        .app(&format!(
            "name = \"remote\"\nrepo = \"{url}\"\npath = \"app\"\nnamespace = \"{}\"\ncreate_namespace = true",
            ns.name
        ));
    let _agent = Agent::start(&config);
    config.wait_applied("remote", &first).await;
    let shared = ns.api::<ConfigMap>().get("shared").await.unwrap();
    assert_eq!(shared.data.unwrap()["origin"], "remote-base");
    assert_eq!(shared.metadata.labels.unwrap()["from"], "base");
    let chart = ns.api::<ConfigMap>().get("edge-config").await.unwrap();
    assert_eq!(chart.data.unwrap()["greeting"], "inline");
    assert_eq!(chart.metadata.annotations.unwrap()["rev"], "one");

    // Both remotes go away; the app's own repository moves on.
    drop(chart_server);
    drop(base);
    app.write("app/kustomization.yaml", &kustomization("two"));
    let second = app.commit("second");
    config.wait_applied("remote", &second).await;
    let chart = ns.api::<ConfigMap>().get("edge-config").await.unwrap();
    assert_eq!(chart.metadata.annotations.unwrap()["rev"], "two");
    let shared = ns.api::<ConfigMap>().get("shared").await.unwrap();
    assert_eq!(shared.metadata.annotations.unwrap()["rev"], "two");
    let warnings =
        crate::harness::eventually("the pins reported", crate::harness::WAIT, || async {
            let status = config.status().await;
            let warnings = status["apps"][0]["warnings"].to_string();
            (warnings.contains("pinned commit") && warnings.contains("cached")).then_some(warnings)
        })
        .await;
    assert!(warnings.contains("web"), "{warnings}");
}
