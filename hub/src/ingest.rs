//! What arrives from the broker, checked: the topic names the node and the kind of message, the
//! payload is the agent's JSON with its envelope (`node`, `seq`, `timestamp`). Anything else is
//! refused with the topic in the error, never the payload (it may hold a secret by mistake).

use serde_json::Value;

/// Largest payload read; an agent's app document is a few KiB.
pub const MAX_PAYLOAD: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Node {
        node: String,
        seq: u64,
        timestamp: u64,
        body: Value,
    },
    App {
        node: String,
        app: String,
        seq: u64,
        timestamp: u64,
        body: Value,
    },
    Event {
        node: String,
        seq: u64,
        timestamp: u64,
        app: String,
        event: String,
        revision: Option<String>,
        message: String,
    },
    Online {
        node: String,
        online: bool,
    },
}

impl Message {
    pub fn node(&self) -> &str {
        match self {
            Message::Node { node, .. }
            | Message::App { node, .. }
            | Message::Event { node, .. }
            | Message::Online { node, .. } => node,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IngestError {
    #[error("{topic}: not a topic of the status prefix {prefix}")]
    Topic { topic: String, prefix: String },
    #[error("{topic}: payload of {size} bytes is over {MAX_PAYLOAD}")]
    TooLarge { topic: String, size: usize },
    #[error("{topic}: payload is not a JSON object: {reason}")]
    Payload { topic: String, reason: String },
    #[error("{topic}: field {field} is missing or of the wrong type")]
    Field { topic: String, field: &'static str },
    #[error("{topic}: the payload says node {claimed:?}, the topic another")]
    NodeMismatch { topic: String, claimed: String },
}

/// Topic layout of one status prefix, as the agents' `[mqtt] status_prefix` (with `{node}`).
#[derive(Debug, Clone)]
pub struct Topics {
    before: String,
    after: String,
    pattern: String,
}

impl Topics {
    pub fn new(pattern: &str) -> Topics {
        let pattern = pattern.trim_end_matches('/');
        let (before, after) = pattern.split_once("{node}").unwrap_or((pattern, ""));
        Topics {
            before: before.to_string(),
            after: after.to_string(),
            pattern: pattern.to_string(),
        }
    }

    /// The subscription filters for every node under this prefix (shared by `group` when
    /// given, MQTT 5 `$share/<group>/...`).
    pub fn filters(&self, group: Option<&str>) -> Vec<String> {
        let base = format!("{}+{}", self.before, self.after);
        ["status", "apps/+", "events", "online"]
            .iter()
            .map(|leaf| match group {
                Some(g) => format!("$share/{g}/{base}/{leaf}"),
                None => format!("{base}/{leaf}"),
            })
            .collect()
    }

    /// The retained documents' filters, not shared: brokers send retained messages to a new
    /// plain subscription, not to a shared one, so a hub subscribes to these for a while after
    /// each connect to read every node's last documents.
    pub fn retained_filters(&self) -> Vec<String> {
        let base = format!("{}+{}", self.before, self.after);
        ["status", "apps/+", "online"]
            .iter()
            .map(|leaf| format!("{base}/{leaf}"))
            .collect()
    }

    /// Checks and reads one message.
    pub fn parse(&self, topic: &str, payload: &[u8]) -> Result<Message, IngestError> {
        let bad_topic = || IngestError::Topic {
            topic: topic.to_string(),
            prefix: self.pattern.clone(),
        };
        let rest = topic.strip_prefix(&self.before).ok_or_else(bad_topic)?;
        let (node, rest) = rest.split_once('/').ok_or_else(bad_topic)?;
        let rest = format!("/{rest}");
        let leaf = rest
            .strip_prefix(&self.after)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(bad_topic)?;
        if !valid_name(node) {
            return Err(bad_topic());
        }
        if payload.len() > MAX_PAYLOAD {
            return Err(IngestError::TooLarge {
                topic: topic.to_string(),
                size: payload.len(),
            });
        }
        let node = node.to_string();
        if leaf == "online" {
            let online = matches!(payload, b"true" | b"1" | b"online");
            return Ok(Message::Online { node, online });
        }
        let body: Value = serde_json::from_slice(payload).map_err(|e| IngestError::Payload {
            topic: topic.to_string(),
            reason: format!("line {}, column {}", e.line(), e.column()),
        })?;
        if !body.is_object() {
            return Err(IngestError::Payload {
                topic: topic.to_string(),
                reason: "not an object".into(),
            });
        }
        let field = |field: &'static str| IngestError::Field {
            topic: topic.to_string(),
            field,
        };
        let num = |name: &'static str| body.get(name).and_then(Value::as_u64).ok_or(field(name));
        let text = |name: &'static str| {
            body.get(name)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or(field(name))
        };
        let claimed = text("node")?;
        if claimed != node {
            return Err(IngestError::NodeMismatch {
                topic: topic.to_string(),
                claimed,
            });
        }
        let (seq, timestamp) = (num("seq")?, num("timestamp")?);
        match leaf {
            "status" => Ok(Message::Node {
                node,
                seq,
                timestamp,
                body,
            }),
            "events" => Ok(Message::Event {
                node,
                seq,
                timestamp,
                app: text("app")?,
                event: text("event")?,
                revision: body
                    .get("revision")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                message: text("message").unwrap_or_default(),
            }),
            _ => {
                let app = leaf
                    .strip_prefix("apps/")
                    .filter(|a| valid_name(a))
                    .ok_or_else(bad_topic)?;
                if body.get("app").and_then(Value::as_str) != Some(app) {
                    return Err(field("app"));
                }
                Ok(Message::App {
                    node,
                    app: app.to_string(),
                    seq,
                    timestamp,
                    body,
                })
            }
        }
    }
}

/// A node or app name as a topic level: not empty, no wildcard or separator, at most 253 bytes
/// (a Kubernetes name).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.contains(['/', '+', '#'])
        && !name.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Topics {
        Topics::new("edgesync/nodes/{node}")
    }

    #[test]
    fn each_kind_of_message_is_read_from_its_topic() {
        let t = topics();
        let doc = br#"{"node":"n1","seq":7,"timestamp":100,"apps":[]}"#;
        assert!(matches!(
            t.parse("edgesync/nodes/n1/status", doc),
            Ok(Message::Node { seq: 7, .. })
        ));
        let app = br#"{"node":"n1","seq":8,"timestamp":100,"app":"web","sync":"Synced"}"#;
        assert!(
            matches!(t.parse("edgesync/nodes/n1/apps/web", app), Ok(Message::App { ref app, .. }) if app == "web")
        );
        let event = br#"{"node":"n1","seq":3,"timestamp":100,"app":"web","event":"sync_succeeded","revision":"abc","message":""}"#;
        assert!(matches!(
            t.parse("edgesync/nodes/n1/events", event),
            Ok(Message::Event { seq: 3, .. })
        ));
        assert_eq!(
            t.parse("edgesync/nodes/n1/online", b"false"),
            Ok(Message::Online {
                node: "n1".into(),
                online: false
            })
        );
        assert_eq!(
            t.filters(Some("hub")),
            [
                "$share/hub/edgesync/nodes/+/status",
                "$share/hub/edgesync/nodes/+/apps/+",
                "$share/hub/edgesync/nodes/+/events",
                "$share/hub/edgesync/nodes/+/online"
            ]
        );
        assert_eq!(
            t.retained_filters(),
            [
                "edgesync/nodes/+/status",
                "edgesync/nodes/+/apps/+",
                "edgesync/nodes/+/online"
            ]
        );
    }

    #[test]
    fn hostile_messages_are_refused_naming_the_topic_not_the_payload() {
        let t = topics();
        let other = br#"{"node":"n2","seq":1,"timestamp":1}"#;
        assert!(matches!(
            t.parse("edgesync/nodes/n1/status", other),
            Err(IngestError::NodeMismatch { .. })
        ));
        let secret = br#"{"node":"n1","seq":"hunter2","timestamp":1}"#;
        let e = t.parse("edgesync/nodes/n1/status", secret).unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(matches!(
            t.parse("elsewhere/n1/status", b"{}"),
            Err(IngestError::Topic { .. })
        ));
        assert!(matches!(
            t.parse("edgesync/nodes/n1/apps/", b"{}"),
            Err(IngestError::Topic { .. }) | Err(IngestError::Field { .. })
        ));
        let big = vec![b' '; MAX_PAYLOAD + 1];
        assert!(matches!(
            t.parse("edgesync/nodes/n1/status", &big),
            Err(IngestError::TooLarge { .. })
        ));
        assert!(matches!(
            t.parse("edgesync/nodes/n1/status", b"[1]"),
            Err(IngestError::Payload { .. })
        ));
        let wrong_app = br#"{"node":"n1","seq":8,"timestamp":1,"app":"api"}"#;
        assert!(matches!(
            t.parse("edgesync/nodes/n1/apps/web", wrong_app),
            Err(IngestError::Field { field: "app", .. })
        ));
    }
}
