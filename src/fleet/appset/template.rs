//! The two template syntaxes of ApplicationSets. `{{param}}` (fasttemplate) replaces a known
//! parameter and leaves anything else as written. `goTemplate` is Go's text/template with
//! Sprig; edgesync evaluates the part users write in ApplicationSets: actions that print a
//! pipeline of fields, literals and functions. Control actions (`if`, `range`, ...) and
//! functions it does not have are refused by name, never printed wrong.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TemplateError {
    #[error("template {text:?}: an action is not closed with }}}}")]
    Unclosed { text: String },
    #[error("template action `{action}` is not supported by edgesync (only printing a pipeline)")]
    Action { action: String },
    #[error("template function {name:?} is not supported by edgesync")]
    Function { name: String },
    #[error("template: {function}: {reason}")]
    Call { function: String, reason: String },
    #[error("template: map has no entry for key {key:?}")]
    MissingKey { key: String },
    #[error("template {text:?}: cannot read {token:?}")]
    Syntax { text: String, token: String },
}

/// fasttemplate, as Argo CD uses it: `{{ name }}` (spaces allowed) becomes the parameter's
/// value; a name without a parameter is left as written.
pub(crate) fn fast(text: &str, params: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let name = after[..end].trim();
        match params.get(name) {
            Some(value) => out.push_str(value),
            None => out.push_str(&rest[start..start + 2 + end + 2]),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Go's text/template over `params` (the subset described above). With `missing_key_error`
/// (`missingkey=error`), a field that does not exist is an error; otherwise it prints
/// `<no value>`, as Go does.
pub(crate) fn render(
    text: &str,
    params: &Map<String, Value>,
    missing_key_error: bool,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let mut before = &rest[..start];
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| TemplateError::Unclosed {
            text: text.to_string(),
        })?;
        let mut action = &after[..end];
        let mut next = &after[end + 2..];
        // `{{- x -}}` trims the white space around the action.
        if let Some(a) = action.strip_prefix('-') {
            if a.starts_with(char::is_whitespace) || a.is_empty() {
                before = before.trim_end();
                action = a;
            }
        }
        if let Some(a) = action.strip_suffix('-') {
            if a.ends_with(char::is_whitespace) || a.is_empty() {
                next = next.trim_start();
                action = a;
            }
        }
        out.push_str(before);
        let action = action.trim();
        if !action.starts_with("/*") {
            let value = pipeline(action, text, params, missing_key_error)?;
            out.push_str(&print(&value));
        }
        rest = next;
    }
    out.push_str(rest);
    Ok(out)
}

const CONTROL: [&str; 9] = [
    "if", "else", "end", "range", "with", "define", "template", "block", "break",
];

fn pipeline(
    action: &str,
    text: &str,
    params: &Map<String, Value>,
    strict: bool,
) -> Result<Value, TemplateError> {
    let words = split_words(action, text)?;
    if let Some(first) = words.first() {
        if CONTROL.contains(&first.as_str()) || first.starts_with('$') {
            return Err(TemplateError::Action {
                action: action.to_string(),
            });
        }
    }
    let mut piped: Option<Value> = None;
    for command in words.split(|w| w == "|") {
        let Some((head, args)) = command.split_first() else {
            return Err(TemplateError::Syntax {
                text: text.to_string(),
                token: "|".into(),
            });
        };
        let mut values = Vec::new();
        for arg in args {
            values.push(operand(arg, text, params, strict)?);
        }
        if let Some(p) = piped.take() {
            values.push(p);
        }
        let value = if is_function(head) {
            call(head, values)?
        } else if values.is_empty() {
            operand(head, text, params, strict)?
        } else {
            return Err(TemplateError::Syntax {
                text: text.to_string(),
                token: head.clone(),
            });
        };
        piped = Some(value);
    }
    Ok(piped.unwrap_or(Value::Null))
}

fn is_function(word: &str) -> bool {
    word.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && !matches!(word, "true" | "false" | "nil")
}

/// Words of an action: quoted strings kept whole (with their quotes), `|` on its own.
fn split_words(action: &str, text: &str) -> Result<Vec<String>, TemplateError> {
    let mut words = Vec::new();
    let mut chars = action.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '|' {
            chars.next();
            words.push("|".into());
        } else if c == '(' || c == ')' {
            return Err(TemplateError::Action {
                action: action.to_string(),
            });
        } else if c == '"' || c == '`' {
            let quote = c;
            let mut word = String::from(c);
            chars.next();
            let mut closed = false;
            while let Some(ch) = chars.next() {
                word.push(ch);
                if ch == '\\' && quote == '"' {
                    if let Some(escaped) = chars.next() {
                        word.push(escaped);
                    }
                } else if ch == quote {
                    closed = true;
                    break;
                }
            }
            if !closed {
                return Err(TemplateError::Syntax {
                    text: text.to_string(),
                    token: word,
                });
            }
            words.push(word);
        } else {
            let mut word = String::new();
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() || ch == '|' {
                    break;
                }
                word.push(ch);
                chars.next();
            }
            words.push(word);
        }
    }
    Ok(words)
}

fn operand(
    word: &str,
    text: &str,
    params: &Map<String, Value>,
    strict: bool,
) -> Result<Value, TemplateError> {
    if word == "." {
        return Ok(Value::Object(params.clone()));
    }
    if let Some(path) = word.strip_prefix('.') {
        let mut current: Option<&Value> = None;
        for (i, part) in path.split('.').enumerate() {
            let next = match (i, current) {
                (0, _) => params.get(part),
                (_, Some(Value::Object(m))) => m.get(part),
                _ => None,
            };
            match next {
                Some(v) => current = Some(v),
                None if strict => {
                    return Err(TemplateError::MissingKey {
                        key: part.to_string(),
                    })
                }
                None => return Ok(Value::String("<no value>".into())),
            }
        }
        return Ok(current.cloned().unwrap_or(Value::Null));
    }
    if let Some(inner) = word.strip_prefix('`').and_then(|w| w.strip_suffix('`')) {
        return Ok(Value::String(inner.to_string()));
    }
    if word.starts_with('"') {
        return serde_json::from_str::<String>(word)
            .map(Value::String)
            .map_err(|_| TemplateError::Syntax {
                text: text.to_string(),
                token: word.to_string(),
            });
    }
    match word {
        "true" => return Ok(Value::Bool(true)),
        "false" => return Ok(Value::Bool(false)),
        "nil" => return Ok(Value::Null),
        _ => {}
    }
    if let Ok(n) = word.parse::<i64>() {
        return Ok(Value::from(n));
    }
    if is_function(word) {
        return call(word, Vec::new());
    }
    Err(TemplateError::Syntax {
        text: text.to_string(),
        token: word.to_string(),
    })
}

/// How Go prints a value.
fn print(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "<no value>".into(),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(print).collect::<Vec<_>>().join(" ")
        ),
        Value::Object(m) => format!(
            "map[{}]",
            m.iter()
                .map(|(k, v)| format!("{k}:{}", print(v)))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        other => other.to_string(),
    }
}

fn text_of(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        other => print(other),
    }
}

/// Go's (and Sprig's) notion of an empty value, for `default`.
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.is_empty() || s == "<no value>",
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
    }
}

/// The functions users commonly call in ApplicationSets (Sprig's, and Argo CD's
/// `normalize`); the last argument is the piped value.
fn call(name: &str, args: Vec<Value>) -> Result<Value, TemplateError> {
    let fail = |reason: &str| TemplateError::Call {
        function: name.to_string(),
        reason: reason.to_string(),
    };
    let arity = |n: usize| {
        if args.len() == n {
            Ok(())
        } else {
            Err(fail(&format!("takes {n} arguments, got {}", args.len())))
        }
    };
    let s = |i: usize| args.get(i).map(text_of).unwrap_or_default();
    Ok(Value::String(match name {
        "lower" => {
            arity(1)?;
            s(0).to_lowercase()
        }
        "upper" => {
            arity(1)?;
            s(0).to_uppercase()
        }
        "title" => {
            arity(1)?;
            s(0).split(' ')
                .map(|w| {
                    let mut c = w.chars();
                    match c.next() {
                        Some(f) => f.to_uppercase().chain(c).collect(),
                        None => String::new(),
                    }
                })
                .collect::<Vec<String>>()
                .join(" ")
        }
        "trim" => {
            arity(1)?;
            s(0).trim().to_string()
        }
        "trimPrefix" => {
            arity(2)?;
            let (p, v) = (s(0), s(1));
            v.strip_prefix(p.as_str()).unwrap_or(&v).to_string()
        }
        "trimSuffix" => {
            arity(2)?;
            let (p, v) = (s(0), s(1));
            v.strip_suffix(p.as_str()).unwrap_or(&v).to_string()
        }
        "replace" => {
            arity(3)?;
            s(2).replace(&s(0), &s(1))
        }
        "default" => {
            arity(2)?;
            return Ok(match &args[1] {
                v if is_empty(v) => args[0].clone(),
                v => v.clone(),
            });
        }
        "quote" => {
            arity(1)?;
            format!("{:?}", s(0))
        }
        "squote" => {
            arity(1)?;
            format!("'{}'", s(0))
        }
        "trunc" => {
            arity(2)?;
            let n = args[0]
                .as_i64()
                .ok_or_else(|| fail("the length must be an integer"))?;
            let chars: Vec<char> = s(1).chars().collect();
            let len = i64::try_from(chars.len()).unwrap_or(i64::MAX);
            let cut = |k: i64| usize::try_from(k.clamp(0, len)).unwrap_or(0);
            if n >= 0 {
                chars[..cut(n)].iter().collect()
            } else {
                chars[cut(len.saturating_add(n))..].iter().collect()
            }
        }
        "toString" => {
            arity(1)?;
            s(0)
        }
        "normalize" => {
            arity(1)?;
            s(0).to_lowercase()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect()
        }
        "join" => {
            arity(2)?;
            match &args[1] {
                Value::Array(items) => items.iter().map(text_of).collect::<Vec<_>>().join(&s(0)),
                other => text_of(other),
            }
        }
        "toJson" => {
            arity(1)?;
            args[0].to_string()
        }
        "index" => {
            let Some((first, keys)) = args.split_first() else {
                return Err(fail("needs a value"));
            };
            let mut current = first.clone();
            for key in keys {
                current = match (&current, key) {
                    (Value::Object(m), k) => m.get(&text_of(k)).cloned().unwrap_or(Value::Null),
                    (Value::Array(items), Value::Number(n)) => n
                        .as_u64()
                        .and_then(|i| usize::try_from(i).ok())
                        .and_then(|i| items.get(i).cloned())
                        .ok_or_else(|| fail("index out of range"))?,
                    _ => return Err(fail("cannot index that value")),
                };
            }
            return Ok(current);
        }
        "printf" => {
            let Some((format, rest)) = args.split_first() else {
                return Err(fail("needs a format"));
            };
            printf(&text_of(format), rest).map_err(|r| fail(&r))?
        }
        other => {
            return Err(TemplateError::Function {
                name: other.to_string(),
            })
        }
    }))
}

/// `%s`, `%v`, `%d` and `%%`.
fn printf(format: &str, args: &[Value]) -> Result<String, String> {
    let mut out = String::new();
    let mut args = args.iter();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some('s' | 'v' | 'd') => match args.next() {
                Some(v) => out.push_str(&text_of(v)),
                None => out.push_str("%!(MISSING)"),
            },
            Some(other) => return Err(format!("the verb %{other} is not supported")),
            None => out.push('%'),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params() -> Map<String, Value> {
        json!({"name": "Plant-7", "path": {"basename": "web", "segments": ["apps", "web"]},
               "metadata": {"labels": {"site": "plant-7"}}, "empty": ""})
        .as_object()
        .unwrap()
        .clone()
    }

    #[test]
    fn fasttemplate_replaces_known_names_and_keeps_the_rest() {
        let p: BTreeMap<String, String> = [("path.basename".to_string(), "web".to_string())].into();
        assert_eq!(fast("{{path.basename}}-{{ path.basename }}", &p), "web-web");
        assert_eq!(fast("x-{{unknown}}-{{", &p), "x-{{unknown}}-{{");
    }

    #[test]
    fn go_templates_print_fields_literals_and_pipelines() {
        let p = params();
        let r = |t: &str| render(t, &p, true);
        assert_eq!(
            r("{{.path.basename}}-{{ .name | lower }}").unwrap(),
            "web-plant-7"
        );
        assert_eq!(
            r(r#"{{ index .metadata.labels "site" }}"#).unwrap(),
            "plant-7"
        );
        assert_eq!(r(r#"{{ .empty | default "none" }}"#).unwrap(), "none");
        assert_eq!(
            r(r#"{{ printf "%s-%s" .name .path.basename }}"#).unwrap(),
            "Plant-7-web"
        );
        assert_eq!(
            r(r#"{{ replace "-" "_" .name | upper }}"#).unwrap(),
            "PLANT_7"
        );
        assert_eq!(r("{{ trunc 3 .path.basename }}").unwrap(), "web");
        assert_eq!(r("{{ index .path.segments 0 }}").unwrap(), "apps");
        assert_eq!(r("a {{- .name -}} b").unwrap(), "aPlant-7b");
        assert_eq!(r("{{ normalize .name }}").unwrap(), "plant-7");
    }

    #[test]
    fn go_templates_refuse_what_they_cannot_evaluate() {
        let p = params();
        assert!(matches!(
            render("{{ if .name }}x{{ end }}", &p, false),
            Err(TemplateError::Action { .. })
        ));
        assert_eq!(
            render("{{ .name | sha256sum }}", &p, false),
            Err(TemplateError::Function {
                name: "sha256sum".into()
            })
        );
        assert_eq!(
            render("{{ .nope }}", &p, true),
            Err(TemplateError::MissingKey { key: "nope".into() })
        );
        assert_eq!(render("{{ .nope }}", &p, false).unwrap(), "<no value>");
        assert!(matches!(
            render("{{ .name", &p, false),
            Err(TemplateError::Unclosed { .. })
        ));
    }
}
