//! Fleet-level Prometheus metrics at `/metrics`: nodes by state, app instances by sync state
//! and health, what ingest did. Fleet gauges are computed from the store at each scrape, so
//! several hub replicas on one PostgreSQL report the same fleet.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::mqtt::Counts;
use crate::store::{Store, StoreError};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabels {
    app: String,
    sync: String,
    health: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

/// Renders the metrics text for one scrape.
pub fn render(
    store: &mut Store,
    counts: &Arc<Mutex<Counts>>,
    now: u64,
    stale_after: u64,
) -> Result<String, StoreError> {
    let nodes = Family::<StateLabel, Gauge>::default();
    let apps = Family::<AppLabels, Gauge>::default();
    let ingested = Family::<OutcomeLabel, Gauge>::default();
    let missing = Gauge::<i64>::default();
    let fleet_errors = Gauge::<i64>::default();
    for n in store.nodes(now, stale_after)? {
        nodes
            .get_or_create(&StateLabel {
                state: n.state.clone(),
            })
            .inc();
        missing.inc_by(i64::try_from(n.missing_events).unwrap_or(i64::MAX));
    }
    for a in store.apps(None)? {
        apps.get_or_create(&AppLabels {
            app: a.app.clone(),
            sync: a.sync.clone().unwrap_or_default(),
            health: a.health.clone().unwrap_or_default(),
        })
        .inc_by(i64::try_from(a.nodes).unwrap_or(i64::MAX));
    }
    {
        let c = counts.lock().unwrap_or_else(|e| e.into_inner());
        fleet_errors.set(i64::try_from(c.fleet_errors).unwrap_or(i64::MAX));
        for (outcome, n) in [
            ("stored", c.stored),
            ("duplicate", c.duplicates),
            ("stale", c.stale),
            ("gap", c.gaps),
            ("refused", c.refused),
        ] {
            ingested
                .get_or_create(&OutcomeLabel {
                    outcome: outcome.into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    let mut registry = Registry::with_prefix("edgesync_hub");
    registry.register("nodes", "Nodes by state (online, offline, stale)", nodes);
    registry.register(
        "app_instances",
        "App instances across nodes by sync state and health",
        apps,
    );
    registry.register(
        "messages",
        "Messages this hub ingested since it started, by outcome",
        ingested,
    );
    registry.register(
        "missing_events",
        "Event numbers missing across all nodes",
        missing,
    );
    registry.register(
        "fleet_errors",
        "Rounds of the fleet repository ([fleet]) that failed or found a commit refused, since start",
        fleet_errors,
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::Message;
    use crate::store::Sqlite;

    #[test]
    fn the_fleet_is_counted_at_each_scrape() {
        let dir = tempfile::tempdir().unwrap();
        let mut store =
            Store::new(Box::new(Sqlite::open(&dir.path().join("hub.db")).unwrap())).unwrap();
        for (node, health) in [("a", "Healthy"), ("b", "Healthy"), ("c", "Degraded")] {
            let doc = Message::App {
                node: node.into(),
                app: "web".into(),
                seq: 1,
                timestamp: 100,
                body: serde_json::json!({"app": "web", "sync": "Synced", "health": health}),
            };
            store.record(&doc, 1000).unwrap();
        }
        let counts = Arc::new(Mutex::new(Counts {
            stored: 3,
            ..Counts::default()
        }));
        let text = render(&mut store, &counts, 1000, 300).unwrap();
        assert!(
            text.contains("edgesync_hub_nodes{state=\"online\"} 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "edgesync_hub_app_instances{app=\"web\",sync=\"Synced\",health=\"Healthy\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("edgesync_hub_messages{outcome=\"stored\"} 3"),
            "{text}"
        );
    }
}
