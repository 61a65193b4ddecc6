//! Errors as one line: an error's own message, then each cause its message does not already
//! carry. The crate's errors put their cause's words into their own message (so `%e` in a log
//! line is enough) and keep the cause as `source` too; printing the whole chain would say
//! everything twice.

use std::error::Error;

/// `e` and the causes its message does not already say, joined by `: `.
pub(crate) fn chain(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read {path}: {source}")]
    struct Said {
        path: String,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot start")]
    struct Unsaid(#[source] Said);

    #[test]
    fn each_cause_is_said_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let said = Said {
            path: "/x".into(),
            source: io(),
        };
        assert_eq!(chain(&said), "cannot read /x: no such file");
        let outer = Unsaid(Said {
            path: "/x".into(),
            source: io(),
        });
        assert_eq!(chain(&outer), "cannot start: cannot read /x: no such file");
    }
}
