//! Real Git repositories driven with the `git` command line, as a user would.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct GitRepo {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl GitRepo {
    pub fn new() -> GitRepo {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("repo");
        std::fs::create_dir_all(&path).unwrap();
        let repo = GitRepo { _dir: dir, path };
        repo.git(&["init", "-q", "-b", "main"]);
        repo
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    pub fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .args([
                "-c",
                "user.name=edgesync-test",
                "-c",
                "user.email=test@edgesync.invalid",
            ])
            .args(args)
            .current_dir(&self.path)
            .output()
            .expect("run git");
        assert!(
            out.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn write(&self, rel: &str, content: &str) -> &Self {
        let p = self.path.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
        self
    }

    pub fn remove(&self, rel: &str) -> &Self {
        std::fs::remove_file(self.path.join(rel)).unwrap();
        self
    }

    /// Commits everything and returns the new commit's SHA.
    pub fn commit(&self, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "-m", message]);
        self.git(&["rev-parse", "HEAD"])
    }

    /// Commits everything signed with `key` (`git commit -S`) and returns the SHA.
    pub fn commit_signed(&self, message: &str, key: &super::signing::SigningKey) -> String {
        self.git(&["add", "-A"]);
        let mut args = key.git_config();
        args.extend(["commit", "-q", "-S", "-m", message]);
        self.git(&args);
        self.git(&["rev-parse", "HEAD"])
    }

    /// A bare clone under `root/name.git`, for serving over HTTP.
    pub fn bare_clone_into(&self, root: &Path, name: &str) -> PathBuf {
        let target = root.join(format!("{name}.git"));
        let out = Command::new("git")
            .args(["clone", "-q", "--bare"])
            .arg(&self.path)
            .arg(&target)
            .output()
            .expect("git clone --bare");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target
    }

    /// Pushes `main` to a bare repository, as a developer pushes to a remote.
    pub fn push_to(&self, bare: &Path) {
        self.git(&["push", "-q", "--force", bare.to_str().unwrap(), "main"]);
    }
}
