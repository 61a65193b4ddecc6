//! Local triggers: commits to a repository on the node's own disk, and config reloads on
//! file change or SIGHUP.

use crate::git_revisions::greeting_app;
use crate::harness::{eventually, Agent, AgentConfig, GitRepo, TestNamespace, WAIT};

fn app(name: &str, url: &str, ns: &str) -> String {
    format!(
        "name = \"{name}\"\nrepo = \"{url}\"\nrevision = \"main\"\npath = \"app\"\nnamespace = \"{ns}\"\ncreate_namespace = true"
    )
}

#[tokio::test]
async fn commit_to_a_local_repository_syncs_without_waiting_for_a_poll() {
    let ns = TestNamespace::reserve("local-watch").await;
    let repo = GitRepo::new();
    let first = greeting_app(&repo, "one");
    let url = repo.url();
    let config = AgentConfig::new()
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1h\""))
        .app(&app("greeting", &url, &ns.name));
    let agent = Agent::start(&config);
    config.wait_applied("greeting", &first).await;
    for text in ["two", "three"] {
        let sha = greeting_app(&repo, text);
        config.wait_applied("greeting", &sha).await;
    }
    assert!(agent.stop().await.success());
}

#[tokio::test]
async fn config_reloads_on_change_and_sighup_and_an_invalid_config_is_refused() {
    let ns = TestNamespace::reserve("reload").await;
    let repo = GitRepo::new();
    let first = greeting_app(&repo, "one");
    let url = repo.url();
    let mut config = AgentConfig::new()
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1h\""))
        .app(&app("first", &url, &ns.name));
    let mut agent = Agent::start(&config);
    config.wait_applied("first", &first).await;

    // Editing the file adds an app.
    // Each app in a namespace of its own: two apps must not manage one object.
    let second_ns = format!("{}-second", ns.name);
    config.push_app(&app("second", &url, &second_ns));
    config.write();
    config.wait_applied("second", &first).await;

    // A broken file is refused: the agent keeps running on the config it has.
    let path = config.dir().join("config.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{good}\n[[apps]]\nname = \"broken\"\nrepo = 42\n"),
    )
    .unwrap();
    eventually("invalid config rejected", WAIT, || async {
        agent.log().contains("new config rejected").then_some(())
    })
    .await;
    assert!(agent.log().contains("line"), "the error names the line");
    let second = greeting_app(&repo, "two");
    config.wait_applied("first", &second).await;
    config.wait_applied("second", &second).await;
    assert!(agent.is_running());

    // SIGHUP reloads too. The config becomes a link to a file in a directory nobody watches,
    // so only the signal can make the agent notice the new app.
    std::fs::write(&path, &good).unwrap();
    let real_dir = config.dir().join("real");
    std::fs::create_dir_all(&real_dir).unwrap();
    let real = real_dir.join("config.toml");
    std::fs::write(&real, &good).unwrap();
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&real, &path).unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    config.push_app(&app("third", &url, &format!("{}-third", ns.name)));
    let text = std::fs::read_to_string(config.write()).unwrap();
    assert!(text.contains("third") && path.is_symlink());
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(config.state("third").is_null(), "reloaded without SIGHUP");
    agent.signal("HUP");
    config.wait_applied("third", &second).await;
    assert!(agent.stop().await.success());
}
