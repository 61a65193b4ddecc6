//! The Git cache: one bare repository per URL under `state_dir/git/repos`, and one checked-out
//! directory per commit under `state_dir/git/snapshots`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once};

use edgesync_proto::Ancestry;
use git2::build::CheckoutBuilder;
use git2::{
    AutotagOption, Direction, FetchOptions, Oid, RemoteCallbacks, RemoteUpdateFlags, Repository,
};
use sha2::{Digest, Sha256};

use super::transport;
use super::{is_commit_sha, redact, Snapshot, SourceError};
use crate::config::RepositoryConfig;
use crate::signature::Signed;

/// A fetch that downloads more than this is cancelled: no fleet repo is that large, and a
/// hostile server must not fill the node's disk.
pub(crate) const MAX_FETCH_BYTES: usize = 2 * 1024 * 1024 * 1024;

/// libgit2 waits forever on a silent server by default.
fn set_timeouts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: both setters only write libgit2's global options, once, before any
        // connection is made by this process.
        let result = unsafe {
            git2::opts::set_server_connect_timeout_in_milliseconds(10_000)
                .and_then(|_| git2::opts::set_server_timeout_in_milliseconds(60_000))
        };
        if let Err(e) = result {
            tracing::warn!("cannot set Git network timeouts: {e}");
        }
    });
}

#[derive(Debug, Clone)]
pub(crate) struct GitSource {
    repos: PathBuf,
    snapshots: PathBuf,
    /// One lock per URL: the apps of one repository ask for the same commit at once, and
    /// one fetch and checkout serves them all.
    busy: Arc<Mutex<HashMap<String, Arc<Mutex<()>>>>>,
}

impl GitSource {
    pub(crate) fn new(state_dir: &Path) -> Self {
        set_timeouts();
        let dir = state_dir.join("git");
        GitSource {
            repos: dir.join("repos"),
            snapshots: dir.join("snapshots"),
            busy: Arc::default(),
        }
    }

    fn key(url: &str) -> String {
        hex::encode(&Sha256::digest(url.as_bytes())[..8])
    }

    fn git_err(url: &str) -> impl Fn(git2::Error) -> SourceError + '_ {
        move |e| SourceError::Git {
            url: redact(url),
            message: e.message().to_string(),
            source: Some(e),
        }
    }

    fn cache_err<'a>(url: &'a str, path: &'a Path) -> impl Fn(std::io::Error) -> SourceError + 'a {
        move |source| SourceError::Cache {
            url: redact(url),
            path: path.to_path_buf(),
            source,
        }
    }

    fn open(&self, url: &str) -> Result<Repository, SourceError> {
        let path = self.repos.join(format!("{}.git", Self::key(url)));
        if path.join("HEAD").exists() {
            return Repository::open_bare(&path).map_err(Self::git_err(url));
        }
        std::fs::create_dir_all(&self.repos).map_err(Self::cache_err(url, &self.repos))?;
        Repository::init_bare(&path).map_err(Self::git_err(url))
    }

    /// Lists the remote's refs without downloading any objects, so polling stays cheap.
    pub(crate) fn remote_refs(&self, repo: &RepositoryConfig) -> Result<RemoteRefs, SourceError> {
        self.remote_refs_fetching(repo, &[])
    }

    /// The remote's refs, and the commits the branches (or `HEAD`) in `wanted` point to, if
    /// the cache lacks them: fetched over the connection the listing opened, one request fewer
    /// than a fetch of their own, which lists the refs again. Such a fetch is an errand: if it fails, the snapshot's own fetch (with its
    /// fallbacks) runs as before.
    pub(crate) fn remote_refs_fetching(
        &self,
        repo: &RepositoryConfig,
        wanted: &[String],
    ) -> Result<RemoteRefs, SourceError> {
        let url = &repo.url;
        let cache = self.open(url)?;
        let mut remote = cache.remote_anonymous(url).map_err(Self::git_err(url))?;
        let _credentials = transport::scope(repo)?;
        let refused = |e: git2::Error| {
            let message = e.message().to_string();
            classify(url, e, message)
        };
        let mut connection = remote
            .connect_auth(Direction::Fetch, None, None)
            .map_err(refused)?;
        let heads: Vec<(String, Oid)> = connection
            .list()
            .map_err(refused)?
            .iter()
            .map(|h| (h.name().to_string(), h.oid()))
            .collect();
        let missing: BTreeSet<String> = wanted
            .iter()
            .filter_map(|revision| pick_ref(&heads, revision))
            .filter(|(name, _)| name == "HEAD" || name.starts_with("refs/heads/"))
            .filter(|(_, oid)| cache.find_commit(*oid).is_err())
            .map(|(name, _)| named_refspec(name))
            .collect();
        if !missing.is_empty() {
            let lock = self.writer(url);
            let _busy = lock.lock().unwrap_or_else(|e| e.into_inner());
            let refspecs: Vec<String> = missing.into_iter().collect();
            let mut too_large = false;
            let mut options = FetchOptions::new();
            options.remote_callbacks(progress(|p| {
                too_large = p.received_bytes() > MAX_FETCH_BYTES;
                !too_large
            }));
            // The first fetch takes one commit, not the history. Later ones send what the
            // cache has and take only what is new: a shallow fetch would negotiate its depth
            // in a request of its own. (A branch rewritten onto unrelated history brings that
            // history once, within MAX_FETCH_BYTES.)
            if can_be_shallow(url) && !holds_commits(&cache) {
                options.depth(1);
            }
            let remote = connection.remote();
            let fetched = remote
                .download(&refspecs, Some(&mut options))
                .and_then(|()| {
                    remote.update_tips(None, RemoteUpdateFlags::empty(), AutotagOption::None, None)
                });
            if let Err(e) = fetched {
                // The snapshot's own fetch follows, whole if the server refused a shallow one.
                refuses_shallow(url, e.message());
                tracing::debug!(url = %redact(url), ?refspecs, "fetch with the listing failed: {}", e.message());
            }
        }
        Ok(RemoteRefs {
            url: url.clone(),
            heads,
        })
    }

    /// The lock held while the cache of `url` is written (fetches, checkouts).
    fn writer(&self, url: &str) -> Arc<Mutex<()>> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy.entry(url.to_string()).or_default().clone()
    }

    /// Makes commit `sha` (reached from `revision`) available as a snapshot directory,
    /// fetching it first if the cache does not have it.
    pub(crate) fn snapshot(
        &self,
        repo: &RepositoryConfig,
        revision: &str,
        sha: &str,
    ) -> Result<Snapshot, SourceError> {
        let url = &repo.url;
        let dir = self.snapshots.join(format!("{}-{sha}", Self::key(url)));
        // Only a checkout whose files are all as they were written is used.
        let existing = || {
            super::sealed::usable_or_removed(&dir).then(|| Snapshot {
                repo: url.clone(),
                revision: sha.to_string(),
                root: dir.clone(),
                fetched: false,
            })
        };
        if let Some(snapshot) = existing() {
            return Ok(snapshot);
        }
        let lock = self.writer(url);
        let _busy = lock.lock().unwrap_or_else(|e| e.into_inner());
        // Another app of this repository may have made it meanwhile.
        if let Some(snapshot) = existing() {
            return Ok(snapshot);
        }
        let cache = self.open(url)?;
        let oid = Oid::from_str(sha).map_err(Self::git_err(url))?;
        let fetched = cache.find_commit(oid).is_err();
        if fetched {
            self.fetch(&cache, repo, revision, sha)?;
        }
        let commit = cache
            .find_commit(oid)
            .map_err(|_| SourceError::RevisionNotFound {
                url: redact(url),
                revision: sha.to_string(),
            })?;
        self.checkout(&cache, url, &commit, &dir)?;
        // Still under the cache's lock: no fetch writes a pack meanwhile.
        match super::packs::merge_small_packs(&cache) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(url = %redact(url), packs = n, "Git cache packs merged"),
            Err(e) => tracing::warn!(url = %redact(url), "Git cache packs not merged: {e}"),
        }
        Ok(Snapshot {
            repo: url.clone(),
            revision: sha.to_string(),
            root: dir,
            fetched,
        })
    }

    /// How commit `revision` (a rollout gate's) relates to `target` (where `branch` of `repo`
    /// points), on the history the cache holds: `revision` is fetched by SHA when the cache
    /// lacks it, and a shallow cache is deepened to the whole history before the two are
    /// called unrelated (the first fetch is one commit deep, so an older stage's revision lies
    /// behind the boundary). A revision no branch of the server holds is unrelated.
    pub(crate) fn ancestry(
        &self,
        repo: &RepositoryConfig,
        branch: &str,
        target: &str,
        revision: &str,
    ) -> Result<Ancestry, SourceError> {
        if target == revision {
            return Ok(Ancestry::Same);
        }
        let url = &repo.url;
        let (Ok(t), Ok(r)) = (Oid::from_str(target), Oid::from_str(revision)) else {
            return Ok(Ancestry::Unrelated);
        };
        if !is_commit_sha(revision) {
            return Ok(Ancestry::Unrelated);
        }
        let lock = self.writer(url);
        let _busy = lock.lock().unwrap_or_else(|e| e.into_inner());
        let cache = self.open(url)?;
        for (oid, sha) in [(t, target), (r, revision)] {
            if cache.find_commit(oid).is_err() {
                match self.fetch(&cache, repo, branch, sha) {
                    Ok(()) => {}
                    Err(SourceError::RevisionNotFound { .. }) => return Ok(Ancestry::Unrelated),
                    Err(e) => return Err(e),
                }
            }
        }
        let relate = |cache: &Repository| -> Result<Option<Ancestry>, git2::Error> {
            Ok(if cache.graph_descendant_of(t, r)? {
                Some(Ancestry::Older)
            } else if cache.graph_descendant_of(r, t)? {
                Some(Ancestry::Newer)
            } else {
                None
            })
        };
        if let Some(found) = relate(&cache).map_err(Self::git_err(url))? {
            return Ok(found);
        }
        if cache.is_shallow() {
            tracing::info!(url = %redact(url), "deepening the shallow Git cache to place a rollout gate's revision");
            self.deepen(&cache, repo)?;
            if let Some(found) = relate(&cache).map_err(Self::git_err(url))? {
                return Ok(found);
            }
        }
        Ok(Ancestry::Unrelated)
    }

    /// Fetches every branch with its whole history into a shallow cache.
    fn deepen(&self, cache: &Repository, repo: &RepositoryConfig) -> Result<(), SourceError> {
        let url = &repo.url;
        let _credentials = transport::scope(repo)?;
        let mut too_large = false;
        let mut options = FetchOptions::new();
        options.remote_callbacks(progress(|p| {
            too_large = p.received_bytes() > MAX_FETCH_BYTES;
            !too_large
        }));
        // libgit2's GIT_FETCH_DEPTH_UNSHALLOW.
        options.depth(i32::MAX);
        let mut remote = cache.remote_anonymous(url).map_err(Self::git_err(url))?;
        let result = remote.fetch(
            &["+refs/heads/*:refs/edgesync/heads/*"],
            Some(&mut options),
            None,
        );
        drop(options);
        result.map_err(|e| {
            let message = if too_large {
                format!(
                    "fetch cancelled after {MAX_FETCH_BYTES} bytes: {}",
                    e.message()
                )
            } else {
                e.message().to_string()
            };
            SourceError::Git {
                url: redact(url),
                message,
                source: Some(e),
            }
        })
    }

    fn fetch(
        &self,
        cache: &Repository,
        repo: &RepositoryConfig,
        revision: &str,
        sha: &str,
    ) -> Result<(), SourceError> {
        let url = &repo.url;
        // The named ref shallowly first (`sha` was its tip a moment ago), then the SHA itself
        // (servers that allow it send one commit), then everything as a last resort for
        // servers that refuse both.
        let mut attempts: Vec<(Vec<String>, bool)> = Vec::new();
        if !is_commit_sha(revision) {
            attempts.push((vec![named_refspec(&full_refname(revision))], true));
        }
        attempts.push((vec![sha.to_string()], true));
        attempts.push((
            vec![
                "+refs/heads/*:refs/edgesync/heads/*".to_string(),
                "+refs/tags/*:refs/edgesync/tags/*".to_string(),
            ],
            false,
        ));
        let oid = Oid::from_str(sha).map_err(Self::git_err(url))?;
        let _credentials = transport::scope(repo)?;
        let mut last_error = None;
        let mut attempts = std::collections::VecDeque::from(attempts);
        while let Some((refspecs, shallow)) = attempts.pop_front() {
            let shallow = shallow && can_be_shallow(url);
            let mut too_large = false;
            let cb = progress(|p| {
                too_large = p.received_bytes() > MAX_FETCH_BYTES;
                !too_large
            });
            let mut options = FetchOptions::new();
            options.remote_callbacks(cb);
            if shallow {
                options.depth(1);
            }
            let mut remote = cache.remote_anonymous(url).map_err(Self::git_err(url))?;
            let result = remote.fetch(&refspecs, Some(&mut options), None);
            drop(options);
            match result {
                Ok(()) if cache.find_commit(oid).is_ok() => return Ok(()),
                Ok(()) => {}
                Err(e) if too_large => {
                    return Err(SourceError::Git {
                        url: redact(url),
                        message: format!(
                            "fetch cancelled after {MAX_FETCH_BYTES} bytes: {}",
                            e.message()
                        ),
                        source: Some(e),
                    })
                }
                Err(e) => {
                    let message = e.message().to_string();
                    if is_final(&e, &message) {
                        return Err(classify(url, e, message));
                    }
                    tracing::debug!(url = %redact(url), ?refspecs, "fetch attempt failed: {message}");
                    // The same refs again, whole: one branch's history, not every branch's.
                    if shallow && refuses_shallow(url, &message) {
                        attempts.push_front((refspecs, false));
                    }
                    last_error = Some((message, e));
                }
            }
        }
        Err(match last_error {
            Some((message, e)) => SourceError::Git {
                url: redact(url),
                message,
                source: Some(e),
            },
            None => SourceError::RevisionNotFound {
                url: redact(url),
                revision: sha.to_string(),
            },
        })
    }

    fn checkout(
        &self,
        cache: &Repository,
        url: &str,
        commit: &git2::Commit<'_>,
        dir: &Path,
    ) -> Result<(), SourceError> {
        std::fs::create_dir_all(&self.snapshots).map_err(Self::cache_err(url, &self.snapshots))?;
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempdir_in(&self.snapshots)
            .map_err(Self::cache_err(url, &self.snapshots))?;
        let tree = commit.tree().map_err(Self::git_err(url))?;
        let mut co = CheckoutBuilder::new();
        co.target_dir(tmp.path()).force().update_index(false);
        cache
            .checkout_tree(tree.as_object(), Some(&mut co))
            .map_err(Self::git_err(url))?;
        // Another sync of the same commit may win the race; its directory is identical.
        let tmp_path = tmp.keep();
        super::sealed::publish_then_seal(&tmp_path, dir).map_err(Self::cache_err(url, dir))?;
        Ok(())
    }

    /// Commit `sha`, or the annotated tag `tag` that points to it, with its signature, for the
    /// signature stage. The commit is in the cache once its snapshot exists; a tag object is
    /// fetched by its ref the first time.
    pub(crate) fn signed(
        &self,
        repo: &RepositoryConfig,
        revision: &str,
        sha: &str,
        tag: Option<&TagRef>,
    ) -> Result<Signed, SourceError> {
        let url = &repo.url;
        let cache = self.open(url)?;
        let short = |id: &str| id.chars().take(12).collect::<String>();
        let Some(tag) = tag else {
            let oid = Oid::from_str(sha).map_err(Self::git_err(url))?;
            if cache.find_commit(oid).is_err() {
                self.fetch(&cache, repo, revision, sha)?;
            }
            let object = format!("commit {}", short(sha));
            return match cache.extract_signature(&oid, None) {
                Ok((signature, payload)) => Ok(Signed {
                    object,
                    payload: payload.to_vec(),
                    signature: Some(signature.to_vec()),
                }),
                Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(Signed {
                    object,
                    payload: Vec::new(),
                    signature: None,
                }),
                Err(e) => Err(Self::git_err(url)(e)),
            };
        };
        let oid = Oid::from_str(&tag.oid).map_err(Self::git_err(url))?;
        if cache.find_tag(oid).is_err() {
            let local = format!("refs/edgesync/{}", tag.name.trim_start_matches("refs/"));
            let refspec = format!("+{}:{local}", tag.name);
            let mut remote = cache.remote_anonymous(url).map_err(Self::git_err(url))?;
            let _credentials = transport::scope(repo)?;
            let cb = progress(|p| p.received_bytes() <= MAX_FETCH_BYTES);
            let mut options = FetchOptions::new();
            options.remote_callbacks(cb);
            if can_be_shallow(url) {
                options.depth(1);
            }
            remote
                .fetch(&[refspec], Some(&mut options), None)
                .map_err(|e| SourceError::Git {
                    url: redact(url),
                    message: e.message().to_string(),
                    source: Some(e),
                })?;
        }
        let not_found = || SourceError::RevisionNotFound {
            url: redact(url),
            revision: tag.name.clone(),
        };
        let tagged = cache.find_tag(oid).map_err(|_| not_found())?;
        let peeled = tagged.target().and_then(|t| t.peel_to_commit());
        if peeled.map(|c| c.id().to_string()).ok().as_deref() != Some(sha) {
            return Err(SourceError::Git {
                url: redact(url),
                message: format!("tag {} does not point to commit {sha}", tag.name),
                source: None,
            });
        }
        let odb = cache.odb().map_err(Self::git_err(url))?;
        let raw = odb.read(oid).map_err(Self::git_err(url))?;
        let name = tag.name.trim_start_matches("refs/tags/");
        Ok(Signed::from_tag(
            format!("tag {name} ({})", short(&tag.oid)),
            raw.data(),
        ))
    }

    /// Deletes `url`'s snapshot directories whose commit is not in `keep`. Snapshots of
    /// other repositories are left alone: their syncs may be rendering them right now.
    pub(crate) fn retain(&self, url: &str, keep: &HashSet<String>) {
        self.retain_older(url, keep, std::time::Duration::ZERO);
    }

    /// [`GitSource::retain`], sparing snapshots made less than `min_age` ago (a render that
    /// is not serialised with this call may be reading them).
    pub(crate) fn retain_older(
        &self,
        url: &str,
        keep: &HashSet<String>,
        min_age: std::time::Duration,
    ) {
        let Ok(entries) = std::fs::read_dir(&self.snapshots) else {
            return;
        };
        let prefix = format!("{}-", Self::key(url));
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(sha) = name.strip_prefix(&prefix) else {
                continue;
            };
            let young = !min_age.is_zero()
                && entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_none_or(|age| age < min_age);
            if !keep.contains(sha) && !young {
                if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                    tracing::warn!(path = %entry.path().display(), "cannot remove old snapshot: {e}");
                }
            }
        }
    }
}

/// The refs a remote advertised at one moment.
#[derive(Debug, Clone)]
pub(crate) struct RemoteRefs {
    url: String,
    heads: Vec<(String, Oid)>,
}

impl RemoteRefs {
    /// Resolves a branch, tag, `HEAD`, full ref name or commit SHA to a commit SHA.
    pub(crate) fn resolve(&self, revision: &str) -> Result<String, SourceError> {
        if is_commit_sha(revision) {
            return Ok(revision.to_ascii_lowercase());
        }
        pick_ref(&self.heads, revision)
            .map(|(_, oid)| oid.to_string())
            .ok_or_else(|| SourceError::RevisionNotFound {
                url: redact(&self.url),
                revision: revision.to_string(),
            })
    }
}

impl RemoteRefs {
    /// The annotated tag `revision` resolves through, if it does: its signature, not the
    /// commit's, vouches for the revision first.
    pub(crate) fn annotated_tag(&self, revision: &str) -> Option<TagRef> {
        if is_commit_sha(revision) {
            return None;
        }
        let (name, _) = pick_ref(&self.heads, revision)?;
        let name = name.strip_suffix("^{}")?;
        let (_, oid) = self.heads.iter().find(|(n, _)| n == name)?;
        Some(TagRef {
            name: name.to_string(),
            oid: oid.to_string(),
        })
    }
}

/// An annotated tag on a remote: its full ref name and the tag object's ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TagRef {
    pub(crate) name: String,
    pub(crate) oid: String,
}

/// Callbacks that only watch a transfer: `f` sees every update and cancels it by returning
/// false. (Credentials and host keys are the transports' business: [`transport`].)
fn progress<'a>(mut f: impl FnMut(&git2::Progress<'_>) -> bool + 'a) -> RemoteCallbacks<'a> {
    let mut callbacks = RemoteCallbacks::new();
    callbacks.transfer_progress(move |p| f(&p));
    callbacks
}

/// Whether the cache has fetched anything yet.
fn holds_commits(cache: &Repository) -> bool {
    cache
        .references_glob("refs/edgesync/*")
        .is_ok_and(|mut refs| refs.next().is_some())
}

/// libgit2's local transport cannot do shallow fetches.
fn can_be_shallow(url: &str) -> bool {
    !url.starts_with("file://")
        && !url.starts_with('/')
        && !NO_SHALLOW
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(url)
}

/// Servers whose answer to libgit2's shallow negotiation libgit2 cannot read: JGit, and so
/// Gerrit and googlesource.com, answer a depth-1 fetch with what libgit2 calls an "invalid
/// packet line" (JuliaLang/Pkg.jl#4771; C git reads it). Such a server is fetched whole from
/// then on, for the life of the process.
static NO_SHALLOW: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Whether a shallow fetch of `url` failed because the server's shallow answer cannot be read;
/// if so, `url` is not fetched shallow again.
fn refuses_shallow(url: &str, message: &str) -> bool {
    if !message.contains("invalid packet line") {
        return false;
    }
    let first = NO_SHALLOW
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(url.to_string());
    if first {
        tracing::info!(url = %redact(url), "the Git server's answer to a shallow fetch cannot be read (a JGit server, as Gerrit's?); fetching its history whole from now on");
    }
    true
}

/// Fetches the ref `refname` (full, or `HEAD`) into the cache under `refs/edgesync/`.
fn named_refspec(refname: &str) -> String {
    format!(
        "+{refname}:refs/edgesync/{}",
        refname.trim_start_matches("refs/")
    )
}

fn full_refname(revision: &str) -> String {
    if revision == "HEAD" || revision.starts_with("refs/") {
        revision.to_string()
    } else {
        format!("refs/heads/{revision}")
    }
}

/// Errors another refspec cannot fix: credentials and host verification.
/// A libgit2 error as a [`SourceError`]: [`SourceError::Refused`] when the server refused
/// us ([`is_final`]), else [`SourceError::Git`], which is retried as transient.
fn classify(url: &str, e: git2::Error, message: String) -> SourceError {
    if is_final(&e, &message) {
        SourceError::Refused {
            url: redact(url),
            message,
            source: e,
        }
    } else {
        SourceError::Git {
            url: redact(url),
            message,
            source: Some(e),
        }
    }
}

fn is_final(e: &git2::Error, message: &str) -> bool {
    matches!(
        e.code(),
        git2::ErrorCode::Auth | git2::ErrorCode::Certificate
    ) || message.contains("authentication")
        || message.contains("host key")
}

/// Picks the ref `revision` names among a remote's advertised refs, the way `git checkout`
/// would: `HEAD`, a full ref name, a branch, then a tag (peeled to its commit).
fn pick_ref<'a>(heads: &'a [(String, Oid)], revision: &str) -> Option<&'a (String, Oid)> {
    let find = |name: &str| heads.iter().find(|(n, _)| n == name);
    if revision == "HEAD" || revision.starts_with("refs/") {
        return find(&format!("{revision}^{{}}")).or_else(|| find(revision));
    }
    find(&format!("refs/heads/{revision}"))
        .or_else(|| find(&format!("refs/tags/{revision}^{{}}")))
        .or_else(|| find(&format!("refs/tags/{revision}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_not_transient_failures() {
        let auth = || {
            git2::Error::new(
                git2::ErrorCode::Auth,
                git2::ErrorClass::Http,
                "authentication required but no callback set",
            )
        };
        assert!(matches!(
            classify("https://bot:pw@h/r.git", auth(), auth().message().to_string()),
            SourceError::Refused { url, .. } if !url.contains("pw")
        ));
        let down = || {
            git2::Error::new(
                git2::ErrorCode::GenericError,
                git2::ErrorClass::Net,
                "failed to connect to h: Connection refused",
            )
        };
        assert!(matches!(
            classify("https://h/r.git", down(), down().message().to_string()),
            SourceError::Git { .. }
        ));
    }

    fn oid(n: u8) -> Oid {
        Oid::from_bytes(&[n; 20]).unwrap()
    }

    #[test]
    fn refs_resolve_like_git() {
        let heads = vec![
            ("HEAD".to_string(), oid(1)),
            ("refs/heads/main".to_string(), oid(1)),
            ("refs/heads/v1".to_string(), oid(2)),
            ("refs/tags/v1".to_string(), oid(3)),
            ("refs/tags/v2".to_string(), oid(4)),
            ("refs/tags/v2^{}".to_string(), oid(5)),
        ];
        let pick = |r: &str| pick_ref(&heads, r).map(|(_, o)| *o);
        assert_eq!(pick("HEAD"), Some(oid(1)));
        assert_eq!(pick("main"), Some(oid(1)));
        // A branch wins over a tag of the same name, as in git.
        assert_eq!(pick("v1"), Some(oid(2)));
        assert_eq!(pick("refs/tags/v1"), Some(oid(3)));
        // Annotated tags resolve to the commit, not the tag object.
        assert_eq!(pick("v2"), Some(oid(5)));
        assert_eq!(pick("nope"), None);
        let refs = RemoteRefs {
            url: "u".into(),
            heads,
        };
        assert_eq!(
            refs.annotated_tag("v2"),
            Some(TagRef {
                name: "refs/tags/v2".into(),
                oid: oid(4).to_string()
            })
        );
        assert_eq!(
            refs.annotated_tag("refs/tags/v2").map(|t| t.oid),
            Some(oid(4).to_string())
        );
        assert_eq!(
            refs.annotated_tag("v1"),
            None,
            "a branch, and a lightweight tag"
        );
        assert_eq!(refs.annotated_tag("refs/tags/v1"), None);
        assert_eq!(refs.annotated_tag("main"), None);
    }
}
