//! What every backend of the store must do, as functions that panic on a difference: run by
//! the unit tests on SQLite and by `tests/postgres.rs` on a real PostgreSQL. Not used at run
//! time.

use super::{Recorded, Store};
use crate::ingest::Message;

fn event(node: &str, seq: u64, timestamp: u64) -> Message {
    Message::Event {
        node: node.into(),
        seq,
        timestamp,
        app: "web".into(),
        event: "sync_succeeded".into(),
        revision: Some("abc".into()),
        message: String::new(),
    }
}

fn app(seq: u64, timestamp: u64, revision: &str) -> Message {
    Message::App {
        node: "n1".into(),
        app: "web".into(),
        seq,
        timestamp,
        body: serde_json::json!({"app": "web", "revision": revision, "target_revision": revision,
            "sync": "Synced", "health": "Healthy"}),
    }
}

pub fn events_are_kept_once_and_gaps_found_and_filled(db: &mut Store) {
    assert_eq!(
        db.record(&event("n1", 1, 10), 10).unwrap(),
        Recorded::Stored
    );
    assert_eq!(
        db.record(&event("n1", 1, 10), 11).unwrap(),
        Recorded::Duplicate
    );
    assert_eq!(
        db.record(&event("n1", 2, 11), 11).unwrap(),
        Recorded::Stored
    );
    assert_eq!(
        db.record(&event("n1", 6, 12), 12).unwrap(),
        Recorded::Gap { from: 3, to: 5 }
    );
    assert_eq!(db.gaps("n1").unwrap(), [(3, 5)]);
    db.record(&event("n1", 4, 11), 13).unwrap();
    assert_eq!(db.gaps("n1").unwrap(), [(3, 3), (5, 5)]);
    db.record(&event("n1", 3, 11), 13).unwrap();
    db.record(&event("n1", 5, 11), 13).unwrap();
    assert!(db.gaps("n1").unwrap().is_empty());
    // The agent's state was wiped: it counts from 1 again, later.
    assert_eq!(db.record(&event("n1", 1, 50), 50).unwrap(), Recorded::Reset);
    assert_eq!(
        db.record(&event("n1", 2, 51), 51).unwrap(),
        Recorded::Stored
    );
    // Another node's numbers are its own.
    assert_eq!(
        db.record(&event("n2", 9, 10), 10).unwrap(),
        Recorded::Stored
    );
}

pub fn an_older_document_never_replaces_a_newer_one(db: &mut Store) {
    assert_eq!(
        db.record(&app(5, 100, "new"), 100).unwrap(),
        Recorded::Stored
    );
    assert_eq!(db.record(&app(4, 90, "old"), 101).unwrap(), Recorded::Stale);
    assert_eq!(db.app("n1", "web").unwrap().unwrap()["revision"], "new");
    assert_eq!(
        db.record(&app(6, 100, "newer"), 102).unwrap(),
        Recorded::Stored
    );
    assert_eq!(db.app("n1", "web").unwrap().unwrap()["revision"], "newer");
}

pub fn the_overview_puts_failing_and_silent_nodes_first(db: &mut Store) {
    let doc = |node: &str, health: &str| Message::App {
        node: node.into(),
        app: "web".into(),
        seq: 1,
        timestamp: 100,
        body: serde_json::json!({"app": "web", "revision": "abc", "sync": "Synced", "health": health}),
    };
    db.record(&doc("a-good", "Healthy"), 1000).unwrap();
    db.record(&doc("b-bad", "Degraded"), 1000).unwrap();
    // Held back by a gate: waiting, not failing.
    db.record(
        &Message::App {
            node: "d-held".into(),
            app: "web".into(),
            seq: 1,
            timestamp: 100,
            body: serde_json::json!({"app": "web", "revision": "old", "sync": "Waiting", "health": "Healthy"}),
        },
        1000,
    )
    .unwrap();
    db.record(&doc("c-quiet", "Healthy"), 100).unwrap();
    db.record(&event("b-bad", 1, 10), 1000).unwrap();
    db.record(&event("b-bad", 4, 11), 1000).unwrap();
    let nodes = db.nodes(1000, 300).unwrap();
    let order: Vec<(&str, &str)> = nodes
        .iter()
        .map(|n| (n.node.as_str(), n.state.as_str()))
        .collect();
    assert_eq!(
        order,
        [
            ("b-bad", "online"),
            ("c-quiet", "stale"),
            ("a-good", "online"),
            ("d-held", "online")
        ]
    );
    assert_eq!(nodes[0].missing_events, 2);
    let apps = db.apps(None).unwrap();
    assert_eq!(apps[0].health.as_deref(), Some("Degraded"));
    assert_eq!(
        apps.iter()
            .find(|a| a.sync.as_deref() == Some("Synced") && a.health.as_deref() == Some("Healthy"))
            .map(|a| a.nodes),
        Some(2)
    );
    assert_eq!(db.events(Some("b-bad"), None, 10).unwrap()[0].seq, 4);
}

pub fn app_views_carry_the_nodes_labels(db: &mut Store) {
    let node = Message::Node {
        node: "n1".into(),
        seq: 1,
        timestamp: 100,
        body: serde_json::json!({"node": "n1", "labels": {"ring": "canary"}}),
    };
    db.record(&node, 100).unwrap();
    db.record(&app(2, 100, "abc"), 100).unwrap();
    let views = db.app_views("web").unwrap();
    assert_eq!(views.len(), 1);
    assert_eq!(
        views[0].labels.get("ring").map(String::as_str),
        Some("canary")
    );
    assert_eq!(views[0].revision.as_deref(), Some("abc"));
    assert_eq!(views[0].target.as_deref(), Some("abc"));
    assert_eq!(
        (views[0].sync.as_str(), views[0].health.as_str()),
        ("Synced", "Healthy")
    );
}

pub fn apps_are_known_from_the_node_document_until_their_own_arrives(db: &mut Store) {
    let node = Message::Node {
        node: "n1".into(),
        seq: 5,
        timestamp: 100,
        body: serde_json::json!({"node": "n1", "apps": [
            {"app": "web", "revision": "abc", "sync": "Synced", "health": "Healthy"}]}),
    };
    db.record(&node, 100).unwrap();
    let views = db.app_views("web").unwrap();
    assert_eq!(views.len(), 1, "known from the node document");
    assert_eq!(views[0].revision.as_deref(), Some("abc"));
    // A newer app document wins; an older node document does not undo it.
    db.record(&app(6, 101, "def"), 101).unwrap();
    let older = Message::Node {
        node: "n1".into(),
        seq: 4,
        timestamp: 99,
        body: serde_json::json!({"node": "n1", "apps": [{"app": "web", "revision": "old"}]}),
    };
    db.record(&older, 102).unwrap();
    assert_eq!(
        db.app_views("web").unwrap()[0].revision.as_deref(),
        Some("def")
    );
}

pub fn rollouts_are_kept_and_replaced(db: &mut Store) {
    use crate::rollout::{Phase, Rollout};
    assert!(db.rollouts().unwrap().is_empty());
    let mut first = Rollout::start("web", "new", Some("old"), 100);
    db.save_rollout(&first, 100).unwrap();
    db.save_rollout(&Rollout::start("api", "a2", None, 100), 101)
        .unwrap();
    first.opened = 2;
    first.phase = Phase::Halted {
        reason: "2 of 3 nodes failing".into(),
    };
    db.save_rollout(&first, 105).unwrap();
    let saved = db.rollouts().unwrap();
    assert_eq!(saved.len(), 2, "{saved:?}");
    assert_eq!(
        (saved[0].app.as_str(), saved[0].issued),
        ("api", 101),
        "{saved:?}"
    );
    assert_eq!(saved[1].issued, 105);
    assert_eq!(saved[1].rollout.as_ref(), Ok(&first));
    // What the hub did is on the timeline, numbered.
    db.hub_event("web", Some("new"), "rollout web-new: halted", 106)
        .unwrap();
    db.hub_event("web", None, "rollout web-new: started", 107)
        .unwrap();
    let events = db.events(Some(super::HUB_NODE), Some("web"), 10).unwrap();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [2, 1],
        "{events:?}"
    );
    assert!(db.gaps(super::HUB_NODE).unwrap().is_empty());
}

pub fn messages_received_together_are_recorded_as_one_by_one(db: &mut Store) {
    let batch = [
        event("n1", 1, 10),
        event("n1", 1, 10),
        app(1, 10, "abc"),
        app(2, 9, "old"),
        event("n1", 4, 11),
    ];
    let recorded: Vec<Recorded> = db
        .record_all(&batch, 20)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        recorded,
        [
            Recorded::Stored,
            Recorded::Duplicate,
            Recorded::Stored,
            Recorded::Stale,
            Recorded::Gap { from: 2, to: 3 },
        ]
    );
    assert_eq!(db.gaps("n1").unwrap(), [(2, 3)]);
    assert_eq!(
        db.app("n1", "web").unwrap().unwrap()["revision"].as_str(),
        Some("abc")
    );
    assert!(db.record_all(&[], 20).is_empty());
}

pub fn a_lease_has_one_holder_until_it_runs_out(db: &mut Store) {
    let lease = |db: &mut Store, holder: &str, now: u64| {
        db.lease("rollouts", holder, now, now + 15).unwrap()
    };
    assert_eq!(lease(db, "a", 100), "a");
    assert_eq!(lease(db, "b", 101), "a");
    // Renewed by its holder; still running at 119 (until 120).
    assert_eq!(lease(db, "a", 105), "a");
    assert_eq!(lease(db, "b", 119), "a");
    // Run out: the next to ask takes it, and the old holder cannot renew.
    assert_eq!(lease(db, "b", 121), "b");
    assert_eq!(lease(db, "a", 122), "b");
    // Given up by someone else's name: nothing happens; by its holder: taken at once.
    db.release("rollouts", "a").unwrap();
    assert_eq!(lease(db, "a", 123), "b");
    db.release("rollouts", "b").unwrap();
    assert_eq!(lease(db, "a", 124), "a");
    // Another lease is another row.
    assert_eq!(db.lease("other", "b", 124, 139).unwrap(), "b");
}
