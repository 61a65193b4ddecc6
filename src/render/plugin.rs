//! Config management plugins (`[[plugins]]`), run as Argo CD runs them: the `init` command,
//! then `generate`, whose standard output is the app's manifests, in a copy of the checkout
//! (a plugin never changes what Git gave), with the app's `ARGOCD_APP_*` and `ARGOCD_ENV_*`
//! variables, bounded in time and output. Without `network = true` the commands run in a
//! network namespace of their own (`unshare --map-root-user --net`); when that cannot be
//! made, the render fails rather than running them with the network.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{parse_objects, Manifests, RenderError};
use crate::config::options::PluginConfig;

/// Files and directories a checkout copied for a plugin may hold at most.
const MAX_ENTRIES: usize = 50_000;

/// What one plugin run needs.
#[derive(Debug, Clone)]
pub(crate) struct PluginRequest {
    pub(crate) plugin: PluginConfig,
    /// `ARGOCD_APP_NAME`, `ARGOCD_APP_NAMESPACE`, `ARGOCD_APP_REVISION`,
    /// `ARGOCD_APP_SOURCE_REPO_URL`, `ARGOCD_APP_SOURCE_TARGET_REVISION`, and the
    /// Application's `plugin.env` as `ARGOCD_ENV_<name>`.
    pub(crate) env: Vec<(String, String)>,
}

/// Runs the plugin for the app directory `dir` of the checkout at `root`.
pub(crate) fn generate(
    root: &Path,
    dir: &Path,
    req: &PluginRequest,
) -> Result<Manifests, RenderError> {
    let rel = dir.strip_prefix(root).unwrap_or(dir).to_path_buf();
    let name = req.plugin.name.clone();
    let fail = |message: String| RenderError::Plugin {
        plugin: name.clone(),
        path: rel.clone(),
        message,
    };
    let scratch = tempfile::tempdir().map_err(|e| fail(format!("no temporary directory: {e}")))?;
    let copy = scratch.path().join("repo");
    let mut budget = MAX_ENTRIES;
    copy_checkout(root, root, &copy, &mut budget)
        .map_err(|e| fail(format!("cannot copy the checkout for the plugin: {e}")))?;
    let home = scratch.path().join("home");
    std::fs::create_dir_all(&home).map_err(|e| fail(format!("no home directory: {e}")))?;
    let cwd = copy.join(&rel);
    let mut env = req.env.clone();
    env.push((
        "ARGOCD_APP_SOURCE_PATH".into(),
        rel.to_string_lossy().into_owned(),
    ));
    if !req.plugin.init.is_empty() {
        run(&req.plugin, &req.plugin.init, &cwd, &home, &env, "init").map_err(&fail)?;
    }
    let stdout = run(
        &req.plugin,
        &req.plugin.generate,
        &cwd,
        &home,
        &env,
        "generate",
    )
    .map_err(&fail)?;
    let text = String::from_utf8(stdout).map_err(|_| fail("its output is not UTF-8".into()))?;
    let objects = parse_objects(&text, &rel.join(format!("(plugin {})", req.plugin.name)))?;
    Ok(Manifests { objects })
}

/// One command of the plugin; its standard output, or why it failed (the last line of its
/// error output at most, which is the plugin's own message).
fn run(
    plugin: &PluginConfig,
    argv: &[String],
    cwd: &Path,
    home: &Path,
    env: &[(String, String)],
    what: &str,
) -> Result<Vec<u8>, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err(format!("its {what} command is empty"));
    };
    let mut cmd = if plugin.network {
        let mut cmd = Command::new(program);
        cmd.args(args);
        cmd
    } else {
        let mut cmd = Command::new("unshare");
        cmd.args(["--map-root-user", "--net", "--"])
            .arg(program)
            .args(args);
        cmd
    };
    cmd.current_dir(cwd).env_clear().env("HOME", home);
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let output = super::process::run(cmd, plugin.timeout, plugin.max_output)
        .map_err(|e| format!("its {what} command {program:?}: {e}"))?;
    if output.success {
        return Ok(output.stdout);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let last: String = last.chars().take(300).collect();
    if !plugin.network && last.starts_with("unshare:") {
        return Err(format!(
            "cannot keep it off the network ({last}): let the agent create user and network namespaces (a drop-in with RestrictNamespaces=user net), or set network = true for the plugin"
        ));
    }
    Err(format!("its {what} command {program:?} failed: {last}"))
}

/// Copies the checkout: directories and regular files; a symlink only when it resolves inside
/// the checkout (one leading out of it is left out, so a plugin never reads a host file
/// through the repository).
fn copy_checkout(root: &Path, from: &Path, to: &Path, budget: &mut usize) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        *budget = budget
            .checked_sub(1)
            .ok_or_else(|| std::io::Error::other(format!("more than {MAX_ENTRIES} files")))?;
        let source = entry.path();
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            let inside = source
                .canonicalize()
                .is_ok_and(|t: PathBuf| t.starts_with(root));
            if inside {
                std::os::unix::fs::symlink(std::fs::read_link(&source)?, &target)?;
            }
        } else if kind.is_dir() {
            if entry.file_name() != ".git" {
                copy_checkout(root, &source, &target, budget)?;
            }
        } else if kind.is_file() {
            std::fs::copy(&source, &target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(generate: &[&str], network: bool) -> PluginRequest {
        PluginRequest {
            plugin: PluginConfig {
                name: "gen".into(),
                init: vec!["sh".into(), "-c".into(), "echo init > init-ran".into()],
                generate: generate.iter().map(|s| s.to_string()).collect(),
                timeout: std::time::Duration::from_secs(10),
                max_output: 1024 * 1024,
                network,
            },
            env: vec![
                ("ARGOCD_APP_NAME".into(), "web".into()),
                ("ARGOCD_ENV_COLOR".into(), "teal".into()),
            ],
        }
    }

    #[test]
    fn generate_prints_the_manifests_in_a_copy_with_the_apps_variables() {
        let repo = tempfile::tempdir().unwrap();
        let root = repo.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("app")).unwrap();
        std::fs::write(root.join("secret-outside"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.join("app/host")).unwrap();
        let script = "test -f init-ran && test ! -e host && printf 'apiVersion: v1\\nkind: ConfigMap\\nmetadata:\\n  name: %s\\ndata:\\n  color: %s\\n  path: %s\\n' \"$ARGOCD_APP_NAME\" \"$ARGOCD_ENV_COLOR\" \"$ARGOCD_APP_SOURCE_PATH\"";
        let out = generate(
            &root,
            &root.join("app"),
            &request(&["sh", "-c", script], true),
        )
        .unwrap();
        assert_eq!(out.objects.len(), 1);
        assert_eq!(out.objects[0].name(), "web");
        assert_eq!(out.objects[0].value["data"]["color"], "teal");
        assert_eq!(out.objects[0].value["data"]["path"], "app");
        assert!(
            !root.join("app/init-ran").exists(),
            "the checkout is not changed"
        );
    }

    #[test]
    fn a_failing_plugin_fails_the_render_with_its_message() {
        let repo = tempfile::tempdir().unwrap();
        let root = repo.path().canonicalize().unwrap();
        let err = generate(
            &root,
            &root,
            &request(
                &[
                    "sh",
                    "-c",
                    "echo noise >&2; echo 'values missing' >&2; exit 3",
                ],
                true,
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("values missing") && !err.contains("noise"),
            "{err}"
        );
    }
}
