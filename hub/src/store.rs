//! The fleet's state and history in SQLite: each node's and app's latest document, every event
//! once, and the gaps in each node's event numbers. Redelivered messages (MQTT QoS 1 sends some
//! twice, a persistent session replays) change nothing; a document older than the stored one
//! (a retained copy replayed after a newer) is ignored.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::ingest::Message;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("fleet database: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// What recording a message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    Stored,
    /// Seen before (same node, number and time).
    Duplicate,
    /// A document older than the one stored.
    Stale,
    /// Stored, and events `from..=to` of the node are missing so far.
    Gap {
        from: u64,
        to: u64,
    },
    /// Stored; the node's numbers started again (its state was wiped): gaps are counted anew.
    Reset,
}

pub struct Sqlite {
    conn: Connection,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS nodes (
  node TEXT PRIMARY KEY,
  doc TEXT, doc_seq INTEGER, doc_time INTEGER,
  online INTEGER, last_seen INTEGER NOT NULL,
  event_high INTEGER NOT NULL DEFAULT 0, event_time INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS apps (
  node TEXT NOT NULL, app TEXT NOT NULL,
  doc TEXT NOT NULL, doc_seq INTEGER NOT NULL, doc_time INTEGER NOT NULL,
  revision TEXT, sync TEXT, health TEXT,
  PRIMARY KEY (node, app)
);
CREATE TABLE IF NOT EXISTS events (
  node TEXT NOT NULL, seq INTEGER NOT NULL, time INTEGER NOT NULL,
  app TEXT NOT NULL, event TEXT NOT NULL, revision TEXT, message TEXT NOT NULL,
  PRIMARY KEY (node, seq, time)
);
CREATE TABLE IF NOT EXISTS gaps (
  node TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL, seen INTEGER NOT NULL,
  PRIMARY KEY (node, first)
);
";

impl Sqlite {
    pub fn open(path: &Path) -> Result<Sqlite, StoreError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(SCHEMA)?;
        Ok(Sqlite { conn })
    }

    /// Records one checked message received at `now` (Unix seconds).
    pub fn record(&mut self, message: &Message, now: u64) -> Result<Recorded, StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO nodes (node, last_seen) VALUES (?1, ?2)
             ON CONFLICT (node) DO UPDATE SET last_seen = max(last_seen, ?2)",
            params![message.node(), now],
        )?;
        let recorded = match message {
            Message::Online { node, online } => {
                tx.execute(
                    "UPDATE nodes SET online = ?2 WHERE node = ?1",
                    params![node, online],
                )?;
                Recorded::Stored
            }
            Message::Node {
                node,
                seq,
                timestamp,
                body,
            } => {
                let changed = tx.execute(
                    "UPDATE nodes SET doc = ?2, doc_seq = ?3, doc_time = ?4
                     WHERE node = ?1 AND (doc_seq IS NULL OR doc_time < ?4
                       OR (doc_time = ?4 AND doc_seq < ?3))",
                    params![node, body.to_string(), seq, timestamp],
                )?;
                if changed == 0 {
                    Recorded::Stale
                } else {
                    Recorded::Stored
                }
            }
            Message::App {
                node,
                app,
                seq,
                timestamp,
                body,
            } => {
                let field =
                    |name: &str| body.get(name).and_then(|v| v.as_str()).map(str::to_string);
                let changed = tx.execute(
                    "INSERT INTO apps (node, app, doc, doc_seq, doc_time, revision, sync, health)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (node, app) DO UPDATE SET doc = ?3, doc_seq = ?4,
                       doc_time = ?5, revision = ?6, sync = ?7, health = ?8
                     WHERE doc_time < ?5 OR (doc_time = ?5 AND doc_seq < ?4)",
                    params![
                        node,
                        app,
                        body.to_string(),
                        seq,
                        timestamp,
                        field("revision"),
                        field("sync"),
                        field("health")
                    ],
                )?;
                if changed == 0 {
                    Recorded::Stale
                } else {
                    Recorded::Stored
                }
            }
            Message::Event {
                node,
                seq,
                timestamp,
                app,
                event,
                revision,
                message,
            } => {
                let inserted = tx.execute(
                    "INSERT OR IGNORE INTO events (node, seq, time, app, event, revision, message)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![node, seq, timestamp, app, event, revision, message],
                )?;
                if inserted == 0 {
                    Recorded::Duplicate
                } else {
                    let (high, high_time): (u64, u64) = tx.query_row(
                        "SELECT event_high, event_time FROM nodes WHERE node = ?1",
                        params![node],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )?;
                    if *seq > high {
                        let missing = (high + 1 < *seq && high > 0).then(|| (high + 1, seq - 1));
                        tx.execute(
                            "UPDATE nodes SET event_high = ?2, event_time = ?3 WHERE node = ?1",
                            params![node, seq, timestamp],
                        )?;
                        match missing {
                            Some((from, to)) => {
                                tx.execute(
                                    "INSERT OR IGNORE INTO gaps (node, first, last, seen)
                                     VALUES (?1, ?2, ?3, ?4)",
                                    params![node, from, to, now],
                                )?;
                                Recorded::Gap { from, to }
                            }
                            None => Recorded::Stored,
                        }
                    } else if *timestamp > high_time && *seq < high {
                        // Lower numbers, later times: the agent counts from 1 again.
                        tx.execute(
                            "UPDATE nodes SET event_high = ?2, event_time = ?3 WHERE node = ?1",
                            params![node, seq, timestamp],
                        )?;
                        tx.execute("DELETE FROM gaps WHERE node = ?1", params![node])?;
                        Recorded::Reset
                    } else {
                        // A late arrival fills (part of) a gap.
                        fill_gap(&tx, node, *seq)?;
                        Recorded::Stored
                    }
                }
            }
        };
        tx.commit()?;
        Ok(recorded)
    }

    /// Missing event ranges of a node, oldest first.
    pub fn gaps(&self, node: &str) -> Result<Vec<(u64, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT first, last FROM gaps WHERE node = ?1 ORDER BY first")?;
        let rows = stmt.query_map(params![node], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The stored document of one app on one node.
    pub fn app(&self, node: &str, app: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let doc: Option<String> = self
            .conn
            .query_row(
                "SELECT doc FROM apps WHERE node = ?1 AND app = ?2",
                params![node, app],
                |r| r.get(0),
            )
            .optional()?;
        Ok(doc.and_then(|d| serde_json::from_str(&d).ok()))
    }
}

/// A node as the fleet overview shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeRow {
    pub node: String,
    /// `online`, `offline` (said so, or its last will) or `stale` (nothing heard for too long).
    pub state: String,
    pub last_seen: u64,
    pub apps: u64,
    /// Apps not Synced and Healthy.
    pub failing: u64,
    pub missing_events: u64,
}

/// How many nodes run one app at one revision with one sync state and health.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AppRow {
    pub app: String,
    pub revision: Option<String>,
    pub sync: Option<String>,
    pub health: Option<String>,
    pub nodes: u64,
}

/// One event as the timeline shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EventRow {
    pub node: String,
    pub seq: u64,
    pub time: u64,
    pub app: String,
    pub event: String,
    pub revision: Option<String>,
    pub message: String,
}

impl Sqlite {
    /// Every node, failing ones first, then by name. A node not heard of for `stale_after`
    /// seconds is stale, whatever it last said.
    pub fn nodes(&self, now: u64, stale_after: u64) -> Result<Vec<NodeRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT n.node, n.online, n.last_seen,
               (SELECT count(*) FROM apps a WHERE a.node = n.node),
               (SELECT count(*) FROM apps a WHERE a.node = n.node
                  AND (a.sync IS NOT 'Synced' OR a.health IS NOT 'Healthy')),
               (SELECT coalesce(sum(last - first + 1), 0) FROM gaps g WHERE g.node = n.node)
             FROM nodes n",
        )?;
        let rows = stmt.query_map([], |r| {
            let online: Option<bool> = r.get(1)?;
            let last_seen: u64 = r.get(2)?;
            let state = if now.saturating_sub(last_seen) > stale_after {
                "stale"
            } else if online == Some(false) {
                "offline"
            } else {
                "online"
            };
            Ok(NodeRow {
                node: r.get(0)?,
                state: state.to_string(),
                last_seen,
                apps: r.get(3)?,
                failing: r.get(4)?,
                missing_events: r.get(5)?,
            })
        })?;
        let mut out: Vec<NodeRow> = rows.collect::<Result<_, _>>()?;
        out.sort_by(|a, b| {
            (b.failing > 0, b.state != "online", &a.node).cmp(&(
                a.failing > 0,
                a.state != "online",
                &b.node,
            ))
        });
        Ok(out)
    }

    /// Per app, how many nodes run which revision with which sync state and health; apps with
    /// failing nodes first.
    pub fn apps(&self, only: Option<&str>) -> Result<Vec<AppRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT app, revision, sync, health, count(*) FROM apps
             WHERE ?1 IS NULL OR app = ?1
             GROUP BY app, revision, sync, health",
        )?;
        let rows = stmt.query_map(params![only], |r| {
            Ok(AppRow {
                app: r.get(0)?,
                revision: r.get(1)?,
                sync: r.get(2)?,
                health: r.get(3)?,
                nodes: r.get(4)?,
            })
        })?;
        let mut out: Vec<AppRow> = rows.collect::<Result<_, _>>()?;
        let failing = |row: &AppRow| {
            row.sync.as_deref() != Some("Synced") || row.health.as_deref() != Some("Healthy")
        };
        out.sort_by(|a, b| (failing(b), &a.app, b.nodes).cmp(&(failing(a), &b.app, a.nodes)));
        Ok(out)
    }

    /// The latest events, newest first, of one node and/or app if given.
    pub fn events(
        &self,
        node: Option<&str>,
        app: Option<&str>,
        limit: u32,
    ) -> Result<Vec<EventRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT node, seq, time, app, event, revision, message FROM events
             WHERE (?1 IS NULL OR node = ?1) AND (?2 IS NULL OR app = ?2)
             ORDER BY time DESC, seq DESC LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![node, app, limit], |r| {
            Ok(EventRow {
                node: r.get(0)?,
                seq: r.get(1)?,
                time: r.get(2)?,
                app: r.get(3)?,
                event: r.get(4)?,
                revision: r.get(5)?,
                message: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The app documents of one node.
    pub fn node_apps(&self, node: &str) -> Result<Vec<serde_json::Value>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT doc FROM apps WHERE node = ?1 ORDER BY app")?;
        let rows = stmt.query_map(params![node], |r| r.get::<_, String>(0))?;
        let docs: Vec<String> = rows.collect::<Result<_, _>>()?;
        Ok(docs
            .iter()
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect())
    }
}

/// Takes `seq` out of the node's gap that holds it, splitting the gap if needed.
fn fill_gap(tx: &rusqlite::Transaction<'_>, node: &str, seq: u64) -> Result<(), StoreError> {
    let found: Option<(u64, u64, u64)> = tx
        .query_row(
            "SELECT first, last, seen FROM gaps WHERE node = ?1 AND first <= ?2 AND ?2 <= last",
            params![node, seq],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((first, last, seen)) = found else {
        return Ok(());
    };
    tx.execute(
        "DELETE FROM gaps WHERE node = ?1 AND first = ?2",
        params![node, first],
    )?;
    let mut rest = Vec::new();
    if seq > first {
        rest.push((first, seq - 1));
    }
    if seq < last {
        rest.push((seq + 1, last));
    }
    for (a, b) in rest {
        tx.execute(
            "INSERT OR IGNORE INTO gaps (node, first, last, seen) VALUES (?1, ?2, ?3, ?4)",
            params![node, a, b, seen],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
            body: serde_json::json!({"app": "web", "revision": revision, "sync": "Synced", "health": "Healthy"}),
        }
    }

    #[test]
    fn events_are_kept_once_and_gaps_found_and_filled() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Sqlite::open(&dir.path().join("hub.db")).unwrap();
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

    #[test]
    fn an_older_document_never_replaces_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Sqlite::open(&dir.path().join("hub.db")).unwrap();
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

    #[test]
    fn the_overview_puts_failing_and_silent_nodes_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Sqlite::open(&dir.path().join("hub.db")).unwrap();
        let doc = |node: &str, health: &str| Message::App {
            node: node.into(),
            app: "web".into(),
            seq: 1,
            timestamp: 100,
            body: serde_json::json!({"app": "web", "revision": "abc", "sync": "Synced", "health": health}),
        };
        db.record(&doc("a-good", "Healthy"), 1000).unwrap();
        db.record(&doc("b-bad", "Degraded"), 1000).unwrap();
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
                ("a-good", "online")
            ]
        );
        assert_eq!(nodes[0].missing_events, 2);
        let apps = db.apps(None).unwrap();
        assert_eq!(apps[0].health.as_deref(), Some("Degraded"));
        assert_eq!(apps[1].nodes, 2);
        assert_eq!(db.events(Some("b-bad"), None, 10).unwrap()[0].seq, 4);
    }
}
