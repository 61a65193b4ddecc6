//! edgesync-hub: reads every node's status from the broker into a fleet database, shows it, and
//! rolls revisions out in health-gated stages (issue 20; being built on this branch).

pub mod gates;
pub mod ingest;
pub mod metrics;
pub mod mqtt;
pub mod policy;
pub mod rollout;
pub mod store;
pub mod web;
