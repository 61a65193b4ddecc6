//! The fleet's state and history: each node's and app's latest document, every event once,
//! and the gaps in each node's event numbers. Redelivered messages (MQTT QoS 1 sends some
//! twice, a persistent session replays) change nothing; a document older than the stored one
//! (a retained copy replayed after a newer) is ignored.
//!
//! One [`Store`] over two databases: SQLite by default (one file, no setup) and PostgreSQL for
//! large fleets and several hub replicas. The logic and the SQL are written once, against the
//! small [`Sql`] interface; each backend runs it in its own transactions.

use crate::ingest::Message;

mod postgres;
mod sqlite;

pub use self::postgres::Postgres;
pub use self::sqlite::Sqlite;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("fleet database (SQLite): {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("fleet database (PostgreSQL): {0}")]
    Postgres(#[from] ::postgres::Error),
    #[error("fleet database: column {column} of {query:?} has an unexpected type")]
    Column { query: String, column: usize },
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

/// A value to or from the database. Numbers from outside that do not fit a signed 64-bit
/// column are saturated, never wrapped.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Int(i64),
    Text(String),
    Null,
}

impl From<u64> for Arg {
    fn from(v: u64) -> Arg {
        Arg::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<u32> for Arg {
    fn from(v: u32) -> Arg {
        Arg::Int(i64::from(v))
    }
}
impl From<bool> for Arg {
    fn from(v: bool) -> Arg {
        Arg::Int(i64::from(v))
    }
}
impl From<&str> for Arg {
    fn from(v: &str) -> Arg {
        Arg::Text(v.to_string())
    }
}
impl From<String> for Arg {
    fn from(v: String) -> Arg {
        Arg::Text(v)
    }
}
impl<T: Into<Arg>> From<Option<T>> for Arg {
    fn from(v: Option<T>) -> Arg {
        v.map(Into::into).unwrap_or(Arg::Null)
    }
}

impl Arg {
    fn int(&self) -> Option<u64> {
        match self {
            Arg::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }
    fn text(&self) -> Option<String> {
        match self {
            Arg::Text(t) => Some(t.clone()),
            _ => None,
        }
    }
}

/// Statements in one transaction. SQL is written with `$1`-style parameters, in the subset
/// both databases read.
pub trait Sql {
    fn exec(&mut self, sql: &str, args: &[Arg]) -> Result<u64, StoreError>;
    fn rows(&mut self, sql: &str, args: &[Arg]) -> Result<Vec<Vec<Arg>>, StoreError>;
    /// What locks a row read for update (`FOR UPDATE` on PostgreSQL; SQLite locks the file).
    fn for_update(&self) -> &'static str;
    fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// A database the store can run on.
pub trait Backend: Send {
    fn begin(&mut self) -> Result<Box<dyn Sql + '_>, StoreError>;
}

/// The tables, in the SQL both databases read.
const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS nodes (
       node TEXT PRIMARY KEY,
       doc TEXT, doc_seq BIGINT, doc_time BIGINT,
       online BIGINT, last_seen BIGINT NOT NULL,
       event_high BIGINT NOT NULL DEFAULT 0, event_time BIGINT NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS apps (
       node TEXT NOT NULL, app TEXT NOT NULL,
       doc TEXT NOT NULL, doc_seq BIGINT NOT NULL, doc_time BIGINT NOT NULL,
       revision TEXT, sync TEXT, health TEXT,
       PRIMARY KEY (node, app))",
    "CREATE TABLE IF NOT EXISTS events (
       node TEXT NOT NULL, seq BIGINT NOT NULL, at BIGINT NOT NULL,
       app TEXT NOT NULL, event TEXT NOT NULL, revision TEXT, message TEXT NOT NULL,
       PRIMARY KEY (node, seq, at))",
    "CREATE TABLE IF NOT EXISTS gaps (
       node TEXT NOT NULL, first BIGINT NOT NULL, last BIGINT NOT NULL, seen BIGINT NOT NULL,
       PRIMARY KEY (node, first))",
    "CREATE TABLE IF NOT EXISTS rollouts (
       app TEXT PRIMARY KEY, doc TEXT NOT NULL, issued BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS leases (
       name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires BIGINT NOT NULL)",
];

/// The node name of the hub's own events: no node is called so (node names are DNS names).
pub const HUB_NODE: &str = "@hub";

/// The fleet database.
pub struct Store {
    backend: Box<dyn Backend>,
}

fn column(query: &str, row: &[Arg], i: usize) -> Result<Arg, StoreError> {
    row.get(i).cloned().ok_or_else(|| StoreError::Column {
        query: query.chars().take(60).collect(),
        column: i,
    })
}

fn int(query: &str, row: &[Arg], i: usize) -> Result<u64, StoreError> {
    column(query, row, i)?
        .int()
        .ok_or_else(|| StoreError::Column {
            query: query.chars().take(60).collect(),
            column: i,
        })
}

fn text(query: &str, row: &[Arg], i: usize) -> Result<String, StoreError> {
    column(query, row, i)?
        .text()
        .ok_or_else(|| StoreError::Column {
            query: query.chars().take(60).collect(),
            column: i,
        })
}

impl Store {
    /// Opens a store on `backend`, creating its tables.
    pub fn new(mut backend: Box<dyn Backend>) -> Result<Store, StoreError> {
        let mut tx = backend.begin()?;
        for table in SCHEMA {
            tx.exec(table, &[])?;
        }
        tx.commit()?;
        Ok(Store { backend })
    }

    /// Records one checked message received at `now` (Unix seconds).
    pub fn record(&mut self, message: &Message, now: u64) -> Result<Recorded, StoreError> {
        let mut tx = self.backend.begin()?;
        let recorded = record_in(tx.as_mut(), message, now)?;
        tx.commit()?;
        Ok(recorded)
    }

    /// Records messages received together in one transaction (a fleet reconnecting replays
    /// thousands of retained documents: one commit, one sync of the database, for all). If
    /// the transaction fails, each message is recorded on its own, so one that cannot be
    /// stored does not hold the others back.
    pub fn record_all(
        &mut self,
        messages: &[Message],
        now: u64,
    ) -> Vec<Result<Recorded, StoreError>> {
        match self.record_together(messages, now) {
            Ok(out) => out.into_iter().map(Ok).collect(),
            Err(e) if messages.len() <= 1 => vec![Err(e)],
            Err(_) => messages.iter().map(|m| self.record(m, now)).collect(),
        }
    }

    fn record_together(
        &mut self,
        messages: &[Message],
        now: u64,
    ) -> Result<Vec<Recorded>, StoreError> {
        let mut tx = self.backend.begin()?;
        let mut out = Vec::with_capacity(messages.len());
        for message in messages {
            out.push(record_in(tx.as_mut(), message, now)?);
        }
        tx.commit()?;
        Ok(out)
    }

    /// Missing event ranges of a node, oldest first.
    pub fn gaps(&mut self, node: &str) -> Result<Vec<(u64, u64)>, StoreError> {
        let q = "SELECT first, last FROM gaps WHERE node = $1 ORDER BY first";
        let mut tx = self.backend.begin()?;
        let rows = tx.rows(q, &[node.into()])?;
        rows.iter()
            .map(|r| Ok((int(q, r, 0)?, int(q, r, 1)?)))
            .collect()
    }

    /// The stored document of one app on one node.
    pub fn app(&mut self, node: &str, app: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let q = "SELECT doc FROM apps WHERE node = $1 AND app = $2";
        let mut tx = self.backend.begin()?;
        let rows = tx.rows(q, &[node.into(), app.into()])?;
        Ok(rows
            .first()
            .and_then(|r| r.first())
            .and_then(Arg::text)
            .and_then(|d| serde_json::from_str(&d).ok()))
    }

    /// Every node, failing ones first (an app Failed to sync, or Degraded or Missing; one held
    /// back by a gate or a sync window, Waiting, or still Progressing is not failing), then by
    /// name. A node not heard of for `stale_after`
    /// seconds is stale, whatever it last said.
    pub fn nodes(&mut self, now: u64, stale_after: u64) -> Result<Vec<NodeRow>, StoreError> {
        let q = "SELECT n.node, n.online, n.last_seen,
               (SELECT count(*) FROM apps a WHERE a.node = n.node),
               (SELECT count(*) FROM apps a WHERE a.node = n.node
                  AND (a.sync = 'Failed' OR a.health IN ('Degraded', 'Missing'))),
               (SELECT CAST(coalesce(sum(g.last - g.first + 1), 0) AS BIGINT)
                  FROM gaps g WHERE g.node = n.node)
             FROM nodes n";
        let mut tx = self.backend.begin()?;
        let rows = tx.rows(q, &[])?;
        let mut out = Vec::new();
        for r in &rows {
            let online = column(q, r, 1)?.int();
            let last_seen = int(q, r, 2)?;
            let state = if now.saturating_sub(last_seen) > stale_after {
                "stale"
            } else if online == Some(0) {
                "offline"
            } else {
                "online"
            };
            out.push(NodeRow {
                node: text(q, r, 0)?,
                state: state.to_string(),
                last_seen,
                apps: int(q, r, 3)?,
                failing: int(q, r, 4)?,
                missing_events: int(q, r, 5)?,
            });
        }
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
    pub fn apps(&mut self, only: Option<&str>) -> Result<Vec<AppRow>, StoreError> {
        let q = "SELECT app, revision, sync, health, count(*) FROM apps
             WHERE CAST($1 AS TEXT) IS NULL OR app = $1
             GROUP BY app, revision, sync, health";
        let mut tx = self.backend.begin()?;
        let rows = tx.rows(q, &[only.into()])?;
        let mut out = Vec::new();
        for r in &rows {
            out.push(AppRow {
                app: text(q, r, 0)?,
                revision: column(q, r, 1)?.text(),
                sync: column(q, r, 2)?.text(),
                health: column(q, r, 3)?.text(),
                nodes: int(q, r, 4)?,
            });
        }
        let failing = |row: &AppRow| {
            row.sync.as_deref() == Some("Failed")
                || matches!(row.health.as_deref(), Some("Degraded" | "Missing"))
        };
        out.sort_by(|a, b| (failing(b), &a.app, b.nodes).cmp(&(failing(a), &b.app, a.nodes)));
        Ok(out)
    }

    /// The latest events, newest first, of one node and/or app if given.
    pub fn events(
        &mut self,
        node: Option<&str>,
        app: Option<&str>,
        limit: u32,
    ) -> Result<Vec<EventRow>, StoreError> {
        let q = "SELECT node, seq, at, app, event, revision, message FROM events
             WHERE (CAST($1 AS TEXT) IS NULL OR node = $1)
               AND (CAST($2 AS TEXT) IS NULL OR app = $2)
             ORDER BY at DESC, seq DESC LIMIT $3";
        let mut tx = self.backend.begin()?;
        let rows = tx.rows(q, &[node.into(), app.into(), limit.into()])?;
        rows.iter()
            .map(|r| {
                Ok(EventRow {
                    node: text(q, r, 0)?,
                    seq: int(q, r, 1)?,
                    time: int(q, r, 2)?,
                    app: text(q, r, 3)?,
                    event: text(q, r, 4)?,
                    revision: column(q, r, 5)?.text(),
                    message: text(q, r, 6)?,
                })
            })
            .collect()
    }

    /// What every node reports of `app`, with the node's labels (from its node document), for
    /// the rollout engine.
    pub fn app_views(&mut self, app: &str) -> Result<Vec<crate::rollout::NodeView>, StoreError> {
        let q = "SELECT a.node, a.revision, a.sync, a.health, n.doc, a.doc FROM apps a
             JOIN nodes n ON n.node = a.node WHERE a.app = $1 ORDER BY a.node";
        let mut tx = self.backend.begin()?;
        let rows = tx.rows(q, &[app.into()])?;
        rows.iter()
            .map(|r| {
                let doc = column(q, r, 4)?
                    .text()
                    .and_then(|d| serde_json::from_str::<serde_json::Value>(&d).ok());
                let labels = doc
                    .as_ref()
                    .and_then(|d| d.get("labels"))
                    .and_then(|l| l.as_object())
                    .map(|l| {
                        l.iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                            .collect()
                    })
                    .unwrap_or_default();
                let target = column(q, r, 5)?
                    .text()
                    .and_then(|d| serde_json::from_str::<serde_json::Value>(&d).ok())
                    .and_then(|d| d.get("target_revision")?.as_str().map(str::to_string));
                Ok(crate::rollout::NodeView {
                    node: text(q, r, 0)?,
                    labels,
                    target,
                    revision: column(q, r, 1)?.text(),
                    sync: column(q, r, 2)?.text().unwrap_or_default(),
                    health: column(q, r, 3)?.text().unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Puts what the hub itself did (a rollout started, a stage opened, a halt) on the
    /// timeline, as node [`HUB_NODE`].
    pub fn hub_event(
        &mut self,
        app: &str,
        revision: Option<&str>,
        message: &str,
        now: u64,
    ) -> Result<(), StoreError> {
        let q = "SELECT coalesce(max(seq), 0) FROM events WHERE node = $1";
        let mut tx = self.backend.begin()?;
        let rows = tx.rows(q, &[HUB_NODE.into()])?;
        let seq = rows
            .first()
            .map(|r| int(q, r, 0))
            .transpose()?
            .unwrap_or_default()
            .saturating_add(1);
        tx.exec(
            "INSERT INTO events (node, seq, at, app, event, revision, message)
             VALUES ($1, $2, $3, $4, 'rollout', $5, $6) ON CONFLICT DO NOTHING",
            &[
                HUB_NODE.into(),
                seq.into(),
                now.into(),
                app.into(),
                revision.into(),
                message.into(),
            ],
        )?;
        tx.commit()
    }

    /// Keeps `rollout` (its whole state, bake clocks included) and the last `issued` of its
    /// app's gates, replacing the app's previous rollout: a restarted hub carries on from here.
    pub fn save_rollout(
        &mut self,
        rollout: &crate::rollout::Rollout,
        issued: u64,
    ) -> Result<(), StoreError> {
        let doc = serde_json::to_string(rollout).unwrap_or_default();
        let mut tx = self.backend.begin()?;
        tx.exec(
            "INSERT INTO rollouts (app, doc, issued) VALUES ($1, $2, $3)
             ON CONFLICT (app) DO UPDATE SET doc = $2, issued = $3",
            &[rollout.app.as_str().into(), doc.into(), issued.into()],
        )?;
        tx.commit()
    }

    /// Takes lease `name` for `holder` until `until` (Unix seconds), or renews it, unless
    /// another holder's runs past `now`. Returns who holds it afterwards.
    pub fn lease(
        &mut self,
        name: &str,
        holder: &str,
        now: u64,
        until: u64,
    ) -> Result<String, StoreError> {
        let q = "SELECT holder FROM leases WHERE name = $1";
        let mut tx = self.backend.begin()?;
        tx.exec(
            "INSERT INTO leases (name, holder, expires) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET holder = $2, expires = $3
             WHERE leases.holder = $2 OR leases.expires < $4",
            &[name.into(), holder.into(), until.into(), now.into()],
        )?;
        let rows = tx.rows(q, &[name.into()])?;
        tx.commit()?;
        let row = rows.first().map(Vec::as_slice).unwrap_or_default();
        text(q, row, 0)
    }

    /// Gives lease `name` up if `holder` has it (a clean stop: another replica takes over at
    /// its next renewal instead of waiting for it to run out).
    pub fn release(&mut self, name: &str, holder: &str) -> Result<(), StoreError> {
        let mut tx = self.backend.begin()?;
        tx.exec(
            "UPDATE leases SET expires = 0 WHERE name = $1 AND holder = $2",
            &[name.into(), holder.into()],
        )?;
        tx.commit()
    }

    /// The saved rollouts, by app. A row this version cannot read (written by a newer hub, or
    /// damaged) comes back as its error, with the app's `issued` still usable.
    pub fn rollouts(&mut self) -> Result<Vec<SavedRollout>, StoreError> {
        let q = "SELECT app, doc, issued FROM rollouts ORDER BY app";
        let mut tx = self.backend.begin()?;
        let rows = tx.rows(q, &[])?;
        rows.iter()
            .map(|r| {
                let doc = text(q, r, 1)?;
                Ok(SavedRollout {
                    app: text(q, r, 0)?,
                    issued: int(q, r, 2)?,
                    rollout: serde_json::from_str(&doc).map_err(|e| e.to_string()),
                })
            })
            .collect()
    }

    /// The app documents of one node.
    pub fn node_apps(&mut self, node: &str) -> Result<Vec<serde_json::Value>, StoreError> {
        let q = "SELECT doc FROM apps WHERE node = $1 ORDER BY app";
        let mut tx = self.backend.begin()?;
        let rows = tx.rows(q, &[node.into()])?;
        Ok(rows
            .iter()
            .filter_map(|r| r.first().and_then(Arg::text))
            .filter_map(|d| serde_json::from_str(&d).ok())
            .collect())
    }
}

/// Records one message in the transaction `tx`.
fn record_in(tx: &mut dyn Sql, message: &Message, now: u64) -> Result<Recorded, StoreError> {
    tx.exec(
        "INSERT INTO nodes (node, last_seen) VALUES ($1, $2)
         ON CONFLICT (node) DO UPDATE SET last_seen =
           CASE WHEN nodes.last_seen > $2 THEN nodes.last_seen ELSE $2 END",
        &[message.node().into(), now.into()],
    )?;
    let recorded = match message {
        Message::Online { node, online } => {
            tx.exec(
                "UPDATE nodes SET online = $2 WHERE node = $1",
                &[node.as_str().into(), (*online).into()],
            )?;
            Recorded::Stored
        }
        Message::Node {
            node,
            seq,
            timestamp,
            body,
        } => {
            let changed = tx.exec(
                "UPDATE nodes SET doc = $2, doc_seq = $3, doc_time = $4
                 WHERE node = $1 AND (doc_seq IS NULL OR doc_time < $4
                   OR (doc_time = $4 AND doc_seq < $3))",
                &[
                    node.as_str().into(),
                    body.to_string().into(),
                    (*seq).into(),
                    (*timestamp).into(),
                ],
            )?;
            if changed == 0 {
                Recorded::Stale
            } else {
                // The node document lists every app it runs: an app that has not sent a
                // document of its own yet is known from its line here (a newer app
                // document is never replaced by it).
                let apps = body.get("apps").and_then(|a| a.as_array());
                for summary in apps.into_iter().flatten() {
                    let Some(app) = summary.get("app").and_then(|a| a.as_str()) else {
                        continue;
                    };
                    upsert_app(tx, node, app, summary, *seq, *timestamp)?;
                }
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
            if upsert_app(tx, node, app, body, *seq, *timestamp)? == 0 {
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
            let inserted = tx.exec(
                "INSERT INTO events (node, seq, at, app, event, revision, message)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                &[
                    node.as_str().into(),
                    (*seq).into(),
                    (*timestamp).into(),
                    app.as_str().into(),
                    event.as_str().into(),
                    revision.clone().into(),
                    message.as_str().into(),
                ],
            )?;
            if inserted == 0 {
                Recorded::Duplicate
            } else {
                event_numbers(tx, node, *seq, *timestamp, now)?
            }
        }
    };
    Ok(recorded)
}

/// Stores an app's document (or its line in the node document) unless a newer one is stored.
fn upsert_app(
    tx: &mut dyn Sql,
    node: &str,
    app: &str,
    body: &serde_json::Value,
    seq: u64,
    timestamp: u64,
) -> Result<u64, StoreError> {
    let field = |name: &str| -> Arg {
        body.get(name)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .into()
    };
    tx.exec(
        "INSERT INTO apps (node, app, doc, doc_seq, doc_time, revision, sync, health)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (node, app) DO UPDATE SET doc = $3, doc_seq = $4,
           doc_time = $5, revision = $6, sync = $7, health = $8
         WHERE apps.doc_time < $5 OR (apps.doc_time = $5 AND apps.doc_seq < $4)",
        &[
            node.into(),
            app.into(),
            body.to_string().into(),
            seq.into(),
            timestamp.into(),
            field("revision"),
            field("sync"),
            field("health"),
        ],
    )
}

/// Keeps a node's event numbers: the highest seen, gaps below it, a restart from 1.
fn event_numbers(
    tx: &mut dyn Sql,
    node: &str,
    seq: u64,
    timestamp: u64,
    now: u64,
) -> Result<Recorded, StoreError> {
    let q = format!(
        "SELECT event_high, event_time FROM nodes WHERE node = $1{}",
        tx.for_update()
    );
    let rows = tx.rows(&q, &[node.into()])?;
    let row = rows.first().map(Vec::as_slice).unwrap_or_default();
    let (high, high_time) = (int(&q, row, 0)?, int(&q, row, 1)?);
    let set_high = |tx: &mut dyn Sql| {
        tx.exec(
            "UPDATE nodes SET event_high = $2, event_time = $3 WHERE node = $1",
            &[node.into(), seq.into(), timestamp.into()],
        )
    };
    if seq > high {
        set_high(tx)?;
        if high > 0 && high + 1 < seq {
            let (from, to) = (high + 1, seq - 1);
            tx.exec(
                "INSERT INTO gaps (node, first, last, seen) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
                &[node.into(), from.into(), to.into(), now.into()],
            )?;
            return Ok(Recorded::Gap { from, to });
        }
        return Ok(Recorded::Stored);
    }
    if timestamp > high_time && seq < high {
        // Lower numbers, later times: the agent counts from 1 again.
        set_high(tx)?;
        tx.exec("DELETE FROM gaps WHERE node = $1", &[node.into()])?;
        return Ok(Recorded::Reset);
    }
    // A late arrival takes its number out of the gap that holds it, splitting it if needed.
    let q = "SELECT first, last, seen FROM gaps WHERE node = $1 AND first <= $2 AND $2 <= last";
    let rows = tx.rows(q, &[node.into(), seq.into()])?;
    if let Some(r) = rows.first() {
        let (first, last, seen) = (int(q, r, 0)?, int(q, r, 1)?, int(q, r, 2)?);
        tx.exec(
            "DELETE FROM gaps WHERE node = $1 AND first = $2",
            &[node.into(), first.into()],
        )?;
        let mut rest = Vec::new();
        if seq > first {
            rest.push((first, seq - 1));
        }
        if seq < last {
            rest.push((seq + 1, last));
        }
        for (a, b) in rest {
            tx.exec(
                "INSERT INTO gaps (node, first, last, seen) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
                &[node.into(), a.into(), b.into(), seen.into()],
            )?;
        }
    }
    Ok(Recorded::Stored)
}

/// A rollout as saved, and the last `issued` of its app's gates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRollout {
    pub app: String,
    pub issued: u64,
    pub rollout: Result<crate::rollout::Rollout, String>,
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

#[doc(hidden)]
pub mod conformance;

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let db = Sqlite::open(&dir.path().join("hub.db")).unwrap();
        (dir, Store::new(Box::new(db)).unwrap())
    }

    #[test]
    fn events_are_kept_once_and_gaps_found_and_filled() {
        let (_dir, mut db) = sqlite();
        conformance::events_are_kept_once_and_gaps_found_and_filled(&mut db);
    }

    #[test]
    fn an_older_document_never_replaces_a_newer_one() {
        let (_dir, mut db) = sqlite();
        conformance::an_older_document_never_replaces_a_newer_one(&mut db);
    }

    #[test]
    fn apps_are_known_from_the_node_document_until_their_own_arrives() {
        let (_dir, mut db) = sqlite();
        conformance::apps_are_known_from_the_node_document_until_their_own_arrives(&mut db);
    }

    #[test]
    fn app_views_carry_the_nodes_labels() {
        let (_dir, mut db) = sqlite();
        conformance::app_views_carry_the_nodes_labels(&mut db);
    }

    #[test]
    fn messages_received_together_are_recorded_as_one_by_one() {
        let (_dir, mut db) = sqlite();
        conformance::messages_received_together_are_recorded_as_one_by_one(&mut db);
    }

    #[test]
    fn rollouts_are_kept_and_replaced() {
        let (_dir, mut db) = sqlite();
        conformance::rollouts_are_kept_and_replaced(&mut db);
    }

    #[test]
    fn a_lease_has_one_holder_until_it_runs_out() {
        let (_dir, mut db) = sqlite();
        conformance::a_lease_has_one_holder_until_it_runs_out(&mut db);
    }

    #[test]
    fn the_overview_puts_failing_and_silent_nodes_first() {
        let (_dir, mut db) = sqlite();
        conformance::the_overview_puts_failing_and_silent_nodes_first(&mut db);
    }
}
