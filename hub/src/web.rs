//! The fleet as pages and JSON: `/` (overview: nodes online, offline and stale, failures
//! first; apps by revision and health), `/nodes/{node}`, `/apps/{app}`, `/events`, and the same
//! under `/api/v1/`. Every value shown comes from the nodes and is escaped.

use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use crate::rollout::Phase;
use crate::store::{AppRow, EventRow, NodeRow, Store};
use crate::unix_now as now;
use edgesync_proto::html::escape as esc;

/// A node is stale after this long without a message (the agent republishes its node
/// document at least every 5 minutes).
pub const STALE_AFTER_SECS: u64 = 900;

#[derive(Clone)]
pub struct Web {
    pub store: Arc<Mutex<Store>>,
    pub counts: Arc<Mutex<crate::mqtt::Counts>>,
    /// Rollouts, when `[gates]` is configured.
    pub driver: Option<Arc<Mutex<crate::gates::Driver>>>,
    /// Publishes the gates of rollouts started through the API.
    pub client: Option<rumqttc::v5::AsyncClient>,
    /// The bearer token `POST /api/v1/rollouts` needs (`[http] token_file`).
    pub token: Option<String>,
    /// The fleet repository, when `[fleet]` is configured: rollouts follow its branches.
    pub fleet: Option<Arc<Mutex<crate::fleet::Status>>>,
}

pub fn router(web: Web) -> Router {
    Router::new()
        .route("/", get(overview_page))
        .route("/nodes/{node}", get(node_page))
        .route("/apps/{app}", get(app_page))
        .route("/events", get(events_page))
        .route("/api/v1/fleet", get(fleet_json))
        .route("/api/v1/nodes/{node}", get(node_json))
        .route("/api/v1/apps/{app}", get(app_json))
        .route("/api/v1/events", get(events_json))
        .route("/metrics", get(metrics))
        .route("/api/v1/rollouts", get(rollouts_json).post(start_rollout))
        .route("/api/v1/repository", get(repository_json))
        .with_state(web)
}

#[derive(Debug, Deserialize, Default)]
pub struct EventFilter {
    node: Option<String>,
    app: Option<String>,
    limit: Option<u32>,
}

/// Runs a query on a blocking thread (SQLite), answering 500 with the error on failure.
async fn query<T: Send + 'static>(
    web: &Web,
    f: impl FnOnce(&mut Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, Response> {
    let store = web.store.clone();
    tokio::task::spawn_blocking(move || {
        let mut db = store.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut db)
    })
    .await
    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response())?
    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response())
}

#[derive(serde::Serialize)]
struct Fleet {
    nodes: Vec<NodeRow>,
    apps: Vec<AppRow>,
}

async fn fleet(web: &Web) -> Result<Fleet, Response> {
    let t = now();
    query(web, move |db| {
        Ok(Fleet {
            nodes: db.nodes(t, STALE_AFTER_SECS)?,
            apps: db.apps(None)?,
        })
    })
    .await
}

async fn fleet_json(State(web): State<Web>) -> Response {
    match fleet(&web).await {
        Ok(f) => Json(f).into_response(),
        Err(r) => r,
    }
}

async fn node_json(State(web): State<Web>, Path(node): Path<String>) -> Response {
    let n = node.clone();
    match query(&web, move |db| db.node_apps(&n)).await {
        Ok(apps) if apps.is_empty() => StatusCode::NOT_FOUND.into_response(),
        Ok(apps) => Json(serde_json::json!({"node": node, "apps": apps})).into_response(),
        Err(r) => r,
    }
}

async fn app_json(State(web): State<Web>, Path(app): Path<String>) -> Response {
    let a = app.clone();
    match query(&web, move |db| db.apps(Some(&a))).await {
        Ok(rows) => Json(rows).into_response(),
        Err(r) => r,
    }
}

async fn events_json(State(web): State<Web>, Query(f): Query<EventFilter>) -> Response {
    let limit = f.limit.unwrap_or(100).min(1000);
    match query(&web, move |db| {
        db.events(f.node.as_deref(), f.app.as_deref(), limit)
    })
    .await
    {
        Ok(rows) => Json(rows).into_response(),
        Err(r) => r,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRollout {
    app: String,
    revision: String,
    previous: Option<String>,
}

/// Starts a rollout and publishes its first gate, once the rollout is saved. Needs
/// `Authorization: Bearer <token>` when the hub has a token (`[http] token_file`, required
/// unless it listens on loopback only).
async fn start_rollout(
    State(web): State<Web>,
    headers: HeaderMap,
    Json(start): Json<StartRollout>,
) -> Response {
    if let Some(token) = &web.token {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !same(given.trim().as_bytes(), token.as_bytes()) {
            tracing::warn!(app = %start.app, "a rollout was asked for without the API token");
            return (
                StatusCode::UNAUTHORIZED,
                [("www-authenticate", "Bearer")],
                "starting a rollout needs the hub's API token (Authorization: Bearer ...)",
            )
                .into_response();
        }
    }
    if web.fleet.is_some() {
        return (
            StatusCode::CONFLICT,
            "rollouts follow the fleet repository's branches ([fleet]): push the commit instead",
        )
            .into_response();
    }
    let (Some(driver), Some(client)) = (&web.driver, &web.client) else {
        return (
            StatusCode::CONFLICT,
            "rollouts need [gates] in the hub's config",
        )
            .into_response();
    };
    let t = now();
    let started = {
        let mut d = driver.lock().unwrap_or_else(|e| e.into_inner());
        if !d.leading() {
            let leader = d.leader().unwrap_or_default().to_string();
            return (
                StatusCode::CONFLICT,
                format!("another hub replica leads rollouts ({leader:?}): ask it"),
            )
                .into_response();
        }
        d.start(&start.app, &start.revision, start.previous.as_deref(), t)
            .map(|gate| (gate, d.saved(&start.app)))
    };
    match started {
        Ok((gate, saved)) => {
            if let Some((rollout, issued)) = saved {
                let said = vec![format!(
                    "rollout {}: started, {} after {}",
                    rollout.id,
                    short(Some(rollout.revision.as_str())),
                    short(rollout.previous.as_deref())
                )];
                let _ = query(&web, move |db| {
                    crate::mqtt::keep(db, &rollout, issued, &said, t);
                    Ok(())
                })
                .await;
            }
            let topic = gate.topic.clone();
            crate::mqtt::publish_gate(client, gate).await;
            (
                StatusCode::ACCEPTED,
                Json(serde_json::json!({"gate": topic})),
            )
                .into_response()
        }
        Err(e) => (StatusCode::UNPROCESSABLE_ENTITY, e.to_string()).into_response(),
    }
}

/// Compares without stopping at the first difference (the token's bytes do not leak through
/// the answer's timing).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn rollouts_json(State(web): State<Web>) -> Response {
    let Some(driver) = &web.driver else {
        return Json(serde_json::json!([])).into_response();
    };
    let d = driver.lock().unwrap_or_else(|e| e.into_inner());
    let list: Vec<serde_json::Value> = d
        .rollouts()
        .map(|r| {
            serde_json::json!({"app": r.app, "rollout": r.id, "revision": r.revision,
                "previous": r.previous, "opened": r.opened, "phase": format!("{:?}", r.phase)})
        })
        .collect();
    Json(list).into_response()
}

async fn metrics(State(web): State<Web>) -> Response {
    let (counts, t) = (web.counts.clone(), now());
    match query(&web, move |db| {
        crate::metrics::render(db, &counts, t, STALE_AFTER_SECS)
    })
    .await
    {
        Ok(text) => (
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(r) => r,
    }
}

/// A path segment for a link (node and app names are topic levels: no `/`).
fn seg(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn short(rev: Option<&str>) -> String {
    rev.map(|r| r.chars().take(12).collect())
        .unwrap_or_else(|| "–".into())
}

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"10\">\
         <title>{t} · edgesync hub</title><style>\
         body{{font-family:system-ui,sans-serif;margin:1.5em}}table{{border-collapse:collapse}}\
         td,th{{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}}\
         .bad{{color:#b00020;font-weight:600}}.warn{{color:#a36200}}.ok{{color:#1b5e20}}\
         </style></head><body><p><a href=\"/\">fleet</a> · <a href=\"/events\">events</a></p>\
         <h1>{t}</h1>{body}</body></html>",
        t = esc(title)
    ))
}

fn class_of(sync: Option<&str>, health: Option<&str>) -> &'static str {
    match (sync, health) {
        (Some("Synced"), Some("Healthy")) => "ok",
        (Some("Failed"), _) | (_, Some("Degraded")) | (_, Some("Missing")) => "bad",
        _ => "warn",
    }
}

async fn repository_json(State(web): State<Web>) -> Response {
    match &web.fleet {
        Some(status) => {
            Json(status.lock().unwrap_or_else(|e| e.into_inner()).clone()).into_response()
        }
        None => (StatusCode::NOT_FOUND, "no [fleet] in the hub's config").into_response(),
    }
}

/// The fleet repository: the commit in use, why the last round failed, what is not followed.
fn repository_section(web: &Web) -> String {
    let Some(status) = &web.fleet else {
        return String::new();
    };
    let s = status.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut html = format!(
        "<h2>Fleet repository</h2><p id=\"repository\"><code>{}</code> at <code>{}</code>, {} apps followed</p>",
        esc(&s.repository),
        esc(&short(s.commit.as_deref())),
        s.apps.len()
    );
    if let Some(e) = &s.error {
        html.push_str(&format!("<p class=\"bad\">{}</p>", esc(e)));
    }
    if !s.problems.is_empty() {
        html.push_str("<ul class=\"warn\">");
        for p in &s.problems {
            html.push_str(&format!("<li>{}</li>", esc(p)));
        }
        html.push_str("</ul>");
    }
    html
}

/// The rollouts, halted and rolled back first.
fn rollouts_table(web: &Web) -> String {
    let Some(driver) = &web.driver else {
        return String::new();
    };
    let d = driver.lock().unwrap_or_else(|e| e.into_inner());
    let led = match d.leader() {
        Some(holder) if d.leading() => format!(
            "<p id=\"leader\">Rollouts are stepped by this replica ({}).</p>",
            esc(holder)
        ),
        Some("") => "<p id=\"leader\" class=\"warn\">No replica holds the rollout lease yet.</p>"
            .to_string(),
        Some(holder) => format!(
            "<p id=\"leader\">Rollouts are stepped by replica {}; this one ingests only.</p>",
            esc(holder)
        ),
        None => String::new(),
    };
    let mut rows: Vec<_> = d.rollouts().collect();
    if rows.is_empty() {
        return led;
    }
    let rank = |p: &Phase| match p {
        Phase::Halted { .. } | Phase::RolledBack { .. } => 0,
        Phase::Progressing => 1,
        Phase::Complete => 2,
    };
    rows.sort_by_key(|r| rank(&r.phase));
    let mut html = format!(
        "<h2>Rollouts</h2>{led}<table id=\"rollouts\"><tr><th>app</th><th>rollout</th><th>revision</th><th>stages open</th><th>state</th></tr>",
    );
    for r in rows {
        let stages = d.policy(&r.app).map(|p| p.stages.len()).unwrap_or_default();
        let (class, state) = match &r.phase {
            Phase::Progressing => ("warn", "progressing".to_string()),
            Phase::Complete => ("ok", "complete".to_string()),
            Phase::Halted { reason } => ("bad", format!("halted: {reason}")),
            Phase::RolledBack { reason } => ("bad", format!("rolled back: {reason}")),
        };
        html.push_str(&format!(
            "<tr class=\"{class}\"><td><a href=\"/apps/{l}\">{a}</a></td><td>{id}</td><td><code>{rev}</code></td><td>{open} of {stages}</td><td>{state}</td></tr>",
            l = seg(&r.app),
            a = esc(&r.app),
            id = esc(&r.id),
            rev = esc(&short(Some(&r.revision))),
            open = r.opened.min(stages),
            state = esc(&state),
        ));
    }
    html.push_str("</table>");
    html
}

fn apps_table(rows: &[AppRow]) -> String {
    let mut html = String::from(
        "<table><tr><th>app</th><th>revision</th><th>sync</th><th>health</th><th>nodes</th></tr>",
    );
    for r in rows {
        html.push_str(&format!(
            "<tr class=\"{c}\"><td><a href=\"/apps/{l}\">{a}</a></td><td><code>{rev}</code></td><td>{s}</td><td>{h}</td><td>{n}</td></tr>",
            c = class_of(r.sync.as_deref(), r.health.as_deref()),
            l = seg(&r.app),
            a = esc(&r.app),
            rev = esc(&short(r.revision.as_deref())),
            s = esc(r.sync.as_deref().unwrap_or("–")),
            h = esc(r.health.as_deref().unwrap_or("–")),
            n = r.nodes
        ));
    }
    html.push_str("</table>");
    html
}

async fn overview_page(State(web): State<Web>) -> Response {
    let fleet = match fleet(&web).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let count = |s: &str| fleet.nodes.iter().filter(|n| n.state == s).count();
    let mut body = format!(
        "<p id=\"summary\">{} nodes: <span class=\"ok\">{} online</span>, <span class=\"warn\">{} offline</span>, <span class=\"bad\">{} stale</span></p>",
        fleet.nodes.len(),
        count("online"),
        count("offline"),
        count("stale")
    );
    body.push_str(&rollouts_table(&web));
    body.push_str(&repository_section(&web));
    body.push_str("<h2>Apps</h2>");
    body.push_str(&apps_table(&fleet.apps));
    body.push_str("<h2>Nodes</h2><table><tr><th>node</th><th>state</th><th>last seen</th><th>apps</th><th>failing</th><th>events missing</th></tr>");
    let t = now();
    for n in &fleet.nodes {
        let class = if n.failing > 0 || n.state == "stale" {
            "bad"
        } else if n.state == "offline" {
            "warn"
        } else {
            "ok"
        };
        body.push_str(&format!(
            "<tr class=\"{class}\"><td><a href=\"/nodes/{l}\">{name}</a></td><td>{state}</td><td>{ago} s ago</td><td>{apps}</td><td>{failing}</td><td>{missing}</td></tr>",
            l = seg(&n.node),
            name = esc(&n.node),
            state = n.state,
            ago = t.saturating_sub(n.last_seen),
            apps = n.apps,
            failing = n.failing,
            missing = n.missing_events
        ));
    }
    body.push_str("</table>");
    page("Fleet", &body).into_response()
}

async fn node_page(State(web): State<Web>, Path(node): Path<String>) -> Response {
    let (n, m) = (node.clone(), node.clone());
    let apps = match query(&web, move |db| db.node_apps(&n)).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let events = match query(&web, move |db| db.events(Some(&m), None, 50)).await {
        Ok(e) => e,
        Err(r) => return r,
    };
    let text =
        |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let mut body = String::from(
        "<table><tr><th>app</th><th>revision</th><th>sync</th><th>health</th><th>message</th></tr>",
    );
    for a in &apps {
        let (sync, health) = (text(a, "sync"), text(a, "health"));
        body.push_str(&format!(
            "<tr class=\"{c}\"><td>{app}</td><td><code>{rev}</code></td><td>{s}</td><td>{h}</td><td>{msg}</td></tr>",
            c = class_of(sync.as_deref(), health.as_deref()),
            app = esc(&text(a, "app").unwrap_or_default()),
            rev = esc(&short(text(a, "revision").as_deref())),
            s = esc(sync.as_deref().unwrap_or("–")),
            h = esc(health.as_deref().unwrap_or("–")),
            msg = esc(&text(a, "health_message").or_else(|| text(a, "message")).unwrap_or_default()),
        ));
    }
    body.push_str("</table><h2>Events</h2>");
    body.push_str(&events_table(&events));
    page(&format!("Node {node}"), &body).into_response()
}

async fn app_page(State(web): State<Web>, Path(app): Path<String>) -> Response {
    let (a, b) = (app.clone(), app.clone());
    let rows = match query(&web, move |db| db.apps(Some(&a))).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let events = match query(&web, move |db| db.events(None, Some(&b), 50)).await {
        Ok(e) => e,
        Err(r) => return r,
    };
    let body = format!(
        "{}<h2>Events</h2>{}",
        apps_table(&rows),
        events_table(&events)
    );
    page(&format!("App {app}"), &body).into_response()
}

async fn events_page(State(web): State<Web>, Query(f): Query<EventFilter>) -> Response {
    let limit = f.limit.unwrap_or(200).min(1000);
    match query(&web, move |db| {
        db.events(f.node.as_deref(), f.app.as_deref(), limit)
    })
    .await
    {
        Ok(rows) => page("Events", &events_table(&rows)).into_response(),
        Err(r) => r,
    }
}

fn events_table(rows: &[EventRow]) -> String {
    let mut html = String::from(
        "<table><tr><th>time</th><th>node</th><th>app</th><th>event</th><th>revision</th><th>message</th></tr>",
    );
    for e in rows {
        let class = if e.event.contains("fail") { "bad" } else { "" };
        // The hub's own events: the timeline filtered to them (the hub has no node page).
        let node_link = if e.node == crate::store::HUB_NODE {
            format!("/events?node={}", seg(&e.node))
        } else {
            format!("/nodes/{}", seg(&e.node))
        };
        html.push_str(&format!(
            "<tr class=\"{class}\"><td>{t}</td><td><a href=\"{node_link}\">{n}</a></td><td><a href=\"/apps/{al}\">{a}</a></td><td>{ev}</td><td><code>{rev}</code></td><td>{m}</td></tr>",
            t = e.time,
            n = esc(&e.node),
            al = seg(&e.app),
            a = esc(&e.app),
            ev = esc(&e.event),
            rev = esc(&short(e.revision.as_deref())),
            m = esc(&e.message)
        ));
    }
    html.push_str("</table>");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_from_nodes_are_escaped_and_links_encoded() {
        assert_eq!(
            esc("<script>alert('x')</script>&"),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;"
        );
        assert_eq!(seg("a b/\"c"), "a%20b%2F%22c");
    }

    #[test]
    fn the_hubs_own_events_link_to_its_timeline_not_a_node_page() {
        let row = |node: &str| EventRow {
            node: node.into(),
            seq: 1,
            time: 1,
            app: "web".into(),
            event: "rollout".into(),
            revision: None,
            message: String::new(),
        };
        let html = events_table(&[row(crate::store::HUB_NODE), row("n1")]);
        assert!(html.contains("href=\"/events?node=%40hub\""), "{html}");
        assert!(html.contains("href=\"/nodes/n1\""), "{html}");
        assert!(!html.contains("/nodes/%40hub"), "{html}");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cret", b"s3creT"));
        assert!(!same(b"s3cre", b"s3cret"));
        assert!(!same(b"", b"s3cret"));
    }
}
