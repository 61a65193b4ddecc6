//! File watches (notify/inotify): the config file, and repositories on this node's own disk
//! (`file://` URLs). A change to a local repository's refs triggers an immediate round; a
//! change to the config file asks the daemon to reload it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{Event, EventSink, Source};

/// Keeps the watches alive; dropping it stops them.
pub(crate) struct Watches {
    _watcher: notify::RecommendedWatcher,
}

/// The directory of a `file://` repository whose refs show that it moved.
pub(crate) fn local_repo_dir(url: &str) -> Option<PathBuf> {
    let path = PathBuf::from(url.strip_prefix("file://")?);
    let git_dir = path.join(".git");
    Some(if git_dir.is_dir() { git_dir } else { path })
}

/// Starts watching. `config_changed` receives a signal whenever `config_path` was written
/// and closed, or renamed into place (editors often replace the file, so its directory is
/// watched).
pub(crate) fn watch(
    config_path: &Path,
    local_repos: Vec<(String, PathBuf)>,
    sink: Arc<dyn EventSink>,
    config_changed: mpsc::Sender<()>,
) -> Result<Watches, notify::Error> {
    let config_file = config_path.file_name().map(|n| n.to_os_string());
    let config_dir = config_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let repos = local_repos.clone();
    let watched_config_dir = config_dir.clone();
    let mut watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
        let Ok(event) = result else { return };
        // The config counts as changed once it is complete: closed after writing, or renamed
        // into place. A file caught half-written (an editor or scp writing in place over a
        // slow link) may still parse, with apps missing.
        let config_complete = matches!(
            event.kind,
            notify::EventKind::Access(notify::event::AccessKind::Close(
                notify::event::AccessMode::Write
            )) | notify::EventKind::Modify(notify::event::ModifyKind::Name(_))
        );
        if matches!(event.kind, notify::EventKind::Access(_)) && !config_complete {
            return;
        }
        for path in &event.paths {
            if config_complete
                && path.parent() == Some(watched_config_dir.as_path())
                && path.file_name().map(|n| n.to_os_string()) == config_file
            {
                // Full means a reload is already pending.
                let _ = config_changed.try_send(());
            }
            if matches!(event.kind, notify::EventKind::Access(_)) {
                continue;
            }
            for (url, dir) in &repos {
                // Object writes say nothing new; refs, HEAD and packed-refs do.
                let objects = dir.join("objects");
                if path.starts_with(dir) && !path.starts_with(&objects) {
                    let _ = sink.deliver(Event {
                        source: Source::Watch,
                        repos: vec![url.clone()],
                        branch: None,
                        apps: Vec::new(),
                        directed: true,
                    });
                }
            }
        }
    })?;
    watcher.watch(&config_dir, RecursiveMode::NonRecursive)?;
    for (url, dir) in &local_repos {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(%url, "cannot watch {}: {e}; polling only", dir.display());
            continue;
        }
        let refs = dir.join("refs");
        if refs.is_dir() {
            if let Err(e) = watcher.watch(&refs, RecursiveMode::Recursive) {
                tracing::warn!(%url, "cannot watch {}: {e}", refs.display());
            }
        }
    }
    Ok(Watches { _watcher: watcher })
}
