//! The hub's ingest against a real Mosquitto: documents and events from agents' topics into the
//! store, duplicates and gaps told apart, and messages published while the hub was away
//! delivered from its persistent session when it comes back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgesync_hub::ingest::Topics;
use edgesync_hub::mqtt::{client, run, Counts, IngestConfig};
use edgesync_hub::store::{Sqlite, Store};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;

mod support;
use support::{agent, broker, until};

async fn publish(client: &AsyncClient, topic: &str, body: serde_json::Value, retain: bool) {
    client
        .publish(topic, QoS::AtLeastOnce, retain, body.to_string())
        .await
        .unwrap();
}

fn event(seq: u64, ts: u64) -> serde_json::Value {
    serde_json::json!({"schema_version": 1, "node": "n1", "seq": seq, "timestamp": ts,
        "app": "web", "event": "sync_succeeded", "revision": "abc", "message": ""})
}

fn start(
    port: u16,
    db: &Arc<Mutex<Store>>,
    counts: &Arc<Mutex<Counts>>,
) -> tokio::sync::watch::Sender<bool> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let config = IngestConfig {
        host: "127.0.0.1".into(),
        port,
        client_id: "edgesync-hub-test".into(),
        topics: Topics::new("edgesync/nodes/{node}"),
        group: Some("edgesync-hub".into()),
        tls: None,
        credentials: None,
        session_expiry: edgesync_hub::mqtt::DEFAULT_SESSION_EXPIRY,
    };
    let (hub, events) = client(&config);
    tokio::spawn(run(
        config,
        hub,
        events,
        db.clone(),
        counts.clone(),
        None,
        stopped,
    ));
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_documents_and_events_reach_the_store_once_and_survive_a_hub_restart() {
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Mutex::new(
        Store::new(Box::new(Sqlite::open(&dir.path().join("hub.db")).unwrap())).unwrap(),
    ));
    let counts = Arc::new(Mutex::new(Counts::default()));
    let stop = start(broker.port, &db, &counts);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let n1 = agent(broker.port, "n1").await;
    publish(
        &n1,
        "edgesync/nodes/n1/apps/web",
        serde_json::json!({"schema_version": 1, "node": "n1", "seq": 4, "timestamp": 100,
            "app": "web", "revision": "abc", "sync": "Synced", "health": "Healthy"}),
        true,
    )
    .await;
    for seq in [1, 2, 2, 5] {
        publish(
            &n1,
            "edgesync/nodes/n1/events",
            event(seq, 100 + seq),
            false,
        )
        .await;
    }
    // A node claiming another's name is refused.
    publish(&n1, "edgesync/nodes/n2/events", event(9, 109), false).await;
    until("five messages", || {
        let c = counts.lock().unwrap();
        c.stored + c.duplicates + c.refused >= 6
    })
    .await;
    {
        let c = counts.lock().unwrap();
        assert_eq!(
            (c.stored, c.duplicates, c.gaps, c.refused),
            (4, 1, 1, 1),
            "{c:?}"
        );
    }
    assert_eq!(db.lock().unwrap().gaps("n1").unwrap(), [(3, 4)]);
    assert_eq!(
        db.lock().unwrap().app("n1", "web").unwrap().unwrap()["health"],
        "Healthy"
    );

    // The hub stops; the agent goes on; the hub comes back to what it missed.
    stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for seq in [3, 4, 6] {
        publish(
            &n1,
            "edgesync/nodes/n1/events",
            event(seq, 100 + seq),
            false,
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _stop = start(broker.port, &db, &counts);
    until("the missed events", || counts.lock().unwrap().stored >= 7).await;
    assert!(db.lock().unwrap().gaps("n1").unwrap().is_empty());
}

/// Documents retained before the hub first subscribed reach it all the same: a shared
/// subscription gets no retained messages, the plain one the hub makes at each connect does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_started_after_the_fleet_reads_its_retained_documents() {
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Mutex::new(
        Store::new(Box::new(Sqlite::open(&dir.path().join("hub.db")).unwrap())).unwrap(),
    ));
    let counts = Arc::new(Mutex::new(Counts::default()));
    let n9 = agent(broker.port, "n9").await;
    publish(
        &n9,
        "edgesync/nodes/n9/apps/web",
        serde_json::json!({"schema_version": 1, "node": "n9", "seq": 1, "timestamp": 100,
            "app": "web", "revision": "r9", "sync": "Synced", "health": "Healthy"}),
        true,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _stop = start(broker.port, &db, &counts);
    until("the retained document", || {
        db.lock().unwrap().app("n9", "web").unwrap().is_some()
    })
    .await;
    assert_eq!(
        db.lock().unwrap().app("n9", "web").unwrap().unwrap()["revision"],
        "r9"
    );
    // While the replay's subscriptions last, a live document matches them too: the broker
    // sends it twice, and the hub reads the copy the replay brings as nothing new.
    publish(
        &n9,
        "edgesync/nodes/n9/apps/web",
        serde_json::json!({"schema_version": 1, "node": "n9", "seq": 2, "timestamp": 101,
            "app": "web", "revision": "r10", "sync": "Synced", "health": "Healthy"}),
        true,
    )
    .await;
    until("the live document", || {
        db.lock().unwrap().app("n9", "web").unwrap().unwrap()["revision"] == "r10"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The retained document may have come through both subscriptions (Mosquitto 2.0 sends
    // retained messages to a new shared subscription too): one stale copy at most, the live
    // one's copy never read.
    let c = counts.lock().unwrap();
    assert_eq!((c.stored, c.duplicates), (2, 0), "{c:?}");
    assert!(c.stale <= 1, "{c:?}");
}
