//! Durations written like `5s`, `3m`, `1h`, bounded (serde `with` helpers).

use serde::{Deserialize, Deserializer, Serializer};
use std::time::Duration;

/// The longest duration any setting takes. Durations come from Git too (Applications),
/// and the agent adds them to clock readings: bounding them where they are read keeps a
/// `300000000000y` from overflowing an `Instant` anywhere later.
pub(crate) const MAX: Duration = Duration::from_secs(366 * 24 * 3600);

/// A duration that cannot be used; the caller names the key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum DurationError {
    #[error("invalid duration {text:?} ({source}); use e.g. \"30s\", \"3m\"")]
    Invalid {
        text: String,
        source: humantime::DurationError,
    },
    #[error(
        "duration {text:?} is longer than the longest allowed, {}",
        humantime::format_duration(MAX)
    )]
    TooLong { text: String },
}

/// Parses a duration and refuses one over [`MAX`].
pub(crate) fn parse(text: &str) -> Result<Duration, DurationError> {
    let parsed = humantime::parse_duration(text).map_err(|source| DurationError::Invalid {
        text: text.to_string(),
        source,
    })?;
    if parsed > MAX {
        return Err(DurationError::TooLong {
            text: text.to_string(),
        });
    }
    Ok(parsed)
}

pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse(&text).map_err(serde::de::Error::custom)
}

pub(crate) mod option {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(crate) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => super::parse(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}
