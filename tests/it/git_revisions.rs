//! Branches, tags (lightweight and annotated) and commit SHAs all resolve to the right commit.

use k8s_openapi::api::core::v1::ConfigMap;

use crate::harness::{AgentConfig, GitRepo, TestNamespace};

pub fn greeting_app(repo: &GitRepo, greeting: &str) -> String {
    repo.write(
        "app/cm.yaml",
        &format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: greeting\ndata:\n  text: {greeting}\n"),
    );
    repo.commit(greeting)
}

#[tokio::test]
async fn tags_and_commit_shas_pin_the_applied_revision() {
    let repo = GitRepo::new();
    let v1 = greeting_app(&repo, "one");
    repo.git(&["tag", "v1"]);
    let v2 = greeting_app(&repo, "two");
    repo.git(&["tag", "-a", "v2", "-m", "release two"]);
    greeting_app(&repo, "three");

    for (revision, sha, text) in [
        ("v1", &v1, "one"),
        ("v2", &v2, "two"),
        (v1.as_str(), &v1, "one"),
    ] {
        let ns = TestNamespace::reserve("revisions").await;
        let url = repo.url();
        let config = AgentConfig::new().app(&format!(
            "name = \"pinned\"\nrepo = \"{url}\"\nrevision = \"{revision}\"\npath = \"app\"\nnamespace = \"{}\"\ncreate_namespace = true",
            ns.name
        ));
        let out = config.command(&["sync"]).await;
        assert!(
            out.status.success(),
            "{revision}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            config.state("pinned")["last_applied_revision"],
            sha.as_str()
        );
        let cm = ns.api::<ConfigMap>().get("greeting").await.unwrap();
        assert_eq!(cm.data.unwrap()["text"], text, "revision {revision}");
    }

    let config = AgentConfig::new().app(&format!(
        "name = \"missing\"\nrepo = \"{}\"\nrevision = \"no-such-branch\"\npath = \"app\"\nnamespace = \"default\"",
        repo.url()
    ));
    let out = config.command(&["sync"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("\"no-such-branch\" not found"), "{stderr}");
}
