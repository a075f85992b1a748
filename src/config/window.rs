//! An `uplink.windows` entry (SPEC 2): `Mon-Fri 22:00-06:00`, `Sat,Sun 00:00-24:00`, `Mon 08:00-09:30`,
//! or a time range alone (`22:00-06:00`: every day). Days are English three-letter names in any case;
//! a day range may wrap (`Fri-Mon`). A window whose end is not after its start crosses midnight: it
//! opens on the days named and closes the next morning.

/// Minutes in a day.
const DAY: u16 = 24 * 60;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// Days the window opens on, Monday first.
    days: [bool; 7],
    /// Minutes after midnight, local time: opens at `start`, closes at `end` (on the next day when
    /// `end <= start`).
    start: u16,
    end: u16,
}

const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn day(s: &str) -> Result<usize, String> {
    let l = s.trim().to_ascii_lowercase();
    NAMES
        .iter()
        .position(|n| l == *n || (l.len() > 3 && n.starts_with(&l[..3]) && is_full_name(&l)))
        .ok_or_else(|| format!("`{s}` is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun)"))
}

fn is_full_name(l: &str) -> bool {
    [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ]
    .contains(&l)
}

fn minute(s: &str) -> Result<u16, String> {
    let bad = || format!("`{s}` is not a time of day (HH:MM, 00:00 to 24:00)");
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m >= 60 || h > 24 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

fn days(spec: &str) -> Result<[bool; 7], String> {
    let mut out = [false; 7];
    for part in spec.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    out[d] = true;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => out[day(part)?] = true,
        }
    }
    Ok(out)
}

impl Window {
    pub fn parse(s: &str) -> Result<Window, String> {
        let t = s.trim();
        let (days, times) = match t.rsplit_once(char::is_whitespace) {
            Some((d, times)) => (days(d.trim())?, times),
            None => ([true; 7], t),
        };
        let (a, b) = times
            .split_once('-')
            .filter(|_| times.contains(':'))
            .ok_or_else(|| {
                format!("`{s}` is not a window (e.g. \"Mon-Fri 22:00-06:00\", \"22:00-06:00\")")
            })?;
        let (start, end) = (minute(a)?, minute(b)?);
        if start == DAY {
            return Err(format!("`{s}`: a window cannot open at 24:00"));
        }
        Ok(Window { days, start, end })
    }

    /// Whether the window is open at local `minute` (after midnight) of `weekday` (0 = Monday).
    pub fn contains(&self, weekday: usize, minute: u16) -> bool {
        let today = self.days[weekday % 7];
        let yesterday = self.days[(weekday + 6) % 7];
        if self.start < self.end {
            today && (self.start..self.end).contains(&minute)
        } else {
            // Crosses midnight (or, with start == end, runs a whole day from `start`).
            (today && minute >= self.start) || (yesterday && minute < self.end)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        let w = Window::parse("Mon-Fri 22:00-06:00").unwrap();
        assert!(w.contains(0, 22 * 60));
        assert!(w.contains(1, 5 * 60 + 59), "Tuesday morning, from Monday");
        assert!(!w.contains(0, 5 * 60), "Monday morning belongs to Sunday");
        assert!(w.contains(5, 60), "Saturday morning, from Friday");
        assert!(!w.contains(5, 22 * 60));
        let all = Window::parse("Sat,Sun 00:00-24:00").unwrap();
        assert!(all.contains(6, 0) && all.contains(6, DAY - 1) && !all.contains(0, 0));
        let wrap = Window::parse("fri-mon 08:00-09:00").unwrap();
        assert!(wrap.contains(6, 8 * 60) && wrap.contains(0, 8 * 60) && !wrap.contains(1, 8 * 60));
        let daily = Window::parse("12:00-13:00").unwrap();
        assert!((0..7).all(|d| daily.contains(d, 12 * 60 + 30)));
        assert!(Window::parse("Monday 01:00-02:00").unwrap().contains(0, 90));
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        for (bad, says) in [
            ("Mon-Fri", "not a window"),
            ("Xyz 01:00-02:00", "`Xyz` is not a day"),
            ("Mon 25:00-02:00", "not a time of day"),
            ("Mon 01:60-02:00", "not a time of day"),
            ("Mon 24:00-02:00", "cannot open at 24:00"),
        ] {
            let e = Window::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
