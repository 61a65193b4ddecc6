//! Resource hooks, as Argo CD reads them: `argocd.argoproj.io/hook` (`PreSync`, `Sync`,
//! `PostSync`, `SyncFail`, `PostDelete`, `Skip`) with `argocd.argoproj.io/hook-delete-policy`
//! (`HookSucceeded`, `HookFailed`, `BeforeHookCreation`, the default), and Helm's hooks as Argo
//! CD maps them (`pre-install`/`pre-upgrade` → PreSync, `post-install`/`post-upgrade` →
//! PostSync, `post-delete` → PostDelete, `helm.sh/hook-weight` → wave,
//! `helm.sh/hook-delete-policy`, tests skipped).
//!
//! Hooks are taken out of a plan's objects: they are run in their phase (the daemon does it),
//! never part of the app's inventory, never pruned, never self-healed.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ApplyError;
use crate::render::Object;

pub(crate) const HOOK_ANNOTATION: &str = "argocd.argoproj.io/hook";
const DELETE_POLICY_ANNOTATION: &str = "argocd.argoproj.io/hook-delete-policy";
const HELM_HOOK: &str = "helm.sh/hook";
const HELM_WEIGHT: &str = "helm.sh/hook-weight";
const HELM_DELETE_POLICY: &str = "helm.sh/hook-delete-policy";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) enum HookPhase {
    PreSync,
    Sync,
    PostSync,
    SyncFail,
    PostDelete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum DeletePolicy {
    HookSucceeded,
    HookFailed,
    BeforeHookCreation,
}

/// One hook of a plan: the object (annotated as the app's), the phases it runs in, its wave
/// and when it is deleted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Hook {
    pub(crate) object: Object,
    pub(crate) phases: Vec<HookPhase>,
    pub(crate) wave: i64,
    pub(crate) delete: Vec<DeletePolicy>,
}

impl Hook {
    /// Whether the hook is waited on until it finishes (a Job or a bare Pod); other hooks are
    /// done once created, as in Argo CD.
    pub(crate) fn runs(&self) -> bool {
        matches!(
            (self.object.group(), self.object.kind()),
            ("batch", "Job") | ("", "Pod")
        )
    }

    pub(crate) fn deleted(&self, policy: DeletePolicy) -> bool {
        self.delete.contains(&policy)
    }
}

/// What an object's annotations make of it.
#[derive(Debug, PartialEq)]
pub(crate) enum Role {
    /// An ordinary object of the app.
    Resource,
    /// Not applied at all (`Skip`, Helm test hooks, Helm hooks Argo CD does not run).
    Skipped(String),
    Hook(Hook),
}

fn annotation<'a>(object: &'a Object, key: &str) -> Option<&'a str> {
    object
        .value
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(key))
        .and_then(Value::as_str)
}

fn list(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Reads `object`'s hook annotations; `wave` is its sync wave (`argocd.argoproj.io/sync-wave`),
/// which Helm's hook weight stands in for when the wave is not set.
pub(crate) fn role(object: &Object, wave: i64) -> Result<Role, ApplyError> {
    let bad = |message: String| ApplyError::BadAnnotation {
        object: object.display_name(),
        origin: object.origin.clone(),
        message,
    };
    if let Some(text) = annotation(object, HOOK_ANNOTATION) {
        let mut phases = Vec::new();
        for name in list(text) {
            phases.push(match name {
                "PreSync" => HookPhase::PreSync,
                "Sync" => HookPhase::Sync,
                "PostSync" => HookPhase::PostSync,
                "SyncFail" => HookPhase::SyncFail,
                "PostDelete" => HookPhase::PostDelete,
                "Skip" => return Ok(Role::Skipped(format!("{HOOK_ANNOTATION}: Skip"))),
                other => return Err(bad(format!("{HOOK_ANNOTATION} {other:?} is not a hook type (PreSync, Sync, PostSync, SyncFail, PostDelete, Skip)"))),
            });
        }
        let delete = match annotation(object, DELETE_POLICY_ANNOTATION) {
            None => vec![DeletePolicy::BeforeHookCreation],
            Some(text) => list(text)
                .map(|p| match p {
                    "HookSucceeded" => Ok(DeletePolicy::HookSucceeded),
                    "HookFailed" => Ok(DeletePolicy::HookFailed),
                    "BeforeHookCreation" => Ok(DeletePolicy::BeforeHookCreation),
                    other => Err(bad(format!(
                        "{DELETE_POLICY_ANNOTATION} {other:?} is not HookSucceeded, HookFailed or BeforeHookCreation"
                    ))),
                })
                .collect::<Result<_, _>>()?,
        };
        return Ok(Role::Hook(Hook {
            object: object.clone(),
            phases,
            wave,
            delete,
        }));
    }
    let Some(text) = annotation(object, HELM_HOOK) else {
        return Ok(Role::Resource);
    };
    let mut phases = Vec::new();
    for name in list(text) {
        match name {
            "pre-install" | "pre-upgrade" => phases.push(HookPhase::PreSync),
            "post-install" | "post-upgrade" => phases.push(HookPhase::PostSync),
            "post-delete" => phases.push(HookPhase::PostDelete),
            // Helm 2's CRD hook: an ordinary resource for Argo CD.
            "crd-install" => return Ok(Role::Resource),
            "test" | "test-success" | "test-failure" => {
                return Ok(Role::Skipped(format!("{HELM_HOOK}: {name} (a Helm test)")))
            }
            other => {
                return Ok(Role::Skipped(format!(
                    "{HELM_HOOK}: {other}, which Argo CD does not run"
                )))
            }
        }
    }
    phases.dedup();
    let wave = match annotation(object, HELM_WEIGHT) {
        Some(weight) if wave == 0 => weight
            .trim()
            .parse()
            .map_err(|_| bad(format!("{HELM_WEIGHT} {weight:?} is not an integer")))?,
        _ => wave,
    };
    let delete = match annotation(object, HELM_DELETE_POLICY) {
        None => vec![DeletePolicy::BeforeHookCreation],
        Some(text) => list(text)
            .filter_map(|p| match p {
                "hook-succeeded" => Some(DeletePolicy::HookSucceeded),
                "hook-failed" => Some(DeletePolicy::HookFailed),
                "before-hook-creation" => Some(DeletePolicy::BeforeHookCreation),
                _ => None,
            })
            .collect(),
    };
    Ok(Role::Hook(Hook {
        object: object.clone(),
        phases,
        wave,
        delete,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(annotations: Value) -> Object {
        let value = serde_json::json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "migrate", "annotations": annotations}});
        Object {
            value: value.as_object().cloned().unwrap_or_default(),
            origin: "t.yaml#0".into(),
        }
    }

    fn hook(annotations: Value) -> Hook {
        match role(&object(annotations), 0).unwrap() {
            Role::Hook(hook) => hook,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn argo_cd_hooks_and_delete_policies_are_read() {
        let h = hook(serde_json::json!({HOOK_ANNOTATION: "PreSync,SyncFail"}));
        assert_eq!(h.phases, [HookPhase::PreSync, HookPhase::SyncFail]);
        assert_eq!(h.delete, [DeletePolicy::BeforeHookCreation]);
        assert!(h.runs());
        let h = hook(serde_json::json!({HOOK_ANNOTATION: "PostSync",
            DELETE_POLICY_ANNOTATION: "HookSucceeded"}));
        assert!(h.deleted(DeletePolicy::HookSucceeded));
        assert!(!h.deleted(DeletePolicy::BeforeHookCreation));
        assert!(matches!(
            role(&object(serde_json::json!({HOOK_ANNOTATION: "Skip"})), 0),
            Ok(Role::Skipped(_))
        ));
        assert!(role(&object(serde_json::json!({HOOK_ANNOTATION: "Later"})), 0).is_err());
        assert_eq!(
            role(&object(serde_json::json!({})), 0).unwrap(),
            Role::Resource
        );
    }

    #[test]
    fn helm_hooks_map_as_argo_cd_maps_them() {
        let h = hook(serde_json::json!({HELM_HOOK: "pre-install,pre-upgrade",
            HELM_WEIGHT: "-5", HELM_DELETE_POLICY: "hook-succeeded"}));
        assert_eq!(h.phases, [HookPhase::PreSync]);
        assert_eq!(h.wave, -5);
        assert_eq!(h.delete, [DeletePolicy::HookSucceeded]);
        let h = hook(serde_json::json!({HELM_HOOK: "post-upgrade"}));
        assert_eq!(h.phases, [HookPhase::PostSync]);
        let h = hook(serde_json::json!({HELM_HOOK: "post-delete"}));
        assert_eq!(h.phases, [HookPhase::PostDelete]);
        for skipped in ["test", "pre-delete", "pre-rollback"] {
            assert!(
                matches!(
                    role(&object(serde_json::json!({HELM_HOOK: skipped})), 0),
                    Ok(Role::Skipped(_))
                ),
                "{skipped}"
            );
        }
        // Argo CD's own annotation wins over Helm's.
        let h = hook(serde_json::json!({HELM_HOOK: "pre-install", HOOK_ANNOTATION: "PostSync"}));
        assert_eq!(h.phases, [HookPhase::PostSync]);
    }
}
