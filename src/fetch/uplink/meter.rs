//! The current rate of one class: bytes per 100 ms slot over the last two seconds; the rate is the
//! sum of the last ten whole slots.

use std::sync::Mutex;
use std::time::Instant;

const SLOTS: usize = 20;
const SLOT_MS: u128 = 100;

pub struct Meter {
    started: Instant,
    inner: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    bytes: [u64; SLOTS],
    /// The slot (100 ms ticks since `started`) the newest bytes went to.
    at: u64,
}

impl Default for Meter {
    fn default() -> Meter {
        Meter {
            started: Instant::now(),
            inner: Mutex::default(),
        }
    }
}

impl Slots {
    /// Moves to slot `tick`, emptying the slots passed over.
    fn advance(&mut self, tick: u64) {
        if tick <= self.at {
            return;
        }
        let gap = (tick - self.at).min(SLOTS as u64);
        for t in 1..=gap {
            self.bytes[((self.at + t) % SLOTS as u64) as usize] = 0;
        }
        self.at = tick;
    }
}

impl Meter {
    fn tick(&self) -> u64 {
        (self.started.elapsed().as_millis() / SLOT_MS) as u64
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add(&self, n: u64) {
        let tick = self.tick();
        let mut s = self.slots();
        s.advance(tick);
        s.bytes[(tick % SLOTS as u64) as usize] += n;
    }

    /// Bytes per second over the last whole second.
    pub fn rate(&self) -> u64 {
        let tick = self.tick();
        let mut s = self.slots();
        s.advance(tick);
        (1..=10u64)
            .filter(|back| *back <= tick)
            .map(|back| s.bytes[((tick - back) % SLOTS as u64) as usize])
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_slots_are_emptied() {
        let mut s = Slots::default();
        s.bytes[3] = 7;
        s.at = 3;
        s.advance(3 + SLOTS as u64);
        assert_eq!(s.bytes.iter().sum::<u64>(), 0);
        s.bytes[5] = 1;
        s.at = 5;
        s.advance(6);
        assert_eq!(s.bytes[5], 1);
    }
}
