//! What each Git host sends: how a request is signed, where its delivery ID and event type
//! are, and how a push names its repository and branch.

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::trigger::{ChangeMessage, Event, Source};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Provider {
    GitHub,
    GitLab,
    Gitea,
    Bitbucket,
    Generic,
}

/// Why a verified request's body is not usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadRequest(pub(crate) String);

/// What a verified request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A push: sync what tracks it.
    Push(Event),
    /// A ping or an event we do not act on; answered 200.
    Ignored(String),
}

impl Provider {
    pub(crate) fn from_path(name: &str) -> Option<Provider> {
        Some(match name {
            "github" => Provider::GitHub,
            "gitlab" => Provider::GitLab,
            "gitea" => Provider::Gitea,
            "bitbucket" => Provider::Bitbucket,
            "generic" => Provider::Generic,
            _ => return None,
        })
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Provider::GitHub => "github",
            Provider::GitLab => "gitlab",
            Provider::Gitea => "gitea",
            Provider::Bitbucket => "bitbucket",
            Provider::Generic => "generic",
        }
    }

    /// Checks the request's signature (HMAC-SHA256 over the raw body, compared in constant
    /// time) or, for GitLab, its token. `/generic` signs `"<timestamp>.<body>"` with the
    /// Unix time in `X-Edgesync-Timestamp`, which must be within [`GENERIC_SKEW`] of `now`:
    /// a captured request cannot be replayed once the replay memory has forgotten it.
    /// The error says what is wrong with the signature.
    pub(crate) fn verify(
        self,
        headers: &HeaderMap,
        body: &[u8],
        secret: &[u8],
        now: u64,
    ) -> Result<(), &'static str> {
        if self == Provider::GitLab {
            let token = header(headers, "x-gitlab-token").ok_or("missing X-Gitlab-Token")?;
            return if constant_time_eq(token.as_bytes(), secret) {
                Ok(())
            } else {
                Err("wrong X-Gitlab-Token")
            };
        }
        let (names, prefix): (&[&str], &str) = match self {
            Provider::GitHub => (&["x-hub-signature-256"], "sha256="),
            Provider::Gitea => (&["x-gitea-signature", "x-gogs-signature"], ""),
            Provider::Bitbucket => (&["x-hub-signature"], "sha256="),
            _ => (&["x-edgesync-signature"], "sha256="),
        };
        let signature = names
            .iter()
            .find_map(|n| header(headers, n))
            .ok_or("missing signature header")?;
        let hex_sig = signature
            .strip_prefix(prefix)
            .ok_or("signature is not HMAC-SHA256")?;
        let expected = hex::decode(hex_sig).map_err(|_| "signature is not hex")?;
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| "unusable secret")?;
        if self == Provider::Generic {
            let stamp =
                header(headers, "x-edgesync-timestamp").ok_or("missing X-Edgesync-Timestamp")?;
            let at: u64 = stamp
                .parse()
                .map_err(|_| "X-Edgesync-Timestamp is not Unix seconds")?;
            if now.abs_diff(at) > GENERIC_SKEW.as_secs() {
                return Err("X-Edgesync-Timestamp is more than 5 minutes away from now");
            }
            mac.update(stamp.as_bytes());
            mac.update(b".");
        }
        mac.update(body);
        mac.verify_slice(&expected)
            .map_err(|_| "signature does not match")
    }

    /// The delivery ID used against replays.
    pub(crate) fn delivery_id(self, headers: &HeaderMap) -> Option<&str> {
        let names: &[&str] = match self {
            Provider::GitHub => &["x-github-delivery"],
            Provider::GitLab => &["x-gitlab-event-uuid", "x-gitlab-webhook-uuid"],
            Provider::Gitea => &["x-gitea-delivery", "x-gogs-delivery"],
            Provider::Bitbucket => &["x-request-id"],
            Provider::Generic => &["x-edgesync-delivery"],
        };
        names
            .iter()
            .find_map(|n| header(headers, n))
            .filter(|id| !id.is_empty() && id.len() <= 200)
    }

    /// Interprets a verified request.
    pub(crate) fn parse(self, headers: &HeaderMap, body: &[u8]) -> Result<Parsed, BadRequest> {
        let bad = BadRequest;
        let event_type = match self {
            Provider::GitHub => header(headers, "x-github-event"),
            Provider::GitLab => header(headers, "x-gitlab-event"),
            Provider::Gitea => {
                header(headers, "x-gitea-event").or_else(|| header(headers, "x-gogs-event"))
            }
            Provider::Bitbucket => header(headers, "x-event-key"),
            Provider::Generic => Some("push"),
        }
        .unwrap_or_default();
        let is_push = match self {
            Provider::GitLab => matches!(event_type, "Push Hook" | "Tag Push Hook"),
            Provider::Bitbucket => event_type == "repo:refs_changed",
            _ => event_type == "push",
        };
        if !is_push {
            return Ok(Parsed::Ignored(format!(
                "event {event_type:?} needs no sync"
            )));
        }
        let source = Source::Webhook(self.label());
        if self == Provider::Generic {
            let message = ChangeMessage::parse(body).map_err(|e| bad(e.to_string()))?;
            return Ok(Parsed::Push(message.into_event(source, false)));
        }
        let json: Value =
            serde_json::from_slice(body).map_err(|e| bad(format!("body is not JSON: {e}")))?;
        let (urls, git_ref) = match self {
            Provider::GitLab => (
                strings(
                    &json,
                    &[
                        "/project/git_http_url",
                        "/project/git_ssh_url",
                        "/project/web_url",
                        "/repository/git_http_url",
                        "/repository/git_ssh_url",
                    ],
                ),
                str_at(&json, "/ref"),
            ),
            Provider::Bitbucket => {
                let mut urls = Vec::new();
                for list in ["/repository/links/clone", "/repository/links/self"] {
                    for link in json
                        .pointer(list)
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        urls.extend(link.get("href").and_then(Value::as_str).map(str::to_string));
                    }
                }
                let git_ref = str_at(&json, "/changes/0/ref/id")
                    .or_else(|| str_at(&json, "/changes/0/refId"));
                (urls, git_ref)
            }
            _ => (
                strings(
                    &json,
                    &[
                        "/repository/clone_url",
                        "/repository/ssh_url",
                        "/repository/html_url",
                        "/repository/git_url",
                    ],
                ),
                str_at(&json, "/ref"),
            ),
        };
        if urls.is_empty() {
            return Err(bad("push names no repository URL".into()));
        }
        // Tags cannot be tracked as branches; every app of the repository is checked.
        let branch = git_ref
            .as_deref()
            .and_then(|r| r.strip_prefix("refs/heads/"))
            .map(str::to_string);
        Ok(Parsed::Push(Event {
            source,
            repos: urls,
            branch,
            apps: Vec::new(),
            directed: false,
        }))
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn str_at(json: &Value, pointer: &str) -> Option<String> {
    json.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn strings(json: &Value, pointers: &[&str]) -> Vec<String> {
    pointers.iter().filter_map(|p| str_at(json, p)).collect()
}

/// Equality whose time depends only on the lengths, not on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How far `X-Edgesync-Timestamp` may be from the receiver's clock.
pub(crate) const GENERIC_SKEW: std::time::Duration = std::time::Duration::from_secs(300);

/// The `/generic` signature of `body` sent at `timestamp` (Unix seconds).
#[cfg(test)]
pub(crate) fn sign_generic(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    sign(secret, &signed)
}

/// HMAC-SHA256 of `body` under `secret`, hex-encoded: what senders put in signature headers.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const SECRET: &[u8] = b"It's a Secret to Everybody";
    const BODY: &[u8] = b"Hello, World!";

    #[test]
    fn github_signature_matches_the_documented_example() {
        // The example from GitHub's "Validating webhook deliveries" documentation.
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(format!("sha256={}", sign(SECRET, BODY)), sig);
        let h = headers(&[("x-hub-signature-256", sig)]);
        assert_eq!(Provider::GitHub.verify(&h, BODY, SECRET, 0), Ok(()));
        assert!(Provider::GitHub
            .verify(&h, b"Hello, World?", SECRET, 0)
            .is_err());
        assert!(Provider::GitHub
            .verify(&HeaderMap::new(), BODY, SECRET, 0)
            .is_err());
    }

    #[test]
    fn each_provider_reads_its_own_header() {
        let hex = sign(SECRET, BODY);
        let ok = |p: Provider, h: HeaderMap| p.verify(&h, BODY, SECRET, 1_000_000).is_ok();
        assert!(ok(Provider::Gitea, headers(&[("x-gitea-signature", &hex)])));
        assert!(ok(Provider::Gitea, headers(&[("x-gogs-signature", &hex)])));
        assert!(ok(
            Provider::Bitbucket,
            headers(&[("x-hub-signature", &format!("sha256={hex}"))])
        ));
        // /generic signs the timestamp too, and it must be recent.
        let stamped = format!("sha256={}", sign_generic(SECRET, 1_000_000, BODY));
        assert!(ok(
            Provider::Generic,
            headers(&[
                ("x-edgesync-signature", &stamped),
                ("x-edgesync-timestamp", "1000000")
            ])
        ));
        assert!(!ok(
            Provider::Generic,
            headers(&[("x-edgesync-signature", &format!("sha256={hex}"))])
        ));
        assert!(!ok(
            Provider::Generic,
            headers(&[
                ("x-edgesync-signature", &stamped),
                ("x-edgesync-timestamp", "1000001")
            ])
        ));
        let old = format!("sha256={}", sign_generic(SECRET, 999_000, BODY));
        assert!(!ok(
            Provider::Generic,
            headers(&[
                ("x-edgesync-signature", &old),
                ("x-edgesync-timestamp", "999000")
            ])
        ));
        let secret_text = std::str::from_utf8(SECRET).unwrap();
        assert!(ok(
            Provider::GitLab,
            headers(&[("x-gitlab-token", secret_text)])
        ));
        assert!(!ok(
            Provider::GitLab,
            headers(&[("x-gitlab-token", "wrong")])
        ));
        // A GitHub-style header does not satisfy Gitea, and vice versa.
        assert!(!ok(
            Provider::Gitea,
            headers(&[("x-hub-signature-256", &format!("sha256={hex}"))])
        ));
        assert!(!ok(
            Provider::GitHub,
            headers(&[("x-gitea-signature", &hex)])
        ));
    }

    #[test]
    fn pushes_name_repository_and_branch() {
        let gh = br#"{"ref":"refs/heads/main","repository":{"clone_url":"https://github.com/o/r.git","ssh_url":"git@github.com:o/r.git"}}"#;
        let Parsed::Push(e) = Provider::GitHub
            .parse(&headers(&[("x-github-event", "push")]), gh)
            .unwrap()
        else {
            panic!("not a push");
        };
        assert_eq!(
            e.repos,
            ["https://github.com/o/r.git", "git@github.com:o/r.git"]
        );
        assert_eq!(e.branch.as_deref(), Some("main"));

        let gl =
            br#"{"ref":"refs/heads/dev","project":{"git_http_url":"https://gitlab.com/g/r.git"}}"#;
        let Parsed::Push(e) = Provider::GitLab
            .parse(&headers(&[("x-gitlab-event", "Push Hook")]), gl)
            .unwrap()
        else {
            panic!("not a push");
        };
        assert_eq!(e.branch.as_deref(), Some("dev"));

        let bb = br#"{"changes":[{"ref":{"id":"refs/heads/main"}}],"repository":{"links":{"clone":[{"href":"ssh://git@bb:7999/p/r.git"},{"href":"https://bb/scm/p/r.git"}]}}}"#;
        let Parsed::Push(e) = Provider::Bitbucket
            .parse(&headers(&[("x-event-key", "repo:refs_changed")]), bb)
            .unwrap()
        else {
            panic!("not a push");
        };
        assert_eq!(e.repos.len(), 2);

        let ping = Provider::GitHub
            .parse(&headers(&[("x-github-event", "ping")]), b"{}")
            .unwrap();
        assert!(matches!(ping, Parsed::Ignored(_)));
        assert!(Provider::GitHub
            .parse(&headers(&[("x-github-event", "push")]), b"{}")
            .is_err());
        assert!(Provider::GitHub
            .parse(&headers(&[("x-github-event", "push")]), b"\xff")
            .is_err());
    }
}
