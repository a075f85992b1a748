//! The prefetch jobs' records (SPEC 6): what a job shows, how it is kept on disk across a restart,
//! and the table of running and ended jobs. `prefetch.rs` runs them.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::store::Digest;

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct FileState {
    /// Without its query (a SAS `sig`): what the job shows.
    pub url: String,
    pub sha256: Digest,
    pub size: Option<u64>,
    pub state: String,
    pub bytes: u64,
    pub error: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Job {
    pub id: String,
    /// `running`, `waiting-window` (outside the uplink's windows), `queued` (before `notBefore`),
    /// `done` or `failed`.
    pub state: String,
    pub files: Vec<FileState>,
    /// Not started before this time (RFC 3339).
    #[serde(rename = "notBefore", default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
}

impl Job {
    /// Still to run on: not ended.
    pub fn unfinished(&self) -> bool {
        !matches!(self.state.as_str(), "done" | "failed")
    }
}

/// How a job runs (SPEC 6): pinned, held to the uplink's windows, not before a time.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Plan {
    pub pin: bool,
    /// Runs only inside `uplink.windows` (the default; `"window": false` runs it outside them too,
    /// still as background work).
    #[serde(default = "yes")]
    pub window: bool,
    #[serde(default)]
    pub not_before: Option<jiff::Timestamp>,
}

fn yes() -> bool {
    true
}

/// A job as it is kept on disk (`store` record `prefetch/<id>`): what it shows, the whole URLs to fetch
/// from, and whether to pin. Written when the job starts and after each file, so that a restart
/// carries a running job on from its first file not stored.
#[derive(Serialize, Deserialize)]
pub(super) struct Saved {
    pub job: Job,
    pub urls: Vec<String>,
    pub pin: bool,
    /// Absent from the records of before windows: those ran at once.
    #[serde(default)]
    pub plan: Option<Plan>,
}

/// Ended jobs kept readable (on disk and in memory); older ones are forgotten at start.
pub(super) const KEPT_JOBS: usize = 100;
pub(super) const RECORDS: &str = "prefetch";

/// The prefetch jobs: running, and ended ones kept for reading back.
#[derive(Default)]
pub struct Jobs {
    pub(super) next: AtomicU64,
    pub(super) jobs: Mutex<HashMap<String, Arc<Mutex<Job>>>>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// (start time, sequence number) from a job id `<hex ms>-<n>`.
pub(super) fn job_order(id: &str) -> (u64, u64) {
    let (ms, n) = id.split_once('-').unwrap_or((id, "0"));
    (
        u64::from_str_radix(ms, 16).unwrap_or(0),
        n.parse().unwrap_or(0),
    )
}
