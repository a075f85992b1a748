//! How fast a fill's bytes arrive: bytes per second over the last few seconds, so that a range far
//! ahead of the fill can be told from one the fill will soon reach (SPEC 4, "Resume").

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The span the estimate is taken over.
const SPAN: Duration = Duration::from_secs(3);
/// At most one sample per this interval (the deque stays small).
const STEP: Duration = Duration::from_millis(100);
/// A measurement over less than this is not trusted while a saved rate is known.
const SETTLED: Duration = Duration::from_secs(1);
/// A measurement over less than this is no estimate at all.
const SHORTEST: Duration = Duration::from_millis(250);

/// How far ahead of a fill whose pace is not known yet a range still waits for it.
const UNPACED: u64 = 4 << 20;

/// Bytes received, sampled over time.
pub(super) struct Pace {
    /// (when, bytes received in total by then), oldest first; the first is at or before the span.
    samples: VecDeque<(Instant, u64)>,
    total: u64,
    /// The rate a fill resumed after a restart was receiving at (bytes/s; 0 = unknown).
    seed: u64,
}

impl Pace {
    pub(super) fn new() -> Pace {
        Pace::starting(Instant::now())
    }

    fn starting(at: Instant) -> Pace {
        Pace {
            samples: VecDeque::from([(at, 0)]),
            total: 0,
            seed: 0,
        }
    }

    /// A rate known from before (a partial kept across a restart) stands until a measurement settles.
    pub(super) fn seed(&mut self, per_sec: u64) {
        self.seed = per_sec;
    }

    pub(super) fn arrived(&mut self, n: u64) {
        self.arrived_at(n, Instant::now());
    }

    fn arrived_at(&mut self, n: u64, now: Instant) {
        self.total = self.total.saturating_add(n);
        // The first sample is the start, never moved; later ones are at least STEP apart.
        let several = self.samples.len() > 1;
        match self.samples.back_mut() {
            Some(last) if several && now.saturating_duration_since(last.0) < STEP => {
                last.1 = self.total;
            }
            _ => self.samples.push_back((now, self.total)),
        }
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|s| now.saturating_duration_since(s.0) >= SPAN)
        {
            self.samples.pop_front();
        }
    }

    /// Bytes per second at `now`, or None when nothing is known yet. A fill that stalls slows down:
    /// the span runs to `now`, not to the last byte.
    pub(super) fn per_sec(&self, now: Instant) -> Option<f64> {
        let &(since, base) = self.samples.front()?;
        let span = now.saturating_duration_since(since);
        if span < SETTLED && self.seed > 0 {
            return Some(self.seed as f64);
        }
        if span < SHORTEST {
            return None;
        }
        Some(self.total.saturating_sub(base) as f64 / span.as_secs_f64())
    }

    /// Whether a fill at `written` has reached `offset`, or will at this pace within `within`. With no
    /// pace known yet, only an offset a little ahead (`UNPACED`) counts as reached.
    pub(super) fn reaches(&self, written: u64, offset: u64, within: Duration) -> bool {
        let ahead = offset.saturating_sub(written);
        if ahead == 0 {
            return true;
        }
        match self.per_sec(Instant::now()) {
            Some(r) => r * within.as_secs_f64() >= ahead as f64,
            None => ahead <= UNPACED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_the_recent_rate() {
        let t0 = Instant::now();
        let mut p = Pace::starting(t0);
        assert_eq!(p.per_sec(t0 + Duration::from_millis(100)), None);
        // 1 MB/s for 10 s, then 100 KB/s: the estimate follows within the span.
        for i in 1..=100 {
            p.arrived_at(100_000, t0 + Duration::from_millis(100 * i));
        }
        let r = p.per_sec(t0 + Duration::from_secs(10)).unwrap();
        assert!((900_000.0..1_100_000.0).contains(&r), "{r}");
        for i in 101..=200 {
            p.arrived_at(10_000, t0 + Duration::from_millis(100 * i));
        }
        let r = p.per_sec(t0 + Duration::from_secs(20)).unwrap();
        assert!((80_000.0..130_000.0).contains(&r), "{r}");
        assert!(p.samples.len() <= 40, "{}", p.samples.len());
        // A stall brings it down.
        let r = p.per_sec(t0 + Duration::from_secs(40)).unwrap();
        assert!(r < 20_000.0, "{r}");
    }

    #[test]
    fn a_seed_stands_until_a_measurement_settles() {
        let t0 = Instant::now();
        let mut p = Pace::starting(t0);
        p.seed(5_000_000);
        assert_eq!(p.per_sec(t0), Some(5_000_000.0));
        p.arrived_at(2_000_000, t0 + Duration::from_secs(2));
        assert_eq!(p.per_sec(t0 + Duration::from_secs(2)), Some(1_000_000.0));
    }

    #[test]
    fn unpaced_fills_reach_only_a_little_ahead() {
        let p = Pace::new();
        let s = Duration::from_secs(2);
        assert!(p.reaches(10 << 20, 5 << 20, s));
        assert!(p.reaches(0, 4 << 20, s));
        assert!(!p.reaches(0, 5 << 20, s));
        let mut p = Pace::new();
        p.seed(1 << 20);
        assert!(p.reaches(0, 2 << 20, s));
        assert!(!p.reaches(0, 3 << 20, s));
    }
}
