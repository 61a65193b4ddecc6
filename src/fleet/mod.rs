//! The fleet model: which apps this node runs. Today that is node targeting: each app may
//! carry a label selector, matched against the node's labels plus facts about the node.

pub mod argo;
pub use crate::model::selector;

use std::collections::BTreeMap;

pub use selector::{Selector, SelectorError};

/// The node's labels: those from the config, plus facts edgesync knows (configured labels
/// win): `kubernetes.io/hostname`, `kubernetes.io/arch` and `kubernetes.io/os`, named and
/// valued as the kubelet does.
pub fn node_labels(node: &str, configured: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        other => other,
    };
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), node.to_string()),
        ("kubernetes.io/arch".to_string(), arch.to_string()),
        (
            "kubernetes.io/os".to_string(),
            std::env::consts::OS.to_string(),
        ),
    ]);
    labels.extend(configured.clone());
    labels
}
