//! Ingest from the broker: an MQTT 5 session that survives the hub's restarts (clean start off,
//! a session expiry), the status topics of every node under shared subscriptions (several hub
//! replicas split the load), each message acknowledged only once it is in the store, so a hub
//! that stops mid-way gets it again. Messages that have arrived together are recorded in one
//! transaction (up to [`MAX_BATCH`]): one database sync for a burst, not one per message.
//!
//! A broker need not send retained messages to a shared subscription (MQTT 5 sends none to a
//! session joining an existing one; Mosquitto 2.0 sends them to a new one), so after each
//! connect the hub also subscribes plainly to the retained documents (node, apps, online)
//! until their replay has gone quiet: a hub with an empty database sees a fleet at rest at
//! once. Meanwhile a live message matches both subscriptions; the replay's copy is told apart
//! by its subscription identifier and left out (`live_copies`). A retained document that
//! comes through both is stored once (documents are kept by their number and time).
//!
//! Rollouts move on a one-second tick, not on each message: a tick steps every app a report
//! came in for since the last one, and every rollout still progressing (a bake time may have
//! passed with no report at all). Reading an app's nodes once per tick rather than once per
//! message keeps a 10,000-node fleet's stream of reports from costing a read of every node's
//! row each, and a spent failure budget still halts within a second or two.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Packet, Publish, SubscribeProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::watch;

use crate::gates::{Driver, Outgoing};
use crate::ingest::{Message, Topics};
use crate::rollout::Rollout;
use crate::store::{Recorded, Store};
use crate::unix_now;

/// How often rollouts are stepped.
const STEP_EVERY: Duration = Duration::from_secs(1);

/// Most messages recorded in one transaction.
const MAX_BATCH: usize = 512;

/// The plain subscriptions that replay retained documents stay at least this long after a
/// connect, and until no retained message has come for [`REPLAY_QUIET`].
const REPLAY_AT_LEAST: Duration = Duration::from_secs(10);
const REPLAY_QUIET: Duration = Duration::from_secs(5);
/// After a start, by then the replay of retained documents has usually gone quiet.
pub const REPLAY_SETTLES: Duration = REPLAY_AT_LEAST.saturating_add(REPLAY_QUIET);

/// How long the broker keeps the hub's session (and queues its QoS 1 messages) while it is
/// away, unless `[mqtt] session_expiry` says otherwise.
pub const DEFAULT_SESSION_EXPIRY: Duration = Duration::from_secs(24 * 3600);

pub struct IngestConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub topics: Topics,
    /// Shared subscription group; `None` subscribes plainly (one hub).
    pub group: Option<String>,
    /// TLS to the broker (`None`: plain TCP).
    pub tls: Option<rumqttc::TlsConfiguration>,
    /// User name and password.
    pub credentials: Option<(String, String)>,
    /// How long the broker keeps the session while the hub is away.
    pub session_expiry: Duration,
}

/// What ingest has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct Counts {
    pub stored: u64,
    pub duplicates: u64,
    pub stale: u64,
    pub gaps: u64,
    pub refused: u64,
    /// Rounds of the fleet repository that failed or were refused.
    pub fleet_errors: u64,
}

/// The hub's MQTT client (publishing gates) and the event loop [`run`] drives.
pub fn client(config: &IngestConfig) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
    options
        .set_clean_start(false)
        .set_session_expiry_interval(Some(
            u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX),
        ))
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(30));
    if let Some(tls) = &config.tls {
        options.set_transport(rumqttc::Transport::tls_with_config(tls.clone()));
    }
    if let Some((user, password)) = &config.credentials {
        options.set_credentials(user, password);
    }
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

/// Aborts the event loop's task when `run` returns.
struct Poller(tokio::task::JoinHandle<()>);

impl Drop for Poller {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Polls the MQTT event loop in a task of its own, forwarding every event, and waits after a
/// connection error (200 ms, doubling to 30 s; back to 200 ms once connected). A poll is never
/// cancelled half way: one dropped while it writes an acknowledgement loses it, and the broker
/// stops sending once its window of unacknowledged messages is full.
fn poll_forever(
    mut events: EventLoop,
) -> (
    Poller,
    tokio::sync::mpsc::UnboundedReceiver<Result<Event, rumqttc::v5::ConnectionError>>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut delay = Duration::from_millis(200);
        loop {
            let event = events.poll().await;
            let failed = event.is_err();
            if matches!(event, Ok(Event::Incoming(Packet::ConnAck(_)))) {
                delay = Duration::from_millis(200);
            }
            if tx.send(event).is_err() {
                return;
            }
            if failed {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    });
    (Poller(task), rx)
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: IngestConfig,
    client: AsyncClient,
    events: EventLoop,
    store: Arc<Mutex<Store>>,
    counts: Arc<Mutex<Counts>>,
    driver: Option<Arc<Mutex<Driver>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let filters = config.topics.filters(config.group.as_deref());
    let (_poller, mut incoming) = poll_forever(events);
    // Apps a report came in for since the last step.
    let mut reported: BTreeSet<String> = BTreeSet::new();
    let mut tick = tokio::time::interval(STEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // An event read while gathering a batch that is not a message: handled next.
    let mut next = None;
    // With a shared subscription, the retained documents come through plain subscriptions
    // made at each connect and dropped once the replay has gone quiet: (when subscribed, the
    // last retained message).
    let mut replay: Option<(Instant, Instant)> = None;
    loop {
        let event = match next.take() {
            Some(event) => event,
            None => tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {
                    if let Some((since, last)) = replay {
                        if since.elapsed() >= REPLAY_AT_LEAST && last.elapsed() >= REPLAY_QUIET {
                            for filter in config.topics.retained_filters() {
                                let _ = client.unsubscribe(filter).await;
                            }
                            replay = None;
                        }
                    }
                    if let Some(driver) = &driver {
                        let apps = std::mem::take(&mut reported);
                        for gate in step_rollouts(&store, driver, apps).await {
                            publish_gate(&client, gate).await;
                        }
                    }
                    continue;
                }
                event = incoming.recv() => match event {
                    Some(event) => event,
                    None => return,
                },
            },
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                // Every connect: a session the broker dropped has no subscriptions left.
                // Subscription identifiers tell the replay's copies of live messages apart
                // (`live_copies`), where the broker has them (MQTT 5 lets it say no).
                let ids = ack
                    .properties
                    .as_ref()
                    .and_then(|p| p.subscription_identifiers_available)
                    != Some(0);
                let mut all: Vec<(String, usize)> =
                    filters.iter().map(|f| (f.clone(), SHARED_ID)).collect();
                if config.group.is_some() {
                    all.extend(
                        config
                            .topics
                            .retained_filters()
                            .into_iter()
                            .map(|f| (f, REPLAY_ID)),
                    );
                    replay = Some((Instant::now(), Instant::now()));
                }
                for (filter, id) in all {
                    let subscribed = if ids {
                        let properties = SubscribeProperties {
                            id: Some(id),
                            user_properties: Vec::new(),
                        };
                        client
                            .subscribe_with_properties(filter.clone(), QoS::AtLeastOnce, properties)
                            .await
                    } else {
                        client.subscribe(filter.clone(), QoS::AtLeastOnce).await
                    };
                    if let Err(e) = subscribed {
                        tracing::warn!(%filter, "cannot subscribe: {e}");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                // Whatever else has arrived already joins it: one transaction for all (a
                // reconnecting fleet's retained documents come by the thousand).
                let mut batch = vec![publish];
                while batch.len() < MAX_BATCH {
                    match incoming.try_recv() {
                        Ok(Ok(Event::Incoming(Packet::Publish(p)))) => batch.push(p),
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if let Some((_, last)) = &mut replay {
                    if batch.iter().any(|p| p.retain) {
                        *last = Instant::now();
                    }
                }
                let batch = live_copies(&client, batch).await;
                if batch.is_empty() {
                    continue;
                }
                let stored = ingest(&config, &client, &store, &counts, batch).await;
                reported.extend(stored);
            }
            Ok(_) => {}
            // The poller waits before it tries again.
            Err(e) => tracing::warn!("broker connection: {e}"),
        }
    }
}

/// Subscription identifiers: the shared (or only) subscriptions, and the plain ones that
/// replay retained documents after a connect.
const SHARED_ID: usize = 1;
const REPLAY_ID: usize = 2;

/// Leaves out, acknowledged, what the replay subscriptions bring that is not a retained
/// document: a live message, which the shared subscription brings too (while the replay lasts
/// every live document came twice, and a 10,000-node burst then cost twice its work).
async fn live_copies(client: &AsyncClient, batch: Vec<Publish>) -> Vec<Publish> {
    let mut kept = Vec::with_capacity(batch.len());
    for publish in batch {
        let ids = publish
            .properties
            .as_ref()
            .map(|p| p.subscription_identifiers.as_slice())
            .unwrap_or_default();
        if !publish.retain && ids.contains(&REPLAY_ID) && !ids.contains(&SHARED_ID) {
            if let Err(e) = client.ack(&publish).await {
                tracing::warn!("cannot acknowledge a replayed copy: {e}");
            }
        } else {
            kept.push(publish);
        }
    }
    kept
}

/// Records a batch of messages (one transaction), acknowledging each, in the order received,
/// once it is stored or refused for good; one that could not be stored is not acknowledged, so
/// the broker sends it again after a reconnect. Returns the apps stored reports are about.
async fn ingest(
    config: &IngestConfig,
    client: &AsyncClient,
    store: &Arc<Mutex<Store>>,
    counts: &Arc<Mutex<Counts>>,
    batch: Vec<Publish>,
) -> Vec<String> {
    let mut received = Vec::with_capacity(batch.len());
    let mut messages = Vec::with_capacity(batch.len());
    for publish in batch {
        let topic = String::from_utf8_lossy(&publish.topic).to_string();
        match config.topics.parse(&topic, &publish.payload) {
            Ok(message) => {
                messages.push(message);
                received.push((publish, topic, true));
            }
            Err(e) => {
                tracing::warn!("refused: {e}");
                counts.lock().unwrap_or_else(|e| e.into_inner()).refused += 1;
                received.push((publish, topic, false));
            }
        }
    }
    let recorded = if messages.is_empty() {
        Vec::new()
    } else {
        let store = store.clone();
        let now = unix_now();
        let done = tokio::task::spawn_blocking(move || {
            let mut db = store.lock().unwrap_or_else(|e| e.into_inner());
            let results = db.record_all(&messages, now);
            messages.into_iter().zip(results).collect::<Vec<_>>()
        })
        .await;
        done.unwrap_or_else(|e| {
            tracing::error!("storing messages failed: {e}");
            Vec::new()
        })
    };
    let mut recorded = recorded.into_iter();
    let mut apps = Vec::new();
    for (publish, topic, parsed) in received {
        if !parsed {
            // Refused for good: acknowledged, or the broker sends it forever.
            let _ = client.ack(&publish).await;
            continue;
        }
        let Some((message, result)) = recorded.next() else {
            continue;
        };
        match result {
            Ok(recorded) => {
                apps.extend(reported_apps(&message, &recorded));
                count(counts, &recorded, &topic);
                let _ = client.ack(&publish).await;
            }
            // Not acknowledged: the broker sends it again after a reconnect.
            Err(e) => tracing::error!(%topic, "cannot store: {e}"),
        }
    }
    apps
}

/// The apps a stored message reports on, for their rollouts.
fn reported_apps(message: &Message, recorded: &Recorded) -> Vec<String> {
    match (message, recorded) {
        (Message::App { app, .. }, Recorded::Stored) => vec![app.clone()],
        (Message::Node { body, .. }, Recorded::Stored) => body
            .get("apps")
            .and_then(|a| a.as_array())
            .into_iter()
            .flatten()
            .filter_map(|a| a.get("app")?.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

fn count(counts: &Mutex<Counts>, recorded: &Recorded, topic: &str) {
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

/// Steps the rollouts of `reported` apps and every progressing one; the gates to publish.
async fn step_rollouts(
    store: &Arc<Mutex<Store>>,
    driver: &Arc<Mutex<Driver>>,
    reported: BTreeSet<String>,
) -> Vec<Outgoing> {
    let (store, driver) = (store.clone(), driver.clone());
    let stepped = tokio::task::spawn_blocking(move || {
        let mut apps = reported;
        let d = driver.lock().unwrap_or_else(|e| e.into_inner());
        // Another replica steps them (crate::lease).
        if !d.leading() {
            return Vec::new();
        }
        apps.extend(
            d.rollouts()
                .filter(|r| r.phase == crate::rollout::Phase::Progressing)
                .map(|r| r.app.clone()),
        );
        drop(d);
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

/// Moves `app`'s rollout on from its nodes' reports; the gate to publish, if new. A changed
/// rollout is saved first, and what happened goes on the timeline.
fn step(db: &mut Store, driver: &Mutex<Driver>, app: &str, now: u64) -> Option<Outgoing> {
    let mut driver = driver.lock().unwrap_or_else(|e| e.into_inner());
    let (before, _) = driver.saved(app)?;
    let views = match db.app_views(app) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(%app, "cannot read the app's nodes for its rollout: {e}");
            return None;
        }
    };
    match driver.observe(app, &views, now) {
        Ok((said, gate)) => {
            if let Some((after, issued)) = driver.saved(app).filter(|(r, _)| *r != before) {
                keep(db, &after, issued, &said, now);
            }
            gate
        }
        Err(e) => {
            tracing::error!(%app, "{e}");
            None
        }
    }
}

/// Saves a rollout that changed and puts what happened to it on the timeline. A failure is
/// logged, and the gate still goes out: a halt must not wait for the database.
pub fn keep(db: &mut Store, rollout: &Rollout, issued: u64, said: &[String], now: u64) {
    let app = rollout.app.as_str();
    if let Err(e) = db.save_rollout(rollout, issued) {
        tracing::error!(%app, "cannot save the rollout (a restarted hub would lose it): {e}");
    }
    for line in said {
        tracing::info!(%app, "{line}");
        if let Err(e) = db.hub_event(app, Some(rollout.revision.as_str()), line, now) {
            tracing::error!(%app, "cannot record the rollout's event: {e}");
        }
    }
}
