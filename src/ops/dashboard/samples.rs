//! The dashboard's memory of the last hours: one [`Sample`] of the counters other modules expose every
//! [`PERIOD`], kept in a ring of fixed capacity ([`CAPACITY`]), so that the plots can show how the store
//! and the traffic (served, fetched, and the uplink's use by class) went without any of it touching the
//! disk.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::super::Ops;

/// How often the counters are sampled.
pub const PERIOD: Duration = Duration::from_secs(10);

/// Samples kept: six hours of them. Older ones are forgotten first.
pub const CAPACITY: usize = 6 * 3600 / PERIOD.as_secs() as usize;

/// The counters at one moment. Byte counts are totals since start, so that a rate is the difference of
/// two samples over their distance in time, whatever the spacing.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Body bytes served to clients (from the store and from upstream transfers).
    pub served: u64,
    /// Bytes fetched from upstream.
    pub fetched: u64,
    /// Bytes the store holds.
    pub store_used: u64,
    /// What the store may use (its budget), which moves with the filesystem's free space.
    pub store_budget: u64,
    /// Bytes read from upstream for clients waiting for them (the uplink's foreground class).
    pub uplink_foreground: u64,
    /// Bytes read from upstream for background work (prefetch jobs, background revalidation).
    pub uplink_background: u64,
    /// `uplink.max_rate` at that moment in bytes per second (0: no cap); sampled because
    /// `PUT /v1/admin/uplink` changes it at run time.
    pub uplink_cap: u64,
}

/// A bounded ring of samples, oldest first.
pub struct Samples {
    /// The samples; never longer than `capacity`.
    ring: Mutex<VecDeque<Sample>>,
    /// Fixed at creation: the ring's bound.
    capacity: usize,
}

impl Default for Samples {
    fn default() -> Samples {
        Samples::with_capacity(CAPACITY)
    }
}

impl Samples {
    pub fn with_capacity(capacity: usize) -> Samples {
        Samples {
            ring: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity: capacity.max(1),
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a sample, forgetting the oldest when the ring is full.
    pub fn push(&self, s: Sample) {
        let mut r = self.ring();
        if r.len() == self.capacity {
            r.pop_front();
        }
        r.push_back(s);
    }

    /// The samples kept, oldest first.
    pub fn snapshot(&self) -> Vec<Sample> {
        self.ring().iter().copied().collect()
    }
}

/// Samples `ops`'s counters now and every [`PERIOD`] after, until the task is aborted.
pub async fn run(ops: Arc<Ops>) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // `usage` asks the filesystem for its free space: a system call, kept off the runtime threads.
        let o = ops.clone();
        match tokio::task::spawn_blocking(move || o.sample()).await {
            Ok(s) => ops.samples.push(s),
            Err(e) => tracing::warn!(error = %e, "dashboard: cannot sample the counters"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Sample {
        Sample {
            at_ms: ms,
            ..Sample::default()
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_within_its_capacity() {
        let s = Samples::with_capacity(3);
        for ms in 1..=5 {
            s.push(at(ms));
        }
        let kept: Vec<u64> = s.snapshot().iter().map(|x| x.at_ms).collect();
        assert_eq!(kept, vec![3, 4, 5]);
    }
}
