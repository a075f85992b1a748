//! When background work may use the uplink: `uplink.windows` in `uplink.timezone` (SPEC 2, SPEC 4).
//! Days and minutes are read in the zone's local time, so a window follows the wall clock across
//! daylight-saving changes.

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

use crate::config::Window;

/// How far ahead the next opening or closing is looked for: a week and a day covers every window.
const HORIZON_MINUTES: i64 = 8 * 24 * 60;

pub struct Schedule {
    windows: Vec<Window>,
    tz: TimeZone,
    /// The zone's name, as configured.
    pub zone: String,
}

impl Schedule {
    /// From the validated config; an unknown zone (cannot happen after validation) is UTC.
    pub fn new(windows: Vec<Window>, zone: &str) -> Schedule {
        Schedule {
            windows,
            tz: TimeZone::get(zone).unwrap_or(TimeZone::UTC),
            zone: zone.to_string(),
        }
    }

    /// No windows: background work may run at any time.
    pub fn always(&self) -> bool {
        self.windows.is_empty()
    }

    /// Whether a window is open at `t`.
    pub fn open_at(&self, t: Timestamp) -> bool {
        if self.windows.is_empty() {
            return true;
        }
        let local = t.to_zoned_datetime(self.tz.clone());
        let weekday = local.weekday().to_monday_zero_offset() as usize;
        let minute = local.hour() as u16 * 60 + local.minute() as u16;
        self.windows.iter().any(|w| w.contains(weekday, minute))
    }

    /// The first minute after `t` at which the windows are `open` (opening: true; closing: false);
    /// None when that does not happen within a week and a day (never, or always open).
    pub fn next_change(&self, t: Timestamp, open: bool) -> Option<Timestamp> {
        if self.windows.is_empty() {
            return None;
        }
        // From the start of t's minute, minute by minute.
        let start = Timestamp::from_second(t.as_second() - t.as_second().rem_euclid(60)).ok()?;
        (1..=HORIZON_MINUTES)
            .filter_map(|m| start.checked_add(SignedDuration::from_mins(m)).ok())
            .find(|at| self.open_at(*at) == open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn windows_are_read_in_the_zone_local_time() {
        let w = vec![Window::parse("Mon-Fri 22:00-06:00").unwrap()];
        let berlin = Schedule::new(w.clone(), "Europe/Berlin");
        // 2026-12-07 is a Monday; Berlin is UTC+1 in December.
        assert!(!berlin.open_at(at("2026-12-07T20:59:00Z")));
        assert!(berlin.open_at(at("2026-12-07T21:00:00Z")));
        assert!(berlin.open_at(at("2026-12-08T04:59:00Z")));
        assert!(!berlin.open_at(at("2026-12-08T05:00:00Z")));
        let utc = Schedule::new(w, "UTC");
        assert!(!utc.open_at(at("2026-12-07T21:00:00Z")));
        assert_eq!(
            berlin.next_change(at("2026-12-07T12:00:30Z"), true),
            Some(at("2026-12-07T21:00:00Z"))
        );
        assert_eq!(
            berlin.next_change(at("2026-12-07T22:00:00Z"), false),
            Some(at("2026-12-08T05:00:00Z"))
        );
        // Friday night's window closes Saturday morning; the next opens Monday night.
        assert_eq!(
            berlin.next_change(at("2026-12-12T06:00:00Z"), true),
            Some(at("2026-12-14T21:00:00Z"))
        );
    }

    #[test]
    fn no_windows_is_always_open() {
        let s = Schedule::new(Vec::new(), "UTC");
        assert!(s.always() && s.open_at(Timestamp::now()));
        assert_eq!(s.next_change(Timestamp::now(), true), None);
    }
}
