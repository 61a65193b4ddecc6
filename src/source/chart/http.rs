//! A small blocking HTTP client (ureq) for one chart repository: basic credentials only
//! towards the repository's own origin, the registry token exchange (`WWW-Authenticate:
//! Bearer`) for OCI, bounded bodies, the system's CA certificates.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;

use super::{ChartError, MAX_SMALL_BYTES};
use crate::config::RepositoryConfig;
use crate::model::url::is_oci;
use crate::source::{auth, redact, SourceError};

/// Resolves an index URL against the repository URL, as Helm does for relative ones.
pub(super) fn absolute_url(repo_url: &str, url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else if let Some(path) = url.strip_prefix('/') {
        format!("{}/{path}", origin(repo_url))
    } else {
        format!("{}/{url}", repo_url.trim_end_matches('/'))
    }
}

/// Whether `url` is at exactly `origin` (`scheme://host[:port]`, as [`origin`] gives it):
/// the same scheme, host and port, with no user part.
fn same_origin(url: &str, origin: &str) -> bool {
    let Some(rest) = url.get(origin.len()..) else {
        return false;
    };
    url.get(..origin.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(origin))
        && (rest.is_empty() || rest.starts_with(['/', '?', '#']))
        && !origin.contains('@')
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let start = url.find("://").map(|i| i + 3).unwrap_or(0);
    let end = url[start..]
        .find('/')
        .map(|i| start + i)
        .unwrap_or(url.len());
    &url[..end]
}

/// What a GET returned.
pub(super) struct Reply {
    pub(crate) body: Vec<u8>,
    /// The next page, from a `Link: <...>; rel="next"` header.
    pub(crate) link_next: Option<String>,
}

/// A small HTTP client for one repository: basic credentials only towards the repository's own
/// origin, and the registry token exchange (`WWW-Authenticate: Bearer`) for OCI.
pub(super) struct Http {
    agent: ureq::Agent,
    url: String,
    origin: String,
    userpass: Option<(String, String)>,
    bearer: Option<String>,
}

impl Http {
    pub(crate) fn new(repo: &RepositoryConfig) -> Result<Http, SourceError> {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .timeout_global(Some(Duration::from_secs(600)))
            .user_agent(concat!("edgesync/", env!("CARGO_PKG_VERSION")))
            .tls_config(crate::source::transport::tls())
            .build()
            .new_agent();
        let origin = if is_oci(&repo.url) {
            super::oci::location(repo)?.0
        } else {
            origin(&repo.url).to_string()
        };
        Ok(Http {
            agent,
            url: repo.url.clone(),
            origin,
            userpass: auth::userpass(repo)?,
            bearer: None,
        })
    }

    pub(crate) fn err(&self, source: ChartError) -> SourceError {
        SourceError::Chart {
            url: redact(&self.url),
            source,
        }
    }

    fn basic(&self) -> Option<String> {
        self.userpass.as_ref().map(|(user, pass)| {
            let pair = format!("{user}:{pass}");
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        })
    }

    fn send(
        &self,
        url: &str,
        accept: Option<&str>,
        authorization: Option<&str>,
    ) -> Result<ureq::http::Response<ureq::Body>, SourceError> {
        let mut request = self.agent.get(url);
        if let Some(accept) = accept {
            request = request.header("Accept", accept);
        }
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        // ureq's errors name the URL, which may not carry credentials: these never do.
        request
            .call()
            .map_err(|e| self.err(ChartError::transport(url, e)))
    }

    /// GETs `url`, authenticating as the server asks, and reads at most `limit` bytes.
    pub(crate) fn get(
        &mut self,
        url: &str,
        accept: Option<&str>,
        limit: u64,
    ) -> Result<Reply, SourceError> {
        // The exact origin (scheme, host, port): `https://charts.example.com.evil.net` and
        // `https://charts.example.com@evil.net` are somebody else's.
        let ours = same_origin(url, &self.origin);
        let credentials = |http: &Http| {
            if !ours {
                None
            } else if let Some(token) = &http.bearer {
                Some(format!("Bearer {token}"))
            } else {
                http.basic()
            }
        };
        let mut response = self.send(url, accept, credentials(self).as_deref())?;
        if response.status() == 401 && ours {
            let challenge = response
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            if let Some(params) = challenge.strip_prefix("Bearer ") {
                self.bearer = Some(self.token(params)?);
                response = self.send(url, accept, credentials(self).as_deref())?;
            }
        }
        let status = response.status().as_u16();
        if status != 200 {
            return Err(self.err(ChartError::Status {
                url: redact(url),
                status,
            }));
        }
        let link_next = response
            .headers()
            .get("link")
            .and_then(|v| v.to_str().ok())
            .and_then(next_link);
        let body = response
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(|e| self.err(ChartError::transport(url, e)))?;
        Ok(Reply { body, link_next })
    }

    /// The registry token exchange: the realm, with the service and scope it asked for.
    fn token(&self, params: &str) -> Result<String, SourceError> {
        let params = challenge_params(params);
        let realm = params.get("realm").ok_or_else(|| {
            self.err(ChartError::Unusable(
                "the registry's Bearer challenge names no realm".into(),
            ))
        })?;
        let mut query = Vec::new();
        for key in ["service", "scope"] {
            if let Some(value) = params.get(key) {
                query.push(format!("{key}={}", percent_encode(value)));
            }
        }
        let url = if query.is_empty() {
            realm.clone()
        } else {
            format!("{realm}?{}", query.join("&"))
        };
        // The repository's credentials go to its own origin only: a token service on another
        // host (which the registry's answer names, so anyone answering for it could) is asked
        // for an anonymous token.
        let basic = if same_origin(realm, &self.origin) {
            self.basic()
        } else {
            if self.userpass.is_some() {
                tracing::warn!(realm = %redact(realm), registry = %self.origin,
                    "the registry's token service is on another host; asking it without the repository's credentials");
            }
            None
        };
        let response = self.send(&url, Some("application/json"), basic.as_deref())?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(self.err(ChartError::Status {
                url: redact(realm),
                status,
            }));
        }
        #[derive(Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let mut response = response;
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_SMALL_BYTES)
            .read_to_vec()
            .map_err(|e| self.err(ChartError::transport(realm, e)))?;
        let token: Token = serde_json::from_slice(&body)
            .map_err(|e| self.err(ChartError::unreadable("the registry's token answer", e)))?;
        token.token.or(token.access_token).ok_or_else(|| {
            self.err(ChartError::Unusable(
                "the registry's token answer holds no token".into(),
            ))
        })
    }
}

/// `key="value"` pairs of an authentication challenge.
fn challenge_params(params: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = params.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.insert(key, value.to_string());
        rest = remaining.trim_start_matches([',', ' ']);
    }
    out
}

fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The target of `rel="next"` in a Link header.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            target
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_to_the_exact_origin_only() {
        let o = "https://charts.example.com";
        assert!(same_origin("https://charts.example.com/index.yaml", o));
        assert!(same_origin("https://charts.example.com", o));
        assert!(same_origin("HTTPS://Charts.Example.com/x", o));
        assert!(!same_origin(
            "https://charts.example.com.evil.net/index.yaml",
            o
        ));
        assert!(!same_origin(
            "https://charts.example.com:8443/index.yaml",
            o
        ));
        assert!(!same_origin("https://charts.example.com@evil.net/x", o));
        assert!(!same_origin("http://charts.example.com/index.yaml", o));
        assert!(!same_origin("https://auth.example.com/token", o));
    }

    #[test]
    fn index_urls_resolve_like_helm() {
        let repo = "https://charts.example.com/stable";
        assert_eq!(
            absolute_url(repo, "web-1.0.0.tgz"),
            "https://charts.example.com/stable/web-1.0.0.tgz"
        );
        assert_eq!(
            absolute_url(repo, "/dl/web-1.0.0.tgz"),
            "https://charts.example.com/dl/web-1.0.0.tgz"
        );
        assert_eq!(
            absolute_url(repo, "https://cdn.example.net/web.tgz"),
            "https://cdn.example.net/web.tgz"
        );
    }

    #[test]
    fn registry_challenges_and_links_are_read() {
        let p = challenge_params(
            r#"realm="https://auth.example.com/token",service="registry.example.com",scope="repository:charts/web:pull""#,
        );
        assert_eq!(p["realm"], "https://auth.example.com/token");
        assert_eq!(p["scope"], "repository:charts/web:pull");
        assert_eq!(
            next_link(r#"</v2/charts/web/tags/list?n=2&last=b>; rel="next""#).as_deref(),
            Some("/v2/charts/web/tags/list?n=2&last=b")
        );
        assert_eq!(
            percent_encode("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }
}
