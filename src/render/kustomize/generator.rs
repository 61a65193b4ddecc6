//! `configMapGenerator` and `secretGenerator`, and the name hash suffix kustomize gives generated
//! objects, computed the same way so that the names match `kustomize build` exactly.

use super::error::KustomizeError;
use std::collections::BTreeMap;

use base64::Engine;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::resource::{Behavior, Res, ResMap};
use super::{Ctx, Kustomization};
use crate::render::RenderError;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct GeneratorArgs {
    pub(super) name: Option<String>,
    pub(super) namespace: Option<String>,
    behavior: Option<String>,
    #[serde(default)]
    literals: Vec<String>,
    #[serde(default)]
    files: Vec<String>,
    #[serde(default)]
    envs: Vec<String>,
    /// The legacy single `env` file.
    env: Option<String>,
    options: Option<GeneratorOptions>,
    /// Secrets only.
    #[serde(rename = "type")]
    type_: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct GeneratorOptions {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    disable_name_suffix_hash: Option<bool>,
    immutable: Option<bool>,
}

/// Runs the kustomization's generators, adding to or merging into `resmap`.
pub(super) fn run(ctx: &Ctx, k: &Kustomization, resmap: &mut ResMap) -> Result<(), RenderError> {
    let global = k.generator_options.clone().unwrap_or_default();
    for (field, kind, list) in [
        ("configMapGenerator", "ConfigMap", &k.config_map_generator),
        ("secretGenerator", "Secret", &k.secret_generator),
    ] {
        for (i, args) in list.iter().enumerate() {
            run_one(ctx, &format!("{field}[{i}]"), kind, args, &global, resmap)?;
        }
    }
    Ok(())
}

/// Runs one generator of `kind` (ConfigMap or Secret); `field` names it in errors.
pub(super) fn run_one(
    ctx: &Ctx,
    field: &str,
    kind: &str,
    args: &GeneratorArgs,
    global: &GeneratorOptions,
    resmap: &mut ResMap,
) -> Result<(), RenderError> {
    let at = |m: String| ctx.error(format!("{field}: {m}"));
    let res = generate(ctx, kind, args, global).map_err(|e| match e {
        GenError::Render(e) => e,
        GenError::Message(m) => at(m),
    })?;
    let behavior = match args.behavior.as_deref() {
        None | Some("") | Some("create") => Behavior::Create,
        Some("merge") => Behavior::Merge,
        Some("replace") => Behavior::Replace,
        Some(other) => {
            return Err(at(format!(
                "behavior {other:?} is not one of create, merge, replace"
            )))
        }
    };
    add(resmap, res, behavior).map_err(|e| at(e.to_string()))
}

enum GenError {
    Render(RenderError),
    Message(String),
}

impl From<RenderError> for GenError {
    fn from(e: RenderError) -> Self {
        GenError::Render(e)
    }
}

fn generate(
    ctx: &Ctx,
    kind: &str,
    args: &GeneratorArgs,
    global: &GeneratorOptions,
) -> Result<Res, GenError> {
    let name = args
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| GenError::Message("name is required".into()))?;
    let mut pairs = env_pairs(ctx, args)?;
    pairs.extend(literal_pairs(args)?);
    pairs.extend(file_pairs(ctx, args)?);
    check_keys(kind, &pairs)?;
    let (data, binary) = encode(kind, pairs);
    generated(ctx, kind, name, args, global, data, binary)
}

type Pairs = Vec<(String, Vec<u8>)>;

/// The `KEY=VALUE` lines of the `env`/`envs` files.
fn env_pairs(ctx: &Ctx, args: &GeneratorArgs) -> Result<Pairs, GenError> {
    let mut pairs: Pairs = Vec::new();
    let env_files = args.env.iter().chain(&args.envs);
    for file in env_files {
        let (path, text) = ctx.read_file("envs", file)?;
        for (n, line) in text.lines().enumerate() {
            // As kustomize reads env files: a byte-order mark only on the first line, leading
            // whitespace dropped, everything after the first `=` kept as it is.
            let line = if n == 0 {
                line.trim_start_matches('\u{feff}')
            } else {
                line
            };
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line.split_once('=').ok_or_else(|| {
                // The line itself is not quoted: an env file holds secrets.
                GenError::Message(format!(
                    "{}:{}: the line has no '='; kustomize would read it from the environment, \
                     which edgesync does not",
                    path.display(),
                    n + 1
                ))
            })?;
            pairs.push((key.to_string(), value.as_bytes().to_vec()));
        }
    }
    Ok(pairs)
}

/// The `literals`, `KEY=VALUE` each.
fn literal_pairs(args: &GeneratorArgs) -> Result<Pairs, GenError> {
    let mut pairs: Pairs = Vec::new();
    for (n, literal) in args.literals.iter().enumerate() {
        // Not quoted: a literal without '=' may well be the value itself.
        let (key, value) = literal
            .split_once('=')
            .ok_or_else(|| GenError::Message(format!("literals[{n}] is not KEY=VALUE")))?;
        pairs.push((key.to_string(), unquote(value).as_bytes().to_vec()));
    }
    Ok(pairs)
}

/// The `files`, each under its file name or the `KEY=` it is given.
fn file_pairs(ctx: &Ctx, args: &GeneratorArgs) -> Result<Pairs, GenError> {
    let mut pairs: Pairs = Vec::new();
    for file in &args.files {
        let (key, source) = match file.split_once('=') {
            Some((k, p)) => (k.to_string(), p),
            None => (
                std::path::Path::new(file)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                file.as_str(),
            ),
        };
        let path = ctx.builder.local_path(ctx.dir, ctx.file, "files", source)?;
        if path.is_dir() {
            return Err(GenError::Message(format!("files: {source} is a directory")));
        }
        let bytes = std::fs::read(&path).map_err(|source| {
            GenError::Render(RenderError::Io {
                path: ctx.builder.rel(&path).to_path_buf(),
                source,
            })
        })?;
        pairs.push((key, bytes));
    }
    Ok(pairs)
}

/// Every key valid for `kind`, and each once.
fn check_keys(kind: &str, pairs: &Pairs) -> Result<(), GenError> {
    let mut seen = std::collections::HashSet::new();
    for (key, _) in pairs {
        if !valid_key(key) {
            return Err(GenError::Message(format!(
                "{key:?} is not a valid key name for a {kind}"
            )));
        }
        if !seen.insert(key.clone()) {
            return Err(GenError::Message(format!(
                "key {key:?} appears twice; keys must be unique"
            )));
        }
    }

    Ok(())
}

/// `data` and `binaryData`: a Secret's values base64-encoded; a ConfigMap's as text, or in
/// `binaryData` when they are not UTF-8.
fn encode(kind: &str, pairs: Pairs) -> (Map<String, Value>, Map<String, Value>) {
    let mut data = Map::new();
    let mut binary = Map::new();
    let b64 = base64::engine::general_purpose::STANDARD;
    for (key, bytes) in pairs {
        if kind == "Secret" {
            data.insert(key, Value::String(b64.encode(&bytes)));
        } else {
            match String::from_utf8(bytes) {
                Ok(text) => {
                    data.insert(key, Value::String(text));
                }
                Err(e) => {
                    binary.insert(key, Value::String(b64.encode(e.as_bytes())));
                }
            }
        }
    }

    (data, binary)
}

/// The generated object, with the generator options (its own over the kustomization's).
fn generated(
    ctx: &Ctx,
    kind: &str,
    name: String,
    args: &GeneratorArgs,
    global: &GeneratorOptions,
    data: Map<String, Value>,
    binary: Map<String, Value>,
) -> Result<Res, GenError> {
    let local = args.options.clone().unwrap_or_default();
    let mut labels = global.labels.clone();
    labels.extend(local.labels);
    let mut annotations = global.annotations.clone();
    annotations.extend(local.annotations);
    let disable_hash = local
        .disable_name_suffix_hash
        .or(global.disable_name_suffix_hash)
        .unwrap_or(false);
    let immutable = local.immutable.or(global.immutable).unwrap_or(false);

    let mut metadata = Map::new();
    metadata.insert("name".into(), Value::String(name));
    if let Some(ns) = args.namespace.as_deref().filter(|n| !n.is_empty()) {
        metadata.insert("namespace".into(), Value::String(ns.to_string()));
    }
    if !labels.is_empty() {
        metadata.insert("labels".into(), string_map(labels));
    }
    if !annotations.is_empty() {
        metadata.insert("annotations".into(), string_map(annotations));
    }
    let mut obj = Map::new();
    obj.insert("apiVersion".into(), Value::String("v1".into()));
    obj.insert("kind".into(), Value::String(kind.into()));
    obj.insert("metadata".into(), Value::Object(metadata));
    if kind == "Secret" {
        obj.insert(
            "type".into(),
            Value::String(args.type_.clone().unwrap_or_else(|| "Opaque".into())),
        );
    } else if args.type_.is_some() {
        return Err(GenError::Message("type is only for secretGenerator".into()));
    }
    if !data.is_empty() {
        obj.insert("data".into(), Value::Object(data));
    }
    if !binary.is_empty() {
        obj.insert("binaryData".into(), Value::Object(binary));
    }
    if immutable {
        obj.insert("immutable".into(), Value::Bool(true));
    }
    let mut res = Res::new(obj, ctx.builder.rel(ctx.file).display().to_string());
    res.needs_hash = !disable_hash;
    res.generator = Some(if kind == "Secret" {
        "SecretGenerator"
    } else {
        "ConfigMapGenerator"
    });
    Ok(res)
}

fn string_map(m: BTreeMap<String, String>) -> Value {
    Value::Object(m.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
}

/// kustomize strips one pair of matching quotes around a literal's value.
fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return &v[1..v.len() - 1];
        }
    }
    v
}

/// ConfigMap and Secret keys: letters, digits, `-`, `_` and `.`.
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn add(resmap: &mut ResMap, mut res: Res, behavior: Behavior) -> Result<(), KustomizeError> {
    let kind = res.kind().to_string();
    let name = res.name().to_string();
    let ns = res.namespace().to_string();
    let existing = resmap.position(|r| {
        r.kind() == kind
            && r.all_names().any(|(_, n)| n == name)
            && (ns.is_empty() || r.namespace() == ns)
    });
    match (behavior, existing) {
        (Behavior::Create, None) => {
            res.behavior = Some(Behavior::Create);
            resmap.append(res)
        }
        (Behavior::Create, Some(_)) => Err(KustomizeError::GeneratedExists { kind, name }),
        (_, None) => Err(KustomizeError::NothingToMerge {
            behavior: if behavior == Behavior::Merge {
                "merge"
            } else {
                "replace"
            },
            kind,
            name,
        }),
        (_, Some(i)) => {
            let Some(base) = resmap.get_mut(i) else {
                return Ok(());
            };
            for field in ["data", "binaryData"] {
                let new = res.obj.remove(field);
                if behavior == Behavior::Replace {
                    base.obj.remove(field);
                }
                if let Some(Value::Object(new)) = new {
                    let slot = base
                        .obj
                        .entry(field)
                        .or_insert_with(|| Value::Object(Map::new()));
                    if let Value::Object(m) = slot {
                        m.extend(new);
                    }
                }
            }
            let new_meta = res.metadata_mut().cloned().unwrap_or_default();
            for field in ["labels", "annotations"] {
                if let (Some(Value::Object(new)), Some(meta)) =
                    (new_meta.get(field), base.metadata_mut())
                {
                    let slot = meta
                        .entry(field)
                        .or_insert_with(|| Value::Object(Map::new()));
                    if let Value::Object(m) = slot {
                        m.extend(new.clone());
                    }
                }
            }
            if let Some(v) = res.obj.get("immutable") {
                base.obj.insert("immutable".into(), v.clone());
            }
            // Merging into an object from the resources keeps its hash policy (a plain
            // ConfigMap stays unhashed, a generated one is hashed), unless the merging
            // generator turns the hash off.
            if !res.needs_hash {
                base.needs_hash = false;
            }
            Ok(())
        }
    }
}

/// Gives every generated object that still needs one its `-<hash>` name suffix.
pub(crate) fn add_hash_suffixes(resmap: &mut ResMap) -> Result<(), KustomizeError> {
    for r in resmap.iter_mut() {
        if !r.needs_hash {
            continue;
        }
        let hash = content_hash(&r.obj)?;
        let name = format!("{}-{hash}", r.name());
        r.set_name(name);
        r.needs_hash = false;
    }
    Ok(())
}

/// kustomize's hash: SHA-256 over Go's JSON encoding of kind, data (and binaryData, or type and
/// stringData for Secrets) with an empty name, as kustomize computes it; the first 10 hex
/// digits, with 0, 1, 3, a and e swapped for letters so no word is spelled.
fn content_hash(obj: &Map<String, Value>) -> Result<String, KustomizeError> {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    let field = |k: &str| match obj.get(k) {
        Some(v @ Value::Object(_)) => v.clone(),
        Some(Value::String(s)) => Value::String(s.clone()),
        _ => Value::String(String::new()),
    };
    let mut m = BTreeMap::new();
    m.insert("kind", Value::String(kind.to_string()));
    m.insert("name", Value::String(String::new()));
    m.insert("data", field("data"));
    match kind {
        "ConfigMap" => {
            if let Some(v @ Value::Object(_)) = obj.get("binaryData") {
                m.insert("binaryData", v.clone());
            }
        }
        "Secret" => {
            m.insert("type", field("type"));
            if let Some(v @ Value::Object(_)) = obj.get("stringData") {
                m.insert("stringData", v.clone());
            }
        }
        other => {
            return Err(KustomizeError::Unhashable {
                kind: other.to_string(),
            })
        }
    }
    let mut encoded = String::new();
    go_json(
        &Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()),
        &mut encoded,
    );
    let digest = hex::encode(Sha256::digest(encoded.as_bytes()));
    Ok(digest[..10]
        .chars()
        .map(|c| match c {
            '0' => 'g',
            '1' => 'h',
            '3' => 'k',
            'a' => 'm',
            'e' => 't',
            c => c,
        })
        .collect())
}

/// JSON as Go's `encoding/json` writes it: keys sorted, no spaces, `<`, `>` and `&` escaped.
fn go_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            out.push('{');
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                go_string(k, out);
                out.push(':');
                go_json(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                go_json(item, out);
            }
            out.push(']');
        }
        Value::String(s) => go_string(s, out),
        other => out.push_str(&other.to_string()),
    }
}

fn go_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn hashes_match_kustomize() {
        // Figures from `kubectl kustomize` (kustomize v5.5) on the same generators.
        let cm = obj(json!({"kind": "ConfigMap", "metadata": {"name": "cm"},
            "data": {"a": "1", "b": "2"}}));
        assert_eq!(content_hash(&cm).unwrap(), "7gdc49gk6d");
        let secret = obj(json!({"kind": "Secret", "metadata": {"name": "sec"},
            "type": "Opaque", "data": {"pw": "c2VjcmV0"}}));
        assert_eq!(content_hash(&secret).unwrap(), "dtgd52765c");
    }

    #[test]
    fn go_escapes_html_characters() {
        let mut out = String::new();
        go_json(&json!({"b": "<&>", "a": "x\ny"}), &mut out);
        assert_eq!(out, r#"{"a":"x\ny","b":"\u003c\u0026\u003e"}"#);
    }
}
