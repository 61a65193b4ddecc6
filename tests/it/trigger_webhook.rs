//! Git webhooks: real signed HTTP deliveries, one per provider, and the requests that must be
//! refused. Signatures are computed here with the hmac crate, independently of edgesync.

use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::ConfigMap;
use sha2::Sha256;

use crate::git_revisions::greeting_app;
use crate::harness::agent::free_port;
use crate::harness::http::{metric, request, Reply};
use crate::harness::{Agent, AgentConfig, GitRepo, Remote, TestNamespace};

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn secret(provider: &str) -> String {
    format!("{provider}-secret-0f3a9c")
}

/// A push delivery as `provider` sends it, for `url` at branch `main`.
fn push(provider: &str, url: &str, delivery: &str) -> (Vec<(&'static str, String)>, Vec<u8>) {
    let secret = secret(provider);
    let (mut headers, body): (Vec<(&'static str, String)>, String) = match provider {
        "github" => (
            vec![
                ("x-github-event", "push".into()),
                ("x-github-delivery", delivery.into()),
            ],
            format!(
                r#"{{"ref":"refs/heads/main","repository":{{"clone_url":"{url}","html_url":"{url}"}}}}"#
            ),
        ),
        "gitlab" => (
            vec![
                ("x-gitlab-event", "Push Hook".into()),
                ("x-gitlab-event-uuid", delivery.into()),
                ("x-gitlab-token", secret.clone()),
            ],
            format!(
                r#"{{"object_kind":"push","ref":"refs/heads/main","project":{{"git_http_url":"{url}"}}}}"#
            ),
        ),
        "gitea" => (
            vec![
                ("x-gitea-event", "push".into()),
                ("x-gitea-delivery", delivery.into()),
            ],
            format!(r#"{{"ref":"refs/heads/main","repository":{{"clone_url":"{url}"}}}}"#),
        ),
        "bitbucket" => (
            vec![
                ("x-event-key", "repo:refs_changed".into()),
                ("x-request-id", delivery.into()),
            ],
            format!(
                r#"{{"eventKey":"repo:refs_changed","changes":[{{"ref":{{"id":"refs/heads/main"}}}}],"repository":{{"links":{{"clone":[{{"href":"{url}","name":"http"}}]}}}}}}"#
            ),
        ),
        _ => (
            vec![("x-edgesync-delivery", delivery.into())],
            format!(r#"{{"repo":"{url}","revision":"main"}}"#),
        ),
    };
    let sig = hmac_hex(&secret, body.as_bytes());
    match provider {
        "github" => headers.push(("x-hub-signature-256", format!("sha256={sig}"))),
        "gitea" => headers.push(("x-gitea-signature", sig)),
        "bitbucket" => headers.push(("x-hub-signature", format!("sha256={sig}"))),
        "generic" => headers.push(("x-edgesync-signature", format!("sha256={sig}"))),
        _ => {}
    }
    (headers, body.into_bytes())
}

const PROVIDERS: [&str; 5] = ["github", "gitlab", "gitea", "bitbucket", "generic"];

async fn deliver(port: u16, provider: &str, headers: &[(&str, String)], body: &[u8]) -> Reply {
    let mut headers = headers.to_vec();
    headers.push(("content-type", "application/json".into()));
    request(port, "POST", &format!("/hooks/{provider}"), &headers, body).await
}

#[tokio::test]
async fn each_provider_push_syncs_and_rejected_requests_sync_nothing() {
    let ns = TestNamespace::reserve("webhook").await;
    let repo = GitRepo::new();
    let first = greeting_app(&repo, "one");
    // Remote, so that only webhooks (not a file watch) can make the agent sync.
    let remote = Remote::serve(repo).await;
    let repo = &remote.repo;
    let url = remote.url();
    let port = free_port();
    let mut config = AgentConfig::new();
    let mut section = format!("listen = \"127.0.0.1:{port}\"\nmax_body_bytes = 65536\nrate_limit = 5.0\nrate_burst = 30\n");
    for p in PROVIDERS {
        let key = if p == "gitlab" {
            "gitlab_token_file".to_string()
        } else {
            format!("{p}_secret_file")
        };
        config.file(&format!("{p}.secret"), &format!("{}\n", secret(p)));
        section.push_str(&format!("{key} = \"{p}.secret\"\n"));
    }
    config = config
        .section("webhook", &section)
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1h\""))
        .app(&format!(
            "name = \"greeting\"\nrepo = \"{url}\"\nrevision = \"main\"\npath = \"app\"\nnamespace = \"{}\"\ncreate_namespace = true",
            ns.name
        ));
    let agent = Agent::start(&config);
    config.wait_applied("greeting", &first).await;

    // 1. Each provider's valid push syncs the app.
    let mut sent = Vec::new();
    for (i, provider) in PROVIDERS.iter().enumerate() {
        let sha = greeting_app(repo, provider);
        remote.push();
        let (headers, body) = push(provider, &url, &format!("delivery-{i}"));
        let reply = deliver(port, provider, &headers, &body).await;
        assert_eq!(reply.status, 202, "{provider}: {}", reply.body);
        config.wait_applied("greeting", &sha).await;
        sent.push((provider, headers, body));
    }
    let cm = ns.api::<ConfigMap>().get("greeting").await.unwrap();
    assert_eq!(cm.data.unwrap()["text"], "generic");

    // 2. Bad signatures get 401, a replay 409, an oversized body 413 ...
    let pending = greeting_app(repo, "must-not-sync");
    remote.push();
    let applied_sha = config.state("greeting")["last_applied_revision"].clone();
    let rounds_before = metric(config.http_port, "edgesync_rounds_total").await;
    let (mut headers, body) = push("github", &url, "forged-1");
    headers.retain(|(k, _)| *k != "x-hub-signature-256");
    headers.push((
        "x-hub-signature-256",
        format!("sha256={}", hmac_hex("wrong", &body)),
    ));
    assert_eq!(deliver(port, "github", &headers, &body).await.status, 401);
    headers.retain(|(k, _)| *k != "x-hub-signature-256");
    assert_eq!(
        deliver(port, "github", &headers, &body).await.status,
        401,
        "unsigned"
    );
    let (mut headers, body) = push("gitlab", &url, "forged-2");
    headers.retain(|(k, _)| *k != "x-gitlab-token");
    headers.push(("x-gitlab-token", "guess".into()));
    assert_eq!(deliver(port, "gitlab", &headers, &body).await.status, 401);
    let (headers, body) = push("gitea", &url, "forged-3");
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    assert_eq!(
        deliver(port, "gitea", &headers, &tampered).await.status,
        401,
        "tampered body"
    );
    for (provider, headers, body) in &sent {
        let reply = deliver(port, provider, headers, body).await;
        assert_eq!(reply.status, 409, "{provider} replay: {}", reply.body);
    }
    let big = format!(r#"{{"repo":"{url}","pad":"{}"}}"#, "x".repeat(70_000));
    let sig = hmac_hex(&secret("generic"), big.as_bytes());
    let headers = vec![
        ("x-edgesync-delivery", "big-1".to_string()),
        ("x-edgesync-signature", format!("sha256={sig}")),
    ];
    assert_eq!(
        deliver(port, "generic", &headers, big.as_bytes())
            .await
            .status,
        413
    );

    // 3. ... and nothing was synced for any of them.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(
        metric(config.http_port, "edgesync_rounds_total").await,
        rounds_before
    );
    assert_eq!(
        config.state("greeting")["last_applied_revision"],
        applied_sha
    );
    let bad = metric(
        config.http_port,
        r#"edgesync_trigger_events_total{source="github",result="bad_signature"}"#,
    )
    .await;
    assert_eq!(bad, 2.0);

    // A ping is answered and ignored; a fresh valid delivery then syncs what was pending.
    let ping = vec![
        ("x-github-event", "ping".to_string()),
        ("x-github-delivery", "ping-1".to_string()),
        (
            "x-hub-signature-256",
            format!("sha256={}", hmac_hex(&secret("github"), b"{}")),
        ),
    ];
    assert_eq!(deliver(port, "github", &ping, b"{}").await.status, 200);
    let (headers, body) = push("github", &url, "fresh-1");
    assert_eq!(deliver(port, "github", &headers, &body).await.status, 202);
    config.wait_applied("greeting", &pending).await;

    // A burst beyond the rate limit gets 429.
    let mut statuses = Vec::new();
    for i in 0..40 {
        let (headers, body) = push("generic", &url, &format!("burst-{i}"));
        statuses.push(deliver(port, "generic", &headers, &body).await.status);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 202 || *s == 429),
        "{statuses:?}"
    );
    assert!(agent.stop().await.success());
}

#[tokio::test]
async fn webhook_listener_needs_a_secret() {
    let config = AgentConfig::new()
        .section(
            "webhook",
            &format!("listen = \"127.0.0.1:{}\"", free_port()),
        )
        .app("name = \"a\"\nrepo = \"https://example.invalid/x.git\"");
    let out = config.command(&["check-config"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("webhook") && stderr.contains("insecure_no_secret"),
        "{stderr}"
    );
}
