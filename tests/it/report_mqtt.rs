//! Status upstream over MQTT: retained documents, ordered events, the last will, and store
//! and forward across a broker outage. A real `mosquitto_sub` is the upstream listener.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use crate::git_revisions::greeting_app;
use crate::harness::mqtt::Broker;
use crate::harness::{eventually, Agent, AgentConfig, GitRepo, TestNamespace, WAIT};

/// Lines `topic payload` received so far, payloads parsed as JSON where they are.
fn received(path: &std::path::Path) -> Vec<(String, Value)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(t, p)| {
            (
                t.to_string(),
                serde_json::from_str(p).unwrap_or(Value::String(p.into())),
            )
        })
        .collect()
}

/// Events by sequence number (QoS 1 may deliver one twice; `seq` tells).
fn events(path: &std::path::Path, node: &str) -> BTreeMap<u64, Value> {
    let topic = format!("edgesync/nodes/{node}/events");
    received(path)
        .into_iter()
        .filter(|(t, _)| *t == topic)
        .map(|(_, v)| (v["seq"].as_u64().unwrap(), v))
        .collect()
}

#[tokio::test]
async fn status_is_retained_events_arrive_in_order_across_an_outage_and_the_will_says_offline() {
    let ns = TestNamespace::reserve("mqtt-status").await;
    let mut broker = Broker::start_persistent();
    let repo = GitRepo::new();
    let first = greeting_app(&repo, "one");
    let url = repo.url();
    let config = AgentConfig::new()
        .section("mqtt", &broker.agent_section())
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1h\""))
        .app(&format!(
            "name = \"greeting\"\nrepo = \"{url}\"\nrevision = \"main\"\npath = \"app\"\nnamespace = \"{}\"\ncreate_namespace = true",
            ns.name
        ));
    let agent = Agent::start(&config);
    config.wait_applied("greeting", &first).await;

    // 1. A subscriber arriving after the sync gets the retained documents and `online`.
    let (mut sub, out) = broker.subscribe(
        "upstream",
        &format!("edgesync/nodes/{}/#", config.node_name),
    );
    eventually("retained status", WAIT, || async {
        let got = received(&out);
        let app = got
            .iter()
            .rev()
            .find(|(t, _)| *t == format!("edgesync/nodes/{}/apps/greeting", config.node_name))?;
        let node = got
            .iter()
            .rev()
            .find(|(t, _)| *t == format!("edgesync/nodes/{}/status", config.node_name))?;
        let online = got
            .iter()
            .any(|(t, v)| t.ends_with("/online") && v == "online");
        (app.1["sync"] == "Synced"
            && app.1["revision"] == first.as_str()
            && node.1["apps"][0]["app"] == "greeting"
            && online)
            .then_some(())
    })
    .await;

    // Events of a sync, in order.
    let second = greeting_app(&repo, "two");
    config.wait_applied("greeting", &second).await;
    eventually("events of the second sync", WAIT, || async {
        let kinds: Vec<String> = events(&out, &config.node_name)
            .values()
            .map(|e| e["event"].as_str().unwrap().to_string())
            .collect();
        (kinds.ends_with(&["sync_started".to_string(), "sync_succeeded".to_string()])).then_some(())
    })
    .await;
    let before_outage = *events(&out, &config.node_name).keys().last().unwrap();

    // 2. Three syncs while the broker is down for 30 s: nothing is lost, nothing reordered.
    broker.stop_gracefully();
    let mut shas = Vec::new();
    for text in ["three", "four", "five"] {
        let sha = greeting_app(&repo, text);
        config.wait_applied("greeting", &sha).await;
        shas.push(sha);
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    broker.start_again();
    let after = eventually("queued events delivered", WAIT, || async {
        let all = events(&out, &config.node_name);
        let succeeded = all
            .values()
            .filter(|e| e["event"] == "sync_succeeded")
            .map(|e| e["revision"].as_str().unwrap().to_string())
            .collect::<Vec<_>>();
        succeeded.ends_with(&shas).then_some(all)
    })
    .await;
    let seqs: Vec<u64> = after
        .keys()
        .copied()
        .filter(|s| *s > before_outage)
        .collect();
    let expected: Vec<u64> = (before_outage + 1..=before_outage + 6).collect();
    assert_eq!(
        seqs, expected,
        "consecutive sequence numbers after the outage"
    );
    let kinds: Vec<&str> = seqs
        .iter()
        .map(|s| after[s]["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["sync_started", "sync_succeeded"].repeat(3));
    // The app's document and its events are separate messages; the document with the last
    // revision follows (it may arrive after the events do).
    eventually("the app document at the last revision", WAIT, || async {
        let app_doc = received(&out)
            .into_iter()
            .rev()
            .find(|(t, _)| t.ends_with("/apps/greeting"))?
            .1;
        (app_doc["revision"] == shas[2].as_str()).then_some(())
    })
    .await;

    // The last will: killed without a word, the broker says `offline` for us.
    agent.signal("KILL");
    eventually("last will", WAIT, || async {
        let got = received(&out);
        let last_online = got.iter().rev().find(|(t, _)| t.ends_with("/online"))?;
        (last_online.1 == "offline").then_some(())
    })
    .await;
    let _ = sub.kill();
}
