//! Prune: objects removed from Git are deleted, but only when safe.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::harness::{eventually, AgentConfig, GitRepo, TestNamespace, WAIT};

fn cm(name: &str, annotations: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n{annotations}data:\n  v: \"1\"\n")
}

fn config(repo: &GitRepo, ns: &str, allow_empty: bool) -> AgentConfig {
    let url = repo.url();
    AgentConfig::new()
        .app(&format!(
            "name = \"pruning\"\nrepo = \"{url}\"\npath = \"app\"\nnamespace = \"{ns}\"\ncreate_namespace = true\nprune = true\nallow_empty = {allow_empty}"
        ))
        .app(&format!(
            "name = \"keeping\"\nrepo = \"{url}\"\npath = \"keep\"\nnamespace = \"{ns}\"\ncreate_namespace = true"
        ))
}

/// Present and not being deleted.
async fn exists(ns: &TestNamespace, name: &str) -> bool {
    let live = ns.api::<ConfigMap>().get_opt(name).await.unwrap();
    live.is_some_and(|cm| cm.metadata.deletion_timestamp.is_none())
}

/// Pruning uses foreground deletion: the object lingers until the garbage collector is done.
async fn gone(ns: &TestNamespace, name: &str) -> bool {
    eventually(&format!("{name} deleted"), WAIT, || async {
        (!exists(ns, name).await).then_some(())
    })
    .await;
    true
}

async fn sync(config: &AgentConfig) -> (bool, String) {
    let out = config.command(&["sync"]).await;
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test]
async fn prune_deletes_what_git_dropped_but_never_others_objects_partial_applies_or_everything() {
    let ns = TestNamespace::reserve("prune").await;
    let repo = GitRepo::new();
    for name in ["a", "b", "c", "d"] {
        repo.write(&format!("app/{name}.yaml"), &cm(name, ""));
    }
    repo.write(
        "app/e.yaml",
        &cm(
            "e",
            "  annotations:\n    argocd.argoproj.io/sync-options: Prune=false\n",
        ),
    );
    repo.write("keep/k1.yaml", &cm("k1", ""));
    repo.write("keep/k2.yaml", &cm("k2", ""));
    repo.commit("seven objects");
    let mut cfg = config(&repo, &ns.name, false);
    let (ok, log) = sync(&cfg).await;
    assert!(ok, "{log}");

    // Someone else takes over c.
    ns.api::<ConfigMap>()
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"edgesync.io/app": "someone-else"}}}),
            ),
        )
        .await
        .unwrap();
    for gone in ["app/b.yaml", "app/c.yaml", "app/e.yaml", "keep/k2.yaml"] {
        repo.remove(gone);
    }
    repo.commit("drop b, c, e and k2");
    let (ok, log) = sync(&cfg).await;
    assert!(ok, "{log}");
    assert!(gone(&ns, "b").await, "b was ours and left Git: pruned");
    assert!(exists(&ns, "c").await, "c belongs to someone else now");
    assert!(exists(&ns, "e").await, "e says Prune=false");
    assert!(exists(&ns, "k2").await, "the keeping app does not prune");
    let inventory = cfg.state("pruning")["inventory"].to_string();
    assert!(
        !inventory.contains("\"b\"")
            && !inventory.contains("\"c\"")
            && !inventory.contains("\"e\""),
        "{inventory}"
    );
    assert!(
        inventory.contains("\"a\"") && inventory.contains("\"d\""),
        "{inventory}"
    );

    // A half-failed apply prunes nothing.
    repo.remove("app/a.yaml");
    repo.write(
        "app/broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: broken\nspec:\n  ports:\n    - port: 99999\n",
    );
    repo.commit("drop a, add an invalid Service");
    let (ok, _) = sync(&cfg).await;
    assert!(!ok);
    assert!(exists(&ns, "a").await, "no prune after a partial apply");
    repo.remove("app/broken.yaml");
    repo.commit("fix");
    let (ok, log) = sync(&cfg).await;
    assert!(ok, "{log}");
    assert!(gone(&ns, "a").await, "pruned once the apply succeeds");

    // An empty render does not prune everything, unless allowed.
    repo.remove("app/d.yaml");
    repo.write("app/README.md", "nothing to deploy\n");
    repo.commit("empty the app");
    let (ok, log) = sync(&cfg).await;
    assert!(!ok);
    assert!(log.contains("allow_empty"), "{log}");
    assert!(exists(&ns, "d").await);
    cfg.edit("allow_empty = false", "allow_empty = true");
    let (ok, log) = sync(&cfg).await;
    assert!(ok, "{log}");
    assert!(gone(&ns, "d").await, "allowed: the empty render prunes d");
    assert!(exists(&ns, "k1").await, "other apps are untouched");
}
