//! Credentials and host-key checks for libgit2: token or username/password over HTTP(S), key
//! files over SSH, and SSH host keys verified against a known_hosts file. Secrets are read when
//! a fetch starts, so rotated credential files take effect without a restart, and they never
//! appear in errors.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

use base64::Engine;
use git2::{CertificateCheckStatus, Cred, CredentialType, RemoteCallbacks};

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

struct Secrets {
    userpass: Option<(String, String)>,
    ssh_key: Option<std::path::PathBuf>,
    known_hosts: Option<String>,
}

impl Secrets {
    fn load(repo: &RepositoryConfig) -> Result<Secrets, SourceError> {
        let url = &repo.url;
        let userpass = userpass(repo)?;
        let known_hosts = match &repo.known_hosts_file {
            Some(path) => Some(read_secret(url, path)?),
            None => None,
        };
        Ok(Secrets {
            userpass,
            ssh_key: repo.ssh_key_file.clone(),
            known_hosts,
        })
    }
}

/// Why our callbacks refused a connection. libgit2 replaces a callback's message with a
/// generic one ("invalid or unknown remote ssh hostkey"), so the reason is kept here.
#[derive(Clone, Default)]
pub(crate) struct Refusal(Rc<RefCell<Option<String>>>);

impl Refusal {
    fn refuse(&self, reason: String) -> git2::Error {
        let error = git2::Error::from_str(&reason);
        *self.0.borrow_mut() = Some(reason);
        error
    }

    /// The message for `e`: our own reason when a callback refused, libgit2's otherwise.
    pub(crate) fn message(&self, e: &git2::Error) -> String {
        self.0
            .borrow_mut()
            .take()
            .unwrap_or_else(|| e.message().to_string())
    }
}

/// Callbacks for one connection to `repo`. `progress` sees every transfer update and may
/// cancel the transfer by returning false.
pub(crate) fn callbacks<'a>(
    repo: &RepositoryConfig,
    refusal: &Refusal,
    mut progress: impl FnMut(&git2::Progress<'_>) -> bool + 'a,
) -> Result<RemoteCallbacks<'a>, SourceError> {
    let secrets = Secrets::load(repo)?;
    let mut cb = RemoteCallbacks::new();
    let credentials_refusal = refusal.clone();
    let host_refusal = refusal.clone();
    let mut attempts = 0;
    let Secrets {
        userpass,
        ssh_key,
        known_hosts,
    } = secrets;
    cb.credentials(move |_url, username_from_url, allowed| {
        // libgit2 asks again after a rejection; answering twice would loop forever.
        attempts += 1;
        if attempts > 1 {
            return Err(credentials_refusal.refuse(
                "authentication failed: the server rejected the configured credentials".into(),
            ));
        }
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            if let Some((user, pass)) = &userpass {
                return Cred::userpass_plaintext(user, pass);
            }
        }
        if allowed.contains(CredentialType::SSH_KEY) {
            if let Some(key) = &ssh_key {
                return Cred::ssh_key(username_from_url.unwrap_or("git"), None, key, None);
            }
        }
        if allowed.contains(CredentialType::USERNAME) {
            return Cred::username(username_from_url.unwrap_or("git"));
        }
        Err(credentials_refusal.refuse(
            "authentication required: the server asks for credentials and none are configured for this repository".into(),
        ))
    });
    cb.certificate_check(move |cert, host| {
        let Some(hostkey) = cert.as_hostkey() else {
            // TLS: libgit2 has already verified the chain against the system roots.
            return Ok(CertificateCheckStatus::CertificatePassthrough);
        };
        let (Some(key), Some(known)) = (hostkey.hostkey(), &known_hosts) else {
            return Err(host_refusal.refuse(format!(
                "refusing SSH host {host}: no known_hosts_file configured to verify its host key"
            )));
        };
        if known_hosts_match(known, host, key) {
            Ok(CertificateCheckStatus::CertificateOk)
        } else {
            Err(host_refusal.refuse(format!(
                "SSH host key of {host} does not match known_hosts_file"
            )))
        }
    });
    cb.transfer_progress(move |p| progress(&p));
    Ok(cb)
}

/// Whether `known_hosts` (OpenSSH format, plain host names) lists `key` for `host`.
/// Entries for `[host]:port` match the host on any port.
pub(crate) fn known_hosts_match(known_hosts: &str, host: &str, key: &[u8]) -> bool {
    known_hosts.lines().any(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return false;
        }
        let mut fields = line.split_whitespace();
        let mut hosts = fields.next().unwrap_or_default();
        if hosts.starts_with('@') {
            // @cert-authority / @revoked markers are not supported: never match them.
            return false;
        }
        let _key_type = fields.next();
        let Some(encoded) = fields.next() else {
            return false;
        };
        if hosts.is_empty() {
            hosts = "-";
        }
        let host_matches = hosts.split(',').any(|h| {
            let h = h
                .strip_prefix('[')
                .map_or(h, |rest| rest.split(']').next().unwrap_or(rest));
            h.eq_ignore_ascii_case(host)
        });
        host_matches
            && base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .is_ok_and(|decoded| decoded == key)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_hosts_matching() {
        let key = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20abcdefghijklmnopqrstuvwxyz012345";
        let encoded = base64::engine::general_purpose::STANDARD.encode(key);
        let file = format!(
            "# comment\ngit.example.com,10.0.0.5 ssh-ed25519 {encoded}\n[127.0.0.1]:2222 ssh-ed25519 {encoded}\n"
        );
        assert!(known_hosts_match(&file, "git.example.com", key));
        assert!(known_hosts_match(&file, "10.0.0.5", key));
        assert!(known_hosts_match(&file, "127.0.0.1", key));
        assert!(!known_hosts_match(&file, "evil.example.com", key));
        assert!(!known_hosts_match(&file, "git.example.com", b"other key"));
    }
}
