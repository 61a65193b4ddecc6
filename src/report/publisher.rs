//! MQTT status upstream: retained documents per node and per app, and ordered events, all
//! numbered per node, queued in the [`Outbox`] so nothing is lost while the broker is away.
//! The MQTT connection itself (shared with the trigger) drains the queue through
//! [`Outbound`].

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Notify;

use super::outbox::{Limits, Message, Outbox, OutboxError};
use super::status::{AppStatus, NodeStatus, Upstream, UpstreamSender, SCHEMA_VERSION};
use crate::config::MqttConfig;
use crate::metrics::Metrics;
use crate::state::unix_now;
use crate::trigger::mqtt::{Outbound, Queued};

/// Sequence counters, persisted so numbers keep growing across restarts. Events and
/// documents are numbered separately, so consecutive event numbers show nothing was lost.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Sequence {
    events: u64,
    documents: u64,
}

pub(crate) struct Topics {
    pub(crate) status: String,
    pub(crate) apps: String,
    pub(crate) events: String,
    pub(crate) online: String,
}

impl Topics {
    pub(crate) fn new(prefix: &str, node: &str) -> Topics {
        let prefix = prefix.replace("{node}", node);
        let prefix = prefix.trim_end_matches('/');
        Topics {
            status: format!("{prefix}/status"),
            apps: format!("{prefix}/apps"),
            events: format!("{prefix}/events"),
            online: format!("{prefix}/online"),
        }
    }
}

pub(crate) struct StatusPublisher {
    node: String,
    topics: Topics,
    outbox: Mutex<Outbox>,
    sequence: Mutex<Sequence>,
    sequence_path: std::path::PathBuf,
    wake: Notify,
    metrics: Arc<Metrics>,
}

impl StatusPublisher {
    pub(crate) fn open(
        state_dir: &Path,
        node: &str,
        mqtt: &MqttConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<StatusPublisher>, OutboxError> {
        let dir = state_dir.join("outbox");
        let outbox = Outbox::open(
            &dir,
            Limits {
                max_messages: mqtt.queue_max_messages,
                max_bytes: mqtt.queue_max_bytes,
            },
        )?;
        for _ in 0..outbox.set_aside {
            metrics.error(crate::metrics::ErrorKind::OutboxCorrupt);
        }
        let sequence_path = state_dir.join("outbox-sequence.json");
        let sequence = std::fs::read(&sequence_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        metrics.set_status_queue_depth(outbox.len());
        Ok(Arc::new(StatusPublisher {
            node: node.to_string(),
            topics: Topics::new(&mqtt.status_prefix, node),
            outbox: Mutex::new(outbox),
            sequence: Mutex::new(sequence),
            sequence_path,
            wake: Notify::new(),
            metrics,
        }))
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_seq(&self, event: bool) -> u64 {
        let mut seq = self.sequence.lock().unwrap_or_else(|e| e.into_inner());
        let n = if event {
            seq.events += 1;
            seq.events
        } else {
            seq.documents += 1;
            seq.documents
        };
        if let Ok(bytes) = serde_json::to_vec(&*seq) {
            let tmp = self.sequence_path.with_extension("tmp");
            if std::fs::write(&tmp, bytes)
                .and_then(|_| std::fs::rename(&tmp, &self.sequence_path))
                .is_err()
            {
                self.metrics
                    .error(crate::metrics::ErrorKind::StatusSequence);
            }
        }
        n
    }

    fn queue(&self, topic: String, payload: serde_json::Value, retain: bool) {
        let result = {
            let mut outbox = self.outbox();
            let result = outbox.push(Message {
                topic,
                payload: payload.to_string(),
                retain,
            });
            self.metrics.set_status_queue_depth(outbox.len());
            result
        };
        match result {
            Ok(0) => {}
            Ok(dropped) => {
                self.metrics.status_dropped(dropped);
                tracing::warn!(dropped, "status outbox full: oldest events dropped");
            }
            Err(e) => {
                self.metrics.error(crate::metrics::ErrorKind::StatusOutbox);
                tracing::error!("{e}");
            }
        }
        self.wake.notify_one();
    }

    fn envelope(&self, seq: u64, mut body: serde_json::Value) -> serde_json::Value {
        if let Some(map) = body.as_object_mut() {
            map.insert("schema_version".into(), json!(SCHEMA_VERSION));
            map.insert("node".into(), json!(self.node));
            map.insert("seq".into(), json!(seq));
            map.insert("timestamp".into(), json!(unix_now()));
        }
        body
    }

    /// An event (`sync_started`, `sync_succeeded`, `sync_failed`, ...): not retained, QoS 1.
    pub(crate) fn event(&self, app: &str, event: &str, revision: Option<&str>, message: &str) {
        let seq = self.next_seq(true);
        let body = json!({"app": app, "event": event, "revision": revision, "message": message});
        self.queue(self.topics.events.clone(), self.envelope(seq, body), false);
    }

    /// The retained document of one app.
    pub(crate) fn app(&self, status: &AppStatus) {
        let seq = self.next_seq(false);
        let body = serde_json::to_value(status).unwrap_or_default();
        let topic = format!("{}/{}", self.topics.apps, status.app);
        self.queue(topic, self.envelope(seq, body), true);
    }

    /// The node's retained summary document.
    pub(crate) fn node(&self, status: &NodeStatus) {
        let seq = self.next_seq(false);
        let body = serde_json::to_value(status).unwrap_or_default();
        self.queue(self.topics.status.clone(), self.envelope(seq, body), true);
    }
}

/// Starts the thread that writes what the status board reports into `publisher`'s outbox, in
/// order, off the async workers (the outbox syncs files). It ends when the board is gone.
pub(crate) fn forward(publisher: Arc<StatusPublisher>) -> UpstreamSender {
    let (tx, rx) = std::sync::mpsc::channel::<Upstream>();
    let spawned = std::thread::Builder::new()
        .name("status-outbox".into())
        .spawn(move || {
            for update in rx {
                match update {
                    Upstream::App(status) => publisher.app(&status),
                    Upstream::Node(status) => publisher.node(&status),
                    Upstream::Event {
                        app,
                        event,
                        revision,
                        message,
                    } => publisher.event(&app, &event, revision.as_deref(), &message),
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the status outbox thread; status is not published: {e}");
    }
    tx
}

impl Outbound for StatusPublisher {
    fn online_topic(&self) -> &str {
        &self.topics.online
    }

    fn front(&self) -> Option<Queued> {
        self.outbox().front().map(|(id, m)| Queued {
            id,
            topic: m.topic.clone(),
            payload: m.payload.clone().into_bytes(),
            retain: m.retain,
        })
    }

    fn acknowledged(&self, id: u64) {
        let mut outbox = self.outbox();
        outbox.acknowledged(id);
        self.metrics.set_status_queue_depth(outbox.len());
    }

    fn wake(&self) -> &Notify {
        &self.wake
    }
}
