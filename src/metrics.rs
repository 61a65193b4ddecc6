//! Prometheus metrics (prometheus-client). Every failure kind is counted through an error's
//! `metric_label()`; triggers count what they heard and what became of it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    /// `mqtt`, `github`, `gitlab`, `gitea`, `bitbucket`, `generic` or `poll`.
    pub source: String,
    /// `accepted`, or why not: `malformed`, `bad_signature`, `replay`, `unknown_repository`, ...
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    pub app: String,
    /// `applied`, `unchanged` or `failed`.
    pub result: String,
}

pub struct Metrics {
    registry: Registry,
    triggers: Family<TriggerLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    syncs: Family<SyncLabels, Counter>,
    rounds: Counter,
    mqtt_connected: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("edgesync");
        let triggers = Family::<TriggerLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let syncs = Family::<SyncLabels, Counter>::default();
        let rounds = Counter::default();
        let mqtt_connected = Gauge::default();
        registry.register(
            "trigger_events",
            "Events heard by triggers, by source and outcome",
            triggers.clone(),
        );
        registry.register("errors", "Errors by kind", errors.clone());
        registry.register("syncs", "App syncs by result", syncs.clone());
        registry.register(
            "rounds",
            "Sync rounds run (one fetch check of a repository each)",
            rounds.clone(),
        );
        registry.register(
            "mqtt_connected",
            "1 while connected and subscribed to the MQTT broker",
            mqtt_connected.clone(),
        );
        Metrics {
            registry,
            triggers,
            errors,
            syncs,
            rounds,
            mqtt_connected,
        }
    }
}

impl Metrics {
    pub fn trigger(&self, source: &str, outcome: &str) {
        self.triggers
            .get_or_create(&TriggerLabels {
                source: source.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.to_string(),
            })
            .inc();
    }

    pub fn sync(&self, app: &str, result: &str) {
        self.syncs
            .get_or_create(&SyncLabels {
                app: app.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    pub fn round(&self) {
        self.rounds.inc();
    }

    pub fn set_mqtt_connected(&self, connected: bool) {
        self.mqtt_connected.set(i64::from(connected));
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_appear_in_the_exposition() {
        let m = Metrics::default();
        m.trigger("mqtt", "malformed");
        m.trigger("mqtt", "malformed");
        m.error("git");
        let text = m.encode();
        assert!(
            text.contains(r#"edgesync_trigger_events_total{source="mqtt",outcome="malformed"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"edgesync_errors_total{kind="git"} 1"#),
            "{text}"
        );
    }
}
