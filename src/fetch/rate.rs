//! The pace of an upstream body against `upstream.min_rate` (SPEC 2).

/// `upstream.min_rate`: bytes per second averaged over a minute, or over the idle timeout when that
/// is shorter. A slower upstream is a broken transfer (resumed or failed), so that a trickle cannot
/// hold a reservation and its waiting clients for ever.
pub(super) struct Rate {
    min: u64,
    window: std::time::Duration,
    since: std::time::Instant,
    bytes: u64,
}

impl Rate {
    pub(super) fn new(min: u64, idle: std::time::Duration) -> Rate {
        Rate {
            min,
            window: idle.clamp(
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(60),
            ),
            since: std::time::Instant::now(),
            bytes: 0,
        }
    }

    pub(super) fn arrived(&mut self, n: u64) -> Result<(), String> {
        self.bytes += n;
        let secs = self.since.elapsed().as_secs_f64();
        if secs < self.window.as_secs_f64() {
            return Ok(());
        }
        let per_sec = self.bytes as f64 / secs;
        if self.min > 0 && per_sec < self.min as f64 {
            return Err(format!(
                "upstream sent {per_sec:.0} bytes/s, under upstream.min_rate ({} bytes/s)",
                self.min
            ));
        }
        self.since = std::time::Instant::now();
        self.bytes = 0;
        Ok(())
    }

    pub(super) fn paused(&mut self, d: std::time::Duration) {
        self.since += d;
    }
}
