//! Repositories over SSH with a key file, the server verified against known_hosts.

use k8s_openapi::api::core::v1::ConfigMap;

use crate::harness::{GitRepo, SshGitServer, TestNamespace};
use crate::skeleton::{web_app_config_with, write_web_app};

const SSH_KEYS: &str = "ssh_key_file = \"id_ed25519\"\nknown_hosts_file = \"known_hosts\"";

#[tokio::test]
async fn ssh_repository_is_synced_with_a_key_and_a_matching_host_key() {
    let ns = TestNamespace::reserve("ssh").await;
    let repo = GitRepo::new();
    write_web_app(&repo, "nginx:1.27", "over-ssh");
    let sha = repo.commit("web");
    let bare_root = tempfile::tempdir().unwrap();
    let bare = repo.bare_clone_into(bare_root.path(), "fleet");
    let server = SshGitServer::start();
    let url = server.url(&bare);

    // A host key that is not the server's is refused before anything is fetched.
    let impostor = SshGitServer::start();
    let wrong = web_app_config_with(&url, &ns.name, SSH_KEYS);
    wrong.file(
        "known_hosts",
        &impostor
            .known_hosts()
            .replace(&impostor.port.to_string(), &server.port.to_string()),
    );
    std::fs::copy(server.client_key(), wrong.dir().join("id_ed25519")).unwrap();
    let out = wrong.command(&["sync", "web"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("host key"), "{stderr}");
    assert!(ns
        .api::<ConfigMap>()
        .get_opt("web-config")
        .await
        .unwrap()
        .is_none());

    let config = web_app_config_with(&url, &ns.name, SSH_KEYS);
    config.file("known_hosts", &server.known_hosts());
    std::fs::copy(server.client_key(), config.dir().join("id_ed25519")).unwrap();
    let out = config.command(&["sync", "web"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(config.state("web")["last_applied_revision"], sha.as_str());
    let cm = ns.api::<ConfigMap>().get("web-config").await.unwrap();
    assert_eq!(cm.data.unwrap()["greeting"], "over-ssh");
}
