//! Sync windows, as Argo CD defines them: a window opens every time its cron schedule fires
//! (in its time zone) and stays open for its duration. While any deny window is open, syncs
//! wait; when allow windows exist, syncs also wait while none of them is open. Deny wins over
//! allow. A window with `manual_sync` lets manual syncs through.
//!
//! Pure: times are passed in. Cron is the five-field form (`minute hour day-of-month month
//! day-of-week`, with lists, ranges, steps and names) plus `@hourly`, `@daily`, `@weekly`,
//! `@monthly` and `@yearly`. It is parsed here rather than with a cron crate because those
//! work on chrono and chrono-tz, which embeds its own time zone database; edgesync uses jiff,
//! which reads the system's (`/usr/share/zoneinfo`).

use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};

use serde::{Deserialize, Serialize};

use super::human;

/// Whether a sync window allows or denies syncs while it is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum WindowKind {
    Allow,
    Deny,
}

/// Argo CD's sync window: open for `duration` from every time `schedule` (cron, five fields)
/// fires in `time_zone`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SyncWindow {
    pub(crate) kind: WindowKind,
    pub(crate) schedule: String,
    #[serde(with = "human")]
    pub(crate) duration: Duration,
    /// An IANA time zone, e.g. `Europe/Berlin`; `UTC` by default.
    #[serde(default = "default_zone")]
    pub(crate) time_zone: String,
    /// Manual syncs (`edgesync sync`) are allowed even when this window blocks.
    #[serde(default)]
    pub(crate) manual_sync: bool,
}

fn default_zone() -> String {
    "UTC".into()
}

/// Windows longer than this are refused: checking one walks its duration minute by minute.
const MAX_DURATION: Duration = Duration::from_secs(31 * 24 * 3600);
/// How far ahead the next opening of an allow window is looked for.
const LOOKAHEAD_MINUTES: i64 = 8 * 24 * 60;

/// A parsed five-field cron schedule: one bit per allowed value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cron {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    days_restricted: bool,
    weekdays_restricted: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// A sync window that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WindowError {
    #[error(
        "schedule {expr:?} must have five fields (minute hour day-of-month month day-of-week)"
    )]
    Fields { expr: String },
    #[error("schedule {expr:?}: {field}: {source}")]
    Field {
        expr: String,
        field: &'static str,
        source: FieldError,
    },
    #[error("time zone {zone:?} is unknown ({message}); use an IANA name such as Europe/Berlin")]
    Zone { zone: String, message: String },
    #[error("duration {} must be more than zero and at most 31 days", humantime::format_duration(*.duration))]
    Duration { duration: std::time::Duration },
}

/// What is wrong with one field of a schedule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FieldError {
    #[error("{0:?} is not a number")]
    NotANumber(String),
    #[error("{value} is outside {min}-{max}")]
    OutOfRange { value: u32, min: u32, max: u32 },
    #[error("bad step in {0:?}")]
    Step(String),
    #[error("range {0:?} runs backwards")]
    Backwards(String),
}

impl Cron {
    pub(crate) fn parse(expr: &str) -> Result<Cron, WindowError> {
        let expanded = match expr.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let [minute, hour, day, month, weekday] = fields[..] else {
            return Err(WindowError::Fields {
                expr: expr.to_string(),
            });
        };
        let err = |field: &'static str, source: FieldError| WindowError::Field {
            expr: expr.to_string(),
            field,
            source,
        };
        let weekdays = field(weekday, 0, 7, &WEEKDAYS).map_err(|e| err("day-of-week", e))?;
        // 7 is Sunday too.
        let weekdays = ((weekdays | (weekdays >> 7)) & 0x7f) as u8;
        Ok(Cron {
            minutes: field(minute, 0, 59, &[]).map_err(|e| err("minute", e))?,
            hours: field(hour, 0, 23, &[]).map_err(|e| err("hour", e))? as u32,
            days: field(day, 1, 31, &[]).map_err(|e| err("day-of-month", e))? as u32,
            months: field(month, 1, 12, &MONTHS).map_err(|e| err("month", e))? as u16,
            weekdays,
            days_restricted: !day.starts_with('*'),
            weekdays_restricted: !weekday.starts_with('*'),
        })
    }

    /// Whether the schedule fires at the minute `t` falls in.
    pub(crate) fn matches(&self, t: &Zoned) -> bool {
        let bit = |set: u64, v: i64| set >> v & 1 == 1;
        let day = bit(u64::from(self.days), i64::from(t.day()));
        let weekday = bit(
            u64::from(self.weekdays),
            i64::from(t.weekday().to_sunday_zero_offset()),
        );
        // As in cron: with both day fields restricted, either may match.
        let day_ok = match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => day || weekday,
            _ => day && weekday,
        };
        bit(self.minutes, i64::from(t.minute()))
            && bit(u64::from(self.hours), i64::from(t.hour()))
            && bit(u64::from(self.months), i64::from(t.month()))
            && day_ok
    }
}

/// One field: `*`, values, names, ranges `a-b` and steps `/n`, comma-separated.
fn field(text: &str, min: u32, max: u32, names: &[&str]) -> Result<u64, FieldError> {
    let value = |v: &str| -> Result<u32, FieldError> {
        if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(v)) {
            return Ok(i as u32 + min);
        }
        let n: u32 = v
            .parse()
            .map_err(|_| FieldError::NotANumber(v.to_string()))?;
        if n < min || n > max {
            return Err(FieldError::OutOfRange { value: n, min, max });
        }
        Ok(n)
    };
    let mut set = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u32>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| FieldError::Step(part.to_string()))?,
            ),
            None => (part, 1),
        };
        let (low, high) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let v = value(range)?;
            // `5/15` runs from 5 to the end of the range.
            (v, if step > 1 { max } else { v })
        };
        if low > high {
            return Err(FieldError::Backwards(range.to_string()));
        }
        let mut v = low;
        while v <= high {
            set |= 1 << v;
            v += step;
        }
    }
    Ok(set)
}

/// A configured window, parsed.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    pub(crate) spec: SyncWindow,
    cron: Cron,
    zone: TimeZone,
}

impl Window {
    pub(crate) fn new(spec: &SyncWindow) -> Result<Window, WindowError> {
        let cron = Cron::parse(&spec.schedule)?;
        // jiff's error is not `Clone`; its words are kept.
        let zone = TimeZone::get(&spec.time_zone).map_err(|e| WindowError::Zone {
            zone: spec.time_zone.clone(),
            message: e.to_string(),
        })?;
        if spec.duration.is_zero() || spec.duration > MAX_DURATION {
            return Err(WindowError::Duration {
                duration: spec.duration,
            });
        }
        Ok(Window {
            spec: spec.clone(),
            cron,
            zone,
        })
    }

    /// When the window, open at `now`, closes; `None` when it is closed.
    pub(crate) fn open_until(&self, now: Timestamp) -> Option<Timestamp> {
        let span = self.spec.duration.as_secs() as i64;
        let now_minute = now.as_second().div_euclid(60) * 60;
        // The latest firing within the last `duration` decides when the window closes.
        let mut t = now_minute;
        while t > now.as_second() - span - 60 {
            let at = Timestamp::from_second(t).ok()?;
            if self.cron.matches(&at.to_zoned(self.zone.clone())) {
                let end = t + span;
                return (end > now.as_second())
                    .then(|| Timestamp::from_second(end).ok())
                    .flatten();
            }
            t -= 60;
        }
        None
    }

    /// The next time the window opens after `now`, looking a week and a day ahead.
    pub(crate) fn next_open(&self, now: Timestamp) -> Option<Timestamp> {
        let start = now.as_second().div_euclid(60) * 60 + 60;
        (0..LOOKAHEAD_MINUTES)
            .map(|i| start + i * 60)
            .filter_map(|t| Timestamp::from_second(t).ok())
            .find(|at| self.cron.matches(&at.to_zoned(self.zone.clone())))
    }

    fn describe(&self) -> String {
        format!(
            "{} window \"{}\" for {} ({})",
            match self.spec.kind {
                WindowKind::Allow => "allow",
                WindowKind::Deny => "deny",
            },
            self.spec.schedule,
            humantime::format_duration(self.spec.duration),
            self.spec.time_zone
        )
    }
}

/// Whether a sync may run now, and if not, why and when to look again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allowed,
    Blocked {
        reason: String,
        /// When the answer may change; `None` if no change is in sight.
        until: Option<Timestamp>,
    },
}

/// Argo CD's rules for `windows` at `now`; `manual` for a sync a person asked for.
pub(crate) fn verdict(windows: &[Window], now: Timestamp, manual: bool) -> Verdict {
    if windows.is_empty() {
        return Verdict::Allowed;
    }
    let open: Vec<(&Window, Timestamp)> = windows
        .iter()
        .filter_map(|w| w.open_until(now).map(|until| (w, until)))
        .collect();
    let denying: Vec<&(&Window, Timestamp)> = open
        .iter()
        .filter(|(w, _)| w.spec.kind == WindowKind::Deny)
        .collect();
    if let Some((w, _)) = denying.first() {
        if manual && denying.iter().all(|(w, _)| w.spec.manual_sync) {
            return Verdict::Allowed;
        }
        // Another deny window may still be open then; the caller simply asks again.
        let until = denying.iter().map(|(_, u)| *u).max();
        return Verdict::Blocked {
            reason: format!("{} is open", w.describe()),
            until,
        };
    }
    let allows: Vec<&Window> = windows
        .iter()
        .filter(|w| w.spec.kind == WindowKind::Allow)
        .collect();
    if allows.is_empty() || open.iter().any(|(w, _)| w.spec.kind == WindowKind::Allow) {
        return Verdict::Allowed;
    }
    if manual && allows.iter().any(|w| w.spec.manual_sync) {
        return Verdict::Allowed;
    }
    Verdict::Blocked {
        reason: format!(
            "outside every allow window ({})",
            allows
                .iter()
                .map(|w| w.describe())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        until: allows.iter().filter_map(|w| w.next_open(now)).min(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn window(kind: WindowKind, schedule: &str, duration: &str, zone: &str) -> Window {
        Window::new(&SyncWindow {
            kind,
            schedule: schedule.into(),
            duration: humantime::parse_duration(duration).unwrap(),
            time_zone: zone.into(),
            manual_sync: false,
        })
        .unwrap()
    }

    #[test]
    fn cron_fields_lists_ranges_steps_and_names() {
        let c = Cron::parse("*/15 9-17 * jan,JUL mon-fri").unwrap();
        let z = |s: &str| s.parse::<Zoned>().unwrap();
        assert!(c.matches(&z("2026-01-05T09:30:00+00:00[UTC]"))); // Monday
        assert!(!c.matches(&z("2026-01-05T09:31:00+00:00[UTC]")));
        assert!(!c.matches(&z("2026-01-04T09:30:00+00:00[UTC]"))); // Sunday
        assert!(!c.matches(&z("2026-02-02T09:30:00+00:00[UTC]")));
        // Both day fields restricted: either matches. 7 is Sunday.
        let c = Cron::parse("0 0 13 * 7").unwrap();
        assert!(c.matches(&z("2026-02-13T00:00:00+00:00[UTC]"))); // a Friday the 13th
        assert!(c.matches(&z("2026-02-15T00:00:00+00:00[UTC]"))); // a Sunday
        assert!(!c.matches(&z("2026-02-14T00:00:00+00:00[UTC]")));
        assert_eq!(
            Cron::parse("@daily").unwrap(),
            Cron::parse("0 0 * * *").unwrap()
        );
        for bad in [
            "* * * *",
            "60 * * * *",
            "* * * * mon-sun-x",
            "5-1 * * * *",
            "*/0 * * * *",
        ] {
            assert!(Cron::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_window_is_open_for_its_duration_in_its_time_zone() {
        // 22:00 in Berlin is 21:00 UTC in winter.
        let w = window(WindowKind::Deny, "0 22 * * *", "1h", "Europe/Berlin");
        assert_eq!(w.open_until(at("2026-01-10T20:59:00Z")), None);
        assert_eq!(
            w.open_until(at("2026-01-10T21:00:00Z")),
            Some(at("2026-01-10T22:00:00Z"))
        );
        assert_eq!(
            w.open_until(at("2026-01-10T21:59:59Z")),
            Some(at("2026-01-10T22:00:00Z"))
        );
        assert_eq!(w.open_until(at("2026-01-10T22:00:00Z")), None);
        assert_eq!(
            w.next_open(at("2026-01-10T22:00:00Z")),
            Some(at("2026-01-11T21:00:00Z"))
        );
    }

    #[test]
    fn deny_wins_allow_gates_and_manual_sync_overrides() {
        let deny = window(WindowKind::Deny, "0 12 * * *", "2h", "UTC");
        let allow = window(WindowKind::Allow, "0 10 * * *", "4h", "UTC");
        let noon = at("2026-03-01T12:30:00Z");
        match verdict(&[allow.clone(), deny.clone()], noon, false) {
            Verdict::Blocked { reason, until } => {
                assert!(reason.contains("deny"), "{reason}");
                assert_eq!(until, Some(at("2026-03-01T14:00:00Z")));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            verdict(
                &[allow.clone(), deny.clone()],
                at("2026-03-01T11:00:00Z"),
                false
            ),
            Verdict::Allowed
        );
        match verdict(
            std::slice::from_ref(&allow),
            at("2026-03-01T15:00:00Z"),
            false,
        ) {
            Verdict::Blocked { until, .. } => assert_eq!(until, Some(at("2026-03-02T10:00:00Z"))),
            other => panic!("{other:?}"),
        }
        let mut manual = deny.spec.clone();
        manual.manual_sync = true;
        let manual = Window::new(&manual).unwrap();
        assert_eq!(
            verdict(std::slice::from_ref(&manual), noon, true),
            Verdict::Allowed
        );
        assert!(matches!(
            verdict(&[manual], noon, false),
            Verdict::Blocked { .. }
        ));
        assert_eq!(verdict(&[], noon, false), Verdict::Allowed);
    }

    #[test]
    fn bad_windows_are_refused_with_the_reason() {
        let spec = |zone: &str, duration: u64| SyncWindow {
            kind: WindowKind::Deny,
            schedule: "0 * * * *".into(),
            duration: Duration::from_secs(duration),
            time_zone: zone.into(),
            manual_sync: false,
        };
        assert!(Window::new(&spec("Mars/Olympus", 60))
            .unwrap_err()
            .to_string()
            .contains("Mars/Olympus"));
        assert!(Window::new(&spec("UTC", 0))
            .unwrap_err()
            .to_string()
            .contains("duration"));
        assert!(Window::new(&spec("UTC", 40 * 24 * 3600)).is_err());
    }
}
