//! Node targeting: an app runs only on nodes whose labels match its selector.

use crate::git_revisions::greeting_app;
use crate::harness::{Agent, AgentConfig, GitRepo, TestNamespace};

#[tokio::test]
async fn apps_run_only_on_matching_nodes_and_move_when_labels_change() {
    let ns = TestNamespace::reserve("targeting").await;
    let repo = GitRepo::new();
    let sha = greeting_app(&repo, "hello");
    let url = repo.url();
    let app = |name: &str, selector: &str| {
        format!(
            "name = \"{name}\"\nrepo = \"{url}\"\npath = \"app\"\nnamespace = \"{}-{name}\"\ncreate_namespace = true\nnode_selector = \"{selector}\"",
            ns.name
        )
    };
    let mut config = AgentConfig::new()
        .node("labels = { site = \"plant-7\" }")
        .app(&app(
            "here",
            "site in (plant-7,plant-8),kubernetes.io/os=linux",
        ))
        .app(&app("there", "site=plant-9"));
    let agent = Agent::start(&config);
    config.wait_applied("here", &sha).await;

    let doc = config.status().await;
    assert_eq!(doc["apps"].as_array().unwrap().len(), 1);
    assert_eq!(doc["node"]["skipped"][0]["app"], "there");
    assert!(doc["node"]["skipped"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("site=plant-9"));
    assert!(
        config.state("there").is_null(),
        "there never synced on this node"
    );
    let out = config.command(&["status"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("skipped on this node: there"));

    // The node moves to plant-9: the reload brings `there` onto the node.
    config.edit("plant-7\" }", "plant-9\" }");
    config.write();
    config.wait_applied("there", &sha).await;
    assert!(agent.stop().await.success());
}
