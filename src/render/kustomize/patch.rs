//! `patches`, `patchesStrategicMerge` and `patchesJson6902`: strategic merge patches and JSON
//! patches (RFC 6902), applied to the objects a target selector picks or, for a strategic merge
//! patch without a target, to the one object it names.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::resource::{Res, ResMap};
use super::smp::{self, Outcome};
use super::Ctx;
use crate::render::RenderError;

/// One entry of `patches` or `patchesJson6902`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct PatchEntry {
    path: Option<String>,
    patch: Option<String>,
    target: Option<Selector>,
    /// Whether a strategic merge patch may change the name or kind of its targets (a JSON
    /// patch always may); references follow the new name.
    #[serde(default)]
    options: PatchOptions,
}

impl PatchEntry {
    /// A JSON patch for `target`, from a file or inline.
    pub(super) fn json6902(target: Selector, path: Option<String>, patch: Option<String>) -> Self {
        PatchEntry {
            path,
            patch,
            target: Some(target),
            options: PatchOptions::default(),
        }
    }
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PatchOptions {
    #[serde(default)]
    allow_name_change: bool,
    #[serde(default)]
    allow_kind_change: bool,
}

/// A target selector. Name and namespace are anchored regular expressions, as in kustomize.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Selector {
    pub(crate) group: Option<String>,
    pub(crate) version: Option<String>,
    pub(crate) kind: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) namespace: Option<String>,
    pub(crate) label_selector: Option<String>,
    pub(crate) annotation_selector: Option<String>,
}

enum Content {
    Strategic(Vec<Map<String, Value>>),
    Json6902(json_patch::Patch),
}

pub(super) fn patches(
    ctx: &Ctx,
    entries: &[PatchEntry],
    resmap: &mut ResMap,
) -> Result<(), RenderError> {
    for (i, entry) in entries.iter().enumerate() {
        let field = format!("patches[{i}]");
        let (source, content) = load(ctx, &field, entry)?;
        match (&entry.target, content) {
            (Some(sel), content) => {
                let targets = select(ctx, &field, sel, resmap)?;
                apply_to(
                    ctx,
                    &field,
                    &source,
                    &content,
                    &targets,
                    entry.options,
                    resmap,
                )?;
            }
            (None, Content::Strategic(docs)) => {
                for doc in docs {
                    strategic_by_name(ctx, &field, &source, doc, resmap)?;
                }
            }
            (None, Content::Json6902(_)) => {
                return Err(ctx.error(format!(
                    "{field}: {source} is a JSON patch, which needs a target"
                )))
            }
        }
    }
    Ok(())
}

/// The legacy `patchesStrategicMerge`: file names or inline patches.
pub(super) fn strategic_merge_files(
    ctx: &Ctx,
    entries: &[String],
    resmap: &mut ResMap,
) -> Result<(), RenderError> {
    for (i, entry) in entries.iter().enumerate() {
        let field = format!("patchesStrategicMerge[{i}]");
        let inline = entry.contains('\n') || entry.trim_start().starts_with('{');
        let (source, text) = if inline {
            ("(inline patch)".to_string(), entry.clone())
        } else {
            let (path, text) = ctx.read_file(&field, entry)?;
            (path.display().to_string(), text)
        };
        match parse(ctx, &field, &source, &text)? {
            Content::Strategic(docs) => {
                for doc in docs {
                    strategic_by_name(ctx, &field, &source, doc, resmap)?;
                }
            }
            Content::Json6902(_) => {
                return Err(ctx.error(format!(
                    "{field}: {source} is a JSON patch; list it under patches with a target"
                )))
            }
        }
    }
    Ok(())
}

/// The legacy `patchesJson6902`: a target and a JSON patch.
pub(super) fn json6902_entries(
    ctx: &Ctx,
    entries: &[PatchEntry],
    resmap: &mut ResMap,
) -> Result<(), RenderError> {
    for (i, entry) in entries.iter().enumerate() {
        let field = format!("patchesJson6902[{i}]");
        let sel = entry
            .target
            .as_ref()
            .ok_or_else(|| ctx.error(format!("{field}: target is required")))?;
        let (source, content) = load(ctx, &field, entry)?;
        let targets = select(ctx, &field, sel, resmap)?;
        apply_to(
            ctx,
            &field,
            &source,
            &content,
            &targets,
            entry.options,
            resmap,
        )?;
    }
    Ok(())
}

fn load(ctx: &Ctx, field: &str, entry: &PatchEntry) -> Result<(String, Content), RenderError> {
    let (source, text) = match (&entry.path, &entry.patch) {
        (Some(_), Some(_)) => {
            return Err(ctx.error(format!("{field}: give path or patch, not both")))
        }
        (Some(path), None) => {
            let (p, text) = ctx.read_file(field, path)?;
            (p.display().to_string(), text)
        }
        (None, Some(inline)) => ("(inline patch)".to_string(), inline.clone()),
        (None, None) => return Err(ctx.error(format!("{field}: path or patch is required"))),
    };
    let content = parse(ctx, field, &source, &text)?;
    Ok((source, content))
}

fn parse(ctx: &Ctx, field: &str, source: &str, text: &str) -> Result<Content, RenderError> {
    let docs = crate::render::yaml::parse_documents_yaml12(text, std::path::Path::new(source))?;
    let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    if let [Value::Array(_)] = docs.as_slice() {
        let patch: json_patch::Patch = serde_json::from_value(docs[0].clone())
            .map_err(|e| ctx.error(format!("{field}: {source}: invalid JSON patch: {e}")))?;
        return Ok(Content::Json6902(patch));
    }
    let mut maps = Vec::new();
    for doc in docs {
        match doc {
            Value::Object(m) => maps.push(m),
            other => {
                return Err(ctx.error(format!(
                "{field}: {source}: a patch must be a mapping or a list of operations, found {}",
                if other.is_array() {
                    "several lists"
                } else {
                    "a scalar"
                }
            )))
            }
        }
    }
    if maps.is_empty() {
        return Err(ctx.error(format!("{field}: {source} is empty")));
    }
    Ok(Content::Strategic(maps))
}

/// A strategic merge patch without a target applies to the one object it names.
fn strategic_by_name(
    ctx: &Ctx,
    field: &str,
    source: &str,
    doc: Map<String, Value>,
    resmap: &mut ResMap,
) -> Result<(), RenderError> {
    let probe = Res::new(doc.clone(), source.to_string());
    let (kind, group, name, ns) = (probe.kind(), probe.group(), probe.name(), probe.namespace());
    if kind.is_empty() || name.is_empty() {
        return Err(ctx.error(format!(
            "{field}: {source}: a patch without a target needs kind and metadata.name"
        )));
    }
    let matches: Vec<usize> = (0..resmap.len())
        .filter(|&i| {
            resmap.iter().nth(i).is_some_and(|r| {
                r.kind() == kind
                    && r.group() == group
                    && r.all_names()
                        .any(|(rns, rn)| rn == name && (ns.is_empty() || rns == ns))
            })
        })
        .collect();
    if matches.len() != 1 {
        return Err(ctx.error(format!(
            "{field}: {source}: {} for the patch's {}; a patch without a target must name exactly \
             one object of the resources (kustomize: failed to find unique target for patch)",
            if matches.is_empty() {
                "no object matches"
            } else {
                "several objects match"
            },
            probe.id()
        )));
    }
    apply_to(
        ctx,
        field,
        source,
        &Content::Strategic(vec![doc]),
        &matches,
        PatchOptions::default(),
        resmap,
    )
}

fn apply_to(
    ctx: &Ctx,
    field: &str,
    source: &str,
    content: &Content,
    targets: &[usize],
    options: PatchOptions,
    resmap: &mut ResMap,
) -> Result<(), RenderError> {
    let mut deleted = Vec::new();
    for &i in targets {
        let Some(r) = resmap.get_mut(i) else { continue };
        let (old_name, old_ns) = (r.name().to_string(), r.namespace().to_string());
        match content {
            Content::Strategic(docs) => {
                for doc in docs {
                    let mut doc = doc.clone();
                    // The patch's own kind and name only select the target; they change it
                    // only when the options allow it.
                    if !options.allow_kind_change {
                        doc.remove("apiVersion");
                        doc.remove("kind");
                    }
                    if let Some(Value::Object(meta)) = doc.get_mut("metadata") {
                        if !options.allow_name_change {
                            meta.remove("name");
                        }
                        meta.remove("namespace");
                    }
                    if smp::apply(&mut r.obj, &doc, ctx.builder.schema.as_deref())
                        == Outcome::Delete
                    {
                        deleted.push(i);
                    }
                }
            }
            Content::Json6902(patch) => {
                let mut value = Value::Object(std::mem::take(&mut r.obj));
                let result = json_patch::patch(&mut value, patch);
                if let Value::Object(m) = value {
                    r.obj = m;
                }
                result.map_err(|e| ctx.error(format!("{field}: {source} on {}: {e}", r.id())))?;
            }
        }
        // A rename by patch is remembered, so references can follow it.
        if r.name() != old_name || r.namespace() != old_ns {
            r.history.push((old_ns, old_name));
        }
    }
    deleted.sort_unstable();
    for i in deleted.into_iter().rev() {
        resmap.remove(i);
    }
    Ok(())
}

impl Selector {
    /// The positions of the objects this selector picks.
    pub(super) fn select(
        &self,
        ctx: &Ctx,
        field: &str,
        resmap: &ResMap,
    ) -> Result<Vec<usize>, RenderError> {
        select(ctx, field, self, resmap)
    }
}

fn select(
    ctx: &Ctx,
    field: &str,
    sel: &Selector,
    resmap: &ResMap,
) -> Result<Vec<usize>, RenderError> {
    let anchored =
        |pattern: &Option<String>, what: &str| -> Result<Option<regex_lite::Regex>, RenderError> {
            match pattern.as_deref().filter(|p| !p.is_empty()) {
                None => Ok(None),
                Some(p) => regex_lite::Regex::new(&format!("^(?:{p})$"))
                    .map(Some)
                    .map_err(|e| ctx.error(format!("{field}: target.{what} {p:?}: {e}"))),
            }
        };
    let name = anchored(&sel.name, "name")?;
    let namespace = anchored(&sel.namespace, "namespace")?;
    let group = anchored(&sel.group, "group")?;
    let version = anchored(&sel.version, "version")?;
    let kind = anchored(&sel.kind, "kind")?;
    let is =
        |re: &Option<regex_lite::Regex>, have: &str| re.as_ref().is_none_or(|re| re.is_match(have));
    let parse = |text: &Option<String>, what: &str| match text
        .as_deref()
        .filter(|t| !t.trim().is_empty())
    {
        None => Ok(None),
        Some(t) => crate::model::selector::Selector::parse(t)
            .map(Some)
            .map_err(|e| ctx.error(format!("{field}: target.{what} {t:?}: {}", e.reason))),
    };
    let labels = parse(&sel.label_selector, "labelSelector")?;
    let annotations = parse(&sel.annotation_selector, "annotationSelector")?;
    Ok(resmap
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            is(&group, r.group())
                && is(&version, r.version())
                && is(&kind, r.kind())
                && name
                    .as_ref()
                    .is_none_or(|re| r.all_names().any(|(_, n)| re.is_match(n)))
                && namespace
                    .as_ref()
                    .is_none_or(|re| re.is_match(r.namespace()))
                && labels
                    .as_ref()
                    .is_none_or(|s| s.matches(&meta_map(r, "labels")))
                && annotations
                    .as_ref()
                    .is_none_or(|s| s.matches(&meta_map(r, "annotations")))
        })
        .map(|(i, _)| i)
        .collect())
}

/// Labels or annotations as a selector reads them.
fn meta_map(r: &Res, field: &str) -> std::collections::BTreeMap<String, String> {
    r.obj
        .get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}
