use super::*;
use serde_json::json;

struct Dir(PathBuf);

impl Checkouts for Dir {
    fn checkout(&self, repo: &str, _revision: &str) -> Result<PathBuf, CheckoutError> {
        if repo.contains("gone") {
            return Err("unreachable".into());
        }
        Ok(self.0.clone())
    }
}

fn appset(spec: Value) -> Object {
    let value = json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "ApplicationSet",
        "metadata": {"name": "set"}, "spec": spec});
    Object {
        value: value.as_object().unwrap().clone(),
        origin: "fleet/set.yaml#0".into(),
    }
}

fn repo() -> (tempfile::TempDir, Dir) {
    let dir = tempfile::tempdir().unwrap();
    for d in [
        "apps/web",
        "apps/api",
        "apps/skip",
        "apps/web/nested",
        "other/x",
    ] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    std::fs::create_dir_all(dir.path().join("sites/plant-7")).unwrap();
    std::fs::write(
        dir.path().join("sites/plant-7/config.yaml"),
        "site: plant-7\nreplicas: 2\nowner: {team: edge}\n",
    )
    .unwrap();
    let path = dir.path().to_path_buf();
    (dir, Dir(path))
}

fn names(apps: &[Object]) -> Vec<String> {
    apps.iter().map(|a| a.name().to_string()).collect()
}

fn node_1(labels: &BTreeMap<String, String>) -> Node<'_> {
    Node {
        name: "node-1",
        labels,
    }
}

fn labels() -> BTreeMap<String, String> {
    [("site".to_string(), "plant-7".to_string())].into()
}

#[test]
fn git_directories_with_exclusions_and_fasttemplate() {
    let (_dir, checkouts) = repo();
    let labels = labels();
    let node = node_1(&labels);
    let set = appset(json!({
        "generators": [{"git": {"repoURL": "https://g/r.git", "revision": "main",
            "directories": [{"path": "apps/*"}, {"path": "apps/skip", "exclude": true}]}}],
        "template": {"metadata": {"name": "{{path.basename}}",
                                  "finalizers": ["resources-finalizer.argocd.argoproj.io"]},
                     "spec": {"source": {"repoURL": "https://g/r.git", "path": "{{path}}"},
                              "destination": {"namespace": "{{path[1]}}-{{unknown}}"}}},
        "syncPolicy": {"preserveResourcesOnDeletion": true}
    }));
    let (apps, warnings) = expand(&set, &checkouts, &node).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(names(&apps), ["api", "web"]);
    assert_eq!(apps[1].value["spec"]["source"]["path"], "apps/web");
    assert_eq!(
        apps[1].value["spec"]["destination"]["namespace"],
        "web-{{unknown}}"
    );
    assert_eq!(apps[1].value["metadata"]["finalizers"], json!([]));
}

#[test]
fn matrix_of_this_node_and_git_files_with_go_templates() {
    let (_dir, checkouts) = repo();
    let labels = labels();
    let node = node_1(&labels);
    let set = appset(json!({
        "goTemplate": true,
        "goTemplateOptions": ["missingkey=error"],
        "generators": [{"matrix": {"generators": [
            {"clusters": {"selector": {"matchLabels": {"site": "plant-7"}}}},
            {"git": {"repoURL": "https://g/r.git",
                     "files": [{"path": "sites/{{index .metadata.labels \"site\"}}/*.yaml"}]}}
        ]}}],
        "template": {"metadata": {"name": "{{.site}}-{{.name}}"},
                     "spec": {"source": {"repoURL": "https://g/r.git", "path": "{{.path.path}}",
                                         "helm": {"parameters": [{"name": "replicas", "value": "{{.replicas}}"}]}},
                              "destination": {"namespace": "{{.owner.team | upper}}"}}}
    }));
    let (apps, _) = expand(&set, &checkouts, &node).unwrap();
    assert_eq!(names(&apps), ["plant-7-node-1"]);
    assert_eq!(apps[0].value["spec"]["source"]["path"], "sites/plant-7");
    assert_eq!(
        apps[0].value["spec"]["source"]["helm"]["parameters"][0]["value"],
        "2"
    );
    assert_eq!(apps[0].value["spec"]["destination"]["namespace"], "EDGE");

    // A node the selector does not match generates nothing.
    let other: BTreeMap<String, String> = [("site".to_string(), "plant-9".to_string())].into();
    let node = Node {
        name: "node-9",
        labels: &other,
    };
    assert!(expand(&set, &checkouts, &node).unwrap().0.is_empty());
}

#[test]
fn list_and_merge_generators() {
    let (_dir, checkouts) = repo();
    let labels = labels();
    let node = node_1(&labels);
    let set = appset(json!({
        "generators": [{"merge": {"mergeKeys": ["app"], "generators": [
            {"list": {"elements": [{"app": "web", "tier": "front"}, {"app": "api", "tier": "back"}]}},
            {"list": {"elements": [{"app": "api", "tier": "core"}]}}
        ]}}],
        "template": {"metadata": {"name": "{{app}}-{{tier}}"}, "spec": {}}
    }));
    let (apps, _) = expand(&set, &checkouts, &node).unwrap();
    assert_eq!(names(&apps), ["web-front", "api-core"]);
}

#[test]
fn what_cannot_be_expanded_is_refused_by_name() {
    let (_dir, checkouts) = repo();
    let labels = labels();
    let node = node_1(&labels);
    for (spec, expected) in [
        (
            json!({"generators": [{"scmProvider": {}}], "template": {}}),
            "the scmProvider generator",
        ),
        (
            json!({"generators": [{"list": {"elements": [{"a": "b"}]}}], "template": {}, "templatePatch": "x"}),
            "templatePatch",
        ),
        (
            json!({"goTemplate": true, "generators": [{"list": {"elements": [{"a": "b"}]}}],
                   "template": {"metadata": {"name": "{{ .a | sha1sum }}"}}}),
            "sha1sum",
        ),
        (
            json!({"generators": [{"git": {"repoURL": "https://g/gone.git", "directories": [{"path": "*"}]}}],
                   "template": {}}),
            "unreachable",
        ),
        (
            json!({"generators": [{"matrix": {"generators": [{"list": {"elements": []}}]}}], "template": {}}),
            "exactly two",
        ),
    ] {
        let err = expand(&appset(spec), &checkouts, &node)
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{err}");
    }
}

#[test]
fn paths_match_by_segment() {
    assert!(path_match("apps/*", "apps/web"));
    assert!(!path_match("apps/*", "apps/web/nested"));
    assert!(path_match("apps/**", "apps/web/nested"));
    assert!(path_match("**/config.yaml", "sites/plant-7/config.yaml"));
    assert!(!path_match("apps/*", "other/x"));
}
