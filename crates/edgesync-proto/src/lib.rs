//! edgesync's fleet wire format, shared by the agent and `edgesync-hub`: rollout gates (which
//! revision each stage of a fleet may run), how a node finds its stage, and the gates'
//! signatures; and the HTML escaping both pages use. Pure logic: no I/O.

pub mod gate;
pub mod html;

pub use gate::{bucket, Ancestry, Decision, Gate, GateError, Stage, Taken, BUCKETS};
