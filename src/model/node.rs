//! What edgesync knows about the node it runs on.

use std::collections::BTreeMap;

/// The node's labels: those from the config, plus facts edgesync knows (configured labels
/// win): `kubernetes.io/hostname`, `kubernetes.io/arch` and `kubernetes.io/os`, named and
/// valued as the kubelet does.
pub(crate) fn node_labels(
    node: &str,
    configured: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
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
