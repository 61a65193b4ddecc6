//! AppProject `signatureKeys`: a revision is applied only when a key that this node trusts
//! (`[signatures]`) and the project lists signed it: OpenPGP and SSH signatures, commits and
//! annotated tags, all made by git itself. `[signatures] fleet` does the same for the fleet.

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};

use crate::harness::signing::SigningKey;
use crate::harness::{eventually, Agent, AgentConfig, GitRepo, Keys, TestNamespace, WAIT};

fn project(keys: &[&str]) -> String {
    let keys: String = keys
        .iter()
        .map(|k| format!("    - keyID: \"{k}\"\n"))
        .collect();
    format!(
        "apiVersion: argoproj.io/v1alpha1\nkind: AppProject\nmetadata:\n  name: signed\nspec:\n  sourceRepos: [\"*\"]\n  destinations: [{{namespace: \"*\", server: \"https://kubernetes.default.svc\"}}]\n  signatureKeys:\n{keys}"
    )
}

fn application(name: &str, url: &str, revision: &str, ns: &str) -> String {
    format!(
        r#"apiVersion: argoproj.io/v1alpha1
kind: Application
metadata:
  name: {name}
spec:
  project: signed
  source:
    repoURL: {url}
    targetRevision: {revision}
    path: app
  destination:
    server: https://kubernetes.default.svc
    namespace: {ns}-{name}
  syncPolicy:
    automated: {{prune: true}}
    syncOptions: [CreateNamespace=true]
"#
    )
}

/// Commits a new greeting, signed by `key` if there is one.
fn greet(repo: &GitRepo, text: &str, key: Option<&SigningKey>) -> String {
    repo.write(
        "app/cm.yaml",
        &format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: greeting\ndata:\n  text: {text}\n"
        ),
    );
    match key {
        Some(key) => repo.commit_signed(text, key),
        None => repo.commit(text),
    }
}

/// Waits until `app`'s attempt at `sha` failed, and returns the error.
async fn refused(config: &AgentConfig, app: &str, sha: &str) -> String {
    let error = eventually(&format!("{app} refused at {sha}"), WAIT, || async {
        let state = config.state(app);
        (state["last_attempted_revision"] == sha)
            .then(|| state["last_error"].as_str().map(str::to_string))
            .flatten()
    })
    .await;
    eprintln!("{app} at {sha}: {error}");
    error
}

#[tokio::test]
async fn only_revisions_signed_by_a_trusted_listed_key_are_applied() {
    let ns = TestNamespace::reserve("signed").await;
    let keys = Keys::new();
    // Trusted and listed: an RSA key that signs with an Ed25519 subkey, and an SSH key.
    let alice = keys.gpg_key("alice", true);
    let deploy = keys.ssh_key("deploy");
    // Neither trusted by the node nor listed.
    let mallory = keys.gpg_key("mallory", false);
    let stranger = keys.ssh_key("stranger");

    let repo = GitRepo::new();
    let url = repo.url();
    repo.write("fleet/project.yaml", &project(&[&alice.id, &deploy.id]));
    repo.write(
        "fleet/main.yaml",
        &application("main-line", &url, "main", &ns.name),
    );
    repo.write(
        "fleet/tagged.yaml",
        &application("tagged", &url, "v1", &ns.name),
    );
    let unsigned = greet(&repo, "unsigned", None);
    // An annotated tag signed by a trusted key vouches for the unsigned commit it tags.
    let mut tag = alice.git_config();
    tag.extend(["tag", "-s", "v1", "-m", "release 1"]);
    repo.git(&tag);

    let signatures = format!(
        "gpg_keys = [\"{}\"]\nssh_keys = [\"{}\"]",
        alice.public.display(),
        deploy.public.display()
    );
    let config = AgentConfig::new()
        .section(
            "fleet",
            &format!("repo = \"{url}\"\nrevision = \"main\"\npath = \"fleet\""),
        )
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
        .section("signatures", &signatures);
    let agent = Agent::start(&config);
    config.wait_applied("tagged", &unsigned).await;
    let error = refused(&config, "main-line", &unsigned).await;
    assert!(
        error.contains(&format!("commit {} is not signed", &unsigned[..12]))
            && error.contains("project signed"),
        "{error}"
    );

    let client = crate::harness::cluster::cluster().client().await;
    let namespaces: kube::Api<Namespace> = kube::Api::all(client.clone());
    let main_ns = format!("{}-main-line", ns.name);
    let greeting = || async {
        kube::Api::<ConfigMap>::namespaced(client.clone(), &main_ns)
            .get("greeting")
            .await
            .unwrap()
            .data
            .unwrap()["text"]
            .clone()
    };

    let by_mallory = greet(&repo, "mallory", Some(&mallory));
    let error = refused(&config, "main-line", &by_mallory).await;
    assert!(
        error.contains(&mallory.id) && error.contains("not among this node's trusted keys"),
        "{error}"
    );
    // Nothing of the app was applied, not even its namespace.
    assert!(namespaces.get_opt(&main_ns).await.unwrap().is_none());
    assert!(config.state("main-line")["last_applied_revision"].is_null());

    let by_alice = greet(&repo, "alice", Some(&alice));
    config.wait_applied("main-line", &by_alice).await;
    assert_eq!(greeting().await, "alice");

    let by_stranger = greet(&repo, "stranger", Some(&stranger));
    let error = refused(&config, "main-line", &by_stranger).await;
    assert!(
        error.contains(&format!("SSH key {}", stranger.id))
            && error.contains("not among this node's trusted keys"),
        "{error}"
    );
    assert_eq!(
        greeting().await,
        "alice",
        "the refused revision changed nothing"
    );

    let by_deploy = greet(&repo, "deploy", Some(&deploy));
    config.wait_applied("main-line", &by_deploy).await;
    assert_eq!(greeting().await, "deploy");
    assert_eq!(
        config.state("tagged")["last_applied_revision"],
        unsigned,
        "the tag did not move"
    );
    let log = agent.log();
    assert!(
        log.contains("tag v1") && log.contains("signature verified"),
        "{log}"
    );
    // Counted once each refusal is reported (a loaded machine may read /metrics between the
    // state and the counter).
    eventually("three signature refusals counted", WAIT, || async {
        let refusals = crate::harness::http::metric(
            config.http_port,
            "edgesync_errors_total{kind=\"signature\"}",
        )
        .await;
        (refusals >= 3.0).then_some(())
    })
    .await;
    assert!(agent.stop().await.success());

    // With `fleet = true`, the fleet revision itself must be signed by a trusted key: a new
    // Application in an unsigned commit is not read, and the node keeps the signed set.
    let mut config = config;
    config.edit(&signatures, &format!("{signatures}\nfleet = true"));
    let agent = Agent::start(&config);
    eventually("the signed fleet read", WAIT, || async {
        agent
            .log()
            .contains("fleet signature verified")
            .then_some(())
    })
    .await;
    repo.write(
        "fleet/extra.yaml",
        &application("extra", &url, "main", &ns.name),
    );
    let unsigned_fleet = repo.commit("an app slipped in without a signature");
    eventually("the unsigned fleet refused", WAIT, || async {
        agent
            .log()
            .contains(&format!(
                "commit {} is not signed, and [signatures] fleet requires a signature",
                &unsigned_fleet[..12]
            ))
            .then_some(())
    })
    .await;
    let doc = config.status().await;
    let apps: Vec<&str> = doc["apps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["app"].as_str())
        .collect();
    assert_eq!(apps, ["main-line", "tagged"], "{doc}");
    assert!(agent.stop().await.success());
}
