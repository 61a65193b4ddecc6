//! `replacements`: copy a field of one object (by default its name) into fields of others, with
//! kustomize's field paths (`spec.template.spec.containers.[name=web].image`, `*` for every
//! element, `[a.b/c]` for keys with dots) and its delimiter, index and create options.

use super::error::KustomizeError;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::patch::Selector;
use super::resource::ResMap;
use super::Ctx;
use crate::render::RenderError;

/// An entry of `replacements`: inline, or `path` to a file holding a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum ReplacementEntry {
    File { path: String },
    Inline(Replacement),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Replacement {
    source: Source,
    #[serde(default)]
    targets: Vec<Target>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Source {
    group: Option<String>,
    version: Option<String>,
    kind: Option<String>,
    name: Option<String>,
    namespace: Option<String>,
    field_path: Option<String>,
    options: Option<Options>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Target {
    select: Selector,
    #[serde(default)]
    reject: Vec<Selector>,
    #[serde(default)]
    field_paths: Vec<String>,
    options: Option<Options>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Options {
    delimiter: Option<String>,
    #[serde(default)]
    index: i64,
    #[serde(default)]
    create: bool,
}

pub(super) fn run(
    ctx: &Ctx,
    entries: &[ReplacementEntry],
    resmap: &mut ResMap,
) -> Result<(), RenderError> {
    for (i, entry) in entries.iter().enumerate() {
        let field = format!("replacements[{i}]");
        match entry {
            ReplacementEntry::Inline(r) => replace(ctx, &field, r, resmap)?,
            ReplacementEntry::File { path } => {
                let (source, text) = ctx.read_file(&field, path)?;
                let docs = crate::render::yaml::parse_documents_yaml12(&text, &source)?;
                for doc in docs.into_iter().filter(|d| !d.is_null()) {
                    let list: Vec<Replacement> = match doc {
                        Value::Array(_) => serde_json::from_value(doc),
                        other => serde_json::from_value(other).map(|r| vec![r]),
                    }
                    .map_err(|e| {
                        ctx.error(format!(
                            "{field}: {}: invalid replacement: {e}",
                            source.display()
                        ))
                    })?;
                    for r in &list {
                        replace(ctx, &field, r, resmap)?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn replace(
    ctx: &Ctx,
    field: &str,
    r: &Replacement,
    resmap: &mut ResMap,
) -> Result<(), RenderError> {
    let s = &r.source;
    let selector = Selector {
        group: s.group.clone(),
        version: s.version.clone(),
        kind: s.kind.clone(),
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        ..Selector::default()
    };
    let sources = selector.select(ctx, field, resmap)?;
    let index = match sources.as_slice() {
        [one] => *one,
        [] => return Err(ctx.error(format!("{field}: source selects no object"))),
        _ => {
            return Err(ctx.error(format!(
                "{field}: source selects {} objects; it must select exactly one",
                sources.len()
            )))
        }
    };
    let source_path = parse_path(s.field_path.as_deref().unwrap_or("metadata.name"));
    let source_obj = resmap
        .iter()
        .nth(index)
        .map(|r| Value::Object(r.obj.clone()))
        .unwrap_or(Value::Null);
    let mut found = Vec::new();
    lookup(&source_obj, &source_path, &mut found);
    let mut value = match found.as_slice() {
        [v] => (*v).clone(),
        [] => {
            return Err(ctx.error(format!(
                "{field}: source field {} not found",
                s.field_path.as_deref().unwrap_or("metadata.name")
            )))
        }
        _ => return Err(ctx.error(format!("{field}: source field path matches several fields"))),
    };
    if let Some(o) = &s.options {
        if let (Some(d), Value::String(text)) = (&o.delimiter, &value) {
            let parts: Vec<&str> = text.split(d.as_str()).collect();
            let part = usize::try_from(o.index).ok().and_then(|i| parts.get(i));
            value = Value::String(part.map(|p| p.to_string()).ok_or_else(|| {
                ctx.error(format!(
                    "{field}: source options.index {} is out of range",
                    o.index
                ))
            })?);
        }
    }
    for (t_index, target) in r.targets.iter().enumerate() {
        let selected = target.select.select(ctx, field, resmap)?;
        let mut rejected = Vec::new();
        for rej in &target.reject {
            rejected.extend(rej.select(ctx, field, resmap)?);
        }
        let options = target.options.clone().unwrap_or_default();
        for i in selected.into_iter().filter(|i| !rejected.contains(i)) {
            let Some(res) = resmap.get_mut(i) else {
                continue;
            };
            let id = res.id();
            let (old_name, old_ns) = (res.name().to_string(), res.namespace().to_string());
            for fp in &target.field_paths {
                let path = parse_path(fp);
                let mut obj = Value::Object(std::mem::take(&mut res.obj));
                let hits = set(&mut obj, &path, &value, &options)
                    .map_err(|m| ctx.error(format!("{field}.targets[{t_index}]: {id}: {fp}: {m}")));
                if let Value::Object(m) = obj {
                    res.obj = m;
                }
                hits?;
            }
            if res.name() != old_name || res.namespace() != old_ns {
                res.history.push((old_ns, old_name));
            }
        }
    }
    Ok(())
}

/// One step of a field path.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    /// `[name=value]`: the list elements whose field `name` is `value`.
    Match(String, String),
    /// `*`: every element of a list (or every value of a map).
    All,
    Index(usize),
}

fn parse_path(path: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut rest = path;
    while !rest.is_empty() {
        let (segment, next) = if let Some(inner) = rest.strip_prefix('[') {
            match inner.find(']') {
                Some(end) => {
                    let after = &inner[end + 1..];
                    (
                        format!("[{}]", &inner[..end]),
                        after.strip_prefix('.').unwrap_or(after),
                    )
                }
                None => (rest.to_string(), ""),
            }
        } else {
            match rest.find('.') {
                Some(i) => (rest[..i].to_string(), &rest[i + 1..]),
                None => (rest.to_string(), ""),
            }
        };
        rest = next;
        let step = if segment == "*" {
            Step::All
        } else if let Some(inner) = segment.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            match inner.split_once('=') {
                Some((k, v)) => Step::Match(k.to_string(), v.to_string()),
                None => Step::Key(inner.to_string()),
            }
        } else if let Ok(i) = segment.parse::<usize>() {
            Step::Index(i)
        } else {
            Step::Key(segment)
        };
        steps.push(step);
    }
    steps
}

fn matches_field(v: &Value, key: &str, want: &str) -> bool {
    match v.get(key) {
        Some(Value::String(s)) => s == want,
        Some(Value::Number(n)) => want.parse::<f64>().ok() == n.as_f64(),
        Some(Value::Bool(b)) => want.parse::<bool>().ok() == Some(*b),
        _ => false,
    }
}

fn lookup<'a>(v: &'a Value, path: &[Step], out: &mut Vec<&'a Value>) {
    let Some((step, rest)) = path.split_first() else {
        out.push(v);
        return;
    };
    match (step, v) {
        (Step::Key(k), Value::Object(m)) => {
            if let Some(child) = m.get(k) {
                lookup(child, rest, out);
            }
        }
        (Step::Index(i), Value::Array(items)) => {
            if let Some(child) = items.get(*i) {
                lookup(child, rest, out);
            }
        }
        (Step::Match(k, want), Value::Array(items)) => {
            for item in items.iter().filter(|i| matches_field(i, k, want)) {
                lookup(item, rest, out);
            }
        }
        (Step::All, Value::Array(items)) => {
            for item in items {
                lookup(item, rest, out);
            }
        }
        (Step::All, Value::Object(m)) => {
            for child in m.values() {
                lookup(child, rest, out);
            }
        }
        _ => {}
    }
}

/// Sets the fields at `path`; returns how many were set.
fn set(v: &mut Value, path: &[Step], value: &Value, o: &Options) -> Result<usize, KustomizeError> {
    let Some((step, rest)) = path.split_first() else {
        *v = merge_delimited(v, value, o)?;
        return Ok(1);
    };
    match (step, v) {
        (Step::Key(k), Value::Object(m)) => {
            if !m.contains_key(k) {
                if !o.create {
                    return Ok(0);
                }
                let fresh = match rest.first() {
                    None => Value::Null,
                    Some(Step::Index(_) | Step::Match(..) | Step::All) => Value::Array(Vec::new()),
                    Some(Step::Key(_)) => Value::Object(Map::new()),
                };
                m.insert(k.clone(), fresh);
            }
            match m.get_mut(k) {
                Some(child) => set(child, rest, value, o),
                None => Ok(0),
            }
        }
        (Step::Index(i), Value::Array(items)) => match items.get_mut(*i) {
            Some(child) => set(child, rest, value, o),
            None => Ok(0),
        },
        (Step::Match(k, want), Value::Array(items)) => {
            let mut n = 0;
            for item in items.iter_mut().filter(|i| matches_field(i, k, want)) {
                n += set(item, rest, value, o)?;
            }
            if n == 0 && o.create {
                let mut fresh = Map::new();
                fresh.insert(k.clone(), Value::String(want.clone()));
                let mut item = Value::Object(fresh);
                n += set(&mut item, rest, value, o)?;
                items.push(item);
            }
            Ok(n)
        }
        (Step::All, Value::Array(items)) => {
            let mut n = 0;
            for item in items.iter_mut() {
                n += set(item, rest, value, o)?;
            }
            Ok(n)
        }
        (Step::All, Value::Object(m)) => {
            let mut n = 0;
            for child in m.values_mut() {
                n += set(child, rest, value, o)?;
            }
            Ok(n)
        }
        _ => Ok(0),
    }
}

/// With a delimiter, only the `index`-th part of the target's text is replaced.
fn merge_delimited(current: &Value, value: &Value, o: &Options) -> Result<Value, KustomizeError> {
    let Some(d) = &o.delimiter else {
        // A scalar lands with the target's type: a port copied into an args string stays text.
        return Ok(match (current, value) {
            (Value::String(_), Value::Number(_) | Value::Bool(_)) => {
                Value::String(value.to_string())
            }
            // And text copied into a number or a boolean must read as one (kustomize keeps
            // the target's type, and fails when the text does not decode as it).
            (Value::Number(n), Value::String(text)) if n.is_f64() => text
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or(KustomizeError::ReplacementType { want: "a float" })?,
            (Value::Number(_), Value::String(text)) => text
                .parse::<i64>()
                .map(Value::from)
                .map_err(|_| KustomizeError::ReplacementType { want: "an integer" })?,
            (Value::Bool(_), Value::String(text)) => match text.as_str() {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                _ => return Err(KustomizeError::ReplacementType { want: "a boolean" }),
            },
            _ => value.clone(),
        });
    };
    let Value::String(text) = current else {
        return Err(KustomizeError::DelimiterNeedsText);
    };
    let new = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut parts: Vec<String> = text.split(d.as_str()).map(str::to_string).collect();
    if o.index < 0 {
        parts.insert(0, new);
    } else {
        let i = o.index as usize;
        if i >= parts.len() {
            parts.push(new);
        } else {
            parts[i] = new;
        }
    }
    Ok(Value::String(parts.join(d)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_paths_with_matches_wildcards_and_dotted_keys() {
        assert_eq!(
            parse_path("spec.containers.[name=web].env.*.value"),
            vec![
                Step::Key("spec".into()),
                Step::Key("containers".into()),
                Step::Match("name".into(), "web".into()),
                Step::Key("env".into()),
                Step::All,
                Step::Key("value".into()),
            ]
        );
        assert_eq!(
            parse_path("metadata.annotations.[app.io/ver]"),
            vec![
                Step::Key("metadata".into()),
                Step::Key("annotations".into()),
                Step::Key("app.io/ver".into()),
            ]
        );
        let mut v = json!({"image": "nginx:1.0"});
        let o = Options {
            delimiter: Some(":".into()),
            index: 1,
            create: false,
        };
        set(&mut v, &parse_path("image"), &json!("1.25"), &o).unwrap();
        assert_eq!(v, json!({"image": "nginx:1.25"}));
    }
}
