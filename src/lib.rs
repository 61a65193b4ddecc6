//! edgesync: a pull-based GitOps agent for K3s edge nodes.
//!
//! The crate is the pipeline described in `docs/ARCHITECTURE.md`: `source` fetches a
//! [`Snapshot`](source::Snapshot), `render` turns it into [`Manifests`](render::Manifests),
//! `apply` server-side applies them and `state` remembers what was applied. `daemon` wires the
//! stages together; `cli` is the command line.

pub mod apply;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod fleet;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod health;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod render;
pub mod report;
pub mod scheduler;
pub mod signature;
pub mod source;
pub mod state;
pub mod telemetry;
pub mod trigger;
