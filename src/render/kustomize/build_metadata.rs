//! `buildMetadata` of the top kustomization, as kustomize writes it: `originAnnotations`
//! (`config.kubernetes.io/origin`: the file an object came from, or the generator and the
//! kustomization that made it), `transformerAnnotations`
//! (`alpha.config.kubernetes.io/transformations`: every built-in transformer that ran over the
//! object) and `managedByLabel` (`app.kubernetes.io/managed-by`). Paths are relative to the
//! top kustomization's directory. Other values are ignored, as kustomize ignores them.

use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value};

use super::resource::ResMap;

const ORIGIN: &str = "config.kubernetes.io/origin";
const TRANSFORMATIONS: &str = "alpha.config.kubernetes.io/transformations";
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// What `kubectl kustomize` (kustomize v5.5.0 built into kubectl, the reference renderer)
/// writes as its version.
const MANAGED_BY_VALUE: &str = "kustomize-(devel)";

/// Adds what `options` ask for; `top` is the top kustomization's directory, relative to the
/// checkout like the objects' origins.
pub(super) fn annotate(resmap: &mut ResMap, options: &[String], top: &Path) {
    let wanted = |o: &str| options.iter().any(|x| x == o);
    let (origins, transformations, managed_by) = (
        wanted("originAnnotations"),
        wanted("transformerAnnotations"),
        wanted("managedByLabel"),
    );
    if !(origins || transformations || managed_by) {
        return;
    }
    for r in resmap.iter_mut() {
        let origin = origins.then(|| match r.generator {
            Some(generator) => configured(&relative(top, &r.origin), generator, ""),
            None => {
                let file = r
                    .origin
                    .rsplit_once('#')
                    .map_or(r.origin.as_str(), |(f, _)| f);
                format!("path: {}\n", relative(top, file))
            }
        });
        let done = (transformations && !r.transformations.is_empty()).then(|| {
            r.transformations
                .iter()
                .map(|(file, kind)| configured(&relative(top, file), kind, "- "))
                .collect::<String>()
        });
        let Some(metadata) = r.metadata_mut() else {
            continue;
        };
        for (key, text) in [(ORIGIN, origin), (TRANSFORMATIONS, done)] {
            if let Some(text) = text {
                insert(metadata, "annotations", key, &text);
            }
        }
        if managed_by {
            insert(metadata, "labels", MANAGED_BY, MANAGED_BY_VALUE);
        }
    }
}

/// `configuredIn`/`configuredBy` as kustomize prints them; `item` starts a list entry.
fn configured(file: &str, kind: &str, item: &str) -> String {
    let indent = " ".repeat(item.len());
    format!(
        "{item}configuredIn: {file}\n{indent}configuredBy:\n{indent}  apiVersion: builtin\n{indent}  kind: {kind}\n"
    )
}

/// Sets `metadata.<field>.<key>`, making `<field>` a mapping if it is not one.
fn insert(metadata: &mut Map<String, Value>, field: &str, key: &str, value: &str) {
    let slot = metadata
        .entry(field.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    if let Some(map) = slot.as_object_mut() {
        map.insert(key.to_string(), Value::String(value.to_string()));
    }
}

/// `path` (relative to the checkout) seen from the directory `from` (relative to it too).
fn relative(from: &Path, path: &str) -> String {
    let from: Vec<Component> = from
        .components()
        .filter(|c| *c != Component::CurDir)
        .collect();
    let to: Vec<Component> = Path::new(path)
        .components()
        .filter(|c| *c != Component::CurDir)
        .collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c);
    }
    out.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_seen_from_the_top_kustomization() {
        assert_eq!(relative(Path::new(""), "base/r.yaml"), "base/r.yaml");
        assert_eq!(
            relative(Path::new("apps/prod"), "apps/prod/r.yaml"),
            "r.yaml"
        );
        assert_eq!(
            relative(Path::new("apps/prod"), "apps/base/r.yaml"),
            "../base/r.yaml"
        );
    }
}
