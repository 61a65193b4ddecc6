//! edgesync-hub: reads every node's status from the broker into a fleet database, shows it, and
//! rolls revisions out in health-gated stages (issue 20; being built on this branch).

pub mod fleet;
pub mod gates;
pub mod ingest;
pub mod lease;
pub mod metrics;
pub mod mqtt;
pub mod policy;
pub mod rollout;
pub mod store;
pub mod web;

/// Now, in Unix seconds (0 on a clock before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
