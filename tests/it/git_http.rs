//! Repositories served over HTTP by the real `git http-backend`, public and token-protected.

use k8s_openapi::api::core::v1::ConfigMap;

use crate::harness::{GitHttpServer, GitRepo, TestNamespace};
use crate::skeleton::{web_app_config_with, write_web_app};

const TOKEN: &str = "glpat-edgesync-test-0123456789";

#[tokio::test]
async fn public_http_repository_is_synced() {
    let ns = TestNamespace::reserve("http-public").await;
    let repo = GitRepo::new();
    write_web_app(&repo, "nginx:1.27", "first");
    repo.commit("older history");
    let root = tempfile::tempdir().unwrap();
    let bare = repo.bare_clone_into(root.path(), "fleet");
    write_web_app(&repo, "nginx:1.27", "over-http");
    let sha = repo.commit("web");
    repo.push_to(&bare);
    let server = GitHttpServer::start(root.path(), None).await;

    let config = web_app_config_with(&server.url("fleet"), &ns.name, "");
    let out = config.command(&["sync", "web"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One request lists the refs; the new commit is fetched on that connection (a shallow
    // fetch negotiates in two), without listing the refs again.
    assert_eq!(server.served(), 3, "requests for one new commit");
    assert_eq!(config.state("web")["last_applied_revision"], sha.as_str());
    let cm = ns.api::<ConfigMap>().get("web-config").await.unwrap();
    assert_eq!(cm.data.unwrap()["greeting"], "over-http");

    // Only the needed commit was fetched: the cache is a shallow clone without older history.
    let repos = config.dir().join("state/git/repos");
    let cache = std::fs::read_dir(&repos)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let shallow = std::fs::read_to_string(cache.join("shallow")).expect("shallow cache");
    assert_eq!(shallow.trim(), sha);

    // The next commit: the listing and one request for what is new (the cache says what it
    // has); only the listing when nothing moved.
    write_web_app(&repo, "nginx:1.27", "again");
    let next = repo.commit("web again");
    repo.push_to(&bare);
    for (want, served) in [(&next, 5), (&next, 6)] {
        let out = config.command(&["sync", "web"]).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(server.served(), served);
        assert_eq!(config.state("web")["last_applied_revision"], want.as_str());
    }
    let cm = ns.api::<ConfigMap>().get("web-config").await.unwrap();
    assert_eq!(cm.data.unwrap()["greeting"], "again");
}

#[tokio::test]
async fn token_protected_http_repository_is_synced_and_a_wrong_token_is_refused() {
    let ns = TestNamespace::reserve("http-token").await;
    let repo = GitRepo::new();
    write_web_app(&repo, "nginx:1.27", "with-token");
    let sha = repo.commit("web");
    let root = tempfile::tempdir().unwrap();
    repo.bare_clone_into(root.path(), "private");
    let server = GitHttpServer::start(root.path(), Some(TOKEN)).await;
    let url = server.url("private");

    // Without credentials and with a wrong token: refused, nothing applied, no secret leaked.
    let none = web_app_config_with(&url, &ns.name, "");
    let out = none.command(&["sync", "web"]).await;
    assert!(!out.status.success());
    let wrong = web_app_config_with(&url, &ns.name, "token_file = \"token\"");
    wrong.file("token", "not-the-token\n");
    let out = wrong.command(&["sync", "web"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("authentication") || stderr.contains("401"),
        "{stderr}"
    );
    assert!(!stderr.contains("not-the-token"), "secret leaked: {stderr}");
    assert!(server.rejected() >= 2);
    assert!(ns
        .api::<ConfigMap>()
        .get_opt("web-config")
        .await
        .unwrap()
        .is_none());

    let right = web_app_config_with(&url, &ns.name, "token_file = \"token\"");
    right.file("token", &format!("{TOKEN}\n"));
    let out = right.command(&["sync", "web"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains(TOKEN), "secret leaked: {stderr}");
    assert_eq!(right.state("web")["last_applied_revision"], sha.as_str());
    let cm = ns.api::<ConfigMap>().get("web-config").await.unwrap();
    assert_eq!(cm.data.unwrap()["greeting"], "with-token");
}
