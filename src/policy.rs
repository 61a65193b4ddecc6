//! Policy stage: Argo CD AppProject rules, checked before anything of an app is applied.
//! Pure: a project and plain values in, the first violated rule out.
//!
//! As in Argo CD: the `default` project allows everything; sourceRepos and destination
//! namespaces are globs (`*`, `?`, and `!` to deny); cluster-scoped kinds are refused unless
//! `clusterResourceWhitelist` lists them; a non-empty `namespaceResourceWhitelist` limits
//! namespaced kinds; blacklists refuse what they list.

use serde_json::Value;

/// `*` matches any run of characters (`/` included), `?` exactly one.
pub fn glob(pattern: &str, text: &str) -> bool {
    fn inner(p: &[char], t: &[char]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some('*'), _) => inner(&p[1..], t) || (!t.is_empty() && inner(p, &t[1..])),
            (Some('?'), Some(_)) => inner(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => inner(&p[1..], &t[1..]),
            _ => false,
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    inner(&p, &t)
}

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    pub name: String,
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

impl Project {
    /// From an AppProject's `spec`.
    pub fn from_spec(name: &str, spec: &Value) -> Project {
        Project {
            name: name.to_string(),
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

    pub fn check_source(&self, repo: &str) -> Result<(), String> {
        if allowed_by(&self.source_repos, repo) {
            Ok(())
        } else {
            Err(format!(
                "source repository {repo} is not permitted by project {} (sourceRepos)",
                self.name
            ))
        }
    }

    pub fn check_destination(&self, namespace: &str) -> Result<(), String> {
        if allowed_by(&self.destination_namespaces, namespace) {
            Ok(())
        } else {
            Err(format!(
                "destination namespace {namespace} is not permitted by project {} (destinations)",
                self.name
            ))
        }
    }

    /// Whether an object of `group`/`kind` may be applied; `namespaced` from discovery.
    pub fn check_kind(&self, group: &str, kind: &str, namespaced: bool) -> Result<(), String> {
        let gk = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let refuse = |list: &str| {
            Err(format!(
                "{gk} is not permitted by project {} ({list})",
                self.name
            ))
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
    fn globs() {
        assert!(glob("dictamesh-*", "dictamesh-dev"));
        assert!(!glob("dictamesh-*", "other"));
        assert!(glob("*", ""));
        assert!(glob(
            "https://github.com/org/*",
            "https://github.com/org/a/b.git"
        ));
        assert!(glob("v?", "v1") && !glob("v?", "v10"));
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
            .contains("sourceRepos"));
        assert!(p.check_destination("dictamesh-dev").is_ok());
        assert!(p
            .check_destination("kube-system")
            .unwrap_err()
            .contains("destinations"));
        assert!(p
            .check_kind("rbac.authorization.k8s.io", "ClusterRole", false)
            .is_ok());
        let err = p
            .check_kind("rbac.authorization.k8s.io", "ClusterRoleBinding", false)
            .unwrap_err();
        assert!(
            err.contains("ClusterRoleBinding.rbac.authorization.k8s.io")
                && err.contains("clusterResourceWhitelist"),
            "{err}"
        );
        assert!(p.check_kind("apps", "Deployment", true).is_ok());
        assert!(p
            .check_kind("", "ResourceQuota", true)
            .unwrap_err()
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
