//! Source stage: fetches Git repositories into the cache under `state_dir/git` and produces
//! immutable [`Snapshot`]s, one directory per commit; and pulls Helm charts from chart
//! repositories and OCI registries into `state_dir/charts` ([`chart`]).
//!
//! All Git I/O is blocking (libgit2); callers run it on a blocking thread.

mod auth;
pub(crate) mod chart;
mod git;
mod packs;
pub(crate) mod sealed;
pub(crate) mod transport;

use std::path::PathBuf;

pub(crate) use auth::userpass as credentials;
pub(crate) use chart::{ChartError, ChartIndex, ChartSource};
pub(crate) use git::{GitSource, RemoteRefs, TagRef};

#[derive(Debug, thiserror::Error)]
pub(crate) enum SourceError {
    /// `message` says what failed, with libgit2's message; `source` is libgit2's error,
    /// when one caused it.
    #[error("{url}: {message}")]
    Git {
        url: String,
        message: String,
        source: Option<git2::Error>,
    },
    /// The server refused us (credentials, certificate, host key): trying again without a
    /// change on the node or the server cannot help, so it is not a transient failure.
    #[error("{url}: {message}")]
    Refused {
        url: String,
        message: String,
        source: git2::Error,
    },
    #[error("{url}: revision {revision:?} not found on the remote")]
    RevisionNotFound { url: String, revision: String },
    #[error("{url}: cannot read credential file {path}: {source}")]
    Credentials {
        url: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{url}: {source}")]
    Chart { url: String, source: ChartError },
    #[error("{url}: cache {path}: {source}")]
    Cache {
        url: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl SourceError {
    pub(crate) fn metric_label(&self) -> crate::metrics::ErrorKind {
        use crate::metrics::ErrorKind;
        match self {
            SourceError::Git { .. } => ErrorKind::Git,
            SourceError::Refused { .. } => ErrorKind::GitRefused,
            SourceError::RevisionNotFound { .. } => ErrorKind::GitRevisionNotFound,
            SourceError::Credentials { .. } => ErrorKind::GitCredentials,
            SourceError::Cache { .. } => ErrorKind::GitCache,
            SourceError::Chart { .. } => ErrorKind::Chart,
        }
    }
}

/// One commit of one repository, checked out into a directory that never changes: it is
/// created under a temporary name and renamed into place, and never written again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) repo: String,
    /// Full commit SHA.
    pub(crate) revision: String,
    pub(crate) root: PathBuf,
    /// Whether objects had to be downloaded for it (false: already in the cache).
    pub(crate) fetched: bool,
}

pub(crate) use crate::model::url::{is_commit_sha, redact};
