//! Policy stage: Argo CD AppProject rules, checked before anything of an app is applied.
//! Pure: a project and plain values in, the first violated rule out.
//!
//! As in Argo CD: the `default` project allows everything; sourceRepos and destination
//! namespaces are globs (`*`, `?`, and `!` to deny); cluster-scoped kinds are refused unless
//! `clusterResourceWhitelist` lists them; a non-empty `namespaceResourceWhitelist` limits
//! namespaced kinds; blacklists refuse what they list.

use serde_json::Value;

use crate::config::sync_policy::{SyncWindow, WindowKind};

pub(crate) use crate::model::glob::glob;

/// Allowed if some pattern allows it and no `!pattern` denies it.
fn allowed_by(patterns: &[String], text: &str) -> bool {
    let denied = patterns
        .iter()
        .filter_map(|p| p.strip_prefix('!'))
        .any(|p| glob(p, text));
    let allowed = patterns
        .iter()
        .filter(|p| !p.starts_with('!'))
        .any(|p| glob(p, text));
    allowed && !denied
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct GroupKind {
    group: String,
    kind: String,
}

impl GroupKind {
    fn matches(&self, group: &str, kind: &str) -> bool {
        glob(&self.group, group) && glob(&self.kind, kind)
    }
}

/// An `orphanedResources.ignore` entry (globs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OrphanIgnore {
    group: String,
    kind: String,
    name: String,
}

impl OrphanIgnore {
    pub(crate) fn matches(&self, group: &str, kind: &str, name: &str) -> bool {
        glob(&self.group, group) && glob(&self.kind, kind) && glob(&self.name, name)
    }
}

/// Why a project refuses an app's source, its destination or one of its objects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Denied {
    #[error("source repository {repo} is not permitted by project {project} (sourceRepos)")]
    Source { repo: String, project: String },
    #[error(
        "destination namespace {namespace} is not permitted by project {project} (destinations)"
    )]
    Destination { namespace: String, project: String },
    #[error("{kind} is not permitted by project {project} ({list})")]
    Kind {
        kind: String,
        project: String,
        list: &'static str,
    },
    #[error("project {0} is not defined in the fleet")]
    Undefined(String),
    /// An object of the render refused, named with where it came from.
    #[error("{object} ({origin}): {source}{}", if *.unknown_scope { " (its scope is not known yet, so both scopes' rules apply)" } else { "" })]
    Object {
        object: String,
        origin: String,
        unknown_scope: bool,
        source: Box<Denied>,
    },
}

/// A sync window (an AppProject's `syncWindows` entry) that cannot be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum WindowSpecError {
    #[error("kind {0:?} is neither allow nor deny")]
    Kind(Option<String>),
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("duration: {0}")]
    Duration(#[from] crate::model::human::DurationError),
    #[error(transparent)]
    Window(#[from] crate::model::window::WindowError),
}

/// An AppProject sync window and the apps it covers.
#[derive(Debug, Clone, PartialEq)]
struct ProjectWindow {
    /// The window, or why it cannot be read (such a window holds what it covers).
    window: Result<SyncWindow, WindowSpecError>,
    applications: Vec<String>,
    namespaces: Vec<String>,
    clusters: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Project {
    pub(crate) name: String,
    /// What in the spec could not be used, for the fleet's problem list.
    pub(crate) warnings: Vec<String>,
    windows: Vec<ProjectWindow>,
    /// `orphanedResources` with `warn: true`: objects in an app's namespace that no app manages
    /// are reported, except these `ignore` entries.
    pub(crate) orphans_warn: Option<Vec<OrphanIgnore>>,
    /// `signatureKeys[].keyID`: a revision must be signed by one of these (see
    /// [`crate::signature`]). Empty: signatures are not required.
    pub(crate) signature_keys: Vec<String>,
    source_repos: Vec<String>,
    destination_namespaces: Vec<String>,
    cluster_whitelist: Vec<GroupKind>,
    cluster_blacklist: Vec<GroupKind>,
    namespace_whitelist: Vec<GroupKind>,
    namespace_blacklist: Vec<GroupKind>,
}

fn strings(spec: &Value, key: &str) -> Vec<String> {
    spec.get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

fn group_kinds(spec: &Value, key: &str) -> Vec<GroupKind> {
    spec.get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|v| GroupKind {
            group: v
                .get("group")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            kind: v
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        })
        .collect()
}

/// One `spec.syncWindows` entry: kind, schedule, duration (Go's `1h30m` form), timeZone,
/// manualSync, and the applications, namespaces and clusters it covers.
fn project_window(w: &Value) -> ProjectWindow {
    ProjectWindow {
        window: window_of(w),
        applications: strings(w, "applications"),
        namespaces: strings(w, "namespaces"),
        clusters: strings(w, "clusters"),
    }
}

fn window_of(w: &Value) -> Result<SyncWindow, WindowSpecError> {
    let text = |key: &str| w.get(key).and_then(Value::as_str);
    let kind = match text("kind") {
        Some("allow") => WindowKind::Allow,
        Some("deny") => WindowKind::Deny,
        other => return Err(WindowSpecError::Kind(other.map(str::to_string))),
    };
    let duration = text("duration").ok_or(WindowSpecError::Missing("duration"))?;
    let window = SyncWindow {
        kind,
        schedule: text("schedule")
            .ok_or(WindowSpecError::Missing("schedule"))?
            .to_string(),
        duration: crate::model::human::parse(duration)?,
        time_zone: text("timeZone").unwrap_or("UTC").to_string(),
        manual_sync: w
            .get("manualSync")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    crate::model::window::Window::new(&window)?;
    Ok(window)
}

impl Project {
    /// From an AppProject's `spec`.
    pub(crate) fn from_spec(name: &str, spec: &Value) -> Project {
        let mut warnings = Vec::new();
        let mut windows = Vec::new();
        let listed = spec.get("syncWindows").and_then(Value::as_array);
        for (i, w) in listed.into_iter().flatten().enumerate() {
            let window = project_window(w);
            if let Err(why) = &window.window {
                warnings.push(format!(
                    "AppProject {name}: spec.syncWindows[{i}]: {why}; it holds the syncs of \
                     the apps it covers until it is fixed"
                ));
            }
            windows.push(window);
        }
        let orphans_warn = spec
            .get("orphanedResources")
            .filter(|o| o.get("warn").and_then(Value::as_bool).unwrap_or(false))
            .map(|o| {
                o.get("ignore")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|i| OrphanIgnore {
                        group: i.get("group").and_then(Value::as_str).unwrap_or("").into(),
                        kind: i.get("kind").and_then(Value::as_str).unwrap_or("*").into(),
                        name: i.get("name").and_then(Value::as_str).unwrap_or("*").into(),
                    })
                    .collect()
            });
        let mut signature_keys = Vec::new();
        let keys = spec.get("signatureKeys").and_then(Value::as_array);
        for (i, key) in keys.into_iter().flatten().enumerate() {
            match key.get("keyID").and_then(Value::as_str) {
                Some(id) if !id.trim().is_empty() => signature_keys.push(id.trim().to_string()),
                // Dropping it could leave the list empty and turn verification off: keep an
                // entry no key matches instead.
                _ => {
                    warnings.push(format!(
                        "AppProject {name}: spec.signatureKeys[{i}] has no keyID; no key matches it"
                    ));
                    signature_keys.push(String::new());
                }
            }
        }
        Project {
            name: name.to_string(),
            warnings,
            signature_keys,
            windows,
            orphans_warn,
            source_repos: strings(spec, "sourceRepos"),
            destination_namespaces: spec
                .get("destinations")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|d| {
                    // Only destinations that can be this node's own cluster count.
                    let server = d.get("server").and_then(Value::as_str).unwrap_or("*");
                    let name = d.get("name").and_then(Value::as_str).unwrap_or("*");
                    glob(server, "https://kubernetes.default.svc") || glob(name, "in-cluster")
                })
                .filter_map(|d| {
                    d.get("namespace")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .collect(),
            cluster_whitelist: group_kinds(spec, "clusterResourceWhitelist"),
            cluster_blacklist: group_kinds(spec, "clusterResourceBlacklist"),
            namespace_whitelist: group_kinds(spec, "namespaceResourceWhitelist"),
            namespace_blacklist: group_kinds(spec, "namespaceResourceBlacklist"),
        }
    }

    /// The project's sync windows that cover the app `app` with destination `namespace`:
    /// those whose `applications` or `namespaces` globs match, or whose `clusters` name the
    /// node's own cluster, as in Argo CD. A window that cannot be read is an `Err` saying why.
    pub(crate) fn sync_windows(
        &self,
        app: &str,
        namespace: Option<&str>,
    ) -> Vec<Result<SyncWindow, WindowSpecError>> {
        self.windows
            .iter()
            .filter(|w| {
                w.applications.iter().any(|p| glob(p, app))
                    || namespace.is_some_and(|ns| w.namespaces.iter().any(|p| glob(p, ns)))
                    || w.clusters
                        .iter()
                        .any(|p| glob(p, "https://kubernetes.default.svc") || glob(p, "in-cluster"))
            })
            .map(|w| w.window.clone())
            .collect()
    }

    /// Who requires signed revisions and which keys it accepts, when `signatureKeys` is set.
    pub(crate) fn required_signers(&self) -> Option<(String, Vec<String>)> {
        (!self.signature_keys.is_empty()).then(|| {
            (
                format!("project {} (signatureKeys)", self.name),
                self.signature_keys.clone(),
            )
        })
    }

    pub(crate) fn check_source(&self, repo: &str) -> Result<(), Denied> {
        if allowed_by(&self.source_repos, repo) {
            Ok(())
        } else {
            Err(Denied::Source {
                repo: repo.to_string(),
                project: self.name.clone(),
            })
        }
    }

    pub(crate) fn check_destination(&self, namespace: &str) -> Result<(), Denied> {
        if allowed_by(&self.destination_namespaces, namespace) {
            Ok(())
        } else {
            Err(Denied::Destination {
                namespace: namespace.to_string(),
                project: self.name.clone(),
            })
        }
    }

    /// Whether an object of `group`/`kind` may be applied; `namespaced` from discovery.
    pub(crate) fn check_kind(
        &self,
        group: &str,
        kind: &str,
        namespaced: bool,
    ) -> Result<(), Denied> {
        let gk = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let refuse = |list: &'static str| {
            Err(Denied::Kind {
                kind: gk.clone(),
                project: self.name.clone(),
                list,
            })
        };
        if namespaced {
            if self
                .namespace_blacklist
                .iter()
                .any(|g| g.matches(group, kind))
            {
                return refuse("namespaceResourceBlacklist");
            }
            if !self.namespace_whitelist.is_empty()
                && !self
                    .namespace_whitelist
                    .iter()
                    .any(|g| g.matches(group, kind))
            {
                return refuse("namespaceResourceWhitelist");
            }
        } else {
            if self
                .cluster_blacklist
                .iter()
                .any(|g| g.matches(group, kind))
            {
                return refuse("clusterResourceBlacklist");
            }
            if !self
                .cluster_whitelist
                .iter()
                .any(|g| g.matches(group, kind))
            {
                return refuse("clusterResourceWhitelist");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The seed's dictamesh project.
    fn dictamesh() -> Project {
        Project::from_spec(
            "dictamesh",
            &json!({
                "sourceRepos": ["https://github.com/controle-digital/dictamesh.git", "https://charts.bitnami.com/bitnami"],
                "destinations": [
                    {"namespace": "dictamesh-*", "server": "https://kubernetes.default.svc"},
                    {"namespace": "argocd", "server": "https://kubernetes.default.svc"}
                ],
                "clusterResourceWhitelist": [
                    {"group": "", "kind": "Namespace"},
                    {"group": "rbac.authorization.k8s.io", "kind": "ClusterRole"}
                ],
                "namespaceResourceWhitelist": [{"group": "*", "kind": "*"}],
                "namespaceResourceBlacklist": [{"group": "", "kind": "ResourceQuota"}]
            }),
        )
    }

    #[test]
    fn project_sync_windows_cover_apps_by_name_namespace_or_cluster() {
        let p = Project::from_spec(
            "edge",
            &json!({"syncWindows": [
                {"kind": "deny", "schedule": "0 22 * * *", "duration": "1h30m",
                 "applications": ["db-*"], "timeZone": "Europe/Berlin"},
                {"kind": "allow", "schedule": "0 6 * * *", "duration": "2h",
                 "namespaces": ["prod-*"], "manualSync": true},
                {"kind": "allow", "schedule": "@daily", "duration": "1h", "clusters": ["in-cluster"]},
                {"kind": "sometimes", "schedule": "* * * * *", "duration": "1h"},
            ]}),
        );
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(p.warnings[0].contains("syncWindows[3]"), "{:?}", p.warnings);
        // Unreadable, and covering no app: nothing to hold.
        let ok = |ws: Vec<Result<SyncWindow, WindowSpecError>>| -> Vec<SyncWindow> {
            ws.into_iter().map(|w| w.unwrap()).collect()
        };
        let db = ok(p.sync_windows("db-main", Some("dev")));
        assert_eq!(db.len(), 2);
        assert_eq!(db[0].kind, WindowKind::Deny);
        assert_eq!(db[0].duration, std::time::Duration::from_secs(5400));
        assert_eq!(db[0].time_zone, "Europe/Berlin");
        let prod = ok(p.sync_windows("web", Some("prod-eu")));
        assert_eq!(prod.len(), 2);
        assert!(prod[0].manual_sync);
        assert_eq!(p.sync_windows("web", Some("dev")).len(), 1);
        // An unreadable window that covers an app is there, as an error.
        let broken = Project::from_spec(
            "edge",
            &json!({"syncWindows": [
                {"kind": "deny", "schedule": "0 25 * * *", "duration": "1h", "applications": ["*"]},
            ]}),
        );
        let windows = broken.sync_windows("web", None);
        assert_eq!(windows.len(), 1);
        assert!(windows[0].is_err(), "{windows:?}");
    }

    #[test]
    fn negated_patterns_deny() {
        assert!(allowed_by(&["*".into(), "!kube-*".into()], "apps"));
        assert!(!allowed_by(&["*".into(), "!kube-*".into()], "kube-system"));
    }

    #[test]
    fn seed_project_rules() {
        let p = dictamesh();
        assert!(p
            .check_source("https://github.com/controle-digital/dictamesh.git")
            .is_ok());
        assert!(p
            .check_source("https://github.com/evil/x.git")
            .unwrap_err()
            .to_string()
            .contains("sourceRepos"));
        assert!(p.check_destination("dictamesh-dev").is_ok());
        assert!(p
            .check_destination("kube-system")
            .unwrap_err()
            .to_string()
            .contains("destinations"));
        assert!(p
            .check_kind("rbac.authorization.k8s.io", "ClusterRole", false)
            .is_ok());
        let err = p
            .check_kind("rbac.authorization.k8s.io", "ClusterRoleBinding", false)
            .unwrap_err();
        assert!(
            matches!(&err, Denied::Kind { list, .. } if *list == "clusterResourceWhitelist"),
            "{err}"
        );
        let err = err.to_string();
        assert!(
            err.contains("ClusterRoleBinding.rbac.authorization.k8s.io")
                && err.contains("clusterResourceWhitelist"),
            "{err}"
        );
        assert!(p.check_kind("apps", "Deployment", true).is_ok());
        assert!(p
            .check_kind("", "ResourceQuota", true)
            .unwrap_err()
            .to_string()
            .contains("Blacklist"));
    }

    #[test]
    fn no_cluster_whitelist_means_no_cluster_resources() {
        let p = Project::from_spec(
            "p",
            &json!({"sourceRepos": ["*"], "destinations": [{"namespace": "*", "server": "*"}]}),
        );
        assert!(p.check_kind("", "Namespace", false).is_err());
        assert!(
            p.check_kind("", "ConfigMap", true).is_ok(),
            "no namespace whitelist: all namespaced kinds"
        );
        assert!(p.check_destination("anything").is_ok());
    }
}
