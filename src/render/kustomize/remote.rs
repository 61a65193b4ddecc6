//! What a kustomization needs from outside its checkout: Git bases and components
//! (`github.com/org/repo//path?ref=v1`, `https://host/repo.git/path`, `git@host:org/repo`),
//! manifest files over HTTP(S), and `helmCharts` pulled from a chart repository. The engine
//! never fetches: [`inputs`] lists them, the daemon fetches them through the source stage
//! (pinned, cached for offline renders, checked against the app's project), and hands the
//! local copies back as [`Fetched`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{kustomization_file, Builder, Overrides, RenderError};

/// Kustomization directories [`inputs`] reads at most.
const MAX_SCAN: usize = 2000;

/// A remote input, as the kustomization writes it and as it is fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Input {
    Git(GitRemote),
    /// A manifest file fetched over HTTP(S).
    File {
        url: String,
    },
    Chart(ChartRemote),
}

impl Input {
    /// The repository it comes from, for the project's `sourceRepos`.
    pub(crate) fn repository(&self) -> &str {
        match self {
            Input::Git(g) => &g.repo,
            Input::File { url } => url,
            Input::Chart(c) => &c.repo,
        }
    }

    /// The entry as the kustomization writes it.
    pub(crate) fn entry(&self) -> String {
        match self {
            Input::Git(g) => g.entry.clone(),
            Input::File { url } => url.clone(),
            Input::Chart(c) => c.repo.clone(),
        }
    }
}

/// A remote Git base: the repository to clone, the directory inside it, and the ref
/// (`?ref=` or `?version=`; empty: the default branch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GitRemote {
    pub(crate) entry: String,
    pub(crate) repo: String,
    pub(crate) path: String,
    pub(crate) reference: String,
}

/// A `helmCharts` entry whose chart is not vendored in the checkout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChartRemote {
    pub(crate) repo: String,
    pub(crate) name: String,
    /// A version or a constraint, as helm's `--version` takes it; empty: the latest.
    pub(crate) version: String,
}

impl ChartRemote {
    pub(crate) fn key(&self) -> String {
        chart_key(&self.repo, &self.name, &self.version)
    }
}

pub(super) fn chart_key(repo: &str, name: &str, version: &str) -> String {
    format!("{repo} {name} {version}")
}

/// The local copies of a build's remote inputs.
#[derive(Debug, Clone, Default)]
pub(crate) struct Fetched {
    /// Git entries as written: the checkout's root and the entry's directory in it.
    pub(crate) git: BTreeMap<String, (PathBuf, PathBuf)>,
    /// File URLs: the fetched copy.
    pub(crate) files: BTreeMap<String, PathBuf>,
    /// Charts by [`ChartRemote::key`]: the unpacked chart's cache entry and its directory.
    pub(crate) charts: BTreeMap<String, (PathBuf, PathBuf)>,
}

/// Whether a `resources`/`components` entry names something outside the checkout.
pub(super) fn is_remote(entry: &str) -> bool {
    entry.contains("://")
        || entry.starts_with("git@")
        || entry.starts_with("github.com/")
        || entry.starts_with("gitlab.com/")
        || entry.starts_with("bitbucket.org/")
}

/// Reads a remote entry: a file over HTTP(S) when its URL names a manifest file, otherwise a
/// Git repository, as kustomize's URL syntax has it.
pub(crate) fn parse(entry: &str) -> Result<Input, String> {
    if is_remote_file(entry) {
        return Ok(Input::File {
            url: entry.to_string(),
        });
    }
    parse_git(entry).map(Input::Git)
}

fn is_remote_file(entry: &str) -> bool {
    let Some(rest) = entry
        .strip_prefix("https://")
        .or_else(|| entry.strip_prefix("http://"))
    else {
        return false;
    };
    let path = rest.split(['?', '#']).next().unwrap_or(rest);
    let lower = path.to_ascii_lowercase();
    !path.contains("//")
        && !lower.contains(".git/")
        && !lower.ends_with(".git")
        && [".yaml", ".yml", ".json"]
            .iter()
            .any(|e| lower.ends_with(e))
}

fn parse_git(entry: &str) -> Result<GitRemote, String> {
    let bad = |why: &str| format!("cannot read the remote entry {entry:?}: {why}");
    let raw = entry.strip_prefix("git::").unwrap_or(entry);
    let (location, query) = raw.split_once('?').unwrap_or((raw, ""));
    let mut reference = String::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("ref", v)) if !v.is_empty() => reference = v.to_string(),
            Some(("version", v)) if reference.is_empty() => reference = v.to_string(),
            // timeout, submodules: how kustomize runs git, nothing the build depends on.
            _ => {}
        }
    }
    // The host part, with its scheme; what follows is `org/repo[...]/path`.
    let (host, rest) = if let Some((scheme, after)) = location.split_once("://") {
        let (host, rest) = after
            .split_once('/')
            .ok_or_else(|| bad("no repository after the host"))?;
        (format!("{scheme}://{host}/"), rest)
    } else if let Some(after) = location.strip_prefix("git@") {
        let (host, rest) = after
            .split_once(':')
            .ok_or_else(|| bad("an scp-like URL needs host:org/repo"))?;
        (format!("git@{host}:"), rest)
    } else {
        let (host, rest) = location
            .split_once('/')
            .ok_or_else(|| bad("no repository after the host"))?;
        (format!("https://{host}/"), rest)
    };
    let known_host = ["github.com", "gitlab.com", "bitbucket.org"]
        .iter()
        .any(|h| host.contains(h));
    let (repo, path) = if let Some((repo, path)) = rest.split_once("//") {
        (repo.to_string(), path.to_string())
    } else if let Some(i) = rest
        .find(".git/")
        .or_else(|| rest.ends_with(".git").then(|| rest.len().saturating_sub(4)))
    {
        let (repo, path) = rest.split_at(i.saturating_add(4));
        (repo.to_string(), path.trim_start_matches('/').to_string())
    } else if let Some(i) = rest.find("_git/") {
        // Azure DevOps: org/project/_git/repo[/path]
        let after = &rest[i.saturating_add(5)..];
        let (name, path) = after.split_once('/').unwrap_or((after, ""));
        (
            format!("{}{name}", &rest[..i.saturating_add(5)]),
            path.to_string(),
        )
    } else if known_host {
        let mut parts = rest.splitn(3, '/');
        let org = parts.next().unwrap_or_default();
        let name = parts.next().unwrap_or_default();
        (
            format!("{org}/{name}"),
            parts.next().unwrap_or_default().to_string(),
        )
    } else {
        (rest.to_string(), String::new())
    };
    let repo = repo.trim_end_matches('/');
    if repo.is_empty() || repo.split('/').any(|s| s == "..") {
        return Err(bad("no repository"));
    }
    let path = path.trim_matches('/').to_string();
    if Path::new(&path).is_absolute() || path.split('/').any(|s| s == "..") {
        return Err(bad("the path inside the repository leaves it"));
    }
    Ok(GitRemote {
        entry: entry.to_string(),
        repo: format!("{host}{repo}"),
        path,
        reference,
    })
}

/// Every remote input the kustomization in `dir` reaches (inside the checkout at `root`):
/// remote `resources`, `bases` and `components`, and `helmCharts` whose chart is not in the
/// checkout, in it and in every local directory it refers to. What cannot be read is an error
/// (an input nobody could check must not be fetched).
pub(crate) fn inputs(root: &Path, dir: &Path) -> Result<Vec<Input>, RenderError> {
    let root = root.canonicalize().map_err(|source| RenderError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    // The engine's reader: inside the checkout, and at most MAX_FILE_BYTES.
    let overrides = Overrides::default();
    let fetched = Fetched::default();
    let reader = Builder::new(&root, &overrides, &fetched, None);
    let mut found = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let rel = dir.strip_prefix(&root).unwrap_or(&dir).to_path_buf();
        let dir = super::super::directory::contained_path(&root, &rel)?;
        if !seen.insert(dir.clone()) {
            continue;
        }
        if seen.len() > MAX_SCAN {
            return Err(RenderError::Kustomize {
                path: rel,
                message: format!("more than {MAX_SCAN} kustomizations to check"),
            });
        }
        let Some(file) = kustomization_file(&dir) else {
            continue;
        };
        let file_rel = reader.rel(&file).to_path_buf();
        let text = reader.read(&file)?;
        let docs = super::super::yaml::parse_documents_last_key_wins(&text, &file_rel)?;
        let Some(mut k) = docs.into_iter().next() else {
            continue;
        };
        super::canonical_field_names(&mut k);
        for field in ["resources", "components", "bases"] {
            let entries = k.get(field).and_then(Value::as_array);
            for entry in entries.into_iter().flatten().filter_map(Value::as_str) {
                if is_remote(entry) {
                    let input = parse(entry).map_err(|message| RenderError::Kustomize {
                        path: file_rel.clone(),
                        message,
                    })?;
                    if !found.contains(&input) {
                        found.push(input);
                    }
                } else {
                    let local = dir.join(entry);
                    if local.is_dir() {
                        pending.push(local);
                    }
                }
            }
        }
        let home = k
            .pointer("/helmGlobals/chartHome")
            .and_then(Value::as_str)
            .unwrap_or(super::helm_charts::DEFAULT_HOME);
        let charts = k.get("helmCharts").and_then(Value::as_array);
        for chart in charts.into_iter().flatten() {
            let text = |key: &str| chart.get(key).and_then(Value::as_str).unwrap_or_default();
            let (repo, name, version) = (text("repo"), text("name"), text("version"));
            if repo.is_empty()
                || super::helm_charts::local_chart(&dir, home, name, version, repo).is_dir()
            {
                continue;
            }
            let input = Input::Chart(ChartRemote {
                repo: repo.to_string(),
                name: name.to_string(),
                version: version.to_string(),
            });
            if !found.contains(&input) {
                found.push(input);
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(entry: &str) -> (String, String, String) {
        match parse(entry).unwrap() {
            Input::Git(g) => (g.repo, g.path, g.reference),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn remote_entries_are_read_as_kustomize_reads_them() {
        let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
        assert_eq!(
            git("github.com/org/repo/deploy/base?ref=v1"),
            s("https://github.com/org/repo", "deploy/base", "v1")
        );
        assert_eq!(
            git("https://github.com/org/repo//deploy?version=v2"),
            s("https://github.com/org/repo", "deploy", "v2")
        );
        assert_eq!(
            git("https://example.com/team/r.git/sub/dir?ref=main&timeout=30"),
            s("https://example.com/team/r.git", "sub/dir", "main")
        );
        assert_eq!(
            git("http://127.0.0.1:8080/base.git//app"),
            s("http://127.0.0.1:8080/base.git", "app", "")
        );
        assert_eq!(
            git("git@github.com:org/r.git//x?ref=1"),
            s("git@github.com:org/r.git", "x", "1")
        );
        assert_eq!(
            git("ssh://git@host.example/org/r//x"),
            s("ssh://git@host.example/org/r", "x", "")
        );
        assert_eq!(
            git("https://dev.azure.com/org/proj/_git/repo/path?ref=b"),
            s("https://dev.azure.com/org/proj/_git/repo", "path", "b")
        );
        assert_eq!(
            git("git::https://example.com/r.git"),
            s("https://example.com/r.git", "", "")
        );
        assert_eq!(
            parse("https://raw.githubusercontent.com/org/r/main/deploy.yaml").unwrap(),
            Input::File {
                url: "https://raw.githubusercontent.com/org/r/main/deploy.yaml".into()
            }
        );
        for bad in [
            "https://example.com/r.git//../../etc",
            "https://example.com",
            "git@host",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
