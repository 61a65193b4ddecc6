//! Kubernetes label selectors in their string form, for deciding which apps a node runs:
//! `site in (plant-7,plant-8),arch=arm64,!decommissioned`. Pure.
//!
//! Supported, as in `kubectl get -l`: `key`, `!key`, `key=value`, `key==value`, `key!=value`,
//! `key in (a,b)` and `key notin (a,b)`, joined by commas (all must hold).

use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed selector; the empty selector matches every node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid label selector {selector:?}: {reason}")]
pub(crate) struct SelectorError {
    pub(crate) selector: String,
    pub(crate) reason: String,
}

fn valid_key(key: &str) -> bool {
    // An optional DNS-subdomain prefix, then a name of alphanumerics, '-', '_' and '.'.
    let name = key.rsplit_once('/').map_or(key, |(_, n)| n);
    !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Splits on commas outside parentheses.
fn terms(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out
}

impl Selector {
    pub(crate) fn parse(text: &str) -> Result<Selector, SelectorError> {
        let err = |reason: String| SelectorError {
            selector: text.to_string(),
            reason,
        };
        let mut requirements = Vec::new();
        if text.trim().is_empty() {
            return Ok(Selector { requirements });
        }
        for term in terms(text) {
            let term = term.trim();
            let requirement = if let Some(key) = term.strip_prefix('!') {
                Requirement::NotExists(key.trim().to_string())
            } else if let Some((key, value)) = term.split_once("!=") {
                Requirement::NotIn(key.trim().into(), vec![value.trim().into()])
            } else if let Some((key, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                Requirement::In(key.trim().into(), vec![value.trim().into()])
            } else if let Some((key, set, negated)) = set_term(term) {
                if negated {
                    Requirement::NotIn(key, set)
                } else {
                    Requirement::In(key, set)
                }
            } else {
                Requirement::Exists(term.to_string())
            };
            let (key, values): (&str, &[String]) = match &requirement {
                Requirement::Exists(k) | Requirement::NotExists(k) => (k, &[]),
                Requirement::In(k, v) | Requirement::NotIn(k, v) => (k, v),
            };
            if !valid_key(key) {
                return Err(err(format!("{key:?} is not a valid label key")));
            }
            if let Some(bad) = values.iter().find(|v| !valid_value(v)) {
                return Err(err(format!("{bad:?} is not a valid label value")));
            }
            requirements.push(requirement);
        }
        Ok(Selector { requirements })
    }

    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
            Requirement::In(k, values) => labels.get(k).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(k, values) => labels.get(k).is_none_or(|v| !values.contains(v)),
        })
    }
}

/// `key in (a,b)` or `key notin (a,b)`.
fn set_term(term: &str) -> Option<(String, Vec<String>, bool)> {
    let open = term.find('(')?;
    let inner = term[open + 1..].strip_suffix(')')?;
    let head = term[..open].trim();
    let (key, negated) = if let Some(k) = head.strip_suffix(" notin") {
        (k, true)
    } else {
        (head.strip_suffix(" in")?, false)
    };
    let values = inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect::<Vec<_>>();
    (!values.is_empty()).then(|| (key.trim().to_string(), values, negated))
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|r| match r {
                Requirement::Exists(k) => k.clone(),
                Requirement::NotExists(k) => format!("!{k}"),
                Requirement::In(k, v) if v.len() == 1 => format!("{k}={}", v[0]),
                Requirement::In(k, v) => format!("{k} in ({})", v.join(",")),
                Requirement::NotIn(k, v) if v.len() == 1 => format!("{k}!={}", v[0]),
                Requirement::NotIn(k, v) => format!("{k} notin ({})", v.join(",")),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_issue_example() {
        let s = Selector::parse("site in (plant-7,plant-8),arch=arm64,!decommissioned").unwrap();
        assert!(s.matches(&labels(&[("site", "plant-7"), ("arch", "arm64")])));
        assert!(!s.matches(&labels(&[("site", "plant-9"), ("arch", "arm64")])));
        assert!(!s.matches(&labels(&[("site", "plant-8"), ("arch", "amd64")])));
        assert!(!s.matches(&labels(&[
            ("site", "plant-8"),
            ("arch", "arm64"),
            ("decommissioned", "")
        ])));
        assert_eq!(
            s.to_string(),
            "site in (plant-7,plant-8),arch=arm64,!decommissioned"
        );
    }

    #[test]
    fn every_operator() {
        let l = labels(&[("tier", "edge"), ("kubernetes.io/arch", "arm64")]);
        let m = |s: &str| Selector::parse(s).unwrap().matches(&l);
        assert!(m(""));
        assert!(m("tier"));
        assert!(m("tier==edge"));
        assert!(m("tier!=core"));
        assert!(m("missing!=x"), "!= holds when the label is absent");
        assert!(m("kubernetes.io/arch in (arm64, arm)"));
        assert!(m("tier notin (core,cloud)"));
        assert!(!m("tier notin (edge)"));
        assert!(!m("missing"));
        assert!(!m("missing in (a)"));
    }

    #[test]
    fn bad_selectors_are_named() {
        for bad in ["site in (", "bad key=x", "a=b c", "-a=b", "a in ()"] {
            let err = Selector::parse(bad);
            assert!(err.is_err(), "{bad} parsed as {err:?}");
        }
        assert!(Selector::parse("a=b c")
            .unwrap_err()
            .to_string()
            .contains("a=b c"));
    }
}
