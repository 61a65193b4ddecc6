//! The checks a sync passes before anything is applied: sync windows, signatures, the
//! AppProject's rules, and claims (no object managed by two apps); and the orphan warning.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::sync::{SyncContext, SyncError, Target};
use crate::apply::{self, ObjectRef};
use crate::config::{AppConfig, RepositoryConfig};
use crate::model::window::Window;
use crate::policy::{Denied, WindowSpecError};
use crate::source::GitSource;
use crate::state::AppState;

/// A sync window that covers an app but cannot be read: it holds the app's syncs.
#[derive(Debug, thiserror::Error)]
#[error("sync window {index} cannot be read ({source})")]
pub(crate) struct UnreadableWindow {
    index: usize,
    source: WindowSpecError,
}

/// The sync windows that cover `app`, or why one of them cannot be read.
pub(crate) fn windows_of(
    projects: &BTreeMap<String, crate::policy::Project>,
    app: &AppConfig,
) -> Result<Vec<Window>, UnreadableWindow> {
    super::node::sync_windows(projects, app)
        .into_iter()
        .enumerate()
        .map(|(index, w)| {
            w.and_then(|w| Ok(Window::new(&w)?))
                .map_err(|source| UnreadableWindow { index, source })
        })
        .collect()
}

/// The scope a CustomResourceDefinition in `plan` gives `group`/`kind`: `Some(true)` for
/// namespaced, `None` when no CRD of the plan defines the kind.
pub(super) fn plan_scope(plan: &apply::Plan, group: &str, kind: &str) -> Option<bool> {
    let text = |spec: &serde_json::Value, pointer: &str| {
        spec.pointer(pointer)
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
    };
    plan.rendered_objects()
        .filter(|o| o.group() == "apiextensions.k8s.io" && o.kind() == "CustomResourceDefinition")
        .filter_map(|crd| crd.value.get("spec"))
        .find(|spec| {
            text(spec, "/group").as_deref() == Some(group)
                && text(spec, "/names/kind").as_deref() == Some(kind)
        })
        .and_then(|spec| text(spec, "/scope"))
        .map(|scope| scope != "Cluster")
}

/// Checks that `target` (reached from `revision` of `repo`) is signed by a key of `keyring`
/// that `allowed` names; `required_by` says who asks, for messages. Returns the signed
/// object's name and the signer. Blocking (Git I/O).
pub(crate) fn verify_revision(
    source: &GitSource,
    keyring: &crate::signature::Keyring,
    repo: &RepositoryConfig,
    revision: &str,
    target: &Target,
    required_by: &str,
    allowed: &[String],
) -> Result<(String, crate::signature::Signer), SyncError> {
    let signed = source.signed(repo, revision, &target.sha, target.tag.as_ref())?;
    let signer = keyring.verify(&signed, required_by, allowed)?;
    Ok((signed.object, signer))
}

/// An object's identity, as the drift engine keys it (its strings shared).
pub(super) type ClaimKey = super::drift::Key;

fn claim_key(group: &str, kind: &str, namespace: Option<&str>, name: &str) -> ClaimKey {
    super::drift::Key::new(group, kind, namespace, name)
}

impl SyncContext {
    /// Refuses a plan with an object another app of this node manages or is about to: two
    /// apps applying one object would overwrite each other on every sync. The app that has it
    /// keeps it; nothing of this app is applied until one of them lets go. Claims are taken
    /// under one lock, so two apps syncing at once cannot both pass.
    pub(super) fn check_conflicts(
        &self,
        app: &AppConfig,
        plan: &apply::Plan,
    ) -> Result<(), SyncError> {
        let mut guard = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        let claims = guard.get_or_insert_with(|| {
            let mut claims = HashMap::new();
            for other in &self.config.apps {
                if let Ok(state) = self.store.load(&other.name) {
                    let owner: Arc<str> = other.name.as_str().into();
                    for o in &state.objects {
                        claims.insert(
                            claim_key(&o.group, &o.kind, o.namespace.as_deref(), &o.name),
                            owner.clone(),
                        );
                    }
                }
            }
            claims
        });
        let mut mine = Vec::new();
        for object in plan.rendered_objects() {
            let ns = object.namespace().or(plan.default_namespace.as_deref());
            let key = claim_key(object.group(), object.kind(), ns, object.name());
            // Cluster-scoped objects are recorded without a namespace.
            let bare = claim_key(object.group(), object.kind(), None, object.name());
            let owner = [&key, &bare]
                .into_iter()
                .find_map(|k| claims.get(k).filter(|o| ***o != *app.name));
            if let Some(owner) = owner {
                return Err(SyncError::Conflict(format!(
                    "{} ({}) is already managed by app {owner}; two apps must not manage one object",
                    object.display_name(),
                    object.origin
                )));
            }
            mine.push(key);
        }
        claims.retain(|_, owner| **owner != *app.name);
        let owner: Arc<str> = app.name.as_str().into();
        for key in mine {
            claims.insert(key, owner.clone());
        }
        Ok(())
    }

    /// The app's AppProject rules, for the whole plan, before anything is applied.
    pub(super) async fn check_policy(
        &self,
        app: &AppConfig,
        plan: &apply::Plan,
    ) -> Result<(), SyncError> {
        let Some(name) = app.project.as_deref() else {
            return Ok(());
        };
        let project = match self.projects.get(name) {
            Some(project) => project,
            // Argo CD's `default` project allows everything unless the fleet defines it.
            None if name == "default" => return Ok(()),
            None => return Err(SyncError::Policy(Denied::Undefined(name.to_string()))),
        };
        for (repo, _) in app.repositories() {
            project.check_source(repo)?;
        }
        if let Some(ns) = &app.namespace {
            project.check_destination(ns)?;
        }
        let hooks = plan.hooks.iter().map(|h| &h.object);
        for object in plan.rendered_objects().chain(hooks) {
            let refused = |unknown_scope: bool| {
                move |e: Denied| {
                    SyncError::Policy(Denied::Object {
                        object: object.display_name(),
                        origin: object.origin.clone(),
                        unknown_scope,
                        source: Box::new(e),
                    })
                }
            };
            // The scope from discovery, or from a CRD in this very plan; a kind whose scope
            // is not known (discovery failed, or nothing defines it) must pass the rules of
            // both scopes: policy fails closed.
            let scope = match self.cluster.is_namespaced(object).await {
                Some(namespaced) => Some(namespaced),
                None => plan_scope(plan, object.group(), object.kind()),
            };
            let scopes: &[bool] = match scope {
                Some(true) => &[true],
                Some(false) => &[false],
                None => &[true, false],
            };
            for &namespaced in scopes {
                project
                    .check_kind(object.group(), object.kind(), namespaced)
                    .map_err(refused(scope.is_none()))?;
            }
            if let (false, Some(ns)) = (scope == Some(false), object.namespace()) {
                project.check_destination(ns).map_err(refused(false))?;
            }
        }
        Ok(())
    }

    /// AppProject `orphanedResources.warn`: objects of the kinds the app applies, in its
    /// namespace, that no app manages and nothing owns, are reported (log and status), as Argo
    /// CD warns about them. Objects every namespace has (`kube-root-ca.crt`, the `default`
    /// ServiceAccount) and the project's `ignore` entries are left out.
    pub(super) async fn orphan_warnings(&self, app: &AppConfig, state: &AppState) -> Vec<String> {
        let Some(ignore) = app
            .project
            .as_deref()
            .and_then(|p| self.projects.get(p))
            .and_then(|p| p.orphans_warn.as_ref())
        else {
            return Vec::new();
        };
        let Some(ns) = app.namespace.as_deref() else {
            return Vec::new();
        };
        let mut kinds: Vec<&ObjectRef> = Vec::new();
        for o in state
            .objects
            .iter()
            .filter(|o| o.namespace.as_deref() == Some(ns))
        {
            if !kinds.iter().any(|k| k.group == o.group && k.kind == o.kind) {
                kinds.push(o);
            }
        }
        let mut orphans = Vec::new();
        for kind in kinds {
            let Ok(listed) = self.cluster.list_meta(kind, ns).await else {
                continue;
            };
            for (name, managed, owned) in listed {
                let system = matches!(
                    (kind.kind.as_str(), name.as_str()),
                    ("ConfigMap", "kube-root-ca.crt") | ("ServiceAccount", "default")
                );
                if managed
                    || owned
                    || system
                    || ignore
                        .iter()
                        .any(|i| i.matches(&kind.group, &kind.kind, &name))
                {
                    continue;
                }
                orphans.push(format!("{} {ns}/{name}", kind.kind));
            }
        }
        if orphans.is_empty() {
            Vec::new()
        } else {
            tracing::warn!(app = %app.name, count = orphans.len(), "orphaned resources: {}", orphans.join(", "));
            vec![format!(
                "{} orphaned resources: {}",
                orphans.len(),
                orphans.join(", ")
            )]
        }
    }

    /// Who requires the app's revision to be signed, and by which keys: its project, when
    /// that lists signatureKeys.
    pub(super) fn required_signers(&self, app: &AppConfig) -> Option<(String, Vec<String>)> {
        let name = app.project.as_deref()?;
        self.projects.get(name)?.required_signers()
    }
}

/// What of the render's hooks will not run: `PostDelete` hooks run when the app leaves the
/// node with its objects (`delete_on_removal`, the resources finalizer); without it they are
/// named in the app's warnings, never dropped silently.
pub(super) fn hook_warnings(app: &AppConfig, plan: &apply::Plan) -> Vec<String> {
    if app.delete_on_removal {
        return Vec::new();
    }
    let unrun: Vec<String> = plan
        .hooks
        .iter()
        .filter(|h| {
            h.phases
                .contains(&crate::apply::hooks::HookPhase::PostDelete)
        })
        .map(|h| h.object.display_name())
        .collect();
    if unrun.is_empty() {
        return Vec::new();
    }
    tracing::warn!(app = %app.name, hooks = %unrun.join(", "), "PostDelete hooks will not run");
    vec![format!(
        "{} PostDelete hooks will not run: they run when the app is removed with its objects (resources finalizer, delete_on_removal), which this app is not: {}",
        unrun.len(),
        unrun.join(", ")
    )]
}
