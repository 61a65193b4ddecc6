//! Snapshot directories that survive a power cut. A Git checkout or an unpacked chart is
//! written under a temporary name, every file and directory in it synced, a seal listing each
//! entry's size and SHA-256 written last, and only then renamed into place (and the parent
//! synced). A directory is used only while its seal matches what is on disk: files that came
//! back empty or short after a crash would otherwise render as nothing, and be pruned.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// The seal's file name: hidden, so no renderer reads it.
const SEAL: &str = ".edgesync-seal";

/// What one entry must be: a file's or a symlink target's size and SHA-256, or a directory.
type Manifest = BTreeMap<String, Option<(u64, String)>>;

/// Syncs everything under `dir`, then writes and syncs its seal.
pub(crate) fn seal(dir: &Path) -> std::io::Result<()> {
    let manifest = read_tree(dir, true)?;
    let text = serde_json::to_vec(&manifest).map_err(std::io::Error::other)?;
    let path = dir.join(SEAL);
    std::fs::write(&path, text)?;
    std::fs::File::open(&path)?.sync_all()?;
    std::fs::File::open(dir)?.sync_all()
}

/// Moves a sealed `tmp` to `target` and syncs the parent, so the rename itself is durable.
/// `Ok(false)`: `target` exists already (another worker won the race), `tmp` is removed.
pub(crate) fn publish(tmp: &Path, target: &Path) -> std::io::Result<bool> {
    if let Err(e) = std::fs::rename(tmp, target) {
        let _ = std::fs::remove_dir_all(tmp);
        return if target.is_dir() { Ok(false) } else { Err(e) };
    }
    if let Some(parent) = target.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    whole().insert(target.to_path_buf());
    Ok(true)
}

/// Why a sealed directory is not usable.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SealError {
    /// Directories written before seals existed have none.
    #[error("no seal: {0}")]
    Missing(#[source] std::io::Error),
    #[error("unreadable seal: {0}")]
    Unreadable(#[source] serde_json::Error),
    #[error("cannot read the directory: {0}")]
    Tree(#[source] std::io::Error),
    #[error("{0} is not as it was written")]
    Changed(String),
    #[error("{0} was not written with it")]
    Added(String),
}

/// Whether `dir` is exactly what was sealed: `Err` says what differs.
pub(crate) fn verify(dir: &Path) -> Result<(), SealError> {
    let text = std::fs::read(dir.join(SEAL)).map_err(SealError::Missing)?;
    let sealed: Manifest = serde_json::from_slice(&text).map_err(SealError::Unreadable)?;
    let found = read_tree(dir, false).map_err(SealError::Tree)?;
    if let Some((path, _)) = sealed.iter().find(|(p, want)| found.get(*p) != Some(want)) {
        return Err(SealError::Changed(path.clone()));
    }
    if let Some(path) = found.keys().find(|p| !sealed.contains_key(*p)) {
        return Err(SealError::Added(path.clone()));
    }
    Ok(())
}

/// Directories this process sealed or verified. A crash is what the seals guard against, and
/// after one the process starts again with this empty; until then, a directory once found
/// whole is not read and hashed again on every use (each app of a monorepo at each revision).
static WHOLE: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn whole() -> std::sync::MutexGuard<'static, BTreeSet<PathBuf>> {
    WHOLE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes `dir` unless it verifies, saying why. Returns whether it is usable.
pub(crate) fn usable_or_removed(dir: &Path) -> bool {
    if !dir.is_dir() {
        whole().remove(dir);
        return false;
    }
    if whole().contains(dir) {
        return true;
    }
    match verify(dir) {
        Ok(()) => {
            whole().insert(dir.to_path_buf());
            true
        }
        Err(why) => {
            tracing::warn!(dir = %dir.display(), "damaged snapshot removed, written again: {why}");
            let _ = std::fs::remove_dir_all(dir);
            false
        }
    }
}

fn read_tree(dir: &Path, sync: bool) -> std::io::Result<Manifest> {
    let mut manifest = Manifest::new();
    let mut pending: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current)? {
            let entry = entry?;
            let path = entry.path();
            let relative = path
                .strip_prefix(dir)
                .map_err(std::io::Error::other)?
                .to_string_lossy()
                .to_string();
            if relative == SEAL {
                continue;
            }
            let kind = entry.file_type()?;
            if kind.is_dir() {
                manifest.insert(relative, None);
                pending.push(path);
                continue;
            }
            let digest = if kind.is_symlink() {
                let target = std::fs::read_link(&path)?;
                let bytes = target.as_os_str().as_encoded_bytes();
                (bytes.len() as u64, hex::encode(Sha256::digest(bytes)))
            } else {
                let mut file = std::fs::File::open(&path)?;
                let mut hasher = Sha256::new();
                let mut buf = vec![0u8; 64 * 1024];
                let mut size = 0u64;
                loop {
                    let n = file.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    size = size.saturating_add(n as u64);
                    hasher.update(&buf[..n]);
                }
                if sync {
                    file.sync_all()?;
                }
                (size, hex::encode(hasher.finalize()))
            };
            manifest.insert(relative, Some(digest));
        }
        if sync {
            std::fs::File::open(&current)?.sync_all()?;
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_tree_verifies_until_a_file_comes_back_short_empty_or_extra() {
        let root = tempfile::tempdir().unwrap();
        let tmp = root.path().join(".tmp");
        std::fs::create_dir_all(tmp.join("app")).unwrap();
        std::fs::write(tmp.join("app/cm.yaml"), "kind: ConfigMap\n").unwrap();
        std::os::unix::fs::symlink("app/cm.yaml", tmp.join("link")).unwrap();
        seal(&tmp).unwrap();
        let dir = root.path().join("snap");
        assert!(publish(&tmp, &dir).unwrap());
        verify(&dir).unwrap();
        assert!(usable_or_removed(&dir));

        // A power cut before the data reached the disk: the file is there, but empty, and
        // the agent starts again (trusting nothing it found whole before).
        std::fs::write(dir.join("app/cm.yaml"), "").unwrap();
        assert!(usable_or_removed(&dir), "whole once, in this process");
        whole().clear();
        let why = verify(&dir).unwrap_err();
        assert!(
            matches!(&why, SealError::Changed(p) if p == "app/cm.yaml"),
            "{why}"
        );
        assert!(!usable_or_removed(&dir));
        assert!(!dir.exists());

        let unsealed = root.path().join("old");
        std::fs::create_dir_all(&unsealed).unwrap();
        assert!(matches!(verify(&unsealed), Err(SealError::Missing(_))));

        std::fs::create_dir_all(&tmp).unwrap();
        seal(&tmp).unwrap();
        std::fs::write(tmp.join("extra.yaml"), "x: 1").unwrap();
        assert!(matches!(verify(&tmp), Err(SealError::Added(p)) if p == "extra.yaml"));
    }
}
