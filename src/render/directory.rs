//! The plain-directory renderer: every `.yaml`, `.yml` and `.json` file below the app path,
//! walked recursively in byte order of names so the result never depends on the filesystem.
//! Hidden entries (`.git`, `.github`, ...) are skipped; symlinks are followed only while they
//! stay inside the checkout.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::yaml::parse_json;
use super::{into_objects, parse_objects, Manifests, RenderError, MAX_FILE_BYTES};
use crate::model::glob::glob;

/// Resolves `rel` below `root`, refusing anything (`..`, symlinks) that leaves the checkout.
pub(crate) fn contained_path(root: &Path, rel: &Path) -> Result<PathBuf, RenderError> {
    let root = canonical(root, root)?;
    let joined = root.join(rel);
    if !joined.exists() && joined.symlink_metadata().is_err() {
        return Err(RenderError::PathNotFound {
            path: rel.to_path_buf(),
        });
    }
    let resolved = canonical(&joined, &root)?;
    if !resolved.starts_with(&root) {
        return Err(RenderError::OutsideCheckout {
            path: rel.to_path_buf(),
        });
    }
    Ok(resolved)
}

fn canonical(path: &Path, root: &Path) -> Result<PathBuf, RenderError> {
    path.canonicalize().map_err(|source| RenderError::Io {
        path: path.strip_prefix(root).unwrap_or(path).to_path_buf(),
        source,
    })
}

pub(crate) use crate::config::options::DirectoryOptions;

impl DirectoryOptions {
    fn wants(&self, rel: &str) -> bool {
        let matches = |pattern: &str| expand_braces(pattern).iter().any(|p| glob(p, rel));
        self.include.as_deref().is_none_or(matches) && !self.exclude.as_deref().is_some_and(matches)
    }
}

/// `a{b,c}d` as `abd` and `acd`, recursively.
fn expand_braces(pattern: &str) -> Vec<String> {
    let Some(open) = pattern.find('{') else {
        return vec![pattern.to_string()];
    };
    let mut depth = 0;
    let mut close = None;
    let mut cuts = Vec::new();
    for (i, c) in pattern[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(open + i);
                    break;
                }
            }
            ',' if depth == 1 => cuts.push(open + i),
            _ => {}
        }
    }
    let Some(close) = close else {
        return vec![pattern.to_string()];
    };
    let mut bounds = vec![open];
    bounds.extend(cuts);
    bounds.push(close);
    let rest = &pattern[close + 1..];
    bounds
        .windows(2)
        .flat_map(|w| {
            expand_braces(&format!(
                "{}{}{rest}",
                &pattern[..open],
                &pattern[w[0] + 1..w[1]]
            ))
        })
        .collect()
}

/// Renders all manifest files below `dir`, which must already be inside `root`.
pub(crate) fn render_directory(
    root: &Path,
    dir: &Path,
    options: &DirectoryOptions,
) -> Result<Manifests, RenderError> {
    let root = canonical(root, root)?;
    let mut walk = Walk {
        root: &root,
        top: dir.to_path_buf(),
        options,
        visited: HashSet::new(),
        manifests: Manifests::default(),
    };
    walk.dir(dir)?;
    Ok(walk.manifests)
}

struct Walk<'a> {
    root: &'a Path,
    /// The app directory, which include and exclude patterns are relative to.
    top: PathBuf,
    options: &'a DirectoryOptions,
    visited: HashSet<PathBuf>,
    manifests: Manifests,
}

impl Walk<'_> {
    fn rel<'p>(&self, path: &'p Path) -> &'p Path {
        path.strip_prefix(self.root).unwrap_or(path)
    }

    fn io(&self, path: &Path) -> impl FnOnce(std::io::Error) -> RenderError {
        let path = self.rel(path).to_path_buf();
        move |source| RenderError::Io { path, source }
    }

    fn dir(&mut self, dir: &Path) -> Result<(), RenderError> {
        // A symlink loop inside the checkout would otherwise recurse forever.
        if !self.visited.insert(dir.to_path_buf()) {
            return Ok(());
        }
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(self.io(dir))?
            .collect::<Result<_, _>>()
            .map_err(self.io(dir))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name();
            if name.as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let path = entry.path();
            let target = if entry.file_type().map_err(self.io(&path))?.is_symlink() {
                let target = path.canonicalize().map_err(self.io(&path))?;
                if !target.starts_with(self.root) {
                    return Err(RenderError::OutsideCheckout {
                        path: self.rel(&path).to_path_buf(),
                    });
                }
                target
            } else {
                path.clone()
            };
            let meta = target.metadata().map_err(self.io(&path))?;
            let below = path
                .strip_prefix(&self.top)
                .unwrap_or(&path)
                .to_string_lossy()
                .to_string();
            if meta.is_dir() {
                if self.options.recurse {
                    self.dir(&target)?;
                }
            } else if meta.is_file()
                && has_extension(&path, "jsonnet")
                && self.options.wants(&below)
            {
                // Argo CD evaluates the Jsonnet files of a directory app; leaving them out
                // would apply part of the app and call it Synced.
                return Err(RenderError::Unsupported {
                    path: self.rel(&path).to_path_buf(),
                    what: "Jsonnet (Argo CD evaluates the .jsonnet files of a directory app; exclude them with directory.exclude, or render them with a [[plugins]] entry running jsonnet)".into(),
                });
            } else if meta.is_file() && is_manifest_file(&path) && self.options.wants(&below) {
                if meta.len() > MAX_FILE_BYTES {
                    return Err(RenderError::TooLarge {
                        path: self.rel(&path).to_path_buf(),
                        size: meta.len(),
                        max: MAX_FILE_BYTES,
                    });
                }
                self.file(&path, &target)?;
            }
        }
        Ok(())
    }

    fn file(&mut self, path: &Path, target: &Path) -> Result<(), RenderError> {
        let rel = self.rel(path).to_path_buf();
        let text = std::fs::read_to_string(target).map_err(self.io(path))?;
        if has_extension(path, "json") {
            into_objects(
                parse_json(&text, &rel)?,
                &rel,
                0,
                &mut self.manifests.objects,
            )
        } else {
            self.manifests.objects.extend(parse_objects(&text, &rel)?);
            Ok(())
        }
    }
}

fn has_extension(path: &Path, ext: &str) -> bool {
    path.extension().is_some_and(|e| e == ext)
}

fn is_manifest_file(path: &Path) -> bool {
    ["yaml", "yml", "json"]
        .iter()
        .any(|ext| has_extension(path, ext))
}

#[cfg(test)]
mod tests {
    use super::super::render;
    use super::*;
    use std::fs;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    fn cm(name: &str) -> String {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n")
    }

    #[test]
    fn walks_recursively_in_stable_order() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(root, "app/b.yaml", &cm("b"));
        write(root, "app/a.yml", &format!("{}---\n{}", cm("a1"), cm("a2")));
        write(
            root,
            "app/sub/c.json",
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"}}"#,
        );
        write(root, "app/README.md", "not yaml");
        write(root, "app/.hidden/x.yaml", "this: [is broken");
        let m = render(root, Path::new("app")).unwrap();
        let names: Vec<_> = m.objects.iter().map(|o| o.name()).collect();
        assert_eq!(names, ["a1", "a2", "b", "c"]);
        assert_eq!(m.objects[1].origin, "app/a.yml#1");
    }

    #[test]
    fn argo_cds_recurse_include_and_exclude() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        write(&root, "app/a.yaml", &cm("a"));
        write(
            &root,
            "app/b.json",
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"b"}}"#,
        );
        write(&root, "app/sub/c.yaml", &cm("c"));
        write(&root, "app/env-usw2/d.yaml", &cm("d"));
        let names = |options: DirectoryOptions| -> Vec<String> {
            render_directory(&root, &root.join("app"), &options)
                .unwrap()
                .objects
                .iter()
                .map(|o| o.name().to_string())
                .collect()
        };
        let flat = DirectoryOptions {
            recurse: false,
            ..Default::default()
        };
        assert_eq!(names(flat), ["a", "b"]);
        let only = DirectoryOptions {
            include: Some("{*.json,env-usw2/*}".into()),
            ..Default::default()
        };
        assert_eq!(names(only), ["b", "d"]);
        let but = DirectoryOptions {
            exclude: Some("sub/*".into()),
            ..Default::default()
        };
        assert_eq!(names(but), ["a", "b", "d"]);
        assert_eq!(expand_braces("x{a,b{c,d}}y"), ["xay", "xbcy", "xbdy"]);
    }

    #[test]
    fn invalid_yaml_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "app/good.yaml", &cm("ok"));
        write(tmp.path(), "app/broken.yaml", "kind: [unclosed\n");
        let err = render(tmp.path(), Path::new("app")).unwrap_err();
        assert!(matches!(err, RenderError::Yaml { .. }));
        assert!(err.to_string().contains("app/broken.yaml"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_escaping_the_checkout_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        write(outside.path(), "secret.yaml", &cm("stolen"));
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "app/ok.yaml", &cm("ok"));
        std::os::unix::fs::symlink(
            outside.path().join("secret.yaml"),
            tmp.path().join("app/link.yaml"),
        )
        .unwrap();
        let err = render(tmp.path(), Path::new("app")).unwrap_err();
        assert!(matches!(err, RenderError::OutsideCheckout { .. }), "{err}");

        std::os::unix::fs::symlink(outside.path(), tmp.path().join("escape")).unwrap();
        let err = render(tmp.path(), Path::new("escape")).unwrap_err();
        assert!(matches!(err, RenderError::OutsideCheckout { .. }), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_inside_the_checkout_and_loops_are_fine() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "shared/cm.yaml", &cm("shared"));
        write(tmp.path(), "app/own.yaml", &cm("own"));
        std::os::unix::fs::symlink("../shared", tmp.path().join("app/shared")).unwrap();
        std::os::unix::fs::symlink("..", tmp.path().join("app/shared/loop")).unwrap();
        let m = render(tmp.path(), Path::new("app")).unwrap();
        let mut names: Vec<_> = m.objects.iter().map(|o| o.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names, ["own", "shared"]);
    }

    #[test]
    fn missing_path_is_a_clear_error_and_a_kustomization_is_built_not_read() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(
            render(tmp.path(), Path::new("nope")),
            Err(RenderError::PathNotFound { .. })
        ));
        // A plain read would apply the patch file as an object of its own.
        write(
            tmp.path(),
            "k/kustomization.yaml",
            "resources: [cm.yaml]\npatches: [{path: patch.yaml}]\n",
        );
        write(
            tmp.path(),
            "k/cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n",
        );
        write(
            tmp.path(),
            "k/patch.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: b}\n",
        );
        let m = render(tmp.path(), Path::new("k")).unwrap();
        assert_eq!(m.objects.len(), 1);
        assert_eq!(m.objects[0].value["data"]["a"], "b");
    }
}
