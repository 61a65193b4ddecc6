//! The options an app gives its renderers, as the config file (and an Argo CD Application's
//! `source`) writes them. Schema only: the renderers act on them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// An app's Helm options (`[apps.helm]`), named as in Argo CD's `source.helm`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HelmOptions {
    /// Defaults to the app's name.
    pub(crate) release_name: Option<String>,
    /// Inline values (YAML), applied after the value files.
    pub(crate) values: Option<String>,
    /// Value files, relative to the chart directory, inside the repository.
    #[serde(default)]
    pub(crate) value_files: Vec<String>,
    /// `--set name=value`, applied last.
    #[serde(default)]
    pub(crate) parameters: BTreeMap<String, String>,
    /// Leave out value files that do not exist instead of failing (Argo CD's
    /// `ignoreMissingValueFiles`).
    #[serde(default)]
    pub(crate) ignore_missing_value_files: bool,
    /// Leave the chart's `crds/` out (Argo CD's `skipCrds`); rendered by default, as Argo CD
    /// renders them.
    #[serde(default)]
    pub(crate) skip_crds: bool,
}

/// Labels and annotations of the namespace `create_namespace` adds (Argo CD's
/// `syncPolicy.managedNamespaceMetadata`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NamespaceMetadata {
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) annotations: BTreeMap<String, String>,
}

/// Argo CD's `source.kustomize`: changes made to the app's own kustomization before it is
/// built, as Argo CD makes them with `kustomize edit` (prefix, suffix and namespace replace;
/// labels and annotations are added over the file's; images replace entries of the same name).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Overrides {
    pub(crate) name_prefix: Option<String>,
    pub(crate) name_suffix: Option<String>,
    pub(crate) namespace: Option<String>,
    #[serde(default)]
    pub(crate) common_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) common_annotations: BTreeMap<String, String>,
    /// `[name=]newName[:tag][@digest]`.
    #[serde(default)]
    pub(crate) images: Vec<String>,
}

/// Argo CD's `source.directory`: whether subdirectories are read, and glob patterns on the
/// file's path below the app directory (`*` and `?` match any character, `/` included;
/// `{a,b}` is either). `exclude` wins over `include`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DirectoryOptions {
    /// edgesync reads subdirectories unless told not to; Argo CD's default is not to, so fleet
    /// Applications without `directory.recurse: true` get `false`.
    #[serde(default = "yes")]
    pub(crate) recurse: bool,
    #[serde(default)]
    pub(crate) include: Option<String>,
    #[serde(default)]
    pub(crate) exclude: Option<String>,
}

fn yes() -> bool {
    true
}

impl Default for DirectoryOptions {
    fn default() -> Self {
        DirectoryOptions {
            recurse: true,
            include: None,
            exclude: None,
        }
    }
}

/// The node's own variables: `NODE_NAME` and `NODE_LABEL_<key>`, with every character of the
/// key that cannot be in a variable name turned into `_` (`topology.kubernetes.io/zone` is
/// `NODE_LABEL_topology_kubernetes_io_zone`).
pub(crate) fn node_variables(
    name: &str,
    labels: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    vars.insert("NODE_NAME".to_string(), name.to_string());
    for (k, v) in labels {
        let key: String = k
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        vars.insert(format!("NODE_LABEL_{key}"), v.clone());
    }
    vars
}

/// A variable name as Flux accepts it.
pub(crate) fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A config management plugin (`[[plugins]]`), as Argo CD's `plugin.yaml` describes one: the
/// commands that prepare (`init`) and print (`generate`) an app's manifests, run in a copy of
/// the app's directory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PluginConfig {
    /// The name Applications use (`spec.source.plugin.name`, or the app's `plugin`).
    pub(crate) name: String,
    /// Run first, its output discarded (e.g. `["helm", "dependency", "build"]`).
    #[serde(default)]
    pub(crate) init: Vec<String>,
    /// Prints the manifests (YAML or JSON) on its standard output.
    pub(crate) generate: Vec<String>,
    /// How long each command may run.
    #[serde(default = "default_plugin_timeout", with = "super::sync_policy::human")]
    pub(crate) timeout: std::time::Duration,
    /// How much the generate command may print, in bytes.
    #[serde(default = "default_plugin_output")]
    pub(crate) max_output: usize,
    /// Let the commands reach the network. Without it they run in a network namespace of
    /// their own (no interface but a down loopback).
    #[serde(default)]
    pub(crate) network: bool,
}

fn default_plugin_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(90)
}

fn default_plugin_output() -> usize {
    16 * 1024 * 1024
}
