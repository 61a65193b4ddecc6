//! Git's network transports, registered with libgit2 in place of its own: smart HTTP(S) over
//! ureq and rustls (the TLS stack and CA certificates the rest of edgesync uses), and SSH
//! through the system's OpenSSH client (`ssh`, package `openssh-client`). libgit2 is built
//! without HTTPS and SSH support, so neither OpenSSL nor libssh2 is linked: the binary is
//! 2.5 MiB smaller (docs/BENCHMARKS.md), and HTTP connections are kept alive between fetches.
//!
//! libgit2 calls a transport on the thread that fetches, so the credentials of the repository
//! being fetched travel in a thread-local set by [`scope`] for the duration of the call.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::Duration;

use base64::Engine;
use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream, Transport};
use git2::{Error, ErrorClass, ErrorCode};

use super::{auth, SourceError};
use crate::config::RepositoryConfig;

/// What the transports need of the repository being fetched.
#[derive(Clone, Default)]
struct Credentials {
    userpass: Option<(String, String)>,
    ssh_key: Option<PathBuf>,
    known_hosts: Option<PathBuf>,
}

thread_local! {
    static CURRENT: RefCell<Option<Credentials>> = const { RefCell::new(None) };
}

/// While alive, Git calls on this thread use `repo`'s credentials (read from their files now,
/// so rotated secrets take effect at the next fetch).
pub(crate) struct Scope {
    previous: Option<Credentials>,
}

pub(crate) fn scope(repo: &RepositoryConfig) -> Result<Scope, SourceError> {
    register();
    let credentials = Credentials {
        userpass: auth::userpass(repo)?,
        ssh_key: repo.ssh_key_file.clone(),
        known_hosts: repo.known_hosts_file.clone(),
    };
    let previous = CURRENT.with(|c| c.replace(Some(credentials)));
    Ok(Scope { previous })
}

impl Drop for Scope {
    fn drop(&mut self) {
        CURRENT.with(|c| *c.borrow_mut() = self.previous.take());
    }
}

fn current() -> Credentials {
    CURRENT.with(|c| c.borrow().clone()).unwrap_or_default()
}

/// Registers the transports with libgit2, once per process.
pub(crate) fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: registration writes libgit2's global transport table; it happens once,
        // before this process makes any Git connection (every caller passes through here).
        let result = unsafe {
            git2::transport::register("http", |remote| {
                Transport::smart(remote, true, Http::default())
            })
            .and_then(|()| {
                git2::transport::register("https", |remote| {
                    Transport::smart(remote, true, Http::default())
                })
            })
            .and_then(|()| {
                ["ssh", "ssh+git", "git+ssh"]
                    .into_iter()
                    .try_for_each(|scheme| {
                        git2::transport::register(scheme, |remote| {
                            Transport::smart(remote, false, Ssh::default())
                        })
                    })
            })
        };
        if let Err(e) = result {
            tracing::error!("cannot register the Git transports: {e}");
        }
    });
}

fn refused(code: ErrorCode, message: String) -> Error {
    Error::new(code, ErrorClass::Net, message)
}

fn failed(message: String) -> Error {
    Error::new(ErrorCode::GenericError, ErrorClass::Net, message)
}

// --- smart HTTP -----------------------------------------------------------------------------

/// The system's CA certificates (the `ca-certificates` package), as for MQTT and charts; no
/// bundled roots, which would cost a quarter of a MiB of binary.
pub(crate) fn tls() -> ureq::tls::TlsConfig {
    static ROOTS: OnceLock<ureq::tls::RootCerts> = OnceLock::new();
    let roots = ROOTS
        .get_or_init(|| {
            let certs = rustls_native_certs::load_native_certs()
                .certs
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                .collect();
            ureq::tls::RootCerts::Specific(Arc::new(certs))
        })
        .clone();
    ureq::tls::TlsConfig::builder()
        .root_certs(roots)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build()
}

/// One agent for every Git fetch, so connections to a server are reused.
fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            // Some servers (Azure DevOps, older GitHub Enterprise) only speak the smart
            // protocol to clients that call themselves git.
            .user_agent(concat!(
                "git/2.0 (edgesync/",
                env!("CARGO_PKG_VERSION"),
                ")"
            ))
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
            .tls_config(tls())
            .build()
            .new_agent()
    })
}

/// The smart HTTP transport of one connection: the ref advertisement, then one POST per
/// negotiation round (libgit2's stateless RPC mode).
#[derive(Default)]
struct Http {
    /// The URL the advertisement came from, after redirects, and the `Authorization` the
    /// server accepted: both used for the POSTs that follow.
    session: Mutex<Option<(String, Option<String>)>>,
}

/// `url` without its user part, and the user and password it carried.
fn split_userinfo(url: &str) -> (String, Option<(String, String)>) {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return (url.to_string(), None);
    };
    let authority_end = url[scheme_end..]
        .find('/')
        .map_or(url.len(), |i| scheme_end + i);
    let Some(at) = url[scheme_end..authority_end].rfind('@') else {
        return (url.to_string(), None);
    };
    let userinfo = &url[scheme_end..scheme_end + at];
    let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let stripped = format!("{}{}", &url[..scheme_end], &url[scheme_end + at + 1..]);
    (stripped, Some((percent_decode(user), percent_decode(pass))))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn basic((user, pass): &(String, String)) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

fn http_error(e: ureq::Error) -> Error {
    match e {
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) => {
            refused(ErrorCode::Certificate, format!("TLS: {e}"))
        }
        e => failed(format!("HTTP: {e}")),
    }
}

fn status_error(status: u16, asked_with: bool) -> Error {
    match status {
        401 | 403 if asked_with => refused(
            ErrorCode::Auth,
            "authentication failed: the server rejected the configured credentials".into(),
        ),
        401 => refused(
            ErrorCode::Auth,
            "authentication required: the server asks for credentials and none are configured for this repository".into(),
        ),
        404 => failed("repository not found (HTTP 404)".into()),
        s => failed(format!("unexpected HTTP status {s}")),
    }
}

fn content_type(response: &ureq::http::Response<ureq::Body>) -> &str {
    response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

impl SmartSubtransport for Http {
    fn action(
        &self,
        url: &str,
        action: Service,
    ) -> Result<Box<dyn SmartSubtransportStream>, Error> {
        match action {
            Service::UploadPackLs => {
                let (url, from_url) = split_userinfo(url.trim_end_matches('/'));
                let userpass = from_url.or(current().userpass);
                let target = format!("{url}/info/refs?service=git-upload-pack");
                // Like git, credentials go only to a server that asks for them.
                let mut authorization = None;
                let mut response = agent().get(&target).call().map_err(http_error)?;
                if response.status() == 401 {
                    let Some(userpass) = &userpass else {
                        return Err(status_error(401, false));
                    };
                    let value = basic(userpass);
                    response = agent()
                        .get(&target)
                        .header("Authorization", &value)
                        .call()
                        .map_err(http_error)?;
                    authorization = Some(value);
                }
                let status = response.status().as_u16();
                if status != 200 {
                    return Err(status_error(status, authorization.is_some()));
                }
                if content_type(&response) != "application/x-git-upload-pack-advertisement" {
                    return Err(failed(
                        "the server does not speak Git's smart HTTP protocol (dumb HTTP is not supported)".into(),
                    ));
                }
                let base = {
                    use ureq::ResponseExt;
                    let uri = response.get_uri().to_string();
                    uri.split_once("/info/refs")
                        .map_or(url.clone(), |(base, _)| base.to_string())
                };
                *self.session.lock().map_err(|_| failed("poisoned".into()))? =
                    Some((base, authorization));
                Ok(Box::new(Reply(Box::new(
                    response.into_body().into_reader(),
                ))))
            }
            Service::UploadPack => {
                let session = self
                    .session
                    .lock()
                    .map_err(|_| failed("poisoned".into()))?
                    .clone();
                let (base, authorization) = session
                    .ok_or_else(|| failed("upload-pack before the ref advertisement".into()))?;
                Ok(Box::new(Post {
                    url: format!("{base}/git-upload-pack"),
                    authorization,
                    body: Vec::new(),
                    reply: None,
                }))
            }
            Service::ReceivePackLs | Service::ReceivePack => {
                Err(failed("edgesync never pushes to Git".into()))
            }
        }
    }

    fn close(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// A response body being read.
struct Reply(Box<dyn Read + Send>);

impl Read for Reply {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Reply {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::other(
            "the ref advertisement takes no request body",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One negotiation round: the request is collected, then sent when libgit2 first reads.
struct Post {
    url: String,
    authorization: Option<String>,
    body: Vec<u8>,
    reply: Option<Box<dyn Read + Send>>,
}

impl Write for Post {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.reply.is_some() {
            return Err(io::Error::other("request already sent"));
        }
        self.body.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Post {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.reply.is_none() {
            let mut request = agent()
                .post(&self.url)
                .header("Content-Type", "application/x-git-upload-pack-request")
                .header("Accept", "application/x-git-upload-pack-result");
            if let Some(value) = &self.authorization {
                request = request.header("Authorization", value);
            }
            let response = request
                .send(std::mem::take(&mut self.body))
                .map_err(|e| io::Error::other(format!("HTTP: {e}")))?;
            let status = response.status().as_u16();
            if status != 200 {
                return Err(io::Error::other(
                    status_error(status, self.authorization.is_some())
                        .message()
                        .to_string(),
                ));
            }
            if content_type(&response) != "application/x-git-upload-pack-result" {
                return Err(io::Error::other(
                    "the server answered upload-pack with an unexpected content type",
                ));
            }
            self.reply = Some(Box::new(response.into_body().into_reader()));
        }
        match &mut self.reply {
            Some(reply) => reply.read(buf),
            None => Ok(0),
        }
    }
}

// --- SSH ------------------------------------------------------------------------------------

/// The SSH transport: `ssh` runs `git-upload-pack` on the server, and libgit2 speaks the
/// protocol over its standard input and output (one stream for the whole connection).
#[derive(Default)]
struct Ssh {
    child: Mutex<Option<Child>>,
}

/// Where an SSH URL points: `ssh://[user@]host[:port]/path` or scp-like `[user@]host:path`.
#[derive(Debug, PartialEq)]
struct SshTarget {
    user: String,
    host: String,
    port: Option<String>,
    path: String,
}

fn ssh_target(url: &str) -> Option<SshTarget> {
    let (authority, path) = if let Some((_, rest)) = url.split_once("://") {
        let (authority, path) = rest.split_at(rest.find('/')?);
        // ssh://host/~user/repo is relative to that user's home, as git reads it.
        let path = path
            .strip_prefix("/~")
            .map_or(path.to_string(), |p| format!("~{p}"));
        (authority, path)
    } else {
        let (authority, path) = match url.find("]:") {
            Some(i) if url.contains('[') => (&url[..i + 1], url[i + 2..].to_string()),
            _ => url.split_once(':').map(|(a, p)| (a, p.to_string()))?,
        };
        (authority, path)
    };
    let (user, host_port) = match authority.rsplit_once('@') {
        Some((u, h)) => (u.to_string(), h),
        None => ("git".to_string(), authority),
    };
    let (host, port) = if let Some(rest) = host_port.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else if url.contains("://") {
        match host_port.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    } else {
        (host_port, None)
    };
    let valid = !host.is_empty()
        && !host.starts_with('-')
        && !user.starts_with('-')
        && !path.is_empty()
        && port.is_none_or(|p| p.parse::<u16>().is_ok());
    valid.then(|| SshTarget {
        user,
        host: host.to_string(),
        port: port.map(str::to_string),
        path,
    })
}

/// `s` quoted for the remote shell, as git quotes the repository path.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The error `ssh` reported on standard error, as libgit2's SSH transport would report it.
fn ssh_error(host: &str, stderr: &str) -> Error {
    if stderr.contains("Host key verification failed")
        || stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || stderr.contains("No ED25519 host key is known")
        || stderr.contains("host key for")
    {
        return refused(
            ErrorCode::Certificate,
            format!("SSH host key of {host} does not match known_hosts_file"),
        );
    }
    if stderr.contains("Permission denied") {
        return refused(
            ErrorCode::Auth,
            "authentication failed: the server rejected the configured credentials".into(),
        );
    }
    if stderr.contains("UNPROTECTED PRIVATE KEY FILE") || stderr.contains("bad permissions") {
        return refused(
            ErrorCode::Auth,
            "ssh_key_file can be read by other users, and ssh refuses such a key: make it readable by the agent only (chmod 600)".into(),
        );
    }
    let last = stderr
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with("Warning: Permanently added"))
        .unwrap_or("ssh exited without a reply");
    failed(format!("ssh {host}: {last}"))
}

impl Ssh {
    fn spawn(&self, url: &str) -> Result<SshStream, Error> {
        let target =
            ssh_target(url).ok_or_else(|| failed("not an SSH URL edgesync can use".into()))?;
        let credentials = current();
        let Some(known_hosts) = credentials.known_hosts else {
            return Err(refused(
                ErrorCode::Certificate,
                format!(
                    "refusing SSH host {}: no known_hosts_file configured to verify its host key",
                    target.host
                ),
            ));
        };
        let mut command = Command::new("ssh");
        command
            .args(["-F", "/dev/null", "-T", "-x"])
            .args(["-o", "BatchMode=yes"])
            .args(["-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .args(["-o", "GlobalKnownHostsFile=/dev/null"])
            .args(["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none"])
            .args(["-o", "ConnectTimeout=10"])
            .args([
                "-o",
                "ServerAliveInterval=15",
                "-o",
                "ServerAliveCountMax=4",
            ])
            .args(["-o", "LogLevel=ERROR"]);
        match &credentials.ssh_key {
            Some(key) => command
                .arg("-o")
                .arg(format!("IdentityFile={}", key.display())),
            None => command.args(["-o", "IdentityFile=none"]),
        };
        if let Some(port) = &target.port {
            command.args(["-p", port]);
        }
        command
            .arg("-l")
            .arg(&target.user)
            .arg("--")
            .arg(&target.host)
            .arg(format!("git-upload-pack {}", shell_quote(&target.path)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| {
            failed(format!(
                "cannot run ssh (package openssh-client) for {}: {e}",
                target.host
            ))
        })?;
        let (Some(stdin), Some(mut stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(failed("ssh started without its pipes".into()));
        };
        // Standard error is collected on a thread of its own, so a chatty ssh never blocks.
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = io::Read::take(stderr, 64 * 1024).read_to_string(&mut text);
            text
        });
        // The first bytes are read now: a refusal (host key, credentials) ends ssh before
        // the server says anything, and is reported as the error it is.
        let mut first = vec![0; 4096];
        let n = stdout.read(&mut first).unwrap_or(0);
        if n == 0 {
            drop(stdin);
            let _ = child.wait();
            let stderr = errors.join().unwrap_or_default();
            return Err(ssh_error(&target.host, &stderr));
        }
        first.truncate(n);
        *self.child.lock().map_err(|_| failed("poisoned".into()))? = Some(child);
        Ok(SshStream {
            first: io::Cursor::new(first),
            stdout,
            stdin,
        })
    }
}

impl SmartSubtransport for Ssh {
    fn action(
        &self,
        url: &str,
        action: Service,
    ) -> Result<Box<dyn SmartSubtransportStream>, Error> {
        match action {
            // libgit2 reuses this stream for the fetch itself (UploadPack).
            Service::UploadPackLs | Service::UploadPack => Ok(Box::new(self.spawn(url)?)),
            Service::ReceivePackLs | Service::ReceivePack => {
                Err(failed("edgesync never pushes to Git".into()))
            }
        }
    }

    fn close(&self) -> Result<(), Error> {
        if let Ok(mut child) = self.child.lock() {
            if let Some(mut child) = child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        Ok(())
    }
}

impl Drop for Ssh {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

struct SshStream {
    first: io::Cursor<Vec<u8>>,
    stdout: ChildStdout,
    stdin: ChildStdin,
}

impl Read for SshStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.first.read(buf)? {
            0 => self.stdout.read(buf),
            n => Ok(n),
        }
    }
}

impl Write for SshStream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.stdin.write(data)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stdin.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_urls_are_read_like_git() {
        let t = ssh_target("ssh://deploy@git.example.com:2222/srv/fleet.git").unwrap();
        assert_eq!(
            t,
            SshTarget {
                user: "deploy".into(),
                host: "git.example.com".into(),
                port: Some("2222".into()),
                path: "/srv/fleet.git".into()
            }
        );
        let t = ssh_target("git@github.com:org/fleet.git").unwrap();
        assert_eq!((t.user.as_str(), t.host.as_str()), ("git", "github.com"));
        assert_eq!((t.port, t.path.as_str()), (None, "org/fleet.git"));
        let t = ssh_target("ssh://host/~alice/fleet").unwrap();
        assert_eq!(t.path, "~alice/fleet");
        let t = ssh_target("ssh://[::1]:22/r").unwrap();
        assert_eq!((t.host.as_str(), t.port.as_deref()), ("::1", Some("22")));
        // What ssh would read as an option is refused.
        assert!(ssh_target("ssh://-oProxyCommand=x/r").is_none());
        assert!(ssh_target("-oProxyCommand=x:r").is_none());
        assert!(ssh_target("ssh://host:notaport/r").is_none());
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn credentials_in_a_url_are_split_off() {
        let (url, userpass) = split_userinfo("https://bob:s%40cret@git.example.com/r.git");
        assert_eq!(url, "https://git.example.com/r.git");
        assert_eq!(userpass, Some(("bob".into(), "s@cret".into())));
        let (url, userpass) = split_userinfo("https://git.example.com/a@b");
        assert_eq!(url, "https://git.example.com/a@b");
        assert_eq!(userpass, None);
    }

    #[test]
    fn ssh_refusals_are_classified() {
        let e = ssh_error("h", "Host key verification failed.\r\n");
        assert_eq!(e.code(), ErrorCode::Certificate);
        let e = ssh_error("h", "git@h: Permission denied (publickey).\n");
        assert_eq!(e.code(), ErrorCode::Auth);
        let e = ssh_error("h", "ssh: connect to host h port 22: Connection refused\n");
        assert!(
            e.message().contains("Connection refused"),
            "{}",
            e.message()
        );
    }
}
