//! A rollout over a real Mosquitto: the hub signs and publishes gates, six simulated agents
//! follow them (each runs what its stage allows and reports it), a good revision goes through
//! both stages, a bad one halts in the first. (Real agents come with the agent's side of gates.)

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgesync_hub::gates::Driver;
use edgesync_hub::ingest::Topics;
use edgesync_hub::mqtt::{client, publish_gate, run, Counts, IngestConfig};
use edgesync_hub::rollout::{Budget, OnFailure, Phase, Policy, StageSpec};
use edgesync_hub::store::{Sqlite, Store};
use edgesync_proto::Gate;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

mod support;
use support::{broker, until};

fn policy() -> edgesync_hub::policy::Named {
    let stage = |name: &str| StageSpec {
        name: name.into(),
        selector: BTreeMap::new(),
        share: Some(50),
        bake_secs: 0,
    };
    edgesync_hub::policy::Named {
        name: "default".into(),
        apps: None,
        policy: Policy {
            stages: vec![stage("first"), stage("second")],
            budget: Budget::Nodes(0),
            on_failure: OnFailure::Halt,
        },
    }
}

/// Gates as the agents would receive them.
async fn gates(port: u16) -> Arc<Mutex<Vec<Gate>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (c, mut events) = AsyncClient::new(MqttOptions::new("watcher", "127.0.0.1", port), 64);
    c.subscribe("edgesync/gates/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                if let Ok(g) = Gate::parse(&p.payload) {
                    s.lock().unwrap().push(g);
                }
            }
        }
    });
    seen
}

/// Every agent runs what its stage of `gate` allows and reports `health` for `bad`.
async fn report(agents: &AsyncClient, gate: &Gate, seq: u64, bad: Option<&str>) {
    for i in 0..6 {
        let node = format!("node-{i}");
        let revision = gate
            .stage_for(&node, &BTreeMap::new())
            .unwrap()
            .revision
            .clone();
        let (sync, health) = if Some(revision.as_str()) == bad {
            ("Synced", "Degraded")
        } else {
            ("Synced", "Healthy")
        };
        let doc = serde_json::json!({"schema_version": 1, "node": node, "seq": seq, "timestamp": seq,
            "app": "web", "revision": revision, "sync": sync, "health": health});
        agents
            .publish(
                format!("edgesync/nodes/{node}/apps/web"),
                QoS::AtLeastOnce,
                true,
                doc.to_string(),
            )
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_revision_goes_through_both_stages_and_a_bad_one_halts_in_the_first() {
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Mutex::new(
        Store::new(Box::new(Sqlite::open(&dir.path().join("hub.db")).unwrap())).unwrap(),
    ));
    let key =
        ssh_key::PrivateKey::random(&mut rand_core::OsRng, ssh_key::Algorithm::Ed25519).unwrap();
    let public = key.public_key().clone();
    let driver = Arc::new(Mutex::new(Driver::new(
        vec![policy()],
        key,
        "edgesync/gates",
    )));
    let config = IngestConfig {
        host: "127.0.0.1".into(),
        port: broker.port,
        client_id: "edgesync-hub-rollout".into(),
        topics: Topics::new("edgesync/nodes/{node}"),
        group: Some("edgesync-hub".into()),
        tls: None,
        credentials: None,
        session_expiry: edgesync_hub::mqtt::DEFAULT_SESSION_EXPIRY,
    };
    let (hub, events) = client(&config);
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let counts = Arc::new(Mutex::new(Counts::default()));
    tokio::spawn(run(
        config,
        hub.clone(),
        events,
        db,
        counts,
        Some(driver.clone()),
        stopped,
    ));
    let seen = gates(broker.port).await;
    let (agents, mut agent_events) =
        AsyncClient::new(MqttOptions::new("agents", "127.0.0.1", broker.port), 64);
    tokio::spawn(async move { while agent_events.poll().await.is_ok() {} });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Everyone on "old" first.
    let first = driver
        .lock()
        .unwrap()
        .start("web", "new", Some("old"), 1_000)
        .unwrap();
    publish_gate(&hub, first).await;
    until("the first gate", || seen.lock().unwrap().len() == 1).await;
    let gate = seen.lock().unwrap()[0].clone();
    gate.verify(std::slice::from_ref(&public)).unwrap();
    assert_eq!(gate.stages[0].revision, "new");
    assert_eq!(gate.stages[1].revision, "old");
    report(&agents, &gate, 1, None).await;
    until("the second stage opened", || {
        seen.lock().unwrap().len() >= 2
    })
    .await;
    let gate = seen.lock().unwrap()[1].clone();
    gate.verify(std::slice::from_ref(&public)).unwrap();
    assert!(gate.stages.iter().all(|s| s.revision == "new"), "{gate:?}");
    report(&agents, &gate, 2, None).await;
    until("complete", || {
        driver
            .lock()
            .unwrap()
            .rollouts()
            .all(|r| r.phase == Phase::Complete)
    })
    .await;

    // A bad revision: the first stage degrades, the rollout halts there.
    let bad = driver
        .lock()
        .unwrap()
        .start("web", "bad", Some("new"), 2_000)
        .unwrap();
    publish_gate(&hub, bad).await;
    let of_bad = |g: &&Gate| g.rollout == "web-bad";
    until("the bad gate", || {
        seen.lock().unwrap().iter().any(|g| of_bad(&g))
    })
    .await;
    let gate = seen.lock().unwrap().iter().find(of_bad).unwrap().clone();
    assert_eq!(gate.stages[0].revision, "bad");
    assert_eq!(gate.stages[1].revision, "new");
    report(&agents, &gate, 3, Some("bad")).await;
    until("halted", || {
        driver
            .lock()
            .unwrap()
            .rollouts()
            .all(|r| matches!(r.phase, Phase::Halted { .. }))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let last = seen.lock().unwrap().last().unwrap().clone();
    assert_eq!(
        last.stages[1].revision, "new",
        "the second stage never got the bad revision"
    );
}
