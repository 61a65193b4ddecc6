//! Credentials for Git and chart repositories: a token, or a username and password, read from
//! their files when a fetch starts, so rotated credential files take effect without a restart.
//! They never appear in errors. (SSH keys and host keys are handed to `ssh`:
//! [`super::transport`].)

use std::path::Path;

use super::SourceError;
use crate::config::RepositoryConfig;

/// Username sent with a bare token. GitHub requires a non-empty one; GitLab, Gitea and
/// Bitbucket accept any.
const TOKEN_USERNAME: &str = "x-access-token";

fn read_secret(url: &str, path: &Path) -> Result<String, SourceError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| SourceError::Credentials {
            url: url.to_string(),
            path: path.to_path_buf(),
            source,
        })
}

/// The username and password (or token) configured for `repo`, read from their files now.
pub(crate) fn userpass(repo: &RepositoryConfig) -> Result<Option<(String, String)>, SourceError> {
    let url = &repo.url;
    Ok(match (&repo.token_file, &repo.password_file) {
        (Some(token), _) => Some((
            repo.username
                .clone()
                .unwrap_or_else(|| TOKEN_USERNAME.into()),
            read_secret(url, token)?,
        )),
        (None, Some(password)) => Some((
            repo.username.clone().unwrap_or_default(),
            read_secret(url, password)?,
        )),
        (None, None) => None,
    })
}
