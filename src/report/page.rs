//! The status page at `GET /`: one self-contained HTML document (no scripts, no external
//! assets) that refreshes itself. Every text from outside (app names, revisions, messages that
//! may quote Git content) is HTML-escaped.

use std::fmt::Write;

use super::status::{ago, short_revision, StatusDocument, SyncState};

pub(crate) use edgesync_proto::html::escape;

fn sync_class(sync: SyncState) -> &'static str {
    match sync {
        SyncState::Synced => "good",
        SyncState::Failed => "bad",
        SyncState::Syncing | SyncState::OutOfSync => "busy",
        SyncState::Waiting => "idle",
    }
}

fn health_class(health: &str) -> &'static str {
    match health {
        "Healthy" => "good",
        "Degraded" | "Missing" => "bad",
        "Progressing" | "Suspended" => "busy",
        _ => "idle",
    }
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:2em;color:#222}\
h1{font-size:20px;margin:0 0 .2em}.sub{color:#666;margin-bottom:1.5em}\
table{border-collapse:collapse;width:100%;margin-bottom:2em}\
th,td{text-align:left;padding:.45em .7em;border-bottom:1px solid #ddd;vertical-align:top}\
th{background:#f4f4f4}code{font-size:12px}\
.pill{display:inline-block;padding:.1em .6em;border-radius:1em;font-weight:600;font-size:12px}\
.good{background:#d8f5dd;color:#135c22}.bad{background:#fbdcdc;color:#8a1414}\
.busy{background:#fdf0c8;color:#6b4e00}.idle{background:#e8e8e8;color:#444}\
.msg{max-width:40em;word-break:break-word}";

/// Renders the page for `doc` at Unix time `now`.
pub(crate) fn render(doc: &StatusDocument, now: u64) -> String {
    let mut html = String::new();
    let node = &doc.node;
    let _ = write!(
        html,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>edgesync · {node_name}</title><style>{STYLE}</style></head><body>\
         <h1>edgesync on {node_name}</h1>\
         <div class=\"sub\">version {version} · up {uptime}s · {count} apps · refreshes every 5 s</div>\
         <table><thead><tr><th>App</th><th>Sync</th><th>Health</th><th>Revision</th>\
         <th>Last sync</th><th>Message</th></tr></thead><tbody>",
        node_name = escape(&node.node),
        version = escape(&node.agent_version),
        uptime = node.uptime_seconds,
        count = doc.apps.len(),
    );
    for a in &doc.apps {
        let revision = short_revision(a.revision.as_deref());
        let _ = write!(
            html,
            "<tr id=\"app-{id}\"><td><b>{app}</b><br><code>{repo} {path}</code></td>\
             <td><span class=\"pill {sync_class}\">{sync}</span></td>\
             <td><span class=\"pill {health_class}\" title=\"{health_message}\">{health}</span></td>\
             <td><code>{revision}</code></td><td>{last}</td><td class=\"msg\">{message}</td></tr>",
            id = escape(&a.app),
            app = escape(&a.app),
            repo = escape(&a.repo),
            path = escape(&a.path),
            sync_class = sync_class(a.sync),
            sync = a.sync.as_str(),
            health_class = health_class(&a.health),
            health = escape(&a.health),
            health_message = escape(&a.health_message),
            revision = escape(revision),
            last = ago(now, a.last_sync_end),
            message = escape(&a.message),
        );
    }
    html.push_str("</tbody></table>");
    if !node.fleet_problems.is_empty() {
        html.push_str("<h2>Fleet problems</h2><ul>");
        for problem in &node.fleet_problems {
            let _ = write!(html, "<li class=\"msg\">{}</li>", escape(problem));
        }
        html.push_str("</ul>");
    }
    html.push_str(
        "<h2>Recent events</h2><table><thead><tr><th>When</th>\
                   <th>App</th><th>Event</th><th>Revision</th><th>Message</th></tr></thead><tbody>",
    );
    if doc.events.is_empty() {
        html.push_str("<tr><td colspan=\"5\">none yet</td></tr>");
    }
    for e in &doc.events {
        let revision = short_revision(e.revision.as_deref());
        let _ = write!(
            html,
            "<tr><td>{when}</td><td>{app}</td><td>{event}</td><td><code>{revision}</code></td>\
             <td class=\"msg\">{message}</td></tr>",
            when = ago(now, Some(e.timestamp)),
            app = escape(&e.app),
            event = escape(&e.event),
            revision = escape(revision),
            message = escape(&e.message),
        );
    }
    html.push_str("</tbody></table></body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::status::{AppStatus, NodeStatus};

    #[test]
    fn hostile_text_is_escaped() {
        let doc = StatusDocument {
            node: NodeStatus {
                schema_version: 1,
                node: "edge".into(),
                labels: Default::default(),
                agent_version: "0.1.0".into(),
                uptime_seconds: 5,
                timestamp: 0,
                apps: vec![],
                skipped: vec![],
                fleet_problems: vec![],
            },
            apps: vec![AppStatus {
                app: "web".into(),
                repo: "r".into(),
                path: ".".into(),
                revision: None,
                target_revision: None,
                sync: SyncState::Failed,
                health: "Unknown".into(),
                health_message: String::new(),
                message: "bad.yaml: <script>alert(1)</script>".into(),
                objects: Default::default(),
                last_sync_start: None,
                last_sync_end: None,
                last_error: None,
                warnings: Vec::new(),
            }],
            events: vec![],
        };
        let html = render(&doc, 10);
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("pill bad\">Failed"));
    }
}
