//! Helm charts from chart repositories: HTTP(S) repositories described by an `index.yaml`, and
//! OCI registries (`oci://host/path`). A chart version is pinned by the SHA-256 digest of its
//! archive: an app's revision is `<version>@sha256:<hex>`, and the archive is unpacked once into
//! `state_dir/charts/<hex>/`, where a render finds it even while the repository is offline.
//!
//! Versions are chosen as Helm chooses them: an exact version, or a semver constraint
//! (`^1.2`, `~1.2.3`, `>=1.0 <2.0`, `1.2.x`, `a || b`), picking the highest match and leaving
//! out pre-releases unless the constraint names one. Archives are size-bounded, checked
//! against their digest, and unpacked with nothing but plain files and directories inside the
//! cache entry.
//!
//! All network I/O is blocking (ureq); callers run it on a blocking thread.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{redact, SourceError};
use crate::config::RepositoryConfig;
use crate::model::url::is_oci;

mod archive;
mod http;
mod oci;
mod version;

use archive::{chart_dir_in, unpack};
use http::{absolute_url, Http};
use version::select_version;

const MAX_INDEX_BYTES: u64 = 64 * 1024 * 1024;
const MAX_ARCHIVE_BYTES: u64 = 32 * 1024 * 1024;
const MAX_SMALL_BYTES: u64 = 4 * 1024 * 1024;

/// What went wrong with a chart repository, an OCI registry or a chart they served.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChartError {
    /// No answer: the connection, TLS, a timeout, or a body over its limit.
    #[error("GET {url}: {source}")]
    Transport {
        url: String,
        source: Box<ureq::Error>,
    },
    #[error("GET {url}: HTTP {status}{}", credentials_hint(*.status))]
    Status { url: String, status: u16 },
    /// An answer that cannot be read (the index, a manifest, a tag list, a token).
    #[error("{what}: {source}")]
    Unreadable {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("chart archive: {0}")]
    Archive(#[from] archive::ArchiveError),
    #[error(transparent)]
    Constraint(#[from] version::ConstraintError),
    /// A readable answer that cannot be used (no such chart, a digest that does not match).
    #[error("{0}")]
    Unusable(String),
}

fn credentials_hint(status: u16) -> &'static str {
    match status {
        401 | 403 => " (check the repository's credentials)",
        _ => "",
    }
}

impl ChartError {
    /// `url` (shown without credentials) did not answer.
    fn transport(url: &str, e: ureq::Error) -> ChartError {
        ChartError::Transport {
            url: redact(url),
            source: Box::new(e),
        }
    }

    fn unreadable(
        what: impl Into<String>,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> ChartError {
        ChartError::Unreadable {
            what: what.into(),
            source: Box::new(e),
        }
    }
}

/// An HTTP(S) chart repository's index, read once per round for all of its apps.
#[derive(Debug, Default)]
pub(crate) struct ChartIndex {
    entries: BTreeMap<String, Vec<IndexEntry>>,
}

#[derive(Debug, Deserialize)]
struct RawIndex {
    #[serde(default)]
    entries: BTreeMap<String, Vec<IndexEntry>>,
}

#[derive(Debug, Clone, Deserialize)]
struct IndexEntry {
    version: String,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    urls: Vec<String>,
}

/// The chart cache under `state_dir/charts`, shared by every chart repository.
#[derive(Debug, Clone)]
pub(crate) struct ChartSource {
    dir: PathBuf,
}

impl ChartSource {
    pub(crate) fn new(state_dir: &Path) -> Self {
        ChartSource {
            dir: state_dir.join("charts"),
        }
    }

    /// Reads the `index.yaml` of an HTTP(S) chart repository.
    pub(crate) fn index(&self, repo: &RepositoryConfig) -> Result<ChartIndex, SourceError> {
        let mut http = Http::new(repo)?;
        let url = format!("{}/index.yaml", repo.url.trim_end_matches('/'));
        let body = http.get(&url, None, MAX_INDEX_BYTES)?.body;
        let text = String::from_utf8(body)
            .map_err(|e| chart_err(repo, ChartError::unreadable("index.yaml", e)))?;
        let options = serde_saphyr::options! {
            budget: serde_saphyr::budget! {
                max_events: 50_000_000,
            },
        };
        let raw: RawIndex = serde_saphyr::from_str_with_options(&text, options)
            .map_err(|e| chart_err(repo, ChartError::unreadable("index.yaml", e)))?;
        Ok(ChartIndex {
            entries: raw.entries,
        })
    }

    /// Resolves `chart` at `constraint` in `repo` (its `index` for an HTTP repository) and
    /// makes sure the chart is unpacked in the cache. Returns the revision,
    /// `<version>@sha256:<hex>`.
    pub(crate) fn pull(
        &self,
        repo: &RepositoryConfig,
        index: Option<&ChartIndex>,
        chart: &str,
        constraint: &str,
    ) -> Result<String, SourceError> {
        if is_oci(&repo.url) {
            return self.pull_oci(repo, chart, constraint);
        }
        let unusable = |what: String| chart_err(repo, ChartError::Unusable(what));
        let index = index.ok_or_else(|| unusable("no index.yaml was read".into()))?;
        let entries = index
            .entries
            .get(chart)
            .ok_or_else(|| unusable(format!("the repository's index has no chart {chart:?}")))?;
        let version = select_version(entries.iter().map(|e| e.version.as_str()), constraint)
            .map_err(|e| chart_err(repo, e.into()))?
            .ok_or_else(|| no_version(repo, chart, constraint))?;
        let entry = entries
            .iter()
            .find(|e| e.version == version)
            .ok_or_else(|| no_version(repo, chart, constraint))?;
        let expected = match &entry.digest {
            Some(d) => Some(
                parse_hex_digest(d.trim_start_matches("sha256:")).ok_or_else(|| {
                    unusable(format!("{chart} {version}: digest {d:?} is not a SHA-256"))
                })?,
            ),
            None => None,
        };
        if let Some(hex) = &expected {
            if crate::source::sealed::usable_or_removed(&self.entry(hex)) {
                return Ok(revision(version, hex));
            }
        }
        let url = entry.urls.first().ok_or_else(|| {
            unusable(format!(
                "{chart} {version}: the index lists no download URL"
            ))
        })?;
        let url = absolute_url(&repo.url, url);
        let mut http = Http::new(repo)?;
        let archive = http.get(&url, None, MAX_ARCHIVE_BYTES)?.body;
        let hex = self.store(repo, &archive, expected.as_deref())?;
        Ok(revision(version, &hex))
    }

    fn entry(&self, hex: &str) -> PathBuf {
        self.dir.join(hex)
    }

    /// Checks `archive` against `expected` (when known), unpacks it into the cache entry for
    /// its digest and returns the digest.
    fn store(
        &self,
        repo: &RepositoryConfig,
        archive: &[u8],
        expected: Option<&str>,
    ) -> Result<String, SourceError> {
        let hex = hex::encode(Sha256::digest(archive));
        if let Some(expected) = expected {
            if expected != hex {
                return Err(chart_err(
                    repo,
                    ChartError::Unusable(format!("chart archive has digest sha256:{hex}, the repository says sha256:{expected}")),
                ));
            }
        }
        let target = self.entry(&hex);
        if crate::source::sealed::usable_or_removed(&target) {
            return Ok(hex);
        }
        let cache = |source| SourceError::Cache {
            url: redact(&repo.url),
            path: self.dir.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(cache)?;
        let tmp = tempfile::Builder::new()
            .prefix(".unpack-")
            .tempdir_in(&self.dir)
            .map_err(cache)?;
        unpack(archive, tmp.path()).map_err(|e| chart_err(repo, e.into()))?;
        chart_dir_in(tmp.path()).map_err(|e| chart_err(repo, e.into()))?;
        crate::source::sealed::seal(tmp.path()).map_err(cache)?;
        // Another worker may have unpacked the same archive first.
        crate::source::sealed::publish(&tmp.keep(), &target).map_err(cache)?;
        Ok(hex)
    }

    /// The unpacked chart of `revision`: the cache entry and the chart directory inside it.
    pub(crate) fn unpacked(
        &self,
        url: &str,
        revision: &str,
    ) -> Result<(PathBuf, PathBuf), SourceError> {
        let missing = || SourceError::Chart {
            url: redact(url),
            source: ChartError::Unusable(format!(
                "chart {revision} is not in the cache {}",
                self.dir.display()
            )),
        };
        let hex = revision_digest(revision).ok_or_else(missing)?;
        let root = self.entry(hex);
        // A damaged entry is removed here; the next round pulls the chart again.
        if !crate::source::sealed::usable_or_removed(&root) {
            return Err(missing());
        }
        let dir = chart_dir_in(&root).map_err(|e| SourceError::Chart {
            url: redact(url),
            source: e.into(),
        })?;
        Ok((root, dir))
    }

    /// GETs a manifest file (a kustomization's remote resource) and keeps it under
    /// `state_dir/charts/files/<sha256>`; returns that digest.
    pub(crate) fn fetch_file(&self, repo: &RepositoryConfig) -> Result<String, SourceError> {
        let mut http = Http::new(repo)?;
        let body = http.get(&repo.url, None, MAX_SMALL_BYTES)?.body;
        let hex = hex::encode(Sha256::digest(&body));
        let dir = self.dir.join("files");
        let cache = |source| SourceError::Cache {
            url: redact(&repo.url),
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(cache)?;
        let target = dir.join(&hex);
        if !target.is_file() {
            let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(cache)?;
            std::fs::write(tmp.path(), &body).map_err(cache)?;
            tmp.as_file().sync_all().map_err(cache)?;
            tmp.persist(&target).map_err(|e| cache(e.error))?;
        }
        Ok(hex)
    }

    /// The copy [`ChartSource::fetch_file`] kept of the file with digest `hex`, if it still has it.
    pub(crate) fn fetched_file(&self, hex: &str) -> Option<PathBuf> {
        let path = self.dir.join("files").join(hex);
        let valid = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
        (valid && path.is_file()).then_some(path)
    }

    /// Removes unpacked charts whose revision is not in `keep`, except very recent ones, which
    /// a sync may be about to render.
    pub(crate) fn retain(&self, keep: &HashSet<String>) {
        let keep: HashSet<&str> = keep.iter().filter_map(|r| revision_digest(r)).collect();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let recent = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < Duration::from_secs(600));
            // `files/` holds the remote files of kustomizations, kept by their pins.
            if keep.contains(name.as_str()) || recent || name == "files" {
                continue;
            }
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(path = %entry.path().display(), "cannot remove old chart: {e}");
            }
        }
    }
}

fn chart_err(repo: &RepositoryConfig, source: ChartError) -> SourceError {
    SourceError::Chart {
        url: redact(&repo.url),
        source,
    }
}

fn no_version(repo: &RepositoryConfig, chart: &str, constraint: &str) -> SourceError {
    SourceError::RevisionNotFound {
        url: redact(&repo.url),
        revision: format!("chart {chart} version {constraint}"),
    }
}

fn revision(version: &str, hex: &str) -> String {
    format!("{version}@sha256:{hex}")
}

/// The archive digest a chart revision names.
pub(crate) fn revision_digest(revision: &str) -> Option<&str> {
    let (_, hex) = revision.rsplit_once("@sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

fn parse_hex_digest(hex: &str) -> Option<String> {
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use archive::tests::archive;

    #[test]
    fn a_wrong_digest_is_refused_and_nothing_is_cached() {
        let tmp = tempfile::tempdir().unwrap();
        let source = ChartSource::new(tmp.path());
        let repo = RepositoryConfig::anonymous("https://charts.example.com");
        let good = archive(&[("web/Chart.yaml", tar::EntryType::Regular, b"name: web\n")]);
        let err = source
            .store(&repo, &good, Some(&"0".repeat(64)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("digest"), "{err}");
        let cached = std::fs::read_dir(tmp.path().join("charts")).map_or(0, |d| d.count());
        assert_eq!(cached, 0);
        let hex = source.store(&repo, &good, None).unwrap();
        let rev = revision("0.1.0", &hex);
        let (root, dir) = source.unpacked(&repo.url, &rev).unwrap();
        assert!(root.join(dir).join("Chart.yaml").is_file());
    }
}
