//! What the agent tells operators: Prometheus metrics, the status API and `edgesync status`,
//! systemd notifications, and never a secret in any of them.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::git_revisions::greeting_app;
use crate::harness::http::request;
use crate::harness::{eventually, Agent, AgentConfig, GitRepo, TestNamespace, WAIT};

fn app(name: &str, url: &str, path: &str, ns: &str) -> String {
    format!(
        "name = \"{name}\"\nrepo = \"{url}\"\nrevision = \"main\"\npath = \"{path}\"\nnamespace = \"{ns}\"\ncreate_namespace = true"
    )
}

/// Two apps from one repository: `good` applies, `broken` has invalid YAML.
async fn two_apps(label: &str) -> (TestNamespace, GitRepo, AgentConfig, String) {
    let ns = TestNamespace::reserve(label).await;
    let repo = GitRepo::new();
    repo.write("broken/cm.yaml", "kind: [unclosed\n");
    let sha = greeting_app(&repo, "hello");
    let url = repo.url();
    let config = AgentConfig::new()
        .app(&app("good", &url, "app", &ns.name))
        .app(&app("broken", &url, "broken", &ns.name));
    (ns, repo, config, sha)
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_with_the_documented_series() {
    let (_ns, _repo, config, sha) = two_apps("metrics").await;
    let agent = Agent::start(&config);
    config.wait_applied("good", &sha).await;
    let reply = request(config.http_port, "GET", "/metrics", &[], b"").await;
    assert_eq!(reply.status, 200);
    let lines = reply.body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let series: BTreeMap<String, Vec<BTreeMap<String, String>>> =
        scrape.samples.iter().fold(BTreeMap::new(), |mut m, s| {
            let labels = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            m.entry(s.metric.clone()).or_default().push(labels);
            m
        });
    let labels_of = |name: &str| -> Vec<String> {
        let mut keys: Vec<String> = series
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from {:?}", series.keys()))[0]
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    };
    assert_eq!(
        labels_of("edgesync_app_info"),
        ["app", "health", "repo", "revision", "sync"]
    );
    assert_eq!(labels_of("edgesync_sync_total"), ["app", "result"]);
    assert_eq!(labels_of("edgesync_apply_requests_total"), ["code", "verb"]);
    assert_eq!(labels_of("edgesync_build_info"), ["target", "version"]);
    for name in [
        "edgesync_sync_duration_seconds",
        "edgesync_git_fetch_duration_seconds",
        "edgesync_status_queue_depth",
        "edgesync_rounds_total",
    ] {
        assert!(
            series.contains_key(name),
            "{name} missing from {:?}",
            series.keys()
        );
    }
    let info = &series["edgesync_app_info"];
    let good = info
        .iter()
        .find(|l| l["app"] == "good")
        .expect("good app_info");
    assert_eq!(
        (good["sync"].as_str(), good["revision"].as_str()),
        ("Synced", sha.as_str())
    );
    let broken = info
        .iter()
        .find(|l| l["app"] == "broken")
        .expect("broken app_info");
    assert_eq!(broken["sync"], "Failed");
    assert!(agent.stop().await.success());
}

#[tokio::test]
async fn status_api_and_cli_show_each_app_and_readiness() {
    let (_ns, _repo, config, sha) = two_apps("status").await;
    let agent = Agent::start(&config);
    config.wait_applied("good", &sha).await;
    let port = config.http_port;
    assert_eq!(request(port, "GET", "/healthz", &[], b"").await.status, 200);
    assert_eq!(request(port, "GET", "/readyz", &[], b"").await.status, 200);
    let doc: serde_json::Value = eventually("broken reported", WAIT, || async {
        let doc = config.status().await;
        (doc["apps"][0]["sync"] == "Failed").then_some(doc)
    })
    .await;
    assert_eq!(doc["node"]["schema_version"], 1);
    assert_eq!(doc["node"]["node"], config.node_name);
    assert_eq!(doc["apps"][0]["app"], "broken");
    assert!(doc["apps"][0]["last_error"]
        .as_str()
        .unwrap()
        .contains("broken/cm.yaml"));
    assert_eq!(doc["apps"][1]["revision"], sha.as_str());
    assert_eq!(doc["apps"][1]["sync"], "Synced");
    let healthy = eventually("good Healthy", WAIT, || async {
        let doc = config.status().await;
        (doc["apps"][1]["health"] == "Healthy").then_some(doc)
    })
    .await;
    assert_eq!(
        healthy["apps"][1]["objects"]["Healthy"], 1,
        "the ConfigMap; the namespace create_namespace made is not the app's"
    );

    let out = config.command(&["status"]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |app: &str| {
        table
            .lines()
            .find(|l| l.starts_with(app))
            .unwrap_or_default()
            .to_string()
    };
    assert!(table.lines().nth(1).unwrap().starts_with("APP"), "{table}");
    assert!(
        row("good").contains(&sha[..12]) && row("good").contains("Synced"),
        "{table}"
    );
    assert!(
        row("broken").contains("Failed") && row("broken").contains("invalid YAML"),
        "{table}"
    );
    let out = config.command(&["status", "--json"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(json["apps"].as_array().unwrap().len(), 2);
    assert!(agent.stop().await.success());

    // Without a running agent the command says so.
    let out = config.command(&["status"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the agent running"));
}

#[tokio::test]
async fn systemd_sees_ready_status_and_watchdog() {
    let (_ns, _repo, config, sha) = two_apps("notify").await;
    let socket_path = config.dir().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let agent = Agent::start_with_env(
        &config,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    config.wait_applied("good", &sha).await;
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(seen.iter().any(|m: &String| m.contains("READY=1"))
        && seen.iter().any(|m| m.contains("WATCHDOG=1"))
        && seen
            .iter()
            .any(|m| m.contains("STATUS=2 apps: 1 healthy, 1 unknown; 1 failing to sync")))
    {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no READY/STATUS/WATCHDOG; got {seen:?}"))
            .unwrap();
        seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    let ready = seen.iter().position(|m| m.contains("READY=1")).unwrap();
    let watchdog = seen.iter().position(|m| m.contains("WATCHDOG=1")).unwrap();
    assert!(ready < watchdog, "{seen:?}");
    assert!(agent.stop().await.success());
    let mut stopping = false;
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf)).await
    {
        stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
    }
    assert!(stopping, "STOPPING=1 on SIGTERM");
}

#[tokio::test]
async fn secrets_never_reach_logs_metrics_or_status() {
    const TOKEN: &str = "glpat-NEVER-LOG-ME-0123456789";
    const MQTT_PASSWORD: &str = "mqtt-NEVER-LOG-ME-4242";
    const HOOK_SECRET: &str = "hook-NEVER-LOG-ME-7777";
    let ns = TestNamespace::reserve("secrets").await;
    let repo = GitRepo::new();
    let sha = greeting_app(&repo, "hello");
    let root = tempfile::tempdir().unwrap();
    repo.bare_clone_into(root.path(), "fleet");
    let server = crate::harness::GitHttpServer::start(root.path(), Some(TOKEN)).await;
    let url = server.url("fleet");
    let hook_port = crate::harness::agent::free_port();
    let config = AgentConfig::new()
        .section(
            "mqtt",
            "url = \"mqtt://127.0.0.1:1\"\nusername = \"edge\"\npassword_file = \"mqtt.pw\"\ninsecure_password = true",
        )
        .section(
            "webhook",
            &format!("listen = \"127.0.0.1:{hook_port}\"\ngithub_secret_file = \"hook.secret\""),
        )
        .repository(&format!(
            "url = \"{url}\"\ntoken_file = \"token\"\npoll_interval = \"1h\""
        ))
        .app(&app("good", &url, "app", &ns.name));
    config.file("token", TOKEN);
    config.file("mqtt.pw", MQTT_PASSWORD);
    config.file("hook.secret", HOOK_SECRET);
    let agent = Agent::start(&config);
    config.wait_applied("good", &sha).await;
    // Failing paths too: a forged webhook and the unreachable broker both log errors.
    let forged = request(
        hook_port,
        "POST",
        "/hooks/github",
        &[("x-hub-signature-256", format!("sha256={}", "0".repeat(64)))],
        b"{}",
    )
    .await;
    assert_eq!(forged.status, 401);
    eventually("an MQTT connection failure logged", WAIT, || async {
        agent.log().contains("MQTT connection").then_some(())
    })
    .await;
    let metrics = request(config.http_port, "GET", "/metrics", &[], b"")
        .await
        .body;
    let status = request(config.http_port, "GET", "/api/v1/status", &[], b"")
        .await
        .body;
    let state = std::fs::read_to_string(config.dir().join("state/apps/good.json")).unwrap();
    let log = agent.log();
    assert!(agent.stop().await.success());
    for (what, text) in [
        ("log", &log),
        ("metrics", &metrics),
        ("status", &status),
        ("state", &state),
    ] {
        for secret in [TOKEN, MQTT_PASSWORD, HOOK_SECRET] {
            assert!(!text.contains(secret), "{what} contains a secret:\n{text}");
        }
    }
}

/// Headless Chromium from Debian, with the flags this sandbox needs.
pub fn chromium(args: &[&str], url: &str, profile: &std::path::Path) -> std::process::Output {
    std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium (Debian package chromium)")
}

#[tokio::test]
async fn status_page_shows_healthy_degraded_and_failed_apps_in_headless_chromium() {
    let ns = TestNamespace::reserve("page").await;
    let repo = GitRepo::new();
    crate::skeleton::write_web_app(&repo, "nginx:1.27", "hello");
    // fakenode keeps images named "crashloop" in CrashLoopBackOff.
    repo.write(
        "crashing/pod.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: crashing\nspec:\n  containers:\n    - name: app\n      image: example.com/crashloop:1\n",
    );
    repo.write("broken/cm.yaml", "kind: [unclosed\n");
    let sha = repo.commit("three apps");
    let url = repo.url();
    let config = AgentConfig::new()
        .app(&app("web", &url, "deploy/web", &ns.name))
        .app(&app("crashing", &url, "crashing", &ns.name))
        .app(&app("broken", &url, "broken", &ns.name));
    let agent = Agent::start(&config);
    config.wait_applied("web", &sha).await;
    let port = config.http_port;
    eventually(
        "web Healthy, crashing Degraded, broken Failed",
        WAIT,
        || async {
            let reply = request(port, "GET", "/api/v1/status", &[], b"").await;
            let doc: serde_json::Value = serde_json::from_str(&reply.body).ok()?;
            let app = |name: &str| {
                doc["apps"]
                    .as_array()?
                    .iter()
                    .find(|a| a["app"] == name)
                    .cloned()
            };
            let (web, crashing, broken) = (app("web")?, app("crashing")?, app("broken")?);
            (web["health"] == "Healthy"
                && crashing["health"] == "Degraded"
                && broken["sync"] == "Failed")
                .then_some(())
        },
    )
    .await;
    let url = format!("http://127.0.0.1:{port}/");
    let profile = tempfile::tempdir().unwrap();
    let url_for_chromium = url.clone();
    let profile_path = profile.path().to_path_buf();
    let dom = tokio::task::spawn_blocking(move || {
        chromium(&["--dump-dom"], &url_for_chromium, &profile_path)
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout).to_string();
    let row = |app: &str| {
        let start = dom
            .find(&format!("id=\"app-{app}\""))
            .unwrap_or_else(|| panic!("no row for {app}:\n{dom}"));
        dom[start..].split("</tr>").next().unwrap().to_string()
    };
    assert!(
        row("web").contains(">Synced<") && row("web").contains(">Healthy<"),
        "{dom}"
    );
    assert!(row("web").contains(&sha[..12]), "{dom}");
    assert!(
        row("crashing").contains(">Degraded<") && row("crashing").contains("CrashLoopBackOff"),
        "{dom}"
    );
    assert!(
        row("broken").contains(">Failed<") && row("broken").contains("invalid YAML"),
        "{dom}"
    );
    assert!(
        dom.contains("sync_succeeded") && dom.contains("sync_failed"),
        "events listed:\n{dom}"
    );

    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/status-page.png");
    let arg = format!("--screenshot={}", shot.display());
    let profile_path = profile.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        chromium(&[&arg, "--window-size=1280,720"], &url, &profile_path)
    })
    .await
    .unwrap();
    let png = std::fs::read(&shot)
        .unwrap_or_else(|_| panic!("no screenshot: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    assert!(agent.stop().await.success());
}
