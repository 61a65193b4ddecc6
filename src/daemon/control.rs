//! The running agent's control socket, `state_dir/control.sock` (mode 0600, so only the
//! agent's user and root can use it). `edgesync sync [APP]` cannot take the state directory
//! while the agent holds it; it asks the agent here instead, and the agent runs the manual
//! sync itself (the one writer of its apps). This is how an app without automatic sync (an
//! Argo CD Application without `syncPolicy.automated`) is synced on a running node.
//!
//! One request per connection: a line `sync` or `sync APP`; the answer is one line,
//! `done FAILED` (apps that failed or were held) or `error MESSAGE`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};

use super::sync::SyncContext;

const SOCKET: &str = "control.sock";
/// A request line is short; anything longer is refused.
const MAX_REQUEST: u64 = 512;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the CLI keeps trying a socket that is not listening (the agent is reloading).
const RELOAD_WAIT: Duration = Duration::from_secs(10);
/// How long the CLI waits for the agent's syncs.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

pub(crate) fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// Serves the control socket until shutdown. A socket that cannot be made is logged and
/// counted: the agent runs on without it.
pub(crate) async fn serve(
    ctx: Arc<SyncContext>,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let path = socket_path(&ctx.config.state_dir);
    // A socket file left by an earlier process (this one holds the state lock now).
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(listener) => listener,
        Err(e) => {
            ctx.metrics.error(crate::metrics::ErrorKind::ControlSocket);
            tracing::warn!(path = %path.display(), "cannot open the control socket; `edgesync sync` cannot reach this agent: {e}");
            return;
        }
    };
    if let Err(e) =
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
    {
        tracing::warn!(path = %path.display(), "cannot restrict the control socket: {e}");
        return;
    }
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let (ctx, permits, shutdown) = (ctx.clone(), permits.clone(), shutdown.clone());
                tokio::spawn(async move { answer(ctx, permits, shutdown, stream).await });
            }
        }
    }
    // The socket file stays: the next agent (a reload) replaces it when it binds.
}

async fn answer(
    ctx: Arc<SyncContext>,
    permits: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
    stream: UnixStream,
) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    let request = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    let reply = match request {
        Ok(Ok(_)) => match parse(&line) {
            Ok(only) => {
                if only.is_some_and(|name| ctx.config.app(name).is_none()) {
                    format!(
                        "error no app named {:?} on this node\n",
                        only.unwrap_or_default()
                    )
                } else {
                    tracing::info!(
                        app = only.unwrap_or("(all)"),
                        "manual sync asked for over the control socket"
                    );
                    let failed = super::manual_sync(&ctx, only, &shutdown, &permits).await;
                    format!("done {failed}\n")
                }
            }
            Err(e) => format!("error {e}\n"),
        },
        Ok(Err(e)) => format!("error cannot read the request: {e}\n"),
        Err(_) => "error no request within 5 s\n".to_string(),
    };
    let _ = write.write_all(reply.as_bytes()).await;
}

/// `sync` (every app) or `sync APP`.
fn parse(line: &str) -> Result<Option<&str>, UnknownRequest> {
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("sync"), None, None) => Ok(None),
        (Some("sync"), Some(app), None) => Ok(Some(app)),
        _ => Err(UnknownRequest),
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown request (expected `sync [APP]`)")]
struct UnknownRequest;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlError {
    #[error("cannot reach the running agent at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the running agent did not answer: {0}")]
    Answer(String),
    #[error("the running agent refused: {0}")]
    Refused(String),
}

/// Connects to the agent's socket. The agent holds the state directory, so a socket that is
/// missing or not listening belongs to an agent reloading its configuration (it closes the
/// socket and binds it again): that is tried again for a few seconds.
async fn connect(path: &Path) -> Result<UnixStream, ControlError> {
    let deadline = tokio::time::Instant::now() + RELOAD_WAIT;
    loop {
        match UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(source) => {
                return Err(ControlError::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Asks the agent holding `state_dir` to sync `only` (or every app); returns how many apps
/// failed or were held.
pub(crate) async fn ask_agent(state_dir: &Path, only: Option<&str>) -> Result<usize, ControlError> {
    let path = socket_path(state_dir);
    let mut stream = connect(&path).await?;
    let request = match only {
        Some(app) => format!("sync {app}\n"),
        None => "sync\n".to_string(),
    };
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| ControlError::Answer(e.to_string()))?;
    let mut answer = String::new();
    let mut reader = BufReader::new(stream.take(4096));
    match tokio::time::timeout(ANSWER_TIMEOUT, reader.read_line(&mut answer)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(ControlError::Answer(e.to_string())),
        Err(_) => return Err(ControlError::Answer("no answer within 30 minutes".into())),
    }
    let answer = answer.trim_end();
    if let Some(failed) = answer.strip_prefix("done ") {
        return failed
            .parse()
            .map_err(|_| ControlError::Answer(format!("unexpected answer {answer:?}")));
    }
    match answer.strip_prefix("error ") {
        Some(message) => Err(ControlError::Refused(message.to_string())),
        None => Err(ControlError::Answer(format!(
            "unexpected answer {answer:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        assert_eq!(parse("sync\n"), Ok(None));
        assert_eq!(parse("sync web\n"), Ok(Some("web")));
        assert!(parse("sync a b\n").is_err());
        assert!(parse("delete web\n").is_err());
        assert!(parse("").is_err());
    }

    #[tokio::test]
    async fn a_socket_bound_again_during_a_reload_is_reached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET);
        // A socket file nobody listens on, as an agent leaves it while it reloads.
        drop(UnixListener::bind(&path).unwrap());
        let rebound = path.clone();
        let agent = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = std::fs::remove_file(&rebound);
            let listener = UnixListener::bind(&rebound).unwrap();
            listener.accept().await.map(|_| ())
        });
        assert!(connect(&path).await.is_ok());
        assert!(agent.await.unwrap().is_ok());
    }
}
