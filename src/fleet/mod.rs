//! The fleet model: which apps this node runs. Today that is node targeting: each app may
//! carry a label selector, matched against the node's labels plus facts about the node.

pub mod argo;
pub use crate::model::selector;

pub use selector::{Selector, SelectorError};

pub use crate::model::node::node_labels;
