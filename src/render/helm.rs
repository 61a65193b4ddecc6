//! Helm charts, rendered by a pinned `helm` binary (`helm template`): there is no mature Rust
//! implementation of Go templates with Sprig, so edgesync does not write one. A directory with a
//! `Chart.yaml` is a chart; the app's Helm options follow Argo CD's (`releaseName`, inline
//! `values`, `valueFiles`, `parameters`).
//!
//! helm runs with its own empty config, cache and data directories, so nothing from the host's
//! helm setup leaks in, and with no network needed for a chart whose dependencies are vendored.

use std::path::{Path, PathBuf};
use std::process::Command;

pub(crate) use crate::config::options::HelmOptions;

use super::directory::contained_path;
use super::helm_deps::PrepareError;
use super::{parse_objects, Manifests, RenderError};

/// What one render needs from the app and the config.
#[derive(Debug, Clone, Default)]
pub(crate) struct HelmRequest {
    pub(crate) app: String,
    pub(crate) namespace: Option<String>,
    pub(crate) options: HelmOptions,
    /// The helm binary: a path, or a name looked up on PATH.
    pub(crate) binary: PathBuf,
    /// The cluster's version (`--kube-version`) and the APIs it serves (`--api-versions`),
    /// for `.Capabilities`; helm's built-in defaults when unknown.
    pub(crate) kube_version: Option<String>,
    pub(crate) api_versions: Vec<String>,
    /// Where built chart dependencies are kept (`None`: built every time, kept nowhere).
    pub(crate) dependency_cache: Option<PathBuf>,
    /// The checkouts of the app's other sources by their `ref`, for `$ref/path` value files.
    pub(crate) refs: std::collections::BTreeMap<String, PathBuf>,
    /// Credentials of the node's chart repositories, for the dependencies a chart names.
    pub(crate) credentials: Vec<RepositoryLogin>,
    /// Values (YAML or JSON text) given before the value files, in order: a kustomization's
    /// `helmCharts` values, already merged and read from inside the checkout.
    pub(crate) values_texts: Vec<String>,
    /// Render the chart's test hooks too (kustomize does unless `skipTests`; Argo CD never).
    pub(crate) include_tests: bool,
    /// More `--flag=value` arguments, each joined to its value (`--no-hooks`, `--name-template`).
    pub(crate) flags: Vec<String>,
}

/// A chart repository (HTTP(S) or `oci://`) and its username and password; the password is
/// never printed.
#[derive(Clone)]
pub(crate) struct RepositoryLogin {
    pub(crate) url: String,
    pub(crate) username: String,
    pub(crate) password: String,
}

impl std::fmt::Debug for RepositoryLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepositoryLogin")
            .field("url", &self.url)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Where value file `file` of the chart at `rel` (in the checkout at `root`) is: relative to
/// the chart, or `$ref/path` in the checkout of the source named `ref`; never outside its
/// checkout. `None`: it does not exist, and the app ignores missing value files.
fn value_file(
    root: &Path,
    rel: &Path,
    file: &str,
    req: &HelmRequest,
) -> Result<Option<PathBuf>, RenderError> {
    let found = match file.strip_prefix('$') {
        Some(reference) => {
            let (name, path) = reference.split_once('/').unwrap_or((reference, ""));
            let Some(ref_root) = req.refs.get(name) else {
                return Err(RenderError::Helm {
                    app: req.app.clone(),
                    path: rel.to_path_buf(),
                    message: format!(
                        "value file {file:?} names ${name}, but no source of the app has `ref: {name}`"
                    ),
                });
            };
            contained_path(ref_root, Path::new(path))
        }
        None => contained_path(root, &rel.join(file)),
    };
    match found {
        Err(RenderError::PathNotFound { .. }) if req.options.ignore_missing_value_files => Ok(None),
        other => other.map(Some),
    }
}

pub(crate) fn is_chart(dir: &Path) -> bool {
    dir.join("Chart.yaml").is_file()
}

/// Renders the chart in `dir` (inside the checkout at `root`).
pub(crate) fn template(
    root: &Path,
    dir: &Path,
    req: &HelmRequest,
) -> Result<Manifests, RenderError> {
    let rel = dir.strip_prefix(root).unwrap_or(dir).to_path_buf();
    let fail = |message: String| RenderError::Helm {
        app: req.app.clone(),
        path: rel.clone(),
        message,
    };
    let release = req.options.release_name.as_deref().unwrap_or(&req.app);
    // The release name comes from Git (an Application's releaseName): it must be a name, never
    // something helm could read as a flag (`--post-renderer=./x`, `--set-file=...`).
    if !is_release_name(release) {
        return Err(fail(format!(
            "release name {release:?} is not a valid Helm release name (lowercase letters, digits, '-' and '.', at most 53 characters)"
        )));
    }
    // helm follows symlinks: one leaving the chart (`templates/x -> /etc/...`) would put a
    // host file into the render, or into an error.
    let prepare = |source: PrepareError| RenderError::HelmPrepare {
        app: req.app.clone(),
        path: rel.clone(),
        source,
    };
    if let Some(link) = symlink_leaving(dir).map_err(prepare)? {
        return Err(fail(format!(
            "{} is a symlink that leads out of the chart; charts must be self-contained",
            link.strip_prefix(root).unwrap_or(&link).display()
        )));
    }
    let scratch = tempfile::tempdir().map_err(|e| fail(format!("no temporary directory: {e}")))?;
    let env = [
        ("HELM_CONFIG_HOME", scratch.path().join("config")),
        ("HELM_CACHE_HOME", scratch.path().join("cache")),
        ("HELM_DATA_HOME", scratch.path().join("data")),
    ];
    let missing = super::helm_deps::missing(dir).map_err(prepare)?;
    let chart = if missing.is_empty() {
        dir.to_path_buf()
    } else {
        super::helm_deps::build(
            dir,
            scratch.path(),
            &req.binary,
            &env,
            &missing,
            &req.credentials,
            req.dependency_cache.as_deref(),
        )
        .map_err(prepare)?
    };
    let mut cmd = Command::new(&req.binary);
    cmd.arg("template").current_dir(&chart);
    if !req.include_tests {
        cmd.arg("--skip-tests");
    }
    // Argo CD renders a chart's `crds/` unless `skipCrds`.
    if !req.options.skip_crds {
        cmd.arg("--include-crds");
    }
    cmd.args(&req.flags);
    for (key, value) in &env {
        cmd.env(key, value);
    }
    // Every value joined to its flag (`--flag=value`), and `--` before the positionals, so no
    // value from Git is ever read as a flag of its own.
    if let Some(ns) = &req.namespace {
        cmd.arg(format!("--namespace={ns}"));
    }
    if let Some(version) = &req.kube_version {
        cmd.arg(format!("--kube-version={version}"));
    }
    for api in &req.api_versions {
        cmd.arg(format!("--api-versions={api}"));
    }
    for (i, text) in req.values_texts.iter().enumerate() {
        let path = scratch.path().join(format!("values-{i}.yaml"));
        std::fs::write(&path, text).map_err(|e| fail(format!("cannot write values: {e}")))?;
        let mut arg = std::ffi::OsString::from("--values=");
        arg.push(path);
        cmd.arg(arg);
    }
    for file in &req.options.value_files {
        let Some(path) = value_file(root, &rel, file, req)? else {
            continue;
        };
        let mut arg = std::ffi::OsString::from("--values=");
        arg.push(path);
        cmd.arg(arg);
    }
    if let Some(values) = &req.options.values {
        let path = scratch.path().join("inline-values.yaml");
        std::fs::write(&path, values).map_err(|e| fail(format!("cannot write values: {e}")))?;
        let mut arg = std::ffi::OsString::from("--values=");
        arg.push(path);
        cmd.arg(arg);
    }
    for (name, value) in &req.options.parameters {
        cmd.arg(format!("--set={name}={value}"));
    }
    cmd.arg("--").arg(release).arg(&chart);
    let output = super::process::run(cmd, super::process::TIMEOUT, super::process::MAX_OUTPUT)
        .map_err(|e| match e {
            super::process::RunError::Spawn(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fail(format!(
                    "helm is not installed ({} not found); install helm or set [helm] binary",
                    req.binary.display()
                ))
            }
            e => fail(format!("helm template: {e}")),
        })?;
    if !output.success {
        let stderr = String::from_utf8_lossy(&output.stderr);
        // A chart can `fail` with any value it was given: those never reach the status.
        let stderr = redact_values(stderr.trim(), &given_values(root, dir, req));
        return Err(fail(format!(
            "helm template failed: {}",
            stderr.chars().take(2000).collect::<String>()
        )));
    }
    let text =
        String::from_utf8(output.stdout).map_err(|_| fail("helm printed non-UTF-8".into()))?;
    let objects = parse_objects(&text, &rel.join("(helm template)"))?;
    Ok(Manifests { objects })
}

/// Files a chart may hold at most (charts are small; a bigger tree is refused, not walked).
const MAX_CHART_ENTRIES: usize = 20_000;

/// The first symlink under `chart` whose target is outside `chart` (or does not resolve).
fn symlink_leaving(chart: &Path) -> Result<Option<PathBuf>, PrepareError> {
    let read = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PrepareError::Read { path, source }
    };
    let top = chart.canonicalize().map_err(read(Path::new(".")))?;
    let mut pending = vec![chart.to_path_buf()];
    let mut seen = 0usize;
    while let Some(dir) = pending.pop() {
        let rel = dir.strip_prefix(chart).unwrap_or(&dir);
        for entry in std::fs::read_dir(&dir).map_err(read(rel))? {
            let entry = entry.map_err(read(rel))?;
            seen += 1;
            if seen > MAX_CHART_ENTRIES {
                return Err(PrepareError::TooManyFiles(MAX_CHART_ENTRIES));
            }
            let path = entry.path();
            let kind = entry
                .file_type()
                .map_err(read(path.strip_prefix(chart).unwrap_or(&path)))?;
            if kind.is_symlink() {
                match path.canonicalize() {
                    Ok(target) if target.starts_with(&top) => {}
                    _ => return Ok(Some(path)),
                }
            } else if kind.is_dir() {
                pending.push(path);
            }
        }
    }
    Ok(None)
}

/// Every value the chart was given, as text: the chart's own `values.yaml`, the value files,
/// the inline values and the parameters (scalars of four characters or more, and their base64
/// forms, as a template's `b64enc` would print them).
fn given_values(root: &Path, dir: &Path, req: &HelmRequest) -> Vec<String> {
    use base64::Engine;
    let mut texts: Vec<String> = Vec::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("values.yaml")) {
        texts.push(text);
    }
    let rel = dir.strip_prefix(root).unwrap_or(dir);
    for file in &req.options.value_files {
        if let Ok(Some(path)) = value_file(root, rel, file, req) {
            texts.extend(std::fs::read_to_string(path));
        }
    }
    texts.extend(req.options.values.clone());
    texts.extend(req.values_texts.iter().cloned());
    let mut values: Vec<String> = req.options.parameters.values().cloned().collect();
    for text in &texts {
        if let Ok(docs) = super::yaml::parse_documents(text, Path::new("values")) {
            docs.iter().for_each(|doc| scalars(doc, &mut values));
        }
    }
    values.retain(|v| v.chars().count() >= 4);
    let encoded: Vec<String> = values
        .iter()
        .map(|v| base64::engine::general_purpose::STANDARD.encode(v))
        .collect();
    values.extend(encoded);
    // Longest first, so a value that contains another is replaced whole.
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    values.dedup();
    values
}

fn scalars(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Number(n) => out.push(n.to_string()),
        serde_json::Value::Array(items) => items.iter().for_each(|v| scalars(v, out)),
        serde_json::Value::Object(map) => map.values().for_each(|v| scalars(v, out)),
        _ => {}
    }
}

fn redact_values(text: &str, values: &[String]) -> String {
    values.iter().fold(text.to_string(), |text, value| {
        text.replace(value.as_str(), "***")
    })
}

/// Helm's rule for release names: a DNS-1123 subdomain of at most 53 characters.
fn is_release_name(name: &str) -> bool {
    name.len() <= 53
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_given_to_the_chart_are_redacted_from_its_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("chart")).unwrap();
        std::fs::write(
            root.join("chart/values.yaml"),
            "db:\n  password: chart-default-pw\n",
        )
        .unwrap();
        std::fs::write(root.join("chart/prod.yaml"), "token: from-a-value-file\n").unwrap();
        let req = HelmRequest {
            app: "web".into(),
            namespace: None,
            options: HelmOptions {
                values: Some("apiKey: inline-key-1234\n".into()),
                value_files: vec!["prod.yaml".into()],
                parameters: [("admin.password".to_string(), "param-pw-5678".to_string())].into(),
                ..Default::default()
            },
            binary: PathBuf::from("helm"),
            kube_version: None,
            api_versions: Vec::new(),
            dependency_cache: None,
            refs: Default::default(),
            credentials: Vec::new(),
            ..Default::default()
        };
        let values = given_values(&root, &root.join("chart"), &req);
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode("param-pw-5678");
        let stderr = format!("Error: execution error at (web/templates/x.yaml:3:4): bad: chart-default-pw from-a-value-file inline-key-1234 param-pw-5678 {encoded}");
        let redacted = redact_values(&stderr, &values);
        for secret in [
            "chart-default-pw",
            "from-a-value-file",
            "inline-key-1234",
            "param-pw-5678",
            encoded.as_str(),
        ] {
            assert!(!redacted.contains(secret), "{redacted}");
        }
        assert!(redacted.contains("web/templates/x.yaml:3:4"), "{redacted}");
    }

    #[test]
    fn symlinks_leaving_the_chart_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let chart = dir.path().join("chart");
        std::fs::create_dir_all(chart.join("templates")).unwrap();
        std::fs::write(chart.join("values.yaml"), "a: 1\n").unwrap();
        std::fs::write(dir.path().join("secret"), "token\n").unwrap();
        // Inside the chart: fine.
        std::os::unix::fs::symlink(chart.join("values.yaml"), chart.join("templates/v.yaml"))
            .unwrap();
        assert_eq!(symlink_leaving(&chart).unwrap(), None);
        std::os::unix::fs::symlink(dir.path().join("secret"), chart.join("templates/s.yaml"))
            .unwrap();
        assert_eq!(
            symlink_leaving(&chart).unwrap(),
            Some(chart.join("templates/s.yaml"))
        );
    }

    #[test]
    fn release_names_from_git_cannot_be_flags() {
        for good in ["web", "web-1", "a.b-c", &"a".repeat(53)] {
            assert!(is_release_name(good), "{good}");
        }
        for bad in [
            "--post-renderer=./x",
            "-x",
            "--set-file=a=/etc/shadow",
            "Web",
            "",
            "a..b",
            "a_b",
            &"a".repeat(54),
        ] {
            assert!(!is_release_name(bad), "{bad}");
        }
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("chart")).unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let req = HelmRequest {
            app: "web".into(),
            namespace: None,
            options: HelmOptions {
                release_name: Some("--post-renderer=./evil".into()),
                ..Default::default()
            },
            binary: PathBuf::from("/nonexistent/helm"),
            kube_version: None,
            api_versions: Vec::new(),
            dependency_cache: None,
            refs: Default::default(),
            credentials: Vec::new(),
            ..Default::default()
        };
        let err = template(&root, &root.join("chart"), &req)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a valid Helm release name"), "{err}");
    }

    #[test]
    fn a_missing_helm_is_named_with_the_app() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("chart")).unwrap();
        std::fs::write(
            tmp.path().join("chart/Chart.yaml"),
            "apiVersion: v2\nname: c\nversion: 0.1.0\n",
        )
        .unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let req = HelmRequest {
            app: "web".into(),
            namespace: None,
            options: HelmOptions::default(),
            binary: PathBuf::from("/nonexistent/helm"),
            kube_version: None,
            api_versions: Vec::new(),
            dependency_cache: None,
            refs: Default::default(),
            credentials: Vec::new(),
            ..Default::default()
        };
        let err = template(&root, &root.join("chart"), &req)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("helm is not installed") && err.contains("web"),
            "{err}"
        );
    }

    #[test]
    fn ref_value_files_stay_in_their_sources_checkout() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        let (app, values) = (base.join("app"), base.join("values"));
        std::fs::create_dir_all(app.join("chart")).unwrap();
        std::fs::create_dir_all(values.join("env")).unwrap();
        std::fs::write(values.join("env/prod.yaml"), "a: 1\n").unwrap();
        std::fs::write(base.join("outside.yaml"), "secret: x\n").unwrap();
        let req = HelmRequest {
            app: "web".into(),
            namespace: None,
            options: HelmOptions {
                ignore_missing_value_files: true,
                ..Default::default()
            },
            binary: PathBuf::from("helm"),
            kube_version: None,
            api_versions: Vec::new(),
            dependency_cache: None,
            refs: [("values".to_string(), values.clone())].into(),
            credentials: Vec::new(),
            ..Default::default()
        };
        let file = |f: &str| value_file(&app, Path::new("chart"), f, &req);
        assert_eq!(
            file("$values/env/prod.yaml").unwrap(),
            Some(values.join("env/prod.yaml"))
        );
        assert!(matches!(
            file("$values/../outside.yaml"),
            Err(RenderError::OutsideCheckout { .. })
        ));
        assert!(matches!(
            file("../../outside.yaml"),
            Err(RenderError::OutsideCheckout { .. })
        ));
        assert!(file("$other/x.yaml")
            .unwrap_err()
            .to_string()
            .contains("$other"));
        // Missing files are left out when the app says so.
        assert_eq!(file("$values/env/none.yaml").unwrap(), None);
    }
}
