//! One token bucket of the uplink budget, over `governor`'s GCRA limiter. Tokens are counted in
//! kibibytes (`CELL`): a limiter of one token per byte would round its refill interval to whole
//! nanoseconds, several percent off at a hundred megabytes a second. The bytes of a take that do not
//! make a whole cell are carried to the next take, so nothing is lost to rounding.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Bytes per token.
const CELL: u64 = 1024;
/// The bucket holds this much of a second's rate: after a pause, at most this much passes at once.
/// Small against the 10 s over which SPEC 4 measures the aggregate (1 %).
const BURST: Duration = Duration::from_millis(100);

pub struct Bucket {
    limiter: DefaultDirectRateLimiter,
    /// Takers wait their turn in arrival order (tokio's mutex is fair): the limiter alone lets
    /// whoever looks first after a refill win, and could starve one transfer for seconds.
    turn: tokio::sync::Mutex<()>,
    /// Tokens the bucket holds when full.
    burst: u32,
    /// Bytes taken that did not yet make a whole token.
    carry: AtomicU64,
}

impl Bucket {
    /// A bucket of `rate` bytes per second; None for 0 (no cap).
    pub fn new(rate: u64) -> Option<Bucket> {
        if rate == 0 {
            return None;
        }
        let cells_per_sec = (rate as f64 / CELL as f64).max(1e-3);
        let period = Duration::from_nanos((1e9 / cells_per_sec).round().max(1.0) as u64);
        let burst = ((cells_per_sec * BURST.as_secs_f64()).ceil() as u32).clamp(16, 1 << 20);
        let quota = Quota::with_period(period)?.allow_burst(NonZeroU32::new(burst)?);
        Some(Bucket {
            limiter: RateLimiter::direct(quota),
            turn: tokio::sync::Mutex::new(()),
            burst,
            carry: AtomicU64::new(0),
        })
    }

    /// Whole tokens for `n` more bytes, the remainder carried. One atomic update: two takers adding
    /// at once must not both count the other's bytes (one would pay twice, the next not at all).
    fn cells(&self, n: u64) -> u64 {
        let before = self
            .carry
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some((c + n) % CELL)
            })
            .unwrap_or_else(|c| c);
        (before + n) / CELL
    }

    /// Waits until `n` bytes may pass.
    pub async fn take(&self, n: u64) {
        let mut cells = self.cells(n);
        if cells == 0 {
            return;
        }
        let _turn = self.turn.lock().await;
        while cells > 0 {
            let step = cells.min(self.burst as u64) as u32;
            if let Some(step_nz) = NonZeroU32::new(step) {
                // A step never exceeds the burst, so the limiter can always grant it.
                let _ = self.limiter.until_n_ready(step_nz).await;
            }
            cells -= step as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bucket_holds_its_rate() {
        let b = Bucket::new(4 << 20).unwrap();
        let started = std::time::Instant::now();
        // 2 MiB in 64 KiB steps at 4 MiB/s: ~0.5 s, less the burst held at the start.
        for _ in 0..32 {
            b.take(64 << 10).await;
        }
        let secs = started.elapsed().as_secs_f64();
        assert!((0.35..0.7).contains(&secs), "{secs}");
        assert!(Bucket::new(0).is_none());
    }

    #[test]
    fn bytes_that_make_no_whole_cell_are_carried() {
        let b = Bucket::new(1 << 20).unwrap();
        assert_eq!(b.cells(1000), 0);
        assert_eq!(b.cells(1000), 1);
        assert_eq!(b.cells(3 * 1024), 3);
        assert_eq!(b.carry.load(Ordering::Relaxed), 2000 - 1024);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn takers_share_the_rate_in_turn() {
        let b = std::sync::Arc::new(Bucket::new(8 << 20).unwrap());
        // The burst is spent first: whoever runs first takes it without waiting, before the
        // others are even scheduled; what is tested is the turn after that.
        b.take(b.burst as u64 * CELL).await;
        let gate = std::sync::Arc::new(tokio::sync::Barrier::new(4));
        let started = std::time::Instant::now();
        let takers: Vec<_> = (0..4)
            .map(|_| {
                let (b, gate) = (b.clone(), gate.clone());
                tokio::spawn(async move {
                    gate.wait().await;
                    for _ in 0..32 {
                        b.take(64 << 10).await;
                    }
                    started.elapsed().as_secs_f64()
                })
            })
            .collect();
        let mut ends = Vec::new();
        for t in takers {
            ends.push(t.await.unwrap());
        }
        // 8 MiB at 8 MiB/s: about 1 s, each taker to the end.
        let (first, last) = (
            ends.iter().cloned().fold(f64::MAX, f64::min),
            ends.iter().cloned().fold(0.0, f64::max),
        );
        assert!((0.9..1.2).contains(&last), "{last}");
        assert!(
            last - first < 0.1,
            "takers ended {first} and {last}: not in turn"
        );
    }
}
