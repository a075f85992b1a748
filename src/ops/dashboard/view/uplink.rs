//! The uplink budget as the dashboard shows it (SPEC 4): its caps, what each class reads now, when
//! background work may run; and the prefetch jobs (SPEC 6), the background work it holds back, each with
//! the time it waits for. Made from what `fetch` exposes: `Uplink::status` and the jobs.

use serde::Serialize;

use super::{bytes, progress, Bar};
use crate::fetch::prefetch::Job;
use crate::fetch::uplink::UplinkStatus;

/// The budget's state.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UplinkView {
    /// The common cap, "8.00 MiB/s", or "none".
    pub max_rate: String,
    /// The cap of background work on its own.
    pub background_rate: String,
    /// What each class reads now (over the last second).
    pub foreground: String,
    pub background: String,
    /// What each class has read since start.
    pub foreground_total: String,
    pub background_total: String,
    /// The windows as configured, with their time zone.
    pub windows: String,
    /// Background work may use the uplink now.
    pub window_open: bool,
    /// The window's state as a person reads it: "open until ...", "closed until ...".
    pub window: String,
    /// When the windows next open (RFC 3339), while they are closed.
    pub next_window: Option<String>,
}

pub fn uplink(s: &UplinkStatus) -> UplinkView {
    let rate = |r: u64| format!("{}/s", bytes(r));
    let cap = |r: u64, none: &str| if r == 0 { none.to_string() } else { rate(r) };
    UplinkView {
        max_rate: cap(s.max_rate, "none"),
        background_rate: cap(s.background_rate, "none of its own"),
        foreground: rate(s.rate.foreground),
        background: rate(s.rate.background),
        foreground_total: bytes(s.bytes.foreground),
        background_total: bytes(s.bytes.background),
        windows: match s.windows.as_slice() {
            [] => "none: background work may run at any time".into(),
            w => format!("{} ({})", w.join(", "), s.timezone),
        },
        window_open: s.window_open,
        window: window(s),
        next_window: s.next_window.clone(),
    }
}

fn window(s: &UplinkStatus) -> String {
    match (s.window_open, &s.window_closes, &s.next_window) {
        (true, _, _) if s.windows.is_empty() => "open".into(),
        (true, Some(at), _) => format!("open until {at}"),
        (true, None, _) => "open".into(),
        (false, _, Some(at)) => format!("closed until {at}"),
        (false, _, None) => "closed, and no window opens within a week".into(),
    }
}

/// A prefetch job.
#[derive(Serialize)]
pub struct JobRow {
    pub id: String,
    /// As the job says: `running`, `waiting-window`, `queued`, `done` or `failed`.
    pub state: String,
    /// What a job not running yet waits for: the next window, or its `notBefore`.
    pub until: String,
    pub files: String,
    pub progress: Bar,
    pub errors: String,
}

pub fn job(j: Job, s: &UplinkStatus) -> JobRow {
    let stored = j.files.iter().filter(|f| f.state == "stored").count();
    let done: u64 = j.files.iter().map(|f| f.bytes).sum();
    let size: Option<u64> = j.files.iter().map(|f| f.size).sum();
    let errors: Vec<String> = j
        .files
        .iter()
        .filter_map(|f| f.error.as_ref().map(|e| format!("{}: {e}", f.url)))
        .collect();
    JobRow {
        until: until(&j, s),
        id: j.id,
        state: j.state,
        files: format!("{stored} of {} stored", j.files.len()),
        progress: progress(done, size),
        errors: errors.join("; "),
    }
}

/// The time a job that has not ended waits for. Its state is shown as it is: a job waiting for a window
/// or its time has neither finished nor failed, whatever its files say so far.
fn until(j: &Job, s: &UplinkStatus) -> String {
    match j.state.as_str() {
        "waiting-window" => match &s.next_window {
            Some(at) => format!("the next window, {at}"),
            None => "the next window".into(),
        },
        "queued" => match &j.not_before {
            Some(at) => format!("notBefore, {at}"),
            None => "its turn".into(),
        },
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::uplink::ClassFigures;

    fn status(windows: &[&str], open: bool, next: Option<&str>) -> UplinkStatus {
        UplinkStatus {
            max_rate: 8 << 20,
            background_rate: 0,
            rate: ClassFigures {
                foreground: 1 << 20,
                background: 0,
            },
            bytes: ClassFigures::default(),
            windows: windows.iter().map(|w| w.to_string()).collect(),
            timezone: "UTC".into(),
            window_open: open,
            next_window: next.map(str::to_string),
            window_closes: None,
        }
    }

    fn job_in(state: &str, not_before: Option<&str>) -> Job {
        Job {
            id: "1-0".into(),
            state: state.into(),
            files: Vec::new(),
            not_before: not_before.map(str::to_string),
        }
    }

    #[test]
    fn the_budget_reads_as_caps_rates_and_the_next_window() {
        let next = "2026-12-07T10:00:00Z";
        let v = uplink(&status(&["Mon 10:00-11:00"], false, Some(next)));
        assert_eq!(v.max_rate, "8.00 MiB/s");
        assert_eq!(v.background_rate, "none of its own");
        assert_eq!(v.foreground, "1.00 MiB/s");
        assert_eq!(v.windows, "Mon 10:00-11:00 (UTC)");
        assert_eq!(v.window, format!("closed until {next}"));
        assert_eq!(uplink(&status(&[], true, None)).window, "open");
    }

    #[test]
    fn jobs_not_started_yet_show_what_they_wait_for() {
        let s = status(&["Mon 10:00-11:00"], false, Some("2026-12-07T10:00:00Z"));
        let w = job(job_in("waiting-window", None), &s);
        assert_eq!(
            (w.state.as_str(), w.until.as_str()),
            ("waiting-window", "the next window, 2026-12-07T10:00:00Z")
        );
        let q = job(job_in("queued", Some("2027-01-01T00:00:00Z")), &s);
        assert_eq!(q.until, "notBefore, 2027-01-01T00:00:00Z");
        assert_eq!(job(job_in("done", None), &s).until, "");
    }
}
