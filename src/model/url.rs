//! Repository URLs: commit SHAs, OCI references, and redaction of credentials in any text.

/// True for a full 40-character hexadecimal commit SHA.
pub(crate) fn is_commit_sha(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `url` with any password or token in its user part replaced, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    redact_text(url)
}

/// `text` with the user part of every URL in it redacted: a password (`user:***@`), and for
/// HTTP(S) a user part alone too (`https://***@host`: a token is often put there). An SSH
/// user name (`ssh://git@host`) is not a secret and stays.
pub(crate) fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(sep) = rest.find("://") {
        // After the last character that cannot be part of a scheme (which may be several
        // bytes long: the scheme starts after all of it).
        let scheme_start = rest[..sep]
            .char_indices()
            .rev()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-')))
            .map_or(0, |(i, c)| i + c.len_utf8());
        let scheme = &rest[scheme_start..sep];
        let after = &rest[sep + 3..];
        let authority_end = after
            .find(|c: char| {
                c == '/'
                    || c == '?'
                    || c == '#'
                    || c.is_whitespace()
                    || matches!(c, '"' | '\'' | '<' | '>' | '`' | ')')
            })
            .unwrap_or(after.len());
        out.push_str(&rest[..sep + 3]);
        let authority = &after[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                let user_info = &authority[..at];
                match user_info.split_once(':') {
                    Some((user, _secret)) => {
                        out.push_str(user);
                        out.push_str(":***");
                    }
                    None if scheme.eq_ignore_ascii_case("http")
                        || scheme.eq_ignore_ascii_case("https") =>
                    {
                        out.push_str("***")
                    }
                    None => out.push_str(user_info),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &after[authority_end..];
    }
    out.push_str(rest);
    out
}

/// True for an OCI registry URL (`oci://host/path`).
pub(crate) fn is_oci(url: &str) -> bool {
    url.starts_with("oci://")
}

/// A broker URL that cannot be used (shown without its password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BrokerUrlError {
    #[error("{url:?} must start with mqtt:// or mqtts://")]
    Scheme { url: String },
    #[error("{url:?} has an invalid port: {source}")]
    Port {
        url: String,
        source: std::num::ParseIntError,
    },
    #[error("{url:?} has no valid host")]
    Host { url: String },
}

/// Host, port and whether TLS is used, from `mqtt://host[:port]` or `mqtts://host[:port]`.
pub(crate) fn parse_broker_url(url: &str) -> Result<(String, u16, bool), BrokerUrlError> {
    let shown = || redact(url);
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err(BrokerUrlError::Scheme { url: shown() });
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') => (
            host,
            port.parse::<u16>().map_err(|source| BrokerUrlError::Port {
                url: shown(),
                source,
            })?,
        ),
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_matches(|c| c == '[' || c == ']');
    if host.is_empty() || host.contains('/') {
        return Err(BrokerUrlError::Host { url: shown() });
    }
    Ok((host.to_string(), port, tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multibyte_character_before_the_scheme_separator_is_kept_whole() {
        // Found by the config fuzzer: a byte-order mark inside `mqtts://`.
        assert_eq!(redact("mqtts\u{feff}://:28:6"), "mqtts\u{feff}://:28:6");
        assert_eq!(redact("é://u:p@h"), "é://u:***@h");
        assert!(parse_broker_url("mqtts\u{feff}://:28:6").is_err());
    }

    #[test]
    fn credentials_in_text_are_redacted() {
        assert_eq!(
            redact("https://ghp_TOKEN@github.com/org/repo.git"),
            "https://***@github.com/org/repo.git"
        );
        assert_eq!(
            redact("ssh://git@github.com/org/repo.git"),
            "ssh://git@github.com/org/repo.git"
        );
        assert_eq!(
            redact_text(
                "cannot fetch 'https://bot:pw@h/x.git': 401; also http://tok@h2 and mqtts://u:p@b:8883"
            ),
            "cannot fetch 'https://bot:***@h/x.git': 401; also http://***@h2 and mqtts://u:***@b:8883"
        );
        assert_eq!(redact_text("no urls here: a@b"), "no urls here: a@b");
        assert_eq!(redact_text("://@"), "://@");
        assert_eq!(redact_text("x://"), "x://");
    }

    #[test]
    fn credentials_in_urls_are_redacted() {
        assert_eq!(
            redact("https://bot:s3cret@git.example.com/fleet.git"),
            "https://bot:***@git.example.com/fleet.git"
        );
        assert_eq!(
            redact("https://git.example.com/a@b.git"),
            "https://git.example.com/a@b.git"
        );
        assert_eq!(
            redact("git@github.com:org/repo.git"),
            "git@github.com:org/repo.git"
        );
    }
}
