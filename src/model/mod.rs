//! Small values every stage shares: globs, label selectors, repository URLs and their
//! redaction, bounded durations, sync windows. A leaf: it imports nothing of the crate, so any stage may use it without an
//! edge back (docs/ARCHITECTURE.md).

pub(crate) mod error;
pub(crate) mod glob;
pub(crate) mod human;
pub(crate) mod node;
pub(crate) mod selector;
pub(crate) mod url;
pub(crate) mod window;

/// Unix seconds now (0 if the clock is before 1970).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
