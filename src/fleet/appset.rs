//! Argo CD `ApplicationSet`s, expanded on the node into the Applications they generate:
//! the `list`, `git` (directories and files), `clusters` (this node, standing in for the
//! cluster secrets Argo CD reads), `matrix` and `merge` generators, with both template
//! syntaxes (`{{param}}`, and `goTemplate: true` through [`template`]). Pure but for reading
//! checkouts, which the caller provides ([`Checkouts`]).
//!
//! What cannot be expanded as Argo CD would (another generator, `templatePatch`, a template
//! function edgesync does not have) is an error naming it: the ApplicationSet yields nothing
//! rather than something else.

pub(crate) mod template;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::render::Object;

/// Most Applications one ApplicationSet may generate (a matrix multiplies).
const MAX_GENERATED: usize = 1000;
/// Most files or directories a git generator looks at in one checkout.
const MAX_ENTRIES: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub(crate) enum AppSetError {
    #[error("{field} is missing")]
    Missing { field: String },
    #[error("{field} must be {expected}")]
    Type {
        field: String,
        expected: &'static str,
    },
    #[error("{field}: {what} is not supported by edgesync")]
    Unsupported { field: String, what: String },
    #[error("{field}: cannot read {repo} at {revision}: {source}")]
    Checkout {
        field: String,
        repo: String,
        revision: String,
        source: CheckoutError,
    },
    #[error("{field}: {path}: {reason}")]
    File {
        field: String,
        path: String,
        reason: String,
    },
    #[error("{field}: {source}")]
    Template {
        field: String,
        source: template::TemplateError,
    },
    #[error("{field}: {source}")]
    Selector {
        field: String,
        source: crate::model::selector::SelectorError,
    },
    #[error("more than {MAX_GENERATED} Applications generated")]
    TooMany,
    #[error("{0}: matrix needs exactly two generators")]
    MatrixShape(String),
}

/// Why a git generator's repository cannot be read (the source stage's error).
pub(crate) type CheckoutError = Box<dyn std::error::Error + Send + Sync>;

/// Checkouts of the repositories git generators read.
pub(crate) trait Checkouts {
    /// The root of `repo`'s checkout at `revision`, or why it cannot be read.
    fn checkout(&self, repo: &str, revision: &str) -> Result<PathBuf, CheckoutError>;
}

/// The node, which the `clusters` generator yields when its selector matches.
pub(crate) struct Node<'a> {
    pub(crate) name: &'a str,
    pub(crate) labels: &'a BTreeMap<String, String>,
}

/// One set of parameters: nested, as `goTemplate` reads it (`.path.basename`), and flat,
/// as `{{path.basename}}` reads it.
#[derive(Debug, Clone, Default, PartialEq)]
struct Params {
    nested: Map<String, Value>,
    flat: BTreeMap<String, String>,
}

impl Params {
    fn merge(&mut self, other: &Params) {
        for (k, v) in &other.nested {
            self.nested.insert(k.clone(), v.clone());
        }
        for (k, v) in &other.flat {
            self.flat.insert(k.clone(), v.clone());
        }
    }
}

struct Ctx<'a> {
    go: bool,
    missing_key_error: bool,
    checkouts: &'a dyn Checkouts,
    node: &'a Node<'a>,
}

/// The Applications `appset` generates, each an object with its origin, and what was
/// ignored.
pub(crate) fn expand(
    appset: &Object,
    checkouts: &dyn Checkouts,
    node: &Node<'_>,
) -> Result<(Vec<Object>, Vec<String>), AppSetError> {
    let spec = appset
        .value
        .get("spec")
        .and_then(Value::as_object)
        .ok_or_else(|| AppSetError::Missing {
            field: "spec".into(),
        })?;
    let mut warnings = Vec::new();
    for key in spec.keys() {
        match key.as_str() {
            "generators" | "template" | "goTemplate" | "goTemplateOptions" | "syncPolicy" => {}
            "templatePatch"
            | "strategy"
            | "ignoreApplicationDifferences"
            | "applyNestedSelectors" => {
                return Err(AppSetError::Unsupported {
                    field: format!("spec.{key}"),
                    what: key.clone(),
                })
            }
            other => warnings.push(format!("spec.{other} is not supported and is ignored")),
        }
    }
    let options: Vec<&str> = spec
        .get("goTemplateOptions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let ctx = Ctx {
        go: spec.get("goTemplate").and_then(Value::as_bool) == Some(true),
        missing_key_error: options.contains(&"missingkey=error"),
        checkouts,
        node,
    };
    let template = spec.get("template").ok_or_else(|| AppSetError::Missing {
        field: "spec.template".into(),
    })?;
    let generators = spec
        .get("generators")
        .and_then(Value::as_array)
        .ok_or_else(|| AppSetError::Missing {
            field: "spec.generators".into(),
        })?;
    let preserve = spec
        .get("syncPolicy")
        .and_then(|p| p.get("preserveResourcesOnDeletion"))
        .and_then(Value::as_bool)
        == Some(true);
    let mut apps = Vec::new();
    for (i, generator) in generators.iter().enumerate() {
        let field = format!("spec.generators[{i}]");
        for params in generate(&ctx, generator, &field, &mut warnings)? {
            if apps.len() >= MAX_GENERATED {
                return Err(AppSetError::TooMany);
            }
            let mut app = instantiate(&ctx, template, &params, "spec.template")?;
            if preserve {
                strip_delete_finalizer(&mut app);
            }
            let index = apps.len();
            apps.push(Object {
                value: app,
                origin: format!("{} (generated #{index})", appset.origin),
            });
        }
    }
    Ok((apps, warnings))
}

/// The Application of one parameter set: the template's `metadata` and `spec` with every
/// string templated.
fn instantiate(
    ctx: &Ctx<'_>,
    template: &Value,
    params: &Params,
    field: &str,
) -> Result<Map<String, Value>, AppSetError> {
    let rendered = apply(ctx, template, params).map_err(|source| AppSetError::Template {
        field: field.to_string(),
        source,
    })?;
    let mut app = Map::new();
    app.insert("apiVersion".into(), "argoproj.io/v1alpha1".into());
    app.insert("kind".into(), "Application".into());
    let metadata = rendered
        .get("metadata")
        .cloned()
        .unwrap_or(Value::Object(Map::new()));
    app.insert("metadata".into(), metadata);
    app.insert(
        "spec".into(),
        rendered.get("spec").cloned().unwrap_or(Value::Null),
    );
    Ok(app)
}

/// `preserveResourcesOnDeletion`: an Application the set stops generating leaves its objects.
fn strip_delete_finalizer(app: &mut Map<String, Value>) {
    if let Some(Value::Array(finalizers)) = app
        .get_mut("metadata")
        .and_then(|m| m.get_mut("finalizers"))
    {
        finalizers.retain(|f| {
            !f.as_str()
                .is_some_and(|f| f.starts_with("resources-finalizer.argocd.argoproj.io"))
        });
    }
}

/// Templates every string (keys too) of `value`.
fn apply(ctx: &Ctx<'_>, value: &Value, params: &Params) -> Result<Value, template::TemplateError> {
    Ok(match value {
        Value::String(s) => Value::String(render_text(ctx, s, params)?),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|i| apply(ctx, i, params))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                out.insert(render_text(ctx, k, params)?, apply(ctx, v, params)?);
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

fn render_text(
    ctx: &Ctx<'_>,
    text: &str,
    params: &Params,
) -> Result<String, template::TemplateError> {
    if !text.contains("{{") {
        return Ok(text.to_string());
    }
    if ctx.go {
        template::render(text, &params.nested, ctx.missing_key_error)
    } else {
        Ok(template::fast(text, &params.flat))
    }
}

fn generate(
    ctx: &Ctx<'_>,
    generator: &Value,
    field: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<Params>, AppSetError> {
    let map = generator.as_object().ok_or_else(|| AppSetError::Type {
        field: field.to_string(),
        expected: "a mapping",
    })?;
    let mut out = None;
    for (kind, body) in map {
        let field = format!("{field}.{kind}");
        let params = match kind.as_str() {
            "list" => list(body, &field)?,
            "git" => git(ctx, body, &field)?,
            "clusters" => clusters(ctx, body, &field)?,
            "matrix" => matrix(ctx, body, &field, warnings)?,
            "merge" => merge(ctx, body, &field, warnings)?,
            "selector" => {
                return Err(AppSetError::Unsupported {
                    field,
                    what: "a generator's selector".into(),
                })
            }
            other => {
                return Err(AppSetError::Unsupported {
                    field,
                    what: format!("the {other} generator"),
                })
            }
        };
        if out.replace(params).is_some() {
            return Err(AppSetError::Unsupported {
                field,
                what: "several generators in one entry".into(),
            });
        }
    }
    out.ok_or_else(|| AppSetError::Missing {
        field: format!("{field} (a generator)"),
    })
}

/// A parameter set from a mapping: nested as it is, flat with dotted keys.
fn from_value(value: &Map<String, Value>) -> Params {
    let mut flat = BTreeMap::new();
    flatten("", &Value::Object(value.clone()), &mut flat);
    Params {
        nested: value.clone(),
        flat,
    }
}

fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        Value::Null => {}
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

fn list(body: &Value, field: &str) -> Result<Vec<Params>, AppSetError> {
    if body.get("elementsYaml").is_some() {
        return Err(AppSetError::Unsupported {
            field: field.to_string(),
            what: "elementsYaml".into(),
        });
    }
    let elements = body
        .get("elements")
        .and_then(Value::as_array)
        .ok_or_else(|| AppSetError::Missing {
            field: format!("{field}.elements"),
        })?;
    elements
        .iter()
        .map(|e| {
            e.as_object()
                .map(from_value)
                .ok_or_else(|| AppSetError::Type {
                    field: format!("{field}.elements[]"),
                    expected: "a mapping",
                })
        })
        .collect()
}

/// The `clusters` generator on a node: the node itself, when the selector matches its labels,
/// with the parameters Argo CD gives the in-cluster cluster (`name`, `server`,
/// `metadata.labels`), and the generator's `values`.
fn clusters(ctx: &Ctx<'_>, body: &Value, field: &str) -> Result<Vec<Params>, AppSetError> {
    let selector = selector_text(body.get("selector"), field)?;
    let parsed = crate::model::selector::Selector::parse(&selector).map_err(|source| {
        AppSetError::Selector {
            field: format!("{field}.selector"),
            source,
        }
    })?;
    if !parsed.matches(ctx.node.labels) {
        return Ok(Vec::new());
    }
    let labels: Map<String, Value> = ctx
        .node
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let mut value = Map::new();
    value.insert("name".into(), ctx.node.name.into());
    value.insert("nameNormalized".into(), normalize(ctx.node.name).into());
    value.insert("server".into(), "https://kubernetes.default.svc".into());
    let mut metadata = Map::new();
    metadata.insert("labels".into(), Value::Object(labels));
    metadata.insert("annotations".into(), Value::Object(Map::new()));
    value.insert("metadata".into(), Value::Object(metadata));
    let mut params = from_value(&value);
    add_values(ctx, body, field, &mut params)?;
    Ok(vec![params])
}

/// A generator's `values`, templated with the parameters it yields (as in Argo CD), added to
/// them as `values.<key>`.
fn add_values(
    ctx: &Ctx<'_>,
    body: &Value,
    field: &str,
    params: &mut Params,
) -> Result<(), AppSetError> {
    let Some(values) = body.get("values").and_then(Value::as_object) else {
        return Ok(());
    };
    let mut rendered = Map::new();
    for (k, v) in values {
        let text = v
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string());
        let text = render_text(ctx, &text, params).map_err(|source| AppSetError::Template {
            field: format!("{field}.values.{k}"),
            source,
        })?;
        rendered.insert(k.clone(), Value::String(text));
    }
    let mut wrapper = Map::new();
    wrapper.insert("values".into(), Value::Object(rendered));
    params.merge(&from_value(&wrapper));
    Ok(())
}

/// A Kubernetes `LabelSelector` (`matchLabels`, `matchExpressions`) as selector text.
fn selector_text(selector: Option<&Value>, field: &str) -> Result<String, AppSetError> {
    let Some(selector) = selector.filter(|s| !s.is_null()) else {
        return Ok(String::new());
    };
    let mut terms = Vec::new();
    for (k, v) in selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let v = v.as_str().ok_or_else(|| AppSetError::Type {
            field: format!("{field}.selector.matchLabels.{k}"),
            expected: "a string",
        })?;
        terms.push(format!("{k}={v}"));
    }
    for e in selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = e.get("key").and_then(Value::as_str).unwrap_or_default();
        let values: Vec<&str> = e
            .get("values")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let term = match e.get("operator").and_then(Value::as_str) {
            Some("In") => format!("{key} in ({})", values.join(",")),
            Some("NotIn") => format!("{key} notin ({})", values.join(",")),
            Some("Exists") => key.to_string(),
            Some("DoesNotExist") => format!("!{key}"),
            other => {
                return Err(AppSetError::Unsupported {
                    field: format!("{field}.selector.matchExpressions[].operator"),
                    what: format!("{other:?}"),
                })
            }
        };
        terms.push(term);
    }
    Ok(terms.join(","))
}

/// Argo CD's `basenameNormalized`: characters other than letters, digits, `-` and `.`
/// become `-`.
fn normalize(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

fn git(ctx: &Ctx<'_>, body: &Value, field: &str) -> Result<Vec<Params>, AppSetError> {
    let text = |key: &str| body.get(key).and_then(Value::as_str).map(str::to_string);
    let repo = text("repoURL").ok_or_else(|| AppSetError::Missing {
        field: format!("{field}.repoURL"),
    })?;
    let revision = text("revision").unwrap_or_else(|| "HEAD".into());
    for key in body.as_object().into_iter().flat_map(|m| m.keys()) {
        if ![
            "repoURL",
            "revision",
            "directories",
            "files",
            "values",
            "pathParamPrefix",
        ]
        .contains(&key.as_str())
        {
            return Err(AppSetError::Unsupported {
                field: format!("{field}.{key}"),
                what: key.clone(),
            });
        }
    }
    let root =
        ctx.checkouts
            .checkout(&repo, &revision)
            .map_err(|source| AppSetError::Checkout {
                field: field.to_string(),
                repo: crate::model::url::redact(&repo),
                revision: revision.clone(),
                source,
            })?;
    let prefix = text("pathParamPrefix");
    let mut out = Vec::new();
    if let Some(dirs) = body.get("directories").and_then(Value::as_array) {
        let (include, exclude) = patterns(dirs, &format!("{field}.directories"))?;
        for dir in entries(&root, true) {
            if include.iter().any(|p| path_match(p, &dir))
                && !exclude.iter().any(|p| path_match(p, &dir))
            {
                out.push(path_params(&dir, None, prefix.as_deref()));
            }
        }
    }
    if let Some(files) = body.get("files").and_then(Value::as_array) {
        let (include, exclude) = patterns(files, &format!("{field}.files"))?;
        for file in entries(&root, false) {
            if !include.iter().any(|p| path_match(p, &file))
                || exclude.iter().any(|p| path_match(p, &file))
            {
                continue;
            }
            for content in file_params(&root, &file, field)? {
                let mut params = from_value(&content);
                params.merge(&path_params(&file, Some(&file), prefix.as_deref()));
                out.push(params);
            }
        }
    }
    for params in &mut out {
        add_values(ctx, body, field, params)?;
    }
    Ok(out)
}

/// `path` patterns, and those marked `exclude: true`.
fn patterns(list: &[Value], field: &str) -> Result<(Vec<String>, Vec<String>), AppSetError> {
    let mut include = Vec::new();
    let mut exclude = Vec::new();
    for entry in list {
        let path =
            entry
                .get("path")
                .and_then(Value::as_str)
                .ok_or_else(|| AppSetError::Missing {
                    field: format!("{field}[].path"),
                })?;
        if entry.get("exclude").and_then(Value::as_bool) == Some(true) {
            exclude.push(path.to_string());
        } else {
            include.push(path.to_string());
        }
    }
    Ok((include, exclude))
}

/// The directories (or files) of the checkout, relative, `.git` left out, at most
/// [`MAX_ENTRIES`]. Symlinks are not followed.
fn entries(root: &Path, dirs: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = vec![PathBuf::new()];
    let mut seen = 0usize;
    while let Some(rel) = pending.pop() {
        let Ok(read) = std::fs::read_dir(root.join(&rel)) else {
            continue;
        };
        for entry in read.flatten() {
            seen += 1;
            if seen > MAX_ENTRIES {
                return out;
            }
            let name = entry.file_name().to_string_lossy().to_string();
            if name == ".git" {
                continue;
            }
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = rel.join(&name);
            let text = path.to_string_lossy().to_string();
            if kind.is_dir() {
                if dirs {
                    out.push(text);
                }
                pending.push(path);
            } else if kind.is_file() && !dirs {
                out.push(text);
            }
        }
    }
    out.sort();
    out
}

/// Go's `path.Match` by segment (`*` never crosses `/`), with `**` for any number of
/// segments, as Argo CD's git generators match.
fn path_match(pattern: &str, path: &str) -> bool {
    fn go(p: &[&str], t: &[&str]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((&"**", rest)) => (0..=t.len()).any(|i| go(rest, &t[i..])),
            Some((seg, rest)) => match t.split_first() {
                Some((first, more)) => crate::model::glob::glob(seg, first) && go(rest, more),
                None => false,
            },
        }
    }
    let p: Vec<&str> = pattern.trim_matches('/').split('/').collect();
    let t: Vec<&str> = path.split('/').collect();
    go(&p, &t)
}

/// The path parameters of a directory (or of a file, whose `path` is its directory).
fn path_params(path: &str, file: Option<&str>, prefix: Option<&str>) -> Params {
    let dir = match file {
        Some(f) => Path::new(f)
            .parent()
            .map(|p| p.to_string_lossy().to_string())
            .unwrap_or_default(),
        None => path.to_string(),
    };
    let dir = if dir.is_empty() { ".".to_string() } else { dir };
    let basename = Path::new(&dir)
        .file_name()
        .map(|b| b.to_string_lossy().to_string())
        .unwrap_or_else(|| dir.clone());
    let segments: Vec<Value> = dir.split('/').map(|s| Value::String(s.into())).collect();
    let key = match prefix {
        Some(p) => format!("{p}.path"),
        None => "path".into(),
    };
    let mut nested = Map::new();
    nested.insert("path".into(), dir.clone().into());
    nested.insert("basename".into(), basename.clone().into());
    nested.insert("basenameNormalized".into(), normalize(&basename).into());
    nested.insert("segments".into(), Value::Array(segments.clone()));
    let mut flat = BTreeMap::new();
    flat.insert(key.clone(), dir.clone());
    flat.insert(format!("{key}.basename"), basename.clone());
    flat.insert(format!("{key}.basenameNormalized"), normalize(&basename));
    for (i, s) in segments.iter().enumerate() {
        flat.insert(
            format!("{key}[{i}]"),
            s.as_str().unwrap_or_default().to_string(),
        );
    }
    if let Some(file) = file {
        let filename = Path::new(file)
            .file_name()
            .map(|b| b.to_string_lossy().to_string())
            .unwrap_or_default();
        nested.insert("filename".into(), filename.clone().into());
        nested.insert("filenameNormalized".into(), normalize(&filename).into());
        flat.insert(format!("{key}.filename"), filename.clone());
        flat.insert(format!("{key}.filenameNormalized"), normalize(&filename));
    }
    let mut params = Params {
        nested: Map::new(),
        flat,
    };
    match prefix {
        Some(p) => {
            let mut inner = Map::new();
            inner.insert("path".into(), Value::Object(nested));
            params.nested.insert(p.to_string(), Value::Object(inner));
        }
        None => {
            params.nested.insert("path".into(), Value::Object(nested));
        }
    }
    params
}

/// The parameter sets of a JSON or YAML file of a git files generator: one per document, or
/// one per element of a top-level list.
fn file_params(
    root: &Path,
    file: &str,
    field: &str,
) -> Result<Vec<Map<String, Value>>, AppSetError> {
    let err = |reason: String| AppSetError::File {
        field: field.to_string(),
        path: file.to_string(),
        reason,
    };
    let full = root.join(file);
    let size = std::fs::metadata(&full)
        .map_err(|e| err(e.to_string()))?
        .len();
    if size > crate::render::MAX_FILE_BYTES {
        return Err(err(format!("{size} bytes is too large")));
    }
    let text = std::fs::read_to_string(&full).map_err(|e| err(e.to_string()))?;
    let docs =
        crate::render::parse_documents(&text, Path::new(file)).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    for doc in docs {
        match doc {
            Value::Object(m) => out.push(m),
            Value::Array(items) => {
                for item in items {
                    match item {
                        Value::Object(m) => out.push(m),
                        _ => return Err(err("a list entry is not a mapping".into())),
                    }
                }
            }
            Value::Null => {}
            _ => return Err(err("not a mapping or a list of mappings".into())),
        }
    }
    Ok(out)
}

fn children<'v>(body: &'v Value, field: &str) -> Result<&'v Vec<Value>, AppSetError> {
    body.get("generators")
        .and_then(Value::as_array)
        .ok_or_else(|| AppSetError::Missing {
            field: format!("{field}.generators"),
        })
}

/// Every combination of the two child generators' parameters; the second may use the
/// first's parameters in its own fields (a git path from a cluster label).
fn matrix(
    ctx: &Ctx<'_>,
    body: &Value,
    field: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<Params>, AppSetError> {
    let [first, second] = children(body, field)?.as_slice() else {
        return Err(AppSetError::MatrixShape(field.to_string()));
    };
    let mut out = Vec::new();
    for a in generate(ctx, first, &format!("{field}.generators[0]"), warnings)? {
        let second = apply(ctx, second, &a).map_err(|source| AppSetError::Template {
            field: format!("{field}.generators[1]"),
            source,
        })?;
        for b in generate(ctx, &second, &format!("{field}.generators[1]"), warnings)? {
            if out.len() >= MAX_GENERATED {
                return Err(AppSetError::TooMany);
            }
            let mut combined = a.clone();
            combined.merge(&b);
            out.push(combined);
        }
    }
    Ok(out)
}

/// The first child generator's parameter sets, each overridden by the sets of the other
/// children that agree with it on every `mergeKeys` key.
fn merge(
    ctx: &Ctx<'_>,
    body: &Value,
    field: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<Params>, AppSetError> {
    let keys: Vec<String> = body
        .get("mergeKeys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect();
    if keys.is_empty() {
        return Err(AppSetError::Missing {
            field: format!("{field}.mergeKeys"),
        });
    }
    let generators = children(body, field)?;
    let Some((base, others)) = generators.split_first() else {
        return Err(AppSetError::Missing {
            field: format!("{field}.generators[0]"),
        });
    };
    let key_of = |p: &Params| -> Option<Vec<String>> {
        keys.iter()
            .map(|k| {
                if ctx.go {
                    lookup(&p.nested, k).map(|v| match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                } else {
                    p.flat.get(k).cloned()
                }
            })
            .collect()
    };
    let mut out = generate(ctx, base, &format!("{field}.generators[0]"), warnings)?;
    for (i, other) in others.iter().enumerate() {
        let sets = generate(
            ctx,
            other,
            &format!("{field}.generators[{}]", i + 1),
            warnings,
        )?;
        for params in &mut out {
            let Some(key) = key_of(params) else {
                continue;
            };
            for set in &sets {
                if key_of(set).as_ref() == Some(&key) {
                    params.merge(set);
                }
            }
        }
    }
    Ok(out)
}

/// The value at a dotted path of nested parameters.
fn lookup<'a>(params: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut current = params.get(parts.next()?)?;
    for part in parts {
        current = current.get(part)?;
    }
    Some(current)
}

#[cfg(test)]
mod tests;
