//! Entry points for the fuzz targets in `fuzz/` (the `fuzzing` feature): each feeds one input
//! from outside to the parser that takes it, through the crate's own paths. The rest of the
//! crate stays `pub(crate)`, so the compiler finds what nothing uses.

use std::path::Path;

use axum::http::{HeaderMap, HeaderName, HeaderValue};

/// An MQTT change message.
pub fn change_message(data: &[u8]) {
    if let Ok(message) = crate::trigger::ChangeMessage::parse(data) {
        let _ = message.into_event(crate::trigger::Source::Mqtt, false);
    }
}

/// A webhook delivery: the first byte picks the provider, then header lines, a blank line and
/// the body.
pub fn webhook(data: &[u8]) {
    use crate::trigger::webhook::{sign, Provider};
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let provider = ["github", "gitlab", "gitea", "bitbucket", "generic"][usize::from(pick) % 5];
    let Some(provider) = Provider::from_path(provider) else {
        return;
    };
    let split = rest
        .windows(2)
        .position(|w| w == b"\n\n")
        .unwrap_or(rest.len());
    let (head, body) = rest.split_at(split);
    let body = body.get(2..).unwrap_or_default();
    let mut headers = HeaderMap::new();
    for line in head.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = line.split_at(colon);
        let value = value.get(1..).unwrap_or_default().trim_ascii();
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        else {
            continue;
        };
        headers.append(name, value);
    }
    let _ = provider.verify(&headers, body, b"secret", 1_700_000_000);
    let _ = provider.delivery_id(&headers);
    let _ = provider.parse(&headers, body);
    let _ = sign(b"secret", body);
}

/// A state file, a last-known-good render or an outbox record (the first byte picks), read
/// from the empty directory `dir`.
pub fn state_files(dir: &Path, data: &[u8]) {
    use crate::report::outbox::{Limits, Message, Outbox};
    use crate::state::{RenderKind, StateStore};
    let Some((&pick, content)) = data.split_first() else {
        return;
    };
    let apps = dir.join("apps");
    let outbox = dir.join("outbox");
    if std::fs::create_dir_all(&apps).is_err() || std::fs::create_dir_all(&outbox).is_err() {
        return;
    }
    let store = StateStore::new(dir);
    match pick % 3 {
        0 => {
            if std::fs::write(apps.join("web.json"), content).is_ok() {
                let _ = store.load("web");
            }
        }
        1 => {
            if std::fs::write(apps.join("web.applied.json"), content).is_ok() {
                let _ = store.load_render("web", RenderKind::Applied);
            }
        }
        _ => {
            if std::fs::write(outbox.join("7.json"), content).is_ok() {
                let limits = Limits {
                    max_messages: 10,
                    max_bytes: 1 << 20,
                };
                if let Ok(mut queue) = Outbox::open(&outbox, limits) {
                    let _ = queue.front();
                    let _ = queue.push(Message {
                        topic: "t".into(),
                        payload: "p".into(),
                        retain: false,
                    });
                }
            }
        }
    }
}

/// Argo CD Applications and AppProjects from a fleet repository: `data` is written as
/// `app.yaml` into the empty directory `dir`, rendered, and every object read as the fleet
/// reads it.
pub fn argo(dir: &Path, data: &[u8]) {
    use crate::fleet::argo::{parse, FleetObject};
    if std::fs::write(dir.join("app.yaml"), data).is_err() {
        return;
    }
    let Ok(manifests) = crate::render::render(dir, Path::new(".")) else {
        return;
    };
    for object in &manifests.objects {
        let Ok(Some(parsed)) = parse(object) else {
            continue;
        };
        match parsed.object {
            FleetObject::Application(app) => {
                let _ = app.to_app_config();
            }
            FleetObject::AppProject(project) => {
                let p = crate::policy::Project::from_spec(&project.name, &project.spec);
                let _ = p.check_source("https://github.com/org/repo-aaaaaaaaaaaaaaaaaaaaaaaa.git");
                let _ = p.check_destination("team-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
                let _ = p.sync_windows("web-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", Some("team"));
                let _ = p.check_kind("apps", "Deployment", true);
            }
        }
    }
}

/// The config file.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crate::config::Config::parse(Path::new("/nonexistent/config.toml"), text);
}
