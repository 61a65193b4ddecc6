//! `RolloutPolicy` documents, kept in the fleet repository next to the Applications:
//!
//! ```yaml
//! apiVersion: edgesync.io/v1alpha1
//! kind: RolloutPolicy
//! metadata: {name: default}        # "default": every app without a policy of its own
//! spec:
//!   apps: [web]                    # the apps it governs (not with the name "default")
//!   stages:
//!     - {name: canary, nodeSelector: {matchLabels: {ring: canary}}, bake: 10m}
//!     - {name: ten-percent, share: 10%, bake: 30m}
//!     - {name: rest, share: 90%}
//!   failureBudget: {nodes: 1}      # or {share: 5%}
//!   onFailure: halt                # or rollback
//! ```
//!
//! Unknown fields are refused, naming the field; so are shares past 100% and stages without a
//! selector or a share.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::rollout::{Budget, OnFailure, Policy, StageSpec};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{file}: {message}")]
    Yaml { file: String, message: String },
    #[error("{file}: RolloutPolicy {name}: {message}")]
    Invalid {
        file: String,
        name: String,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Document {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: Spec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    /// Accepted, as manifests are often written with one, and ignored: a policy is fleet-wide.
    #[serde(default)]
    #[allow(dead_code)]
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    apps: Vec<String>,
    stages: Vec<RawStage>,
    failure_budget: RawBudget,
    on_failure: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawStage {
    name: String,
    #[serde(default)]
    node_selector: Option<Selector>,
    #[serde(default)]
    share: Option<String>,
    #[serde(default)]
    bake: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Selector {
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    #[serde(default)]
    nodes: Option<u64>,
    #[serde(default)]
    share: Option<String>,
}

/// One policy and the apps it governs (`None`: the default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub name: String,
    pub apps: Option<Vec<String>>,
    pub policy: Policy,
}

impl Named {
    /// Whether this policy names `app` (the default names none).
    pub fn names(&self, app: &str) -> bool {
        self.apps
            .as_ref()
            .is_some_and(|a| a.iter().any(|x| x == app))
    }
}

fn percent(text: &str) -> Option<u32> {
    text.trim()
        .strip_suffix('%')
        .and_then(|n| n.trim().parse::<u32>().ok())
        .filter(|p| *p <= 100)
}

/// Parses one `RolloutPolicy` document from `file` (for errors).
pub fn parse(file: &str, text: &str) -> Result<Named, PolicyError> {
    let doc: Document = serde_saphyr::from_str(text).map_err(|e| PolicyError::Yaml {
        file: file.to_string(),
        message: e.to_string(),
    })?;
    check(file, doc)
}

/// Reads one `RolloutPolicy` object of a render of the fleet repository (`origin` names its
/// file), checked as [`parse`] checks a file.
pub fn from_value(origin: &str, value: &serde_json::Value) -> Result<Named, PolicyError> {
    let doc = Document::deserialize(value).map_err(|e| PolicyError::Yaml {
        file: origin.to_string(),
        message: e.to_string(),
    })?;
    check(origin, doc)
}

fn check(file: &str, doc: Document) -> Result<Named, PolicyError> {
    let invalid = |message: String| PolicyError::Invalid {
        file: file.to_string(),
        name: doc.metadata.name.clone(),
        message,
    };
    if doc.api_version != "edgesync.io/v1alpha1" || doc.kind != "RolloutPolicy" {
        return Err(invalid(format!(
            "apiVersion/kind {}/{} is not edgesync.io/v1alpha1 RolloutPolicy",
            doc.api_version, doc.kind
        )));
    }
    if doc.spec.stages.is_empty() {
        return Err(invalid("spec.stages is empty".into()));
    }
    let mut stages = Vec::new();
    let mut total = 0u32;
    for (i, s) in doc.spec.stages.iter().enumerate() {
        let share = match &s.share {
            Some(text) => Some(percent(text).ok_or_else(|| {
                invalid(format!(
                    "spec.stages[{i}].share {text:?} is not a percentage 0%–100%"
                ))
            })?),
            None => None,
        };
        total = total.saturating_add(share.unwrap_or_default());
        if total > 100 {
            return Err(invalid(format!(
                "spec.stages[{i}]: the shares add up past 100%"
            )));
        }
        let selector = s
            .node_selector
            .as_ref()
            .map(|n| n.match_labels.clone())
            .unwrap_or_default();
        if selector.is_empty() && share.is_none() {
            return Err(invalid(format!(
                "spec.stages[{i}] ({}) has neither nodeSelector.matchLabels nor share",
                s.name
            )));
        }
        let bake_secs = match &s.bake {
            Some(text) => humantime::parse_duration(text)
                .map_err(|e| invalid(format!("spec.stages[{i}].bake {text:?}: {e}")))?
                .as_secs(),
            None => 0,
        };
        stages.push(StageSpec {
            name: s.name.clone(),
            selector,
            share,
            bake_secs,
        });
    }
    let budget = match (
        &doc.spec.failure_budget.nodes,
        &doc.spec.failure_budget.share,
    ) {
        (Some(n), None) => Budget::Nodes(*n),
        (None, Some(text)) => Budget::Percent(percent(text).ok_or_else(|| {
            invalid(format!(
                "spec.failureBudget.share {text:?} is not a percentage"
            ))
        })?),
        _ => {
            return Err(invalid(
                "spec.failureBudget needs exactly one of nodes and share".into(),
            ))
        }
    };
    let on_failure = match doc.spec.on_failure.as_str() {
        "halt" => OnFailure::Halt,
        "rollback" => OnFailure::Rollback,
        other => {
            return Err(invalid(format!(
                "spec.onFailure {other:?} is neither halt nor rollback"
            )))
        }
    };
    let apps = if doc.metadata.name == "default" {
        if !doc.spec.apps.is_empty() {
            return Err(invalid("the default policy names no apps".into()));
        }
        None
    } else {
        if doc.spec.apps.is_empty() {
            return Err(invalid(
                "spec.apps is empty (name it default to govern every app)".into(),
            ));
        }
        Some(doc.spec.apps.clone())
    };
    Ok(Named {
        name: doc.metadata.name.clone(),
        apps,
        policy: Policy {
            stages,
            budget,
            on_failure,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: edgesync.io/v1alpha1
kind: RolloutPolicy
metadata: {name: web}
spec:
  apps: [web]
  stages:
    - {name: canary, nodeSelector: {matchLabels: {ring: canary}}, bake: 10m}
    - {name: ten-percent, share: 10%, bake: 30m}
    - {name: rest, share: 90%}
  failureBudget: {share: 5%}
  onFailure: rollback
";

    #[test]
    fn a_policy_is_read_with_its_stages_budget_and_reaction() {
        let named = parse("fleet/policy.yaml", GOOD).unwrap();
        assert_eq!(named.apps, Some(vec!["web".to_string()]));
        let p = named.policy;
        assert_eq!(p.stages.len(), 3);
        assert_eq!(p.stages[0].bake_secs, 600);
        assert_eq!(p.stages[1].share, Some(10));
        assert_eq!(p.budget, Budget::Percent(5));
        assert_eq!(p.on_failure, OnFailure::Rollback);
    }

    #[test]
    fn mistakes_are_refused_naming_the_file_and_field() {
        let cases = [
            (GOOD.replace("bake: 10m}", "bake: 10m, wait: 1}"), "wait"),
            (GOOD.replace("share: 90%", "share: 95%"), "past 100%"),
            (
                GOOD.replace("onFailure: rollback", "onFailure: panic"),
                "onFailure",
            ),
            (
                GOOD.replace("{share: 5%}", "{share: 5%, nodes: 2}"),
                "exactly one",
            ),
            (GOOD.replace("bake: 30m", "bake: soon"), "bake"),
            (GOOD.replace("share: 10%, ", ""), "neither"),
        ];
        for (text, says) in cases {
            let e = parse("fleet/policy.yaml", &text).unwrap_err().to_string();
            assert!(e.contains("fleet/policy.yaml") && e.contains(says), "{e}");
        }
    }
}
