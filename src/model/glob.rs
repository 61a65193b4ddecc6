//! Argo CD's glob patterns (sourceRepos, destinations, sync windows' applications, directory
//! include and exclude).

/// `*` matches any run of characters (`/` included), `?` exactly one. Linear in the text for
/// each star (the greedy match with one backtrack point), so a pattern from Git such as
/// `*a*a*a*a*b` cannot make it take exponential time.
pub(crate) fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it has consumed up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(c) if *c == '?' || *c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                // Let the last star take one more character, and try again after it.
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn stars_and_question_marks() {
        assert!(glob("dictamesh-*", "dictamesh-dev"));
        assert!(!glob("dictamesh-*", "other"));
        assert!(glob("*", ""));
        assert!(glob("*", "anything/at/all"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "ac"));
        assert!(glob(
            "https://github.com/org/*",
            "https://github.com/org/repo.git"
        ));
        assert!(glob("*a*b*c", "xxaxxbxxc"));
        assert!(!glob("*a*b*c", "xxaxxcxxb"));
        assert!(glob("**", "x"));
        assert!(!glob("", "x"));
        assert!(glob("", ""));
    }

    #[test]
    fn a_hostile_pattern_takes_linear_time() {
        let pattern = format!("{}b", "*a".repeat(30));
        let text = "a".repeat(5000);
        let started = std::time::Instant::now();
        assert!(!glob(&pattern, &text));
        // Exponential backtracking would not finish in a lifetime; this takes milliseconds.
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}
