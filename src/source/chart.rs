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
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{auth, redact, SourceError};
use crate::config::RepositoryConfig;

const MAX_INDEX_BYTES: u64 = 64 * 1024 * 1024;
const MAX_ARCHIVE_BYTES: u64 = 32 * 1024 * 1024;
const MAX_UNPACKED_BYTES: u64 = 256 * 1024 * 1024;
const MAX_ENTRIES: usize = 20_000;
const MAX_SMALL_BYTES: u64 = 4 * 1024 * 1024;
const HELM_CHART_LAYER: &str = "application/vnd.cncf.helm.chart.content.v1.tar+gzip";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

pub use crate::model::url::is_oci;

/// An HTTP(S) chart repository's index, read once per round for all of its apps.
#[derive(Debug, Default)]
pub struct ChartIndex {
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
pub struct ChartSource {
    dir: PathBuf,
}

impl ChartSource {
    pub fn new(state_dir: &Path) -> Self {
        ChartSource {
            dir: state_dir.join("charts"),
        }
    }

    /// Reads the `index.yaml` of an HTTP(S) chart repository.
    pub fn index(&self, repo: &RepositoryConfig) -> Result<ChartIndex, SourceError> {
        let mut http = Http::new(repo)?;
        let url = format!("{}/index.yaml", repo.url.trim_end_matches('/'));
        let body = http.get(&url, None, MAX_INDEX_BYTES)?.body;
        let text =
            String::from_utf8(body).map_err(|_| chart_err(repo, "index.yaml is not UTF-8"))?;
        let options = serde_saphyr::options! {
            budget: serde_saphyr::budget! {
                max_events: 50_000_000,
            },
        };
        let raw: RawIndex = serde_saphyr::from_str_with_options(&text, options)
            .map_err(|e| chart_err(repo, format!("index.yaml: {e}")))?;
        Ok(ChartIndex {
            entries: raw.entries,
        })
    }

    /// Resolves `chart` at `constraint` in `repo` (its `index` for an HTTP repository) and
    /// makes sure the chart is unpacked in the cache. Returns the revision,
    /// `<version>@sha256:<hex>`.
    pub fn pull(
        &self,
        repo: &RepositoryConfig,
        index: Option<&ChartIndex>,
        chart: &str,
        constraint: &str,
    ) -> Result<String, SourceError> {
        if is_oci(&repo.url) {
            return self.pull_oci(repo, chart, constraint);
        }
        let index = index.ok_or_else(|| chart_err(repo, "no index.yaml was read"))?;
        let entries = index.entries.get(chart).ok_or_else(|| {
            chart_err(
                repo,
                format!("the repository's index has no chart {chart:?}"),
            )
        })?;
        let version = select_version(entries.iter().map(|e| e.version.as_str()), constraint)
            .map_err(|e| chart_err(repo, e))?
            .ok_or_else(|| no_version(repo, chart, constraint))?;
        let entry = entries
            .iter()
            .find(|e| e.version == version)
            .ok_or_else(|| no_version(repo, chart, constraint))?;
        let expected = match &entry.digest {
            Some(d) => Some(
                parse_hex_digest(d.trim_start_matches("sha256:")).ok_or_else(|| {
                    chart_err(
                        repo,
                        format!("{chart} {version}: digest {d:?} is not a SHA-256"),
                    )
                })?,
            ),
            None => None,
        };
        if let Some(hex) = &expected {
            if super::sealed::usable_or_removed(&self.entry(hex)) {
                return Ok(revision(version, hex));
            }
        }
        let url = entry.urls.first().ok_or_else(|| {
            chart_err(
                repo,
                format!("{chart} {version}: the index lists no download URL"),
            )
        })?;
        let url = absolute_url(&repo.url, url);
        let mut http = Http::new(repo)?;
        let archive = http.get(&url, None, MAX_ARCHIVE_BYTES)?.body;
        let hex = self.store(repo, &archive, expected.as_deref())?;
        Ok(revision(version, &hex))
    }

    fn pull_oci(
        &self,
        repo: &RepositoryConfig,
        chart: &str,
        constraint: &str,
    ) -> Result<String, SourceError> {
        let (base, path) = oci_location(repo)?;
        let name = format!("{path}/{chart}")
            .trim_start_matches('/')
            .to_string();
        let mut http = Http::new(repo)?;
        let version = match exact_version(constraint) {
            Some(v) => v.to_string(),
            None => {
                let tags = oci_tags(&mut http, &base, &name)?;
                let versions: Vec<String> = tags.iter().map(|t| t.replace('_', "+")).collect();
                select_version(versions.iter().map(String::as_str), constraint)
                    .map_err(|e| chart_err(repo, e))?
                    .ok_or_else(|| no_version(repo, chart, constraint))?
                    .to_string()
            }
        };
        // OCI tags cannot hold '+', so Helm stores build metadata as '_'.
        let tag = version.replace('+', "_");
        let url = format!("{base}/v2/{name}/manifests/{tag}");
        let manifest = match http.get(&url, Some(OCI_MANIFEST), MAX_SMALL_BYTES) {
            Ok(reply) => reply.body,
            Err(SourceError::Chart { message, .. }) if message.contains("HTTP 404") => {
                return Err(no_version(repo, chart, constraint))
            }
            Err(e) => return Err(e),
        };
        let manifest: OciManifest = serde_json::from_slice(&manifest)
            .map_err(|e| chart_err(repo, format!("{name}:{tag}: bad manifest: {e}")))?;
        let layer = manifest
            .layers
            .iter()
            .find(|l| l.media_type == HELM_CHART_LAYER)
            .ok_or_else(|| {
                chart_err(
                    repo,
                    format!("{name}:{tag} is not a Helm chart (no {HELM_CHART_LAYER} layer)"),
                )
            })?;
        let hex = layer
            .digest
            .strip_prefix("sha256:")
            .and_then(parse_hex_digest)
            .ok_or_else(|| {
                chart_err(
                    repo,
                    format!("{name}:{tag}: unsupported layer digest {}", layer.digest),
                )
            })?;
        if !super::sealed::usable_or_removed(&self.entry(&hex)) {
            let url = format!("{base}/v2/{name}/blobs/{}", layer.digest);
            let archive = http.get(&url, None, MAX_ARCHIVE_BYTES)?.body;
            self.store(repo, &archive, Some(&hex))?;
        }
        Ok(revision(&version, &hex))
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
                    format!("chart archive has digest sha256:{hex}, the repository says sha256:{expected}"),
                ));
            }
        }
        let target = self.entry(&hex);
        if super::sealed::usable_or_removed(&target) {
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
        unpack(archive, tmp.path()).map_err(|e| chart_err(repo, format!("chart archive: {e}")))?;
        chart_dir_in(tmp.path()).map_err(|e| chart_err(repo, e))?;
        super::sealed::seal(tmp.path()).map_err(cache)?;
        // Another worker may have unpacked the same archive first.
        super::sealed::publish(&tmp.keep(), &target).map_err(cache)?;
        Ok(hex)
    }

    /// The unpacked chart of `revision`: the cache entry and the chart directory inside it.
    pub fn unpacked(&self, url: &str, revision: &str) -> Result<(PathBuf, PathBuf), SourceError> {
        let missing = || SourceError::Chart {
            url: redact(url),
            message: format!(
                "chart {revision} is not in the cache {}",
                self.dir.display()
            ),
        };
        let hex = revision_digest(revision).ok_or_else(missing)?;
        let root = self.entry(hex);
        // A damaged entry is removed here; the next round pulls the chart again.
        if !super::sealed::usable_or_removed(&root) {
            return Err(missing());
        }
        let dir = chart_dir_in(&root).map_err(|message| SourceError::Chart {
            url: redact(url),
            message,
        })?;
        Ok((root, dir))
    }

    /// Removes unpacked charts whose revision is not in `keep`, except very recent ones, which
    /// a sync may be about to render.
    pub fn retain(&self, keep: &HashSet<String>) {
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
            if keep.contains(name.as_str()) || recent {
                continue;
            }
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(path = %entry.path().display(), "cannot remove old chart: {e}");
            }
        }
    }
}

fn chart_err(repo: &RepositoryConfig, message: impl Into<String>) -> SourceError {
    SourceError::Chart {
        url: redact(&repo.url),
        message: message.into(),
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
pub fn revision_digest(revision: &str) -> Option<&str> {
    let (_, hex) = revision.rsplit_once("@sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

fn parse_hex_digest(hex: &str) -> Option<String> {
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

/// Resolves an index URL against the repository URL, as Helm does for relative ones.
fn absolute_url(repo_url: &str, url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else if let Some(path) = url.strip_prefix('/') {
        format!("{}/{path}", origin(repo_url))
    } else {
        format!("{}/{url}", repo_url.trim_end_matches('/'))
    }
}

/// `scheme://host[:port]` of a URL.
/// Whether `url` is at exactly `origin` (`scheme://host[:port]`, as [`origin`] gives it):
/// the same scheme, host and port, with no user part.
fn same_origin(url: &str, origin: &str) -> bool {
    let Some(rest) = url.get(origin.len()..) else {
        return false;
    };
    url.get(..origin.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(origin))
        && (rest.is_empty() || rest.starts_with(['/', '?', '#']))
        && !origin.contains('@')
}

fn origin(url: &str) -> &str {
    let start = url.find("://").map(|i| i + 3).unwrap_or(0);
    let end = url[start..]
        .find('/')
        .map(|i| start + i)
        .unwrap_or(url.len());
    &url[..end]
}

/// `(https://host[:port], path)` of an `oci://host[:port]/path` URL; plain HTTP when the
/// repository sets `plain_http`.
fn oci_location(repo: &RepositoryConfig) -> Result<(String, String), SourceError> {
    let rest = repo
        .url
        .strip_prefix("oci://")
        .ok_or_else(|| chart_err(repo, "not an oci:// URL"))?
        .trim_end_matches('/');
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return Err(chart_err(repo, "the OCI URL names no registry host"));
    }
    let scheme = if repo.plain_http { "http" } else { "https" };
    Ok((format!("{scheme}://{host}"), path.to_string()))
}

#[derive(Debug, Deserialize)]
struct OciManifest {
    #[serde(default)]
    layers: Vec<OciDescriptor>,
}

#[derive(Debug, Deserialize)]
struct OciDescriptor {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
}

fn oci_tags(http: &mut Http, base: &str, name: &str) -> Result<Vec<String>, SourceError> {
    #[derive(Deserialize)]
    struct Tags {
        #[serde(default)]
        tags: Option<Vec<String>>,
    }
    let mut tags = Vec::new();
    let mut next = Some(format!("{base}/v2/{name}/tags/list?n=1000"));
    // A registry pages long lists with a Link header; a hostile one must not loop forever.
    for _ in 0..100 {
        let Some(url) = next.take() else { break };
        let reply = http.get(&url, None, MAX_SMALL_BYTES)?;
        let page: Tags = serde_json::from_slice(&reply.body)
            .map_err(|e| http.err(format!("{name}: bad tag list: {e}")))?;
        tags.extend(page.tags.unwrap_or_default());
        next = reply.link_next.map(|link| absolute_url(base, &link));
    }
    Ok(tags)
}

/// `constraint` when it names one exact version rather than a range.
fn exact_version(constraint: &str) -> Option<&str> {
    let c = constraint.trim();
    let v = c.strip_prefix('v').unwrap_or(c);
    semver::Version::parse(v).ok().map(|_| c)
}

/// The highest of `versions` that `constraint` allows, as Helm picks it. An empty constraint
/// or `*` means the latest release (no pre-releases).
fn select_version<'a>(
    versions: impl Iterator<Item = &'a str>,
    constraint: &str,
) -> Result<Option<&'a str>, String> {
    let constraint = constraint.trim();
    let versions: Vec<&str> = versions.collect();
    if let Some(exact) = versions.iter().find(|v| **v == constraint) {
        return Ok(Some(exact));
    }
    let reqs = parse_constraint(constraint)?;
    Ok(versions
        .into_iter()
        .filter_map(|v| {
            semver::Version::parse(v.strip_prefix('v').unwrap_or(v))
                .ok()
                .map(|parsed| (parsed, v))
        })
        .filter(|(parsed, _)| reqs.iter().any(|r| r.matches(parsed)))
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, v)| v))
}

/// A Masterminds (Helm) constraint as alternatives of semver requirements. Helm's bare
/// version is exact, where Cargo's is a caret range; comparators may be separated by commas or
/// spaces; `a - b` is an inclusive range.
fn parse_constraint(constraint: &str) -> Result<Vec<semver::VersionReq>, String> {
    let invalid = |why: String| format!("invalid chart version constraint {constraint:?}: {why}");
    let mut alternatives = Vec::new();
    for alternative in constraint.split("||") {
        let mut tokens: Vec<String> = Vec::new();
        let mut operator = String::new();
        for word in alternative
            .split([' ', ',', '\t'])
            .filter(|w| !w.is_empty())
        {
            if word.chars().all(|c| "<>=!~^".contains(c)) {
                operator.push_str(word);
            } else {
                tokens.push(format!("{}{word}", std::mem::take(&mut operator)));
            }
        }
        if !operator.is_empty() {
            return Err(invalid(format!("{operator:?} is missing its version")));
        }
        let mut comparators = Vec::new();
        let mut i = 0;
        while i < tokens.len() {
            if tokens.get(i + 1).map(String::as_str) == Some("-") {
                let high = tokens
                    .get(i + 2)
                    .ok_or_else(|| invalid("a range needs an upper bound".into()))?;
                comparators.push(format!(">={}", strip_v(&tokens[i])));
                comparators.push(format!("<={}", strip_v(high)));
                i += 3;
                continue;
            }
            let token = &tokens[i];
            let split = token
                .find(|c: char| !"<>=!~^".contains(c))
                .unwrap_or(token.len());
            let (op, version) = token.split_at(split);
            if op == "!=" {
                return Err(invalid("!= is not supported".into()));
            }
            let version = strip_v(version);
            let op = if op.is_empty() && semver::Version::parse(version).is_ok() {
                "="
            } else {
                op
            };
            comparators.push(format!("{op}{version}"));
            i += 1;
        }
        let text = if comparators.is_empty() {
            "*".to_string()
        } else {
            comparators.join(", ")
        };
        alternatives.push(semver::VersionReq::parse(&text).map_err(|e| invalid(e.to_string()))?);
    }
    Ok(alternatives)
}

fn strip_v(version: &str) -> &str {
    version.strip_prefix('v').unwrap_or(version)
}

/// Unpacks a gzipped tar archive into `dest`: plain files and directories only, every path
/// inside `dest`, sizes and entry counts bounded.
fn unpack(archive: &[u8], dest: &Path) -> Result<(), String> {
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    let mut total: u64 = 0;
    let entries = tar.entries().map_err(|e| e.to_string())?;
    for (count, entry) in entries.enumerate() {
        if count >= MAX_ENTRIES {
            return Err(format!("more than {MAX_ENTRIES} entries"));
        }
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        let shown = path.display().to_string();
        let relative: PathBuf = path
            .components()
            .map(|c| match c {
                Component::Normal(part) => Ok(part),
                Component::CurDir => Ok(std::ffi::OsStr::new("")),
                _ => Err(format!("{shown} leaves the archive")),
            })
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect();
        if relative.as_os_str().is_empty() {
            continue;
        }
        let target = dest.join(&relative);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&target).map_err(|e| format!("{shown}: {e}"))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                total += entry.size();
                if total > MAX_UNPACKED_BYTES {
                    return Err(format!("unpacks to more than {MAX_UNPACKED_BYTES} bytes"));
                }
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| format!("{shown}: {e}"))?;
                }
                let mut data = Vec::new();
                (&mut entry)
                    .take(MAX_UNPACKED_BYTES)
                    .read_to_end(&mut data)
                    .map_err(|e| format!("{shown}: {e}"))?;
                std::fs::write(&target, data).map_err(|e| format!("{shown}: {e}"))?;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => {
                return Err(format!(
                    "{shown}: {other:?} entries are not allowed in a chart"
                ))
            }
        }
    }
    Ok(())
}

/// The one chart directory (holding `Chart.yaml`) at the top of an unpacked archive.
fn chart_dir_in(root: &Path) -> Result<PathBuf, String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root)
        .map_err(|e| e.to_string())?
        .flatten()
    {
        if entry.path().join("Chart.yaml").is_file() {
            found.push(PathBuf::from(entry.file_name()));
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err("the chart archive has no top-level directory with a Chart.yaml".into()),
        _ => Err("the chart archive holds more than one chart".into()),
    }
}

/// What a GET returned.
struct Reply {
    body: Vec<u8>,
    /// The next page, from a `Link: <...>; rel="next"` header.
    link_next: Option<String>,
}

/// A small HTTP client for one repository: basic credentials only towards the repository's own
/// origin, and the registry token exchange (`WWW-Authenticate: Bearer`) for OCI.
struct Http {
    agent: ureq::Agent,
    url: String,
    origin: String,
    userpass: Option<(String, String)>,
    bearer: Option<String>,
}

/// The system's CA certificates (the `ca-certificates` package), as for MQTT; no bundled
/// roots, which would cost a quarter of a MiB of binary.
fn tls() -> ureq::tls::TlsConfig {
    static ROOTS: OnceLock<ureq::tls::RootCerts> = OnceLock::new();
    let roots = ROOTS
        .get_or_init(|| {
            let certs = rustls_native_certs::load_native_certs()
                .certs
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                .collect();
            ureq::tls::RootCerts::Specific(Arc::new(certs))
        })
        .clone();
    ureq::tls::TlsConfig::builder()
        .root_certs(roots)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build()
}

impl Http {
    fn new(repo: &RepositoryConfig) -> Result<Http, SourceError> {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .timeout_global(Some(Duration::from_secs(600)))
            .user_agent(concat!("edgesync/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls())
            .build()
            .new_agent();
        let origin = if is_oci(&repo.url) {
            oci_location(repo)?.0
        } else {
            origin(&repo.url).to_string()
        };
        Ok(Http {
            agent,
            url: repo.url.clone(),
            origin,
            userpass: auth::userpass(repo)?,
            bearer: None,
        })
    }

    fn err(&self, message: impl Into<String>) -> SourceError {
        SourceError::Chart {
            url: redact(&self.url),
            message: message.into(),
        }
    }

    fn basic(&self) -> Option<String> {
        self.userpass.as_ref().map(|(user, pass)| {
            let pair = format!("{user}:{pass}");
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        })
    }

    fn send(
        &self,
        url: &str,
        accept: Option<&str>,
        authorization: Option<&str>,
    ) -> Result<ureq::http::Response<ureq::Body>, SourceError> {
        let mut request = self.agent.get(url);
        if let Some(accept) = accept {
            request = request.header("Accept", accept);
        }
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        // ureq's errors name the URL, which may not carry credentials: these never do.
        request
            .call()
            .map_err(|e| self.err(format!("GET {}: {e}", redact(url))))
    }

    /// GETs `url`, authenticating as the server asks, and reads at most `limit` bytes.
    fn get(&mut self, url: &str, accept: Option<&str>, limit: u64) -> Result<Reply, SourceError> {
        // The exact origin (scheme, host, port): `https://charts.example.com.evil.net` and
        // `https://charts.example.com@evil.net` are somebody else's.
        let ours = same_origin(url, &self.origin);
        let credentials = |http: &Http| {
            if !ours {
                None
            } else if let Some(token) = &http.bearer {
                Some(format!("Bearer {token}"))
            } else {
                http.basic()
            }
        };
        let mut response = self.send(url, accept, credentials(self).as_deref())?;
        if response.status() == 401 && ours {
            let challenge = response
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            if let Some(params) = challenge.strip_prefix("Bearer ") {
                self.bearer = Some(self.token(params)?);
                response = self.send(url, accept, credentials(self).as_deref())?;
            }
        }
        let status = response.status().as_u16();
        if status != 200 {
            let hint = match status {
                401 | 403 => " (check the repository's credentials)",
                _ => "",
            };
            return Err(self.err(format!("GET {}: HTTP {status}{hint}", redact(url))));
        }
        let link_next = response
            .headers()
            .get("link")
            .and_then(|v| v.to_str().ok())
            .and_then(next_link);
        let body = response
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(|e| self.err(format!("GET {}: {e} (limit {limit} bytes)", redact(url))))?;
        Ok(Reply { body, link_next })
    }

    /// The registry token exchange: the realm, with the service and scope it asked for.
    fn token(&self, params: &str) -> Result<String, SourceError> {
        let params = challenge_params(params);
        let realm = params
            .get("realm")
            .ok_or_else(|| self.err("the registry's Bearer challenge names no realm"))?;
        let mut query = Vec::new();
        for key in ["service", "scope"] {
            if let Some(value) = params.get(key) {
                query.push(format!("{key}={}", percent_encode(value)));
            }
        }
        let url = if query.is_empty() {
            realm.clone()
        } else {
            format!("{realm}?{}", query.join("&"))
        };
        // The repository's credentials go to its own origin only: a token service on another
        // host (which the registry's answer names, so anyone answering for it could) is asked
        // for an anonymous token.
        let basic = if same_origin(realm, &self.origin) {
            self.basic()
        } else {
            if self.userpass.is_some() {
                tracing::warn!(realm = %redact(realm), registry = %self.origin,
                    "the registry's token service is on another host; asking it without the repository's credentials");
            }
            None
        };
        let response = self.send(&url, Some("application/json"), basic.as_deref())?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(self.err(format!(
                "registry token from {}: HTTP {status} (check the repository's credentials)",
                redact(realm)
            )));
        }
        #[derive(Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let mut response = response;
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_SMALL_BYTES)
            .read_to_vec()
            .map_err(|e| self.err(format!("registry token: {e}")))?;
        let token: Token =
            serde_json::from_slice(&body).map_err(|e| self.err(format!("registry token: {e}")))?;
        token
            .token
            .or(token.access_token)
            .ok_or_else(|| self.err("the registry's token answer holds no token"))
    }
}

/// `key="value"` pairs of an authentication challenge.
fn challenge_params(params: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = params.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.insert(key, value.to_string());
        rest = remaining.trim_start_matches([',', ' ']);
    }
    out
}

fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The target of `rel="next"` in a Link header.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            target
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(versions: &[&'static str], constraint: &str) -> Option<&'static str> {
        select_version(versions.iter().copied(), constraint).unwrap()
    }

    #[test]
    fn credentials_go_to_the_exact_origin_only() {
        let o = "https://charts.example.com";
        assert!(same_origin("https://charts.example.com/index.yaml", o));
        assert!(same_origin("https://charts.example.com", o));
        assert!(same_origin("HTTPS://Charts.Example.com/x", o));
        assert!(!same_origin(
            "https://charts.example.com.evil.net/index.yaml",
            o
        ));
        assert!(!same_origin(
            "https://charts.example.com:8443/index.yaml",
            o
        ));
        assert!(!same_origin("https://charts.example.com@evil.net/x", o));
        assert!(!same_origin("http://charts.example.com/index.yaml", o));
        assert!(!same_origin("https://auth.example.com/token", o));
    }

    #[test]
    fn versions_are_picked_as_helm_picks_them() {
        let v = ["1.0.0", "1.2.0", "1.2.5", "1.3.0-rc.1", "2.0.0", "v2.1.0"];
        assert_eq!(pick(&v, ""), Some("v2.1.0"));
        assert_eq!(pick(&v, "*"), Some("v2.1.0"));
        // A bare version is exact in Helm, not a caret range.
        assert_eq!(pick(&v, "1.2.0"), Some("1.2.0"));
        assert_eq!(pick(&v, "1.2.x"), Some("1.2.5"));
        assert_eq!(pick(&v, "1.2.*"), Some("1.2.5"));
        assert_eq!(pick(&v, "^1.0"), Some("1.2.5"));
        assert_eq!(pick(&v, "~1.2.0"), Some("1.2.5"));
        assert_eq!(pick(&v, ">= 1.0, < 2.0"), Some("1.2.5"));
        assert_eq!(pick(&v, ">=1.0 <1.2"), Some("1.0.0"));
        assert_eq!(pick(&v, "1.0.0 - 1.2.0"), Some("1.2.0"));
        assert_eq!(pick(&v, "^3 || ~1.2"), Some("1.2.5"));
        assert_eq!(pick(&v, ">=1.3.0-rc.0 <1.4"), Some("1.3.0-rc.1"));
        assert_eq!(pick(&v, "2.1.0"), Some("v2.1.0"));
        assert_eq!(pick(&v, "9.9.9"), None);
        assert!(select_version(v.iter().copied(), "!=1.0.0").is_err());
        assert!(select_version(v.iter().copied(), ">=").is_err());
    }

    #[test]
    fn index_urls_resolve_like_helm() {
        let repo = "https://charts.example.com/stable";
        assert_eq!(
            absolute_url(repo, "web-1.0.0.tgz"),
            "https://charts.example.com/stable/web-1.0.0.tgz"
        );
        assert_eq!(
            absolute_url(repo, "/dl/web-1.0.0.tgz"),
            "https://charts.example.com/dl/web-1.0.0.tgz"
        );
        assert_eq!(
            absolute_url(repo, "https://cdn.example.net/web.tgz"),
            "https://cdn.example.net/web.tgz"
        );
    }

    #[test]
    fn registry_challenges_and_links_are_read() {
        let p = challenge_params(
            r#"realm="https://auth.example.com/token",service="registry.example.com",scope="repository:charts/web:pull""#,
        );
        assert_eq!(p["realm"], "https://auth.example.com/token");
        assert_eq!(p["scope"], "repository:charts/web:pull");
        assert_eq!(
            next_link(r#"</v2/charts/web/tags/list?n=2&last=b>; rel="next""#).as_deref(),
            Some("/v2/charts/web/tags/list?n=2&last=b")
        );
        assert_eq!(
            percent_encode("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }

    fn archive(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::default(),
        ));
        for (path, kind, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            // set_path refuses '..'; write the raw name, as a hostile archive would.
            let name = &mut header.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            if *kind == tar::EntryType::Symlink {
                header.set_link_name("/etc").unwrap();
            }
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn archives_unpack_plain_files_inside_the_entry_only() {
        let tmp = tempfile::tempdir().unwrap();
        let good = archive(&[
            ("web/Chart.yaml", tar::EntryType::Regular, b"name: web\n"),
            ("web/templates/cm.yaml", tar::EntryType::Regular, b"x: 1\n"),
        ]);
        unpack(&good, tmp.path()).unwrap();
        assert_eq!(chart_dir_in(tmp.path()).unwrap(), PathBuf::from("web"));
        assert!(tmp.path().join("web/templates/cm.yaml").is_file());

        let escape = archive(&[("../evil", tar::EntryType::Regular, b"x")]);
        let err = unpack(&escape, tempfile::tempdir().unwrap().path()).unwrap_err();
        assert!(err.contains("leaves the archive"), "{err}");
        let link = archive(&[("web/link", tar::EntryType::Symlink, b"")]);
        let err = unpack(&link, tempfile::tempdir().unwrap().path()).unwrap_err();
        assert!(err.contains("not allowed"), "{err}");
    }

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
