//! Trigger stage: everything that can wake the agent (poll timer, MQTT, Git webhooks) turns
//! what it hears into an [`Event`] and hands it to an [`EventSink`] (the scheduler), which
//! only ever maps it onto repositories and apps that are already configured.

pub(crate) mod mqtt;
pub(crate) mod watch;
pub(crate) mod webhook;

use serde::Deserialize;

/// Largest MQTT payload or webhook body we parse as a change message.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Mqtt,
    Webhook(&'static str),
    Watch,
}

impl Source {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Source::Mqtt => "mqtt",
            Source::Webhook(provider) => provider,
            Source::Watch => "watch",
        }
    }
}

/// "Something changed": the agent should look at these repositories and apps now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    pub(crate) source: Source,
    /// The repository, as the sender wrote its URL (a push names several forms of one URL:
    /// clone, ssh, web). Empty means every repository.
    pub(crate) repos: Vec<String>,
    /// Branch or ref that moved, when the sender says; only apps tracking it are synced.
    pub(crate) branch: Option<String>,
    /// App names; empty means every app of the repository.
    pub(crate) apps: Vec<String>,
    /// Addressed to this node alone: no fetch jitter.
    pub(crate) directed: bool,
}

/// Why the sink did not act on an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) reason: String,
    /// Short label for metrics.
    pub(crate) label: &'static str,
}

/// Where triggers deliver events. Delivery must be quick and never block: the scheduler only
/// records the request.
pub(crate) trait EventSink: Send + Sync {
    fn deliver(&self, event: Event) -> Result<(), Refused>;
}

/// Where the MQTT subscriber hands the fleet hub's rollout gates (`[gates]`), which the daemon
/// verifies and keeps. Quick and never blocking, like [`EventSink`].
pub(crate) trait GateSink: Send + Sync {
    /// The topic filter gates arrive on (`<topic>/+`).
    fn filter(&self) -> &str;
    /// A message on that filter: the app is the topic's last level.
    fn gate(&self, topic: &str, payload: &[u8]);
}

/// The change message on MQTT and the generic webhook: every field optional, an empty
/// payload meaning "refresh everything". Unknown fields are ignored for forward compatibility.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ChangeMessage {
    pub(crate) repo: Option<String>,
    pub(crate) revision: Option<String>,
    #[serde(default)]
    pub(crate) apps: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MessageError {
    #[error("payload is {0} bytes, more than {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("payload is not a JSON change message: {0}")]
    Invalid(String),
}

impl ChangeMessage {
    pub(crate) fn parse(payload: &[u8]) -> Result<ChangeMessage, MessageError> {
        if payload.len() > MAX_MESSAGE_BYTES {
            return Err(MessageError::TooLarge(payload.len()));
        }
        if payload.iter().all(u8::is_ascii_whitespace) {
            return Ok(ChangeMessage::default());
        }
        serde_json::from_slice(payload).map_err(|e| MessageError::Invalid(e.to_string()))
    }

    pub(crate) fn into_event(self, source: Source, directed: bool) -> Event {
        Event {
            source,
            repos: self.repo.into_iter().collect(),
            // A SHA names no branch; the round resolves every app's revision anyway.
            branch: self
                .revision
                .filter(|r| !crate::model::url::is_commit_sha(r)),
            apps: self.apps,
            directed,
        }
    }
}

/// Reduces a Git URL to `host/path` so that the https, ssh and scp-like forms of one
/// repository compare equal: no scheme, user, port, trailing `/` or `.git`; lowercase.
pub(crate) fn repo_key(url: &str) -> String {
    let url = url.trim();
    let rest = match url.split_once("://") {
        Some((_, rest)) => rest,
        None if crate::config::is_scp_like(url) => url,
        None => url,
    };
    let (authority, path) = if url.contains("://") {
        rest.split_once('/').unwrap_or((rest, ""))
    } else {
        // scp-like: user@host:path
        rest.split_once(':').unwrap_or((rest, ""))
    };
    let host = authority.rsplit('@').next().unwrap_or(authority);
    let host = host.split(':').next().unwrap_or(host);
    let path = path.trim_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    format!("{host}/{path}").to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_ssh_and_scp_forms_match() {
        let forms = [
            "https://github.com/Org/Fleet.git",
            "https://github.com/org/fleet",
            "https://token@github.com/org/fleet/",
            "ssh://git@github.com:22/org/fleet.git",
            "git@github.com:org/fleet.git",
            "http://github.com:80/org/fleet",
        ];
        for f in forms {
            assert_eq!(repo_key(f), "github.com/org/fleet", "{f}");
        }
        assert_ne!(
            repo_key("https://github.com/org/fleet2"),
            repo_key(forms[0])
        );
        assert_eq!(repo_key("file:///srv/git/fleet.git"), "/srv/git/fleet");
    }

    #[test]
    fn messages_parse_and_reject() {
        assert!(ChangeMessage::parse(b"").unwrap().repo.is_none());
        let m = ChangeMessage::parse(br#"{"repo":"x","revision":"main","apps":["a"],"extra":1}"#)
            .unwrap();
        assert_eq!(m.apps, ["a"]);
        assert!(matches!(
            ChangeMessage::parse(b"{not json"),
            Err(MessageError::Invalid(_))
        ));
        assert!(matches!(
            ChangeMessage::parse(b"[1,2]"),
            Err(MessageError::Invalid(_))
        ));
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            ChangeMessage::parse(&big),
            Err(MessageError::TooLarge(_))
        ));
    }
}
