//! Admission control for webhook requests, as pure values: a token bucket for the request
//! rate and a bounded memory of delivery IDs against replays. Time is passed in.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Allows `burst` requests at once and `rate` per second sustained.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    capacity: f64,
    tokens: f64,
    rate: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: f64, burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            capacity: f64::from(burst),
            tokens: f64::from(burst),
            rate,
            last: now,
        }
    }

    /// The tokens there would be at `now`, without taking any.
    pub(crate) fn tokens_at(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * self.rate).min(self.capacity)
    }

    pub(crate) fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Remembers delivery IDs for `window`, at most `max` of them (the oldest are forgotten
/// first, so memory stays bounded under a flood).
#[derive(Debug)]
pub(crate) struct ReplayGuard {
    window: Duration,
    max: usize,
    seen: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

impl ReplayGuard {
    pub(crate) fn new(window: Duration, max: usize) -> ReplayGuard {
        ReplayGuard {
            window,
            max,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Records `id`; false if it was already seen within the window.
    pub(crate) fn first_time(&mut self, id: &str, now: Instant) -> bool {
        while let Some((at, old)) = self.order.front() {
            let expired = now.saturating_duration_since(*at) > self.window;
            if !expired && self.order.len() < self.max {
                break;
            }
            if self.seen.get(old) == Some(at) {
                self.seen.remove(old);
            }
            self.order.pop_front();
        }
        if self.seen.contains_key(id) {
            return false;
        }
        self.seen.insert(id.to_string(), now);
        self.order.push_back((now, id.to_string()));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0, 3, t0);
        assert!((0..3).all(|_| b.try_take(t0)));
        assert!(!b.try_take(t0));
        assert!(b.try_take(t0 + Duration::from_millis(500)));
        assert!(!b.try_take(t0 + Duration::from_millis(500)));
        // Never more than the burst, however long it was idle.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..10).filter(|_| b.try_take(later)).count(), 3);
    }

    #[test]
    fn replays_are_caught_within_the_window() {
        let t0 = Instant::now();
        let mut g = ReplayGuard::new(Duration::from_secs(60), 100);
        assert!(g.first_time("a", t0));
        assert!(!g.first_time("a", t0 + Duration::from_secs(59)));
        assert!(g.first_time("b", t0));
        assert!(g.first_time("a", t0 + Duration::from_secs(61)));
    }

    #[test]
    fn memory_is_bounded() {
        let t0 = Instant::now();
        let mut g = ReplayGuard::new(Duration::from_secs(3600), 10);
        for i in 0..1000 {
            assert!(g.first_time(&i.to_string(), t0));
        }
        assert!(g.seen.len() <= 10 && g.order.len() <= 10);
        assert!(!g.first_time("999", t0));
    }
}
