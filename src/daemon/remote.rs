//! What an app's kustomization needs from outside its checkout, fetched before it renders:
//! remote Git bases and components, manifest files over HTTP(S), and `helmCharts` from chart
//! repositories. Each is checked against the app's project (`sourceRepos`) first, resolved
//! (a branch to a commit, a chart version to a digest) and pinned in
//! `state_dir/kustomize-remote.json`. When a remote cannot be reached, the pinned copy is
//! used, with a warning: a node offline renders what it rendered before. Blocking: runs on a
//! blocking thread, in the render's.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use super::sync::SyncError;
use crate::config::RepositoryConfig;
use crate::render::kustomize::remote::{self, ChartRemote, Fetched, GitRemote, Input};
use crate::render::{RemotePolicy, RenderError};
use crate::source::{ChartSource, GitSource, SourceError};

/// Remote inputs one render may fetch, nested bases included: a bound on a hostile
/// kustomization that names remote after remote.
const MAX_REMOTES: usize = 50;
const PINS_FILE: &str = "kustomize-remote.json";

/// The pins file is read, changed and written by one render at a time.
static PINS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What fetching needs: the sources' caches, the node's repositories (for credentials), and
/// where pins are kept.
pub(super) struct Fetcher<'a> {
    pub(super) git: &'a GitSource,
    pub(super) charts: &'a ChartSource,
    pub(super) repositories: &'a [RepositoryConfig],
    /// Repositories apps sync from: their snapshots are the apps' to keep or remove.
    pub(super) app_repos: &'a HashSet<String>,
    pub(super) state_dir: &'a Path,
    pub(super) policy: Option<&'a RemotePolicy>,
}

/// Resolved versions of remote inputs: `git <repo> <ref>` → commit, `file <url>` → digest,
/// `chart <key>` → `<version>@sha256:<hex>`.
type Pins = BTreeMap<String, String>;

impl Fetcher<'_> {
    fn repository(&self, url: &str) -> RepositoryConfig {
        RepositoryConfig::of(self.repositories, url)
    }

    /// Fetches every remote input the kustomization at `dir` (in the checkout at `root`)
    /// reaches, and those its remote bases reach in turn. Returns the local copies and a
    /// warning per input served from its pin because its remote could not be reached.
    pub(super) fn fetch(
        &self,
        root: &Path,
        dir: &Path,
    ) -> Result<(Fetched, Vec<String>), SyncError> {
        let pending = needed(root, dir)?;
        self.fetch_inputs(dir, pending)
    }

    /// Fetches `pending` (what [`needed`] listed for the kustomization at `dir`) and what
    /// their remote bases need in turn.
    fn fetch_inputs(
        &self,
        dir: &Path,
        mut pending: Vec<Input>,
    ) -> Result<(Fetched, Vec<String>), SyncError> {
        let mut fetched = Fetched::default();
        let mut warnings = Vec::new();
        if pending.is_empty() {
            return Ok((fetched, warnings));
        }
        let mut done = 0usize;
        let mut pins = self.load_pins();
        let before = pins.clone();
        while let Some(input) = pending.pop() {
            done = done.saturating_add(1);
            if done > MAX_REMOTES {
                return Err(RenderError::Kustomize {
                    path: dir.to_path_buf(),
                    message: format!("more than {MAX_REMOTES} remote bases, files and charts"),
                }
                .into());
            }
            if let Some(policy) = self.policy {
                (policy.0)(input.repository()).map_err(|source| RenderError::RemoteRefused {
                    path: dir.to_path_buf(),
                    entry: input.entry(),
                    source,
                })?;
            }
            match &input {
                Input::Git(git) => {
                    if fetched.git.contains_key(&git.entry) {
                        continue;
                    }
                    let (checkout, base) = self.git_base(git, &mut pins, &mut warnings)?;
                    // A remote base may name remote bases of its own.
                    pending.extend(remote::inputs(&checkout, &base)?);
                    fetched.git.insert(git.entry.clone(), (checkout, base));
                }
                Input::File { url } => {
                    let path = self.file(url, &mut pins, &mut warnings)?;
                    fetched.files.insert(url.clone(), path);
                }
                Input::Chart(chart) => {
                    let unpacked = self.chart(chart, &mut pins, &mut warnings)?;
                    fetched.charts.insert(chart.key(), unpacked);
                }
            }
        }
        let changed: Pins = pins
            .into_iter()
            .filter(|(key, value)| before.get(key) != Some(value))
            .collect();
        if !changed.is_empty() {
            self.save_pins(changed);
        }
        Ok((fetched, warnings))
    }

    fn git_base(
        &self,
        git: &GitRemote,
        pins: &mut Pins,
        warnings: &mut Vec<String>,
    ) -> Result<(PathBuf, PathBuf), SyncError> {
        let repo = self.repository(&git.repo);
        let reference = if git.reference.is_empty() {
            "HEAD"
        } else {
            &git.reference
        };
        let key = format!("git {} {reference}", git.repo);
        let resolved = self
            .git
            .remote_refs(&repo)
            .and_then(|refs| refs.resolve(reference))
            .and_then(|sha| Ok((self.git.snapshot(&repo, reference, &sha)?, sha)));
        let root = match resolved {
            Ok((snapshot, sha)) => {
                pins.insert(key, sha);
                snapshot.root
            }
            Err(e) => {
                let snapshot = pins
                    .get(&key)
                    .and_then(|sha| self.git.snapshot(&repo, reference, sha).ok())
                    .ok_or(e)
                    .map_err(|e| unreachable_remote(&git.entry, e))?;
                warnings.push(format!(
                    "remote base {} could not be fetched; built from its pinned commit {}",
                    crate::model::url::redact(&git.entry),
                    snapshot.revision
                ));
                snapshot.root
            }
        };
        let root = root.canonicalize().map_err(|source| RenderError::Io {
            path: root.clone(),
            source,
        })?;
        let base = crate::render::directory::contained_path(&root, Path::new(&git.path))?;
        Ok((root, base))
    }

    fn file(
        &self,
        url: &str,
        pins: &mut Pins,
        warnings: &mut Vec<String>,
    ) -> Result<PathBuf, SyncError> {
        let key = format!("file {url}");
        match self.charts.fetch_file(&self.repository(url)) {
            Ok(hex) => {
                let path = self.charts.fetched_file(&hex);
                pins.insert(key, hex);
                path.ok_or_else(|| gone(url))
            }
            Err(e) => {
                let path = pins
                    .get(&key)
                    .and_then(|hex| self.charts.fetched_file(hex))
                    .ok_or_else(|| unreachable_remote(url, e))?;
                warnings.push(format!(
                    "remote file {} could not be fetched; built from the copy fetched before",
                    crate::model::url::redact(url)
                ));
                Ok(path)
            }
        }
    }

    fn chart(
        &self,
        chart: &ChartRemote,
        pins: &mut Pins,
        warnings: &mut Vec<String>,
    ) -> Result<(PathBuf, PathBuf), SyncError> {
        let repo = self.repository(&chart.repo);
        let key = format!("chart {}", chart.key());
        let pulled = if crate::model::url::is_oci(&repo.url) {
            self.charts.pull(&repo, None, &chart.name, &chart.version)
        } else {
            self.charts.index(&repo).and_then(|index| {
                self.charts
                    .pull(&repo, Some(&index), &chart.name, &chart.version)
            })
        };
        let revision = match pulled {
            Ok(revision) => revision,
            Err(e) => {
                let revision = pins
                    .get(&key)
                    .filter(|r| self.charts.unpacked(&repo.url, r).is_ok())
                    .cloned()
                    .ok_or_else(|| unreachable_remote(&chart.repo, e))?;
                warnings.push(format!(
                    "chart {} from {} could not be fetched; rendered from its cached {revision}",
                    chart.name,
                    crate::model::url::redact(&chart.repo)
                ));
                revision
            }
        };
        // The cache entry and the chart's directory relative to it.
        let (root, chart_dir) = self.charts.unpacked(&repo.url, &revision)?;
        pins.insert(key, revision);
        let dir = root.join(chart_dir);
        Ok((root, dir))
    }

    fn load_pins(&self) -> Pins {
        let _guard = PINS.lock().unwrap_or_else(|e| e.into_inner());
        self.read_pins()
    }

    fn read_pins(&self) -> Pins {
        let path = self.state_dir.join(PINS_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), "remote pins unreadable, starting afresh: {e}");
                Pins::new()
            }),
            Err(_) => Pins::new(),
        }
    }

    /// Adds `changed` to the pins on disk (other renders may have pinned other inputs since
    /// they were read), then drops snapshots no pin names.
    fn save_pins(&self, changed: Pins) {
        let _guard = PINS.lock().unwrap_or_else(|e| e.into_inner());
        let mut pins = self.read_pins();
        pins.extend(changed);
        let path = self.state_dir.join(PINS_FILE);
        let write = || -> std::io::Result<()> {
            let tmp = tempfile::NamedTempFile::new_in(self.state_dir)?;
            serde_json::to_writer_pretty(tmp.as_file(), &pins)?;
            tmp.as_file().sync_all()?;
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok(())
        };
        if let Err(e) = write() {
            tracing::warn!(path = %path.display(), "cannot save remote pins: {e}");
        }
        self.retain_remote_snapshots(&pins);
    }

    /// Removes snapshots of remote base repositories that no pin names. A repository that
    /// apps also sync from is left to their retention.
    fn retain_remote_snapshots(&self, pins: &Pins) {
        let mut by_repo: BTreeMap<&str, HashSet<String>> = BTreeMap::new();
        for (key, sha) in pins {
            if let Some(rest) = key.strip_prefix("git ") {
                let repo = rest.rsplit_once(' ').map_or(rest, |(r, _)| r);
                by_repo.entry(repo).or_default().insert(sha.clone());
            }
        }
        for (repo, keep) in by_repo {
            if !self.app_repos.contains(repo) {
                // Another app's render may be reading a snapshot just replaced by a newer pin.
                self.git
                    .retain_older(repo, &keep, std::time::Duration::from_secs(3600));
            }
        }
    }
}

/// The remote inputs of the kustomization at `dir` in `root` (none for another directory).
fn needed(root: &Path, dir: &Path) -> Result<Vec<Input>, SyncError> {
    if crate::render::kustomize::kustomization_file(&root.join(dir)).is_none() {
        return Ok(Vec::new());
    }
    Ok(remote::inputs(root, &root.join(dir))?)
}

/// For `edgesync render`: fetches the remote inputs of the kustomization at `dir` in `root`
/// with anonymous access into a temporary cache, made only when there is something to fetch
/// (returned with the copies, which live in it).
pub(crate) fn fetch_remote_inputs(
    root: &Path,
    dir: &Path,
) -> anyhow::Result<(Fetched, Vec<String>, Option<tempfile::TempDir>)> {
    let pending = needed(root, dir)?;
    if pending.is_empty() {
        return Ok((Fetched::default(), Vec::new(), None));
    }
    let cache = tempfile::tempdir()?;
    let state_dir = cache.path();
    let fetcher = Fetcher {
        git: &GitSource::new(state_dir),
        charts: &ChartSource::new(state_dir),
        repositories: &[],
        app_repos: &HashSet::new(),
        state_dir,
        policy: None,
    };
    let (fetched, warnings) = fetcher.fetch_inputs(dir, pending)?;
    Ok((fetched, warnings, Some(cache)))
}

/// Commits and chart revisions pinned for remote inputs, which retention must keep.
pub(super) fn pinned(state_dir: &Path) -> HashSet<String> {
    let _guard = PINS.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::read(state_dir.join(PINS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Pins>(&b).ok())
        .map(|pins| pins.into_values().collect())
        .unwrap_or_default()
}

fn unreachable_remote(entry: &str, e: SourceError) -> SyncError {
    tracing::warn!(entry = %crate::model::url::redact(entry), "remote kustomize input unreachable and never fetched before");
    e.into()
}

fn gone(url: &str) -> SyncError {
    SourceError::Cache {
        url: crate::model::url::redact(url),
        path: PathBuf::from("charts/files"),
        source: std::io::Error::other("the fetched file vanished from the cache"),
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_the_project_does_not_allow_is_refused_before_anything_is_fetched() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("checkout");
        std::fs::create_dir_all(root.join("app")).unwrap();
        std::fs::write(
            root.join("app/kustomization.yaml"),
            "resources:\n  - https://github.com/other/repo//deploy?ref=v1\n",
        )
        .unwrap();
        let policy = RemotePolicy(std::sync::Arc::new(|repo: &str| {
            if repo.starts_with("https://github.com/org/") {
                Ok(())
            } else {
                Err(format!("{repo} is not in sourceRepos").into())
            }
        }));
        let state = tmp.path().join("state");
        let fetcher = Fetcher {
            git: &GitSource::new(&state),
            charts: &ChartSource::new(&state),
            repositories: &[],
            app_repos: &HashSet::new(),
            state_dir: &state,
            policy: Some(&policy),
        };
        let err = fetcher
            .fetch(&root, Path::new("app"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("https://github.com/other/repo"), "{err}");
        assert!(err.contains("sourceRepos"), "{err}");
        assert!(!state.join("git").exists(), "nothing was fetched");
    }
}
