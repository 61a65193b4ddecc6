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
    // /generic signs "<timestamp>.<body>", the timestamp sent beside it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sig = if provider == "generic" {
        headers.push(("x-edgesync-timestamp", now.to_string()));
        hmac_hex(&secret, format!("{now}.{body}").as_bytes())
    } else {
        hmac_hex(&secret, body.as_bytes())
    };
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
    // A /generic delivery captured and replayed later than 5 minutes: refused by its
    // timestamp, whatever the replay memory still holds.
    let old = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 600;
    let body = format!(r#"{{"repo":"{url}","revision":"main"}}"#);
    let stale = vec![
        ("x-edgesync-delivery", "stale-1".to_string()),
        ("x-edgesync-timestamp", old.to_string()),
        (
            "x-edgesync-signature",
            format!(
                "sha256={}",
                hmac_hex(&secret("generic"), format!("{old}.{body}").as_bytes())
            ),
        ),
    ];
    let reply = deliver(port, "generic", &stale, body.as_bytes()).await;
    assert_eq!(reply.status, 401, "stale timestamp: {}", reply.body);
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
    let stale_generic = metric(
        config.http_port,
        r#"edgesync_trigger_events_total{source="generic",result="bad_signature"}"#,
    )
    .await;
    assert_eq!(stale_generic, 1.0);

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

/// Opens `n` connections from `from` to the webhook port and sends half a request on each,
/// then stalls; connections the listener refuses (closed at once) are kept too.
async fn slow_clients(from: std::net::Ipv4Addr, port: u16, n: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut open = Vec::new();
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((from, 0).into()).unwrap();
        let Ok(mut stream) = socket.connect(([127, 0, 0, 1], port).into()).await else {
            continue;
        };
        let _ = stream
            .write_all(b"POST /hooks/generic HTTP/1.1\r\nHost: edge\r\nContent-Length: 100\r\n")
            .await;
        open.push(stream);
    }
    open
}

/// One unsigned POST to /generic from `from`; the answer's status (0 if none).
async fn junk_from(from: std::net::Ipv4Addr, port: u16) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    let Ok(mut stream) = socket.connect(([127, 0, 0, 1], port).into()).await else {
        return 0;
    };
    let request = "POST /hooks/generic HTTP/1.1\r\nHost: edge\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    if stream.write_all(request.as_bytes()).await.is_err() {
        return 0;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer).await;
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// Connections the listener has closed (it read EOF or a reset).
async fn closed(streams: &mut [tokio::net::TcpStream]) -> usize {
    use tokio::io::AsyncReadExt;
    let mut n = 0;
    for stream in streams {
        let mut buf = [0u8; 256];
        match tokio::time::timeout(std::time::Duration::from_millis(20), stream.read(&mut buf))
            .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => n += 1,
            // An answer (408) then close counts as closed too.
            Ok(Ok(_)) => n += 1,
            Err(_) => {}
        }
    }
    n
}

#[tokio::test]
async fn slow_connections_cannot_wedge_the_webhook_or_the_agent() {
    let ns = TestNamespace::reserve("slowloris").await;
    let repo = GitRepo::new();
    let first = greeting_app(&repo, "one");
    let remote = Remote::serve(repo).await;
    let url = remote.url();
    let port = free_port();
    let config = AgentConfig::new()
        .section(
            "webhook",
            &format!("listen = \"127.0.0.1:{port}\"\ngeneric_secret_file = \"generic.secret\""),
        )
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
        .app(&format!(
            "name = \"greeting\"\nrepo = \"{url}\"\nrevision = \"main\"\npath = \"app\"\nnamespace = \"{}\"\ncreate_namespace = true",
            ns.name
        ));
    config.file("generic.secret", &secret("generic"));
    let agent = Agent::start(&config);
    config.wait_applied("greeting", &first).await;

    // 0. Unsigned junk from one address is refused and then rate limited, and a real delivery
    // from another address still goes through: junk never counts against verified deliveries.
    let mut junk = Vec::new();
    for _ in 0..60 {
        junk.push(junk_from([127, 0, 0, 3].into(), port).await);
    }
    assert!(junk.contains(&401) && junk.contains(&429), "{junk:?}");
    let (headers, body) = push("generic", &url, "after-junk-1");
    let reply = deliver(port, "generic", &headers, &body).await;
    assert_eq!(reply.status, 202, "{}", reply.body);

    // 1. One address opens 200 slow connections: it gets 8, the rest are closed at once, and
    // a delivery from another address goes through.
    let mut one = slow_clients([127, 0, 0, 2].into(), port, 200).await;
    let (headers, body) = push("generic", &url, "during-slow-1");
    let reply = deliver(port, "generic", &headers, &body).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let refused = closed(&mut one).await;
    assert!(refused >= 150, "only {refused} of 200 were closed at once");

    // 2. Forty addresses, 8 each: more than the listener takes in all. The agent still syncs
    // (the poll) and saves its state, and its status API answers.
    let mut many = Vec::new();
    for last in 3..43u8 {
        many.extend(slow_clients([127, 0, 0, last].into(), port, 8).await);
    }
    let second = greeting_app(&remote.repo, "two");
    remote.push();
    config.wait_applied("greeting", &second).await;
    assert_eq!(
        config.status().await["apps"][0]["revision"],
        second.as_str()
    );
    let limited = metric(
        config.http_port,
        r#"edgesync_trigger_events_total{source="webhook",result="connection_limit"}"#,
    )
    .await;
    assert!(limited >= 150.0, "{limited}");

    // 3. The header timeout (10 s) closes every slow connection; deliveries go through again.
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    let still_open = one.len() + many.len() - closed(&mut one).await - closed(&mut many).await;
    assert_eq!(
        still_open, 0,
        "slow connections outlived the header timeout"
    );
    let (headers, body) = push("generic", &url, "after-slow-1");
    let reply = deliver(port, "generic", &headers, &body).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert!(agent.stop().await.success());
}
