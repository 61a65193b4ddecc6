//! `helmCharts`: kustomize's chart inflation, as `kustomize build --enable-helm` runs it (and
//! Argo CD with `--enable-helm`): each chart is rendered by the node's pinned helm with
//! `helm template`, after the ConfigMap and Secret generators, and its objects join the
//! kustomization's resources. A chart comes from `{chartHome}/{name}` (or
//! `{chartHome}/{name}-{version}/{name}` when a repo and version are given) in the checkout,
//! or, when it is not vendored there, from the chart cache the daemon filled
//! ([`super::remote::Fetched`]): a render never downloads.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::resource::{Res, ResMap};
use super::{Ctx, RenderError};
use crate::render::helm::{HelmOptions, HelmRequest};

/// kustomize's default `helmGlobals.chartHome`.
pub(super) const DEFAULT_HOME: &str = "charts";

/// The field names of a `helmCharts` entry, for kustomize's case-insensitive reading.
pub(super) const FIELDS: &[&str] = &[
    "name",
    "version",
    "repo",
    "releaseName",
    "namespace",
    "additionalValuesFiles",
    "valuesFile",
    "valuesInline",
    "valuesMerge",
    "includeCRDs",
    "skipHooks",
    "apiVersions",
    "kubeVersion",
    "nameTemplate",
    "skipTests",
    "debug",
    "devel",
];

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct HelmGlobals {
    chart_home: Option<String>,
    /// Where kustomize points helm's own configuration; edgesync's helm always runs with an
    /// empty one, so it is accepted and not used.
    #[allow(dead_code)]
    config_home: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct HelmChart {
    #[serde(default)]
    name: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    repo: String,
    #[serde(default)]
    release_name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    additional_values_files: Vec<String>,
    #[serde(default)]
    values_file: String,
    #[serde(default)]
    values_inline: Option<Map<String, Value>>,
    #[serde(default)]
    values_merge: String,
    #[serde(default, rename = "includeCRDs")]
    include_crds: bool,
    #[serde(default)]
    skip_hooks: bool,
    #[serde(default)]
    api_versions: Vec<String>,
    #[serde(default)]
    kube_version: String,
    #[serde(default)]
    name_template: String,
    #[serde(default)]
    skip_tests: bool,
    #[serde(default)]
    debug: bool,
    #[serde(default)]
    devel: bool,
}

/// Where kustomize looks for a chart in the checkout.
pub(super) fn local_chart(
    dir: &Path,
    home: &str,
    name: &str,
    version: &str,
    repo: &str,
) -> PathBuf {
    let home = dir.join(home);
    if !version.is_empty() && !repo.is_empty() {
        home.join(format!("{name}-{version}")).join(name)
    } else {
        home.join(name)
    }
}

/// Inflates every chart of the kustomization into `resmap`.
pub(super) fn inflate(
    ctx: &Ctx,
    charts: &[HelmChart],
    globals: Option<&HelmGlobals>,
    resmap: &mut ResMap,
) -> Result<(), RenderError> {
    let home = globals
        .and_then(|g| g.chart_home.as_deref())
        .unwrap_or(DEFAULT_HOME);
    if Path::new(home).is_absolute() {
        return Err(ctx.error(format!(
            "helmGlobals.chartHome: {home} is an absolute path; charts must be inside the checkout"
        )));
    }
    for (i, chart) in charts.iter().enumerate() {
        let field = format!("helmCharts[{i}]");
        for res in one(ctx, &field, home, chart)? {
            resmap
                .append(res)
                .map_err(|m| ctx.error(format!("{field}: {m}")))?;
        }
    }
    Ok(())
}

fn one(ctx: &Ctx, field: &str, home: &str, chart: &HelmChart) -> Result<Vec<Res>, RenderError> {
    let at = |m: String| ctx.error(format!("{field} ({}): {m}", chart.name));
    if chart.name.is_empty() {
        return Err(ctx.error(format!("{field}: chart name cannot be empty")));
    }
    if chart.release_name.is_empty() {
        // kustomize passes --generate-name: a new random release, so new object names, on
        // every build; each sync would rename (and prune) the chart's objects.
        return Err(at("no releaseName: kustomize would have helm generate a random release name on every build, renaming the chart's objects each sync; set releaseName".into()));
    }
    let merge = match chart.values_merge.as_str() {
        "" | "override" => ValuesMerge::Override,
        "merge" => ValuesMerge::Merge,
        "replace" => ValuesMerge::Replace,
        other => {
            return Err(at(format!(
                "valuesMerge {other:?} must be one of [merge override replace]"
            )))
        }
    };
    if chart.debug || chart.devel {
        return Err(RenderError::KustomizeUnsupported {
            path: ctx.builder.rel(ctx.file).to_path_buf(),
            what: format!("{field}: `debug` or `devel`"),
        });
    }
    let (root, dir) = chart_dir(ctx, field, home, chart)?;
    // The values helm gets: the chart's own (or valuesFile), with valuesInline merged in as
    // valuesMerge says, then the additional files in order.
    let base = if chart.values_file.is_empty() {
        let path = dir.join("values.yaml");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| at(format!("cannot read the chart's values.yaml: {e}")))?;
        parse_values(&text).map_err(at)?
    } else {
        let (_, text) = ctx.read_file(&format!("{field}.valuesFile"), &chart.values_file)?;
        parse_values(&text).map_err(at)?
    };
    let values = match &chart.values_inline {
        Some(inline) if !inline.is_empty() => {
            let inline = Value::Object(inline.clone());
            match merge {
                ValuesMerge::Override => merged(base, inline),
                ValuesMerge::Merge => merged(inline, base),
                ValuesMerge::Replace => inline,
            }
        }
        _ => base,
    };
    let mut values_texts = vec![serde_json::to_string(&values).map_err(|e| at(e.to_string()))?];
    for (j, file) in chart.additional_values_files.iter().enumerate() {
        let (_, text) = ctx.read_file(&format!("{field}.additionalValuesFiles[{j}]"), file)?;
        values_texts.push(text);
    }
    let helm = ctx.builder.helm;
    let mut flags = Vec::new();
    if !chart.name_template.is_empty() {
        flags.push(format!("--name-template={}", chart.name_template));
    }
    if chart.skip_hooks {
        flags.push("--no-hooks".to_string());
    }
    // The cluster's version and APIs, when the node knows them, come first, as kustomize's
    // command-line flags (which Argo CD sets) do.
    let kube_version = helm
        .and_then(|h| h.kube_version.clone())
        .or_else(|| (!chart.kube_version.is_empty()).then(|| chart.kube_version.clone()));
    let api_versions = match helm {
        Some(h) if !h.api_versions.is_empty() => h.api_versions.clone(),
        _ => chart.api_versions.clone(),
    };
    let request = HelmRequest {
        app: helm.map_or_else(|| chart.release_name.clone(), |h| h.app.clone()),
        namespace: (!chart.namespace.is_empty()).then(|| chart.namespace.clone()),
        options: HelmOptions {
            release_name: Some(chart.release_name.clone()),
            skip_crds: !chart.include_crds,
            ..Default::default()
        },
        binary: helm.map_or_else(|| "helm".into(), |h| h.binary.clone()),
        kube_version,
        api_versions,
        dependency_cache: helm.and_then(|h| h.dependency_cache.clone()),
        refs: Default::default(),
        credentials: helm.map(|h| h.credentials.clone()).unwrap_or_default(),
        values_texts,
        include_tests: !chart.skip_tests,
        flags,
    };
    let manifests = crate::render::helm::template(&root, &dir, &request)?;
    let origin = format!(
        "{}: {field} (chart {})",
        ctx.builder.rel(ctx.file).display(),
        chart.name
    );
    Ok(manifests
        .objects
        .into_iter()
        .map(|o| {
            let mut res = Res::new(o.value, origin.clone());
            res.normalize_as_kustomize();
            res
        })
        .collect())
}

/// kustomize's `valuesMerge`: which of the inline and the file values wins.
#[allow(clippy::enum_variant_names)]
enum ValuesMerge {
    Override,
    Merge,
    Replace,
}

/// The chart to render: vendored in the checkout, or unpacked in the cache.
fn chart_dir(
    ctx: &Ctx,
    field: &str,
    home: &str,
    chart: &HelmChart,
) -> Result<(PathBuf, PathBuf), RenderError> {
    let local = local_chart(ctx.dir, home, &chart.name, &chart.version, &chart.repo);
    if local.is_dir() || chart.repo.is_empty() {
        let rel = local.strip_prefix(ctx.dir).unwrap_or(&local);
        let path = ctx.builder.local_path(
            ctx.dir,
            ctx.file,
            &format!("{field} (helmGlobals.chartHome)"),
            &rel.to_string_lossy(),
        )?;
        return Ok((ctx.builder.root.clone(), path));
    }
    let key = super::remote::chart_key(&chart.repo, &chart.name, &chart.version);
    ctx.builder
        .fetched
        .charts
        .get(&key)
        .cloned()
        .ok_or_else(|| RenderError::KustomizeUnsupported {
            path: ctx.builder.rel(ctx.file).to_path_buf(),
            what: format!(
                "{field}: chart {} from {} (not fetched: `edgesync render` builds only charts vendored under {home}/)",
                chart.name, chart.repo
            ),
        })
}

fn parse_values(text: &str) -> Result<Value, String> {
    let docs = crate::render::yaml::parse_documents(text, Path::new("values"))
        .map_err(|e| format!("values: {e}"))?;
    match docs.into_iter().find(|d| !d.is_null()) {
        None => Ok(Value::Object(Map::new())),
        Some(v @ Value::Object(_)) => Ok(v),
        Some(_) => Err("values must be a mapping".into()),
    }
}

/// `over` laid over `base` as kustomize's merge2 does for values: mappings merge key by key,
/// anything else is replaced, and a null in `over` removes the key.
fn merged(base: Value, over: Value) -> Value {
    match (base, over) {
        (Value::Object(mut base), Value::Object(over)) => {
            for (key, value) in over {
                if value.is_null() {
                    base.remove(&key);
                    continue;
                }
                let next = match base.remove(&key) {
                    Some(old) => merged(old, value),
                    None => value,
                };
                base.insert(key, next);
            }
            Value::Object(base)
        }
        (_, over) => over,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inline_values_merge_over_the_charts_as_kustomize_merges_them() {
        let base = json!({"a": {"b": 1, "c": [1, 2]}, "d": "x", "gone": 1});
        let over = json!({"a": {"c": [3], "e": true}, "gone": null});
        assert_eq!(
            merged(base, over),
            json!({"a": {"b": 1, "c": [3], "e": true}, "d": "x"})
        );
    }
}
