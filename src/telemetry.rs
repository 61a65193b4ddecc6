//! Logging: human-readable lines (or JSON lines, with `--log-format json`) on stderr. Under
//! systemd, stderr goes to the journal: each line then starts with its syslog priority
//! (`<3>` for errors, ...), which journald turns into the entry's PRIORITY, and carries no
//! timestamp (the journal has one). Every field stays in the message, so `journalctl -u
//! edgesync` says which app and revision a line is about (the native journald protocol would
//! keep fields out of MESSAGE, where nobody reading the journal sees them).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

pub(crate) use crate::config::LogFormat;

/// `level` is a tracing filter (`info`, `edgesync=debug`, ...); `RUST_LOG` overrides it.
pub(crate) fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let registry = tracing_subscriber::registry().with(filter);
    if format == LogFormat::Json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(Redacting),
            )
            .init();
        return;
    }
    // systemd sets JOURNAL_STREAM for services whose stdout/stderr go to the journal.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(Redacting)
                    .with_ansi(false)
                    .event_format(Journal(
                        tracing_subscriber::fmt::format()
                            .without_time()
                            .with_target(false),
                    )),
            )
            .init();
        return;
    }
    registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(Redacting)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
}

/// An event line for journald's stream: the syslog priority prefix, then `inner`'s line.
struct Journal<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Journal<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// syslog priorities, as tracing-journald maps levels.
fn priority(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 5,
        tracing::Level::DEBUG => 6,
        tracing::Level::TRACE => 7,
    }
}

/// Writes log lines to stderr with the user part of every URL in them redacted
/// ([`crate::model::url::redact_text`]): an error from libgit2 or an HTTP client may quote a
/// repository URL with its token. The fmt layer writes each event with one call.
struct Redacting;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Redacting {
    type Writer = RedactingWriter;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter
    }
}

struct RedactingWriter;

impl std::io::Write for RedactingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let mut stderr = std::io::stderr().lock();
        if text.contains("://") {
            stderr.write_all(crate::model::url::redact_text(&text).as_bytes())?;
        } else {
            stderr.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
