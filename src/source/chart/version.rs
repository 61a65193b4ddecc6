//! Chart versions chosen as Helm chooses them: an exact version, or a Masterminds semver
//! constraint (`^1.2`, `~1.2.3`, `>=1.0 <2.0`, `1.2.x`, `a || b`), picking the highest match
//! and leaving out pre-releases unless the constraint names one.

/// A version constraint that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("invalid chart version constraint {constraint:?}: {why}{}", .source.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
pub(crate) struct ConstraintError {
    pub(crate) constraint: String,
    pub(crate) why: String,
    pub(crate) source: Option<semver::Error>,
}

/// `constraint` when it names one exact version rather than a range.
pub(super) fn exact_version(constraint: &str) -> Option<&str> {
    let c = constraint.trim();
    let v = c.strip_prefix('v').unwrap_or(c);
    semver::Version::parse(v).ok().map(|_| c)
}

/// The highest of `versions` that `constraint` allows, as Helm picks it. An empty constraint
/// or `*` means the latest release (no pre-releases).
pub(super) fn select_version<'a>(
    versions: impl Iterator<Item = &'a str>,
    constraint: &str,
) -> Result<Option<&'a str>, ConstraintError> {
    let constraint = constraint.trim();
    let versions: Vec<&str> = versions.collect();
    if let Some(exact) = versions.iter().find(|v| **v == constraint) {
        return Ok(Some(exact));
    }
    let reqs = parse_constraint(constraint)?;
    Ok(versions
        .into_iter()
        .filter_map(|v| {
            semver::Version::parse(v.strip_prefix('v').unwrap_or(v))
                .ok()
                .map(|parsed| (parsed, v))
        })
        .filter(|(parsed, _)| reqs.iter().any(|r| r.matches(parsed)))
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, v)| v))
}

/// A Masterminds (Helm) constraint as alternatives of semver requirements. Helm's bare
/// version is exact, where Cargo's is a caret range; comparators may be separated by commas or
/// spaces; `a - b` is an inclusive range.
fn parse_constraint(constraint: &str) -> Result<Vec<semver::VersionReq>, ConstraintError> {
    let invalid = |why: &str| ConstraintError {
        constraint: constraint.to_string(),
        why: why.to_string(),
        source: None,
    };
    let mut alternatives = Vec::new();
    for alternative in constraint.split("||") {
        let mut tokens: Vec<String> = Vec::new();
        let mut operator = String::new();
        for word in alternative
            .split([' ', ',', '\t'])
            .filter(|w| !w.is_empty())
        {
            if word.chars().all(|c| "<>=!~^".contains(c)) {
                operator.push_str(word);
            } else {
                tokens.push(format!("{}{word}", std::mem::take(&mut operator)));
            }
        }
        if !operator.is_empty() {
            return Err(invalid(&format!("{operator:?} is missing its version")));
        }
        let mut comparators = Vec::new();
        let mut i = 0;
        while i < tokens.len() {
            if tokens.get(i + 1).map(String::as_str) == Some("-") {
                let high = tokens
                    .get(i + 2)
                    .ok_or_else(|| invalid("a range needs an upper bound"))?;
                comparators.push(format!(">={}", strip_v(&tokens[i])));
                comparators.push(format!("<={}", strip_v(high)));
                i += 3;
                continue;
            }
            let token = &tokens[i];
            let split = token
                .find(|c: char| !"<>=!~^".contains(c))
                .unwrap_or(token.len());
            let (op, version) = token.split_at(split);
            if op == "!=" {
                return Err(invalid("!= is not supported"));
            }
            let version = strip_v(version);
            let op = if op.is_empty() && semver::Version::parse(version).is_ok() {
                "="
            } else {
                op
            };
            comparators.push(format!("{op}{version}"));
            i += 1;
        }
        let text = if comparators.is_empty() {
            "*".to_string()
        } else {
            comparators.join(", ")
        };
        let req = semver::VersionReq::parse(&text).map_err(|source| ConstraintError {
            source: Some(source),
            ..invalid("not a version range")
        })?;
        alternatives.push(req);
    }
    Ok(alternatives)
}

fn strip_v(version: &str) -> &str {
    version.strip_prefix('v').unwrap_or(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(versions: &[&'static str], constraint: &str) -> Option<&'static str> {
        select_version(versions.iter().copied(), constraint).unwrap()
    }

    #[test]
    fn versions_are_picked_as_helm_picks_them() {
        let v = ["1.0.0", "1.2.0", "1.2.5", "1.3.0-rc.1", "2.0.0", "v2.1.0"];
        assert_eq!(pick(&v, ""), Some("v2.1.0"));
        assert_eq!(pick(&v, "*"), Some("v2.1.0"));
        // A bare version is exact in Helm, not a caret range.
        assert_eq!(pick(&v, "1.2.0"), Some("1.2.0"));
        assert_eq!(pick(&v, "1.2.x"), Some("1.2.5"));
        assert_eq!(pick(&v, "1.2.*"), Some("1.2.5"));
        assert_eq!(pick(&v, "^1.0"), Some("1.2.5"));
        assert_eq!(pick(&v, "~1.2.0"), Some("1.2.5"));
        assert_eq!(pick(&v, ">= 1.0, < 2.0"), Some("1.2.5"));
        assert_eq!(pick(&v, ">=1.0 <1.2"), Some("1.0.0"));
        assert_eq!(pick(&v, "1.0.0 - 1.2.0"), Some("1.2.0"));
        assert_eq!(pick(&v, "^3 || ~1.2"), Some("1.2.5"));
        assert_eq!(pick(&v, ">=1.3.0-rc.0 <1.4"), Some("1.3.0-rc.1"));
        assert_eq!(pick(&v, "2.1.0"), Some("v2.1.0"));
        assert_eq!(pick(&v, "9.9.9"), None);
        assert!(select_version(v.iter().copied(), "!=1.0.0").is_err());
        assert!(select_version(v.iter().copied(), ">=").is_err());
    }
}
