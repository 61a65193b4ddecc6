//! How an app is kept in sync, named as Argo CD names it so Application manifests map 1:1:
//! sync options, retry with backoff, ignored differences, sync windows, health timeout and
//! rollback. Pure types and checks; the apply engine reads them.

use std::time::Duration;

use super::validate::Invalid;
use serde::{Deserialize, Serialize};

/// Sync options edgesync understands (Argo CD's `syncPolicy.syncOptions`). Others are refused
/// by the config check so that a typo does not silently change behaviour.
pub(crate) const KNOWN_SYNC_OPTIONS: [&str; 7] = [
    "CreateNamespace",
    "PruneLast",
    "PrunePropagationPolicy",
    "ApplyOutOfSyncOnly",
    "ServerSideApply",
    "Validate",
    "FailOnSharedResource",
];

/// Argo CD's `syncPolicy.retry`: `limit` attempts after the first (-1: unlimited), spaced by
/// an exponential backoff with jitter. Attempts that fail because the API server cannot be
/// reached, or answers 5xx or 429, do not count.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Retry {
    #[serde(default = "default_limit")]
    pub(crate) limit: i64,
    #[serde(default)]
    pub(crate) backoff: Backoff,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            limit: default_limit(),
            backoff: Backoff::default(),
        }
    }
}

fn default_limit() -> i64 {
    5
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Backoff {
    #[serde(default = "default_duration", with = "human")]
    pub(crate) duration: Duration,
    #[serde(default = "default_factor")]
    pub(crate) factor: u32,
    #[serde(default = "default_max_duration", with = "human")]
    pub(crate) max_duration: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            duration: default_duration(),
            factor: default_factor(),
            max_duration: default_max_duration(),
        }
    }
}

fn default_duration() -> Duration {
    Duration::from_secs(5)
}

fn default_factor() -> u32 {
    2
}

fn default_max_duration() -> Duration {
    Duration::from_secs(180)
}

impl Retry {
    /// Whether `failures` counted attempts have used up the limit.
    pub(crate) fn exhausted(&self, failures: u32) -> bool {
        self.limit >= 0 && i64::from(failures) > self.limit
    }

    /// The delays between attempts, with jitter (backon).
    pub(crate) fn delays(&self) -> backon::ExponentialBackoff {
        use backon::BackoffBuilder;
        backon::ExponentialBuilder::default()
            .with_min_delay(self.backoff.duration)
            .with_factor(self.backoff.factor.max(1) as f32)
            .with_max_delay(self.backoff.max_duration)
            .with_jitter()
            .without_max_times()
            .build()
    }
}

/// Argo CD's `ignoreDifferences` entry: for matching objects, these fields are neither
/// compared nor overwritten.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IgnoreDifference {
    #[serde(default)]
    pub(crate) group: String,
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) name: Option<String>,
    #[serde(default)]
    pub(crate) namespace: Option<String>,
    /// RFC 6901 pointers, e.g. `/spec/replicas`.
    #[serde(default)]
    pub(crate) json_pointers: Vec<String>,
    /// Fields owned by these field managers (e.g. `kube-controller-manager` for an HPA's
    /// replicas) are left to them.
    #[serde(default)]
    pub(crate) managed_fields_managers: Vec<String>,
}

impl IgnoreDifference {
    pub(crate) fn matches(
        &self,
        group: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> bool {
        self.group == group
            && self.kind == kind
            && self.name.as_deref().is_none_or(|n| n == name)
            && self
                .namespace
                .as_deref()
                .is_none_or(|n| Some(n) == namespace)
    }
}

pub(crate) use crate::model::window::{SyncWindow, WindowKind};

/// What to do when an app goes Degraded after syncing a new revision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Rollback {
    /// Report it, nothing else (Argo CD's behaviour).
    #[default]
    Off,
    /// Re-apply the last revision that was Healthy, from its persisted render, and mark the
    /// new revision bad until a newer one arrives.
    Auto,
}

/// Checks one `sync_options` entry: `Name=value` with a known name and value.
pub(crate) fn check_sync_option(option: &str) -> Result<(), Invalid> {
    let Some((name, value)) = option.split_once('=') else {
        return Err(Invalid::SyncOptionSyntax(option.to_string()));
    };
    let (name, value) = (name.trim(), value.trim());
    if !KNOWN_SYNC_OPTIONS.contains(&name) {
        return Err(Invalid::UnknownSyncOption {
            name: name.to_string(),
        });
    }
    let ok = match name {
        "PrunePropagationPolicy" => ["foreground", "background", "orphan"].contains(&value),
        _ => ["true", "false"].contains(&value),
    };
    if ok {
        Ok(())
    } else {
        Err(Invalid::SyncOptionValue {
            option: option.to_string(),
            value: value.to_string(),
        })
    }
}

/// The value of sync option `name` in `options`, if set.
pub(crate) fn sync_option<'a>(options: &'a [String], name: &str) -> Option<&'a str> {
    options.iter().find_map(|o| {
        let (n, v) = o.split_once('=')?;
        (n.trim() == name).then_some(v.trim())
    })
}

pub(crate) use crate::model::human;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_defaults_are_argo_cds() {
        let r = Retry::default();
        assert_eq!(r.limit, 5);
        assert_eq!(r.backoff.duration, Duration::from_secs(5));
        assert_eq!(r.backoff.factor, 2);
        assert_eq!(r.backoff.max_duration, Duration::from_secs(180));
        assert!(!r.exhausted(5));
        assert!(r.exhausted(6));
        let unlimited = Retry {
            limit: -1,
            ..Default::default()
        };
        assert!(!unlimited.exhausted(u32::MAX));
    }

    #[test]
    fn backoff_grows_to_its_ceiling_with_jitter() {
        let r = Retry::default();
        let delays: Vec<Duration> = r.delays().take(10).collect();
        assert!(delays[0] >= Duration::from_secs(5) && delays[0] < Duration::from_secs(10));
        // Jitter adds up to one more delay; the ceiling bounds the base.
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(360)));
        assert!(delays[9] >= Duration::from_secs(180));
    }

    #[test]
    fn sync_options_are_checked() {
        assert!(check_sync_option("PruneLast=true").is_ok());
        assert!(check_sync_option("PrunePropagationPolicy=orphan").is_ok());
        assert!(check_sync_option("PrunePropagationPolicy=sideways").is_err());
        assert!(check_sync_option("Prunelast=true").is_err());
        assert!(check_sync_option("PruneLast").is_err());
        let options = vec![
            "PruneLast=true".to_string(),
            " ApplyOutOfSyncOnly = true".into(),
        ];
        assert_eq!(sync_option(&options, "ApplyOutOfSyncOnly"), Some("true"));
        assert_eq!(sync_option(&options, "CreateNamespace"), None);
    }

    #[test]
    fn ignore_differences_match_by_group_kind_and_optional_name_and_namespace() {
        let i = IgnoreDifference {
            group: "apps".into(),
            kind: "Deployment".into(),
            namespace: Some("web".into()),
            ..Default::default()
        };
        assert!(i.matches("apps", "Deployment", Some("web"), "any"));
        assert!(!i.matches("apps", "Deployment", Some("other"), "any"));
        assert!(!i.matches("", "Deployment", Some("web"), "any"));
    }
}
