//! Hostile input end to end: a unique secret is planted in each path that once leaked one (a
//! broken Secret's YAML, a kustomization symlinked to a credentials file, an env file line, a
//! chart that `fail`s with its values, URL user info, a Secret under `edgesync diff`), and none
//! may show up in the log, `/api/v1/status`, `/metrics`, the MQTT documents and events, or the
//! diff. Each app must fail (or differ) for the reason planted, so the test cannot pass by
//! never reaching the path.

use crate::harness::http::request;
use crate::harness::mqtt::Broker;
use crate::harness::{eventually, Agent, AgentConfig, GitRepo, TestNamespace, WAIT};

fn app(name: &str, url: &str, path: &str, ns: &str) -> String {
    format!(
        "name = \"{name}\"\nrepo = \"{url}\"\nrevision = \"main\"\npath = \"{path}\"\nnamespace = \"{ns}\"\ncreate_namespace = true"
    )
}

fn secret(name: &str, value: &str) -> String {
    format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\nstringData:\n  password: {value}\n")
}

#[tokio::test]
async fn planted_secrets_reach_no_log_status_metrics_mqtt_event_or_diff() {
    let planted = [
        ("yaml", "S1-yaml-NEVER-SHOW-314159"),
        ("symlink", "S2-symlink-NEVER-SHOW-271828"),
        ("envfile", "S3-envfile-NEVER-SHOW-161803"),
        ("helm", "S4-helm-NEVER-SHOW-141421"),
        ("url-password", "S5-urlpass-NEVER-SHOW-173205"),
        ("url-token", "S6-urltoken-NEVER-SHOW-223606"),
        ("diff-before", "S7-diffold-NEVER-SHOW-244948"),
        ("diff-after", "S8-diffnew-NEVER-SHOW-264575"),
    ];
    let value = |what: &str| planted.iter().find(|(w, _)| *w == what).unwrap().1;
    let ns = TestNamespace::reserve("hostile").await;
    let repo = GitRepo::new();
    let url = repo.url();
    // A broken Secret: a duplicate key, the parser's context would quote the values.
    repo.write(
        "yaml/secret.yaml",
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: broken\nstringData:\n  password: {}\n  password: {}\n",
            value("yaml"),
            value("yaml")
        ),
    );
    // A kustomization that is a symlink to a credentials file outside the checkout.
    let outside = tempfile::tempdir().unwrap();
    let credentials = outside.path().join("credentials");
    std::fs::write(&credentials, format!("token: {}\n", value("symlink"))).unwrap();
    std::fs::create_dir_all(repo.path.join("symlink")).unwrap();
    std::os::unix::fs::symlink(&credentials, repo.path.join("symlink/kustomization.yaml")).unwrap();
    // An env file whose line has no `=`.
    repo.write(
        "envfile/kustomization.yaml",
        "configMapGenerator:\n  - name: settings\n    envs: [settings.env]\n",
    );
    repo.write("envfile/settings.env", &format!("{}\n", value("envfile")));
    // A chart that fails printing a value.
    repo.write(
        "chart/Chart.yaml",
        "apiVersion: v2\nname: failing\nversion: 0.1.0\n",
    );
    repo.write(
        "chart/values.yaml",
        &format!("password: {}\n", value("helm")),
    );
    repo.write(
        "chart/templates/fail.yaml",
        "{{ fail (printf \"cannot go on with %s\" .Values.password) }}\n",
    );
    // A Secret that `edgesync diff` shows changed.
    repo.write("diff/secret.yaml", &secret("creds", value("diff-before")));
    let sha = repo.commit("hostile apps");

    let mut broker = Broker::start(false);
    let dead_repo = |user_info: &str| format!("http://{user_info}@127.0.0.1:9/fleet.git");
    let with_password = dead_repo(&format!("bot:{}", value("url-password")));
    let with_token = dead_repo(value("url-token"));
    let mut config = AgentConfig::new()
        .section("mqtt", &broker.agent_section())
        .section(
            "helm",
            &format!("binary = \"{}\"", crate::helm::helm().display()),
        )
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1h\""))
        .repository(&format!(
            "url = \"{with_password}\"\npoll_interval = \"2s\""
        ))
        .repository(&format!("url = \"{with_token}\"\npoll_interval = \"2s\""));
    for (name, path) in [
        ("yaml", "yaml"),
        ("symlink", "symlink"),
        ("envfile", "envfile"),
        ("helm", "chart"),
        ("diff", "diff"),
    ] {
        config = config.app(&app(name, &url, path, &ns.name));
    }
    config = config
        .app(&app("url-password", &with_password, ".", &ns.name))
        .app(&app("url-token", &with_token, ".", &ns.name));
    let (mut subscriber, mqtt_out) = broker.subscribe("hostile-upstream", "edgesync/#");
    let agent = Agent::start(&config);
    config.wait_applied("diff", &sha).await;

    // Every planted path was reached: each app failed for its own reason.
    let expected = [
        ("yaml", "secret.yaml"),
        ("symlink", "outside"),
        ("envfile", "settings.env"),
        ("helm", "cannot go on"),
        ("url-password", "127.0.0.1:9"),
        ("url-token", "127.0.0.1:9"),
    ];
    let status = eventually("every hostile app failed", WAIT, || async {
        let status = config.status().await;
        let apps = status["apps"].as_array()?;
        let all = expected.iter().all(|(name, why)| {
            apps.iter().any(|a| {
                a["app"] == *name
                    && [&a["last_error"], &a["message"]]
                        .iter()
                        .any(|t| t.as_str().is_some_and(|t| t.contains(why)))
            })
        });
        all.then_some(status)
    })
    .await;

    let metrics = request(config.http_port, "GET", "/metrics", &[], b"")
        .await
        .body;
    let log = agent.log();
    // Stopped first: the agent would sync the next commit at once (it watches the local
    // repository), and leave nothing to diff.
    assert!(agent.stop().await.success());

    // The Secret changes in Git; the diff masks both values.
    repo.write("diff/secret.yaml", &secret("creds", value("diff-after")));
    repo.commit("new password");
    let diff = config.command(&["diff", "diff"]).await;
    let diff_text = format!(
        "{}{}",
        String::from_utf8_lossy(&diff.stdout),
        String::from_utf8_lossy(&diff.stderr)
    );
    assert!(
        diff_text.contains("***"),
        "the diff shows the change masked: {diff_text}"
    );

    let _ = subscriber.kill();
    let _ = subscriber.wait();
    broker.stop();
    let mqtt = std::fs::read_to_string(&mqtt_out).unwrap_or_default();
    assert!(
        mqtt.contains("\"app\":\"helm\""),
        "the MQTT documents were received: {mqtt}"
    );
    let status = status.to_string();
    for (where_, text) in [
        ("log", &log),
        ("status API", &status),
        ("metrics", &metrics),
        ("MQTT documents and events", &mqtt),
        ("edgesync diff", &diff_text),
    ] {
        for (what, secret) in planted {
            assert!(
                !text.contains(secret),
                "the {what} secret reached the {where_}:\n{text}"
            );
        }
    }
}
