//! MQTT subscriber (rumqttc): QoS 1 with a persistent session. It re-subscribes after every
//! connect, because rumqttc loses subscriptions after a clean-session reconnect without
//! saying so (bytebeamio/rumqtt#250). It reconnects with exponential backoff and jitter.
//!
//! A message can only name repositories and apps that are already configured. It never carries
//! manifests or credentials, so a compromised broker can at most cause fetches.
//!
//! The same connection carries the node's status upstream: it announces `online` (with a last
//! will of `offline`) and drains an [`Outbound`] queue one message at a time, forgetting a
//! message only once the broker has acknowledged it.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rumqttc::{
    AsyncClient, LastWill, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{watch, Notify};

use super::{ChangeMessage, EventSink, GateSink, Source, MAX_MESSAGE_BYTES};
use crate::config::MqttConfig;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub(crate) enum MqttError {
    #[error("mqtt.url: {0}")]
    Url(#[from] crate::model::url::BrokerUrlError),
    #[error("cannot read {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `what` is the file or step that failed; `source` is rustls's error.
    #[error("TLS setup: {what}: {source}")]
    Tls {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl MqttError {
    pub(crate) fn metric_label(&self) -> crate::metrics::ErrorKind {
        use crate::metrics::ErrorKind;
        match self {
            MqttError::Url(_) => ErrorKind::MqttConfig,
            MqttError::File { .. } => ErrorKind::MqttCredentials,
            MqttError::Tls { .. } => ErrorKind::MqttTls,
        }
    }
}

/// A message waiting to go upstream.
pub(crate) struct Queued {
    pub(crate) id: u64,
    pub(crate) topic: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) retain: bool,
}

/// Messages to publish, kept by their owner until acknowledged (store and forward).
pub(crate) trait Outbound: Send + Sync {
    /// Where `online` is announced and the broker publishes the last will, `offline`.
    fn online_topic(&self) -> &str;
    /// The oldest message not yet acknowledged.
    fn front(&self) -> Option<Queued>;
    fn acknowledged(&self, id: u64);
    /// Notified whenever a message is queued.
    fn wake(&self) -> &Notify;
}

pub(crate) use crate::model::url::parse_broker_url;

fn read(path: &Path) -> Result<Vec<u8>, MqttError> {
    std::fs::read(path).map_err(|source| MqttError::File {
        path: path.to_path_buf(),
        source,
    })
}

fn tls_config(cfg: &MqttConfig) -> Result<rustls::ClientConfig, MqttError> {
    let client = cfg.cert_file.as_deref().zip(cfg.key_file.as_deref());
    edgesync_proto::tls::client_config(cfg.ca_file.as_deref(), client).map_err(|e| match e {
        edgesync_proto::tls::TlsError::Read { path, source } => MqttError::File { path, source },
        edgesync_proto::tls::TlsError::Invalid { what, source } => MqttError::Tls { what, source },
    })
}

/// Options for one connection attempt; credential files are read on every attempt so a
/// rotated password applies at the next reconnect.
/// `clean` starts a fresh session, dropping whatever the broker queued for the old one.
fn options(
    cfg: &MqttConfig,
    outbound: Option<&dyn Outbound>,
    clean: bool,
) -> Result<MqttOptions, MqttError> {
    let (host, port, tls) = parse_broker_url(&cfg.url).map_err(MqttError::Url)?;
    let mut opts = MqttOptions::new(&cfg.client_id, host, port);
    opts.set_keep_alive(cfg.keep_alive)
        .set_clean_session(clean)
        // Room for any change message; bigger packets are refused by rumqttc itself.
        .set_max_packet_size(MAX_MESSAGE_BYTES * 4, 1024 * 1024);
    if let Some(out) = outbound {
        opts.set_last_will(LastWill::new(
            out.online_topic(),
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
    }
    if let Some(user) = &cfg.username {
        let password = match &cfg.password_file {
            Some(p) => String::from_utf8_lossy(&read(p)?).trim().to_string(),
            None => String::new(),
        };
        opts.set_credentials(user, password);
    }
    if tls {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls_config(cfg)?),
        )));
    }
    Ok(opts)
}

/// A subscribed topic filter, and whether messages on it are addressed to this node alone.
struct Subscription {
    filter: String,
    directed: bool,
}

fn subscriptions(cfg: &MqttConfig, node: &str) -> Vec<Subscription> {
    cfg.topics
        .iter()
        .map(|t| Subscription {
            filter: t.replace("{node}", node),
            directed: t.contains("{node}"),
        })
        .collect()
}

fn reconnect_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}

/// One connection's parts, for what its events do.
struct Session<'a> {
    broker: &'a str,
    client: &'a AsyncClient,
    subs: &'a [Subscription],
    outbound: Option<&'a dyn Outbound>,
    sink: &'a dyn EventSink,
    gates: Option<&'a dyn GateSink>,
    metrics: &'a Metrics,
}

impl Session<'_> {
    /// What an event of the connection does: subscribe on connect, track publishes and
    /// their acknowledgements, hand change messages to the sink.
    fn on_event(&self, event: rumqttc::Event, upstream: &mut Upstream) {
        match event {
            rumqttc::Event::Incoming(Packet::ConnAck(ack)) => {
                tracing::info!(broker = %self.broker, session_present = ack.session_present, "MQTT connected");
                for sub in self.subs {
                    if let Err(e) = self.client.try_subscribe(&sub.filter, QoS::AtLeastOnce) {
                        tracing::warn!(topic = %sub.filter, "MQTT subscribe: {e}");
                    }
                }
                upstream.connected(self.client, self.outbound);
            }
            rumqttc::Event::Outgoing(Outgoing::Publish(pkid)) => upstream.sent(pkid),
            rumqttc::Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(out) = self.outbound {
                    upstream.acknowledged(ack.pkid, out);
                }
            }
            rumqttc::Event::Incoming(Packet::SubAck(ack)) => {
                // Connected counts from the first subscription: before it, publishes
                // would not reach us.
                self.metrics.set_mqtt_connected(true);
                tracing::info!(pkid = ack.pkid, codes = ?ack.return_codes, "MQTT subscribed");
            }
            rumqttc::Event::Incoming(Packet::Publish(publish)) => {
                if let Some(gates) = self
                    .gates
                    .filter(|g| rumqttc::matches(&publish.topic, g.filter()))
                {
                    gates.gate(&publish.topic, &publish.payload);
                    return;
                }
                let directed = self
                    .subs
                    .iter()
                    .any(|s| s.directed && rumqttc::matches(&publish.topic, &s.filter));
                handle(
                    &publish.topic,
                    &publish.payload,
                    directed,
                    self.sink,
                    self.metrics,
                );
            }
            _ => {}
        }
    }
}

/// Runs the subscriber until shutdown. Never returns early: configuration problems are
/// retried like connection failures, so fixing a credential file is enough to recover.
pub(crate) async fn run(
    cfg: MqttConfig,
    node: String,
    sink: Arc<dyn EventSink>,
    gates: Option<Arc<dyn GateSink>>,
    outbound: Option<Arc<dyn Outbound>>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut subs = subscriptions(&cfg, &node);
    if let Some(gates) = &gates {
        subs.push(Subscription {
            filter: gates.filter().to_string(),
            directed: false,
        });
    }
    let mut delays = reconnect_delays();
    let idle = Notify::new();
    let mut clean = false;
    'connect: loop {
        let opts = match options(&cfg, outbound.as_deref(), std::mem::take(&mut clean)) {
            Ok(opts) => opts,
            Err(e) => {
                metrics.error(e.metric_label());
                tracing::error!(broker = %cfg.url, "MQTT: {e}");
                if wait(&mut shutdown, delays.next()).await {
                    return;
                }
                continue;
            }
        };
        let (client, mut events) = AsyncClient::new(opts, 16);
        let mut upstream = Upstream::default();
        loop {
            if let Some(out) = outbound.as_deref() {
                upstream.pump(&client, out);
            }
            let wake = outbound.as_deref().map_or(&idle, |o| o.wake());
            let polled = tokio::select! {
                polled = events.poll() => polled,
                _ = wake.notified() => continue,
                _ = shutdown.changed() => {
                    let _ = client.try_disconnect();
                    return;
                }
            };
            match polled {
                Ok(event) => {
                    if matches!(event, rumqttc::Event::Incoming(Packet::ConnAck(_))) {
                        delays = reconnect_delays();
                    }
                    let session = Session {
                        broker: &cfg.url,
                        client: &client,
                        subs: &subs,
                        outbound: outbound.as_deref(),
                        sink: &*sink,
                        gates: gates.as_deref(),
                        metrics: &metrics,
                    };
                    session.on_event(event, &mut upstream);
                }
                Err(rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
                    rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size),
                ))) => {
                    // With a persistent session the broker would redeliver this message on
                    // every reconnect, and the agent would never hear anything again. A clean
                    // session drops it; subscriptions are renewed on connect anyway, and status
                    // messages wait in the outbox until acknowledged.
                    upstream = Upstream::default();
                    metrics.set_mqtt_connected(false);
                    metrics.trigger("mqtt", "too_large");
                    tracing::warn!(broker = %cfg.url, size, "MQTT message too large; dropped by starting a clean session");
                    clean = true;
                    continue 'connect;
                }
                Err(e) => {
                    upstream = Upstream::default();
                    metrics.set_mqtt_connected(false);
                    metrics.error(crate::metrics::ErrorKind::MqttConnection);
                    tracing::warn!(broker = %cfg.url, "MQTT connection: {e}; reconnecting");
                    if wait(&mut shutdown, delays.next()).await {
                        return;
                    }
                    // A TLS or credential error needs fresh options; anything else is
                    // retried by polling the same event loop.
                    if matches!(
                        e,
                        rumqttc::ConnectionError::Tls(_)
                            | rumqttc::ConnectionError::ConnectionRefused(_)
                    ) {
                        continue 'connect;
                    }
                }
            }
        }
    }
}

/// The publishing side of one connection: at most one queued message in flight, matched to
/// its acknowledgement by packet id. After a disconnect everything starts over, so a message
/// may arrive twice (QoS 1 is at least once); consumers deduplicate by `seq`.
#[derive(Default)]
struct Upstream {
    connected: bool,
    in_flight: Option<u64>,
    /// What each publish handed to rumqttc was, in order: a queued id, or the announcement.
    handed: VecDeque<Option<u64>>,
    by_pkid: HashMap<u16, u64>,
}

impl Upstream {
    fn connected(&mut self, client: &AsyncClient, outbound: Option<&dyn Outbound>) {
        *self = Upstream {
            connected: true,
            ..Upstream::default()
        };
        if let Some(out) = outbound {
            if client
                .try_publish(out.online_topic(), QoS::AtLeastOnce, true, "online")
                .is_ok()
            {
                self.handed.push_back(None);
            }
        }
    }

    fn pump(&mut self, client: &AsyncClient, out: &dyn Outbound) {
        if !self.connected || self.in_flight.is_some() {
            return;
        }
        if let Some(q) = out.front() {
            if client
                .try_publish(q.topic, QoS::AtLeastOnce, q.retain, q.payload)
                .is_ok()
            {
                self.in_flight = Some(q.id);
                self.handed.push_back(Some(q.id));
            }
        }
    }

    fn sent(&mut self, pkid: u16) {
        if let Some(Some(id)) = self.handed.pop_front() {
            self.by_pkid.insert(pkid, id);
        }
    }

    fn acknowledged(&mut self, pkid: u16, out: &dyn Outbound) {
        if let Some(id) = self.by_pkid.remove(&pkid) {
            out.acknowledged(id);
            if self.in_flight == Some(id) {
                self.in_flight = None;
            }
        }
    }
}

/// Sleeps `delay`; true if shutdown was requested meanwhile.
async fn wait(shutdown: &mut watch::Receiver<bool>, delay: Option<Duration>) -> bool {
    let delay = delay.unwrap_or(Duration::from_secs(30));
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = shutdown.changed() => true,
    }
}

fn handle(topic: &str, payload: &[u8], directed: bool, sink: &dyn EventSink, metrics: &Metrics) {
    match ChangeMessage::parse(payload) {
        Ok(message) => {
            // The sink counts accepted and refused events itself.
            let _ = sink.deliver(message.into_event(Source::Mqtt, directed));
        }
        Err(e) => {
            metrics.trigger("mqtt", "malformed");
            tracing::warn!(%topic, "MQTT message dropped: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker_url("mqtts://broker.example.com:8883"),
            Ok(("broker.example.com".into(), 8883, true))
        );
        assert_eq!(
            parse_broker_url("mqtt://10.0.0.1"),
            Ok(("10.0.0.1".into(), 1883, false))
        );
        assert_eq!(parse_broker_url("mqtts://b"), Ok(("b".into(), 8883, true)));
        assert!(parse_broker_url("tcp://b:1883").is_err());
        assert!(parse_broker_url("mqtt://b:notaport").is_err());
        assert!(parse_broker_url("mqtt://").is_err());
    }

    #[test]
    fn node_topics_are_directed() {
        let cfg: MqttConfig = toml::from_str("url = \"mqtt://b\"").unwrap();
        let subs = subscriptions(&cfg, "edge-01");
        assert_eq!(subs[0].filter, "edgesync/changes");
        assert!(!subs[0].directed);
        assert_eq!(subs[1].filter, "edgesync/nodes/edge-01/sync");
        assert!(subs[1].directed);
    }
}
