//! Chart dependencies, as Argo CD builds them: a chart whose `Chart.yaml` lists dependencies
//! that `charts/` does not hold gets them from `helm dependency build` (each HTTP(S)
//! repository added first, as Argo CD adds them), in a copy of the chart: the checkout stays
//! as Git has it. The built archives are kept by the digest of `Chart.yaml` and `Chart.lock`,
//! so a node offline renders again from what it built before.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::process::RunError;

/// What stops a chart from being prepared for `helm template`: reading it, or building its
/// dependencies.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the chart has more than {0} files")]
    TooManyFiles(usize),
    #[error("Chart.yaml: {0}")]
    ChartYaml(#[source] Box<super::RenderError>),
    #[error("Chart.yaml: a dependency has no name")]
    UnnamedDependency,
    #[error("cannot copy the chart to build it: {0}")]
    Copy(#[source] std::io::Error),
    #[error("cannot use the built dependencies: {0}")]
    Cached(#[source] std::io::Error),
    #[error("cannot write the dependency repositories for helm: {0}")]
    Logins(#[source] std::io::Error),
    #[error("helm {command}: {source}")]
    Run { command: String, source: RunError },
    #[error("helm {command} failed: {stderr}")]
    Failed { command: String, stderr: String },
}

/// The dependencies `chart` lists but does not vendor in `charts/` (by name, or an archive
/// `<name>-<version>.tgz`); empty when there is nothing to build.
pub(crate) fn missing(chart: &Path) -> Result<Vec<(String, String)>, PrepareError> {
    let file = chart.join("Chart.yaml");
    let text = std::fs::read_to_string(&file).map_err(|source| PrepareError::Read {
        path: PathBuf::from("Chart.yaml"),
        source,
    })?;
    let meta: Value = super::yaml::parse_documents(&text, Path::new("Chart.yaml"))
        .map_err(|e| PrepareError::ChartYaml(Box::new(e)))?
        .into_iter()
        .next()
        .unwrap_or(Value::Null);
    let mut missing = Vec::new();
    for dep in meta
        .get("dependencies")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let text = |key: &str| dep.get(key).and_then(Value::as_str).unwrap_or_default();
        let (name, repository) = (text("name"), text("repository"));
        if name.is_empty() {
            return Err(PrepareError::UnnamedDependency);
        }
        let vendored = chart.join("charts").join(name).is_dir()
            || std::fs::read_dir(chart.join("charts"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| {
                    let file = e.file_name().to_string_lossy().to_string();
                    file.starts_with(&format!("{name}-")) && file.ends_with(".tgz")
                });
        if !vendored {
            missing.push((name.to_string(), repository.to_string()));
        }
    }
    Ok(missing)
}

/// A copy of `chart` in `work` with its dependencies in `charts/`: from `cache` when built
/// before, else from `helm dependency build` (kept in `cache` afterwards).
pub(crate) fn build(
    chart: &Path,
    work: &Path,
    helm: &Path,
    env: &[(&str, PathBuf)],
    repositories: &[(String, String)],
    logins: &[super::helm::RepositoryLogin],
    cache: Option<&Path>,
) -> Result<PathBuf, PrepareError> {
    let copy = work.join("chart");
    copy_tree(chart, &copy).map_err(PrepareError::Copy)?;
    let key = digest(chart);
    let cached = cache.map(|c| c.join(&key));
    if let Some(cached) = cached.as_ref().filter(|c| c.is_dir()) {
        copy_tree(cached, &copy.join("charts")).map_err(PrepareError::Cached)?;
        return Ok(copy);
    }
    let run = |args: &[&str]| -> Result<(), PrepareError> {
        let mut cmd = Command::new(helm);
        cmd.args(args);
        for (key, value) in env {
            cmd.env(key, value);
        }
        let out = super::process::run(cmd, super::process::TIMEOUT, super::process::MAX_OUTPUT)
            .map_err(|source| PrepareError::Run {
                command: args.first().copied().unwrap_or_default().to_string(),
                source,
            })?;
        if out.success {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(PrepareError::Failed {
            command: args.join(" "),
            stderr: stderr.trim().chars().take(2000).collect(),
        })
    };
    // Argo CD adds each HTTP(S) repository the dependencies name, with the credentials of
    // the repository configured for it; OCI registries get a login, file:// nothing.
    write_logins(env, repositories, logins).map_err(PrepareError::Logins)?;
    let target = copy.to_string_lossy().to_string();
    run(&["dependency", "build", "--", &target])?;
    if let Some(cached) = cached {
        if let Err(e) = keep(&copy.join("charts"), &cached) {
            tracing::warn!(cache = %cached.display(), "cannot keep the built chart dependencies: {e}");
        }
    }
    Ok(copy)
}

/// Where helm reads its configuration: the scratch `HELM_CONFIG_HOME` of `env`.
fn config_home<'a>(env: &'a [(&str, PathBuf)]) -> Option<&'a Path> {
    env.iter()
        .find(|(k, _)| *k == "HELM_CONFIG_HOME")
        .map(|(_, v)| v.as_path())
}

/// The login configured for `repository`: the node's repository of that URL (a trailing
/// slash aside), or, for OCI, of the same registry host and a path that contains it.
fn login_for<'a>(
    repository: &str,
    logins: &'a [super::helm::RepositoryLogin],
) -> Option<&'a super::helm::RepositoryLogin> {
    let bare = |u: &str| u.trim_end_matches('/').to_string();
    logins.iter().find(|l| {
        bare(&l.url) == bare(repository)
            || (repository.starts_with("oci://")
                && bare(repository).starts_with(&format!("{}/", bare(&l.url))))
    })
}

/// helm's `repositories.yaml` (each HTTP(S) repository, with its credentials) and registry
/// `config.json` (OCI logins) in its scratch config home, private to this render; helm then
/// fetches the indexes itself (`dependency build` refreshes them).
fn write_logins(
    env: &[(&str, PathBuf)],
    repositories: &[(String, String)],
    logins: &[super::helm::RepositoryLogin],
) -> std::io::Result<()> {
    use base64::Engine;
    let Some(home) = config_home(env) else {
        return Ok(());
    };
    std::fs::create_dir_all(home)?;
    let mut entries = Vec::new();
    let mut auths = serde_json::Map::new();
    for (i, (_, repository)) in repositories.iter().enumerate() {
        let login = login_for(repository, logins);
        if repository.starts_with("https://") || repository.starts_with("http://") {
            if entries
                .iter()
                .any(|e: &Value| e["url"] == Value::String(repository.clone()))
            {
                continue;
            }
            let mut entry =
                serde_json::json!({"name": format!("dependency-{i}"), "url": repository});
            if let Some(login) = login {
                entry["username"] = login.username.clone().into();
                entry["password"] = login.password.clone().into();
            }
            entries.push(entry);
        } else if let (Some(rest), Some(login)) = (repository.strip_prefix("oci://"), login) {
            let host = rest.split('/').next().unwrap_or(rest);
            let auth = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", login.username, login.password));
            auths.insert(host.to_string(), serde_json::json!({ "auth": auth }));
        }
    }
    let private = |path: &Path, text: String| -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(text.as_bytes())
    };
    // JSON is YAML: helm reads it as its repositories file.
    let file = serde_json::json!({"apiVersion": "", "generated": "0001-01-01T00:00:00Z", "repositories": entries});
    private(&home.join("repositories.yaml"), file.to_string())?;
    if !auths.is_empty() {
        let config = serde_json::json!({ "auths": auths });
        private(&home.join("registry/config.json"), config.to_string())?;
    }
    Ok(())
}

/// The archives `helm dependency build` wrote, kept under `cached` (written aside, then
/// renamed into place).
fn keep(charts: &Path, cached: &Path) -> std::io::Result<()> {
    let parent = cached.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = tempfile::Builder::new()
        .prefix(".deps-")
        .tempdir_in(parent)?;
    for entry in std::fs::read_dir(charts)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".tgz") && entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), tmp.path().join(name))?;
        }
    }
    match std::fs::rename(tmp.keep(), cached) {
        Ok(()) => Ok(()),
        // Another render kept the same dependencies first.
        Err(_) if cached.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// The digest of what decides the dependencies: `Chart.yaml` and `Chart.lock`.
fn digest(chart: &Path) -> String {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for file in ["Chart.yaml", "Chart.lock"] {
        hash.update(file.as_bytes());
        hash.update(std::fs::read(chart.join(file)).unwrap_or_default());
    }
    hex::encode(hash.finalize())
}

/// Copies regular files and directories (the chart holds no symlink leading out of it; one
/// inside it is copied as what it points to).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let source = entry.path();
        let target = to.join(entry.file_name());
        let meta = std::fs::metadata(&source)?;
        if meta.is_dir() {
            copy_tree(&source, &target)?;
        } else if meta.is_file() {
            std::fs::copy(&source, &target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendored_dependencies_need_no_build() {
        let tmp = tempfile::tempdir().unwrap();
        let chart = tmp.path();
        std::fs::write(
            chart.join("Chart.yaml"),
            "apiVersion: v2\nname: app\nversion: 0.1.0\ndependencies:\n  - name: web\n    version: 0.1.0\n    repository: https://charts.example.com\n  - name: db\n    version: 1.0.0\n    repository: oci://registry.example.com/charts\n",
        )
        .unwrap();
        std::fs::create_dir_all(chart.join("charts/web")).unwrap();
        let missing = missing(chart).unwrap();
        assert_eq!(
            missing,
            [(
                "db".to_string(),
                "oci://registry.example.com/charts".to_string()
            )]
        );
        std::fs::write(chart.join("charts/db-1.0.0.tgz"), b"x").unwrap();
        assert!(super::missing(chart).unwrap().is_empty());
    }
}
