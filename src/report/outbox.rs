//! Store and forward: status messages wait here, on disk under `state_dir/outbox`, until the
//! broker has acknowledged them. One file per message, named by its position, written
//! atomically; a restart resumes with what was not yet sent.
//!
//! Bounded by count and bytes: when full, the oldest events are dropped first (and counted).
//! Retained status documents are not events: a newer document for the same topic replaces
//! the queued one, so there is never more than one per topic.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Queue positions stay below this (2^53: more messages than a node will ever queue). A file
/// named with a bigger one is not the outbox's, and would overflow the next position.
const MAX_POSITION: u64 = 1 << 53;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Message {
    pub(crate) topic: String,
    pub(crate) payload: String,
    /// Retained messages are status documents; the others are events.
    pub(crate) retain: bool,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_messages: usize,
    pub(crate) max_bytes: usize,
}

#[derive(Debug)]
struct Entry {
    position: u64,
    bytes: usize,
    message: Message,
}

#[derive(Debug, thiserror::Error)]
#[error("status outbox {path}: {source}")]
pub(crate) struct OutboxError {
    path: PathBuf,
    source: std::io::Error,
}

#[derive(Debug)]
pub(crate) struct Outbox {
    dir: PathBuf,
    limits: Limits,
    entries: VecDeque<Entry>,
    bytes: usize,
    next_position: u64,
    /// Files found unreadable at open (empty or cut short by a power cut) and set aside.
    pub(crate) set_aside: usize,
}

impl Outbox {
    /// Opens the outbox, loading what an earlier run left. Unreadable files are set aside.
    pub(crate) fn open(dir: &Path, limits: Limits) -> Result<Outbox, OutboxError> {
        let err = |source| OutboxError {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
            .map_err(err)?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let position: u64 = name.strip_suffix(".json")?.parse().ok()?;
                (position < MAX_POSITION).then(|| (position, e.path()))
            })
            .collect();
        found.sort();
        let mut outbox = Outbox {
            dir: dir.to_path_buf(),
            limits,
            entries: VecDeque::new(),
            bytes: 0,
            next_position: found.last().map_or(0, |(p, _)| p + 1),
            set_aside: 0,
        };
        for (position, path) in found {
            let parsed = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Message>(&bytes).ok());
            match parsed {
                Some(message) => {
                    let bytes = message.payload.len() + message.topic.len();
                    outbox.bytes += bytes;
                    outbox.entries.push_back(Entry {
                        position,
                        bytes,
                        message,
                    });
                }
                None => {
                    tracing::warn!(path = %path.display(), "unreadable queued status message set aside");
                    let _ = std::fs::rename(&path, path.with_extension("corrupt"));
                    outbox.set_aside += 1;
                }
            }
        }
        Ok(outbox)
    }

    fn path(&self, position: u64) -> PathBuf {
        self.dir.join(format!("{position:020}.json"))
    }

    /// Queues `message`. Returns how many queued messages had to be dropped to make room.
    pub(crate) fn push(&mut self, message: Message) -> Result<usize, OutboxError> {
        if message.retain {
            let stale: Vec<u64> = self
                .entries
                .iter()
                .filter(|e| e.message.retain && e.message.topic == message.topic)
                .map(|e| e.position)
                .collect();
            for position in stale {
                self.remove(position);
            }
        }
        let position = self.next_position;
        self.next_position += 1;
        let path = self.path(position);
        let err = |source| OutboxError {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec(&message).map_err(|e| err(std::io::Error::other(e)))?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(err)?;
        tmp.write_all(&bytes).map_err(err)?;
        tmp.as_file().sync_data().map_err(err)?;
        tmp.persist(&path).map_err(|e| err(e.error))?;
        let size = message.payload.len() + message.topic.len();
        self.bytes += size;
        self.entries.push_back(Entry {
            position,
            bytes: size,
            message,
        });
        Ok(self.enforce_limits())
    }

    /// Drops the oldest events (then, if still needed, the oldest documents) until within
    /// limits. The newest message is always kept.
    fn enforce_limits(&mut self) -> usize {
        let mut dropped = 0;
        while self.entries.len() > 1
            && (self.entries.len() > self.limits.max_messages || self.bytes > self.limits.max_bytes)
        {
            let newest = self.entries.back().map(|e| e.position);
            let victim = self
                .entries
                .iter()
                .find(|e| !e.message.retain && Some(e.position) != newest)
                .or_else(|| self.entries.iter().find(|e| Some(e.position) != newest))
                .map(|e| e.position);
            match victim {
                Some(position) => {
                    self.remove(position);
                    dropped += 1;
                }
                None => break,
            }
        }
        dropped
    }

    fn remove(&mut self, position: u64) {
        if let Some(i) = self.entries.iter().position(|e| e.position == position) {
            if let Some(entry) = self.entries.remove(i) {
                self.bytes -= entry.bytes;
            }
            let _ = std::fs::remove_file(self.path(position));
        }
    }

    /// The oldest message, to send next.
    pub(crate) fn front(&self) -> Option<(u64, &Message)> {
        self.entries.front().map(|e| (e.position, &e.message))
    }

    /// Forgets a message once the broker has acknowledged it.
    pub(crate) fn acknowledged(&mut self, position: u64) {
        self.remove(position);
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: usize) -> Message {
        Message {
            topic: "n/events".into(),
            payload: format!("{{\"seq\":{n}}}"),
            retain: false,
        }
    }

    fn status(topic: &str, v: &str) -> Message {
        Message {
            topic: topic.into(),
            payload: v.into(),
            retain: true,
        }
    }

    const ROOMY: Limits = Limits {
        max_messages: 1000,
        max_bytes: 1 << 20,
    };

    #[test]
    fn empty_and_truncated_files_are_set_aside_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_messages: 10,
            max_bytes: 1 << 20,
        };
        let mut outbox = Outbox::open(dir.path(), limits).unwrap();
        for i in 0..3 {
            outbox
                .push(Message {
                    topic: format!("t/{i}"),
                    payload: "{\"n\": 1}".into(),
                    retain: false,
                })
                .unwrap();
        }
        let mut files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        std::fs::write(&files[0], "").unwrap();
        let text = std::fs::read(&files[1]).unwrap();
        std::fs::write(&files[1], &text[..text.len() / 2]).unwrap();
        let reopened = Outbox::open(dir.path(), limits).unwrap();
        assert_eq!(reopened.set_aside, 2);
        assert_eq!(reopened.entries.len(), 1);
        assert_eq!(reopened.entries[0].message.topic, "t/2");
    }

    #[test]
    fn messages_survive_a_restart_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(tmp.path(), ROOMY).unwrap();
        for n in 0..3 {
            o.push(event(n)).unwrap();
        }
        let (first, _) = o.front().unwrap();
        o.acknowledged(first);
        drop(o);
        let mut o = Outbox::open(tmp.path(), ROOMY).unwrap();
        assert_eq!(o.len(), 2);
        assert_eq!(o.front().unwrap().1, &event(1));
        o.push(event(3)).unwrap();
        let order: Vec<_> = o
            .entries
            .iter()
            .map(|e| e.message.payload.clone())
            .collect();
        assert_eq!(
            order,
            [event(1).payload, event(2).payload, event(3).payload]
        );
    }

    #[test]
    fn a_newer_status_document_replaces_the_queued_one() {
        let tmp = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(tmp.path(), ROOMY).unwrap();
        o.push(status("n/status", "old")).unwrap();
        o.push(event(1)).unwrap();
        o.push(status("n/apps/a", "a1")).unwrap();
        o.push(status("n/status", "new")).unwrap();
        let queued: Vec<_> = o
            .entries
            .iter()
            .map(|e| e.message.payload.as_str())
            .collect();
        assert_eq!(queued, ["{\"seq\":1}", "a1", "new"]);
    }

    #[test]
    fn when_full_the_oldest_events_go_first_and_are_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_messages: 3,
            max_bytes: 1 << 20,
        };
        let mut o = Outbox::open(tmp.path(), limits).unwrap();
        assert_eq!(o.push(status("n/status", "doc")).unwrap(), 0);
        let mut dropped = 0;
        for n in 0..5 {
            dropped += o.push(event(n)).unwrap();
        }
        let queued: Vec<_> = o
            .entries
            .iter()
            .map(|e| e.message.payload.as_str())
            .collect();
        assert_eq!(queued, ["doc", "{\"seq\":3}", "{\"seq\":4}"]);
        assert_eq!(dropped, 3);
        let files = std::fs::read_dir(tmp.path()).unwrap().count();
        assert_eq!(files, 3);
    }

    #[test]
    fn byte_limit_applies_too() {
        let tmp = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_messages: 100,
            max_bytes: 40,
        };
        let mut o = Outbox::open(tmp.path(), limits).unwrap();
        for n in 0..10 {
            o.push(event(n)).unwrap();
        }
        assert!(o.bytes <= 40, "{}", o.bytes);
        assert_eq!(o.front().unwrap().1, &event(8));
    }
}
