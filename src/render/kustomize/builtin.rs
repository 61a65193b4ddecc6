//! `generators:` and `transformers:` entries that configure kustomize's built-in plugins
//! (`apiVersion: builtin`), in a file, inline, or as the output of a kustomization directory.
//! They run after the kustomization's own generators and transformers, in the order given.
//! A built-in transformer configured this way acts only at the field specs it lists, as in
//! kustomize. Plugins that are not built in (KRM functions, exec and Go plugins) and the
//! built-ins this engine does not have are refused by name.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::fieldspec::CustomSpec;
use super::generator::{self, GeneratorArgs, GeneratorOptions};
use super::patch::{self, PatchEntry, Selector};
use super::replacement::{self, ReplacementEntry};
use super::resource::ResMap;
use super::transform::{self, Image, Replica};
use super::Ctx;
use crate::render::RenderError;

/// One plugin configuration, and where it came from (for errors).
pub(super) struct PluginConfig {
    pub(super) origin: String,
    pub(super) config: Map<String, Value>,
}

impl PluginConfig {
    fn kind(&self) -> &str {
        self.config
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    fn metadata(&self, key: &str) -> Option<String> {
        self.config
            .get("metadata")
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    /// The configuration's own fields, read as `T`.
    fn fields<T: DeserializeOwned>(&self, ctx: &Ctx, field: &str) -> Result<T, RenderError> {
        let mut fields = self.config.clone();
        for key in ["apiVersion", "kind", "metadata"] {
            fields.remove(key);
        }
        serde_json::from_value(Value::Object(fields))
            .map_err(|e| ctx.error(format!("{field}: {} {}: {e}", self.kind(), self.origin)))
    }

    /// Refuses what is not one of kustomize's built-in plugins.
    fn check_builtin(&self, ctx: &Ctx, field: &str) -> Result<(), RenderError> {
        let api_version = self
            .config
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        if api_version == "builtin" {
            return Ok(());
        }
        Err(RenderError::KustomizeUnsupported {
            path: ctx.builder.rel(ctx.file).to_path_buf(),
            what: format!(
                "`{field}` plugin {} (apiVersion {api_version:?}, from {}): KRM functions and plugins that are not built in",
                self.kind(),
                self.origin
            ),
        })
    }

    fn unsupported(&self, ctx: &Ctx, field: &str) -> RenderError {
        RenderError::KustomizeUnsupported {
            path: ctx.builder.rel(ctx.file).to_path_buf(),
            what: format!("`{field}` built-in {} (from {})", self.kind(), self.origin),
        }
    }
}

/// Runs the `generators:` configurations.
pub(super) fn generate(
    ctx: &Ctx,
    configs: &[PluginConfig],
    resmap: &mut ResMap,
) -> Result<(), RenderError> {
    for (i, config) in configs.iter().enumerate() {
        let field = format!("generators[{i}]");
        config.check_builtin(ctx, &field)?;
        let kind = match config.kind() {
            "ConfigMapGenerator" => "ConfigMap",
            "SecretGenerator" => "Secret",
            _ => return Err(config.unsupported(ctx, &field)),
        };
        let mut args: GeneratorArgs = config.fields(ctx, &field)?;
        // The generated object's name and namespace are the configuration's own.
        args.name = args.name.or_else(|| config.metadata("name"));
        args.namespace = args.namespace.or_else(|| config.metadata("namespace"));
        generator::run_one(
            ctx,
            &field,
            kind,
            &args,
            &GeneratorOptions::default(),
            resmap,
        )?;
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Pairs {
    #[serde(default, alias = "annotations")]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    field_specs: Vec<CustomSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Namespace {
    #[serde(default)]
    field_specs: Vec<CustomSpec>,
    #[serde(default)]
    unset_only: bool,
    set_role_binding_subjects: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PrefixSuffix {
    prefix: Option<String>,
    suffix: Option<String>,
    #[serde(default)]
    field_specs: Vec<CustomSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ImageTag {
    image_tag: Image,
    #[serde(default)]
    field_specs: Vec<CustomSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ReplicaCount {
    replica: Replica,
    #[serde(default)]
    field_specs: Vec<CustomSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct StrategicMerge {
    #[serde(default)]
    paths: Vec<String>,
    patches: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Json6902 {
    target: Selector,
    path: Option<String>,
    json_op: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Replacements {
    #[serde(default)]
    replacements: Vec<ReplacementEntry>,
}

/// Runs the `transformers:` configurations.
pub(super) fn transform(
    ctx: &Ctx,
    configs: &[PluginConfig],
    resmap: &mut ResMap,
) -> Result<(), RenderError> {
    for (i, config) in configs.iter().enumerate() {
        let field = format!("transformers[{i}]");
        config.check_builtin(ctx, &field)?;
        match config.kind() {
            "LabelTransformer" | "AnnotationsTransformer" => {
                let c: Pairs = config.fields(ctx, &field)?;
                transform::pairs_at(resmap, &c.labels, &c.field_specs);
            }
            "NamespaceTransformer" => {
                let c: Namespace = config.fields(ctx, &field)?;
                if c.set_role_binding_subjects
                    .as_deref()
                    .is_some_and(|m| m != "defaultOnly")
                {
                    return Err(
                        config.unsupported(ctx, &format!("{field}: setRoleBindingSubjects"))
                    );
                }
                let ns = config.metadata("namespace").unwrap_or_default();
                if !ns.is_empty() {
                    transform::namespace_at(resmap, &ns, &c.field_specs, c.unset_only);
                }
            }
            kind @ ("PrefixSuffixTransformer" | "PrefixTransformer" | "SuffixTransformer") => {
                let c: PrefixSuffix = config.fields(ctx, &field)?;
                // Names only: what else a prefix could apply to is refused.
                if c.field_specs
                    .iter()
                    .any(|f| f.path() != "metadata/name" || f.kind.is_some() || f.group.is_some())
                {
                    return Err(config.unsupported(
                        ctx,
                        &format!("{field}: fieldSpecs other than metadata/name"),
                    ));
                }
                if !c.field_specs.is_empty() {
                    let prefix = c.prefix.unwrap_or_default();
                    let suffix = c.suffix.unwrap_or_default();
                    let (prefix, suffix) = match kind {
                        "PrefixTransformer" => (prefix, String::new()),
                        "SuffixTransformer" => (String::new(), suffix),
                        _ => (prefix, suffix),
                    };
                    transform::prefix_suffix(resmap, &prefix, &suffix);
                }
            }
            "ImageTagTransformer" => {
                let c: ImageTag = config.fields(ctx, &field)?;
                transform::images_with(resmap, &[c.image_tag], &c.field_specs);
            }
            "ReplicaCountTransformer" => {
                let c: ReplicaCount = config.fields(ctx, &field)?;
                transform::replicas_at(resmap, &c.replica, &c.field_specs)
                    .map_err(|m| ctx.error(format!("{field}: ReplicaCountTransformer: {m}")))?;
            }
            "PatchTransformer" => {
                let entry: PatchEntry = config.fields(ctx, &field)?;
                patch::patches(ctx, &[entry], resmap)?;
            }
            "PatchStrategicMergeTransformer" => {
                let c: StrategicMerge = config.fields(ctx, &field)?;
                let entries: Vec<String> = c.paths.into_iter().chain(c.patches).collect();
                patch::strategic_merge_files(ctx, &entries, resmap)?;
            }
            "PatchJson6902Transformer" => {
                let c: Json6902 = config.fields(ctx, &field)?;
                let entry = PatchEntry::json6902(c.target, c.path, c.json_op);
                patch::json6902_entries(ctx, &[entry], resmap)?;
            }
            "ReplacementTransformer" => {
                let c: Replacements = config.fields(ctx, &field)?;
                replacement::run(ctx, &c.replacements, resmap)?;
            }
            _ => return Err(config.unsupported(ctx, &field)),
        }
    }
    Ok(())
}
