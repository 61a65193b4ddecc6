//! Trigger latency: from an MQTT publish (and, separately, a webhook POST) until every object
//! of a 10-object app shows the new revision on the real control plane, over 100+ events
//! each. Self-heal latency: from an edit or a deletion of one of its objects until it is back.
//! Also the agent's RSS idle with 10 apps, and its peak over a 10,000-message flood.
//!
//! Run with `cargo bench --bench trigger_latency` (release build). Under `cargo test` it
//! does nothing. The repository is served over HTTP by `git http-backend`, as a remote would
//! be, so no local file watch can sync it before the trigger arrives.

#[allow(dead_code, unused_imports)]
#[path = "../tests/it/harness/mod.rs"]
mod harness;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use sha2::Sha256;

use harness::agent::free_port;
use harness::cluster::cluster;
use harness::http::request;
use harness::mqtt::Broker;
use harness::{Agent, AgentConfig, GitHttpServer, GitRepo};

const EVENTS: usize = 100;
const OBJECTS: usize = 10;
const HEALS: usize = 30;

fn write_app(repo: &GitRepo, value: usize) {
    for i in 0..OBJECTS {
        repo.write(
            &format!("app/cm-{i}.yaml"),
            &format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i}\ndata:\n  v: \"{value}\"\n"),
        );
    }
    for n in 0..9 {
        repo.write(
            &format!("small/{n}/cm.yaml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: small\ndata:\n  v: \"0\"\n",
        );
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// The namespace's ConfigMap events after `version`.
async fn watch_from(
    api: &Api<ConfigMap>,
    version: &str,
) -> futures::stream::BoxStream<'static, kube::Result<WatchEvent<ConfigMap>>> {
    api.watch(&WatchParams::default().timeout(60), version)
        .await
        .expect("watch")
        .boxed()
}

/// Waits, on a watch opened before the trigger, until all objects carry `value`.
async fn applied(
    api: &Api<ConfigMap>,
    version: &str,
    value: usize,
    seen: &mut BTreeMap<String, String>,
) {
    let wanted = value.to_string();
    let mut stream = watch_from(api, version).await;
    while seen.values().filter(|v| **v == wanted).count() < OBJECTS {
        match stream.try_next().await.expect("watch event") {
            Some(WatchEvent::Added(cm) | WatchEvent::Modified(cm)) => {
                let name = cm.metadata.name.clone().unwrap_or_default();
                if name.starts_with("cm-") {
                    let v = cm
                        .data
                        .and_then(|d| d.get("v").cloned())
                        .unwrap_or_default();
                    seen.insert(name, v);
                }
            }
            Some(_) => {}
            None => panic!("watch ended before all objects were applied"),
        }
    }
}

/// Waits, on a watch opened before the change, until `name` is back at `value` after the
/// change (`changed` seen first, or a deletion when `changed` is empty).
async fn reverted(api: &Api<ConfigMap>, version: &str, name: &str, changed: &str, value: usize) {
    let wanted = value.to_string();
    let mut stream = watch_from(api, version).await;
    let mut saw_change = false;
    loop {
        match stream.try_next().await.expect("watch event") {
            Some(WatchEvent::Deleted(cm)) if cm.metadata.name.as_deref() == Some(name) => {
                saw_change = true;
            }
            Some(WatchEvent::Added(cm) | WatchEvent::Modified(cm))
                if cm.metadata.name.as_deref() == Some(name) =>
            {
                let v = cm
                    .data
                    .and_then(|d| d.get("v").cloned())
                    .unwrap_or_default();
                if !changed.is_empty() && v == changed {
                    saw_change = true;
                } else if saw_change && v == wanted {
                    return;
                }
            }
            Some(_) => {}
            None => panic!("watch ended before {name} was healed"),
        }
    }
}

async fn resource_version(api: &Api<ConfigMap>) -> String {
    api.list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .unwrap_or_default()
}

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn vm(agent: &Agent, field: &str) -> u64 {
    let pid = agent.pid();
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let ns = format!("bench-trigger-{}", std::process::id());
    let repo = GitRepo::new();
    write_app(&repo, 0);
    repo.commit("initial");
    let root = tempfile::tempdir().expect("tempdir");
    let bare = repo.bare_clone_into(root.path(), "fleet");
    let git = GitHttpServer::start(root.path(), None).await;
    let url = git.url("fleet");
    let broker = Broker::start(false);
    let hook_port = free_port();

    let mut config = AgentConfig::new()
        .section("mqtt", &broker.agent_section())
        .section(
            "webhook",
            &format!("listen = \"127.0.0.1:{hook_port}\"\ngeneric_secret_file = \"hook.secret\"\nrate_limit = 1000.0\nrate_burst = 1000"),
        )
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1h\""))
        .app(&format!(
            "name = \"bench\"\nrepo = \"{url}\"\nrevision = \"main\"\npath = \"app\"\nnamespace = \"{ns}\"\ncreate_namespace = true\nself_heal = true"
        ));
    config.file("hook.secret", "bench-secret\n");
    for n in 0..9 {
        config.push_app(&format!(
            "name = \"small-{n}\"\nrepo = \"{url}\"\nrevision = \"main\"\npath = \"small/{n}\"\nnamespace = \"{ns}-{n}\"\ncreate_namespace = true"
        ));
    }
    let agent = Agent::start(&config);
    let client = cluster().client().await;
    let api: Api<ConfigMap> = Api::namespaced(client, &ns);
    let mut seen = BTreeMap::new();
    let start_version = "0".to_string();
    applied(&api, &start_version, 0, &mut seen).await;
    while agent.log().matches("MQTT subscribed").count() < 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Idle: every app synced, a few seconds without events.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_rss = vm(&agent, "VmRSS:");

    let mut opts = MqttOptions::new("bench-publisher", "127.0.0.1", broker.port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (publisher, mut events) = AsyncClient::new(opts, 20_000);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });

    let mut results: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut value = 0;
    for source in ["mqtt", "webhook"] {
        for i in 0..EVENTS {
            value += 1;
            write_app(&repo, value);
            repo.commit(&format!("{source} {i}"));
            repo.push_to(&bare);
            let version = resource_version(&api).await;
            let payload = format!(r#"{{"repo":"{url}","revision":"main","apps":["bench"]}}"#);
            let t0 = Instant::now();
            if source == "mqtt" {
                publisher
                    .publish(
                        format!("edgesync/nodes/{}/sync", config.node_name),
                        QoS::AtLeastOnce,
                        false,
                        payload,
                    )
                    .await
                    .expect("publish");
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock")
                    .as_secs();
                let headers = [
                    ("x-edgesync-delivery", format!("bench-{value}")),
                    ("x-edgesync-timestamp", now.to_string()),
                    (
                        "x-edgesync-signature",
                        sign("bench-secret", format!("{now}.{payload}").as_bytes()),
                    ),
                ];
                let reply = request(
                    hook_port,
                    "POST",
                    "/hooks/generic",
                    &headers,
                    payload.as_bytes(),
                )
                .await;
                assert_eq!(reply.status, 202, "{}", reply.body);
            }
            applied(&api, &version, value, &mut seen).await;
            results.entry(source).or_default().push(t0.elapsed());
            // Let the round finish its bookkeeping before the next event.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Self-heal: from an edit (a merge patch by another field manager, as `kubectl edit`
    // makes) or a deletion until the watch shows the object back as Git has it.
    let edit = kube::api::PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..Default::default()
    };
    for i in 0..HEALS {
        let version = resource_version(&api).await;
        let patch = serde_json::json!({"data": {"v": format!("edited-{i}")}});
        let t0 = Instant::now();
        api.patch("cm-0", &edit, &kube::api::Patch::Merge(&patch))
            .await
            .expect("edit");
        reverted(&api, &version, "cm-0", &format!("edited-{i}"), value).await;
        results
            .entry("self-heal: edit")
            .or_default()
            .push(t0.elapsed());
        let version = resource_version(&api).await;
        let t0 = Instant::now();
        api.delete("cm-1", &Default::default())
            .await
            .expect("delete");
        reverted(&api, &version, "cm-1", "", value).await;
        results
            .entry("self-heal: delete")
            .or_default()
            .push(t0.elapsed());
    }

    let hwm_before = vm(&agent, "VmHWM:");
    let payload = format!(r#"{{"repo":"{url}","revision":"main"}}"#);
    for _ in 0..10_000 {
        publisher
            .publish("edgesync/changes", QoS::AtLeastOnce, false, payload.clone())
            .await
            .expect("publish");
    }
    let accepted = r#"edgesync_trigger_events_total{source="mqtt",result="accepted"}"#;
    let deadline = Instant::now() + Duration::from_secs(120);
    while harness::http::metric(config.http_port, accepted).await < 10_000.0 + (EVENTS as f64) {
        assert!(Instant::now() < deadline, "flood not received");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hwm_after = vm(&agent, "VmHWM:");
    let rss_after = vm(&agent, "VmRSS:");
    let _ = agent.stop().await;

    println!("machine: {}", harness::machine());
    println!("| what | events | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    for (source, mut times) in results {
        times.sort();
        println!(
            "| {source} | {} | {:.0} ms | {:.0} ms | {:.0} ms |",
            times.len(),
            percentile(&times, 0.5).as_secs_f64() * 1000.0,
            percentile(&times, 0.99).as_secs_f64() * 1000.0,
            times[times.len() - 1].as_secs_f64() * 1000.0
        );
    }
    println!("idle RSS with 10 apps: {:.1} MiB", idle_rss as f64 / 1024.0);
    println!(
        "10,000-message flood: peak RSS {:.1} MiB before, {:.1} MiB after; RSS after {:.1} MiB",
        hwm_before as f64 / 1024.0,
        hwm_after as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
}
