//! Charts in OCI registries (`oci://host[:port]/path`), as `helm push` stores them: a tag per
//! version (`+` written `_`), a manifest with one Helm chart layer, the layer's digest pinning
//! the revision.

use serde::Deserialize;

use super::http::{absolute_url, Http};
use super::parse_hex_digest;
use super::version::{exact_version, select_version};
use super::{
    chart_err, no_version, revision, ChartError, ChartSource, MAX_ARCHIVE_BYTES, MAX_SMALL_BYTES,
};
use crate::config::RepositoryConfig;
use crate::source::SourceError;

const HELM_CHART_LAYER: &str = "application/vnd.cncf.helm.chart.content.v1.tar+gzip";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

impl ChartSource {
    pub(super) fn pull_oci(
        &self,
        repo: &RepositoryConfig,
        chart: &str,
        constraint: &str,
    ) -> Result<String, SourceError> {
        let (base, path) = location(repo)?;
        let name = format!("{path}/{chart}")
            .trim_start_matches('/')
            .to_string();
        let mut http = Http::new(repo)?;
        let version = match exact_version(constraint) {
            Some(v) => v.to_string(),
            None => {
                let tags = tags(&mut http, &base, &name)?;
                let versions: Vec<String> = tags.iter().map(|t| t.replace('_', "+")).collect();
                select_version(versions.iter().map(String::as_str), constraint)
                    .map_err(|e| chart_err(repo, e.into()))?
                    .ok_or_else(|| no_version(repo, chart, constraint))?
                    .to_string()
            }
        };
        // OCI tags cannot hold '+', so Helm stores build metadata as '_'.
        let tag = version.replace('+', "_");
        let url = format!("{base}/v2/{name}/manifests/{tag}");
        let manifest = match http.get(&url, Some(OCI_MANIFEST), MAX_SMALL_BYTES) {
            Ok(reply) => reply.body,
            Err(SourceError::Chart {
                source: ChartError::Status { status: 404, .. },
                ..
            }) => return Err(no_version(repo, chart, constraint)),
            Err(e) => return Err(e),
        };
        let manifest: OciManifest = serde_json::from_slice(&manifest).map_err(|e| {
            chart_err(
                repo,
                ChartError::unreadable(format!("{name}:{tag}: the manifest"), e),
            )
        })?;
        let layer = manifest
            .layers
            .iter()
            .find(|l| l.media_type == HELM_CHART_LAYER)
            .ok_or_else(|| {
                chart_err(
                    repo,
                    ChartError::Unusable(format!(
                        "{name}:{tag} is not a Helm chart (no {HELM_CHART_LAYER} layer)"
                    )),
                )
            })?;
        let hex = layer
            .digest
            .strip_prefix("sha256:")
            .and_then(parse_hex_digest)
            .ok_or_else(|| {
                chart_err(
                    repo,
                    ChartError::Unusable(format!(
                        "{name}:{tag}: unsupported layer digest {}",
                        layer.digest
                    )),
                )
            })?;
        if !crate::source::sealed::usable_or_removed(&self.entry(&hex)) {
            let url = format!("{base}/v2/{name}/blobs/{}", layer.digest);
            let archive = http.get(&url, None, MAX_ARCHIVE_BYTES)?.body;
            self.store(repo, &archive, Some(&hex))?;
        }
        Ok(revision(&version, &hex))
    }
}

/// `(https://host[:port], path)` of an `oci://host[:port]/path` URL; plain HTTP when the
/// repository sets `plain_http`.
pub(super) fn location(repo: &RepositoryConfig) -> Result<(String, String), SourceError> {
    let rest = repo
        .url
        .strip_prefix("oci://")
        .ok_or_else(|| chart_err(repo, ChartError::Unusable("not an oci:// URL".into())))?
        .trim_end_matches('/');
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return Err(chart_err(
            repo,
            ChartError::Unusable("the OCI URL names no registry host".into()),
        ));
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

fn tags(http: &mut Http, base: &str, name: &str) -> Result<Vec<String>, SourceError> {
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
            .map_err(|e| http.err(ChartError::unreadable(format!("{name}: the tag list"), e)))?;
        tags.extend(page.tags.unwrap_or_default());
        next = reply.link_next.map(|link| absolute_url(base, &link));
    }
    Ok(tags)
}
