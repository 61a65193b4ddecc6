//! edgesync's fleet wire format, shared by the agent and `edgesync-hub`: rollout gates (which
//! revision each stage of a fleet may run), how a node finds its stage, and the gates'
//! signatures; and the HTML escaping both pages use. Pure logic, no I/O, except the MQTT
//! client's TLS configuration (feature `tls`), which reads the certificate files it is given.

pub mod gate;
pub mod html;
#[cfg(feature = "tls")]
pub mod tls;

pub use gate::{bucket, Ancestry, Decision, Gate, GateError, Stage, Taken, BUCKETS};
