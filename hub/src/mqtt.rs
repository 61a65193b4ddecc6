//! Ingest from the broker: an MQTT 5 session that survives the hub's restarts (clean start off,
//! a session expiry), the status topics of every node under shared subscriptions (several hub
//! replicas split the load), each message acknowledged only once it is in the store, so a hub
//! that stops mid-way gets it again.
//!
//! Rollouts move on a one-second tick, not on each message: a tick steps every app a report
//! came in for since the last one, and every rollout still progressing (a bake time may have
//! passed with no report at all). Reading an app's nodes once per tick rather than once per
//! message keeps a 10,000-node fleet's stream of reports from costing a read of every node's
//! row each, and a spent failure budget still halts within a second or two.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::watch;

use crate::gates::{Driver, Outgoing};
use crate::ingest::{Message, Topics};
use crate::store::{Recorded, Store};
use crate::unix_now;

/// How often rollouts are stepped.
const STEP_EVERY: Duration = Duration::from_secs(1);

/// How long the broker keeps the hub's session (and queues its QoS 1 messages) while it is away.
const SESSION_EXPIRY_SECS: u32 = 24 * 3600;

pub struct IngestConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub topics: Topics,
    /// Shared subscription group; `None` subscribes plainly (one hub).
    pub group: Option<String>,
}

/// What ingest has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct Counts {
    pub stored: u64,
    pub duplicates: u64,
    pub stale: u64,
    pub gaps: u64,
    pub refused: u64,
}

/// The hub's MQTT client (publishing gates) and the event loop [`run`] drives.
pub fn client(config: &IngestConfig) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
    options
        .set_clean_start(false)
        .set_session_expiry_interval(Some(SESSION_EXPIRY_SECS))
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(30));
    AsyncClient::new(options, 256)
}

/// Publishes a gate: retained, QoS 1, so a node offline now reads it when it comes back.
pub async fn publish_gate(client: &AsyncClient, gate: Outgoing) {
    if let Err(e) = client
        .publish(gate.topic.clone(), QoS::AtLeastOnce, true, gate.payload)
        .await
    {
        tracing::error!(topic = %gate.topic, "cannot publish the gate: {e}");
    }
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: IngestConfig,
    client: AsyncClient,
    mut events: EventLoop,
    store: Arc<Mutex<Store>>,
    counts: Arc<Mutex<Counts>>,
    driver: Option<Arc<Mutex<Driver>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let filters = config.topics.filters(config.group.as_deref());
    let mut delay = Duration::from_millis(200);
    // Apps a report came in for since the last step.
    let mut reported: BTreeSet<String> = BTreeSet::new();
    let mut tick = tokio::time::interval(STEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {
                if let Some(driver) = &driver {
                    let apps = std::mem::take(&mut reported);
                    for gate in step_rollouts(&store, driver, apps).await {
                        publish_gate(&client, gate).await;
                    }
                }
                continue;
            }
            event = events.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                delay = Duration::from_millis(200);
                // Every connect: a session the broker dropped has no subscriptions left.
                for filter in &filters {
                    if let Err(e) = client.subscribe(filter.clone(), QoS::AtLeastOnce).await {
                        tracing::warn!(%filter, "cannot subscribe: {e}");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let topic = String::from_utf8_lossy(&publish.topic).to_string();
                let parsed = config.topics.parse(&topic, &publish.payload);
                let outcome = match parsed {
                    Ok(message) => {
                        let store = store.clone();
                        let now = unix_now();
                        let done = tokio::task::spawn_blocking(move || {
                            let mut db = store.lock().unwrap_or_else(|e| e.into_inner());
                            let recorded = db.record(&message, now)?;
                            // The apps this message reports on, for their rollouts.
                            let apps: Vec<String> = match (&message, &recorded) {
                                (Message::App { app, .. }, Recorded::Stored) => vec![app.clone()],
                                (Message::Node { body, .. }, Recorded::Stored) => body
                                    .get("apps")
                                    .and_then(|a| a.as_array())
                                    .into_iter()
                                    .flatten()
                                    .filter_map(|a| a.get("app")?.as_str().map(str::to_string))
                                    .collect(),
                                _ => Vec::new(),
                            };
                            Ok::<_, crate::store::StoreError>((recorded, apps))
                        })
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                        match done {
                            Ok((recorded, apps)) => {
                                reported.extend(apps);
                                Ok(recorded)
                            }
                            Err(e) => Err(e),
                        }
                    }
                    Err(e) => {
                        tracing::warn!("refused: {e}");
                        counts.lock().unwrap_or_else(|e| e.into_inner()).refused += 1;
                        // Refused for good: acknowledged, or the broker sends it forever.
                        let _ = client.ack(&publish).await;
                        continue;
                    }
                };
                match outcome {
                    Ok(recorded) => {
                        {
                            let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
                            match recorded {
                                Recorded::Stored | Recorded::Reset => c.stored += 1,
                                Recorded::Duplicate => c.duplicates += 1,
                                Recorded::Stale => c.stale += 1,
                                Recorded::Gap { from, to } => {
                                    c.stored += 1;
                                    c.gaps += 1;
                                    tracing::warn!(%topic, from, to, "events missing from this node");
                                }
                            }
                        }
                        let _ = client.ack(&publish).await;
                    }
                    // Not acknowledged: the broker sends it again after a reconnect.
                    Err(e) => tracing::error!(%topic, "cannot store: {e}"),
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("broker connection: {e}; again in {delay:?}");
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Steps the rollouts of `reported` apps and every progressing one; the gates to publish.
async fn step_rollouts(
    store: &Arc<Mutex<Store>>,
    driver: &Arc<Mutex<Driver>>,
    reported: BTreeSet<String>,
) -> Vec<Outgoing> {
    let (store, driver) = (store.clone(), driver.clone());
    let stepped = tokio::task::spawn_blocking(move || {
        let mut apps = reported;
        apps.extend(
            driver
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .rollouts()
                .filter(|r| r.phase == crate::rollout::Phase::Progressing)
                .map(|r| r.app.clone()),
        );
        let now = unix_now();
        let mut db = store.lock().unwrap_or_else(|e| e.into_inner());
        apps.iter()
            .filter_map(|app| step(&mut db, &driver, app, now))
            .collect::<Vec<_>>()
    })
    .await;
    match stepped {
        Ok(gates) => gates,
        Err(e) => {
            tracing::error!("stepping rollouts failed: {e}");
            Vec::new()
        }
    }
}

/// Moves `app`'s rollout on from its nodes' reports; the gate to publish, if new.
fn step(db: &mut Store, driver: &Mutex<Driver>, app: &str, now: u64) -> Option<Outgoing> {
    let mut driver = driver.lock().unwrap_or_else(|e| e.into_inner());
    if !driver.rollouts().any(|r| r.app == app) {
        return None;
    }
    let views = match db.app_views(app) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(%app, "cannot read the app's nodes for its rollout: {e}");
            return None;
        }
    };
    match driver.observe(app, &views, now) {
        Ok((said, gate)) => {
            for line in said {
                tracing::info!(%app, "{line}");
            }
            gate
        }
        Err(e) => {
            tracing::error!(%app, "{e}");
            None
        }
    }
}
