//! What the package ships for installing on a node, against the real control plane: the
//! ServiceAccount kubeconfig that `/usr/share/edgesync/k3s-kubeconfig` writes, handed to the
//! agent the way the systemd unit hands it over (`LoadCredential=`, `${CREDENTIALS_DIRECTORY}`).

use std::os::unix::fs::PermissionsExt;

use crate::harness::cluster::{cluster, repo_root};
use crate::harness::{Agent, GitRepo, TestNamespace};
use crate::skeleton::{wait_available, web_app_config, write_web_app};

#[tokio::test]
async fn service_account_kubeconfig_from_the_package_script_syncs_through_credentials() {
    let ns = TestNamespace::reserve("install").await;
    let repo = GitRepo::new();
    write_web_app(&repo, "nginx:1.27", "from a ServiceAccount");
    let sha = repo.commit("web app");
    let config =
        web_app_config(&repo.url(), &ns.name).kubeconfig("${CREDENTIALS_DIRECTORY}/kubeconfig");

    // The script runs with an admin kubeconfig, as root on a K3s server would.
    let credentials = config.dir().join("credentials");
    let out = tokio::process::Command::new(repo_root().join("packaging/k3s-kubeconfig"))
        .arg(credentials.join("kubeconfig"))
        .env("KUBECONFIG", &cluster().kubeconfig)
        .output()
        .await
        .expect("run packaging/k3s-kubeconfig");
    assert!(
        out.status.success(),
        "k3s-kubeconfig failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = credentials.join("kubeconfig");
    let mode = std::fs::metadata(&written).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the kubeconfig must be private");
    let text = std::fs::read_to_string(&written).unwrap();
    assert!(text.contains("token: "), "a ServiceAccount token: {text}");
    assert!(
        !text.contains("client-key-data"),
        "not the admin's client certificate"
    );

    // Without $CREDENTIALS_DIRECTORY the config names the key that needs it.
    let check = config.command(&["check-config"]).await;
    assert!(!check.status.success());
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(
        stderr.contains("kubernetes.kubeconfig") && stderr.contains("CREDENTIALS_DIRECTORY"),
        "{stderr}"
    );

    let dir = credentials.to_str().unwrap();
    let _agent = Agent::start_with_env(&config, &[("CREDENTIALS_DIRECTORY", dir)]);
    config.wait_applied("web", &sha).await;
    wait_available(&ns, "web").await;
}
