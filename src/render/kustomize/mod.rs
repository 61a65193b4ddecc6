//! A native Kustomize engine: builds a directory holding a `kustomization.yaml` into the same
//! objects, in the same order, as `kustomize build` (v5). Everything is read from inside the
//! repository checkout; anything kustomize does that this engine does not is an error naming the
//! field and the file, never a silently different result.
//!
//! The pipeline follows kustomize's: each kustomization accumulates its resources (files and
//! nested kustomizations) and components, runs its generators, then its transformers in
//! kustomize's fixed order. Only at the top, generated names get their hash suffix and name
//! references (ConfigMap refs in pods, ServiceAccount subjects, ...) follow renamed objects.

mod build_metadata;
mod builtin;
mod error;
mod fieldspec;
mod generator;
mod helm_charts;
mod nameref;
mod patch;
pub(crate) mod remote;
mod replacement;
mod resource;
mod smp;
mod transform;
mod vars;

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::{parse_objects, Manifests, Object, RenderError, MAX_FILE_BYTES};
use error::KustomizeError;
use resource::{Res, ResMap};

/// File names kustomize looks for, in its order.
pub(crate) const KUSTOMIZATION_FILES: [&str; 3] =
    ["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// Nesting deeper than this is almost certainly a cycle through symlinks or a hostile repo.
const MAX_DEPTH: usize = 64;
/// Total objects one build may produce.
const MAX_OBJECTS: usize = 50_000;
/// Kustomizations and components one build may expand. Each reference to a base is built
/// anew, as kustomize does, so a chain whose every level lists the next twice takes 2^n
/// builds: this stops it long before it stops the agent.
const MAX_EXPANSIONS: usize = 2_000;

/// Finds the kustomization file in `dir`, if any; more than one is an error, as in kustomize.
pub(crate) fn kustomization_file(dir: &Path) -> Option<PathBuf> {
    KUSTOMIZATION_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
}

/// Builds the kustomization in `dir` (inside the checkout at `root`).
#[cfg(test)]
pub(crate) fn build(root: &Path, dir: &Path) -> Result<Manifests, RenderError> {
    build_with(root, dir, &Overrides::default(), &Default::default(), None)
}

pub(crate) use crate::config::options::Overrides;

impl Overrides {
    pub(crate) fn is_empty(&self) -> bool {
        *self == Overrides::default()
    }

    fn apply(&self, k: &mut Kustomization) -> Result<(), KustomizeError> {
        if self.name_prefix.is_some() {
            k.name_prefix = self.name_prefix.clone();
        }
        if self.name_suffix.is_some() {
            k.name_suffix = self.name_suffix.clone();
        }
        if self.namespace.is_some() {
            k.namespace = self.namespace.clone();
        }
        k.common_labels.extend(self.common_labels.clone());
        k.common_annotations.extend(self.common_annotations.clone());
        for spec in &self.images {
            let image = transform::Image::from_edit_syntax(spec)?;
            k.images.retain(|i| i.name() != image.name());
            k.images.push(image);
        }
        Ok(())
    }
}

/// Builds the kustomization in `dir` with `overrides` applied to it (not to its bases);
/// remote bases and charts come from `fetched`, charts render with `helm`'s binary and
/// cluster capabilities.
pub(crate) fn build_with(
    root: &Path,
    dir: &Path,
    overrides: &Overrides,
    fetched: &remote::Fetched,
    helm: Option<&crate::render::helm::HelmRequest>,
) -> Result<Manifests, RenderError> {
    let root = root.canonicalize().map_err(|source| RenderError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    let mut builder = Builder::new(&root, overrides, fetched, helm);
    let mut resmap = builder.kustomization(dir, Kind::Kustomization, ResMap::default())?;
    // Errors of the whole build name the top kustomization file.
    let file = kustomization_file(dir).unwrap_or_else(|| dir.to_path_buf());
    generator::add_hash_suffixes(&mut resmap).map_err(|m| builder.error(&file, m))?;
    nameref::check_subject_namespaces(&resmap).map_err(|m| builder.error(&file, m))?;
    nameref::fix(&mut resmap);
    vars::resolve(&mut resmap, &builder.vars).map_err(|m| builder.error(&file, m))?;
    let top = builder.rel(dir).to_path_buf();
    build_metadata::annotate(&mut resmap, &builder.build_metadata, &top);
    match &builder.sort_options {
        Some(options) => options
            .sort(&mut resmap)
            .map_err(|m| builder.error(&file, m))?,
        None => resmap.sort_legacy(),
    }
    Ok(Manifests {
        objects: resmap
            .into_iter()
            .map(|r| Object {
                value: r.obj,
                origin: r.origin,
            })
            .collect(),
    })
}

/// Builds `dir` with an external binary (`kubectl kustomize`, `kustomize build`), for what the
/// native engine does not support. The binary runs in `dir` with the load restrictor on, so it
/// reads nothing outside the directory tree kustomize allows; its output is checked like any
/// manifest file.
pub(crate) fn external(root: &Path, dir: &Path, command: &str) -> Result<Manifests, RenderError> {
    let rel = dir.strip_prefix(root).unwrap_or(dir).to_path_buf();
    let fail = |message: String| RenderError::KustomizeFallback {
        path: rel.clone(),
        command: command.to_string(),
        message,
    };
    let mut words = command.split_whitespace();
    let program = words
        .next()
        .ok_or_else(|| fail("the command is empty".into()))?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(words).arg(".").current_dir(dir);
    let output = super::process::run(cmd, super::process::TIMEOUT, super::process::MAX_OUTPUT)
        .map_err(|e| fail(format!("{program}: {e}")))?;
    if !output.success {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(fail(stderr.trim().chars().take(2000).collect()));
    }
    let text = String::from_utf8(output.stdout).map_err(|_| fail("output is not UTF-8".into()))?;
    let objects = parse_objects(&text, &rel.join(format!("({program})")))?;
    Ok(Manifests { objects })
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Kustomization,
    Component,
}

/// The fields of a Kustomization (`kustomize.config.k8s.io/v1beta1`) and a Component
/// (`v1alpha1`). Unknown fields are errors, as in kustomize.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: Option<String>,
    kind: Option<String>,
    #[allow(dead_code)]
    metadata: Option<Value>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    bases: Vec<String>,
    #[serde(default)]
    components: Vec<String>,
    namespace: Option<String>,
    name_prefix: Option<String>,
    name_suffix: Option<String>,
    #[serde(default)]
    common_labels: BTreeMap<String, String>,
    #[serde(default)]
    labels: Vec<transform::LabelSet>,
    #[serde(default)]
    common_annotations: BTreeMap<String, String>,
    #[serde(default)]
    images: Vec<transform::Image>,
    #[serde(default)]
    replicas: Vec<transform::Replica>,
    #[serde(default)]
    patches: Vec<patch::PatchEntry>,
    #[serde(default)]
    patches_strategic_merge: Vec<String>,
    #[serde(default, rename = "patchesJson6902")]
    patches_json6902: Vec<patch::PatchEntry>,
    #[serde(default)]
    config_map_generator: Vec<generator::GeneratorArgs>,
    #[serde(default)]
    secret_generator: Vec<generator::GeneratorArgs>,
    generator_options: Option<generator::GeneratorOptions>,
    /// Read from the top kustomization only, as kustomize does.
    #[serde(default)]
    build_metadata: Vec<String>,
    sort_options: Option<SortOptions>,
    #[serde(default)]
    replacements: Vec<replacement::ReplacementEntry>,
    // Fields kustomize has and this engine refuses by name.
    #[serde(default)]
    vars: Vec<vars::Var>,
    #[serde(default)]
    crds: Vec<String>,
    #[serde(default)]
    configurations: Vec<String>,
    #[serde(default)]
    generators: Vec<String>,
    #[serde(default)]
    transformers: Vec<String>,
    validators: Option<Value>,
    #[serde(default)]
    helm_charts: Vec<helm_charts::HelmChart>,
    helm_globals: Option<helm_charts::HelmGlobals>,
    helm_chart_inflation_generator: Option<Value>,
    openapi: Option<OpenApi>,
    images_from: Option<Value>,
}

/// The field names of a kustomization and of the entries of its lists, as written in
/// kustomize's types (Go's JSON decoder matches them whatever their case: `nameprefix` is
/// `namePrefix`).
const KUSTOMIZATION_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "resources",
    "bases",
    "components",
    "namespace",
    "namePrefix",
    "nameSuffix",
    "commonLabels",
    "labels",
    "commonAnnotations",
    "images",
    "replicas",
    "patches",
    "patchesStrategicMerge",
    "patchesJson6902",
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
    "buildMetadata",
    "sortOptions",
    "replacements",
    "vars",
    "crds",
    "configurations",
    "generators",
    "transformers",
    "validators",
    "helmCharts",
    "helmGlobals",
    "helmChartInflationGenerator",
    "openapi",
    "imagesFrom",
];

/// Field names of the entries of a kustomization's lists (and of `generatorOptions`).
const ENTRY_FIELDS: &[(&str, &[&str])] = &[
    (
        "configMapGenerator",
        &[
            "name",
            "namespace",
            "behavior",
            "literals",
            "files",
            "envs",
            "env",
            "options",
        ],
    ),
    (
        "secretGenerator",
        &[
            "name",
            "namespace",
            "behavior",
            "literals",
            "files",
            "envs",
            "env",
            "options",
            "type",
        ],
    ),
    ("patches", &["path", "patch", "target", "options"]),
    ("patchesJson6902", &["path", "patch", "target", "options"]),
    ("images", &["name", "newName", "newTag", "digest"]),
    ("helmCharts", helm_charts::FIELDS),
    ("replicas", &["name", "count"]),
    (
        "labels",
        &["pairs", "includeSelectors", "includeTemplates", "fields"],
    ),
];

const GENERATOR_OPTIONS_FIELDS: &[&str] = &[
    "labels",
    "annotations",
    "disableNameSuffixHash",
    "immutable",
];

const SELECTOR_FIELDS: &[&str] = &[
    "group",
    "version",
    "kind",
    "name",
    "namespace",
    "labelSelector",
    "annotationSelector",
];

/// Renames the keys of `map` that match one of `fields` but for their case. Of several
/// spellings of one field, the one that sorts last wins: kustomize's YAML-to-JSON step sorts
/// the keys, and Go's decoder keeps the last value it meets.
fn canonical_keys(map: &mut serde_json::Map<String, Value>, fields: &[&str]) {
    for field in fields {
        let mut spellings: Vec<String> = map
            .keys()
            .filter(|k| k.eq_ignore_ascii_case(field))
            .cloned()
            .collect();
        if spellings.len() == 1 && spellings[0] == *field {
            continue;
        }
        spellings.sort();
        let Some(winner) = spellings.pop() else {
            continue;
        };
        for other in spellings {
            map.remove(&other);
        }
        if let Some(value) = map.remove(&winner) {
            map.insert(field.to_string(), value);
        }
    }
}

/// Field names as kustomize's decoder matches them, at the kustomization's top level and in
/// the entries of its lists (never in free-form maps such as `commonLabels`).
fn canonical_field_names(doc: &mut Value) {
    let Some(top) = doc.as_object_mut() else {
        return;
    };
    canonical_keys(top, KUSTOMIZATION_FIELDS);
    if let Some(options) = top
        .get_mut("generatorOptions")
        .and_then(Value::as_object_mut)
    {
        canonical_keys(options, GENERATOR_OPTIONS_FIELDS);
    }
    for (list, fields) in ENTRY_FIELDS {
        let Some(entries) = top.get_mut(*list).and_then(Value::as_array_mut) else {
            continue;
        };
        for entry in entries.iter_mut().filter_map(Value::as_object_mut) {
            canonical_keys(entry, fields);
            if let Some(target) = entry.get_mut("target").and_then(Value::as_object_mut) {
                canonical_keys(target, SELECTOR_FIELDS);
            }
            if let Some(options) = entry.get_mut("options").and_then(Value::as_object_mut) {
                canonical_keys(options, GENERATOR_OPTIONS_FIELDS);
            }
        }
    }
}

/// `openapi`: a schema file for strategic merge patches (`path`); a built-in schema
/// `version` is refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenApi {
    path: Option<String>,
    version: Option<String>,
}

/// `sortOptions`: kustomize's output order, read from the top kustomization only.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SortOptions {
    order: Option<String>,
    legacy_sort_options: Option<LegacySortOptions>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LegacySortOptions {
    #[serde(default)]
    order_first: Vec<String>,
    #[serde(default)]
    order_last: Vec<String>,
}

impl SortOptions {
    /// Puts `resmap` in the order asked for, with kustomize's refusals.
    fn sort(&self, resmap: &mut ResMap) -> Result<(), String> {
        match (self.order.as_deref(), &self.legacy_sort_options) {
            (Some("fifo"), None) => Ok(()),
            (Some("fifo"), Some(_)) => Err("the field 'sortOptions.legacySortOptions' is set but the selected sort order is 'fifo', not 'legacy'".into()),
            (Some("legacy"), None) => {
                resmap.sort_legacy();
                Ok(())
            }
            (Some("legacy"), Some(lists)) => {
                resmap.sort_legacy_with(&lists.order_first, &lists.order_last);
                Ok(())
            }
            _ => Err("the field 'sortOptions.order' must be one of [fifo, legacy]".into()),
        }
    }
}

impl Kustomization {
    fn unsupported(&self) -> Option<&'static str> {
        [
            (self.validators.is_some(), "validators"),
            (
                self.helm_chart_inflation_generator.is_some(),
                "helmChartInflationGenerator",
            ),
            (
                self.openapi
                    .as_ref()
                    .is_some_and(|o| o.version.is_some() || o.path.is_none()),
                "openapi (a built-in schema version)",
            ),
            (self.images_from.is_some(), "imagesFrom"),
        ]
        .into_iter()
        .find(|(set, _)| *set)
        .map(|(_, name)| name)
    }
}

struct Builder<'a> {
    /// The checkout files may not leave: the app's, or a remote base's while it is built.
    root: PathBuf,
    /// Local copies of remote bases and charts.
    fetched: &'a remote::Fetched,
    /// The helm binary and cluster capabilities for `helmCharts`.
    helm: Option<&'a crate::render::helm::HelmRequest>,
    /// Kustomization directories being built, to refuse cycles.
    stack: Vec<PathBuf>,
    /// `vars` of every kustomization built, resolved at the end.
    vars: Vec<vars::Var>,
    /// Changes to the top kustomization (Argo CD's `source.kustomize`).
    overrides: &'a Overrides,
    /// Kustomizations and components expanded so far.
    expansions: usize,
    /// The top kustomization's `buildMetadata`.
    build_metadata: Vec<String>,
    /// The top kustomization's `sortOptions`.
    sort_options: Option<SortOptions>,
    /// The schema of the last `openapi` read, which replaces the built-in one for the rest of
    /// the build (kustomize's is global too).
    schema: Option<std::sync::Arc<smp::Schema>>,
}

impl<'a> Builder<'a> {
    fn new(
        root: &Path,
        overrides: &'a Overrides,
        fetched: &'a remote::Fetched,
        helm: Option<&'a crate::render::helm::HelmRequest>,
    ) -> Self {
        Builder {
            root: root.to_path_buf(),
            fetched,
            helm,
            stack: Vec::new(),
            vars: Vec::new(),
            overrides,
            expansions: 0,
            build_metadata: Vec::new(),
            sort_options: None,
            schema: None,
        }
    }

    fn rel<'p>(&self, path: &'p Path) -> &'p Path {
        path.strip_prefix(&self.root).unwrap_or(path)
    }

    fn error(&self, path: &Path, message: impl std::fmt::Display) -> RenderError {
        RenderError::Kustomize {
            path: self.rel(path).to_path_buf(),
            message: message.to_string(),
        }
    }

    /// Builds the kustomization or component in `dir`. A component transforms `input`, the
    /// resources its parent accumulated so far; a kustomization starts from nothing.
    fn kustomization(
        &mut self,
        dir: &Path,
        kind: Kind,
        input: ResMap,
    ) -> Result<ResMap, RenderError> {
        let file = kustomization_file(dir).ok_or_else(|| {
            self.error(
                dir,
                "no kustomization.yaml, kustomization.yml or Kustomization in this directory",
            )
        })?;
        let found: Vec<_> = KUSTOMIZATION_FILES
            .iter()
            .filter(|f| dir.join(f).is_file())
            .collect();
        if found.len() > 1 {
            return Err(self.error(dir, "found multiple kustomization files"));
        }
        if self.stack.iter().any(|d| d == dir) {
            return Err(self.error(&file, "cycle: this kustomization includes itself"));
        }
        if self.stack.len() >= MAX_DEPTH {
            return Err(self.error(&file, format!("nested deeper than {MAX_DEPTH} levels")));
        }
        self.expansions += 1;
        if self.expansions > MAX_EXPANSIONS {
            return Err(self.error(
                &file,
                format!("more than {MAX_EXPANSIONS} kustomizations and components expanded in one build: bases or components are referenced over and over"),
            ));
        }
        let mut k = self.read_kustomization(&file, kind)?;
        if self.stack.is_empty() {
            self.overrides
                .apply(&mut k)
                .map_err(|m| self.error(&file, format!("source.kustomize: {m}")))?;
            self.build_metadata = k.build_metadata.clone();
            self.sort_options = k.sort_options.clone();
        }
        if let Some(path) = k.openapi.as_ref().and_then(|o| o.path.as_deref()) {
            self.schema = Some(std::sync::Arc::new(self.openapi_schema(dir, &file, path)?));
        }
        self.stack.push(dir.to_path_buf());
        let result = self.accumulate(dir, &file, &k, input);
        self.stack.pop();
        result
    }

    fn read_kustomization(&self, file: &Path, kind: Kind) -> Result<Kustomization, RenderError> {
        let text = self.read(file)?;
        // kustomize reads the file with Go's YAML and JSON decoders: a key given twice keeps
        // its last value, and field names match whatever their case.
        let docs = super::yaml::parse_documents_last_key_wins(&text, self.rel(file))?;
        let doc = match docs
            .into_iter()
            .filter(|d| !d.is_null())
            .collect::<Vec<_>>()
        {
            docs if docs.is_empty() => Value::Object(Default::default()),
            mut docs if docs.len() == 1 => docs.remove(0),
            _ => return Err(self.error(file, "holds more than one YAML document")),
        };
        let mut doc = doc;
        canonical_field_names(&mut doc);
        // kustomize refuses a kustomization with nothing but its apiVersion and kind (fields
        // that are null or "" are unset for Go); Argo CD's overrides may fill the top one.
        let empty = doc.as_object().is_none_or(|m| {
            m.iter().all(|(key, value)| {
                key == "apiVersion" || key == "kind" || value.is_null() || value == ""
            })
        });
        let overridden = self.stack.is_empty() && !self.overrides.is_empty();
        if empty && !overridden {
            return Err(self.error(file, "kustomization.yaml is empty"));
        }
        let k: Kustomization = serde_json::from_value(doc)
            .map_err(|e| self.error(file, format!("invalid kustomization: {e}")))?;
        let api_version = k.api_version.as_deref().unwrap_or("");
        match k.kind.as_deref().unwrap_or("") {
            "" | "Kustomization"
                if !api_version.is_empty() && api_version != "kustomize.config.k8s.io/v1beta1" =>
            {
                return Err(self.error(
                    file,
                    "apiVersion for Kustomization should be kustomize.config.k8s.io/v1beta1",
                ))
            }
            "Component"
                if !api_version.is_empty() && api_version != "kustomize.config.k8s.io/v1alpha1" =>
            {
                return Err(self.error(
                    file,
                    "apiVersion for Component should be kustomize.config.k8s.io/v1alpha1",
                ))
            }
            "" | "Kustomization" | "Component" => {}
            _ => return Err(self.error(file, "kind should be Kustomization or Component")),
        }
        if let Some(field) = k.unsupported() {
            return Err(RenderError::KustomizeUnsupported {
                path: self.rel(file).to_path_buf(),
                what: format!("`{field}`"),
            });
        }
        let expected = match kind {
            Kind::Kustomization => "Kustomization",
            Kind::Component => "Component",
        };
        match k.kind.as_deref() {
            None | Some("") if kind == Kind::Kustomization => {}
            Some(found) if found == expected => {}
            // A component can be built by itself, as a kustomization of its own.
            Some("Component") if self.stack.is_empty() => {}
            found => {
                return Err(self.error(
                    file,
                    format!(
                        "kind is {}, expected {expected}",
                        found.unwrap_or("missing")
                    ),
                ))
            }
        }
        Ok(k)
    }

    fn accumulate(
        &mut self,
        dir: &Path,
        file: &Path,
        k: &Kustomization,
        mut resmap: ResMap,
    ) -> Result<ResMap, RenderError> {
        for entry in k.bases.iter().chain(&k.resources) {
            let loaded = self.resource(dir, file, entry)?;
            resmap
                .append_all(loaded)
                .map_err(|m| self.error(file, format!("resources: {m}")))?;
        }
        vars::collect(&mut self.vars, &k.vars).map_err(|m| self.error(file, m))?;
        type Read = fn(&Ctx, &str, &str) -> Result<fieldspec::TransformerConfig, RenderError>;
        let field_specs: [(&str, &[String], Read); 2] = [
            ("configurations", &k.configurations, configuration),
            ("crds", &k.crds, crd_configuration),
        ];
        for (field, entries, read) in field_specs {
            let ctx = Ctx {
                builder: self,
                dir,
                file,
            };
            for (i, entry) in entries.iter().enumerate() {
                resmap
                    .config
                    .merge(&read(&ctx, &format!("{field}[{i}]"), entry)?);
            }
        }
        let generators = self.plugin_configs(dir, file, "generators", &k.generators)?;
        let transformers = self.plugin_configs(dir, file, "transformers", &k.transformers)?;
        // Generators, then components, then transformers, as kustomize runs them.
        {
            let ctx = Ctx {
                builder: self,
                dir,
                file,
            };
            generator::run(&ctx, k, &mut resmap)?;
            helm_charts::inflate(&ctx, &k.helm_charts, k.helm_globals.as_ref(), &mut resmap)?;
            builtin::generate(&ctx, &generators, &mut resmap)?;
        }
        for entry in &k.components {
            if remote::is_remote(entry) {
                resmap = self.remote(file, entry, Kind::Component, resmap)?;
                continue;
            }
            let path = self.local_path(dir, file, "components", entry)?;
            if !path.is_dir() {
                return Err(self.error(file, format!("components: {entry} is not a directory")));
            }
            resmap = self.kustomization(&path, Kind::Component, resmap)?;
        }
        let ctx = Ctx {
            builder: self,
            dir,
            file,
        };
        // Each built-in transformer kustomize configures from this kustomization, in its
        // order, recorded on every object it ran over (`transformerAnnotations`).
        let configured = self.rel(file).display().to_string();
        let ran = |resmap: &mut ResMap, kind: &'static str, times: usize| {
            for r in resmap.iter_mut() {
                for _ in 0..times {
                    r.transformations.push((configured.clone(), kind));
                }
            }
        };
        patch::strategic_merge_files(&ctx, &k.patches_strategic_merge, &mut resmap)?;
        ran(
            &mut resmap,
            "PatchStrategicMergeTransformer",
            usize::from(!k.patches_strategic_merge.is_empty()),
        );
        patch::patches(&ctx, &k.patches, &mut resmap)?;
        ran(&mut resmap, "PatchTransformer", k.patches.len());
        if let Some(ns) = k.namespace.as_deref().filter(|ns| !ns.is_empty()) {
            transform::namespace(&mut resmap, ns);
            if let Some(id) = resmap.duplicate_id() {
                return Err(ctx.error(format!(
                    "namespace transformation produces ID conflict: {id} is there twice"
                )));
            }
            ran(&mut resmap, "NamespaceTransformer", 1);
        }
        let (prefix, suffix) = (
            k.name_prefix.as_deref().unwrap_or(""),
            k.name_suffix.as_deref().unwrap_or(""),
        );
        transform::prefix_suffix(&mut resmap, prefix, suffix);
        ran(
            &mut resmap,
            "PrefixTransformer",
            usize::from(!prefix.is_empty()),
        );
        ran(
            &mut resmap,
            "SuffixTransformer",
            usize::from(!suffix.is_empty()),
        );
        transform::labels(&mut resmap, &k.common_labels, &k.labels)
            .map_err(|m| ctx.error(format!("labels: {m}")))?;
        ran(
            &mut resmap,
            "LabelTransformer",
            usize::from(!k.common_labels.is_empty()) + k.labels.len(),
        );
        transform::annotations(&mut resmap, &k.common_annotations);
        ran(
            &mut resmap,
            "AnnotationsTransformer",
            usize::from(!k.common_annotations.is_empty()),
        );
        patch::json6902_entries(&ctx, &k.patches_json6902, &mut resmap)?;
        ran(
            &mut resmap,
            "PatchJson6902Transformer",
            k.patches_json6902.len(),
        );
        transform::replicas(&mut resmap, &k.replicas)
            .map_err(|m| ctx.error(format!("replicas: {m}")))?;
        ran(&mut resmap, "ReplicaCountTransformer", k.replicas.len());
        transform::images(&mut resmap, &k.images);
        ran(&mut resmap, "ImageTagTransformer", k.images.len());
        replacement::run(&ctx, &k.replacements, &mut resmap)?;
        ran(
            &mut resmap,
            "ReplacementTransformer",
            usize::from(!k.replacements.is_empty()),
        );
        builtin::transform(&ctx, &transformers, &mut resmap)?;
        if resmap.len() > MAX_OBJECTS {
            return Err(self.error(file, format!("more than {MAX_OBJECTS} objects")));
        }
        Ok(resmap)
    }

    /// Reads an `openapi` schema file (JSON or YAML).
    fn openapi_schema(
        &self,
        dir: &Path,
        file: &Path,
        entry: &str,
    ) -> Result<smp::Schema, RenderError> {
        let path = self.local_path(dir, file, "openapi.path", entry)?;
        let text = self.read(&path)?;
        let rel = self.rel(&path).to_path_buf();
        let doc = super::yaml::parse_documents(&text, &rel)?
            .into_iter()
            .find(|d| !d.is_null())
            .unwrap_or(Value::Null);
        smp::Schema::new(doc).map_err(|m| self.error(&path, format!("openapi: {m}")))
    }

    /// The plugin configurations a `generators` or `transformers` list names: inline YAML,
    /// files, or directories whose kustomization builds them.
    fn plugin_configs(
        &mut self,
        dir: &Path,
        file: &Path,
        field: &str,
        entries: &[String],
    ) -> Result<Vec<builtin::PluginConfig>, RenderError> {
        let mut configs = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let resmap = if entry.contains('\n') {
                let source = format!("{}: {field}[{i}] (inline)", self.rel(file).display());
                let docs = super::yaml::parse_documents_yaml12(entry, Path::new(&source))?;
                let mut resmap = ResMap::default();
                for o in super::objects_of(docs, Path::new(&source))? {
                    resmap
                        .append(Res::new(o.value, o.origin))
                        .map_err(|m| self.error(file, format!("{field}: {m}")))?;
                }
                resmap
            } else if remote::is_remote(entry) {
                return Err(RenderError::KustomizeUnsupported {
                    path: self.rel(file).to_path_buf(),
                    what: format!("the remote {field} entry {entry}"),
                });
            } else {
                self.resource(dir, file, entry)?
            };
            configs.extend(resmap.into_iter().map(|r| builtin::PluginConfig {
                origin: r.origin,
                config: r.obj,
            }));
        }
        Ok(configs)
    }

    /// One `resources` (or `bases`) entry: a file of objects or a directory with a
    /// kustomization of its own.
    fn resource(&mut self, dir: &Path, file: &Path, entry: &str) -> Result<ResMap, RenderError> {
        if remote::is_remote(entry) {
            return self.remote(file, entry, Kind::Kustomization, ResMap::default());
        }
        let path = self.local_path(dir, file, "resources", entry)?;
        if path.is_dir() {
            return self.kustomization(&path, Kind::Kustomization, ResMap::default());
        }
        let text = self.read(&path)?;
        let rel = self.rel(&path);
        let mut resmap = ResMap::default();
        for o in super::objects_of(super::yaml::parse_documents_yaml12(&text, rel)?, rel)? {
            let mut res = Res::new(o.value, o.origin);
            res.normalize_as_kustomize();
            resmap.append(res).map_err(|m| self.error(&path, m))?;
        }
        Ok(resmap)
    }

    /// A remote `resources` or `components` entry, from its fetched copy: a Git base is built
    /// with its own checkout as the root its files may not leave.
    fn remote(
        &mut self,
        file: &Path,
        entry: &str,
        kind: Kind,
        input: ResMap,
    ) -> Result<ResMap, RenderError> {
        if let Some((root, dir)) = self.fetched.git.get(entry) {
            if !dir.is_dir() {
                return Err(self.error(
                    file,
                    format!("{entry}: the path is not a directory of its repository"),
                ));
            }
            let outer = std::mem::replace(&mut self.root, root.clone());
            let built = self.kustomization(dir, kind, input);
            self.root = outer;
            return built;
        }
        if let (Some(path), Kind::Kustomization) = (self.fetched.files.get(entry), kind) {
            let text = read_bounded(path).map_err(|source| RenderError::Io {
                path: PathBuf::from(entry),
                source,
            })?;
            let origin = Path::new(entry);
            let mut resmap = ResMap::default();
            let docs = super::yaml::parse_documents_yaml12(&text, origin)?;
            for o in super::objects_of(docs, origin)? {
                let mut res = Res::new(o.value, o.origin);
                res.normalize_as_kustomize();
                resmap.append(res).map_err(|m| self.error(file, m))?;
            }
            return Ok(resmap);
        }
        Err(RenderError::KustomizeUnsupported {
            path: self.rel(file).to_path_buf(),
            what: format!("the remote resource {entry} (not fetched: `edgesync render` builds only what is in the checkout)"),
        })
    }

    /// Resolves `entry` relative to `dir`, refusing anything that leaves the checkout.
    fn local_path(
        &self,
        dir: &Path,
        file: &Path,
        field: &str,
        entry: &str,
    ) -> Result<PathBuf, RenderError> {
        let joined = dir.join(entry);
        // Lexically first: `../` beyond the root must fail even when the target exists.
        let mut normal = PathBuf::new();
        for c in joined.components() {
            match c {
                Component::ParentDir => {
                    normal.pop();
                }
                Component::CurDir => {}
                other => normal.push(other),
            }
        }
        let outside = || {
            self.error(
                file,
                format!("{field}: {entry} is outside the repository checkout"),
            )
        };
        if !normal.starts_with(&self.root) {
            return Err(outside());
        }
        let resolved = joined.canonicalize().map_err(|_| {
            self.error(
                file,
                format!(
                    "{field}: {entry} does not exist ({})",
                    self.rel(&normal).display()
                ),
            )
        })?;
        if !resolved.starts_with(&self.root) {
            return Err(outside());
        }
        // kustomize's load restrictor: a file (not a directory of another kustomization) must
        // be in or below the directory of the kustomization naming it, symlinks resolved.
        if !resolved.is_dir() {
            let home = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
            if !resolved.starts_with(&home) {
                return Err(self.error(
                    file,
                    format!(
                        "{field}: security; file {} is not in or below {} (kustomize's load restrictor)",
                        self.rel(&resolved).display(),
                        self.rel(&home).display()
                    ),
                ));
            }
        }
        Ok(resolved)
    }

    /// Reads a file of the build. Every file, the kustomization itself included, must resolve
    /// inside the checkout: a `kustomization.yaml` that is a symlink to a credentials file
    /// would otherwise be read, and quoted in the error.
    fn read(&self, path: &Path) -> Result<String, RenderError> {
        let io = |source| RenderError::Io {
            path: self.rel(path).to_path_buf(),
            source,
        };
        let path = &path.canonicalize().map_err(io)?;
        if !path.starts_with(&self.root) {
            return Err(RenderError::OutsideCheckout {
                path: self.rel(path).to_path_buf(),
            });
        }
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.len() > MAX_FILE_BYTES {
            return Err(RenderError::TooLarge {
                path: self.rel(path).to_path_buf(),
                size: meta.len(),
                max: MAX_FILE_BYTES,
            });
        }
        std::fs::read_to_string(path).map_err(io)
    }
}

/// One `configurations` file: field specs added to kustomize's built-in ones.
fn configuration(
    ctx: &Ctx,
    field: &str,
    entry: &str,
) -> Result<fieldspec::TransformerConfig, RenderError> {
    let (path, text) = ctx.read_file(field, entry)?;
    let docs = super::yaml::parse_documents_last_key_wins(&text, &path)?;
    let mut config = fieldspec::TransformerConfig::default();
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        let one: fieldspec::TransformerConfig = serde_json::from_value(doc)
            .map_err(|e| ctx.error(format!("{field}: {}: {e}", path.display())))?;
        config.merge(&one);
    }
    if let Some(what) = config.unsupported() {
        return Err(RenderError::KustomizeUnsupported {
            path: path.clone(),
            what: format!("`{what}` field specs in configurations"),
        });
    }
    Ok(config)
}

/// One `crds` file: the field specs its type definitions imply.
fn crd_configuration(
    ctx: &Ctx,
    field: &str,
    entry: &str,
) -> Result<fieldspec::TransformerConfig, RenderError> {
    let (path, text) = ctx.read_file(field, entry)?;
    let doc = super::yaml::parse_documents(&text, &path)?
        .into_iter()
        .find(|d| !d.is_null())
        .unwrap_or(Value::Null);
    let config = fieldspec::from_crd_schema(&doc)
        .map_err(|m| ctx.error(format!("{field}: {}: {m}", path.display())))?;
    if config.unsupported().is_some() {
        return Err(RenderError::KustomizeUnsupported {
            path: path.clone(),
            what: "`x-kubernetes-identity` (a name prefix field) in crds".into(),
        });
    }
    Ok(config)
}

/// What generators and patches need from the kustomization being built.
pub(super) struct Ctx<'a, 'b> {
    builder: &'a Builder<'b>,
    dir: &'a Path,
    file: &'a Path,
}

impl Ctx<'_, '_> {
    fn error(&self, message: impl std::fmt::Display) -> RenderError {
        self.builder.error(self.file, message)
    }

    /// Reads a file named by the kustomization (a patch, a generator source).
    fn read_file(&self, field: &str, entry: &str) -> Result<(PathBuf, String), RenderError> {
        let path = self.builder.local_path(self.dir, self.file, field, entry)?;
        if path.is_dir() {
            return Err(self.error(format!("{field}: {entry} is a directory, not a file")));
        }
        let text = self.builder.read(&path)?;
        Ok((self.builder.rel(&path).to_path_buf(), text))
    }
}

/// Reads a fetched file (from the cache, outside any checkout), at most [`MAX_FILE_BYTES`].
fn read_bounded(path: &Path) -> std::io::Result<String> {
    let size = std::fs::metadata(path)?.len();
    if size > MAX_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "{size} bytes, more than the {MAX_FILE_BYTES} a file may have"
        )));
    }
    std::fs::read_to_string(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write(root: &Path, rel: &str, text: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn build_err(root: &Path, dir: &str) -> String {
        build(root, &root.join(dir)).unwrap_err().to_string()
    }

    #[test]
    fn a_base_referenced_over_and_over_stops_at_the_expansion_bound() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let depth = 24;
        for level in 0..depth {
            for side in ["a", "b"] {
                let text = if level + 1 == depth {
                    "resources: [cm.yaml]\n".to_string()
                } else {
                    format!("resources: [../a{0}, ../b{0}]\n", level + 1)
                };
                write(
                    root,
                    &format!("{side}{level}/kustomization.yaml"),
                    &format!("namePrefix: {side}-\n{text}"),
                );
            }
        }
        write(
            root,
            &format!("a{}/cm.yaml", depth - 1),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\n",
        );
        write(
            root,
            &format!("b{}/cm.yaml", depth - 1),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\n",
        );
        // Without the bound this is 2^24 builds.
        let err = build_err(root, "a0");
        assert!(err.contains("expanded in one build"), "{err}");
    }

    #[test]
    fn a_kustomization_that_links_out_of_the_checkout_is_not_read() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("repo");
        write(outer.path(), "credentials", "token: NEVER-READ-ME\n");
        fs::create_dir_all(root.join("app")).unwrap();
        std::os::unix::fs::symlink(
            outer.path().join("credentials"),
            root.join("app/kustomization.yaml"),
        )
        .unwrap();
        let err = build_err(&root, "app");
        assert!(err.contains("outside the repository checkout"), "{err}");
        assert!(!err.contains("NEVER-READ-ME"), "{err}");
    }

    #[test]
    fn paths_never_leave_the_checkout() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("repo");
        write(
            outer.path(),
            "secret.yaml",
            "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n",
        );
        write(
            &root,
            "app/kustomization.yaml",
            "resources: [../../secret.yaml]\n",
        );
        let err = build_err(&root, "app");
        assert!(err.contains("outside the repository checkout"), "{err}");

        std::os::unix::fs::symlink(outer.path().join("secret.yaml"), root.join("app/link.yaml"))
            .unwrap();
        write(&root, "app/kustomization.yaml", "resources: [link.yaml]\n");
        let err = build_err(&root, "app");
        assert!(err.contains("outside the repository checkout"), "{err}");

        write(
            &root,
            "app/kustomization.yaml",
            "patches: [{path: ../../secret.yaml}]\n",
        );
        let err = build_err(&root, "app");
        assert!(err.contains("outside the repository checkout"), "{err}");
    }

    #[test]
    fn remote_references_are_found_through_local_bases() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(
            root,
            "app/kustomization.yaml",
            "resources:\n  - ../base\n  - https://github.com/org/extra//deploy?ref=v1\nhelmCharts:\n  - name: redis\n    repo: https://charts.example.com\n",
        );
        write(
            root,
            "base/kustomization.yaml",
            "resources:\n  - github.com/other/repo/manifests?ref=main\n  - cm.yaml\n",
        );
        write(
            root,
            "base/cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
        );
        let mut found: Vec<(String, String)> = remote::inputs(root, &root.join("app"))
            .unwrap()
            .iter()
            .map(|i| (i.entry(), i.repository().to_string()))
            .collect();
        found.sort();
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            found,
            [
                pair(
                    "github.com/other/repo/manifests?ref=main",
                    "https://github.com/other/repo"
                ),
                pair("https://charts.example.com", "https://charts.example.com"),
                pair(
                    "https://github.com/org/extra//deploy?ref=v1",
                    "https://github.com/org/extra"
                ),
            ]
        );
    }

    #[test]
    fn remote_resources_and_cycles_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(
            root,
            "a/kustomization.yaml",
            "resources: [https://github.com/org/repo//deploy?ref=v1]\n",
        );
        let err = build_err(root, "a");
        assert!(
            err.contains("remote resource") && err.contains("a/kustomization.yaml"),
            "{err}"
        );

        write(root, "b/kustomization.yaml", "resources: [../c]\n");
        write(root, "c/kustomization.yaml", "resources: [../b]\n");
        let err = build_err(root, "b");
        assert!(err.contains("cycle"), "{err}");
    }

    #[test]
    fn unsupported_fields_are_named_with_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        write(
            tmp.path(),
            "k/kustomization.yaml",
            "openapi: {version: v1.20.4}\n",
        );
        let err = build_err(tmp.path(), "k");
        assert!(
            err.contains("`openapi (a built-in schema version)`")
                && err.contains("k/kustomization.yaml"),
            "{err}"
        );
    }
}
