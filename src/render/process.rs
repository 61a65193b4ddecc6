//! Renderers that run another program (`helm template`, the kustomize fallback) run it
//! through [`run`]: bounded in time and in output, so a chart that loops or prints without
//! end costs one failed render, not the agent. Blocking: callers are on a blocking thread.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long one render program may run.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(120);
/// How much one render program may print (on stdout; stderr is kept to its first 64 KiB).
pub(crate) const MAX_OUTPUT: usize = 64 * 1024 * 1024;
const MAX_STDERR: usize = 64 * 1024;

/// What the program printed, once it exited with success or failure.
#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) success: bool,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Spawn(#[source] std::io::Error),
    #[error("stopped after {}: it did not finish in time", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("stopped: it printed more than {} MiB", .0 / (1024 * 1024))]
    TooMuchOutput(usize),
    #[error("{0}")]
    Wait(#[source] std::io::Error),
}

/// Runs `command` with stdin closed, for at most `timeout`, keeping at most `max_output`
/// bytes of stdout; past either bound the program is killed.
pub(crate) fn run(
    mut command: Command,
    timeout: Duration,
    max_output: usize,
) -> Result<Output, RunError> {
    // Its own process group, so stopping it stops whatever it started too.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(RunError::Spawn)?;
    let stdout = child.stdout.take().map(|s| reader(s, max_output));
    let stderr = child.stderr.take().map(|s| reader(s, MAX_STDERR));
    let deadline = Instant::now().checked_add(timeout);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(RunError::Wait)? {
            break status;
        }
        if stdout.as_ref().is_some_and(|r| r.overflowed()) {
            stop(&mut child);
            return Err(RunError::TooMuchOutput(max_output));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            stop(&mut child);
            return Err(RunError::Timeout(timeout));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = stdout.map(Reader::finish).unwrap_or_default();
    let stderr = stderr.map(Reader::finish).unwrap_or_default();
    if stdout.len() > max_output {
        return Err(RunError::TooMuchOutput(max_output));
    }
    Ok(Output {
        success: status.success(),
        stdout,
        stderr,
    })
}

fn stop(child: &mut Child) {
    if let Some(group) = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads a pipe on its own thread, keeping at most `cap` bytes (one more marks overflow) and
/// draining the rest, so the program never blocks on a full pipe.
struct Reader {
    handle: std::thread::JoinHandle<Vec<u8>>,
    overflow: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Reader {
    fn overflowed(&self) -> bool {
        self.overflow.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn finish(self) -> Vec<u8> {
        self.handle.join().unwrap_or_default()
    }
}

fn reader(mut pipe: impl Read + Send + 'static, cap: usize) -> Reader {
    let overflow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = overflow.clone();
    let handle = std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = cap.saturating_add(1).saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                    if kept.len() > cap {
                        flag.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }
        kept
    });
    Reader { handle, overflow }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn output_and_status_come_back() {
        let out = run(sh("echo hi; echo oops >&2; exit 3"), TIMEOUT, 1024).unwrap();
        assert!(!out.success);
        assert_eq!(out.stdout, b"hi\n");
        assert_eq!(out.stderr, b"oops\n");
    }

    #[test]
    fn a_program_that_never_ends_is_stopped() {
        // The shell's child holds the pipes too: the whole group is stopped.
        let err = run(sh("sleep 600; true"), Duration::from_millis(200), 1024).unwrap_err();
        assert!(matches!(err, RunError::Timeout(_)), "{err}");
    }

    #[test]
    fn endless_output_is_cut_off() {
        let err = run(sh("exec yes"), TIMEOUT, 1024 * 1024).unwrap_err();
        assert!(matches!(err, RunError::TooMuchOutput(_)), "{err}");
    }
}
