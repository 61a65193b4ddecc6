//! What the agent reads back from its state directory after a crash or a power cut: an app's
//! state, its last-known-good render, and a queued outbox message. The first byte picks which.
#![no_main]
use edgesync::state::{RenderKind, StateStore};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, content)) = data.split_first() else { return };
    let Ok(dir) = tempfile::tempdir() else { return };
    let apps = dir.path().join("apps");
    let outbox = dir.path().join("outbox");
    if std::fs::create_dir_all(&apps).is_err() || std::fs::create_dir_all(&outbox).is_err() {
        return;
    }
    let store = StateStore::new(dir.path());
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
                let limits = edgesync::report::outbox::Limits {
                    max_messages: 10,
                    max_bytes: 1 << 20,
                };
                if let Ok(mut queue) = edgesync::report::outbox::Outbox::open(&outbox, limits) {
                    let _ = queue.front();
                    let _ = queue.push(edgesync::report::outbox::Message {
                        topic: "t".into(),
                        payload: "p".into(),
                        retain: false,
                    });
                }
            }
        }
    }
});
