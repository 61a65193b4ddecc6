//! YAML and JSON reading and writing for manifests.
//!
//! The parser follows what `kubectl apply` accepts: YAML 1.1 booleans (`yes`/`no`) and octal
//! numbers (`defaultMode: 0644`), several documents per file (up to 20,000), and
//! serde-saphyr's default budgets against alias bombs and deep nesting. Duplicate keys are an
//! error, not "last wins", so a merge mistake in Git does not silently change what is applied.

use std::path::Path;

use serde_json::Value;

use super::RenderError;

fn options() -> serde_saphyr::Options {
    // The default budget allows 1,024 documents per stream; a rendered app or a generated
    // bundle can hold more. Files stay capped at MAX_FILE_BYTES.
    serde_saphyr::options! {
        legacy_octal_numbers: true,
        budget: serde_saphyr::budget! {
            max_documents: 20_000,
        },
    }
}

/// Parses every document of a YAML stream; empty documents come back as `Value::Null`.
pub fn parse_documents(text: &str, path: &Path) -> Result<Vec<Value>, RenderError> {
    parse_with(text, path, options())
}

/// Like [`parse_documents`], but a key given twice in a mapping keeps its last value instead of
/// failing: how kustomize reads a kustomization file.
pub(crate) fn parse_documents_last_key_wins(
    text: &str,
    path: &Path,
) -> Result<Vec<Value>, RenderError> {
    let mut options = options();
    options.duplicate_keys = serde_saphyr::options::DuplicateKeyPolicy::LastWins;
    parse_with(text, path, options)
}

/// Like [`parse_documents`], with YAML 1.2's booleans only (`true`, `false`): `yes`, `no`, `on`,
/// `off`, `y` and `n` stay strings, as kustomize (Go's yaml.v3) reads resources.
pub(crate) fn parse_documents_yaml12(text: &str, path: &Path) -> Result<Vec<Value>, RenderError> {
    let mut options = options();
    options.strict_booleans = true;
    parse_with(text, path, options)
}

fn parse_with(
    text: &str,
    path: &Path,
    options: serde_saphyr::Options,
) -> Result<Vec<Value>, RenderError> {
    serde_saphyr::from_multiple_with_options::<Value>(text, options).map_err(|e| {
        // The parser's message is followed by a snippet of the lines around the error: a
        // broken Secret would put its values into the status, MQTT and the logs. The first
        // line names the line, the column and what is wrong, and that is all that is kept.
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default();
        RenderError::Yaml {
            path: path.to_path_buf(),
            // The parser suggests one of its own options; meaningless to someone fixing YAML.
            message: first
                .trim_start_matches("error: ")
                .replace(", set DuplicateKeyPolicy in Options if acceptable", ""),
        }
    })
}

/// Parses a JSON file, which holds exactly one document.
pub(crate) fn parse_json(text: &str, path: &Path) -> Result<Value, RenderError> {
    serde_json::from_str(text).map_err(|source| RenderError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes objects as one multi-document YAML stream, as `kubectl kustomize` does.
pub(crate) fn to_yaml_stream<'a>(
    objects: impl IntoIterator<Item = &'a serde_json::Map<String, Value>>,
) -> Result<String, serde_saphyr::SerializeError> {
    let mut out = String::new();
    for (i, object) in objects.into_iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_saphyr::to_string(object)?);
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn multiple_documents_and_empty_ones() {
        let docs = parse_documents("a: 1\n---\n---\nb: two\n", Path::new("x.yaml")).unwrap();
        let non_null: Vec<_> = docs.into_iter().filter(|d| !d.is_null()).collect();
        assert_eq!(non_null, vec![json!({"a": 1}), json!({"b": "two"})]);
    }

    #[test]
    fn kubectl_compatible_scalars() {
        let docs = parse_documents(
            "mode: 0644\nenabled: yes\nport: \"80\"\nversion: 1.10\n",
            Path::new("x.yaml"),
        )
        .unwrap();
        assert_eq!(docs[0]["mode"], json!(420));
        assert_eq!(docs[0]["enabled"], json!(true));
        assert_eq!(docs[0]["port"], json!("80"));
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let err = parse_documents("a: [1, 2\nb: c\n", Path::new("deploy/bad.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("deploy/bad.yaml: invalid YAML"), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn errors_name_the_line_but_never_quote_the_text() {
        let secret = "apiVersion: v1\nkind: Secret\nstringData:\n  password: hunter2-SECRET\n  bad: [unclosed\n  other: x\n";
        let duplicate = "a: hunter2-SECRET\na: 2\n";
        for text in [secret, duplicate] {
            let err = parse_documents(text, Path::new("s.yaml"))
                .unwrap_err()
                .to_string();
            assert!(!err.contains("hunter2"), "{err}");
            assert!(err.contains("line"), "{err}");
        }
    }

    #[test]
    fn duplicate_keys_are_an_error() {
        assert!(parse_documents("a: 1\na: 2\n", Path::new("x.yaml")).is_err());
    }

    #[test]
    fn alias_bomb_is_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let prev = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
            ));
        }
        assert!(parse_documents(&text, Path::new("bomb.yaml")).is_err());
    }

    #[test]
    fn stream_round_trips() {
        let a = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}});
        let b = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}});
        let text = to_yaml_stream([a.as_object().unwrap(), b.as_object().unwrap()]).unwrap();
        let back = parse_documents(&text, Path::new("x")).unwrap();
        assert_eq!(back, vec![a, b]);
    }
}
